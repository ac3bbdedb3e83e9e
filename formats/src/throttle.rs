//! A rate limit on the writes to a block device (qemu-img convert's `-r RATE`), the way QEMU's
//! `ratelimit` counts: time is cut into slices of [`SLICE`]; each slice lets `rate / 10` bytes
//! start (a request larger than what is left still starts, and the slice is then used up), and a
//! request that finds its slice used up waits for the next one. [`Throttled`] cuts larger
//! writes into pieces of one slice's quota, so the rate holds for any request size.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::block::{BlockDev, Capabilities, Extent, ZeroFlags};
use crate::error::Result;
use crate::info::NodeInfo;

/// QEMU's slice for block jobs and qemu-img convert (`BLOCK_COPY_SLICE_TIME`).
pub const SLICE: Duration = Duration::from_millis(100);

/// The state of a rate limit; time comes in as an argument, so the logic is a plain function of
/// it.
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes that may start per slice.
    quota: u64,
    /// Where the current slice ends, relative to the limit's start.
    slice_end: Duration,
    dispatched: u64,
}

impl RateLimit {
    /// A limit of `bytes_per_second` (more than 0; at least one byte per slice).
    pub fn new(bytes_per_second: u64) -> RateLimit {
        let per_slice = u128::from(bytes_per_second) * SLICE.as_nanos() / 1_000_000_000;
        RateLimit {
            quota: u64::try_from(per_slice).unwrap_or(u64::MAX).max(1),
            slice_end: Duration::ZERO,
            dispatched: 0,
        }
    }

    /// Bytes one slice lets start.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// How long a request of `bytes` must wait at time `now` before it may start (zero: it
    /// starts now and is counted). Ask again after waiting.
    pub fn delay(&mut self, now: Duration, bytes: u64) -> Duration {
        if now >= self.slice_end {
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        if self.dispatched >= self.quota {
            return self.slice_end - now;
        }
        self.dispatched = self.dispatched.saturating_add(bytes);
        Duration::ZERO
    }
}

/// A device whose writes, write-zeroes, discards and compressed writes wait for a
/// [`RateLimit`]; reads and everything else pass straight through.
#[derive(Debug)]
pub struct Throttled {
    inner: Arc<dyn BlockDev>,
    start: Instant,
    limit: Mutex<RateLimit>,
}

impl Throttled {
    pub fn new(inner: Arc<dyn BlockDev>, bytes_per_second: u64) -> Throttled {
        Throttled {
            inner,
            start: Instant::now(),
            limit: Mutex::new(RateLimit::new(bytes_per_second)),
        }
    }

    /// The size writes are cut into: a slice's quota, rounded down to whole preferred blocks
    /// (clusters) so that the pieces stay aligned, and at least one block.
    fn piece(&self) -> u64 {
        let quota = self.limit.lock().unwrap().quota();
        let block = u64::from(self.inner.capabilities().preferred_block.max(512));
        (quota - quota % block).max(block)
    }

    /// Waits until `bytes` may go.
    fn wait(&self, bytes: u64) {
        loop {
            let delay = self
                .limit
                .lock()
                .unwrap()
                .delay(self.start.elapsed(), bytes);
            if delay.is_zero() {
                return;
            }
            std::thread::sleep(delay);
        }
    }
}

impl BlockDev for Throttled {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let piece = usize::try_from(self.piece()).unwrap_or(usize::MAX);
        for (i, chunk) in buf.chunks(piece).enumerate() {
            self.wait(chunk.len() as u64);
            self.inner.write_at(chunk, offset + (i * piece) as u64)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let piece = self.piece();
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            self.wait(n);
            self.inner.write_zeroes(offset + done, n, flags)?;
            done += n;
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.wait(len);
        self.inner.discard(offset, len)
    }
    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.extent(offset, len)
    }
    fn parallel_writes(&self) -> bool {
        self.inner.parallel_writes()
    }
    fn compressed_cluster_size(&self) -> Option<u64> {
        self.inner.compressed_cluster_size()
    }
    fn compress_cluster(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.compress_cluster(data)
    }
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.wait(
            self.inner
                .compressed_cluster_size()
                .unwrap_or(compressed.len() as u64),
        );
        self.inner.write_compressed(offset, compressed)
    }
    fn info(&self) -> Result<NodeInfo> {
        self.inner.info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs requests of `bytes` back to back at `rate` on a simulated clock; returns when the
    /// last one starts.
    fn simulate(rate: u64, bytes: u64, requests: u32) -> Duration {
        let mut limit = RateLimit::new(rate);
        let mut now = Duration::ZERO;
        for _ in 0..requests {
            loop {
                let d = limit.delay(now, bytes);
                if d.is_zero() {
                    break;
                }
                now += d;
            }
        }
        now
    }

    #[test]
    fn the_rate_bounds_the_bytes_started_per_second() {
        // 8 MiB in 64 KiB requests at 1 MiB/s: 0.1 MiB per slice, so 2 requests per slice
        // (the second overshoots), 64 slices for 128 requests.
        let t = simulate(1 << 20, 64 << 10, 128);
        assert_eq!(t, SLICE * 63);
        // A request larger than a slice's quota still goes, one per slice.
        assert_eq!(simulate(1 << 20, 4 << 20, 3), SLICE * 2);
        // At 10 MiB/s the same 8 MiB take a tenth of the time.
        assert!(simulate(10 << 20, 64 << 10, 128) <= SLICE * 7);
    }
}
