//! An in-memory block device with fault injection, for tests of the crates built on this one
//! (behind the `test-utils` feature).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use crate::block::{check_range, BlockDev, Capabilities, Extent, ExtentKind, ZeroFlags};
use crate::error::{Error, Result};
use crate::info::NodeInfo;

/// A RAM disk. `fail_write_after(n)` makes every write after the next `n` fail with EIO.
#[derive(Debug)]
pub struct MemDev {
    data: RwLock<Vec<u8>>,
    writes_left: AtomicU64,
}

impl MemDev {
    pub fn new(size: usize) -> Self {
        MemDev {
            data: RwLock::new(vec![0; size]),
            writes_left: AtomicU64::new(u64::MAX),
        }
    }

    /// Lets `n` more writes succeed, then fails every later one.
    pub fn fail_write_after(&self, n: u64) {
        self.writes_left.store(n, Ordering::SeqCst);
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap().clone()
    }

    fn path() -> &'static std::path::Path {
        std::path::Path::new("<memory>")
    }

    fn take_write(&self) -> Result<()> {
        let ok = self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if ok {
            Ok(())
        } else {
            Err(Error::io(
                Self::path(),
                "injected write failure",
                std::io::Error::from_raw_os_error(libc::EIO),
            ))
        }
    }
}

impl BlockDev for MemDev {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            size: self.data.read().unwrap().len() as u64,
            min_block: 1,
            preferred_block: 4096,
            read_only: false,
            discard_granularity: 1,
            zero_granularity: 1,
            flush_persists: false,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap();
        check_range(Self::path(), offset, buf.len() as u64, data.len() as u64)?;
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write().unwrap();
        check_range(Self::path(), offset, buf.len() as u64, data.len() as u64)?;
        self.take_write()?;
        data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        let mut data = self.data.write().unwrap();
        check_range(Self::path(), offset, len, data.len() as u64)?;
        self.take_write()?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(Self::path(), offset, len, self.size())?;
        Ok(Extent {
            offset,
            length: len,
            kind: ExtentKind::Data,
            depth: 0,
            host_offset: None,
            compressed: false,
        })
    }

    fn info(&self) -> Result<NodeInfo> {
        Ok(NodeInfo {
            filename: "<memory>".into(),
            format: "memory".into(),
            virtual_size: self.size(),
            actual_size: None,
            cluster_size: None,
            dirty_flag: false,
            encrypted: None,
            backing: None,
            format_specific: None,
            children: Vec::new(),
            snapshots: Vec::new(),
        })
    }
}
