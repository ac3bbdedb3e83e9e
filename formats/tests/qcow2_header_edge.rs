//! Header edge cases where vdisk must accept what QEMU accepts.

mod common;

use common::*;

/// An extension list that fills the first cluster exactly, with no end marker: QEMU stops
/// reading at the end of the cluster (`qcow2_read_extensions` loops while `offset < end_offset`)
/// and opens the image; so must vdisk.
#[test]
fn extension_list_filling_the_cluster_without_end_marker_opens() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("full-header.qcow2");
    qemu_create(&img, 1 << 20, "");
    qemu_io(&img, &["write -P 0x5a 0 64k".to_string()]);
    let mut bytes = std::fs::read(&img).unwrap();
    let header_len = be32(&bytes, 100) as usize;
    let cluster = 1usize << be32(&bytes, 20);
    // Unknown extensions of 8 data bytes each, from the end of the header to the end of the
    // cluster (112 + 16 * 4089 = 65536).
    assert_eq!((cluster - header_len) % 16, 0);
    for at in (header_len..cluster).step_by(16) {
        put32(&mut bytes, at, 0x1234_0000 + at as u32);
        put32(&mut bytes, at + 4, 8);
        put64(&mut bytes, at + 8, at as u64);
    }
    std::fs::write(&img, &bytes).unwrap();
    check_clean(&img);
    let dev = vdisk_open(&img, true);
    assert_eq!(vdisk_read(&*dev, 0, 4), [0x5a; 4]);
}
