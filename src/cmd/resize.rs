//! `vdisk resize`: change the virtual size of an image.

use anyhow::{anyhow, bail, Result};
use vdisk_formats::{Format, Preallocation, ResizeOptions};

use crate::errors::{describe, UsageError};
use crate::image_args::ImageOpts;
use crate::numbers::{parse_size_arg, NumError};

/// Resize an image to a new size.
///
/// SIZE is the new virtual size, or with a leading + or - the amount to grow or shrink by; it
/// takes an optional suffix k, M, G, T, P or E (powers of 1024). Shrinking needs --shrink: the
/// data past the new end is lost. New space is allocated as --preallocation says (off by
/// default). Resize the partitions and file systems inside the image separately.
///
/// Examples:
///
///   vdisk resize disk.qcow2 +10G
///
///   vdisk resize -f raw --preallocation=falloc disk.raw 20G
///
///   vdisk resize --shrink disk.qcow2 8G
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Allow the new size to be smaller than the current one
    #[arg(long = "shrink")]
    shrink: bool,

    /// How to allocate the new space: off, metadata (qcow2), falloc or full
    #[arg(long = "preallocation", value_name = "PREALLOC")]
    preallocation: Option<String>,

    /// Do not print `Image resized.`
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// The image to resize
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(value_name = "[+-]SIZE", allow_hyphen_values = true)]
    size: Option<String>,

    /// More arguments, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (Some(file), Some(size)) = (args.filename.as_deref(), args.size.as_deref()) else {
        return Err(UsageError::error(
            "resize",
            "Expecting image file name and size",
        ));
    };
    if !args.extra.is_empty() {
        return Err(UsageError::error(
            "resize",
            "Extra argument(s) in command line",
        ));
    }
    let prealloc = match args.preallocation.as_deref() {
        None => Preallocation::Off,
        Some(name) => Preallocation::from_name(name)
            .map_err(|_| anyhow!("Invalid preallocation mode '{name}'"))?,
    };
    let change = parse_change(size)?;
    let image = args.image.image(file)?;
    let format = image.format_or_probe(false)?;
    // The chain is opened as qemu-img opens it, under the backing policy.
    let current = image.open_as(format, true, false)?.size();
    let new_size = match change {
        Change::To(n) => i128::from(n),
        Change::Grow(n) => i128::from(current) + i128::from(n),
        Change::Shrink(n) => i128::from(current) - i128::from(n),
    };
    if new_size <= 0 || new_size > i128::from(i64::MAX) {
        bail!("New image size must be positive");
    }
    let new_size = new_size as u64;
    if new_size < current && prealloc != Preallocation::Off {
        bail!("Preallocation can only be used for growing images");
    }
    if new_size < current && !args.shrink {
        let prog = crate::prog::name();
        eprintln!("{prog}: Use the --shrink option to perform a shrink operation.");
        bail!(
            "warning: Shrinking an image will delete all data beyond the shrunken image's end. \
             Before performing such an operation, make sure there is no important data there."
        );
    }
    if prealloc == Preallocation::Metadata && format != Format::Qcow2 {
        bail!("Unsupported preallocation mode: metadata");
    }
    let opts = ResizeOptions {
        format: Some(format),
        shrink: true,
        preallocation: prealloc,
        backing_policy: crate::backing_policy::get(),
    };
    vdisk_formats::resize_image(&image.path, new_size, opts, image.secret.as_ref())
        .map_err(|e| anyhow!(describe(&e)))?;
    if !args.quiet {
        println!("Image resized.");
    }
    Ok(())
}

/// SIZE as resize reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    To(u64),
    Grow(u64),
    Shrink(u64),
}

fn parse_change(text: &str) -> Result<Change> {
    let (kind, number): (fn(u64) -> Change, &str) = match text.as_bytes().first() {
        Some(b'+') => (Change::Grow, &text[1..]),
        Some(b'-') => (Change::Shrink, &text[1..]),
        _ => (Change::To, text),
    };
    match parse_size_arg(number) {
        Ok(n) => Ok(kind(n)),
        // Larger than any image can be: the result cannot be a valid size.
        Err(NumError::Range) if !number.trim_start().starts_with('-') => {
            bail!("New image size must be positive")
        }
        Err(_) => bail!(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_may_be_relative() {
        assert_eq!(parse_change("1G").unwrap(), Change::To(1 << 30));
        assert_eq!(parse_change("+1M").unwrap(), Change::Grow(1 << 20));
        assert_eq!(parse_change("-512").unwrap(), Change::Shrink(512));
        assert!(parse_change("1X")
            .unwrap_err()
            .to_string()
            .starts_with("Parameter 'size' expects"));
    }
}
