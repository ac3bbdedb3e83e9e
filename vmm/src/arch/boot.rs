//! Loading the kernel and initrd and writing what the kernel reads at entry.
//!
//! Formats and entry points, tried in this order:
//!
//! | image | entry | boot structure |
//! |---|---|---|
//! | ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note | PVH, 32-bit | `hvm_start_info` at 0x6000 |
//! | other ELF (`vmlinux`) | `e_entry`, 64-bit | zero page at 0x7000 |
//! | bzImage (protocol ≥ 2.12, `XLF_KERNEL_64`) | load address + 0x200, 64-bit | zero page with the image's setup header |

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{self, Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, load_cmdline, Cmdline, KernelLoader};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;
use super::regs::EntryMode;
use crate::error::{Error, Result};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1 << 0;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Where and how the kernel is entered, and what it occupies.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub mode: EntryMode,
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

fn open(path: &Path, what: &'static str) -> Result<File> {
    File::open(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// Loads an ELF or bzImage kernel into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = open(path, "cannot open the kernel")?;
    let load_err = |source| Error::KernelLoad {
        path: path.to_path_buf(),
        source,
    };
    match Elf::load(
        mem,
        None,
        &mut file,
        Some(GuestAddress(layout::HIMEM_START)),
    ) {
        Ok(res) => {
            let (mode, entry) = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr.0),
                _ => (EntryMode::Linux64, res.kernel_load.0),
            };
            Ok(LoadedKernel {
                mode,
                entry,
                end: res.kernel_end,
                setup_header: None,
            })
        }
        Err(linux_loader::loader::Error::Elf(elf::Error::InvalidElfMagicNumber)) => {
            let res = BzImage::load(
                mem,
                None,
                &mut file,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(load_err)?;
            let hdr = res
                .setup_header
                .expect("BzImage::load returns the setup header");
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                let version = hdr.version;
                return Err(Error::KernelUnsupported {
                    path: path.to_path_buf(),
                    what: format!(
                        "bzImage has no 64-bit entry point (boot protocol {}.{:02}, needs 2.12 with XLF_KERNEL_64)",
                        version >> 8,
                        version & 0xff
                    ),
                });
            }
            Ok(LoadedKernel {
                mode: EntryMode::Linux64,
                entry: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: res.kernel_end,
                setup_header: Some(hdr),
            })
        }
        Err(e) => Err(load_err(e)),
    }
}

