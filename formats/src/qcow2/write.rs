//! Changes to the guest mapping: allocating writes, zeroing and discard.
//!
//! All of these run under the `meta` mutex. The order of on-disk updates is always: raise
//! refcounts, write data, publish the L2 entry (and L1 entry for a new table), release old
//! clusters. A process killed at any point leaves at worst leaked clusters. Every data write is
//! checked against the metadata clusters first (overlap.rs). Images with extended L2 entries
//! take the subcluster paths of subcluster.rs.

use std::sync::atomic::Ordering;

use super::compressed::Descriptor;
use super::entry::{L2Entry, COPIED, OFFSET_MASK, ZERO};
use super::overlap::MetaKind;
use super::{Meta, Qcow2};
use crate::block::ZeroFlags;
use crate::error::{Error, Result};

/// Upper bound on the bytes one allocating step writes (bounds the COW buffer).
pub(super) const MAX_ALLOC_BYTES: u64 = 32 << 20;

/// An allocating write: guest clusters `first..last` get new host clusters from `host`, filled
/// with `data` at guest offsets `offset..end` and the old contents (`old` entries) around it.
#[derive(Clone, Copy)]
struct NewRun<'a> {
    old: &'a [L2Entry],
    first: u64,
    offset: u64,
    end: u64,
    last: u64,
    host: u64,
    data: &'a [u8],
}

impl Qcow2 {
    /// Allocates `n` clusters and settles a refcount table move if the allocation caused one.
    /// New refcount blocks (and a moved table) are recorded as metadata.
    pub(super) fn alloc_clusters(&self, meta: &mut Meta, n: u64) -> Result<u64> {
        let off = meta.refcounts.alloc(&self.file, n)?;
        if let Some(mv) = meta.refcounts.take_table_move() {
            meta.header.refcount_table_offset = mv.offset;
            meta.header.refcount_table_clusters = mv.clusters;
            self.file.sync()?;
            self.write_header(&meta.header)?;
            self.file.sync()?;
            let clusters = u64::from(mv.clusters);
            self.metadata
                .add(mv.offset, clusters, MetaKind::RefcountTable);
            self.track_refcount_blocks(meta, mv.offset, clusters)?;
            self.free_clusters(meta, mv.old_offset, u64::from(mv.old_clusters))?;
        }
        self.track_refcount_blocks(meta, off, n)?;
        Ok(off)
    }

    /// Drops one reference to each of `n` clusters from byte offset `offset`; clusters that
    /// become free are given back to the host file system. Every release goes through here.
    pub(super) fn free_clusters(&self, meta: &mut Meta, offset: u64, n: u64) -> Result<()> {
        let freed = meta.refcounts.free_range(&self.file, offset, n)?;
        if freed.is_empty() {
            return Ok(());
        }
        // A freed cluster may be the one compressed data was being packed into, or hold the
        // cached decompressed cluster.
        meta.next_compressed_byte = None;
        *self.last_compressed.lock().unwrap() = None;
        let cs = self.geo.cluster_size();
        for c in freed {
            self.metadata.remove(c);
            self.file.punch_hole(c, cs)?;
        }
        Ok(())
    }

    /// The L2 table for L1 index `index`, ready to be changed: allocated empty if there is none,
    /// copied first if it is shared with a snapshot (its L1 entry lacks COPIED).
    pub(super) fn ensure_l2_table(&self, meta: &mut Meta, index: usize) -> Result<u64> {
        let raw = self.l1_entry(index);
        let old = self.l2_offset(index)?;
        if let Some(off) = old {
            if raw & COPIED != 0 {
                return Ok(off);
            }
        }
        let cs = self.geo.cluster_size();
        let new = self.alloc_clusters(meta, 1)?;
        let entries: Vec<u64> = match old {
            // The copy references the same clusters as the shared table; their refcounts already
            // count every L1 table that reaches them (as QEMU keeps them), so only the table's own
            // refcount changes.
            Some(off) => {
                let table = self.l2_table(off)?;
                (0..(cs / 8) as usize).map(|i| table.get(i)).collect()
            }
            None => vec![0u64; (cs / 8) as usize],
        };
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_checked(meta, &bytes, new)?;
        self.l2_cache.insert(new, entries);
        self.metadata.add(new, 1, MetaKind::ActiveL2);
        let value = new | COPIED;
        self.file
            .write_at(&value.to_be_bytes(), self.l1_offset + index as u64 * 8)?;
        self.l1[index].store(value, Ordering::Release);
        if let Some(off) = old {
            // The shared table stays with the snapshots; it is no longer active.
            self.metadata.remove(off);
            self.free_clusters(meta, off, 1)?;
        }
        Ok(new)
    }

