//! `vdisk bitmap`: add, remove, clear, enable, disable and merge the persistent dirty bitmaps of a
//! qcow2 image, as `qemu-img bitmap` does.

use std::ffi::OsString;

use anyhow::{anyhow, bail, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Args as _};
use vdisk_formats::qcow2::bitmaps::DirtyBitmap;
use vdisk_formats::qcow2::Qcow2;
use vdisk_formats::{ErrorKind, Format};

use crate::errors::describe;
use crate::image_args::{ImageOpts, ImageRef};
use crate::numbers::cvtnum;

/// The node name qemu-img's messages give the image (QEMU numbers its anonymous nodes).
const NODE_NAME: &str = "#block128";

/// Change the persistent dirty bitmaps of a qcow2 image.
///
/// The actions run in the order given, on bitmap BITMAP of FILENAME; an action that fails ends
/// the command, and the actions before it stay done.
///
/// Examples:
///
///   vdisk bitmap --add disk.qcow2 backup0
///
///   vdisk bitmap --add -g 128k --disable disk.qcow2 frozen
///
///   vdisk bitmap --merge backup0 -b other.qcow2 -F qcow2 disk.qcow2 backup1
///
///   vdisk bitmap --clear --enable disk.qcow2 backup0
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// Create BITMAP, enabled: it records later writes
    #[arg(long = "add")]
    add: bool,

    /// Remove BITMAP
    #[arg(long = "remove")]
    remove: bool,

    /// Clear every bit of BITMAP
    #[arg(long = "clear")]
    clear: bool,

    /// Start recording writes into BITMAP
    #[arg(long = "enable")]
    enable: bool,

    /// Stop recording writes into BITMAP
    #[arg(long = "disable")]
    disable: bool,

    /// Merge the bits of bitmap SOURCE (of FILENAME, or of -b SOURCE_FILE) into BITMAP
    #[arg(long = "merge", value_name = "SOURCE")]
    merge: Vec<String>,

    /// The image whose bitmap --merge reads
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    source_file: Option<String>,

    /// Format of SOURCE_FILE
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT")]
    source_format: Option<String>,

    /// Granularity of the bitmap --add creates (a power of two from 512 to 2G; default: the
    /// cluster size within 4k..64k)
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "SIZE",
        allow_hyphen_values = true
    )]
    granularity: Option<String>,

    /// The image
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// The bitmap
    #[arg(value_name = "BITMAP")]
    bitmap: Option<String>,

    /// More arguments, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

/// One action, as qemu-img names it in its messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let granularity = match &args.granularity {
        Some(g) => Some(cvtnum("granularity", g)?),
        None => None,
    };
    let actions = actions_in_order(&args)?;
    if actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let adds = actions.contains(&Action::Add);
    if granularity.is_some_and(|g| g != 0) && !adds {
        bail!("granularity only supported with --add");
    }
    if args.source_format.is_some() && args.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    let merges = actions.iter().any(|a| matches!(a, Action::Merge(_)));
    if args.source_file.is_some() && !merges {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let (Some(file), Some(name), true) = (
        args.filename.as_deref(),
        args.bitmap.as_deref(),
        args.extra.is_empty(),
    ) else {
        bail!("Expecting filename and bitmap name");
    };
    let image = args.image.image(file)?;
    let format = image.format_or_probe(false)?;
    let policy = crate::backing_policy::get();
    let img = match format {
        Format::Qcow2 => Some(
            Qcow2::open_chain(&image.path, false, policy, image.secret.as_ref())
                .map_err(|e| image.open_error(&e))?,
        ),
        // Other formats open, but have no bitmaps and cannot store any.
        _ => {
            image.open_as(format, false, false)?;
            None
        }
    };
    let mut result = Ok(());
    for action in &actions {
        let done = match &img {
            Some(img) => apply(img, action, name, granularity.unwrap_or(0), &args),
            None if *action == Action::Add => Err(anyhow!(
                "Can't store persistent bitmaps to {NODE_NAME}: Operation not supported"
            )),
            None => Err(anyhow!("Dirty bitmap '{name}' not found")),
        };
        if let Err(e) = done {
            result = Err(anyhow!(
                "Operation {} on bitmap {name} failed: {e:#}",
                action.name()
            ));
            break;
        }
    }
    // What was done before a failure is kept, as qemu-img keeps it.
    if let Some(img) = img {
        img.store_bitmaps().map_err(|e| anyhow!(describe(&e)))?;
    }
    result
}

