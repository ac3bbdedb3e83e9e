//! Handshake messages: the fixed-newstyle greeting, client flags, options and option replies
//! (sections "Fixed newstyle negotiation", "Option types", "Option reply types").

use std::io::{self, Read};

use super::{
    clip_string, read_u32, read_u64, valid_string, Cursor, EXPORT_NAME_PADDING, IHAVEOPT,
    NBD_MAGIC, OPTION_REPLY_MAGIC,
};

/// Handshake flags the server sends: `NBD_FLAG_FIXED_NEWSTYLE` (bit 0).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES` (bit 1).
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (we offer both flags).
pub fn greeting() -> Vec<u8> {
    let mut v = Vec::with_capacity(18);
    v.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    v
}

/// The client's 32-bit flags ("Client flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub fixed_newstyle: bool,
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Reads the flags; `Ok(None)` when the client set a bit we did not offer, after which the
    /// server MUST drop the connection.
    pub fn read<R: Read + ?Sized>(r: &mut R) -> io::Result<Option<ClientFlags>> {
        let bits = read_u32(r)?;
        if bits & !0b11 != 0 {
            return Ok(None);
        }
        Ok(Some(ClientFlags {
            fixed_newstyle: bits & 1 != 0,
            no_zeroes: bits & 2 != 0,
        }))
    }
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// The fixed part of every option: `IHAVEOPT`, code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

impl OptionHeader {
    /// Reads an option header; a wrong magic is an `InvalidData` error (the stream cannot be
    /// resynchronised, so the caller hangs up).
    pub fn read<R: Read + ?Sized>(r: &mut R) -> io::Result<OptionHeader> {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad option magic {magic:#x}"),
            ));
        }
        let code = read_u32(r)?;
        let len = read_u32(r)?;
        Ok(OptionHeader { code, len })
    }
}

/// Information types of `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoType {
    Export,
    Name,
    Description,
    BlockSize,
    /// Not understood; the server MUST ignore it.
    Unknown(u16),
}

impl InfoType {
    fn from_code(code: u16) -> InfoType {
        match code {
            0 => InfoType::Export,
            1 => InfoType::Name,
            2 => InfoType::Description,
            3 => InfoType::BlockSize,
            n => InfoType::Unknown(n),
        }
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export: String,
    pub requests: Vec<InfoType>,
}

impl InfoRequest {
    /// Whether the client asked for `ty`.
    pub fn wants(&self, ty: InfoType) -> bool {
        self.requests.contains(&ty)
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    pub export: String,
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaQuery),
    SetMetaContext(MetaQuery),
    ExtendedHeaders,
    /// An option this server does not implement (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// Why an option's data is malformed; sent back as the text of `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub String);

impl ClientOption {
    /// Parses the data of option `code`. Options whose data must be empty (LIST, STARTTLS,
    /// STRUCTURED_REPLY, EXTENDED_HEADERS) are invalid with data; ABORT ignores its data as
    /// the spec asks.
    pub fn parse(code: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
        let empty = |o: ClientOption| {
            if data.is_empty() {
                Ok(o)
            } else {
                Err(InvalidOption("option does not take data".into()))
            }
        };
        match code {
            opt::EXPORT_NAME => Ok(ClientOption::ExportName(string(data, "export name")?)),
            opt::ABORT => Ok(ClientOption::Abort),
            opt::LIST => empty(ClientOption::List),
            opt::STARTTLS => empty(ClientOption::StartTls),
            opt::INFO => Ok(ClientOption::Info(parse_info(data)?)),
            opt::GO => Ok(ClientOption::Go(parse_info(data)?)),
            opt::STRUCTURED_REPLY => empty(ClientOption::StructuredReply),
            opt::LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta(data)?)),
            opt::SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta(data)?)),
            opt::EXTENDED_HEADERS => empty(ClientOption::ExtendedHeaders),
            other => Ok(ClientOption::Unknown(other)),
        }
    }
}

fn string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    valid_string(bytes)
        .map(str::to_owned)
        .ok_or_else(|| InvalidOption(format!("{what} is not a valid NBD string")))
}

fn truncated(_: super::Truncated) -> InvalidOption {
    InvalidOption("option data is truncated".into())
}

