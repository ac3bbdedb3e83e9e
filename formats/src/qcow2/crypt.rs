//! Encrypted qcow2 images: `encrypt.format=luks`, `crypt_method` 2 (qcow2.rst, "Full disk
//! encryption header pointer" and "Data encryption").
//!
//! ```text
//!   header extension 0x0537be77: (offset, length) ──> LUKS1 header + key material, in clusters
//!                                                       │ unlocked with the passphrase
//!                                                       v
//!   data cluster at host offset H: 512-byte sectors, sector i encrypted with IV H / 512 + i
//! ```
//!
//! Only guest data in data clusters is encrypted, with the IV taken from the host offset (the
//! "physical disk sector", as QEMU does): metadata, zero flags and unallocated clusters stay
//! plain, and so do compressed clusters, which QEMU never encrypts (it refuses to write them, and
//! so does vdisk). Moving data to another host cluster (copy-on-write) decrypts and re-encrypts
//! it.
//!
//! Writes encrypt a private copy of the caller's data. A write that covers part of a sector reads,
//! decrypts, patches and re-encrypts that sector; it holds the `rmw` lock exclusively for the
//! whole request, while writes of whole sectors hold it shared, so a partial-sector update never
//! undoes a concurrent write to the rest of the sector. Reads take no lock.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::header::{crypt_method, ext, Header};
use super::{Meta, Qcow2};
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::info::LuksInfo;
use crate::luks::cipher::IV_UNIT;
use crate::luks::{
    with_scratch, HeaderIo, LuksAmend, LuksCreateOptions, LuksMetadata, LuksVolume, Passphrase,
};

/// Size of an encryption sector: the unit of the IVs and of read-modify-write.
pub(super) const SECTOR: u64 = IV_UNIT as u64;

/// Most bytes encrypted into one private buffer per step of a write.
const CHUNK: usize = 4 << 20;

/// What QEMU says when asked to compress into an encrypted image.
pub(super) const NO_COMPRESSION: &str = "Compression and encryption not supported at the same time";

/// Where the encryption header of an image lives (the extension's payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoArea {
    /// Byte offset in the image file (cluster aligned).
    pub offset: u64,
    /// Bytes of the written header; the clusters holding them are reserved for it.
    pub length: u64,
}

