//! Boots the tiny assembler guest of `tests/guest/` through the real VMM path (KVM, loader,
//! boot structures, MMIO exits, ioeventfd, I/O thread, irqfd, serial, i8042 reset) on raw and
//! qcow2 images (one an overlay with a backing file) and LUKS2, with the seccomp filters on as
//! by default (and once off), and checks the guest's serial report, the image contents
//! afterwards (with qemu-img where it can read the format), and that the thread that ran the VM
//! was confined.
//!
//! The guest is assembled here with GNU `as`/`ld`; the tests skip (saying why) where there is
//! no usable `/dev/kvm`, no assembler, or (for qcow2) no `qemu-img`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

mod common;
#[path = "guest/guest.rs"]
mod guest;

use common::{create_qcow2_overlay, format_luks2, qemu_img};
use guest::{build_guest, expected_image, expected_report, pattern, IMAGE_SIZE};
use vdisk_vmm::{DiskConfig, DiskSpec, ExitReason, SerialConfig, Vm, VmConfig};

/// How long a tiny guest may take, even fully emulated.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn skip(why: &str) -> bool {
    eprintln!("skipped: {why}");
    true
}

fn kvm_missing() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => false,
        Err(e) => skip(&format!("/dev/kvm is not usable: {e}")),
    }
}

fn tool_missing(tool: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(o) if o.status.success() => false,
        _ => skip(&format!("{tool} is not installed")),
    }
}

/// Wraps the 64-bit guest into a minimal bzImage: one setup sector holding a boot protocol 2.12
/// header with `XLF_KERNEL_64`, then the flat guest as the protected-mode kernel (loaded at
/// `code32_start` = 1 MiB, entered at 1 MiB + 0x200).
fn build_bzimage(dir: &Path) -> PathBuf {
    let elf = build_guest(dir, false);
    let flat = dir.join("guest.bin");
    let out = Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&flat)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "objcopy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut image = vec![0u8; 1024];
    let mut put = |off: usize, bytes: &[u8]| image[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[1]); // setup_sects
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &0x020cu16.to_le_bytes()); // version 2.12
    put(0x211, &[1]); // loadflags: LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(0x22c, &0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    image.extend(std::fs::read(&flat).unwrap());
    let path = dir.join("bzImage");
    std::fs::write(&path, image).unwrap();
    path
}

/// How a boot went.
struct Booted {
    reason: ExitReason,
    /// What the guest printed on COM1.
    report: String,
    /// The `Seccomp:` mode of the thread that ran `Vm::run`, read from /proc after the run:
    /// 2 (filter) with seccomp on, 0 with it off.
    runner_seccomp: String,
}

/// Boots `kernel` with the disk `spec` (seccomp filters on unless `seccomp` is false).
fn boot(kernel: &Path, spec: &str, cpus: u8, dir: &Path) -> Booted {
    boot_disk(
        kernel,
        DiskSpec::parse(spec).unwrap().open(0).unwrap(),
        cpus,
        dir,
        true,
    )
}

