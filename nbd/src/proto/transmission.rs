//! Transmission messages: request headers, commands and their flags, and replies in the three
//! framings (simple, structured, extended) (sections "Request message", "Simple reply message",
//! "Structured reply chunk message", "Extended reply chunk message", "Request types").

use std::io::{self, Read};

use super::{
    clip_string, read_u32, Errno, EXTENDED_REPLY_MAGIC, EXTENDED_REQUEST_MAGIC, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};

/// Command flags (16 bits, "Command flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdFlags(pub u16);

impl CmdFlags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;

    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Request types (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Anything else, including the experimental RESIZE (8) this server does not offer.
    Unknown(u16),
}

impl Command {
    pub fn from_code(code: u16) -> Command {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            n => Command::Unknown(n),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(n) => n,
        }
    }

    /// The command flags documented for this command. `FUA` is "valid for all commands" once
    /// `SEND_FUA` is negotiated; `PAYLOAD_LEN` is valid for WRITE (and required there) with
    /// extended headers, and for BLOCK_STATUS with `BLOCK_STAT_PAYLOAD`. Anything else earns `EINVAL` ("Error values").
    pub fn allowed_flags(self) -> u16 {
        let base = CmdFlags::FUA;
        match self {
            Command::Read => base | CmdFlags::DF,
            Command::Write => base | CmdFlags::PAYLOAD_LEN,
            Command::WriteZeroes => base | CmdFlags::NO_HOLE | CmdFlags::FAST_ZERO,
            Command::BlockStatus => base | CmdFlags::REQ_ONE | CmdFlags::PAYLOAD_LEN,
            Command::Disc | Command::Flush | Command::Trim | Command::Cache => base,
            Command::Unknown(_) => 0,
        }
    }
}

/// The payload of a `BLOCK_STATUS` request that sets `PAYLOAD_LEN` (extended headers with
/// `BLOCK_STAT_PAYLOAD`): the effect length, then the ids of the metadata contexts to report,
/// each at most once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusPayload {
    pub effect_length: u64,
    pub ids: Vec<u32>,
}

impl BlockStatusPayload {
    /// Parses a payload that may name at most `max_ids` contexts (those negotiated).
    pub fn parse(bytes: &[u8], max_ids: usize) -> Result<BlockStatusPayload, String> {
        if bytes.len() < 8 || bytes.len() % 4 != 0 || (bytes.len() - 8) / 4 > max_ids {
            return Err(format!(
                "block status payload of {} bytes is not an effect length and at most {max_ids} \
                 context ids",
                bytes.len()
            ));
        }
        let effect_length = u64::from_be_bytes(bytes[..8].try_into().unwrap());
        let mut ids = Vec::with_capacity((bytes.len() - 8) / 4);
        for id in bytes[8..].chunks_exact(4) {
            let id = u32::from_be_bytes(id.try_into().unwrap());
            if ids.contains(&id) {
                return Err(format!(
                    "context id {id} repeated in the block status payload"
                ));
            }
            ids.push(id);
        }
        Ok(BlockStatusPayload { effect_length, ids })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.effect_length.to_be_bytes().to_vec();
        for id in &self.ids {
            v.extend_from_slice(&id.to_be_bytes());
        }
        v
    }
}

/// A request header, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CmdFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    /// Effect length (for WRITE also the payload length).
    pub length: u64,
    /// Bytes of payload that follow the header on the wire.
    pub payload: u64,
}

