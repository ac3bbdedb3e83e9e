//! `vdisk create`: make a new image, with qemu-img's syntax, messages and `Formatting` line.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use vdisk_formats::image::create_options_help;
use vdisk_formats::{CreateOptions, Format, OpenOptions};

use crate::errors::{describe, UsageError};
use crate::image_args::{backing_path, parse_driver, resolve_create_secret};
use crate::numbers::cvtnum;
use crate::objects::Objects;
use crate::options::{self, CheckedOption, Typed};

/// Create a new disk image.
///
/// SIZE takes an optional suffix k, M, G, T, P or E (powers of 1024); it may also be given as
/// `-o size=SIZE`. An existing FILENAME is overwritten.
///
/// Examples:
///
///   vdisk create -f qcow2 disk.qcow2 10G
///
///   vdisk create -f qcow2 -o cluster_size=2M,lazy_refcounts=on,preallocation=metadata big.qcow2 1T
///
///   vdisk create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2
///
///   vdisk create -f qcow2 -o help
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Format of the new image: raw (the default) or qcow2
    #[arg(
        short = 'f',
        long = "format",
        value_name = "FMT",
        default_value = "raw"
    )]
    format: String,

    /// Format options, `key=value` pairs separated by commas (write a comma inside a value as
    /// `,,`); `-o help` lists the options of the format. May be repeated.
    #[arg(short = 'o', long = "options", value_name = "FMT_OPTS")]
    options: Vec<String>,

    /// Stack the new image on BACKING_FILENAME (qcow2); SIZE defaults to its size
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    backing: Option<String>,

    /// Format of BACKING_FILENAME (required with -b)
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,

    /// Do not open the backing file (SIZE is then required)
    #[arg(short = 'u', long = "backing-unsafe")]
    backing_unsafe: bool,

    /// A secret for encrypted images: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    object: Vec<String>,

    /// Do not print the `Formatting ...` line
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// The image file to create
    #[arg(value_name = "FILENAME")]
    filename: Option<PathBuf>,

    /// Virtual size, e.g. 10G or 1.5T
    #[arg(value_name = "SIZE")]
    size: Option<String>,

    /// Arguments after SIZE, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let list = options::parse_lists(&args.options)?;
    if list.help {
        let format = parse_format(&args.format)?;
        print_help(format, args.filename.is_some())?;
        return Ok(());
    }
    let Some(file) = args.filename.clone() else {
        return Err(UsageError::error("create", "Expecting image file name"));
    };
    if let Some(extra) = args.extra.first() {
        return Err(UsageError::error(
            "create",
            format!("Unexpected argument: {extra}"),
        ));
    }
    let size = args.size.as_deref().map(image_size).transpose()?;
    create_file(&args, file.clone(), size, &list.pairs).with_context(|| file.display().to_string())
}

