//! Hostile qcow2 images: a valid image made by qemu-img with some bytes patched. Each one must be
//! refused with an `Err` whose message names the file and the problem: no panic, and no huge
//! allocation (the last test watches the process' peak RSS over all of them).

#[path = "bad_input/bitmap_limits.rs"]
mod bitmap_limits;
mod common;
#[path = "bad_input/snapshot_limits.rs"]
mod snapshot_limits;

use std::path::{Path, PathBuf};

use common::*;
use vdisk_formats::chain::MAX_CHAIN_DEPTH;
use vdisk_formats::qcow2::header::{
    MAX_BACKING_FORMAT_NAME, MAX_BACKING_NAME, MAX_HEADER_EXTENSIONS,
};
use vdisk_formats::{CreateOptions, Format, OpenOptions};

/// Held by the peak-RSS test and by the tests that take a limit at its maximum (which may use
/// as much memory as the limit allows), so that the peak the former measures is its own.
static MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory_lock() -> std::sync::MutexGuard<'static, ()> {
    MEMORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Offset of the feature name table extension in a qemu-img 10 image (header length 112).
const FEATURE_TABLE: usize = 112;

/// A valid 1 MiB image with 64 KiB clusters and one written cluster: header, refcount table,
/// refcount block, L1 table, L2 table, data.
fn base_image(dir: &Path) -> Vec<u8> {
    let path = dir.join("base.qcow2");
    qemu_create(&path, 1 << 20, "");
    qemu_io(&path, &["write -P 0x11 0 64k".to_string()]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(be32(&bytes, 100), FEATURE_TABLE as u32);
    assert_eq!(be32(&bytes, FEATURE_TABLE), 0x6803_f857);
    bytes
}

/// One hostile image.
struct Case {
    name: &'static str,
    /// Each must appear in the message (case-insensitive).
    needles: &'static [&'static str],
    patch: fn(&mut Vec<u8>),
    /// Open with the format named rather than probed.
    format: Option<Format>,
}

