//! `vdisk check`: consistency check (and repair) of qcow2 metadata, with qemu-img's report and
//! exit codes.

use anyhow::{anyhow, Result};
use serde_json::{Map, Value};
use vdisk_formats::qcow2::check::{JsonValue, Repair};
use vdisk_formats::qcow2::Qcow2;
use vdisk_formats::Format;

use crate::errors::{describe, Exit, UsageError};
use crate::image_args::{check_cache_mode, ImageOpts, Output};
use crate::output::qemu_json;

/// Check basic image integrity.
///
/// Walks the qcow2 metadata (L1/L2 tables, refcounts, snapshots) and reports leaked clusters
/// (allocated but unused: wasted space, no harm) and corruptions (refcounts too low, tables
/// overlapping). -r leaks frees leaked clusters; -r all also repairs corruptions, rebuilding the
/// refcount structure when needed.
///
/// A LUKS2 image (which qemu-img cannot open) has its two header copies checked: a damaged or
/// stale copy is a corruption, and -r all rewrites it from the good one (with the passphrase).
///
/// Exit status: 0 no errors, 1 the check could not run, 2 corruptions remain, 3 only leaks
/// remain, 63 the format has no checks (raw, LUKS1).
///
/// Examples:
///
///   vdisk check disk.qcow2
///
///   vdisk check -r leaks --output=json disk.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Output format: human (the default) or json
    #[arg(long = "output", value_name = "human|json")]
    output: Option<String>,

    /// Repair what the check finds: leaks, or all (leaks and corruptions)
    #[arg(short = 'r', long = "repair", value_name = "leaks|all")]
    repair: Option<String>,

    /// Print nothing; the exit status tells
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// Cache mode (accepted; vdisk uses the host page cache)
    #[arg(short = 'T', long = "cache", value_name = "CACHE_MODE")]
    cache: Option<String>,

    /// The image to check
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let output = Output::parse(args.output.as_deref(), "check")?;
    let repair = match args.repair.as_deref() {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(other) => {
            return Err(UsageError::error(
                "check",
                format!("--repair (-r) expects 'leaks' or 'all' not '{other}'"),
            ))
        }
    };
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(UsageError::error("check", "Expecting one image file name"));
    };
    check_cache_mode(args.cache.as_deref(), "source ")?;
    let image = args.image.image(file)?;
    if repair.is_some() && args.image.force_share {
        return Err(image.could_not_open("force-share=on can only be used with read-only images"));
    }
    let format = image.format_or_probe(repair.is_none())?;
    // qemu-img opens the image before checking it: an encrypted one needs its secret.
    let encrypted = match format {
        Format::Luks => true,
        Format::Qcow2 => vdisk_formats::describe(&image.path, Some(format))
            .is_ok_and(|info| info.encrypted == Some(true)),
        Format::Raw => false,
    };
    if encrypted {
        image.open_as(format, true, true)?;
    }
    if format == Format::Luks
        && super::check_luks2::check(&image, repair, output, args.quiet)?.is_some()
    {
        return Ok(());
    }
    if format != Format::Qcow2 {
        return Err(Exit::with(63, "This image format does not support checks"));
    }
    let report =
        Qcow2::check(&image.path, repair).map_err(|e| image.could_not_open(describe(&e)))?;

    let prog = crate::prog::name();
    for m in &report.messages {
        if m.reported {
            eprintln!("{prog}: {}", m.text);
        } else {
            eprintln!("{}", m.text);
        }
    }
    if !args.quiet {
        match output {
            Output::Human => print!("{}", report.human()),
            Output::Json if report.failure.is_none() => {
                let mut m = Map::new();
                for (key, value) in report.json_fields() {
                    let v = match value {
                        JsonValue::Int(n) => Value::from(n),
                        JsonValue::Str(s) => Value::from(s),
                    };
                    m.insert(key.to_string(), v);
                }
                println!("{}", qemu_json(&Value::Object(m)));
            }
            Output::Json => {}
        }
    }
    let code = u8::try_from(report.exit_code()).map_err(|_| anyhow!("bad exit code"))?;
    match report.failure_line() {
        Some(line) => Err(Exit::with(code, line)),
        None if code != 0 => Err(Exit::silently(code)),
        None => Ok(()),
    }
}
