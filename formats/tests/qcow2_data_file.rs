//! qcow2 images with an external data file (made by qemu-img) read identically in vdisk.

use std::process::Command;

use vdisk_formats::{open, OpenOptions};

fn ok(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn external_data_file_images_read_identically() {
    for raw_flag in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("meta.qcow2");
        let i = img.to_str().unwrap();
        let data = dir.path().join("data.bin");
        let opts = format!("data_file={},data_file_raw={raw_flag}", data.display());
        ok(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", &opts, i, "4M",
        ]);
        ok(&[
            "qemu-io",
            "-c",
            "write -P 0x17 0 64k",
            "-c",
            "write -P 0x29 1M 300k",
            "-c",
            "write -z 2M 64k",
            i,
        ]);
        let out = dir.path().join("out.raw");
        ok(&["qemu-img", "convert", "-O", "raw", i, out.to_str().unwrap()]);
        let want = std::fs::read(&out).unwrap();

        let dev = open(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut got = vec![0u8; want.len()];
        dev.read_at(&mut got, 0).unwrap();
        assert!(
            got == want,
            "data_file_raw={raw_flag}: vdisk reads different data"
        );
        assert_eq!(&got[..4], &[0x17; 4]);

        let err = open(&img, OpenOptions::default()).unwrap_err();
        assert!(err.to_string().contains("external data file"), "{err}");
    }
}