/// `u32 namelen, name, u16 count, count x u16 info type` ("NBD_OPT_INFO"); namelen MUST be no
/// larger than the data length - 6, and nothing may follow the list.
fn parse_info(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().map_err(truncated)? as usize;
    let name = string(c.bytes(name_len).map_err(truncated)?, "export name")?;
    let count = c.u16().map_err(truncated)? as usize;
    if c.remaining() != count * 2 {
        return Err(InvalidOption(
            "information request count does not match the data length".into(),
        ));
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        let ty = InfoType::from_code(c.u16().map_err(truncated)?);
        if !requests.contains(&ty) {
            requests.push(ty);
        }
    }
    Ok(InfoRequest {
        export: name,
        requests,
    })
}

/// `u32 namelen, name, u32 count, count x (u32 len, query)` ("NBD_OPT_LIST_META_CONTEXT").
fn parse_meta(data: &[u8]) -> Result<MetaQuery, InvalidOption> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().map_err(truncated)? as usize;
    let export = string(c.bytes(name_len).map_err(truncated)?, "export name")?;
    let count = c.u32().map_err(truncated)? as usize;
    // Each query needs at least its 4-byte length: reject impossible counts before allocating.
    if count > c.remaining() / 4 {
        return Err(InvalidOption(
            "query count exceeds the option length".into(),
        ));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32().map_err(truncated)? as usize;
        queries.push(string(c.bytes(len).map_err(truncated)?, "context query")?);
    }
    if c.remaining() != 0 {
        return Err(InvalidOption("trailing bytes after the last query".into()));
    }
    Ok(MetaQuery { export, queries })
}

/// Transmission flags (16 bits, "Transmission flags").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Option reply types that are errors (bit 31 set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepError {
    Unsup,
    Policy,
    Invalid,
    Platform,
    TlsReqd,
    Unknown,
    Shutdown,
    BlockSizeReqd,
    TooBig,
    ExtHeaderReqd,
}

impl RepError {
    pub fn code(self) -> u32 {
        const ERR: u32 = 1 << 31;
        ERR + match self {
            RepError::Unsup => 1,
            RepError::Policy => 2,
            RepError::Invalid => 3,
            RepError::Platform => 4,
            RepError::TlsReqd => 5,
            RepError::Unknown => 6,
            RepError::Shutdown => 7,
            RepError::BlockSizeReqd => 8,
            RepError::TooBig => 9,
            RepError::ExtHeaderReqd => 10,
        }
    }
}

