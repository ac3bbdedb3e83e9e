//! `vdisk mount` / `vdisk umount`, and `vdisk serve` under nbdfuse, with a real ext4 file
//! system on an MBR partition of a qcow2 image: files written through the mount, fstrim, then
//! qemu-img check and a read-only loop mount of `qemu-img convert -O raw` output.
//!
//! Needs root, /dev/fuse, a free loop device and the usual tools; each test skips (saying why)
//! otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VDISK: &str = env!("CARGO_BIN_EXE_vdisk");
/// The partition starts at sector 2048.
const PART_OFFSET: u64 = 1 << 20;

fn usable(extra: &[&str]) -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: mounting needs root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: no /dev/fuse");
        return false;
    }
    let tools = [
        "qemu-img",
        "losetup",
        "partx",
        "sfdisk",
        "mkfs.ext4",
        "fstrim",
        "mount",
        "umount",
    ];
    for tool in tools.iter().chain(extra) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    if !Command::new("losetup")
        .arg("-f")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("skipped: no free loop device");
        return false;
    }
    true
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 128 MiB qcow2 image holding an MBR with one Linux partition from 1 MiB on, formatted ext4
/// (made on a raw file, then converted).
fn ext4_image(dir: &Path) -> PathBuf {
    let raw = dir.join("build.raw");
    qemu_img(["create", "-q", "-f", "raw", raw.to_str().unwrap(), "128M"]).ok();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&raw)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().unwrap(),
        b"label: dos\nstart=2048, type=83\n",
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", &format!("offset={PART_OFFSET}")])
        .arg(&raw)
        .arg("126M"));
    let img = dir.join("disk.qcow2");
    qemu_img([
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ])
    .ok();
    std::fs::remove_file(&raw).unwrap();
    img
}

/// Data that is not all one byte.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8)
        .collect()
}

/// Writes the test files into a mounted file system, then a 32 MiB file that is deleted again
/// and trimmed away; returns what fstrim reported.
fn write_files_and_trim(mnt: &Path) -> u64 {
    std::fs::write(mnt.join("hello.txt"), "hello from vdisk\n").unwrap();
    std::fs::create_dir(mnt.join("sub")).unwrap();
    std::fs::write(mnt.join("sub/pattern.bin"), pattern(3_000_000, 7)).unwrap();
    std::fs::write(mnt.join("big.bin"), pattern(32 << 20, 9)).unwrap();
    sh(Command::new("sync").arg("-f").arg(mnt.join("big.bin")));
    std::fs::remove_file(mnt.join("big.bin")).unwrap();
    sh(Command::new("sync").arg("-f").arg(mnt));
    let out = sh(Command::new("fstrim").arg("-v").arg(mnt));
    out.split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read fstrim's output: {out}"))
}

/// Unmounts and detaches on every exit path of a test.
struct Cleanup(Vec<Vec<String>>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in self.0.iter().rev() {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).output();
        }
    }
}

impl Cleanup {
    fn push(&mut self, cmd: &[&str]) {
        self.0.push(cmd.iter().map(|s| s.to_string()).collect());
    }
}

fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Checks the image with qemu-img, converts it to raw and mounts that read-only through a loop
/// device: the files must be there, `expect` names what else must exist.
fn verify_image(img: &Path, dir: &Path, expect_extra: &[(&str, &[u8])]) {
    assert_qemu_check_clean(img);
    let raw = dir.join("verify.raw");
    qemu_img([
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .ok();
    let mnt = dir.join("verify-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut cleanup = Cleanup(Vec::new());
    sh(Command::new("mount")
        .arg("-o")
        .arg(format!("ro,loop,offset={PART_OFFSET}"))
        .arg(&raw)
        .arg(&mnt));
    cleanup.push(&["umount", mnt.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).unwrap(),
        "hello from vdisk\n"
    );
    assert!(std::fs::read(mnt.join("sub/pattern.bin")).unwrap() == pattern(3_000_000, 7));
    assert!(!mnt.join("big.bin").exists());
    for (name, data) in expect_extra {
        assert!(
            std::fs::read(mnt.join(name)).unwrap() == *data,
            "{name} differs"
        );
    }
}

/// Bytes of guest data qemu-img says are allocated.
fn allocated(img: &Path) -> u64 {
    let out = qemu_img(["map", "--output=json", img.to_str().unwrap()]).ok();
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

/// The pid of the background `vdisk mount` process serving `dir`.
fn mount_process(dir: &Path) -> i32 {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"vdisk"))
            && args.get(1) == Some(&&b"mount"[..])
            && args
                .iter()
                .any(|a| Path::new(std::str::from_utf8(a).unwrap_or("")) == dir)
        {
            return pid;
        }
    }
    panic!("no vdisk mount process for {}", dir.display());
}

/// A fresh ext4 image mounted with `vdisk mount -P 1` (unmounted again by the cleanup).
fn mount_ext4_image() -> (tempfile::TempDir, PathBuf, PathBuf, Cleanup) {
    let dir = temp_dir();
    let img = ext4_image(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut cleanup = Cleanup(Vec::new());
    vdisk([
        "mount",
        "-P",
        "1",
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ])
    .ok();
    cleanup.push(&[VDISK, "umount", mnt.to_str().unwrap()]);
    (dir, img, mnt, cleanup)
}

#[test]
fn vdisk_mount_partition_write_trim_umount_then_qemu_img_sees_the_files() {
    if !usable(&[]) {
        return;
    }
    let (dir, img, mnt, mut cleanup) = mount_ext4_image();
    assert!(is_mounted(&mnt));
    let daemon = mount_process(&mnt);

    let trimmed = write_files_and_trim(&mnt);
    assert!(trimmed >= 32 << 20, "fstrim trimmed only {trimmed} bytes");

    // A busy mount point refuses to unmount and stays as it was.
    let busy = std::fs::File::open(mnt.join("hello.txt")).unwrap();
    let refused = vdisk(["umount", mnt.to_str().unwrap()]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(is_mounted(&mnt));
    drop(busy);

    vdisk(["umount", mnt.to_str().unwrap()]).ok();
    cleanup.0.clear();
    assert!(!is_mounted(&mnt));
    assert!(
        !Path::new(&format!("/proc/{daemon}")).exists()
            || std::fs::read_to_string(format!("/proc/{daemon}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the background process is still running"
    );
    assert!(
        allocated(&img) < 24 << 20,
        "the deleted 32 MiB were not released"
    );
    verify_image(&img, dir.path(), &[]);

    let again = vdisk(["umount", mnt.to_str().unwrap()]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("is not mounted"), "{}", again.stderr);
}

#[test]
fn sigterm_to_the_mount_process_unmounts_and_keeps_unsynced_writes() {
    if !usable(&[]) {
        return;
    }
    let (dir, img, mnt, mut cleanup) = mount_ext4_image();
    let daemon = mount_process(&mnt);
    write_files_and_trim(&mnt);
    // Written without any sync: only the unmount makes it reach the image.
    let late = pattern(1 << 20, 3);
    std::fs::write(mnt.join("late.bin"), &late).unwrap();

    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(daemon, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_mounted(&mnt) || mount_running(daemon) {
        assert!(Instant::now() < deadline, "SIGTERM did not end the mount");
        std::thread::sleep(Duration::from_millis(50));
    }
    cleanup.0.clear();
    verify_image(&img, dir.path(), &[("late.bin", &late)]);
    let gone = vdisk(["umount", mnt.to_str().unwrap()]);
    assert_eq!(gone.code, Some(1));
}

fn mount_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

/// A child process ended with SIGTERM and waited for when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first partition of a loop device; `partx -a` adds it where the kernel's scan did not.
fn first_partition(loopdev: &str) -> String {
    let part = format!("{loopdev}p1");
    std::thread::sleep(Duration::from_millis(200));
    if !Path::new(&part).exists() {
        let _ = Command::new("partx").args(["-a", loopdev]).output();
    }
    wait_for(&part, || Path::new(&part).exists());
    part
}

#[test]
fn vdisk_serve_under_nbdfuse_and_a_loop_device() {
    if !usable(&["nbdfuse", "fusermount3"]) {
        return;
    }
    let dir = temp_dir();
    let img = ext4_image(dir.path());
    let sock = dir.path().join("s.sock");
    let server = Command::new(VDISK)
        .args(["serve", "-t", "--discard=unmap", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Process(server);
    wait_for("the socket", || sock.exists());
    let fusedir = dir.path().join("fuse");
    std::fs::create_dir(&fusedir).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let nbdfuse = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fusedir.join("disk"))
        .arg("--unix")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nbdfuse = Process(nbdfuse);
    wait_for("nbdfuse", || pidfile.exists());
    let mut cleanup = Cleanup(Vec::new());
    cleanup.push(&["fusermount3", "-u", fusedir.to_str().unwrap()]);

    let disk = fusedir.join("disk");
    let loopdev = sh(Command::new("losetup")
        .args(["-P", "-f", "--show"])
        .arg(&disk));
    cleanup.push(&["losetup", "-d", &loopdev]);
    let part = first_partition(&loopdev);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount").arg(&part).arg(&mnt));
    cleanup.push(&["umount", mnt.to_str().unwrap()]);
    let trimmed = write_files_and_trim(&mnt);
    assert!(trimmed >= 32 << 20, "fstrim trimmed only {trimmed} bytes");
    sh(Command::new("umount").arg(&mnt));
    sh(Command::new("losetup").arg("-d").arg(&loopdev));
    sh(Command::new("fusermount3").arg("-u").arg(&fusedir));
    cleanup.0.clear();
    drop(nbdfuse);
    // SIGTERM flushes and ends the server.
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(server.0.id() as i32, libc::SIGTERM) };
    assert!(server.0.wait().unwrap().success());
    assert!(
        allocated(&img) < 24 << 20,
        "the deleted 32 MiB were not released"
    );
    verify_image(&img, dir.path(), &[]);
}

#[test]
fn vdisk_mount_of_a_luks_image_with_a_secret_object() {
    if !usable(&[]) {
        return;
    }
    let dir = temp_dir();
    let raw = dir.path().join("fs.raw");
    qemu_img(["create", "-q", "-f", "raw", raw.to_str().unwrap(), "64M"]).ok();
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw));
    let luks = dir.path().join("disk.luks");
    let secret = "secret,id=s0,data=swordfish";
    qemu_img([
        "convert",
        "--object",
        secret,
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=s0,iter-time=10",
        raw.to_str().unwrap(),
        luks.to_str().unwrap(),
    ])
    .ok();
    let opts = format!("driver=luks,key-secret=s0,file.filename={}", luks.display());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let wrong = vdisk([
        "mount",
        "--object",
        "secret,id=s0,data=guess",
        "--image-opts",
        &opts,
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(wrong.code, Some(1));
    assert!(
        wrong.stderr.contains("Invalid password"),
        "{}",
        wrong.stderr
    );
    assert!(!is_mounted(&mnt));

    let mut cleanup = Cleanup(Vec::new());
    vdisk([
        "mount",
        "--object",
        secret,
        "--image-opts",
        &opts,
        mnt.to_str().unwrap(),
    ])
    .ok();
    cleanup.push(&[VDISK, "umount", mnt.to_str().unwrap()]);
    let data = pattern(2 << 20, 5);
    std::fs::write(mnt.join("inside-luks.bin"), &data).unwrap();
    vdisk(["umount", mnt.to_str().unwrap()]).ok();
    cleanup.0.clear();

    let back = dir.path().join("back.raw");
    qemu_img([
        "convert",
        "--object",
        secret,
        "--image-opts",
        &opts,
        "-O",
        "raw",
        back.to_str().unwrap(),
    ])
    .ok();
    sh(Command::new("mount")
        .arg("-o")
        .arg("ro,loop")
        .arg(&back)
        .arg(&mnt));
    cleanup.push(&["umount", mnt.to_str().unwrap()]);
    assert!(std::fs::read(mnt.join("inside-luks.bin")).unwrap() == data);
}
