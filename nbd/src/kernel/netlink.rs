//! The kernel's generic-netlink NBD interface (`include/uapi/linux/nbd-netlink.h`): message
//! construction, reply parsing, and the socket that carries them.
//!
//! Netlink integers are in host byte order. A message is an `nlmsghdr` (length, type, flags,
//! sequence, port), a `genlmsghdr` (command, version, reserved) and attributes, each a
//! 4-byte `nlattr` header (length including the header, type) followed by its payload padded to
//! a multiple of 4 bytes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `GENL_ID_CTRL`: the family that resolves family names to ids.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;

/// `NBD_GENL_FAMILY_NAME` and `NBD_GENL_VERSION`.
pub const FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

/// NBD commands (`NBD_CMD_*` of nbd-netlink.h; not the protocol's commands).
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;

/// NBD attributes (`NBD_ATTR_*`).
pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
/// `NBD_SOCK_ITEM` inside `NBD_ATTR_SOCKETS`, and `NBD_SOCK_FD` inside it.
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// `NBD_CFLAG_DISCONNECT_ON_CLOSE` (client flags).
pub const CFLAG_DISCONNECT_ON_CLOSE: u64 = 2;

/// A generic-netlink request under construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    family: u16,
    cmd: u8,
    version: u8,
    attrs: Vec<u8>,
}

impl Request {
    pub fn new(family: u16, cmd: u8, version: u8) -> Request {
        Request {
            family,
            cmd,
            version,
            attrs: Vec::new(),
        }
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        put_attr(&mut self.attrs, ty, payload);
        self
    }

    pub fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn string(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    /// A nested attribute whose payload is built by `f`.
    pub fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        let mut inner = Vec::new();
        f(&mut inner);
        put_attr(&mut self.attrs, ty | NLA_F_NESTED, &inner);
        self
    }

    /// The complete message with sequence number `seq`, asking for an acknowledgement.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let len = 16 + 4 + self.attrs.len();
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&self.family.to_ne_bytes());
        v.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&[self.cmd, self.version, 0, 0]);
        v.extend_from_slice(&self.attrs);
        v
    }
}

/// Appends one attribute, padded to 4 bytes.
fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family(name: &str) -> Request {
    let mut r = Request::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
    r.string(CTRL_ATTR_FAMILY_NAME, name);
    r
}

/// What `NBD_CMD_CONNECT` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    pub timeout: Option<u64>,
    pub dead_conn_timeout: Option<u64>,
    pub server_flags: u64,
    pub client_flags: u64,
    pub backend: Option<String>,
    pub fds: Vec<i32>,
}

/// `NBD_CMD_CONNECT` with the sockets nested as `SOCKETS { SOCK_ITEM { SOCK_FD } ... }`.
pub fn connect(family: u16, p: &ConnectParams) -> Request {
    let mut r = Request::new(family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    if let Some(i) = p.index {
        r.u32(NBD_ATTR_INDEX, i);
    }
    r.u64(NBD_ATTR_SIZE_BYTES, p.size);
    r.u64(NBD_ATTR_BLOCK_SIZE_BYTES, p.block_size);
    if let Some(t) = p.timeout {
        r.u64(NBD_ATTR_TIMEOUT, t);
    }
    if let Some(t) = p.dead_conn_timeout {
        r.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, t);
    }
    r.u64(NBD_ATTR_SERVER_FLAGS, p.server_flags);
    r.u64(NBD_ATTR_CLIENT_FLAGS, p.client_flags);
    r.nested(NBD_ATTR_SOCKETS, |socks| {
        for &fd in &p.fds {
            let mut item = Vec::new();
            put_attr(&mut item, NBD_SOCK_FD, &(fd as u32).to_ne_bytes());
            put_attr(socks, NBD_SOCK_ITEM | NLA_F_NESTED, &item);
        }
    });
    if let Some(b) = &p.backend {
        r.string(NBD_ATTR_BACKEND_IDENTIFIER, b);
    }
    r
}

