//! `vdisk convert`: copy one or more images (concatenated) into a new image of any format.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::convert::{convert, ConvertOptions};
use vdisk_formats::image::create_options_help;
use vdisk_formats::qcow2::Qcow2;
use vdisk_formats::throttle::Throttled;
use vdisk_formats::{BlockDev, CreateOptions, Format};

use crate::errors::describe;
use crate::image_args::{
    check_cache_mode, create_passphrase, parse_target_format, resolve_create_secret, ImageRef,
    SnapshotCopy,
};
use crate::numbers::{cvtnum, parse_int_in, parse_size_arg};
use crate::objects::Objects;
use crate::options;
use crate::progress::Progress;

/// Copy one image to another with optional format conversion.
///
/// The sources are read in order and concatenated into TGT_FILENAME, which is created (replacing
/// an existing file) unless -n is given. Ranges that read as zero are not written (see -S), so
/// the copy stays sparse; with -c every cluster is stored compressed (qcow2 only). With -B the new
/// image is an overlay of BACKING_FILENAME and only what differs from it is written.
///
/// Examples:
///
///   vdisk convert -O qcow2 disk.raw disk.qcow2
///
///   vdisk convert -p -c -O qcow2 -o compression_type=zstd disk.raw small.qcow2
///
///   vdisk convert -f qcow2 -O raw disk.qcow2 disk.raw
///
///   vdisk convert -O qcow2 -B base.qcow2 -F qcow2 vm.qcow2 delta.qcow2
///
///   vdisk convert -n --target-is-zero -O raw disk.qcow2 /dev/sdb
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Format of the source images (raw, qcow2); probed when not given
    #[arg(short = 'f', long = "source-format", value_name = "SRC_FMT")]
    source_format: Option<String>,

    /// The source names are option strings (driver=qcow2,file.filename=disk.qcow2)
    #[arg(long = "source-image-opts", visible_alias = "image-opts")]
    image_opts: bool,

    /// Copy this internal snapshot of the source (snapshot.name=NAME, snapshot.id=ID, or NAME)
    #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT_PARAMS")]
    snapshot: Option<String>,

    /// Format of the target image (default raw)
    #[arg(short = 'O', long = "target-format", value_name = "TGT_FMT")]
    target_format: Option<String>,

    /// The target name is an option string (needs -n)
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,

    /// Options of the new image, as in `create -o`; `-o help` lists them
    #[arg(short = 'o', long = "target-options", value_name = "TGT_OPTS")]
    options: Vec<String>,

    /// Store the data as compressed clusters (qcow2 only)
    #[arg(short = 'c', long = "compress")]
    compress: bool,

    /// Make the target an overlay of BACKING_FILENAME, writing only what differs from it
    #[arg(
        short = 'B',
        short_alias = 'b',
        long = "backing",
        value_name = "BACKING_FILENAME"
    )]
    backing: Option<String>,

    /// Format of BACKING_FILENAME (required with -B)
    #[arg(short = 'F', long = "backing-format", value_name = "BACKING_FMT")]
    backing_format: Option<String>,

    /// Do not create the target: write into an existing image
    #[arg(short = 'n', long = "no-create")]
    no_create: bool,

    /// The existing target (-n) already reads as zero everywhere: zero ranges are not written
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,

    /// Zero runs of at least this size (multiple of 512, at most 16M) are left unwritten; 0
    /// writes every byte (default 4k)
    #[arg(
        short = 'S',
        long = "sparse-size",
        value_name = "SPARSE_SIZE",
        allow_hyphen_values = true
    )]
    sparse_size: Option<String>,

    /// Number of parallel workers, 1 to 16 (default: the number of CPUs, at most 8)
    #[arg(
        short = 'm',
        long = "parallel",
        value_name = "NUM",
        allow_hyphen_values = true
    )]
    parallel: Option<String>,

    /// Write chunks as soon as they are ready instead of in order
    #[arg(short = 'W', long = "oob-writes")]
    out_of_order: bool,

    /// Copy with copy offloading: raw to raw, data runs are copied inside the kernel
    /// (copy_file_range) where the file systems allow it, else the ordinary way
    #[arg(short = 'C', long = "copy-range-offloading")]
    copy_range: bool,

    /// Turn read errors into zeroes, with a warning for each, instead of failing
    #[arg(long = "salvage")]
    salvage: bool,

    /// Copy the persistent dirty bitmaps of the source (one qcow2 v3 image) to the qcow2 v3
    /// target
    #[arg(long = "bitmaps")]
    bitmaps: bool,

    /// With --bitmaps, skip inconsistent (in-use) bitmaps instead of failing
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,

    /// Show progress
    #[arg(short = 'p', long = "progress")]
    progress: bool,

    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Cache mode of the target (accepted; vdisk uses the host page cache)
    #[arg(short = 't', long = "target-cache", value_name = "TGT_CACHE")]
    target_cache: Option<String>,

    /// Cache mode of the sources (accepted; vdisk uses the host page cache)
    #[arg(short = 'T', long = "source-cache", value_name = "SRC_CACHE")]
    source_cache: Option<String>,

    /// Limit the writes to the target to RATE bytes per second (suffixes k, M, G...; 0: none)
    #[arg(
        short = 'r',
        long = "rate",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    rate: Option<String>,

    /// Open the sources in shared mode (accepted; vdisk takes no image locks)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,

    /// A secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    object: Vec<String>,

    /// Source images, then the target image
    #[arg(value_name = "SRC_FILENAME... TGT_FILENAME")]
    files: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    check_cache_mode(args.target_cache.as_deref(), "")?;
    check_cache_mode(args.source_cache.as_deref(), "source ")?;
    let list = options::parse_lists(&args.options)?;
    let target_format = parse_target_format(args.target_format.as_deref().unwrap_or("raw"))?;
    if list.help {
        return crate::cmd::create::print_help(target_format, false);
    }
    let sparse_size = match args.sparse_size.as_deref() {
        None => 4096,
        Some(text) => sparse_size(text)?,
    };
    let threads = match args.parallel.as_deref() {
        // qemu-img's 8 coroutines; vdisk's workers are threads, so no more than the CPUs.
        None => std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        Some(text) => parse_int_in(text, 1, 16).map_err(|_| {
            anyhow!("Invalid number of coroutines specified. Must be between 1 and 16.")
        })? as usize,
    };
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero requires use of -n flag");
    }
    if args.target_image_opts && !args.no_create {
        bail!("--target-image-opts requires use of -n flag");
    }
    let rate = match args.rate.as_deref() {
        Some(text) => cvtnum("rate limit", text)?,
        None => 0,
    };
    if args.skip_broken_bitmaps && !args.bitmaps {
        bail!("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if args.copy_range && args.compress {
        bail!("Cannot enable copy offloading when -c is used");
    }
    if args.copy_range && args.sparse_size.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    if args.copy_range && args.salvage {
        bail!("Cannot use copy offloading in salvaging mode");
    }
    if args.files.len() < 2 {
        bail!("Must specify image file name");
    }
    if args.compress && target_format != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    if args.backing.is_some() && target_format != Format::Qcow2 {
        bail!("Backing file not supported for file format '{target_format}'");
    }
    if args.backing.is_some() && args.backing_format.is_none() {
        bail!("Use of backing file requires explicit backing format");
    }

    let objects = Objects::parse(&args.object)?;
    let (target_name, source_names) = args.files.split_last().expect("two names or more");
    let mut sources = Vec::new();
    // Kept (and their files) until the copy is done.
    let mut snapshot_copies = Vec::new();
    for name in source_names {
        let image = ImageRef::parse(name, args.source_format.as_deref(), args.image_opts)?
            .with_secret(&objects)?;
        match &args.snapshot {
            Some(spec) => {
                let copy = SnapshotCopy::new(&image, spec)?;
                sources.push(copy.image.open(true, false)?);
                snapshot_copies.push(copy);
            }
            None => sources.push(image.open(true, false)?),
        }
    }
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    let bitmap_source = if args.bitmaps {
        Some(check_bitmaps(
            &args,
            &objects,
            source_names,
            target_format,
            &list.pairs,
        )?)
    } else {
        None
    };

    let target = if args.no_create {
        let image = if args.target_image_opts {
            ImageRef::parse(target_name, None, true)?.with_secret(&objects)?
        } else {
            ImageRef::file(target_name, args.target_format.as_deref())
        };
        let dev = image.open(false, false)?;
        if dev.size() < total {
            bail!("output file is smaller than input file");
        }
        dev
    } else {
        create_target(
            &args,
            &objects,
            target_name,
            target_format,
            total,
            &list.pairs,
        )?
    };
    if args.compress && target.compressed_cluster_size().is_none() {
        bail!("Compression not supported for this file format");
    }
    let target: Arc<dyn BlockDev> = match rate {
        0 => target,
        rate => Arc::new(Throttled::new(target, rate)),
    };

    let progress = Progress::new(args.progress && !args.quiet);
    let report = |done: u64, all: u64| progress.update(done, all);
    let warn = |msg: &str| eprintln!("{}: {msg}", crate::prog::name());
    let opts = ConvertOptions {
        compress: args.compress,
        sparse_size,
        threads,
        out_of_order: args.out_of_order,
        // A new image reads as zero unless it has a backing file, or is LUKS: its payload is
        // the file's zero bytes decrypted, which is noise (QEMU's crypto driver has no zero
        // init either), so zero ranges are written as encrypted zeros.
        target_is_zero: if args.no_create {
            args.target_is_zero
        } else {
            args.backing.is_none() && target_format != Format::Luks
        },
        skip_identical: args.backing.is_some(),
        salvage: args.salvage,
        progress: Some(&report),
        warn: Some(&warn),
        // qemu-img convert's target cache mode defaults to `unsafe`: no flush at the end.
        flush: !matches!(args.target_cache.as_deref(), None | Some("unsafe")),
    };
    let offloaded = if args.copy_range && rate == 0 && !args.no_create {
        copy_offloaded(&args, source_names, target_format, target_name, &report)?
    } else {
        false
    };
    let result = if offloaded {
        Ok(())
    } else {
        convert(&sources, &target, &opts)
    };
    progress.finish(result.is_ok());
    // Read and write errors say where, as qemu-img's do ("error while writing at byte N: ...").
    result.map_err(|e| match e {
        vdisk_formats::Error::During { .. } => anyhow!(describe(&e)),
        _ => anyhow!("error while converting: {}", describe(&e)),
    })?;
    if let Some(source) = bitmap_source {
        // The target is closed (its own bitmaps stored) before it is opened for the copy.
        drop(target);
        copy_bitmaps(&source, target_name)?;
    }
    Ok(())
}

