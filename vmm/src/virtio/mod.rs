//! virtio devices and their MMIO transport.
//!
//! ```text
//!   vCPU MMIO exit ──> MmioTransport (registers, status, queue setup)
//!                          │ DRIVER_OK: Activation { queues, notify eventfds, interrupt }
//!                          v
//!                      dyn VirtioDevice (Block) ──> I/O thread ──> Interrupt ──> irqfd
//! ```
//!
//! Devices do no register decoding and the transport does no device I/O: the same [`Block`]
//! could sit behind a PCI transport.
//!
//! [`Block`]: block::Block

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;

pub mod block;
pub mod mmio;

/// `InterruptStatus` bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one device: the status bits the driver reads and acknowledges, and the
/// eventfd that raises the GSI (a KVM irqfd in a VM, a plain eventfd in tests).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets [`INT_VRING`] and raises the line.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd raising the line.
    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
#[derive(Debug)]
pub struct Activation {
    pub mem: Arc<GuestMemoryMmap>,
    /// The configured queues, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue, signalled on `QueueNotify` (shared with the
    /// transport, which registers it with KVM and drains it on reset).
    pub queue_evts: Vec<Arc<EventFd>>,
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device id (2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space; ignored by default (read-only config).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, act: Activation) -> Result<()>;
    /// Stops serving the queues (device reset); the device may be activated again.
    fn reset(&mut self);
}
