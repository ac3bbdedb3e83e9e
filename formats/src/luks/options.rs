//! Create and amend options of LUKS images, with qemu-img's option names where qemu has them
//! (`cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`, `iter-time`,
//! `key-secret`; amend's `state`, `keyslot`, `old-secret`, `new-secret`) and cryptsetup's names
//! for what only LUKS2 has (`pbkdf`, `pbkdf-memory`, `pbkdf-parallel`, `pbkdf-force-iterations`).
//!
//! Secrets are never option values: `key-secret` names a secret object that the caller resolves
//! to a [`Passphrase`] and stores in [`LuksCreateOptions::passphrase`].

use super::cipher::CipherSpec;
use super::hash::HashAlg;
use super::kdf::{Argon2Variant, MAX_ARGON2_LANES, MAX_ARGON2_MEMORY_KIB};
use super::Passphrase;
use crate::error::{Error, Result};
use crate::image::OptionDesc;
use crate::units::parse_size;

/// LUKS on-disk version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LuksVersion {
    /// What qemu-img creates (and the only version QEMU reads).
    #[default]
    V1,
    V2,
}

/// KDF type of LUKS2 keyslots (LUKS1 always uses PBKDF2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PbkdfKind {
    Pbkdf2,
    Argon2(Argon2Variant),
}

/// Default `iter-time` in milliseconds (qemu-img's and cryptsetup's).
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// Default Argon2 memory of new LUKS2 keyslots in KiB (cryptsetup's: 1 GiB).
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 1 << 20;

/// How to create a LUKS image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// Virtual (payload) size in bytes; rounded up to the sector size.
    pub size: u64,
    pub version: LuksVersion,
    pub cipher: CipherSpec,
    /// Hash of PBKDF2, the AF splitter and the key digest.
    pub hash: HashAlg,
    /// Time to spend in the KDF of the first keyslot, in milliseconds.
    pub iter_time_ms: u64,
    /// Data sector size (LUKS2: 512 to 4096; LUKS1: 512).
    pub sector_size: u32,
    /// LUKS2 keyslot KDF (default argon2id).
    pub pbkdf: PbkdfKind,
    /// Argon2 memory cost in KiB.
    pub pbkdf_memory_kib: u32,
    /// Argon2 lanes.
    pub pbkdf_parallel: u32,
    /// Fixed PBKDF2 iterations or Argon2 passes, skipping the `iter-time` benchmark.
    pub pbkdf_force_iterations: Option<u32>,
    /// The id of the secret object named by `key-secret`, for the caller to resolve.
    pub key_secret: Option<String>,
    /// The passphrase of the first keyslot.
    pub passphrase: Option<Passphrase>,
}

impl Default for LuksCreateOptions {
    fn default() -> Self {
        LuksCreateOptions {
            size: 0,
            version: LuksVersion::V1,
            cipher: CipherSpec::AES_256_XTS_PLAIN64,
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
            sector_size: 512,
            pbkdf: PbkdfKind::Argon2(Argon2Variant::Id),
            pbkdf_memory_kib: DEFAULT_ARGON2_MEMORY_KIB,
            pbkdf_parallel: std::thread::available_parallelism()
                .map(|n| n.get().min(4) as u32)
                .unwrap_or(1),
            pbkdf_force_iterations: None,
            key_secret: None,
            passphrase: None,
        }
    }
}

const fn opt(name: &'static str, kind: &'static str, help: &'static str) -> OptionDesc {
    OptionDesc { name, kind, help }
}

