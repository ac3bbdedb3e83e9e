//! Helpers for the command-line integration tests: run the real `vdisk` binary and the real
//! qemu-img/qemu-io (the oracle) on the same files and compare what they print.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a finished command left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Exit status (`None` when killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Panics with the whole outcome unless the command exited 0.
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    /// The stderr text with the program's `vdisk:`/`qemu-img:` prefix and `Try 'vdisk ...'`
    /// hint normalised, and without the `hint: ...` lines vdisk adds under its own name, so the
    /// two tools' messages can be compared.
    pub fn stderr_normalised(&self) -> String {
        let without_hints: String = self
            .stderr
            .split_inclusive('\n')
            .filter(|l| !l.starts_with("hint: "))
            .collect();
        without_node_numbers(&without_hints)
            .replace("qemu-img: ", "PROG: ")
            .replace("vdisk: ", "PROG: ")
            .replace("'qemu-img ", "'PROG ")
            .replace("'vdisk ", "'PROG ")
    }
}

/// The text with QEMU's anonymous node names (`#block123`, numbered as nodes are made) as
/// `#blockN`.
fn without_node_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#block") {
        out.push_str(&rest[..at]);
        out.push_str("#blockN");
        rest = rest[at + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// Runs a command to completion (in the C locale) and returns what it did.
pub fn run(cmd: &mut Command) -> Outcome {
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the vdisk binary built for these tests.
pub fn vdisk<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(env!("CARGO_BIN_EXE_vdisk")).args(args))
}

/// Runs qemu-img.
pub fn qemu_img<I, S>(args: I) -> Outcome
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands (one `-c` each) on an image of the given format; every command must
/// succeed (qemu-io reports failures on stdout and still exits 0).
pub fn qemu_io(format: &str, path: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(path)).ok();
    assert!(
        !out.stdout.contains("failed") && !out.stdout.contains("error"),
        "qemu-io {cmds:?} on {}:\n{}",
        path.display(),
        out.stdout
    );
}

/// Runs the same subcommand with the same arguments under vdisk and qemu-img.
pub fn both<S: AsRef<OsStr>>(args: &[S]) -> (Outcome, Outcome) {
    (vdisk(args), qemu_img(args))
}

/// Panics unless both tools printed the same text on stdout and exited the same way; on stderr
/// the messages must agree once the program names are normalised.
pub fn assert_same<S: AsRef<OsStr>>(args: &[S]) {
    let (ours, theirs) = both(args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert_eq!(ours.code, theirs.code, "exit codes differ for {shown:?}");
    assert_lines_eq(
        &ours.stdout,
        &theirs.stdout,
        &format!("stdout of {shown:?}"),
    );
    assert_lines_eq(
        &ours.stderr_normalised(),
        &theirs.stderr_normalised(),
        &format!("stderr of {shown:?}"),
    );
}

/// Compares two texts line by line, reporting the first line that differs.
pub fn assert_lines_eq(ours: &str, theirs: &str, what: &str) {
    for (n, (a, b)) in ours.lines().zip(theirs.lines()).enumerate() {
        assert_eq!(
            a,
            b,
            "{what}: line {} differs\n--- vdisk\n{ours}\n--- qemu-img\n{theirs}",
            n + 1
        );
    }
    assert_eq!(
        ours, theirs,
        "{what}: the texts differ in length or line endings"
    );
}

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vdisk-cli-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// `dir/name` as a path.
pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Parses a command's stdout as JSON.
pub fn json(out: &Outcome) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout))
}

/// Panics unless `qemu-img check` finds the image clean (exit 0: no errors, no leaks).
pub fn assert_qemu_check_clean(path: &Path) {
    let out = qemu_img([OsStr::new("check"), path.as_os_str()]);
    assert_eq!(
        out.code,
        Some(0),
        "qemu-img check {} is not clean:\n{}{}",
        path.display(),
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("No errors were found on the image."),
        "{}",
        out.stdout
    );
}
