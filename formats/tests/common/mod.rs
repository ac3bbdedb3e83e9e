//! Helpers shared by the block-layer integration tests.
//!
//! qemu-utils is the oracle: images are checked with `qemu-img check`, read with `qemu-img convert
//! -O raw` and `qemu-img compare`, mapped with `qemu-img map`, and written with `qemu-io`. What the
//! guest should see is kept in a sparse in-memory [`Model`] that knows discard's "old value or
//! zero" rule.
//!
//! ```text
//!   ops ──> Arc<dyn BlockDev> ──> image ──qemu-img convert──> raw ──┐
//!     └───> Model ──────────────────────────────────────────────────┴─> verify_file, settle
//!                └──write_raw──> model.raw ──qemu-img compare──> image
//! ```

// Each test binary uses a different subset of these helpers.
#![allow(dead_code, unused_imports)]

mod json;
mod model;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

pub use json::Json;
pub use model::{seed_from_env, Model, Op, Rng};
use vdisk_formats::{BlockDev, CreateOptions, ExtentKind, Format, OpenOptions};

// ---------------------------------------------------------------------------------------------
// Running the oracle

/// Runs a command and returns its output; panics when it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `args[0]` with the other arguments (a qemu-img or qemu-io command line); it must
/// succeed. Returns its stdout.
pub fn tool(args: &[&str]) -> Vec<u8> {
    run_ok(Command::new(args[0]).args(&args[1..])).stdout
}

