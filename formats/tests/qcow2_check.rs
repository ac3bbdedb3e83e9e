//! `check` against `qemu-img check` 10: images made by qemu-img are damaged on purpose by
//! patching bytes, then vdisk's report (JSON and human stdout, stderr lines, exit code) must equal
//! qemu-img's, with and without `-r leaks` / `-r all`. After a vdisk repair the image must look
//! to `qemu-img check` exactly as after a qemu-img repair, and read the same data.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{qemu_img, qemu_io, run, run_ok};
use vdisk_formats::qcow2::check::{CheckReport, JsonValue, Repair};
use vdisk_formats::qcow2::Qcow2;

// ---------------------------------------------------------------------------------------------
// Building and damaging images

fn be64_at(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn patch64(path: &Path, at: u64, v: u64) {
    patch(path, at, &v.to_be_bytes());
}

/// Header fields and table locations of a qcow2 image.
struct Layout {
    cluster_size: u64,
    l1: u64,
    reftable: u64,
    snapshots: u64,
}

impl Layout {
    fn of(path: &Path) -> Layout {
        let mut b = [0u8; 4];
        fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut b, 20)
            .unwrap();
        Layout {
            cluster_size: 1 << u32::from_be_bytes(b),
            l1: be64_at(path, 40),
            reftable: be64_at(path, 48),
            snapshots: be64_at(path, 64),
        }
    }

    /// The L2 table of L1 entry `i`.
    fn l2(&self, path: &Path, i: u64) -> u64 {
        be64_at(path, self.l1 + 8 * i) & 0x00ff_ffff_ffff_fe00
    }

    /// The first refcount block.
    fn refblock(&self, path: &Path) -> u64 {
        be64_at(path, self.reftable) & !0x1ff
    }

    /// Sets a 16-bit refcount (the default width) of cluster `c`.
    fn set_refcount(&self, path: &Path, c: u64, v: u16) {
        patch(path, self.refblock(path) + 2 * c, &v.to_be_bytes());
    }
}

/// A qcow2 image made by qemu-img (`opts` for `-o`) with `writes` done by qemu-io.
fn qemu_image(dir: &Path, name: &str, size: &str, opts: &str, writes: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(&path).arg(size));
    let cmds: Vec<String> = writes.iter().map(|w| w.to_string()).collect();
    if !cmds.is_empty() {
        qemu_io(&path, &cmds);
    }
    path
}

fn copy(src: &Path, name: &str) -> PathBuf {
    let dst = src.with_file_name(name);
    fs::copy(src, &dst).unwrap();
    dst
}

/// The base image most damages start from: 8 MiB, clusters 0 header, 1 refcount table,
/// 2 refcount block, 3 L1, 4 L2, 5-7 data at 0, 8 data at 4 MiB.
fn base(dir: &Path) -> PathBuf {
    qemu_image(
        dir,
        "base.qcow2",
        "8M",
        "",
        &["write -P 0x11 0 192k", "write -P 0x22 4M 64k"],
    )
}

// ---------------------------------------------------------------------------------------------
// Running both checks

/// What one check printed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Printed {
    code: i32,
    stdout: String,
    stderr: String,
}

fn mode_args(repair: Option<Repair>) -> Vec<&'static str> {
    match repair {
        None => vec![],
        Some(Repair::Leaks) => vec!["-r", "leaks"],
        Some(Repair::All) => vec!["-r", "all"],
    }
}

/// Image paths in the output become `IMG`, so that copies compare equal.
fn normalize(text: &[u8], img: &Path) -> String {
    String::from_utf8_lossy(text).replace(img.to_str().unwrap(), "IMG")
}

fn qemu_check(img: &Path, repair: Option<Repair>, json: bool) -> Printed {
    let mut cmd = qemu_img();
    cmd.args(["check", "-f", "qcow2"]).args(mode_args(repair));
    if json {
        cmd.arg("--output=json");
    }
    let out = run(cmd.arg(img));
    Printed {
        code: out.status.code().unwrap(),
        stdout: normalize(&out.stdout, img),
        stderr: normalize(&out.stderr, img),
    }
}

