//! Extended L2 entries (subclusters), checked through qemu-utils 10:
//!
//! * images qemu-img creates with `extended_l2=on` and qemu-io writes at 4 KiB granularity (data,
//!   zeroes with and without unmap, discards, compressed clusters, with and without a backing
//!   file) read identically through vdisk, and `extent()` agrees with `qemu-img map`, which is
//!   subcluster-granular;
//! * images vdisk creates with `extended_l2=on` and writes randomly (unaligned, inside single
//!   subclusters, over a backing file, with zeroes and discards) pass `qemu-img check` and read
//!   back through `qemu-img convert`/`compare` as an in-memory model says;
//! * creation refuses what qemu-img refuses, with its messages, and lays images out like it;
//! * malformed extended entries are reported as corruption, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use vdisk_formats::{BlockDev, ErrorKind, ExtentKind, ZeroFlags};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

const UNMAP: ZeroFlags = ZeroFlags {
    may_unmap: true,
    fast_only: false,
};

/// A backing file made by qemu-img: `size` bytes with a pattern over most of it, shorter than the
/// overlays on top so that their tail has nothing to show through.
fn qemu_backing(dir: &Path, size: u64, cluster: u64) -> PathBuf {
    let base = dir.join("base.qcow2");
    qemu_create(&base, size, "");
    let cmds = vec![
        format!("write -P 0x99 0 {}", size - cluster),
        format!("write -P 0x98 {} {}", size - cluster / 2, cluster / 2),
    ];
    qemu_io(&base, &cmds);
    base
}

fn qemu_extl2_opts(cluster: u64, backing: Option<&Path>) -> String {
    let mut opts = format!("extended_l2=on,cluster_size={cluster}");
    if let Some(b) = backing {
        opts += &format!(",backing_file={},backing_fmt=qcow2", b.display());
    }
    opts
}

/// Compares vdisk's view of an image with qemu-img's, byte for byte and extent for extent.
fn assert_reads_like_qemu(img: &Path, what: &str) {
    let expected = qemu_read_all(img);
    let dev = vdisk_open(img, true);
    let step = M as usize;
    for (i, want) in expected.chunks(step).enumerate() {
        let off = (i * step) as u64;
        let got = vdisk_read(&*dev, off, want.len());
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "{what}: vdisk reads {:#04x} at guest byte {:#x}, qemu-img {:#04x}",
                got[at],
                off + at as u64,
                want[at]
            );
        }
    }
    assert_extents_agree(&*dev, img, what);
}

/// qemu-io writes at 4 KiB granularity into an extended-L2 image: partial subclusters (for large
/// clusters), whole subclusters, zeroes over data and over nothing, discards, compressed clusters.
fn qemu_commands(cs: u64, size: u64) -> Vec<String> {
    let mut c = vec![
        format!("write -P 0x11 0 {}", 3 * cs),
        format!("write -P 0x22 {} {}", 4 * K, 4 * K),
        format!("write -P 0x33 {} {}", 4 * cs + 8 * K, 4 * K),
        format!("write -P 0x34 {} {}", 4 * cs + 20 * K, 12 * K),
        format!("write -P 0x35 {} {}", 5 * cs - 4 * K, 8 * K),
        format!("write -z {} {}", cs + 8 * K, 4 * K),
        format!("write -z {} {}", 5 * cs + 12 * K, 8 * K),
        format!("write -z -u {} {}", 6 * cs, cs + 4 * K),
        format!("write -z {} {}", 2 * cs, cs),
        format!("write -P 0x36 {} {}", 7 * cs, cs),
        format!("discard {} {}", 7 * cs, cs),
        format!("write -c -P 0x37 {} {}", 8 * cs, cs),
        format!("write -P 0x38 {} {}", 9 * cs + 4 * K, 4 * K),
        format!("write -c -P 0x39 {} {}", 10 * cs, cs),
        format!("write -P 0x3a {} {}", 10 * cs + 4 * K, 4 * K),
        format!("write -P 0x3b {} {}", size - 4 * K, 4 * K),
    ];
    // Unaligned bytes inside one subcluster, for copy-on-write within it.
    c.push(format!("write -P 0x3c {} 700", 11 * cs + 1000));
    c
}

