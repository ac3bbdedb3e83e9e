//! Extended L2 entries (qcow2.rst, "Extended L2 Entries"): each standard cluster is split into 32
//! subclusters that are allocated, read as zero or unallocated independently.
//!
//! ```text
//!   entry word:  COPIED | host cluster offset        (bit 0 reserved: no zero flag)
//!   bitmap:      bits 32-63 reads-as-zero | bits 0-31 allocated     (bit i = subcluster i)
//! ```
//!
//! Lookups return runs of subclusters in one state. A write gives a cluster a host cluster once
//! and then fills subclusters: copy-on-write is only needed for the part of a partially written
//! subcluster that is not allocated yet (from the backing file, or zeros). A cluster whose host
//! cluster is shared with a snapshot (COPIED clear) or that is compressed is first copied whole
//! into a new host cluster. Zeroing and discarding work per subcluster with the bitmap; a cluster
//! left without an allocated subcluster gives its host cluster back (for zeroing only with
//! `may_unmap`, otherwise it stays preallocated).

use std::sync::Arc;

use super::entry::{Bitmap, ExtL2Entry, L2Entry, ALL_SUBCLUSTERS, SUBCLUSTERS};
use super::l2_cache::L2Table;
use super::mapping::Mapping;
use super::write::MAX_ALLOC_BYTES;
use super::{Meta, Qcow2};
use crate::error::Result;

/// Subclusters `from..to` as a mask (`to` at most 32).
fn mask(from: u32, to: u32) -> u32 {
    debug_assert!(from <= to && to <= SUBCLUSTERS);
    if from == to {
        return 0;
    }
    (ALL_SUBCLUSTERS >> (SUBCLUSTERS - (to - from))) << from
}

/// How many subclusters from `from` on are set in `bits`.
fn ones_from(bits: u32, from: u32) -> u32 {
    (!(bits >> from)).trailing_zeros().min(SUBCLUSTERS - from)
}

/// What an entry holds a reference to: its host cluster, or its compressed data.
fn reference(e: ExtL2Entry) -> Option<ExtL2Entry> {
    match e {
        ExtL2Entry::Standard { host: None, .. } => None,
        ExtL2Entry::Standard { host, .. } => Some(ExtL2Entry::Standard {
            host,
            copied: false,
            bits: Bitmap::default(),
        }),
        compressed => Some(compressed),
    }
}

fn holds_reference(e: ExtL2Entry) -> bool {
    reference(e).is_some()
}

/// A change to whole subclusters, applied by [`Qcow2::remap_subclusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Remap {
    /// Make them read as zero; `unmap` lets a cluster left without data release its host cluster.
    Zero { unmap: bool },
    /// Drop their data; they read as zero, or old data, never backing data.
    Discard,
    /// Make them unallocated: they read from the backing file again (QEMU's full discard).
    Unallocate,
}

/// Where the old contents of a cluster come from when it is copied whole before a write.
#[derive(Debug, Clone, Copy)]
enum WholeCopy {
    Shared(u64),
    Compressed(u64),
}

