//! Attaching an image to /dev/nbdN through the kernel. Runs only where the nbd module is loaded
//! and we are root; elsewhere it checks that the missing module is reported clearly.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;
use vdisk_nbd::kernel::{self, ConnectOptions, Interface, KernelError};
use vdisk_nbd::proto::TransmissionFlags;

fn usable() -> bool {
    if !Path::new("/dev/nbd0").exists() {
        eprintln!("skipped: /dev/nbd0 does not exist (the nbd kernel module is not loaded)");
        return false;
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: attaching /dev/nbd devices needs root");
        return false;
    }
    true
}

fn attach_write_read_detach(interface: Interface) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    qemu_img_create(&img, "qcow2", "16M", &[]);
    qemu_io(&img, "qcow2", &["write -P 0x33 0 64k"]);
    let server = server_for(open_image(&img, false));
    let opts = ConnectOptions {
        interface,
        ..ConnectOptions::new(0, TransmissionFlags(0))
    };
    let dev = kernel::attach(&server, "", 2, opts).expect("attach");
    eprintln!(
        "attached {} via {:?}",
        dev.path().display(),
        dev.interface()
    );
    let size = std::fs::read_to_string(format!("/sys/block/nbd{}/size", dev.index())).unwrap();
    assert_eq!(size.trim().parse::<u64>().unwrap() * 512, 16 << 20);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.path())
            .unwrap();
        let mut head = vec![0u8; 65536];
        f.read_exact_at(&mut head, 0).unwrap();
        assert!(head.iter().all(|&b| b == 0x33));
        f.write_all_at(&vec![0x5a; 1 << 20], 4 << 20).unwrap();
        f.sync_all().unwrap();
    }
    dev.disconnect().expect("disconnect");
    drop(server);
    run(Command::new("qemu-img").arg("check").arg(&img));
    qemu_io(&img, "qcow2", &["read -P 0x5a 4M 1M", "read -P 0x33 0 64k"]);
}

#[test]
fn netlink_attach_serves_reads_and_writes() {
    if usable() {
        attach_write_read_detach(Interface::Netlink);
    }
}

#[test]
fn ioctl_attach_serves_reads_and_writes() {
    if usable() {
        attach_write_read_detach(Interface::Ioctl);
    }
}

#[test]
fn without_the_module_the_error_says_what_to_do() {
    if kernel::module_loaded() {
        eprintln!("skipped: the nbd module is loaded here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.raw");
    qemu_img_create(&img, "raw", "1M", &[]);
    let server = server_for(open_image(&img, false));
    let err =
        kernel::attach(&server, "", 1, ConnectOptions::new(0, TransmissionFlags(0))).unwrap_err();
    assert!(matches!(err, KernelError::ModuleMissing), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("modprobe nbd") && msg.contains("FUSE"),
        "{msg}"
    );
}