    /// Writes the standard entries `start..` of the L2 table at `table_off`, on disk and in the
    /// cache. With extended L2 entries each value is the first word of an entry and its
    /// subcluster bitmap is cleared: what a compressed cluster needs, and what a preallocated
    /// cluster with no subcluster written yet looks like.
    pub(super) fn set_l2_entries(
        &self,
        table_off: u64,
        start: usize,
        values: &[u64],
    ) -> Result<()> {
        if self.geo.extended_l2 {
            let words: Vec<u64> = values.iter().flat_map(|&v| [v, 0]).collect();
            return self.set_l2_words(table_off, 2 * start, &words);
        }
        self.set_l2_words(table_off, start, values)
    }

    /// Writes the 64-bit words `start..` of the L2 table at `table_off`, on disk and in the cache.
    pub(super) fn set_l2_words(&self, table_off: u64, start: usize, words: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.l2_cache.update(table_off, start, words, || {
            self.file.write_at(&bytes, table_off + start as u64 * 8)
        })
    }

    /// Writes the start of `data` at guest offset `offset` in place when it is data this layer
    /// owns alone (COPIED). Returns the bytes written, or `None` when the write needs allocation.
    pub(super) fn write_in_place(&self, data: &[u8], offset: u64) -> Result<Option<usize>> {
        let hit = {
            let _gate = self.free_gate.read().unwrap();
            let m = self.lookup(offset, data.len() as u64)?;
            let L2Entry::Data { host, copied: true } = m.entry else {
                return Ok(None);
            };
            let at = host + self.geo.in_cluster(offset);
            match self.data_overlap(at, m.len) {
                None => {
                    self.write_data(&data[..m.len as usize], at)?;
                    return Ok(Some(m.len as usize));
                }
                Some(hit) => hit,
            }
        };
        // The gate is released first: the metadata lock is always taken before it.
        let mut meta = self.meta.lock().unwrap();
        Err(self.refuse_overlap(&mut meta, hit))
    }

    /// Writes the start of `data` at guest offset `offset` into newly allocated clusters (or
    /// in place, if another writer allocated them meanwhile). Returns the bytes consumed.
    pub(super) fn write_allocating(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let first = offset - self.geo.in_cluster(offset);
        let max_end = first + (MAX_ALLOC_BYTES / cs).max(1) * cs;
        let mut meta =
            self.lock_meta_for(offset, data.len().min((max_end - offset) as usize) as u64);
        let m = self.lookup(offset, data.len() as u64)?;
        if let L2Entry::Data { host, copied: true } = m.entry {
            let n = m.len as usize;
            let at = host + self.geo.in_cluster(offset);
            self.write_data_checked(&mut meta, &data[..n], at)?;
            return Ok(m.len);
        }
        if self.geo.extended_l2 {
            return self.write_subclusters(&mut meta, offset, data);
        }
        let end = (offset + m.len).min(max_end);
        let last = end.next_multiple_of(cs);
        let n = (last - first) / cs;

        let l1_index = self.geo.l1_index(offset);
        let table_off = self.ensure_l2_table(&mut meta, l1_index)?;
        let table = self.l2_table(table_off)?;
        let l2_start = self.geo.l2_index(offset);
        let old: Vec<L2Entry> = (0..n as usize)
            .map(|k| self.decode(&table, table_off, l2_start + k))
            .collect::<Result<_>>()?;
        let host = self.alloc_data_clusters(&mut meta, first, n)?;
        if let Some(hit) = self.data_overlap(host, n * cs) {
            return Err(self.refuse_overlap(&mut meta, hit));
        }

        // The new clusters are ours alone until published: write them without the lock, so
        // allocating writes elsewhere (and all other I/O) go on meanwhile. Changes to these guest
        // clusters wait for `alloc_done`.
        let span = (first / cs, n);
        meta.allocating.push(span);
        drop(meta);
        let run = NewRun {
            old: &old,
            first,
            offset,
            end,
            last,
            host,
            data,
        };
        let written = self.fill_new_clusters(&run);
        let mut meta = self.meta.lock().unwrap();
        meta.allocating.retain(|&s| s != span);
        self.alloc_done.notify_all();
        written?;

        let entries: Vec<u64> = (0..n).map(|k| (host + k * cs) | COPIED).collect();
        self.set_l2_entries(table_off, l2_start, &entries)?;
        self.release_replaced(&mut meta, &old)?;
        Ok(end - offset)
    }

