//! Changing the refcount width of an image (`amend -o refcount_bits=N`, qcow2.rst
//! "refcount_order"): every refcount is carried over into a new refcount table and new blocks of
//! the new width, written after the end of the file; one header write switches to them, and the
//! old table and blocks are released after it. A crash before the header write leaves the old
//! structures in charge (the new clusters are leaks); after it, the old ones are.

use std::collections::HashSet;
use std::path::Path;

use super::header::{self, incompat, Header, MAX_REFCOUNT_ORDER, MAX_REFTABLE_BYTES};
use super::refcount::{self_covering, set_entry, Refcounts};
use crate::error::{Error, Result};
use crate::host_file::HostFile;

/// Bits of a refcount table entry that are not the block offset.
const TABLE_ENTRY_RESERVED: u64 = 0x1ff;

/// Rewrites the refcount structures of the qcow2 image at `path` with entries of
/// `1 << new_order` bits. Fails, changing nothing, when a refcount does not fit the new width
/// ("Cannot decrease refcount entry width to N bits: Cluster at offset X has a refcount of
/// V"), for version 2 images, and for dirty or corrupt ones.
pub fn change_refcount_width(path: &Path, new_order: u32) -> Result<()> {
    let file = HostFile::open(path, false)?;
    let len = file.len()?;
    let mut first = vec![0u8; (1usize << header::MAX_CLUSTER_BITS).min(len as usize)];
    file.read_at(&mut first, 0)?;
    let mut h = Header::parse(path, &first, len)?;
    if new_order > MAX_REFCOUNT_ORDER {
        return Err(Error::argument(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if h.version < 3 {
        return Err(Error::unsupported(
            path,
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    if h.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0 {
        return Err(Error::unsupported(
            path,
            "the image is dirty or marked corrupt; repair it with check -r all first",
        ));
    }
    if new_order == h.refcount_order {
        return Ok(());
    }
    let cs = h.cluster_size();
    let old_structures = old_structures(&file, &h)?;
    let mut old = Refcounts::load(
        &file,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        h.refcount_table_clusters,
    )?;
    // Clusters past the end of the file hold no refcounts worth keeping.
    let end = len.div_ceil(cs);
    let new_max = if new_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << new_order)) - 1
    };
    for c in 0..end {
        let v = old.get(&file, c)?;
        if v > new_max {
            return Err(Error::argument(format!(
                "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                1u32 << new_order,
                c * cs
            )));
        }
    }

    // The new structures go after the end of the file: the table, then the blocks, sized so
    // that the blocks cover themselves too.
    let per_block = (cs * 8) >> new_order;
    let (table_clusters, blocks) = self_covering(end, cs, 1 << new_order);
    if table_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::NoSpace {
            path: path.to_path_buf(),
            what: format!("a refcount table of {table_clusters} clusters is too large"),
        });
    }
    let table_at = end;
    let blocks_at = end + table_clusters;
    let new_end = blocks_at + blocks;
    let mut table = Vec::with_capacity((table_clusters * cs) as usize);
    for i in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        for j in 0..per_block {
            let c = i * per_block + j;
            let v = if c >= new_end {
                break;
            } else if c >= end {
                1
            } else if old_structures.contains(&c) {
                0
            } else {
                old.get(&file, c)?
            };
            if v != 0 {
                set_entry(&mut block, new_order, j as usize, v);
            }
        }
        let at = (blocks_at + i) * cs;
        file.write_at(&block, at)?;
        table.extend_from_slice(&at.to_be_bytes());
    }
    table.resize((table_clusters * cs) as usize, 0);
    file.write_at(&table, table_at * cs)?;
    file.sync()?;

    h.refcount_order = new_order;
    h.refcount_table_offset = table_at * cs;
    h.refcount_table_clusters = table_clusters as u32;
    file.write_at(&h.encode(path)?, 0)?;
    file.sync()?;
    for c in old_structures {
        file.punch_hole(c * cs, cs)?;
    }
    Ok(())
}

/// The clusters of the refcount table and blocks in use now (cluster indexes).
fn old_structures(file: &HostFile, h: &Header) -> Result<HashSet<u64>> {
    let cs = h.cluster_size();
    let mut raw = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
    file.read_at(&mut raw, h.refcount_table_offset)?;
    let first = h.refcount_table_offset / cs;
    let mut out: HashSet<u64> = (first..first + u64::from(h.refcount_table_clusters)).collect();
    for (i, w) in raw.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(w.try_into().unwrap());
        let block = entry & !TABLE_ENTRY_RESERVED;
        if entry & TABLE_ENTRY_RESERVED != 0 || block % cs != 0 {
            return Err(Error::corrupt(
                file.path(),
                h.refcount_table_offset + i as u64 * 8,
                format!("refcount table entry {i} ({entry:#x}) is invalid"),
            ));
        }
        if block != 0 {
            out.insert(block / cs);
        }
    }
    Ok(out)
}
