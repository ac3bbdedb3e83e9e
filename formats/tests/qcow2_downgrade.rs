//! Downgrading a qcow2 image to version 2 (`compat=0.10`) through the library, against
//! `qemu-img amend -o compat=0.10` on a copy of the same image: zero clusters become unallocated
//! without a backing file and zero-filled data clusters over one, so both images read the same
//! and map the same.

mod common;

use std::path::Path;

use common::{map_without_offsets, tool};
use vdisk_formats::qcow2::amend::{rewrite_header, HeaderChanges};

fn text(args: &[&str]) -> String {
    String::from_utf8_lossy(&tool(args)).into_owned()
}

fn downgrade_both(dir: &Path, backing: bool) {
    let (ours, theirs) = (dir.join("ours.qcow2"), dir.join("theirs.qcow2"));
    let base = dir.join("base.qcow2");
    let b = base.to_str().unwrap();
    text(&["qemu-img", "create", "-q", "-f", "qcow2", b, "4M"]);
    text(&["qemu-io", "-c", "write -P 5 0 4M", b]);
    for img in [&ours, &theirs] {
        let i = img.to_str().unwrap();
        if backing {
            text(&[
                "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", i,
            ]);
        } else {
            text(&["qemu-img", "create", "-q", "-f", "qcow2", i, "4M"]);
        }
        let writes = ["write -P 1 0 64k", "write -z 64k 128k", "write -z 1M 64k"];
        for w in writes {
            text(&["qemu-io", "-c", w, i]);
        }
        // A preallocated zero cluster (zero flag with a host cluster).
        text(&[
            "qemu-io",
            "-c",
            "write -P 2 2M 64k",
            "-c",
            "write -z 2M 64k",
            i,
        ]);
    }
    let changes = HeaderChanges {
        version: Some(2),
        ..Default::default()
    };
    rewrite_header(&ours, &changes).unwrap();
    text(&[
        "qemu-img",
        "amend",
        "-o",
        "compat=0.10",
        theirs.to_str().unwrap(),
    ]);
    let (o, t) = (ours.to_str().unwrap(), theirs.to_str().unwrap());
    assert!(text(&["qemu-img", "info", o]).contains("compat: 0.10"));
    text(&["qemu-img", "check", o]);
    text(&["qemu-img", "compare", "-q", o, t]);
    assert_eq!(
        map_without_offsets(&ours),
        map_without_offsets(&theirs),
        "backing: {backing}"
    );
}

#[test]
fn zero_clusters_without_a_backing_file_become_unallocated() {
    downgrade_both(tempfile::tempdir().unwrap().path(), false);
}

#[test]
fn zero_clusters_over_a_backing_file_become_zero_data() {
    downgrade_both(tempfile::tempdir().unwrap().path(), true);
}
