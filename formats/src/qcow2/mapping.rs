//! Guest-to-host lookups through the L1 and L2 tables.

use std::sync::Arc;

use super::entry::{self, L2Entry};
use super::l2_cache::L2Table;
use super::Qcow2;
use crate::error::{Error, Result};

/// A run of guest bytes with one mapping state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mapping {
    /// The entry of the first cluster. For `Data` and preallocated `Zero` runs the host clusters
    /// of the run are contiguous from `host`.
    pub entry: L2Entry,
    /// Length of the run in bytes (never past the end of one L2 table's span).
    pub len: u64,
}

impl Qcow2 {
    /// Loads (or finds in the cache) the L2 table at `offset`.
    pub(super) fn l2_table(&self, offset: u64) -> Result<Arc<L2Table>> {
        let cs = self.geo.cluster_size();
        self.l2_cache.get(offset, || {
            if offset % cs != 0 || offset >= self.file.len()? {
                return Err(Error::corrupt(
                    self.path(),
                    offset,
                    "L2 table offset is unaligned or past the end of the file",
                ));
            }
            let mut raw = vec![0u8; cs as usize];
            self.file.read_at(&mut raw, offset)?;
            Ok(raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect())
        })
    }

    /// The L2 table offset for L1 index `index`, if one is allocated.
    pub(super) fn l2_offset(&self, index: usize) -> Result<Option<u64>> {
        let raw = self.l1_entry(index);
        entry::l1_table_offset(raw)
            .map_err(|what| Error::corrupt(self.path(), self.l1_offset + index as u64 * 8, what))
    }

    /// Decodes L2 entry `index` of `table` (at host offset `table_off`).
    pub(super) fn decode(&self, table: &L2Table, table_off: u64, index: usize) -> Result<L2Entry> {
        let e = L2Entry::decode(table.get(index))
            .map_err(|what| Error::corrupt(self.path(), table_off + index as u64 * 8, what))?;
        if let Some(host) = e.host_cluster() {
            if host % self.geo.cluster_size() != 0 {
                return Err(Error::corrupt(
                    self.path(),
                    table_off + index as u64 * 8,
                    format!("data cluster offset {host:#x} is not cluster aligned"),
                ));
            }
        }
        Ok(e)
    }

    /// Describes the guest bytes from `offset`, at most `len` of them, as one run. Reads at most
    /// one L2 table.
    pub(super) fn lookup(&self, offset: u64, len: u64) -> Result<Mapping> {
        let geo = self.geo;
        let span_end = (offset | (geo.l2_span() - 1)).saturating_add(1);
        let end = offset.saturating_add(len).min(span_end);
        let Some(table_off) = self.l2_offset(geo.l1_index(offset))? else {
            return Ok(Mapping {
                entry: L2Entry::Unallocated,
                len: end - offset,
            });
        };
        let table = self.l2_table(table_off)?;
        let first_index = geo.l2_index(offset);
        let first = self.decode(&table, table_off, first_index)?;
        let cs = geo.cluster_size();
        let mut run_end = (offset | (cs - 1)) + 1;
        let mut index = first_index + 1;
        while run_end < end {
            let next = self.decode(&table, table_off, index)?;
            let k = (index - first_index) as u64;
            let same = match (first, next) {
                (L2Entry::Unallocated, L2Entry::Unallocated) => true,
                (L2Entry::Zero { host: None, .. }, L2Entry::Zero { host: None, .. }) => true,
                (
                    L2Entry::Zero {
                        host: Some(a),
                        copied: ca,
                    },
                    L2Entry::Zero {
                        host: Some(b),
                        copied: cb,
                    },
                )
                | (
                    L2Entry::Data {
                        host: a,
                        copied: ca,
                    },
                    L2Entry::Data {
                        host: b,
                        copied: cb,
                    },
                ) => b == a + k * cs && ca == cb,
                _ => false,
            };
            if !same {
                break;
            }
            run_end += cs;
            index += 1;
        }
        Ok(Mapping {
            entry: first,
            len: run_end.min(end) - offset,
        })
    }
}
