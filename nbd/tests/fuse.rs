//! The FUSE export: the image as one file, read and written by ordinary tools, and a full
//! partition + ext4 + fstrim round trip through `losetup -P`, checked with qemu-img.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use vdisk_formats::BlockDev;
use vdisk_nbd::fuse::{self, FuseOptions};

fn fuse_usable() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: /dev/fuse does not exist");
        return false;
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 && !have("fusermount3") {
        eprintln!("skipped: not root and no fusermount3");
        return false;
    }
    true
}

#[test]
fn file_mount_reads_writes_and_punches_holes() {
    if !fuse_usable() || !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = sparse_qcow2(dir.path());
    let target = dir.path().join("disk.img");
    fs::write(&target, b"").unwrap();
    let dev = open_image(&img, false);
    let mnt = fuse::mount(&target, dev.clone(), &FuseOptions::default()).unwrap();
    assert_eq!(mnt.file(), target);
    assert_eq!(fs::metadata(&target).unwrap().len(), 64 << 20);

    // The file reads exactly like qemu-img's raw conversion.
    let reference = dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&reference));
    run(Command::new("cmp").arg(&target).arg(&reference));

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    f.write_all_at(&[0x77; 3 << 20], 30 << 20).unwrap();
    f.sync_all().unwrap();
    // Punching a hole makes the range read back as zero.
    run(Command::new("fallocate")
        .args(["--punch-hole", "--offset", "1048576", "--length", "524288"])
        .arg(&target));
    let mut buf = vec![0xffu8; 1 << 20];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf[..512 << 10].iter().all(|&b| b == 0));
    assert!(buf[512 << 10..].iter().all(|&b| b == 0xab));
    // Writing past the end fails: the file has the image's size.
    assert!(f.write_all_at(b"x", 64 << 20).is_err());
    drop(f);
    mnt.unmount().unwrap();
    dev.flush().unwrap();
    drop(dev);
    run(Command::new("qemu-img").arg("check").arg(&img));
    qemu_io(
        &img,
        "qcow2",
        &[
            "read -P 0x77 30M 3M",
            "read -P 0 1M 512k",
            "read -P 0xab 1536k 512k",
        ],
    );
}

#[test]
fn read_only_mount_refuses_writes() {
    if !fuse_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    qemu_img_create(&img, "raw", "1M", &[]);
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let opts = FuseOptions {
        file_name: "image".into(),
        read_only: true,
        ..Default::default()
    };
    let mnt = fuse::mount(&mountpoint, open_image(&img, true), &opts).unwrap();
    assert_eq!(mnt.file(), mountpoint.join("image"));
    let names: Vec<_> = fs::read_dir(&mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["image"]);
    assert_eq!(fs::read(mnt.file()).unwrap().len(), 1 << 20);
    assert!(OpenOptions::new().write(true).open(mnt.file()).is_err());
    mnt.unmount().unwrap();
}

/// Runs a command and returns its stdout, trimmed.
fn out(cmd: &mut Command) -> String {
    stdout(cmd).trim().to_string()
}

/// Detaches a loop device and unmounts on every exit path of the test.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).output();
        }
    }
}

