//! Resize, checked through qemu-img: sizes, data kept, clusters released, check clean.

use std::path::Path;
use std::process::Command;

use vdisk_formats::{open, resize, Format, OpenOptions, Preallocation};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virtual_size(img: &Path) -> u64 {
    let info = run(&["qemu-img", "info", "--output=json", img.to_str().unwrap()]);
    let at = info.rfind("\"virtual-size\": ").unwrap() + 16;
    info[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn to_raw(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("raw-out");
    run(&[
        "qemu-img",
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(raw).unwrap()
}

#[test]
fn qcow2_grow_moves_l1_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let i = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", i, "1M"]);
    run(&["qemu-io", "-c", "write -P 0x33 4096 100000", i]);
    resize(&img, None, 1 << 40, false, Preallocation::Off).unwrap();
    assert_eq!(virtual_size(&img), 1 << 40);
    run(&["qemu-img", "check", i]);
    let dev = open(&img, OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 100000];
    dev.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    dev.write_at(&[9u8; 10], (1 << 40) - 10).unwrap();
    drop(dev);
    run(&["qemu-img", "check", i]);
    let out = run(&["qemu-io", "-c", "read -P 9 1099511627766 10", i]);
    assert!(out.contains("read 10/10"), "{out}");
}

#[test]
fn qcow2_shrink_releases_clusters_and_regrow_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let i = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", i, "64M"]);
    run(&["qemu-io", "-c", "write -P 0x44 0 64M", i]);
    let before = std::fs::metadata(&img).unwrap().len();
    let err = resize(&img, None, 1 << 20, false, Preallocation::Off).unwrap_err();
    assert!(err.to_string().contains("--shrink"), "{err}");
    resize(
        &img,
        Some(Format::Qcow2),
        (1 << 20) + 512,
        true,
        Preallocation::Off,
    )
    .unwrap();
    assert_eq!(virtual_size(&img), (1 << 20) + 512);
    // qemu-img check exits 0 only with neither corruption nor leaks.
    run(&["qemu-img", "check", i]);
    assert!(
        std::fs::metadata(&img).unwrap().len() < before / 16,
        "file was not truncated"
    );
    resize(&img, None, 2 << 20, false, Preallocation::Off).unwrap();
    run(&["qemu-img", "check", i]);
    let data = to_raw(&img);
    assert!(data[..(1 << 20) + 512].iter().all(|&b| b == 0x44));
    assert!(
        data[(1 << 20) + 512..].iter().all(|&b| b == 0),
        "stale data past the old end"
    );
}

#[test]
fn qcow2_grow_with_preallocation_allocates_the_new_area() {
    for mode in [
        Preallocation::Metadata,
        Preallocation::Falloc,
        Preallocation::Full,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.qcow2");
        let i = img.to_str().unwrap();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", i, "1M"]);
        resize(&img, None, 9 << 20, false, mode).unwrap();
        run(&["qemu-img", "check", i]);
        let map = run(&["qemu-img", "map", "--output=json", i]);
        let last = map.lines().last().unwrap();
        assert!(
            last.contains("\"data\": true") && last.contains("\"start\": 1048576"),
            "{mode:?}: {map}"
        );
        assert!(to_raw(&img).iter().all(|&b| b == 0));
    }
}

#[test]
fn raw_resize_grows_sparse_and_shrinks_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.raw");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    resize(&img, Some(Format::Raw), 1 << 30, false, Preallocation::Off).unwrap();
    assert_eq!(virtual_size(&img), 1 << 30);
    assert!(resize(&img, None, 512, false, Preallocation::Off).is_err());
    resize(&img, None, 512, true, Preallocation::Off).unwrap();
    assert_eq!(std::fs::read(&img).unwrap(), vec![1u8; 512]);
    resize(&img, None, 1 << 20, false, Preallocation::Full).unwrap();
    let st = std::fs::metadata(&img).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        st.blocks() * 512 >= 1 << 20,
        "full preallocation left holes"
    );
}
