//! Metadata overlap checks and the corrupt bit (qcow2.rst, incompatible feature bit 1).
//!
//! The host clusters holding metadata (header, active L1 table, refcount table, refcount blocks,
//! active L2 tables) are kept in a map from cluster index to kind, built at open and maintained as
//! metadata is allocated and released, so checking a data write is one hash lookup per host
//! cluster it touches. A write that would land on metadata can only come from corrupt metadata
//! (an L2 entry or a refcount pointing the wrong way); it is refused, the corrupt bit is set in
//! the header and the image stays read-only from then on, as QEMU does. (Version 2 headers have
//! no feature bits; there the refusal lasts as long as the image is open.)
//!
//! Refcount blocks are created inside the refcount code; they are discovered after each
//! allocation by reading the refcount table entries of block ranges not seen before (8 bytes per
//! new block). A block created while compressed data is packed into the clusters right after the
//! previous compressed cluster is picked up by the next allocation in its range.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::entry;
use super::header::{incompat, Header};
use super::{Meta, Qcow2};
use crate::error::{Error, Result};
use crate::host_file::HostFile;

/// What a metadata cluster holds (named like QEMU's overlap check categories).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetaKind {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    /// The LUKS header and key material of an encrypted image.
    CryptoHeader,
}

impl MetaKind {
    fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2 header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::CryptoHeader => "encryption header",
        }
    }
}

/// A data write that would have landed on metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Overlap {
    /// First host byte of the write inside the metadata cluster.
    pub at: u64,
    pub kind: MetaKind,
}

/// The metadata clusters of an open image, and whether a write was refused for overlapping them.
#[derive(Debug)]
pub(super) struct MetadataClusters {
    cluster_bits: u32,
    /// log2 of the clusters one refcount block covers.
    block_bits: u32,
    clusters: RwLock<HashMap<u64, MetaKind>>,
    /// Refcount table indexes whose block is registered in `clusters`.
    known_blocks: Mutex<HashSet<u64>>,
    /// Set when a write was refused: the image is marked corrupt and no longer written.
    refused: AtomicBool,
    refused_at: AtomicU64,
}

impl MetadataClusters {
    /// Collects the metadata clusters of an image as it is on disk.
    pub fn load(file: &HostFile, header: &Header, l1: &[AtomicU64]) -> Result<Self> {
        let cb = header.cluster_bits;
        let cs = header.cluster_size();
        let mut clusters = HashMap::new();
        let mut add = |offset: u64, bytes: u64, kind: MetaKind| {
            for c in (offset >> cb)..(offset + bytes).div_ceil(cs) {
                clusters.insert(c, kind);
            }
        };
        add(0, 1, MetaKind::Header);
        add(
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
            MetaKind::ActiveL1,
        );
        let table_bytes = u64::from(header.refcount_table_clusters) << cb;
        add(
            header.refcount_table_offset,
            table_bytes,
            MetaKind::RefcountTable,
        );
        // Only the part of the refcount table inside the file exists (QEMU may leave its unused
        // tail unwritten).
        let in_file = table_bytes.min(file.len()?.saturating_sub(header.refcount_table_offset));
        let mut raw = vec![0u8; in_file as usize];
        file.read_at(&mut raw, header.refcount_table_offset)?;
        let mut known_blocks = HashSet::new();
        for (index, e) in raw.chunks_exact(8).enumerate() {
            let off = u64::from_be_bytes(e.try_into().unwrap()) & !0x1ff;
            if off != 0 {
                add(off, 1, MetaKind::RefcountBlock);
                known_blocks.insert(index as u64);
            }
        }
        for e in l1 {
            // Malformed L1 entries are reported when they are used.
            if let Ok(Some(off)) = entry::l1_table_offset(e.load(Ordering::Acquire)) {
                add(off, 1, MetaKind::ActiveL2);
            }
        }
        Ok(MetadataClusters {
            cluster_bits: cb,
            block_bits: cb + 3 - header.refcount_order,
            clusters: RwLock::new(clusters),
            known_blocks: Mutex::new(known_blocks),
            refused: AtomicBool::new(false),
            refused_at: AtomicU64::new(0),
        })
    }

    /// The metadata, if any, that `len` bytes written at host offset `host` would overwrite.
    pub fn overlap(&self, host: u64, len: u64) -> Option<Overlap> {
        if len == 0 {
            return None;
        }
        let cb = self.cluster_bits;
        let clusters = self.clusters.read().unwrap();
        (host >> cb..=(host + len - 1) >> cb).find_map(|c| {
            clusters.get(&c).map(|&kind| Overlap {
                at: host.max(c << cb),
                kind,
            })
        })
    }

    /// Records `n` clusters from byte offset `offset` as metadata of `kind`.
    pub fn add(&self, offset: u64, n: u64, kind: MetaKind) {
        let first = offset >> self.cluster_bits;
        let mut clusters = self.clusters.write().unwrap();
        for c in first..first + n {
            clusters.insert(c, kind);
        }
    }

