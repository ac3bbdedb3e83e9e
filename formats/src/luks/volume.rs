//! An unlocked LUKS header of either version: the data cipher and layout, `info`, and key slot
//! management. This is what the standalone driver and qcow2's `encrypt.format=luks` share.

use std::sync::{Arc, Mutex, MutexGuard};

use zeroize::Zeroizing;

use super::cipher::{SectorCipher, IV_UNIT};
use super::kdf::{self, Kdf};
use super::luks1;
use super::luks2::{self, Luks2};
use super::metadata::{header_info, read_header, Header, Layout};
use super::options::{
    KeyslotState, LuksAmend, LuksCreateOptions, LuksVersion, PbkdfKind, DEFAULT_ITER_TIME_MS,
};
use super::{new_uuid, random_bytes, HeaderIo, Passphrase};
use crate::error::{Error, Result};
use crate::info::LuksInfo;

struct State {
    header: Header,
    volume_key: Zeroizing<Vec<u8>>,
}

/// An unlocked LUKS volume: its header (behind a lock, for key slot changes) and the data cipher.
///
/// The data area starts at [`LuksVolume::payload_offset`] of the [`HeaderIo`] for a standalone
/// image; qcow2 ignores it and encrypts each cluster with IVs from its host offset.
pub struct LuksVolume {
    io: Arc<dyn HeaderIo>,
    state: Mutex<State>,
    cipher: SectorCipher,
    layout: Layout,
}

impl std::fmt::Debug for LuksVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuksVolume")
            .field("layout", &self.layout)
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

fn wrong_passphrase(io: &dyn HeaderIo, note: &str) -> Error {
    Error::InvalidArgument {
        what: format!(
            "{}: Invalid password, cannot unlock any keyslot{note}",
            io.path().display()
        ),
    }
}

impl LuksVolume {
    /// Reads the header in `io` and unlocks it with `passphrase`. A wrong passphrase gives one
    /// `InvalidArgument` error, "Invalid password, cannot unlock any keyslot".
    pub fn open(io: Arc<dyn HeaderIo>, passphrase: &Passphrase) -> Result<LuksVolume> {
        let pw = passphrase.as_bytes();
        let header = read_header(&*io)?;
        let unlocked = match &header {
            Header::V1(h) => h.unlock(&*io, pw)?.map(|(key, _)| key),
            Header::V2(h) => h.unlock(&*io, pw)?.map(|(key, _)| key),
        };
        let Some(key) = unlocked else {
            return Err(wrong_passphrase(&*io, &token_note(&header)));
        };
        Self::from_header(io, header, key)
    }

    fn from_header(
        io: Arc<dyn HeaderIo>,
        header: Header,
        volume_key: Zeroizing<Vec<u8>>,
    ) -> Result<LuksVolume> {
        let path = io.path().to_path_buf();
        let layout = Layout::of(&path, &header)?;
        let cipher = SectorCipher::new(layout.spec, &volume_key)
            .map_err(|e| Error::unsupported(&path, e))?;
        Ok(LuksVolume {
            io,
            state: Mutex::new(State { header, volume_key }),
            cipher,
            layout,
        })
    }

    /// Bytes the header and key material of a new image with these options take: where the
    /// payload starts.
    pub fn header_size(opts: &LuksCreateOptions) -> u64 {
        match opts.version {
            LuksVersion::V1 => u64::from(luks1::layout(opts.cipher.key_bytes).1) * IV_UNIT as u64,
            LuksVersion::V2 => luks2::NEW_DATA_OFFSET,
        }
    }

