//! Persistent dirty bitmaps in a check (qcow2.rst, "Bitmaps extension"): their directory,
//! bitmap tables and data clusters hold references like any other metadata (QEMU's
//! `qcow2_check_bitmaps_refcounts`). The bitmaps themselves are left alone: a repair keeps them,
//! counted as in use. The structures are parsed by `qcow2::bitmaps`.

use super::refs::RefArray;
use super::{Checker, Counts, Fail};
use crate::qcow2::bitmaps::directory::{parse_directory, DirEntry};
use crate::qcow2::bitmaps::table::decode_table;

impl Checker {
    /// Counts the bitmap directory, tables and data clusters. A directory or table QEMU would
    /// not load is a corruption that ends the check ("Invalid argument").
    pub(super) fn check_bitmaps(
        &mut self,
        res: &mut Counts,
        arr: &mut RefArray,
    ) -> Result<(), Fail> {
        let Some(e) = self.img.bitmaps else {
            return Ok(());
        };
        let (dir_offset, dir_size) = e.directory();
        self.inc(res, arr, dir_offset, dir_size)?;
        let Some(entries) = self.bitmap_entries(&e) else {
            res.corruptions += 1;
            return Err(Fail::invalid());
        };
        let cs = self.img.cluster_size();
        for t in entries {
            let bytes = u64::from(t.table_entries) * 8;
            self.inc(res, arr, t.table_offset, bytes)?;
            let mut raw = vec![0u8; bytes as usize];
            self.img.read(&mut raw, t.table_offset)?;
            let Ok(table) = decode_table(self.img.file.path(), &raw, cs) else {
                res.corruptions += 1;
                return Err(Fail::invalid());
            };
            for at in table.into_iter().filter_map(|t| t.data_cluster()) {
                self.inc(res, arr, at, cs)?;
            }
        }
        Ok(())
    }

    /// The entries of a directory that satisfies QEMU's constraints, or `None`.
    fn bitmap_entries(
        &self,
        e: &crate::qcow2::bitmaps::directory::BitmapsExt,
    ) -> Option<Vec<DirEntry>> {
        let (offset, size) = e.directory();
        if size == 0 {
            return None;
        }
        let mut dir = vec![0u8; size as usize];
        self.img.read(&mut dir, offset).ok()?;
        let path = self.img.file.path();
        parse_directory(path, e, &dir, self.img.cluster_size(), self.img.header.size).ok()
    }
}
