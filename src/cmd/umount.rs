//! `vdisk umount`: undo `vdisk mount`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::mounts::{self, MountState};

/// Unmount a file system mounted with `vdisk mount`.
///
/// Unmounts DIR, then lets the background process of `vdisk mount` detach the block device,
/// flush the image and exit. Fails without changing anything while DIR is busy.
///
/// Examples:
///
///   vdisk umount /mnt/disk
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The mount point given to `vdisk mount`
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

/// How long the background process may take to detach and flush.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: Args) -> Result<()> {
    let dir = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot use '{}'", args.dir.display()))?;
    let Some(state) = MountState::load(&dir)? else {
        if mounts::is_mount_point(&dir) {
            bail!("'{}' was not mounted by vdisk mount", dir.display());
        }
        bail!("'{}' is not mounted", dir.display());
    };
    let name = dir.display().to_string();
    if mounts::is_mount_point(&dir) {
        mounts::tool("umount", &[&name])?;
    }
    if mounts::process_running(state.pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(state.pid, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while mounts::process_running(state.pid) {
            if Instant::now() > deadline {
                bail!(
                    "the vdisk mount process {} did not finish within {} s",
                    state.pid,
                    EXIT_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The process removes the state when everything went well; otherwise its log says why.
        if MountState::load(&dir)?.is_some() {
            let log = std::fs::read_to_string(mounts::log_file(&dir)?).unwrap_or_default();
            MountState::remove(&dir)?;
            bail!(
                "the vdisk mount process did not finish cleanly:\n{}",
                log.trim_end()
            );
        }
        return Ok(());
    }
    // The process is gone (killed): clean up what it left.
    if let Some(l) = &state.loop_device {
        if l.exists() {
            let _ = mounts::detach_loop(l);
        }
    }
    if let Some(fuse) = &state.fuse_dir {
        let _ = mounts::unmount_fuse(fuse);
        let _ = std::fs::remove_dir(fuse);
    }
    if let Some(nbd) = state
        .nbd_device
        .as_deref()
        .and_then(vdisk_nbd::kernel::device_index)
    {
        let _ = vdisk_nbd::kernel::disconnect(nbd);
    }
    MountState::remove(&dir)?;
    eprintln!(
        "vdisk: warning: the vdisk mount process {} had already exited; the last writes to '{}' \
         may be lost",
        state.pid,
        state.image.display()
    );
    Ok(())
}
