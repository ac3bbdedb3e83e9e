//! Boot-time CPU state of the first vCPU: GDT, identity page tables, segment and control
//! registers for the two entry modes.
//!
//! * 64-bit Linux boot protocol (`Documentation/arch/x86/boot.rst`, "64-bit Boot Protocol"):
//!   long mode with paging, an identity map covering the kernel, zero page and command line,
//!   `__BOOT_CS`/`__BOOT_DS` flat segments, `rsi` = zero page.
//! * PVH (Xen `docs/misc/pvh.pandoc`): 32-bit protected mode, paging off, flat 4 GiB code and
//!   data segments, `ebx` = `hvm_start_info`.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::error::{Error, Result};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits: present, writable, page size (2 MiB in a PD).
const PTE_P_RW: u64 = 0x3;
const PTE_PS: u64 = 0x80;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Long mode at `entry`, `rsi` pointing at the zero page.
    Linux64,
    /// 32-bit protected mode at `entry`, `ebx` pointing at `hvm_start_info`.
    Pvh,
}

/// Encodes a GDT descriptor from its access/flags word (`0xF0FF` bits of bytes 5-6), base and
/// 20-bit limit (Intel SDM vol. 3, 3.4.5 "Segment Descriptors").
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The `kvm_segment` a selector loaded with GDT entry `index` would cache.
fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The four GDT entries for `mode`: null, code, data, TSS.
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, G
            gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB, G, B
            gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
        ],
        EntryMode::Pvh => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB
            gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB
            gdt_entry(0x008b, 0, 0x67),    // busy 32-bit TSS
        ],
    }
}

fn write_u64(mem: &GuestMemoryMmap, addr: u64, value: u64) -> Result<()> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|e| Error::Memory {
            what: format!("writing boot structures at {addr:#x}: {e}"),
        })
}

/// Writes the GDT and an empty IDT.
fn write_gdt(mem: &GuestMemoryMmap, table: &[u64; 4]) -> Result<()> {
    for (i, entry) in table.iter().enumerate() {
        write_u64(mem, layout::GDT_ADDR + 8 * i as u64, *entry)?;
    }
    write_u64(mem, layout::IDT_ADDR, 0)
}

/// Writes page tables that identity-map the first 4 GiB with 2 MiB pages.
pub fn write_identity_map(mem: &GuestMemoryMmap) -> Result<()> {
    write_u64(mem, layout::PML4_ADDR, layout::PDPT_ADDR | PTE_P_RW)?;
    for gib in 0..4u64 {
        let pd = layout::PD_ADDR + gib * 0x1000;
        write_u64(mem, layout::PDPT_ADDR + gib * 8, pd | PTE_P_RW)?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            write_u64(mem, pd + i * 8, phys | PTE_P_RW | PTE_PS)?;
        }
    }
    Ok(())
}

/// Puts the boot vCPU into `mode` at `entry`: GDT and page tables in memory, segment, control
/// and general registers, FPU defaults.
pub fn setup_boot_cpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    entry: u64,
) -> Result<()> {
    let table = gdt(mode);
    write_gdt(mem, &table)?;

    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    let code = segment_from_gdt(table[1], 1);
    let data = segment_from_gdt(table[2], 2);
    let tss = segment_from_gdt(table[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    // Caches on (CD/NW clear), protected mode.
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_ET;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 => {
            write_identity_map(mem)?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = layout::BOOT_STACK;
            regs.rbp = layout::BOOT_STACK;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
        EntryMode::Pvh => {
            sregs.cr0 &= !CR0_PG;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = layout::PVH_INFO_ADDR;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    setup_fpu(vcpu)
}

/// x87 control word and MXCSR at their reset values with all exceptions masked.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::kvm("KVM_SET_FPU", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_have_the_known_encodings() {
        // The same values every x86 VMM writes (and Linux's own GDT_ENTRY macro produces).
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0xc09b, 0x1234_5678, 0xabcde),
            0x12ca_9b34_5678_bcde
        );
    }

    #[test]
    fn segments_decode_back_from_descriptors() {
        let code = segment_from_gdt(gdt(EntryMode::Linux64)[1], 1);
        assert_eq!((code.selector, code.type_, code.l, code.db), (8, 0xb, 1, 0));
        assert_eq!(
            (code.limit, code.present, code.s, code.g),
            (0xffff_ffff, 1, 1, 1)
        );
        let code32 = segment_from_gdt(gdt(EntryMode::Pvh)[1], 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt(EntryMode::Pvh)[3], 3);
        assert_eq!(
            (tss.selector, tss.limit, tss.s, tss.unusable),
            (0x18, 0x67, 0, 0)
        );
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn identity_map_covers_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4, layout::PDPT_ADDR | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(layout::PDPT_ADDR + 24)).unwrap();
        assert_eq!(pdpt3, (layout::PD_ADDR + 0x3000) | 3);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }
}
