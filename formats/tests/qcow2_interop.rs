//! qcow2 interoperability with qemu-utils 10, over a matrix of cluster sizes, refcount widths,
//! compat levels, lazy refcounts and preallocation modes:
//!
//! * images vdisk creates and writes pass `qemu-img check`, read back through `qemu-img convert`
//!   and `qemu-img compare` exactly as an in-memory model says, and their `extent()` runs agree
//!   with `qemu-img map`;
//! * images qemu-img creates and qemu-io writes read back identically through vdisk, with the
//!   same extents;
//! * discard and write-zeroes release and keep clusters the way `qemu-img map` shows;
//! * the refcount table can move several times, keeping the image clean, the data intact and
//!   unknown header extensions in place.

mod common;

use std::path::Path;

use common::*;
use vdisk_formats::qcow2::header::Header;
use vdisk_formats::{ExtentKind, ZeroFlags};

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// One point of the option matrix.
#[derive(Debug, Clone, Copy)]
struct Config {
    cluster: u64,
    refcount_bits: u32,
    compat: &'static str,
    lazy: bool,
    prealloc: &'static str,
}

impl Config {
    fn new(cluster: u64, refcount_bits: u32) -> Self {
        Config {
            cluster,
            refcount_bits,
            compat: "1.1",
            lazy: false,
            prealloc: "off",
        }
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("cluster_size", self.cluster.to_string()),
            ("refcount_bits", self.refcount_bits.to_string()),
            ("compat", self.compat.to_string()),
            (
                "lazy_refcounts",
                if self.lazy { "on" } else { "off" }.to_string(),
            ),
            ("preallocation", self.prealloc.to_string()),
        ]
    }

    /// The same options as a qemu-img `-o` string.
    fn qemu_opts(&self) -> String {
        self.pairs()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Guest bytes mapped by one L2 table.
    fn l2_span(&self) -> u64 {
        self.cluster * (self.cluster / 8)
    }

    /// Virtual size, ending in a partial cluster: past the second L2 boundary when `sparse` (the
    /// image is then only read sparsely); otherwise a few MiB, past the L2 boundaries only where
    /// that stays small (preallocation, and qemu-written images that are read whole).
    fn size(&self, sparse: bool) -> u64 {
        let tail = (self.cluster / 2).max(512);
        let wide = 2 * self.l2_span() + 2 * self.cluster + tail;
        if sparse {
            wide
        } else if wide <= 16 * M {
            wide.max(4 * M + tail)
        } else {
            (8 * self.cluster).max(4 * M) + tail
        }
    }

    /// Where operations cluster: the start, a cluster boundary, the L2 boundaries, the end.
    fn anchors(&self, size: u64) -> Vec<u64> {
        let mut a = vec![
            0,
            2 * self.cluster + 7,
            self.l2_span(),
            2 * self.l2_span(),
            size,
        ];
        a.retain(|&x| x <= size);
        a.dedup();
        a
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}]", self.qemu_opts())
    }
}

/// (a), (b) and extents: vdisk creates the image and applies random operations near the
/// interesting offsets; qemu-img checks it, reads it and maps it.
fn vdisk_written(cfg: Config, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vdisk.qcow2");
    let size = cfg.size(cfg.prealloc == "off");
    vdisk_create(&img, size, &cfg.pairs());
    check_clean(&img);

    let mut rng = Rng::new(seed);
    let anchors = cfg.anchors(size);
    let mut model = Model::new(size);
    let dev = vdisk_open(&img, false);
    for _ in 0..24 {
        let anchor = anchors[rng.below(anchors.len() as u64) as usize];
        Op::random(&mut rng, size, anchor, cfg.cluster).apply(&*dev, &mut model);
    }
    // A write across every L2 boundary the image has, so the check sees several tables.
    for &a in &anchors[1..] {
        let off = a.saturating_sub(700).min(size - 1400);
        Op::Write {
            offset: off,
            data: rng.bytes(1400),
        }
        .apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);

    let what = format!("{cfg} seed {seed}");
    verify_image(&img, &mut model, &what);
    let dev = vdisk_open(&img, true);
    assert_extents_agree(&*dev, &img, &what);
}

