//! Routing of vCPU I/O exits to the devices.
//!
//! ```text
//!   port 0x3f8..0x3ff  COM1 (SerialDevice)
//!   port 0x60, 0x64    i8042 (reset only)
//!   port 0x3c0         ACPI sleep control (power off)
//!   0xd000_0000 + 4 KiB * n   virtio-mmio transport n
//! ```
//!
//! Anything else reads as all ones (ports) or zeros (MMIO) and ignores writes, as an empty ISA
//! bus does. Each device has its own lock, so vCPUs only contend when they touch the same one.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::arch::layout;
use crate::exit::{ExitReason, VmExit};
use crate::virtio::mmio::MmioTransport;

pub mod legacy;

use legacy::{ResetDevice, SerialDevice};

/// All devices of a VM.
pub(crate) struct Devices {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<ResetDevice>,
    virtio: Vec<Mutex<MmioTransport>>,
    exit: Arc<VmExit>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in one vCPU thread must not wedge the others: the state is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("virtio", &self.virtio.len())
            .finish_non_exhaustive()
    }
}

impl Devices {
    pub fn new(
        serial: SerialDevice,
        i8042: ResetDevice,
        virtio: Vec<MmioTransport>,
        exit: Arc<VmExit>,
    ) -> Self {
        Devices {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            virtio: virtio.into_iter().map(Mutex::new).collect(),
            exit,
        }
    }

    pub fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        lock(&self.serial)
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (layout::COM1_PORT..layout::COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial().read((p - layout::COM1_PORT) as u8);
            }
            layout::I8042_DATA_PORT | layout::I8042_CMD_PORT if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - layout::I8042_DATA_PORT) as u8);
            }
            _ => {}
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            p if (layout::COM1_PORT..layout::COM1_PORT + 8).contains(&p) && data.len() == 1 => {
                // An output error (closed stdout) drops the byte; the guest cannot act on it.
                let _ = self.serial().write((p - layout::COM1_PORT) as u8, data[0]);
            }
            layout::I8042_DATA_PORT | layout::I8042_CMD_PORT if data.len() == 1 => {
                let _ = lock(&self.i8042).write((port - layout::I8042_DATA_PORT) as u8, data[0]);
            }
            layout::ACPI_SLEEP_PORT if data.len() == 1 && legacy::is_poweroff(data[0]) => {
                self.exit.request(Ok(ExitReason::PowerOff));
            }
            _ => {}
        }
    }

    fn transport(&self, addr: u64) -> Option<(MutexGuard<'_, MmioTransport>, u64)> {
        let rel = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let index = (rel / layout::VIRTIO_MMIO_SIZE) as usize;
        let dev = self.virtio.get(index)?;
        Some((lock(dev), rel % layout::VIRTIO_MMIO_SIZE))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.transport(addr) {
            Some((mut dev, offset)) => dev.read(offset, data),
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((mut dev, offset)) = self.transport(addr) {
            dev.write(offset, data);
        }
    }

    /// Resets every virtio device, stopping their I/O threads (used when the VM ends).
    pub fn stop_virtio(&self) {
        for dev in &self.virtio {
            lock(dev).shutdown();
        }
    }
}