    /// Writes the data of an allocating write into its new clusters, with the parts of the first
    /// and last cluster the write does not cover copied from the old contents.
    fn fill_new_clusters(&self, r: &NewRun) -> Result<()> {
        if self.is_encrypted() {
            return self.fill_new_clusters_encrypted(r);
        }
        let head = r.offset - r.first;
        if head > 0 {
            let buf = self.old_bytes(r.old[0], r.first, head)?;
            self.data_io().write_at(&buf, r.host)?;
        }
        self.data_io()
            .write_at(&r.data[..(r.end - r.offset) as usize], r.host + head)?;
        let tail = r.last - r.end;
        if tail > 0 {
            let buf = self.old_bytes(r.old[r.old.len() - 1], r.end, tail)?;
            self.data_io().write_at(&buf, r.host + (r.end - r.first))?;
        }
        Ok(())
    }

    /// [`Qcow2::fill_new_clusters`] for an encrypted image: the new clusters are assembled in
    /// plaintext a few MiB at a time (whole clusters, so whole sectors) and encrypted in place.
    fn fill_new_clusters_encrypted(&self, r: &NewRun) -> Result<()> {
        let cs = self.geo.cluster_size();
        let step = ((4 << 20) / cs).max(1) * cs;
        let mut pos = r.first;
        let mut buf = Vec::new();
        while pos < r.last {
            let stop = (pos + step).min(r.last);
            buf.clear();
            buf.resize((stop - pos) as usize, 0);
            let at = |g: u64| (g - pos) as usize;
            if pos < r.offset {
                // The head lies in the first cluster, which starts this first step.
                let head = self.old_bytes(r.old[0], pos, r.offset - pos)?;
                buf[..at(r.offset)].copy_from_slice(&head);
            }
            let (a, b) = (pos.max(r.offset), stop.min(r.end));
            if a < b {
                let from_data = (a - r.offset) as usize..(b - r.offset) as usize;
                buf[at(a)..at(b)].copy_from_slice(&r.data[from_data]);
            }
            if stop > r.end {
                let from = pos.max(r.end);
                let tail = self.old_bytes(r.old[r.old.len() - 1], from, stop - from)?;
                buf[at(from)..].copy_from_slice(&tail);
            }
            self.write_owned_sectors(&mut buf, r.host + (pos - r.first))?;
            pos = stop;
        }
        Ok(())
    }

    /// Releases the references of entries an allocating write replaced. When that may free a
    /// cluster, in-flight reads through the old entries are waited for first.
    pub(super) fn release_replaced(&self, meta: &mut Meta, old: &[L2Entry]) -> Result<()> {
        if self.has_data_file() {
            // The new clusters sit where the old ones did (the guest offsets): nothing to give up.
            return Ok(());
        }
        let holds = |e: &L2Entry| matches!(e, L2Entry::Compressed(_)) || e.host_cluster().is_some();
        if !old.iter().any(holds) {
            return Ok(());
        }
        let _gate = self.free_gate.write().unwrap();
        self.release_entries(meta, old)
    }

    /// The current contents of `len` bytes at guest offset `guest`, inside one cluster whose
    /// entry (with extended L2 entries: subcluster state) is `entry`.
    pub(super) fn old_bytes(&self, entry: L2Entry, guest: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        match entry {
            L2Entry::Data { host, .. } => {
                self.read_data(&mut buf, host + self.geo.in_cluster(guest))?
            }
            L2Entry::Unallocated => self.read_backing(&mut buf, guest)?,
            L2Entry::Compressed(raw) => {
                let at = self.geo.in_cluster(guest) as usize;
                buf.copy_from_slice(&self.read_compressed(raw, guest)?[at..at + len as usize]);
            }
            L2Entry::Zero { .. } => {}
        }
        Ok(buf)
    }

