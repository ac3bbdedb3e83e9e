//! Internal snapshots against qemu-img 10: snapshots qemu-img makes are listed as `qemu-img info`
//! lists them; the same create/apply/delete sequence run by qemu-img and by vdisk leaves
//! byte-identical images (dates aside); vdisk's snapshots apply with qemu-img; a write/snapshot/
//! write/apply/delete round trip reads back right and leaves `qemu-img check` clean; hostile
//! snapshot tables give clear errors.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{be64, check_clean, qemu_img, qemu_io, qemu_read_all, read_head, run, run_ok, Json};
use vdisk_formats::qcow2::snapshot;
use vdisk_formats::{open, OpenOptions, SnapshotInfo};

/// The snapshot table offset of an image.
fn table_offset(path: &Path) -> usize {
    be64(&read_head(path, 72), 64) as usize
}

/// Overwrites bytes of a (small) image file, growing it if needed.
fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut d = fs::read(path).unwrap();
    d.resize(d.len().max(at + bytes.len()), 0);
    d[at..at + bytes.len()].copy_from_slice(bytes);
    fs::write(path, d).unwrap();
}

fn image(dir: &Path, name: &str, opts: &str, writes: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(&path).arg("16M"));
    io(&path, writes);
    path
}

fn io(path: &Path, writes: &[&str]) {
    if !writes.is_empty() {
        qemu_io(
            path,
            &writes.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
        );
    }
}

fn qemu_snapshot(img: &Path, op: &str, name: &str) {
    run_ok(qemu_img().args(["snapshot", op, name]).arg(img));
}

/// The snapshots of `qemu-img info --output=json`, as vdisk's type.
fn qemu_list(img: &Path) -> Vec<SnapshotInfo> {
    let out = run_ok(qemu_img().args(["info", "--output=json"]).arg(img));
    let json = Json::parse(&String::from_utf8_lossy(&out.stdout));
    let Some(list) = json.get("snapshots") else {
        return Vec::new();
    };
    let text = |s: &Json, k: &str| match s.get(k) {
        Some(Json::Str(v)) => v.clone(),
        other => panic!("{k}: {other:?}"),
    };
    let num = |s: &Json, k: &str| s.get(k).unwrap_or_else(|| panic!("no {k}")).as_u64();
    list.as_array()
        .iter()
        .map(|s| SnapshotInfo {
            id: text(s, "id"),
            name: text(s, "name"),
            vm_state_size: num(s, "vm-state-size"),
            date_sec: num(s, "date-sec"),
            date_nsec: num(s, "date-nsec") as u32,
            vm_clock_sec: num(s, "vm-clock-sec"),
            vm_clock_nsec: num(s, "vm-clock-nsec") as u32,
            icount: s.get("icount").map(Json::as_u64),
        })
        .collect()
}

/// The image bytes with the snapshot dates zeroed (the only thing two runs may differ in).
fn without_dates(path: &Path) -> Vec<u8> {
    let mut d = fs::read(path).unwrap();
    let count = u32::from_be_bytes(d[60..64].try_into().unwrap());
    let mut at = table_offset(path);
    for _ in 0..count {
        at = at.next_multiple_of(8);
        let id = u16::from_be_bytes(d[at + 12..at + 14].try_into().unwrap()) as usize;
        let name = u16::from_be_bytes(d[at + 14..at + 16].try_into().unwrap()) as usize;
        let extra = u32::from_be_bytes(d[at + 36..at + 40].try_into().unwrap()) as usize;
        d[at + 16..at + 24].fill(0);
        at += 40 + extra + id + name;
    }
    d
}

fn assert_same_bytes(q: &Path, v: &Path, what: &str) {
    let (a, b) = (without_dates(q), without_dates(v));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{what}: qemu-img and vdisk images differ ({} vs {} bytes, first difference at {first:?})",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn snapshots_made_by_qemu_img_are_listed_alike() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "q.qcow2", "", &["write -P 0xaa 0 1M"]);
    qemu_snapshot(&img, "-c", "first");
    io(&img, &["write -P 0xbb 0 64k"]);
    qemu_snapshot(
        &img,
        "-c",
        "with spaces and a longer name than the table column",
    );
    qemu_snapshot(&img, "-c", "first");
    let want = qemu_list(&img);
    assert_eq!(want.len(), 3);
    assert_eq!(snapshot::list(&img).unwrap(), want);
    // `info` carries the same list; the image opens for reading and writing.
    let dev = open(&img, OpenOptions::default()).unwrap();
    assert_eq!(dev.info().unwrap().snapshots, want);
    // No snapshots: an empty list.
    let plain = image(dir.path(), "plain.qcow2", "compat=0.10", &[]);
    assert!(snapshot::list(&plain).unwrap().is_empty());
}

