//! `vdisk commit`: write the changes an overlay holds into an image below it in the chain.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::{BlockDev, ExtentKind, Format, ZeroFlags};

use crate::errors::{describe, UsageError};
use crate::image_args::{chain, check_cache_mode, ImageOpts, ImageRef, Layer};
use crate::progress::Progress;

/// Largest read and write.
const CHUNK: u64 = 2 << 20;

/// Commit an image to its backing file.
///
/// Copies everything FILENAME (and the images between it and the base) stores into the base
/// image: its backing file, or the image -b names further down the chain. Afterwards FILENAME is
/// emptied, so it reads through to the base again, unless -d is given or -b names a deeper
/// image (the images in between would then see changed data under them; discard them).
///
/// Examples:
///
///   vdisk commit overlay.qcow2
///
///   vdisk commit -p -b base.qcow2 top.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// The image of the backing chain to commit into (default: the backing file; implies -d)
    #[arg(short = 'b', long = "base", value_name = "BASE_IMG")]
    base: Option<String>,

    /// Leave FILENAME as it is instead of emptying it
    #[arg(short = 'd', long = "drop")]
    drop: bool,

    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,

    /// Do not print `Image committed.`
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Cache mode (accepted; vdisk uses the host page cache)
    #[arg(short = 't', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,

    /// I/O rate limit in bytes per second (accepted, not enforced)
    #[arg(short = 'r', long = "rate", value_name = "RATE")]
    rate: Option<String>,

    /// The overlay to commit
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(UsageError::error("commit", "Expecting one image file name"));
    };
    check_cache_mode(args.cache.as_deref(), "")?;
    let image = args.image.image(file)?;
    let top = image.open(true, false)?;
    let layers = chain(&image)?;
    if layers.len() < 2 {
        bail!("Image does not have a backing file");
    }
    let depth = match &args.base {
        None => 1,
        Some(name) => find_in_chain(&layers, name)
            .ok_or_else(|| anyhow!("Did not find '{name}' in the backing chain of '{file}'"))?,
    };
    let empty_top = !args.drop && args.base.is_none();
    let base = &layers[depth];
    let base_format = base.format.as_deref().map(crate::image_args::parse_driver);
    let base_format = match base_format {
        Some(f) => f?,
        None => vdisk_formats::probe(&base.path).map_err(|e| anyhow!(describe(&e)))?,
    };
    if base.info.virtual_size < top.size() {
        let opts = vdisk_formats::ResizeOptions {
            format: Some(base_format),
            shrink: false,
            preallocation: vdisk_formats::Preallocation::Off,
            backing_policy: crate::backing_policy::get(),
        };
        vdisk_formats::resize_image(&base.path, top.size(), opts, None)
            .map_err(|e| anyhow!(describe(&e)))?;
    }
    let base_dev = ImageRef::file(&base.path.display().to_string(), Some(base_format.name()))
        .open(false, false)?;

    let progress = Progress::new(args.progress && !args.quiet);
    let copied = copy_above(&top, &base_dev, depth as u32, &progress);
    progress.finish(copied.is_ok());
    copied?;
    if empty_top {
        make_empty(&layers[0], &image)?;
    }
    if !args.quiet {
        println!("Image committed.");
    }
    Ok(())
}

/// The chain index of the image `name` names (as given, or resolved to the same file).
fn find_in_chain(layers: &[Layer], name: &str) -> Option<usize> {
    let wanted = std::fs::canonicalize(name).ok();
    layers.iter().enumerate().skip(1).find_map(|(i, l)| {
        let same = l.path == Path::new(name)
            || wanted.is_some() && std::fs::canonicalize(&l.path).ok() == wanted;
        same.then_some(i)
    })
}

/// Writes every range the layers above `depth` resolve into `base`.
fn copy_above(
    top: &Arc<dyn BlockDev>,
    base: &Arc<dyn BlockDev>,
    depth: u32,
    progress: &Progress,
) -> Result<()> {
    let size = top.size();
    let mut buf = vec![0u8; CHUNK.min(size) as usize];
    let mut off = 0;
    while off < size {
        let e = top
            .extent(off, (size - off).min(CHUNK))
            .map_err(|e| anyhow!(describe(&e)))?;
        if e.depth < depth {
            if e.kind == ExtentKind::Data {
                let b = &mut buf[..e.length as usize];
                top.read_at(b, off).map_err(|e| anyhow!(describe(&e)))?;
                base.write_at(b, off).map_err(|e| anyhow!(describe(&e)))?;
            } else {
                let unmap = ZeroFlags {
                    may_unmap: true,
                    fast_only: false,
                };
                base.write_zeroes(off, e.length, unmap)
                    .map_err(|e| anyhow!(describe(&e)))?;
            }
        }
        off += e.length;
        progress.update(off, size);
    }
    base.flush().map_err(|e| anyhow!(describe(&e)))
}

/// Empties the qcow2 overlay `top` (the image `image` names) so that it reads through to its
/// backing file again, as qemu-img does (see [`vdisk_formats::qcow2::make_empty`]).
fn make_empty(top: &Layer, image: &ImageRef) -> Result<()> {
    if top.info.format != Format::Qcow2.name() {
        bail!("Image format does not support emptying");
    }
    let policy = crate::backing_policy::get();
    vdisk_formats::qcow2::make_empty(&top.path, image.secret.as_ref(), policy)
        .map_err(|e| anyhow!("Could not empty {}: {}", top.path.display(), describe(&e)))
}
