//! Reference counts and cluster allocation (qcow2.rst, "Host cluster management").
//!
//! The refcount table points to refcount blocks; each block holds `cluster_size * 8 /
//! refcount_bits` entries of `refcount_bits` bits (big-endian; widths under 8 bits are packed from
//! the least significant bit). Every change is written through to disk at once, in an order that
//! leaves at worst a leak, never a corruption, if the process dies: a cluster's refcount is raised
//! before anything points to it, and lowered only after nothing does.
//!
//! New refcount blocks describe themselves when they can (they sit in the range they cover); the
//! table grows by moving to a larger run of free clusters, after which the header is switched and
//! the old table released (see [`Refcounts::take_table_move`]).

use std::collections::HashMap;

use super::entry::OFFSET_MASK;
use super::header::MAX_REFTABLE_BYTES;
use super::lru::Lru;
use crate::error::{Error, Result};
use crate::host_file::HostFile;

/// Refcount blocks kept in memory.
const BLOCK_CACHE: usize = 64;

/// Where the refcount table moved to; the header must be updated, then the old clusters freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMove {
    pub offset: u64,
    pub clusters: u32,
    pub old_offset: u64,
    pub old_clusters: u32,
}

/// The refcount structures of an open image.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// log2 of the entries per refcount block.
    block_bits: u32,
    table: Vec<u64>,
    table_offset: u64,
    blocks: Lru<Vec<u8>>,
    /// No free cluster lies below this cluster index.
    free_hint: u64,
    /// Clusters below this index are being allocated and must not be handed out for metadata.
    reserved_until: u64,
    moved: Option<TableMove>,
    file_len: u64,
}

