//! Emptying an overlay after `commit`, as QEMU's `qcow2_make_empty`: the image afterwards reads
//! through to its backing file everywhere.
//!
//! A version 3 image with nothing that reserves clusters of its own (internal snapshots,
//! persistent bitmaps, a LUKS header, an external data file) and a small L1 table keeps only its
//! header cluster, followed by new empty refcount and L1 tables (QEMU's `make_completely_empty`). Any other image keeps
//! its metadata: every cluster of the active L2 tables becomes unallocated (QEMU's full discard),
//! so clusters that snapshots still use keep their data for them.

use std::path::Path;

use super::entry::L2Entry;
use super::header::{crypt_method, incompat};
use super::refcount;
use super::subcluster::Remap;
use super::Qcow2;
use crate::block::BlockDev;
use crate::chain::BackingPolicy;
use crate::error::Result;
use crate::host_file::HostFile;
use crate::luks::Passphrase;

/// Byte offsets of header fields (the qcow2 spec's header layout).
const L1_OFFSET_FIELD: u64 = 40;
const INCOMPAT_FIELD: u64 = 72;

impl Qcow2 {
    /// Makes every cluster unallocated, keeping the L2 tables (QEMU's discard with
    /// `full_discard`): reads go to the backing file (or read zero without one), and host
    /// clusters no longer referenced are freed.
    pub fn unallocate_all(&self) -> Result<()> {
        self.unallocate(0, self.geo.size)
    }

    /// [`Qcow2::unallocate_all`] for the clusters of guest bytes `start..end` (`start` cluster
    /// aligned; the cluster holding `end` is included).
    pub(super) fn unallocate(&self, start: u64, end: u64) -> Result<()> {
        self.check_writable()?;
        let geo = self.geo;
        let end = end.next_multiple_of(geo.cluster_size());
        let mut cur = start;
        while cur < end {
            let span_end = ((cur | (geo.l2_span() - 1)) + 1).min(end);
            if self.l2_offset(geo.l1_index(cur))?.is_some() {
                if geo.extended_l2 {
                    self.remap_subclusters(cur, span_end, Remap::Unallocate)?;
                } else {
                    self.remap_clusters(cur, span_end, |_, old| {
                        (old != L2Entry::Unallocated).then_some(0)
                    })?;
                }
            }
            cur = span_end;
        }
        Ok(())
    }
}

/// Empties the qcow2 image at `path` as QEMU's `qcow2_make_empty` does (see the module docs).
/// `secret` unlocks an encrypted image; its data file is opened under `policy`.
pub fn make_empty(path: &Path, secret: Option<&Passphrase>, policy: BackingPolicy) -> Result<()> {
    let image = Qcow2::open_alone(path, false, policy, secret)?;
    let h = image.header();
    let cs = h.cluster_size();
    let l1_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs);
    let refcounts_per_block = cs * 8 / u64::from(h.refcount_bits());
    let no_bitmaps = image.bitmaps.lock().unwrap().is_empty();
    let completely = h.version >= 3
        && h.nb_snapshots == 0
        && no_bitmaps
        && h.crypt_method != crypt_method::LUKS
        && image.data_file.is_none()
        && 3 + l1_clusters <= refcounts_per_block;
    if !completely {
        image.unallocate_all()?;
        return image.flush();
    }
    let (l1_size, order) = (h.l1_size, h.refcount_order);
    drop(image);
    make_completely_empty(path, cs, l1_size, order)
}

/// QEMU's `make_completely_empty`: the header cluster stays as it is; the refcount table (one
/// cluster) follows it, then one refcount block, then a zeroed L1 table of the same size, and
/// the file ends there. The dirty bit covers the rewrite.
fn make_completely_empty(path: &Path, cs: u64, l1_size: u32, refcount_order: u32) -> Result<()> {
    let file = HostFile::open(path, false)?;
    let l1_clusters = (u64::from(l1_size) * 8).div_ceil(cs);
    let mut incompat = [0u8; 8];
    file.read_at(&mut incompat, INCOMPAT_FIELD)?;
    let clean = u64::from_be_bytes(incompat) & !incompat::DIRTY;
    file.write_at(&(clean | incompat::DIRTY).to_be_bytes(), INCOMPAT_FIELD)?;
    file.sync()?;
    file.write_zero_bytes(cs, (2 + l1_clusters) * cs)?;
    let mut refblock = vec![0u8; cs as usize];
    for cluster in 0..3 + l1_clusters as usize {
        refcount::set_entry(&mut refblock, refcount_order, cluster, 1);
    }
    file.write_at(&refblock, 2 * cs)?;
    file.write_at(&(2 * cs).to_be_bytes(), cs)?;
    // l1_table_offset, refcount_table_offset and refcount_table_clusters, in header order.
    let mut tables = Vec::with_capacity(20);
    tables.extend_from_slice(&(3 * cs).to_be_bytes());
    tables.extend_from_slice(&cs.to_be_bytes());
    tables.extend_from_slice(&1u32.to_be_bytes());
    file.write_at(&tables, L1_OFFSET_FIELD)?;
    file.sync()?;
    file.write_at(&clean.to_be_bytes(), INCOMPAT_FIELD)?;
    file.set_len((3 + l1_clusters) * cs)?;
    file.sync()
}