const CREATE_OPTIONS: &[OptionDesc] = &[
    opt("cipher-alg", "str", "Name of encryption cipher algorithm"),
    opt("cipher-mode", "str", "Name of encryption cipher mode"),
    opt("hash-alg", "str", "Name of encryption hash algorithm"),
    opt("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    opt("ivgen-alg", "str", "Name of IV generator algorithm"),
    opt(
        "ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
    ),
    opt(
        "key-secret",
        "str",
        "ID of the secret that provides the keyslot passphrase",
    ),
    opt("luks_version", "num", "LUKS on-disk version (1 or 2)"),
    opt(
        "pbkdf",
        "str",
        "LUKS2 keyslot KDF (pbkdf2, argon2i, argon2id)",
    ),
    opt(
        "pbkdf-force-iterations",
        "num",
        "Fixed PBKDF2 iterations or Argon2 passes instead of iter-time",
    ),
    opt("pbkdf-memory", "num", "Argon2 memory cost in KiB"),
    opt("pbkdf-parallel", "num", "Argon2 parallel threads"),
    opt("sector_size", "num", "LUKS2 data sector size (512 to 4096)"),
    opt("size", "size", "Virtual disk size"),
];

const AMEND_OPTIONS: &[OptionDesc] = &[
    opt("iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    opt(
        "keyslot",
        "num",
        "Select a single keyslot to modify explicitly",
    ),
    opt(
        "new-secret",
        "str",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    opt(
        "old-secret",
        "str",
        "Select all keyslots that match this password",
    ),
    opt(
        "state",
        "str",
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// The `-o` options of `create -f luks`.
pub fn create_options_help() -> &'static [OptionDesc] {
    CREATE_OPTIONS
}

/// The `-o` options of `amend -f luks`.
pub fn amend_options_help() -> &'static [OptionDesc] {
    AMEND_OPTIONS
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::argument(format!("Parameter '{key}' expects a number")))
}

fn bad_value(key: &str, value: &str) -> Error {
    Error::argument(format!("Parameter '{key}' does not accept value '{value}'"))
}

impl LuksCreateOptions {
    /// Builds create options from `-o key=value` pairs; `size` is the SIZE argument (a `size=`
    /// option overrides it).
    pub fn from_pairs(size: Option<u64>, pairs: &[(String, String)]) -> Result<LuksCreateOptions> {
        let mut o = LuksCreateOptions::default();
        let mut size = size;
        let (mut alg, mut mode, mut ivgen) = ("aes-256", "xts", "plain64");
        let mut ivhash = None;
        for (key, value) in pairs {
            let v = value.as_str();
            match key.as_str() {
                "size" => size = Some(parse_size(v)?),
                "cipher-alg" => alg = v,
                "cipher-mode" => mode = v,
                "ivgen-alg" => ivgen = v,
                "ivgen-hash-alg" => {
                    ivhash = Some(HashAlg::from_name(v).ok_or_else(|| bad_value(key, v))?)
                }
                "hash-alg" => o.hash = HashAlg::from_name(v).ok_or_else(|| bad_value(key, v))?,
                "iter-time" => o.iter_time_ms = number(key, v)?,
                "key-secret" => o.key_secret = Some(value.clone()),
                "luks_version" => {
                    o.version = match v {
                        "1" => LuksVersion::V1,
                        "2" => LuksVersion::V2,
                        _ => return Err(bad_value(key, v)),
                    }
                }
                "sector_size" => o.sector_size = number(key, v)?,
                "pbkdf" => {
                    o.pbkdf = match v {
                        "pbkdf2" => PbkdfKind::Pbkdf2,
                        "argon2i" => PbkdfKind::Argon2(Argon2Variant::I),
                        "argon2id" => PbkdfKind::Argon2(Argon2Variant::Id),
                        _ => return Err(bad_value(key, v)),
                    }
                }
                "pbkdf-memory" => o.pbkdf_memory_kib = number(key, v)?,
                "pbkdf-parallel" => o.pbkdf_parallel = number(key, v)?,
                "pbkdf-force-iterations" => o.pbkdf_force_iterations = Some(number(key, v)?),
                _ => return Err(Error::argument(format!("Invalid parameter '{key}'"))),
            }
        }
        o.cipher = CipherSpec::from_qemu(alg, mode, ivgen, ivhash).map_err(Error::argument)?;
        o.size = size.ok_or_else(|| Error::argument("Image creation needs a size parameter"))?;
        o.validate()?;
        Ok(o)
    }

    /// Checks the combination of options.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(bad_value("sector_size", &self.sector_size.to_string()));
        }
        if self.version == LuksVersion::V1 && self.sector_size != 512 {
            return Err(Error::argument(
                "LUKS1 only supports 512-byte sectors (use luks_version=2)",
            ));
        }
        if self.iter_time_ms == 0 && self.pbkdf_force_iterations.is_none() {
            return Err(Error::argument("Parameter 'iter-time' must be positive"));
        }
        if self.pbkdf_memory_kib > MAX_ARGON2_MEMORY_KIB
            || self.pbkdf_parallel == 0
            || self.pbkdf_parallel > MAX_ARGON2_LANES
        {
            return Err(Error::argument(format!(
                "Argon2 memory must be at most {MAX_ARGON2_MEMORY_KIB} KiB and parallel threads \
                 1 to {MAX_ARGON2_LANES}"
            )));
        }
        Ok(())
    }
}

/// New state of the keyslots an amend selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyslotState {
    Active,
    Inactive,
}

/// A keyslot change with QEMU's `amend` semantics:
/// - `state=active`: stores `new_secret` in `keyslot` (or the first free one); the volume key comes
///   from `old_secret` when given, else from the passphrase the image was opened with.
/// - `state=inactive`: erases `keyslot`, or every keyslot `old_secret` opens.
///
/// Erasing the last active keyslot, or overwriting an active one, needs `force`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksAmend {
    pub state: KeyslotState,
    pub keyslot: Option<u32>,
    pub old_secret: Option<Passphrase>,
    pub new_secret: Option<Passphrase>,
    /// KDF time for a new keyslot in milliseconds (default 2000).
    pub iter_time_ms: Option<u64>,
}

impl LuksAmend {
    /// Builds an amend from `-o key=value` pairs; `resolve` turns a secret object id into its
    /// passphrase.
    pub fn from_pairs(
        pairs: &[(String, String)],
        resolve: &mut dyn FnMut(&str) -> Result<Passphrase>,
    ) -> Result<LuksAmend> {
        let mut state = None;
        let mut a = LuksAmend {
            state: KeyslotState::Active,
            keyslot: None,
            old_secret: None,
            new_secret: None,
            iter_time_ms: None,
        };
        for (key, value) in pairs {
            let v = value.as_str();
            match key.as_str() {
                "state" => {
                    state = Some(match v {
                        "active" => KeyslotState::Active,
                        "inactive" => KeyslotState::Inactive,
                        _ => return Err(bad_value(key, v)),
                    })
                }
                "keyslot" => a.keyslot = Some(number(key, v)?),
                "old-secret" => a.old_secret = Some(resolve(v)?),
                "new-secret" => a.new_secret = Some(resolve(v)?),
                "iter-time" => a.iter_time_ms = Some(number(key, v)?),
                _ => return Err(Error::argument(format!("Invalid parameter '{key}'"))),
            }
        }
        a.state = state.ok_or_else(|| Error::argument("Parameter 'state' is required"))?;
        Ok(a)
    }
}