impl Refcounts {
    /// Loads the refcount table.
    pub fn load(
        file: &HostFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<Self> {
        let bytes = (u64::from(table_clusters) << cluster_bits) as usize;
        let mut raw = vec![0u8; bytes];
        file.read_at(&mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        Ok(Refcounts {
            cluster_bits,
            order,
            block_bits: cluster_bits + 3 - order,
            table,
            table_offset,
            blocks: Lru::new(BLOCK_CACHE),
            free_hint: 0,
            reserved_until: 0,
            moved: None,
            file_len: file.len()?,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Largest refcount value the width can hold.
    pub fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn block_offset(&self, file: &HostFile, index: usize) -> Result<Option<u64>> {
        let Some(&raw) = self.table.get(index) else {
            return Ok(None);
        };
        if raw & 0x1ff != 0 {
            return Err(Error::corrupt(
                file.path(),
                self.table_offset + index as u64 * 8,
                format!("refcount table entry {index} ({raw:#x}) has reserved bits set"),
            ));
        }
        let off = raw & !0x1ff;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cluster_size() != 0 || off >= self.file_len {
            return Err(Error::corrupt(
                file.path(),
                self.table_offset + index as u64 * 8,
                format!("refcount block offset {off:#x} is invalid or past the end of the file"),
            ));
        }
        Ok(Some(off))
    }

    fn block<'a>(&'a mut self, file: &HostFile, offset: u64) -> Result<&'a mut Vec<u8>> {
        if self.blocks.get(offset).is_none() {
            let mut raw = vec![0u8; self.cluster_size() as usize];
            file.read_at(&mut raw, offset)?;
            self.blocks.insert(offset, raw);
        }
        Ok(self.blocks.get(offset).expect("just inserted"))
    }

    /// The refcount of host cluster `cluster`.
    pub fn get(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        let index = (cluster >> self.block_bits) as usize;
        let Some(off) = self.block_offset(file, index)? else {
            return Ok(0);
        };
        let order = self.order;
        let i = (cluster & ((1 << self.block_bits) - 1)) as usize;
        Ok(get_entry(self.block(file, off)?, order, i))
    }

    /// Sets the refcount of `n` clusters from `start` to `value`, creating refcount blocks (and
    /// growing the table) as needed. Each touched block is written once.
    pub fn set_range(&mut self, file: &HostFile, start: u64, n: u64, value: u64) -> Result<()> {
        let mut c = start;
        let end = start + n;
        while c < end {
            let index = (c >> self.block_bits) as usize;
            let off = self.ensure_block(file, index)?;
            let block_end = end.min(((index as u64) + 1) << self.block_bits);
            let order = self.order;
            let mask = (1u64 << self.block_bits) - 1;
            let (first, last) = ((c & mask) as usize, ((block_end - 1) & mask) as usize);
            let block = self.block(file, off)?;
            for i in first..=last {
                set_entry(block, order, i, value);
            }
            let (lo, hi) = byte_span(order, first, last);
            file.write_at(&block[lo..hi], off + lo as u64)?;
            c = block_end;
        }
        Ok(())
    }

    /// Returns the offset of refcount block `index`, creating it if it does not exist.
    fn ensure_block(&mut self, file: &HostFile, index: usize) -> Result<u64> {
        if index >= self.table.len() {
            self.grow_table(file, index)?;
        }
        if let Some(off) = self.block_offset(file, index)? {
            return Ok(off);
        }
        let from = self.free_hint.max(self.reserved_until);
        let b = self.find_free(file, 1, from)?;
        let cs = self.cluster_size();
        let mut block = vec![0u8; cs as usize];
        let describes_itself = (b >> self.block_bits) as usize == index;
        if describes_itself {
            set_entry(
                &mut block,
                self.order,
                (b & ((1 << self.block_bits) - 1)) as usize,
                1,
            );
        }
        file.write_at(&block, b * cs)?;
        self.file_len = self.file_len.max((b + 1) * cs);
        self.blocks.insert(b * cs, block);
        self.table[index] = b * cs;
        file.write_at(
            &(b * cs).to_be_bytes(),
            self.table_offset + index as u64 * 8,
        )?;
        if !describes_itself {
            self.reserved_until = self.reserved_until.max(b + 1);
            self.set_range(file, b, 1, 1)?;
        }
        Ok(b * cs)
    }

    /// Moves the table to a larger run of free clusters so that it has an entry for block `index`.
    fn grow_table(&mut self, file: &HostFile, index: usize) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let old_len = self.table.len();
        let old_offset = self.table_offset;
        let old_clusters = (old_len / per_cluster) as u32;
        let from = self.free_hint.max(self.reserved_until);
        let mut len = (index + 1).max(old_len + old_len / 2);
        let (start, clusters) = loop {
            len = len.next_multiple_of(per_cluster);
            let clusters = (len / per_cluster) as u64;
            if clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::NoSpace {
                    path: file.path().to_path_buf(),
                    what: format!(
                        "refcount table would exceed {MAX_REFTABLE_BYTES} bytes; the image is full"
                    ),
                });
            }
            let start = self.find_free(file, clusters, from)?;
            // The table must also cover itself and the refcount blocks that will describe it.
            let covered_needed = ((start + clusters + 2 * clusters + 2) >> self.block_bits) + 1;
            if len as u64 > covered_needed {
                break (start, clusters);
            }
            len = covered_needed as usize + 1;
        };
        self.table.resize(len, 0);
        self.table_offset = start * cs;
        self.reserved_until = self.reserved_until.max(start + clusters);
        let mut raw = Vec::with_capacity(len * 8);
        for e in &self.table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        file.write_at(&raw, self.table_offset)?;
        self.file_len = self.file_len.max(self.table_offset + raw.len() as u64);
        self.set_range(file, start, clusters, 1)?;
        let prev = self.moved.take();
        self.moved = Some(TableMove {
            offset: self.table_offset,
            clusters: clusters as u32,
            old_offset: prev.map_or(old_offset, |p| p.old_offset),
            old_clusters: prev.map_or(old_clusters, |p| p.old_clusters),
        });
        Ok(())
    }

    /// If the table moved since the last call, returns where; the caller updates the header and
    /// then releases the old table with [`Refcounts::free_range`].
    pub fn take_table_move(&mut self) -> Option<TableMove> {
        self.moved.take()
    }