    /// Forgets the cluster at byte offset `offset` (it was freed or is no longer metadata).
    pub fn remove(&self, offset: u64) {
        self.clusters
            .write()
            .unwrap()
            .remove(&(offset >> self.cluster_bits));
    }

    /// Whether a write was refused for overlapping metadata (the image is read-only since).
    pub fn refused(&self) -> Option<u64> {
        self.refused
            .load(Ordering::Acquire)
            .then(|| self.refused_at.load(Ordering::Relaxed))
    }
}

impl Qcow2 {
    /// Writes data (or a new table) at host offset `host`, unless it would overwrite metadata:
    /// then the image is marked corrupt and the write refused. Needs the metadata lock.
    pub(super) fn write_checked(&self, meta: &mut Meta, buf: &[u8], host: u64) -> Result<()> {
        if let Some(hit) = self.metadata.overlap(host, buf.len() as u64) {
            return Err(self.refuse_overlap(meta, hit));
        }
        self.file.write_at(buf, host)
    }

    /// Marks the image corrupt after a write overlapping metadata was stopped, and returns the
    /// error that refuses it.
    pub(super) fn refuse_overlap(&self, meta: &mut Meta, hit: Overlap) -> Error {
        let first = !self.metadata.refused.swap(true, Ordering::AcqRel);
        if first {
            self.metadata.refused_at.store(hit.at, Ordering::Relaxed);
        }
        let mut what = format!(
            "a data write would overwrite the {}, so metadata is corrupt; the write was refused \
             and the image is marked corrupt and read-only now",
            hit.kind.name()
        );
        if first && meta.header.incompatible_features & incompat::CORRUPT == 0 {
            meta.header.incompatible_features |= incompat::CORRUPT;
            if let Err(e) = self
                .write_header(&meta.header)
                .and_then(|_| self.file.sync())
            {
                what.push_str(&format!(" (setting the corrupt bit failed: {e})"));
            }
        }
        Error::corrupt(self.path(), hit.at, what)
    }

    /// Registers the refcount blocks (and, recursively, the blocks describing them) that cover
    /// the `n` clusters from byte offset `offset`, after their refcounts were set.
    pub(super) fn track_refcount_blocks(&self, meta: &Meta, offset: u64, n: u64) -> Result<()> {
        let md = &self.metadata;
        let (cb, bb) = (md.cluster_bits, md.block_bits);
        let table_entries = u64::from(meta.header.refcount_table_clusters) << (cb - 3);
        let mut known = md.known_blocks.lock().unwrap();
        let mut work = vec![(offset >> cb, n)];
        while let Some((first, n)) = work.pop() {
            if n == 0 {
                continue;
            }
            for index in first >> bb..=(first + n - 1) >> bb {
                if index >= table_entries || known.contains(&index) {
                    continue;
                }
                let mut raw = [0u8; 8];
                self.file
                    .read_at(&mut raw, meta.header.refcount_table_offset + index * 8)?;
                let block = u64::from_be_bytes(raw) & !0x1ff;
                if block != 0 {
                    known.insert(index);
                    md.add(block, 1, MetaKind::RefcountBlock);
                    work.push((block >> cb, 1));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockDev;
    use crate::qcow2::CreateOptions;

    #[test]
    fn new_refcount_blocks_and_a_moved_table_are_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters and one table
        // cluster 64 blocks, so 3 MiB of data needs new blocks and a larger table.
        let opts = CreateOptions {
            size: Some(4 << 20),
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        };
        super::super::create(&path, &opts).unwrap();
        let img = Qcow2::open(&path, false).unwrap();
        let first_table = img.header().refcount_table_offset;
        let data = vec![0x33u8; 64 << 10];
        for i in 0..48u64 {
            img.write_at(&data, i * data.len() as u64).unwrap();
        }
        let h = img.header();
        assert_ne!(h.refcount_table_offset, first_table, "the table moved");
        let kind = |off: u64| img.metadata.overlap(off, 1).map(|o| o.kind);
        let table_bytes = u64::from(h.refcount_table_clusters) * 512;
        let mut raw = vec![0u8; table_bytes as usize];
        img.file.read_at(&mut raw, h.refcount_table_offset).unwrap();
        let blocks: Vec<u64> = raw
            .chunks_exact(8)
            .map(|e| u64::from_be_bytes(e.try_into().unwrap()))
            .filter(|&e| e != 0)
            .collect();
        assert!(blocks.len() > 64, "{} blocks", blocks.len());
        for b in blocks {
            assert_eq!(kind(b), Some(MetaKind::RefcountBlock), "block at {b:#x}");
        }
        for c in 0..u64::from(h.refcount_table_clusters) {
            let at = h.refcount_table_offset + c * 512;
            assert_eq!(kind(at), Some(MetaKind::RefcountTable));
        }
        assert_ne!(kind(first_table), Some(MetaKind::RefcountTable));
        // Every data cluster is writable again: nothing was registered by mistake.
        for i in 0..48u64 {
            img.write_at(&data, i * data.len() as u64).unwrap();
        }
    }
}
