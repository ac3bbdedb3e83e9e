//! LUKS2: two checksummed header copies with JSON metadata (keyslots, segments, digests, tokens,
//! config), key material in the keyslots area, one data segment.
//!
//! Reading picks the valid copy with the higher `seqid`; a damaged or stale copy is reported in
//! [`Luks2::damaged`] and [`Luks2::repair`] rewrites it. Every update rewrites both copies with
//! `seqid + 1`, primary first.

pub mod header;
pub mod json;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Map;
use zeroize::Zeroizing;

use super::af_split::AF_STRIPES;
use super::cipher::CipherSpec;
use super::hash::HashAlg;
use super::kdf::Kdf;
use super::keyslot::{ct_eq, key_digest, material_len};
use super::{random_bytes, HeaderIo};
use crate::error::{Error, Result};
use header::{BinHeader, HeaderCopy, BIN_HDR_LEN};
use json::{
    Af, Area, Config, Digest, KdfJson, Keyslot, Metadata, Problem, Segment, SegmentSize, U64Str,
    AREA_ALIGN, B64, MAX_KEYSLOTS,
};

/// Header copy size of new images (cryptsetup's default).
pub const NEW_HDR_SIZE: u64 = 0x4000;
/// Data offset of new images (cryptsetup's default, 16 MiB).
pub const NEW_DATA_OFFSET: u64 = 16 << 20;

/// A parsed LUKS2 header (the winning copy).
#[derive(Debug, Clone)]
pub struct Luks2 {
    pub bin: BinHeader,
    pub meta: Metadata,
    /// What is wrong with the other copy (damaged or stale), until repaired.
    pub damaged: Option<String>,
}

/// What a new LUKS2 header is made of.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub cipher: CipherSpec,
    pub sector_size: u32,
    pub kdf: Kdf,
    pub digest_hash: HashAlg,
    pub digest_iterations: u32,
    pub uuid: String,
}

fn problem(path: &Path, p: Problem) -> Error {
    match p {
        Problem::Invalid(w) => Error::invalid(path, w),
        Problem::Unsupported(w) => Error::unsupported(path, w),
    }
}

/// One copy read and parsed, or why it cannot be used.
type Parsed = std::result::Result<(HeaderCopy, Metadata), Problem>;

fn parse_copy(io: &dyn HeaderIo, offset: u64) -> Parsed {
    let copy = read_copy_problem(io, offset)?;
    let meta = json::parse(&copy.json, copy.bin.hdr_size)?;
    Ok((copy, meta))
}

fn read_copy_problem(io: &dyn HeaderIo, offset: u64) -> std::result::Result<HeaderCopy, Problem> {
    header::read_copy(io, offset).map_err(Problem::Invalid)
}

fn why(p: &Problem) -> &str {
    match p {
        Problem::Invalid(w) | Problem::Unsupported(w) => w,
    }
}

