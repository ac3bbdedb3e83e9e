//! The one error type of the VMM.
//!
//! Errors carry their context (path, address, register) in fields and the cause in `#[source]`,
//! so the CLI can print the whole chain with `{:#}`. Guest misbehaviour is never an [`Error`]:
//! a malformed virtio request gets an error status, an access to an unknown port reads as all
//! ones; only host-side failures (KVM, files, threads) end up here.

use std::io;
use std::path::PathBuf;

/// Result alias of the VMM.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value the VMM cannot honour (too little memory, too many disks...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Opening or reading a file given in the configuration (kernel, initrd, serial log).
    #[error("{path}: {what}")]
    File {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Allocating or registering guest memory failed.
    #[error("guest memory: {what}")]
    Memory { what: String },
    /// The kernel image could not be loaded.
    #[error("{path}: cannot load the kernel")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The kernel image is valid but cannot be booted the way this VMM boots kernels.
    #[error("{path}: {what}")]
    KernelUnsupported { path: PathBuf, what: String },
    /// The kernel command line is too long or contains invalid characters.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the boot structures (zero page, PVH start info) failed.
    #[error("writing the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// An operating-system call of the VMM itself failed (eventfd, epoll, thread, terminal).
    #[error("{what}")]
    Os {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// Opening a disk image failed.
    #[error("disk {spec}")]
    Disk {
        spec: String,
        #[source]
        source: vdisk_formats::Error,
    },
    /// Compiling or installing the seccomp filter of a VMM thread failed.
    #[error("seccomp filter of the {thread} thread")]
    Seccomp {
        thread: &'static str,
        #[source]
        source: seccompiler::Error,
    },
    /// A vCPU stopped in a way the VMM cannot continue from.
    #[error("vCPU {cpu}: {what}")]
    Vcpu { cpu: u8, what: String },
}

impl Error {
    pub(crate) fn kvm(what: &'static str, source: kvm_ioctls::Error) -> Self {
        Error::Kvm { what, source }
    }

    pub(crate) fn os(what: &'static str, source: io::Error) -> Self {
        Error::Os { what, source }
    }
}
