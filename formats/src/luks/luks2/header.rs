//! The LUKS2 binary headers: two copies, each a 4096-byte binary header followed by the JSON area,
//! both covered by a checksum (LUKS2 On-Disk Format Specification, section 2).
//!
//! ```text
//!   0        primary:   magic "LUKS\xba\xbe", u16 version 2, u64 hdr_size, u64 seqid, label[48],
//!                       checksum_alg[32], salt[64], uuid[40], subsystem[48], u64 hdr_offset,
//!                       padding[184], csum[64], padding to 4096; JSON area to hdr_size
//!   hdr_size secondary: the same with magic "SKUL\xba\xbe" and hdr_offset = hdr_size
//!   2*hdr_size          keyslots area (config.keyslots_size bytes), then the data segment
//! ```
//!
//! The checksum is the hash of the whole `hdr_size` bytes with the csum field zeroed. The copy
//! with the higher `seqid` wins; a damaged or stale copy is reported and can be rewritten from the
//! good one ([`super::Luks2::repair`]).

use super::super::hash::HashAlg;
use super::super::{c_string, put_c_string, HeaderIo, MAGIC};

/// Size of the binary part of a header copy.
pub const BIN_HDR_LEN: usize = 4096;
/// The sizes a header copy (binary + JSON) may have; they are also the places where the
/// secondary copy is searched when the primary is unreadable.
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
/// Largest header copy: bounds what is read and allocated for the JSON text.
pub const MAX_HDR_SIZE: u64 = 0x400000;
/// Magic of the secondary copy.
pub const MAGIC_2ND: &[u8; 6] = b"SKUL\xba\xbe";

const CSUM_AT: usize = 448;
const CSUM_LEN: usize = 64;

/// The binary fields of one header copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinHeader {
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    pub checksum_alg: HashAlg,
    pub salt: [u8; 64],
    pub uuid: String,
    pub subsystem: String,
    pub hdr_offset: u64,
}

/// One header copy with a correct checksum: its binary fields and JSON text (up to the NUL).
#[derive(Debug, Clone)]
pub struct HeaderCopy {
    pub bin: BinHeader,
    pub json: String,
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parses the binary fields at the start of `b` (at least [`BIN_HDR_LEN`] bytes) read at
/// `offset`. The error says what is wrong, for the damaged-copy report.
pub fn parse_bin(b: &[u8], offset: u64) -> Result<BinHeader, String> {
    let want = if offset == 0 { MAGIC } else { MAGIC_2ND };
    if &b[..6] != want {
        return Err("bad magic".into());
    }
    let version = u16::from_be_bytes([b[6], b[7]]);
    if version != 2 {
        return Err(format!("version {version} is not 2"));
    }
    let hdr_size = be64(b, 8);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(format!("header size {hdr_size} is not a LUKS2 header size"));
    }
    let hdr_offset = be64(b, 256);
    if hdr_offset != offset {
        return Err(format!(
            "header says it is at offset {hdr_offset}, found at {offset}"
        ));
    }
    let field = |at: usize, len: usize, what: &str| {
        c_string(&b[at..at + len]).ok_or_else(|| format!("{what} is not a NUL-terminated string"))
    };
    let alg = field(72, 32, "checksum algorithm")?;
    let checksum_alg = HashAlg::from_name(&alg)
        .ok_or_else(|| format!("checksum algorithm '{alg}' is not supported"))?;
    let mut salt = [0u8; 64];
    salt.copy_from_slice(&b[104..168]);
    Ok(BinHeader {
        hdr_size,
        seqid: be64(b, 16),
        label: field(24, 48, "label")?,
        checksum_alg,
        salt,
        uuid: field(168, 40, "uuid")?,
        subsystem: field(208, 48, "subsystem")?,
        hdr_offset,
    })
}

/// The checksum of a whole copy (`area` is `hdr_size` bytes), with the csum field taken as zero.
fn checksum(alg: HashAlg, area: &[u8]) -> Vec<u8> {
    let zero = [0u8; CSUM_LEN];
    alg.digest(&[&area[..CSUM_AT], &zero, &area[CSUM_AT + CSUM_LEN..]])
        .to_vec()
}

