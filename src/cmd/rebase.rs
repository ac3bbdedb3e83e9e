//! `vdisk rebase`: put an overlay on another backing file (or none), keeping what it reads.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::qcow2::amend::{rewrite_header, HeaderChanges};
use vdisk_formats::{BlockDev, ExtentKind, Format, OpenOptions};

use crate::errors::{describe, UsageError};
use crate::image_args::{backing_path, check_cache_mode, parse_driver, ImageOpts};
use crate::progress::Progress;

/// Change the backing file of an image.
///
/// In the default (safe) mode, every cluster FILENAME leaves to its backing chain is compared
/// between the old chain and BACKING_FILENAME; where they differ, the old data is copied into
/// FILENAME first, so the image reads the same afterwards. -b "" removes the backing file, copying
/// all the data in (flattening). With -u only the name in the header changes (use it when the
/// backing file was renamed or moved).
///
/// Examples:
///
///   vdisk rebase -b new-base.qcow2 -F qcow2 overlay.qcow2
///
///   vdisk rebase -b "" overlay.qcow2
///
///   vdisk rebase -u -b /images/moved-base.qcow2 -F qcow2 overlay.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// The new backing file ("" for none)
    #[arg(short = 'b', long = "backing", value_name = "BACKING_FILENAME")]
    backing: Option<String>,

    /// Format of the new backing file
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,

    /// Unsafe mode: only change the backing file name, copy nothing
    #[arg(short = 'u', long = "backing-unsafe")]
    unsafe_mode: bool,

    /// Write the clusters copied into the image compressed (qcow2)
    #[arg(short = 'c', long = "compress")]
    compress: bool,

    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,

    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Cache mode of FILENAME (accepted; vdisk uses the host page cache)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,

    /// Cache mode of the backing files (accepted; vdisk uses the host page cache)
    #[arg(short = 'T', long = "backing-cache", value_name = "CACHE")]
    backing_cache: Option<String>,

    /// The overlay to rebase
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(UsageError::error("rebase", "Expecting one image file name"));
    };
    if args.backing.is_none() && !args.unsafe_mode {
        return Err(UsageError::error(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    check_cache_mode(args.cache.as_deref(), "")?;
    check_cache_mode(args.backing_cache.as_deref(), "source ")?;
    let image = args.image.image(file)?;
    let format = image.format_or_probe(false)?;
    if args.compress && format != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    let new_name = args.backing.clone().unwrap_or_default();
    let change_failed =
        |why: &str| anyhow!("Could not change the backing file to '{new_name}': {why}");
    if !new_name.is_empty() && args.backing_format.is_none() {
        return Err(change_failed("backing format must be specified"));
    }
    if format != Format::Qcow2 {
        return Err(change_failed("Operation not supported"));
    }

    if !args.unsafe_mode {
        let old = image.open_as(format, true, false)?;
        let top = image.open_as(format, false, true)?;
        let new = if new_name.is_empty() {
            None
        } else {
            let path = backing_path(&image.path, &new_name);
            let format = args
                .backing_format
                .as_deref()
                .map(parse_driver)
                .transpose()?;
            let opts = OpenOptions {
                format,
                read_only: true,
                no_backing: false,
                backing_policy: crate::backing_policy::get(),
            };
            let dev = vdisk_formats::open(&path, opts).map_err(|e| {
                anyhow!(
                    "Could not open new backing file '{new_name}': {}",
                    describe(&e)
                )
            })?;
            Some(dev)
        };
        let progress = Progress::new(args.progress && !args.quiet);
        let copied = copy_differences(&old, &top, new.as_ref(), args.compress, &progress);
        progress.finish(copied.is_ok());
        copied?;
    }

    if let Some(f) = &args.backing_format {
        parse_driver(f).map_err(|e| change_failed(&e.to_string()))?;
    }
    let backing = (!new_name.is_empty()).then(|| (new_name.clone(), args.backing_format.clone()));
    let changes = HeaderChanges {
        backing: Some(backing),
        ..Default::default()
    };
    rewrite_header(&image.path, &changes).map_err(|e| change_failed(&describe(&e)))
}

/// Copies into `top` (opened without its backing file) every cluster it leaves to its backing
/// chain where the old chain (`old`, the image with its backing) and `new` read differently;
/// with `compress`, whole clusters are written compressed where that makes them smaller.
fn copy_differences(
    old: &Arc<dyn BlockDev>,
    top: &Arc<dyn BlockDev>,
    new: Option<&Arc<dyn BlockDev>>,
    compress: bool,
    progress: &Progress,
) -> Result<()> {
    let size = top.size();
    let cluster = u64::from(top.capabilities().preferred_block).max(512);
    let new_size = new.map_or(0, |n| n.size());
    let mut old_buf = vec![0u8; cluster as usize];
    let mut new_buf = vec![0u8; cluster as usize];
    let mut off = 0;
    while off < size {
        let e = top
            .extent(off, size - off)
            .map_err(|e| anyhow!(describe(&e)))?;
        if e.kind == ExtentKind::Unallocated {
            // Whole clusters: a partial write would not read its backing for the rest.
            let mut at = off / cluster * cluster;
            while at < off + e.length {
                let n = cluster.min(size - at) as usize;
                old.read_at(&mut old_buf[..n], at)
                    .map_err(|e| anyhow!(describe(&e)))?;
                new_buf[..n].fill(0);
                if at < new_size {
                    let m = (n as u64).min(new_size - at) as usize;
                    let dev = new.expect("new_size is 0 without a new backing file");
                    dev.read_at(&mut new_buf[..m], at)
                        .map_err(|e| anyhow!(describe(&e)))?;
                }
                if old_buf[..n] != new_buf[..n] {
                    write_cluster(top, &old_buf[..n], at, compress)
                        .map_err(|e| anyhow!(describe(&e)))?;
                }
                at += cluster;
                progress.update(at.min(size), size);
            }
        }
        off += e.length;
        progress.update(off, size);
    }
    top.flush().map_err(|e| anyhow!(describe(&e)))
}

/// Writes the guest cluster at `at`: compressed when asked and it is a whole cluster that
/// compresses, else as it is.
fn write_cluster(
    top: &Arc<dyn BlockDev>,
    data: &[u8],
    at: u64,
    compress: bool,
) -> vdisk_formats::Result<()> {
    let whole = top.compressed_cluster_size() == Some(data.len() as u64);
    if compress && whole {
        if let Some(packed) = top.compress_cluster(data)? {
            return top.write_compressed(at, &packed);
        }
    }
    top.write_at(data, at)
}
