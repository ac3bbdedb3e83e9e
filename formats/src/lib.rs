//! The block layer of vdisk.
//!
//! ```text
//!            image::open(path, format?) ──probe──> Format
//!                         │
//!                         v
//!   Arc<dyn BlockDev> = Raw | Qcow2 | Luks   (block.rs: the trait)
//!                         │
//!                     HostFile          (host_file.rs: pread/pwrite, fallocate, SEEK_HOLE)
//! ```
//!
//! Nothing here knows about NBD or KVM: the NBD server and the VMM both consume [`BlockDev`].

pub mod block;
pub mod chain;
pub mod convert;
pub mod error;
pub mod host_file;
pub mod image;
pub mod info;
pub mod luks;
#[cfg(any(test, feature = "test-utils"))]
pub mod mem;
pub mod qcow2;
pub mod raw;
pub mod throttle;
pub mod units;

pub use block::{BlockDev, Capabilities, Extent, ExtentKind, ZeroFlags};
pub use chain::BackingPolicy;
pub use error::{Error, ErrorKind, Result};
pub use image::{
    create, describe, open, open_with_secret, open_with_secrets, probe, resize_image,
    CreateOptions, Format, OpenOptions, Preallocation, ResizeOptions,
};
pub use info::{
    BackingInfo, BitmapInfo, ChildInfo, FormatSpecific, NodeInfo, Qcow2Info, SnapshotInfo,
};
pub use info::{Luks2Info, Luks2KeyslotInfo, LuksInfo, LuksSlotInfo};
pub use luks::Passphrase;
