//! Changing the virtual size of a qcow2 image (`resize`), done with the image opened exclusively
//! for the operation.
//!
//! Growing moves the L1 table to a larger run of clusters when the new size needs more entries,
//! zeroes the tail of the old last cluster (it may hold bytes from before a shrink), and with
//! preallocation allocates (and for falloc/full reserves or writes) the new clusters. Shrinking
//! releases every cluster past the new end, frees L2 tables that only mapped that area and
//! truncates the file after the last cluster still in use.

use std::path::Path;

use super::entry::{Bitmap, ExtL2Entry, L2Entry, COPIED};
use super::Qcow2;
use crate::block::{BlockDev, ZeroFlags};
use crate::chain::{BackingPolicy, ChainCtx};
use crate::error::{Error, Result};
use crate::luks::Passphrase;
use crate::Preallocation;

/// Resizes the qcow2 image at `path` to `new_size` bytes (shrinking needs `shrink`), with the
/// passphrase of an encrypted image (`encrypt.format=luks`) and the image's backing chain opened
/// under `policy`.
pub fn resize_under(
    path: &Path,
    new_size: u64,
    shrink: bool,
    prealloc: Preallocation,
    secret: Option<&Passphrase>,
    policy: BackingPolicy,
) -> Result<()> {
    if new_size % 512 != 0 {
        return Err(Error::argument("The new size must be a multiple of 512"));
    }
    let mut chain = ChainCtx::new(policy);
    chain.enter(path)?;
    let img = Qcow2::open_with_secret(path, false, Some(&mut chain), secret)?;
    let old_size = img.geo.size;
    if new_size < old_size {
        if !shrink {
            return Err(Error::argument(
                "Use the --shrink option to perform a shrink operation.",
            ));
        }
        if prealloc != Preallocation::Off {
            return Err(Error::argument(
                "Preallocation can only be used for growing images",
            ));
        }
        img.shrink(new_size)?;
        img.resize_data_file(old_size, new_size, prealloc)?;
    } else if new_size > old_size {
        img.grow(new_size)?;
        let img = img.reopen(policy)?;
        // Bytes past the old end inside its last cluster must read as zero.
        let cs = img.geo.cluster_size();
        let tail_end = old_size.next_multiple_of(cs).min(new_size);
        if tail_end > old_size {
            img.write_zeroes(old_size, tail_end - old_size, ZeroFlags::default())?;
        }
        // A raw external data file keeps every guest cluster mapped to it (QEMU preallocates
        // the metadata of the new area).
        let mapping = match prealloc {
            Preallocation::Off if img.data_file_is_raw() => Preallocation::Metadata,
            mode => mode,
        };
        if mapping != Preallocation::Off {
            img.preallocate(tail_end, new_size, mapping)?;
        }
        img.resize_data_file(old_size, new_size, prealloc)?;
        img.flush()?;
    }
    Ok(())
}