/// (c) and extents: qemu-img creates the image and qemu-io writes it (patterns, zeroes with and
/// without unmap, discard, all unaligned, and compressed clusters); vdisk must read what
/// qemu-img reads. Then vdisk writes over all of that, and qemu-img checks and reads the result.
fn qemu_written(cfg: Config) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qemu.qcow2");
    let size = cfg.size(false);
    qemu_create(&img, size, &cfg.qemu_opts());

    let span = cfg.l2_span();
    let mut model = Model::new(size);
    let mut cmds = Vec::new();
    let write = |cmds: &mut Vec<String>, model: &mut Model, pat: u8, off: u64, len: u64| {
        cmds.push(format!("write -P {pat:#x} {off} {len}"));
        model.write(off, &vec![pat; len as usize]);
    };
    write(&mut cmds, &mut model, 0xab, 0, M.min(size));
    write(&mut cmds, &mut model, 0x5c, 12345, 70000);
    let (z, zl) = (3000, 2 * cfg.cluster + 5000);
    cmds.push(format!("write -z {z} {zl}"));
    model.zero(z, zl);
    let (u, ul) = (50001 + 2 * cfg.cluster, 3 * cfg.cluster + 1);
    cmds.push(format!("write -z -u {u} {ul}"));
    model.zero(u, ul);
    let (d, dl) = (100003 + 4 * cfg.cluster, 2 * cfg.cluster + 50000);
    cmds.push(format!("discard {d} {dl}"));
    model.discard(d, dl);
    if span + 2000 < size {
        write(&mut cmds, &mut model, 0x77, span - 1000, 3000);
    }
    // Two compressed clusters near the end (QEMU compresses only into unallocated clusters).
    let c = (size / cfg.cluster - 3) * cfg.cluster;
    if cfg.prealloc == "off" {
        cmds.push(format!("write -c -P 0xcd {c} {}", 2 * cfg.cluster));
        model.write(c, &vec![0xcd; 2 * cfg.cluster as usize]);
    }
    write(&mut cmds, &mut model, 0x42, size - 700, 700);
    qemu_io(&img, &cmds);
    check_clean(&img);

    let what = cfg.to_string();
    let expected = qemu_read_all(&img);
    if let Err(e) = model.check_and_settle(0, &expected) {
        panic!("{what}: qemu-io did not write what the test expects: {e}");
    }
    let dev = vdisk_open(&img, true);
    let step = M as usize;
    for (i, want) in expected.chunks(step).enumerate() {
        let off = (i * step) as u64;
        let got = vdisk_read(&*dev, off, want.len());
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{what}: vdisk reads {:#04x} at guest byte {:#x}, qemu-img {:#04x}",
                got[at],
                off + at as u64,
                want[at]
            );
        }
    }
    assert_extents_agree(&*dev, &img, &what);
    if cfg.prealloc == "off" {
        assert!(
            vdisk_map(&*dev).iter().any(|r| r.compressed),
            "{what}: no compressed run"
        );
    }
    drop(dev);

    // Then vdisk writes over what qemu-io left: data, zero, discarded and compressed clusters.
    let what = format!("{what}, rewritten by vdisk");
    let dev = vdisk_open(&img, false);
    let mut rng = Rng::new(cfg.cluster ^ u64::from(cfg.refcount_bits) << 32);
    let anchors = [0, z, u, d, c, c + cfg.cluster, size];
    for _ in 0..16 {
        let anchor = anchors[rng.below(anchors.len() as u64) as usize];
        Op::random(&mut rng, size, anchor, cfg.cluster).apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);
    verify_image(&img, &mut model, &what);
    assert_extents_agree(&*vdisk_open(&img, true), &img, &what);
}

/// The refcount widths, compat=1.1, no preallocation.
fn widths(cluster: u64) -> Vec<Config> {
    [1, 2, 4, 8, 16, 32, 64]
        .iter()
        .map(|&bits| Config::new(cluster, bits))
        .collect()
}