/// vdisk's check, printed the way qemu-img prints it: (human, json).
fn vdisk_check(img: &Path, repair: Option<Repair>) -> (Printed, Printed) {
    let report: CheckReport =
        Qcow2::check(img, repair).unwrap_or_else(|e| panic!("vdisk check {}: {e}", img.display()));
    let mut stderr = String::new();
    for m in &report.messages {
        if m.reported {
            stderr.push_str("qemu-img: ");
        }
        stderr.push_str(&m.text);
        stderr.push('\n');
    }
    if let Some(line) = report.failure_line() {
        stderr.push_str(&format!("qemu-img: {line}\n"));
    }
    let printed = |stdout: String| Printed {
        code: report.exit_code(),
        stdout: normalize(stdout.as_bytes(), img),
        stderr: normalize(stderr.as_bytes(), img),
    };
    (printed(report.human()), printed(json_text(&report)))
}

/// The report as qemu-img prints it with `--output=json` (4-space indent; the file names here
/// need no escapes).
fn json_text(report: &CheckReport) -> String {
    if report.failure.is_some() {
        return String::new();
    }
    let fields: Vec<String> = report
        .json_fields()
        .into_iter()
        .map(|(key, value)| match value {
            JsonValue::Int(n) => format!("    \"{key}\": {n}"),
            JsonValue::Str(s) => format!("    \"{key}\": \"{s}\""),
        })
        .collect();
    format!("{{\n{}\n}}\n", fields.join(",\n"))
}

/// The guest data of an image as qemu-img reads it, or why it cannot (normalized stderr).
fn try_guest_data(img: &Path) -> Result<Vec<u8>, String> {
    let raw = img.with_extension("raw");
    let out = run(qemu_img()
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw));
    if !out.status.success() {
        return Err(normalize(&out.stderr, img));
    }
    let data = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    Ok(data)
}

fn guest_data(img: &Path) -> Vec<u8> {
    try_guest_data(img).unwrap_or_else(|e| panic!("qemu-img convert {}: {e}", img.display()))
}

/// The state of an image after a repair, as qemu-img sees it: its check, and its data (as a
/// length and a hash, to keep failure messages short) or why it cannot be read.
#[derive(Debug, PartialEq, Eq)]
struct After {
    check: Printed,
    data: Result<(usize, u64), String>,
}

fn after(img: &Path) -> After {
    use std::hash::{Hash, Hasher};
    let data = try_guest_data(img).map(|d| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        d.hash(&mut h);
        (d.len(), h.finish())
    });
    After {
        check: qemu_check(img, None, true),
        data,
    }
}

/// Checks `img` with vdisk and qemu-img in every mode and requires the same output; after each
/// repair, qemu-img must see the vdisk-repaired image as it sees the qemu-img-repaired one.
/// Returns qemu-img's plain check of the vdisk image after `-r all`.
fn assert_like_qemu(img: &Path) -> Printed {
    for repair in [None, Some(Repair::Leaks)] {
        assert_mode_like_qemu(img, repair, true);
    }
    assert_mode_like_qemu(img, Some(Repair::All), true)
}

/// One mode of [`assert_like_qemu`]; `json` also compares the JSON output (one more qemu-img
/// run). Returns qemu-img's plain check of the vdisk image afterwards.
fn assert_mode_like_qemu(img: &Path, repair: Option<Repair>, json: bool) -> Printed {
    let name = img.file_name().unwrap().to_str().unwrap().to_string();
    let what = format!("{name} {:?}", mode_args(repair));
    let q_human = copy(img, "q-human.qcow2");
    let v = copy(img, "v.qcow2");
    let want_human = qemu_check(&q_human, repair, false);
    let (human, json_out) = vdisk_check(&v, repair);
    assert_eq!(human, want_human, "{what}: human output differs");
    if json {
        let q_json = copy(img, "q-json.qcow2");
        let want_json = qemu_check(&q_json, repair, true);
        assert_eq!(json_out.stdout, want_json.stdout, "{what}: JSON differs");
    }
    // A repair that qemu-img aborts (exit 1) leaves its image in whatever state its caches were
    // in; only completed repairs must agree.
    if repair.is_some() && want_human.code != 1 {
        assert_eq!(
            after(&v),
            after(&q_human),
            "{what}: the repaired images differ"
        );
    }
    qemu_check(&v, None, true)
}

