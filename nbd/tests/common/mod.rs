//! Shared helpers of the integration tests: images made with qemu-img/qemu-io, an in-process
//! server on a Unix socket or an ephemeral TCP port, and running peer tools.

#![allow(dead_code)]

pub mod client;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread;

use vdisk_formats::{open, BlockDev, OpenOptions};
use vdisk_nbd::{Export, Server};

/// Whether `tool` is on PATH; prints why the calling test skips when it is not.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: {tool} is not installed");
    }
    found
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// `qemu-img create -f FMT PATH SIZE` (with extra args).
pub fn qemu_img_create(path: &Path, fmt: &str, size: &str, extra: &[&str]) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .args(extra)
        .arg(path)
        .arg(size));
}

/// Runs `qemu-io` commands (`write -P 0xab 1M 64k` ...) on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(path));
}

/// A sparse 64 MiB qcow2 image with data, a zero cluster and holes (and a backing file
/// holding data of its own, so allocation depths 0, 1 and 2 all occur).
pub fn sparse_qcow2(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    qemu_img_create(&base, "qcow2", "64M", &[]);
    qemu_io(
        &base,
        "qcow2",
        &["write -P 0x11 20M 512k", "write -P 0x12 1M 64k"],
    );
    let top = dir.join("sparse.qcow2");
    qemu_img_create(&top, "qcow2", "64M", &["-b", "base.qcow2", "-F", "qcow2"]);
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0xab 1M 1M",
            "write -z 4M 1M",
            "write -P 0xcd 10M 64k",
            "write -P 0xef 63M 512k",
        ],
    );
    top
}

/// Opens an image with vdisk (format probed).
pub fn open_image(path: &Path, read_only: bool) -> Arc<dyn BlockDev> {
    open(
        path,
        OpenOptions {
            read_only,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A server listening on a Unix socket in `dir`; the URI is `nbd+unix:///?socket=...`.
pub struct Running {
    pub server: Server,
    pub socket: PathBuf,
}

impl Running {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Serves `server` on a fresh Unix socket in `dir`.
pub fn serve_unix(server: Server, dir: &Path) -> Running {
    let socket = dir.join(format!("nbd-{}.sock", unique()));
    let listener = UnixListener::bind(&socket).unwrap();
    let s = server.clone();
    thread::spawn(move || s.serve(listener).unwrap());
    Running { server, socket }
}

/// Serves `server` on 127.0.0.1 with an ephemeral port; returns it with the port.
pub fn serve_tcp(server: Server) -> (Server, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    thread::spawn(move || s.serve(listener).unwrap());
    (server, port)
}

/// One export of `dev` under the default name.
pub fn server_for(dev: Arc<dyn BlockDev>) -> Server {
    Server::new(vec![Export::new("", dev)])
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 20 | N.fetch_add(1, Ordering::SeqCst)
}

/// `qemu-img map --output=json` of an image as (start, length, data, zero, depth, present).
pub fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool, u64, bool)> {
    let out = stdout(
        Command::new("qemu-img")
            .args(["map", "--output=json"])
            .arg(path),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `nbdinfo --map[=CTX] --json`-free parsing: lines `start length value description`.
pub fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let map = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let out = stdout(Command::new("nbdinfo").arg(map).arg(uri));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// Expands runs into a per-`grain` vector of values so two maps can be compared regardless of
/// how their runs are split.
pub fn per_block<T: Copy>(runs: &[(u64, u64, T)], size: u64, grain: u64) -> Vec<T> {
    let mut out = Vec::with_capacity((size / grain) as usize);
    for &(start, len, v) in runs {
        assert_eq!(start, out.len() as u64 * grain, "runs must be contiguous");
        assert_eq!(len % grain, 0, "run not aligned to {grain}");
        for _ in 0..len / grain {
            out.push(v);
        }
    }
    assert_eq!(out.len() as u64 * grain, size, "runs must cover the image");
    out
}

/// A RAM disk that remembers the longest write it was asked for and, with `stripe`, reports a
/// mapping that alternates data and zero every `stripe` bytes (data first); the rest is the RAM
/// disk's.
#[derive(Debug)]
pub struct WatchedDisk {
    pub disk: vdisk_formats::mem::MemDev,
    pub longest_write: std::sync::atomic::AtomicUsize,
    pub stripe: Option<u64>,
}

impl WatchedDisk {
    pub fn new(size: usize, stripe: Option<u64>) -> WatchedDisk {
        WatchedDisk {
            disk: vdisk_formats::mem::MemDev::new(size),
            longest_write: Default::default(),
            stripe,
        }
    }
}

impl BlockDev for WatchedDisk {
    fn capabilities(&self) -> vdisk_formats::Capabilities {
        self.disk.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vdisk_formats::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vdisk_formats::Result<()> {
        let longest = &self.longest_write;
        longest.fetch_max(buf.len(), std::sync::atomic::Ordering::Relaxed);
        self.disk.write_at(buf, offset)
    }
    fn flush(&self) -> vdisk_formats::Result<()> {
        self.disk.flush()
    }
    fn write_zeroes(
        &self,
        o: u64,
        l: u64,
        f: vdisk_formats::ZeroFlags,
    ) -> vdisk_formats::Result<()> {
        self.disk.write_zeroes(o, l, f)
    }
    fn discard(&self, offset: u64, len: u64) -> vdisk_formats::Result<()> {
        self.disk.discard(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> vdisk_formats::Result<vdisk_formats::Extent> {
        let e = self.disk.extent(offset, len)?;
        let Some(stripe) = self.stripe else {
            return Ok(e);
        };
        let index = offset / stripe;
        Ok(vdisk_formats::Extent {
            length: ((index + 1) * stripe - offset).min(len),
            kind: if index % 2 == 0 {
                vdisk_formats::ExtentKind::Data
            } else {
                vdisk_formats::ExtentKind::Zero
            },
            ..e
        })
    }
    fn info(&self) -> vdisk_formats::Result<vdisk_formats::NodeInfo> {
        self.disk.info()
    }
}
