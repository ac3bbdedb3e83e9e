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
/// Bits of the first word of an extended L2 entry that must be zero: bit 0 is not a zero flag
/// there (qcow2.rst, "Extended L2 Entries").
pub const EXT_L2_RESERVED: u64 = L2_RESERVED | ZERO;
/// Subclusters per cluster in images with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// Every subcluster of a cluster, as a mask.
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;

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

/// The subcluster allocation bitmap, the second word of an extended L2 entry: bit `i` of `alloc`
/// says subcluster `i` holds data in the host cluster, bit `i` of `zero` that it reads as zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bitmap {
    pub alloc: u32,
    pub zero: u32,
}

impl Bitmap {
    pub fn from_raw(raw: u64) -> Self {
        Bitmap {
            alloc: raw as u32,
            zero: (raw >> 32) as u32,
        }
    }

    pub fn raw(self) -> u64 {
        u64::from(self.alloc) | (u64::from(self.zero) << 32)
    }
}

/// A decoded extended L2 entry (128 bits: a standard entry word and a [`Bitmap`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtL2Entry {
    /// A standard cluster; `host` is its host cluster, if one is allocated.
    Standard {
        host: Option<u64>,
        copied: bool,
        bits: Bitmap,
    },
    /// A compressed cluster (the raw descriptor); it has no subclusters.
    Compressed(u64),
}

impl ExtL2Entry {
    /// An entry with no host cluster and the given bitmap.
    pub const fn hostless(zero: u32) -> ExtL2Entry {
        ExtL2Entry::Standard {
            host: None,
            copied: false,
            bits: Bitmap { alloc: 0, zero },
        }
    }

    /// Decodes the two words of an extended entry; `Err` describes what is wrong.
    pub fn decode(word: u64, bitmap: u64) -> Result<ExtL2Entry, String> {
        if word & COMPRESSED != 0 {
            if word & COPIED != 0 {
                return Err(format!(
                    "compressed L2 entry {word:#018x} has the COPIED flag set"
                ));
            }
            if bitmap != 0 {
                return Err(format!(
                    "compressed L2 entry {word:#018x} has a subcluster bitmap ({bitmap:#018x})"
                ));
            }
            return Ok(ExtL2Entry::Compressed(word & !COMPRESSED));
        }
        if word & EXT_L2_RESERVED != 0 {
            return Err(format!(
                "extended L2 entry {word:#018x} has reserved bits set"
            ));
        }
        let bits = Bitmap::from_raw(bitmap);
        if bits.alloc & bits.zero != 0 {
            return Err(format!(
                "subclusters {:#010x} are marked both allocated and zero (bitmap {bitmap:#018x})",
                bits.alloc & bits.zero
            ));
        }
        let host = word & OFFSET_MASK;
        if host == 0 && bits.alloc != 0 {
            return Err(format!(
                "subclusters {:#010x} are marked allocated but the cluster has no host offset",
                bits.alloc
            ));
        }
        Ok(ExtL2Entry::Standard {
            host: (host != 0).then_some(host),
            copied: word & COPIED != 0,
            bits,
        })
    }

    /// The two words of the entry.
    pub fn encode(self) -> (u64, u64) {
        match self {
            ExtL2Entry::Compressed(raw) => (raw | COMPRESSED, 0),
            ExtL2Entry::Standard { host, copied, bits } => {
                let copied = if copied && host.is_some() { COPIED } else { 0 };
                (host.unwrap_or(0) | copied, bits.raw())
            }
        }
    }

    /// The state of subcluster `i`: `Data`, `Zero` (with the host cluster, if any) or
    /// `Unallocated`; `Compressed` for every subcluster of a compressed cluster.
    pub fn subcluster(self, i: u32) -> L2Entry {
        match self {
            ExtL2Entry::Compressed(raw) => L2Entry::Compressed(raw),
            ExtL2Entry::Standard { host, copied, bits } => {
                if bits.alloc & (1 << i) != 0 {
                    L2Entry::Data {
                        host: host.expect("decode checks allocated subclusters have a host"),
                        copied,
                    }
                } else if bits.zero & (1 << i) != 0 {
                    L2Entry::Zero { host, copied }
                } else {
                    L2Entry::Unallocated
                }
            }
        }
    }

    /// The cluster as one standard entry, for code that only follows references: a host cluster
    /// makes it `Data` (or preallocated `Zero` when every subcluster reads zero); without one it
    /// is `Zero` when every subcluster reads zero, else `Unallocated`.
    pub fn summary(self) -> L2Entry {
        match self {
            ExtL2Entry::Compressed(raw) => L2Entry::Compressed(raw),
            ExtL2Entry::Standard { host, copied, bits } => {
                let all_zero = bits.zero == ALL_SUBCLUSTERS;
                match host {
                    Some(host) if !all_zero => L2Entry::Data { host, copied },
                    _ if all_zero => L2Entry::Zero { host, copied },
                    _ => L2Entry::Unallocated,
                }
            }
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
        assert!(L2Entry::decode(COMPRESSED | COPIED).is_err());
    }

    #[test]
    fn extended_entries_decode_and_validate() {
        let e = ExtL2Entry::decode(COPIED | 0x50000, 0xf0_0000_000f).unwrap();
        assert_eq!(
            e,
            ExtL2Entry::Standard {
                host: Some(0x50000),
                copied: true,
                bits: Bitmap {
                    alloc: 0xf,
                    zero: 0xf0
                }
            }
        );
        assert_eq!(e.encode(), (COPIED | 0x50000, 0xf0_0000_000f));
        assert_eq!(
            e.subcluster(0),
            L2Entry::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert!(matches!(
            e.subcluster(4),
            L2Entry::Zero { host: Some(_), .. }
        ));
        assert_eq!(e.subcluster(8), L2Entry::Unallocated);
        // Bit 0 is reserved, both bits for one subcluster, allocation without a host cluster, a
        // bitmap on a compressed cluster: all refused.
        assert!(ExtL2Entry::decode(1, 0).is_err());
        assert!(ExtL2Entry::decode(0x50000, 0x1_0000_0001).is_err());
        assert!(ExtL2Entry::decode(0, 1).is_err());
        assert!(ExtL2Entry::decode(COMPRESSED | 0x1234, 1).is_err());
        assert_eq!(
            ExtL2Entry::decode(0, u64::from(u32::MAX) << 32)
                .unwrap()
                .summary(),
            L2Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(l1_table_offset(COPIED | 0x40000).unwrap(), Some(0x40000));
    }
}
