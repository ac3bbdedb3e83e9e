//! The guest physical address map.
//!
//! ```text
//!  0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//!  0x0000_6000  PVH hvm_start_info       0x0000_6040  PVH module list (initrd)
//!  0x0000_7000  zero page (Linux boot) or PVH memory map
//!  0x0000_8ff0  boot stack (grows down)
//!  0x0000_9000  PML4 -> 0xa000 PDPT -> 0xb000..0xf000 four PDs (identity map of 4 GiB, 2 MiB pages)
//!  0x0002_0000  kernel command line
//!  0x0009_fc00 .. 0x0010_0000  reserved (EBDA, ACPI tables from 0xe0000)
//!  0x0010_0000  kernel (ELF segments at their physical addresses, bzImage at code32_start)
//!   ... RAM ...  initrd at the top of low RAM
//!  0xc000_0000 .. 0x1_0000_0000  MMIO gap: virtio-mmio windows from 0xd000_0000 (4 KiB each),
//!               IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000, KVM TSS 0xfffb_d000
//!  0x1_0000_0000  RAM above 3 GiB continues here
//! ```
//!
//! The low addresses follow Firecracker's layout, which stock and microVM kernels accept.

use vm_memory::GuestAddress;

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories, one per GiB of the identity map.
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted (Linux's `COMMAND_LINE_SIZE` on x86).
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const RSDP_ADDR: u64 = 0xe0000;
/// End of the ACPI table area (the old BIOS ROM window).
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// COM1 ports and interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_GSI: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
/// The ACPI sleep control register of the hardware-reduced FADT (S5 = power off).
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// GSI of the first virtio device; the IOAPIC has 24 pins, so devices get 5..=23.
pub const VIRTIO_GSI_BASE: u32 = 5;
pub const MAX_VIRTIO_DEVICES: usize = 19;

pub const MIN_MEMORY: u64 = 16 << 20;
/// Limited by the 4 GiB identity map only for the boot structures; RAM itself may be larger,
/// but beyond this nothing has been tried.
pub const MAX_MEMORY: u64 = 256 << 30;

/// Address of the virtio-mmio window of device `index`.
pub fn virtio_mmio_addr(index: usize) -> u64 {
    VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE
}

/// GSI of virtio device `index`.
pub fn virtio_gsi(index: usize) -> u32 {
    VIRTIO_GSI_BASE + index as u32
}

/// The RAM regions for `size` bytes of guest memory: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// End (exclusive) of the RAM below 4 GiB.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Kind of an e820 / PVH memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemKind {
    Ram = 1,
    Reserved = 2,
}

/// The memory map given to the guest: RAM below the EBDA, the reserved BIOS area (ACPI tables),
/// RAM from 1 MiB up, RAM above 4 GiB.
pub fn memory_map(size: u64) -> Vec<(u64, u64, MemKind)> {
    let mut map = vec![
        (0, EBDA_START, MemKind::Ram),
        (EBDA_START, HIMEM_START - EBDA_START, MemKind::Reserved),
        (HIMEM_START, low_ram_end(size) - HIMEM_START, MemKind::Ram),
    ];
    if size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, size - MMIO_GAP_START, MemKind::Ram));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_the_gap_moves_past_4g() {
        assert_eq!(ram_regions(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (GuestAddress(0), 3 << 30));
        assert_eq!(regions[1], (GuestAddress(4 << 30), 1 << 30));
        let map = memory_map(4 << 30);
        assert_eq!(map.last(), Some(&(4 << 30, 1 << 30, MemKind::Ram)));
        assert_eq!(map[2], (HIMEM_START, (3 << 30) - HIMEM_START, MemKind::Ram));
    }

    #[test]
    fn virtio_windows_fit_in_the_gap_below_the_ioapic() {
        let last = virtio_mmio_addr(MAX_VIRTIO_DEVICES - 1) + VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && last <= u64::from(IOAPIC_ADDR));
        assert_eq!(virtio_gsi(MAX_VIRTIO_DEVICES - 1), 23);
    }
}