impl Luks2 {
    /// Reads both copies and keeps the newer valid one.
    pub fn read(io: &dyn HeaderIo) -> Result<Luks2> {
        let path = io.path();
        let primary = parse_copy(io, 0);
        let peek = header::peek_primary(io);
        let secondary = match header::find_secondary(io, peek.as_ref()) {
            Some(off) => parse_copy(io, off),
            None => Err(Problem::Invalid("no secondary header found".into())),
        };
        let (win, damaged) = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                if s.0.bin.seqid > p.0.bin.seqid {
                    let note = format!(
                        "primary LUKS2 header is stale (seqid {} < {})",
                        p.0.bin.seqid, s.0.bin.seqid
                    );
                    (s, Some(note))
                } else if s.0.bin.seqid < p.0.bin.seqid {
                    let note = format!(
                        "secondary LUKS2 header is stale (seqid {} < {})",
                        s.0.bin.seqid, p.0.bin.seqid
                    );
                    (p, Some(note))
                } else {
                    (p, None)
                }
            }
            (Ok(p), Err(e)) => (
                p,
                Some(format!("secondary LUKS2 header is damaged: {}", why(&e))),
            ),
            (Err(e), Ok(s)) => (
                s,
                Some(format!("primary LUKS2 header is damaged: {}", why(&e))),
            ),
            (Err(a), Err(b)) => {
                // A header that is intact but uses something not implemented says so.
                if let Problem::Unsupported(_) = a {
                    return Err(problem(path, a));
                }
                if let Problem::Unsupported(_) = b {
                    return Err(problem(path, b));
                }
                return Err(Error::invalid(
                    path,
                    format!(
                        "no valid LUKS2 header: primary: {}; secondary: {}",
                        why(&a),
                        why(&b)
                    ),
                ));
            }
        };
        let (copy, meta) = win;
        let l = Luks2 {
            bin: copy.bin,
            meta,
            damaged,
        };
        if io.size() < l.data_offset() {
            return Err(Error::invalid(
                path,
                format!(
                    "file is shorter than the LUKS2 data offset {}",
                    l.data_offset()
                ),
            ));
        }
        Ok(l)
    }

    /// Start of the data segment in bytes.
    pub fn data_offset(&self) -> u64 {
        self.meta.segment().1.offset.0
    }

    pub fn segment(&self) -> &Segment {
        self.meta.segment().1
    }

    /// Gives the data segment a new size and writes both copies (a new `seqid`).
    pub fn set_segment_size(&mut self, io: &dyn HeaderIo, size: SegmentSize) -> Result<()> {
        let (id, _) = self.meta.segment();
        if let Some(seg) = self.meta.segments.get_mut(&id) {
            seg.size = size;
        }
        self.update(io)
    }

    /// Rewrites both copies from the winning one, keeping its `seqid`.
    pub fn repair(&mut self, io: &dyn HeaderIo) -> Result<()> {
        self.store(io)?;
        self.damaged = None;
        Ok(())
    }

    /// Writes both copies with the current `seqid`: primary, flush, secondary, flush.
    fn store(&self, io: &dyn HeaderIo) -> Result<()> {
        let json = self.meta.to_json();
        if json.len() >= (self.bin.hdr_size as usize - BIN_HDR_LEN) {
            return Err(Error::argument(format!(
                "{}: LUKS2 metadata ({} bytes) does not fit in its {}-byte JSON area",
                io.path().display(),
                json.len(),
                self.bin.hdr_size as usize - BIN_HDR_LEN
            )));
        }
        for offset in [0, self.bin.hdr_size] {
            let mut salt = [0u8; 64];
            random_bytes(io.path(), &mut salt)?;
            io.write_at(&header::build_copy(&self.bin, &json, offset, &salt), offset)?;
            io.flush()?;
        }
        Ok(())
    }

    /// Bumps `seqid` and writes both copies.
    fn update(&mut self, io: &dyn HeaderIo) -> Result<()> {
        self.bin.seqid += 1;
        self.store(io)?;
        self.damaged = None;
        Ok(())
    }

    /// Keyslot ids in the order cryptsetup tries them: high priority first, then normal;
    /// `ignore` (priority 0) slots are skipped.
    fn unlock_order(&self) -> Vec<u32> {
        let mut ids: Vec<(u32, u32)> = self
            .meta
            .keyslots
            .iter()
            .map(|(&id, k)| (k.priority.unwrap_or(1), id))
            .filter(|&(p, _)| p > 0)
            .collect();
        ids.sort_by_key(|&(p, id)| (std::cmp::Reverse(p), id));
        ids.into_iter().map(|(_, id)| id).collect()
    }

    /// Whether `key` matches the segment's digest (through keyslot `id`'s digest).
    fn check_key(&self, id: u32, key: &[u8]) -> bool {
        let Some((_, d)) = self.meta.digest_for(id) else {
            return false;
        };
        let hash = HashAlg::from_name(&d.hash).expect("validated digest hash");
        let got = key_digest(hash, key, &d.salt.0, d.iterations, d.digest.0.len());
        ct_eq(&got, &d.digest.0)
    }

    /// Tries keyslot `id`; `Some(volume key)` when the passphrase opens it.
    pub fn try_slot(
        &self,
        io: &dyn HeaderIo,
        id: u32,
        passphrase: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(k) = self.meta.keyslots.get(&id) else {
            return Ok(None);
        };
        if self.meta.digest_for(id).is_none() {
            return Ok(None);
        }
        let crypto = self.meta.slot_crypto(id);
        let mut material =
            Zeroizing::new(vec![0u8; material_len(k.key_size as usize, k.af.stripes)]);
        io.read_at(&mut material, k.area.offset.0)?;
        let key = crypto.open(io.path(), passphrase, &material, k.key_size as usize)?;
        Ok(self.check_key(id, &key).then_some(key))
    }

    /// Finds the volume key; `None` for a wrong passphrase.
    pub fn unlock(
        &self,
        io: &dyn HeaderIo,
        passphrase: &[u8],
    ) -> Result<Option<(Zeroizing<Vec<u8>>, u32)>> {
        for id in self.unlock_order() {
            if let Some(key) = self.try_slot(io, id, passphrase)? {
                return Ok(Some((key, id)));
            }
        }
        Ok(None)
    }

    /// Builds the header of a new image for `volume_key` with no keyslot yet (cryptsetup's
    /// default layout: 16 KiB copies, keyslots up to 16 MiB, data at 16 MiB). Nothing is written.
    pub fn new(path: &Path, p: &CreateParams, volume_key: &[u8]) -> Result<Luks2> {
        let mut salt = vec![0u8; 32];
        random_bytes(path, &mut salt)?;
        let digest = key_digest(
            p.digest_hash,
            volume_key,
            &salt,
            p.digest_iterations,
            p.digest_hash.output_len(),
        );
        let segment = Segment {
            kind: "crypt".into(),
            offset: U64Str(NEW_DATA_OFFSET),
            size: SegmentSize::Dynamic,
            iv_tweak: U64Str(0),
            encryption: p.cipher.luks2_encryption(),
            sector_size: p.sector_size,
            integrity: None,
            flags: None,
            extra: Map::new(),
        };
        let digest = Digest {
            kind: "pbkdf2".into(),
            keyslots: Vec::new(),
            segments: vec!["0".into()],
            hash: p.digest_hash.name().into(),
            iterations: p.digest_iterations,
            salt: B64(salt),
            digest: B64(digest.to_vec()),
            extra: Map::new(),
        };
        let meta = Metadata {
            keyslots: BTreeMap::new(),
            tokens: BTreeMap::new(),
            segments: BTreeMap::from([(0, segment)]),
            digests: BTreeMap::from([(0, digest)]),
            config: Config {
                json_size: U64Str(NEW_HDR_SIZE - BIN_HDR_LEN as u64),
                keyslots_size: U64Str(NEW_DATA_OFFSET - 2 * NEW_HDR_SIZE),
                flags: None,
                requirements: None,
                extra: Map::new(),
            },
            extra: Map::new(),
        };
        Ok(Luks2 {
            bin: BinHeader {
                hdr_size: NEW_HDR_SIZE,
                seqid: 0,
                label: String::new(),
                checksum_alg: HashAlg::Sha256,
                salt: [0; 64],
                uuid: p.uuid.clone(),
                subsystem: String::new(),
                hdr_offset: 0,
            },
            meta,
            damaged: None,
        })
    }

    /// The lowest free, aligned place for `size` bytes in the keyslots area.
    fn free_area(&self, size: u64) -> Option<u64> {
        let start = self.meta.keyslots_start(self.bin.hdr_size);
        let end = start + self.meta.config.keyslots_size.0;
        let mut used: Vec<(u64, u64)> = self
            .meta
            .keyslots
            .values()
            .map(|k| (k.area.offset.0, k.area.offset.0 + k.area.size.0))
            .collect();
        used.sort_unstable();
        let mut at = start;
        for (a, b) in used {
            if at + size <= a {
                break;
            }
            at = at.max(b.div_ceil(AREA_ALIGN) * AREA_ALIGN);
        }
        (at + size <= end).then_some(at)
    }

    /// Stores `volume_key` behind `passphrase` in keyslot `id` (or the lowest free one) using
    /// `kdf`: the key material first, then the header. Returns the keyslot id.
    pub fn add_keyslot(
        &mut self,
        io: &dyn HeaderIo,
        id: Option<u32>,
        passphrase: &[u8],
        volume_key: &[u8],
        kdf: Kdf,
    ) -> Result<u32> {
        let path = io.path();
        let id = match id {
            Some(id) if id >= MAX_KEYSLOTS => {
                return Err(Error::argument(format!(
                    "Invalid keyslot {id}: LUKS2 has keyslots 0 to {}",
                    MAX_KEYSLOTS - 1
                )))
            }
            Some(id) if self.meta.keyslots.contains_key(&id) => {
                return Err(Error::argument(format!("LUKS2 keyslot {id} is in use")))
            }
            Some(id) => id,
            None => (0..MAX_KEYSLOTS)
                .find(|i| !self.meta.keyslots.contains_key(i))
                .ok_or_else(|| Error::argument("Can't add a keyslot - all keyslots are in use"))?,
        };
        let cipher = self
            .meta
            .segment_cipher(volume_key.len())
            .map_err(|e| Error::unsupported(path, e))?;
        let key_size = volume_key.len() as u32;
        let size =
            (material_len(volume_key.len(), AF_STRIPES) as u64).div_ceil(AREA_ALIGN) * AREA_ALIGN;
        let offset = self.free_area(size).ok_or_else(|| {
            Error::argument(format!(
                "{}: no room in the LUKS2 keyslots area for another keyslot",
                path.display()
            ))
        })?;
        let mut salt = vec![0u8; 32];
        random_bytes(path, &mut salt)?;
        let seg_digest = self.meta.digest_for_segment();
        let af_hash = self.meta.digests[&seg_digest].hash.clone();
        let slot = Keyslot {
            kind: "luks2".into(),
            key_size,
            af: Af {
                kind: "luks1".into(),
                stripes: AF_STRIPES,
                hash: af_hash,
            },
            area: Area {
                kind: "raw".into(),
                offset: U64Str(offset),
                size: U64Str(size),
                encryption: cipher.luks2_encryption(),
                key_size,
            },
            kdf: KdfJson::from_kdf(kdf, salt),
            priority: None,
            extra: Map::new(),
        };
        let mut next = self.clone();
        next.meta.keyslots.insert(id, slot);
        let material = next
            .meta
            .slot_crypto(id)
            .seal(path, passphrase, volume_key)?;
        io.write_at(&material, offset)?;
        io.flush()?;
        next.meta
            .digests
            .get_mut(&seg_digest)
            .expect("segment digest exists")
            .keyslots
            .push(id.to_string());
        next.update(io)?;
        *self = next;
        Ok(id)
    }

    /// Removes keyslot `id`: the header first, then its area is overwritten with random bytes.
    pub fn remove_keyslot(&mut self, io: &dyn HeaderIo, id: u32) -> Result<()> {
        let mut next = self.clone();
        let Some(k) = next.meta.keyslots.remove(&id) else {
            return Err(Error::argument(format!("LUKS2 keyslot {id} is not in use")));
        };
        let name = id.to_string();
        for d in next.meta.digests.values_mut() {
            d.keyslots.retain(|k| *k != name);
        }
        for t in next.meta.tokens.values_mut() {
            if let Some(a) = t.get_mut("keyslots").and_then(|a| a.as_array_mut()) {
                a.retain(|k| k.as_str() != Some(&name));
            }
        }
        next.update(io)?;
        *self = next;
        let mut junk = vec![0u8; k.area.size.0 as usize];
        random_bytes(io.path(), &mut junk)?;
        io.write_at(&junk, k.area.offset.0)?;
        io.flush()
    }

    /// Writes a header made by [`Luks2::new`] (both copies, seqid 1).
    pub fn store_new(&mut self, io: &dyn HeaderIo) -> Result<()> {
        self.update(io)
    }
}

impl Metadata {
    /// The id of the digest that covers the segment (validated to exist).
    fn digest_for_segment(&self) -> u32 {
        let seg = self.segment().0.to_string();
        self.digests
            .iter()
            .find(|(_, d)| d.segments.contains(&seg))
            .map(|(id, _)| *id)
            .expect("validated: the segment has a digest")
    }
}
