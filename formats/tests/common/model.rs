//! What the guest should see: a sparse model of guest bytes that knows discard's "old value or
//! zero" rule, the operations the tests apply to a device and to the model alike, and the seeded
//! PRNG that generates them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vdisk_formats::{BlockDev, ErrorKind, ZeroFlags};

// ---------------------------------------------------------------------------------------------
// A seeded PRNG

/// xorshift64: small, fast and reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero; mixing spreads small seeds over all bits.
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// `len` pseudo-random bytes: a window, starting at a random point, of a fixed random table
    /// whose length is a prime, so that data landing at a wrong cluster does not match.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let table = TABLE.get_or_init(|| {
            let mut r = Rng::new(0x5eed);
            (0..65521).map(|_| r.next_u64() as u8).collect()
        });
        let mut start = self.below(table.len() as u64) as usize;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = (len - out.len()).min(table.len() - start);
            out.extend_from_slice(&table[start..start + n]);
            start = 0;
        }
        out
    }
}

/// The seed of a randomized test: `VDISK_SEED` when set (to replay a failure), else a fresh one.
/// It is printed, and shown again by the test harness when the test fails.
pub fn seed_from_env(test: &str) -> u64 {
    let seed = match std::env::var("VDISK_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("VDISK_SEED={s:?} is not a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{test}: seed {seed} (replay with VDISK_SEED={seed})");
    seed
}

// ---------------------------------------------------------------------------------------------
// The model of guest contents

/// A byte reads as the model's value.
const EXACT: u8 = 0;
/// A discarded byte: it reads as the model's value or zero.
const OLD_OR_ZERO: u8 = 1;
/// A byte of an interrupted operation: it may read as anything.
const ANY: u8 = 2;

/// Granule of the sparse model.
const CHUNK: u64 = 64 << 10;

#[derive(Debug, Clone)]
struct Chunk {
    data: Vec<u8>,
    /// How exact `data` is: [`EXACT`], [`OLD_OR_ZERO`] or [`ANY`].
    loose: Vec<u8>,
}

/// Expected guest contents: a sparse map of 64 KiB chunks; bytes outside every chunk read zero.
#[derive(Debug, Clone)]
pub struct Model {
    pub size: u64,
    chunks: BTreeMap<u64, Chunk>,
}

impl Model {
    pub fn new(size: u64) -> Self {
        Model {
            size,
            chunks: BTreeMap::new(),
        }
    }

    /// Calls `f(chunk, range in chunk, range in the request)` for each chunk the range touches.
    fn each_chunk(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Chunk, std::ops::Range<usize>, std::ops::Range<usize>),
    ) {
        assert!(offset + len <= self.size, "model op past the end");
        let size = self.size;
        let mut cur = offset;
        while cur < offset + len {
            let index = cur / CHUNK;
            let base = index * CHUNK;
            let end = (base + CHUNK).min(offset + len);
            let chunk_len = CHUNK.min(size - base) as usize;
            let chunk = self.chunks.entry(index).or_insert_with(|| Chunk {
                data: vec![0; chunk_len],
                loose: vec![EXACT; chunk_len],
            });
            let (a, b) = ((cur - base) as usize, (end - base) as usize);
            let (ra, rb) = ((cur - offset) as usize, (end - offset) as usize);
            f(chunk, a..b, ra..rb);
            cur = end;
        }
    }

    pub fn write(&mut self, offset: u64, buf: &[u8]) {
        self.each_chunk(offset, buf.len() as u64, |c, r, src| {
            c.data[r.clone()].copy_from_slice(&buf[src]);
            c.loose[r].fill(EXACT);
        });
    }

    pub fn zero(&mut self, offset: u64, len: u64) {
        self.each_chunk(offset, len, |c, r, _| {
            c.data[r.clone()].fill(0);
            c.loose[r].fill(EXACT);
        });
    }

    /// After a discard each byte reads either its old value or zero.
    pub fn discard(&mut self, offset: u64, len: u64) {
        self.each_chunk(offset, len, |c, r, _| {
            let loose = &mut c.loose[r];
            if !loose.contains(&ANY) {
                loose.fill(OLD_OR_ZERO);
                return;
            }
            for l in loose {
                *l = (*l).max(OLD_OR_ZERO);
            }
        });
    }

    /// After an operation that was interrupted, the bytes may read as anything.
    pub fn forget(&mut self, offset: u64, len: u64) {
        self.each_chunk(offset, len, |c, r, _| c.loose[r].fill(ANY));
    }

    /// Checks `actual`, the guest bytes at `offset`; on success the discarded bytes take the values
    /// seen, so that the model is exact again.
    pub fn check_and_settle(&mut self, offset: u64, actual: &[u8]) -> Result<(), String> {
        let mut bad: Option<String> = None;
        let mut count = 0u64;
        self.each_chunk(offset, actual.len() as u64, |c, r, src| {
            if c.data[r.clone()] == actual[src.clone()] {
                return;
            }
            for (i, &got) in r.clone().zip(&actual[src.clone()]) {
                let want = c.data[i];
                let l = c.loose[i];
                if got == want || l == ANY || (l == OLD_OR_ZERO && got == 0) {
                    continue;
                }
                count += 1;
                if bad.is_none() {
                    let at = offset + (src.start + i - r.start) as u64;
                    let loose = if c.loose[i] != 0 { " or 0" } else { "" };
                    bad = Some(format!(
                        "guest byte {at:#x}: read {got:#04x}, expected {want:#04x}{loose}"
                    ));
                }
            }
        });
        if let Some(first) = bad {
            return Err(format!("{count} bytes differ; first: {first}"));
        }
        self.each_chunk(offset, actual.len() as u64, |c, r, src| {
            c.data[r.clone()].copy_from_slice(&actual[src]);
            c.loose[r].fill(EXACT);
        });
        Ok(())
    }

    /// Checks a raw file holding the whole guest (as `qemu-img convert -O raw` wrote it): every
    /// modelled chunk, and zeros in every data extent of the file outside them. Settles the model.
    pub fn verify_file(&mut self, raw: &Path) -> Result<(), String> {
        let file = File::open(raw).unwrap();
        let len = file.metadata().unwrap().len();
        if len != self.size {
            return Err(format!("raw file has {len} bytes, guest has {}", self.size));
        }
        let indexes: Vec<u64> = self.chunks.keys().copied().collect();
        for index in indexes {
            let base = index * CHUNK;
            let mut buf = vec![0u8; CHUNK.min(self.size - base) as usize];
            file.read_exact_at(&mut buf, base).unwrap();
            self.check_and_settle(base, &buf)?;
        }
        for (start, end) in data_extents(&file) {
            let mut cur = start;
            while cur < end {
                let next = ((cur / CHUNK + 1) * CHUNK).min(end);
                if !self.chunks.contains_key(&(cur / CHUNK)) {
                    let mut buf = vec![0u8; (next - cur) as usize];
                    file.read_exact_at(&mut buf, cur).unwrap();
                    if buf != vec![0u8; buf.len()] {
                        let i = buf.iter().position(|&b| b != 0).unwrap();
                        return Err(format!(
                            "guest byte {:#x} reads {:#04x}, but nothing was written there",
                            cur + i as u64,
                            buf[i]
                        ));
                    }
                }
                cur = next;
            }
        }
        Ok(())
    }

    /// Writes the (settled) model as a sparse raw file.
    pub fn write_raw(&self, path: &Path) {
        let file = File::create(path).unwrap();
        file.set_len(self.size).unwrap();
        for (index, c) in &self.chunks {
            assert!(
                !c.loose.contains(&OLD_OR_ZERO) && !c.loose.contains(&ANY),
                "settle the model before writing it"
            );
            file.write_all_at(&c.data, index * CHUNK).unwrap();
        }
    }
}

