//! What a VM is made of: [`VmConfig`] and its parts, plus parsers for the textual forms the
//! `vdisk boot` command line uses (`--disk IMAGE[,format=F][,readonly=on]`, `--serial
//! stdio|FILE|none`, `--memory 512M`).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use vdisk_formats::{BackingPolicy, BlockDev, Format, OpenOptions};

use crate::arch::layout;
use crate::error::{Error, Result};

/// Command line used when the caller gives none: serial console on COM1, reboot through the
/// keyboard controller (which ends the VM), no reboot loop after a panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Default guest memory: 512 MiB.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Most vCPUs a VM may have (one MADT entry each; APIC ids are one byte).
pub const MAX_CPUS: u8 = 64;

/// Everything needed to build a [`crate::Vm`].
#[derive(Debug)]
pub struct VmConfig {
    /// Kernel image: an ELF `vmlinux` (PVH or 64-bit entry) or a bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk, loaded at the top of low memory.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; the VMM appends one `virtio_mmio.device=` entry per disk.
    pub cmdline: String,
    /// Disks in guest order: the first is `/dev/vda`.
    pub disks: Vec<DiskConfig>,
    /// Guest RAM in bytes (a multiple of 4 KiB, at least 16 MiB).
    pub memory: u64,
    /// Number of vCPUs, 1..=[`MAX_CPUS`].
    pub cpus: u8,
    /// Where COM1 goes.
    pub serial: SerialConfig,
    /// Confine every VMM thread to the system calls it needs ([`crate::seccomp`]) before the
    /// guest runs. On by default; off only to debug.
    pub seccomp: bool,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel: no disks, 512 MiB, one vCPU,
    /// serial on stdio, [`DEFAULT_CMDLINE`], seccomp filters on.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            disks: Vec::new(),
            memory: DEFAULT_MEMORY,
            cpus: 1,
            serial: SerialConfig::Stdio,
            seccomp: true,
        }
    }

    /// Checks the numbers before anything is allocated.
    pub fn validate(&self) -> Result<()> {
        if self.memory < layout::MIN_MEMORY || self.memory % 4096 != 0 {
            return Err(Error::Config(format!(
                "memory must be a multiple of 4 KiB and at least {} MiB (got {} bytes)",
                layout::MIN_MEMORY >> 20,
                self.memory
            )));
        }
        if self.memory > layout::MAX_MEMORY {
            return Err(Error::Config(format!(
                "memory is limited to {} GiB",
                layout::MAX_MEMORY >> 30
            )));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "cpus must be between 1 and {MAX_CPUS} (got {})",
                self.cpus
            )));
        }
        if self.disks.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(Error::Config(format!(
                "at most {} disks are supported (got {})",
                layout::MAX_VIRTIO_DEVICES,
                self.disks.len()
            )));
        }
        Ok(())
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The block device serving the disk; shared with nothing else while the VM runs.
    pub dev: Arc<dyn BlockDev>,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`); forced when the device itself is.
    pub read_only: bool,
    /// Serial number the guest reads with `VIRTIO_BLK_T_GET_ID` (`/sys/block/vda/serial`);
    /// at most 20 bytes are used.
    pub id: String,
}

/// Where the 8250 on COM1 sends its output and takes its input from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// The terminal: raw mode while the VM runs (restored on exit); `Ctrl-A x` quits,
    /// `Ctrl-A Ctrl-A` sends one `Ctrl-A`.
    Stdio,
    /// Output appended to a file (created if missing); no input.
    File(PathBuf),
    /// The UART exists but its output is dropped.
    None,
}

impl SerialConfig {
    /// Parses `stdio`, `none` or a file path.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" => Err(Error::Config("empty --serial value".into())),
            "stdio" => Ok(SerialConfig::Stdio),
            "none" => Ok(SerialConfig::None),
            path => Ok(SerialConfig::File(PathBuf::from(path))),
        }
    }
}

/// A disk as written on the command line: `IMAGE[,format=raw|qcow2][,readonly=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// Probed when `None`.
    pub format: Option<Format>,
    pub read_only: bool,
    /// Which backing files the image may make the VMM open (not part of the text form).
    pub backing_policy: BackingPolicy,
}

