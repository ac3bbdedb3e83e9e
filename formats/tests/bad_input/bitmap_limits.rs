//! The persistent bitmap limits (QEMU's): at most [`MAX_BITMAPS`] bitmaps in a directory of at
//! most [`MAX_DIRECTORY_BYTES`], granularities up to 2^[`MAX_GRANULARITY_BITS`]. One past each
//! limit vdisk and qemu-img refuse the image with the same message; at the limit both pass that
//! check (and accept the image, or fail the next check alike).

use std::path::{Path, PathBuf};

use super::common::*;
use super::{memory_lock, message, FEATURE_TABLE};
use vdisk_formats::qcow2::bitmaps::directory::{
    MAX_BITMAPS, MAX_DIRECTORY_BYTES, MAX_GRANULARITY_BITS,
};
use vdisk_formats::OpenOptions;

/// Type of the bitmaps header extension (qcow2.rst, "Bitmaps extension").
const BITMAPS_EXT: u32 = 0x2385_2875;

/// A 1 MiB image with one bitmap added by qemu-img, and where its bitmaps extension payload
/// and its one directory entry are.
fn with_bitmap(dir: &Path) -> (Vec<u8>, usize, usize) {
    let path = dir.join("bitmap.qcow2");
    qemu_create(&path, 1 << 20, "");
    run_ok(qemu_img().args(["bitmap", "--add"]).arg(&path).arg("b0"));
    let bytes = std::fs::read(&path).unwrap();
    let mut at = FEATURE_TABLE;
    let ext = loop {
        let (kind, len) = (be32(&bytes, at), be32(&bytes, at + 4) as usize);
        assert_ne!(kind, 0, "qemu-img wrote a bitmaps extension");
        if kind == BITMAPS_EXT {
            break at + 8;
        }
        at += 8 + len.next_multiple_of(8);
    };
    let entry = be64(&bytes, ext + 16) as usize;
    (bytes, ext, entry)
}

/// Where in a directory entry the granularity bits are.
const GRANULARITY: usize = 17;

/// The bitmap image with `patch` applied, as `name`.
fn patched(dir: &Path, name: &str, patch: impl FnOnce(&mut [u8], usize, usize)) -> PathBuf {
    let (mut bytes, ext, entry) = with_bitmap(dir);
    patch(&mut bytes, ext, entry);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// An image announcing one bitmap more than [`MAX_BITMAPS`].
pub fn over_max_bitmaps(dir: &Path) -> PathBuf {
    patched(dir, "bitmaps-over.qcow2", |b, ext, _| {
        put32(b, ext, MAX_BITMAPS + 1)
    })
}

/// An image announcing a bitmap directory one byte over [`MAX_DIRECTORY_BYTES`].
pub fn over_max_directory_bytes(dir: &Path) -> PathBuf {
    patched(dir, "directory-over.qcow2", |b, ext, _| {
        put64(b, ext + 8, MAX_DIRECTORY_BYTES + 1)
    })
}

/// The message of vdisk's open of `path`, `None` when it opens and lists its bitmaps.
fn vdisk_refusal(path: &Path) -> Option<String> {
    let opts = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    match vdisk_formats::open(path, opts).and_then(|d| d.info()) {
        Ok(_) => None,
        Err(e) => Some(message(&e)),
    }
}

/// qemu-img's error for `info` of `path`, `None` when it opens.
fn qemu_refusal(path: &Path) -> Option<String> {
    let out = run(qemu_img().args(["info"]).arg(path));
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// vdisk refuses `path` naming it, and both vdisk and qemu-img say `needle`.
pub fn assert_both_refuse(path: &Path, needle: &str) {
    let ours = vdisk_refusal(path).expect("vdisk opens the image");
    assert!(ours.contains(&path.display().to_string()), "{ours}");
    assert!(ours.contains(needle), "{ours}");
    let theirs = qemu_refusal(path).expect("qemu-img opens the image");
    assert!(theirs.contains(needle), "{theirs}");
}

/// Neither vdisk nor qemu-img refuse `path` for `needle`.
fn assert_neither_says(path: &Path, needle: &str) {
    for msg in [vdisk_refusal(path), qemu_refusal(path)]
        .into_iter()
        .flatten()
    {
        assert!(!msg.contains(needle), "{msg}");
    }
}

#[test]
fn bitmap_count_is_limited_to_max_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let needle = "exceeding the QEMU supported maximum of 65535";
    assert_both_refuse(&over_max_bitmaps(dir.path()), needle);
    // At the limit the directory (one entry) is what both refuse.
    let at = patched(dir.path(), "bitmaps-at.qcow2", |b, ext, _| {
        put32(b, ext, MAX_BITMAPS)
    });
    assert!(vdisk_refusal(&at).is_some() && qemu_refusal(&at).is_some());
    assert_neither_says(&at, needle);
}

#[test]
fn bitmap_directory_is_limited_to_max_directory_bytes() {
    let _memory = memory_lock();
    let dir = tempfile::tempdir().unwrap();
    let needle = "bitmap directory size (67107841) exceeds the maximum supported size (67107840)";
    assert_both_refuse(&over_max_directory_bytes(dir.path()), needle);
    let at = patched(dir.path(), "directory-at.qcow2", |b, ext, _| {
        put64(b, ext + 8, MAX_DIRECTORY_BYTES)
    });
    assert!(vdisk_refusal(&at).is_some() && qemu_refusal(&at).is_some());
    assert_neither_says(&at, "exceeds the maximum supported size");
}

#[test]
fn bitmap_granularity_is_limited_to_max_granularity_bits() {
    let dir = tempfile::tempdir().unwrap();
    let at = patched(dir.path(), "granularity-at.qcow2", |b, _, entry| {
        b[entry + GRANULARITY] = MAX_GRANULARITY_BITS as u8
    });
    assert_eq!(vdisk_refusal(&at), None);
    assert_eq!(qemu_refusal(&at), None);
    let info = run_ok(qemu_img().args(["info"]).arg(&at));
    assert!(String::from_utf8_lossy(&info.stdout).contains("granularity: 2147483648"));
    let over = patched(dir.path(), "granularity-over.qcow2", |b, _, entry| {
        b[entry + GRANULARITY] = MAX_GRANULARITY_BITS as u8 + 1
    });
    let ours = vdisk_refusal(&over).expect("vdisk opens the image");
    assert!(ours.contains("granularity bits 32 out of range"), "{ours}");
    let theirs = qemu_refusal(&over).expect("qemu-img opens the image");
    assert!(
        theirs.contains("doesn't satisfy the constraints"),
        "{theirs}"
    );
}