    /// First run of `n` free clusters at or after cluster `from`. A scan that starts at the free
    /// hint moves the hint to the run it found, as QEMU moves `free_cluster_index`.
    fn find_free(&mut self, file: &HostFile, n: u64, from: u64) -> Result<u64> {
        let start = self
            .find_free_before(file, n, from, u64::MAX)?
            .expect("an unbounded scan always finds free clusters");
        if from == self.free_hint {
            self.free_hint = start;
        }
        Ok(start)
    }

    /// First run of `n` free clusters starting in `from..limit`, if any.
    fn find_free_before(
        &mut self,
        file: &HostFile,
        n: u64,
        from: u64,
        limit: u64,
    ) -> Result<Option<u64>> {
        let mut start = from;
        let mut c = from;
        let entries = 1u64 << self.block_bits;
        while c - start < n {
            if start >= limit {
                return Ok(None);
            }
            let index = (c >> self.block_bits) as usize;
            if self.block_offset(file, index)?.is_none() {
                // A missing block: all of its clusters are free.
                c = (c | (entries - 1)) + 1;
                continue;
            }
            if self.get(file, c)? != 0 {
                start = c + 1;
            }
            c += 1;
        }
        Ok(Some(start))
    }

    /// Where a run of `n` clusters goes: a hole near the free hint when one is close (within two
    /// refcount blocks), else the end of the image. This keeps every allocation's cost bounded
    /// when the only holes are too small, without moving the hint past them (single clusters
    /// still fill them).
    fn place_run(&mut self, file: &HostFile, n: u64) -> Result<u64> {
        let window = 2u64 << self.block_bits;
        let hint = self.free_hint;
        let end_of_file = self.file_len.div_ceil(self.cluster_size());
        if n == 1 || hint >= end_of_file {
            return self.find_free(file, n, hint);
        }
        if let Some(start) = self.find_free_before(file, n, hint, hint.saturating_add(window))? {
            return Ok(start);
        }
        self.find_free(file, n, end_of_file.max(hint))
    }

    /// Allocates `n` contiguous clusters with refcount 1 and returns the byte offset of the first.
    pub fn alloc(&mut self, file: &HostFile, n: u64) -> Result<u64> {
        let start = self.place_run(file, n)?;
        let limit = OFFSET_MASK >> self.cluster_bits;
        if start + n > limit {
            return Err(Error::NoSpace {
                path: file.path().to_path_buf(),
                what: "no host offset left for new clusters".into(),
            });
        }
        self.reserved_until = start + n;
        let result = self.set_range(file, start, n, 1);
        self.reserved_until = 0;
        result?;
        if start == self.free_hint {
            self.free_hint = start + n;
        }
        let cs = self.cluster_size();
        self.file_len = self.file_len.max((start + n) * cs);
        Ok(start * cs)
    }

    /// Allocates the `n` clusters from cluster index `start` if they are all free; returns
    /// whether it did.
    pub fn alloc_at(&mut self, file: &HostFile, start: u64, n: u64) -> Result<bool> {
        for c in start..start + n {
            if self.get(file, c)? != 0 {
                return Ok(false);
            }
        }
        self.reserved_until = start + n;
        let result = self.set_range(file, start, n, 1);
        self.reserved_until = 0;
        result?;
        if (start..start + n).contains(&self.free_hint) {
            self.free_hint = start + n;
        }
        let cs = self.cluster_size();
        self.file_len = self.file_len.max((start + n) * cs);
        Ok(true)
    }