/// compat=0.10, lazy refcounts and the preallocation modes.
fn options(cluster: u64) -> Vec<Config> {
    let mut out = vec![
        Config {
            compat: "0.10",
            ..Config::new(cluster, 16)
        },
        Config {
            lazy: true,
            ..Config::new(cluster, 16)
        },
    ];
    for prealloc in ["metadata", "falloc", "full"] {
        out.push(Config {
            prealloc,
            ..Config::new(cluster, 16)
        });
    }
    out.push(Config {
        prealloc: "metadata",
        ..Config::new(cluster, 1)
    });
    out.push(Config {
        compat: "0.10",
        prealloc: "metadata",
        ..Config::new(cluster, 16)
    });
    out
}

fn run_matrix(configs: Vec<Config>) {
    for (i, cfg) in configs.into_iter().enumerate() {
        vdisk_written(
            cfg,
            cfg.cluster ^ u64::from(cfg.refcount_bits) << 16 ^ (i as u64) << 32,
        );
        qemu_written(cfg);
    }
}

#[test]
fn matrix_512_byte_clusters_refcount_widths() {
    run_matrix(widths(512));
}

#[test]
fn matrix_512_byte_clusters_compat_lazy_prealloc() {
    run_matrix(options(512));
}

#[test]
fn matrix_4k_clusters_refcount_widths() {
    run_matrix(widths(4 * K));
}

#[test]
fn matrix_4k_clusters_compat_lazy_prealloc() {
    run_matrix(options(4 * K));
}

#[test]
fn matrix_64k_clusters_refcount_widths() {
    run_matrix(widths(64 * K));
}

#[test]
fn matrix_64k_clusters_compat_lazy_prealloc() {
    run_matrix(options(64 * K));
}

#[test]
fn matrix_2m_clusters_refcount_widths() {
    run_matrix(widths(2 * M));
}

#[test]
fn matrix_2m_clusters_compat_lazy_prealloc() {
    run_matrix(options(2 * M));
}

/// The kind and host offset of the cluster at `guest`, from `qemu-img map`.
fn qemu_kind_at(img: &Path, guest: u64) -> (ExtentKind, Option<u64>) {
    let run = qemu_map(img)
        .into_iter()
        .find(|r| r.start <= guest && guest < r.start + r.len)
        .expect("qemu-img map covers the whole image");
    (run.kind, run.host.map(|h| h + (guest - run.start)))
}

