//! virtio-blk (virtio 1.2, 5.2) over a vdisk [`BlockDev`](vdisk_formats::BlockDev).
//!
//! ```text
//!  device.rs   Block: features, config space, activate -> Worker
//!  worker.rs   Worker: I/O thread, ioeventfd in, irqfd out; process_queue
//!  request.rs  parse -> execute -> Completion
//! ```
//!
//! Features offered: `VERSION_1`, `FLUSH`, `SEG_MAX`, `BLK_SIZE`, and `RO` for read-only disks or
//! `DISCARD` + `WRITE_ZEROES` for writable ones. Request types: `IN`, `OUT`, `FLUSH`, `GET_ID`,
//! `DISCARD`, `WRITE_ZEROES`; anything else is answered `VIRTIO_BLK_S_UNSUPP`.

pub mod device;
pub mod request;
pub mod worker;

pub use device::{Block, QUEUE_SIZE, VIRTIO_ID_BLOCK};
pub use request::Disk;

#[cfg(test)]
mod tests;