#[test]
fn qemu_written_images_read_identically_and_map_alike() {
    for cs in [16 * K, 64 * K, 2 * M] {
        for with_backing in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let size = 12 * cs + 8 * K;
            let backing = with_backing.then(|| qemu_backing(dir.path(), 8 * cs, cs));
            let img = dir.path().join("ext.qcow2");
            qemu_create(&img, size, &qemu_extl2_opts(cs, backing.as_deref()));
            qemu_io(&img, &qemu_commands(cs, size));
            check_clean(&img);
            let what = format!("cluster {cs}, backing {with_backing}");
            assert_reads_like_qemu(&img, &what);
        }
    }
}

#[test]
fn qemu_preallocated_images_map_alike() {
    let dir = tempfile::tempdir().unwrap();
    for prealloc in ["metadata", "falloc", "full"] {
        let img = dir.path().join(format!("{prealloc}.qcow2"));
        qemu_create(
            &img,
            M + 4 * K,
            &format!("extended_l2=on,cluster_size=16k,preallocation={prealloc}"),
        );
        qemu_io(&img, &["write -P 0x41 8k 4k".to_string()]);
        assert_reads_like_qemu(&img, prealloc);
    }
}

/// vdisk creates an extended-L2 image (over a qemu-made backing file or not), applies random
/// operations of subcluster and cluster scale, and qemu-img checks, reads and maps the result.
fn vdisk_written(cs: u64, with_backing: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * cs + 3 * 512;
    let mut model = Model::new(size);
    let mut pairs = vec![
        ("extended_l2", "on".to_string()),
        ("cluster_size", cs.to_string()),
    ];
    if with_backing {
        let base = qemu_backing(dir.path(), 6 * cs, cs);
        let bytes = qemu_read_all(&base);
        model.write(0, &bytes);
        pairs.push(("backing_file", base.display().to_string()));
        pairs.push(("backing_fmt", "qcow2".to_string()));
    }
    let img = dir.path().join("vdisk.qcow2");
    vdisk_create(&img, size, &pairs);
    check_clean(&img);

    let mut rng = Rng::new(seed);
    let sub = cs / 32;
    let anchors = [0, 3 * cs + 5 * sub, 6 * cs, 8 * cs + 7, size];
    let dev = vdisk_open(&img, false);
    for i in 0..48 {
        let anchor = anchors[rng.below(anchors.len() as u64) as usize];
        // Half of the operations are of subcluster scale.
        let scale = if i % 2 == 0 { 4 * sub } else { cs };
        Op::random(&mut rng, size, anchor, scale).apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);

    let what = format!("cluster {cs}, backing {with_backing}, seed {seed}");
    verify_image(&img, &mut model, &what);
    let dev = vdisk_open(&img, true);
    assert_extents_agree(&*dev, &img, &what);
}

#[test]
fn vdisk_written_images_pass_check_and_read_as_modelled() {
    let seed = seed_from_env("vdisk_written_images_pass_check_and_read_as_modelled");
    for (i, cs) in [16 * K, 64 * K, 512 * K].into_iter().enumerate() {
        for with_backing in [false, true] {
            vdisk_written(
                cs,
                with_backing,
                seed ^ ((i as u64) << 40) ^ u64::from(with_backing),
            );
        }
    }
}

/// Creates an image with extended L2 entries and `cs`-byte clusters through vdisk.
fn vdisk_create_extl2(img: &Path, size: u64, cs: u64) {
    let pairs = [
        ("extended_l2", "on".to_string()),
        ("cluster_size", cs.to_string()),
    ];
    vdisk_create(img, size, &pairs);
}

/// The state of guest byte `guest` through vdisk's `extent()` (the tests check that it agrees
/// with `qemu-img map`).
fn kind_at(dev: &dyn BlockDev, guest: u64) -> (ExtentKind, Option<u64>) {
    let e = dev.extent(guest, 1).unwrap();
    (e.kind, e.host_offset)
}