/// The first partition of a loop device set up with `losetup -P`. Some kernels (like this
/// sandbox's) have no MBR parser, so when the scan finds nothing `partx -a` adds the
/// partitions from user space.
fn first_partition(loopdev: &str) -> String {
    let part = format!("{loopdev}p1");
    let appeared = |tries: u32| {
        for _ in 0..tries {
            if Path::new(&part).exists() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    if !appeared(20) {
        run(Command::new("partx").args(["-a", loopdev]));
        assert!(appeared(100), "{part} did not appear");
    }
    part
}

#[test]
fn ext4_on_a_partition_through_fuse_and_loop() {
    if !fuse_usable() {
        return;
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: loop devices and mount need root");
        return;
    }
    for tool in [
        "qemu-img",
        "losetup",
        "partx",
        "sfdisk",
        "mkfs.ext4",
        "fstrim",
        "mount",
    ] {
        if !have(tool) {
            return;
        }
    }
    if Command::new("losetup")
        .arg("-f")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("skipped: no free loop device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ext4.qcow2");
    qemu_img_create(&img, "qcow2", "128M", &[]);
    let fusedir = dir.path().join("fuse");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&fusedir).unwrap();
    fs::create_dir(&mnt).unwrap();
    let dev: Arc<dyn BlockDev> = open_image(&img, false);
    let fm = fuse::mount(&fusedir, dev.clone(), &FuseOptions::default()).unwrap();
    let disk = fm.file().to_path_buf();

    let mut cleanup = Cleanup(Vec::new());
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped());
    let mut child = sfdisk.spawn().unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        b"label: dos\nstart=2048, type=83\n",
    )
    .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk failed");

    let loopdev = out(Command::new("losetup")
        .args(["-P", "-f", "--show"])
        .arg(&disk));
    cleanup
        .0
        .push(vec!["losetup".into(), "-d".into(), loopdev.clone()]);
    let part = first_partition(&loopdev);
    run(Command::new("mkfs.ext4").args(["-q", "-F", &part]));
    run(Command::new("mount").arg(&part).arg(&mnt));
    cleanup
        .0
        .push(vec!["umount".into(), mnt.display().to_string()]);

    fs::write(mnt.join("hello.txt"), "written through FUSE\n").unwrap();
    fs::create_dir(mnt.join("sub")).unwrap();
    let pattern: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(mnt.join("sub/pattern.bin"), &pattern).unwrap();
    let big: Vec<u8> = (0..(32u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(mnt.join("big.bin"), &big).unwrap();
    run(Command::new("sync").arg("-f").arg(mnt.join("big.bin")));
    fs::remove_file(mnt.join("big.bin")).unwrap();
    run(Command::new("sync").arg("-f").arg(&mnt));
    let trimmed = out(Command::new("fstrim").arg("-v").arg(&mnt));
    let bytes: u64 = trimmed
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(bytes >= 32 << 20, "fstrim trimmed too little: {trimmed}");

    run(Command::new("umount").arg(&mnt));
    run(Command::new("losetup").arg("-d").arg(&loopdev));
    cleanup.0.clear();
    fm.unmount().unwrap();
    dev.flush().unwrap();
    drop(dev);

    run(Command::new("qemu-img").arg("check").arg(&img));
    // The deleted 32 MiB file was trimmed down to the BlockDev: little data stays allocated.
    let data: u64 = qemu_map(&img).iter().filter(|e| e.2).map(|e| e.1).sum();
    assert!(data < 24 << 20, "{data} bytes still allocated after fstrim");

    let raw = dir.path().join("check.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    let ro = out(Command::new("losetup")
        .args(["-P", "-r", "-f", "--show"])
        .arg(&raw));
    cleanup
        .0
        .push(vec!["losetup".into(), "-d".into(), ro.clone()]);
    let ro_part = first_partition(&ro);
    run(Command::new("mount")
        .args(["-o", "ro"])
        .arg(&ro_part)
        .arg(&mnt));
    cleanup
        .0
        .push(vec!["umount".into(), mnt.display().to_string()]);
    assert_eq!(
        fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "written through FUSE\n"
    );
    assert_eq!(fs::read(mnt.join("sub/pattern.bin")).unwrap(), pattern);
    assert!(!mnt.join("big.bin").exists());
}

/// The kernel sends writes of at most `fuse::MAX_WRITE` bytes: one 4 MiB write reaches the
/// device in pieces, the largest exactly that long, and lands whole.
#[test]
fn writes_reach_the_device_in_pieces_of_at_most_max_write() {
    if !fuse_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk.img");
    fs::write(&target, b"").unwrap();
    let dev = Arc::new(WatchedDisk::new(8 << 20, None));
    let mnt = fuse::mount(&target, dev.clone(), &FuseOptions::default()).unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let f = OpenOptions::new().write(true).open(&target).unwrap();
    f.write_all_at(&data, 1 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    mnt.unmount().unwrap();
    assert_eq!(
        dev.longest_write.load(Ordering::Relaxed),
        fuse::MAX_WRITE as usize
    );
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data, "the pieces did not land whole");
}
