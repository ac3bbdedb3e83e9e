//! Persistent dirty bitmaps in a check (qcow2.rst, "Bitmaps extension"): their directory,
//! bitmap tables and data clusters hold references like any other metadata (QEMU's
//! `qcow2_check_bitmaps_refcounts`). The bitmaps themselves are left alone: a repair keeps them,
//! counted as in use.

use std::path::Path;

use super::refs::RefArray;
use super::{Checker, Counts, Fail};
use crate::error::{Error, Result};
use crate::qcow2::header::{autoclear, ext, Header};

/// QEMU's limits: bitmaps per image, bytes of directory, entries of one table, bytes one
/// bitmap's data may take, name length.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
const MAX_NAME_BYTES: u16 = 1023;
/// Bits of a bitmap table entry that must be zero; bit 0 ("all ones") only without an offset.
const TABLE_ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_HEADER_LEN: usize = 24;
const FLAG_IN_USE: u32 = 1;
const RESERVED_FLAGS: u32 = !3;

/// The bitmaps extension, when the image has one that counts (its autoclear bit is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BitmapsExt {
    count: u32,
    directory_size: u64,
    directory_offset: u64,
}

impl BitmapsExt {
    /// Reads the extension the way QEMU does at open: ignored without the autoclear bit,
    /// refused when out of bounds.
    pub fn from_header(path: &Path, h: &Header) -> Result<Option<BitmapsExt>> {
        let Some(data) = h.extension(ext::BITMAPS) else {
            return Ok(None);
        };
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(None);
        }
        let bad = |what: String| Err(Error::invalid(path, format!("bitmaps_ext: {what}")));
        if data.len() < 24 {
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
        if e.directory_offset % h.cluster_size() != 0 {
            return bad("invalid bitmap directory offset".into());
        }
        Ok(Some(e))
    }
}

impl BitmapsExt {
    /// Where the bitmap directory is: (offset, bytes).
    pub fn directory(self) -> (u64, u64) {
        (self.directory_offset, self.directory_size)
    }
}

/// One bitmap of the directory: where its table is and how long it is.
struct Table {
    offset: u64,
    entries: u64,
}

impl Checker {
    /// Counts the bitmap directory, tables and data clusters. A directory or table QEMU would
    /// not load is a corruption that ends the check ("Invalid argument").
    pub(super) fn check_bitmaps(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
    ) -> Result<(), Fail> {
        let Some(e) = self.img.bitmaps else {
            return Ok(());
        };
        self.inc(res, arr, e.directory_offset, e.directory_size)?;
        let Some(tables) = self.bitmap_tables(&e) else {
            res.corruptions += 1;
            return Err(Fail::invalid());
        };
        let cs = self.img.cluster_size();
        for t in tables {
            self.inc(res, arr, t.offset, t.entries * 8)?;
            let mut raw = vec![0u8; (t.entries * 8) as usize];
            self.img.read(&mut raw, t.offset)?;
            let entries = super::image::be64_words(&raw);
            if entries.iter().any(|&v| !table_entry_ok(v, cs)) {
                res.corruptions += 1;
                return Err(Fail::invalid());
            }
            for v in entries {
                let offset = v & TABLE_ENTRY_OFFSET;
                if offset != 0 {
                    self.inc(res, arr, offset, cs)?;
                }
            }
        }
        Ok(())
    }

    /// The bitmap tables of a directory that satisfies QEMU's constraints, or `None`.
    fn bitmap_tables(&self, e: &BitmapsExt) -> Option<Vec<Table>> {
        if e.directory_size == 0 {
            return None;
        }
        let mut dir = vec![0u8; e.directory_size as usize];
        self.img.read(&mut dir, e.directory_offset).ok()?;
        let cs = self.img.cluster_size();
        let virtual_size = self.img.header.size;
        let mut tables = Vec::new();
        let mut at = 0usize;
        while at < dir.len() {
            if at + ENTRY_HEADER_LEN > dir.len() || tables.len() as u32 >= e.count {
                return None;
            }
            let d = &dir[at..];
            let offset = u64::from_be_bytes(d[0..8].try_into().unwrap());
            let entries = u64::from(u32::from_be_bytes(d[8..12].try_into().unwrap()));
            let flags = u32::from_be_bytes(d[12..16].try_into().unwrap());
            let (kind, granularity) = (d[16], u32::from(d[17]));
            let name_len = u16::from_be_bytes(d[18..20].try_into().unwrap());
            let extra = u32::from_be_bytes(d[20..24].try_into().unwrap());
            let next = (at + ENTRY_HEADER_LEN + usize::from(name_len) + extra as usize)
                .next_multiple_of(8);
            if next > dir.len() || extra != 0 {
                return None;
            }
            let phys = entries * cs;
            let sane = entries != 0
                && offset != 0
                && offset % cs == 0
                && entries <= MAX_TABLE_ENTRIES
                && (9..=31).contains(&granularity)
                && flags & RESERVED_FLAGS == 0
                && name_len <= MAX_NAME_BYTES
                && kind == 1
                && phys <= MAX_PHYS_BYTES
                && (flags & FLAG_IN_USE != 0 || virtual_size <= (phys * 8) << granularity);
            if !sane {
                return None;
            }
            tables.push(Table { offset, entries });
            at = next;
        }
        (tables.len() as u32 == e.count).then_some(tables)
    }
}

/// A bitmap table entry QEMU accepts: no reserved bits, an aligned offset, and the "all ones"
/// flag only without one.
fn table_entry_ok(v: u64, cluster_size: u64) -> bool {
    let offset = v & TABLE_ENTRY_OFFSET;
    v & TABLE_ENTRY_RESERVED == 0 && (offset == 0 || (v & 1 == 0 && offset % cluster_size == 0))
}