/// Loads the initrd page-aligned at the top of low RAM (below `max_addr` if the kernel limits
/// it), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<LoadedInitrd> {
    let mut file = open(path, "cannot open the initrd")?;
    let size = file
        .metadata()
        .map_err(|source| Error::File {
            path: path.to_path_buf(),
            what: "cannot stat the initrd",
            source,
        })?
        .len();
    let mut top = layout::low_ram_end(mem_size);
    if let Some(max) = max_addr {
        top = top.min(max.saturating_add(1));
    }
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(layout::HIMEM_START) => a,
        _ => {
            return Err(Error::Config(format!(
                "initrd {} ({size} bytes) does not fit in guest memory above the kernel",
                path.display()
            )))
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| Error::Memory {
            what: format!("loading the initrd at {addr:#x}: {e}"),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Highest address the initrd may end at for this kernel, if it says.
pub fn initrd_addr_max(kernel: &LoadedKernel) -> Option<u64> {
    kernel
        .setup_header
        .filter(|h| h.version >= 0x0203 && h.initrd_addr_max != 0)
        .map(|h| u64::from(h.initrd_addr_max))
}

/// Longest command line (without its NUL) the kernel accepts.
pub fn cmdline_limit(kernel: &LoadedKernel) -> usize {
    match kernel.setup_header {
        Some(h) if h.version >= 0x0206 => (h.cmdline_size as usize).min(layout::CMDLINE_MAX - 1),
        Some(_) => 255,
        None => layout::CMDLINE_MAX - 1,
    }
}

/// Writes the command line and the zero page or PVH start info, whichever `kernel.mode` needs.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> Result<()> {
    let len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    if len > cmdline_limit(kernel) {
        return Err(Error::Config(format!(
            "the kernel command line is {len} bytes; this kernel accepts {}",
            cmdline_limit(kernel)
        )));
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline).map_err(|e| Error::Memory {
        what: format!("writing the command line: {e}"),
    })?;
    match kernel.mode {
        EntryMode::Linux64 => write_zero_page(mem, kernel, len, initrd, mem_size),
        EntryMode::Pvh => write_pvh_info(mem, initrd, mem_size),
    }
}

/// Builds the zero page (`boot_params`) for the 64-bit boot protocol.
pub fn zero_page(
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = layout::RSDP_ADDR;
    let map = layout::memory_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> Result<()> {
    let params = zero_page(kernel, cmdline_len, initrd, mem_size);
    let boot = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(Error::BootParams)
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = layout::memory_map(mem_size)
        .into_iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr,
            size,
            type_: kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: layout::RSDP_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some(initrd) = initrd {
        modules.push(hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        });
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_ADDR;
    }
    let mut boot = BootParams::new(&info, GuestAddress(layout::PVH_INFO_ADDR));
    boot.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        boot.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&boot, mem).map_err(Error::BootParams)?;
    // The configurator writes only what it is given; make sure a stale byte cannot pass for
    // a module count when there is no initrd.
    mem.write_obj(info.nr_modules, GuestAddress(layout::PVH_INFO_ADDR + 12))
        .map_err(|e| Error::Memory {
            what: format!("writing hvm_start_info: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            mode: EntryMode::Linux64,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        }
    }

    #[test]
    fn zero_page_for_an_elf_kernel_has_header_cmdline_initrd_and_e820() {
        let initrd = LoadedInitrd {
            addr: 0x3f0_0000,
            size: 0x1234,
        };
        let p = zero_page(&elf_kernel(), 42, Some(initrd), 64 << 20);
        let (flag, magic, loader) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader);
        assert_eq!((flag, magic, loader), (0xaa55, 0x5372_6448, 0xff));
        let (ptr, size) = (p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((ptr, size), (0x20000, 42));
        let (image, len) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((image, len), (0x3f0_0000, 0x1234));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let last = p.e820_table[2];
        let (addr, size, kind) = (last.addr, last.size, last.r#type);
        assert_eq!((addr, size, kind), (0x10_0000, (64 << 20) - 0x10_0000, 1));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_and_not_over_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0xab; 5000]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let initrd = load_initrd(&mem, &path, 32 << 20, 0x20_0000, None).unwrap();
        assert_eq!(
            initrd,
            LoadedInitrd {
                addr: (32 << 20) - 0x2000,
                size: 5000
            }
        );
        let byte: u8 = mem.read_obj(GuestAddress(initrd.addr + 4999)).unwrap();
        assert_eq!(byte, 0xab);
        let capped = load_initrd(&mem, &path, 32 << 20, 0x20_0000, Some(0xff_ffff)).unwrap();
        assert_eq!(capped.addr, (16 << 20) - 0x2000);
        assert!(load_initrd(&mem, &path, 32 << 20, 32 << 20, None).is_err());
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_memmap_and_rsdp() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let kernel = LoadedKernel {
            mode: EntryMode::Pvh,
            ..elf_kernel()
        };
        let cmdline = Cmdline::try_from("console=ttyS0", 100).unwrap();
        write_boot_info(&mem, &kernel, &cmdline, None, 32 << 20).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!((info.cmdline_paddr, info.rsdp_paddr), (0x20000, 0xe0000));
        assert_eq!((info.memmap_entries, info.nr_modules), (3, 0));
        let first: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(layout::PVH_MEMMAP_ADDR)).unwrap();
        assert_eq!((first.addr, first.size, first.type_), (0, 0x9fc00, 1));
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(0x20000)).unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
    }
}