/// A request header that cannot be parsed: the stream is out of sync and the server hangs up.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl RequestHeader {
    /// Reads one header. Compact (28 bytes): only WRITE carries a payload, of `length` bytes.
    /// Extended (32 bytes): a payload follows when `PAYLOAD_LEN` is set, and always for WRITE.
    pub fn read<R: Read + ?Sized>(
        r: &mut R,
        extended: bool,
    ) -> Result<RequestHeader, RequestError> {
        let magic = read_u32(r)?;
        let expected = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected {
            return Err(RequestError::BadMagic(magic));
        }
        // The rest of the header in one read: field-by-field reads cost a system call each on
        // an unbuffered stream.
        let mut rest = [0u8; 28];
        let rest = &mut rest[..if extended { 28 } else { 24 }];
        r.read_exact(rest)?;
        let be16 = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
        let be64 = |at: usize| u64::from_be_bytes(rest[at..at + 8].try_into().unwrap());
        let flags = CmdFlags(be16(0));
        let command = Command::from_code(be16(2));
        let cookie = be64(4);
        let offset = be64(12);
        let length = if extended {
            be64(20)
        } else {
            u64::from(u32::from_be_bytes(rest[20..24].try_into().unwrap()))
        };
        // The spec says extended WRITEs MUST set PAYLOAD_LEN, but qemu's client (10.0) sends
        // them without it: a WRITE always carries `length` bytes, as in compact mode.
        let payload = match (extended, command) {
            (_, Command::Write) => length,
            (true, _) if flags.has(CmdFlags::PAYLOAD_LEN) => length,
            _ => 0,
        };
        Ok(RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
            payload,
        })
    }

    /// Encodes the header (used by tests and by clients built on this crate).
    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(32);
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        v.extend_from_slice(&magic.to_be_bytes());
        v.extend_from_slice(&self.flags.0.to_be_bytes());
        v.extend_from_slice(&self.command.code().to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            v.extend_from_slice(&self.length.to_be_bytes());
        } else {
            v.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
        v
    }
}

/// Which reply framing the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// No structured replies: 16-byte simple replies, READ data follows the header.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte chunk headers.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte chunk headers, 64-bit lengths, no simple replies.
    Extended,
}

/// One block-status descriptor: a run length and its status bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    pub length: u64,
    pub status: u32,
}

/// What one reply message (a simple reply, or one chunk) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Success without payload: simple reply with error 0, or an `NBD_REPLY_TYPE_NONE` chunk.
    Ok,
    /// An error, optionally at an offset inside the request (`NBD_REPLY_TYPE_ERROR_OFFSET`).
    Error {
        errno: Errno,
        message: &'a str,
        offset: Option<u64>,
    },
    /// Data of `len` bytes at `offset`; the caller sends the bytes after this header. In simple
    /// mode the header is a simple reply and `offset` is not sent.
    Data { offset: u64, len: u64 },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `len` bytes at `offset` read as zero.
    Hole { offset: u64, len: u32 },
    /// A block-status chunk for one metadata context.
    BlockStatus {
        context: u32,
        extents: &'a [StatusDescriptor],
    },
}

/// Chunk types (`NBD_REPLY_TYPE_*`).
mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// `NBD_REPLY_FLAG_DONE`.
const FLAG_DONE: u16 = 1;

