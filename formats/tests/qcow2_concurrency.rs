//! Many threads sharing one `Arc<dyn BlockDev>` over a qcow2 image.
//!
//! * Disjoint writes whose ranges share clusters and L2 tables (so threads race to allocate the
//!   same cluster and the same table) while readers check that every byte reads either zero or
//!   its final value; afterwards qemu-img sees each thread's data.
//! * Overlapping writes with per-thread patterns: every byte ends up as one of its writers' bytes
//!   (the trait promises no more than that: no atomicity of whole writes).
//! * Discard and write_zeroes (every flag) on some ranges while other threads write next to them,
//!   in the same clusters and L2 tables.
//!
//! Every run ends with `qemu-img check` clean. Seeds are printed; `VDISK_SEED` replays.

mod common;

use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use common::*;
use vdisk_formats::BlockDev;

const K: u64 = 1 << 10;

/// Writer threads.
const WRITERS: usize = 6;

/// Byte `p` as written by thread `t` in the overlap test: distinct for every thread at every
/// offset, never zero, and decodable.
fn overlap_pattern(t: usize, p: u64) -> u8 {
    ((p % 31) * 8 + t as u64 + 1) as u8
}

/// The order in which a thread visits `n` items.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

fn fresh_image(
    dir: &std::path::Path,
    cluster: u64,
    size: u64,
) -> (std::path::PathBuf, Arc<dyn BlockDev>) {
    let img = dir.join("shared.qcow2");
    vdisk_create(&img, size, &[("cluster_size", cluster.to_string())]);
    let dev = vdisk_open(&img, false);
    (img, dev)
}

/// Disjoint stripes of `stripe` bytes over the whole image, dealt round-robin to the writers; two
/// readers run alongside.
fn disjoint_writes(name: &str, cluster: u64, stripe: u64, size: u64) {
    let seed = seed_from_env(name);
    let dir = tempfile::tempdir().unwrap();
    let (img, dev) = fresh_image(dir.path(), cluster, size);
    let expected = Arc::new(Rng::new(seed).bytes(size as usize));
    let stripes = size.div_ceil(stripe) as usize;
    let start = Arc::new(Barrier::new(WRITERS + 2));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let (dev, expected, start, done) =
            (dev.clone(), expected.clone(), start.clone(), done.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (t as u64 + 1) << 40);
            let mine: Vec<usize> = (t..stripes).step_by(WRITERS).collect();
            start.wait();
            for i in shuffled(&mut rng, mine.len()) {
                let off = mine[i] as u64 * stripe;
                let end = (off + stripe).min(size);
                dev.write_at(&expected[off as usize..end as usize], off)
                    .unwrap_or_else(|e| panic!("writer {t}: {e}"));
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    for r in 0..2u64 {
        let (dev, expected, start, done) =
            (dev.clone(), expected.clone(), start.clone(), done.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (r + 100) << 40);
            start.wait();
            while done.load(std::sync::atomic::Ordering::SeqCst) < WRITERS {
                let off = rng.below(size);
                let len = rng.range(1, 4 * cluster).min(size - off);
                let got = vdisk_read(&*dev, off, len as usize);
                let want = &expected[off as usize..(off + len) as usize];
                if let Some(i) = (0..got.len()).find(|&i| got[i] != 0 && got[i] != want[i]) {
                    panic!(
                        "reader {r}: guest byte {:#x} reads {:#04x}: neither zero nor the data being written ({:#04x})",
                        off + i as u64,
                        got[i],
                        want[i]
                    );
                }
            }
        }));
    }
    for h in handles {
        h.join().expect("a thread panicked");
    }
    dev.flush().unwrap();
    drop(dev);
    let mut model = Model::new(size);
    model.write(0, &expected);
    verify_image(&img, &mut model, &format!("{name} (seed {seed})"));
}

#[test]
fn disjoint_writes_racing_for_512_byte_clusters_and_l2_tables() {
    // 300-byte stripes: most clusters hold bytes of two or three threads; one L2 table maps
    // 32 KiB, so the threads also race to allocate 16 L2 tables.
    disjoint_writes(
        "disjoint_writes_racing_for_512_byte_clusters_and_l2_tables",
        512,
        300,
        512 * K,
    );
}

#[test]
fn disjoint_writes_racing_for_64k_clusters() {
    disjoint_writes(
        "disjoint_writes_racing_for_64k_clusters",
        64 * K,
        20000,
        8 << 20,
    );
}

#[test]
fn overlapping_writes_leave_one_writers_bytes() {
    let seed = seed_from_env("overlapping_writes_leave_one_writers_bytes");
    let size = 256 * K;
    let cluster = 512;
    let dir = tempfile::tempdir().unwrap();
    let (img, dev) = fresh_image(dir.path(), cluster, size);
    // Ranges of 1 byte to 3 clusters that overlap each other, written by every thread in its own
    // order: most of them land on unallocated clusters that several threads allocate at once.
    let mut rng = Rng::new(seed);
    let ranges: Arc<Vec<(u64, u64)>> = Arc::new(
        (0..300)
            .map(|_| {
                let off = rng.below(size - 1);
                (off, rng.range(1, 3 * cluster).min(size - off))
            })
            .collect(),
    );
    let start = Arc::new(Barrier::new(WRITERS));
    let handles: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (dev, ranges, start) = (dev.clone(), ranges.clone(), start.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (t as u64 + 1) << 40);
                start.wait();
                for i in shuffled(&mut rng, ranges.len()) {
                    let (off, len) = ranges[i];
                    let data: Vec<u8> = (off..off + len).map(|p| overlap_pattern(t, p)).collect();
                    dev.write_at(&data, off)
                        .unwrap_or_else(|e| panic!("writer {t}: {e}"));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a writer panicked");
    }
    dev.flush().unwrap();
    drop(dev);

    check_clean(&img);
    let bytes = qemu_read_all(&img);
    let mut covered = vec![false; size as usize];
    for &(off, len) in ranges.iter() {
        covered[off as usize..(off + len) as usize].fill(true);
    }
    for (p, (&b, &c)) in bytes.iter().zip(&covered).enumerate() {
        let p = p as u64;
        let writer = (b as usize).wrapping_sub(1) % 8;
        let ok = if c {
            b != 0 && writer < WRITERS && overlap_pattern(writer, p) == b
        } else {
            b == 0
        };
        assert!(
            ok,
            "seed {seed}: guest byte {p:#x} reads {b:#04x}, {}",
            if c {
                "which no writer wrote there"
            } else {
                "but nothing was written there"
            }
        );
    }
}

