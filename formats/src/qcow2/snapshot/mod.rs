//! Internal snapshots: list, create, apply and delete, each on an image opened exclusively for
//! the operation (like `qemu-img snapshot`), each leaving the image `qemu-img check` clean.
//!
//! ```text
//!   active L1 ──┬──> L2 table ──> data cluster      refcount = number of L1 tables that reach
//!   snapshot L1 ┘                                    a cluster (through however many L2 tables)
//! ```
//!
//! A snapshot is a copy of the active L1 table. Taking one raises the refcount of every L2 table
//! and data cluster the L1 table reaches (a compressed cluster: every host cluster its bytes
//! touch), so they become shared and lose their COPIED flag; writes then copy them first
//! (write.rs). Applying one makes the active L1 table a copy of the snapshot's; deleting one
//! drops its references. After every change the COPIED flags of the active tables are recomputed
//! (set exactly where the refcount is one), as QEMU does.
//!
//! Crash safety follows QEMU's order: references are raised before anything new points at the
//! clusters and dropped only after nothing does, so an interrupted operation leaks clusters at
//! worst.

mod table;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) use table::{encode_table, read_table, validate_pointer, ReadMode, ReadTable};
pub use table::{Snapshot, MAX_EXTRA_DATA, MAX_SNAPSHOTS, MAX_TABLE_BYTES};

use super::check::{cluster_type, ClusterType};
use super::compressed::Descriptor;
use super::entry::{COMPRESSED, COPIED, OFFSET_MASK};
use super::header::{Header, MAX_L1_BYTES};
use super::{Meta, Qcow2};
use crate::chain::BackingPolicy;
use crate::error::{Error, Result};
use crate::info::SnapshotInfo;
use crate::luks::Passphrase;

/// Lists the snapshots of the qcow2 image at `path` (`qemu-img snapshot -l`).
pub fn list(path: &Path) -> Result<Vec<SnapshotInfo>> {
    let img = Qcow2::open_with(path, true, None)?;
    img.snapshot_infos()
}

/// Takes a snapshot of the current contents (`qemu-img snapshot -c NAME`). Names longer than
/// 255 bytes are cut, as qemu-img does; names need not be unique. Returns the new entry.
pub fn create(path: &Path, name: &str) -> Result<SnapshotInfo> {
    create_in(&Qcow2::open_with(path, false, None)?, name)
}

/// [`create`] in an image already open for writing (an encrypted one unlocked, as qemu-img
/// insists, though a snapshot touches no guest data).
pub fn create_in(img: &Qcow2, name: &str) -> Result<SnapshotInfo> {
    img.check_no_data_file()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // qemu-img takes the time in microseconds.
    let date = (now.as_secs() as u32, now.subsec_micros() * 1000);
    let sn = img.snapshot_create(name, date)?;
    img.file.sync()?;
    Ok(sn.info())
}

/// Reverts the image to a snapshot, found by id and else by name (`qemu-img snapshot -a`).
/// A snapshot taken at another virtual size resizes the image to that size first.
pub fn apply(path: &Path, id_or_name: &str) -> Result<()> {
    let policy = BackingPolicy::default();
    apply_in(
        Qcow2::open_with(path, false, None)?,
        id_or_name,
        None,
        policy,
    )
}

/// [`apply`] in an image already open for writing; `secret` unlocks an encrypted one again for
/// the resize a snapshot of another size needs, which opens the backing chain under `policy`.
pub fn apply_in(
    img: Qcow2,
    id_or_name: &str,
    secret: Option<&Passphrase>,
    policy: BackingPolicy,
) -> Result<()> {
    let disk_size = {
        let meta = img.meta.lock().unwrap();
        let table = img.read_snapshot_table(&meta.header)?;
        find_by_id_or_name(&table.snapshots, id_or_name)
            .map(|i| table.snapshots[i].disk_size)
            .ok_or_else(|| Error::argument("Failed to load snapshot: No such file or directory"))?
    };
    let img = if disk_size != img.geo.size {
        let path = img.path().to_path_buf();
        drop(img);
        let prealloc = crate::Preallocation::Off;
        super::resize_under(&path, disk_size, true, prealloc, secret, policy)?;
        Qcow2::open_alone(&path, false, policy, secret)?
    } else {
        img
    };
    img.snapshot_apply(id_or_name)?;
    img.file.sync()
}