impl ReplyMode {
    /// Encodes `reply` as it goes on the wire: header plus the fixed payload (everything except
    /// the data bytes of [`Reply::Data`], which the caller appends). `request_offset` is echoed
    /// by extended headers; `done` marks the final chunk (ignored for simple replies, which are
    /// always final).
    ///
    /// # Panics
    /// In simple mode for holes and block status, which have no simple form (the server never
    /// sends them without structured replies).
    pub fn encode(self, cookie: u64, request_offset: u64, reply: &Reply, done: bool) -> Vec<u8> {
        if self == ReplyMode::Simple {
            let errno = match reply {
                Reply::Ok | Reply::Data { .. } => 0,
                Reply::Error { errno, .. } => errno.code(),
                Reply::Hole { .. } | Reply::BlockStatus { .. } => {
                    panic!("{reply:?} needs structured replies")
                }
            };
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            v.extend_from_slice(&errno.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            return v;
        }
        let extended = self == ReplyMode::Extended;
        let mut body = Vec::new();
        // `extra` = payload bytes the caller sends after what we encode (READ data).
        let mut extra = 0u64;
        let ty = match *reply {
            Reply::Ok => chunk::NONE,
            Reply::Error {
                errno,
                message,
                offset,
            } => {
                let msg = clip_string(message);
                body.extend_from_slice(&errno.code().to_be_bytes());
                body.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                body.extend_from_slice(msg.as_bytes());
                match offset {
                    Some(o) => {
                        body.extend_from_slice(&o.to_be_bytes());
                        chunk::ERROR_OFFSET
                    }
                    None => chunk::ERROR,
                }
            }
            Reply::Data { offset, len } => {
                body.extend_from_slice(&offset.to_be_bytes());
                extra = len;
                chunk::OFFSET_DATA
            }
            Reply::Hole { offset, len } => {
                body.extend_from_slice(&offset.to_be_bytes());
                body.extend_from_slice(&len.to_be_bytes());
                chunk::OFFSET_HOLE
            }
            Reply::BlockStatus { context, extents } => {
                body.extend_from_slice(&context.to_be_bytes());
                if extended {
                    body.extend_from_slice(&(extents.len() as u32).to_be_bytes());
                    for e in extents {
                        body.extend_from_slice(&e.length.to_be_bytes());
                        body.extend_from_slice(&u64::from(e.status).to_be_bytes());
                    }
                    chunk::BLOCK_STATUS_EXT
                } else {
                    for e in extents {
                        debug_assert!(e.length <= u64::from(u32::MAX));
                        body.extend_from_slice(&(e.length as u32).to_be_bytes());
                        body.extend_from_slice(&e.status.to_be_bytes());
                    }
                    chunk::BLOCK_STATUS
                }
            }
        };
        let flags = if done || ty == chunk::NONE {
            FLAG_DONE
        } else {
            0
        };
        let len = body.len() as u64 + extra;
        let mut v = Vec::with_capacity(32 + body.len());
        if extended {
            v.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&ty.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&request_offset.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
        } else {
            v.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&ty.to_be_bytes());
            v.extend_from_slice(&cookie.to_be_bytes());
            v.extend_from_slice(&(len as u32).to_be_bytes());
        }
        v.extend_from_slice(&body);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_write_header_carries_its_payload_length() {
        let h = RequestHeader {
            flags: CmdFlags(CmdFlags::FUA),
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
            payload: 512,
        };
        let bytes = h.encode(false);
        assert_eq!(bytes.len(), 28);
        assert_eq!(&bytes[..8], &[0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1]);
        assert_eq!(RequestHeader::read(&mut &bytes[..], false).unwrap(), h);
    }

    #[test]
    fn extended_header_has_payload_only_with_payload_len() {
        let mut h = RequestHeader {
            flags: CmdFlags(0),
            command: Command::Trim,
            cookie: 9,
            offset: 0,
            length: 1 << 40,
            payload: 0,
        };
        let bytes = h.encode(true);
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(RequestHeader::read(&mut &bytes[..], true).unwrap(), h);
        h.flags = CmdFlags(CmdFlags::PAYLOAD_LEN);
        h.length = 16;
        let parsed = RequestHeader::read(&mut &h.encode(true)[..], true).unwrap();
        assert_eq!(parsed.payload, 16);
        // qemu sends extended WRITEs without PAYLOAD_LEN; they still carry their data.
        h.flags = CmdFlags(0);
        h.command = Command::Write;
        let parsed = RequestHeader::read(&mut &h.encode(true)[..], true).unwrap();
        assert_eq!(parsed.payload, 16);
    }

    #[test]
    fn wrong_magic_for_the_mode_is_refused() {
        let h = RequestHeader {
            flags: CmdFlags(0),
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 1,
            payload: 0,
        };
        let compact = h.encode(false);
        assert!(matches!(
            RequestHeader::read(&mut &compact[..], true),
            Err(RequestError::BadMagic(0x2560_9513))
        ));
    }

    #[test]
    fn simple_reply_is_sixteen_bytes() {
        let v = ReplyMode::Simple.encode(
            7,
            0,
            &Reply::Error {
                errno: Errno::NoSpc,
                message: "ignored",
                offset: None,
            },
            true,
        );
        assert_eq!(
            v,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 28, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    #[test]
    fn structured_chunks_encode_byte_exact() {
        let data = ReplyMode::Structured.encode(
            5,
            0,
            &Reply::Data {
                offset: 512,
                len: 4,
            },
            false,
        );
        assert_eq!(
            data,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 12, 0, 0, 0,
                0, 0, 0, 2, 0
            ]
        );
        let hole = ReplyMode::Structured.encode(5, 0, &Reply::Hole { offset: 0, len: 9 }, true);
        assert_eq!(&hole[4..8], &[0, 1, 0, 2]);
        assert_eq!(&hole[16..20], &[0, 0, 0, 12]);
        assert_eq!(&hole[28..], &[0, 0, 0, 9]);
        let none = ReplyMode::Structured.encode(5, 0, &Reply::Ok, false);
        assert_eq!(&none[4..8], &[0, 1, 0, 0]);
        assert_eq!(none.len(), 20);
    }

    #[test]
    fn error_chunks_carry_message_and_offset() {
        let e = ReplyMode::Structured.encode(
            1,
            0,
            &Reply::Error {
                errno: Errno::Io,
                message: "bad",
                offset: Some(4096),
            },
            true,
        );
        assert_eq!(&e[4..8], &[0, 1, 0x80, 2]);
        assert_eq!(&e[16..20], &[0, 0, 0, 17]);
        assert_eq!(&e[20..29], &[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
        assert_eq!(&e[29..], &4096u64.to_be_bytes());
    }

    #[test]
    fn block_status_uses_32_or_64_bit_descriptors() {
        let ext = [
            StatusDescriptor {
                length: 65536,
                status: 3,
            },
            StatusDescriptor {
                length: 512,
                status: 0,
            },
        ];
        let s = ReplyMode::Structured.encode(
            2,
            0,
            &Reply::BlockStatus {
                context: 1,
                extents: &ext,
            },
            true,
        );
        assert_eq!(&s[6..8], &[0, 5]);
        assert_eq!(&s[16..20], &[0, 0, 0, 20]);
        assert_eq!(
            &s[20..],
            &[0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        let x = ReplyMode::Extended.encode(
            2,
            4096,
            &Reply::BlockStatus {
                context: 1,
                extents: &ext,
            },
            true,
        );
        assert_eq!(&x[..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(&x[6..8], &[0, 6]);
        assert_eq!(&x[16..24], &4096u64.to_be_bytes());
        assert_eq!(&x[24..32], &40u64.to_be_bytes());
        assert_eq!(&x[32..40], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(
            &x[40..56],
            &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn flags_allowed_per_command() {
        assert!(Command::Read.allowed_flags() & CmdFlags::DF != 0);
        assert!(Command::Read.allowed_flags() & CmdFlags::NO_HOLE == 0);
        assert!(Command::WriteZeroes.allowed_flags() & CmdFlags::FAST_ZERO != 0);
        let p = BlockStatusPayload {
            effect_length: 1 << 40,
            ids: vec![2, 1],
        };
        assert_eq!(BlockStatusPayload::parse(&p.encode(), 2), Ok(p.clone()));
        assert!(
            BlockStatusPayload::parse(&p.encode(), 1).is_err(),
            "more ids than contexts"
        );
        assert!(
            BlockStatusPayload::parse(&p.encode()[..10], 2).is_err(),
            "ragged"
        );
        assert!(
            BlockStatusPayload::parse(&[0; 4], 2).is_err(),
            "no effect length"
        );
        let twice = BlockStatusPayload {
            effect_length: 512,
            ids: vec![1, 1],
        };
        assert!(BlockStatusPayload::parse(&twice.encode(), 2).is_err());
        assert_eq!(Command::Unknown(8).allowed_flags(), 0);
        assert_eq!(Command::from_code(8), Command::Unknown(8));
    }
}
