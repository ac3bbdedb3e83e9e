//! Sector ciphers: AES in XTS or CBC mode with the `plain`, `plain64` and `essiv` IV generators, as
//! dm-crypt, cryptsetup and QEMU use them for LUKS key material and payload data.
//!
//! Data is processed in *sectors* (512 or 4096 bytes, one IV each). The IV numbering follows
//! dm-crypt without `iv_large_sectors`: it counts 512-byte units, so the sector starting at byte
//! `b` of a run whose first IV is `iv512` gets IV `iv512 + b / 512`, whatever the sector size. For
//! 512-byte sectors that is simply the sector index.
//!
//! AES comes from the RustCrypto `aes` crate, which picks AES-NI at run time; blocks go through
//! it in batches so the instructions pipeline. XTS and CBC-decryption of one sector are
//! parallel within the sector; large requests are also split across threads
//! ([`SectorCipher::encrypt_par`]).

use std::sync::OnceLock;

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};

use super::hash::HashAlg;

/// The unit the IV counts in, whatever the sector size (dm-crypt without `iv_large_sectors`).
pub const IV_UNIT: usize = 512;

/// Blocks handed to AES at once: enough for AES-NI to keep its pipeline full.
const BATCH: usize = 32;

/// Requests at least this long are split across threads. Smaller ones are not worth a thread
/// spawn: `convert`'s 1 MiB chunks already run on every CPU, and splitting them too made 512 MiB
/// written into a LUKS image take 168 ms instead of 137 (after key derivation, 2 CPUs).
const PARALLEL_MIN_BYTES: usize = 2 << 20;

/// Block cipher mode of a LUKS cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    Xts,
    Cbc,
}

/// IV generator of a LUKS cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The sector number, truncated to 32 bits, little endian.
    Plain,
    /// The sector number, 64 bits little endian.
    Plain64,
    /// The `plain64` IV encrypted with AES keyed by the hash of the volume key.
    Essiv(HashAlg),
}

/// A complete cipher description: AES with a mode, an IV generator and a key length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSpec {
    pub mode: CipherMode,
    pub ivgen: IvGen,
    /// Length of the whole key in bytes (both halves for XTS).
    pub key_bytes: usize,
}

impl CipherSpec {
    /// AES-256-XTS with `plain64` IVs: what qemu-img and cryptsetup create by default.
    pub const AES_256_XTS_PLAIN64: CipherSpec = CipherSpec {
        mode: CipherMode::Xts,
        ivgen: IvGen::Plain64,
        key_bytes: 64,
    };

