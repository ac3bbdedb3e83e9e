//! The `luks` driver: a [`BlockDev`] that encrypts a LUKS payload stored in another device
//! (normally the raw file).
//!
//! Requests are translated to whole encryption sectors. Aligned writes encrypt a copy of the
//! caller's data in bounded chunks and run concurrently; a write that covers part of a sector
//! reads, decrypts, patches and re-encrypts it under an exclusive lock, so two partial writes to
//! one sector cannot undo each other. Reads need no lock.
//!
//! `write_zeroes` has to write encrypted zeros (the file's zeros do not decrypt to zeros), and
//! `discard` keeps the data: passing it down would expose decrypted garbage, which the trait does
//! not allow, and would reveal which sectors are in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::options::LuksCreateOptions;
use super::volume::LuksVolume;
use super::{with_scratch, DevRange, HeaderIo, LuksAmend, LuksMetadata, Passphrase};
use crate::block::{check_range, BlockDev, Capabilities, Extent, ExtentKind, ZeroFlags};
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::info::{file_node, ChildInfo, FormatSpecific, LuksInfo, NodeInfo};
use crate::raw::Raw;

/// Most bytes encrypted into one scratch buffer per write step.
const WRITE_CHUNK: usize = 4 << 20;

/// An open LUKS image.
#[derive(Debug)]
pub struct Luks {
    volume: LuksVolume,
    /// The device holding header and payload.
    data: Arc<dyn BlockDev>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Shared by aligned writes, exclusive for read-modify-write of partial sectors.
    rmw: RwLock<()>,
}

impl Luks {
    /// Opens the LUKS image in the file at `path` with `passphrase`.
    pub fn open(path: &Path, read_only: bool, passphrase: &Passphrase) -> Result<Luks> {
        let raw: Arc<dyn BlockDev> = Arc::new(Raw::open(path, read_only)?);
        Luks::open_on(raw, path, read_only, passphrase)
    }

    /// Opens the LUKS image stored in `data` (header at offset 0).
    pub fn open_on(
        data: Arc<dyn BlockDev>,
        path: &Path,
        read_only: bool,
        passphrase: &Passphrase,
    ) -> Result<Luks> {
        let len = data.size();
        let io: Arc<dyn HeaderIo> = Arc::new(DevRange::new(data.clone(), 0, len, path));
        let volume = LuksVolume::open(io, passphrase)?;
        let size = volume.data_size(len)?;
        Ok(Luks {
            volume,
            data,
            path: path.to_path_buf(),
            size,
            read_only,
            rmw: RwLock::new(()),
        })
    }

    /// Describes the LUKS image in the file at `path` as `info` does, from its header alone: no
    /// passphrase, no key derivation (QEMU's `BDRV_O_NO_IO` open).
    pub fn describe(path: &Path) -> Result<NodeInfo> {
        let data: Arc<dyn BlockDev> = Arc::new(Raw::open(path, true)?);
        let len = data.size();
        let meta = LuksMetadata::read(&DevRange::new(data.clone(), 0, len, path))?;
        let size = meta.data_size(len)?;
        node_info(path, &*data, size, meta.info())
    }

    /// Creates a LUKS image of `opts.size` bytes at `path` (an existing file is replaced): the
    /// header with one keyslot for `opts.passphrase`, then a sparse payload.
    pub fn create(path: &Path, opts: &LuksCreateOptions) -> Result<()> {
        opts.validate()?;
        if opts.passphrase.is_none() {
            return Err(Error::argument(
                "Creating a LUKS image needs a passphrase (key-secret)",
            ));
        }
        let sector = u64::from(opts.sector_size);
        let size = opts
            .size
            .checked_next_multiple_of(sector)
            .ok_or_else(|| Error::argument("image size is too large"))?;
        let header = LuksVolume::header_size(opts);
        let total = header
            .checked_add(size)
            .ok_or_else(|| Error::argument("image size is too large"))?;
        let file = HostFile::create(path)?;
        file.set_len(total)?;
        file.sync()?;
        drop(file);
        let raw: Arc<dyn BlockDev> = Arc::new(Raw::open(path, false)?);
        let io: Arc<dyn HeaderIo> = Arc::new(DevRange::new(raw.clone(), 0, total, path));
        LuksVolume::create(io, opts)?;
        raw.flush()
    }

    /// The unlocked header: cipher, layout, key slots.
    pub fn volume(&self) -> &LuksVolume {
        &self.volume
    }

    /// Adds, replaces or erases key slots ([`LuksAmend`]); needs a writable image.
    pub fn amend(&self, a: &LuksAmend, force: bool) -> Result<()> {
        self.check_writable()?;
        self.volume.amend(a, force)
    }

