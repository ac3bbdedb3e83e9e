//! Resize, checked through qemu-img: sizes, data kept, clusters released, check clean.

mod common;

use std::path::Path;

use common::{map_without_offsets, qemu_read_all, tool};

/// `tool`, its output as text.
fn text(args: &[&str]) -> String {
    String::from_utf8_lossy(&tool(args)).into_owned()
}

use vdisk_formats::{open, Format, OpenOptions, Preallocation, ResizeOptions};

/// `resize_image` under QEMU's backing policy, with no passphrase.
fn resize(
    path: &Path,
    format: Option<Format>,
    new_size: u64,
    shrink: bool,
    preallocation: Preallocation,
) -> vdisk_formats::Result<()> {
    let opts = ResizeOptions {
        format,
        shrink,
        preallocation,
        ..Default::default()
    };
    vdisk_formats::resize_image(path, new_size, opts, None)
}

fn virtual_size(img: &Path) -> u64 {
    let info = text(&["qemu-img", "info", "--output=json", img.to_str().unwrap()]);
    let at = info.rfind("\"virtual-size\": ").unwrap() + 16;
    info[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn qcow2_grow_moves_l1_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("g.qcow2");
    let i = img.to_str().unwrap();
    text(&["qemu-img", "create", "-q", "-f", "qcow2", i, "1M"]);
    text(&["qemu-io", "-c", "write -P 0x33 4096 100000", i]);
    resize(&img, None, 1 << 40, false, Preallocation::Off).unwrap();
    assert_eq!(virtual_size(&img), 1 << 40);
    text(&["qemu-img", "check", i]);
    let dev = open(&img, OpenOptions::default()).unwrap();
    let mut buf = vec![0u8; 100000];
    dev.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    dev.write_at(&[9u8; 10], (1 << 40) - 10).unwrap();
    drop(dev);
    text(&["qemu-img", "check", i]);
    let out = text(&["qemu-io", "-c", "read -P 9 1099511627766 10", i]);
    assert!(out.contains("read 10/10"), "{out}");
}

#[test]
fn qcow2_shrink_releases_clusters_and_regrow_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.qcow2");
    let i = img.to_str().unwrap();
    text(&["qemu-img", "create", "-q", "-f", "qcow2", i, "64M"]);
    text(&["qemu-io", "-c", "write -P 0x44 0 64M", i]);
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
    text(&["qemu-img", "check", i]);
    assert!(
        std::fs::metadata(&img).unwrap().len() < before / 16,
        "file was not truncated"
    );
    resize(&img, None, 2 << 20, false, Preallocation::Off).unwrap();
    text(&["qemu-img", "check", i]);
    let data = qemu_read_all(&img);
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
        text(&["qemu-img", "create", "-q", "-f", "qcow2", i, "1M"]);
        resize(&img, None, 9 << 20, false, mode).unwrap();
        text(&["qemu-img", "check", i]);
        let map = text(&["qemu-img", "map", "--output=json", i]);
        let last = map.lines().last().unwrap();
        assert!(
            last.contains("\"data\": true") && last.contains("\"start\": 1048576"),
            "{mode:?}: {map}"
        );
        assert!(qemu_read_all(&img).iter().all(|&b| b == 0));
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

#[test]
fn qcow2_with_extended_l2_grows_preallocated_as_qemu_img_grows_it() {
    for (mode, name) in [
        (Preallocation::Metadata, "metadata"),
        (Preallocation::Falloc, "falloc"),
        (Preallocation::Full, "full"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        let (o, t) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
        for i in [o, t] {
            common::qemu_create(Path::new(i), 1 << 20, "extended_l2=on");
            text(&["qemu-io", "-c", "write -P 7 0 100k", i]);
        }
        resize(&ours, None, 5 << 20, false, mode).unwrap();
        let prealloc = format!("--preallocation={name}");
        text(&["qemu-img", "resize", "-q", &prealloc, t, "5M"]);
        text(&["qemu-img", "check", o]);
        // New clusters have a host cluster but no allocated subcluster: they read as zero.
        assert_eq!(
            map_without_offsets(&ours),
            map_without_offsets(&theirs),
            "{name}"
        );
        let last = text(&["qemu-img", "map", "--output=json", o]);
        let last = last.lines().last().unwrap();
        assert!(
            last.contains("\"start\": 1048576") && last.contains("\"offset\""),
            "{last}"
        );
        text(&["qemu-img", "compare", "-q", o, t]);
    }
}