    /// Writes a new header into `io` (at least [`LuksVolume::header_size`] bytes) with one
    /// keyslot for `opts.passphrase`, and returns it unlocked.
    pub fn create(io: Arc<dyn HeaderIo>, opts: &LuksCreateOptions) -> Result<LuksVolume> {
        opts.validate()?;
        let path = io.path().to_path_buf();
        let pw = opts.passphrase.as_ref().ok_or_else(|| {
            Error::argument("Creating a LUKS image needs a passphrase (key-secret)")
        })?;
        if io.size() < Self::header_size(opts) {
            return Err(Error::argument(format!(
                "{}: {} bytes are too few for the LUKS header",
                path.display(),
                io.size()
            )));
        }
        let mut key = Zeroizing::new(vec![0u8; opts.cipher.key_bytes]);
        random_bytes(&path, &mut key)?;
        let uuid = new_uuid(&path)?;
        let forced = opts.pbkdf_force_iterations;
        let digest_iters = forced.map_or_else(
            || kdf::pbkdf2_iterations_for(opts.hash, opts.hash.output_len(), opts.iter_time_ms / 8),
            |_| kdf::MIN_PBKDF2_ITERATIONS,
        );
        let header = match opts.version {
            LuksVersion::V1 => {
                let mut h =
                    luks1::Header::new(&path, opts.cipher, opts.hash, &key, digest_iters, uuid)?;
                let iters = forced.unwrap_or_else(|| {
                    kdf::pbkdf2_iterations_for(opts.hash, opts.cipher.key_bytes, opts.iter_time_ms)
                });
                h.set_slot(&*io, 0, pw.as_bytes(), &key, iters)?;
                Header::V1(h)
            }
            LuksVersion::V2 => {
                let params = luks2::CreateParams {
                    cipher: opts.cipher,
                    sector_size: opts.sector_size,
                    kdf: new_kdf(opts, opts.iter_time_ms),
                    digest_hash: opts.hash,
                    digest_iterations: digest_iters,
                    uuid,
                };
                let mut h = Luks2::new(&path, &params, &key)?;
                h.add_keyslot(&*io, Some(0), pw.as_bytes(), &key, params.kdf)?;
                Header::V2(h)
            }
        };
        Self::from_header(io, header, key)
    }

    pub fn version(&self) -> LuksVersion {
        self.layout.version
    }

    /// Where the data starts in the header area (bytes).
    pub fn payload_offset(&self) -> u64 {
        self.layout.payload_offset
    }

    /// Size of one encryption sector (512 for LUKS1; 512 to 4096 for LUKS2).
    pub fn sector_size(&self) -> u32 {
        self.layout.sector_size
    }

    /// Size of the data area of a standalone image whose file is `file_len` bytes: to the end of
    /// the file (whole sectors) or the fixed LUKS2 segment size.
    pub fn data_size(&self, file_len: u64) -> Result<u64> {
        self.layout.data_size(self.io.path(), file_len)
    }