    /// Parses LUKS1's `cipher_name` (`aes`) and `cipher_mode` (`xts-plain64`, `cbc-essiv:sha256`).
    /// The error says what is not supported.
    pub fn from_luks1(name: &str, mode: &str, key_bytes: usize) -> Result<CipherSpec, String> {
        if name != "aes" {
            return Err(format!(
                "cipher '{name}' is not supported (only aes is implemented)"
            ));
        }
        let (mode_name, iv_name) = mode.split_once('-').unwrap_or((mode, ""));
        let mode_v = match mode_name {
            "xts" => CipherMode::Xts,
            "cbc" => CipherMode::Cbc,
            _ => {
                return Err(format!(
                    "cipher mode '{mode}' is not supported (xts and cbc are implemented)"
                ))
            }
        };
        let ivgen = match iv_name.split_once(':') {
            None if iv_name == "plain" => IvGen::Plain,
            None if iv_name == "plain64" => IvGen::Plain64,
            Some(("essiv", hash)) => IvGen::Essiv(
                HashAlg::from_name(hash)
                    .ok_or_else(|| format!("ESSIV hash '{hash}' is not supported"))?,
            ),
            _ => {
                return Err(format!(
                    "IV generator in cipher mode '{mode}' is not supported (plain, plain64 and \
                     essiv are implemented)"
                ))
            }
        };
        let spec = CipherSpec {
            mode: mode_v,
            ivgen,
            key_bytes,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Parses a LUKS2 `encryption` string such as `aes-xts-plain64`.
    pub fn from_luks2(encryption: &str, key_bytes: usize) -> Result<CipherSpec, String> {
        match encryption.split_once('-') {
            Some((name, mode)) => CipherSpec::from_luks1(name, mode, key_bytes),
            None => Err(format!("encryption '{encryption}' is not supported")),
        }
    }

    /// Builds a spec from qemu-img's option values: `cipher-alg` (`aes-128`, `aes-192`,
    /// `aes-256`), `cipher-mode` (`xts`, `cbc`), `ivgen-alg` (`plain`, `plain64`, `essiv`) and
    /// `ivgen-hash-alg` (for essiv; sha256 when absent).
    pub fn from_qemu(
        cipher_alg: &str,
        cipher_mode: &str,
        ivgen_alg: &str,
        ivgen_hash: Option<HashAlg>,
    ) -> Result<CipherSpec, String> {
        let aes_bytes = match cipher_alg {
            "aes-128" => 16,
            "aes-192" => 24,
            "aes-256" => 32,
            _ => {
                return Err(format!(
                    "Cipher algorithm '{cipher_alg}' is not supported (aes-128, aes-192 and \
                     aes-256 are implemented)"
                ))
            }
        };
        let (mode, key_bytes) = match cipher_mode {
            "xts" => (CipherMode::Xts, aes_bytes * 2),
            "cbc" => (CipherMode::Cbc, aes_bytes),
            _ => {
                return Err(format!(
                    "Cipher mode '{cipher_mode}' is not supported (xts and cbc are implemented)"
                ))
            }
        };
        let ivgen = match ivgen_alg {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv(ivgen_hash.unwrap_or(HashAlg::Sha256)),
            _ => {
                return Err(format!(
                    "IV generator '{ivgen_alg}' is not supported (plain, plain64 and essiv are \
                     implemented)"
                ))
            }
        };
        let spec = CipherSpec {
            mode,
            ivgen,
            key_bytes,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        let aes = self.aes_key_bytes();
        let whole_ok = match self.mode {
            CipherMode::Xts => self.key_bytes % 2 == 0,
            CipherMode::Cbc => true,
        };
        if !whole_ok || !matches!(aes, 16 | 24 | 32) {
            return Err(format!(
                "key size of {} bits is not valid for aes-{}",
                self.key_bytes * 8,
                self.mode_name()
            ));
        }
        if let IvGen::Essiv(h) = self.ivgen {
            if !matches!(h.output_len(), 16 | 24 | 32) {
                return Err(format!(
                    "ESSIV hash '{h}' does not give a valid AES key length"
                ));
            }
        }
        Ok(())
    }

    /// Key length of one AES instance (half the key for XTS).
    pub fn aes_key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => self.key_bytes / 2,
            CipherMode::Cbc => self.key_bytes,
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            CipherMode::Xts => "xts",
            CipherMode::Cbc => "cbc",
        }
    }

    fn ivgen_name(&self) -> String {
        match self.ivgen {
            IvGen::Plain => "plain".to_string(),
            IvGen::Plain64 => "plain64".to_string(),
            IvGen::Essiv(h) => format!("essiv:{h}"),
        }
    }

    /// LUKS1 `cipher_name`.
    pub fn luks_cipher_name(&self) -> &'static str {
        "aes"
    }

    /// LUKS1 `cipher_mode`, e.g. `xts-plain64`.
    pub fn luks_cipher_mode(&self) -> String {
        format!("{}-{}", self.mode_name(), self.ivgen_name())
    }

    /// LUKS2 `encryption`, e.g. `aes-xts-plain64`.
    pub fn luks2_encryption(&self) -> String {
        format!("aes-{}", self.luks_cipher_mode())
    }

    /// qemu's `cipher-alg`, e.g. `aes-256`.
    pub fn qemu_cipher_alg(&self) -> String {
        format!("aes-{}", self.aes_key_bytes() * 8)
    }

    /// qemu's `cipher-mode`.
    pub fn qemu_cipher_mode(&self) -> &'static str {
        self.mode_name()
    }

    /// qemu's `ivgen-alg`.
    pub fn qemu_ivgen_alg(&self) -> &'static str {
        match self.ivgen {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }

    /// qemu's `ivgen-hash-alg` (essiv only).
    pub fn qemu_ivgen_hash_alg(&self) -> Option<HashAlg> {
        match self.ivgen {
            IvGen::Essiv(h) => Some(h),
            _ => None,
        }
    }
}

/// One AES key schedule of any key length. The `aes` crate wipes it when dropped.
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Aes128::new(GenericArray::from_slice(key))),
            24 => Aes::A192(Aes192::new(GenericArray::from_slice(key))),
            32 => Aes::A256(Aes256::new(GenericArray::from_slice(key))),
            n => unreachable!("AES key length {n} was validated by CipherSpec"),
        }
    }

    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }

    fn encrypt_u128(&self, v: u128) -> u128 {
        let mut b = [Block::from(v.to_le_bytes())];
        self.encrypt_blocks(&mut b);
        load(&b[0])
    }
}

fn load(b: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[..16]);
    u128::from_le_bytes(a)
}

fn store(b: &mut [u8], v: u128) {
    b[..16].copy_from_slice(&v.to_le_bytes());
}