pub fn qemu_img() -> Command {
    let mut cmd = Command::new("qemu-img");
    // vdisk takes no file locks, but a test may still hold an image open for writing.
    cmd.env("LC_ALL", "C");
    cmd
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`.
pub fn qemu_create(path: &Path, size: u64, opts: &str) {
    let mut cmd = qemu_img();
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run_ok(cmd.arg(path).arg(size.to_string()));
}

/// Runs `qemu-io` commands (each one `-c` argument) on a qcow2 image.
pub fn qemu_io(path: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    // Cache mode unsafe: no flush on exit (the tests do not crash the host).
    cmd.args(["-f", "qcow2", "-t", "unsafe"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    // qemu-io reports failed commands on stdout and still exits 0.
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {}:\n{text}",
        path.display()
    );
}

/// What `qemu-img check --output=json` reported for a clean image.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub allocated_clusters: u64,
    pub image_end_offset: u64,
    pub leaks: u64,
}

/// Requires `qemu-img check` to exit 0 and its JSON report to show no leaks, corruptions or check
/// errors.
pub fn check_clean(path: &Path) -> CheckReport {
    check(path, false)
}

/// Runs `qemu-img check`: no corruptions or check errors, and no leaks unless `leaks_ok` (exit
/// code 3, what an interrupted allocation may leave).
pub fn check(path: &Path, leaks_ok: bool) -> CheckReport {
    let out = run(qemu_img().args(["check", "--output=json"]).arg(path));
    let text = String::from_utf8_lossy(&out.stdout);
    let leaked = leaks_ok && out.status.code() == Some(3);
    assert!(
        out.status.success() || leaked,
        "qemu-img check {} exited with {} (2 = corruptions, 3 = leaks):\n{text}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
    );
    let report = Json::parse(&text);
    let mut keys = vec!["corruptions", "check-errors", "corruptions-fixed"];
    if !leaks_ok {
        keys.extend(["leaks", "leaks-fixed"]);
    }
    for key in keys {
        let n = report.get(key).map_or(0, Json::as_u64);
        assert_eq!(
            n,
            0,
            "qemu-img check {}: {key} = {n}\n{text}",
            path.display()
        );
    }
    CheckReport {
        allocated_clusters: report.get("allocated-clusters").map_or(0, Json::as_u64),
        image_end_offset: report.get("image-end-offset").map_or(0, Json::as_u64),
        leaks: report.get("leaks").map_or(0, Json::as_u64),
    }
}

/// `qemu-img convert -O raw` of an image (qcow2, or raw; the format is probed).
pub fn convert_to_raw(img: &Path, raw: &Path) {
    run_ok(
        qemu_img()
            // No flush of the output: it is read at once and thrown away.
            .args(["convert", "-t", "unsafe", "-O", "raw"])
            .arg(img)
            .arg(raw),
    );
}

/// The guest contents of a (small) image, read by qemu-img.
pub fn qemu_read_all(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("qemu-read.raw");
    convert_to_raw(img, &raw);
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// Requires `qemu-img compare` to find a raw file and a qcow2 image identical.
pub fn compare_identical(raw: &Path, img: &Path) {
    let out = run(qemu_img()
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(img));
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}\n{}{}",
        raw.display(),
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// vdisk

/// Create options for a qcow2 image, from qemu-img style `-o` pairs.
pub fn qcow2_options(size: u64, pairs: &[(&str, String)]) -> CreateOptions {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    CreateOptions::from_pairs(Format::Qcow2, Some(size), &pairs)
        .unwrap_or_else(|e| panic!("create options {pairs:?}: {e}"))
}

/// Creates a qcow2 image with vdisk.
pub fn vdisk_create(path: &Path, size: u64, pairs: &[(&str, String)]) {
    vdisk_formats::create(path, &qcow2_options(size, pairs))
        .unwrap_or_else(|e| panic!("vdisk create {} {pairs:?}: {e}", path.display()));
}

/// Opens a qcow2 image with vdisk.
pub fn vdisk_open(path: &Path, read_only: bool) -> Arc<dyn BlockDev> {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        ..Default::default()
    };
    vdisk_formats::open(path, opts).unwrap_or_else(|e| panic!("vdisk open: {e}"))
}

/// Reads `len` bytes at `offset` through vdisk.
pub fn vdisk_read(dev: &dyn BlockDev, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("vdisk read {offset:#x}+{len:#x}: {e}"));
    buf
}

/// Full verification of a qcow2 image against the model through qemu-img: `check` is clean and
/// the contents match (see [`verify_contents`]).
pub fn verify_image(img: &Path, model: &mut Model, what: &str) -> CheckReport {
    let report = check_clean(img);
    verify_contents(img, model, what);
    report
}

/// `convert -O raw` shows the model (discarded bytes old or zero), and `compare` finds the image
/// identical to the settled model written as a raw file. `what` labels failures.
pub fn verify_contents(img: &Path, model: &mut Model, what: &str) {
    let raw = img.with_extension("converted.raw");
    convert_to_raw(img, &raw);
    if let Err(e) = model.verify_file(&raw) {
        panic!("{what}: qemu-img convert of {} differs: {e}", img.display());
    }
    std::fs::remove_file(&raw).unwrap();
    let expected = img.with_extension("model.raw");
    model.write_raw(&expected);
    compare_identical(&expected, img);
    std::fs::remove_file(&expected).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Extent maps

/// One run of an allocation map, normalised so that vdisk's and qemu-img's maps compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u64,
    pub kind: ExtentKind,
    /// Host offset of the first byte, where the layer has one.
    pub host: Option<u64>,
    pub compressed: bool,
}

/// Appends a run, merging it with the previous one when they continue each other.
fn push_run(runs: &mut Vec<Run>, r: Run) {
    if let Some(last) = runs.last_mut() {
        let host_continues = match (last.host, r.host) {
            (None, None) => true,
            (Some(a), Some(b)) => b == a + last.len,
            _ => false,
        };
        let same = last.kind == r.kind && last.compressed == r.compressed;
        if same && last.start + last.len == r.start && host_continues {
            last.len += r.len;
            return;
        }
    }
    runs.push(r);
}

/// The allocation map of a device, from `BlockDev::extent`.
pub fn vdisk_map(dev: &dyn BlockDev) -> Vec<Run> {
    let size = dev.size();
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let e = dev
            .extent(off, size - off)
            .unwrap_or_else(|err| panic!("extent({off:#x}): {err}"));
        assert_eq!(e.offset, off, "extent() answered for another offset");
        assert!(
            e.length >= 1 && e.length <= size - off,
            "extent({off:#x}) has length {}",
            e.length
        );
        push_run(
            &mut runs,
            Run {
                start: off,
                len: e.length,
                kind: e.kind,
                host: e.host_offset,
                compressed: e.compressed,
            },
        );
        off += e.length;
    }
    runs
}

/// The allocation map of a qcow2 image from `qemu-img map --output=json`: `data` is Data,
/// present without data is Zero, not present is Unallocated (the `zero` flag of data runs only
/// says the host file has a hole there).
pub fn qemu_map(img: &Path) -> Vec<Run> {
    let out = run_ok(
        qemu_img()
            .args(["map", "-f", "qcow2", "--output=json"])
            .arg(img),
    );
    let json = Json::parse(&String::from_utf8_lossy(&out.stdout));
    let mut runs = Vec::new();
    for e in json.as_array() {
        let flag = |k: &str| {
            e.get(k).unwrap_or_else(|| panic!("map entry without {k}")) == &Json::Bool(true)
        };
        let kind = if flag("data") {
            ExtentKind::Data
        } else if flag("present") {
            ExtentKind::Zero
        } else {
            ExtentKind::Unallocated
        };
        push_run(
            &mut runs,
            Run {
                start: e.get("start").unwrap().as_u64(),
                len: e.get("length").unwrap().as_u64(),
                kind,
                host: e.get("offset").map(Json::as_u64),
                compressed: flag("compressed"),
            },
        );
    }
    runs
}

/// `qemu-img map --output=json` as text without the host offsets: what each range reads as, for
/// comparing images whose clusters lie in different places.
pub fn map_without_offsets(img: &Path) -> String {
    let out = run_ok(qemu_img().args(["map", "--output=json"]).arg(img));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split(", \"offset\"")
                .next()
                .unwrap()
                .trim_end_matches('}')
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Requires vdisk's `extent()` runs to agree with `qemu-img map` (kind and host offsets).
pub fn assert_extents_agree(dev: &dyn BlockDev, img: &Path, what: &str) {
    let ours = vdisk_map(dev);
    let theirs = qemu_map(img);
    if ours != theirs {
        let first = ours
            .iter()
            .zip(&theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()));
        panic!(
            "{what}: extents differ from qemu-img map at run {first}:\n  vdisk: {:?}\n  qemu:  {:?}",
            ours.get(first),
            theirs.get(first)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Image bytes

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads the first `len` bytes of a file (fewer if it is shorter).
pub fn read_head(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(len);
    File::open(path)
        .unwrap()
        .take(len as u64)
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}
