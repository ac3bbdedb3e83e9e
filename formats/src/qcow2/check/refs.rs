//! The in-memory refcount array a check builds from the metadata walk: one refcount per host
//! cluster, kept in chunks that are laid out exactly like refcount blocks on disk (so a chunk
//! *is* a refcount block and the rebuild writes it out as is). Only chunks holding a nonzero
//! refcount exist, so memory follows the clusters in use, not the length of the file (a hostile
//! refcount table can make a repair grow the file by terabytes, as QEMU's does).

use std::collections::BTreeMap;

use crate::qcow2::refcount::{get_entry, set_entry};

#[derive(Debug)]
pub(super) struct RefArray {
    order: u32,
    /// log2 of the refcounts in one chunk (one refcount block).
    chunk_bits: u32,
    cluster_size: usize,
    chunks: BTreeMap<u64, Vec<u8>>,
    /// Clusters covered (QEMU's `nb_clusters`).
    len: u64,
}

impl RefArray {
    pub fn new(order: u32, cluster_bits: u32, len: u64) -> Self {
        RefArray {
            order,
            chunk_bits: cluster_bits + 3 - order,
            cluster_size: 1 << cluster_bits,
            chunks: BTreeMap::new(),
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Covers `len` clusters; the new ones have refcount 0.
    pub fn set_len(&mut self, len: u64) {
        self.len = len;
    }

    fn split(&self, cluster: u64) -> (u64, usize) {
        (
            cluster >> self.chunk_bits,
            (cluster & ((1 << self.chunk_bits) - 1)) as usize,
        )
    }

    pub fn get(&self, cluster: u64) -> u64 {
        let (chunk, i) = self.split(cluster);
        self.chunks
            .get(&chunk)
            .map_or(0, |c| get_entry(c, self.order, i))
    }

    pub fn set(&mut self, cluster: u64, value: u64) {
        let (chunk, i) = self.split(cluster);
        let size = self.cluster_size;
        let c = self.chunks.entry(chunk).or_insert_with(|| vec![0u8; size]);
        set_entry(c, self.order, i, value);
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// The refcount block covering clusters of chunk `index` (zeros if none are counted).
    pub fn block(&self, index: u64) -> Vec<u8> {
        self.chunks
            .get(&index)
            .cloned()
            .unwrap_or_else(|| vec![0u8; self.cluster_size])
    }

    /// The first chunk at or after `index` that holds counts.
    pub fn next_chunk(&self, index: u64) -> Option<u64> {
        self.chunks.range(index..).next().map(|(&k, _)| k)
    }

    /// Indexes of the chunks that hold counts, in order.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.keys().copied()
    }

    /// log2 of the clusters one chunk covers.
    pub fn chunk_bits(&self) -> u32 {
        self.chunk_bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_refcount_blocks_and_exist_only_when_used() {
        // 16-bit refcounts, 512-byte clusters: 256 refcounts per chunk.
        let mut a = RefArray::new(4, 9, 10);
        assert_eq!((a.get(9), a.chunks().count()), (0, 0));
        a.set(9, 7);
        a.set_len(1 << 40);
        a.set(1 << 39, 1);
        assert_eq!((a.get(9), a.get(1 << 39), a.get(300)), (7, 1, 0));
        assert_eq!(&a.block(0)[18..20], &[0, 7]);
        assert_eq!(a.block(5), vec![0u8; 512]);
        assert_eq!(a.chunks().collect::<Vec<_>>(), [0, (1 << 39) >> 8]);
        assert_eq!(a.next_chunk(1), Some((1 << 39) >> 8));
        a.clear();
        assert_eq!(a.get(9), 0);
    }
}
