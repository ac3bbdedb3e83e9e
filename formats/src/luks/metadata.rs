//! A LUKS header read but not unlocked: the data layout (cipher, payload offset, sector size) and
//! everything `info` shows, with no key material. This is QEMU's `BDRV_O_NO_IO` open of an
//! encrypted image: `qemu-img info` describes it without asking for the passphrase.
//!
//! [`super::LuksVolume`] is this plus the volume key.

use std::path::{Path, PathBuf};

use super::cipher::{CipherSpec, IV_UNIT};
use super::kdf::Kdf;
use super::luks1;
use super::luks2::{self, json::SegmentSize, Luks2};
use super::options::LuksVersion;
use super::{HeaderIo, MAGIC};
use crate::error::{Error, Result};
use crate::info::{Luks2Info, Luks2KeyslotInfo, LuksInfo, LuksSlotInfo};

/// The parsed header of either version.
#[derive(Debug, Clone)]
pub(super) enum Header {
    V1(luks1::Header),
    V2(Luks2),
}

/// Where and how the payload is encrypted: fixed for the life of an open volume (key slot changes
/// do not move it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub spec: CipherSpec,
    pub version: LuksVersion,
    /// Byte offset of the payload in the header area.
    pub payload_offset: u64,
    pub sector_size: u32,
    /// Added to every IV, in 512-byte units (LUKS2 `iv_tweak`).
    pub iv_tweak: u64,
    /// LUKS2 segments of fixed size.
    pub fixed_size: Option<u64>,
}

impl Layout {
    /// The layout a header describes; fails for a cipher vdisk does not implement.
    pub fn of(path: &Path, header: &Header) -> Result<Layout> {
        Ok(match header {
            Header::V1(h) => Layout {
                spec: h.cipher,
                version: LuksVersion::V1,
                payload_offset: u64::from(h.payload_offset) * IV_UNIT as u64,
                sector_size: IV_UNIT as u32,
                iv_tweak: 0,
                fixed_size: None,
            },
            Header::V2(h) => {
                let seg = h.segment();
                let spec = h
                    .meta
                    .segment_cipher(h.meta.volume_key_size())
                    .map_err(|e| Error::unsupported(path, e))?;
                Layout {
                    spec,
                    version: LuksVersion::V2,
                    payload_offset: seg.offset.0,
                    sector_size: seg.sector_size,
                    iv_tweak: seg.iv_tweak.0,
                    fixed_size: match seg.size {
                        SegmentSize::Fixed(n) => Some(n),
                        SegmentSize::Dynamic => None,
                    },
                }
            }
        })
    }

    /// Size of the data area of a standalone image whose file is `file_len` bytes: to the end of
    /// the file (whole sectors) or the fixed LUKS2 segment size.
    pub fn data_size(&self, path: &Path, file_len: u64) -> Result<u64> {
        let avail = file_len.saturating_sub(self.payload_offset);
        match self.fixed_size {
            Some(n) if n > avail => Err(Error::invalid(
                path,
                format!("LUKS2 data segment of {n} bytes reaches past the end of the file"),
            )),
            Some(n) => Ok(n),
            None => Ok(avail - avail % u64::from(self.sector_size)),
        }
    }
}

/// The LUKS version of the header at the start of `io`.
pub(super) fn header_version(io: &dyn HeaderIo) -> Result<u16> {
    let mut b = [0u8; 8];
    if io.size() < 8 {
        return Err(Error::invalid(
            io.path(),
            "file is too small for a LUKS header",
        ));
    }
    io.read_at(&mut b, 0)?;
    if &b[..6] != MAGIC {
        // A damaged LUKS2 primary may still have a good secondary.
        if luks2::header::find_secondary(io, None).is_some() {
            return Ok(2);
        }
        return Err(Error::invalid(io.path(), "not a LUKS image (bad magic)"));
    }
    Ok(u16::from_be_bytes([b[6], b[7]]))
}

/// Reads and validates the header in `io` (either version, no key needed).
pub(super) fn read_header(io: &dyn HeaderIo) -> Result<Header> {
    match header_version(io)? {
        1 => Ok(Header::V1(luks1::Header::read(io)?)),
        2 => {
            let h = Luks2::read(io)?;
            if h.meta.keyslots.is_empty() {
                return Err(Error::invalid(io.path(), "LUKS2 image has no keyslots"));
            }
            Ok(Header::V2(h))
        }
        v => Err(Error::unsupported(
            io.path(),
            format!("LUKS version {v} is not supported"),
        )),
    }
}

