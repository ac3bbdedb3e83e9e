//! Comparing the expected refcounts with the ones on disk and repairing them: leaks and too-small
//! refcounts in place, anything worse by rebuilding the whole refcount structure from the
//! in-memory array (QEMU's `compare_refcounts`, `rebuild_refcount_structure`); then the COPIED
//! flags of the active tables (`check_oflag_copied`).

use super::image::RefError;
use super::refs::RefArray;
use super::{cluster_type_in, Checker, ClusterType, Counts, Fail, Fix, Overlap};
use crate::qcow2::entry::{COPIED, OFFSET_MASK};

impl Checker {
    /// The on-disk refcount of `cluster`; an unreadable one is reported as QEMU does.
    pub(super) fn disk_refcount(&mut self, cluster: u64) -> Result<u64, Fail> {
        match self.img.refcount(cluster) {
            Ok(v) => Ok(v),
            Err(RefError::Unaligned { block, index }) => {
                self.signal_corruption(&format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    super::c_hex(block),
                    super::c_hex(index)
                ));
                Err(Fail::io())
            }
            Err(RefError::Io(e)) => Err(e),
        }
    }

    /// Refuses a write to `offset..offset+len` that would overwrite metadata (QEMU's
    /// `qcow2_pre_write_overlap_check` with nothing ignored), marking the image corrupt.
    fn guard_write(&mut self, offset: u64, len: u64) -> Result<(), Fail> {
        match self.overlaps(offset, len, Overlap::Nothing) {
            None => Ok(()),
            Some(what) => {
                self.signal_corruption(&format!(
                    "Preventing invalid write on metadata (overlaps with {what})"
                ));
                Err(Fail::io())
            }
        }
    }

    /// The clusters whose refcounts may differ from zero, on disk or in `arr`, in order: those
    /// of the refcount blocks the table names and of the chunks `arr` has. (Everywhere else
    /// both are zero; QEMU walks those clusters too, to no effect.)
    fn clusters_to_compare(&self, arr: &RefArray) -> impl Iterator<Item = u64> {
        let bits = arr.chunk_bits();
        let on_disk = self
            .img
            .reftable
            .iter()
            .enumerate()
            .filter(|(_, &e)| e & !super::image::REFT_RESERVED != 0)
            .map(|(i, _)| i as u64);
        let chunks: std::collections::BTreeSet<u64> = on_disk.chain(arr.chunks()).collect();
        let len = arr.len();
        chunks
            .into_iter()
            .flat_map(move |c| (c << bits)..((c + 1) << bits).min(len))
    }

    /// Compares every cluster's refcount with the expected one (QEMU's `compare_refcounts`),
    /// repairing what `fix` allows. A used cluster with refcount 0 asks for a rebuild.
    pub(super) fn compare(
        &mut self,
        res: &mut Counts,
        arr: &RefArray,
        fix: Fix,
        rebuild: &mut bool,
    ) -> u64 {
        let mut highest = 0;
        for i in self.clusters_to_compare(arr) {
            let on_disk = match self.disk_refcount(i) {
                Ok(v) => v,
                Err(e) => {
                    self.say(format!("Can't get refcount for cluster {i}: {}", e.errno));
                    res.check_errors += 1;
                    continue;
                }
            };
            let expected = arr.get(i);
            if on_disk > 0 || expected > 0 {
                highest = i;
            }
            if on_disk == expected {
                continue;
            }
            let repair = if on_disk == 0 {
                *rebuild = true;
                None
            } else if on_disk > expected && fix.leaks {
                Some(true)
            } else if on_disk < expected && fix.errors {
                Some(false)
            } else {
                None
            };
            let verb = match repair {
                Some(_) => "Repairing",
                None if on_disk < expected => "ERROR",
                None => "Leaked",
            };
            self.say(format!(
                "{verb} cluster {i} refcount={on_disk} reference={expected}"
            ));
            if let Some(leak) = repair {
                if self.img.set_refcount(i, expected).is_ok() {
                    if leak {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    continue;
                }
            }
            if on_disk < expected {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
        highest
    }

    /// First run of `count` clusters free in `arr` at or after `*first_free`, marked used (QEMU's
    /// `alloc_clusters_imrt`); `*first_free` moves to the first gap seen. Grows the array past
    /// the end of the image when needed. Returns the byte offset.
    fn alloc_in_array(
        &self,
        arr: &mut RefArray,
        count: u64,
        first_free: &mut u64,
    ) -> Result<u64, Fail> {
        let mut cluster = *first_free;
        let mut run = 0;
        let mut first_gap = true;
        while cluster < arr.len() && run < count {
            if arr.get(cluster) == 0 {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        if run < count {
            self.grow_array(arr, cluster + count - run)?;
        }
        let start = cluster - run;
        for c in start..start + count {
            arr.set(c, 1);
        }
        Ok(start << self.img.cluster_bits)
    }

    /// Writes the refcount blocks covering the used clusters of `first..end`, allocating the
    /// missing ones in `arr` and entering them into `reftable` (grown as needed). Returns whether
    /// the reftable grew.
    fn write_refblocks(
        &mut self,
        arr: &mut RefArray,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool, (Fail, &'static str)> {
        let cs = self.img.cluster_size();
        let block_bits = self.img.block_bits();
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if arr.get(cluster) == 0 {
                // Chunks without counts are skipped whole.
                let chunk = cluster >> block_bits;
                cluster = match arr.next_chunk(chunk) {
                    Some(c) if c == chunk => cluster + 1,
                    Some(c) => c << block_bits,
                    None => end,
                };
                continue;
            }
            let index = cluster >> block_bits;
            let block_start = index << block_bits;
            let existing = reftable.get(index as usize).copied().filter(|&o| o != 0);
            let offset = match existing {
                Some(o) => o,
                None => {
                    first_free = first_free.max(block_start);
                    let o = self
                        .alloc_in_array(arr, 1, &mut first_free)
                        .map_err(|e| (e, "ERROR allocating refblock"))?;
                    // The block holding this block's own refcount must be written too.
                    end = end.max(o / cs + 1);
                    if reftable.len() as u64 <= index {
                        let entries = ((index + 1) * 8).next_multiple_of(cs) / 8;
                        reftable.resize(entries as usize, 0);
                        grown = true;
                    }
                    reftable[index as usize] = o;
                    o
                }
            };
            self.guard_write(offset, cs)
                .map_err(|e| (e, "ERROR writing refblock"))?;
            self.img
                .write(&arr.block(index), offset)
                .map_err(|e| (e, "ERROR writing refblock"))?;
            cluster = block_start + (1 << block_bits);
        }
        Ok(grown)
    }

    /// Replaces the refcount structure with one written from `arr` (QEMU's
    /// `rebuild_refcount_structure`). The old table and blocks are left behind as leaks.
    pub(super) fn rebuild(&mut self, res: &mut Counts, arr: &mut RefArray) -> Result<(), Fail> {
        let cs = self.img.cluster_size();
        let fail = |this: &mut Checker, res: &mut Counts, (e, what): (Fail, &str)| {
            this.report(format!("{what}: {}", e.errno));
            res.check_errors += 1;
            e
        };
        let mut reftable = Vec::new();
        let len = arr.len();
        if let Err(e) = self.write_refblocks(arr, 0, len, &mut reftable) {
            return Err(fail(self, res, e));
        }
        let offset = loop {
            let bytes = reftable.len() as u64 * 8;
            let mut first_free = 0;
            let offset = match self.alloc_in_array(arr, bytes.div_ceil(cs), &mut first_free) {
                Ok(o) => o,
                Err(e) => return Err(fail(self, res, (e, "ERROR allocating reftable"))),
            };
            let start = offset / cs;
            match self.write_refblocks(arr, start, start + bytes.div_ceil(cs), &mut reftable) {
                Ok(true) => continue,
                Ok(false) => break offset,
                Err(e) => return Err(fail(self, res, e)),
            }
        };
        let raw: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        let written = self
            .guard_write(offset, raw.len() as u64)
            .and_then(|()| self.img.write(&raw, offset));
        if let Err(e) = written {
            self.report(format!("ERROR writing reftable: {}", e.errno));
            return Err(e);
        }
        let clusters = (raw.len() as u64).div_ceil(cs) as u32;
        let mut pointer = offset.to_be_bytes().to_vec();
        pointer.extend_from_slice(&clusters.to_be_bytes());
        let written = self.img.write(&pointer, 48).and_then(|()| self.img.sync());
        if let Err(e) = written {
            self.report(format!("ERROR setting reftable: {}", e.errno));
            return Err(e);
        }
        self.img.replace_reftable(offset, reftable);
        Ok(())
    }

    /// Checks (and with `fix` repairs) the COPIED flags of the active L1 and L2 tables: set
    /// exactly where the refcount is one (QEMU's `check_oflag_copied`).
    pub(super) fn check_copied(&mut self, res: &mut Counts, fix: Fix) -> Result<(), Fail> {
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let verb = if repair { "Repairing" } else { "ERROR" };
        let cs = self.img.cluster_size();
        let cb = self.img.cluster_bits;
        let l1_offset = self.img.header.l1_table_offset;
        for i in 0..self.img.l1.len() {
            let l1_entry = self.img.l1[i];
            let l2_offset = l1_entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let Ok(refcount) = self.disk_refcount(l2_offset >> cb) else {
                continue;
            };
            if (refcount == 1) != (l1_entry & COPIED != 0) {
                res.corruptions += 1;
                self.say(format!(
                    "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                ));
                if repair {
                    let new = if refcount == 1 {
                        l1_entry | COPIED
                    } else {
                        l1_entry & !COPIED
                    };
                    self.img.l1[i] = new;
                    if let Err(e) = self.img.write_u64(l1_offset + i as u64 * 8, new) {
                        res.check_errors += 1;
                        return Err(e);
                    }
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            let mut table = match self.img.read_l2(l2_offset) {
                Ok(t) => t,
                Err(e) => {
                    self.say(format!("ERROR: Could not read L2 table: {}", e.errno));
                    res.check_errors += 1;
                    return Err(e);
                }
            };
            let mut dirty = 0;
            for (entry, _) in table.iter_mut() {
                let old = *entry;
                if !matches!(
                    cluster_type_in(old, self.img.extended_l2, self.img.data_file),
                    ClusterType::Normal | ClusterType::ZeroAlloc
                ) {
                    continue;
                }
                // Data in an external data file is not refcounted: one reference (QEMU's view).
                let refcount = if self.img.data_file {
                    1
                } else {
                    let Ok(refcount) = self.disk_refcount((old & OFFSET_MASK) >> cb) else {
                        continue;
                    };
                    refcount
                };
                if (refcount == 1) != (old & COPIED != 0) {
                    res.corruptions += 1;
                    self.say(format!(
                        "{verb} OFLAG_COPIED data cluster: l2_entry={old:x} refcount={refcount}"
                    ));
                    if repair {
                        *entry = if refcount == 1 {
                            old | COPIED
                        } else {
                            old & !COPIED
                        };
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Some(what) = self.overlaps(l2_offset, cs, Overlap::ActiveL2) {
                    self.signal_corruption(&format!(
                        "Preventing invalid write on metadata (overlaps with {what})"
                    ));
                    self.say(format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                        Fail::io().errno
                    ));
                    res.check_errors += 1;
                    return Err(Fail::io());
                }
                let bytes: Vec<u8> = table
                    .iter()
                    .flat_map(|&(e, b)| {
                        let mut v = e.to_be_bytes().to_vec();
                        if self.img.extended_l2 {
                            v.extend_from_slice(&b.to_be_bytes());
                        }
                        v
                    })
                    .collect();
                if let Err(e) = self.img.write(&bytes, l2_offset) {
                    self.say(format!("ERROR: Could not write L2 table: {}", e.errno));
                    res.check_errors += 1;
                    return Err(e);
                }
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}
