//! The virtio-blk device model: feature bits and configuration space derived from the block
//! device's [`Capabilities`](vdisk_formats::Capabilities), and an I/O thread that serves the
//! queue from activation to reset.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use std::sync::Arc;

use super::request::{Disk, MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS, SECTOR_SIZE};
use super::worker::Worker;
use crate::error::{Error, Result};
use crate::seccomp::ThreadFilter;
use crate::virtio::{Activation, VirtioDevice};

/// virtio device id of a block device (5.2.1).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the configuration space we fill (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;

/// A virtio-blk device on one [`Disk`].
#[derive(Debug)]
pub struct Block {
    features: u64,
    config: [u8; CONFIG_LEN],
    worker: Worker,
}

impl Block {
    /// Makes the device and starts its idle I/O thread, named `name` and confined to
    /// `io_filter` when given.
    pub fn new(
        disk: Disk,
        name: impl Into<String>,
        io_filter: Option<Arc<ThreadFilter>>,
    ) -> Result<Self> {
        let caps = disk.dev.capabilities();
        let blk_size = match caps.min_block {
            n if n.is_power_of_two() && (512..=4096).contains(&n) => n,
            _ => SECTOR_SIZE as u32,
        };
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }

        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(caps.size / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max: header and status aside
        put(20, &blk_size.to_le_bytes()); // blk_size
        let alignment = (caps.discard_granularity as u64 / SECTOR_SIZE).max(1) as u32;
        put(36, &MAX_DWZ_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &(MAX_DWZ_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        put(44, &alignment.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DWZ_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &(MAX_DWZ_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        Ok(Block {
            features,
            config,
            worker: Worker::spawn(name.into(), disk, io_filter)?,
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Reads past the structure return zeros (4.2.2.2 leaves them undefined).
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, act: Activation) -> Result<()> {
        let Activation {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
            ..
        } = act;
        let (Some(queue), Some(notify)) = (queues.pop(), queue_evts.pop()) else {
            return Err(Error::Config(
                "virtio-blk activated without its queue".into(),
            ));
        };
        self.worker.start(queue, notify, mem, interrupt)
    }

    fn reset(&mut self) {
        // Requests in flight complete first.
        self.worker.stop();
    }
}