/// Requires a plain qemu-img check to be clean.
fn assert_clean(p: &Printed, what: &str) {
    assert_eq!(
        p.code, 0,
        "{what}: not clean after repair:\n{}{}",
        p.stdout, p.stderr
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Damaged images

#[test]
fn leaked_clusters_are_reported_and_dropped() {
    let dir = tempdir();
    let base = base(dir.path());
    let data = guest_data(&base);
    let img = copy(&base, "leaks.qcow2");
    let lay = Layout::of(&img);
    fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(11 * lay.cluster_size)
        .unwrap();
    lay.set_refcount(&img, 9, 1);
    lay.set_refcount(&img, 10, 1);
    let after_all = assert_like_qemu(&img);
    assert_clean(&after_all, "leaks");
    // -r leaks alone is enough, and the data is untouched.
    let v = copy(&img, "v-leaks.qcow2");
    let report = Qcow2::check(&v, Some(Repair::Leaks)).unwrap();
    assert_eq!((report.leaks_fixed, report.exit_code()), (2, 0));
    assert_eq!(guest_data(&v), data);
}

#[test]
fn zero_refcount_on_a_used_l2_table_needs_a_rebuild() {
    let dir = tempdir();
    let base = base(dir.path());
    let data = guest_data(&base);
    let img = copy(&base, "zero.qcow2");
    let lay = Layout::of(&img);
    lay.set_refcount(&img, lay.l2(&img, 0) / lay.cluster_size, 0);
    assert_clean(&assert_like_qemu(&img), "refcount 0");
    // -r leaks cannot fix it: the check fails (exit 1) and says why.
    let v = copy(&img, "v-zero.qcow2");
    let report = Qcow2::check(&v, Some(Repair::Leaks)).unwrap();
    assert_eq!(report.exit_code(), 1);
    assert_eq!(
        report.failure_line().unwrap(),
        "Check failed: Input/output error"
    );
    let v = copy(&img, "v-zero-all.qcow2");
    let report = Qcow2::check(&v, Some(Repair::All)).unwrap();
    assert!(report
        .messages
        .iter()
        .any(|m| m.text == "Rebuilding refcount structure"));
    assert_eq!(report.exit_code(), 0);
    assert_eq!(guest_data(&v), data);
}

#[test]
fn refcounts_too_high_are_leaks_and_copied_flag_errors() {
    let dir = tempdir();
    let base = base(dir.path());
    let img = copy(&base, "high.qcow2");
    let lay = Layout::of(&img);
    lay.set_refcount(&img, 5, 2);
    lay.set_refcount(&img, 0, 2);
    lay.set_refcount(&img, 3, 7);
    let report = Qcow2::check(&img, None).unwrap();
    assert_eq!((report.leaks, report.corruptions), (3, 1));
    assert!(report
        .messages
        .iter()
        .any(|m| m.text == "Leaked cluster 5 refcount=2 reference=1"));
    assert_clean(&assert_like_qemu(&img), "refcount too high");
}

#[test]
fn l2_entries_past_the_end_of_the_file() {
    let dir = tempdir();
    let base = base(dir.path());
    let img = copy(&base, "eof.qcow2");
    let lay = Layout::of(&img);
    patch64(&img, lay.l2(&img, 0) + 24, 0x8000_0000_0090_0000);
    assert_like_qemu(&img);
    // An L2 table past the end of the file, and a file cut short in its last cluster.
    let img = copy(&base, "eof-l2.qcow2");
    patch64(&img, lay.l1 + 8, 0x8000_0000_0100_0000);
    assert_like_qemu(&img);
    let img = copy(&base, "cut.qcow2");
    let len = fs::metadata(&img).unwrap().len();
    fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len - lay.cluster_size + 100)
        .unwrap();
    assert_like_qemu(&img);
}

#[test]
fn l2_table_on_top_of_the_refcount_block() {
    let dir = tempdir();
    let base = base(dir.path());
    let img = copy(&base, "overlap.qcow2");
    let lay = Layout::of(&img);
    patch64(&img, lay.l1, (1 << 63) | lay.refblock(&img));
    assert_like_qemu(&img);
    // An L2 table referenced twice, and a snapshot-less image whose two L1 entries share it.
    let img = copy(&base, "shared-l2.qcow2");
    patch64(&img, lay.l1 + 8, be64_at(&img, lay.l1));
    assert_like_qemu(&img);
}

#[test]
fn unaligned_entries_and_reserved_bits() {
    let dir = tempdir();
    let base = base(dir.path());
    let lay = Layout::of(&base);
    let l2 = lay.l2(&base, 0);
    let img = copy(&base, "unaligned.qcow2");
    patch64(&img, l2, be64_at(&img, l2) + 0x200);
    // A preallocated zero cluster at an unaligned offset: -r all turns it into a plain zero one.
    patch64(&img, l2 + 8, (be64_at(&img, l2 + 8) + 0x400) | 1);
    assert_like_qemu(&img);
    let img = copy(&base, "reserved.qcow2");
    patch64(&img, lay.l1, be64_at(&img, lay.l1) | 1 << 56);
    patch64(&img, l2 + 16, be64_at(&img, l2 + 16) | 2);
    assert_like_qemu(&img);
}

#[test]
fn broken_refcount_tables_are_rebuilt() {
    let dir = tempdir();
    let base = base(dir.path());
    let lay = Layout::of(&base);
    // Reserved bits in a table entry (the rebuild then collides with the old block: QEMU
    // refuses that write and so must vdisk).
    let img = copy(&base, "rt-reserved.qcow2");
    patch64(&img, lay.reftable, be64_at(&img, lay.reftable) | 0x10);
    assert_like_qemu(&img);
    // A refcount block past the end of the file (-r all grows the file to hold it).
    let img = copy(&base, "rt-outside.qcow2");
    patch64(&img, lay.reftable + 8, 0x400_0000);
    assert_clean(&assert_like_qemu(&img), "refblock outside");
    // An unaligned refcount block.
    let img = copy(&base, "rt-unaligned.qcow2");
    patch64(&img, lay.reftable + 8, 0x5_0200);
    assert_like_qemu(&img);
    // Header and L1 clusters with wrong refcounts.
    let img = copy(&base, "rt-meta.qcow2");
    lay.set_refcount(&img, 1, 0);
    lay.set_refcount(&img, 3, 0);
    assert_clean(&assert_like_qemu(&img), "metadata refcounts");
}

#[test]
fn compressed_clusters_count_per_touched_cluster() {
    let dir = tempdir();
    let writes = [
        "write -c -P 0x33 0 64k",
        "write -c -P 0x34 64k 64k",
        "write -P 0x35 1M 128k",
        "write -c 2M 64k",
    ];
    let img = qemu_image(dir.path(), "comp.qcow2", "8M", "", &writes);
    let report = Qcow2::check(&img, None).unwrap();
    assert_eq!(
        (
            report.compressed_clusters,
            report.allocated_clusters,
            report.exit_code()
        ),
        (3, 5, 0)
    );
    assert_like_qemu(&img);
    let lay = Layout::of(&img);
    let l2 = lay.l2(&img, 0);
    // The compressed clusters share a host cluster: one reference too few, one too many.
    let host = (be64_at(&img, l2) & ((1 << 54) - 1)) / lay.cluster_size;
    let damaged = copy(&img, "comp-low.qcow2");
    lay.set_refcount(&damaged, host, 1);
    assert_clean(&assert_like_qemu(&damaged), "compressed refcount low");
    let damaged = copy(&img, "comp-copied.qcow2");
    patch64(&damaged, l2, be64_at(&damaged, l2) | 1 << 63);
    assert_like_qemu(&damaged);
    let zstd = qemu_image(
        dir.path(),
        "zstd.qcow2",
        "8M",
        "compression_type=zstd,cluster_size=4k",
        &[
            "write -c -P 1 0 4k",
            "write -c -P 2 4k 4k",
            "write -P 3 1M 128k",
        ],
    );
    assert_like_qemu(&zstd);
}

#[test]
fn images_with_snapshots_and_their_copied_flags() {
    let dir = tempdir();
    let img = qemu_image(dir.path(), "snap.qcow2", "16M", "", &["write -P 0xaa 0 1M"]);
    run_ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&img));
    qemu_io(&img, &["write -P 0xbb 0 64k".to_string()]);
    run_ok(qemu_img().args(["snapshot", "-c", "s2"]).arg(&img));
    assert_like_qemu(&img);
    let lay = Layout::of(&img);
    let shared = be64_at(&img, lay.l2(&img, 0) + 8) & 0x00ff_ffff_ffff_fe00;
    let low = copy(&img, "snap-low.qcow2");
    lay.set_refcount(&low, shared / lay.cluster_size, 2);
    assert_clean(&assert_like_qemu(&low), "shared refcount too low");
    let high = copy(&img, "snap-high.qcow2");
    lay.set_refcount(&high, shared / lay.cluster_size, 5);
    assert_clean(&assert_like_qemu(&high), "shared refcount too high");
    // A COPIED flag on a shared cluster of the active table (version 2 image).
    let v2 = qemu_image(
        dir.path(),
        "v2.qcow2",
        "8M",
        "compat=0.10",
        &["write -P 1 0 100k"],
    );
    run_ok(qemu_img().args(["snapshot", "-c", "a"]).arg(&v2));
    qemu_io(&v2, &["write -P 2 0 10k".to_string()]);
    let l2 = Layout::of(&v2).l2(&v2, 0);
    patch64(&v2, l2 + 8, be64_at(&v2, l2 + 8) | 1 << 63);
    assert_clean(&assert_like_qemu(&v2), "v2 COPIED flag");
    // Snapshot entries QEMU counts as corrupt.
    let sn = lay.snapshots;
    let unaligned = copy(&img, "snap-l1-unaligned.qcow2");
    patch64(&unaligned, sn, be64_at(&unaligned, sn) + 0x200);
    assert_like_qemu(&unaligned);
    let huge = copy(&img, "snap-l1-huge.qcow2");
    patch(&huge, sn + 8, &5_000_000u32.to_be_bytes());
    assert_like_qemu(&huge);
    let wrong = copy(&img, "snap-l1-data.qcow2");
    patch64(&wrong, be64_at(&wrong, sn), 0x8000_0000_0005_0000);
    assert_like_qemu(&wrong);
}

