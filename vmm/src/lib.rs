//! A minimal KVM virtual machine monitor whose disks are vdisk block devices.
//!
//! It boots a Linux kernel (ELF `vmlinux` through PVH or the 64-bit entry, or a bzImage through
//! the 64-bit boot protocol) on an x86-64 host with `/dev/kvm`, and gives the guest:
//!
//! * one virtio-blk device per [`DiskConfig`] on the virtio-mmio transport, served by an I/O
//!   thread per disk through the [`BlockDev`](vdisk_formats::BlockDev) trait, so raw and qcow2
//!   images (and anything else the block layer opens) work alike;
//! * an 8250 UART on COM1 wired to the terminal, a file, or nothing;
//! * an i8042 whose reset command ends the VM, an ACPI power-off port;
//! * in-kernel LAPICs, IOAPIC and PIT; several vCPUs;
//! * a seccomp filter on every VMM thread before the guest runs ([`seccomp`]).
//!
//! Disks are announced twice, so any kernel finds them: as `virtio_mmio.device=4K@ADDR:GSI` on the
//! command line (kernels with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`) and as `LNRO0005` devices in
//! the ACPI DSDT (stock distribution kernels).
//!
//! ```text
//!   VmConfig ──> Vm::new ──> Vm::run ──> ExitReason
//!                  │
//!     ┌────────────┼──────────────────────────────┐
//!     │ arch/      │ layout, boot (loader, zero   │
//!     │            │ page, PVH), regs, cpu, acpi  │
//!     │ vcpu       │ KVM_RUN loop ──> devices/    │ (PIO: COM1, i8042, ACPI sleep;
//!     │            │                              │  MMIO: virtio/mmio transports)
//!     │ virtio/    │ mmio transport, block device │──> I/O thread ──> Arc<dyn BlockDev>
//!     │ console    │ raw terminal, Ctrl-A x       │
//!     └────────────┴──────────────────────────────┘
//! ```
//!
//! Example (what `vdisk boot` does):
//!
//! ```no_run
//! use vdisk_vmm::{DiskSpec, SerialConfig, Vm, VmConfig};
//!
//! let mut cfg = VmConfig::new("vmlinux");
//! cfg.disks.push(DiskSpec::parse("disk.qcow2,format=qcow2")?.open(0)?);
//! cfg.serial = SerialConfig::Stdio;
//! let reason = Vm::new(cfg)?.run()?;
//! println!("guest stopped: {reason:?}");
//! # Ok::<(), vdisk_vmm::Error>(())
//! ```
//!
//! Only x86-64 Linux hosts are supported.

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("vdisk-vmm supports x86-64 Linux hosts only");

pub mod arch;
pub mod config;
mod console;
pub mod devices;
pub mod error;
mod exit;
pub mod seccomp;
mod vcpu;
pub mod virtio;
mod vm;

pub use config::{
    parse_memory, DiskConfig, DiskSpec, SerialConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY,
    MAX_CPUS,
};
pub use error::{Error, Result};
pub use exit::ExitReason;
pub use vm::Vm;
