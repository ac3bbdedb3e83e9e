//! The bitmaps header extension and the bitmap directory (qcow2.rst, "Bitmaps extension" and
//! "Bitmap directory"), parsed into validated values and encoded back.
//!
//! ```text
//!   header extension 0x23852875: nb_bitmaps | reserved | directory_size | directory_offset
//!   directory entry (8-byte aligned): table_offset u64 | table_size u32 | flags u32 |
//!                                     type u8 | granularity_bits u8 | name_size u16 |
//!                                     extra_data_size u32 | extra data | name | padding
//! ```

use std::path::Path;

use crate::error::{Error, Result};
use crate::qcow2::header::{autoclear, ext, Extension, Header};

/// QEMU's limits (`qcow2-bitmap.c`, `qcow2.h`): bitmaps per image, bytes of directory, entries
/// of one bitmap table, bytes one bitmap's data may take, name length, granularity.
pub const MAX_BITMAPS: u32 = 65535;
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
pub const MAX_NAME_BYTES: usize = 1023;
pub const MIN_GRANULARITY_BITS: u32 = 9;
pub const MAX_GRANULARITY_BITS: u32 = 31;

/// Bytes of the extension payload and of an entry's fixed part.
const EXT_LEN: usize = 24;
const ENTRY_HEADER_LEN: usize = 24;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Directory entry flags.
pub mod flags {
    /// The bitmap was in use (opened for writing) and may be inconsistent.
    pub const IN_USE: u32 = 1 << 0;
    /// The bitmap tracks writes ("enabled").
    pub const AUTO: u32 = 1 << 1;
    /// Flags QEMU does not know; an entry with any of them is refused.
    pub const RESERVED: u32 = !(IN_USE | AUTO);
}

/// The bitmaps extension of an image whose autoclear bit says it is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    pub count: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Reads the extension the way QEMU does at open: ignored without the autoclear bit (a
    /// program without bitmap support wrote the image), refused when out of bounds.
    pub fn from_header(path: &Path, h: &Header) -> Result<Option<BitmapsExt>> {
        let Some(data) = h.extension(ext::BITMAPS) else {
            return Ok(None);
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(None);
        }
        let bad = |what: String| Err(Error::invalid(path, format!("bitmaps_ext: {what}")));
        if data.len() != EXT_LEN {
            return bad(format!("Invalid extension length {}", data.len()));
        }
        let be32 = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
        let be64 = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().unwrap());
        let e = BitmapsExt {
            count: be32(0),
            directory_size: be64(8),
            directory_offset: be64(16),
        };
        if be32(4) != 0 {
            return bad("Reserved field is not zero".into());
        }
        if e.count == 0 {
            return bad("found bitmaps extension with zero bitmaps".into());
        }
        if e.count > MAX_BITMAPS {
            return bad(format!(
                "Image has {} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}",
                e.count
            ));
        }
        if e.directory_size > MAX_DIRECTORY_BYTES {
            return bad(format!(
                "bitmap directory size ({}) exceeds the maximum supported size ({MAX_DIRECTORY_BYTES})",
                e.directory_size
            ));
        }
        if e.directory_offset == 0 || e.directory_offset % h.cluster_size() != 0 {
            return bad("invalid bitmap directory offset".into());
        }
        Ok(Some(e))
    }

    /// Where the directory is: (offset, bytes).
    pub fn directory(self) -> (u64, u64) {
        (self.directory_offset, self.directory_size)
    }

    /// The extension as stored in the header.
    pub fn encode(&self) -> Extension {
        let mut data = Vec::with_capacity(EXT_LEN);
        data.extend_from_slice(&self.count.to_be_bytes());
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&self.directory_size.to_be_bytes());
        data.extend_from_slice(&self.directory_offset.to_be_bytes());
        Extension {
            kind: ext::BITMAPS,
            data,
        }
    }
}

/// One bitmap of the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Where the bitmap table is (cluster aligned).
    pub table_offset: u64,
    /// Entries of the bitmap table (one per data cluster).
    pub table_entries: u32,
    pub flags: u32,
    /// log2 of the guest bytes one bit stands for.
    pub granularity_bits: u32,
    pub name: String,
}

impl DirEntry {
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }

    pub fn auto(&self) -> bool {
        self.flags & flags::AUTO != 0
    }

    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// Bytes the entry takes in the directory, padding included.
    fn encoded_len(&self) -> usize {
        (ENTRY_HEADER_LEN + self.name.len()).next_multiple_of(8)
    }
}

/// Table entries a bitmap of `granularity_bits` needs for `virtual_size` guest bytes.
pub fn table_entries_for(virtual_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    let bits = virtual_size.div_ceil(1 << granularity_bits);
    bits.div_ceil(8).div_ceil(cluster_size)
}

