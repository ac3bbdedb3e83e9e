//! The image as a check sees it: the header, the active L1 table and the refcount table held in
//! memory, refcount blocks read through a small cache. Reads past the end of the file return
//! zeros, as QEMU's do, so broken pointers become findings instead of errors.

use std::path::Path;

use super::Fail;
use crate::error::Result;
use crate::host_file::HostFile;
use crate::qcow2::bitmaps::directory::BitmapsExt;
use crate::qcow2::header::{self, Header};
use crate::qcow2::lru::Lru;
use crate::qcow2::refcount::{get_entry, set_entry};

/// Refcount blocks kept in memory.
const BLOCK_CACHE: usize = 64;
/// Bits of a refcount table entry that must be zero (the offset is cluster aligned).
pub(super) const REFT_RESERVED: u64 = 0x1ff;

/// Why an on-disk refcount could not be read.
#[derive(Debug)]
pub(super) enum RefError {
    /// The refcount table points to an unaligned refcount block.
    Unaligned {
        block: u64,
        index: u64,
    },
    Io(Fail),
}

#[derive(Debug)]
pub(super) struct Image {
    pub file: HostFile,
    pub header: Header,
    pub cluster_bits: u32,
    /// L2 entries are 16 bytes: an entry and a subcluster bitmap.
    pub extended_l2: bool,
    /// Guest data lives in an external data file, whose clusters are not refcounted.
    pub data_file: bool,
    pub writable: bool,
    /// The active L1 table (QEMU's `s->l1_table`).
    pub l1: Vec<u64>,
    /// The refcount table, entries as stored.
    pub reftable: Vec<u64>,
    /// Persistent dirty bitmaps, if the image has any that count.
    pub bitmaps: Option<BitmapsExt>,
    blocks: Lru<Vec<u8>>,
    /// The file length as QEMU sees it (rounded up to 512 bytes).
    file_len: u64,
}

