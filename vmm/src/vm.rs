//! Building a VM from a [`VmConfig`] and running it to its end.
//!
//! [`Vm::new`] does everything that can fail before the guest runs: KVM VM with in-kernel
//! irqchip and PIT, guest memory, devices and their irqfds/ioeventfds, kernel/initrd/command line,
//! boot structures and ACPI tables, vCPUs with CPUID/MSRs/LAPIC and the boot registers.
//! The disks' I/O threads start here too, already confined to their seccomp filter.
//! [`Vm::run`] starts the vCPU threads (and the console), confines the calling thread, lets the
//! vCPUs enter the guest, waits for the first exit, stops everything, flushes the disks and
//! returns why the VM ended.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::{I8042Device, Serial};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, VirtioMmioWindow};
use crate::arch::{boot, cpu, layout, regs};
use crate::config::{SerialConfig, VmConfig};
use crate::console::Console;
use crate::devices::legacy::{IrqLine, ResetTrigger, Unbuffered};
use crate::devices::Devices;
use crate::error::{Error, Result};
use crate::exit::{ExitReason, VmExit};
use crate::seccomp::{self, Filters, ThreadKind};
use crate::vcpu::{self, StartGate};
use crate::virtio::block::{Block, Disk};
use crate::virtio::mmio::MmioTransport;

/// Offset of `QueueNotify` in a virtio-mmio window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: vCPU fds before the VM fd before the memory they map.
    vcpus: Vec<VcpuFd>,
    devices: Arc<Devices>,
    exit: Arc<VmExit>,
    disks: Vec<Disk>,
    serial: SerialConfig,
    boot_mode: regs::EntryMode,
    /// `None` with seccomp off.
    filters: Option<Filters>,
    _vm_fd: VmFd,
    _kvm: Kvm,
    _mem: Arc<GuestMemoryMmap>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .field("disks", &self.disks.len())
            .field("boot_mode", &self.boot_mode)
            .field("seccomp", &self.filters.is_some())
            .finish_non_exhaustive()
    }
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))
}

/// Creates guest memory and hands every region to KVM.
fn create_memory(vm: &VmFd, size: u64) -> Result<Arc<GuestMemoryMmap>> {
    let mem =
        GuestMemoryMmap::from_ranges(&layout::ram_regions(size)).map_err(|e| Error::Memory {
            what: format!("allocating {size} bytes: {e}"),
        })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory {
                what: format!("region at {:#x}: {e}", region.start_addr().0),
            })?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live anonymous mapping of exactly `memory_size` bytes owned by
        // `mem`; the `Vm` keeps `mem` alive (behind an Arc also held by the device threads,
        // which are joined before it is dropped) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(Arc::new(mem))
}

fn serial_output(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>> {
    Ok(match cfg {
        SerialConfig::Stdio => Box::new(Unbuffered(std::io::stdout())),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| Error::File {
                    path: path.clone(),
                    what: "cannot open the serial output file",
                    source,
                })?,
        ),
    })
}

