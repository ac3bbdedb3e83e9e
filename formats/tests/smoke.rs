use std::process::Command;
use vdisk_formats::{create, open, BlockDev, CreateOptions, OpenOptions, ZeroFlags};

#[test]
fn qcow2_write_read_and_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let opts = vdisk_formats::qcow2::CreateOptions {
        size: Some(64 << 20),
        ..Default::default()
    };
    create(&path, &CreateOptions::Qcow2(opts)).unwrap();
    let img = open(&path, OpenOptions::default()).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    img.write_at(&data, 12345).unwrap();
    img.write_zeroes(1 << 20, 3 << 20, ZeroFlags::default())
        .unwrap();
    img.discard(0, 64 << 10).unwrap();
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back[65536 - 12345..], data[65536 - 12345..]);
    img.flush().unwrap();
    drop(img);
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let raw = dir.path().join("a.raw");
    assert!(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&path)
        .arg(&raw)
        .status()
        .unwrap()
        .success());
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(&bytes[65536..12345 + data.len()], &data[65536 - 12345..]);
    assert!(bytes[..65536].iter().all(|&b| b == 0));
}