/// A LUKS header opened for its metadata only: what `info` needs, and no way to read the data.
#[derive(Debug, Clone)]
pub struct LuksMetadata {
    header: Header,
    layout: Layout,
    path: PathBuf,
}

impl LuksMetadata {
    /// Reads the header in `io` without unlocking it (no passphrase, no key derivation).
    pub fn read(io: &dyn HeaderIo) -> Result<LuksMetadata> {
        let header = read_header(io)?;
        let layout = Layout::of(io.path(), &header)?;
        Ok(LuksMetadata {
            header,
            layout,
            path: io.path().to_path_buf(),
        })
    }

    /// Size of one encryption sector.
    pub fn sector_size(&self) -> u32 {
        self.layout.sector_size
    }

    /// Size of the data area of a standalone image whose file is `file_len` bytes.
    pub fn data_size(&self, file_len: u64) -> Result<u64> {
        self.layout.data_size(&self.path, file_len)
    }

    /// The `format-specific` data of `info`.
    pub fn info(&self) -> LuksInfo {
        header_info(&self.layout, &self.header)
    }
}

/// The `format-specific` data of `info` for a header with this layout.
pub(super) fn header_info(layout: &Layout, header: &Header) -> LuksInfo {
    let spec = layout.spec;
    let mut info = LuksInfo {
        version: 1,
        cipher_alg: spec.qemu_cipher_alg(),
        cipher_mode: spec.qemu_cipher_mode().to_string(),
        ivgen_alg: spec.qemu_ivgen_alg().to_string(),
        ivgen_hash_alg: spec.qemu_ivgen_hash_alg().map(|h| h.name().to_string()),
        hash_alg: String::new(),
        detached_header: false,
        payload_offset: layout.payload_offset,
        master_key_iters: 0,
        uuid: String::new(),
        slots: Vec::new(),
        luks2: None,
    };
    match header {
        Header::V1(h) => {
            info.hash_alg = h.hash.name().to_string();
            info.master_key_iters = u64::from(h.mk_iterations);
            info.uuid = h.uuid.clone();
            info.slots = h
                .slots
                .iter()
                .map(|s| LuksSlotInfo {
                    active: s.active,
                    iters: s.active.then_some(u64::from(s.iterations)),
                    key_offset: u64::from(s.key_offset) * IV_UNIT as u64,
                    stripes: s.active.then_some(s.stripes),
                })
                .collect();
        }
        Header::V2(h) => luks2_info(h, &mut info),
    }
    info
}

fn luks2_info(h: &Luks2, info: &mut LuksInfo) {
    let seg = h.segment();
    let (digest_hash, digest_iters) = h
        .meta
        .digests
        .values()
        .next()
        .map(|d| (d.hash.clone(), u64::from(d.iterations)))
        .unwrap_or_default();
    info.version = 2;
    info.hash_alg = digest_hash;
    info.master_key_iters = digest_iters;
    info.uuid = h.bin.uuid.clone();
    let mut keyslots = Vec::new();
    for (&id, k) in &h.meta.keyslots {
        let kdf = h.meta.slot_crypto(id).kdf;
        let (iterations, memory_kib, parallel) = match kdf {
            Kdf::Pbkdf2 { iterations, .. } => (iterations, None, None),
            Kdf::Argon2 {
                time,
                memory_kib,
                lanes,
                ..
            } => (time, Some(memory_kib), Some(lanes)),
        };
        info.slots.push(LuksSlotInfo {
            active: true,
            iters: Some(u64::from(iterations)),
            key_offset: k.area.offset.0,
            stripes: Some(k.af.stripes),
        });
        keyslots.push(Luks2KeyslotInfo {
            id,
            kdf: kdf.name().to_string(),
            iterations,
            memory_kib,
            parallel,
            key_size: k.key_size,
            area_offset: k.area.offset.0,
            area_size: k.area.size.0,
            area_encryption: k.area.encryption.clone(),
            priority: k.priority.unwrap_or(1),
        });
    }
    info.luks2 = Some(Luks2Info {
        sector_size: seg.sector_size,
        iv_tweak: seg.iv_tweak.0,
        segment_size: match seg.size {
            SegmentSize::Fixed(n) => Some(n),
            SegmentSize::Dynamic => None,
        },
        label: h.bin.label.clone(),
        subsystem: h.bin.subsystem.clone(),
        seqid: h.bin.seqid,
        metadata_size: h.bin.hdr_size,
        keyslots_size: h.meta.config.keyslots_size.0,
        keyslots,
        tokens: h
            .meta
            .tokens
            .values()
            .filter_map(|t| t.get("type").and_then(|v| v.as_str()).map(String::from))
            .collect(),
        damaged_header: h.damaged.clone(),
    });
}