impl Qcow2 {
    /// [`Qcow2::lookup`] in an image with extended L2 entries: the run of subclusters from
    /// `offset` (before `end`, inside one L2 table's span) in the state of the first.
    pub(super) fn lookup_subclusters(
        &self,
        table: &L2Table,
        table_off: u64,
        offset: u64,
        end: u64,
    ) -> Result<Mapping> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sb = geo.subcluster_bits();
        let in_cluster = geo.in_cluster(offset);
        let cluster_start = offset - in_cluster;
        let first_index = geo.l2_index(offset);
        let first = self.decode_ext(table, table_off, first_index)?;
        let sc = (in_cluster >> sb) as u32;
        let state = first.subcluster(sc);
        let ExtL2Entry::Standard {
            host: first_host, ..
        } = first
        else {
            return Ok(Mapping {
                entry: state,
                len: (cluster_start + cs).min(end) - offset,
                host: None,
            });
        };
        // The subclusters in the same state as the first, in an entry.
        let same = |e: ExtL2Entry| match (e, state) {
            (ExtL2Entry::Standard { bits, .. }, L2Entry::Data { .. }) => bits.alloc,
            (ExtL2Entry::Standard { bits, .. }, L2Entry::Zero { .. }) => bits.zero,
            (ExtL2Entry::Standard { bits, .. }, _) => !(bits.alloc | bits.zero),
            (ExtL2Entry::Compressed(_), _) => 0,
        };
        // Whether cluster `k` of the run continues the host offsets (and COPIED) of the first.
        let continues = |e: ExtL2Entry, k: u64| match (e, first) {
            (
                ExtL2Entry::Standard { host, copied, .. },
                ExtL2Entry::Standard {
                    copied: first_copied,
                    ..
                },
            ) => match (host, first_host) {
                (None, None) => !matches!(state, L2Entry::Data { .. }),
                (Some(h), Some(f)) => h == f + k * cs && copied == first_copied,
                _ => false,
            },
            _ => false,
        };
        let n = ones_from(same(first), sc);
        let mut run_end = cluster_start + (u64::from(sc + n) << sb);
        let mut index = first_index;
        let mut whole = sc + n == SUBCLUSTERS;
        while whole && run_end < end {
            index += 1;
            // A malformed entry ends the run; the lookup that starts there reports it.
            let Ok(next) = self.decode_ext(table, table_off, index) else {
                break;
            };
            if !continues(next, (index - first_index) as u64) {
                break;
            }
            let n = ones_from(same(next), 0);
            run_end += u64::from(n) << sb;
            whole = n == SUBCLUSTERS;
        }
        Ok(Mapping {
            entry: state,
            len: run_end.min(end) - offset,
            host: first_host.map(|h| h + in_cluster),
        })
    }

    /// The allocating part of a write in an image with extended L2 entries: fills subclusters of
    /// the cluster at `offset` in place when it has a host cluster of its own, else allocates
    /// host clusters for a run of clusters. Returns the bytes of `data` consumed.
    pub(super) fn write_subclusters(
        &self,
        meta: &mut Meta,
        offset: u64,
        data: &[u8],
    ) -> Result<u64> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let first = offset - geo.in_cluster(offset);
        let span_end = (offset | (geo.l2_span() - 1)) + 1;
        let req_end = (offset + data.len() as u64).min(span_end);
        let table_off = self.ensure_l2_table(meta, geo.l1_index(offset))?;
        let table = self.l2_table(table_off)?;
        let l2_start = geo.l2_index(offset);
        let first_entry = self.decode_ext(&table, table_off, l2_start)?;
        let owned = |e: &ExtL2Entry| {
            matches!(
                e,
                ExtL2Entry::Standard {
                    host: Some(_),
                    copied: true,
                    ..
                }
            )
        };
        let in_place = owned(&first_entry);
        let mut old = vec![first_entry];
        let end = if in_place {
            (first + cs).min(req_end)
        } else {
            // Clusters that all need a new host cluster get one contiguous run.
            let limit = req_end.min(first + (MAX_ALLOC_BYTES / cs).max(1) * cs);
            let mut c = first + cs;
            while c < limit {
                let e = self.decode_ext(&table, table_off, l2_start + old.len())?;
                if owned(&e) {
                    break;
                }
                old.push(e);
                c += cs;
            }
            c.min(limit)
        };
        let host = match first_entry {
            ExtL2Entry::Standard { host: Some(h), .. } if in_place => h,
            _ => self.alloc_data_clusters(meta, first, old.len() as u64)?,
        };

        let mut new = Vec::with_capacity(old.len());
        for (k, &e) in old.iter().enumerate() {
            let cstart = first + k as u64 * cs;
            let target = host + k as u64 * cs;
            let a = offset.max(cstart) - cstart;
            let b = end.min(cstart + cs) - cstart;
            let (bits, copy) = match e {
                ExtL2Entry::Compressed(raw) => (
                    Bitmap {
                        alloc: ALL_SUBCLUSTERS,
                        zero: 0,
                    },
                    Some(WholeCopy::Compressed(raw)),
                ),
                ExtL2Entry::Standard {
                    host: Some(h),
                    bits,
                    ..
                } if !in_place && bits.alloc != 0 => (bits, Some(WholeCopy::Shared(h))),
                ExtL2Entry::Standard { bits, .. } => (bits, None),
            };
            if let Some(src) = copy {
                let whole = self.cluster_bytes(src, cstart)?;
                self.write_data_checked(meta, &whole, target)?;
            }
            self.fill_partial_subclusters(meta, e, bits, cstart, target, a, b)?;
            let touched = mask(
                (a >> geo.subcluster_bits()) as u32,
                ((b - 1) >> geo.subcluster_bits()) as u32 + 1,
            );
            new.push(ExtL2Entry::Standard {
                host: Some(target),
                copied: true,
                bits: Bitmap {
                    alloc: bits.alloc | touched,
                    zero: bits.zero & !touched,
                },
            });
        }
        let len = end - offset;
        self.write_data_checked(meta, &data[..len as usize], host + (offset - first))?;
        self.set_ext_l2_entries(table_off, l2_start, &new)?;
        if !in_place {
            let replaced: Vec<L2Entry> = old.iter().map(|e| e.summary()).collect();
            self.release_replaced(meta, &replaced)?;
        }
        Ok(len)
    }

    /// The whole old cluster at guest `guest` that is copied before a write.
    fn cluster_bytes(&self, src: WholeCopy, guest: u64) -> Result<Vec<u8>> {
        match src {
            WholeCopy::Compressed(raw) => {
                Ok(Arc::unwrap_or_clone(self.read_compressed(raw, guest)?))
            }
            WholeCopy::Shared(h) => {
                let mut buf = vec![0u8; self.geo.cluster_size() as usize];
                self.read_data(&mut buf, h)?;
                Ok(buf)
            }
        }
    }

    /// Before bytes `a..b` of the cluster at guest `cstart` are written to host cluster `target`,
    /// completes the partially written first and last subclusters that hold no data yet (`bits`,
    /// after any whole copy) with their old contents: zeros, or the backing file's bytes.
    #[allow(clippy::too_many_arguments)]
    fn fill_partial_subclusters(
        &self,
        meta: &mut Meta,
        old: ExtL2Entry,
        bits: Bitmap,
        cstart: u64,
        target: u64,
        a: u64,
        b: u64,
    ) -> Result<()> {
        let sub = self.geo.subcluster_size();
        let sb = self.geo.subcluster_bits();
        let head = (a / sub * sub, a);
        let tail = (b, b.next_multiple_of(sub));
        for (from, to) in [head, tail] {
            let sc = (from >> sb) as u32;
            if from == to || bits.alloc & (1 << sc) != 0 {
                continue;
            }
            let buf = self.old_bytes(old.subcluster(sc), cstart + from, to - from)?;
            self.write_data_checked(meta, &buf, target + from)?;
        }
        Ok(())
    }

    /// Writes extended entries `start..` of the L2 table at `table_off`.
    pub(super) fn set_ext_l2_entries(
        &self,
        table_off: u64,
        start: usize,
        entries: &[ExtL2Entry],
    ) -> Result<()> {
        let words: Vec<u64> = entries
            .iter()
            .flat_map(|e| {
                let (word, bitmap) = e.encode();
                [word, bitmap]
            })
            .collect();
        self.set_l2_words(table_off, 2 * start, &words)
    }

    /// Subclusters of the cluster at guest `cstart` through which no backing data can show
    /// (they start at or past the end of the backing file, or there is none).
    fn hidden_subclusters(&self, cstart: u64) -> u32 {
        let Some(b) = &self.backing else {
            return ALL_SUBCLUSTERS;
        };
        let covered = b.size().saturating_sub(cstart);
        let first_hidden = covered.div_ceil(self.geo.subcluster_size());
        if first_hidden >= u64::from(SUBCLUSTERS) {
            0
        } else {
            mask(first_hidden as u32, SUBCLUSTERS)
        }
    }

    /// Applies `op` to the whole subclusters `start..end` (subcluster aligned). Old references
    /// are released afterwards.
    pub(super) fn remap_subclusters(&self, start: u64, end: u64, op: Remap) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sb = geo.subcluster_bits();
        let mut meta = self.meta.lock().unwrap();
        let _gate = self.free_gate.write().unwrap();
        let mut cur = start;
        while cur < end {
            let span_end = ((cur | (geo.l2_span() - 1)) + 1).min(end);
            if self.l2_offset(geo.l1_index(cur))?.is_none() && self.unallocated_reads_zero(cur) {
                // Nothing allocated and nothing shows through: every subcluster reads zero.
                cur = span_end;
                continue;
            }
            let table_off = self.ensure_l2_table(&mut meta, geo.l1_index(cur))?;
            let table = self.l2_table(table_off)?;
            let first_index = geo.l2_index(cur);
            let mut entries = Vec::new();
            let mut released = Vec::new();
            let mut c = cur;
            while c < span_end {
                let cstart = c - geo.in_cluster(c);
                let cend = (cstart + cs).min(span_end);
                let m = mask(
                    ((c - cstart) >> sb) as u32,
                    ((cend - cstart).div_ceil(1 << sb) as u32).min(SUBCLUSTERS),
                );
                let index = first_index + entries.len();
                let old = self.decode_ext(&table, table_off, index)?;
                let new = self.remap_entry(&mut meta, op, cstart, m, old)?;
                if holds_reference(old) && reference(old) != reference(new) {
                    released.push(old.summary());
                }
                entries.push(new);
                c = cend;
            }
            self.set_ext_l2_entries(table_off, first_index, &entries)?;
            self.release_entries(&mut meta, &released)?;
            cur = span_end;
        }
        Ok(())
    }

    /// The new entry of the cluster at guest `cstart` after `op` on its subclusters `m`.
    fn remap_entry(
        &self,
        meta: &mut Meta,
        op: Remap,
        cstart: u64,
        m: u32,
        old: ExtL2Entry,
    ) -> Result<ExtL2Entry> {
        let hidden = self.hidden_subclusters(cstart);
        let (host, copied, mut bits) = match old {
            ExtL2Entry::Compressed(_) if m == ALL_SUBCLUSTERS => {
                return Ok(ExtL2Entry::hostless(match op {
                    Remap::Zero { .. } => ALL_SUBCLUSTERS,
                    Remap::Discard => !hidden,
                    Remap::Unallocate => 0,
                }));
            }
            // Discarding part of a compressed cluster is left undone (contents stay the same).
            ExtL2Entry::Compressed(_) if matches!(op, Remap::Discard | Remap::Unallocate) => {
                return Ok(old)
            }
            ExtL2Entry::Compressed(raw) => {
                // Zeroing part of it: store it plainly first, then zero subclusters.
                let host = self.alloc_data_clusters(meta, cstart, 1)?;
                let whole = self.cluster_bytes(WholeCopy::Compressed(raw), cstart)?;
                self.write_data_checked(meta, &whole, host)?;
                let all = Bitmap {
                    alloc: ALL_SUBCLUSTERS,
                    zero: 0,
                };
                (Some(host), true, all)
            }
            ExtL2Entry::Standard { host, copied, bits } => (host, copied, bits),
        };
        bits.alloc &= !m;
        bits.zero = match op {
            Remap::Zero { .. } => bits.zero | m,
            Remap::Discard => (bits.zero & !m) | (m & !hidden),
            Remap::Unallocate => bits.zero & !m,
        };
        let release = bits.alloc == 0
            && match op {
                Remap::Zero { unmap } => unmap || !copied,
                Remap::Discard | Remap::Unallocate => true,
            };
        Ok(match host {
            Some(h) if !release => ExtL2Entry::Standard {
                host: Some(h),
                copied,
                bits,
            },
            _ => ExtL2Entry::hostless(bits.zero),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_runs() {
        assert_eq!(mask(0, 32), u32::MAX);
        assert_eq!(mask(2, 4), 0b1100);
        assert_eq!(mask(5, 5), 0);
        assert_eq!(mask(31, 32), 1 << 31);
        assert_eq!(ones_from(0b0111_0000, 4), 3);
        assert_eq!(ones_from(u32::MAX, 0), 32);
        assert_eq!(ones_from(u32::MAX, 31), 1);
        assert_eq!(ones_from(0, 7), 0);
    }
}