#[test]
fn writes_fill_subclusters_of_one_host_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fill.qcow2");
    let cs = 64 * K;
    let sub = 2 * K;
    vdisk_create_extl2(&img, 4 * M, cs);
    let dev = vdisk_open(&img, false);
    dev.write_at(&[0xa1; 4096], 8 * K).unwrap();
    let host = dev.extent(8 * K, 1).unwrap().host_offset.unwrap() - 8 * K;
    // Later writes land in the same host cluster, next to the first.
    dev.write_at(&[0xa2; 100], 20 * K + 50).unwrap();
    dev.write_at(&[0xa3; 2048], 40 * K).unwrap();
    dev.flush().unwrap();
    assert_eq!(check_clean(&img).allocated_clusters, 1);
    assert_eq!(
        kind_at(&*dev, 8 * K),
        (ExtentKind::Data, Some(host + 8 * K))
    );
    assert_eq!(
        kind_at(&*dev, 20 * K),
        (ExtentKind::Data, Some(host + 20 * K))
    );
    // Subclusters nobody wrote stay unallocated (qemu-img shows their host offset).
    assert_eq!(
        kind_at(&*dev, 12 * K),
        (ExtentKind::Unallocated, Some(host + 12 * K))
    );
    let bytes = qemu_read_all(&img);
    assert!(bytes[8 * K as usize..12 * K as usize]
        .iter()
        .all(|&b| b == 0xa1));
    let sc = (20 * K) as usize;
    assert!(bytes[sc..sc + 50].iter().all(|&b| b == 0));
    assert!(bytes[sc + 50..sc + 150].iter().all(|&b| b == 0xa2));
    assert!(bytes[sc + 150..sc + sub as usize].iter().all(|&b| b == 0));
    assert_extents_agree(&*dev, &img, "subcluster fill");

    // Zeroing one subcluster keeps the host cluster; discarding every allocated subcluster
    // releases it.
    dev.write_zeroes(8 * K, sub, ZeroFlags::default()).unwrap();
    assert_eq!(
        kind_at(&*dev, 8 * K),
        (ExtentKind::Zero, Some(host + 8 * K))
    );
    assert_extents_agree(&*dev, &img, "after zeroing a subcluster");
    dev.discard(0, cs).unwrap();
    dev.flush().unwrap();
    assert_eq!(check_clean(&img).allocated_clusters, 0);
    assert_eq!(kind_at(&*dev, 8 * K).0, ExtentKind::Unallocated);
    assert!(qemu_read_all(&img).iter().all(|&b| b == 0));
    assert_extents_agree(&*dev, &img, "after discard");
}

#[test]
fn discard_and_zeroes_over_a_backing_file_never_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 * K;
    let sub = 2 * K;
    let base = qemu_backing(dir.path(), 4 * cs, cs);
    let img = dir.path().join("top.qcow2");
    qemu_create(&img, 4 * cs, &qemu_extl2_opts(cs, Some(&base)));
    let dev = vdisk_open(&img, false);
    dev.write_at(&[0x5a; 100], 5 * sub + 7).unwrap();
    // Discarding subclusters that show the backing file makes them read zero.
    dev.discard(4 * sub, 4 * sub).unwrap();
    dev.discard(cs, cs).unwrap();
    dev.write_zeroes(2 * cs + sub, sub, UNMAP).unwrap();
    dev.write_zeroes(3 * cs, cs, UNMAP).unwrap();
    dev.flush().unwrap();
    check_clean(&img);
    let bytes = qemu_read_all(&img);
    let zero = |from: u64, len: u64| {
        bytes[from as usize..(from + len) as usize]
            .iter()
            .all(|&b| b == 0)
    };
    assert!(zero(4 * sub, 4 * sub));
    assert!(zero(cs, cs));
    assert!(zero(2 * cs + sub, sub));
    assert!(zero(3 * cs, cs));
    assert!(bytes[..(4 * sub) as usize].iter().all(|&b| b == 0x99));
    assert!(bytes[(2 * cs) as usize..(2 * cs + sub) as usize]
        .iter()
        .all(|&b| b == 0x99));
    assert_eq!(kind_at(&*dev, cs), (ExtentKind::Zero, None));
    assert_extents_agree(&*dev, &img, "discard over backing");
    // Nothing of the overlay holds data any more: its only host cluster was released.
    assert_eq!(check_clean(&img).allocated_clusters, 0);
}

