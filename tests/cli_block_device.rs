//! Images on block devices (a loop device here), as qemu-img treats them with its `host_device`
//! driver: the size is the device's, `info` names the protocol `host_device`, images are created
//! and converted into the device without truncating it, and a device cannot grow.
//!
//! Needs root and a free loop device; skips, saying why, otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A loop device over a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        // SAFETY: getuid has no preconditions and cannot fail.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: loop devices need root");
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()
            .filter(|o| o.status.success());
        match out {
            Some(o) => Some(Loop(String::from_utf8_lossy(&o.stdout).trim().into())),
            None => {
                eprintln!("skipped: no free loop device");
                None
            }
        }
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A 64 MiB loop device, and 8 MiB of data in `dir/src.raw`.
fn setup(dir: &Path) -> Option<(Loop, PathBuf)> {
    let backing = dir.join("device.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let dev = Loop::attach(&backing)?;
    let src = dir.join("src.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    std::fs::write(&src, data).unwrap();
    Some((dev, src))
}

#[test]
fn a_raw_device_has_its_size_and_takes_a_convert() {
    let dir = temp_dir();
    let Some((dev, src)) = setup(dir.path()) else {
        return;
    };
    let src = src.to_str().unwrap();
    vdisk(["convert", "-n", "-f", "raw", "-O", "raw", src, dev.path()]).ok();
    for args in [
        &["info", dev.path()][..],
        &["info", "--output=json", dev.path()],
        &["map", "--output=json", "-f", "raw", dev.path()],
        &["compare", "-f", "raw", "-F", "raw", src, dev.path()],
        &["create", "-f", "raw", dev.path(), "128M"],
    ] {
        assert_same(args);
    }
}

#[test]
fn a_qcow2_image_is_created_and_converted_into_a_device() {
    let dir = temp_dir();
    let Some((dev, src)) = setup(dir.path()) else {
        return;
    };
    let src = src.to_str().unwrap();
    vdisk(["create", "-q", "-f", "qcow2", dev.path(), "32M"]).ok();
    assert_qemu_check_clean(Path::new(dev.path()));
    vdisk(["convert", "-n", "-f", "raw", "-O", "qcow2", src, dev.path()]).ok();
    assert_qemu_check_clean(Path::new(dev.path()));
    let cmp = qemu_img(["compare", "-f", "raw", "-F", "qcow2", src, dev.path()]).ok();
    assert!(cmp.stdout.contains("Images are identical"), "{cmp:#?}");
}
