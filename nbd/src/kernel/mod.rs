//! Attaching sockets to the kernel's NBD client, `/dev/nbdN`.
//!
//! ```text
//!   Server::serve_transmission ── socketpair ──> kernel::connect ──> /dev/nbdN
//!        (one per connection)                     netlink NBD_CMD_CONNECT
//!                                                 or ioctl SET_SOCK + DO_IT
//! ```
//!
//! The kernel speaks only the transmission phase with simple replies, so the sockets handed to
//! it must already be past the handshake: [`attach`] makes socket pairs, serves one end of each
//! with [`Server::serve_transmission`] and gives the other ends to [`connect`].
//!
//! The generic-netlink interface is preferred: the kernel takes the sockets, no thread has to
//! block in `NBD_DO_IT`, and free devices are found or created by the kernel. Without it (old
//! kernels) the ioctl interface is used. Both need `CAP_SYS_ADMIN` and the `nbd` module; when the
//! module is missing the error says so and points at the FUSE export, which needs neither.

mod ioctl;
mod netlink;

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::proto::TransmissionFlags;
use crate::Server;

/// Which kernel interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interface {
    /// Netlink when the kernel offers it, else ioctls.
    #[default]
    Auto,
    Netlink,
    Ioctl,
}

/// How to attach a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Device number (`/dev/nbdN`); `None` lets the kernel (netlink) or a scan of
    /// `/sys/block` (ioctl) pick a free one.
    pub index: Option<u32>,
    /// Export size in bytes.
    pub size: u64,
    /// Logical block size: a power of two from 512 to the page size.
    pub block_size: u32,
    /// The export's transmission flags; they decide whether the kernel sends FLUSH, FUA and
    /// TRIM, marks the device read-only, and accepts more than one socket (`CAN_MULTI_CONN`).
    pub flags: TransmissionFlags,
    /// Per-request timeout; `None` waits forever (qemu-nbd's choice).
    pub timeout: Option<Duration>,
    /// How long the kernel waits for a dead connection to be replaced (netlink only).
    pub dead_conn_timeout: Option<Duration>,
    /// Disconnect when the last opener closes the device (netlink only).
    pub disconnect_on_close: bool,
    /// Shown in `/sys/block/nbdN/backend` (netlink only), e.g. the image path.
    pub backend: Option<String>,
    pub interface: Interface,
}

impl ConnectOptions {
    /// Options for an export of `size` bytes with `flags`, 512-byte blocks, no timeout.
    pub fn new(size: u64, flags: TransmissionFlags) -> ConnectOptions {
        ConnectOptions {
            index: None,
            size,
            block_size: 512,
            flags,
            timeout: None,
            dead_conn_timeout: None,
            disconnect_on_close: false,
            backend: None,
            interface: Interface::Auto,
        }
    }
}

/// Errors attaching or detaching a device.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the nbd kernel module is not loaded (no /dev/nbd0 and no \"nbd\" netlink family): \
         run `modprobe nbd max_part=16` as root, or use the FUSE export, which needs no module"
    )]
    ModuleMissing,
    #[error("attaching /dev/nbd devices needs root (CAP_SYS_ADMIN)")]
    PermissionDenied,
    #[error("no free /dev/nbd device")]
    NoFreeDevice,
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KernelError {
    let what = what.into();
    move |source| {
        if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
            KernelError::PermissionDenied
        } else {
            KernelError::Io { what, source }
        }
    }
}

/// A connected `/dev/nbdN`.
#[derive(Debug)]
pub struct Device {
    index: u32,
    interface: Interface,
    /// The ioctl interface's thread blocked in `NBD_DO_IT`.
    do_it: Option<JoinHandle<io::Result<()>>>,
}

impl Device {
    pub fn index(&self) -> u32 {
        self.index
    }

    /// `/dev/nbdN`.
    pub fn path(&self) -> PathBuf {
        device_path(self.index)
    }