#[test]
fn hostile_snapshot_tables_fail_or_are_cut_like_qemu() {
    let dir = tempdir();
    let img = qemu_image(dir.path(), "hs.qcow2", "16M", "", &["write -P 0xaa 0 1M"]);
    run_ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&img));
    run_ok(qemu_img().args(["snapshot", "-c", "second snap"]).arg(&img));
    let sn = Layout::of(&img).snapshots;
    // Absurd counts: the check cannot read the table (exit 1).
    for (name, count) in [("hs-huge.qcow2", 0x7fff_ffffu32), ("hs-70000.qcow2", 70000)] {
        let bad = copy(&img, name);
        patch(&bad, 60, &count.to_be_bytes());
        let report = Qcow2::check(&bad, None).unwrap();
        assert_eq!(report.exit_code(), 1);
        assert_eq!(report.failure.as_deref(), Some("File too large"));
        assert_mode_like_qemu(&bad, None, true);
        // -r all cuts the table to QEMU's limit of 65536 entries, most of them empty (the table
        // then runs past the end of the file); writing it anew would overwrite the old table,
        // which QEMU refuses as well. (qemu-img needs seconds for this, so only vdisk runs.)
        let v = copy(&bad, "v-hs.qcow2");
        let report = Qcow2::check(&v, Some(Repair::All)).unwrap();
        let excess = count - 65536;
        let said = |text: &str| report.messages.iter().any(|m| m.text == text);
        assert!(said(&format!("Discarding {excess} overhanging snapshots")));
        assert!(said("Repairing snapshot table entry 65535 is incomplete"));
        assert_eq!(report.failure.as_deref(), Some("Input/output error"));
        let count = be64_at(&v, 56) & 0xffff_ffff;
        assert_eq!(count, 65536, "the header keeps the cut count");
    }
    // An unaligned table: the check cannot read it.
    let unaligned = copy(&img, "hs-unaligned.qcow2");
    patch64(&unaligned, 64, sn + 8);
    assert_mode_like_qemu(&unaligned, None, true);
    // A table past the end of the file reads as empty entries.
    let eof = copy(&img, "hs-eof.qcow2");
    patch64(&eof, 64, 0x1000_0000);
    assert_like_qemu(&eof);
    // A name running past the end of the file, too much extra data, an incomplete entry.
    let name = copy(&img, "hs-name.qcow2");
    patch(&name, sn + 14, &0xffffu16.to_be_bytes());
    assert_like_qemu(&name);
    let extra = copy(&img, "hs-extra.qcow2");
    patch(&extra, sn + 36, &2000u32.to_be_bytes());
    assert_like_qemu(&extra);
    let short = copy(&img, "hs-short.qcow2");
    patch(&short, sn + 36, &8u32.to_be_bytes());
    assert_like_qemu(&short);
}