/// An `NBD_REP_INFO` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoReply<'a> {
    Export { size: u64, flags: TransmissionFlags },
    Name(&'a str),
    Description(&'a str),
    BlockSize { min: u32, preferred: u32, max: u32 },
}

/// A reply to one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of a LIST.
    Server { name: &'a str, description: &'a str },
    /// `NBD_REP_INFO`.
    Info(InfoReply<'a>),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext { id: u32, name: &'a str },
    /// An error reply with a human-readable message.
    Error(RepError, &'a str),
}

impl OptionReply<'_> {
    /// The reply as bytes: magic, echoed option code, reply type, length, data.
    pub fn encode(&self, option: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let ty: u32 = match *self {
            OptionReply::Ack => 1,
            OptionReply::Server { name, description } => {
                data.extend_from_slice(&(name.len() as u32).to_be_bytes());
                data.extend_from_slice(name.as_bytes());
                data.extend_from_slice(clip_string(description).as_bytes());
                2
            }
            OptionReply::Info(info) => {
                match info {
                    InfoReply::Export { size, flags } => {
                        data.extend_from_slice(&0u16.to_be_bytes());
                        data.extend_from_slice(&size.to_be_bytes());
                        data.extend_from_slice(&flags.0.to_be_bytes());
                    }
                    InfoReply::Name(name) => {
                        data.extend_from_slice(&1u16.to_be_bytes());
                        data.extend_from_slice(name.as_bytes());
                    }
                    InfoReply::Description(d) => {
                        data.extend_from_slice(&2u16.to_be_bytes());
                        data.extend_from_slice(clip_string(d).as_bytes());
                    }
                    InfoReply::BlockSize {
                        min,
                        preferred,
                        max,
                    } => {
                        data.extend_from_slice(&3u16.to_be_bytes());
                        data.extend_from_slice(&min.to_be_bytes());
                        data.extend_from_slice(&preferred.to_be_bytes());
                        data.extend_from_slice(&max.to_be_bytes());
                    }
                }
                3
            }
            OptionReply::MetaContext { id, name } => {
                data.extend_from_slice(&id.to_be_bytes());
                data.extend_from_slice(name.as_bytes());
                4
            }
            OptionReply::Error(err, msg) => {
                data.extend_from_slice(clip_string(msg).as_bytes());
                err.code()
            }
        };
        let mut v = Vec::with_capacity(20 + data.len());
        v.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(&data);
        v
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless `NO_ZEROES`) 124 zero bytes.
pub fn export_name_reply(size: u64, flags: TransmissionFlags, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.0.to_be_bytes());
    if !no_zeroes {
        v.resize(v.len() + EXPORT_NAME_PADDING, 0);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &str, types: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            d.extend_from_slice(&t.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_is_fixed_newstyle_with_no_zeroes() {
        let g = greeting();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn unknown_client_flags_are_refused() {
        assert_eq!(
            ClientFlags::read(&mut &[0, 0, 0, 3][..]).unwrap(),
            Some(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(ClientFlags::read(&mut &[0, 0, 0, 4][..]).unwrap(), None);
    }

    #[test]
    fn option_header_checks_magic() {
        let mut ok = IHAVEOPT.to_be_bytes().to_vec();
        ok.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            OptionHeader::read(&mut &ok[..]).unwrap(),
            OptionHeader { code: 7, len: 9 }
        );
        ok[0] ^= 1;
        let err = OptionHeader::read(&mut &ok[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn go_parses_name_and_deduplicated_requests() {
        let d = info_data("disk", &[3, 1, 3, 77]);
        let ClientOption::Go(req) = ClientOption::parse(opt::GO, &d).unwrap() else {
            panic!()
        };
        assert_eq!(req.export, "disk");
        assert_eq!(
            req.requests,
            vec![InfoType::BlockSize, InfoType::Name, InfoType::Unknown(77)]
        );
        assert!(req.wants(InfoType::BlockSize));
    }

    #[test]
    fn info_with_name_longer_than_data_is_invalid() {
        let mut d = info_data("disk", &[]);
        d[3] = 200;
        assert!(ClientOption::parse(opt::INFO, &d).is_err());
        let mut d = info_data("disk", &[0]);
        d.push(0);
        assert!(ClientOption::parse(opt::INFO, &d).is_err());
    }

    #[test]
    fn meta_queries_parse_and_reject_trailing_bytes() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let parsed = ClientOption::parse(opt::SET_META_CONTEXT, &d).unwrap();
        assert_eq!(
            parsed,
            ClientOption::SetMetaContext(MetaQuery {
                export: String::new(),
                queries: vec!["base:allocation".into(), "qemu:".into()],
            })
        );
        d.push(1);
        assert!(ClientOption::parse(opt::LIST_META_CONTEXT, &d).is_err());
        // A count that cannot fit is refused without allocating.
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(ClientOption::parse(opt::LIST_META_CONTEXT, &huge).is_err());
    }

    #[test]
    fn data_on_dataless_options_is_invalid_except_abort() {
        assert!(ClientOption::parse(opt::LIST, b"x").is_err());
        assert!(ClientOption::parse(opt::STRUCTURED_REPLY, b"x").is_err());
        assert!(ClientOption::parse(opt::STARTTLS, b"x").is_err());
        assert_eq!(
            ClientOption::parse(opt::ABORT, b"x"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            ClientOption::parse(4, b"peek"),
            Ok(ClientOption::Unknown(4))
        );
    }

    #[test]
    fn replies_encode_byte_exact() {
        let ack = OptionReply::Ack.encode(opt::GO);
        assert_eq!(
            ack,
            [0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
        let info = OptionReply::Info(InfoReply::Export {
            size: 0x1_0000,
            flags: TransmissionFlags(0x0d),
        })
        .encode(opt::INFO);
        assert_eq!(&info[12..16], &[0, 0, 0, 3]);
        assert_eq!(&info[16..20], &[0, 0, 0, 12]);
        assert_eq!(&info[20..], &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x0d]);
        let err = OptionReply::Error(RepError::Unsup, "no").encode(42);
        assert_eq!(&err[12..16], &[0x80, 0, 0, 1]);
        assert_eq!(&err[16..], &[0, 0, 0, 2, b'n', b'o']);
        let srv = OptionReply::Server {
            name: "a",
            description: "bc",
        }
        .encode(opt::LIST);
        assert_eq!(&srv[16..], &[0, 0, 0, 7, 0, 0, 0, 1, b'a', b'b', b'c']);
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        assert_eq!(export_name_reply(1, TransmissionFlags(1), false).len(), 134);
        assert_eq!(
            export_name_reply(1, TransmissionFlags(1), true),
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
        );
    }
}
