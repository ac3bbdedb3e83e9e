//! LUKS1: the 592-byte big-endian `phdr`, eight key slots, and the layout QEMU creates.
//!
//! ```text
//!   0    magic "LUKS\xba\xbe"   6  u16 version = 1
//!   8    cipher_name[32]        40 cipher_mode[32]      72 hash_spec[32]
//!   104  u32 payload_offset (512-byte sectors)          108 u32 key_bytes
//!   112  mk_digest[20]          132 mk_digest_salt[32]  164 u32 mk_digest_iterations
//!   168  uuid[40]
//!   208  8 key slots of 48 bytes: u32 active, u32 iterations, salt[32],
//!        u32 key_material_offset (sectors), u32 stripes
//! ```
//!
//! A slot's key material is `key_bytes * stripes` bytes (rounded up to sectors) at its offset,
//! encrypted with the header's cipher under `PBKDF2(hash_spec, passphrase, salt, iterations)`.
//! The volume key is the one whose `PBKDF2(hash_spec, key, mk_digest_salt, mk_digest_iterations,
//! 20)` equals `mk_digest`. (LUKS On-Disk Format Specification 1.2.3, sections 2 and 3.)

use std::path::Path;

use zeroize::Zeroizing;

use super::af_split::AF_STRIPES;
use super::cipher::{CipherSpec, IV_UNIT};
use super::hash::HashAlg;
use super::kdf::{Kdf, MAX_PBKDF2_ITERATIONS};
use super::keyslot::{ct_eq, key_digest, material_len, SlotCrypto};
use super::{c_string, put_c_string, random_bytes, HeaderIo, MAGIC};
use crate::error::{Error, Result};

/// Size of the LUKS1 header.
pub const PHDR_LEN: usize = 592;
/// Number of key slots.
pub const NUM_SLOTS: usize = 8;
/// Longest volume key accepted (AES-256-XTS); bounds the key material read per slot.
pub const MAX_KEY_BYTES: usize = 64;

const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 20;
const SLOTS_AT: usize = 208;
const SLOT_LEN: usize = 48;
/// Key material areas and the payload start on 4096-byte boundaries (8 sectors), as QEMU and
/// cryptsetup lay them out.
const ALIGN_SECTORS: u32 = 8;