impl CryptoArea {
    /// Decodes the 16-byte payload of the extension, if it has that size.
    pub fn decode(data: &[u8]) -> Option<CryptoArea> {
        let data: &[u8; 16] = data.try_into().ok()?;
        Some(CryptoArea {
            offset: u64::from_be_bytes(data[..8].try_into().unwrap()),
            length: u64::from_be_bytes(data[8..].try_into().unwrap()),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        [self.offset.to_be_bytes(), self.length.to_be_bytes()].concat()
    }

    /// Clusters the header occupies.
    pub fn clusters(&self, cluster_size: u64) -> u64 {
        self.length.div_ceil(cluster_size)
    }
}

impl Header {
    /// The encryption header area named by the extension, when the extension is well formed
    /// (for walks over the image's clusters; [`crypto_area`] validates it for opening).
    pub fn crypto_area(&self) -> Option<CryptoArea> {
        self.extension(ext::CRYPTO).and_then(CryptoArea::decode)
    }
}

/// Validates the encryption fields of a header against the file: the method, and for LUKS the
/// header extension, whose area must be cluster aligned, after the first cluster and inside the
/// file. `None` for an unencrypted image. (QEMU's messages where it has them.)
pub fn crypto_area(path: &Path, h: &Header, file_len: u64) -> Result<Option<CryptoArea>> {
    let raw = h.extension(ext::CRYPTO);
    let bad = |what: String| Err(Error::invalid(path, what));
    match h.crypt_method {
        crypt_method::NONE if raw.is_some() => {
            return bad("CRYPTO header extension only expected with LUKS encryption method".into())
        }
        crypt_method::NONE => return Ok(None),
        crypt_method::AES => return Err(Error::unsupported(
            path,
            "the image uses legacy qcow2 AES encryption (crypt_method 1), which vdisk does not \
                 support; convert it to encrypt.format=luks with qemu-img",
        )),
        crypt_method::LUKS => {}
        n => {
            return Err(Error::unsupported(
                path,
                format!("Unsupported encryption method: {n}"),
            ))
        }
    }
    let Some(raw) = raw else {
        return bad("Missing CRYPTO header for crypt method 2".into());
    };
    let Some(area) = CryptoArea::decode(raw) else {
        return bad(format!(
            "CRYPTO header extension size {}, but expected size 16",
            raw.len()
        ));
    };
    let cs = h.cluster_size();
    if area.offset % cs != 0 {
        return bad(format!(
            "Encryption header offset '{}' is not a multiple of cluster size '{cs}'",
            area.offset
        ));
    }
    if area.offset == 0 {
        return bad("Encryption header at offset 0 overlaps the qcow2 header".into());
    }
    if area.length < crate::luks::luks1::PHDR_LEN as u64 {
        return bad(format!(
            "Encryption header length {} is too small for a LUKS header",
            area.length
        ));
    }
    if area
        .offset
        .checked_add(area.length)
        .is_none_or(|end| end > file_len)
    {
        return bad(format!(
            "Encryption header at offset {:#x} ({} bytes) reaches past the end of the file \
             ({file_len} bytes)",
            area.offset, area.length
        ));
    }
    Ok(Some(area))
}

/// The error of an encrypted image opened without a passphrase.
pub(super) fn secret_required(path: &Path) -> Error {
    Error::InvalidArgument {
        what: format!(
            "{}: Parameter 'encrypt.key-secret' is required for cipher",
            path.display()
        ),
    }
}

/// The encryption header area of a qcow2 file, as the LUKS code reads and writes it.
#[derive(Debug)]
pub(super) struct HeaderArea {
    file: Arc<HostFile>,
    area: CryptoArea,
    path: PathBuf,
}

impl HeaderArea {
    pub fn new(file: Arc<HostFile>, area: CryptoArea) -> HeaderArea {
        let path = file.path().to_path_buf();
        HeaderArea { file, area, path }
    }

    fn at(&self, offset: u64, len: usize) -> Result<u64> {
        crate::block::check_range(&self.path, offset, len as u64, self.area.length)?;
        Ok(self.area.offset + offset)
    }
}

impl HeaderIo for HeaderArea {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.at(offset, buf.len())?;
        self.file.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let at = self.at(offset, buf.len())?;
        self.file.write_at(buf, at)
    }

    fn size(&self) -> u64 {
        self.area.length
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The encryption state of an open image.
#[derive(Debug)]
pub(super) struct Crypt {
    keying: Keying,
    pub area: CryptoArea,
    /// Shared by writes of whole sectors, exclusive for writes that patch part of a sector.
    rmw: RwLock<()>,
    path: PathBuf,
}

/// Whether the key of an encrypted image is at hand.
#[derive(Debug)]
enum Keying {
    /// Unlocked with the passphrase: data can be read and written.
    Unlocked(Box<LuksVolume>),
    /// Opened for its metadata only (`info` without a passphrase, QEMU's `BDRV_O_NO_IO`): every
    /// access to encrypted data fails.
    Locked(Box<LuksMetadata>),
}

/// Held for the length of a write to an encrypted image (see the module docs).
pub(super) struct WriteGuard<'a> {
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _exclusive: Option<RwLockWriteGuard<'a, ()>>,
}

/// Fails for a LUKS header whose sectors are not qcow2's 512 bytes.
fn check_sector_size(path: &Path, sector_size: u32) -> Result<()> {
    if u64::from(sector_size) != SECTOR {
        return Err(Error::unsupported(
            path,
            format!(
                "the LUKS header of the qcow2 image uses {sector_size}-byte sectors; qcow2 \
                 encryption works on 512-byte sectors"
            ),
        ));
    }
    Ok(())
}

impl Crypt {
    fn new(file: &Arc<HostFile>, area: CryptoArea, keying: Keying) -> Crypt {
        Crypt {
            keying,
            area,
            rmw: RwLock::new(()),
            path: file.path().to_path_buf(),
        }
    }

    /// Unlocks the LUKS header in `area` of `file` with `passphrase`.
    pub fn unlock(
        file: &Arc<HostFile>,
        area: CryptoArea,
        passphrase: &Passphrase,
    ) -> Result<Crypt> {
        let io: Arc<dyn HeaderIo> = Arc::new(HeaderArea::new(file.clone(), area));
        let volume = LuksVolume::open(io, passphrase)?;
        check_sector_size(file.path(), volume.sector_size())?;
        Ok(Crypt::new(file, area, Keying::Unlocked(Box::new(volume))))
    }

    /// Reads the LUKS header in `area` of `file` for its metadata only, with no passphrase.
    pub fn locked(file: &Arc<HostFile>, area: CryptoArea) -> Result<Crypt> {
        let meta = LuksMetadata::read(&HeaderArea::new(file.clone(), area))?;
        check_sector_size(file.path(), meta.sector_size())?;
        Ok(Crypt::new(file, area, Keying::Locked(Box::new(meta))))
    }

    /// The unlocked volume; an image opened for its metadata only has none.
    fn volume(&self) -> Result<&LuksVolume> {
        match &self.keying {
            Keying::Unlocked(v) => Ok(v),
            Keying::Locked(_) => Err(secret_required(&self.path)),
        }
    }

    fn info(&self) -> LuksInfo {
        match &self.keying {
            Keying::Unlocked(v) => v.info(),
            Keying::Locked(m) => m.info(),
        }
    }

    /// Writes a new LUKS1 header with one keyslot into `area` of `file` (zeros there already).
    pub fn format(file: &Arc<HostFile>, area: CryptoArea, opts: &LuksCreateOptions) -> Result<()> {
        let io: Arc<dyn HeaderIo> = Arc::new(HeaderArea::new(file.clone(), area));
        LuksVolume::create(io, opts).map(drop)
    }

    /// The lock a write of `len` bytes at guest `offset` holds (a sector starts at the same
    /// offset in the guest and the host, as clusters are whole sectors).
    pub fn write_guard(&self, offset: u64, len: u64) -> WriteGuard<'_> {
        // A poisoned lock only means another writer panicked; it protects no state.
        if offset % SECTOR == 0 && len % SECTOR == 0 {
            WriteGuard {
                _shared: Some(self.rmw.read().unwrap_or_else(|e| e.into_inner())),
                _exclusive: None,
            }
        } else {
            WriteGuard {
                _shared: None,
                _exclusive: Some(self.rmw.write().unwrap_or_else(|e| e.into_inner())),
            }
        }
    }

    fn encrypt(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let cipher = self.volume()?.cipher();
        cipher.encrypt_par(buf, IV_UNIT, host / SECTOR);
        Ok(())
    }

    /// Encrypts `src` into `dst` for host offset `host`.
    fn encrypt_from(&self, src: &[u8], dst: &mut [u8], host: u64) -> Result<()> {
        let cipher = self.volume()?.cipher();
        cipher.encrypt_copy_par(src, dst, IV_UNIT, host / SECTOR);
        Ok(())
    }

    fn decrypt(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let cipher = self.volume()?.cipher();
        cipher.decrypt_par(buf, IV_UNIT, host / SECTOR);
        Ok(())
    }
}

/// Splits `len` bytes at host offset `host` into pieces inside one sector and runs of whole
/// sectors, and calls `f(host_offset, range_in_buffer, whole)` for each in order. A piece of a
/// sector lies in the same host cluster as the rest of the sector: clusters and subclusters are
/// whole sectors.
fn sector_pieces(
    host: u64,
    len: usize,
    mut f: impl FnMut(u64, std::ops::Range<usize>, bool) -> Result<()>,
) -> Result<()> {
    let mut done = 0usize;
    while done < len {
        let pos = host + done as u64;
        let within = (pos % SECTOR) as usize;
        let left = len - done;
        let (n, whole) = if within != 0 || (left as u64) < SECTOR {
            ((SECTOR as usize - within).min(left), false)
        } else {
            (left - left % SECTOR as usize, true)
        };
        f(pos, done..done + n, whole)?;
        done += n;
    }
    Ok(())
}

/// The size of the LUKS header of a new image whose options passed
/// [`super::CreateOptions::validate`]; fails when the passphrase was not resolved.
pub(super) fn check_create(opts: &LuksCreateOptions) -> Result<u64> {
    if opts.passphrase.is_none() {
        return Err(Error::argument(
            "Parameter 'encrypt.key-secret' is required for cipher",
        ));
    }
    Ok(LuksVolume::header_size(opts))
}

impl Qcow2 {
    /// Opens an image for its metadata only, as `info` describes it: read-only, backing file
    /// closed, and the LUKS header of an encrypted image read without a passphrase (QEMU's
    /// `BDRV_O_NO_IO`). Reading or writing encrypted data then fails with "Parameter
    /// 'encrypt.key-secret' is required for cipher".
    pub fn open_metadata(path: &Path) -> Result<Qcow2> {
        Self::open_keyed(path, true, None, super::Key::MetadataOnly)
    }

