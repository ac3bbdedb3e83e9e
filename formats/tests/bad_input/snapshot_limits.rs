//! The snapshot table limits (QEMU's): at most [`MAX_SNAPSHOTS`] entries in at most
//! [`MAX_TABLE_BYTES`] bytes, and no snapshot L1 table over [`MAX_L1_BYTES`]. Each limit itself is
//! accepted by vdisk and by qemu-img (or passes the size check of both), and one past it is
//! refused by both, vdisk naming the file.

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::common::*;
use super::{base_image, memory_lock, message};
use vdisk_formats::qcow2::header::MAX_L1_BYTES;
use vdisk_formats::qcow2::snapshot::{self, MAX_SNAPSHOTS, MAX_TABLE_BYTES};
use vdisk_formats::qcow2::Qcow2;
use vdisk_formats::OpenOptions;

/// Length of the fixed part of a snapshot table entry (qcow2.rst, "Snapshot table entry").
const ENTRY_HEADER: u64 = 40;
/// The longest name an entry can have (`name_size` is 16 bits), rounded down to keep entries
/// 8-byte aligned.
const LONG_NAME: u64 = 65496;

/// The base image with a snapshot table of `entries` after its end (cluster aligned), each
/// entry a fixed part with `name_len` bytes of (zero) name and no extra data; the header says
/// there are `count` snapshots. Written sparse: only the fixed parts hold data.
fn with_snapshot_table(dir: &Path, name: &str, count: u32, entries: &[u64]) -> PathBuf {
    let mut bytes = base_image(dir);
    let table = (bytes.len() as u64).next_multiple_of(1 << 16);
    put32(&mut bytes, 60, count);
    put64(&mut bytes, 64, table);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    let file = FileOptions::new().write(true).open(&path).unwrap();
    let mut at = table;
    for &name_len in entries {
        let mut entry = [0u8; ENTRY_HEADER as usize];
        entry[14..16].copy_from_slice(&(name_len as u16).to_be_bytes());
        file.write_all_at(&entry, at).unwrap();
        at = (at + ENTRY_HEADER + name_len).next_multiple_of(8);
    }
    file.set_len(at.next_multiple_of(1 << 16)).unwrap();
    path
}

/// How many snapshots `qemu-img info` lists, or its error.
fn qemu_snapshot_count(path: &Path) -> Result<usize, String> {
    let out = run(qemu_img().args(["info", "--output=json"]).arg(path));
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let json = Json::parse(&String::from_utf8_lossy(&out.stdout));
    Ok(json.get("snapshots").map_or(0, |s| s.as_array().len()))
}

/// How many snapshots vdisk lists (`info` of the image opened read-only), or its error.
fn vdisk_snapshot_count(path: &Path) -> vdisk_formats::Result<usize> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    Ok(vdisk_formats::open(path, opts)?.info()?.snapshots.len())
}

/// An image whose header counts one snapshot more than [`MAX_SNAPSHOTS`], table included.
pub fn over_max_snapshots(dir: &Path) -> PathBuf {
    let entries = vec![0; MAX_SNAPSHOTS as usize + 1];
    with_snapshot_table(dir, "count-over.qcow2", MAX_SNAPSHOTS + 1, &entries)
}

/// An image whose snapshot table is 40 bytes longer than [`MAX_TABLE_BYTES`]: entries of 64 KiB
/// filling the limit, then one without a name.
pub fn over_max_table_bytes(dir: &Path) -> PathBuf {
    let full = (MAX_TABLE_BYTES / (ENTRY_HEADER + LONG_NAME)) as usize;
    let mut entries = vec![LONG_NAME; full];
    entries.push(0);
    with_snapshot_table(dir, "table-over.qcow2", entries.len() as u32, &entries)
}

/// Asserts that `err` names `path` and holds `needle`.
fn assert_refusal(err: &vdisk_formats::Error, path: &Path, needle: &str) {
    let msg = message(err);
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(needle), "{msg}");
}

/// Asserts that vdisk refuses to list the snapshots of `path`, naming it, with `needle`.
pub fn assert_snapshots_refused(path: &Path, needle: &str) {
    let err = vdisk_snapshot_count(path).expect_err("the hostile table is listed");
    assert_refusal(&err, path, needle);
}