/// Data extents of a sparse file (SEEK_DATA / SEEK_HOLE), as `start..end` pairs.
pub fn data_extents(file: &File) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let len = file.metadata().unwrap().len();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek only reads its integer arguments; `fd` belongs to `file`, which outlives
        // the call. The file position is never used by the positional reads of these tests.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `pos`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole >= data, "SEEK_HOLE failed on a file that has data");
        out.push((data as u64, hole as u64));
        pos = hole as u64;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Guest operations

/// One guest operation, applied to a device and to the model alike.
#[derive(Clone)]
pub enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Discard {
        offset: u64,
        len: u64,
    },
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { offset, data } => write!(f, "write {offset:#x}+{:#x}", data.len()),
            Op::Zero { offset, len, flags } => write!(
                f,
                "write_zeroes {offset:#x}+{len:#x} may_unmap={} fast_only={}",
                flags.may_unmap, flags.fast_only
            ),
            Op::Discard { offset, len } => write!(f, "discard {offset:#x}+{len:#x}"),
        }
    }
}

impl Op {
    /// A random operation near `anchor`: unaligned, 1 byte to three clusters long, within `size`.
    /// Writes are about half of them; the rest are write_zeroes with each flag and discards.
    pub fn random(rng: &mut Rng, size: u64, anchor: u64, cluster: u64) -> Op {
        let spread = 2 * cluster;
        let lo = anchor.saturating_sub(spread);
        let hi = (anchor + spread).min(size - 1);
        let offset = rng.range(lo, hi);
        let max_len = match rng.below(100) {
            0..=39 => 512,
            40..=74 => cluster + cluster / 2,
            _ => 3 * cluster,
        };
        let len = rng.range(1, max_len).min(size - offset);
        Op::random_kind(rng, offset, len)
    }

    /// A random operation on exactly `offset..offset+len`.
    pub fn random_kind(rng: &mut Rng, offset: u64, len: u64) -> Op {
        match rng.below(100) {
            0..=51 => Op::Write {
                offset,
                data: rng.bytes(len as usize),
            },
            52..=83 => Op::Zero {
                offset,
                len,
                flags: ZeroFlags {
                    may_unmap: rng.percent(50),
                    fast_only: rng.percent(25),
                },
            },
            _ => Op::Discard { offset, len },
        }
    }

    /// Applies the operation to the device and the model.
    pub fn apply(&self, dev: &dyn BlockDev, model: &mut Model) {
        let done = self.run(dev);
        self.record(model, done);
    }

    /// Runs the operation on the device; panics on failure. Returns false when a `fast_only`
    /// write_zeroes was refused as Unsupported (it may have zeroed part of the range).
    pub fn run(&self, dev: &dyn BlockDev) -> bool {
        let result = match *self {
            Op::Write { offset, ref data } => dev.write_at(data, offset),
            Op::Zero { offset, len, flags } => match dev.write_zeroes(offset, len, flags) {
                Err(e) if flags.fast_only && e.kind() == ErrorKind::Unsupported => return false,
                r => r,
            },
            Op::Discard { offset, len } => dev.discard(offset, len),
        };
        if let Err(e) = result {
            panic!("{self:?}: {e}");
        }
        true
    }

    /// Records the effect of the operation in the model; `done` is what [`Op::run`] returned.
    pub fn record(&self, model: &mut Model, done: bool) {
        match *self {
            Op::Write { offset, ref data } => model.write(offset, data),
            Op::Zero { offset, len, .. } if done => model.zero(offset, len),
            Op::Zero { offset, len, .. } | Op::Discard { offset, len } => {
                model.discard(offset, len)
            }
        }
    }
}
