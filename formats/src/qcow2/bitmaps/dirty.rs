//! A dirty bitmap in memory: bit `i` stands for guest bytes `i << granularity_bits ..` of that
//! length, stored as the qcow2 bitmap data is (qcow2.rst, "Bitmap data": bytes in order, least
//! significant bit first).

/// The bits of one bitmap, covering a virtual disk of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity_bits: u32,
    size: u64,
    bytes: Vec<u8>,
}

impl DirtyBitmap {
    /// An empty (all clean) bitmap.
    pub fn new(granularity_bits: u32, size: u64) -> DirtyBitmap {
        DirtyBitmap {
            granularity_bits,
            size,
            bytes: vec![0; Self::bytes_for(granularity_bits, size)],
        }
    }

    /// The bitmap of the data bytes `bytes` (as many as the bits need; more are ignored, fewer
    /// read as clean). Bits past the end of the disk are cleared.
    pub fn from_bytes(granularity_bits: u32, size: u64, mut bytes: Vec<u8>) -> DirtyBitmap {
        bytes.resize(Self::bytes_for(granularity_bits, size), 0);
        let mut b = DirtyBitmap {
            granularity_bits,
            size,
            bytes,
        };
        b.clear_tail();
        b
    }

    fn bytes_for(granularity_bits: u32, size: u64) -> usize {
        size.div_ceil(1 << granularity_bits).div_ceil(8) as usize
    }

    fn bits(&self) -> u64 {
        self.size.div_ceil(1 << self.granularity_bits)
    }

    /// Clears the padding bits of the last byte.
    fn clear_tail(&mut self) {
        let used = (self.bits() % 8) as u32;
        if used != 0 {
            if let Some(last) = self.bytes.last_mut() {
                *last &= (1u8 << used) - 1;
            }
        }
    }

    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The data bytes, as stored in bitmap data clusters.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether any bit is set.
    pub fn any(&self) -> bool {
        self.bytes.iter().any(|&b| b != 0)
    }

    /// Marks guest bytes `offset..offset+len` dirty (whole granules; nothing for `len` 0; the
    /// range is clipped to the disk).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
    }

    /// Sets bits `first..end`.
    fn set_bits(&mut self, first: u64, end: u64) {
        let mut bit = first;
        while bit < end {
            let byte = (bit / 8) as usize;
            if bit % 8 == 0 && end - bit >= 8 {
                let whole = ((end - bit) / 8) as usize;
                self.bytes[byte..byte + whole].fill(0xff);
                bit += whole as u64 * 8;
            } else {
                self.bytes[byte] |= 1 << (bit % 8);
                bit += 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.bytes.fill(0);
    }

    /// The same bits for a disk of `size` bytes: cut off, or grown with clean bits.
    pub fn resized(mut self, size: u64) -> DirtyBitmap {
        self.size = size;
        self.bytes
            .resize(Self::bytes_for(self.granularity_bits, size), 0);
        self.clear_tail();
        self
    }

    /// The dirty guest byte ranges, in order, each as long as possible (clipped to the disk).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity_bits;
        for (i, &b) in self.bytes.iter().enumerate() {
            if b == 0 {
                continue;
            }
            for j in 0..8u64 {
                if b & (1 << j) == 0 {
                    continue;
                }
                let start = (i as u64 * 8 + j) << g;
                let end = (start + (1 << g)).min(self.size);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l = end - *s,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }

    /// Sets every bit whose range `other` has dirty (any granularity).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        if other.granularity_bits == self.granularity_bits && other.size == self.size {
            for (a, b) in self.bytes.iter_mut().zip(&other.bytes) {
                *a |= b;
            }
            return;
        }
        for (offset, len) in other.dirty_ranges() {
            self.set_range(offset, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_whole_granules_lsb_first() {
        let mut b = DirtyBitmap::new(16, 8 << 20);
        b.set_range(100 << 10, 300 << 10);
        assert_eq!(b.as_bytes()[0], 0x7e);
        assert_eq!(b.dirty_ranges(), vec![(64 << 10, 384 << 10)]);
        b.set_range(0, 0);
        b.set_range(8 << 20, 10);
        assert_eq!(b.as_bytes()[0], 0x7e);
        b.set_range(0, 8 << 20);
        assert!(b.as_bytes().iter().all(|&x| x == 0xff));
    }

    #[test]
    fn merge_across_granularities() {
        let mut small = DirtyBitmap::new(16, 8 << 20);
        small.set_range(100 << 10, 50 << 10);
        small.set_range(1 << 20, 1024);
        let mut big = DirtyBitmap::new(17, 8 << 20);
        big.merge(&small);
        assert_eq!(
            big.dirty_ranges(),
            vec![(0, 256 << 10), (1 << 20, 128 << 10)]
        );
    }

    #[test]
    fn the_last_granule_is_clipped_and_padding_cleared() {
        let b = DirtyBitmap::from_bytes(9, 1000, vec![0xff, 0xff]);
        assert_eq!(b.as_bytes(), &[0x03]);
        assert_eq!(b.dirty_ranges(), vec![(0, 1000)]);
        let grown = b.resized(4096);
        assert_eq!(grown.as_bytes(), &[0x03]);
    }
}