    /// The data cipher, for callers that choose their own IVs (qcow2 numbers sectors by host
    /// offset / 512): `cipher().encrypt(data, 512, host_offset / 512)`.
    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }

    /// Encrypts whole sectors of the data area starting at byte `offset` of the payload (a
    /// multiple of the sector size), with the IVs dm-crypt gives them; large buffers are split
    /// across threads.
    pub fn encrypt_payload(&self, data: &mut [u8], offset: u64) {
        let iv = self.layout.iv_tweak.wrapping_add(offset / IV_UNIT as u64);
        self.cipher
            .encrypt_par(data, self.layout.sector_size as usize, iv)
    }

    /// [`LuksVolume::encrypt_payload`] of a copy of `src`, written to `dst` (the same length).
    pub fn encrypt_payload_from(&self, src: &[u8], dst: &mut [u8], offset: u64) {
        let iv = self.layout.iv_tweak.wrapping_add(offset / IV_UNIT as u64);
        let ss = self.layout.sector_size as usize;
        self.cipher.encrypt_copy_par(src, dst, ss, iv)
    }

    /// Decrypts whole sectors of the data area; the counterpart of
    /// [`LuksVolume::encrypt_payload`].
    pub fn decrypt_payload(&self, data: &mut [u8], offset: u64) {
        let iv = self.layout.iv_tweak.wrapping_add(offset / IV_UNIT as u64);
        self.cipher
            .decrypt_par(data, self.layout.sector_size as usize, iv)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the other LUKS2 header copy is missing, if it is damaged or stale.
    pub fn damaged_header(&self) -> Option<String> {
        match &self.lock().header {
            Header::V2(h) => h.damaged.clone(),
            Header::V1(_) => None,
        }
    }

    /// Rewrites a damaged or stale LUKS2 header copy from the good one; `false` when there was
    /// nothing to repair.
    pub fn repair(&self) -> Result<bool> {
        let mut st = self.lock();
        match &mut st.header {
            Header::V2(h) if h.damaged.is_some() => h.repair(&*self.io).map(|()| true),
            _ => Ok(false),
        }
    }

    /// The `format-specific` data of `info`.
    pub fn info(&self) -> LuksInfo {
        header_info(&self.layout, &self.lock().header)
    }

    /// Changes key slots as [`LuksAmend`] describes (QEMU's `amend` semantics).
    pub fn amend(&self, a: &LuksAmend, force: bool) -> Result<()> {
        let mut st = self.lock();
        let io = &*self.io;
        match a.state {
            KeyslotState::Active => self.activate(&mut st, io, a, force),
            KeyslotState::Inactive => self.deactivate(&mut st, io, a, force),
        }
    }

    fn activate(
        &self,
        st: &mut State,
        io: &dyn HeaderIo,
        a: &LuksAmend,
        force: bool,
    ) -> Result<()> {
        let new = a.new_secret.as_ref().ok_or_else(|| {
            Error::argument("Parameter 'new-secret' is required to activate a keyslot")
        })?;
        let key = match &a.old_secret {
            Some(old) => {
                let found = match &st.header {
                    Header::V1(h) => h.unlock(io, old.as_bytes())?.map(|(k, _)| k),
                    Header::V2(h) => h.unlock(io, old.as_bytes())?.map(|(k, _)| k),
                };
                found.ok_or_else(|| wrong_passphrase(io, ""))?
            }
            None => st.volume_key.clone(),
        };
        let iter_time = a.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS);
        let active = active_slots(&st.header);
        if let Some(k) = a.keyslot {
            if active.contains(&k) && !force {
                return Err(Error::argument(format!(
                    "Refusing to overwrite active keyslot {k} - please erase it first"
                )));
            }
        }
        match &mut st.header {
            Header::V1(h) => {
                let slot = match a.keyslot {
                    Some(k) if k as usize >= luks1::NUM_SLOTS => {
                        return Err(Error::argument(format!(
                            "Invalid keyslot {k} is specified, must be between 0 and {}",
                            luks1::NUM_SLOTS - 1
                        )))
                    }
                    Some(k) => k as usize,
                    None => (0..luks1::NUM_SLOTS)
                        .find(|&i| !h.slots[i].active)
                        .ok_or_else(|| {
                            Error::argument("Can't add a keyslot - all keyslots are in use")
                        })?,
                };
                let iters = kdf::pbkdf2_iterations_for(h.hash, h.key_bytes as usize, iter_time);
                h.set_slot(io, slot, new.as_bytes(), &key, iters)
            }
            Header::V2(h) => {
                if let Some(k) = a.keyslot.filter(|k| active.contains(k)) {
                    h.remove_keyslot(io, k)?;
                }
                let kdf = like_existing_kdf(h, iter_time);
                h.add_keyslot(io, a.keyslot, new.as_bytes(), &key, kdf)
                    .map(|_| ())
            }
        }
    }

    fn deactivate(
        &self,
        st: &mut State,
        io: &dyn HeaderIo,
        a: &LuksAmend,
        force: bool,
    ) -> Result<()> {
        if a.new_secret.is_some() {
            return Err(Error::argument(
                "Parameter 'new-secret' must not be given when erasing keyslots",
            ));
        }
        let active = active_slots(&st.header);
        let targets: Vec<u32> = match (a.keyslot, &a.old_secret) {
            (Some(k), _) => {
                if !active.contains(&k) {
                    return Err(Error::argument(format!(
                        "Given keyslot {k} is already erased (inactive)"
                    )));
                }
                if active.len() == 1 && !force {
                    return Err(Error::argument(format!(
                        "Attempt to erase the only active keyslot {k} which will erase all the \
                         data in the image irreversibly - refusing operation"
                    )));
                }
                vec![k]
            }
            (None, Some(old)) => {
                let mut hit = Vec::new();
                for &k in &active {
                    let opens = match &st.header {
                        Header::V1(h) => h.try_slot(io, k as usize, old.as_bytes())?.is_some(),
                        Header::V2(h) => h.try_slot(io, k, old.as_bytes())?.is_some(),
                    };
                    if opens {
                        hit.push(k);
                    }
                }
                if hit.is_empty() {
                    return Err(Error::argument(
                        "No keyslots match given (old) password for erase operation",
                    ));
                }
                if hit.len() == active.len() && !force {
                    return Err(Error::argument(
                        "All the active keyslots match the (old) password that was given and \
                         erasing them will erase all the data in the image irreversibly - \
                         refusing operation",
                    ));
                }
                hit
            }
            (None, None) => {
                return Err(Error::argument(
                    "One of the parameters 'keyslot' or 'old-secret' is required to erase \
                     keyslots",
                ))
            }
        };
        for k in targets {
            match &mut st.header {
                Header::V1(h) => h.erase_slot(io, k as usize)?,
                Header::V2(h) => h.remove_keyslot(io, k)?,
            }
        }
        Ok(())
    }
}

