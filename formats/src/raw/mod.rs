//! The raw driver: the guest disk is the host file, byte for byte.
//!
//! Holes in a sparse file are reported as zero extents (SEEK_DATA/SEEK_HOLE), `discard` punches
//! holes, and `write_zeroes` uses fallocate where the file system can.

use std::path::Path;

use crate::block::{check_range, BlockDev, Capabilities, Extent, ExtentKind, ZeroFlags};
use crate::error::{Error, Result};
use crate::host_file::{HoleRun, HostFile};
use crate::info::{file_node, ChildInfo, NodeInfo};
use crate::Preallocation;

/// Granularity reported for discard and zeroing on a host file.
const HOST_BLOCK: u32 = 4096;

/// An open raw image.
#[derive(Debug)]
pub struct Raw {
    file: HostFile,
    size: u64,
    read_only: bool,
}

/// Copies raw image `src` into the raw image `dst`, which must be as large and read as zero
/// (newly created), by copy offloading: each data run of `src` is copied inside the kernel
/// (copy_file_range), holes are left as holes. `progress` gets the bytes done so far. Returns
/// `Ok(false)`, with nothing copied, when the kernel cannot copy between the two files; the
/// caller then copies the ordinary way, to the same result.
pub fn copy_offloaded(src: &Path, dst: &Path, progress: &dyn Fn(u64)) -> Result<bool> {
    let from = HostFile::open(src, true)?;
    let to = HostFile::open(dst, false)?;
    let len = from.len()?;
    if to.len()? < len {
        return Err(Error::argument(format!(
            "{}: the target is smaller than the source",
            dst.display()
        )));
    }
    let mut at = 0u64;
    let mut copied_any = false;
    while at < len {
        let n = match from.data_or_hole(at, len - at)? {
            HoleRun::Hole(n) => n,
            HoleRun::Data(n) => {
                if !from.copy_range_to(&to, at, n)? {
                    if copied_any {
                        return Err(Error::unsupported(
                            dst,
                            "copy offloading stopped working in the middle of the copy",
                        ));
                    }
                    return Ok(false);
                }
                copied_any = true;
                n
            }
        };
        at += n;
        progress(at);
    }
    Ok(true)
}

impl Raw {
    /// Opens an existing file as a raw image. Its size is the file length rounded up to whole
    /// 512-byte sectors (as QEMU reports it); the rounded tail reads as zero.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = HostFile::open(path, read_only)?;
        let size = file.len()?.next_multiple_of(512);
        Ok(Raw {
            file,
            size,
            read_only,
        })
    }

    /// Creates a raw image of `size` bytes (rounded up to whole 512-byte sectors, as qemu-img
    /// does) with the given preallocation.
    pub fn create(path: &Path, size: u64, prealloc: Preallocation) -> Result<()> {
        let size = size.next_multiple_of(512);
        let file = HostFile::create(path)?;
        match prealloc {
            Preallocation::Off => file.set_len(size)?,
            Preallocation::Falloc => {
                file.allocate(0, size)?;
                file.set_len(size)?;
            }
            Preallocation::Full => {
                file.write_zero_bytes(0, size)?;
                file.set_len(size)?;
            }
            Preallocation::Metadata => {
                return Err(Error::argument(
                    "Invalid parameter 'metadata': raw images support preallocation off, falloc and full",
                ))
            }
        }
        file.sync()
    }

    /// Changes the size of a raw image; shrinking needs `shrink`. Growth is sparse unless
    /// `prealloc` asks for falloc or full.
    pub fn resize(path: &Path, new_size: u64, shrink: bool, prealloc: Preallocation) -> Result<()> {
        let file = HostFile::open(path, false)?;
        let old = file.len()?;
        if new_size < old && !shrink {
            return Err(Error::argument(
                "Use the --shrink option to perform a shrink operation.",
            ));
        }
        if new_size > old {
            match prealloc {
                Preallocation::Off => {}
                Preallocation::Falloc => file.allocate(old, new_size - old)?,
                Preallocation::Full => file.write_zero_bytes(old, new_size - old)?,
                Preallocation::Metadata => {
                    return Err(Error::argument(
                        "Unsupported preallocation mode 'metadata' for raw images",
                    ))
                }
            }
        }
        file.set_len(new_size)?;
        file.sync()
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.file.path(), offset, len, self.size)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.file.path().to_path_buf(),
            });
        }
        Ok(())
    }
}

impl BlockDev for Raw {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            size: self.size,
            min_block: 1,
            preferred_block: HOST_BLOCK,
            read_only: self.read_only,
            discard_granularity: HOST_BLOCK,
            zero_granularity: HOST_BLOCK,
            flush_persists: true,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check(offset, buf.len() as u64)?;
        self.file.write_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if flags.may_unmap && self.file.punch_hole(offset, len)? {
            return Ok(());
        }
        if self.file.zero_range(offset, len)? {
            return Ok(());
        }
        if flags.fast_only {
            return Err(Error::unsupported(
                self.file.path(),
                "the file system cannot zero ranges without writing",
            ));
        }
        self.file.write_zero_bytes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        // A file system that cannot punch holes simply keeps the data, which discard allows.
        self.file.punch_hole(offset, len).map(|_| ())
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        self.check(offset, len)?;
        let (kind, length) = match self.file.data_or_hole(offset, len)? {
            HoleRun::Data(n) => (ExtentKind::Data, n),
            HoleRun::Hole(n) => (ExtentKind::Zero, n),
        };
        Ok(Extent {
            offset,
            length,
            kind,
            depth: 0,
            host_offset: Some(offset),
            compressed: false,
        })
    }

    fn info(&self) -> Result<NodeInfo> {
        let file = file_node(self.file.path(), self.file.file())?;
        Ok(NodeInfo {
            filename: file.filename.clone(),
            format: "raw".to_string(),
            virtual_size: self.size,
            actual_size: file.actual_size,
            cluster_size: None,
            dirty_flag: false,
            encrypted: None,
            backing: None,
            format_specific: None,
            children: vec![ChildInfo {
                name: "file".to_string(),
                info: file,
            }],
            snapshots: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_reports_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        Raw::create(&path, 4 << 20, Preallocation::Off).unwrap();
        let raw = Raw::open(&path, false).unwrap();
        raw.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let e = raw.extent(0, 4 << 20).unwrap();
        assert_eq!(e.kind, ExtentKind::Zero);
        assert_eq!(e.length, 1 << 20);
        let e = raw.extent(1 << 20, 3 << 20).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
        assert_eq!(e.host_offset, Some(1 << 20));
        raw.discard(1 << 20, 4096).unwrap();
        let mut buf = [1u8; 4096];
        raw.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        Raw::create(&path, 1 << 20, Preallocation::Off).unwrap();
        let raw = Raw::open(&path, true).unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(
            raw.read_at(&mut buf, (1 << 20) - 1).unwrap_err().kind(),
            crate::ErrorKind::OutOfRange
        );
        assert_eq!(
            raw.write_at(&buf, 0).unwrap_err().kind(),
            crate::ErrorKind::ReadOnly
        );
        raw.read_at(&mut [], 1 << 20).unwrap();
    }
}
