//! `vdisk boot` with the tiny assembler guest of `vmm/tests/guest/`: it reads the disk, writes
//! two sectors, flushes, prints a report on COM1 and resets. Booted on raw, on a qcow2 overlay
//! with a backing file and on LUKS, then checked with qemu-img; and the failures a user meets
//! (no kernel, an unbootable one, a bad image, no KVM) give clear messages and status 1.
//!
//! The guest is assembled with GNU as/ld; tests skip (saying why) without /dev/kvm or tools.

mod common;
#[path = "../vmm/tests/guest/guest.rs"]
mod guest;

use std::path::Path;
use std::process::Command;

use common::*;
use guest::{expected_image, pattern};

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");

fn usable(tools: &[&str]) -> bool {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("skipped: /dev/kvm is not usable: {e}");
        return false;
    }
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    true
}

fn boot(kernel: &Path, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "boot",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--append",
        "console=ttyS0",
    ];
    args.extend_from_slice(extra);
    vdisk(args)
}

#[test]
fn boots_on_raw_and_the_guest_writes_reach_the_image() {
    if !usable(&["as", "ld"]) {
        return;
    }
    let dir = temp_dir();
    let kernel = guest::build_guest(dir.path(), true);
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, pattern()).unwrap();
    let disk = format!("{},format=raw", img.display());
    let out = boot(&kernel, &["--disk", &disk, "--serial", "stdio"]).ok();
    assert_eq!(out.stdout, guest::expected_report("pvh"));
    assert!(std::fs::read(&img).unwrap() == expected_image());

    // The same report in a serial log file; a read-only disk refuses the guest's write.
    std::fs::write(&img, pattern()).unwrap();
    let log = dir.path().join("serial.log");
    let out = boot(
        &kernel,
        &[
            "--disk",
            &format!("{disk},readonly=on"),
            "--serial",
            log.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(out.stdout, "");
    let report = std::fs::read_to_string(&log).unwrap();
    assert!(report.starts_with("vdisk-guest: mode=pvh"), "{report}");
    assert!(
        !report.contains("write=0 "),
        "a read-only disk accepted a write:\n{report}"
    );
    assert!(std::fs::read(&img).unwrap() == pattern());
}

#[test]
fn boots_on_a_qcow2_overlay_whose_backing_file_stays_untouched() {
    if !usable(&["as", "ld", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let kernel = guest::build_guest(dir.path(), true);
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern()).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ])
    .ok();
    let out = boot(
        &kernel,
        &[
            "--disk",
            overlay.to_str().unwrap(),
            "--serial",
            "stdio",
            "--cpus",
            "2",
        ],
    )
    .ok();
    assert_eq!(out.stdout, guest::expected_report("pvh"));
    assert!(
        std::fs::read(&base).unwrap() == pattern(),
        "the backing file changed"
    );
    assert_qemu_check_clean(&overlay);
    let want = dir.path().join("want.raw");
    std::fs::write(&want, expected_image()).unwrap();
    qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        want.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ])
    .ok();
    // Only the two written sectors' cluster lives in the overlay.
    let map = json(&qemu_img(["map", "--output=json", overlay.to_str().unwrap()]).ok());
    let top: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(top, 65536, "{map}");
}

#[test]
fn boots_on_luks_with_a_key_secret() {
    if !usable(&["as", "ld", "qemu-img"]) {
        return;
    }
    let dir = temp_dir();
    let kernel = guest::build_guest(dir.path(), true);
    let plain = dir.path().join("plain.raw");
    std::fs::write(&plain, pattern()).unwrap();
    let luks = dir.path().join("disk.luks");
    qemu_img([
        "convert",
        "--object",
        "secret,id=s0,data=swordfish",
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=s0,iter-time=10",
        plain.to_str().unwrap(),
        luks.to_str().unwrap(),
    ])
    .ok();
    let disk = format!("{},format=luks,key-secret=pw", luks.display());
    let out = boot(
        &kernel,
        &["--object", "secret,id=pw,data=swordfish", "--disk", &disk],
    )
    .ok();
    assert_eq!(out.stdout, guest::expected_report("pvh"));
    let back = dir.path().join("back.raw");
    qemu_img([
        "convert",
        "--object",
        "secret,id=s0,data=swordfish",
        "--image-opts",
        &format!("driver=luks,key-secret=s0,file.filename={}", luks.display()),
        "-O",
        "raw",
        back.to_str().unwrap(),
    ])
    .ok();
    assert!(std::fs::read(&back).unwrap() == expected_image());

    let wrong = boot(
        &kernel,
        &["--object", "secret,id=pw,data=guess", "--disk", &disk],
    );
    assert_eq!(wrong.code, Some(1));
    assert!(
        wrong.stderr.contains("Invalid password"),
        "{}",
        wrong.stderr
    );
    let missing = boot(&kernel, &["--disk", &disk]);
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("No secret with id 'pw'"),
        "{}",
        missing.stderr
    );
}

#[test]
fn failures_have_clear_messages_and_status_1() {
    if !usable(&["as", "ld"]) {
        return;
    }
    let dir = temp_dir();
    let kernel = guest::build_guest(dir.path(), true);
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, pattern()).unwrap();
    let disk = format!("{},format=raw", img.display());
    let fails = |out: Outcome, text: &str| {
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(out.stderr.starts_with("vdisk: "), "{}", out.stderr);
        assert!(
            out.stderr.contains(text),
            "expected {text:?} in {}",
            out.stderr
        );
    };
    fails(
        boot(&dir.path().join("vmlinux"), &["--disk", &disk]),
        "No such file or directory",
    );
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a kernel\n".repeat(100)).unwrap();
    fails(
        boot(&text, &["--disk", &disk]),
        "is not a kernel vdisk can boot",
    );
    fails(
        boot(
            &kernel,
            &["--disk", dir.path().join("none.qcow2").to_str().unwrap()],
        ),
        "Could not open",
    );
    let broken = dir.path().join("broken.qcow2");
    let mut bytes = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    bytes.resize(4096, 0xff);
    std::fs::write(&broken, bytes).unwrap();
    fails(
        boot(
            &kernel,
            &["--disk", &format!("{},format=qcow2", broken.display())],
        ),
        "broken.qcow2",
    );
    fails(
        boot(&kernel, &["--disk", &format!("{disk},cache=none")]),
        "unknown option 'cache'",
    );
    fails(boot(&kernel, &["--memory", "1M"]), "at least 16 MiB");
    fails(
        boot(&kernel, &["--cpus", "0"]),
        "cpus must be between 1 and",
    );

    // No KVM: the same command in a mount namespace whose /dev is empty.
    // SAFETY: getuid has no preconditions and cannot fail.
    let root = unsafe { libc::getuid() } == 0;
    let unshare = Command::new("unshare").arg("--version").output().is_ok();
    if !(root && unshare) {
        eprintln!("skipped the no-KVM case: needs root and unshare");
        return;
    }
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {VDISK} boot --kernel {} --disk {disk} --serial none",
            kernel.display()
        ))
        .output()
        .unwrap();
    let out = Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    fails(
        out,
        "KVM is not available: cannot open /dev/kvm: No such file or directory",
    );
}
