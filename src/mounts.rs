//! What `vdisk mount` leaves running, recorded so that `vdisk umount DIR` can find it, and the
//! system tools both commands drive (losetup, partx, mount, umount).
//!
//! ```text
//!   image ──FUSE──> TMP/disk ──losetup -P──> /dev/loopN ──> /dev/loopNpP ──mount──> DIR
//!   image ──NBD (socketpair)──> /dev/nbdN ─────────────> /dev/nbdNpP ───mount──> DIR
//! ```
//!
//! One JSON file per mount point in the state directory (`/run/vdisk/mounts` for root, else
//! `$XDG_RUNTIME_DIR/vdisk/mounts` or `/tmp/vdisk-UID/mounts`), named after a hash of the
//! mount point; the background process's stderr goes to a `.log` file beside it.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// One mount made by `vdisk mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountState {
    /// The mount point (canonical).
    pub dir: PathBuf,
    /// The background process holding the image.
    pub pid: i32,
    pub image: PathBuf,
    /// The block device the file system was mounted from (`/dev/loop3p1`, `/dev/nbd0`).
    pub source: PathBuf,
    /// The whole-disk loop device, when the FUSE path is used.
    pub loop_device: Option<PathBuf>,
    /// The private directory the FUSE file lives in, when the FUSE path is used.
    pub fuse_dir: Option<PathBuf>,
    /// The `/dev/nbdN` device, when the kernel NBD path is used.
    pub nbd_device: Option<PathBuf>,
}

fn opt_path(v: &Value) -> Option<PathBuf> {
    v.as_str().map(PathBuf::from)
}

impl MountState {
    fn to_json(&self) -> Value {
        let p = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        json!({
            "dir": self.dir.display().to_string(),
            "pid": self.pid,
            "image": self.image.display().to_string(),
            "source": self.source.display().to_string(),
            "loop-device": p(&self.loop_device),
            "fuse-dir": p(&self.fuse_dir),
            "nbd-device": p(&self.nbd_device),
        })
    }

    fn from_json(v: &Value) -> Option<MountState> {
        Some(MountState {
            dir: opt_path(&v["dir"])?,
            pid: v["pid"].as_i64()? as i32,
            image: opt_path(&v["image"])?,
            source: opt_path(&v["source"])?,
            loop_device: opt_path(&v["loop-device"]),
            fuse_dir: opt_path(&v["fuse-dir"]),
            nbd_device: opt_path(&v["nbd-device"]),
        })
    }

    /// Records the mount.
    pub fn save(&self) -> Result<()> {
        let path = state_file(&self.dir)?;
        let text = serde_json::to_string_pretty(&self.to_json())?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write '{}'", path.display()))
    }

    /// The recorded mount at `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<MountState>> {
        let path = state_file(dir)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        };
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is damaged", path.display()))?;
        let state = MountState::from_json(&value)
            .ok_or_else(|| anyhow!("'{}' is damaged", path.display()))?;
        Ok((state.dir == dir).then_some(state))
    }

    /// Forgets the mount (state and log).
    pub fn remove(dir: &Path) -> Result<()> {
        let path = state_file(dir)?;
        let _ = std::fs::remove_file(path.with_extension("log"));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// The state directory, created on demand (mode 0700).
fn state_dir() -> Result<PathBuf> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let base = if uid == 0 && Path::new("/run").is_dir() {
        PathBuf::from("/run/vdisk")
    } else if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(run).join("vdisk")
    } else {
        PathBuf::from(format!("/tmp/vdisk-{uid}"))
    };
    let dir = base.join("mounts");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create '{}'", dir.display()))?;
    Ok(dir)
}

/// `STATE_DIR/HASH.json` for mount point `dir` (FNV-1a of the path).
pub fn state_file(dir: &Path) -> Result<PathBuf> {
    let hash = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    Ok(state_dir()?.join(format!("{hash:016x}.json")))
}

/// The log of the background process of the mount at `dir`.
pub fn log_file(dir: &Path) -> Result<PathBuf> {
    Ok(state_file(dir)?.with_extension("log"))
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn process_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Runs a system tool; its stderr (trimmed) becomes the error message.
pub fn tool(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        bail!("{program} {}: {err}", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `dir` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = dir.to_string_lossy();
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want)
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `path` exists; `false` after `timeout`.
pub fn wait_for(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Partition `n` of a whole-disk device: `/dev/loop3` + 1 = `/dev/loop3p1`. When the kernel's
/// scan does not show it (some kernels lack the partition-table parser), `partx -a` adds the
/// partitions from user space.
pub fn partition(disk: &Path, n: u32) -> Result<PathBuf> {
    let part = PathBuf::from(format!("{}p{n}", disk.display()));
    if wait_for(&part, Duration::from_secs(1)) {
        return Ok(part);
    }
    let disk_name = disk.display().to_string();
    // partx fails when the kernel already knows some partitions; the wait below decides.
    let _ = tool("partx", &["-a", &disk_name]);
    if wait_for(&part, Duration::from_secs(5)) {
        return Ok(part);
    }
    bail!(
        "partition {n} not found on the image (no {})",
        part.display()
    )
}

/// Detaches a loop device and waits until the kernel has closed its backing file.
pub fn detach_loop(dev: &Path) -> Result<()> {
    let name = dev.display().to_string();
    tool("losetup", &["-d", &name])?;
    let base = dev.file_name().map(|n| n.to_string_lossy().into_owned());
    let backing = PathBuf::from(format!(
        "/sys/block/{}/loop/backing_file",
        base.unwrap_or_default()
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while backing.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Unmounts a FUSE file system from outside its process (which then sees the unmount).
pub fn unmount_fuse(target: &Path) -> Result<()> {
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let name = target.display().to_string();
    tool("fusermount3", &["-u", &name]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = MountState {
            dir: "/mnt/x".into(),
            pid: 42,
            image: "/img/a.qcow2".into(),
            source: "/dev/loop3p1".into(),
            loop_device: Some("/dev/loop3".into()),
            fuse_dir: Some("/tmp/vdisk-mount-1".into()),
            nbd_device: None,
        };
        assert_eq!(MountState::from_json(&s.to_json()), Some(s));
    }

    #[test]
    fn our_own_process_is_running() {
        assert!(process_running(std::process::id() as i32));
        assert!(!process_running(i32::MAX));
    }
}
