//! ACPI tables, so that kernels without `virtio_mmio.device=` support (stock distribution
//! kernels) still find the disks, the CPUs and the interrupt controller.
//!
//! ```text
//!  0xe0000 RSDP ──> XSDT ──┬─> FACP (hardware-reduced) ──> DSDT: \_SB_.COM1 (PNP0501)
//!                          │                                     \_SB_.PS2_ (PNP0303)
//!                          │                                     \_SB_.V000.. (LNRO0005, one per disk)
//!                          │                                     \_S5_ (power off)
//!                          └─> APIC (MADT): one local APIC per vCPU, the IOAPIC
//! ```
//!
//! The FADT's sleep control register is an I/O port ([`layout::ACPI_SLEEP_PORT`]); writing
//! `SLP_EN` with sleep type 5 there powers the VM off.

use acpi_tables::aml::{
    self, Device, EISAName, Memory32Fixed, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use crate::error::{Error, Result};

const OEM_ID: [u8; 6] = *b"VDISK ";
const OEM_TABLE_ID: [u8; 8] = *b"VDISKVMM";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flag: no VGA.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct VirtioMmioWindow {
    pub addr: u64,
    pub gsi: u32,
}

/// Already-encoded AML, so that each device can be built in one expression (the AML builders
/// borrow their children).
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn encode(aml: &dyn Aml) -> Encoded {
    Encoded(to_bytes(aml))
}

/// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`.
fn edge_irq(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// Builds the DSDT body (AML, without the table header).
pub fn dsdt_aml(windows: &[VirtioMmioWindow]) -> Vec<u8> {
    let com1 = encode(&Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_DDN".into(), &"COM1"),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &edge_irq(layout::COM1_GSI),
                    &IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8),
                ]),
            ),
        ],
    ));
    let ps2 = encode(&Device::new(
        "PS2_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(layout::I8042_DATA_PORT, layout::I8042_DATA_PORT, 1, 1),
                    &IO::new(layout::I8042_CMD_PORT, layout::I8042_CMD_PORT, 1, 1),
                    &edge_irq(1),
                ]),
            ),
        ],
    ));
    let virtio: Vec<Encoded> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            encode(&Device::new(
                format!("V{i:03X}").as_str().into(),
                vec![
                    &Name::new("_HID".into(), &"LNRO0005"),
                    &Name::new("_UID".into(), &(i as u32)),
                    &Name::new("_CCA".into(), &aml::ONE),
                    &Name::new(
                        "_CRS".into(),
                        &ResourceTemplate::new(vec![
                            &Memory32Fixed::new(
                                true,
                                w.addr as u32,
                                layout::VIRTIO_MMIO_SIZE as u32,
                            ),
                            &edge_irq(w.gsi),
                        ]),
                    ),
                ],
            ))
        })
        .collect();

    let mut children: Vec<&dyn Aml> = vec![&com1, &ps2];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    let mut bytes = to_bytes(&Scope::new("_SB_".into(), children));
    // \_S5_: sleep type 5 for both PM1a and PM1b (hardware-reduced: only the first is used).
    Name::new("_S5_".into(), &Package::new(vec![&5u8, &5u8])).to_aml_bytes(&mut bytes);
    bytes
}

/// Writes all tables at [`layout::RSDP_ADDR`]; fails if they outgrow the BIOS area.
pub fn write_tables(mem: &GuestMemoryMmap, cpus: u8, windows: &[VirtioMmioWindow]) -> Result<()> {
    let mut next = layout::RSDP_ADDR + 64; // RSDP first, 36 bytes, rounded up.
    let mut place = |bytes: &[u8]| -> Result<u64> {
        let addr = next;
        next = (next + bytes.len() as u64 + 15) & !15;
        if next > layout::ACPI_END {
            return Err(Error::Config("ACPI tables do not fit below 1 MiB".into()));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory {
                what: format!("writing ACPI tables at {addr:#x}: {e}"),
            })?;
        Ok(addr)
    };

    let aml_body = dsdt_aml(windows);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml_body);
    let dsdt_addr = place(dsdt.as_slice())?;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    let sleep = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::ACPI_SLEEP_PORT),
    );
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VDISKVMM").into();
    let fadt_addr = place(&to_bytes(&fadt.finalize()))?;

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    let madt_addr = place(&to_bytes(&madt))?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&to_bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    mem.write_slice(&to_bytes(&rsdp), GuestAddress(layout::RSDP_ADDR))
        .map_err(|e| Error::Memory {
            what: format!("writing the RSDP: {e}"),
        })
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 8);
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap());
        read(mem, addr, len as usize)
    }

    fn u64_at(bytes: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
    }

    /// Disassembles `table` with ACPICA's `iasl` and returns the listing (None without iasl).
    fn iasl_listing(table: &[u8], name: &str) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join(format!("{name}.dat"));
        std::fs::write(&bin, table).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&bin)
            .current_dir(dir.path())
            .output()
            .ok()?;
        assert!(
            out.status.success(),
            "iasl -d {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap())
    }

    #[test]
    fn acpica_disassembles_the_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let windows = [VirtioMmioWindow {
            addr: 0xd000_0000,
            gsi: 5,
        }];
        write_tables(&mem, 1, &windows).unwrap();
        let rsdp = read(&mem, layout::RSDP_ADDR, 36);
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        let fadt = table(&mem, u64_at(&xsdt, 36));
        let dsdt = table(&mem, u64_at(&fadt, 140));
        let Some(listing) = iasl_listing(&dsdt, "dsdt") else {
            eprintln!("skipped: iasl (acpica-tools) is not installed");
            return;
        };
        for needle in [
            "Device (V000)",
            "\"LNRO0005\"",
            "EisaId (\"PNP0501\")",
            "Memory32Fixed (ReadWrite,",
            "0xD0000000",
            "Name (_S5, Package",
            "IO (Decode16,",
        ] {
            assert!(listing.contains(needle), "{needle} missing in:\n{listing}");
        }
        let fadt_listing = iasl_listing(&fadt, "facp").unwrap();
        assert!(
            fadt_listing.contains("Hardware Reduced (V5) : 1"),
            "{fadt_listing}"
        );
        let madt = table(&mem, u64_at(&xsdt, 44));
        let madt_listing = iasl_listing(&madt, "apic").unwrap();
        assert!(madt_listing.contains("I/O APIC"), "{madt_listing}");
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let windows = [
            VirtioMmioWindow {
                addr: 0xd000_0000,
                gsi: 5,
            },
            VirtioMmioWindow {
                addr: 0xd000_1000,
                gsi: 6,
            },
        ];
        write_tables(&mem, 2, &windows).unwrap();

        let rsdp = read(&mem, layout::RSDP_ADDR, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        assert_eq!(xsdt.len(), 36 + 16);

        let fadt = table(&mem, u64_at(&xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        let body = &dsdt[36..];
        let count = |needle: &[u8]| body.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005"), 2);
        assert_eq!(count(b"COM1"), 2, "device name and _DDN");
        assert_eq!(count(b"_S5_"), 1);

        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Header 44 bytes, two local APICs (8 bytes each), one IOAPIC (12 bytes).
        assert_eq!(madt.len(), 44 + 2 * 8 + 12);
        assert_eq!((madt[44], madt[52], madt[60]), (0, 0, 1));
        assert_eq!(madt[52 + 3], 1, "second local APIC has id 1");
    }
}