/// Active keyslot numbers.
fn active_slots(h: &Header) -> Vec<u32> {
    match h {
        Header::V1(h) => (0..luks1::NUM_SLOTS as u32)
            .filter(|&i| h.slots[i as usize].active)
            .collect(),
        Header::V2(h) => h.meta.keyslots.keys().copied().collect(),
    }
}

/// The KDF of a new LUKS2 keyslot from the create options, its cost from `iter_time` unless
/// forced.
fn new_kdf(opts: &LuksCreateOptions, iter_time: u64) -> Kdf {
    match opts.pbkdf {
        PbkdfKind::Pbkdf2 => Kdf::Pbkdf2 {
            hash: opts.hash,
            iterations: opts.pbkdf_force_iterations.unwrap_or_else(|| {
                kdf::pbkdf2_iterations_for(opts.hash, opts.cipher.key_bytes, iter_time)
            }),
        },
        PbkdfKind::Argon2(variant) => {
            let memory_kib = opts.pbkdf_memory_kib.max(kdf::MIN_ARGON2_MEMORY_KIB);
            let lanes = opts.pbkdf_parallel;
            Kdf::Argon2 {
                variant,
                time: opts
                    .pbkdf_force_iterations
                    .unwrap_or_else(|| kdf::argon2_time_for(variant, memory_kib, lanes, iter_time)),
                memory_kib,
                lanes,
            }
        }
    }
}

/// A KDF for a keyslot added to an existing LUKS2 header: the type, memory and lanes of its first
/// keyslot, the cost benchmarked for `iter_time`.
fn like_existing_kdf(h: &Luks2, iter_time: u64) -> Kdf {
    let first = h.meta.keyslots.keys().next().copied();
    let mut opts = LuksCreateOptions::default();
    if let Some(id) = first {
        match h.meta.slot_crypto(id).kdf {
            Kdf::Pbkdf2 { hash, .. } => {
                opts.pbkdf = PbkdfKind::Pbkdf2;
                opts.hash = hash;
            }
            Kdf::Argon2 {
                variant,
                memory_kib,
                lanes,
                ..
            } => {
                opts.pbkdf = PbkdfKind::Argon2(variant);
                opts.pbkdf_memory_kib = memory_kib;
                opts.pbkdf_parallel = lanes;
            }
        }
    }
    new_kdf(&opts, iter_time)
}

/// Why a LUKS2 image may not open with a passphrase: keyslots bound to tokens vdisk cannot use.
fn token_note(header: &Header) -> String {
    let Header::V2(h) = header else {
        return String::new();
    };
    let tokens: Vec<String> = h
        .meta
        .keyslots
        .keys()
        .flat_map(|&id| h.meta.tokens_for(id))
        .collect();
    if tokens.is_empty() {
        return String::new();
    }
    format!(
        " (some keyslots are bound to tokens of type {}, which vdisk cannot use)",
        tokens.join(", ")
    )
}