/// Copies the persistent bitmaps of `source` into the target, with the same names,
/// granularities, enabled state and bits (qemu-img's `convert_copy_bitmaps`: the bitmaps in the
/// order QEMU keeps them, newest first, which stores them in the source's order).
fn copy_bitmaps(source: &Qcow2, target_name: &str) -> Result<()> {
    let policy = crate::backing_policy::get();
    let target = Qcow2::open_alone(target_name.as_ref(), false, policy, None)
        .map_err(|e| anyhow!("Could not open '{target_name}': {}", describe(&e)))?;
    for b in source.bitmap_infos().iter().rev() {
        let name = &b.name;
        if b.in_use {
            // check_bitmaps refused these unless they are to be skipped.
            eprintln!(
                "{}: warning: Skipping inconsistent bitmap '{name}'",
                crate::prog::name()
            );
            continue;
        }
        let created = target.bitmap_add(name, b.granularity).and_then(|()| {
            if b.auto {
                Ok(())
            } else {
                target.bitmap_set_enabled(name, false)
            }
        });
        created.map_err(|e| anyhow!("Failed to create bitmap {name}: {}", describe(&e)))?;
        source
            .bitmap_bits(name)
            .and_then(|bits| target.bitmap_merge(name, &bits))
            .map_err(|e| anyhow!("Failed to populate bitmap {name}: {}", describe(&e)))?;
    }
    target.store_bitmaps().map_err(|e| anyhow!(describe(&e)))
}