    /// Lowers the refcount of each of `n` clusters from byte offset `offset` by one; returns the
    /// clusters (byte offsets) that became free.
    pub fn free_range(&mut self, file: &HostFile, offset: u64, n: u64) -> Result<Vec<u64>> {
        let first = offset >> self.cluster_bits;
        let mut freed = Vec::new();
        for c in first..first + n {
            let v = self.get(file, c)?;
            if v == 0 {
                return Err(Error::corrupt(
                    file.path(),
                    c << self.cluster_bits,
                    "cannot release a cluster whose refcount is already zero",
                ));
            }
            self.set_range(file, c, 1, v - 1)?;
            if v == 1 {
                self.free_hint = self.free_hint.min(c);
                freed.push(c << self.cluster_bits);
            }
        }
        Ok(freed)
    }

    /// Raises the refcount of a cluster by one.
    pub fn increment(&mut self, file: &HostFile, offset: u64) -> Result<()> {
        let c = offset >> self.cluster_bits;
        let v = self.get(file, c)?;
        if v == self.max_value() {
            return Err(Error::corrupt(file.path(), offset, "refcount overflow"));
        }
        self.set_range(file, c, 1, v + 1)
    }

    /// Every refcount, as a map from cluster index to value (for checks in tests).
    pub fn all(&mut self, file: &HostFile) -> Result<HashMap<u64, u64>> {
        let mut out = HashMap::new();
        for index in 0..self.table.len() {
            if self.block_offset(file, index)?.is_none() {
                continue;
            }
            for i in 0..(1u64 << self.block_bits) {
                let c = ((index as u64) << self.block_bits) + i;
                let v = self.get(file, c)?;
                if v != 0 {
                    out.insert(c, v);
                }
            }
        }
        Ok(out)
    }
}

/// Reads entry `i` of a refcount block of width `1 << order` bits.
/// The refcount table clusters and refcount blocks that cover `fixed` other clusters plus
/// themselves, with entries of `refcount_bits`: (table clusters, blocks).
pub fn self_covering(fixed: u64, cluster_size: u64, refcount_bits: u64) -> (u64, u64) {
    let per_block = cluster_size * 8 / refcount_bits;
    let (mut table, mut blocks) = (1u64, 1u64);
    loop {
        let need_blocks = (fixed + table + blocks).div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size);
        if (need_table, need_blocks) == (table, blocks) {
            return (table, blocks);
        }
        // Never shrink: the sizes only grow, so the loop ends.
        (table, blocks) = (need_table.max(table), need_blocks.max(blocks));
    }
}

pub fn get_entry(block: &[u8], order: u32, i: usize) -> u64 {
    let bits = 1usize << order;
    if bits < 8 {
        let byte = block[i * bits / 8];
        let shift = (i * bits) % 8;
        u64::from((byte >> shift) & ((1u8 << bits) - 1))
    } else {
        let n = bits / 8;
        block[i * n..i * n + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes entry `i` of a refcount block of width `1 << order` bits.
pub fn set_entry(block: &mut [u8], order: u32, i: usize, value: u64) {
    let bits = 1usize << order;
    if bits < 8 {
        let mask = ((1u16 << bits) - 1) as u8;
        let shift = (i * bits) % 8;
        let byte = &mut block[i * bits / 8];
        *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
    } else {
        let n = bits / 8;
        let be = value.to_be_bytes();
        block[i * n..i * n + n].copy_from_slice(&be[8 - n..]);
    }
}

/// Byte range of a block covering entries `first..=last`.
fn byte_span(order: u32, first: usize, last: usize) -> (usize, usize) {
    let bits = 1usize << order;
    (first * bits / 8, ((last + 1) * bits).div_ceil(8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6 {
            let mut block = vec![0u8; 512];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            for i in 0..16 {
                set_entry(&mut block, order, i, (i as u64 * 7) & max);
            }
            set_entry(&mut block, order, 5, max);
            for i in 0..16 {
                let want = if i == 5 { max } else { (i as u64 * 7) & max };
                assert_eq!(get_entry(&block, order, i), want, "order {order} entry {i}");
            }
        }
        // Sub-byte widths pack from the least significant bit.
        let mut block = vec![0u8; 1];
        set_entry(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set_entry(&mut block, 1, 1, 3);
        assert_eq!(block[0], 0b1101);
    }
}
