//! The qcow2 header and its extensions (qemu `docs/interop/qcow2.rst`, "Header" and "Header
//! extensions"), parsed once into a typed, validated [`Header`] and encoded back byte for byte,
//! unknown extensions and unknown trailing header fields included.

use std::path::Path;

use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the version 2 header; version 3 headers are at least 104 bytes.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header length QEMU writes for version 3 (with the compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// QEMU's limit on the L1 table (`QCOW_MAX_L1_SIZE`), in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`), in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Longest backing format name (the backing format extension): QEMU keeps it in a 16-byte buffer
/// and refuses longer ones ("ext_backing_format: len=N too large").
pub const MAX_BACKING_FORMAT_NAME: usize = 15;
/// Most header extensions vdisk reads. The spec sets no number (they only have to fit in the
/// first cluster, up to 262144 empty ones in 2 MiB) and QEMU reads them all, though it writes at
/// most six; this many fill a default 64 KiB cluster, so every image of that size opens.
pub const MAX_HEADER_EXTENSIONS: usize = 8192;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
}
/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// `crypt_method` values.
pub mod crypt_method {
    pub const NONE: u32 = 0;
    /// Legacy AES-CBC with the guest sector as IV; not supported.
    pub const AES: u32 = 1;
    /// LUKS, with its header where the full disk encryption header extension points.
    pub const LUKS: u32 = 2;
}

