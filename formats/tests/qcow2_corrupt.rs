//! The corrupt bit, checked through qemu-img: a data write that would land on metadata (because
//! an L2 entry or a refcount is wrong) is refused with an error naming the host offset, the image
//! is marked corrupt (`qemu-img info` shows `corrupt: true`) and stays read-only; such an image
//! then opens read-only only.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use vdisk_formats::{ErrorKind, Format, OpenOptions, ZeroFlags};

const K: u64 = 1 << 10;

/// qemu-img's layout of a fresh image with 64 KiB clusters after one write at guest 0.
const REFTABLE: u64 = 0x10000;
const REFBLOCK: u64 = 0x20000;
const L1: u64 = 0x30000;
const L2: u64 = 0x40000;
const DATA: u64 = 0x50000;

fn patch(img: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// An image whose first cluster is written by qemu-io; `opts` are extra create options.
fn written_image(dir: &Path, opts: &str) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    qemu_create(&img, 1 << 20, opts);
    qemu_io(&img, &["write -P 0x17 0 64k".to_string()]);
    let l1 = be64(&read_head(&img, (L1 + 8) as usize), L1 as usize);
    assert_eq!(
        l1 & 0x00ff_ffff_ffff_fe00,
        L2,
        "the test expects qemu-img's layout"
    );
    img
}

fn qemu_info_corrupt(img: &Path) -> bool {
    let out = run_ok(qemu_img().args(["info", "--output=json"]).arg(img));
    let info = Json::parse(&String::from_utf8_lossy(&out.stdout));
    let data = info
        .get("format-specific")
        .and_then(|f| f.get("data"))
        .expect("format-specific data");
    data.get("corrupt") == Some(&Json::Bool(true))
}

/// After a refused write: the image is marked corrupt on disk, the open device refuses every
/// further change, a read-write open is refused and a read-only open works.
fn assert_marked_corrupt(img: &Path, dev: &dyn vdisk_formats::BlockDev) {
    assert!(qemu_info_corrupt(img), "qemu-img info shows corrupt: true");
    let err = dev.write_at(b"x", 300 * K).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let err = dev
        .write_zeroes(0, 64 * K, ZeroFlags::default())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(
        dev.discard(0, 64 * K).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let mut buf = [0u8; 16];
    dev.read_at(&mut buf, 200 * K).unwrap();

    let rw = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: false,
        ..Default::default()
    };
    let err = vdisk_formats::open(img, rw).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("read-only"), "{err}");
    let ro = vdisk_open(img, true);
    ro.read_at(&mut buf, 200 * K).unwrap();
    // qemu-img agrees that it may only be opened read-only.
    let out = run(std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(img));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Image is corrupt"), "{text}");
}

#[test]
fn write_through_an_l2_entry_pointing_at_the_refcount_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path(), "");
    let reftable =
        |img: &Path| read_head(img, (REFTABLE + 64) as usize)[REFTABLE as usize..].to_vec();
    let reftable_before = reftable(&img);
    // Guest cluster 0 now claims the refcount table as its data.
    patch(&img, L2, &((1u64 << 63) | REFTABLE).to_be_bytes());
    let dev = vdisk_open(&img, false);
    let err = dev.write_at(&[0xee; 4096], 4096).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("refcount table"), "{msg}");
    assert!(
        msg.contains("0x11000"),
        "the error names the host offset: {msg}"
    );
    assert!(
        reftable(&img) == reftable_before,
        "the refcount table is untouched"
    );
    assert_marked_corrupt(&img, &*dev);
}

#[test]
fn extended_l2_entry_pointing_at_the_l1_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path(), "extended_l2=on");
    let mut entry = [0u8; 16];
    put64(&mut entry, 0, (1 << 63) | L1);
    put64(&mut entry, 8, 0xffff_ffff);
    patch(&img, L2, &entry);
    let dev = vdisk_open(&img, false);
    // An unaligned write into an allocated subcluster goes straight to the host cluster.
    let err = dev.write_at(b"hello", 100).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("active L1 table"), "{err}");
    assert_marked_corrupt(&img, &*dev);
}

#[test]
fn allocation_onto_an_l2_table_with_a_zero_refcount_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path(), "");
    // The refcount of the L2 table (cluster 4, 16-bit entries) is lost: the allocator would
    // hand that cluster out for new data.
    patch(&img, REFBLOCK + 4 * 2, &[0, 0]);
    let dev = vdisk_open(&img, false);
    let err = dev.write_at(&[0x42; 512], 128 * K).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("active L2 table"), "{err}");
    // The L2 table was not overwritten: cluster 0 still maps to its data.
    let l2 = read_head(&img, (L2 + 8) as usize);
    assert_eq!(be64(&l2, L2 as usize), (1 << 63) | DATA);
    assert_marked_corrupt(&img, &*dev);
}

#[test]
fn image_marked_corrupt_by_qemu_opens_read_only_only() {
    let dir = tempfile::tempdir().unwrap();
    let img = written_image(dir.path(), "");
    patch(&img, L2, &((1u64 << 63) | REFTABLE).to_be_bytes());
    let out = run(std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(&img));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"));
    assert!(qemu_info_corrupt(&img));
    let dev = vdisk_open(&img, true);
    assert!(dev.capabilities().read_only);
    let info = dev.info().unwrap();
    let shown = format!("{info:?}");
    assert!(shown.contains("corrupt: Some(true)"), "{shown}");
    let rw = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: false,
        ..Default::default()
    };
    let err = vdisk_formats::open(&img, rw).unwrap_err();
    assert!(err.to_string().contains("marked corrupt"), "{err}");
}

#[test]
fn healthy_images_are_never_flagged() {
    // Heavy allocation, a moving refcount table and new refcount blocks (512-byte clusters fill
    // a refcount block every 256 clusters), with data written everywhere: nothing is refused.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ok.qcow2");
    vdisk_create(
        &img,
        8 << 20,
        &[
            ("cluster_size", "512".to_string()),
            ("refcount_bits", "16".to_string()),
        ],
    );
    let dev = vdisk_open(&img, false);
    let mut model = Model::new(8 << 20);
    let mut rng = Rng::new(11);
    for i in 0..600u64 {
        let off = (i * 13_331) % ((8 << 20) - 3000);
        Op::Write {
            offset: off,
            data: rng.bytes(2000),
        }
        .apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);
    assert!(!qemu_info_corrupt(&img));
    verify_image(&img, &mut model, "after heavy allocation");
}
