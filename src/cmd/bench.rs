//! `vdisk bench`: qemu-img's simple I/O benchmark, with `depth` threads issuing requests at once
//! on one shared image.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::BlockDev;

use crate::errors::{describe, UsageError};
use crate::image_args::ImageRef;
use crate::numbers::{parse_int_in, parse_size_arg, NumError};
use crate::objects::Objects;

/// Run a simple image benchmark.
///
/// Sends COUNT requests of BUFFER_SIZE bytes, DEPTH of them in flight at once (one thread each),
/// starting at OFFSET and advancing by STEP_SIZE, wrapping before the end of the image.
///
/// Examples:
///
///   vdisk bench -c 100000 -d 32 disk.qcow2
///
///   vdisk bench -w -s 64k -S 64k --flush-interval=64 disk.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Number of I/O requests to perform
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    count: Option<String>,

    /// Number of requests to perform in parallel
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    depth: Option<String>,

    /// Format of the image (raw, qcow2); probed when not given
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,

    /// FILENAME is an option string (driver=qcow2,file.filename=disk.qcow2)
    #[arg(long = "image-opts")]
    image_opts: bool,

    /// Issue a flush after this number of requests (write tests only; 0 never flushes)
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,

    /// Use the native AIO backend (accepted; needs -t none or -t directsync)
    #[arg(short = 'n', long = "native")]
    native: bool,

    /// Async I/O backend: threads, native or io_uring (accepted; vdisk uses threads)
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,

    /// Do not wait for requests in flight before a flush
    #[arg(long = "no-drain")]
    no_drain: bool,

    /// Start the first request at this offset
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    offset: Option<String>,

    /// Byte to fill written buffers with (default 0)
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,

    /// Quiet operation (accepted; like qemu-img, bench prints its results anyway)
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Size of each request (default 4096)
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    buffer_size: Option<String>,

    /// Offset increment between requests (default: the buffer size)
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    step_size: Option<String>,

    /// Cache mode: none, writeback, writethrough, directsync or unsafe (accepted; vdisk always
    /// goes through the host page cache)
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,

    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    write: bool,

    /// Open the image in shared mode (accepted; vdisk takes no image locks)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,

    /// The image to benchmark
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

/// Largest count, depth, buffer size and flush interval qemu-img accepts.
const INT_MAX: i64 = i32::MAX as i64;

/// Most threads started, whatever the depth asked for.
const MAX_THREADS: u64 = 1024;

/// A benchmark run, read from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    count: u64,
    depth: u64,
    bufsize: u64,
    offset: u64,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
}

impl Plan {
    fn from_args(args: &Args) -> Result<Plan> {
        let int = |text: &Option<String>, what: &str, range: (i64, i64), default: u64| {
            let Some(text) = text else {
                return Ok(default);
            };
            let (min, max) = range;
            match parse_int_in(text, min, max) {
                Ok(v) => Ok(v as u64),
                Err(NumError::Invalid) => Err(anyhow!("Invalid {what} specified: '{text}'.")),
                Err(NumError::Range) => Err(anyhow!(
                    "Invalid {what} specified. Must be between {min} and {max}."
                )),
            }
        };
        let size = |text: &Option<String>, what: &str, range: (u64, u64), default: u64| {
            let Some(text) = text else {
                return Ok(default);
            };
            let (min, max) = range;
            match parse_size_arg(text) {
                Ok(v) if (min..=max).contains(&v) => Ok(v),
                Ok(_) | Err(NumError::Range) => Err(anyhow!(
                    "Invalid {what} specified. Must be between {min} and {max}."
                )),
                Err(NumError::Invalid) => Err(anyhow!("Invalid {what} specified: '{text}'.")),
            }
        };
        let count = int(&args.count, "request count", (1, INT_MAX), 75000)?;
        let depth = int(&args.depth, "queue depth", (1, INT_MAX), 64)?;
        let bufsize = size(&args.buffer_size, "buffer size", (1, INT_MAX as u64), 4096)?;
        let offset = size(&args.offset, "offset", (0, i64::MAX as u64), 0)?;
        let step = match size(&args.step_size, "step size", (0, INT_MAX as u64), 0)? {
            0 => bufsize,
            s => s,
        };
        let pattern = int(&args.pattern, "pattern byte", (0, 255), 0)?;
        let flush_interval = int(&args.flush_interval, "flush interval", (0, INT_MAX), 0)?;
        if let Some(cache) = &args.cache {
            if !matches!(
                cache.as_str(),
                "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe"
            ) {
                bail!("Invalid cache mode");
            }
        }
        if let Some(aio) = &args.aio {
            if !matches!(aio.as_str(), "threads" | "native" | "io_uring") {
                bail!("Invalid aio option: {aio}");
            }
        }
        if args.flush_interval.is_some() && !args.write {
            bail!("--flush-interval is only available in write tests");
        }
        if flush_interval > 0 && flush_interval < depth {
            bail!("Flush interval can't be smaller than depth");
        }
        Ok(Plan {
            count,
            depth,
            bufsize,
            offset,
            step,
            write: args.write,
            pattern: pattern as u8,
            flush_interval,
            drain: !args.no_drain,
        })
    }

    /// Offset of request `index`: the start offset, then advancing by the step modulo the image
    /// size, as qemu-img 10.0 does (a request that then runs past the end fails, as there).
    fn request_offset(&self, index: u64, image_size: u64) -> u64 {
        if index == 0 {
            return self.offset;
        }
        if image_size == 0 {
            return 0;
        }
        let at = u128::from(self.offset) + u128::from(index) * u128::from(self.step);
        (at % u128::from(image_size)) as u64
    }
}

