//! The export-time policies qemu-nbd applies on top of an image, as one [`BlockDev`] adapter:
//! a window starting at an offset (`-o`), cache modes (`--cache`), whether discards reach the
//! image (`--discard`), and turning written zero buffers into write-zeroes (`--detect-zeroes`).
//!
//! ```text
//!   NBD / FUSE / kernel ──> Tuned ──> Arc<dyn BlockDev> (raw, qcow2, overlay ...)
//! ```

use std::sync::Arc;

use vdisk_formats::{BlockDev, Capabilities, Extent, NodeInfo, Result, ZeroFlags};

/// How flushes and writes relate (qemu's `--cache` modes, as far as they change behaviour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flushing {
    /// Writes become durable at the client's flush (`writeback`, `none`).
    #[default]
    OnRequest,
    /// Every write is flushed before it completes (`writethrough`, `directsync`).
    EveryWrite,
    /// Client flushes are ignored; the image is flushed only when the export ends (`unsafe`).
    Never,
}

/// `--detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    /// A write of zero bytes becomes a write-zeroes request.
    On,
    /// ... which may also release the space (needs `--discard=unmap`).
    Unmap,
}

/// The policies; the default changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// First byte of the image that is byte 0 of the export.
    pub offset: u64,
    pub flushing: Flushing,
    /// Discards (and the unmap hint of write-zeroes) reach the image (`--discard=unmap`).
    pub unmap: bool,
    pub detect_zeroes: DetectZeroes,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            offset: 0,
            flushing: Flushing::OnRequest,
            unmap: true,
            detect_zeroes: DetectZeroes::Off,
        }
    }
}

/// An image seen through a [`Policy`].
#[derive(Debug)]
pub struct Tuned {
    inner: Arc<dyn BlockDev>,
    policy: Policy,
}

impl Tuned {
    /// Wraps `inner`, or returns it unchanged when `policy` is the default. Fails when the
    /// offset lies beyond the end of the image.
    pub fn wrap(inner: Arc<dyn BlockDev>, policy: Policy) -> anyhow::Result<Arc<dyn BlockDev>> {
        if policy.offset > inner.size() {
            anyhow::bail!(
                "Offset ({}) cannot be greater than the image size ({})",
                policy.offset,
                inner.size()
            );
        }
        if policy == Policy::default() {
            return Ok(inner);
        }
        Ok(Arc::new(Tuned { inner, policy }))
    }

    fn after_write(&self) -> Result<()> {
        match self.policy.flushing {
            Flushing::EveryWrite => self.inner.flush(),
            _ => Ok(()),
        }
    }
}

impl BlockDev for Tuned {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.size -= self.policy.offset;
        caps
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_at(buf, offset + self.policy.offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let zero = self.policy.detect_zeroes != DetectZeroes::Off
            && !buf.is_empty()
            && buf.iter().all(|&b| b == 0);
        if zero {
            let flags = ZeroFlags {
                may_unmap: self.policy.detect_zeroes == DetectZeroes::Unmap,
                fast_only: false,
            };
            return self.write_zeroes(offset, buf.len() as u64, flags);
        }
        self.inner.write_at(buf, offset + self.policy.offset)?;
        self.after_write()
    }

    fn flush(&self) -> Result<()> {
        match self.policy.flushing {
            Flushing::Never => Ok(()),
            _ => self.inner.flush(),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> Result<()> {
        flags.may_unmap &= self.policy.unmap;
        self.inner
            .write_zeroes(offset + self.policy.offset, len, flags)?;
        self.after_write()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.policy.unmap {
            // qemu's discard=ignore: the request succeeds and nothing changes (the callers
            // check the range).
            return Ok(());
        }
        self.inner.discard(offset + self.policy.offset, len)?;
        self.after_write()
    }

    fn parallel_writes(&self) -> bool {
        self.inner.parallel_writes()
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        let mut e = self.inner.extent(offset + self.policy.offset, len)?;
        e.offset -= self.policy.offset;
        Ok(e)
    }

    fn info(&self) -> Result<NodeInfo> {
        self.inner.info()
    }
}
