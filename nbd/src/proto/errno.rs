//! NBD error values (section "Error values") and the one mapping from block-layer errors.

use vdisk_formats::{Error, ErrorKind};

/// The error values a server may put in a reply. Host `errno` values are never sent as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// `NBD_EPERM`: a write or trim to a read-only export.
    Perm,
    /// `NBD_EIO`: anything the server could not do for another reason.
    Io,
    /// `NBD_ENOMEM`; the spec asks servers to avoid it.
    NoMem,
    /// `NBD_EINVAL`: bad flags, unknown command, out-of-range read/trim/status, misalignment.
    Inval,
    /// `NBD_ENOSPC`: a write or write-zeroes past the end, or the image cannot grow.
    NoSpc,
    /// `NBD_EOVERFLOW`: a structured read longer than the maximum payload, or DF too large.
    Overflow,
    /// `NBD_ENOTSUP`: only for `WRITE_ZEROES` with `FAST_ZERO` that would not be fast.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown,
}

impl Errno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// Parses a value from the wire; unknown values count as `EINVAL` as the spec tells clients.
    pub fn from_code(code: u32) -> Errno {
        match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => Errno::Inval,
        }
    }

    /// Maps a host `errno` to the closest NBD value (`EDQUOT`/`EFBIG` become `ENOSPC` as the spec
    /// asks; anything without an NBD counterpart becomes `EIO`).
    pub fn from_os(errno: i32) -> Errno {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => Errno::Perm,
            libc::ENOMEM => Errno::NoMem,
            libc::EINVAL => Errno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::NoSpc,
            libc::EOVERFLOW => Errno::Overflow,
            libc::ESHUTDOWN => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    /// The NBD value for a block-layer error. `Unsupported` becomes `EIO` here because the spec
    /// reserves `ENOTSUP` for fast-zero requests; the write-zeroes path maps that case itself.
    pub fn from_block(err: &Error) -> Errno {
        match err.kind() {
            ErrorKind::Io => Errno::from_os(err.errno()),
            ErrorKind::ReadOnly => Errno::Perm,
            ErrorKind::NoSpace => Errno::NoSpc,
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => Errno::Inval,
            ErrorKind::Unsupported | ErrorKind::InvalidImage | ErrorKind::Corrupt => Errno::Io,
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_match_the_spec() {
        let all = [
            (Errno::Perm, 1),
            (Errno::Io, 5),
            (Errno::NoMem, 12),
            (Errno::Inval, 22),
            (Errno::NoSpc, 28),
            (Errno::Overflow, 75),
            (Errno::NotSup, 95),
            (Errno::Shutdown, 108),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
            assert_eq!(Errno::from_code(code), e);
        }
        assert_eq!(Errno::from_code(38), Errno::Inval);
    }

    #[test]
    fn host_errors_map_to_nbd_values() {
        assert_eq!(Errno::from_os(libc::EDQUOT), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EFBIG), Errno::NoSpc);
        assert_eq!(Errno::from_os(libc::EROFS), Errno::Perm);
        assert_eq!(Errno::from_os(libc::ENOSYS), Errno::Io);
        assert_eq!(Errno::from_os(libc::EIO), Errno::Io);
    }

    #[test]
    fn block_errors_map_by_kind() {
        let ro = Error::ReadOnly { path: "x".into() };
        assert_eq!(Errno::from_block(&ro), Errno::Perm);
        let io = Error::Io {
            path: "x".into(),
            what: "w".into(),
            source: std::io::Error::from_raw_os_error(libc::EDQUOT),
        };
        assert_eq!(Errno::from_block(&io), Errno::NoSpc);
        let unsup = Error::Unsupported {
            path: "x".into(),
            what: "compressed".into(),
        };
        assert_eq!(Errno::from_block(&unsup), Errno::Io);
    }
}