/// Runs the same snapshot operations and writes with qemu-img and vdisk on copies of one image
/// and requires identical images after every step.
fn same_as_qemu_img(opts: &str) {
    let dir = tempfile::tempdir().unwrap();
    let writes = [
        "write -P 0xaa 0 1M",
        "write -c -P 0xbb 2M 128k",
        "write -z 4M 64k",
    ];
    let q = image(dir.path(), "q.qcow2", opts, &writes);
    let v = dir.path().join("v.qcow2");
    fs::copy(&q, &v).unwrap();
    let steps: [(&str, &str); 14] = [
        ("-c", "s1"),
        ("io", "write -P 0x11 0 64k"),
        ("io", "write -P 0x12 8M 64k"),
        ("-c", "s2"),
        ("io", "discard 2M 64k"),
        ("-c", "s3"),
        ("-a", "s1"),
        ("-a", "2"),
        ("io", "write -P 0x14 1M 64k"),
        ("-d", "s2"),
        ("-a", "s3"),
        ("-d", "s1"),
        ("-d", "s3"),
        ("-c", "last"),
    ];
    for (op, arg) in steps {
        if op == "io" {
            io(&q, &[arg]);
            io(&v, &[arg]);
            continue;
        }
        qemu_snapshot(&q, op, arg);
        match op {
            "-c" => drop(snapshot::create(&v, arg).unwrap()),
            "-a" => snapshot::apply(&v, arg).unwrap(),
            _ => snapshot::delete(&v, arg).unwrap(),
        }
        let what = format!("{opts}: snapshot {op} {arg}");
        assert_same_bytes(&q, &v, &what);
        check_clean(&v);
        let listed = snapshot::list(&v).unwrap();
        let mut theirs = qemu_list(&q);
        for (a, b) in theirs.iter_mut().zip(&listed) {
            (a.date_sec, a.date_nsec) = (b.date_sec, b.date_nsec);
        }
        assert_eq!(listed, theirs, "{what}");
    }
}

#[test]
fn vdisk_snapshots_are_the_ones_qemu_img_makes() {
    same_as_qemu_img("cluster_size=65536");
}

#[test]
fn vdisk_snapshots_are_the_ones_qemu_img_makes_in_other_layouts() {
    same_as_qemu_img("compat=0.10");
    same_as_qemu_img("extended_l2=on,compression_type=zstd");
    same_as_qemu_img("cluster_size=4k,refcount_bits=64");
}

#[test]
fn write_snapshot_write_apply_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(
        dir.path(),
        "rt.qcow2",
        "",
        &["write -P 0x41 0 2M", "write -c -P 0x42 3M 64k"],
    );
    let a = qemu_read_all(&img);
    let sn = snapshot::create(&img, "A").unwrap();
    assert_eq!(
        (sn.id.as_str(), sn.name.as_str(), sn.icount),
        ("1", "A", Some(0))
    );
    check_clean(&img);
    // B: written by qemu-io and by vdisk itself (which copies the shared tables first).
    io(&img, &["write -P 0x51 0 64k", "write -P 0x52 3M 4k"]);
    {
        let dev = open(&img, OpenOptions::default()).unwrap();
        dev.write_at(&[0x53; 100_000], 1 << 20).unwrap();
        dev.flush().unwrap();
    }
    check_clean(&img);
    let b = qemu_read_all(&img);
    assert_ne!(a, b);
    // qemu-img applies vdisk's snapshot...
    let q = dir.path().join("q.qcow2");
    fs::copy(&img, &q).unwrap();
    qemu_snapshot(&q, "-a", "A");
    assert_eq!(qemu_read_all(&q), a);
    check_clean(&q);
    // ...and vdisk does the same.
    snapshot::apply(&img, "A").unwrap();
    assert_eq!(qemu_read_all(&img), a);
    check_clean(&img);
    snapshot::delete(&img, "A").unwrap();
    assert!(snapshot::list(&img).unwrap().is_empty());
    // check_clean also means no leaks: every cluster of the snapshot was given back.
    check_clean(&img);
    assert_eq!(qemu_read_all(&img), a);
}

#[test]
fn apply_restores_the_size_of_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(
        dir.path(),
        "sz.qcow2",
        "",
        &["write -P 0xaa 0 1M", "write -P 0xab 15M 1M"],
    );
    snapshot::create(&img, "s1").unwrap();
    run_ok(qemu_img().args(["resize", "-q"]).arg(&img).arg("40M"));
    io(&img, &["write -P 0xcc 30M 1M"]);
    let q = dir.path().join("q.qcow2");
    fs::copy(&img, &q).unwrap();
    qemu_snapshot(&q, "-a", "s1");
    snapshot::apply(&img, "s1").unwrap();
    assert_eq!(open(&img, OpenOptions::default()).unwrap().size(), 16 << 20);
    assert_same_bytes(&q, &img, "apply after a resize");
    check_clean(&img);
}

