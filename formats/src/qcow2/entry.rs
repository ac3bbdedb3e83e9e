//! L1 and L2 table entries (qcow2.rst, "Cluster mapping"), decoded into typed values.

/// Offset bits of an L1 entry, an L2 entry and a refcount table entry (bits 9-55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one, it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zero (version 3).
pub const ZERO: u64 = 1;
/// Bits of an L1 entry that must be zero.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard L2 entry that must be zero.
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// A decoded L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Nothing allocated: reads from the backing file, or as zero.
    Unallocated,
    /// Reads as zero; `host` is a preallocated cluster kept for later writes.
    Zero { host: Option<u64>, copied: bool },
    /// Data in the host cluster at `host`.
    Data { host: u64, copied: bool },
    /// A compressed cluster (the raw descriptor).
    Compressed(u64),
}

impl L2Entry {
    /// Decodes a raw entry; `Err` carries a description of what is wrong.
    pub fn decode(raw: u64) -> Result<L2Entry, String> {
        if raw & COMPRESSED != 0 {
            if raw & COPIED != 0 {
                return Err(format!(
                    "compressed L2 entry {raw:#018x} has the COPIED flag set"
                ));
            }
            return Ok(L2Entry::Compressed(raw & !COMPRESSED));
        }
        if raw & L2_RESERVED != 0 {
            return Err(format!("L2 entry {raw:#018x} has reserved bits set"));
        }
        let host = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        Ok(if raw & ZERO != 0 {
            L2Entry::Zero {
                host: (host != 0).then_some(host),
                copied,
            }
        } else if host == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Data { host, copied }
        })
    }

    /// The host cluster this entry holds a reference to, if any (compressed clusters excluded).
    pub fn host_cluster(&self) -> Option<u64> {
        match *self {
            L2Entry::Data { host, .. } => Some(host),
            L2Entry::Zero { host, .. } => host,
            _ => None,
        }
    }
}

/// Decodes the L2 table offset of an L1 entry; `Err` describes a malformed entry.
pub fn l1_table_offset(raw: u64) -> Result<Option<u64>, String> {
    if raw & L1_RESERVED != 0 {
        return Err(format!("L1 entry {raw:#018x} has reserved bits set"));
    }
    let off = raw & OFFSET_MASK;
    Ok((off != 0).then_some(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_by_kind() {
        assert_eq!(L2Entry::decode(0).unwrap(), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(COPIED | 0x50000).unwrap(),
            L2Entry::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(ZERO).unwrap(),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert!(L2Entry::decode(0x50002).is_err());
        assert!(l1_table_offset(0x1).is_err());
        assert_eq!(l1_table_offset(COPIED | 0x40000).unwrap(), Some(0x40000));
    }
}