/// Deletes the first snapshot called `name` (`qemu-img snapshot -d`, which matches names only).
pub fn delete(path: &Path, name: &str) -> Result<()> {
    delete_in(&Qcow2::open_with(path, false, None)?, name)
}

/// [`delete`] in an image already open for writing.
pub fn delete_in(img: &Qcow2, name: &str) -> Result<()> {
    img.snapshot_delete(name)?;
    img.file.sync()
}

fn find_by_id_or_name(snapshots: &[Snapshot], key: &str) -> Option<usize> {
    snapshots
        .iter()
        .position(|s| s.id == key)
        .or_else(|| snapshots.iter().position(|s| s.name == key))
}

/// Consecutive clusters whose refcounts were all `old`, each to be raised by one.
#[derive(Debug)]
struct Run {
    start: u64,
    len: u64,
    old: u64,
}

/// What a walk over an L1 table does to the refcounts it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addend {
    Increment,
    Decrement,
    /// Only recompute the COPIED flags.
    Keep,
}

impl Qcow2 {
    /// The snapshot list for `info`.
    pub(super) fn snapshot_infos(&self) -> Result<Vec<SnapshotInfo>> {
        let header = self.header();
        let table = self.read_snapshot_table(&header)?;
        Ok(table.snapshots.iter().map(Snapshot::info).collect())
    }

    /// Reads the snapshot table named by `header`, refusing anything hostile.
    fn read_snapshot_table(&self, header: &Header) -> Result<ReadTable> {
        let path = self.path();
        if header.nb_snapshots == 0 {
            return Ok(ReadTable::default());
        }
        validate_pointer(
            header.snapshots_offset,
            header.nb_snapshots,
            header.cluster_size(),
            "Snapshot table",
        )
        .map_err(|e| e.into_error(path))?;
        let mode = ReadMode::Strict {
            file_len: self.file.len()?,
        };
        let read = |buf: &mut [u8], at: u64| self.file.read_at(buf, at);
        read_table(
            &read,
            header.snapshots_offset,
            header.nb_snapshots,
            header.size,
            mode,
        )
        .map_err(|e| e.into_error(path))
    }

