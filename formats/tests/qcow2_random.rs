//! Seeded random operations on qcow2 images, checked against an in-memory model.
//!
//! Thousands of writes, write_zeroes (every flag combination) and discards, 1 byte to three
//! clusters long and unaligned, go to the image and to the model; discarded bytes may read old or
//! zero until rewritten. Reads through vdisk along the way, a check through qemu-img and a reopen
//! in the middle, and at the end `qemu-img check`, `convert` and `compare`, and the extent map
//! against `qemu-img map`.
//!
//! The seed is printed; `VDISK_SEED=<n> cargo test -p vdisk-formats --test qcow2_random` replays a
//! run.

mod common;

use common::*;

const M: u64 = 1 << 20;

/// One randomized run.
struct Plan {
    name: &'static str,
    cluster: u64,
    size: u64,
    /// Guest ranges the operations land in (start, length).
    windows: Vec<(u64, u64)>,
    ops: usize,
    /// Preallocation modes to pick from.
    preallocs: &'static [&'static str],
}

fn run(plan: Plan) {
    let seed = seed_from_env(plan.name);
    let mut rng = Rng::new(seed);
    // compat=0.10 has no zero clusters (and only 16-bit refcounts, no lazy refcounts).
    let compat = if rng.percent(20) { "0.10" } else { "1.1" };
    let v3 = compat == "1.1";
    let refcount_bits = if v3 { 1u32 << rng.below(7) } else { 16 };
    let lazy = v3 && rng.percent(30);
    let prealloc = plan.preallocs[rng.below(plan.preallocs.len() as u64) as usize];
    let what = format!(
        "{} (seed {seed}, compat {compat}, refcount_bits {refcount_bits}, lazy_refcounts {lazy}, preallocation {prealloc})",
        plan.name
    );
    println!("{what}");

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("random.qcow2");
    let pairs = [
        ("cluster_size", plan.cluster.to_string()),
        ("compat", compat.to_string()),
        ("refcount_bits", refcount_bits.to_string()),
        (
            "lazy_refcounts",
            if lazy { "on" } else { "off" }.to_string(),
        ),
        ("preallocation", prealloc.to_string()),
    ];
    vdisk_create(&img, plan.size, &pairs);
    let mut model = Model::new(plan.size);
    let mut dev = vdisk_open(&img, false);

    for i in 0..plan.ops {
        let (start, len) = plan.windows[rng.below(plan.windows.len() as u64) as usize];
        let anchor = start + rng.below(len);
        let op = Op::random(&mut rng, plan.size, anchor, plan.cluster);
        op.apply(&*dev, &mut model);

        if i % 50 == 49 {
            // Read a few clusters around a random point through vdisk.
            let off = (start + rng.below(len)).min(plan.size - 1);
            let n = rng.range(1, 4 * plan.cluster).min(plan.size - off);
            let got = vdisk_read(&*dev, off, n as usize);
            if let Err(e) = model.check_and_settle(off, &got) {
                panic!("{what}: after op {i} ({op:?}), vdisk read at {off:#x}: {e}");
            }
        }
        if i == plan.ops / 2 {
            dev.flush().unwrap();
            drop(dev);
            verify_image(&img, &mut model, &format!("{what}, half way"));
            dev = vdisk_open(&img, false);
        }
    }
    dev.flush().unwrap();
    drop(dev);
    verify_image(&img, &mut model, &what);
    assert_extents_agree(&*vdisk_open(&img, true), &img, &what);
}

#[test]
fn random_ops_on_512_byte_clusters() {
    // 1 MiB: 32 L2 tables, so operations cross table boundaries all the time.
    run(Plan {
        name: "random_ops_on_512_byte_clusters",
        cluster: 512,
        size: M,
        windows: vec![(0, M)],
        ops: 10000,
        preallocs: &["off", "off", "metadata", "falloc", "full"],
    });
}

#[test]
fn random_ops_on_64k_clusters() {
    // Two windows: the start, and around the first L2 boundary (512 MiB), plus the image end.
    let size = 512 * M + 2 * M + 1536;
    run(Plan {
        name: "random_ops_on_64k_clusters",
        cluster: 64 << 10,
        size,
        windows: vec![(0, 3 * M), (510 * M, 4 * M), (size - M, M)],
        ops: 5000,
        // Only sparse modes for a 514 MiB image.
        preallocs: &["off", "off", "metadata"],
    });
}
