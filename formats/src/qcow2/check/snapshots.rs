//! The snapshot table part of a check (QEMU's `qcow2_check_read_snapshot_table` and
//! `qcow2_check_fix_snapshot_table`): read it leniently, count what is wrong, and with `-r all`
//! drop what cannot be kept and write the table anew.

use super::{Checker, Counts, Fail, Fix, Overlap};
use crate::qcow2::refcount::Refcounts;
use crate::qcow2::snapshot::{encode_table, read_table, validate_pointer, ReadMode, MAX_SNAPSHOTS};

/// The snapshot table pointer: `nb_snapshots` (be32) then `snapshots_offset` (be64).
const POINTER_AT: u64 = 60;

impl Checker {
    pub(super) fn check_snapshot_table(&mut self, res: &mut Counts, fix: Fix) -> Result<(), Fail> {
        let cs = self.img.cluster_size();
        let offset = self.img.header.snapshots_offset;
        let mut count = self.img.header.nb_snapshots;
        let mut dropped = 0u32;
        if count > MAX_SNAPSHOTS && fix.errors {
            self.say(format!(
                "Discarding {} overhanging snapshots",
                count - MAX_SNAPSHOTS
            ));
            dropped += count - MAX_SNAPSHOTS;
            count = MAX_SNAPSHOTS;
        }
        if let Err(e) = validate_pointer(offset, count, cs, "snapshot table") {
            res.check_errors += 1;
            self.report(format!("ERROR {}", e.message));
            if count > MAX_SNAPSHOTS {
                self.say(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    count - MAX_SNAPSHOTS
                ));
            }
            return Err(Fail::new(e.errno));
        }
        let img = &self.img;
        let read = |buf: &mut [u8], at: u64| img.file.read_at(buf, at);
        let mode = ReadMode::Check { repair: fix.errors };
        let table = match read_table(&read, offset, count, img.header.size, mode) {
            Ok(t) => t,
            Err(e) => {
                res.check_errors += 1;
                self.report(format!(
                    "ERROR failed to read the snapshot table: {}",
                    e.message
                ));
                if let Some(hint) = e.hint {
                    self.say(hint);
                }
                return Err(Fail::new(e.errno));
            }
        };
        for m in &table.messages {
            self.say(m.clone());
        }
        dropped += table.dropped;
        res.corruptions += i64::from(dropped) + i64::from(table.extra_cut);
        if dropped > 0 {
            let kept = table.snapshots.len() as u32;
            if let Err(e) = self.img.write(&kept.to_be_bytes(), POINTER_AT) {
                res.check_errors += 1;
                self.say(format!(
                    "ERROR failed to update the snapshot count in the image header: {}",
                    e.errno
                ));
                return Err(e);
            }
            self.img.header.nb_snapshots = kept;
            res.corruptions_fixed += i64::from(dropped);
            res.corruptions -= i64::from(dropped);
        }
        if self.img.header.version >= 3 {
            let verb = if fix.errors { "Repairing" } else { "ERROR" };
            for (i, s) in table.snapshots.iter().enumerate() {
                // v3 entries carry at least the 64-bit VM state size and the disk size.
                if s.extra_data_size < 16 {
                    res.corruptions += 1;
                    self.msgs.push(super::CheckMessage {
                        text: format!("{verb} snapshot table entry {i} is incomplete"),
                        reported: false,
                    });
                }
            }
        }
        self.snapshots = table.snapshots;
        self.snapshots_size = table.size;
        Ok(())
    }

    /// Writes the snapshot table anew when it had findings and `-r all` asked for repairs.
    pub(super) fn fix_snapshot_table(&mut self, res: &mut Counts, fix: Fix) -> Result<(), Fail> {
        if res.corruptions == 0 || !fix.errors {
            return Ok(());
        }
        if let Err(e) = self.rewrite_snapshot_table() {
            res.check_errors += 1;
            self.say(format!(
                "ERROR failed to update snapshot table: {}",
                e.errno
            ));
            return Err(e);
        }
        res.corruptions_fixed += res.corruptions;
        res.corruptions = 0;
        Ok(())
    }

    /// QEMU's `qcow2_write_snapshots`: the table goes to newly allocated clusters, the header is
    /// pointed at it, then the old table is released. Runs after the refcounts were repaired, so
    /// the ordinary allocator can be trusted.
    fn rewrite_snapshot_table(&mut self) -> Result<(), Fail> {
        let io = |e: crate::Error| Fail::from_error(&e);
        let bytes = encode_table(&self.snapshots).map_err(|_| Fail::too_large())?;
        let h = self.img.header.clone();
        let cs = self.img.cluster_size();
        let file = &self.img.file;
        let mut rc = Refcounts::load(
            file,
            h.cluster_bits,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )
        .map_err(io)?;
        let offset = if bytes.is_empty() {
            0
        } else {
            rc.alloc(file, (bytes.len() as u64).div_ceil(cs))
                .map_err(io)?
        };
        let new_clusters = (bytes.len() as u64).div_ceil(cs);
        let mut freed = Vec::new();
        if let Some(mv) = rc.take_table_move() {
            let mut pointer = mv.offset.to_be_bytes().to_vec();
            pointer.extend_from_slice(&mv.clusters.to_be_bytes());
            file.sync().map_err(io)?;
            file.write_at(&pointer, 48).map_err(io)?;
            file.sync().map_err(io)?;
            freed.extend(
                rc.free_range(file, mv.old_offset, u64::from(mv.old_clusters))
                    .map_err(io)?,
            );
        }
        file.sync().map_err(io)?;
        // The new place was free by the refcounts; it must not hold metadata either (the old
        // table may reach past what its refcounts cover).
        if let Some(what) = self.overlaps(offset, bytes.len() as u64, Overlap::Nothing) {
            self.signal_corruption(&format!(
                "Preventing invalid write on metadata (overlaps with {what})"
            ));
            let file = &self.img.file;
            let released = rc.free_range(file, offset, new_clusters).map_err(io)?;
            for c in released {
                file.punch_hole(c, cs).map_err(io)?;
            }
            return Err(Fail::io());
        }
        let file = &self.img.file;
        file.write_at(&bytes, offset).map_err(io)?;
        file.sync().map_err(io)?;
        let mut pointer = (self.snapshots.len() as u32).to_be_bytes().to_vec();
        pointer.extend_from_slice(&offset.to_be_bytes());
        file.write_at(&pointer, POINTER_AT).map_err(io)?;
        file.sync().map_err(io)?;
        if self.snapshots_size > 0 {
            let first = h.snapshots_offset & !(cs - 1);
            let end = (h.snapshots_offset + self.snapshots_size).next_multiple_of(cs);
            let n = (end - first) / cs;
            // QEMU releases all or nothing, and only says so when it cannot.
            let mut releasable = true;
            for c in 0..n {
                if rc
                    .get(file, (first >> h.cluster_bits) + c)
                    .map_or(true, |v| v == 0)
                {
                    releasable = false;
                    break;
                }
            }
            if releasable {
                freed.extend(rc.free_range(file, first, n).map_err(io)?);
            } else {
                self.say("qcow2_free_clusters failed: Invalid argument".into());
            }
        }
        let file = &self.img.file;
        for c in freed {
            file.punch_hole(c, cs).map_err(io)?;
        }
        // Later steps read the image afresh.
        let path = file.path().to_path_buf();
        let writable = self.img.writable;
        self.img = super::Image::open(&path, writable).map_err(io)?;
        self.snapshots_size = bytes.len() as u64;
        Ok(())
    }
}