const CASES: &[Case] = &[
    Case {
        name: "empty file opened as qcow2",
        needles: &["not in qcow2 format"],
        patch: |b| b.truncate(0),
        format: Some(Format::Qcow2),
    },
    Case {
        name: "header truncated to 50 bytes",
        needles: &["truncated"],
        patch: |b| b.truncate(50),
        format: None,
    },
    Case {
        name: "header truncated to 71 bytes",
        needles: &["truncated"],
        patch: |b| b.truncate(71),
        format: None,
    },
    Case {
        name: "version 3 header truncated to 103 bytes",
        needles: &["truncated"],
        patch: |b| b.truncate(103),
        format: None,
    },
    Case {
        name: "bad magic opened as qcow2",
        needles: &["not", "qcow2"],
        patch: |b| b[0] = b'X',
        format: Some(Format::Qcow2),
    },
    Case {
        name: "version 1",
        needles: &["version 1"],
        patch: |b| put32(b, 4, 1),
        format: None,
    },
    Case {
        name: "version 4",
        needles: &["version 4"],
        patch: |b| put32(b, 4, 4),
        format: None,
    },
    Case {
        name: "cluster_bits 8",
        needles: &["cluster size"],
        patch: |b| put32(b, 20, 8),
        format: None,
    },
    Case {
        name: "cluster_bits 22",
        needles: &["cluster size"],
        patch: |b| put32(b, 20, 22),
        format: None,
    },
    Case {
        name: "l1_size 0xffffffff",
        needles: &["L1 table", "large"],
        patch: |b| put32(b, 36, u32::MAX),
        format: None,
    },
    Case {
        name: "l1_size too small for the virtual size",
        needles: &["L1 table", "small"],
        patch: |b| put64(b, 24, 1 << 40),
        format: None,
    },
    Case {
        name: "refcount_table_clusters 0xffffffff",
        needles: &["count table", "large"],
        patch: |b| put32(b, 56, u32::MAX),
        format: None,
    },
    Case {
        name: "refcount_table_clusters 0x10000 (4 GiB)",
        needles: &["count table", "large"],
        patch: |b| put32(b, 56, 0x10000),
        format: None,
    },
    Case {
        name: "L1 table past the end of the file",
        needles: &["L1 table", "past the end"],
        patch: |b| put64(b, 40, 1 << 40),
        format: None,
    },
    Case {
        name: "L1 table offset unaligned",
        needles: &["L1 table", "aligned"],
        patch: |b| {
            let off = be64(b, 40);
            put64(b, 40, off + 8)
        },
        format: None,
    },
    Case {
        name: "refcount table past the end of the file",
        needles: &["count table", "past the end"],
        patch: |b| put64(b, 48, 1 << 40),
        format: None,
    },
    Case {
        name: "refcount table offset unaligned",
        needles: &["count table", "aligned"],
        patch: |b| {
            let off = be64(b, 48);
            put64(b, 48, off + 512)
        },
        format: None,
    },
    Case {
        name: "unknown incompatible bit",
        needles: &["Unknown incompatible feature: 10000000000"],
        patch: |b| put64(b, 72, 1 << 40),
        format: None,
    },
    Case {
        name: "unknown incompatible bit named by the feature table",
        needles: &[
            "frobnicated clusters",
            "Unknown incompatible feature: 10000000000",
        ],
        patch: |b| {
            rename_feature(b, 4, 9, "frobnicated clusters");
            put64(b, 72, (1 << 9) | (1 << 40));
        },
        format: None,
    },
    Case {
        name: "header extension longer than the cluster",
        needles: &["extension", "cluster"],
        patch: |b| put32(b, FEATURE_TABLE + 4, 0x10000),
        format: None,
    },
    Case {
        name: "header extension list running past the cluster",
        needles: &["extension", "cluster"],
        patch: |b| {
            // One extension up to the last 8 bytes of the cluster, where one more header
            // announces 8 bytes of data that would lie in the next cluster.
            let cluster = 1usize << be32(b, 20);
            let last = cluster - 8;
            put32(b, FEATURE_TABLE, 0x1234_0000);
            put32(b, FEATURE_TABLE + 4, (last - FEATURE_TABLE - 8) as u32);
            put32(b, last, 0x1234_0001);
            put32(b, last + 4, 8);
        },
        format: None,
    },
    Case {
        name: "backing format extension of 16 bytes",
        needles: &["backing format name too long (16 bytes, at most 15)"],
        patch: |b| {
            put32(b, FEATURE_TABLE, 0xe279_2aca);
            put32(b, FEATURE_TABLE + 4, MAX_BACKING_FORMAT_NAME as u32 + 1);
        },
        format: None,
    },
    Case {
        name: "backing file name of 1024 bytes",
        needles: &["Backing file name too long (1024 bytes, at most 1023)"],
        patch: |b| {
            put64(b, 8, 0x1000);
            put32(b, 16, MAX_BACKING_NAME + 1);
        },
        format: None,
    },
    Case {
        name: "backing file name past the cluster",
        needles: &["backing file name", "cluster"],
        patch: |b| {
            put64(b, 8, 0x10000);
            put32(b, 16, 8);
        },
        format: None,
    },
    Case {
        name: "backing file name far past the cluster",
        needles: &["backing file name"],
        patch: |b| {
            put64(b, 8, u64::MAX - 4);
            put32(b, 16, 1000);
        },
        format: None,
    },
    Case {
        name: "refcount_order 7",
        needles: &["refcount order 7"],
        patch: |b| put32(b, 96, 7),
        format: None,
    },
    Case {
        name: "header_length 0xfffffff8",
        needles: &["header length"],
        patch: |b| put32(b, 100, 0xffff_fff8),
        format: None,
    },
];