/// Header extension types.
pub mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// One header extension, kept as its raw payload so that unknown ones survive a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// An entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// A parsed qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// Header bytes past the fields this version knows (up to `header_length`), preserved.
    pub extra_fields: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses and validates a header from the start of the file. `buf` must hold at least the
    /// first cluster of the file (or the whole file when it is shorter); `file_len` is the file's
    /// length, against which table offsets are checked.
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header> {
        let bad = |what: String| Error::invalid(path, what);
        if buf.len() < 4 || be32(buf, 0) != MAGIC {
            return Err(bad("Image is not in qcow2 format".into()));
        }
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(bad(format!(
                "qcow2 header is truncated ({} bytes, at least {V2_HEADER_LEN} needed)",
                buf.len()
            )));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                path,
                format!("Unsupported qcow2 version {version}"),
            ));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "Unsupported cluster size: 2^{cluster_bits} (valid: 2^9 to 2^21)"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extra_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(bad("qcow2 version 3 header is truncated".into()));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length % 8 != 0 {
                return Err(bad(format!(
                    "qcow2 header length {} is invalid (at least {V3_MIN_HEADER_LEN} and a multiple of 8)",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > buf.len() {
                return Err(bad(format!(
                    "qcow2 header length {} exceeds the first cluster or the file",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
                h.extra_fields = buf[105..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(bad(format!(
                "Refcount order {} is invalid (at most {MAX_REFCOUNT_ORDER})",
                h.refcount_order
            )));
        }
        h.validate_tables(path, file_len)?;
        h.parse_extensions(path, buf)?;
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        if backing_offset != 0 {
            if backing_size > MAX_BACKING_NAME {
                return Err(bad(format!(
                    "Backing file name too long ({backing_size} bytes, at most {MAX_BACKING_NAME})"
                )));
            }
            let end = backing_offset.checked_add(u64::from(backing_size));
            match end {
                Some(end) if end <= cs.min(buf.len() as u64) => {
                    let raw = &buf[backing_offset as usize..end as usize];
                    h.backing_file = Some(String::from_utf8_lossy(raw).into_owned());
                }
                _ => {
                    return Err(bad(format!(
                        "Backing file name at offset {backing_offset:#x} lies outside the first cluster"
                    )))
                }
            }
        }
        Ok(h)
    }

    fn validate_tables(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bad = |what: String| Error::invalid(path, what);
        // A table must start inside the file; its end may lie past the end only for the refcount
        // table, whose unused tail QEMU does not always write.
        let check_offset = |name: &str, off: u64, bytes: u64, tail_may_be_missing: bool| {
            if off % cs != 0 {
                return Err(bad(format!(
                    "{name} offset {off:#x} is not aligned to the cluster size {cs}"
                )));
            }
            let end = off.saturating_add(bytes);
            if off >= file_len || (!tail_may_be_missing && end > file_len) {
                return Err(bad(format!(
                    "{name} at offset {off:#x} ({bytes} bytes) is past the end of the file ({file_len} bytes)"
                )));
            }
            Ok(())
        };
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "Reference count table too large: {} clusters ({rt_bytes} bytes, at most {MAX_REFTABLE_BYTES})",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(bad("Image does not contain a reference count table".into()));
        }
        check_offset(
            "Reference count table",
            self.refcount_table_offset,
            rt_bytes,
            true,
        )?;
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "Active L1 table too large: {} entries ({l1_bytes} bytes, at most {MAX_L1_BYTES})",
                self.l1_size
            )));
        }
        let needed = self.l1_entries_needed(self.size);
        if needed.is_none_or(|n| u64::from(self.l1_size) < n) {
            return Err(bad(format!(
                "L1 table is too small ({} entries) for the image size {}",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 {
            check_offset("L1 table", self.l1_table_offset, l1_bytes, false)?;
        }
        if self.nb_snapshots > crate::qcow2::snapshot::MAX_SNAPSHOTS {
            return Err(bad(format!(
                "Too many snapshots ({}, at most {})",
                self.nb_snapshots,
                crate::qcow2::snapshot::MAX_SNAPSHOTS
            )));
        }
        if self.nb_snapshots > 0 && self.snapshots_offset % cs != 0 {
            return Err(bad(format!(
                "Snapshot table offset {:#x} is not aligned to the cluster size",
                self.snapshots_offset
            )));
        }
        Ok(())
    }

    /// L1 entries needed to map `size` bytes, or None when it would overflow.
    pub fn l1_entries_needed(&self, size: u64) -> Option<u64> {
        let l2_bits = self.cluster_bits - if self.extended_l2() { 4 } else { 3 };
        let span_bits = self.cluster_bits + l2_bits;
        Some(size.checked_add((1u64 << span_bits) - 1)? >> span_bits)
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    /// Where the extension area starts.
    fn extensions_start(&self) -> usize {
        if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            self.header_length as usize
        }
    }

    fn parse_extensions(&mut self, path: &Path, buf: &[u8]) -> Result<()> {
        let end = buf.len().min(self.cluster_size() as usize);
        let mut at = self.extensions_start();
        let mut seen = std::collections::HashSet::new();
        loop {
            if at + 8 > end {
                // The list may end with the first cluster (or the file) without an end marker,
                // as QEMU's reader allows; v2 headers often stop right after the fixed fields.
                return Ok(());
            }
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == ext::END {
                return Ok(());
            }
            let data_end = (at + 8).checked_add(len).filter(|&e| e <= end);
            let Some(data_end) = data_end else {
                return Err(Error::invalid(
                    path,
                    format!(
                        "header extension {kind:#x} at offset {at:#x} has length {len}, past the first cluster"
                    ),
                ));
            };
            if self.extensions.len() == MAX_HEADER_EXTENSIONS {
                return Err(Error::invalid(
                    path,
                    format!(
                        "more than {MAX_HEADER_EXTENSIONS} header extensions (the next at offset {at:#x})"
                    ),
                ));
            }
            if !seen.insert(kind) {
                return Err(Error::invalid(
                    path,
                    format!("header extension {kind:#x} appears twice"),
                ));
            }
            if kind == ext::BACKING_FORMAT && len > MAX_BACKING_FORMAT_NAME {
                return Err(Error::invalid(
                    path,
                    format!(
                        "backing format name too long ({len} bytes, at most {MAX_BACKING_FORMAT_NAME})"
                    ),
                ));
            }
            self.extensions.push(Extension {
                kind,
                data: buf[at + 8..data_end].to_vec(),
            });
            at = data_end.next_multiple_of(8);
        }
    }

    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// The backing format named by the backing-format extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extension(ext::BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The feature name table, if the image has one.
    pub fn feature_names(&self) -> Vec<FeatureName> {
        let Some(data) = self.extension(ext::FEATURE_TABLE) else {
            return Vec::new();
        };
        data.chunks_exact(48)
            .map(|e| FeatureName {
                kind: e[0],
                bit: e[1],
                name: String::from_utf8_lossy(&e[2..])
                    .trim_end_matches('\0')
                    .to_string(),
            })
            .collect()
    }

    /// Describes incompatible feature bits outside `known`, with names from the feature table the
    /// way QEMU reports them.
    pub fn describe_unknown_incompat(&self, known: u64) -> Option<String> {
        let unknown = self.incompatible_features & !known;
        if unknown == 0 {
            return None;
        }
        let names = self.feature_names();
        let mut parts = Vec::new();
        let mut rest = unknown;
        for bit in 0..64u8 {
            if unknown & (1 << bit) == 0 {
                continue;
            }
            if let Some(f) = names.iter().find(|f| f.kind == 0 && f.bit == bit) {
                parts.push(f.name.clone());
                rest &= !(1 << bit);
            }
        }
        if rest != 0 {
            parts.push(format!("Unknown incompatible feature: {rest:x}"));
        }
        Some(parts.join(", "))
    }

    /// Encodes the header, its extensions and the backing file name into the bytes of the start of
    /// cluster 0. Fails when they do not fit in one cluster.
    pub fn encode(&self, path: &Path) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.extensions_start()];
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.version.to_be_bytes());
        out[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        out[24..32].copy_from_slice(&self.size.to_be_bytes());
        out[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        out[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        out[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        out[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        out[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            out[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            out[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            out[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            out[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            out[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                out[104] = self.compression_type;
                out[105..self.header_length as usize].copy_from_slice(&self.extra_fields);
            }
        }
        for e in &self.extensions {
            out.extend_from_slice(&e.kind.to_be_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&e.data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = out.len() as u64;
            out[8..16].copy_from_slice(&off.to_be_bytes());
            out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::NoSpace {
                path: path.to_path_buf(),
                what: "header extensions and backing file name do not fit in the first cluster"
                    .into(),
            });
        }
        Ok(out)
    }
}

/// The feature name table QEMU writes into every version 3 image.
pub fn default_feature_table() -> Extension {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&entry);
    }
    Extension {
        kind: ext::FEATURE_TABLE,
        data,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            extra_fields: vec![0; 7],
            extensions: vec![
                default_feature_table(),
                Extension {
                    kind: 0x1234_5678,
                    data: vec![1, 2, 3],
                },
            ],
            backing_file: None,
        }
    }

    #[test]
    fn encode_then_parse_keeps_unknown_extensions() {
        let p = Path::new("t.qcow2");
        let h = sample();
        let bytes = h.encode(p).unwrap();
        let parsed = Header::parse(p, &bytes, 0x40000).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.feature_names().len(), 8);
    }

    #[test]
    fn truncated_and_absurd_headers_are_refused() {
        let p = Path::new("t.qcow2");
        let bytes = sample().encode(p).unwrap();
        let err = Header::parse(p, &bytes[..50], 0x40000).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut big_l1 = bytes.clone();
        big_l1[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        let err = Header::parse(p, &big_l1, 0x40000).unwrap_err();
        assert!(err.to_string().contains("L1 table too large"), "{err}");
        let err = Header::parse(p, &bytes, 0x20000).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }

    #[test]
    fn unknown_incompatible_bits_are_named() {
        let mut h = sample();
        h.incompatible_features = incompat::EXTL2 | (1 << 40);
        let msg = h.describe_unknown_incompat(0).unwrap();
        assert_eq!(
            msg,
            "extended L2 entries, Unknown incompatible feature: 10000000000"
        );
    }
}
