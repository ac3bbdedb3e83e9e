//! The one error type of the block layer.
//!
//! Every error carries the image path it concerns and, where it makes sense, the byte offset and the
//! on-disk field; the underlying `io::Error` is kept as the `#[source]` so its OS code survives. The
//! [`ErrorKind`] is what callers branch on: the NBD server maps it to an errno, the VMM to a virtio
//! status, the CLI to an exit code.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias for the block layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Coarse class of an [`Error`], stable for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system reported an I/O error.
    Io,
    /// The file is not a valid image of the expected format (bad magic, impossible header).
    InvalidImage,
    /// The image is structurally valid but its metadata is inconsistent.
    Corrupt,
    /// A feature the image uses, or an option asked for, is not implemented.
    Unsupported,
    /// A request reaches past the end of the device.
    OutOfRange,
    /// A write to an image opened read-only.
    ReadOnly,
    /// The image cannot grow any further (format limits).
    NoSpace,
    /// An invalid argument (bad option value, bad size).
    InvalidArgument,
}

/// An error of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    InvalidImage { path: PathBuf, what: String },
    #[error("{path}: corrupt image: {what} (offset {offset:#x})")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: request {offset:#x}+{len:#x} is past the end of the device ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{path}: image is opened read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: {what}")]
    NoSpace { path: PathBuf, what: String },
    #[error("{what}")]
    InvalidArgument { what: String },
    #[error("{path}: Could not open backing file '{backing}'")]
    Backing {
        path: PathBuf,
        backing: PathBuf,
        #[source]
        source: Box<Error>,
    },
    /// What the operation was doing when `source` happened, as qemu-img says it ("error while
    /// writing at byte 1048576").
    #[error("{what}: {source}")]
    During {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidImage { .. } => ErrorKind::InvalidImage,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Backing { source, .. } | Error::During { source, .. } => source.kind(),
        }
    }

    /// The errno that best describes this error (for NBD replies and virtio status mapping).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::OutOfRange { .. } => libc::EINVAL,
            Error::ReadOnly { .. } => libc::EPERM,
            Error::NoSpace { .. } => libc::ENOSPC,
            Error::Unsupported { .. } => libc::ENOTSUP,
            Error::InvalidArgument { .. } => libc::EINVAL,
            Error::InvalidImage { .. } | Error::Corrupt { .. } => libc::EIO,
            Error::Backing { source, .. } | Error::During { source, .. } => source.errno(),
        }
    }

    pub(crate) fn io(path: &Path, what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: &Path, what: impl Into<String>) -> Self {
        Error::InvalidImage {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: what.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn argument(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }

    /// This error, said to have happened while doing `what`.
    pub(crate) fn during(self, what: impl Into<String>) -> Self {
        Error::During {
            what: what.into(),
            source: Box::new(self),
        }
    }
}
