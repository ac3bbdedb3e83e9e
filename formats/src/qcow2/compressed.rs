//! Compressed clusters (qcow2.rst, "Compressed Clusters Descriptor").
//!
//! A compressed L2 entry holds a byte offset and a count of 512-byte sectors; the sector count is
//! an upper bound, so decompression stops once one cluster has been produced. zlib clusters are
//! raw deflate with a 4 KiB window (QEMU's `deflateInit2(..., -12, ...)`); zstd clusters are one
//! zstd frame. Compressed data is packed byte by byte: a host cluster holding pieces of N compressed
//! clusters has refcount N.

use std::sync::Arc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::entry::COMPRESSED;
use super::{Meta, Qcow2};
use crate::error::{Error, Result};

/// How clusters are compressed (the header's compression_type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn from_header(value: u8) -> Option<Self> {
        match value {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    pub fn header_value(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A decoded compressed-cluster descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Byte offset of the compressed data in the file.
    pub offset: u64,
    /// Number of 512-byte sectors the data spans (from the sector holding `offset`).
    pub sectors: u64,
}

impl Descriptor {
    /// Decodes the bits of a compressed L2 entry (without the COMPRESSED flag).
    pub fn decode(raw: u64, cluster_bits: u32) -> Descriptor {
        let shift = 62 - (cluster_bits - 8);
        let size_mask = (1u64 << (cluster_bits - 8)) - 1;
        Descriptor {
            offset: raw & ((1u64 << shift) - 1),
            sectors: ((raw >> shift) & size_mask) + 1,
        }
    }

    /// Encodes a descriptor for `len` bytes at `offset`, with the COMPRESSED flag.
    pub fn encode(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let shift = 62 - (cluster_bits - 8);
        let extra_sectors = (offset + len - 1) / 512 - offset / 512;
        COMPRESSED | (extra_sectors << shift) | offset
    }

    /// Upper bound of the compressed bytes, from `offset`.
    pub fn max_len(&self) -> u64 {
        self.sectors * 512 - (self.offset & 511)
    }

    /// The host clusters the data touches: (byte offset of the first, count).
    pub fn clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let first = (self.offset & !511) >> cluster_bits;
        let last = ((self.offset & !511) + self.sectors * 512 - 1) >> cluster_bits;
        (first << cluster_bits, last - first + 1)
    }
}

/// Compresses one cluster; `None` when the result would not be smaller than the cluster.
pub fn compress(kind: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    let max = data.len() - 1;
    match kind {
        CompressionType::Zlib => {
            let mut c = Compress::new_with_window_bits(Compression::default(), false, 12);
            let mut out = Vec::with_capacity(max);
            match c.compress_vec(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if out.len() < max => Some(out),
                _ => None,
            }
        }
        CompressionType::Zstd => zstd::bulk::compress(data, 3)
            .ok()
            .filter(|out| out.len() < max),
    }
}

/// Decompresses into `out`, which must be filled completely; trailing input is ignored.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => {
            let mut d = Decompress::new_with_window_bits(false, 12);
            let status = d
                .decompress(input, out, FlushDecompress::Finish)
                .map_err(|e| format!("deflate data is invalid: {e}"))?;
            let full = d.total_out() as usize == out.len();
            match status {
                Status::StreamEnd | Status::BufError | Status::Ok if full => Ok(()),
                _ => Err(format!(
                    "deflate data ends after {} of {} bytes",
                    d.total_out(),
                    out.len()
                )),
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < outb.capacity() {
                let before = (inb.pos(), outb.pos());
                let hint = d
                    .run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd data is invalid: {e}"))?;
                if (inb.pos(), outb.pos()) == before || (hint == 0 && outb.pos() < outb.capacity())
                {
                    return Err(format!(
                        "zstd data ends after {} of {} bytes",
                        outb.pos(),
                        outb.capacity()
                    ));
                }
            }
            Ok(())
        }
    }
}