#[test]
fn shared_and_compressed_clusters_are_copied_whole_first() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 64 * K;
    let img = dir.path().join("c.qcow2");
    qemu_create(&img, 4 * cs, &qemu_extl2_opts(cs, None));
    qemu_io(
        &img,
        &[
            format!("write -c -P 0x61 0 {cs}"),
            format!("write -P 0x62 {cs} {}", 8 * K),
            format!("write -z {} {}", cs + 8 * K, 8 * K),
        ],
    );
    // An internal snapshot shares cluster 1 (and the L2 table) with the active layer.
    run_ok(qemu_img().args(["snapshot", "-c", "snap"]).arg(&img));
    let mut model = Model::new(4 * cs);
    model.write(0, &qemu_read_all(&img));
    let dev = vdisk_open(&img, false);
    for op in [
        Op::Write {
            offset: 1000,
            data: vec![0x71; 3000],
        },
        Op::Write {
            offset: cs + 30 * K + 3,
            data: vec![0x72; 5],
        },
        Op::Zero {
            offset: 6 * K,
            len: 2 * K,
            flags: ZeroFlags::default(),
        },
    ] {
        op.apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);
    verify_image(
        &img,
        &mut model,
        "after copying shared and compressed clusters",
    );
    // The snapshot still shows the old contents.
    let snap = dir.path().join("snap.raw");
    run_ok(
        qemu_img()
            .args(["convert", "-l", "snapshot.name=snap", "-O", "raw"])
            .arg(&img)
            .arg(&snap),
    );
    let old = std::fs::read(&snap).unwrap();
    assert!(old[..cs as usize].iter().all(|&b| b == 0x61));
    assert!(old[cs as usize..(cs + 8 * K) as usize]
        .iter()
        .all(|&b| b == 0x62));
    assert!(old[(cs + 8 * K) as usize..(2 * cs) as usize]
        .iter()
        .all(|&b| b == 0));
    let dev = vdisk_open(&img, true);
    assert_extents_agree(&*dev, &img, "after copying shared and compressed clusters");
}

#[test]
fn concurrent_writers_and_readers_of_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mt.qcow2");
    let cs = 64 * K;
    let sub = 2 * K;
    vdisk_create_extl2(&img, 8 * cs, cs);
    let dev: Arc<dyn BlockDev> = vdisk_open(&img, false);
    // Four threads each write every fourth subcluster of the same clusters while reading the
    // others: a reader sees each subcluster either unwritten (zero) or complete.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                for c in 0..8 {
                    for s in (t..32).step_by(4) {
                        let off = c * cs + s * sub;
                        dev.write_at(&vec![(t + 1) as u8; sub as usize], off)
                            .unwrap();
                        let other = c * cs + ((s + 1) % 32) * sub;
                        let mut buf = vec![0u8; sub as usize];
                        dev.read_at(&mut buf, other).unwrap();
                        assert!(buf.iter().all(|&b| b == buf[0]), "torn subcluster");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    dev.flush().unwrap();
    let mut model = Model::new(8 * cs);
    for c in 0..8 {
        for s in 0..32 {
            model.write(c * cs + s * sub, &vec![(s % 4 + 1) as u8; sub as usize]);
        }
    }
    let report = verify_image(&img, &mut model, "concurrent subcluster writes");
    assert_eq!(report.allocated_clusters, 8);
}

