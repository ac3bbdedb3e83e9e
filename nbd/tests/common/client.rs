//! A deliberately small NBD client written from the spec for the edge-case tests. It shares no
//! code with the server's `proto` module, so encoding mistakes cannot cancel out.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Reply framing negotiated by [`Client::go`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

/// One reply message (a simple reply or one chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub cookie: u64,
    /// 0xffff for simple replies.
    pub kind: u16,
    pub done: bool,
    /// Error value for simple replies and error chunks, else 0.
    pub error: u32,
    pub payload: Vec<u8>,
}

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_DATA: u16 = 1;
pub const CHUNK_HOLE: u16 = 2;
pub const CHUNK_STATUS: u16 = 5;
pub const CHUNK_STATUS_EXT: u16 = 6;
pub const SIMPLE: u16 = 0xffff;

pub struct Client {
    pub s: UnixStream,
    pub mode: Mode,
    pub size: u64,
    pub flags: u16,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    /// Connects and completes the greeting with fixed newstyle + no zeroes.
    pub fn connect(path: &Path) -> Client {
        let mut c = Client::connect_raw(path);
        let mut greet = [0u8; 18];
        c.s.read_exact(&mut greet).unwrap();
        assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    /// Connects without doing anything.
    pub fn connect_raw(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client {
            s,
            mode: Mode::Simple,
            size: 0,
            flags: 0,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Sends an option header and data.
    pub fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut v = b"IHAVEOPT".to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// Reads option replies up to the final one; returns (type, data) of each.
    pub fn option_replies(&mut self, code: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be64(&h), 0x0003_e889_0455_65a9, "option reply magic");
            assert_eq!(be32(&h[8..]), code, "echoed option");
            let ty = be32(&h[12..]);
            let mut data = vec![0; be32(&h[16..]) as usize];
            self.s.read_exact(&mut data).unwrap();
            out.push((ty, data));
            if ty == REP_ACK || ty & 0x8000_0000 != 0 {
                return out;
            }
        }
    }

    /// Sends an option and returns the final reply type.
    pub fn option(&mut self, code: u32, data: &[u8]) -> u32 {
        self.send_option(code, data);
        self.option_replies(code).last().unwrap().0
    }

    /// Negotiates `mode`, optionally selects contexts, then GO on `name`.
    pub fn go(&mut self, name: &str, mode: Mode, contexts: &[&str]) {
        match mode {
            Mode::Simple => {}
            Mode::Structured => assert_eq!(self.option(OPT_STRUCTURED_REPLY, &[]), REP_ACK),
            Mode::Extended => assert_eq!(self.option(OPT_EXTENDED_HEADERS, &[]), REP_ACK),
        }
        self.mode = mode;
        if !contexts.is_empty() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d);
            let r = self.option_replies(OPT_SET_META_CONTEXT);
            assert_eq!(r.last().unwrap().0, REP_ACK);
        }
        self.send_option(OPT_GO, &info_data(name, &[3]));
        let replies = self.option_replies(OPT_GO);
        assert_eq!(replies.last().unwrap().0, REP_ACK, "{replies:?}");
        for (ty, d) in &replies {
            if *ty == REP_INFO && d[..2] == [0, 0] {
                self.size = be64(&d[2..]);
                self.flags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
    }

    /// Sends a request (compact or extended by the negotiated mode).
    pub fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        data: &[u8],
    ) {
        let mut v = Vec::with_capacity(32 + data.len());
        if self.mode == Mode::Extended {
            v.extend_from_slice(&0x21e4_1c71u32.to_be_bytes());
        } else {
            v.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        if self.mode == Mode::Extended {
            v.extend_from_slice(&len.to_be_bytes());
        } else {
            v.extend_from_slice(&(len as u32).to_be_bytes());
        }
        v.extend_from_slice(data);
        self.send(&v);
    }

    /// Reads one reply message. `read_len` is the data length to expect after a successful
    /// simple reply (the READ length; the client must know it).
    pub fn chunk(&mut self, read_len: usize) -> Chunk {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        match be32(&magic) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).unwrap();
                let error = be32(&h);
                let mut payload = vec![0; if error == 0 { read_len } else { 0 }];
                self.s.read_exact(&mut payload).unwrap();
                Chunk {
                    cookie: be64(&h[4..]),
                    kind: SIMPLE,
                    done: true,
                    error,
                    payload,
                }
            }
            m @ (0x668e_33ef | 0x6e8a_278c) => {
                let ext = m == 0x6e8a_278c;
                let mut h = vec![0u8; if ext { 28 } else { 16 }];
                self.s.read_exact(&mut h).unwrap();
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let len = if ext {
                    be64(&h[20..])
                } else {
                    u64::from(be32(&h[12..]))
                };
                let mut payload = vec![0; len as usize];
                self.s.read_exact(&mut payload).unwrap();
                let error = if kind & 0x8000 != 0 {
                    be32(&payload)
                } else {
                    0
                };
                Chunk {
                    cookie: be64(&h[4..]),
                    kind,
                    done: flags & 1 != 0,
                    error,
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads all chunks of the next reply (until DONE).
    pub fn reply(&mut self, read_len: usize) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk(read_len);
            let done = c.done;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    /// The error of a single-request exchange (0 on success).
    pub fn error_of(&mut self, flags: u16, cmd: u16, offset: u64, len: u64, data: &[u8]) -> u32 {
        self.request(flags, cmd, 77, offset, len, data);
        let read_len = if cmd == CMD_READ { len as usize } else { 0 };
        let chunks = self.reply(read_len);
        assert!(chunks.iter().all(|c| c.cookie == 77));
        chunks
            .iter()
            .map(|c| c.error)
            .find(|&e| e != 0)
            .unwrap_or(0)
    }

    /// Reads `len` bytes at `offset`, reassembling data and hole chunks.
    pub fn read(&mut self, offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
        self.request(0, CMD_READ, 5, offset, len as u64, &[]);
        let mut buf = vec![0xee; len];
        let mut kinds = Vec::new();
        for c in self.reply(len) {
            kinds.push(c.kind);
            match c.kind {
                SIMPLE => buf.copy_from_slice(&c.payload),
                CHUNK_DATA => {
                    let at = (be64(&c.payload) - offset) as usize;
                    buf[at..at + c.payload.len() - 8].copy_from_slice(&c.payload[8..]);
                }
                CHUNK_HOLE => {
                    let at = (be64(&c.payload) - offset) as usize;
                    let n = be32(&c.payload[8..]) as usize;
                    buf[at..at + n].fill(0);
                }
                CHUNK_NONE => {}
                k => panic!("unexpected chunk {k:#x}: error {}", c.error),
            }
        }
        (buf, kinds)
    }

    /// Whether the server closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// Data of INFO/GO: name and info requests.
pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Decodes a block-status chunk into (context id, [(length, status)]).
pub fn status_of(c: &Chunk) -> (u32, Vec<(u64, u64)>) {
    let p = &c.payload;
    match c.kind {
        CHUNK_STATUS => (
            be32(p),
            p[4..]
                .chunks(8)
                .map(|d| (u64::from(be32(d)), u64::from(be32(&d[4..]))))
                .collect(),
        ),
        CHUNK_STATUS_EXT => {
            let n = be32(&p[4..]) as usize;
            let v: Vec<(u64, u64)> = p[8..]
                .chunks(16)
                .map(|d| (be64(d), be64(&d[8..])))
                .collect();
            assert_eq!(v.len(), n);
            (be32(p), v)
        }
        k => panic!("not a status chunk: {k:#x}"),
    }
}