#[test]
fn snapshot_count_is_limited_to_max_snapshots() {
    let _memory = memory_lock();
    let dir = tempfile::tempdir().unwrap();
    let entries = vec![0; MAX_SNAPSHOTS as usize];
    let at_limit = with_snapshot_table(dir.path(), "count-at.qcow2", MAX_SNAPSHOTS, &entries);
    assert_eq!(vdisk_snapshot_count(&at_limit).unwrap(), 65536);
    assert_eq!(qemu_snapshot_count(&at_limit).unwrap(), 65536);
    let over = over_max_snapshots(dir.path());
    assert_snapshots_refused(&over, "Too many snapshots (65537, at most 65536)");
    let theirs = qemu_snapshot_count(&over).unwrap_err();
    assert!(theirs.contains("Snapshot table too large"), "{theirs}");
}

#[test]
fn snapshot_table_bytes_are_limited_to_max_table_bytes() {
    let _memory = memory_lock();
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(MAX_TABLE_BYTES % (ENTRY_HEADER + LONG_NAME), 0);
    let full = (MAX_TABLE_BYTES / (ENTRY_HEADER + LONG_NAME)) as usize;
    let at_limit = with_snapshot_table(
        dir.path(),
        "table-at.qcow2",
        full as u32,
        &vec![LONG_NAME; full],
    );
    assert_eq!(vdisk_snapshot_count(&at_limit).unwrap(), full);
    assert_eq!(qemu_snapshot_count(&at_limit).unwrap(), full);
    let over = over_max_table_bytes(dir.path());
    assert_snapshots_refused(&over, "Snapshot table is too big");
    let theirs = qemu_snapshot_count(&over).unwrap_err();
    assert!(theirs.contains("Snapshot table is too big"), "{theirs}");
}

/// The base image with one snapshot `s1` (taken by qemu-img) whose L1 table entry says
/// `l1_size` entries at its offset plus `shift` bytes.
pub fn with_snapshot_l1(dir: &Path, name: &str, l1_size: u32, shift: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, base_image(dir)).unwrap();
    run_ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&path));
    let mut bytes = std::fs::read(&path).unwrap();
    let table = be64(&bytes, 64) as usize;
    let offset = be64(&bytes, table);
    put64(&mut bytes, table, offset + shift);
    put32(&mut bytes, table + 8, l1_size);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// The snapshot L1 table one entry over [`MAX_L1_BYTES`].
pub fn over_max_snapshot_l1(dir: &Path) -> PathBuf {
    let entries = (MAX_L1_BYTES / 8) as u32;
    with_snapshot_l1(dir, "snapshot-l1-over.qcow2", entries + 1, 0)
}

/// Applying and deleting the snapshot must fail with `needle`, naming the file.
pub fn assert_snapshot_l1_refused(path: &Path, needle: &str) {
    for err in [
        snapshot::apply(path, "s1").unwrap_err(),
        snapshot::delete(path, "s1").unwrap_err(),
    ] {
        assert_refusal(&err, path, needle);
    }
}

#[test]
fn snapshot_l1_tables_are_limited_to_max_l1_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let entries = (MAX_L1_BYTES / 8) as u32;
    // One entry over: vdisk and qemu-img refuse to load it, and check reports it alike.
    let over = over_max_snapshot_l1(dir.path());
    assert_snapshot_l1_refused(&over, "Snapshot L1 table too large");
    let out = run(qemu_img().args(["snapshot", "-a", "s1"]).arg(&over));
    let theirs = String::from_utf8_lossy(&out.stderr);
    assert!(theirs.contains("Snapshot L1 table too large"), "{theirs}");
    let line = format!("l1_size={:#x}: L1 table is too large", entries + 1);
    let report = Qcow2::check(&over, None).unwrap();
    assert!(
        report.messages.iter().any(|m| m.text.contains(&line)),
        "{:?}",
        report.messages
    );
    let out = run(qemu_img().arg("check").arg(&over));
    let theirs = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(theirs.contains(&line), "{theirs}");
    // At the limit the size passes both checks; the next one (an unaligned offset) fails.
    let at_limit = with_snapshot_l1(dir.path(), "snapshot-l1-at.qcow2", entries, 512);
    assert_snapshot_l1_refused(&at_limit, "Snapshot L1 table offset invalid");
    let out = run(qemu_img().args(["snapshot", "-a", "s1"]).arg(&at_limit));
    let theirs = String::from_utf8_lossy(&out.stderr);
    assert!(
        theirs.contains("Snapshot L1 table offset invalid"),
        "{theirs}"
    );
}
