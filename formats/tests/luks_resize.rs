//! Resizing LUKS images: LUKS1 against qemu-img's own resize of the same image (the same file,
//! byte for byte), LUKS2 (which QEMU does not open) against cryptsetup's reading of the header,
//! with a `dynamic` data segment and one of fixed size.

mod common;
mod luks_common;

use std::path::Path;
use std::process::Command;

use luks_common::*;
use vdisk_formats::{ErrorKind, Passphrase};

fn resize(path: &Path, size: u64, shrink: bool, pw: &str) -> vdisk_formats::Result<()> {
    let pw = Passphrase::from(pw);
    let opts = vdisk_formats::ResizeOptions {
        shrink,
        ..Default::default()
    };
    vdisk_formats::resize_image(path, size, opts, Some(&pw))
}

/// `cryptsetup luksFormat` of a LUKS2 image with 4096-byte sectors on a new 20 MiB file.
fn cryptsetup_luks2(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let p = path.to_str().unwrap();
    let args = [
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--sector-size",
        "4096",
        p,
    ];
    let out = cryptsetup_with_key(&args, PW);
    assert!(out.status.success(), "{out:?}");
}

/// The `length:` line of the data segment in `cryptsetup luksDump`.
fn dumped_segment_length(path: &Path) -> String {
    let dump = luks_dump(path);
    let segments = &dump[dump.find("Data segments:").expect("segments listed")..];
    let line = segments
        .lines()
        .find(|l| l.trim_start().starts_with("length:"))
        .expect("a length line");
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn luks1_resize_writes_the_file_qemu_img_writes() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.luks");
    qemu_create(&ours, 4 << 20, "");
    qemu_io(&ours, PW, &["write -P 0x3c 0 1M", "write -P 0x4d 2M 1M"]);
    let theirs = dir.path().join("theirs.luks");
    // (new size, shrink, qemu-img's SIZE argument)
    for (size, shrink, arg) in [
        (6 << 20, false, "6M"),
        (3 << 20, true, "3M"),
        ((3 << 20) + 700, false, "3146428"),
    ] {
        std::fs::copy(&ours, &theirs).unwrap();
        let mut qemu = Command::new("qemu-img");
        qemu.args(["resize", "-q"])
            .args(qemu_luks_args(&theirs, PW));
        if shrink {
            qemu.arg("--shrink");
        }
        run_ok(qemu.arg(arg));
        resize(&ours, size, shrink, PW).unwrap();
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "resize to {size}"
        );
    }
    let plain = qemu_read_all(&ours, PW);
    assert_eq!(&plain[..1 << 20], &[0x3c; 1 << 20][..]);
    // qemu-img counts the partial sector at the end as a whole one.
    assert_eq!(plain.len(), (3 << 20) + 1024);
    assert_eq!(&plain[2 << 20..3 << 20], &[0x4d; 1 << 20][..]);
}

#[test]
fn shrinking_needs_shrink_and_the_passphrase_is_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.luks");
    qemu_create(&path, 4 << 20, "");
    let before = std::fs::read(&path).unwrap();
    let e = resize(&path, 8 << 20, false, "wrong").unwrap_err();
    assert!(e.to_string().contains("Invalid password"), "{e}");
    let e = resize(&path, 1 << 20, false, PW).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let none = vdisk_formats::resize_image(&path, 8 << 20, Default::default(), None);
    assert!(none.unwrap_err().to_string().contains("key-secret"));
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing changed");
}

#[test]
fn luks2_dynamic_segment_follows_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.luks");
    cryptsetup_luks2(&path);
    let data = pattern(64 << 10, 5);
    vdisk_open(&path, PW, false).write_at(&data, 0).unwrap();
    resize(&path, 32 << 20, false, PW).unwrap();
    assert_eq!(dumped_segment_length(&path), "length: (whole device)");
    let dev = vdisk_open(&path, PW, true);
    assert_eq!(dev.size(), 32 << 20);
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    assert!(cryptsetup_accepts(&path, PW, &[]));
}

#[test]
fn luks2_fixed_segment_gets_the_new_size_in_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.luks");
    cryptsetup_luks2(&path);
    edit_json(&path, |v| v["segments"]["0"]["size"] = "2097152".into());
    assert_eq!(dumped_segment_length(&path), "length: 2097152 [bytes]");
    let data = pattern(64 << 10, 9);
    vdisk_open(&path, PW, false)
        .write_at(&data, 1 << 20)
        .unwrap();

    resize(&path, 24 << 20, false, PW).unwrap();
    assert_eq!(dumped_segment_length(&path), "length: 25165824 [bytes]");
    assert_eq!(vdisk_open(&path, PW, true).size(), 24 << 20);
    assert!(cryptsetup_accepts(&path, PW, &[]));

    resize(&path, 3 << 20, true, PW).unwrap();
    assert_eq!(dumped_segment_length(&path), "length: 3145728 [bytes]");
    let dev = vdisk_open(&path, PW, true);
    assert_eq!(dev.size(), 3 << 20);
    let mut back = vec![0u8; data.len()];
    dev.read_at(&mut back, 1 << 20).unwrap();
    assert_eq!(back, data);

    let e = resize(&path, (3 << 20) + 512, false, PW).unwrap_err();
    assert!(e.to_string().contains("4096-byte sectors"), "{e}");
    assert_eq!(dumped_segment_length(&path), "length: 3145728 [bytes]");
}