/// Parses and validates the whole directory (QEMU's `check_dir_entry` for every entry, the
/// entry count against the extension, unique names).
pub fn parse_directory(
    path: &Path,
    e: &BitmapsExt,
    dir: &[u8],
    cluster_size: u64,
    virtual_size: u64,
) -> Result<Vec<DirEntry>> {
    let bad = |at: usize, what: String| {
        Err(Error::invalid(
            path,
            format!(
                "bitmap directory entry at offset {:#x}: {what}",
                e.directory_offset + at as u64
            ),
        ))
    };
    let mut entries: Vec<DirEntry> = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        if entries.len() as u32 >= e.count {
            return bad(at, format!("more entries than the {} announced", e.count));
        }
        if at + ENTRY_HEADER_LEN > dir.len() {
            return bad(at, "truncated".into());
        }
        let d = &dir[at..];
        let be32 = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
        let table_offset = u64::from_be_bytes(d[0..8].try_into().unwrap());
        let table_entries = be32(8);
        let entry_flags = be32(12);
        let (kind, granularity_bits) = (d[16], u32::from(d[17]));
        let name_len = usize::from(u16::from_be_bytes(d[18..20].try_into().unwrap()));
        let extra = be32(20) as usize;
        let end = ENTRY_HEADER_LEN + extra + name_len;
        if at + end > dir.len() {
            return bad(
                at,
                format!("name or extra data ({end} bytes) past the directory"),
            );
        }
        if extra != 0 {
            return bad(at, format!("extra data ({extra} bytes) is not supported"));
        }
        if kind != TYPE_DIRTY_TRACKING {
            return bad(at, format!("unknown bitmap type {kind}"));
        }
        if table_offset == 0 || table_offset % cluster_size != 0 {
            return bad(
                at,
                format!("bitmap table offset {table_offset:#x} is not aligned"),
            );
        }
        let phys = u64::from(table_entries) * cluster_size;
        if table_entries == 0
            || u64::from(table_entries) > MAX_TABLE_ENTRIES
            || phys > MAX_PHYS_BYTES
        {
            return bad(
                at,
                format!("bitmap table size {table_entries} is out of range"),
            );
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return bad(
                at,
                format!("granularity bits {granularity_bits} out of range"),
            );
        }
        if entry_flags & flags::RESERVED != 0 {
            return bad(at, format!("reserved flags {entry_flags:#x} are set"));
        }
        if name_len == 0 || name_len > MAX_NAME_BYTES {
            return bad(at, format!("name length {name_len} out of range"));
        }
        // A bitmap that was closed cleanly covers the whole disk.
        if entry_flags & flags::IN_USE == 0 && virtual_size > (phys * 8) << granularity_bits {
            return bad(
                at,
                "the bitmap table does not cover the virtual disk".into(),
            );
        }
        let name = String::from_utf8_lossy(&d[ENTRY_HEADER_LEN + extra..end]).into_owned();
        if entries.iter().any(|o| o.name == name) {
            return bad(at, format!("duplicate bitmap name '{name}'"));
        }
        entries.push(DirEntry {
            table_offset,
            table_entries,
            flags: entry_flags,
            granularity_bits,
            name,
        });
        at = (at + end).next_multiple_of(8);
    }
    if entries.len() as u32 != e.count {
        return Err(Error::invalid(
            path,
            format!(
                "bitmap directory holds {} entries, the extension announces {}",
                entries.len(),
                e.count
            ),
        ));
    }
    Ok(entries)
}

/// The directory bytes of `entries`.
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(DirEntry::encoded_len).sum());
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&e.table_offset.to_be_bytes());
        out.extend_from_slice(&e.table_entries.to_be_bytes());
        out.extend_from_slice(&e.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(e.granularity_bits as u8);
        out.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(e.name.as_bytes());
        out.resize(start + e.encoded_len(), 0);
    }
    out
}

/// Offset of the flags field of entry `index` in an encoded directory (for in-place updates).
pub fn flags_offset(entries: &[DirEntry], index: usize) -> usize {
    entries[..index]
        .iter()
        .map(DirEntry::encoded_len)
        .sum::<usize>()
        + 12
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> DirEntry {
        DirEntry {
            table_offset: 0x30000,
            table_entries: 1,
            flags,
            granularity_bits: 16,
            name: name.into(),
        }
    }

    #[test]
    fn directory_round_trips() {
        let entries = vec![entry("b0", flags::AUTO), entry("a longer name", 0)];
        let raw = encode_directory(&entries);
        assert_eq!(raw.len() % 8, 0);
        let e = BitmapsExt {
            count: 2,
            directory_size: raw.len() as u64,
            directory_offset: 0x10000,
        };
        let back = parse_directory(Path::new("t"), &e, &raw, 0x10000, 8 << 20).unwrap();
        assert_eq!(back, entries);
        assert_eq!(raw[flags_offset(&entries, 1) + 3], 0);
        assert_eq!(raw[flags_offset(&entries, 0) + 3], 2);
    }

    #[test]
    fn bad_entries_are_refused() {
        let p = Path::new("t");
        let check = |entries: &[DirEntry], size: u64| {
            let raw = encode_directory(entries);
            let e = BitmapsExt {
                count: entries.len() as u32,
                directory_size: raw.len() as u64,
                directory_offset: 0x10000,
            };
            parse_directory(p, &e, &raw, 0x10000, size)
        };
        // One 64 KiB table cluster at 64 KiB granularity covers 32 GiB.
        assert!(check(&[entry("a", 0)], 32 << 30).is_ok());
        let err = check(&[entry("a", 0)], (32 << 30) + 1).unwrap_err();
        assert!(err.to_string().contains("does not cover"), "{err}");
        // An in-use bitmap may be stale.
        assert!(check(&[entry("a", flags::IN_USE)], (32 << 30) + 1).is_ok());
        let err = check(&[entry("a", 0), entry("a", 0)], 1).unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
        let mut g = entry("a", 0);
        g.granularity_bits = 8;
        assert!(check(&[g], 1).is_err());
        assert!(check(&[entry("a", 4)], 1).is_err());
        assert_eq!(table_entries_for(8 << 20, 16, 65536), 1);
        assert_eq!(table_entries_for(1 << 40, 9, 512), 1 << 19);
    }
}