    /// The interface that was used ([`Interface::Netlink`] or [`Interface::Ioctl`]).
    pub fn interface(&self) -> Interface {
        self.interface
    }

    /// Disconnects and waits until the kernel has let go of the device.
    pub fn disconnect(mut self) -> Result<(), KernelError> {
        match self.interface {
            Interface::Ioctl => {
                ioctl::disconnect(&self.path()).map_err(io_err("NBD_DISCONNECT"))?;
            }
            _ => disconnect(self.index)?,
        }
        self.wait()
    }

    /// Blocks until the device is disconnected (by [`disconnect`], the server going away, or
    /// `DISCONNECT_ON_CLOSE`).
    pub fn wait(&mut self) -> Result<(), KernelError> {
        if let Some(t) = self.do_it.take() {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("DO_IT thread panicked")));
            // EPIPE/ESHUTDOWN mean "disconnected" here, not a failure.
            if let Err(e) = r {
                if !matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ESHUTDOWN)) {
                    return Err(io_err("NBD_DO_IT")(e));
                }
            }
            return Ok(());
        }
        while is_connected(self.index) {
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// `/dev/nbdN` for index `n`.
pub fn device_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{n}"))
}

/// The index of a `/dev/nbdN` path.
pub fn device_index(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_prefix("nbd")?
        .parse()
        .ok()
}

/// Whether the kernel's NBD driver is present (loaded module or built in).
pub fn module_loaded() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Whether `/dev/nbdN` has a live connection (`/sys/block/nbdN/pid` exists while it does).
pub fn is_connected(n: u32) -> bool {
    Path::new(&format!("/sys/block/nbd{n}/pid")).exists()
}

/// Attaches already-negotiated `sockets` (transmission phase, simple replies) to a device.
/// The sockets are handed to the kernel and closed here.
pub fn connect(sockets: Vec<OwnedFd>, opts: &ConnectOptions) -> Result<Device, KernelError> {
    if sockets.is_empty() {
        return Err(KernelError::InvalidOptions("no socket to attach".into()));
    }
    if sockets.len() > 1 && !opts.flags.has(TransmissionFlags::CAN_MULTI_CONN) {
        return Err(KernelError::InvalidOptions(
            "several sockets need an export that allows multi-conn".into(),
        ));
    }
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
        return Err(KernelError::InvalidOptions(format!(
            "block size {bs} is not a power of two from 512 up"
        )));
    }
    let netlink = match opts.interface {
        Interface::Ioctl => None,
        Interface::Auto | Interface::Netlink => match family() {
            Ok(f) => Some(f),
            Err(e) if opts.interface == Interface::Netlink => return Err(e),
            Err(_) => None,
        },
    };
    match netlink {
        Some(family) => connect_netlink(family, &sockets, opts),
        None => connect_ioctl(sockets, opts),
    }
}

/// Resolves the `nbd` netlink family; `ModuleMissing` when it does not exist and there is no
/// device node either.
fn family() -> Result<u16, KernelError> {
    let mut s = netlink::Socket::open().map_err(io_err("netlink socket"))?;
    match s.family_id(netlink::FAMILY_NAME) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !module_loaded() => {
            Err(KernelError::ModuleMissing)
        }
        Err(e) => Err(io_err("resolving the nbd netlink family")(e)),
    }
}

