//! The PC devices a Linux guest expects at fixed I/O ports, as state machines from
//! `vm-superio` with the VMM's triggers plugged in.
//!
//! * COM1: a 16550A UART at 0x3f8, interrupt on GSI 4 through an irqfd.
//! * i8042: only the CPU-reset command (0xFE to port 0x64), which ends the VM.
//! * ACPI sleep control register (port 0x3c0): `SLP_EN` with `SLP_TYP` 5 powers off.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, VmExit};

/// An interrupt line raised by writing an eventfd (a KVM irqfd).
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Ends the VM with [`ExitReason::Reset`].
#[derive(Debug)]
pub(crate) struct ResetTrigger(pub Arc<VmExit>);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.request(Ok(ExitReason::Reset));
        Ok(())
    }
}

/// The COM1 UART.
pub type SerialDevice = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// The i8042 keyboard controller (reset only).
pub(crate) type ResetDevice = I8042Device<ResetTrigger>;

/// Writes through to `inner` and flushes after every write, so a console shows prompts that do
/// not end in a newline.
#[derive(Debug)]
pub struct Unbuffered<W: Write>(pub W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `SLP_EN` bit of the hardware-reduced sleep control register (ACPI 6.5, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
/// Sleep type the DSDT's `\_S5_` package names.
const SLP_TYP_S5: u8 = 5;

/// Whether a write of `value` to the sleep control register means "power off".
pub fn is_poweroff(value: u8) -> bool {
    value & SLP_EN != 0 && (value >> 2) & 0x7 == SLP_TYP_S5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_output_reaches_the_writer_and_raises_the_irq() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let out: Box<dyn Write + Send> = Box::new(Vec::new());
        let mut serial: SerialDevice = Serial::new(IrqLine(irq.try_clone().unwrap()), out);
        serial.write(1, 0x2).unwrap(); // IER: transmitter holding register empty
        serial.write(0, b'A').unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        serial.enqueue_raw_bytes(b"x").unwrap();
        assert_eq!(serial.read(0), b'x');
    }

    #[test]
    fn i8042_reset_command_ends_the_vm() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut dev = I8042Device::new(ResetTrigger(exit.clone()));
        dev.write(0, 0xfe).unwrap();
        assert!(
            !exit.is_requested(),
            "0xFE on the data port is not a command"
        );
        dev.write(4, 0xfe).unwrap();
        assert_eq!(exit.wait().unwrap(), ExitReason::Reset);
    }

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        assert!(is_poweroff((5 << 2) | SLP_EN));
        assert!(!is_poweroff(5 << 2));
        assert!(!is_poweroff((3 << 2) | SLP_EN));
    }
}