impl Vm {
    /// Builds the VM; nothing runs yet.
    pub fn new(cfg: VmConfig) -> Result<Vm> {
        cfg.validate()?;
        let filters = if cfg.seccomp {
            seccomp::install_violation_report()?;
            Some(Filters::compile()?)
        } else {
            None
        };
        let io_filter = filters.as_ref().map(|f| f.get(ThreadKind::DiskIo));
        let kvm = Kvm::new().map_err(|e| Error::kvm("opening /dev/kvm", e))?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        // Guest memory first: registered before the interrupt controllers exist, the slot
        // takes 0.1 ms here; after them, waiting for KVM's SRCU grace period took 4 to 12 ms.
        let mem = create_memory(&vm_fd, cfg.memory)?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
        let exit = Arc::new(VmExit::new()?);

        // COM1 and the i8042.
        let com1_irq = eventfd()?;
        vm_fd
            .register_irqfd(&com1_irq, layout::COM1_GSI)
            .map_err(|e| Error::kvm("KVM_IRQFD (COM1)", e))?;
        let serial = Serial::new(IrqLine(com1_irq), serial_output(&cfg.serial)?);
        let i8042 = I8042Device::new(ResetTrigger(exit.clone()));

        // One virtio-mmio window, GSI, irqfd and ioeventfd per disk.
        let mut cmdline =
            Cmdline::try_from(&cfg.cmdline, layout::CMDLINE_MAX).map_err(Error::Cmdline)?;
        let mut transports = Vec::new();
        let mut windows = Vec::new();
        let mut disks = Vec::new();
        for (i, disk) in cfg.disks.iter().enumerate() {
            let addr = layout::virtio_mmio_addr(i);
            let gsi = layout::virtio_gsi(i);
            let served = Disk::new(disk.dev.clone(), disk.read_only, &disk.id);
            let block = Block::new(served.clone(), format!("vdisk-blk{i}"), io_filter.clone())?;
            let irq = eventfd()?;
            vm_fd
                .register_irqfd(&irq, gsi)
                .map_err(|e| Error::kvm("KVM_IRQFD (virtio)", e))?;
            let transport = MmioTransport::new(Box::new(block), mem.clone(), irq)?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                        q as u32,
                    )
                    .map_err(|e| Error::kvm("KVM_IOEVENTFD", e))?;
            }
            cmdline
                .add_virtio_mmio_device(layout::VIRTIO_MMIO_SIZE, GuestAddress(addr), gsi, None)
                .map_err(Error::Cmdline)?;
            transports.push(transport);
            windows.push(VirtioMmioWindow { addr, gsi });
            disks.push(served);
        }

        // Kernel, initrd, boot structures, ACPI.
        let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
        let initrd = match &cfg.initrd {
            Some(path) => Some(boot::load_initrd(
                &mem,
                path,
                cfg.memory,
                kernel.end,
                boot::initrd_addr_max(&kernel),
            )?),
            None => None,
        };
        boot::write_boot_info(&mem, &kernel, &cmdline, initrd, cfg.memory)?;
        acpi::write_tables(&mem, cfg.cpus, &windows)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
            cpu::setup_cpuid(&vcpu, &supported, id, cfg.cpus)?;
            cpu::setup_msrs(&vcpu).map_err(|e| match e {
                Error::Vcpu { what, .. } => Error::Vcpu { cpu: id, what },
                other => other,
            })?;
            cpu::setup_lint(&vcpu)?;
            regs::setup_fpu(&vcpu)?;
            if id == 0 {
                regs::setup_boot_cpu(&vcpu, &mem, kernel.mode, kernel.entry)?;
            }
            vcpus.push(vcpu);
        }

        let devices = Arc::new(Devices::new(serial, i8042, transports, exit.clone()));
        Ok(Vm {
            vcpus,
            devices,
            exit,
            disks,
            serial: cfg.serial,
            boot_mode: kernel.mode,
            filters,
            _vm_fd: vm_fd,
            _kvm: kvm,
            _mem: mem,
        })
    }

    /// Whether the kernel is entered through PVH (`true`) or the 64-bit Linux boot protocol.
    pub fn boots_pvh(&self) -> bool {
        self.boot_mode == regs::EntryMode::Pvh
    }

    /// Runs the guest until it resets, powers off, shuts down, the user quits, or a vCPU fails;
    /// then stops every thread, restores the terminal and flushes the disks.
    ///
    /// With seccomp on (the default), the calling thread is confined to the main-thread filter
    /// before the guest runs, for good: after this returns it can still print, free memory,
    /// flush and close files and exit, but not open files or start processes or threads.
    pub fn run(mut self) -> Result<ExitReason> {
        vcpu::install_kick_handler()?;
        let filter = |kind| self.filters.as_ref().map(|f| f.get(kind));
        let console = match self.serial {
            SerialConfig::Stdio => Console::start(
                self.devices.clone(),
                self.exit.clone(),
                filter(ThreadKind::Console),
            )?,
            _ => None,
        };
        let gate = Arc::new(StartGate::default());
        let mut threads = Vec::new();
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let spawned = vcpu::spawn(
                id as u8,
                fd,
                self.devices.clone(),
                self.exit.clone(),
                filter(ThreadKind::Vcpu),
                gate.clone(),
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.exit.request(Err(e));
                    break;
                }
            }
        }
        if let Some(filters) = &self.filters {
            // Every other thread (disk I/O, console, vCPUs) confined, then this one.
            let confined = filters
                .confirm_all()
                .and_then(|()| filters.get(ThreadKind::Main).install());
            if let Err(e) = confined {
                self.exit.request(Err(e));
            }
        }
        gate.open();
        let reason = self.exit.wait();
        vcpu::stop_all(threads);
        drop(console);
        self.devices.stop_virtio();
        let mut flushed = Ok(());
        // A disk the guest flushed after its last write has nothing left to flush.
        for disk in self.disks.iter().filter(|d| d.needs_flush()) {
            if let Err(e) = disk.flush() {
                flushed = flushed.and(Err(Error::Disk {
                    spec: format!(
                        "{} (flush at exit)",
                        disk.dev.info().map(|i| i.filename).unwrap_or_default()
                    ),
                    source: e,
                }));
            }
        }
        let reason = reason?;
        flushed.map(|()| reason)
    }
}