impl DiskSpec {
    /// Parses `IMAGE[,format=F][,readonly=on]`. A comma inside the path is written `,,`
    /// (as QEMU does).
    pub fn parse(text: &str) -> Result<Self> {
        let mut parts = split_unescaped(text).into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(Error::Config(format!("disk '{text}': missing image path")));
        }
        let mut spec = DiskSpec {
            path: PathBuf::from(path),
            format: None,
            read_only: false,
            backing_policy: BackingPolicy::Follow,
        };
        for opt in parts {
            let (key, value) = opt.split_once('=').ok_or_else(|| {
                Error::Config(format!("disk '{text}': option '{opt}' is not KEY=VALUE"))
            })?;
            match key {
                "format" => {
                    spec.format = Some(Format::from_name(value).map_err(|e| Error::Disk {
                        spec: text.to_string(),
                        source: e,
                    })?)
                }
                "readonly" => {
                    spec.read_only = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => {
                            return Err(Error::Config(format!(
                                "disk '{text}': readonly takes on or off, not '{value}'"
                            )))
                        }
                    }
                }
                _ => {
                    return Err(Error::Config(format!(
                        "disk '{text}': unknown option '{key}' (known: format, readonly)"
                    )))
                }
            }
        }
        Ok(spec)
    }

    /// Opens the image and makes the disk; `index` names it (`vdisk0`, `vdisk1`, ...) for
    /// `GET_ID`.
    pub fn open(&self, index: usize) -> Result<DiskConfig> {
        let dev = vdisk_formats::open(
            &self.path,
            OpenOptions {
                format: self.format,
                read_only: self.read_only,
                no_backing: false,
                backing_policy: self.backing_policy,
            },
        )
        .map_err(|e| Error::Disk {
            spec: self.to_string(),
            source: e,
        })?;
        Ok(DiskConfig {
            dev,
            read_only: self.read_only,
            id: format!("vdisk{index}"),
        })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display().to_string().replace(',', ",,"))?;
        if let Some(format) = self.format {
            write!(f, ",format={format}")?;
        }
        if self.read_only {
            write!(f, ",readonly=on")?;
        }
        Ok(())
    }
}

/// Splits at single commas; `,,` stands for a literal comma.
fn split_unescaped(text: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().unwrap().push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().unwrap().push(c);
        }
    }
    parts
}

/// Parses a memory size such as `512M` or `2G` (binary suffixes, as qemu-img sizes).
pub fn parse_memory(text: &str) -> Result<u64> {
    vdisk_formats::units::parse_size(text).map_err(|e| Error::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_spec_with_options_and_escaped_comma() {
        let spec = DiskSpec::parse("/img/a,,b.qcow2,format=qcow2,readonly=on").unwrap();
        assert_eq!(spec.path, PathBuf::from("/img/a,b.qcow2"));
        assert_eq!(spec.format, Some(Format::Qcow2));
        assert!(spec.read_only);
        assert_eq!(spec.to_string(), "/img/a,,b.qcow2,format=qcow2,readonly=on");
    }

    #[test]
    fn disk_spec_rejects_unknown_options_and_values() {
        assert!(DiskSpec::parse("a.img,cache=none").is_err());
        assert!(DiskSpec::parse("a.img,readonly=maybe").is_err());
        assert!(DiskSpec::parse("a.img,format=vmdk").is_err());
        assert!(DiskSpec::parse(",format=raw").is_err());
        assert!(DiskSpec::parse("a.img,readonly").is_err());
    }

    #[test]
    fn serial_and_memory_parse() {
        assert_eq!(SerialConfig::parse("stdio").unwrap(), SerialConfig::Stdio);
        assert_eq!(SerialConfig::parse("none").unwrap(), SerialConfig::None);
        assert_eq!(
            SerialConfig::parse("out.log").unwrap(),
            SerialConfig::File("out.log".into())
        );
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn validate_checks_the_numbers() {
        let mut cfg = VmConfig::new("k");
        cfg.validate().unwrap();
        cfg.cpus = 0;
        assert!(cfg.validate().is_err());
        cfg.cpus = 1;
        cfg.memory = 1 << 20;
        assert!(cfg.validate().is_err());
        cfg.memory = (64 << 20) + 1;
        assert!(cfg.validate().is_err());
    }
}
