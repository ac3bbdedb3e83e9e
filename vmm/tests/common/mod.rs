//! Helpers shared by the VMM's integration tests: the peers (qemu-img, cryptsetup) that make
//! and check images.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs qemu-img with `args`; panics with its output unless it succeeds.
pub fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {:?}: {}{}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Makes `path` a LUKS2 volume with cryptsetup (no device mapper needed for a file): the
/// default 16 MiB header, then `payload` bytes of data, unlocked by `password` (cheap PBKDF2).
pub fn format_luks2(path: &Path, payload: u64, password: &str) {
    std::fs::File::create(path)
        .unwrap()
        .set_len((16 << 20) + payload)
        .unwrap();
    let mut format = Command::new("cryptsetup")
        .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2"])
        .args(["--pbkdf-force-iterations", "1000", "--key-file", "-"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut format.stdin.take().unwrap(), password.as_bytes()).unwrap();
    assert!(format.wait().unwrap().success(), "cryptsetup luksFormat");
}

/// Creates the qcow2 overlay `overlay` over the raw file `backing` (a name relative to the
/// overlay's directory, as qemu-img records it).
pub fn create_qcow2_overlay(overlay: &Path, backing: &str) {
    let overlay = overlay.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", overlay,
    ]);
}
