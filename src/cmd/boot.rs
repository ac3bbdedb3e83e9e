//! `vdisk boot`: boot a Linux kernel in a KVM microVM whose virtio disks are images.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use vdisk_formats::{OpenOptions, Passphrase};
use vdisk_vmm::{parse_memory, DiskConfig, DiskSpec, ExitReason, SerialConfig, Vm, VmConfig};

use crate::errors::{describe, os_message};

/// Boot a kernel with disk images as virtio-blk disks (KVM).
///
/// The kernel is an ELF vmlinux (PVH or 64-bit entry) or a bzImage. Each --disk becomes a
/// virtio-blk device in order (/dev/vda, /dev/vdb, ...), read and written through the image
/// format, so qcow2 overlays and their backing files work as they do in QEMU. COM1 is the
/// console: on the terminal (Ctrl-A x quits), appended to a file, or dropped. The command
/// exits 0 when the guest resets (Linux `reboot`, with reboot=k as in the default command
/// line), powers off, or the user quits; it fails with a message when KVM is missing, the
/// kernel cannot be booted, or an image cannot be opened.
///
/// Before the guest runs, every thread of the VMM (vCPUs, one I/O thread per disk, the
/// console, the main thread) confines itself with a seccomp filter to the system calls it
/// needs. A forbidden call stops the VMM: it names the thread and the call on stderr and dies
/// by SIGSYS. --no-seccomp leaves the filters out, to debug such a stop.
///
/// Examples:
///
///   vdisk boot --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0 root=/dev/vda1'
///       --disk debian.qcow2
///
///   vdisk boot --kernel vmlinux --disk base.raw,format=raw,readonly=on --disk scratch.qcow2
///       --memory 1G --cpus 2 --serial console.log
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The kernel: ELF vmlinux or bzImage
    #[arg(long = "kernel", value_name = "FILE")]
    kernel: PathBuf,

    /// Initial ramdisk
    #[arg(long = "initrd", value_name = "FILE")]
    initrd: Option<PathBuf>,

    /// Kernel command line (default: console=ttyS0 reboot=k panic=-1)
    #[arg(long = "append", value_name = "CMDLINE")]
    append: Option<String>,

    /// A disk: IMAGE[,format=raw|qcow2][,readonly=on][,key-secret=ID] (a comma in IMAGE is
    /// written ,,); repeat for more disks
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,

    /// Guest memory, with an optional suffix k, M, G (default 512M)
    #[arg(short = 'm', long = "memory", value_name = "SIZE")]
    memory: Option<String>,

    /// Number of vCPUs (default 1)
    #[arg(long = "cpus", value_name = "N")]
    cpus: Option<u8>,

    /// Where COM1 goes: stdio (default), a FILE, or none
    #[arg(long = "serial", value_name = "stdio|FILE|none")]
    serial: Option<String>,

    /// Define a secret for key-secret: secret,id=ID,data=TEXT or secret,id=ID,file=PATH
    #[arg(long = "object", value_name = "OBJDEF")]
    object: Vec<String>,

    /// Run without the seccomp filters (for debugging only: a compromised VMM thread could
    /// then make any system call)
    #[arg(long = "no-seccomp")]
    no_seccomp: bool,
}