fn boot_disk(kernel: &Path, disk: DiskConfig, cpus: u8, dir: &Path, seccomp: bool) -> Booted {
    let log = dir.join(format!("serial-{}.log", cpus));
    let _ = std::fs::remove_file(&log);
    let mut cfg = VmConfig::new(kernel);
    cfg.cmdline = "console=ttyS0".into();
    cfg.memory = 32 << 20;
    cfg.cpus = cpus;
    cfg.serial = SerialConfig::File(log.clone());
    cfg.seccomp = seccomp;
    cfg.disks.push(disk);
    let vm = Vm::new(cfg).expect("building the VM");
    let (tx, rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    // The runner is confined by the run when seccomp is on: it only reports and waits (futex)
    // until its /proc status has been read.
    let runner = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() };
        let _ = tx.send((tid, vm.run()));
        let _ = released.recv();
    });
    let (tid, result) = rx.recv_timeout(BOOT_TIMEOUT).unwrap_or_else(|_| {
        panic!(
            "guest did not finish within {BOOT_TIMEOUT:?}; serial so far:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    drop(release);
    runner.join().unwrap();
    let runner_seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .expect("Seccomp: line in /proc status")
        .trim()
        .to_string();
    Booted {
        reason: result.expect("running the VM"),
        report: std::fs::read_to_string(&log).unwrap(),
        runner_seccomp,
    }
}

/// Checks the serial report line by line.
fn check_report(report: &str, mode: &str) {
    assert_eq!(report, expected_report(mode));
}

/// Boots `kernel` on a fresh raw image with the pattern, checks the report printed in `mode`,
/// and returns the image.
fn boot_on_raw(kernel: &Path, dir: &Path, mode: &str) -> PathBuf {
    let image = dir.join("disk.raw");
    std::fs::write(&image, pattern()).unwrap();
    let booted = boot(kernel, &format!("{},format=raw", image.display()), 1, dir);
    assert_eq!(booted.reason, ExitReason::Reset);
    check_report(&booted.report, mode);
    assert_eq!(booted.runner_seccomp, "2", "the run was not confined");
    image
}

fn missing(tools: &[&str]) -> bool {
    kvm_missing() || tools.iter().any(|t| tool_missing(t))
}

#[test]
fn pvh_guest_reads_writes_and_flushes_a_raw_image() {
    if missing(&["as", "ld"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_guest(dir.path(), true);
    let image = boot_on_raw(&kernel, dir.path(), "pvh");
    assert!(
        std::fs::read(&image).unwrap() == expected_image(),
        "image contents differ"
    );
}

#[test]
fn linux64_entry_guest_on_raw_image() {
    if missing(&["as", "ld"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_guest(dir.path(), false);
    boot_on_raw(&kernel, dir.path(), "64");
}

#[test]
fn bzimage_guest_boots_through_the_64bit_protocol() {
    if missing(&["as", "ld", "objcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_bzimage(dir.path());
    boot_on_raw(&kernel, dir.path(), "64");
}

#[test]
fn pvh_guest_on_qcow2_image_with_two_vcpus_matches_qemu_img() {
    if missing(&["as", "ld", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_guest(dir.path(), true);
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern()).unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(status.success());

    let booted = boot(
        &kernel,
        &format!("{},format=qcow2", qcow2.display()),
        2,
        dir.path(),
    );
    assert_eq!(booted.reason, ExitReason::Reset);
    check_report(&booted.report, "pvh");

    assert_qcow2_holds_the_expected_image(&qcow2, dir.path());
}

/// The image after the guest's run: the pattern with sectors 8-9 written.
/// The host side agrees: the qcow2 image is consistent and holds exactly the expected data.
fn assert_qcow2_holds_the_expected_image(qcow2: &Path, dir: &Path) {
    let qcow2 = qcow2.to_str().unwrap();
    qemu_img(&["check", qcow2]);
    let want = dir.join("want.raw");
    std::fs::write(&want, expected_image()).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        want.to_str().unwrap(),
        qcow2,
    ]);
}

#[test]
fn pvh_guest_on_a_qcow2_overlay_and_on_luks2_with_the_filters_on() {
    if missing(&["as", "ld", "qemu-img", "cryptsetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_guest(dir.path(), true);

    // A qcow2 overlay over a raw backing file: the guest's writes land in the overlay only.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern()).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    create_qcow2_overlay(&overlay, "base.raw");
    let booted = boot(&kernel, overlay.to_str().unwrap(), 1, dir.path());
    assert_eq!(booted.reason, ExitReason::Reset);
    check_report(&booted.report, "pvh");
    assert_eq!(booted.runner_seccomp, "2");
    assert!(
        std::fs::read(&base).unwrap() == pattern(),
        "the backing file changed"
    );
    assert_qcow2_holds_the_expected_image(&overlay, dir.path());

    // LUKS2 made by cryptsetup (16 MiB header, 1 MiB payload), the pattern written through
    // the block layer before the boot.
    let luks2 = dir.path().join("disk.luks2");
    format_luks2(&luks2, IMAGE_SIZE as u64, "swordfish");
    let open = || {
        let opts = vdisk_formats::OpenOptions {
            format: Some(vdisk_formats::Format::Luks),
            ..Default::default()
        };
        let pw = vdisk_formats::Passphrase::new(b"swordfish".to_vec());
        vdisk_formats::open_with_secret(&luks2, opts, Some(&pw)).unwrap()
    };
    let dev = open();
    dev.write_at(&pattern(), 0).unwrap();
    let disk = DiskConfig {
        dev,
        read_only: false,
        id: "vdisk0".into(),
    };
    let booted = boot_disk(&kernel, disk, 1, dir.path(), true);
    assert_eq!(booted.reason, ExitReason::Reset);
    check_report(&booted.report, "pvh");
    assert_eq!(booted.runner_seccomp, "2");
    let mut back = vec![0; IMAGE_SIZE];
    open().read_at(&mut back, 0).unwrap();
    assert!(back == expected_image(), "LUKS2 contents differ");
}

#[test]
fn with_seccomp_off_the_run_stays_unconfined() {
    if missing(&["as", "ld"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = build_guest(dir.path(), true);
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, pattern()).unwrap();
    let disk = DiskSpec::parse(&format!("{},format=raw", image.display()))
        .unwrap()
        .open(0)
        .unwrap();
    let booted = boot_disk(&kernel, disk, 1, dir.path(), false);
    assert_eq!(booted.reason, ExitReason::Reset);
    check_report(&booted.report, "pvh");
    assert_eq!(booted.runner_seccomp, "0");
    assert!(std::fs::read(&image).unwrap() == expected_image());
}