pub fn run(args: Args) -> Result<()> {
    let plan = Plan::from_args(&args)?;
    let (Some(file), true) = (args.filename.clone(), args.extra.is_empty()) else {
        return Err(UsageError::error("bench", "Expecting one image file name"));
    };
    if args.image_opts && args.format.is_some() {
        bail!("--image-opts and --format are mutually exclusive");
    }
    let could_not_open = |why: String| anyhow!("Could not open '{file}': {why}");
    let direct = matches!(args.cache.as_deref(), Some("none" | "off" | "directsync"));
    if (args.native || args.aio.as_deref() == Some("native")) && !direct {
        return Err(could_not_open(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .to_string(),
        ));
    }
    // qemu-img bench takes no --object: an encrypted image has no secret to open with.
    let image = ImageRef::parse(&file, args.format.as_deref(), args.image_opts)?
        .with_secret(&Objects::default())?;
    let dev = image.open(!plan.write, false)?;

    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        plan.count,
        if plan.write { "write" } else { "read" },
        plan.bufsize,
        plan.depth,
        plan.offset,
        plan.step
    );
    if plan.flush_interval > 0 {
        println!("Sending flush every {} requests", plan.flush_interval);
    }
    let start = Instant::now();
    execute(&plan, dev.clone())?;
    let elapsed = start.elapsed();
    if plan.write {
        dev.flush()
            .map_err(|e| anyhow!("Failed flush request: {}", describe(&e)))?;
    }
    println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    Ok(())
}

/// Runs the requests on `min(depth, count)` threads sharing one request counter. A flush after
/// every `flush_interval` completed requests waits for the requests in flight unless `drain` is
/// off.
fn execute(plan: &Plan, dev: Arc<dyn BlockDev>) -> Result<()> {
    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    // Requests hold it shared; a draining flush holds it exclusively.
    let gate = RwLock::new(());
    let image_size = dev.size();
    let threads = plan.depth.min(plan.count).min(MAX_THREADS);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (dev, next, completed, gate) = (&dev, &next, &completed, &gate);
                scope.spawn(move || -> Result<()> {
                    let mut buf = vec![plan.pattern; plan.bufsize as usize];
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= plan.count {
                            return Ok(());
                        }
                        let offset = plan.request_offset(index, image_size);
                        let result = {
                            let _shared = gate.read().unwrap();
                            if plan.write {
                                dev.write_at(&buf, offset)
                            } else {
                                dev.read_at(&mut buf, offset)
                            }
                        };
                        if let Err(e) = result {
                            // Stop the other threads too.
                            next.store(plan.count, Ordering::Relaxed);
                            bail!("Failed request: {}", describe(&e));
                        }
                        let done = completed.fetch_add(1, Ordering::Relaxed) + 1;
                        if plan.flush_interval > 0 && done % plan.flush_interval == 0 {
                            let _exclusive = plan.drain.then(|| gate.write().unwrap());
                            dev.flush()
                                .map_err(|e| anyhow!("Failed flush request: {}", describe(&e)))?;
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a benchmark thread panicked"))
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn plan(argv: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))?;
        Plan::from_args(&cli.args)
    }

    #[test]
    fn defaults_are_qemu_img_defaults() {
        let p = plan(&["x"]).unwrap();
        assert_eq!(
            (p.count, p.depth, p.bufsize, p.offset, p.step),
            (75000, 64, 4096, 0, 4096)
        );
        assert!(!p.write && p.drain);
    }

    #[test]
    fn step_zero_means_buffer_size() {
        let p = plan(&["-s", "1.5k", "-S", "0", "x"]).unwrap();
        assert_eq!((p.bufsize, p.step), (1536, 1536));
    }

    #[test]
    fn bad_numbers_get_qemu_img_messages() {
        let err = |argv: &[&str]| plan(argv).unwrap_err().to_string();
        assert_eq!(
            err(&["-c", "0", "x"]),
            "Invalid request count specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(&["-c", "1k", "x"]),
            "Invalid request count specified: '1k'."
        );
        assert_eq!(
            err(&["-d", "-1", "x"]),
            "Invalid queue depth specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(&["-s", "2G", "x"]),
            "Invalid buffer size specified. Must be between 1 and 2147483647."
        );
        assert_eq!(
            err(&["-o", "-1", "x"]),
            "Invalid offset specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            err(&["-S", "abc", "x"]),
            "Invalid step size specified: 'abc'."
        );
        assert_eq!(
            err(&["-w", "--pattern=256", "x"]),
            "Invalid pattern byte specified. Must be between 0 and 255."
        );
        assert_eq!(
            err(&["--flush-interval=100", "x"]),
            "--flush-interval is only available in write tests"
        );
        assert_eq!(
            err(&["-w", "--flush-interval=10", "x"]),
            "Flush interval can't be smaller than depth"
        );
        assert_eq!(err(&["-t", "bogus", "x"]), "Invalid cache mode");
        assert_eq!(err(&["-i", "bogus", "x"]), "Invalid aio option: bogus");
    }

    #[test]
    fn offsets_wrap_at_the_end_of_the_image_like_qemu_img_10_0() {
        let p = plan(&["-o", "8k", "-s", "4k", "x"]).unwrap();
        assert_eq!(p.request_offset(0, 16384), 8192);
        // The last buffer of the image is written before wrapping (modulo the image size).
        assert_eq!(p.request_offset(1, 16384), 12288);
        assert_eq!(p.request_offset(2, 16384), 0);
        assert_eq!(p.request_offset(3, 16384), 4096);
        assert_eq!(p.request_offset(5, 0), 0);
    }
}