#[test]
fn unknown_names_fail_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "n.qcow2", "", &["write -P 1 0 64k"]);
    snapshot::create(&img, "x").unwrap();
    snapshot::create(&img, "x").unwrap();
    let err = snapshot::apply(&img, "nope").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Failed to load snapshot: No such file or directory"
    );
    // `-d` matches names only (qemu-img too), `-a` ids first.
    let err = snapshot::delete(&img, "2").unwrap_err();
    assert_eq!(err.to_string(), "snapshot not found");
    let out = run(qemu_img().args(["snapshot", "-d", "2"]).arg(&img));
    assert!(!out.status.success());
    snapshot::apply(&img, "2").unwrap();
    snapshot::delete(&img, "x").unwrap();
    let left: Vec<String> = snapshot::list(&img)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, ["2"]);
    // Names are cut to 255 bytes, as qemu-img does.
    let long = "n".repeat(300);
    assert_eq!(snapshot::create(&img, &long).unwrap().name.len(), 255);
    assert_eq!(qemu_list(&img).last().unwrap().name, "n".repeat(255));
    check_clean(&img);
}

#[test]
fn unknown_extra_data_survives_a_table_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "x.qcow2", "", &["write -P 1 0 64k"]);
    qemu_snapshot(&img, "-c", "old");
    // Give the entry 8 more bytes of extra data (QEMU keeps what it does not know).
    let at = table_offset(&img);
    let entry = fs::read(&img).unwrap()[at..at + 40 + 24 + 1 + 3].to_vec();
    let mut grown = entry[..64].to_vec();
    grown[36..40].copy_from_slice(&32u32.to_be_bytes());
    grown.extend_from_slice(b"\xde\xad\xbe\xef\x01\x02\x03\x04");
    grown.extend_from_slice(&entry[64..]);
    patch(&img, at, &grown);
    check_clean(&img);
    snapshot::create(&img, "new").unwrap();
    check_clean(&img);
    let at = table_offset(&img);
    let raw = fs::read(&img).unwrap()[at..at + 72].to_vec();
    assert_eq!(u32::from_be_bytes(raw[36..40].try_into().unwrap()), 32);
    assert_eq!(&raw[64..72], b"\xde\xad\xbe\xef\x01\x02\x03\x04");
    let names: Vec<String> = qemu_list(&img).into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["old", "new"]);
}

#[test]
fn hostile_snapshot_tables_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "h.qcow2", "", &["write -P 1 0 64k"]);
    qemu_snapshot(&img, "-c", "s1");
    qemu_snapshot(&img, "-c", "s2");
    let table = table_offset(&img);
    let hostile = |name: &str, at: usize, bytes: &[u8]| {
        let p = dir.path().join(name);
        fs::copy(&img, &p).unwrap();
        patch(&p, at, bytes);
        p
    };
    let cases = [
        (
            hostile("count.qcow2", 60, &u32::MAX.to_be_bytes()),
            "Too many snapshots",
        ),
        (
            hostile("eof.qcow2", 64, &0x1000_0000u64.to_be_bytes()),
            "past the end of the file",
        ),
        (
            hostile("name.qcow2", table + 14, &0xffffu16.to_be_bytes()),
            "name (65535 bytes at offset",
        ),
        (
            hostile("extra.qcow2", table + 36, &5000u32.to_be_bytes()),
            "Too much extra metadata in snapshot table entry 0",
        ),
        (
            hostile("unaligned.qcow2", 64, &(table as u64 + 8).to_be_bytes()),
            "not aligned",
        ),
    ];
    for (path, want) in &cases {
        let what = path.file_name().unwrap().to_str().unwrap();
        let errors = [
            snapshot::list(path).map(drop).unwrap_err(),
            snapshot::create(path, "n").map(drop).unwrap_err(),
            snapshot::apply(path, "s1").unwrap_err(),
            snapshot::delete(path, "s1").unwrap_err(),
        ];
        for e in errors {
            assert!(e.to_string().contains(want), "{what}: {e}");
        }
        let info = open(path, OpenOptions::default()).and_then(|d| d.info());
        assert!(info.is_err(), "{what}: info lists a hostile table");
    }
    // A snapshot whose L1 table lies past the end of the file cannot be applied or deleted.
    let l1 = hostile("l1.qcow2", table, &0x4000_0000u64.to_be_bytes());
    let err = snapshot::apply(&l1, "s1").unwrap_err();
    assert!(
        err.to_string().contains("past the end of the file"),
        "{err}"
    );
    assert!(snapshot::delete(&l1, "s1").is_err());
    assert_eq!(snapshot::list(&l1).unwrap().len(), 2);
}
