//! Guest-to-host lookups through the L1 and L2 tables.

use std::sync::Arc;

use super::entry::{self, ExtL2Entry, L2Entry};
use super::l2_cache::L2Table;
use super::Qcow2;
use crate::error::{Error, Result};

/// A run of guest bytes with one mapping state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mapping {
    /// The state of the run, as the entry of its first cluster (with extended L2 entries, of its
    /// first subcluster: `Data`, `Zero`, `Unallocated` or `Compressed`). For `Data` runs the
    /// host clusters of the run are contiguous from the entry's `host`.
    pub entry: L2Entry,
    /// Length of the run in bytes (never past the end of one L2 table's span).
    pub len: u64,
    /// Host offset of the run's first byte when this layer has a host cluster for it: data,
    /// a preallocated zero cluster, or unallocated subclusters of an allocated cluster. The run's
    /// bytes are at consecutive host offsets from there.
    pub host: Option<u64>,
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

    /// Decodes L2 entry `index` (`0..geo.l2_entries()`) of `table` (at host offset `table_off`).
    /// An extended entry is summarised as one standard entry (see [`ExtL2Entry::summary`]): what
    /// code that only follows references needs.
    pub(super) fn decode(&self, table: &L2Table, table_off: u64, index: usize) -> Result<L2Entry> {
        debug_assert!(index < self.geo.l2_entries());
        if self.geo.extended_l2 {
            return Ok(self.decode_ext(table, table_off, index)?.summary());
        }
        let raw = table.get(index);
        if self.data_file.is_some() && raw == super::entry::COPIED {
            // With an external data file, offset 0 is a valid data cluster (qcow2.rst).
            return Ok(L2Entry::Data {
                host: 0,
                copied: true,
            });
        }
        let e = L2Entry::decode(raw)
            .map_err(|what| Error::corrupt(self.path(), table_off + index as u64 * 8, what))?;
        self.check_host_aligned(e.host_cluster(), table_off + index as u64 * 8)?;
        Ok(e)
    }

    /// Decodes extended L2 entry `index` of `table` (an image with extended L2 entries).
    pub(super) fn decode_ext(
        &self,
        table: &L2Table,
        table_off: u64,
        index: usize,
    ) -> Result<ExtL2Entry> {
        let at = table_off + index as u64 * 16;
        let (word, bitmap) = table.get_pair(2 * index);
        let e = ExtL2Entry::decode(word, bitmap)
            .map_err(|what| Error::corrupt(self.path(), at, what))?;
        if let ExtL2Entry::Standard { host, .. } = e {
            self.check_host_aligned(host, at)?;
        }
        Ok(e)
    }

    fn check_host_aligned(&self, host: Option<u64>, entry_at: u64) -> Result<()> {
        match host {
            Some(host) if host % self.geo.cluster_size() != 0 => Err(Error::corrupt(
                self.path(),
                entry_at,
                format!("data cluster offset {host:#x} is not cluster aligned"),
            )),
            _ => Ok(()),
        }
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
                host: None,
            });
        };
        let table = self.l2_table(table_off)?;
        if geo.extended_l2 {
            return self.lookup_subclusters(&table, table_off, offset, end);
        }
        let first_index = geo.l2_index(offset);
        let first = self.decode(&table, table_off, first_index)?;
        let cs = geo.cluster_size();
        let mut run_end = (offset | (cs - 1)) + 1;
        let mut index = first_index + 1;
        while run_end < end {
            // A malformed entry ends the run; the lookup that starts there reports it.
            let Ok(next) = self.decode(&table, table_off, index) else {
                break;
            };
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
        let in_cluster = geo.in_cluster(offset);
        Ok(Mapping {
            entry: first,
            len: run_end.min(end) - offset,
            host: match first {
                L2Entry::Compressed(_) => None,
                e => e.host_cluster().map(|h| h + in_cluster),
            },
        })
    }
}