#[test]
fn create_refuses_what_qemu_img_refuses_and_matches_its_layout() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        vdisk_formats::CreateOptions::from_pairs(vdisk_formats::Format::Qcow2, Some(M), &pairs)
    };
    for (pairs, msg) in [
        (
            &[("extended_l2", "on"), ("compat", "0.10")][..],
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ),
        (
            &[("extended_l2", "on"), ("cluster_size", "8k")][..],
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ),
        (
            &[("extended_l2", "on"), ("cluster_size", "3000")][..],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            &[("extended_l2", "maybe")][..],
            "Parameter 'extended_l2' expects 'on' or 'off'",
        ),
    ] {
        let err = opts(pairs).unwrap_err();
        assert_eq!(err.to_string(), msg, "{pairs:?}");
        let q = dir.path().join("q.qcow2");
        let qemu_opts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let out = run(qemu_img()
            .args(["create", "-q", "-f", "qcow2", "-o", &qemu_opts.join(",")])
            .arg(&q)
            .arg("1M"));
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(msg), "{pairs:?}");
    }

    // Same layout as qemu-img, extended l2 in `info`, and a clean check, for each preallocation.
    for prealloc in ["off", "metadata", "full"] {
        for cs in [16 * K, 2 * M] {
            let size = 3 * M + 512;
            let ours = dir.path().join("ours.qcow2");
            let theirs = dir.path().join("theirs.qcow2");
            let pairs = [
                ("extended_l2", "on".to_string()),
                ("cluster_size", cs.to_string()),
                ("preallocation", prealloc.to_string()),
            ];
            vdisk_create(&ours, size, &pairs);
            qemu_create(
                &theirs,
                size,
                &format!("extended_l2=on,cluster_size={cs},preallocation={prealloc}"),
            );
            check_clean(&ours);
            let info = run_ok(qemu_img().args(["info", "--output=json"]).arg(&ours));
            let info = Json::parse(&String::from_utf8_lossy(&info.stdout));
            let specific = info
                .get("format-specific")
                .and_then(|f| f.get("data"))
                .expect("format-specific data");
            assert_eq!(specific.get("extended-l2"), Some(&Json::Bool(true)));
            assert_eq!(qemu_map(&ours), qemu_map(&theirs), "{prealloc} {cs}");
            let dev = vdisk_open(&ours, true);
            assert_extents_agree(&*dev, &ours, prealloc);
            assert_eq!(dev.capabilities().zero_granularity as u64, cs / 32);
        }
    }
}

/// Overwrites the 16-byte extended L2 entry for guest cluster `index` of a fresh qemu-made image
/// (its only L2 table is at 0x40000 with 64 KiB clusters).
fn patch_entry(img: &Path, index: u64, word: u64, bitmap: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let mut b = [0u8; 16];
    put64(&mut b, 0, word);
    put64(&mut b, 8, bitmap);
    f.write_all_at(&b, 0x40000 + index * 16).unwrap();
}

#[test]
fn malformed_extended_entries_are_corruption_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    qemu_create(&img, 8 * 64 * K, "extended_l2=on");
    qemu_io(&img, &["write -P 1 0 64k".to_string()]);
    let l2 = be64(&read_head(&img, 0x30008), 0x30000) & 0x00ff_ffff_ffff_fe00;
    assert_eq!(l2, 0x40000, "the test expects qemu-img's layout");
    let copied = 1u64 << 63;
    for (word, bitmap, what) in [
        (copied | 0x50000, 0x1_0000_0001, "both allocated and zero"),
        (0, 0x3, "no host offset"),
        ((1 << 62) | 0x50000, 0x1, "subcluster bitmap"),
        (copied | 0x50001, 0, "reserved bits"),
        (copied | 0x50200, 1, "not cluster aligned"),
    ] {
        patch_entry(&img, 1, word, bitmap);
        let dev = vdisk_open(&img, true);
        let mut buf = vec![0u8; 4096];
        let err = dev.read_at(&mut buf, 64 * K).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(err.to_string().contains(what), "{what}: {err}");
        let err = dev.extent(64 * K, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        // The healthy cluster before it still reads, and a read across both fails.
        dev.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 1));
        let mut both = vec![0u8; 128 * K as usize];
        assert_eq!(
            dev.read_at(&mut both, 0).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(dev.extent(0, 128 * K).unwrap().length, 64 * K);
    }
}