#[test]
fn extended_l2_bitmaps_are_checked() {
    let dir = tempdir();
    let writes = ["write -P 1 0 5k", "write -z 64k 4k", "write -c -P 3 1M 64k"];
    let img = qemu_image(dir.path(), "ext.qcow2", "8M", "extended_l2=on", &writes);
    assert_like_qemu(&img);
    let l2 = Layout::of(&img).l2(&img, 0);
    let bad = copy(&img, "ext-bad.qcow2");
    // Allocated and zero at once; an unallocated cluster with allocated subclusters; a
    // compressed cluster with a bitmap.
    patch64(&bad, l2 + 8, be64_at(&bad, l2 + 8) | 1 << 32);
    patch64(&bad, l2 + 16 * 5 + 8, 3);
    patch64(&bad, l2 + 16 * 16 + 8, 1);
    assert_like_qemu(&bad);
    let unaligned = copy(&img, "ext-unaligned.qcow2");
    patch64(&unaligned, l2 + 48, 0x8000_0000_0005_0200);
    patch64(&unaligned, l2 + 56, 0);
    assert_like_qemu(&unaligned);
}

#[test]
fn persistent_bitmaps_hold_references() {
    let dir = tempdir();
    let img = qemu_image(dir.path(), "bitmaps.qcow2", "64M", "", &[]);
    run_ok(
        qemu_img()
            .args(["bitmap", "--add", "--enable"])
            .arg(&img)
            .arg("b0"),
    );
    let add = ["bitmap", "--add", "--granularity", "512"];
    run_ok(qemu_img().args(add).arg(&img).arg("b1"));
    // qemu-io keeps enabled bitmaps up to date and stores them with data clusters.
    qemu_io(
        &img,
        &["write -P 1 0 1M".into(), "write -P 2 40M 64k".into()],
    );
    let report = Qcow2::check(&img, None).unwrap();
    assert_eq!((report.leaks, report.exit_code()), (0, 0));
    assert_mode_like_qemu(&img, None, true);
    // A repair keeps the bitmaps where they are (qemu-img, opening the image for writing, also
    // rewrites their directory, so the files are not compared).
    let lay = Layout::of(&img);
    let v = copy(&img, "v-bitmaps.qcow2");
    lay.set_refcount(&v, 1, 0);
    let report = Qcow2::check(&v, Some(Repair::All)).unwrap();
    assert_eq!((report.corruptions_fixed, report.exit_code()), (1, 0));
    assert_clean(&qemu_check(&v, None, true), "bitmaps");
    let out = run_ok(qemu_img().args(["info", "--output=json"]).arg(&v));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"b1\""));
}

