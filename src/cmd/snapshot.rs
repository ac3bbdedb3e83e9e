//! `vdisk snapshot`: list, create, apply and delete the internal snapshots of a qcow2 image.

use anyhow::{anyhow, Result};
use vdisk_formats::qcow2::{snapshot, Qcow2};
use vdisk_formats::{BlockDev, Format, SnapshotInfo};

use crate::errors::{describe, UsageError};
use crate::image_args::ImageOpts;
use crate::output::human_size;

/// List or manipulate snapshots within an image.
///
/// A snapshot saves the current contents of a qcow2 image inside the image itself; applying it
/// later brings those contents back. -l (the default) lists them, -c takes one, -a reverts to one
/// (found by id, else by name), -d deletes one (by name).
///
/// Examples:
///
///   vdisk snapshot -c before-upgrade disk.qcow2
///
///   vdisk snapshot -l disk.qcow2
///
///   vdisk snapshot -a before-upgrade disk.qcow2
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    image: ImageOpts,

    /// List the snapshots (the default)
    #[arg(short = 'l', long = "list")]
    list: bool,

    /// Take a snapshot called SNAPSHOT
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    create: Option<String>,

    /// Revert the image to SNAPSHOT
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    apply: Option<String>,

    /// Delete SNAPSHOT
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    delete: Option<String>,

    /// Print nothing but errors
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,

    /// The image
    #[arg(value_name = "FILENAME")]
    filename: Option<String>,

    /// More file names, refused with qemu-img's message
    #[arg(hide = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

enum Action<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

pub fn run(args: Args) -> Result<()> {
    let mut actions = Vec::new();
    if args.list {
        actions.push(Action::List);
    }
    if let Some(n) = &args.create {
        actions.push(Action::Create(n));
    }
    if let Some(n) = &args.apply {
        actions.push(Action::Apply(n));
    }
    if let Some(n) = &args.delete {
        actions.push(Action::Delete(n));
    }
    if actions.len() > 1 {
        return Err(UsageError::error(
            "snapshot",
            "Cannot mix '-l', '-a', '-c', '-d'",
        ));
    }
    let action = actions.pop().unwrap_or(Action::List);
    let (Some(file), true) = (args.filename.as_deref(), args.extra.is_empty()) else {
        return Err(UsageError::error(
            "snapshot",
            "Expecting one image file name",
        ));
    };
    let image = args.image.image(file)?;
    let read_only = matches!(action, Action::List);
    let format = image.format_or_probe(read_only)?;
    let unsupported = || anyhow!("Operation not supported");
    if format != Format::Qcow2 {
        // Open once to report a missing or unreadable image as qemu-img does.
        drop(image.open_as(format, read_only, true)?);
        return match action {
            Action::List => Ok(()),
            Action::Create(name) => Err(anyhow!(
                "Could not create snapshot '{name}': {}",
                unsupported()
            )),
            Action::Apply(name) => Err(anyhow!(
                "Could not apply snapshot '{name}': {}",
                unsupported()
            )),
            Action::Delete(name) => Err(anyhow!(
                "Could not delete snapshot '{name}': {}",
                unsupported()
            )),
        };
    }
    // Opened once, as qemu-img does: an encrypted image is unlocked with its secret here (and
    // fails here without it), then changed in place.
    let policy = crate::backing_policy::get();
    let img = Qcow2::open_alone(&image.path, read_only, policy, image.secret.as_ref())
        .map_err(|e| image.open_error(&e))?;
    let failed = |e: vdisk_formats::Error| anyhow!(describe(&e));
    match action {
        Action::List => {
            print!("{}", table(&img.info().map_err(failed)?.snapshots));
            Ok(())
        }
        Action::Create(name) => snapshot::create_in(&img, name)
            .map(drop)
            .map_err(|e| anyhow!("Could not create snapshot '{name}': {}", failed(e))),
        Action::Apply(name) => snapshot::apply_in(img, name, image.secret.as_ref(), policy)
            .map_err(|e| anyhow!("Could not apply snapshot '{name}': {}", failed(e))),
        Action::Delete(name) => snapshot::delete_in(&img, name)
            .map_err(|e| anyhow!("Could not delete snapshot '{name}': {}", failed(e))),
    }
}

/// `Snapshot list:` and the table, as qemu-img prints it (nothing when there are no snapshots).
pub fn table(snapshots: &[SnapshotInfo]) -> String {
    if snapshots.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for s in snapshots {
        let secs = s.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000
        );
        let icount = s.icount.map(|n| n.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            local_time(s.date_sec),
            clock,
            icount
        ));
    }
    out
}

/// `%Y-%m-%d %H:%M:%S` in local time, as qemu-img shows snapshot dates.
fn local_time(secs: u64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: `tm` is plain old data that localtime_r fills in; both pointers are valid for the
    // duration of the call and localtime_r does not keep them.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return secs.to_string();
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}