    /// Reads the L1 table of a snapshot after checking that it is sane.
    fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        let bad = |what: &str| {
            Error::corrupt(
                self.path(),
                sn.l1_table_offset,
                format!("snapshot {} ({}): {what}", sn.id, sn.name),
            )
        };
        if bytes > MAX_L1_BYTES {
            return Err(bad("Snapshot L1 table too large"));
        }
        if sn.l1_table_offset % self.geo.cluster_size() != 0 {
            return Err(bad("Snapshot L1 table offset invalid"));
        }
        if bytes > 0 && sn.l1_table_offset.saturating_add(bytes) > self.file.len()? {
            return Err(bad("Snapshot L1 table lies past the end of the file"));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file.read_at(&mut raw, sn.l1_table_offset)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// The L2 table at `offset` as 64-bit words, and the words per entry (2 with extended L2
    /// entries: the entry, then its subcluster bitmap). Read from the file, not the L2 cache:
    /// these operations own the image and drop the handle when done.
    fn read_l2_words(&self, meta: &Meta, offset: u64) -> Result<(Vec<u64>, usize)> {
        let cs = self.geo.cluster_size();
        if offset >= self.file.len()? {
            return Err(Error::corrupt(
                self.path(),
                offset,
                "L2 table lies past the end of the file",
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_at(&mut raw, offset)?;
        let words = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let extended = meta.header.extended_l2();
        Ok((words, if extended { 2 } else { 1 }))
    }

    fn active_l1(&self) -> Vec<u64> {
        self.l1.iter().map(|e| e.load(Ordering::Acquire)).collect()
    }

    fn write_l1(&self, offset: u64, l1: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_at(&bytes, offset)
    }

    /// Writes `l1` as the active L1 table, on disk and in memory.
    fn set_active_l1(&self, l1: &[u64]) -> Result<()> {
        self.write_l1(self.l1_offset, l1)?;
        for (slot, &v) in self.l1.iter().zip(l1) {
            slot.store(v, Ordering::Release);
        }
        Ok(())
    }

    /// Adds `addend` to the refcount of every L2 table and data cluster `l1` reaches and sets the
    /// COPIED flags of the entries on the way (in `l1` and in the L2 tables, which are written
    /// unless they were freed). Returns whether `l1` changed; writing it is the caller's job.
    /// QEMU's `qcow2_update_snapshot_refcount`.
    fn update_snapshot_refcounts(
        &self,
        meta: &mut Meta,
        l1: &mut [u64],
        l1_offset: u64,
        addend: Addend,
    ) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let mut run = None;
        let mut l1_changed = false;
        for (i, slot) in l1.iter_mut().enumerate() {
            let old_l1 = *slot;
            if old_l1 == 0 {
                continue;
            }
            let l2_off = old_l1 & OFFSET_MASK;
            if l2_off == 0 || l2_off % cs != 0 {
                return Err(Error::corrupt(
                    self.path(),
                    l1_offset + i as u64 * 8,
                    format!("L2 table offset {l2_off:#x} is invalid (L1 entry {old_l1:#x})"),
                ));
            }
            let (mut entries, stride) = self.read_l2_words(meta, l2_off)?;
            let mut l2_changed = false;
            for j in (0..entries.len()).step_by(stride) {
                let raw = entries[j];
                let entry = raw & !COPIED;
                let refcount = match cluster_type(entry, stride == 2) {
                    ClusterType::Compressed => {
                        let d = Descriptor::decode(entry & !COMPRESSED, cb);
                        let (first, n) = d.clusters(cb);
                        for k in 0..n {
                            self.add_ref(meta, &mut run, first + k * cs, addend)?;
                        }
                        // Compressed clusters are never written in place.
                        2
                    }
                    ClusterType::Normal | ClusterType::ZeroAlloc => {
                        let off = entry & OFFSET_MASK;
                        if off % cs != 0 {
                            return Err(Error::corrupt(
                                self.path(),
                                l2_off + j as u64 * 8,
                                format!("cluster offset {off:#x} is not cluster aligned"),
                            ));
                        }
                        self.add_ref(meta, &mut run, off, addend)?
                    }
                    ClusterType::ZeroPlain | ClusterType::Unallocated => 0,
                };
                let new = if refcount == 1 { entry | COPIED } else { entry };
                if new != raw {
                    entries[j] = new;
                    l2_changed = true;
                }
            }
            let l2_refcount = self.add_ref(meta, &mut run, l2_off, addend)?;
            // The flags say what the refcounts on disk say.
            self.flush_run(meta, &mut run)?;
            if l2_changed && l2_refcount > 0 {
                let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.file.write_at(&bytes, l2_off)?;
            }
            let new_l1 = if l2_refcount == 1 {
                l2_off | COPIED
            } else {
                l2_off
            };
            if new_l1 != old_l1 {
                *slot = new_l1;
                l1_changed = true;
            }
        }
        Ok(l1_changed)
    }

    /// Raises or drops one reference to the cluster at `offset` (nothing for `Keep`) and returns
    /// its refcount afterwards. Raises of consecutive clusters that had the same refcount are
    /// gathered in `run` and written as one range by [`Qcow2::flush_run`].
    fn add_ref(
        &self,
        meta: &mut Meta,
        run: &mut Option<Run>,
        offset: u64,
        addend: Addend,
    ) -> Result<u64> {
        let cluster = offset >> self.geo.cluster_bits;
        match addend {
            Addend::Keep => meta.refcounts.get(&self.file, cluster),
            Addend::Decrement => {
                self.free_clusters(meta, offset, 1)?;
                meta.refcounts.get(&self.file, cluster)
            }
            Addend::Increment => {
                if let Some(r) = run {
                    if cluster == r.start + r.len
                        && meta.refcounts.get(&self.file, cluster)? == r.old
                    {
                        r.len += 1;
                        return Ok(r.old + 1);
                    }
                }
                self.flush_run(meta, run)?;
                let old = meta.refcounts.get(&self.file, cluster)?;
                // A used cluster with refcount zero means the refcounts are broken; raising it
                // could also need a new refcount block, which this walk does not settle.
                if old == 0 {
                    return Err(Error::corrupt(
                        self.path(),
                        offset,
                        "a cluster in use has refcount 0; repair the image with check -r all",
                    ));
                }
                if old == meta.refcounts.max_value() {
                    return Err(Error::corrupt(self.path(), offset, "refcount overflow"));
                }
                *run = Some(Run {
                    start: cluster,
                    len: 1,
                    old,
                });
                Ok(old + 1)
            }
        }
    }

    /// Writes the raises gathered in `run`.
    fn flush_run(&self, meta: &mut Meta, run: &mut Option<Run>) -> Result<()> {
        match run.take() {
            Some(r) => meta
                .refcounts
                .set_range(&self.file, r.start, r.len, r.old + 1),
            None => Ok(()),
        }
    }

    /// Writes `snapshots` as the new snapshot table (to newly allocated clusters), points the
    /// header at it and releases the old table (`old_offset`, `old_size` bytes).
    fn write_snapshot_table(
        &self,
        meta: &mut Meta,
        snapshots: &[Snapshot],
        old_offset: u64,
        old_size: u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let bytes = encode_table(snapshots).map_err(|_| Error::NoSpace {
            path: self.path().to_path_buf(),
            what: format!("the snapshot table would exceed {MAX_TABLE_BYTES} bytes"),
        })?;
        let offset = if bytes.is_empty() {
            0
        } else {
            self.alloc_clusters(meta, (bytes.len() as u64).div_ceil(cs))?
        };
        self.file.sync()?;
        self.file.write_at(&bytes, offset)?;
        self.file.sync()?;
        meta.header.nb_snapshots = snapshots.len() as u32;
        meta.header.snapshots_offset = offset;
        self.write_header(&meta.header)?;
        self.file.sync()?;
        if old_size > 0 {
            let first = old_offset & !(cs - 1);
            let end = (old_offset + old_size).next_multiple_of(cs);
            self.free_clusters(meta, first, (end - first) / cs)?;
        }
        Ok(())
    }

    fn snapshot_create(&self, name: &str, (date_sec, date_nsec): (u32, u32)) -> Result<Snapshot> {
        let mut meta = self.meta.lock().unwrap();
        let _gate = self.free_gate.write().unwrap();
        let table = self.read_snapshot_table(&meta.header)?;
        if table.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::NoSpace {
                path: self.path().to_path_buf(),
                what: format!("the image already has {MAX_SNAPSHOTS} snapshots"),
            });
        }
        let cs = self.geo.cluster_size();
        let mut active = self.active_l1();
        let l1_bytes = active.len() as u64 * 8;
        let l1_offset = if active.is_empty() {
            0
        } else {
            self.alloc_clusters(&mut meta, l1_bytes.div_ceil(cs))?
        };
        // The copy keeps the active entries as they are, COPIED flags included (as QEMU's does);
        // only the active table's flags matter.
        self.write_l1(l1_offset, &active)?;
        if self.update_snapshot_refcounts(
            &mut meta,
            &mut active,
            self.l1_offset,
            Addend::Increment,
        )? {
            self.set_active_l1(&active)?;
        }
        self.file.sync()?;
        let sn = Snapshot {
            id: table::next_id(&table.snapshots),
            name: table::clip_name(name).to_string(),
            l1_table_offset: l1_offset,
            l1_size: active.len() as u32,
            vm_state_size: 0,
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            disk_size: meta.header.size,
            // qemu-img records an instruction count of 0.
            icount: Some(0),
            extra_data_size: table::KNOWN_EXTRA_LEN,
            unknown_extra: Vec::new(),
        };
        let mut snapshots = table.snapshots.clone();
        snapshots.push(sn.clone());
        let old_offset = meta.header.snapshots_offset;
        self.write_snapshot_table(&mut meta, &snapshots, old_offset, table.size)?;
        Ok(sn)
    }

    fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let mut meta = self.meta.lock().unwrap();
        let _gate = self.free_gate.write().unwrap();
        let table = self.read_snapshot_table(&meta.header)?;
        let sn = find_by_id_or_name(&table.snapshots, id_or_name)
            .map(|i| &table.snapshots[i])
            .ok_or_else(|| Error::argument("Failed to load snapshot: No such file or directory"))?;
        let sn_l1 = self.read_snapshot_l1(sn)?;
        let active_len = self.l1.len();
        if sn_l1.len() > active_len {
            return Err(Error::unsupported(
                self.path(),
                format!(
                    "snapshot {} has a larger L1 table ({} entries) than the image ({active_len})",
                    sn.id, sn.l1_size
                ),
            ));
        }
        let mut new_active = sn_l1.clone();
        new_active.resize(active_len, 0);

        // Raise the snapshot's references before the active table points at them.
        let mut sn_copy = sn_l1;
        if self.update_snapshot_refcounts(
            &mut meta,
            &mut sn_copy,
            sn.l1_table_offset,
            Addend::Increment,
        )? {
            self.write_l1(sn.l1_table_offset, &sn_copy)?;
        }
        self.file.sync()?;
        let mut old_active = self.active_l1();
        self.write_l1(self.l1_offset, &new_active)?;
        self.file.sync()?;
        for (slot, &v) in self.l1.iter().zip(&new_active) {
            slot.store(v, Ordering::Release);
        }
        // Then drop the references of the table it replaced (not written back: it is gone).
        self.update_snapshot_refcounts(
            &mut meta,
            &mut old_active,
            self.l1_offset,
            Addend::Decrement,
        )?;
        if self.update_snapshot_refcounts(
            &mut meta,
            &mut new_active,
            self.l1_offset,
            Addend::Keep,
        )? {
            self.set_active_l1(&new_active)?;
        }
        Ok(())
    }

