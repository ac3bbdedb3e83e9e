//! The cost of allocating clusters must not grow with the image.
//!
//! Appending clusters to an image that is already large should touch a bounded number of refcount
//! blocks. The tests count the read syscalls of this process (`/proc/self/io`, `syscr`) over a few
//! appending writes, once the image holds more refcount blocks than the driver caches (64): a scan
//! of the refcounts from an early cluster to the end shows up as reads of the uncached blocks, on
//! every allocation.
//!
//! Before 6a0c55b both failed: `Refcounts::find_free` restarted every scan at the lowest free
//! cluster even when that hole was too small for the request, so once any single cluster was free
//! (a discard, or the old refcount table after the table moved) each multi-cluster allocation
//! walked every refcount from there to the end of the image (about 1200 reads for these 16
//! writes).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use vdisk_formats::BlockDev;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;
/// Guest bytes of one L2 table with 512-byte clusters.
const SPAN: u64 = 32 * K;

/// `syscr` counts the reads of the whole process: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read_syscalls() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .expect("syscr in /proc/self/io")
        .trim()
        .parse()
        .unwrap()
}

/// Fills L2 spans `from..to` (all but their first cluster, which is already allocated, so each
/// write allocates a run of 63 data clusters and nothing else); returns the read syscalls made.
fn fill_spans(dev: &dyn BlockDev, from: u64, to: u64) -> u64 {
    let data = vec![0x5au8; (SPAN - 512) as usize];
    let before = read_syscalls();
    for s in from..to {
        dev.write_at(&data, s * SPAN + 512).unwrap();
    }
    read_syscalls() - before
}

/// A 512-byte-cluster image with 16-bit refcounts (one refcount block covers 256 clusters, 128
/// KiB): every L2 table of the first 12 MiB allocated up front, then 9 MiB of data, i.e. more
/// refcount blocks than vdisk caches.
fn large_image(dir: &Path) -> (PathBuf, Arc<dyn BlockDev>) {
    let img = dir.join("append.qcow2");
    vdisk_create(&img, 64 * M, &[("cluster_size", "512".to_string())]);
    let dev = vdisk_open(&img, false);
    for s in 0..12 * M / SPAN {
        dev.write_at(&[1], s * SPAN).unwrap();
    }
    fill_spans(&*dev, 0, 9 * M / SPAN);
    (img, dev)
}

/// Each of the writes allocates 63 data clusters in one run; that needs to read no more than
/// the refcount block or two it changes.
fn assert_bounded(img: &Path, dev: Arc<dyn BlockDev>, writes: u64, reads: u64) {
    dev.flush().unwrap();
    drop(dev);
    check_clean(img);
    assert!(
        reads <= 4 * writes,
        "{writes} appending writes made {reads} read syscalls: allocation rescans the image"
    );
}

#[test]
fn appending_writes_read_a_bounded_number_of_refcount_blocks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (img, dev) = large_image(dir.path());
    // The image outgrew its first refcount table (64 blocks, 8 MiB): the table moved and its old
    // cluster is free again.
    let head = read_head(&img, 512);
    assert_ne!(be64(&head, 48), 512, "the refcount table moved");
    let first = 9 * M / SPAN;
    let reads = fill_spans(&*dev, first, first + 16);
    assert_bounded(&img, dev, 16, reads);
}

#[test]
fn appending_writes_after_a_small_hole_read_a_bounded_number_of_refcount_blocks() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (img, dev) = large_image(dir.path());
    // Free one data cluster near the start: too small for the next allocations, which must not
    // rescan the whole image from there each time (QEMU moves its free cluster index past it).
    dev.discard(0, 512).unwrap();
    let first = 9 * M / SPAN;
    let reads = fill_spans(&*dev, first, first + 16);
    assert_bounded(&img, dev, 16, reads);
}