/// `NBD_CMD_DISCONNECT` of device `index`.
pub fn disconnect(family: u16, index: u32) -> Request {
    let mut r = Request::new(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    r.u32(NBD_ATTR_INDEX, index);
    r
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `NLMSG_ERROR`: 0 is the acknowledgement, otherwise a negative errno.
    Ack(i32),
    /// A generic-netlink message: its attributes after the genl header.
    Genl {
        cmd: u8,
        attrs: Vec<(u16, Vec<u8>)>,
    },
    Done,
}

/// Splits a datagram into messages.
pub fn parse(buf: &[u8]) -> io::Result<Vec<Message>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply");
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
        if len < 16 || len > rest.len() {
            return Err(bad());
        }
        let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let body = &rest[16..len];
        out.push(match ty {
            NLMSG_ERROR if body.len() >= 4 => {
                Message::Ack(i32::from_ne_bytes(body[..4].try_into().unwrap()))
            }
            NLMSG_DONE => Message::Done,
            _ if body.len() >= 4 => Message::Genl {
                cmd: body[0],
                attrs: parse_attrs(&body[4..])?,
            },
            _ => return Err(bad()),
        });
        rest = &rest[(len + 3) & !3..];
    }
    Ok(out)
}

/// Parses a run of attributes (type without the nested/byte-order bits, payload).
pub fn parse_attrs(mut buf: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed netlink attribute",
            ));
        }
        out.push((ty, buf[4..len].to_vec()));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(out)
}

/// A `NETLINK_GENERIC` socket.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (port chosen by the
        // kernel, no multicast groups).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 1 })
    }

    /// Sends `req` and collects the replies up to its acknowledgement. A negative
    /// acknowledgement becomes the corresponding OS error.
    pub fn transact(&mut self, req: &Request) -> io::Result<Vec<Message>> {
        self.seq += 1;
        let msg = req.encode(self.seq);
        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes for the duration of the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes for the duration of the call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for m in parse(&buf[..n as usize])? {
                match m {
                    Message::Ack(0) | Message::Done => return Ok(replies),
                    Message::Ack(e) => return Err(io::Error::from_raw_os_error(-e)),
                    m => replies.push(m),
                }
            }
        }
    }

    /// Resolves a generic-netlink family name to its id; `NotFound` when no such family is
    /// registered (for `nbd`: the module is not loaded).
    pub fn family_id(&mut self, name: &str) -> io::Result<u16> {
        let replies = self.transact(&get_family(name)).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                io::Error::new(io::ErrorKind::NotFound, format!("no netlink family {name}"))
            } else {
                e
            }
        })?;
        replies
            .iter()
            .find_map(|m| match m {
                Message::Genl { attrs, .. } => attrs
                    .iter()
                    .find(|(t, v)| *t == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
                    .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]])),
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family id in reply"))
    }
}