#[test]
fn discard_and_write_zeroes_release_clusters_as_qemu_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.qcow2");
    let cs = 64 * K;
    vdisk_create(&img, 4 * M, &[]);
    let dev = vdisk_open(&img, false);
    dev.write_at(&vec![0x5a; 16 * cs as usize], 0).unwrap();
    dev.flush().unwrap();
    let full = check_clean(&img).allocated_clusters;
    let host_of = |c: u64| qemu_kind_at(&img, c * cs).1.unwrap();
    let kept = host_of(4);

    // Discard of clusters 1-2 (and part of 0 and 3, which stay allocated).
    dev.discard(cs / 2, 3 * cs).unwrap();
    // Zeroes with unmap release clusters 6-7; without unmap cluster 4 keeps its host cluster.
    let unmap = ZeroFlags {
        may_unmap: true,
        fast_only: false,
    };
    dev.write_zeroes(6 * cs, 2 * cs, unmap).unwrap();
    dev.write_zeroes(4 * cs, cs, ZeroFlags::default()).unwrap();
    // fast_only on a partial cluster must refuse rather than write data.
    let err = dev
        .write_zeroes(
            9 * cs + 1,
            10,
            ZeroFlags {
                may_unmap: false,
                fast_only: true,
            },
        )
        .unwrap_err();
    assert_eq!(err.kind(), vdisk_formats::ErrorKind::Unsupported, "{err}");
    dev.flush().unwrap();

    let after = check_clean(&img).allocated_clusters;
    assert_eq!(after, full - 4, "clusters 1, 2, 6 and 7 are released");
    assert_eq!(qemu_kind_at(&img, 0).0, ExtentKind::Data);
    // Discarded clusters read as zero clusters, as after qemu-io's discard (version 3).
    assert_eq!(qemu_kind_at(&img, cs), (ExtentKind::Zero, None));
    assert_eq!(qemu_kind_at(&img, 2 * cs), (ExtentKind::Zero, None));
    assert_eq!(qemu_kind_at(&img, 3 * cs).0, ExtentKind::Data);
    assert_eq!(qemu_kind_at(&img, 4 * cs), (ExtentKind::Zero, Some(kept)));
    assert_eq!(qemu_kind_at(&img, 6 * cs), (ExtentKind::Zero, None));
    assert_eq!(qemu_kind_at(&img, 9 * cs).0, ExtentKind::Data);
    let bytes = qemu_read_all(&img);
    let cluster = |c: u64| &bytes[(c * cs) as usize..((c + 1) * cs) as usize];
    for c in [1, 2, 4, 6, 7] {
        assert!(cluster(c).iter().all(|&b| b == 0), "cluster {c} reads zero");
    }
    for c in [5, 8, 9, 10, 15] {
        assert!(
            cluster(c).iter().all(|&b| b == 0x5a),
            "cluster {c} is intact"
        );
    }
    // The partial clusters of the discard either keep their data or read zero.
    assert!(cluster(0)[..(cs / 2) as usize].iter().all(|&b| b == 0x5a));
    assert!(cluster(3)[(cs / 2) as usize..].iter().all(|&b| b == 0x5a));
    assert_extents_agree(&*dev, &img, "after discard and write_zeroes");

    // A write into the preallocated zero cluster reads back with zeros around it.
    dev.write_at(b"abc", 4 * cs + 100).unwrap();
    dev.flush().unwrap();
    check_clean(&img);
    let bytes = qemu_read_all(&img);
    let c4 = &bytes[4 * cs as usize..5 * cs as usize];
    assert_eq!(&c4[100..103], b"abc");
    assert!(c4[..100].iter().chain(&c4[103..]).all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// Refcount table growth

/// Kind of the unknown header extension the growth tests add.
const TEST_EXT: u32 = 0x7e57_0001;
const TEST_EXT_DATA: &[u8] = b"kept across table moves";

/// Rewrites the header extensions of a version 3 image: the feature table, if there is one, cut
/// to its first six entries (a 512-byte cluster has no room for more), then an unknown
/// extension, then the end. Returns the feature table entries kept.
fn add_unknown_extension(img: &Path) -> usize {
    let mut bytes = std::fs::read(img).unwrap();
    let header_len = be32(&bytes, 100) as usize;
    let mut ext = Vec::new();
    let mut kept = 0;
    if be32(&bytes, header_len) == 0x6803_f857 {
        let table_len = be32(&bytes, header_len + 4) as usize;
        kept = (6 * 48).min(table_len);
        ext.extend_from_slice(&0x6803_f857u32.to_be_bytes());
        ext.extend_from_slice(&(kept as u32).to_be_bytes());
        ext.extend_from_slice(&bytes[header_len + 8..header_len + 8 + kept]);
    } else {
        assert_eq!(be32(&bytes, header_len), 0, "no other extension");
    }
    ext.extend_from_slice(&TEST_EXT.to_be_bytes());
    ext.extend_from_slice(&(TEST_EXT_DATA.len() as u32).to_be_bytes());
    ext.extend_from_slice(TEST_EXT_DATA);
    ext.resize(ext.len().next_multiple_of(8) + 8, 0);
    let cluster = 1usize << be32(&bytes, 20);
    assert!(header_len + ext.len() <= cluster);
    bytes[header_len..cluster].fill(0);
    bytes[header_len..header_len + ext.len()].copy_from_slice(&ext);
    std::fs::write(img, bytes).unwrap();
    kept / 48
}

/// The header as it is on disk now.
fn disk_header(img: &Path) -> Header {
    let len = std::fs::metadata(img).unwrap().len();
    let head = read_head(img, 2 * M as usize);
    Header::parse(img, &head, len).unwrap_or_else(|e| panic!("header no longer parses: {e}"))
}

fn assert_extension_kept(img: &Path, features: usize) {
    let h = disk_header(img);
    assert_eq!(
        h.extension(TEST_EXT),
        Some(TEST_EXT_DATA),
        "unknown extension lost: {:?}",
        h.extensions
    );
    assert_eq!(h.feature_names().len(), features, "feature table changed");
}

/// A 512-byte-cluster image with 64-bit refcounts, made by vdisk or by qemu-img, with an unknown
/// header extension: one refcount block covers 64 clusters and one table cluster 64 blocks, so a
/// few MiB of data move the table again and again. Returns the feature table entries.
fn growth_image(img: &Path, by_qemu: bool) -> usize {
    if by_qemu {
        qemu_create(img, 64 * M, "cluster_size=512,refcount_bits=64");
    } else {
        let pairs = [
            ("cluster_size", "512".to_string()),
            ("refcount_bits", "64".to_string()),
        ];
        vdisk_create(img, 64 * M, &pairs);
    }
    let features = add_unknown_extension(img);
    check_clean(img);
    assert_extension_kept(img, features);
    features
}

/// 7.5 MiB in 64 KiB writes, every other one unaligned; the header is read after each. The table
/// (64 entries per cluster, each block covering 32 KiB) moves at 2, 4 and 6 MiB.
fn grow_with_small_writes(by_qemu: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.qcow2");
    let features = growth_image(&img, by_qemu);
    let what = format!(
        "small writes, image made by {}",
        if by_qemu { "qemu-img" } else { "vdisk" }
    );
    let mut rng = Rng::new(7);
    let mut model = Model::new(64 * M);
    let dev = vdisk_open(&img, false);
    let mut offsets = vec![disk_header(&img).refcount_table_offset];
    for i in 0..120u64 {
        let off = i * 64 * K + (i % 2) * 333;
        let op = Op::Write {
            offset: off,
            data: rng.bytes((64 * K) as usize),
        };
        op.apply(&*dev, &mut model);
        let now = disk_header(&img).refcount_table_offset;
        if offsets.last() != Some(&now) {
            offsets.push(now);
        }
    }
    dev.flush().unwrap();
    drop(dev);
    assert!(
        offsets.len() >= 4,
        "{what}: the refcount table moved only {} times: {offsets:x?}",
        offsets.len() - 1
    );
    verify_image(&img, &mut model, &what);
    assert_extension_kept(&img, features);
    let dev = vdisk_open(&img, true);
    assert_extents_agree(&*dev, &img, &what);
}

#[test]
fn refcount_table_moves_many_times_with_small_writes() {
    grow_with_small_writes(false);
}

#[test]
fn refcount_table_of_a_qemu_image_moves_many_times_with_small_writes() {
    grow_with_small_writes(true);
}

#[test]
fn refcount_table_moves_many_times_within_one_large_write() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.qcow2");
    let features = growth_image(&img, false);
    let before = disk_header(&img).refcount_table_clusters;
    let mut rng = Rng::new(8);
    let mut model = Model::new(64 * M);
    let dev = vdisk_open(&img, false);
    // One 7 MiB write_at (14336 clusters, allocated one L2 table at a time) moves the table
    // three times: 64 entries per table cluster, 64 clusters per refcount block.
    Op::Write {
        offset: 1000,
        data: rng.bytes((7 * M) as usize),
    }
    .apply(&*dev, &mut model);
    dev.flush().unwrap();
    drop(dev);
    let after = disk_header(&img).refcount_table_clusters;
    assert!(
        after >= 3 * before,
        "table grew from {before} to {after} clusters"
    );
    verify_image(&img, &mut model, "one large write");
    assert_extension_kept(&img, features);
}

#[test]
fn opening_for_writing_clears_autoclear_bits_and_keeps_unknown_extensions() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("autoclear.qcow2");
    qemu_create(&img, 4 * M, "");
    let features = add_unknown_extension(&img);
    let mut bytes = std::fs::read(&img).unwrap();
    put64(&mut bytes, 88, 1 << 5);
    std::fs::write(&img, &bytes).unwrap();
    check_clean(&img);

    let dev = vdisk_open(&img, true);
    drop(dev);
    assert_eq!(
        disk_header(&img).autoclear_features,
        1 << 5,
        "read-only open changed the header"
    );
    let dev = vdisk_open(&img, false);
    dev.write_at(b"after the rewrite", 12345).unwrap();
    dev.flush().unwrap();
    drop(dev);
    assert_eq!(
        disk_header(&img).autoclear_features,
        0,
        "unknown autoclear bit kept"
    );
    assert_extension_kept(&img, features);
    check_clean(&img);
    assert_eq!(&qemu_read_all(&img)[12345..12362], b"after the rewrite");
}