/// The image with its feature table replaced by `count` empty extensions of distinct types.
fn with_extensions(dir: &Path, base: &[u8], count: usize) -> PathBuf {
    let mut bytes = base.to_vec();
    for i in 0..count {
        put32(&mut bytes, FEATURE_TABLE + 8 * i, 0x1234_0000 + i as u32);
        put32(&mut bytes, FEATURE_TABLE + 8 * i + 4, 0);
    }
    put64(&mut bytes, FEATURE_TABLE + 8 * count, 0);
    let path = dir.join(format!("extensions-{count}.qcow2"));
    std::fs::write(&path, &bytes).unwrap();
    path
}

#[test]
fn header_extension_count_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    // A default 64 KiB cluster cannot hold more extensions than the limit: this needs 128 KiB.
    let path = dir.path().join("base-128k.qcow2");
    qemu_create(&path, 1 << 20, "cluster_size=128k");
    qemu_io(&path, &["write -P 0x11 0 64k".to_string()]);
    let base = std::fs::read(&path).unwrap();
    // At the limit both vdisk and qemu-img open the image.
    let at_limit = with_extensions(dir.path(), &base, MAX_HEADER_EXTENSIONS);
    let dev = vdisk_formats::open(&at_limit, OpenOptions::default()).unwrap();
    assert_eq!(vdisk_read(&*dev, 0, 4), [0x11; 4]);
    run_ok(qemu_img().args(["info", "-f", "qcow2"]).arg(&at_limit));
    // One more is refused (QEMU has no limit: it reads them all).
    let over = with_extensions(dir.path(), &base, MAX_HEADER_EXTENSIONS + 1);
    let err = vdisk_formats::open(&over, OpenOptions::default())
        .err()
        .unwrap();
    let msg = message(&err);
    assert!(msg.contains(&over.display().to_string()), "{msg}");
    let expected = format!("more than {MAX_HEADER_EXTENSIONS} header extensions");
    assert!(msg.contains(&expected), "{msg}");
}

/// A chain of `images` qcow2 images of 1 MiB (the bottom one without a backing file); returns the
/// top one.
fn chain_of(dir: &Path, images: usize) -> PathBuf {
    let name = |i: usize| dir.join(format!("chain-{i}.qcow2"));
    for i in 0..images {
        let opts = vdisk_formats::qcow2::CreateOptions {
            size: Some(1 << 20),
            backing_file: (i > 0).then(|| name(i - 1).display().to_string()),
            backing_format: (i > 0).then(|| "qcow2".to_string()),
            open_backing: false,
            ..Default::default()
        };
        vdisk_formats::create(&name(i), &CreateOptions::Qcow2(opts)).unwrap();
    }
    name(images - 1)
}

#[test]
fn backing_chains_deeper_than_max_chain_depth_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let at_limit = chain_of(dir.path(), MAX_CHAIN_DEPTH);
    let over = chain_of(dir.path(), MAX_CHAIN_DEPTH + 1);
    // Each image of a chain is opened one call deeper; an unoptimised build needs more than the
    // 2 MiB of a test thread for 64 of them, so this runs with the 8 MiB of a main thread.
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            vdisk_formats::open(&at_limit, OpenOptions::default()).unwrap();
            let err = vdisk_formats::open(&over, OpenOptions::default())
                .err()
                .unwrap();
            let msg = message(&err);
            assert!(msg.contains(&over.display().to_string()), "{msg}");
            assert!(msg.contains("backing chain deeper than 64 images"), "{msg}");
        })
        .unwrap()
        .join()
        .unwrap();
}

/// Gives feature table entry (incompatible, `bit`) a new bit number and name.
fn rename_feature(b: &mut [u8], bit: u8, new_bit: u8, name: &str) {
    let len = be32(b, FEATURE_TABLE + 4) as usize;
    let table = FEATURE_TABLE + 8;
    let entry = (table..table + len)
        .step_by(48)
        .find(|&e| b[e] == 0 && b[e + 1] == bit)
        .expect("feature table names the bit");
    b[entry + 1] = new_bit;
    b[entry + 2..entry + 48].fill(0);
    b[entry + 2..entry + 2 + name.len()].copy_from_slice(name.as_bytes());
}

