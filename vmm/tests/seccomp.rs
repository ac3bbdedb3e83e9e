//! The VMM's real seccomp filters, installed in child processes (this test binary run again
//! with `VDISK_SECCOMP_CHILD` set, so the test process itself stays unconfined):
//!
//! * a forbidden call (`socket`, `execve`, an ioctl other than `KVM_RUN` on a vCPU thread)
//!   kills the process by SIGSYS, after the report naming the thread and the call;
//! * under the disk I/O thread's filter, the block drivers still read, write, discard, zero and
//!   flush qcow2 overlays with backing files and LUKS1/LUKS2 volumes, including LUKS requests
//!   large enough to be split over cipher threads; the images are then checked with qemu-img.
//!
//! A normal boot with the filters on is in `boot_guest.rs`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

mod common;

use common::{create_qcow2_overlay, format_luks2, qemu_img};
use vdisk_formats::{BlockDev, Format, OpenOptions, Passphrase, ZeroFlags};
use vdisk_vmm::seccomp::{install_violation_report, ThreadFilter, ThreadKind};

const CHILD_ENV: &str = "VDISK_SECCOMP_CHILD";
const PASSWORD: &str = "swordfish";
/// Bytes each child write covers: above the LUKS cipher's 256 KiB threshold for threads.
const LARGE: usize = 1 << 20;
const IMAGE_SIZE: u64 = 4 << 20;

/// Runs this binary again, only the test `child_process`, in `mode`.
fn run_child(mode: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .output()
        .unwrap()
}

fn kind_named(name: &str) -> ThreadKind {
    *ThreadKind::ALL
        .iter()
        .find(|k| format!("{k:?}") == name)
        .unwrap_or_else(|| panic!("no thread kind {name}"))
}

fn confine(kind: ThreadKind) {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid rlimit: no core file for the SIGSYS death.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    assert_eq!(rc, 0);
    install_violation_report().unwrap();
    ThreadFilter::compile(kind).unwrap().install().unwrap();
}

/// The forbidden calls a child makes after confining itself.
fn forbidden_call(call: &str) {
    match call {
        // SAFETY: socket takes integer arguments; the descriptor, if any, is leaked.
        "socket" => unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        },
        "execve" => {
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument and environment arrays.
            unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
        }
        "tcgets" => {
            // SAFETY: termios is plain data; all zeroes is a valid value.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS writes a termios into the buffer given.
            unsafe { libc::ioctl(0, libc::TCGETS, &mut t) };
        }
        other => panic!("unknown call {other}"),
    }
}

/// The pattern a child writes at `offset`.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) * 31 / 7 % 251) as u8)
        .collect()
}

/// What a disk holds after [`exercise`], given what it held before.
fn after_exercise(before: &[u8]) -> Vec<u8> {
    let mut data = before.to_vec();
    data[LARGE..2 * LARGE].copy_from_slice(&pattern(LARGE as u64, LARGE));
    data[3 * LARGE..3 * LARGE + 65536].fill(0);
    data
}

/// The I/O a guest makes, straight through the block layer.
fn exercise(dev: &Arc<dyn BlockDev>) {
    dev.write_at(&pattern(LARGE as u64, LARGE), LARGE as u64)
        .unwrap();
    let mut back = vec![0; LARGE];
    dev.read_at(&mut back, LARGE as u64).unwrap();
    assert!(back == pattern(LARGE as u64, LARGE), "read back differs");
    dev.write_zeroes(3 * LARGE as u64, 65536, ZeroFlags::default())
        .unwrap();
    let mut all = vec![0; IMAGE_SIZE as usize];
    dev.read_at(&mut all, 0).unwrap();
    dev.flush().unwrap();
}