pub fn run(args: Args) -> Result<()> {
    let objects = crate::objects::Objects::parse(&args.object)?;
    let mut cfg = VmConfig::new(&args.kernel);
    cfg.initrd = args.initrd.clone();
    if let Some(append) = &args.append {
        cfg.cmdline = append.clone();
    }
    if let Some(m) = &args.memory {
        cfg.memory = parse_memory(m).map_err(|e| anyhow!("--memory: {}", vmm_message(&e)))?;
    }
    if let Some(n) = args.cpus {
        cfg.cpus = n;
    }
    if let Some(s) = &args.serial {
        cfg.serial = SerialConfig::parse(s).map_err(|e| anyhow!(vmm_message(&e)))?;
    }
    cfg.seccomp = !args.no_seccomp;
    cfg.validate().map_err(|e| anyhow!(vmm_message(&e)))?;
    for (i, text) in args.disks.iter().enumerate() {
        let (spec, secret) = split_key_secret(text)?;
        let mut spec = DiskSpec::parse(&spec).map_err(|e| anyhow!(vmm_message(&e)))?;
        spec.backing_policy = crate::backing_policy::get();
        let disk = match secret {
            None => spec.open(i).map_err(|e| anyhow!(vmm_message(&e)))?,
            Some(id) => {
                let secret = Passphrase::new(objects.secret(&id)?.to_vec());
                let opts = OpenOptions {
                    format: spec.format,
                    read_only: spec.read_only,
                    no_backing: false,
                    backing_policy: crate::backing_policy::get(),
                };
                let dev = vdisk_formats::open_with_secret(&spec.path, opts, Some(&secret))
                    .map_err(|e| anyhow!("disk '{text}': {}", describe(&e)))?;
                DiskConfig {
                    dev,
                    read_only: spec.read_only,
                    id: format!("vdisk{i}"),
                }
            }
        };
        cfg.disks.push(disk);
    }
    let reason = Vm::new(cfg)
        .and_then(Vm::run)
        .map_err(|e| anyhow!(vmm_message(&e)))?;
    if reason == ExitReason::Shutdown {
        eprintln!("vdisk: the guest's vCPU shut down (triple fault)");
    }
    Ok(())
}

/// Takes `key-secret=ID` out of a disk spec (the VMM's parser does not know it).
fn split_key_secret(text: &str) -> Result<(String, Option<String>)> {
    let mut parts: Vec<String> = Vec::new();
    let mut secret = None;
    let mut rest = text;
    // Split at single commas only; `,,` is a comma inside the path.
    let mut current = String::new();
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        if c == ',' {
            if let Some(r) = rest.strip_prefix(',') {
                current.push_str(",,");
                rest = r;
                continue;
            }
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts.retain(|p| match p.strip_prefix("key-secret=") {
        Some(id) if !p.is_empty() => {
            secret = Some(id.to_string());
            false
        }
        _ => true,
    });
    if secret.as_deref() == Some("") {
        bail!("disk '{text}': key-secret needs the id of a secret --object");
    }
    Ok((parts.join(","), secret))
}

/// The VMM's errors in words for the command line, with the hint a user needs.
fn vmm_message(e: &vdisk_vmm::Error) -> String {
    use vdisk_vmm::Error;
    match e {
        Error::Kvm { what, source } if what.contains("/dev/kvm") => format!(
            "KVM is not available: cannot open /dev/kvm: {}\n(load the kvm_intel or kvm_amd \
             module, and give this user read and write access to /dev/kvm)",
            os_message(&std::io::Error::from_raw_os_error(source.errno()))
        ),
        Error::KernelLoad { path, source } => format!(
            "'{}' is not a kernel vdisk can boot (an ELF vmlinux with a PVH or 64-bit entry, or \
             a bzImage): {source}",
            path.display()
        ),
        Error::KernelUnsupported { path, what } => {
            format!("'{}' cannot be booted: {what}", path.display())
        }
        Error::File { path, what, source } => {
            format!("{what} '{}': {}", path.display(), os_message(source))
        }
        Error::Disk { spec, source } => format!("disk '{spec}': {}", describe(source)),
        Error::Config(text) => text.clone(),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_secret_is_taken_out_of_the_disk_spec() {
        assert_eq!(
            split_key_secret("a,,b.img,format=raw,key-secret=sec0,readonly=on").unwrap(),
            (
                "a,,b.img,format=raw,readonly=on".to_string(),
                Some("sec0".to_string())
            )
        );
        assert_eq!(
            split_key_secret("plain.qcow2").unwrap(),
            ("plain.qcow2".to_string(), None)
        );
        assert!(split_key_secret("x,key-secret=").is_err());
    }
}