/// Groups of `group` bytes: the first `owned` belong to the writers, in `stripe`-byte stripes
/// dealt round-robin and each rewritten three times; the rest of each group to one of two zapper
/// threads, which write, zero and discard there at random. `model` holds the image's contents
/// before; afterwards qemu-img checks the image and reads it.
#[allow(clippy::too_many_arguments)]
fn race_writers_and_zappers(
    img: &std::path::Path,
    dev: Arc<dyn BlockDev>,
    model: Model,
    group: u64,
    owned: u64,
    stripe: u64,
    seed: u64,
    what: &str,
) {
    let groups = model.size / group;
    let model = Arc::new(Mutex::new(model));
    let zappers = 2usize;
    let start = Arc::new(Barrier::new(WRITERS + zappers));
    let mut handles = Vec::new();

    let stripes_per_group = owned / stripe;
    for t in 0..WRITERS {
        let (dev, model, start) = (dev.clone(), model.clone(), start.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (t as u64 + 1) << 40);
            let all = (groups * stripes_per_group) as usize;
            let mine: Vec<usize> = (t..all).step_by(WRITERS).collect();
            start.wait();
            for _pass in 0..3 {
                for i in shuffled(&mut rng, mine.len()) {
                    let s = mine[i] as u64;
                    let off = (s / stripes_per_group) * group + (s % stripes_per_group) * stripe;
                    let op = Op::Write {
                        offset: off,
                        data: rng.bytes(stripe as usize),
                    };
                    let done = op.run(&*dev);
                    op.record(&mut model.lock().unwrap(), done);
                }
            }
        }));
    }
    for z in 0..zappers {
        let (dev, model, start) = (dev.clone(), model.clone(), start.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (z as u64 + 50) << 40);
            start.wait();
            for _ in 0..600 {
                let g = rng.below(groups / zappers as u64) * zappers as u64 + z as u64;
                let lo = g * group + owned;
                let hi = (g + 1) * group;
                let off = rng.range(lo, hi - 1);
                let len = rng.range(1, hi - off);
                let op = Op::random_kind(&mut rng, off, len);
                let done = op.run(&*dev);
                op.record(&mut model.lock().unwrap(), done);
            }
        }));
    }
    for h in handles {
        h.join().expect("a thread panicked");
    }
    dev.flush().unwrap();
    let what = format!("{what} (seed {seed})");
    let mut model = model.lock().unwrap();
    verify_image(img, &mut model, &what);
    assert_extents_agree(&*dev, img, &what);
}

#[test]
fn discard_and_write_zeroes_race_with_writes_in_the_same_clusters() {
    let seed = seed_from_env("discard_and_write_zeroes_race_with_writes_in_the_same_clusters");
    // Groups of 8 clusters: the first 700 bytes (cluster 0 and part of 1) belong to the writers,
    // in 100-byte stripes; the other 3396 bytes (the rest of cluster 1, clusters 2-7) to the
    // zappers. 4 groups share an L2 table.
    let cluster = 512;
    let size = 64 * 8 * cluster;
    let dir = tempfile::tempdir().unwrap();
    let (img, dev) = fresh_image(dir.path(), cluster, size);
    let model = Model::new(size);
    race_writers_and_zappers(&img, dev, model, 8 * cluster, 700, 100, seed, "fresh image");
}

#[test]
fn races_over_compressed_and_zero_clusters_written_by_qemu() {
    let seed = seed_from_env("races_over_compressed_and_zero_clusters_written_by_qemu");
    // 4 KiB clusters; qemu-io leaves compressed clusters (several packed in one host cluster),
    // zero clusters, plain data and unallocated space. Groups of 4 clusters: 6000 bytes for the
    // writers (copy-on-write out of compressed clusters), the rest (clusters 2-3 whole) for the
    // zappers, whose discards and zeroes release compressed clusters others still share.
    let cluster = 4 * K;
    let size = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qemu.qcow2");
    qemu_create(&img, size, "cluster_size=4k");
    qemu_io(
        &img,
        &[
            "write -c -P 0x11 0 1M".to_string(),
            "write -c -P 0x22 1M 512k".to_string(),
            "write -z 1536k 512k".to_string(),
            "write -P 0x33 2M 1M".to_string(),
        ],
    );
    let mut model = Model::new(size);
    model.write(0, &qemu_read_all(&img));
    let dev = vdisk_open(&img, false);
    race_writers_and_zappers(
        &img,
        dev,
        model,
        4 * cluster,
        6000,
        1000,
        seed,
        "qemu image",
    );
}