    /// Rewrites a damaged LUKS2 header copy; `false` when both were fine.
    pub fn repair(&self) -> Result<bool> {
        self.check_writable()?;
        self.volume.repair()
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn sector(&self) -> u64 {
        u64::from(self.volume.sector_size())
    }

    fn host(&self, offset: u64) -> u64 {
        self.volume.payload_offset() + offset
    }

    /// Reads and decrypts whole sectors at the sector-aligned `offset`.
    fn read_sectors(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.data.read_at(buf, self.host(offset))?;
        self.volume.decrypt_payload(buf, offset);
        Ok(())
    }

    /// Encrypts a copy of whole sectors and writes them at the sector-aligned `offset`.
    fn write_sectors(&self, buf: &[u8], offset: u64) -> Result<()> {
        with_scratch(buf.len().min(WRITE_CHUNK), |scratch| {
            let mut at = offset;
            for piece in buf.chunks(WRITE_CHUNK) {
                let chunk = &mut scratch[..piece.len()];
                self.volume.encrypt_payload_from(piece, chunk, at);
                self.data.write_at(chunk, self.host(at))?;
                at += piece.len() as u64;
            }
            Ok(())
        })
    }

    /// Splits `offset..offset+len` into partial-sector and whole-sector pieces and calls
    /// `f(piece_offset, range_in_request, whole)` for each, in order.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>, bool) -> Result<()>,
    ) -> Result<()> {
        let ss = self.sector();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let left = len - done;
            let within = (pos % ss) as usize;
            if within != 0 || (left as u64) < ss {
                let n = (ss as usize - within).min(left);
                f(pos, done..done + n, false)?;
                done += n;
            } else {
                let n = left - left % ss as usize;
                f(pos, done..done + n, true)?;
                done += n;
            }
        }
        Ok(())
    }

    /// Writes part of one sector: read, decrypt, patch, encrypt, write. The caller holds the
    /// exclusive lock.
    fn patch_sector(&self, data: &[u8], pos: u64) -> Result<()> {
        let ss = self.sector();
        let start = pos - pos % ss;
        let mut sector = vec![0u8; ss as usize];
        self.read_sectors(&mut sector, start)?;
        let at = (pos - start) as usize;
        sector[at..at + data.len()].copy_from_slice(data);
        self.write_sectors(&sector, start)
    }
}

impl BlockDev for Luks {
    fn capabilities(&self) -> Capabilities {
        let ss = self.volume.sector_size();
        Capabilities {
            size: self.size,
            min_block: ss,
            preferred_block: ss.max(4096),
            read_only: self.read_only,
            discard_granularity: ss,
            zero_granularity: ss,
            flush_persists: self.data.capabilities().flush_persists,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let ss = self.sector();
        self.pieces(offset, buf.len(), |pos, range, whole| {
            if whole {
                return self.read_sectors(&mut buf[range], pos);
            }
            let start = pos - pos % ss;
            let mut sector = vec![0u8; ss as usize];
            self.read_sectors(&mut sector, start)?;
            let at = (pos - start) as usize;
            buf[range.clone()].copy_from_slice(&sector[at..at + range.len()]);
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let ss = self.sector();
        let aligned = offset % ss == 0 && buf.len() as u64 % ss == 0;
        // A poisoned lock only means another writer panicked; the data path has no state to fix.
        if aligned {
            let _shared = self.rmw.read().unwrap_or_else(|e| e.into_inner());
            return self.write_sectors(buf, offset);
        }
        let _exclusive = self.rmw.write().unwrap_or_else(|e| e.into_inner());
        self.pieces(offset, buf.len(), |pos, range, whole| {
            if whole {
                self.write_sectors(&buf[range], pos)
            } else {
                self.patch_sector(&buf[range], pos)
            }
        })
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.data.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        check_range(&self.path, offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if flags.fast_only {
            return Err(Error::unsupported(
                &self.path,
                "an encrypted image can only write zeroes by encrypting them",
            ));
        }
        let zeros = vec![0u8; (len.min(WRITE_CHUNK as u64)) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(&self.path, offset, len, self.size)
    }

    fn parallel_writes(&self) -> bool {
        true
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(&self.path, offset, len, self.size)?;
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
        node_info(&self.path, &*self.data, self.size, self.volume.info())
    }
}

/// The `info` node of a LUKS image of `size` bytes stored in `data`, described by `luks`.
fn node_info(path: &Path, data: &dyn BlockDev, size: u64, luks: LuksInfo) -> Result<NodeInfo> {
    let below = data.info()?;
    // Over a raw file, qemu-img shows the file itself as the child.
    let file = match below.format.as_str() {
        "raw" => below
            .children
            .into_iter()
            .find(|c| c.name == "file")
            .map(|c| c.info),
        _ => Some(below),
    };
    let file = match file {
        Some(f) => f,
        None => {
            let f =
                std::fs::File::open(path).map_err(|e| Error::io(path, "cannot open file", e))?;
            file_node(path, &f)?
        }
    };
    // Struct update from the file node: fields LUKS has no use for keep their empty values.
    let base = file.clone();
    Ok(NodeInfo {
        filename: path.display().to_string(),
        format: "luks".to_string(),
        virtual_size: size,
        actual_size: file.actual_size,
        cluster_size: None,
        dirty_flag: false,
        encrypted: Some(true),
        backing: None,
        format_specific: Some(FormatSpecific::Luks(Box::new(luks))),
        children: vec![ChildInfo {
            name: "file".to_string(),
            info: file,
        }],
        ..base
    })
}
