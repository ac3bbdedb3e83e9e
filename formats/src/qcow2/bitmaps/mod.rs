//! Persistent dirty bitmaps (qcow2.rst, "Bitmaps extension"): the on-disk structures
//! (directory.rs, table.rs), the bits in memory (dirty.rs), and what an open image does with
//! them.
//!
//! ```text
//!   header ──ext 0x23852875──> bitmap directory ──entry──> bitmap table ──entry──> data cluster
//! ```
//!
//! An image opened read-write keeps its bitmaps correct the way QEMU does: every bitmap that is
//! enabled (`auto`) and consistent is loaded, marked `in_use` on disk, and gets the bits of every
//! write, write-zeroes and discard set; when the image is closed (dropped, or
//! [`Qcow2::store_bitmaps`]) the changed bitmaps are written to new clusters, a new directory
//! and header extension point to them, and the old clusters are released. An image left open by
//! a process that died keeps `in_use` set: its enabled bitmaps are inconsistent, as in QEMU.
//! Bitmaps that were `in_use` at open are kept as they are (they can only be removed).

pub mod directory;
pub mod dirty;
pub mod table;

use std::sync::atomic::Ordering;

use directory::{
    flags, parse_directory, table_entries_for, BitmapsExt, DirEntry, MAX_BITMAPS,
    MAX_DIRECTORY_BYTES, MAX_GRANULARITY_BITS, MAX_NAME_BYTES, MAX_PHYS_BYTES, MAX_TABLE_ENTRIES,
    MIN_GRANULARITY_BITS,
};
pub use dirty::DirtyBitmap;
use table::{decode_table, encode_table, TableEntry};

use super::header::{autoclear, ext, Header};
use super::Qcow2;
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::info::BitmapInfo;

/// The bitmaps of an open image.
#[derive(Debug, Default)]
pub(super) struct BitmapSet {
    /// The directory on disk (offset, bytes), released when a new one replaces it.
    directory: Option<(u64, u64)>,
    bitmaps: Vec<Bitmap>,
    /// Tables of removed or rewritten bitmaps, released once the new directory is stored.
    released: Vec<DirEntry>,
    /// Bitmaps were added, removed or renamed: the directory must be written anew.
    changed: bool,
}

#[derive(Debug)]
struct Bitmap {
    /// As on disk; `table_offset` 0 for a bitmap not stored yet.
    entry: DirEntry,
    /// The bits, once loaded or created.
    bits: Option<DirtyBitmap>,
    /// The bits differ from the stored table.
    modified: bool,
    /// This open set `in_use` on disk and tracks writes into the bitmap.
    tracked: bool,
    /// Added since the directory was last stored.
    added: bool,
    /// The flags differ from the stored directory.
    flags_changed: bool,
}

