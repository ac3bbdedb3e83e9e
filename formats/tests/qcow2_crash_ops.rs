//! A process killed in the middle of random writes, write_zeroes and discards leaves at worst
//! leaked clusters (qcow2_crash.rs does the same for plain writes, many kills on one image).
//!
//! The test runs itself again as a child process that applies seeded random operations to a qcow2
//! image and logs each one it completes; the parent kills it (SIGKILL) after a random delay. The
//! image must then pass `qemu-img check` with no corruption (leaks are allowed), read back through
//! qemu-img as every completed operation left it (the interrupted one may leave anything in its
//! range), and take further writes through vdisk.
//!
//! The seed is printed; `VDISK_SEED` replays a run (the kill time varies with the machine).

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// Set in the child: the image to write.
const CHILD_IMAGE: &str = "VDISK_CRASH_IMAGE";
/// Set in the child: the seed of its operations.
const CHILD_SEED: &str = "VDISK_CRASH_SEED";

/// One crash scenario: an image shape and the seed of everything random.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    cluster: u64,
    size: u64,
    refcount_bits: u32,
}

impl Scenario {
    fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (cluster, size) = if rng.percent(50) {
            (512, 4 * M)
        } else {
            (64 * K, 64 * M)
        };
        Scenario {
            cluster,
            size,
            refcount_bits: 1 << rng.below(7),
        }
    }

    /// The operations, the same in the parent and the child.
    fn ops(&self, seed: u64) -> impl Iterator<Item = Op> {
        let (size, cluster) = (self.size, self.cluster);
        let mut rng = Rng::new(seed ^ 0x0c0f_fee0);
        std::iter::repeat_with(move || {
            let anchor = rng.below(size);
            Op::random(&mut rng, size, anchor, cluster)
        })
    }
}

/// Where the child logs the operations it completed: one line each, `1` when it took effect and
/// `0` when a fast_only write_zeroes was refused.
fn log_path(img: &Path) -> std::path::PathBuf {
    img.with_extension("log")
}

/// The child's side: runs only inside the process the crash test starts.
#[test]
fn crash_child() {
    let (Ok(img), Ok(seed)) = (std::env::var(CHILD_IMAGE), std::env::var(CHILD_SEED)) else {
        return; // not a child: nothing to do
    };
    let img = Path::new(&img);
    let seed: u64 = seed.parse().unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(log_path(img))
        .unwrap();
    let dev = vdisk_open(img, false);
    for op in Scenario::from_seed(seed).ops(seed).take(100_000) {
        let done = op.run(&*dev);
        // One write(2) per line: a kill never leaves half a line.
        log.write_all(if done { b"1\n" } else { b"0\n" }).unwrap();
    }
}

/// Runs the child on a fresh image and kills it after `delay`; returns the log.
fn crash_once(img: &Path, seed: u64, delay: Duration) -> Vec<bool> {
    std::fs::write(log_path(img), b"").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_IMAGE, img)
        .env(CHILD_SEED, seed.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::read_to_string(log_path(img))
        .unwrap()
        .lines()
        .map(|l| l == "1")
        .collect()
}

fn crash_and_check(seed: u64) {
    let sc = Scenario::from_seed(seed);
    let what = format!("seed {seed}, {sc:?}");
    println!("{what}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("crash.qcow2");
    let pairs = [
        ("cluster_size", sc.cluster.to_string()),
        ("refcount_bits", sc.refcount_bits.to_string()),
    ];
    vdisk_create(&img, sc.size, &pairs);
    let delay = Duration::from_millis(Rng::new(seed).range(30, 400));
    let log = crash_once(&img, seed, delay);

    let mut model = Model::new(sc.size);
    let mut ops = sc.ops(seed);
    for (&done, op) in log.iter().zip(&mut ops) {
        op.record(&mut model, done);
    }
    // The operation the kill interrupted (if it did not finish first).
    let interrupted = ops.next().unwrap();
    let (offset, len) = match interrupted {
        Op::Write { offset, ref data } => (offset, data.len() as u64),
        Op::Zero { offset, len, .. } | Op::Discard { offset, len } => (offset, len),
    };
    model.forget(offset, len);
    let what = format!("{what}: killed after {} operations", log.len());

    // qemu-img check ignores refcounts past the end of the file: an allocation whose refcounts
    // were written but not its data is a leak it would only see once the file grows. Padding the
    // file (a sparse tail of zeros changes nothing for qcow2) makes those leaks count now.
    let file = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len.max(2 * sc.size)).unwrap();
    drop(file);
    let report = check(&img, true);
    verify_contents(&img, &mut model, &what);

    // The image stays usable: more writes through vdisk, and still no corruption.
    let dev = vdisk_open(&img, false);
    let mut rng = Rng::new(seed ^ 1);
    for _ in 0..50 {
        let anchor = rng.below(sc.size);
        Op::random(&mut rng, sc.size, anchor, sc.cluster).apply(&*dev, &mut model);
    }
    dev.flush().unwrap();
    drop(dev);
    let after = check(&img, true);
    assert!(
        after.leaks <= report.leaks,
        "{what}: leaks grew from {} to {} after more writes",
        report.leaks,
        after.leaks
    );
    verify_contents(&img, &mut model, &what);
}

#[test]
fn killed_writer_leaves_no_corruption() {
    let seed = seed_from_env("killed_writer_leaves_no_corruption");
    for round in 0..6 {
        crash_and_check(seed.wrapping_add(round));
    }
}
