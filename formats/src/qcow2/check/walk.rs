//! The metadata walk: every structure that holds a reference adds one to the refcount of each
//! cluster it covers in the in-memory [`RefArray`] (QEMU's `calculate_refcounts`), with the
//! per-entry checks QEMU does on the way and the allocation statistics of the active table.

use super::image::REFT_RESERVED;
use super::refs::RefArray;
use super::{
    c_hex, cluster_type_in, Checker, ClusterType, Counts, Fail, Fix, Frag, BITMAP_ALL_ALLOC,
    BITMAP_ALL_ZEROES,
};
use crate::qcow2::compressed::Descriptor;
use crate::qcow2::entry::{COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use crate::qcow2::header::MAX_L1_BYTES;

/// Most clusters the in-memory refcount array covers (QEMU refuses files of more than `INT_MAX`
/// clusters).
pub(super) const MAX_ARRAY_CLUSTERS: u64 = i32::MAX as u64;

impl Checker {
    /// Makes `arr` cover `len` clusters, within the bound above.
    pub(super) fn grow_array(&self, arr: &mut RefArray, len: u64) -> Result<(), Fail> {
        if len > MAX_ARRAY_CLUSTERS {
            return Err(Fail::no_memory());
        }
        arr.set_len(arr.len().max(len));
        Ok(())
    }

    /// Counts one reference to every cluster of `offset..offset+size` (QEMU's
    /// `qcow2_inc_refcounts_imrt`). A range reaching a cluster or more past the end of the file
    /// is a corruption and counts nothing.
    pub(super) fn inc(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
        offset: u64,
        size: u64,
    ) -> Result<(), Fail> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.img.cluster_size();
        let end = i128::from(offset) + i128::from(size);
        if end - i128::from(self.img.file_len()) >= i128::from(cs) {
            self.say(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            res.corruptions += 1;
            return Ok(());
        }
        let cb = self.img.cluster_bits;
        let max = max_refcount(self.img.header.refcount_order);
        for k in (offset >> cb)..=((offset + size - 1) >> cb) {
            if k >= arr.len() {
                if let Err(e) = self.grow_array(arr, k + 1) {
                    res.check_errors += 1;
                    return Err(e);
                }
            }
            let v = arr.get(k);
            if v == max {
                self.say(format!("ERROR: overflow cluster offset={:#x}", k << cb));
                self.say(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                res.corruptions += 1;
                continue;
            }
            arr.set(k, v + 1);
        }
        Ok(())
    }

    /// Builds the expected refcounts of every cluster (QEMU's `calculate_refcounts`).
    pub(super) fn calculate(
        &mut self,
        res: &mut Counts,
        frag: &mut Frag,
        arr: &mut RefArray,
        fix: Fix,
        rebuild: &mut bool,
    ) -> Result<(), Fail> {
        let cs = self.img.cluster_size();
        self.inc(res, arr, 0, cs)?;
        let (l1_offset, l1_size) = (self.img.header.l1_table_offset, self.img.header.l1_size);
        self.check_l1(res, arr, Some(frag), l1_offset, l1_size, fix, true)?;
        for i in 0..self.snapshots.len() {
            let sn = &self.snapshots[i];
            let (id, name, off, size) = (
                sn.id.clone(),
                sn.name.clone(),
                sn.l1_table_offset,
                sn.l1_size,
            );
            if off % cs != 0 {
                self.say(format!(
                    "ERROR snapshot {id} ({name}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    c_hex(off)
                ));
                res.corruptions += 1;
                continue;
            }
            if u64::from(size) > MAX_L1_BYTES / 8 {
                self.say(format!(
                    "ERROR snapshot {id} ({name}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    c_hex(u64::from(size))
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(res, arr, None, off, size, fix, false)?;
        }
        let (sn_off, sn_size) = (self.img.header.snapshots_offset, self.snapshots_size);
        self.inc(res, arr, sn_off, sn_size)?;
        let rt_off = self.img.header.refcount_table_offset;
        let rt_bytes = self.img.reftable.len() as u64 * 8;
        self.inc(res, arr, rt_off, rt_bytes)?;
        // The LUKS header of an encrypted image (`encrypt.format=luks`).
        if let Some(area) = self.img.header.crypto_area() {
            self.inc(res, arr, area.offset, area.length)?;
        }
        self.check_bitmaps(res, arr)?;
        self.check_refblocks(res, arr, fix, rebuild)
    }

    /// Counts an L1 table, its L2 tables and everything they map (QEMU's `check_refcounts_l1`).
    /// `frag` collects allocation statistics (active table only).
    #[allow(clippy::too_many_arguments)]
    fn check_l1(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
        mut frag: Option<&mut Frag>,
        l1_offset: u64,
        l1_size: u32,
        fix: Fix,
        active: bool,
    ) -> Result<(), Fail> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = u64::from(l1_size) * 8;
        self.inc(res, arr, l1_offset, bytes)?;
        let mut raw = vec![0u8; bytes as usize];
        if let Err(e) = self.img.read(&mut raw, l1_offset) {
            self.say("ERROR: I/O error in check_refcounts_l1".into());
            res.check_errors += 1;
            return Err(e);
        }
        let cs = self.img.cluster_size();
        for e in super::image::be64_words(&raw) {
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                self.say(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                res.corruptions += 1;
            }
            let l2_offset = e & OFFSET_MASK;
            self.inc(res, arr, l2_offset, cs)?;
            if l2_offset % cs != 0 {
                self.say(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                res.corruptions += 1;
            }
            self.check_l2(res, arr, frag.as_deref_mut(), l2_offset, fix, active)?;
        }
        Ok(())
    }

    /// Counts what one L2 table maps (QEMU's `check_refcounts_l2`); with `fix.errors`,
    /// preallocated zero clusters at unaligned offsets become plain zero clusters.
    fn check_l2(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
        mut frag: Option<&mut Frag>,
        l2_offset: u64,
        fix: Fix,
        active: bool,
    ) -> Result<(), Fail> {
        let cs = self.img.cluster_size();
        let cb = self.img.cluster_bits;
        let extended = self.img.extended_l2;
        let table = match self.img.read_l2(l2_offset) {
            Ok(t) => t,
            Err(e) => {
                self.say("ERROR: I/O error in check_refcounts_l2".into());
                res.check_errors += 1;
                return Err(e);
            }
        };
        let mut next_contiguous = 0u64;
        for (i, (mut entry, bitmap)) in table.into_iter().enumerate() {
            let kind = cluster_type_in(entry, extended, self.img.data_file);
            if kind != ClusterType::Compressed && entry & L2_RESERVED != 0 {
                self.say(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                res.corruptions += 1;
            }
            match kind {
                ClusterType::Compressed => {
                    let offset_mask = (1u64 << (62 - (cb - 8))) - 1;
                    if entry & COPIED != 0 {
                        self.say(format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            entry & offset_mask
                        ));
                        entry &= !COPIED;
                        res.corruptions += 1;
                    }
                    if bitmap != 0 {
                        self.say(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let d = Descriptor::decode(entry & !COMPRESSED, cb);
                    self.inc(res, arr, d.offset, d.max_len())?;
                    if let Some(f) = frag.as_deref_mut() {
                        f.allocated += 1;
                        f.compressed += 1;
                        f.fragmented += 1;
                    }
                }
                ClusterType::Normal | ClusterType::ZeroAlloc => {
                    let offset = entry & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        res.corruptions += 1;
                        self.say(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if offset % cs != 0 {
                        res.corruptions += 1;
                        let holds_data = if extended {
                            bitmap & BITMAP_ALL_ALLOC != 0
                        } else {
                            entry & ZERO == 0
                        };
                        if !holds_data {
                            let verb = if fix.errors { "Repairing" } else { "ERROR" };
                            self.say(format!(
                                "{verb} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            if fix.errors {
                                let at = l2_offset + (i * self.img.l2_entry_bytes()) as u64;
                                match self.fix_l2_entry_by_zero(res, at, bitmap, active) {
                                    Ok(()) => continue,
                                    Err(Some(e)) => return Err(e),
                                    Err(None) => {}
                                }
                            }
                        } else {
                            self.say(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if let Some(f) = frag.as_deref_mut() {
                        f.allocated += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            f.fragmented += 1;
                        }
                        next_contiguous = offset + cs;
                    }
                    // Clusters of an external data file have no refcount.
                    if !self.img.data_file {
                        self.inc(res, arr, offset, cs)?;
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if bitmap & BITMAP_ALL_ALLOC != 0 {
                        res.corruptions += 1;
                        self.say(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the L2 entry at `at` read as zero without a host cluster (with subclusters: its
    /// allocated subclusters become zero ones). `Err(Some(_))` aborts the table (the write would
    /// hit other metadata), `Err(None)` leaves the entry as it is.
    fn fix_l2_entry_by_zero(
        &mut self,
        res: &mut Counts,
        at: u64,
        bitmap: u64,
        active: bool,
    ) -> Result<(), Option<Fail>> {
        let ignore = if active {
            super::Overlap::ActiveL2
        } else {
            super::Overlap::InactiveL2
        };
        let mut bytes = Vec::with_capacity(16);
        if self.img.extended_l2 {
            bytes.extend_from_slice(&0u64.to_be_bytes());
            let zeroes = (bitmap | bitmap << 32) & BITMAP_ALL_ZEROES;
            bytes.extend_from_slice(&zeroes.to_be_bytes());
        } else {
            bytes.extend_from_slice(&ZERO.to_be_bytes());
        }
        if let Some(what) = self.overlaps(at, bytes.len() as u64, ignore) {
            self.signal_corruption(&format!(
                "Preventing invalid write on metadata (overlaps with {what})"
            ));
            self.say("ERROR: Overlap check failed".into());
            res.check_errors += 1;
            return Err(Some(Fail::io()));
        }
        if let Err(e) = self.img.write(&bytes, at) {
            self.say(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                e.errno
            ));
            res.check_errors += 1;
            return Err(None);
        }
        if let Err(e) = self.img.sync() {
            self.say(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                e.errno
            ));
            res.check_errors += 1;
            return Err(None);
        }
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        Ok(())
    }

    /// Counts the refcount blocks and checks their table entries (QEMU's `check_refblocks`);
    /// with `fix.errors` a block past the end of the file is brought inside it by growing the
    /// file.
    fn check_refblocks(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
        fix: Fix,
        rebuild: &mut bool,
    ) -> Result<(), Fail> {
        let cs = self.img.cluster_size();
        let cb = self.img.cluster_bits;
        for i in 0..self.img.reftable.len() {
            let raw = self.img.reftable[i];
            let offset = raw & !REFT_RESERVED;
            let cluster = offset >> cb;
            if raw & REFT_RESERVED != 0 {
                self.say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if offset % cs != 0 {
                self.say(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= arr.len() {
                res.corruptions += 1;
                let verb = if fix.errors { "Repairing" } else { "ERROR" };
                self.say(format!("{verb} refcount block {i} is outside image"));
                if fix.errors {
                    match self.grow_file_for_block(arr, offset) {
                        Ok(()) => {
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc(res, arr, offset, cs)?;
                            continue;
                        }
                        Err(GrowError::Array(e)) => {
                            res.check_errors += 1;
                            return Err(e);
                        }
                        Err(GrowError::Resize(e)) => {
                            *rebuild = true;
                            self.say(format!("ERROR could not resize image: {}", e.errno));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(res, arr, offset, cs)?;
                let v = arr.get(cluster);
                if v != 1 {
                    self.say(format!("ERROR refcount block {i} refcount={v}"));
                    res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extends the file so that the refcount block at `offset` lies inside it, and the array
    /// with it.
    fn grow_file_for_block(&mut self, arr: &mut RefArray, offset: u64) -> Result<(), GrowError> {
        let cs = self.img.cluster_size();
        if offset > i64::MAX as u64 - cs {
            return Err(GrowError::Resize(Fail::invalid()));
        }
        let new_len = offset + cs;
        let clusters = new_len.div_ceil(cs);
        // A file the in-memory array could not follow is treated like one the file system
        // refuses to grow: the structure is rebuilt instead.
        let grown = if clusters > MAX_ARRAY_CLUSTERS {
            Err(Fail::too_large())
        } else {
            self.img.set_len(new_len)
        };
        if let Err(e) = grown {
            self.report(format!("Could not resize file: {}", e.errno));
            return Err(GrowError::Resize(e));
        }
        let clusters = self.img.file_len().div_ceil(cs);
        self.grow_array(arr, clusters.max(arr.len()))
            .map_err(GrowError::Array)?;
        if offset >> self.img.cluster_bits >= arr.len() {
            return Err(GrowError::Resize(Fail::invalid()));
        }
        Ok(())
    }
}

enum GrowError {
    /// The file could not be grown: the block stays a corruption, the structure is rebuilt.
    Resize(Fail),
    /// The in-memory array could not grow: the check cannot go on.
    Array(Fail),
}

/// Largest value a refcount of `1 << order` bits holds.
pub(super) fn max_refcount(order: u32) -> u64 {
    if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}