/// The device index in a `NBD_CMD_CONNECT` reply.
pub fn connected_index(replies: &[Message]) -> Option<u32> {
    replies.iter().find_map(|m| match m {
        Message::Genl { cmd, attrs } if *cmd == NBD_CMD_CONNECT => attrs
            .iter()
            .find(|(t, v)| *t == NBD_ATTR_INDEX && v.len() == 4)
            .map(|(_, v)| u32::from_ne_bytes(v[..4].try_into().unwrap())),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    #[test]
    fn get_family_request_is_byte_exact() {
        let m = get_family("nbd").encode(7);
        let mut want = Vec::new();
        want.extend_from_slice(&ne32(28));
        want.extend_from_slice(&ne16(0x10));
        want.extend_from_slice(&ne16(NLM_F_REQUEST | NLM_F_ACK));
        want.extend_from_slice(&ne32(7));
        want.extend_from_slice(&ne32(0));
        want.extend_from_slice(&[3, 1, 0, 0]);
        // "nbd\0": length 8, no padding needed.
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(2));
        want.extend_from_slice(b"nbd\0");
        assert_eq!(m, want);
    }

    #[test]
    fn connect_request_is_byte_exact() {
        let p = ConnectParams {
            index: Some(3),
            size: 1 << 30,
            block_size: 512,
            timeout: None,
            dead_conn_timeout: Some(30),
            server_flags: 0x0d,
            client_flags: CFLAG_DISCONNECT_ON_CLOSE,
            backend: Some("a.qcow2".into()),
            fds: vec![5, 9],
        };
        let m = connect(0x1c, &p).encode(2);
        let mut want = Vec::new();
        let body_len = 8 + 12 * 5 + (4 + 2 * 12) + 12;
        want.extend_from_slice(&ne32(16 + 4 + body_len as u32));
        want.extend_from_slice(&ne16(0x1c));
        want.extend_from_slice(&ne16(5));
        want.extend_from_slice(&ne32(2));
        want.extend_from_slice(&ne32(0));
        want.extend_from_slice(&[1, 1, 0, 0]);
        // INDEX u32
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(1));
        want.extend_from_slice(&ne32(3));
        for (ty, v) in [(2u16, 1u64 << 30), (3, 512), (8, 30), (5, 0x0d), (6, 2)] {
            want.extend_from_slice(&ne16(12));
            want.extend_from_slice(&ne16(ty));
            want.extend_from_slice(&v.to_ne_bytes());
        }
        // SOCKETS (nested) { SOCK_ITEM (nested) { SOCK_FD u32 } x2 }
        want.extend_from_slice(&ne16(4 + 2 * 12));
        want.extend_from_slice(&ne16(7 | 0x8000));
        for fd in [5u32, 9] {
            want.extend_from_slice(&ne16(12));
            want.extend_from_slice(&ne16(1 | 0x8000));
            want.extend_from_slice(&ne16(8));
            want.extend_from_slice(&ne16(1));
            want.extend_from_slice(&ne32(fd));
        }
        // BACKEND_IDENTIFIER "a.qcow2\0" (8 bytes + 4 header)
        want.extend_from_slice(&ne16(12));
        want.extend_from_slice(&ne16(10));
        want.extend_from_slice(b"a.qcow2\0");
        assert_eq!(m.len(), want.len());
        assert_eq!(m, want);
    }

    #[test]
    fn strings_are_padded_to_four_bytes() {
        let mut r = Request::new(1, 1, 1);
        r.string(10, "abcd");
        let m = r.encode(1);
        // 4 header + 5 bytes "abcd\0" = 9, padded to 12.
        assert_eq!(&m[20..22], &ne16(9));
        assert_eq!(m.len(), 20 + 12);
        assert_eq!(&m[24..32], b"abcd\0\0\0\0");
    }

    #[test]
    fn disconnect_request_names_the_index() {
        let m = disconnect(0x20, 4).encode(9);
        assert_eq!(&m[16..20], &[2, 1, 0, 0]);
        assert_eq!(&m[20..], &[&ne16(8)[..], &ne16(1), &ne32(4)].concat()[..]);
    }

    #[test]
    fn replies_parse_acks_errors_and_attributes() {
        // A genl reply carrying NBD_ATTR_INDEX = 6, then an ACK.
        let mut buf = Vec::new();
        buf.extend_from_slice(&ne32(28));
        buf.extend_from_slice(&ne16(0x1c));
        buf.extend_from_slice(&ne16(0));
        buf.extend_from_slice(&ne32(2));
        buf.extend_from_slice(&ne32(0));
        buf.extend_from_slice(&[1, 1, 0, 0]);
        buf.extend_from_slice(&ne16(8));
        buf.extend_from_slice(&ne16(1));
        buf.extend_from_slice(&ne32(6));
        buf.extend_from_slice(&ne32(36));
        buf.extend_from_slice(&ne16(NLMSG_ERROR));
        buf.extend_from_slice(&ne16(0));
        buf.extend_from_slice(&ne32(2));
        buf.extend_from_slice(&ne32(0));
        buf.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
        buf.extend_from_slice(&[0; 16]);
        let msgs = parse(&buf).unwrap();
        assert_eq!(connected_index(&msgs), Some(6));
        assert_eq!(msgs[1], Message::Ack(-libc::EBUSY));
        assert!(parse(&buf[..20]).is_err());
    }
}