    /// Whether guest data is encrypted (`encrypt.format=luks`).
    pub fn is_encrypted(&self) -> bool {
        self.crypt.is_some()
    }

    /// The LUKS header of an encrypted image, as `info` shows it under `encrypt`.
    pub fn encryption_info(&self) -> Option<LuksInfo> {
        self.crypt.as_ref().map(Crypt::info)
    }

    /// Adds, replaces or erases key slots of an encrypted image ([`LuksAmend`], QEMU's
    /// `amend -o encrypt.*` semantics); needs a writable image.
    pub fn amend_encryption(&self, amend: &LuksAmend, force: bool) -> Result<()> {
        self.check_writable()?;
        let Some(c) = &self.crypt else {
            return Err(Error::argument(format!(
                "{}: the image is not encrypted: there are no key slots to change",
                self.path().display()
            )));
        };
        c.volume()?.amend(amend, force)
    }

    /// The lock a write of guest bytes `offset..offset+len` holds; none without encryption.
    pub(super) fn write_guard(&self, offset: u64, len: u64) -> Option<WriteGuard<'_>> {
        self.crypt.as_ref().map(|c| c.write_guard(offset, len))
    }

    /// Reads guest data stored at host offset `host` (any alignment), decrypted.
    pub(super) fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        if self.data_file_closed {
            return Err(Error::unsupported(
                self.path(),
                "the image was opened for its metadata only: its external data file is not open",
            ));
        }
        let file = self.data_io();
        let Some(c) = &self.crypt else {
            return file.read_at(buf, host);
        };
        sector_pieces(host, buf.len(), |pos, range, whole| {
            if whole {
                file.read_at(&mut buf[range.clone()], pos)?;
                c.decrypt(&mut buf[range], pos)?;
                return Ok(());
            }
            let (start, at) = (pos - pos % SECTOR, (pos % SECTOR) as usize);
            let mut sector = [0u8; SECTOR as usize];
            file.read_at(&mut sector, start)?;
            c.decrypt(&mut sector, start)?;
            buf[range.clone()].copy_from_slice(&sector[at..at + range.len()]);
            Ok(())
        })
    }

    /// Writes guest data at host offset `host` (any alignment), encrypted. The sectors it covers
    /// partly are read, patched and rewritten: the caller holds the write guard.
    pub(super) fn write_data(&self, buf: &[u8], host: u64) -> Result<()> {
        let Some(c) = &self.crypt else {
            return self.data_io().write_at(buf, host);
        };
        sector_pieces(host, buf.len(), |pos, range, whole| {
            if whole {
                return with_scratch(range.len().min(CHUNK), |scratch| {
                    let mut at = pos;
                    for piece in buf[range].chunks(CHUNK) {
                        let chunk = &mut scratch[..piece.len()];
                        c.encrypt_from(piece, chunk, at)?;
                        self.data_io().write_at(chunk, at)?;
                        at += piece.len() as u64;
                    }
                    Ok(())
                });
            }
            let (start, at) = (pos - pos % SECTOR, (pos % SECTOR) as usize);
            let mut sector = [0u8; SECTOR as usize];
            self.read_data(&mut sector, start)?;
            sector[at..at + range.len()].copy_from_slice(&buf[range]);
            c.encrypt(&mut sector, start)?;
            self.data_io().write_at(&sector, start)
        })
    }

    /// [`Qcow2::write_data`] after the metadata overlap check (see `write_checked`).
    pub(super) fn write_data_checked(&self, meta: &mut Meta, buf: &[u8], host: u64) -> Result<()> {
        if let Some(hit) = self.data_overlap(host, buf.len() as u64) {
            return Err(self.refuse_overlap(meta, hit));
        }
        self.write_data(buf, host)
    }

    /// Writes whole sectors of plaintext the caller owns at host offset `host`, encrypting them
    /// in place (the caller's buffer holds ciphertext afterwards).
    pub(super) fn write_owned_sectors(&self, buf: &mut [u8], host: u64) -> Result<()> {
        if let Some(c) = &self.crypt {
            debug_assert!(host % SECTOR == 0 && buf.len() as u64 % SECTOR == 0);
            c.encrypt(buf, host)?;
        }
        self.data_io().write_at(buf, host)
    }

    /// Fails when compressed clusters are asked of an encrypted image.
    pub(super) fn check_compression_allowed(&self) -> Result<()> {
        if self.crypt.is_some() {
            return Err(Error::unsupported(self.path(), NO_COMPRESSION));
        }
        Ok(())
    }
}

