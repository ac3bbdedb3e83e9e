//! `convert` failing part-way says where, as qemu-img does: into a file system that fills up,
//! both tools exit 1 with "error while writing at byte N: ... No space left on device".
//!
//! Needs root (it mounts a 4 MiB tmpfs); skips, saying why, otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A mounted tmpfs, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `len` bytes with no zero runs (an xorshift stream), so nothing is skipped as sparse.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

#[test]
fn a_full_file_system_is_a_write_error_at_a_byte() {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = temp_dir();
    let Some(small) = Tmpfs::mount(&dir.path().join("small"), "4m") else {
        eprintln!("skipped: cannot mount a tmpfs");
        return;
    };
    let src = dir.path().join("src.raw");
    std::fs::write(&src, noise(16 << 20)).unwrap();
    for format in ["raw", "qcow2"] {
        let out = small.0.join(format!("out.{format}"));
        let args = [
            "convert".as_ref(),
            "-O".as_ref(),
            format.as_ref(),
            src.as_os_str(),
            out.as_os_str(),
        ];
        let theirs = qemu_img(args);
        let _ = std::fs::remove_file(&out);
        let ours = vdisk(args);
        let _ = std::fs::remove_file(&out);
        for (who, o) in [("qemu-img", &theirs), ("vdisk", &ours)] {
            assert_eq!(o.code, Some(1), "{who} -O {format}: {o:#?}");
            assert!(
                o.stderr.contains("error while writing at byte ")
                    && o.stderr.contains("No space left on device"),
                "{who} -O {format}: {}",
                o.stderr
            );
        }
        // vdisk names the file too.
        assert!(
            ours.stderr.contains(out.to_str().unwrap()),
            "{}",
            ours.stderr
        );
    }
}