/// One LUKS1 key slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the header start.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A parsed and validated LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher: CipherSpec,
    pub hash: HashAlg,
    /// The strings as stored, kept so a rewrite does not change their spelling.
    cipher_name: String,
    cipher_mode: String,
    hash_spec: String,
    /// Start of the encrypted data, in 512-byte sectors.
    pub payload_offset: u32,
    pub key_bytes: u32,
    pub mk_digest: [u8; DIGEST_LEN],
    pub mk_salt: [u8; SALT_LEN],
    pub mk_iterations: u32,
    pub uuid: String,
    pub slots: [Slot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Key material offsets (sectors) of the eight slots and the payload offset, for a key of
/// `key_bytes`: slot 0 at 4096 bytes, each area rounded up to 4096 bytes, the payload right
/// after slot 7 (QEMU's layout; cryptsetup adds alignment to 1 MiB).
pub fn layout(key_bytes: usize) -> ([u32; NUM_SLOTS], u32) {
    let area = (material_len(key_bytes, AF_STRIPES) as u32).div_ceil(IV_UNIT as u32);
    let area = area.div_ceil(ALIGN_SECTORS) * ALIGN_SECTORS;
    let mut offs = [0u32; NUM_SLOTS];
    for (i, o) in offs.iter_mut().enumerate() {
        *o = ALIGN_SECTORS + i as u32 * area;
    }
    (offs, ALIGN_SECTORS + NUM_SLOTS as u32 * area)
}

impl Header {
    /// Parses and validates the header in `buf` (at least [`PHDR_LEN`] bytes) of an area of
    /// `area_len` bytes (the file, or the qcow2 header clusters).
    pub fn parse(path: &Path, buf: &[u8], area_len: u64) -> Result<Header> {
        if buf.len() < PHDR_LEN || &buf[..6] != MAGIC {
            return Err(Error::invalid(path, "not a LUKS header (bad magic)"));
        }
        let version = u16::from_be_bytes([buf[6], buf[7]]);
        if version != 1 {
            return Err(Error::invalid(
                path,
                format!("LUKS version {version} is not LUKS1"),
            ));
        }
        let string = |at: usize, len: usize, what: &str| {
            c_string(&buf[at..at + len]).ok_or_else(|| {
                Error::corrupt(
                    path,
                    at as u64,
                    format!("LUKS1 {what} is not a NUL-terminated string"),
                )
            })
        };
        let cipher_name = string(8, 32, "cipher name")?;
        let cipher_mode = string(40, 32, "cipher mode")?;
        let hash_spec = string(72, 32, "hash spec")?;
        let uuid = string(168, 40, "uuid")?;
        let payload_offset = be32(buf, 104);
        let key_bytes = be32(buf, 108);
        if key_bytes == 0 || key_bytes as usize > MAX_KEY_BYTES {
            return Err(Error::corrupt(
                path,
                108,
                format!(
                    "LUKS1 key size of {key_bytes} bytes is not valid (at most {MAX_KEY_BYTES})"
                ),
            ));
        }
        let cipher = CipherSpec::from_luks1(&cipher_name, &cipher_mode, key_bytes as usize)
            .map_err(|e| Error::unsupported(path, e))?;
        let hash = HashAlg::from_name(&hash_spec).ok_or_else(|| {
            Error::unsupported(path, format!("LUKS1 hash '{hash_spec}' is not supported"))
        })?;
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&buf[112..132]);
        let mut mk_salt = [0u8; SALT_LEN];
        mk_salt.copy_from_slice(&buf[132..164]);
        let mk_iterations = be32(buf, 164);
        check_iterations(path, 164, "master key digest", mk_iterations)?;
        if payload_offset == 0 {
            return Err(Error::unsupported(
                path,
                "LUKS1 image with a detached header (payload offset 0) is not supported",
            ));
        }
        let slots: [Slot; NUM_SLOTS] = std::array::from_fn(|i| {
            let s = &buf[SLOTS_AT + i * SLOT_LEN..SLOTS_AT + (i + 1) * SLOT_LEN];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            Slot {
                active: be32(s, 0) == SLOT_ACTIVE,
                iterations: be32(s, 4),
                salt,
                key_offset: be32(s, 40),
                stripes: be32(s, 44),
            }
        });
        let header = Header {
            cipher,
            hash,
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots,
        };
        header.check_slots(path, buf, area_len)?;
        Ok(header)
    }

    /// Slot states, stripes, iteration counts and key material placement (no overlaps with the
    /// header, each other or the payload; inside the area).
    fn check_slots(&self, path: &Path, buf: &[u8], area_len: u64) -> Result<()> {
        let mat = material_len(self.key_bytes as usize, AF_STRIPES) as u64;
        let payload = u64::from(self.payload_offset) * IV_UNIT as u64;
        let mut areas = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            let at = (SLOTS_AT + i * SLOT_LEN) as u64;
            let state = be32(buf, at as usize);
            if state != SLOT_ACTIVE && state != SLOT_DISABLED {
                return Err(Error::corrupt(
                    path,
                    at,
                    format!("LUKS1 key slot {i} has an invalid state {state:#x}"),
                ));
            }
            if s.stripes != AF_STRIPES {
                return Err(Error::corrupt(
                    path,
                    at + 44,
                    format!(
                        "LUKS1 key slot {i} has {} stripes (must be {AF_STRIPES})",
                        s.stripes
                    ),
                ));
            }
            if s.active {
                check_iterations(path, at + 4, &format!("key slot {i}"), s.iterations)?;
            }
            let start = u64::from(s.key_offset) * IV_UNIT as u64;
            let end = start + mat;
            if start < PHDR_LEN as u64 || end > payload || end > area_len {
                return Err(Error::corrupt(
                    path,
                    at + 40,
                    format!(
                        "LUKS1 key slot {i} material at {start:#x}..{end:#x} is outside the key \
                         area (header end {PHDR_LEN:#x}, payload {payload:#x}, file {area_len:#x})"
                    ),
                ));
            }
            if let Some(j) = areas.iter().position(|&(a, b)| start < b && a < end) {
                return Err(Error::corrupt(
                    path,
                    at + 40,
                    format!("LUKS1 key slots {j} and {i} have overlapping key material"),
                ));
            }
            areas.push((start, end));
        }
        Ok(())
    }

    /// Reads and validates the header at the start of `io`.
    pub fn read(io: &dyn HeaderIo) -> Result<Header> {
        let mut buf = vec![0u8; PHDR_LEN];
        if io.size() < PHDR_LEN as u64 {
            return Err(Error::invalid(
                io.path(),
                "file is too small for a LUKS header",
            ));
        }
        io.read_at(&mut buf, 0)?;
        Header::parse(io.path(), &buf, io.size())
    }

    /// The header's 592 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; PHDR_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_c_string(&mut b[8..40], &self.cipher_name);
        put_c_string(&mut b[40..72], &self.cipher_mode);
        put_c_string(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_salt);
        b[164..168].copy_from_slice(&self.mk_iterations.to_be_bytes());
        put_c_string(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = &mut b[SLOTS_AT + i * SLOT_LEN..SLOTS_AT + (i + 1) * SLOT_LEN];
            let state = if s.active { SLOT_ACTIVE } else { SLOT_DISABLED };
            o[0..4].copy_from_slice(&state.to_be_bytes());
            o[4..8].copy_from_slice(&s.iterations.to_be_bytes());
            o[8..40].copy_from_slice(&s.salt);
            o[40..44].copy_from_slice(&s.key_offset.to_be_bytes());
            o[44..48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    fn write(&self, io: &dyn HeaderIo) -> Result<()> {
        io.write_at(&self.to_bytes(), 0)?;
        io.flush()
    }

    fn slot_crypto(&self, i: usize) -> SlotCrypto {
        let s = &self.slots[i];
        SlotCrypto {
            kdf: Kdf::Pbkdf2 {
                hash: self.hash,
                iterations: s.iterations,
            },
            salt: s.salt.to_vec(),
            area_cipher: self.cipher,
            af_hash: self.hash,
            stripes: s.stripes,
        }
    }

    fn material_len(&self) -> usize {
        material_len(self.key_bytes as usize, AF_STRIPES)
    }

    /// Whether `key` is the volume key.
    pub fn is_volume_key(&self, key: &[u8]) -> bool {
        let d = key_digest(
            self.hash,
            key,
            &self.mk_salt,
            self.mk_iterations,
            DIGEST_LEN,
        );
        ct_eq(&d, &self.mk_digest)
    }

    /// Tries one active slot; `Some(volume key)` when the passphrase opens it.
    pub fn try_slot(
        &self,
        io: &dyn HeaderIo,
        i: usize,
        passphrase: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let s = &self.slots[i];
        if !s.active {
            return Ok(None);
        }
        let mut material = Zeroizing::new(vec![0u8; self.material_len()]);
        io.read_at(&mut material, u64::from(s.key_offset) * IV_UNIT as u64)?;
        let key =
            self.slot_crypto(i)
                .open(io.path(), passphrase, &material, self.key_bytes as usize)?;
        Ok(self.is_volume_key(&key).then_some(key))
    }

    /// Finds the volume key: tries every active slot in order. `None` for a wrong passphrase.
    pub fn unlock(
        &self,
        io: &dyn HeaderIo,
        passphrase: &[u8],
    ) -> Result<Option<(Zeroizing<Vec<u8>>, usize)>> {
        for i in 0..NUM_SLOTS {
            if let Some(key) = self.try_slot(io, i, passphrase)? {
                return Ok(Some((key, i)));
            }
        }
        Ok(None)
    }

    /// A new header for `volume_key` with no active slot, laid out as [`layout`] says.
    pub fn new(
        path: &Path,
        cipher: CipherSpec,
        hash: HashAlg,
        volume_key: &[u8],
        mk_iterations: u32,
        uuid: String,
    ) -> Result<Header> {
        let (offsets, payload_offset) = layout(cipher.key_bytes);
        let mut mk_salt = [0u8; SALT_LEN];
        random_bytes(path, &mut mk_salt)?;
        let digest = key_digest(hash, volume_key, &mk_salt, mk_iterations, DIGEST_LEN);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&digest);
        Ok(Header {
            cipher,
            hash,
            cipher_name: cipher.luks_cipher_name().to_string(),
            cipher_mode: cipher.luks_cipher_mode(),
            hash_spec: hash.name().to_string(),
            payload_offset,
            key_bytes: cipher.key_bytes as u32,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid,
            slots: std::array::from_fn(|i| Slot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: offsets[i],
                stripes: AF_STRIPES,
            }),
        })
    }

    /// Stores `volume_key` behind `passphrase` in slot `i` with `iterations` PBKDF2 rounds: the
    /// key material first, then the header that activates it.
    pub fn set_slot(
        &mut self,
        io: &dyn HeaderIo,
        i: usize,
        passphrase: &[u8],
        volume_key: &[u8],
        iterations: u32,
    ) -> Result<()> {
        let mut salt = [0u8; SALT_LEN];
        random_bytes(io.path(), &mut salt)?;
        let mut slot = self.slots[i].clone();
        slot.salt = salt;
        slot.iterations = iterations;
        slot.active = true;
        let old = std::mem::replace(&mut self.slots[i], slot);
        let material = self.slot_crypto(i).seal(io.path(), passphrase, volume_key);
        let stored = material.and_then(|m| {
            io.write_at(&m, u64::from(self.slots[i].key_offset) * IV_UNIT as u64)?;
            io.flush()?;
            self.write(io)
        });
        if stored.is_err() {
            self.slots[i] = old;
        }
        stored
    }

    /// Deactivates slot `i`: the header first, then its key material is overwritten with random
    /// bytes.
    pub fn erase_slot(&mut self, io: &dyn HeaderIo, i: usize) -> Result<()> {
        let old = self.slots[i].clone();
        self.slots[i].active = false;
        self.slots[i].iterations = 0;
        self.slots[i].salt = [0; SALT_LEN];
        if let Err(e) = self.write(io) {
            self.slots[i] = old;
            return Err(e);
        }
        let mut junk = vec![0u8; self.material_len()];
        random_bytes(io.path(), &mut junk)?;
        io.write_at(&junk, u64::from(old.key_offset) * IV_UNIT as u64)?;
        io.flush()
    }

    /// Writes the whole header (after a new header was built with [`Header::new`]).
    pub fn store(&self, io: &dyn HeaderIo) -> Result<()> {
        self.write(io)
    }
}

fn check_iterations(path: &Path, at: u64, what: &str, n: u32) -> Result<()> {
    if n == 0 || n > MAX_PBKDF2_ITERATIONS {
        return Err(Error::corrupt(
            path,
            at,
            format!(
                "LUKS1 {what} iteration count {n} is out of range (1 to {MAX_PBKDF2_ITERATIONS})"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_qemu_for_a_512_bit_key() {
        // qemu-img info of a default LUKS image: key offsets 4096, 262144, ... payload 2068480.
        let (offs, payload) = layout(64);
        assert_eq!(u64::from(offs[0]) * 512, 4096);
        assert_eq!(u64::from(offs[1]) * 512, 262144);
        assert_eq!(u64::from(offs[7]) * 512, 1810432);
        assert_eq!(u64::from(payload) * 512, 2068480);
    }
}