/// The message of an error with its sources.
fn message(e: &vdisk_formats::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg += &format!(": {s}");
        src = s.source();
    }
    msg
}

/// Writes the patched image and opens it read-only and read-write: both must fail with a message
/// naming the file and containing every needle. Returns the file.
fn assert_refused(dir: &Path, base: &[u8], case: &Case) -> PathBuf {
    let path = dir.join(format!("{}.qcow2", case.name.replace(' ', "_")));
    for read_only in [true, false] {
        let mut bytes = base.to_vec();
        (case.patch)(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let opts = OpenOptions {
            format: case.format,
            read_only,
            ..Default::default()
        };
        let err = match vdisk_formats::open(&path, opts) {
            Ok(dev) => panic!(
                "{} (read_only {read_only}): opened as a {} byte device",
                case.name,
                dev.size()
            ),
            Err(e) => e,
        };
        let msg = message(&err);
        assert!(
            msg.contains(&path.display().to_string()),
            "{}: message does not name the file: {msg}",
            case.name
        );
        for needle in case.needles {
            assert!(
                msg.to_lowercase().contains(&needle.to_lowercase()),
                "{} (read_only {read_only}): message lacks {needle:?}: {msg}",
                case.name
            );
        }
    }
    path
}

#[test]
fn hostile_headers_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    for case in CASES {
        let path = assert_refused(dir.path(), &base, case);
        // The oracle agrees that these images cannot be opened, except for tables past the end
        // of the file (QEMU only fails when it reads them) and the empty file.
        if !case.name.contains("past the end") && case.format.is_none() {
            let out = run(qemu_img().args(["info", "-f", "qcow2"]).arg(&path));
            assert!(
                !out.status.success(),
                "{}: qemu-img opens the image, the test's patch is wrong",
                case.name
            );
        }
    }
}

#[test]
fn bad_magic_probes_as_raw() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = base_image(dir.path());
    bytes[..4].copy_from_slice(b"QFI\0");
    let path = dir.path().join("magic.img");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(vdisk_formats::probe(&path).unwrap(), Format::Raw);
    let dev = vdisk_formats::open(&path, OpenOptions::default()).unwrap();
    assert_eq!(dev.size(), bytes.len() as u64);
    assert_eq!(vdisk_read(&*dev, 0, 8), &bytes[..8]);
    // An empty file has no magic either.
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(vdisk_formats::probe(&empty).unwrap(), Format::Raw);
}

/// Patches the image so that L1 entry 0 points to `l2` (with the COPIED flag).
fn with_l1_entry(dir: &Path, l2: u64) -> PathBuf {
    let mut bytes = base_image(dir);
    let l1 = be64(&bytes, 40) as usize;
    put64(&mut bytes, l1, (1 << 63) | l2);
    let path = dir.join("l1.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// Reads and writes of the first cluster must fail with an error naming the file and `needle`.
fn assert_io_refused(path: &Path, needle: &str) {
    let dev = vdisk_formats::open(path, OpenOptions::default())
        .unwrap_or_else(|e| panic!("the header is valid, open must work: {e}"));
    let mut buf = vec![0u8; 4096];
    let err = dev
        .read_at(&mut buf, 0)
        .expect_err("read through a bad L1 entry");
    let msg = message(&err);
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(needle), "{msg}");
    assert!(
        dev.extent(0, 4096).is_err(),
        "extent through a bad L1 entry"
    );
    let err = dev
        .write_at(&buf, 0)
        .expect_err("write through a bad L1 entry");
    assert!(message(&err).contains(needle), "{err}");
}

#[test]
fn l1_entry_past_the_end_of_the_file_fails_reads_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    // (QEMU reads the missing table as zeros, and the cluster as unallocated.)
    assert_io_refused(&with_l1_entry(dir.path(), 1 << 30), "L2 table");
}

