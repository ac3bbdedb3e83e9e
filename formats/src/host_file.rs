//! A host file with positional I/O and the Linux space-management calls the drivers need
//! (fallocate, hole punching, SEEK_DATA/SEEK_HOLE). Every error names the file and the offset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

/// Writes at least this long first reserve their range with `fallocate` (keeping the file size).
/// ext4 then maps the range in one go instead of reserving each 4 KiB block as a delayed
/// allocation inside `write`: 256 MiB written in 1 MiB pieces into a new file took 31 ms instead
/// of 52 (256 KiB pieces: 36 against 49; 64 KiB pieces gain nothing, so smaller writes skip it,
/// and rewriting allocated blocks costs the same either way).
const RESERVE_MIN: usize = 256 << 10;

/// A host file opened by a driver.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    /// `fallocate` failed as unsupported (a block device, some file systems): stop asking.
    no_reserve: AtomicBool,
}

/// Result of asking the file system where data starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoleRun {
    /// `len` bytes of data start at the offset.
    Data(u64),
    /// `len` bytes of hole start at the offset.
    Hole(u64),
}

impl HostFile {
    /// Opens an existing regular file (or block device), read-only or read-write.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Error::io(path, "Could not open", e))?;
        let kind = file
            .metadata()
            .map_err(|e| Error::io(path, "cannot stat file", e))?
            .file_type();
        use std::os::unix::fs::FileTypeExt;
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(Error::invalid(
                path,
                format!(
                    "'file' driver requires '{}' to be a regular file",
                    path.display()
                ),
            ));
        }
        Ok(HostFile {
            file,
            path: path.to_path_buf(),
            no_reserve: AtomicBool::new(false),
        })
    }

    /// Creates (or truncates) a file for writing a new image.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io(path, "Could not create", e))?;
        Ok(HostFile {
            file,
            path: path.to_path_buf(),
            no_reserve: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Current length of the file.
    #[allow(clippy::len_without_is_empty)] // a file's emptiness is never the question
    pub fn len(&self) -> Result<u64> {
        file_len(&self.file).map_err(|e| Error::io(&self.path, "cannot stat file", e))
    }

    /// Reads exactly `buf.len()` bytes; bytes past the end of the file read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("read error at offset {offset:#x}"),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.len() >= RESERVE_MIN && !self.no_reserve.load(Ordering::Relaxed) {
            // Only a speed-up: when it fails, the write below allocates (or reports ENOSPC).
            let keep_size = libc::FALLOC_FL_KEEP_SIZE;
            if let Err(e) = self.fallocate(keep_size, offset, buf.len() as u64) {
                if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                    self.no_reserve.store(true, Ordering::Relaxed);
                }
            }
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, format!("write error at offset {offset:#x}"), e))
    }

    /// Sets the file length. A block device keeps its size, as with QEMU's `host_device`:
    /// shrinking it does nothing (what lies past the new end is simply unused) and growing it
    /// past its size fails.
    pub fn set_len(&self, len: u64) -> Result<()> {
        let is_device = self.file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        });
        if is_device {
            let size = self.len()?;
            if len > size {
                return Err(Error::NoSpace {
                    path: self.path.clone(),
                    what: "Cannot grow device files".to_string(),
                });
            }
            return Ok(());
        }
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, format!("cannot truncate to {len} bytes"), e))
    }

    /// fdatasync.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "flush failed", e))
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (off, l) = (to_off(offset)?, to_off(len)?);
        loop {
            // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`
            // and stays open for the duration of the call.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Allocates space for the range (posix_fallocate semantics; extends the file).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        self.fallocate(0, offset, len).map_err(|e| {
            Error::io(
                &self.path,
                format!("cannot preallocate {len} bytes at {offset:#x}"),
                e,
            )
        })
    }

    /// Releases the range's blocks; it reads back as zero. Returns false when the file system cannot.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io(
                &self.path,
                format!("cannot punch hole at {offset:#x}"),
                e,
            )),
        }
    }

    /// Zeroes the range without writing data, keeping it allocated. Returns false when the file
    /// system cannot.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<bool> {
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => Ok(false),
            Err(e) => Err(Error::io(
                &self.path,
                format!("cannot zero range at {offset:#x}"),
                e,
            )),
        }
    }

    /// Writes zero bytes over the range, in bounded chunks.
    pub fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Describes the run starting at `offset` (which must be below the file length), at most `len`
    /// long, using SEEK_DATA/SEEK_HOLE. File systems without them report everything as data.
    pub fn data_or_hole(&self, offset: u64, len: u64) -> Result<HoleRun> {
        let fd = self.file.as_raw_fd();
        let off = to_off(offset).map_err(|e| Error::io(&self.path, "bad offset", e))?;
        // SAFETY: lseek only reads its integer arguments on a valid fd owned by `self.file`. The
        // file position it moves is never used: all other I/O is positional.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data at or after offset: the rest is a hole.
                Some(libc::ENXIO) => Ok(HoleRun::Hole(len)),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(HoleRun::Data(len)),
                _ => Err(Error::io(&self.path, "SEEK_DATA failed", err)),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok(HoleRun::Hole((data - offset).min(len)));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if hole < 0 {
            let err = io::Error::last_os_error();
            return Err(Error::io(&self.path, "SEEK_HOLE failed", err));
        }
        let hole = hole as u64;
        Ok(HoleRun::Data(hole.saturating_sub(offset).clamp(1, len)))
    }
}