impl Qcow2 {
    /// Sets a new (larger) size in the header, moving the L1 table first if it is too small.
    fn grow(&self, new_size: u64) -> Result<()> {
        let mut meta = self.meta.lock().unwrap();
        let needed = meta.header.l1_entries_needed(new_size).ok_or_else(|| {
            Error::argument(format!("size {new_size} is too large for this image"))
        })?;
        if needed * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::NoSpace {
                path: self.path().to_path_buf(),
                what: format!("size {new_size} needs an L1 table larger than QEMU allows"),
            });
        }
        let old_entries = u64::from(meta.header.l1_size);
        if needed > old_entries {
            let cs = self.geo.cluster_size();
            let clusters = (needed * 8).div_ceil(cs);
            let new_off = self.alloc_clusters(&mut meta, clusters)?;
            let mut table = vec![0u8; (clusters * cs) as usize];
            for (i, e) in self.l1.iter().enumerate() {
                let v = e.load(std::sync::atomic::Ordering::Acquire);
                table[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
            }
            self.file.write_at(&table, new_off)?;
            self.file.sync()?;
            let old_off = meta.header.l1_table_offset;
            let old_clusters = (old_entries * 8).div_ceil(cs);
            meta.header.l1_table_offset = new_off;
            meta.header.l1_size = needed as u32;
            meta.header.size = new_size;
            self.write_header(&meta.header)?;
            self.file.sync()?;
            if old_clusters > 0 {
                self.free_clusters(&mut meta, old_off, old_clusters)?;
            }
        } else {
            meta.header.size = new_size;
            self.write_header(&meta.header)?;
        }
        Ok(())
    }

    /// Allocates the clusters of `start..end` (cluster aligned at `start`) as preallocated data.
    /// With extended L2 entries the clusters get their host cluster and no subcluster is marked
    /// allocated, as QEMU links preallocated clusters (`QCowL2Meta::prealloc`): they read as
    /// zero (or from the backing file) until written.
    fn preallocate(&self, start: u64, end: u64, mode: Preallocation) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut cur = start;
        while cur < end {
            let span_end = ((cur | (self.geo.l2_span() - 1)) + 1).min(end.next_multiple_of(cs));
            let n = (span_end - cur) / cs;
            let mut meta = self.meta.lock().unwrap();
            let table_off = self.ensure_l2_table(&mut meta, self.geo.l1_index(cur))?;
            let host = self.alloc_data_clusters(&mut meta, cur, n)?;
            // An external data file is preallocated as a whole (`resize_data_file`).
            match mode {
                _ if !self.data_shares_image_file() => {}
                Preallocation::Falloc => self.file.allocate(host, n * cs)?,
                Preallocation::Full => self.file.write_zero_bytes(host, n * cs)?,
                _ => {
                    // Reserve the space in the file so the clusters read as zero holes.
                    if self.file.len()? < host + n * cs {
                        self.file.set_len(host + n * cs)?;
                    }
                }
            }
            let index = self.geo.l2_index(cur);
            if self.geo.extended_l2 {
                let entries: Vec<ExtL2Entry> = (0..n)
                    .map(|k| ExtL2Entry::Standard {
                        host: Some(host + k * cs),
                        copied: true,
                        bits: Bitmap::default(),
                    })
                    .collect();
                self.set_ext_l2_entries(table_off, index, &entries)?;
            } else {
                let entries: Vec<u64> = (0..n).map(|k| (host + k * cs) | COPIED).collect();
                self.set_l2_entries(table_off, index, &entries)?;
            }
            cur = span_end;
        }
        Ok(())
    }

    /// Releases everything past `new_size` and records the new size.
    fn shrink(&self, new_size: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let old_size = self.geo.size;
        let first_gone = new_size.next_multiple_of(cs);
        if first_gone < old_size {
            // Discarding whole clusters releases them; past the new end nothing can show.
            self.discard(first_gone, old_size - first_gone)?;
        }
        let mut meta = self.meta.lock().unwrap();
        // L2 tables that only mapped the removed area go too, if nothing in them is still used.
        let span = self.geo.l2_span();
        let first_table = first_gone.div_ceil(span) as usize;
        for index in first_table..self.l1.len() {
            let Some(off) = self.l2_offset(index)? else {
                continue;
            };
            let table = self.l2_table(off)?;
            let mut in_use = false;
            for i in 0..self.geo.l2_entries() {
                match self.decode(&table, off, i)? {
                    L2Entry::Unallocated | L2Entry::Zero { host: None, .. } => {}
                    _ => in_use = true,
                }
            }
            if in_use {
                continue;
            }
            self.file
                .write_at(&0u64.to_be_bytes(), self.l1_offset + index as u64 * 8)?;
            self.l1[index].store(0, std::sync::atomic::Ordering::Release);
            self.free_clusters(&mut meta, off, 1)?;
        }
        meta.header.size = new_size;
        self.write_header(&meta.header)?;
        // Cut the file after the last cluster still in use.
        let end = meta
            .refcounts
            .all(&self.file)?
            .into_keys()
            .max()
            .map_or(cs, |c| (c + 1) * cs);
        if self.file.len()? > end {
            self.file.set_len(end)?;
        }
        self.file.sync()
    }
}