/// The child side of every test; a normal test run has nothing to do here.
#[test]
fn child_process() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (what, arg) = mode.split_once(':').unwrap();
    match what {
        "forbidden" => {
            let (kind, call) = arg.split_once(':').unwrap();
            confine(kind_named(kind));
            forbidden_call(call);
            eprintln!("survived the forbidden call");
            std::process::exit(3);
        }
        "restore-terminal" => {
            // What the main thread does at the end of a run on a terminal: restore its
            // settings (here those of a new pseudo-terminal).
            let (mut leader, mut follower) = (0, 0);
            // SAFETY: openpty writes two descriptors; the name, settings and size are optional.
            let rc = unsafe {
                libc::openpty(
                    &mut leader,
                    &mut follower,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "openpty");
            // SAFETY: termios is plain data; all zeroes is a valid value.
            let mut saved: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: a valid termios to fill and an open terminal descriptor.
            let rc = unsafe { libc::tcgetattr(follower, &mut saved) };
            assert_eq!(rc, 0, "tcgetattr");
            confine(kind_named(arg));
            // SAFETY: settings read from the same descriptor.
            let rc = unsafe { libc::tcsetattr(follower, libc::TCSANOW, &saved) };
            assert_eq!(rc, 0, "tcsetattr");
            std::process::exit(0);
        }
        "disk-io" => {
            let dir = Path::new(arg);
            let pw = Passphrase::new(PASSWORD.as_bytes().to_vec());
            let open = |name: &str, format: Format| {
                let opts = OpenOptions {
                    format: Some(format),
                    ..Default::default()
                };
                vdisk_formats::open_with_secret(&dir.join(name), opts, Some(&pw)).unwrap()
            };
            let devs = [
                open("overlay.qcow2", Format::Qcow2),
                open("disk.luks1", Format::Luks),
                open("disk.luks2", Format::Luks),
            ];
            confine(ThreadKind::DiskIo);
            for dev in &devs {
                exercise(dev);
            }
            // A new thread (as a cipher thread is) inherits the filter and still does I/O.
            let dev = devs[0].clone();
            std::thread::spawn(move || dev.flush().unwrap())
                .join()
                .unwrap();
            std::process::exit(0);
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn tools_present(tools: &[&str]) -> bool {
    for tool in tools {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    true
}

#[test]
fn a_forbidden_call_kills_the_process_by_sigsys_with_a_report() {
    for (kind, call, number) in [
        (ThreadKind::Vcpu, "socket", "41 (socket)"),
        (ThreadKind::Vcpu, "tcgets", "16 (ioctl)"),
        (ThreadKind::DiskIo, "socket", "41 (socket)"),
        (ThreadKind::DiskIo, "execve", "59 (execve)"),
        (ThreadKind::Console, "socket", "41 (socket)"),
        (ThreadKind::Main, "execve", "59 (execve)"),
    ] {
        let out = run_child(&format!("forbidden:{kind:?}:{call}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind:?} {call}: {:?}\n{stderr}",
            out.status
        );
        let report = format!(
            "vdisk-vmm: seccomp: the {} thread made system call {number}, which its filter forbids",
            kind.name()
        );
        assert!(stderr.contains(&report), "{kind:?} {call}: {stderr}");
    }
}

#[test]
fn the_main_filter_lets_the_terminal_be_restored() {
    let out = run_child("restore-terminal:Main");
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_disk_io_filter_lets_qcow2_with_backing_and_luks_work() {
    if !tools_present(&["qemu-img", "cryptsetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let base: Vec<u8> = pattern(0, IMAGE_SIZE as usize)
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    std::fs::write(d("base.raw"), &base).unwrap();
    let secret = format!("secret,id=s0,data={PASSWORD}");
    create_qcow2_overlay(&dir.path().join("overlay.qcow2"), "base.raw");
    qemu_img(&[
        "convert",
        "--object",
        &secret,
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=s0,iter-time=10",
        &d("base.raw"),
        &d("disk.luks1"),
    ]);
    format_luks2(&dir.path().join("disk.luks2"), IMAGE_SIZE, PASSWORD);

    let out = run_child(&format!("disk-io:{}", dir.path().display()));
    assert!(
        out.status.success(),
        "child: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // The overlay: consistent, and the backing data with the child's writes on top.
    qemu_img(&["check", &d("overlay.qcow2")]);
    std::fs::write(d("want-overlay.raw"), after_exercise(&base)).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        &d("want-overlay.raw"),
        &d("overlay.qcow2"),
    ]);
    assert!(
        std::fs::read(d("base.raw")).unwrap() == base,
        "the backing file changed"
    );
    // LUKS1 as qemu-img decrypts it.
    std::fs::write(d("want-luks.raw"), after_exercise(&base)).unwrap();
    qemu_img(&[
        "compare",
        "--object",
        &secret,
        "--image-opts",
        &format!("driver=raw,file.filename={}", d("want-luks.raw")),
        &format!(
            "driver=luks,key-secret=s0,file.filename={}",
            d("disk.luks1")
        ),
    ]);
    // LUKS2 (which qemu-img cannot open) read back through the block layer, unconfined.
    let luks2 = vdisk_formats::open_with_secret(
        &dir.path().join("disk.luks2"),
        OpenOptions {
            format: Some(Format::Luks),
            read_only: true,
            ..Default::default()
        },
        Some(&Passphrase::new(PASSWORD.as_bytes().to_vec())),
    )
    .unwrap();
    // Its unwritten payload decrypts to noise: compare what the child wrote.
    let mut back = vec![0; IMAGE_SIZE as usize];
    luks2.read_at(&mut back, 0).unwrap();
    let want = after_exercise(&back);
    assert!(back == want, "LUKS2 contents differ");
}