/// Reads and checks the copy at `offset`: binary fields, checksum, and a NUL-terminated UTF-8
/// JSON text. The error says what is wrong with the copy.
pub fn read_copy(io: &dyn HeaderIo, offset: u64) -> Result<HeaderCopy, String> {
    if io.size() < offset + BIN_HDR_LEN as u64 {
        return Err("file too small".into());
    }
    let mut bin = vec![0u8; BIN_HDR_LEN];
    io.read_at(&mut bin, offset).map_err(|e| e.to_string())?;
    let h = parse_bin(&bin, offset)?;
    if io.size() < offset + h.hdr_size {
        return Err(format!(
            "header size {} reaches past the end of the file",
            h.hdr_size
        ));
    }
    // hdr_size is one of HDR_SIZES, so this is at most MAX_HDR_SIZE bytes.
    let mut area = vec![0u8; h.hdr_size as usize];
    io.read_at(&mut area, offset).map_err(|e| e.to_string())?;
    let want = checksum(h.checksum_alg, &area);
    let have = &area[CSUM_AT..CSUM_AT + want.len()];
    if have != &want[..] {
        return Err("checksum mismatch".into());
    }
    let json_area = &area[BIN_HDR_LEN..];
    let end = json_area
        .iter()
        .position(|&c| c == 0)
        .ok_or("JSON area is not NUL-terminated")?;
    let json = std::str::from_utf8(&json_area[..end])
        .map_err(|_| "JSON area is not UTF-8".to_string())?
        .to_string();
    Ok(HeaderCopy { bin: h, json })
}

/// Where the secondary copy is: right after the primary when its binary header is readable,
/// else the first of [`HDR_SIZES`] holding a secondary magic.
pub fn find_secondary(io: &dyn HeaderIo, primary: Option<&BinHeader>) -> Option<u64> {
    if let Some(p) = primary {
        return Some(p.hdr_size);
    }
    let mut magic = [0u8; 6];
    HDR_SIZES.iter().copied().find(|&off| {
        off + BIN_HDR_LEN as u64 <= io.size()
            && io.read_at(&mut magic, off).is_ok()
            && &magic == MAGIC_2ND
    })
}

/// Reads the binary header at offset 0 without checking its checksum (to locate the secondary).
pub fn peek_primary(io: &dyn HeaderIo) -> Option<BinHeader> {
    if io.size() < BIN_HDR_LEN as u64 {
        return None;
    }
    let mut bin = vec![0u8; BIN_HDR_LEN];
    io.read_at(&mut bin, 0).ok()?;
    parse_bin(&bin, 0).ok()
}

/// Serialises one copy: the binary header for `offset`, the JSON text NUL-padded to
/// `bin.hdr_size`, and the checksum. Each copy gets its own `salt`. The caller checks the JSON
/// fits.
pub fn build_copy(bin: &BinHeader, json: &str, offset: u64, salt: &[u8; 64]) -> Vec<u8> {
    let mut b = vec![0u8; bin.hdr_size as usize];
    b[..6].copy_from_slice(if offset == 0 { MAGIC } else { MAGIC_2ND });
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&bin.hdr_size.to_be_bytes());
    b[16..24].copy_from_slice(&bin.seqid.to_be_bytes());
    put_c_string(&mut b[24..72], &bin.label);
    put_c_string(&mut b[72..104], bin.checksum_alg.name());
    b[104..168].copy_from_slice(salt);
    put_c_string(&mut b[168..208], &bin.uuid);
    put_c_string(&mut b[208..256], &bin.subsystem);
    b[256..264].copy_from_slice(&offset.to_be_bytes());
    b[BIN_HDR_LEN..BIN_HDR_LEN + json.len()].copy_from_slice(json.as_bytes());
    let sum = checksum(bin.checksum_alg, &b);
    b[CSUM_AT..CSUM_AT + sum.len()].copy_from_slice(&sum);
    b
}