/// Runs one action on bitmap `name` of `img`.
fn apply(img: &Qcow2, action: &Action, name: &str, granularity: u64, args: &Args) -> Result<()> {
    let failed = |e: vdisk_formats::Error| {
        if e.kind() == ErrorKind::Unsupported {
            anyhow!(
                "Can't make bitmap '{name}' persistent in '{NODE_NAME}': {}",
                describe(&e)
            )
        } else {
            anyhow!(describe(&e))
        }
    };
    match action {
        Action::Add => img.bitmap_add(name, granularity),
        Action::Remove => img.bitmap_remove(name),
        Action::Clear => img.bitmap_clear(name),
        Action::Enable => img.bitmap_set_enabled(name, true),
        Action::Disable => img.bitmap_set_enabled(name, false),
        Action::Merge(source) => {
            let bits = source_bits(img, source, args)?;
            img.bitmap_merge(name, &bits)
        }
    }
    .map_err(failed)
}

/// The bits of bitmap `source`: of the image itself, or of `-b SOURCE_FILE`.
fn source_bits(img: &Qcow2, source: &str, args: &Args) -> Result<DirtyBitmap> {
    let not_found = || anyhow!("Dirty bitmap '{source}' not found");
    let Some(file) = &args.source_file else {
        return img.bitmap_bits(source).map_err(|e| anyhow!(describe(&e)));
    };
    let src = ImageRef::file(file, args.source_format.as_deref());
    if src.format_or_probe(true)? != Format::Qcow2 {
        src.open(true, false)?;
        return Err(not_found());
    }
    let policy = crate::backing_policy::get();
    let src_img =
        Qcow2::open_chain(&src.path, true, policy, None).map_err(|e| src.open_error(&e))?;
    src_img
        .bitmap_bits(source)
        .map_err(|e| anyhow!(describe(&e)))
}

/// The actions in command-line order, each occurrence once (clap keeps each flag apart, so the
/// order comes from the positions of the flags in a second parse of the arguments after the
/// command name).
fn actions_in_order(args: &Args) -> Result<Vec<Action>> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let start = argv
        .iter()
        .position(|a| a == "bitmap")
        .ok_or_else(|| anyhow!("the command line does not name the bitmap command"))?;
    // Every occurrence must be kept (with args_override_self a repeated flag would count once),
    // so repeatable actions replace the overriding ones in this parse.
    let mut command = Args::augment_args(clap::Command::new("bitmap"));
    let ids: Vec<clap::Id> = command
        .get_arguments()
        .filter(|a| !a.is_positional())
        .map(|a| a.get_id().clone())
        .collect();
    for id in ids {
        command = command.mut_arg(id, |a| match a.get_action() {
            ArgAction::SetTrue => a
                .action(ArgAction::Append)
                .num_args(0)
                .default_missing_value("true"),
            ArgAction::Set => a.action(ArgAction::Append),
            _ => a,
        });
    }
    let matches: ArgMatches = command
        .try_get_matches_from(&argv[start..])
        .map_err(|e| anyhow!("{e}"))?;
    let mut found: Vec<(usize, Action)> = Vec::new();
    for (id, action) in [
        ("add", Action::Add),
        ("remove", Action::Remove),
        ("clear", Action::Clear),
        ("enable", Action::Enable),
        ("disable", Action::Disable),
    ] {
        // Each occurrence is an action of its own (`--add --add` adds twice, as qemu-img does).
        // A flag not given still has its default count, with an index of its own.
        if matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        if let Some(indices) = matches.indices_of(id) {
            found.extend(indices.map(|at| (at, action.clone())));
        }
    }
    if let Some(indices) = matches.indices_of("merge") {
        found.extend(indices.zip(args.merge.iter().cloned().map(Action::Merge)));
    }
    found.sort_by_key(|(at, _)| *at);
    Ok(found.into_iter().map(|(_, a)| a).collect())
}
