//! LUKS1 and LUKS2 encrypted images.
//!
//! ```text
//!   Luks (driver.rs, BlockDev) ──data I/O at payload offset──> Arc<dyn BlockDev> (raw file)
//!     │
//!     └─ LuksVolume (volume.rs): an unlocked header, its cipher, key slot management
//!          ├─ LuksMetadata (metadata.rs): the header read without a key (layout, `info`)
//!          ├─ luks1.rs: the 592-byte header, 8 key slots
//!          └─ luks2/: two binary headers (header.rs) + JSON metadata (json.rs)
//!               both use keyslot.rs ─ kdf.rs (PBKDF2, Argon2) ─ af_split.rs ─ cipher.rs (AES)
//!     HeaderIo: where the header lives (a whole file, or a byte range inside a qcow2 file)
//! ```
//!
//! The driver encrypts and decrypts per request, with no lock on the data path; large requests
//! are split across threads. Key material is wiped from memory when dropped (`zeroize`), and no
//! error message ever contains a passphrase.
//!
//! Specs: cryptsetup's "LUKS On-Disk Format Specification" 1.2.3 and "LUKS2 On-Disk Format
//! Specification" 1.1.x; sector IVs as dm-crypt computes them (512-byte units, plus `iv_tweak`).

pub mod af_split;
pub mod cipher;
mod driver;
pub mod hash;
pub mod kdf;
pub mod keyslot;
pub mod luks1;
pub mod luks2;
pub mod measure;
mod metadata;
mod options;
mod resize;
mod volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::block::BlockDev;
use crate::error::{Error, Result};

pub use driver::Luks;
pub use metadata::LuksMetadata;
pub use options::{
    amend_options_help, create_options_help, KeyslotState, LuksAmend, LuksCreateOptions,
    LuksVersion,
};
pub use resize::resize;
pub use volume::LuksVolume;

/// The magic both LUKS1 and the primary LUKS2 header start with.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// A passphrase (or key file contents): any bytes. Wiped from memory when the last clone is
/// dropped; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Passphrase(Arc<Zeroizing<Vec<u8>>>);

impl Passphrase {
    pub fn new(bytes: Vec<u8>) -> Passphrase {
        Passphrase(Arc::new(Zeroizing::new(bytes)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Passphrase {
    fn from(s: &str) -> Passphrase {
        Passphrase::new(s.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Passphrase {
    fn from(v: Vec<u8>) -> Passphrase {
        Passphrase::new(v)
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Where a LUKS header and its key material live. Offsets are relative to the start of the
/// header; the area is [`HeaderIo::size`] bytes long.
///
/// A standalone LUKS image uses [`DevRange`] over its whole file. qcow2 with `encrypt.format=luks`
/// implements this over the clusters its full-disk-encryption header extension names.
pub trait HeaderIo: Send + Sync + std::fmt::Debug {
    /// Reads `buf.len()` bytes at `offset`; fails past [`HeaderIo::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`; fails past [`HeaderIo::size`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Bytes available for the header and key material.
    fn size(&self) -> u64;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
    /// The image path, for error messages.
    fn path(&self) -> &Path;
}

/// A byte range of a block device used as a [`HeaderIo`].
#[derive(Debug)]
pub struct DevRange {
    dev: Arc<dyn BlockDev>,
    start: u64,
    len: u64,
    path: PathBuf,
}

impl DevRange {
    /// `len` bytes of `dev` starting at `start`.
    pub fn new(dev: Arc<dyn BlockDev>, start: u64, len: u64, path: &Path) -> DevRange {
        DevRange {
            dev,
            start,
            len,
            path: path.to_path_buf(),
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<u64> {
        crate::block::check_range(&self.path, offset, len as u64, self.len)?;
        Ok(self.start + offset)
    }
}

impl HeaderIo for DevRange {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.check(offset, buf.len())?;
        self.dev.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let at = self.check(offset, buf.len())?;
        self.dev.write_at(buf, at)
    }

    fn size(&self) -> u64 {
        self.len
    }

    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The error of a LUKS image opened without a passphrase, in QEMU's words.
pub fn secret_required(path: &Path) -> Error {
    Error::InvalidArgument {
        what: format!(
            "{}: Parameter 'key-secret' is required for cipher",
            path.display()
        ),
    }
}

/// Runs `f` on a scratch buffer of `len` bytes (contents unspecified) that this thread keeps
/// between calls, so encrypting writes neither allocate nor fault in fresh pages every time.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            f(&mut buf[..len])
        }
        // Only a nested call (an encrypted image inside another) finds it taken.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// Fills `buf` from the operating system's random source.
pub(crate) fn random_bytes(path: &Path, buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| {
        Error::io(
            path,
            "cannot read random bytes",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// A random (version 4) UUID in its usual text form.
pub(crate) fn new_uuid(path: &Path) -> Result<String> {
    let mut b = [0u8; 16];
    random_bytes(path, &mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Reads a NUL-terminated string from a fixed-size header field; `None` when the field has no
/// NUL or is not UTF-8.
pub(crate) fn c_string(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&b| b == 0)?;
    String::from_utf8(field[..end].to_vec()).ok()
}

/// Writes `s` into a fixed-size, NUL-padded header field (the caller checks it fits with a NUL).
pub(crate) fn put_c_string(field: &mut [u8], s: &str) {
    field.fill(0);
    field[..s.len()].copy_from_slice(s.as_bytes());
}
