//! Bitmap tables (qcow2.rst, "Bitmap table"): one 64-bit entry per cluster of bitmap data.
//!
//! ```text
//!   bit  0      all ones: with offset 0, the whole cluster of bits reads as 1
//!   bits 1-8    reserved
//!   bits 9-55   host offset of the data cluster (0: the cluster reads as 0 or as all ones)
//!   bits 56-63  reserved
//! ```
//!
//! Bitmap data is the bitmap's bits in order, least significant bit of each byte first
//! (qcow2.rst, "Bitmap data").

use std::path::Path;

use crate::error::{Error, Result};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const RESERVED: u64 = 0xff00_0000_0000_01fe;
const ALL_ONES: u64 = 1;

/// What one bitmap table entry says about its cluster of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableEntry {
    /// Every bit of the cluster is 0.
    Zeros,
    /// Every bit of the cluster is 1.
    Ones,
    /// The bits are stored in the data cluster at this host offset.
    Data(u64),
}

impl TableEntry {
    /// Decodes an entry, refusing reserved bits, unaligned offsets and the all-ones flag
    /// together with an offset (QEMU's `check_table_entry`).
    pub fn decode(path: &Path, raw: u64, cluster_size: u64) -> Result<TableEntry> {
        let offset = raw & OFFSET_MASK;
        let bad = |what: &str| {
            Err(Error::invalid(
                path,
                format!("bitmap table entry {raw:#018x}: {what}"),
            ))
        };
        if raw & RESERVED != 0 {
            return bad("reserved bits are set");
        }
        match (offset, raw & ALL_ONES != 0) {
            (0, false) => Ok(TableEntry::Zeros),
            (0, true) => Ok(TableEntry::Ones),
            (_, true) => bad("the all-ones flag is set together with an offset"),
            (o, false) if o % cluster_size != 0 => bad("the offset is not cluster aligned"),
            (o, false) => Ok(TableEntry::Data(o)),
        }
    }

    pub fn encode(self) -> u64 {
        match self {
            TableEntry::Zeros => 0,
            TableEntry::Ones => ALL_ONES,
            TableEntry::Data(o) => o,
        }
    }

    /// The data cluster, if the entry has one.
    pub fn data_cluster(self) -> Option<u64> {
        match self {
            TableEntry::Data(o) => Some(o),
            _ => None,
        }
    }
}

/// Decodes a table read from the file (big-endian words).
pub fn decode_table(path: &Path, raw: &[u8], cluster_size: u64) -> Result<Vec<TableEntry>> {
    raw.chunks_exact(8)
        .map(|w| {
            TableEntry::decode(
                path,
                u64::from_be_bytes(w.try_into().unwrap()),
                cluster_size,
            )
        })
        .collect()
}

/// Encodes a table for the file.
pub fn encode_table(entries: &[TableEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e.encode().to_be_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_as_the_spec_says() {
        let p = Path::new("t");
        let cs = 65536;
        assert_eq!(TableEntry::decode(p, 0, cs).unwrap(), TableEntry::Zeros);
        assert_eq!(TableEntry::decode(p, 1, cs).unwrap(), TableEntry::Ones);
        assert_eq!(
            TableEntry::decode(p, 0x30000, cs).unwrap(),
            TableEntry::Data(0x30000)
        );
        assert!(TableEntry::decode(p, 0x30001, cs).is_err());
        assert!(TableEntry::decode(p, 0x30200, cs).is_err());
        assert!(TableEntry::decode(p, 1 << 60, cs).is_err());
        assert!(TableEntry::decode(p, 2, cs).is_err());
        let t = [
            TableEntry::Data(0x50000),
            TableEntry::Zeros,
            TableEntry::Ones,
        ];
        assert_eq!(decode_table(p, &encode_table(&t), cs).unwrap(), t);
    }
}
