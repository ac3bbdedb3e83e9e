//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2 "MMIO Device Register Layout").
//!
//! A register state machine: [`MmioTransport::read`] and [`MmioTransport::write`] take an offset
//! in the 4 KiB window and the bytes of one guest access. Registers below 0x100 are 32-bit and
//! must be accessed as such (4.2.2.2); other widths read as zero and are ignored on write. The
//! device configuration space from 0x100 accepts any width.
//!
//! Status handling (3.1.1, 2.1.2): writing 0 resets the device; the driver may only add bits;
//! `FEATURES_OK` sticks only if the accepted features are a subset of the offered ones and
//! include `VERSION_1`; `DRIVER_OK` activates the device, or sets `DEVICE_NEEDS_RESET` if the
//! queues are not usable.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, Interrupt, VirtioDevice};
use crate::error::{Error, Result};

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

/// A virtio device behind its MMIO register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<Arc<EventFd>>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt_evt` raises its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemoryMmap>,
        interrupt_evt: EventFd,
    ) -> Result<Self> {
        let queues = Self::fresh_queues(device.as_ref())?;
        let queue_evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::os("eventfd", e))?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        })
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>> {
        device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|e| Error::Config(format!("virtio queue of {max}: {e}")))
            })
            .collect()
    }

    /// The notification eventfd of each queue, for registration as KVM ioeventfds on
    /// `QueueNotify` (offset 0x50) with the queue index as data match.
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// The interrupt line, for registration as a KVM irqfd.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Handles a guest read of `data.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        let value = if data.len() != 4 || offset % 4 != 0 {
            0
        } else {
            match offset as u32 {
                VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
                VIRTIO_MMIO_VERSION => VERSION,
                VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
                VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
                VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                    0 => self.device.features() as u32,
                    1 => (self.device.features() >> 32) as u32,
                    _ => 0,
                },
                VIRTIO_MMIO_QUEUE_NUM_MAX => self
                    .device
                    .queue_max_sizes()
                    .get(self.queue_select as usize)
                    .map_or(0, |&m| u32::from(m)),
                VIRTIO_MMIO_QUEUE_READY => {
                    if self.activated {
                        u32::from((self.queue_select as usize) < self.queue_evts.len())
                    } else {
                        self.selected_queue().map_or(0, |q| u32::from(q.ready()))
                    }
                }
                VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
                VIRTIO_MMIO_STATUS => self.status,
                VIRTIO_MMIO_CONFIG_GENERATION => 0,
                _ => 0,
            }
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    /// Handles a guest write of `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            if !self.activated {
                self.device.write_config(offset - CONFIG_START, data);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let value = u32::from_le_bytes(data.try_into().unwrap());
        // Queue and feature setup is frozen once the device runs.
        let setup_allowed = !self.activated && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES
                if setup_allowed && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 =>
            {
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM if setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value.min(u32::from(u16::MAX)) as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Normally KVM consumes these writes through the ioeventfd; this path serves
                // VMs (and tests) without one.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            reg @ (VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH)
                if setup_allowed =>
            {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let (low, high) = if reg % 8 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match reg {
                    VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                        q.set_desc_table_address(low, high)
                    }
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                        q.set_avail_ring_address(low, high)
                    }
                    _ => q.set_used_ring_address(low, high),
                }
            }
            _ => {}
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device.features() == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver only ever adds bits (FAILED included); anything else is ignored.
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        let mut status = value;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FAILED == 0 {
            if status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                eprintln!("vdisk-vmm: virtio device not started: {e}");
                status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            }
        }
        self.status = status;
    }

    fn activate(&mut self) -> Result<()> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| !q.ready() || !q.is_valid(self.mem.as_ref()))
        {
            return Err(Error::Config(format!(
                "queue {i} is not ready or not inside guest memory"
            )));
        }
        let fresh = Self::fresh_queues(self.device.as_ref())?;
        let queues = std::mem::replace(&mut self.queues, fresh);
        self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts: self.queue_evts.clone(),
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        })?;
        self.activated = true;
        Ok(())
    }

    /// Resets the device as a driver writing 0 to `Status` would, stopping its I/O.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        if let Ok(queues) = Self::fresh_queues(self.device.as_ref()) {
            self.queues = queues;
        }
        // Drop notifications that arrived for the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }
}

#[cfg(test)]
mod tests;
