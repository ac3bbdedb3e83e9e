//! Resizing a standalone LUKS image, as QEMU's `block_crypto_co_truncate` does: the header is
//! unlocked with the passphrase (qemu-img opens the image with its secret), then the file is
//! truncated to the payload offset plus the new size, with the preallocation mode passed to the
//! file. Nothing in the payload is encrypted: new space holds the file's zeros (or holes), which
//! read back as noise, as in QEMU.
//!
//! A LUKS2 data segment of fixed size (QEMU opens LUKS1 only) gets the new size in both header
//! copies; a `dynamic` one follows the file.

use std::path::Path;
use std::sync::Arc;

use super::luks2::{json::SegmentSize, Luks2};
use super::metadata::header_version;
use super::{DevRange, Luks, Passphrase};
use crate::block::BlockDev;
use crate::error::{Error, Result};
use crate::image::Preallocation;
use crate::raw::Raw;

/// Changes the virtual size of the LUKS image at `path` to `new_size` bytes; a smaller size
/// needs `shrink`. `passphrase` must unlock a key slot (the image is opened with it first, so a
/// wrong or missing one changes nothing).
pub fn resize(
    path: &Path,
    new_size: u64,
    shrink: bool,
    prealloc: Preallocation,
    passphrase: Option<&Passphrase>,
) -> Result<()> {
    let passphrase = passphrase.ok_or_else(|| super::secret_required(path))?;
    let luks = Luks::open(path, false, passphrase)?;
    let payload = luks.volume().payload_offset();
    let sector = u64::from(luks.volume().sector_size());
    let old_size = luks.size();
    drop(luks);
    if new_size < old_size && !shrink {
        return Err(Error::argument(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    let file_len = payload
        .checked_add(new_size)
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| Error::argument("The new size is too large"))?;
    let raw: Arc<dyn BlockDev> = Arc::new(Raw::open(path, false)?);
    let io = DevRange::new(raw.clone(), 0, raw.size(), path);
    if header_version(&io)? == 2 {
        let mut header = Luks2::read(&io)?;
        if let SegmentSize::Fixed(_) = header.segment().size {
            if new_size % sector != 0 {
                return Err(Error::argument(format!(
                    "{}: the new size of a LUKS2 data segment of fixed size must be a multiple \
                     of its {sector}-byte sectors",
                    path.display()
                )));
            }
            // Grow the file before the header names the larger segment; shrink it after.
            if file_len > raw.size() {
                Raw::resize(path, file_len, true, prealloc)?;
            }
            header.set_segment_size(&io, SegmentSize::Fixed(new_size))?;
        }
    }
    drop((io, raw));
    Raw::resize(path, file_len, true, prealloc)
}