    /// Drops the references the old entries held, after they were replaced on disk.
    pub(super) fn release_entries(&self, meta: &mut Meta, old: &[L2Entry]) -> Result<()> {
        for e in old {
            match *e {
                L2Entry::Compressed(raw) => {
                    let d = Descriptor::decode(raw, self.geo.cluster_bits);
                    let (first, n) = d.clusters(self.geo.cluster_bits);
                    self.free_clusters(meta, first, n)?;
                }
                _ => {
                    if let Some(h) = e.host_cluster() {
                        self.release_data_cluster(meta, h)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whole allocation units (clusters, or subclusters with extended L2 entries) inside
    /// `offset..offset+len`; the partial unit at the end of the image counts as whole.
    fn whole_units(&self, offset: u64, len: u64) -> (u64, u64) {
        let unit = self.geo.subcluster_size();
        let start = offset.next_multiple_of(unit);
        let end = if offset + len == self.geo.size {
            (offset + len).next_multiple_of(unit)
        } else {
            (offset + len) / unit * unit
        };
        (start, end.max(start))
    }

    /// Rewrites the entries of whole clusters `start..end` with `new_entry(old)`; entries for
    /// which it returns `None` are left alone. Old references are released afterwards.
    pub(super) fn remap_clusters(
        &self,
        start: u64,
        end: u64,
        mut new_entry: impl FnMut(u64, L2Entry) -> Option<u64>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut meta = self.lock_meta_for(start, end - start);
        let _gate = self.free_gate.write().unwrap();
        let mut cur = start;
        while cur < end {
            let span_end = ((cur | (self.geo.l2_span() - 1)) + 1).min(end);
            if self.l2_offset(self.geo.l1_index(cur))?.is_none() && self.unallocated_reads_zero(cur)
            {
                // Nothing allocated and nothing shows through: every cluster already reads zero.
                cur = span_end;
                continue;
            }
            let table_off = self.ensure_l2_table(&mut meta, self.geo.l1_index(cur))?;
            let table = self.l2_table(table_off)?;
            let first = self.geo.l2_index(cur);
            let n = ((span_end - cur) / cs) as usize;
            let mut values = Vec::with_capacity(n);
            let mut released = Vec::new();
            for (k, i) in (first..first + n).enumerate() {
                let old = self.decode(&table, table_off, i)?;
                let raw = table.get(i);
                match new_entry(cur + k as u64 * cs, old) {
                    Some(v) if v != raw => {
                        let kept = old.host_cluster().is_some_and(|h| h == v & OFFSET_MASK);
                        if !kept {
                            released.push(old);
                        }
                        values.push(v);
                    }
                    _ => values.push(raw),
                }
            }
            self.set_l2_entries(table_off, first, &values)?;
            self.release_entries(&mut meta, &released)?;
            cur = span_end;
        }
        Ok(())
    }

    /// Discard: whole clusters release their host clusters and become zero clusters (version 3,
    /// as QEMU's `discard_in_l2_slice`; clusters already reading zero without a host cluster are
    /// left alone). Version 2 cannot express zero clusters: there they become unallocated where
    /// no backing file shows through, and are kept otherwise. Partial clusters are left alone.
    pub(super) fn discard_range(&self, offset: u64, len: u64) -> Result<()> {
        let (start, end) = self.whole_units(offset, len);
        if self.geo.extended_l2 {
            return self.remap_subclusters(start, end, super::subcluster::Remap::Discard);
        }
        let v3 = self.geo.version >= 3;
        self.remap_clusters(start, end, |guest, old| {
            let hidden = self.unallocated_reads_zero(guest);
            match old {
                L2Entry::Unallocated if hidden => None,
                L2Entry::Zero { host: None, .. } => None,
                _ if v3 => Some(ZERO),
                _ if hidden => Some(0),
                _ => None,
            }
        })
    }

    /// Write-zeroes: partial clusters get zero bytes written, whole clusters become zero clusters
    /// (version 3; without `may_unmap` they keep their host cluster) or unallocated (version 2,
    /// where unallocated reads zero as there is no backing file).
    pub(super) fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_raw_data_file(offset, len)?;
        let (start, end) = self.whole_units(offset, len);
        let v3 = self.geo.version >= 3;
        if start >= end || !v3 && self.backing.is_some() {
            // Version 2 has no zero clusters: over a backing file zeroes must be written.
            return self.zero_bytes(offset, len, flags);
        }
        let req_end = offset + len;
        self.zero_bytes(offset, start - offset, flags)?;
        self.zero_bytes(end, req_end.saturating_sub(end), flags)?;
        if self.geo.extended_l2 {
            let unmap = flags.may_unmap;
            return self.remap_subclusters(start, end, super::subcluster::Remap::Zero { unmap });
        }
        // As QEMU's `zero_in_l2_slice`, version 3 marks even unallocated clusters zero.
        self.remap_clusters(start, end, |guest, old| match old {
            L2Entry::Unallocated if !v3 && self.unallocated_reads_zero(guest) => None,
            L2Entry::Zero { host: None, .. } => None,
            L2Entry::Data { host, copied: true }
            | L2Entry::Zero {
                host: Some(host),
                copied: true,
            } if v3 && !flags.may_unmap => Some(host | COPIED | ZERO),
            _ if v3 => Some(ZERO),
            _ => Some(0),
        })
    }

    /// Writes zero bytes into part of an allocation unit, skipping it when it already reads as
    /// zero.
    fn zero_bytes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let m = self.lookup(offset, len)?;
        let reads_zero = match m.entry {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.unallocated_reads_zero(offset),
            _ => false,
        };
        if reads_zero && m.len >= len {
            return Ok(());
        }
        if flags.fast_only {
            return Err(Error::unsupported(
                self.path(),
                "zeroing part of a cluster or subcluster needs a data write",
            ));
        }
        use crate::block::BlockDev;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
}
