//! `vdisk compare`: whether two images read the same, with qemu-img's messages and exit codes.

use std::sync::Arc;

use anyhow::Result;
use vdisk_formats::{BlockDev, Extent, ExtentKind};

use crate::errors::{describe, Exit, UsageError};
use crate::image_args::{check_cache_mode, ImageRef};
use crate::objects::Objects;
use crate::progress::Progress;

/// Largest read while comparing.
const CHUNK: u64 = 1 << 20;
/// Mismatches are reported at the start of their 512-byte sector, as qemu-img does.
const SECTOR: u64 = 512;

/// Check if two images have the same contents.
///
/// Images of different formats compare equal when every guest byte reads the same. When the sizes
/// differ, the part only the larger image has must read as zero (in strict mode, -s, the sizes
/// and the allocation state of every range must match too).
///
/// Exit status: 0 the images are identical, 1 they differ, 2 an image could not be opened,
/// 3 an allocation query failed, 4 a read failed.
///
/// Examples:
///
///   vdisk compare disk.raw disk.qcow2
///
///   vdisk compare -s -f qcow2 -F qcow2 a.qcow2 b.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Format of FILENAME1; probed when not given
    #[arg(short = 'f', long = "a-format", value_name = "FMT")]
    a_format: Option<String>,

    /// Format of FILENAME2; probed when not given
    #[arg(short = 'F', long = "b-format", value_name = "FMT")]
    b_format: Option<String>,

    /// The file names are option strings (driver=qcow2,file.filename=disk.qcow2)
    #[arg(long = "image-opts")]
    image_opts: bool,

    /// Strict mode: the sizes and the allocation of every range must match too
    #[arg(short = 's', long = "strict")]
    strict: bool,

    /// Print nothing; the exit status tells
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,

    /// Cache mode (accepted; vdisk uses the host page cache)
    #[arg(short = 'T', long = "cache", value_name = "CACHE")]
    cache: Option<String>,

    /// Open the images in shared mode (accepted; vdisk takes no image locks)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,

    /// A secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    object: Vec<String>,

    /// The two images
    #[arg(value_name = "FILENAME1 FILENAME2")]
    files: Vec<String>,
}

/// How a comparison ended, and the line it prints.
enum Verdict {
    Identical,
    Differ(String),
}

pub fn run(args: Args) -> Result<()> {
    let [a, b] = args.files.as_slice() else {
        return Err(UsageError::error(
            "compare",
            "Expecting two image file names",
        ));
    };
    let quiet = args.quiet;
    let say = |line: &str| {
        if !quiet {
            println!("{line}");
        }
    };
    let open = |name: &str, format: &Option<String>| -> Result<Arc<dyn BlockDev>> {
        let objects = Objects::parse(&args.object)?;
        let image = ImageRef::parse(name, format.as_deref(), args.image_opts)?;
        image.with_secret(&objects)?.open(true, false)
    };
    let opened = check_cache_mode(args.cache.as_deref(), "")
        .and_then(|()| Ok((open(a, &args.a_format)?, open(b, &args.b_format)?)));
    let (a, b) = opened.map_err(|e| Exit::with(2, format!("{e:#}")))?;

    let progress = Progress::new(args.progress && !quiet);
    let verdict = compare(&a, &b, args.strict, &progress, &say);
    match verdict {
        Ok(Verdict::Identical) => {
            progress.update(1, 1);
            say("Images are identical.");
            progress.finish(true);
            Ok(())
        }
        Ok(Verdict::Differ(line)) => {
            say(&line);
            progress.finish(false);
            Err(Exit::silently(1))
        }
        Err(e) => {
            progress.finish(false);
            Err(e)
        }
    }
}

fn compare(
    a: &Arc<dyn BlockDev>,
    b: &Arc<dyn BlockDev>,
    strict: bool,
    progress: &Progress,
    say: &dyn Fn(&str),
) -> Result<Verdict> {
    let (size_a, size_b) = (a.size(), b.size());
    if strict && size_a != size_b {
        return Ok(Verdict::Differ("Strict mode: Image size mismatch!".into()));
    }
    let common = size_a.min(size_b);
    let total = size_a.max(size_b);
    let mut off = 0;
    while off < common {
        let ea = extent(a, off, common - off)?;
        let eb = extent(b, off, ea.length)?;
        let n = ea.length.min(eb.length);
        let allocated = |e: &Extent| e.kind != ExtentKind::Unallocated;
        if strict && allocated(&ea) != allocated(&eb) {
            return Ok(Verdict::Differ(format!(
                "Strict mode: Offset {off} block status mismatch!"
            )));
        }
        let zero = |e: &Extent| e.kind != ExtentKind::Data;
        let mismatch = match (zero(&ea), zero(&eb)) {
            (true, true) => None,
            (true, false) => first_nonzero(b, off, n)?,
            (false, true) => first_nonzero(a, off, n)?,
            (false, false) => first_difference(a, b, off, n)?,
        };
        if let Some(at) = mismatch {
            return Ok(Verdict::Differ(format!("Content mismatch at offset {at}!")));
        }
        off += n;
        progress.update(off, total);
    }
    if size_a != size_b {
        say("Warning: Image size mismatch!");
        let larger = if size_a > size_b { a } else { b };
        let mut off = common;
        while off < total {
            let e = extent(larger, off, total - off)?;
            if e.kind == ExtentKind::Data {
                if let Some(at) = first_nonzero(larger, off, e.length)? {
                    return Ok(Verdict::Differ(format!("Content mismatch at offset {at}!")));
                }
            }
            off += e.length;
            progress.update(off, total);
        }
    }
    Ok(Verdict::Identical)
}

fn extent(dev: &Arc<dyn BlockDev>, off: u64, len: u64) -> Result<Extent> {
    dev.extent(off, len).map_err(|e| {
        Exit::with(
            3,
            format!("Sector allocation test failed: {}", describe(&e)),
        )
    })
}

fn read(dev: &Arc<dyn BlockDev>, buf: &mut [u8], off: u64) -> Result<()> {
    dev.read_at(buf, off).map_err(|e| {
        Exit::with(
            4,
            format!("Error while reading offset {off}: {}", describe(&e)),
        )
    })
}

/// The start of the first sector in `off..off+len` holding a nonzero byte.
fn first_nonzero(dev: &Arc<dyn BlockDev>, off: u64, len: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut at = off;
    while at < off + len {
        let n = CHUNK.min(off + len - at) as usize;
        read(dev, &mut buf[..n], at)?;
        if let Some(i) = buf[..n].iter().position(|&x| x != 0) {
            return Ok(Some(sector_start(at + i as u64)));
        }
        at += n as u64;
    }
    Ok(None)
}

/// The start of the first sector in `off..off+len` where the two images differ.
fn first_difference(
    a: &Arc<dyn BlockDev>,
    b: &Arc<dyn BlockDev>,
    off: u64,
    len: u64,
) -> Result<Option<u64>> {
    let size = CHUNK.min(len) as usize;
    let (mut buf_a, mut buf_b) = (vec![0u8; size], vec![0u8; size]);
    let mut at = off;
    while at < off + len {
        let n = CHUNK.min(off + len - at) as usize;
        read(a, &mut buf_a[..n], at)?;
        read(b, &mut buf_b[..n], at)?;
        if let Some(i) = buf_a[..n].iter().zip(&buf_b[..n]).position(|(x, y)| x != y) {
            return Ok(Some(sector_start(at + i as u64)));
        }
        at += n as u64;
    }
    Ok(None)
}

fn sector_start(off: u64) -> u64 {
    off / SECTOR * SECTOR
}
