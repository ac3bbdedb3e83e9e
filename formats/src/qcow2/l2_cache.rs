//! The L2 table cache.
//!
//! Tables are shared as `Arc<L2Table>` whose entries are atomics, so a lookup copies one entry
//! without holding any lock once the table is in the cache. Changes go through
//! [`L2Cache::update`], which writes the entries to disk and into the cached copy under the cache
//! lock; loads also happen under that lock, so a table is never loaded from disk while an update
//! of it is half done.
//!
//! Extended L2 entries are two words that must be read as one value. Each table carries a
//! sequence count that updates make odd while they store and even again afterwards (a seqlock);
//! [`L2Table::get_pair`] retries when it saw an update in progress, so lookups stay lock-free.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::lru::Lru;
use crate::error::Result;

/// The entries of one L2 table, raw (big-endian decoding already done).
#[derive(Debug)]
pub struct L2Table {
    entries: Box<[AtomicU64]>,
    /// Odd while an update is storing entries.
    seq: AtomicU64,
}

impl L2Table {
    pub fn new(raw: Vec<u64>) -> Self {
        L2Table {
            entries: raw.into_iter().map(AtomicU64::new).collect(),
            seq: AtomicU64::new(0),
        }
    }

    /// Word `index` of the table.
    pub fn get(&self, index: usize) -> u64 {
        self.entries[index].load(Ordering::Acquire)
    }

    /// Words `index` and `index + 1`, as they were at one moment (no update half applied).
    pub fn get_pair(&self, index: usize) -> (u64, u64) {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let pair = (
                    self.entries[index].load(Ordering::Relaxed),
                    self.entries[index + 1].load(Ordering::Relaxed),
                );
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return pair;
                }
            }
            std::hint::spin_loop();
        }
    }

    /// Stores `values` from word `start`; callers are serialised by the cache lock.
    fn store(&self, start: usize, values: &[u64]) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, v) in values.iter().enumerate() {
            self.entries[start + i].store(*v, Ordering::Release);
        }
        self.seq.store(seq + 2, Ordering::Release);
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

    /// Sets words `start..start+values.len()` of the table at `offset`: `write` puts them on disk
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
            t.store(start, values);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_never_torn() {
        let table = Arc::new(L2Table::new(vec![0; 4]));
        let writer = {
            let table = table.clone();
            std::thread::spawn(move || {
                for v in 1..20_000u64 {
                    table.store(2, &[v, v]);
                }
            })
        };
        for _ in 0..20_000 {
            let (a, b) = table.get_pair(2);
            assert_eq!(a, b);
        }
        writer.join().unwrap();
        assert_eq!(table.get_pair(2), (19_999, 19_999));
    }
}
