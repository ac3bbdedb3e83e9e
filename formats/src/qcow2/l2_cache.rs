//! The L2 table cache.
//!
//! Tables are shared as `Arc<L2Table>` whose entries are atomics, so a lookup copies one entry
//! without holding any lock once the table is in the cache. Changes go through
//! [`L2Cache::update`], which writes the entries to disk and into the cached copy under the cache
//! lock; loads also happen under that lock, so a table is never loaded from disk while an update
//! of it is half done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lru::Lru;
use crate::error::Result;

/// The entries of one L2 table, raw (big-endian decoding already done).
#[derive(Debug)]
pub struct L2Table {
    entries: Box<[AtomicU64]>,
}

impl L2Table {
    pub fn new(raw: Vec<u64>) -> Self {
        L2Table {
            entries: raw.into_iter().map(AtomicU64::new).collect(),
        }
    }

    pub fn get(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Acquire)
    }
}

/// Cache of L2 tables keyed by their host offset.
#[derive(Debug)]
pub struct L2Cache {
    tables: Mutex<Lru<Arc<L2Table>>>,
}

impl L2Cache {
    /// A cache holding up to `capacity` tables.
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: Mutex::new(Lru::new(capacity)),
        }
    }

    /// The table at `offset`, loaded with `load` on a miss.
    pub fn get(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<Arc<L2Table>> {
        let mut tables = self.tables.lock().unwrap();
        if let Some(t) = tables.get(offset) {
            return Ok(t.clone());
        }
        let table = Arc::new(L2Table::new(load()?));
        tables.insert(offset, table.clone());
        Ok(table)
    }

    /// Puts a freshly written table into the cache.
    pub fn insert(&self, offset: u64, raw: Vec<u64>) {
        self.tables
            .lock()
            .unwrap()
            .insert(offset, Arc::new(L2Table::new(raw)));
    }

    /// Sets entries `start..start+values.len()` of the table at `offset`: `write` puts them on disk
    /// first, then the cached copy (if any) is updated.
    pub fn update(
        &self,
        offset: u64,
        start: usize,
        values: &[u64],
        write: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let mut tables = self.tables.lock().unwrap();
        write()?;
        if let Some(t) = tables.get(offset) {
            for (i, v) in values.iter().enumerate() {
                t.entries[start + i].store(*v, Ordering::Release);
            }
        }
        Ok(())
    }
}
