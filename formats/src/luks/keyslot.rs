//! Keyslots, common to LUKS1 and LUKS2: a KDF turns the passphrase into a key for the slot's area
//! cipher, which encrypts the AF-split volume key; a PBKDF2 digest tells the right volume key from
//! a wrong one.
//!
//! ```text
//!   passphrase ──KDF(salt)──> slot key ──decrypt area (512-byte sectors, IVs from 0)──> stripes
//!   stripes ──AF merge──> candidate volume key ──PBKDF2(digest salt)──> compare with digest
//! ```

use std::path::Path;

use zeroize::Zeroizing;

use super::af_split;
use super::cipher::{CipherSpec, SectorCipher, IV_UNIT};
use super::hash::HashAlg;
use super::kdf::Kdf;
use crate::error::{Error, Result};

/// How one keyslot stores the volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCrypto {
    pub kdf: Kdf,
    pub salt: Vec<u8>,
    /// Cipher of the key material area; its `key_bytes` is the length the KDF produces.
    pub area_cipher: CipherSpec,
    pub af_hash: HashAlg,
    pub stripes: u32,
}

/// Bytes of key material a slot stores for a `key_len`-byte volume key: the AF stripes, padded to
/// whole 512-byte sectors.
pub fn material_len(key_len: usize, stripes: u32) -> usize {
    (key_len * stripes as usize).div_ceil(IV_UNIT) * IV_UNIT
}

impl SlotCrypto {
    fn slot_cipher(&self, path: &Path, passphrase: &[u8]) -> Result<SectorCipher> {
        let mut slot_key = Zeroizing::new(vec![0u8; self.area_cipher.key_bytes]);
        self.kdf
            .derive(passphrase, &self.salt, &mut slot_key)
            .map_err(|e| Error::invalid(path, e))?;
        SectorCipher::new(self.area_cipher, &slot_key).map_err(|e| Error::unsupported(path, e))
    }

    /// The candidate volume key stored in `material` (as read from the slot's area,
    /// [`material_len`] bytes) for this passphrase. A wrong passphrase gives a wrong key: check it
    /// against the digest.
    pub fn open(
        &self,
        path: &Path,
        passphrase: &[u8],
        material: &[u8],
        key_len: usize,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let cipher = self.slot_cipher(path, passphrase)?;
        let mut buf = Zeroizing::new(material.to_vec());
        cipher.decrypt(&mut buf, IV_UNIT, 0);
        Ok(af_split::merge(&buf, key_len, self.stripes, self.af_hash))
    }

    /// The encrypted key material that stores `volume_key` behind `passphrase`.
    pub fn seal(&self, path: &Path, passphrase: &[u8], volume_key: &[u8]) -> Result<Vec<u8>> {
        let split = af_split::split(volume_key, self.stripes, self.af_hash, |b| {
            super::random_bytes(path, b)
        })?;
        let mut buf = vec![0u8; material_len(volume_key.len(), self.stripes)];
        buf[..split.len()].copy_from_slice(&split);
        let cipher = self.slot_cipher(path, passphrase)?;
        cipher.encrypt(&mut buf, IV_UNIT, 0);
        Ok(buf)
    }
}

/// The PBKDF2 digest of a volume key that LUKS stores to recognise it.
pub fn key_digest(
    hash: HashAlg,
    key: &[u8],
    salt: &[u8],
    iterations: u32,
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; len]);
    hash.pbkdf2(key, salt, iterations, &mut out);
    out
}

/// Compares two byte strings without an early exit.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