impl Qcow2 {
    /// The decompressed cluster for a compressed L2 entry (cached: sequential small reads of one
    /// compressed cluster decompress it once).
    pub(super) fn read_compressed(&self, raw: u64, guest: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((e, data)) = &*self.last_compressed.lock().unwrap() {
            if *e == raw {
                return Ok(data.clone());
            }
        }
        let cb = self.geo.cluster_bits;
        let desc = Descriptor::decode(raw, cb);
        let file_len = self.file.len()?;
        if desc.offset >= file_len {
            return Err(Error::corrupt(
                self.path(),
                desc.offset,
                format!(
                    "compressed cluster for guest offset {guest:#x} lies past the end of the file"
                ),
            ));
        }
        let len = desc.max_len().min(file_len - desc.offset);
        let mut input = vec![0u8; len as usize];
        self.file.read_at(&mut input, desc.offset)?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        decompress(self.compression, &input, &mut out).map_err(|what| {
            Error::corrupt(
                self.path(),
                desc.offset,
                format!("compressed cluster for guest offset {guest:#x}: {what}"),
            )
        })?;
        let out = Arc::new(out);
        *self.last_compressed.lock().unwrap() = Some((raw, out.clone()));
        Ok(out)
    }

    /// Reserves `len` bytes for compressed data, packed after the previous compressed cluster
    /// when it fits, and raises the refcount of every host cluster the bytes touch.
    pub(super) fn alloc_bytes(&self, meta: &mut Meta, len: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        // `next_compressed_byte` is forgotten whenever a cluster is freed (see `free_clusters`),
        // so the cluster it points into still holds earlier compressed data and is ours to share.
        if let Some(next) = meta.next_compressed_byte.filter(|n| n % cs != 0) {
            let room = cs - next % cs;
            let extra = len.saturating_sub(room).div_ceil(cs);
            let cluster = next >> cb;
            if extra == 0 || meta.refcounts.alloc_at(&self.file, cluster + 1, extra)? {
                meta.refcounts.increment(&self.file, cluster << cb)?;
                meta.next_compressed_byte = Some(next + len);
                return Ok(next);
            }
        }
        let start = self.alloc_clusters(meta, len.div_ceil(cs))?;
        meta.next_compressed_byte = Some(start + len);
        Ok(start)
    }

    /// Writes one cluster of compressed data for the cluster at guest offset `offset`, which must
    /// be unallocated (or a zero cluster) in this layer.
    pub(super) fn store_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut meta = self.lock_meta_for(offset, 1);
        let l1_index = self.geo.l1_index(offset);
        let table_off = self.ensure_l2_table(&mut meta, l1_index)?;
        let table = self.l2_table(table_off)?;
        let index = self.geo.l2_index(offset);
        let old = self.decode(&table, table_off, index)?;
        if !matches!(
            old,
            super::entry::L2Entry::Unallocated | super::entry::L2Entry::Zero { .. }
        ) {
            return Err(Error::unsupported(
                self.path(),
                format!("cannot write a compressed cluster over allocated data at guest offset {offset:#x}"),
            ));
        }
        let host = self.alloc_bytes(&mut meta, data.len() as u64)?;
        self.file.write_at(data, host)?;
        let entry = Descriptor::encode(host, data.len() as u64, self.geo.cluster_bits);
        self.set_l2_entries(table_off, index, &[entry])?;
        self.release_entries(&mut meta, &[old])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_round_trip() {
        for cb in [9, 12, 16, 21] {
            let len = 1500.min((1 << cb) - 1);
            let raw = Descriptor::encode(0x12345 + 3, len, cb) & !COMPRESSED;
            let d = Descriptor::decode(raw, cb);
            assert_eq!(d.offset, 0x12348);
            assert!(d.max_len() >= len && d.max_len() < len + 512, "cb {cb}");
        }
    }

    #[test]
    fn codecs_round_trip_and_tolerate_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            c.extend_from_slice(&[0xff; 300]);
            let mut out = vec![0u8; data.len()];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, data);
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &noise).is_none());
    }
}
