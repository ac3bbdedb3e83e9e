//! qcow2 images with an external data file: images qemu-img made read identically in vdisk, and
//! writes, write-zeroes and discards through vdisk leave the image and its data file as qemu-io
//! leaves a twin after the same requests (host offset = guest offset, data file discards,
//! zeroes written through with `data_file_raw`).

use std::path::Path;
use std::process::Command;

use vdisk_formats::{open, BlockDev, OpenOptions, ZeroFlags};

fn ok(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn external_data_file_images_read_identically() {
    for raw_flag in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("meta.qcow2");
        let i = img.to_str().unwrap();
        let data = dir.path().join("data.bin");
        let opts = format!("data_file={},data_file_raw={raw_flag}", data.display());
        ok(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, i, "4M",
        ]);
        ok(&[
            "qemu-io",
            "-c",
            "write -P 0x17 0 64k",
            "-c",
            "write -P 0x29 1M 300k",
            "-c",
            "write -z 2M 64k",
            i,
        ]);
        let out = dir.path().join("out.raw");
        ok(&["qemu-img", "convert", "-O", "raw", i, out.to_str().unwrap()]);
        let want = std::fs::read(&out).unwrap();

        let dev = open(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut got = vec![0u8; want.len()];
        dev.read_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "data_file_raw={raw_flag}: vdisk reads different data"
        );
        assert_eq!(&got[..4], &[0x17; 4]);
    }
}

fn text(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One request, as vdisk's BlockDev call and as the qemu-io command doing the same.
enum Req {
    Write(u8, u64, usize),
    Zero(u64, u64, bool),
    Discard(u64, u64),
}

impl Req {
    fn qemu_io(&self) -> String {
        match *self {
            Req::Write(p, off, len) => format!("write -P {p} {off} {len}"),
            Req::Zero(off, len, false) => format!("write -z {off} {len}"),
            Req::Zero(off, len, true) => format!("write -z -u {off} {len}"),
            Req::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    fn apply(&self, dev: &dyn BlockDev) {
        match *self {
            Req::Write(p, off, len) => dev.write_at(&vec![p; len], off).unwrap(),
            Req::Zero(off, len, may_unmap) => {
                let flags = ZeroFlags {
                    may_unmap,
                    fast_only: false,
                };
                dev.write_zeroes(off, len, flags).unwrap()
            }
            Req::Discard(off, len) => dev.discard(off, len).unwrap(),
        }
    }
}

/// A qemu-made 4 MiB image with the data file `<name>.data` beside it.
fn qemu_image(dir: &Path, name: &str, raw: &str) -> (String, String) {
    let img = dir.join(format!("{name}.qcow2"));
    let data = dir.join(format!("{name}.data"));
    let opts = format!("data_file={},data_file_raw={raw}", data.display());
    let i = img.to_str().unwrap();
    text(&[
        "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, i, "4M",
    ]);
    (i.to_string(), data.to_str().unwrap().to_string())
}

#[test]
fn writes_zeroes_and_discards_land_where_qemu_puts_them() {
    let reqs = [
        Req::Write(0x17, 0, 64 << 10),
        Req::Write(0x29, 1 << 20, 300 << 10),
        Req::Write(0x31, (3 << 20) - 4096, 8192),
        Req::Zero(1 << 20, 64 << 10, false),
        Req::Zero(2 << 20, 128 << 10, true),
        Req::Write(0x44, 2 << 20, 4096),
        Req::Discard((1 << 20) + (128 << 10), 64 << 10),
        Req::Zero(3 << 20, 64 << 10, true),
    ];
    for raw in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let (ours, our_data) = qemu_image(dir.path(), "ours", raw);
        let (theirs, their_data) = qemu_image(dir.path(), "theirs", raw);
        {
            let dev = open(Path::new(&ours), OpenOptions::default()).unwrap();
            for r in &reqs {
                r.apply(&*dev);
            }
            dev.flush().unwrap();
        }
        let mut args = vec!["qemu-io".to_string()];
        for r in &reqs {
            args.extend(["-c".to_string(), r.qemu_io()]);
        }
        args.push(theirs.clone());
        text(&args.iter().map(String::as_str).collect::<Vec<_>>());

        let what = format!("data_file_raw={raw}");
        text(&["qemu-img", "compare", "-q", &ours, &theirs]);
        let map = |i: &str| text(&["qemu-img", "map", "--output=json", i]);
        assert_eq!(map(&ours), map(&theirs), "{what}");
        let check = |i: &str| text(&["qemu-img", "check", i]);
        assert_eq!(check(&ours), check(&theirs), "{what}");
        assert!(
            std::fs::read(&our_data).unwrap() == std::fs::read(&their_data).unwrap(),
            "{what}: the data files differ"
        );
        let info = |i: &str| text(&["qemu-img", "info", i]).replace("ours", "theirs");
        assert_eq!(info(&ours), info(&theirs), "{what}");
    }
}

#[test]
fn compressed_writes_and_snapshots_are_refused_as_qemu_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qemu_image(dir.path(), "x", "off");
    let dev = open(Path::new(&img), OpenOptions::default()).unwrap();
    let e = dev.compress_cluster(&vec![7u8; 65536]).unwrap_err();
    assert_eq!(e.kind(), vdisk_formats::ErrorKind::Unsupported, "{e}");
    drop(dev);
    let e = vdisk_formats::qcow2::snapshot::create(Path::new(&img), "s1").unwrap_err();
    assert!(e.to_string().ends_with("Operation not supported"), "{e}");
}