fn connect_netlink(
    family: u16,
    sockets: &[OwnedFd],
    opts: &ConnectOptions,
) -> Result<Device, KernelError> {
    let params = netlink::ConnectParams {
        index: opts.index,
        size: opts.size,
        block_size: u64::from(opts.block_size),
        timeout: opts.timeout.map(|t| t.as_secs().max(1)),
        dead_conn_timeout: opts.dead_conn_timeout.map(|t| t.as_secs()),
        server_flags: u64::from(opts.flags.0),
        client_flags: if opts.disconnect_on_close {
            netlink::CFLAG_DISCONNECT_ON_CLOSE
        } else {
            0
        },
        backend: opts.backend.clone(),
        fds: sockets.iter().map(|s| s.as_raw_fd()).collect(),
    };
    let mut s = netlink::Socket::open().map_err(io_err("netlink socket"))?;
    let replies = s
        .transact(&netlink::connect(family, &params))
        .map_err(io_err("NBD_CMD_CONNECT"))?;
    let index = netlink::connected_index(&replies)
        .or(opts.index)
        .ok_or_else(|| KernelError::Io {
            what: "NBD_CMD_CONNECT".into(),
            source: io::Error::new(io::ErrorKind::InvalidData, "reply without device index"),
        })?;
    Ok(Device {
        index,
        interface: Interface::Netlink,
        do_it: None,
    })
}

/// The first `/dev/nbdN` without a connection and with size 0.
fn free_device() -> Result<u32, KernelError> {
    if !module_loaded() {
        return Err(KernelError::ModuleMissing);
    }
    let mut indexes: Vec<u32> = fs::read_dir("/sys/block")
        .map_err(io_err("/sys/block"))?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("nbd")?
                .parse()
                .ok()
        })
        .collect();
    indexes.sort_unstable();
    indexes
        .into_iter()
        .find(|&n| {
            !is_connected(n)
                && fs::read_to_string(format!("/sys/block/nbd{n}/size"))
                    .is_ok_and(|s| s.trim() == "0")
        })
        .ok_or(KernelError::NoFreeDevice)
}

fn connect_ioctl(sockets: Vec<OwnedFd>, opts: &ConnectOptions) -> Result<Device, KernelError> {
    let index = match opts.index {
        Some(i) => i,
        None => free_device()?,
    };
    let path = device_path(index);
    if !path.exists() {
        return Err(if module_loaded() {
            KernelError::InvalidOptions(format!("{} does not exist", path.display()))
        } else {
            KernelError::ModuleMissing
        });
    }
    let dev = ioctl::open(&path).map_err(io_err(path.display().to_string()))?;
    let plan = ioctl::plan(&ioctl::Params {
        size: opts.size,
        block_size: u64::from(opts.block_size),
        timeout: opts.timeout.map(|t| t.as_secs().max(1)),
        flags: u64::from(opts.flags.0),
        fds: sockets.iter().map(|s| s.as_raw_fd()).collect(),
    });
    for c in plan {
        if let Err(e) = ioctl::call(&dev, c) {
            let _ = ioctl::call(
                &dev,
                ioctl::Call {
                    request: ioctl::NBD_CLEAR_SOCK,
                    arg: 0,
                },
            );
            return Err(io_err(format!(
                "ioctl {:#x} on {}",
                c.request,
                path.display()
            ))(e));
        }
    }
    // The kernel holds its own references to the sockets now.
    drop(sockets);
    let do_it = thread::Builder::new()
        .name(format!("nbd{index}-do-it"))
        .spawn(move || {
            let r = ioctl::call(
                &dev,
                ioctl::Call {
                    request: ioctl::NBD_DO_IT,
                    arg: 0,
                },
            );
            for request in [ioctl::NBD_CLEAR_QUE, ioctl::NBD_CLEAR_SOCK] {
                let _ = ioctl::call(&dev, ioctl::Call { request, arg: 0 });
            }
            r
        })
        .map_err(io_err("starting the NBD_DO_IT thread"))?;
    // The device is live once the kernel publishes the pid; the first open after that rescans
    // partitions.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_connected(index) && Instant::now() < deadline && !do_it.is_finished() {
        thread::sleep(Duration::from_millis(10));
    }
    let _ = fs::File::open(&path);
    Ok(Device {
        index,
        interface: Interface::Ioctl,
        do_it: Some(do_it),
    })
}