impl BitmapSet {
    /// Reads the directory of the image (empty without a valid bitmaps extension).
    pub(super) fn load(file: &HostFile, header: &Header) -> Result<BitmapSet> {
        let path = file.path();
        let Some(e) = BitmapsExt::from_header(path, header)? else {
            return Ok(BitmapSet::default());
        };
        let mut raw = vec![0u8; e.directory_size as usize];
        file.read_at(&mut raw, e.directory_offset)?;
        let entries = parse_directory(path, &e, &raw, header.cluster_size(), header.size)?;
        Ok(BitmapSet {
            directory: Some((e.directory_offset, e.directory_size)),
            bitmaps: entries
                .into_iter()
                .map(|entry| Bitmap {
                    entry,
                    bits: None,
                    modified: false,
                    tracked: false,
                    added: false,
                    flags_changed: false,
                })
                .collect(),
            released: Vec::new(),
            changed: false,
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bitmaps.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.bitmaps
            .iter()
            .position(|b| b.entry.name == name)
            .ok_or_else(|| Error::argument(format!("Dirty bitmap '{name}' not found")))
    }

    /// The bitmap `name`, refused when it is inconsistent (QEMU's `bdrv_dirty_bitmap_check`).
    fn usable(&self, name: &str) -> Result<usize> {
        let i = self.find(name)?;
        let b = &self.bitmaps[i];
        if b.entry.in_use() && !b.tracked {
            return Err(Error::argument(format!(
                "Bitmap '{name}' is inconsistent and cannot be used\n\
                 Try block-dirty-bitmap-remove to delete this bitmap from disk"
            )));
        }
        Ok(i)
    }
}

/// The granularity QEMU gives a new bitmap: the cluster size, within 4 KiB ..= 64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Qcow2 {
    /// Loads the enabled, consistent bitmaps and marks them `in_use` on disk; from now on
    /// writes set their bits (see the module documentation). Called by a read-write open.
    pub(super) fn start_tracking_bitmaps(&self) -> Result<()> {
        let mut set = self.bitmaps.lock().unwrap();
        let header = self.header();
        let mut any = false;
        for i in 0..set.bitmaps.len() {
            let b = &set.bitmaps[i];
            if !b.entry.auto() || b.entry.in_use() {
                continue;
            }
            let bits = self.read_bits(&b.entry, header.size)?;
            let b = &mut set.bitmaps[i];
            b.bits = Some(bits);
            b.tracked = true;
            b.entry.flags |= flags::IN_USE;
            any = true;
        }
        if any {
            self.write_directory_in_place(&set)?;
            self.file.sync()?;
            self.tracking_bitmaps.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Sets the bits of guest bytes `offset..offset+len` in every tracked bitmap.
    pub(super) fn mark_dirty(&self, offset: u64, len: u64) {
        if !self.tracking_bitmaps.load(Ordering::Acquire) {
            return;
        }
        let mut set = self.bitmaps.lock().unwrap();
        for b in set.bitmaps.iter_mut().filter(|b| b.tracked) {
            if let Some(bits) = &mut b.bits {
                bits.set_range(offset, len);
                b.modified = true;
            }
        }
    }

    /// The persistent bitmaps, as `info` lists them.
    pub fn bitmap_infos(&self) -> Vec<BitmapInfo> {
        let set = self.bitmaps.lock().unwrap();
        set.bitmaps
            .iter()
            .map(|b| BitmapInfo {
                name: b.entry.name.clone(),
                granularity: b.entry.granularity(),
                // A bitmap this open tracks is consistent: it is stored on close.
                in_use: b.entry.in_use() && !b.tracked,
                auto: b.entry.auto(),
            })
            .collect()
    }

    /// Adds an empty, enabled persistent bitmap (QEMU's `block-dirty-bitmap-add` with
    /// `persistent=true`); bitmaps added in one open are stored newest first, after the others. `granularity` 0 means the default for the cluster size. Refusals
    /// about what the image can store are `Unsupported` ("Can't make bitmap persistent").
    pub fn bitmap_add(&self, name: &str, granularity: u64) -> Result<()> {
        self.check_writable()?;
        if name.is_empty() {
            return Err(Error::argument("Bitmap name cannot be empty"));
        }
        let header = self.header();
        let granularity = match granularity {
            0 => default_granularity(header.cluster_size()),
            // QEMU's QMP field is 32 bits wide.
            g => u64::from(g as u32),
        };
        if granularity < 512 || !granularity.is_power_of_two() {
            return Err(Error::argument(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        let mut set = self.bitmaps.lock().unwrap();
        if set.find(name).is_ok() {
            return Err(Error::argument(format!("Bitmap already exists: {name}")));
        }
        let gbits = granularity.trailing_zeros();
        let refuse = |what: &str| Err(Error::unsupported(self.path(), what));
        if header.version < 3 {
            return refuse("Cannot store dirty bitmaps in qcow2 v2 files");
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gbits) {
            return refuse("Granularity is out of range");
        }
        if name.len() > MAX_NAME_BYTES {
            return refuse(&format!(
                "Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
            ));
        }
        let entries = table_entries_for(header.size, gbits, header.cluster_size());
        if entries > MAX_TABLE_ENTRIES || entries * header.cluster_size() > MAX_PHYS_BYTES {
            return refuse("Too much space will be occupied by the bitmap. Use larger granularity");
        }
        if set.bitmaps.len() as u32 >= MAX_BITMAPS {
            return refuse("Maximum number of persistent bitmaps is already reached");
        }
        let dir_bytes: usize = set
            .bitmaps
            .iter()
            .map(|b| directory::encode_directory(std::slice::from_ref(&b.entry)).len())
            .sum();
        let new_entry = DirEntry {
            table_offset: 0,
            table_entries: entries as u32,
            flags: flags::AUTO,
            granularity_bits: gbits,
            name: name.to_string(),
        };
        let new_bytes = directory::encode_directory(std::slice::from_ref(&new_entry)).len();
        if (dir_bytes + new_bytes) as u64 > MAX_DIRECTORY_BYTES {
            return refuse("Not enough space in the bitmap directory");
        }
        set.bitmaps.push(Bitmap {
            entry: new_entry,
            bits: Some(DirtyBitmap::new(gbits, header.size)),
            modified: true,
            tracked: false,
            added: true,
            flags_changed: false,
        });
        set.changed = true;
        Ok(())
    }

    /// Removes a bitmap (inconsistent ones too); its clusters are released on store.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut set = self.bitmaps.lock().unwrap();
        let i = set.find(name)?;
        let b = set.bitmaps.remove(i);
        if b.entry.table_offset != 0 {
            set.released.push(b.entry);
        }
        set.changed = true;
        Ok(())
    }

    /// Clears every bit of a bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut set = self.bitmaps.lock().unwrap();
        let i = set.usable(name)?;
        let size = self.header().size;
        let b = &mut set.bitmaps[i];
        b.bits = Some(DirtyBitmap::new(b.entry.granularity_bits, size));
        b.modified = true;
        Ok(())
    }

    /// Enables (the bitmap records later writes) or disables a bitmap.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.check_writable()?;
        let mut set = self.bitmaps.lock().unwrap();
        let i = set.usable(name)?;
        let b = &mut set.bitmaps[i];
        let old = b.entry.flags;
        if enabled {
            b.entry.flags |= flags::AUTO;
        } else {
            b.entry.flags &= !flags::AUTO;
        }
        b.flags_changed |= old != b.entry.flags;
        Ok(())
    }

    /// The bits of a consistent bitmap (to merge elsewhere or copy to another image).
    pub fn bitmap_bits(&self, name: &str) -> Result<DirtyBitmap> {
        let set = self.bitmaps.lock().unwrap();
        let i = set.usable(name)?;
        let b = &set.bitmaps[i];
        match &b.bits {
            Some(bits) => Ok(bits.clone()),
            None => self.read_bits(&b.entry, self.header().size),
        }
    }

    /// Sets in bitmap `name` every bit `source` has set (any granularity).
    pub fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.check_writable()?;
        let mut set = self.bitmaps.lock().unwrap();
        let i = set.usable(name)?;
        let size = self.header().size;
        let b = &mut set.bitmaps[i];
        let mut bits = match b.bits.take() {
            Some(bits) => bits,
            None => self.read_bits(&b.entry, size)?,
        };
        bits.merge(source);
        b.bits = Some(bits);
        b.modified = true;
        Ok(())
    }

    /// Reads the bits of a stored bitmap, for a disk of `size` bytes.
    fn read_bits(&self, e: &DirEntry, size: u64) -> Result<DirtyBitmap> {
        let cs = self.geo.cluster_size();
        let mut raw = vec![0u8; e.table_entries as usize * 8];
        self.file.read_at(&mut raw, e.table_offset)?;
        let table = decode_table(self.path(), &raw, cs)?;
        let mut data = vec![0u8; table.len() * cs as usize];
        for (chunk, t) in data.chunks_exact_mut(cs as usize).zip(table) {
            match t {
                TableEntry::Zeros => {}
                TableEntry::Ones => chunk.fill(0xff),
                TableEntry::Data(at) => self.file.read_at(chunk, at)?,
            }
        }
        Ok(DirtyBitmap::from_bytes(e.granularity_bits, size, data))
    }

    /// Writes the bitmaps back: changed bits to new clusters, a new directory and header
    /// extension (or none when no bitmap is left), then releases the old clusters. Tracking
    /// ends: the bitmaps this open marked `in_use` are stored consistent. Nothing happens when
    /// nothing changed. Dropping a writable image does this (errors then leave `in_use` set).
    pub fn store_bitmaps(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut set = self.bitmaps.lock().unwrap();
        self.tracking_bitmaps.store(false, Ordering::Release);
        let mut meta = self.meta.lock().unwrap();
        let size = meta.header.size;
        let cs = self.geo.cluster_size();
        let mut rewrite_dir = set.changed;
        let mut flags_changed = false;
        for i in 0..set.bitmaps.len() {
            let b = &set.bitmaps[i];
            let stale = !b.entry.in_use()
                && u64::from(b.entry.table_entries)
                    != table_entries_for(size, b.entry.granularity_bits, cs);
            if !(b.modified || b.tracked || stale || b.entry.table_offset == 0) {
                flags_changed |= b.flags_changed;
                continue;
            }
            let bits = match &b.bits {
                Some(bits) => bits.clone().resized(size),
                None => self.read_bits(&b.entry, size)?,
            };
            let old = b.entry.clone();
            let (table_offset, table_entries) = self.write_bits(&mut meta, &bits)?;
            if old.table_offset != 0 {
                set.released.push(old);
            }
            let b = &mut set.bitmaps[i];
            b.entry.table_offset = table_offset;
            b.entry.table_entries = table_entries;
            if b.tracked {
                b.entry.flags &= !flags::IN_USE;
            }
            (b.modified, b.tracked, b.flags_changed) = (false, false, false);
            rewrite_dir = true;
        }
        if rewrite_dir {
            self.write_new_directory(&mut set, &mut meta)?;
        } else if flags_changed {
            self.write_directory_in_place(&set)?;
            self.file.sync()?;
        }
        set.bitmaps.iter_mut().for_each(|b| b.flags_changed = false);
        Ok(())
    }

    /// Writes the bits to new data clusters and a new table; returns (table offset, entries).
    fn write_bits(&self, meta: &mut super::Meta, bits: &DirtyBitmap) -> Result<(u64, u32)> {
        let cs = self.geo.cluster_size() as usize;
        let entries = table_entries_for(bits.size(), bits.granularity_bits(), cs as u64);
        let mut table = Vec::with_capacity(entries as usize);
        let bytes = bits.as_bytes();
        for i in 0..entries as usize {
            let chunk = &bytes[(i * cs).min(bytes.len())..((i + 1) * cs).min(bytes.len())];
            if chunk.iter().all(|&b| b == 0) {
                table.push(TableEntry::Zeros);
                continue;
            }
            let at = self.alloc_clusters(meta, 1)?;
            let mut cluster = chunk.to_vec();
            cluster.resize(cs, 0);
            self.file.write_at(&cluster, at)?;
            table.push(TableEntry::Data(at));
        }
        let raw = encode_table(&table);
        let at = self.alloc_clusters(meta, (raw.len() as u64).div_ceil(cs as u64))?;
        self.file.write_at(&raw, at)?;
        Ok((at, entries as u32))
    }

    /// Stores the directory in new clusters and points the header at it, then releases the old
    /// directory and the tables of removed or rewritten bitmaps.
    fn write_new_directory(&self, set: &mut BitmapSet, meta: &mut super::Meta) -> Result<()> {
        // Stored bitmaps keep their places; new ones follow, newest first (as QEMU, which keeps
        // its bitmaps newest first, stores them).
        let (added, mut kept): (Vec<Bitmap>, Vec<Bitmap>) = std::mem::take(&mut set.bitmaps)
            .into_iter()
            .partition(|b| b.added);
        kept.extend(
            added
                .into_iter()
                .rev()
                .map(|b| Bitmap { added: false, ..b }),
        );
        set.bitmaps = kept;
        let entries: Vec<DirEntry> = set.bitmaps.iter().map(|b| b.entry.clone()).collect();
        let raw = directory::encode_directory(&entries);
        let cs = self.geo.cluster_size();
        let new_dir = if entries.is_empty() {
            None
        } else {
            let at = self.alloc_clusters(meta, (raw.len() as u64).div_ceil(cs))?;
            self.file.write_at(&raw, at)?;
            Some((at, raw.len() as u64))
        };
        self.file.sync()?;
        let h = &mut meta.header;
        h.extensions.retain(|e| e.kind != ext::BITMAPS);
        match new_dir {
            Some((offset, bytes)) => {
                let e = BitmapsExt {
                    count: entries.len() as u32,
                    directory_size: bytes,
                    directory_offset: offset,
                };
                h.extensions.push(e.encode());
                h.autoclear_features |= autoclear::BITMAPS;
            }
            None => h.autoclear_features &= !autoclear::BITMAPS,
        }
        self.write_header(&meta.header)?;
        self.file.sync()?;
        let old_dir = std::mem::replace(&mut set.directory, new_dir);
        if let Some((offset, bytes)) = old_dir {
            self.free_clusters(meta, offset, bytes.div_ceil(cs))?;
        }
        for old in std::mem::take(&mut set.released) {
            self.release_table(meta, &old)?;
        }
        set.changed = false;
        Ok(())
    }

    /// Releases a stored bitmap's data clusters and table.
    fn release_table(&self, meta: &mut super::Meta, e: &DirEntry) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut raw = vec![0u8; e.table_entries as usize * 8];
        self.file.read_at(&mut raw, e.table_offset)?;
        for t in decode_table(self.path(), &raw, cs)? {
            if let Some(at) = t.data_cluster() {
                self.free_clusters(meta, at, 1)?;
            }
        }
        self.free_clusters(meta, e.table_offset, (raw.len() as u64).div_ceil(cs))
    }

    /// Rewrites the flags of the stored directory where it is; only for a set whose bitmaps are
    /// all stored and unchanged but for their flags (the layout is the same).
    fn write_directory_in_place(&self, set: &BitmapSet) -> Result<()> {
        let Some((offset, _)) = set.directory else {
            return Ok(());
        };
        let entries: Vec<DirEntry> = set.bitmaps.iter().map(|b| b.entry.clone()).collect();
        for (i, e) in entries.iter().enumerate() {
            let at = offset + directory::flags_offset(&entries, i) as u64;
            self.file.write_at(&e.flags.to_be_bytes(), at)?;
        }
        Ok(())
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // An error leaves the tracked bitmaps marked in use: inconsistent, as after a crash.
        let _ = self.store_bitmaps();
    }
}