/// Adds, replaces or erases key slots of the encrypted qcow2 image at `path`, unlocked with
/// `secret` (`amend -o encrypt.state=...,encrypt.new-secret=...`). Build `amend` from the
/// `encrypt.*` pairs with [`amend_pairs`].
pub fn amend_encryption(
    path: &Path,
    secret: &Passphrase,
    amend: &LuksAmend,
    force: bool,
) -> Result<()> {
    let img = Qcow2::open_with_secret(path, false, None, Some(secret))?;
    img.amend_encryption(amend, force)?;
    use crate::block::BlockDev;
    img.flush()
}

/// Builds a key slot change from qcow2 `amend` options: the `encrypt.`-prefixed pairs
/// (`encrypt.state`, `encrypt.keyslot`, `encrypt.old-secret`, `encrypt.new-secret`,
/// `encrypt.iter-time`); `resolve` turns a secret object id into its passphrase. Pairs without the
/// prefix are refused (vdisk amends nothing else of a qcow2 image yet).
pub fn amend_pairs(
    pairs: &[(String, String)],
    resolve: &mut dyn FnMut(&str) -> Result<Passphrase>,
) -> Result<LuksAmend> {
    let mut inner = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        match k.strip_prefix("encrypt.") {
            Some("format") if v == "luks" => {}
            Some("format") => {
                return Err(Error::argument(
                    "Changing the encryption format is not supported",
                ))
            }
            Some(key) => inner.push((key.to_string(), v.clone())),
            None => return Err(Error::argument(format!("Invalid parameter '{k}'"))),
        }
    }
    LuksAmend::from_pairs(&inner, resolve).map_err(|e| match e {
        Error::InvalidArgument { what } => Error::InvalidArgument {
            what: what.replace("Parameter '", "Parameter 'encrypt."),
        },
        other => other,
    })
}

#[cfg(test)]
mod tests;