/// Disconnects `/dev/nbdN` (netlink, falling back to ioctls) and waits until it is released.
pub fn disconnect(index: u32) -> Result<(), KernelError> {
    match family() {
        Ok(f) => {
            let mut s = netlink::Socket::open().map_err(io_err("netlink socket"))?;
            s.transact(&netlink::disconnect(f, index))
                .map_err(io_err("NBD_CMD_DISCONNECT"))?;
        }
        Err(KernelError::ModuleMissing) => return Err(KernelError::ModuleMissing),
        Err(_) => {
            ioctl::disconnect(&device_path(index)).map_err(io_err("NBD_DISCONNECT"))?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_connected(index) {
        if Instant::now() > deadline {
            return Err(KernelError::Io {
                what: format!("/dev/nbd{index}"),
                source: io::Error::new(io::ErrorKind::TimedOut, "still connected after 10 s"),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Serves export `export` of `server` on `connections` socket pairs and attaches them to a
/// device. `opts.size` and `opts.flags` are filled from the export. The serving threads end when
/// the kernel disconnects.
pub fn attach(
    server: &Server,
    export: &str,
    connections: usize,
    mut opts: ConnectOptions,
) -> Result<Device, KernelError> {
    let flags = server
        .kernel_flags(export)
        .ok_or_else(|| KernelError::InvalidOptions(format!("no export named {export:?}")))?;
    let size = server
        .exports()
        .find(|e| e.name() == export || export.is_empty())
        .map(|e| e.size())
        .unwrap_or(0);
    opts.flags = flags;
    opts.size = size;
    let mut kernel_ends = Vec::new();
    for _ in 0..connections.max(1) {
        let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
        let server = server.clone();
        let name = export.to_string();
        thread::Builder::new()
            .name("nbd-kernel-conn".into())
            .spawn(move || {
                if let Err(e) = server.serve_transmission(&name, ours) {
                    log::info!("kernel connection ended: {e}");
                }
            })
            .map_err(io_err("starting a connection thread"))?;
        kernel_ends.push(OwnedFd::from(theirs));
    }
    connect(kernel_ends, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths_round_trip() {
        assert_eq!(device_path(3), Path::new("/dev/nbd3"));
        assert_eq!(device_index(Path::new("/dev/nbd12")), Some(12));
        assert_eq!(device_index(Path::new("/dev/sda")), None);
    }

    #[test]
    fn options_are_checked_before_touching_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let mut opts = ConnectOptions::new(1 << 20, TransmissionFlags(1));
        let err = connect(vec![a.into(), c.into()], &opts).unwrap_err();
        assert!(matches!(err, KernelError::InvalidOptions(_)), "{err}");
        opts.block_size = 1000;
        let (a, _b) = UnixStream::pair().unwrap();
        let err = connect(vec![a.into()], &opts).unwrap_err();
        assert!(matches!(err, KernelError::InvalidOptions(_)), "{err}");
        assert!(matches!(
            connect(Vec::new(), &opts),
            Err(KernelError::InvalidOptions(_))
        ));
    }

    #[test]
    fn missing_module_is_reported_clearly() {
        if module_loaded() {
            eprintln!("skipped: the nbd module is loaded on this machine");
            return;
        }
        let (a, _b) = UnixStream::pair().unwrap();
        let opts = ConnectOptions::new(1 << 20, TransmissionFlags(1));
        let err = connect(vec![a.into()], &opts).unwrap_err();
        assert!(matches!(err, KernelError::ModuleMissing), "{err}");
        assert!(err.to_string().contains("modprobe nbd"));
        let (a, _b) = UnixStream::pair().unwrap();
        let ioctl_only = ConnectOptions {
            interface: Interface::Ioctl,
            ..opts
        };
        assert!(matches!(
            connect(vec![a.into()], &ioctl_only),
            Err(KernelError::ModuleMissing)
        ));
        assert!(matches!(disconnect(0), Err(KernelError::ModuleMissing)));
    }
}
