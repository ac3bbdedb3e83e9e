//! Boots a real Linux kernel with a busybox initramfs that mounts `/dev/vda`, an ext4 file
//! system inside a qcow2 image, reads a file the host put there, writes one back, and reboots.
//!
//! Runs only where it can finish in useful time and has what it needs:
//! * `/proc/cpuinfo` shows `vmx` or `svm` (hardware virtualisation, not an emulating host);
//! * `VDISK_TEST_KERNEL` names a kernel (ELF `vmlinux` or bzImage) with virtio-mmio (ACPI or
//!   `VIRTIO_MMIO_CMDLINE_DEVICES`), virtio-blk, ext4, devtmpfs, 8250 console and initramfs
//!   support built in (Firecracker's microVM configs are such kernels);
//! * `busybox` (static), `mkfs.ext4`, `debugfs` and `qemu-img` are installed.
//!
//! Otherwise it prints why it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use vdisk_vmm::{DiskSpec, ExitReason, SerialConfig, Vm, VmConfig};

const TIMEOUT: Duration = Duration::from_secs(600);

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
echo "vdisk-linux: serial=$(/bin/busybox cat /sys/block/vda/serial)"
/bin/busybox mount -t ext4 /dev/vda /mnt && echo "vdisk-linux: $(/bin/busybox cat /mnt/hello.txt)"
echo "written by the guest" > /mnt/guest.txt
/bin/busybox umount /mnt
/bin/busybox sync
echo "vdisk-linux: done"
/bin/busybox reboot -f
"#;

/// Why the test cannot run here, if it cannot.
fn unmet_requirement() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw_virt {
        return Some("no vmx/svm in /proc/cpuinfo: a Linux boot would be emulated".into());
    }
    if std::env::var_os("VDISK_TEST_KERNEL").is_none() {
        return Some("VDISK_TEST_KERNEL does not name a kernel".into());
    }
    for tool in ["busybox", "mkfs.ext4", "debugfs", "qemu-img"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// Appends one entry to a `newc` cpio archive (the initramfs format, Linux
/// `Documentation/driver-api/early-userspace/buffer-format.rst`).
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while out.len() % 4 != 0 {
        out.push(0);
    }
    out.extend_from_slice(data);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn build_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read(which("busybox").unwrap()).unwrap();
    let mut cpio = Vec::new();
    let dir_mode = 0o040755;
    for (ino, name) in [(1, "bin"), (2, "dev"), (3, "proc"), (4, "sys"), (5, "mnt")] {
        cpio_entry(&mut cpio, ino, name, dir_mode, (0, 0), &[]);
    }
    cpio_entry(&mut cpio, 6, "dev/console", 0o020600, (5, 1), &[]);
    cpio_entry(&mut cpio, 7, "bin/busybox", 0o100755, (0, 0), &busybox);
    cpio_entry(&mut cpio, 8, "init", 0o100755, (0, 0), INIT.as_bytes());
    cpio_entry(&mut cpio, 0, "TRAILER!!!", 0, (0, 0), &[]);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio).unwrap();
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn linux_mounts_ext4_on_qcow2_and_writes_back() {
    if let Some(why) = unmet_requirement() {
        eprintln!("skipped: {why}");
        return;
    }
    let kernel = PathBuf::from(std::env::var_os("VDISK_TEST_KERNEL").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from the host\n").unwrap();
    let raw = dir.path().join("fs.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg("32M"));
    let qcow2 = dir.path().join("fs.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));

    let log = dir.path().join("serial.log");
    let mut cfg = VmConfig::new(&kernel);
    cfg.initrd = Some(build_initramfs(dir.path()));
    cfg.cmdline = "console=ttyS0 reboot=k panic=-1 quiet".into();
    cfg.memory = 256 << 20;
    cfg.cpus = 2;
    cfg.serial = SerialConfig::File(log.clone());
    cfg.disks.push(
        DiskSpec::parse(&format!("{},format=qcow2", qcow2.display()))
            .unwrap()
            .open(0)
            .unwrap(),
    );
    let vm = Vm::new(cfg).expect("building the VM");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    let outcome = rx.recv_timeout(TIMEOUT);
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    let reason = outcome
        .unwrap_or_else(|_| panic!("Linux did not finish in {TIMEOUT:?}:\n{serial}"))
        .expect("running the VM");
    assert_eq!(reason, ExitReason::Reset, "{serial}");
    for line in [
        "vdisk-linux: serial=vdisk0",
        "vdisk-linux: hello from the host",
        "vdisk-linux: done",
    ] {
        assert!(serial.contains(line), "missing {line:?} in:\n{serial}");
    }

    run(Command::new("qemu-img").arg("check").arg(&qcow2));
    let back = dir.path().join("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&back));
    let text = run(Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&back));
    assert_eq!(text.trim(), "written by the guest");
}
