//! Serving vdisk block devices: an NBD server, attaching `/dev/nbdN` through the kernel's NBD
//! client, and a FUSE export for machines without the nbd module.
//!
//! ```text
//!                       ┌─> Server ── TCP / Unix socket ──> nbdinfo, nbdcopy, qemu, fio ...
//!   Arc<dyn BlockDev> ──┤      └── socketpair ── kernel::connect ──> /dev/nbdN
//!                       └─> fuse::mount ──> DIR/disk (a regular file) ──> losetup -P
//! ```
//!
//! - [`proto`]: the wire format as typed messages; nothing else parses bytes.
//! - [`Server`]: fixed-newstyle handshake (EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//!   LIST/SET_META_CONTEXT with `base:allocation` and `qemu:allocation-depth`, EXTENDED_HEADERS,
//!   STARTTLS), then concurrent request handling with out-of-order replies.
//! - [`TlsConfig`]: X.509 credentials for STARTTLS (feature `tls`).
//! - [`kernel`]: netlink (preferred) or ioctl attachment of sockets to `/dev/nbdN`.
//! - [`fuse`]: the image as a single file (feature `fuse`).
//!
//! Typical use, as the `vdisk serve` command does it:
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::net::TcpListener;
//! use vdisk_formats::{open, OpenOptions};
//! use vdisk_nbd::{Export, Server};
//!
//! let dev = open("disk.qcow2".as_ref(), OpenOptions::default())?;
//! let server = Server::new(vec![Export::new("", dev).description("my disk")]);
//! server.serve(TcpListener::bind("127.0.0.1:10809")?)?;
//! # Ok(()) }
//! ```

#[cfg(feature = "fuse")]
pub mod fuse;
pub mod kernel;
pub mod proto;
mod server;
#[cfg(feature = "tls")]
mod tls;
mod transport;

pub use server::{Context, Export, Server};
#[cfg(feature = "tls")]
pub use tls::{TlsConfig, TlsError};
pub use transport::{Listener, Socket};
