//! Writing to an image with internal snapshots (made by qemu-img) copies shared L2 tables and data
//! clusters, so the snapshot keeps its data: checked with qemu-img check, convert and snapshot -a.

mod common;

use common::{qemu_read_all, tool};
use vdisk_formats::{open, OpenOptions, ZeroFlags};

#[test]
fn writes_after_a_snapshot_leave_the_snapshot_intact() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let i = img.to_str().unwrap();
    tool(&["qemu-img", "create", "-q", "-f", "qcow2", i, "4M"]);
    tool(&[
        "qemu-io",
        "-c",
        "write -P 0x41 0 2M",
        "-c",
        "write -c -P 0x42 3M 64k",
        i,
    ]);
    let before = qemu_read_all(&img);
    tool(&["qemu-img", "snapshot", "-c", "snap1", i]);

    let dev = open(&img, OpenOptions::default()).unwrap();
    let mut model = before.clone();
    for (off, len, byte) in [
        (100u64, 10usize, 1u8),
        (65536 * 5 + 3, 200_000, 2),
        (3 << 20, 10, 3),
    ] {
        dev.write_at(&vec![byte; len], off).unwrap();
        model[off as usize..off as usize + len].fill(byte);
    }
    dev.write_zeroes(
        1 << 20,
        1 << 18,
        ZeroFlags {
            may_unmap: true,
            fast_only: false,
        },
    )
    .unwrap();
    model[1 << 20..(1 << 20) + (1 << 18)].fill(0);
    dev.discard(0x180000, 0x10000).unwrap();
    let mut d = vec![0u8; 0x10000];
    dev.read_at(&mut d, 0x180000).unwrap();
    model[0x180000..0x190000].copy_from_slice(&d);
    dev.flush().unwrap();
    drop(dev);

    tool(&["qemu-img", "check", i]);
    assert!(qemu_read_all(&img) == model, "active layer differs");
    tool(&["qemu-img", "snapshot", "-a", "snap1", i]);
    tool(&["qemu-img", "check", i]);
    assert!(qemu_read_all(&img) == before, "snapshot data changed");
}
