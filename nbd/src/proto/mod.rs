//! The NBD wire format as typed messages.
//!
//! Everything that crosses the socket is parsed here once, validated, and turned into the enums
//! and structs of the submodules; the server never looks at raw bytes. Section names in the
//! comments refer to the NBD protocol specification, `doc/proto.md` of the NetworkBlockDevice
//! project (with the `extension-ext-header` branch for extended headers).
//!
//! ```text
//!   handshake.rs     greeting, client flags, options (C->S) and option replies (S->C)
//!   transmission.rs  request headers (compact 28 B / extended 32 B), commands and flags,
//!                    simple replies, structured / extended reply chunks
//!   errno.rs         the eight NBD error values and the block-layer mapping
//! ```
//!
//! All integers on the wire are big-endian.

pub mod errno;
pub mod handshake;
pub mod transmission;

pub use errno::Errno;
pub use handshake::{
    ClientFlags, ClientOption, InfoRequest, InfoType, MetaQuery, OptionReply, RepError,
    TransmissionFlags,
};
pub use transmission::{
    BlockStatusPayload, CmdFlags, Command, Reply, ReplyMode, RequestError, RequestHeader,
    StatusDescriptor,
};

use std::io::{self, Read};

/// `NBDMAGIC`, first word of every handshake (section "Newstyle negotiation").
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the newstyle greeting and the start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`, compact (28-byte) requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`, extended (32-byte) requests.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Longest string (export name, context name, error message) the spec allows ("Conventions":
/// MUST be no longer than 4096 bytes).
pub const MAX_STRING: usize = 4096;
/// Most options a client may send in one handshake; the server hangs up on the one that would
/// follow (the spec sets no number).
pub const MAX_OPTIONS: usize = 4096;
/// Largest option payload kept in memory. Longer options are drained and refused with
/// `NBD_REP_ERR_TOO_BIG`; the longest legitimate one (an INFO or META_CONTEXT request with a few
/// 4 KiB names) fits easily.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Option payloads longer than this are treated as a denial of service: the server hangs up
/// instead of draining them ("Size constraints": 2^25 bytes SHOULD NOT be considered DoS).
pub const MAX_OPTION_DRAIN: u32 = 32 * 1024 * 1024;
/// Maximum payload (READ or WRITE length) the server advertises and accepts: 32 MiB, the value
/// every client defaults to and what the kernel sends at most.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Most status descriptors in one block-status chunk (the spec says SHOULD NOT exceed 2^20).
pub const MAX_EXTENTS: usize = 1 << 16;
/// Number of zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Reads a big-endian `u32`.
pub(crate) fn read_u32<R: Read + ?Sized>(r: &mut R) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian `u64`.
pub(crate) fn read_u64<R: Read + ?Sized>(r: &mut R) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// A cursor over an option payload that fails cleanly on truncation.
pub(crate) struct Cursor<'a> {
    data: &'a [u8],
}

/// The payload ended before a field it announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

impl<'a> Cursor<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.data.len() {
            return Err(Truncated);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }
}

/// Checks a protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes ("Conventions").
pub fn valid_string(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// A protocol string cut to [`MAX_STRING`] bytes on a character boundary, for messages we send.
pub(crate) fn clip_string(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn strings_with_nul_or_too_long_are_rejected() {
        assert_eq!(valid_string(b"disk"), Some("disk"));
        assert_eq!(valid_string(b"a\0b"), None);
        assert_eq!(valid_string(&[0xff, 0xfe]), None);
        assert!(valid_string(&vec![b'x'; MAX_STRING]).is_some());
        assert!(valid_string(&vec![b'x'; MAX_STRING + 1]).is_none());
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        let s = "é".repeat(MAX_STRING);
        let c = clip_string(&s);
        assert!(c.len() <= MAX_STRING);
        assert!(c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn cursor_reports_truncation() {
        let mut c = Cursor::new(&[0, 1, 2]);
        assert_eq!(c.u16(), Ok(1));
        assert_eq!(c.u16(), Err(Truncated));
        assert_eq!(c.remaining(), 1);
    }
}