/// `-C` from one raw file into a new raw file: copy_file_range for each data run, holes left as
/// they are (the new target reads as zero). Returns whether it did the copy; `false` (other
/// formats, or a kernel that cannot offload between these files) leaves it to the ordinary path.
fn copy_offloaded(
    args: &Args,
    sources: &[String],
    target_format: Format,
    target_name: &str,
    report: &dyn Fn(u64, u64),
) -> Result<bool> {
    if sources.len() != 1 || target_format != Format::Raw || args.snapshot.is_some() {
        return Ok(false);
    }
    let source = ImageRef::parse(&sources[0], args.source_format.as_deref(), args.image_opts)?;
    if source.format_or_probe(true)? != Format::Raw {
        return Ok(false);
    }
    let len = vdisk_formats::host_file::file_len(&std::fs::File::open(&source.path)?)?;
    vdisk_formats::raw::copy_offloaded(&source.path, target_name.as_ref(), &|done| {
        report(done, len)
    })
    .map_err(|e| anyhow!("error while converting: {}", describe(&e)))
}

/// `-S`: a multiple of 512 up to 16 MiB, or 0.
fn sparse_size(text: &str) -> Result<u64> {
    let n = parse_size_arg(text)
        .map_err(|_| anyhow!("Invalid buffer size for sparse output specified: '{text}'."))?;
    if n % 512 != 0 || n > 16 << 20 {
        bail!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up \
             to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        );
    }
    Ok(n)
}