#[test]
fn l1_entry_unaligned_fails_reads_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    assert_io_refused(&with_l1_entry(dir.path(), 0x40200), "L2 table");
}

#[test]
fn l2_entry_with_reserved_bits_fails_reads_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = base_image(dir.path());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&bytes, l2);
    put64(&mut bytes, l2, entry | 0x2);
    let path = dir.path().join("l2.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    assert_io_refused(&path, "reserved");
}

#[test]
fn refcount_block_past_the_end_fails_allocation_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = base_image(dir.path());
    let table = be64(&bytes, 48) as usize;
    put64(&mut bytes, table, 1 << 40);
    let path = dir.path().join("refblock.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let dev = vdisk_formats::open(&path, OpenOptions::default()).unwrap();
    // Reading needs no refcounts; the first allocation does.
    assert_eq!(vdisk_read(&*dev, 0, 4), [0x11; 4]);
    let err = dev
        .write_at(&[1u8; 512], 1 << 19)
        .expect_err("allocation with a bad refcount block");
    let msg = message(&err);
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("refcount block"), "{msg}");
}

#[test]
fn absurd_snapshot_count_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    assert_absurd_snapshot_count_refused(dir.path());
}

/// QEMU refuses 4 billion snapshots at open ("Snapshot table too large"); vdisk reads the table
/// lazily, so at the latest `info` must fail.
fn assert_absurd_snapshot_count_refused(dir: &Path) {
    let mut bytes = base_image(dir);
    put32(&mut bytes, 60, u32::MAX);
    let end = bytes.len() as u64 - 0x10000;
    put64(&mut bytes, 64, end);
    let path = dir.join("snapshots.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let err = match vdisk_formats::open(&path, opts) {
        Err(e) => e,
        Ok(dev) => dev.info().expect_err("info lists 4 billion snapshots"),
    };
    let msg = message(&err);
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.to_lowercase().contains("snapshot"), "{msg}");
}

/// A `/proc/self/status` field, in KiB: `VmHWM` (peak resident set) or `VmPeak` (peak virtual
/// size, which also sees allocations that were never touched).
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn hostile_images_never_allocate_much_memory() {
    let _alone = memory_lock();
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let (rss, virt) = (status_kib("VmHWM:"), status_kib("VmPeak:"));
    for _ in 0..3 {
        for case in CASES {
            assert_refused(dir.path(), &base, case);
        }
    }
    let path = with_l1_entry(dir.path(), 1 << 30);
    assert_io_refused(&path, "L2 table");
    assert_absurd_snapshot_count_refused(dir.path());
    let over = snapshot_limits::over_max_snapshots(dir.path());
    snapshot_limits::assert_snapshots_refused(&over, "Too many snapshots");
    let over = snapshot_limits::over_max_table_bytes(dir.path());
    snapshot_limits::assert_snapshots_refused(&over, "Snapshot table is too big");
    let over = snapshot_limits::over_max_snapshot_l1(dir.path());
    snapshot_limits::assert_snapshot_l1_refused(&over, "Snapshot L1 table too large");
    let over = bitmap_limits::over_max_bitmaps(dir.path());
    bitmap_limits::assert_both_refuse(&over, "exceeding the QEMU supported maximum");
    let over = bitmap_limits::over_max_directory_bytes(dir.path());
    bitmap_limits::assert_both_refuse(&over, "exceeds the maximum supported size");
    // Legitimate allocations are bounded by the first cluster (2 MiB at most), the refcount table
    // (8 MiB) and the L1 table (32 MiB); the other tests of this binary use little.
    let rss_after = status_kib("VmHWM:");
    assert!(
        rss_after < rss + 64 * 1024,
        "peak RSS grew from {rss} KiB to {rss_after} KiB"
    );
    let virt_after = status_kib("VmPeak:");
    assert!(
        virt_after < virt + 1024 * 1024,
        "peak virtual size grew from {virt} KiB to {virt_after} KiB"
    );
}