#[test]
fn dirty_and_corrupt_bits_are_cleared_by_a_repair() {
    let dir = tempdir();
    let img = qemu_image(
        dir.path(),
        "lazy.qcow2",
        "4M",
        "lazy_refcounts=on",
        &["write -P 1 0 100k"],
    );
    let dirty = copy(&img, "dirty.qcow2");
    patch64(&dirty, 72, be64_at(&dirty, 72) | 1);
    let lay = Layout::of(&dirty);
    let data = be64_at(&dirty, lay.l2(&dirty, 0)) & 0x00ff_ffff_ffff_fe00;
    lay.set_refcount(&dirty, data / lay.cluster_size, 0);
    assert_clean(&assert_like_qemu(&dirty), "dirty");
    let corrupt = copy(&img, "corrupt.qcow2");
    patch64(&corrupt, 72, be64_at(&corrupt, 72) | 2);
    assert_like_qemu(&corrupt);
    let v = copy(&corrupt, "v-corrupt.qcow2");
    Qcow2::check(&v, Some(Repair::All)).unwrap();
    assert_eq!(be64_at(&v, 72) & 3, 0, "the corrupt bit stays set");
}

#[test]
fn clean_images_of_every_layout_report_like_qemu() {
    let dir = tempdir();
    let w = ["write -P 1 0 100k", "write -P 2 3M 8k"];
    for (i, opts) in [
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64,cluster_size=512",
        "cluster_size=2M",
        "preallocation=metadata",
        "extended_l2=on,cluster_size=16k",
    ]
    .iter()
    .enumerate()
    {
        let img = qemu_image(dir.path(), &format!("clean{i}.qcow2"), "8M", opts, &w);
        let want = qemu_check(&img, None, true);
        let (_, json) = vdisk_check(&img, None);
        assert_eq!(json, want, "{opts}");
    }
    // Two L2 entries sharing a data cluster at refcount_bits=1: the count overflows.
    let img = qemu_image(dir.path(), "overflow.qcow2", "8M", "refcount_bits=1", &w);
    let l2 = Layout::of(&img).l2(&img, 0);
    patch64(&img, l2 + 8, be64_at(&img, l2));
    assert_like_qemu(&img);
}