impl HostFile {
    /// Copies `len` bytes at `offset` of this file to the same offset of `dst` inside the
    /// kernel (copy_file_range: reflinks or server-side copies where the file systems can).
    /// Returns `Ok(false)`, having copied nothing, when the kernel cannot copy between these
    /// files (other file systems, no support): the caller copies another way.
    pub fn copy_range_to(&self, dst: &HostFile, offset: u64, len: u64) -> Result<bool> {
        let mut done = 0u64;
        while done < len {
            let mut from =
                to_off(offset + done).map_err(|e| Error::io(&self.path, "bad offset", e))?;
            let mut to = from;
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both fds are valid and owned by their `File`s for the call; the offset
            // pointers point to locals that live across it. The kernel reads and writes only
            // those two offsets and the files' data.
            let n = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut from,
                    dst.file.as_raw_fd(),
                    &mut to,
                    want,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                let refused = matches!(
                    err.raw_os_error(),
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
                );
                if refused && done == 0 {
                    return Ok(false);
                }
                return Err(Error::io(&dst.path, "copy_file_range failed", err));
            }
            if n == 0 {
                return Err(Error::io(
                    &self.path,
                    "copy_file_range stopped before the end of the range",
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
            done += n as u64;
        }
        Ok(true)
    }
}

/// The length of an open file; for a block device its size, which `metadata` reports as 0.
pub fn file_len(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // This moves the file position, which nothing uses: all I/O is positional.
        let mut f = file;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_write_reserves_only_its_own_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = HostFile::create(&path).unwrap();
        f.write_at(&vec![7u8; 1 << 20], 4 << 20).unwrap();
        assert_eq!(f.len().unwrap(), 5 << 20);
        assert_eq!(f.data_or_hole(0, 5 << 20).unwrap(), HoleRun::Hole(4 << 20));
        assert_eq!(
            f.data_or_hole(4 << 20, 1 << 20).unwrap(),
            HoleRun::Data(1 << 20)
        );
        let mut back = vec![0u8; 5 << 20];
        f.read_at(&mut back, 0).unwrap();
        assert!(back[..4 << 20].iter().all(|&b| b == 0));
        assert!(back[4 << 20..].iter().all(|&b| b == 7));
        // Nothing is allocated past the end of the file, nor in the hole before the data.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert_eq!(blocks * 512, 1 << 20);
    }
}
