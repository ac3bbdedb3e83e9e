//! `convert -C` really offloads a raw-to-raw copy to the kernel (seen by strace), leaves holes
//! as holes, and reads back like the source (qemu-img compare).

mod common;

use std::process::Command;

use common::{qemu_img, qemu_io, temp_dir};

#[test]
fn copy_offloading_copies_raw_data_runs_with_copy_file_range() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed");
        return;
    }
    let dir = temp_dir();
    let src = dir.path().join("src.raw");
    let dst = dir.path().join("dst.raw");
    qemu_img(["create", "-q", "-f", "raw", src.to_str().unwrap(), "16M"]).ok();
    qemu_io("raw", &src, &["write -P 5 1M 1M", "write -P 6 9M 64k"]);
    let out = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=copy_file_range",
            env!("CARGO_BIN_EXE_vdisk"),
        ])
        .args(["convert", "-C", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let trace = String::from_utf8_lossy(&out.stderr);
    let calls: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("copy_file_range("))
        .collect();
    // One call per data run (qemu-img create allocates the first 4 KiB of a raw image): the
    // holes are not copied.
    let expected = [
        ("[0]", "= 4096"),
        ("[1048576]", "= 1048576"),
        ("[9437184]", "= 65536"),
    ];
    assert_eq!(calls.len(), expected.len(), "{trace}");
    for (call, (offset, copied)) in calls.iter().zip(expected) {
        assert!(call.contains(offset) && call.ends_with(copied), "{trace}");
    }
    qemu_img(["compare", src.to_str().unwrap(), dst.to_str().unwrap()]).ok();
    let allocated = std::fs::metadata(&dst).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(allocated.unwrap() < 4 << 20, "the holes were filled");
}
