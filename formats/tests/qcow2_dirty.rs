//! An image left dirty by QEMU with lazy refcounts (qemu-io killed mid-way) is repaired on the
//! first read-write open: qemu-img check is clean afterwards and the data is intact.

use std::process::Command;

use vdisk_formats::{open, OpenOptions};

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lazy.qcow2");
    let i = img.to_str().unwrap();
    let ok = |args: &[&str]| {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        i,
        "8M",
    ]);
    // qemu-io dies by SIGKILL after writing: the dirty bit stays set, refcounts are stale.
    let st = Command::new("qemu-io")
        .args(["-c", "write -P 0x5c 0 3M", "-c", "sigraise 9", i])
        .output()
        .unwrap();
    assert!(!st.status.success());
    let info = ok(&["qemu-img", "info", "--output=json", "-U", i]);
    assert!(info.contains("\"dirty-flag\": true"), "{info}");

    // Read-only access leaves it alone.
    drop(
        open(
            &img,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    assert!(ok(&["qemu-img", "info", "--output=json", "-U", i]).contains("\"dirty-flag\": true"));

    let dev = open(&img, OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 3 << 20];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5c));
    dev.write_at(&[1u8; 4096], 5 << 20).unwrap();
    dev.flush().unwrap();
    drop(dev);
    let info = ok(&["qemu-img", "info", "--output=json", i]);
    assert!(info.contains("\"dirty-flag\": false"), "{info}");
    ok(&["qemu-img", "check", i]);
    let out = ok(&[
        "qemu-io",
        "-c",
        "read -P 0x5c 0 3M",
        "-c",
        "read -P 1 5M 4k",
        i,
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}
