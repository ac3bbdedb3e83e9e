//! The in-memory refcount array a check builds from the metadata walk: one refcount per host
//! cluster, stored exactly like refcount blocks on disk (so a slice of it *is* a refcount block
//! and the rebuild writes it out as is). Its length follows the file, never a value read from it.

use super::Fail;
use crate::qcow2::refcount::{get_entry, set_entry};

#[derive(Debug)]
pub(super) struct RefArray {
    order: u32,
    cluster_size: u64,
    data: Vec<u8>,
    /// Entries in use (the array's bytes are rounded up to whole clusters).
    len: u64,
}

impl RefArray {
    pub fn new(order: u32, cluster_size: u64, len: u64) -> Result<Self, Fail> {
        let mut a = RefArray {
            order,
            cluster_size,
            data: Vec::new(),
            len: 0,
        };
        a.resize(len)?;
        Ok(a)
    }

    fn bytes_for(&self, entries: u64) -> u64 {
        (entries << self.order)
            .div_ceil(8)
            .next_multiple_of(self.cluster_size)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Grows (or shrinks) to `len` entries; new entries are zero.
    pub fn resize(&mut self, len: u64) -> Result<(), Fail> {
        let bytes = usize::try_from(self.bytes_for(len)).map_err(|_| Fail::no_memory())?;
        if bytes > self.data.len() {
            self.data
                .try_reserve_exact(bytes - self.data.len())
                .map_err(|_| Fail::no_memory())?;
        }
        self.data.resize(bytes, 0);
        self.len = len;
        Ok(())
    }

    pub fn get(&self, cluster: u64) -> u64 {
        get_entry(&self.data, self.order, cluster as usize)
    }

    pub fn set(&mut self, cluster: u64, value: u64) {
        set_entry(&mut self.data, self.order, cluster as usize, value);
    }

    pub fn clear(&mut self) {
        self.data.fill(0);
    }

    /// The bytes of refcount block `index` (`cluster_size` bytes; zero past the end).
    pub fn block(&self, index: u64) -> Vec<u8> {
        let cs = self.cluster_size as usize;
        let start = index as usize * cs;
        let mut out = vec![0u8; cs];
        if start < self.data.len() {
            let end = (start + cs).min(self.data.len());
            out[..end - start].copy_from_slice(&self.data[start..end]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_in_whole_clusters_and_slices_blocks() {
        let mut a = RefArray::new(4, 512, 10).unwrap();
        assert_eq!(a.len(), 10);
        a.set(9, 7);
        a.resize(300).unwrap();
        assert_eq!((a.get(9), a.get(299)), (7, 0));
        // 16-bit refcounts: 256 per 512-byte block; entry 9 is in block 0, bytes 18-19.
        assert_eq!(&a.block(0)[18..20], &[0, 7]);
        assert_eq!(a.block(5), vec![0u8; 512]);
        a.clear();
        assert_eq!(a.get(9), 0);
    }
}