    fn snapshot_delete(&self, name: &str) -> Result<()> {
        let mut meta = self.meta.lock().unwrap();
        let _gate = self.free_gate.write().unwrap();
        let table = self.read_snapshot_table(&meta.header)?;
        let index = table
            .snapshots
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| Error::argument("snapshot not found"))?;
        let mut snapshots = table.snapshots.clone();
        let sn = snapshots.remove(index);
        let mut sn_l1 = self.read_snapshot_l1(&sn)?;
        // Unlist it first: from then on an interruption only leaks its clusters.
        let old_offset = meta.header.snapshots_offset;
        self.write_snapshot_table(&mut meta, &snapshots, old_offset, table.size)?;
        self.update_snapshot_refcounts(
            &mut meta,
            &mut sn_l1,
            sn.l1_table_offset,
            Addend::Decrement,
        )?;
        if sn.l1_size > 0 {
            let clusters = (u64::from(sn.l1_size) * 8).div_ceil(self.geo.cluster_size());
            self.free_clusters(&mut meta, sn.l1_table_offset, clusters)?;
        }
        let mut active = self.active_l1();
        if self.update_snapshot_refcounts(&mut meta, &mut active, self.l1_offset, Addend::Keep)? {
            self.set_active_l1(&active)?;
        }
        Ok(())
    }
}