#[test]
fn random_damage_gives_findings_not_panics() {
    let dir = tempdir();
    let seed = common::seed_from_env("random_damage_gives_findings_not_panics");
    let mut rng = common::Rng::new(seed);
    let plain = base(dir.path());
    let snap = copy(&plain, "rsnap.qcow2");
    run_ok(qemu_img().args(["snapshot", "-c", "s"]).arg(&snap));
    qemu_io(&snap, &["write -c -P 9 1M 64k".into()]);
    let ext = qemu_image(
        dir.path(),
        "rext.qcow2",
        "8M",
        "extended_l2=on,cluster_size=16k",
        &["write -P 1 0 5k", "write -c -P 2 1M 16k"],
    );
    let images: Vec<Vec<u8>> = [plain, snap, ext]
        .iter()
        .map(|p| fs::read(p).unwrap())
        .collect();
    let img = dir.path().join("random.qcow2");
    for round in 0..60 {
        let mut bytes = images[rng.below(images.len() as u64) as usize].clone();
        for _ in 0..rng.range(1, 4) {
            // Mostly the metadata at the start of the file, sometimes anywhere.
            let span = if rng.percent(70) {
                0x6_0000
            } else {
                bytes.len() as u64
            };
            let at = rng.below(span.min(bytes.len() as u64)) as usize;
            let n = (rng.range(1, 8) as usize).min(bytes.len() - at);
            bytes[at..at + n].copy_from_slice(&rng.bytes(n));
        }
        for repair in [None, Some(Repair::Leaks), Some(Repair::All)] {
            fs::write(&img, &bytes).unwrap();
            // Opening may fail (a header qemu-img refuses as well); a check must not panic.
            if let Ok(report) = Qcow2::check(&img, repair) {
                let code = report.exit_code();
                assert!((0..=3).contains(&code), "round {round}: exit code {code}");
            }
        }
    }
}

#[test]
fn unopenable_images_are_errors() {
    let dir = tempdir();
    let img = dir.path().join("junk.qcow2");
    fs::write(&img, vec![0u8; 4096]).unwrap();
    assert!(Qcow2::check(&img, None).is_err());
    // qemu-img refuses it as well.
    assert_eq!(qemu_check(&img, None, false).code, 1);
}