impl Image {
    pub fn open(path: &Path, writable: bool) -> Result<Image> {
        let file = HostFile::open(path, !writable)?;
        let real_len = file.len()?;
        let mut first = vec![0u8; (1usize << header::MAX_CLUSTER_BITS).min(real_len as usize)];
        file.read_at(&mut first, 0)?;
        // The snapshot table pointer is the check's to judge (QEMU's check opens the image
        // without reading the table, then reports what is wrong with it), so the header is
        // parsed as if there were no snapshots.
        let count = first
            .get(60..64)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()));
        if first.len() >= 64 {
            first[60..64].fill(0);
        }
        let mut header = Header::parse(path, &first, real_len)?;
        header.nb_snapshots = count.unwrap_or(0);
        // The checks of a read-only open: a check may look at (and repair) images marked
        // corrupt or dirty.
        crate::qcow2::check_features(path, &header, true)?;
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut raw, header.l1_table_offset)?;
        let l1 = be64_words(&raw);
        let mut raw =
            vec![0u8; (u64::from(header.refcount_table_clusters) << header.cluster_bits) as usize];
        file.read_at(&mut raw, header.refcount_table_offset)?;
        let reftable = be64_words(&raw);
        let bitmaps = BitmapsExt::from_header(path, &header)?;
        Ok(Image {
            file,
            cluster_bits: header.cluster_bits,
            extended_l2: header.extended_l2(),
            data_file: header.incompatible_features & header::incompat::DATA_FILE != 0,
            header,
            writable,
            l1,
            reftable,
            bitmaps,
            blocks: Lru::new(BLOCK_CACHE),
            file_len: real_len.next_multiple_of(512),
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Bytes of one L2 entry.
    pub fn l2_entry_bytes(&self) -> usize {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Reads the L2 table at `offset` as (entry, subcluster bitmap) pairs; the bitmap is 0
    /// without extended L2 entries.
    pub fn read_l2(&self, offset: u64) -> Result<Vec<(u64, u64)>, Fail> {
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.read(&mut raw, offset)?;
        let words = be64_words(&raw);
        Ok(if self.extended_l2 {
            words.chunks_exact(2).map(|w| (w[0], w[1])).collect()
        } else {
            words.into_iter().map(|w| (w, 0)).collect()
        })
    }

    /// log2 of the refcounts one refcount block holds.
    pub fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.header.refcount_order
    }

    /// Reads `buf.len()` bytes; past the end of the file they read as zero.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), Fail> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| Fail::from_error(&e))
    }

    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<(), Fail> {
        self.file
            .write_at(buf, offset)
            .map_err(|e| Fail::from_error(&e))?;
        self.file_len = self
            .file_len
            .max((offset + buf.len() as u64).next_multiple_of(512));
        Ok(())
    }

    pub fn set_len(&mut self, len: u64) -> Result<(), Fail> {
        self.file.set_len(len).map_err(|e| Fail::from_error(&e))?;
        self.file_len = len.next_multiple_of(512);
        Ok(())
    }

    pub fn sync(&self) -> Result<(), Fail> {
        self.file.sync().map_err(|e| Fail::from_error(&e))
    }

    /// The refcount block covering `cluster`, if the table has one: (table index, offset).
    fn block_of(&self, cluster: u64) -> Result<Option<(u64, u64)>, RefError> {
        let index = cluster >> self.block_bits();
        let Some(&raw) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let block = raw & !REFT_RESERVED;
        if block == 0 {
            return Ok(None);
        }
        if block % self.cluster_size() != 0 {
            return Err(RefError::Unaligned { block, index });
        }
        Ok(Some((index, block)))
    }

    fn load_block(&mut self, offset: u64) -> Result<&mut Vec<u8>, RefError> {
        if self.blocks.get(offset).is_none() {
            let mut raw = vec![0u8; self.cluster_size() as usize];
            self.read(&mut raw, offset).map_err(RefError::Io)?;
            self.blocks.insert(offset, raw);
        }
        Ok(self.blocks.get(offset).expect("just inserted"))
    }

    /// The on-disk refcount of `cluster` (QEMU's `qcow2_get_refcount`): 0 where no refcount block
    /// exists.
    pub fn refcount(&mut self, cluster: u64) -> Result<u64, RefError> {
        let Some((_, block)) = self.block_of(cluster)? else {
            return Ok(0);
        };
        let order = self.header.refcount_order;
        let i = (cluster & ((1 << self.block_bits()) - 1)) as usize;
        Ok(get_entry(self.load_block(block)?, order, i))
    }

    /// Sets the on-disk refcount of `cluster`, whose refcount block must exist; a cluster that
    /// becomes free is given back to the file system.
    pub fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<(), Fail> {
        let Ok(Some((_, block))) = self.block_of(cluster) else {
            return Err(Fail::io());
        };
        let order = self.header.refcount_order;
        let i = (cluster & ((1 << self.block_bits()) - 1)) as usize;
        let bits = 1usize << order;
        let (lo, hi) = (i * bits / 8, ((i + 1) * bits).div_ceil(8));
        let changed = {
            let data = self.load_block(block).map_err(|_| Fail::io())?;
            set_entry(data, order, i, value);
            data[lo..hi].to_vec()
        };
        self.write(&changed, block + lo as u64)?;
        if value == 0 {
            let cs = self.cluster_size();
            self.file
                .punch_hole(cluster << self.cluster_bits, cs)
                .map_err(|e| Fail::from_error(&e))?;
        }
        Ok(())
    }

    /// Switches to a new refcount table (after a rebuild wrote it and the header).
    pub fn replace_reftable(&mut self, offset: u64, entries: Vec<u64>) {
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters =
            ((entries.len() as u64 * 8) >> self.cluster_bits) as u32;
        self.reftable = entries;
        self.blocks = Lru::new(BLOCK_CACHE);
    }

    /// Writes an 8-byte big-endian value at `offset`.
    pub fn write_u64(&mut self, offset: u64, value: u64) -> Result<(), Fail> {
        self.write(&value.to_be_bytes(), offset)
    }
}

pub(super) fn be64_words(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}
