//! Backing chains, checked through qemu-img: reads fall through, writes copy on write, the backing
//! file is never touched, extents report the resolving layer like `qemu-img map`.

mod common;

use std::path::Path;

use common::{qemu_read_all, tool};
use vdisk_formats::{create, open, qcow2, CreateOptions, ExtentKind, OpenOptions, ZeroFlags};

fn overlay(path: &Path, backing: &str, fmt: &str, size: Option<u64>, version: u32) {
    let opts = qcow2::CreateOptions {
        size,
        version,
        backing_file: Some(backing.to_string()),
        backing_format: Some(fmt.to_string()),
        ..Default::default()
    };
    create(path, &CreateOptions::Qcow2(opts)).unwrap();
}

#[test]
fn overlay_over_qemu_base_reads_through_and_copies_on_write() {
    for version in [2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let b = base.to_str().unwrap();
        tool(&["qemu-img", "create", "-q", "-f", "qcow2", b, "4M"]);
        tool(&[
            "qemu-io",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 2M 1M",
            b,
        ]);
        let base_before = std::fs::read(&base).unwrap();
        overlay(&top, "base.qcow2", "qcow2", None, version);

        let mut model = qemu_read_all(&base);
        let img = open(&top, OpenOptions::default()).unwrap();
        assert_eq!(img.size(), 4 << 20);
        // Unaligned writes: the rest of each touched cluster must come from the backing file.
        for (off, len, byte) in [
            (1000u64, 300usize, 0xa1u8),
            (65536 * 3 + 7, 70000, 0xa2),
            (2_100_000, 5, 0xa3),
        ] {
            img.write_at(&vec![byte; len], off).unwrap();
            model[off as usize..off as usize + len].fill(byte);
        }
        // Zeroing and discarding whole clusters must not show the backing data again.
        img.write_zeroes(0x80000, 0x20000, ZeroFlags::default())
            .unwrap();
        model[0x80000..0xa0000].fill(0);
        img.write_zeroes(
            2 << 20,
            0x10000,
            ZeroFlags {
                may_unmap: true,
                fast_only: false,
            },
        )
        .unwrap();
        model[2 << 20..(2 << 20) + 0x10000].fill(0);
        img.discard(0x40000, 0x10000).unwrap();
        let mut after = vec![0u8; 0x10000];
        img.read_at(&mut after, 0x40000).unwrap();
        assert!(
            after.iter().all(|&x| x == 0) || after == model[0x40000..0x50000],
            "discard exposed backing data"
        );
        model[0x40000..0x50000].copy_from_slice(&after);
        let mut back = vec![0u8; model.len()];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model, "vdisk read differs from model (v{version})");
        img.flush().unwrap();
        drop(img);

        assert!(
            qemu_read_all(&top) == model,
            "qemu-img reads different data (v{version})"
        );
        tool(&["qemu-img", "check", top.to_str().unwrap()]);
        assert_eq!(
            std::fs::read(&base).unwrap(),
            base_before,
            "backing file was modified"
        );
    }
}

#[test]
fn overlay_larger_than_raw_backing_reads_zero_past_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 100_000]).unwrap();
    let top = dir.path().join("top.qcow2");
    overlay(&top, "base.raw", "raw", Some(1 << 20), 3);
    let img = open(&top, OpenOptions::default()).unwrap();
    img.write_at(&[1, 2, 3], 99_999).unwrap();
    drop(img);
    let raw = qemu_read_all(&top);
    assert!(raw[..99_999].iter().all(|&b| b == 0x5a));
    assert_eq!(&raw[99_999..100_002], &[1, 2, 3]);
    assert!(raw[100_002..].iter().all(|&b| b == 0));
}

#[test]
fn extents_report_the_layer_like_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    tool(&["qemu-img", "create", "-q", "-f", "qcow2", b, "1M"]);
    tool(&["qemu-io", "-c", "write -P 1 0 64k", b]);
    tool(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        t,
        "2M",
    ]);
    tool(&["qemu-io", "-c", "write -P 2 64k 64k", t]);
    let map: Vec<serde_like::Entry> =
        serde_like::parse(&tool(&["qemu-img", "map", "--output=json", t]));
    let img = open(&top, OpenOptions::default()).unwrap();
    for e in map {
        let x = img.extent(e.start, e.length).unwrap();
        assert_eq!(x.length, e.length, "run at {}", e.start);
        assert_eq!(x.depth, e.depth, "depth at {}", e.start);
        let kind = match (e.present, e.data) {
            (_, true) => ExtentKind::Data,
            (true, false) => ExtentKind::Zero,
            (false, _) => ExtentKind::Unallocated,
        };
        assert_eq!(x.kind, kind, "kind at {}", e.start);
    }
}

#[test]
fn backing_loops_and_protocol_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    tool(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        b.to_str().unwrap(),
        "1M",
    ]);
    overlay(&a, "b.qcow2", "qcow2", None, 3);
    // Point b back at a without opening it.
    tool(&[
        "qemu-img",
        "rebase",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    let err = open(&a, OpenOptions::default()).unwrap_err();
    assert!(format!("{err:?}").contains("loop"), "{err:?}");

    let c = dir.path().join("c.qcow2");
    tool(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        c.to_str().unwrap(),
        "1M",
    ]);
    tool(&[
        "qemu-img",
        "rebase",
        "-u",
        "-b",
        "json:{\"file.filename\":\"/etc/passwd\"}",
        "-F",
        "raw",
        c.to_str().unwrap(),
    ]);
    let err = open(&c, OpenOptions::default()).unwrap_err();
    assert!(format!("{err:?}").contains("protocol prefix"), "{err:?}");
}

/// Just enough JSON for `qemu-img map --output=json` lines.
mod serde_like {
    pub struct Entry {
        pub start: u64,
        pub length: u64,
        pub depth: u32,
        pub present: bool,
        pub data: bool,
    }

    fn field<'a>(line: &'a str, key: &str) -> &'a str {
        let at = line.find(&format!("\"{key}\": ")).unwrap() + key.len() + 4;
        let rest = &line[at..];
        rest[..rest.find([',', '}']).unwrap()].trim()
    }

    pub fn parse(out: &[u8]) -> Vec<Entry> {
        String::from_utf8_lossy(out)
            .lines()
            .filter(|l| l.contains("\"start\""))
            .map(|l| Entry {
                start: field(l, "start").parse().unwrap(),
                length: field(l, "length").parse().unwrap(),
                depth: field(l, "depth").parse().unwrap(),
                present: field(l, "present") == "true",
                data: field(l, "data") == "true",
            })
            .collect()
    }
}