/// Everything after the command line is read: errors from here on name the file first.
fn create_file(
    args: &Args,
    file: PathBuf,
    size: Option<u64>,
    pairs: &[(String, String)],
) -> Result<()> {
    let format = parse_format(&args.format)?;
    let objects = Objects::parse(&args.object)?;
    let mut pairs = pairs.to_vec();
    if let Some(b) = &args.backing {
        pairs.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &args.backing_format {
        pairs.push(("backing_fmt".into(), f.clone()));
    }
    let named = |key: &str| {
        pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let (backing, backing_fmt) = (named("backing_file"), named("backing_fmt"));
    if backing.is_some() && format != Format::Qcow2 {
        bail!("Backing file not supported for file format '{format}'");
    }
    let checked = options::check_types(&pairs, create_options_help(format))?;
    let size_opt = checked.iter().find(|o| o.name == "size");
    let size = match (size, size_opt) {
        (Some(_), Some(_)) => bail!("The image size must be specified only once"),
        (Some(s), None) => Some(s),
        (
            None,
            Some(CheckedOption {
                typed: Typed::Number(s),
                ..
            }),
        ) => Some(*s),
        _ => None,
    };
    let size = match &backing {
        Some(name) => backing_size(
            &file,
            name,
            backing_fmt.as_deref(),
            size,
            args.backing_unsafe,
        )?,
        None => size,
    };
    let Some(size) = size else {
        bail!("Image creation needs a size parameter");
    };
    if !args.quiet {
        println!("{}", formatting_line(&file, format, size, &checked));
    }
    if backing_fmt.is_some() && backing.is_none() {
        bail!("Backing format cannot be used without backing file");
    }

    let pairs: Vec<(String, String)> = checked
        .iter()
        .filter(|o| o.name != "size")
        .map(|o| (o.name.clone(), o.canonical()))
        .collect();
    let opts = match CreateOptions::from_pairs(format, Some(size), &pairs) {
        // The backing file was checked above (or -u said not to open it).
        Ok(CreateOptions::Qcow2(mut q)) => {
            q.open_backing = false;
            CreateOptions::Qcow2(q)
        }
        other => other.map_err(|e| anyhow!(describe(&e)))?,
    };
    let opts = resolve_create_secret(opts, &objects)?;
    vdisk_formats::create(&file, &opts).map_err(|e| anyhow!(describe(&e)))
}

/// Checks the backing file as qemu-img does before creating an overlay, and returns the size of
/// the new image: `size` if given, else the backing file's. With `unsafe_open` (-u) the backing
/// file is not opened and a size is required.
fn backing_size(
    file: &Path,
    name: &str,
    format: Option<&str>,
    size: Option<u64>,
    unsafe_open: bool,
) -> Result<Option<u64>> {
    let path = backing_path(file, name);
    if std::fs::canonicalize(&path).ok() == std::fs::canonicalize(file).ok() && path.exists() {
        bail!("Error: Trying to create an image with the same filename as the backing file");
    }
    let Some(format) = format else {
        let detected = vdisk_formats::probe(&path)
            .map(|f| format!("\nDetected format of {f}."))
            .unwrap_or_default();
        bail!("Backing file specified without backing format{detected}");
    };
    if unsafe_open {
        return Ok(size);
    }
    // qemu-img opens the backing file without I/O: an encrypted one needs no secret.
    let parsed = parse_driver(format).ok();
    if let Some(Ok(info)) = parsed.map(|f| vdisk_formats::describe(&path, Some(f))) {
        if info.encrypted == Some(true) {
            return Ok(Some(size.unwrap_or(info.virtual_size)));
        }
    }
    let opened = parse_driver(format).and_then(|f| {
        let opts = OpenOptions {
            format: Some(f),
            read_only: true,
            no_backing: false,
            backing_policy: crate::backing_policy::get(),
        };
        vdisk_formats::open(&path, opts).map_err(|e| anyhow!(describe(&e)))
    });
    match opened {
        Ok(dev) => Ok(Some(size.unwrap_or(dev.size()))),
        Err(e) => bail!("{e:#}\nCould not open backing image."),
    }
}

/// A format name as `-f` takes it.
fn parse_format(name: &str) -> Result<Format> {
    Format::from_name(name).map_err(|_| anyhow!("Unknown file format '{name}'"))
}

/// SIZE as qemu-img checks it: a size that fits a signed 64-bit number.
fn image_size(text: &str) -> Result<u64> {
    cvtnum("image size", text)
}

/// `-o help`: the options of the format. Without a file name qemu-img adds that the protocol may
/// know more options.
pub(crate) fn print_help(format: Format, with_file: bool) -> Result<()> {
    if with_file {
        println!("Supported options:");
    } else {
        println!("Supported {format} options:");
    }
    for line in options::help_lines(create_options_help(format)) {
        println!("{line}");
    }
    if !with_file {
        println!();
        println!("The protocol level may support further options.");
        println!("Specify the target filename to include those options.");
    }
    Ok(())
}

/// The order in which qemu-img 10 lists a format's creation options in its `Formatting` line
/// (the order of QEMU's option tables: format options, then the file protocol's), with the
/// default it prints for options left unset.
fn echo_order(format: Format) -> &'static [(&'static str, Option<&'static str>)] {
    match format {
        Format::Raw => &[
            ("size", None),
            ("nocow", None),
            ("preallocation", None),
            ("extent_size_hint", None),
        ],
        Format::Qcow2 => &[
            ("encryption", None),
            ("encrypt.format", None),
            ("encrypt.key-secret", None),
            ("encrypt.cipher-alg", None),
            ("encrypt.cipher-mode", None),
            ("encrypt.ivgen-alg", None),
            ("encrypt.ivgen-hash-alg", None),
            ("encrypt.hash-alg", None),
            ("encrypt.iter-time", None),
            ("cluster_size", Some("65536")),
            ("extended_l2", Some("off")),
            ("preallocation", None),
            ("compression_type", Some("zlib")),
            ("size", None),
            ("compat", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("data_file", None),
            ("data_file_raw", None),
            ("lazy_refcounts", Some("off")),
            ("refcount_bits", Some("16")),
            ("nocow", None),
            ("extent_size_hint", None),
        ],
        Format::Luks => &[
            ("size", None),
            ("key-secret", None),
            ("cipher-alg", None),
            ("cipher-mode", None),
            ("ivgen-alg", None),
            ("ivgen-hash-alg", None),
            ("hash-alg", None),
            ("iter-time", None),
        ],
    }
}

/// `Formatting 'FILE', fmt=FMT key=value ...` exactly as qemu-img prints it before creating.
fn formatting_line(
    file: &std::path::Path,
    format: Format,
    size: u64,
    checked: &[CheckedOption],
) -> String {
    let mut line = format!("Formatting '{}', fmt={format}", file.display());
    let order = echo_order(format);
    for (name, default) in order {
        let value = if *name == "size" {
            Some(size.to_string())
        } else {
            checked
                .iter()
                .find(|o| o.name == *name)
                .map(CheckedOption::echo)
                .or(default.map(str::to_string))
        };
        if let Some(value) = value {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    // Options the format accepts that the table above does not place.
    for o in checked
        .iter()
        .filter(|o| !order.iter().any(|(n, _)| *n == o.name))
    {
        line.push_str(&format!(" {}={}", o.name, o.echo()));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(pairs: &[(&str, &str)], format: Format) -> Vec<CheckedOption> {
        let pairs: Vec<_> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        options::check_types(&pairs, create_options_help(format)).unwrap()
    }

    #[test]
    fn qcow2_formatting_line_lists_defaults_in_qemu_order() {
        let line = formatting_line("a.qcow2".as_ref(), Format::Qcow2, 1 << 30, &[]);
        assert_eq!(
            line,
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        let c = checked(
            &[
                ("refcount_bits", "8"),
                ("compat", "v2"),
                ("preallocation", "metadata"),
                ("lazy_refcounts", "yes"),
                ("cluster_size", "4k"),
            ],
            Format::Qcow2,
        );
        let line = formatting_line("a.qcow2".as_ref(), Format::Qcow2, 1 << 30, &c);
        assert_eq!(
            line,
            "Formatting 'a.qcow2', fmt=qcow2 cluster_size=4096 extended_l2=off \
             preallocation=metadata compression_type=zlib size=1073741824 compat=v2 \
             lazy_refcounts=yes refcount_bits=8"
        );
    }

    #[test]
    fn raw_formatting_line_shows_only_what_was_given() {
        let line = formatting_line("a.raw".as_ref(), Format::Raw, 1 << 30, &[]);
        assert_eq!(line, "Formatting 'a.raw', fmt=raw size=1073741824");
        let c = checked(&[("preallocation", "falloc")], Format::Raw);
        let line = formatting_line("a.raw".as_ref(), Format::Raw, 1 << 30, &c);
        assert_eq!(
            line,
            "Formatting 'a.raw', fmt=raw size=1073741824 preallocation=falloc"
        );
    }

    #[test]
    fn image_sizes_are_checked_like_qemu_img() {
        assert_eq!(image_size("1G").unwrap(), 1 << 30);
        assert_eq!(
            image_size("1X").unwrap_err().to_string(),
            "Invalid image size specified: '1X'."
        );
        assert_eq!(
            image_size("8E").unwrap_err().to_string(),
            "Invalid image size specified. Must be between 0 and 9223372036854775807."
        );
    }
}