/// Creates the target with the `-o` options, the sources' total size and the `-B` backing file,
/// and opens it. Errors read `TARGET: error while converting FMT: ...` as qemu-img's do.
fn create_target(
    args: &Args,
    objects: &Objects,
    name: &str,
    format: Format,
    size: u64,
    pairs: &[(String, String)],
) -> Result<Arc<dyn BlockDev>> {
    let checked = options::check_types(pairs, create_options_help(format))?;
    let mut pairs: Vec<(String, String)> = checked
        .iter()
        .filter(|o| o.name != "size")
        .map(|o| (o.name.clone(), o.canonical()))
        .collect();
    if let Some(b) = &args.backing {
        pairs.push(("backing_file".into(), b.clone()));
    }
    if let Some(f) = &args.backing_format {
        pairs.push(("backing_fmt".into(), f.clone()));
    }
    let failed = |why: String| anyhow!("{name}: error while converting {format}: {why}");
    let opts =
        CreateOptions::from_pairs(format, Some(size), &pairs).map_err(|e| failed(describe(&e)))?;
    let opts = match opts {
        // The target takes the sources' size even when it has a backing file.
        CreateOptions::Qcow2(mut q) => {
            q.size = Some(size);
            CreateOptions::Qcow2(q)
        }
        other => other,
    };
    let opts = resolve_create_secret(opts, objects)?;
    let secret = create_passphrase(&opts);
    vdisk_formats::create(name.as_ref(), &opts).map_err(|e| failed(describe(&e)))?;
    let mut image = ImageRef::file(name, Some(format.name()));
    image.secret = secret;
    image.open(false, false)
}

/// `--bitmaps`: one source, and both images able to hold persistent bitmaps (qcow2 version
/// 3); an inconsistent source bitmap is refused unless `--skip-broken-bitmaps`. Returns the
/// source, open to copy its bitmaps from once the data is copied.
fn check_bitmaps(
    args: &Args,
    objects: &Objects,
    sources: &[String],
    target: Format,
    pairs: &[(String, String)],
) -> Result<Qcow2> {
    if sources.len() > 1 {
        bail!("Copying bitmaps only possible with single source");
    }
    let v2 = pairs
        .iter()
        .any(|(k, v)| k == "compat" && (v == "0.10" || v == "v2"));
    if target != Format::Qcow2 || v2 {
        bail!("Format driver '{target}' does not support bitmaps");
    }
    let image = ImageRef::parse(&sources[0], args.source_format.as_deref(), args.image_opts)?
        .with_secret(objects)?;
    if image.format_or_probe(true)? != Format::Qcow2 {
        bail!("Source lacks bitmap support");
    }
    // Only the header and the bitmaps are needed: the backing file stays closed.
    let policy = crate::backing_policy::get();
    let source = Qcow2::open_alone(&image.path, true, policy, image.secret.as_ref())
        .map_err(|e| image.could_not_open(describe(&e)))?;
    if source.header().version < 3 {
        bail!("Source lacks bitmap support");
    }
    for b in source.bitmap_infos().iter().rev() {
        if b.in_use && !args.skip_broken_bitmaps {
            bail!(
                "Cannot copy inconsistent bitmap '{}'\n\
                 Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            );
        }
    }
    Ok(source)
}