/// Multiplies an XTS tweak by α in GF(2^128) (IEEE P1619 little-endian convention).
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

/// A keyed sector cipher. Thread-safe: `&self` methods may run on many threads at once.
pub struct SectorCipher {
    spec: CipherSpec,
    /// The data key (K1 for XTS).
    main: Aes,
    /// XTS: the tweak key K2.
    tweak: Option<Aes>,
    /// ESSIV: AES keyed by the hash of the whole key.
    essiv: Option<Aes>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Keys a cipher; `key` must be `spec.key_bytes` long.
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<SectorCipher, String> {
        spec.validate()?;
        if key.len() != spec.key_bytes {
            return Err(format!(
                "key is {} bytes, the cipher needs {}",
                key.len(),
                spec.key_bytes
            ));
        }
        let half = spec.aes_key_bytes();
        let (main, tweak) = match spec.mode {
            CipherMode::Xts => (Aes::new(&key[..half]), Some(Aes::new(&key[half..]))),
            CipherMode::Cbc => (Aes::new(key), None),
        };
        let essiv = match spec.ivgen {
            IvGen::Essiv(h) => Some(Aes::new(&h.digest(&[key]))),
            _ => None,
        };
        Ok(SectorCipher {
            spec,
            main,
            tweak,
            essiv,
        })
    }

    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// The IV of the sector numbered `n` (in 512-byte units), as a little-endian block.
    fn iv(&self, n: u64) -> u128 {
        match self.spec.ivgen {
            IvGen::Plain => u128::from(n as u32),
            IvGen::Plain64 => u128::from(n),
            IvGen::Essiv(_) => self
                .essiv
                .as_ref()
                .expect("essiv cipher exists for essiv specs")
                .encrypt_u128(u128::from(n)),
        }
    }

    /// Encrypts `data` in place: whole sectors of `sector_size` bytes (a multiple of 512), the
    /// first with IV `iv512`, each next one `sector_size / 512` further. Runs on this thread.
    ///
    /// Panics when `data` is not a whole number of sectors (a caller bug, never input data).
    pub fn encrypt(&self, data: &mut [u8], sector_size: usize, iv512: u64) {
        self.encrypt_sectors(None, data, sector_size, iv512)
    }

    /// Decrypts `data` in place; the counterpart of [`SectorCipher::encrypt`].
    pub fn decrypt(&self, data: &mut [u8], sector_size: usize, iv512: u64) {
        self.each_sector(data, sector_size, iv512, |c, s, _, iv| match c.spec.mode {
            CipherMode::Xts => c.xts(None, s, iv, false),
            CipherMode::Cbc => c.cbc_decrypt(s, iv),
        })
    }

    /// Encrypts `src` into `dst` (of the same length) as [`SectorCipher::encrypt`] would encrypt
    /// a copy of it in place; XTS reads `src` in its first pass instead of copying it first.
    pub fn encrypt_copy(&self, src: &[u8], dst: &mut [u8], sector_size: usize, iv512: u64) {
        assert_eq!(src.len(), dst.len(), "encrypt_copy needs equal lengths");
        self.encrypt_sectors(Some(src), dst, sector_size, iv512)
    }

    /// Encrypts `data` in place, or `src` into `data` when given.
    fn encrypt_sectors(&self, src: Option<&[u8]>, data: &mut [u8], ss: usize, iv512: u64) {
        self.each_sector(data, ss, iv512, |c, s, at, iv| {
            let plain = src.map(|src| &src[at..at + s.len()]);
            match c.spec.mode {
                CipherMode::Xts => c.xts(plain, s, iv, true),
                CipherMode::Cbc => {
                    if let Some(p) = plain {
                        s.copy_from_slice(p);
                    }
                    c.cbc_encrypt(s, iv)
                }
            }
        })
    }

    /// [`SectorCipher::encrypt`], split across threads when `data` is large.
    pub fn encrypt_par(&self, data: &mut [u8], sector_size: usize, iv512: u64) {
        self.par(data, sector_size, iv512, |d, _, iv| {
            self.encrypt(d, sector_size, iv)
        })
    }

    /// [`SectorCipher::decrypt`], split across threads when `data` is large.
    pub fn decrypt_par(&self, data: &mut [u8], sector_size: usize, iv512: u64) {
        self.par(data, sector_size, iv512, |d, _, iv| {
            self.decrypt(d, sector_size, iv)
        })
    }

    /// [`SectorCipher::encrypt_copy`], split across threads when the data is large.
    pub fn encrypt_copy_par(&self, src: &[u8], dst: &mut [u8], sector_size: usize, iv512: u64) {
        assert_eq!(src.len(), dst.len(), "encrypt_copy needs equal lengths");
        self.par(dst, sector_size, iv512, |d, at, iv| {
            self.encrypt_copy(&src[at..at + d.len()], d, sector_size, iv)
        })
    }

