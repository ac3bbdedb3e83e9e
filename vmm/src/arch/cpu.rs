//! Per-vCPU identity and model-specific state: CPUID, boot MSRs and the local APIC's LINT pins.
//!
//! CPUID is what `KVM_GET_SUPPORTED_CPUID` reports, passed through (so the KVM signature leaf
//! `0x4000_0000` that paravirtual guests look for survives), with the few fields that must differ
//! per vCPU patched: the initial APIC id and the logical processor count.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

use crate::error::{Error, Result};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;
const APIC_MODE_EXTINT: u32 = 0x700;

/// Patches the host-supported CPUID for vCPU `id` of `count`.
pub fn patch_cpuid(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8) {
    for entry in entries {
        match entry.function {
            1 => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // EDX[28] HTT: the count above is meaningful.
                if count > 1 {
                    entry.edx |= 1 << 28;
                }
                // ECX[31]: running under a hypervisor.
                entry.ecx |= 1 << 31;
            }
            // Extended topology: EDX is the x2APIC id of this vCPU.
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

/// Gives `vcpu` the host-supported CPUID patched for its id.
pub fn setup_cpuid(vcpu: &VcpuFd, supported: &CpuId, id: u8, count: u8) -> Result<()> {
    let mut cpuid = supported.clone();
    patch_cpuid(cpuid.as_mut_slice(), id, count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))
}

/// The MSR values Linux expects at entry: syscall MSRs cleared, fast strings on, MTRRs on with
/// write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes [`boot_msrs`]; every one must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Memory {
        what: format!("MSR list: {e:?}"),
    })?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
    if written != entries.len() {
        return Err(Error::Vcpu {
            cpu: 0,
            what: format!(
                "KVM accepted only {written} of {} boot MSRs (first refused: {:#x})",
                entries.len(),
                entries[written].index
            ),
        });
    }
    Ok(())
}

/// Wires LINT0 as ExtINT (the 8259's output) and LINT1 as NMI, as a PC's BIOS would.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let value = (u32::from_le_bytes(bytes) & !APIC_MODE_MASK) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ebx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_gets_the_apic_id_and_count_of_each_vcpu() {
        let mut entries = [
            leaf(1, 0xff00_0800, 0),
            leaf(0xb, 0, 7),
            leaf(0x4000_0000, 0x4b4d_564b, 0x4d),
        ];
        patch_cpuid(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx, 0x0304_0800);
        assert_eq!(entries[0].edx & (1 << 28), 1 << 28);
        assert_eq!(entries[0].ecx >> 31, 1);
        assert_eq!(entries[1].edx, 3);
        // The KVM signature leaf passes through untouched.
        assert_eq!((entries[2].ebx, entries[2].edx), (0x4b4d_564b, 0x4d));
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_mtrrs() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|m| m.index == i).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
    }
}