    /// Runs `f(piece, byte_offset, iv)` over `data`: on this thread when it is small, else cut
    /// into one run of whole sectors per worker thread, this thread taking the last.
    fn par(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv512: u64,
        f: impl Fn(&mut [u8], usize, u64) + Sync,
    ) {
        let threads = worker_threads();
        if data.len() < PARALLEL_MIN_BYTES || threads < 2 {
            return f(data, 0, iv512);
        }
        let sectors = data.len() / sector_size;
        let per = sectors.div_ceil(threads) * sector_size;
        let f = &f;
        std::thread::scope(|s| {
            let mut chunks = data.chunks_mut(per).enumerate().peekable();
            while let Some((k, chunk)) = chunks.next() {
                let at = k * per;
                let iv = iv512.wrapping_add((at / IV_UNIT) as u64);
                if chunks.peek().is_none() {
                    f(chunk, at, iv);
                } else {
                    s.spawn(move || f(chunk, at, iv));
                }
            }
        });
    }

    /// Calls `f(cipher, sector, byte_offset, iv)` for each sector of `data`.
    fn each_sector(
        &self,
        data: &mut [u8],
        sector_size: usize,
        iv512: u64,
        f: impl Fn(&SectorCipher, &mut [u8], usize, u64),
    ) {
        assert!(
            sector_size >= IV_UNIT && sector_size % IV_UNIT == 0 && data.len() % sector_size == 0,
            "sector cipher needs whole sectors ({} bytes, sector size {sector_size})",
            data.len()
        );
        let step = (sector_size / IV_UNIT) as u64;
        for (i, sector) in data.chunks_exact_mut(sector_size).enumerate() {
            f(
                self,
                sector,
                i * sector_size,
                iv512.wrapping_add(i as u64 * step),
            );
        }
    }

    /// XTS over one sector (a multiple of 16 bytes: no ciphertext stealing is needed), in place,
    /// or from `src` (the same length) into `sector`. The sector is viewed as AES blocks, so the
    /// data is touched twice only: tweak in before AES, tweak out after it.
    fn xts(&self, src: Option<&[u8]>, sector: &mut [u8], n: u64, encrypt: bool) {
        let tweak_key = self.tweak.as_ref().expect("xts has a tweak key");
        let mut t = tweak_key.encrypt_u128(self.iv(n));
        let (mut blocks, _) = InOutBuf::from(sector).into_chunks::<U16>();
        let mut tweaks = [0u128; BATCH];
        for (k, batch) in blocks.get_out().chunks_mut(BATCH).enumerate() {
            for (j, (block, tweak)) in batch.iter_mut().zip(&mut tweaks).enumerate() {
                let plain = match src {
                    Some(src) => load(&src[(k * BATCH + j) * 16..]),
                    None => load(block),
                };
                *tweak = t;
                store(block, plain ^ t);
                t = mul_alpha(t);
            }
            if encrypt {
                self.main.encrypt_blocks(batch);
            } else {
                self.main.decrypt_blocks(batch);
            }
            for (block, tweak) in batch.iter_mut().zip(&tweaks) {
                let v = load(block) ^ tweak;
                store(block, v);
            }
        }
    }

    /// CBC encryption of one sector; inherently serial.
    fn cbc_encrypt(&self, sector: &mut [u8], n: u64) {
        let mut prev = self.iv(n);
        let mut block = [Block::default()];
        for chunk in sector.chunks_exact_mut(16) {
            store(&mut block[0], load(chunk) ^ prev);
            self.main.encrypt_blocks(&mut block);
            prev = load(&block[0]);
            store(chunk, prev);
        }
    }

    /// CBC decryption of one sector, in batches.
    fn cbc_decrypt(&self, sector: &mut [u8], n: u64) {
        let mut prev = self.iv(n);
        let mut blocks = [Block::default(); BATCH];
        let mut cipher = [0u128; BATCH];
        for batch in sector.chunks_mut(BATCH * 16) {
            let count = batch.len() / 16;
            for j in 0..count {
                cipher[j] = load(&batch[j * 16..]);
                store(&mut blocks[j], cipher[j]);
            }
            self.main.decrypt_blocks(&mut blocks[..count]);
            for j in 0..count {
                store(&mut batch[j * 16..], load(&blocks[j]) ^ prev);
                prev = cipher[j];
            }
        }
    }
}

/// Threads a large request is split across: the available CPUs, at most 8.
fn worker_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(8))
            .unwrap_or(1)
    })
}

#[cfg(test)]
mod tests;
