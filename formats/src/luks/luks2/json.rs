//! The LUKS2 JSON metadata as typed structs, and the checks that make it safe to use (LUKS2 On-Disk
//! Format Specification, section 3; the rules cryptsetup's `LUKS2_hdr_validate` enforces).
//!
//! 64-bit numbers are JSON strings of decimal digits ([`U64Str`]); binary values are base64
//! ([`B64`]). Fields this crate does not interpret are kept (`extra`) so a rewritten header loses
//! nothing.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::super::af_split::AF_STRIPES;
use super::super::cipher::{CipherSpec, IV_UNIT};
use super::super::hash::HashAlg;
use super::super::kdf::{Argon2Variant, Kdf, MAX_PBKDF2_ITERATIONS};
use super::super::keyslot::{material_len, SlotCrypto};
use super::header::BIN_HDR_LEN;

/// Most keyslots (and tokens, and segments) a LUKS2 header may have.
pub const MAX_KEYSLOTS: u32 = 32;
/// Largest keyslots area cryptsetup accepts (128 MiB).
pub const MAX_KEYSLOTS_SIZE: u64 = 128 << 20;
/// Keyslot areas and the keyslots area size are multiples of this.
pub const AREA_ALIGN: u64 = 4096;
/// Longest volume or keyslot key accepted (AES-256-XTS).
pub const MAX_KEY_SIZE: u32 = 64;

/// A `u64` stored as a JSON string of decimal digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct U64Str(pub u64);

impl Serialize for U64Str {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for U64Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_u64(&s)
            .map(U64Str)
            .ok_or_else(|| serde::de::Error::custom(format!("'{s}' is not a 64-bit number string")))
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Binary data stored as base64.
#[derive(Clone, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl std::fmt::Debug for B64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "B64({} bytes)", self.0.len())
    }
}

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map(B64)
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

/// Segment size: a fixed byte count or `dynamic` (to the end of the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSize {
    Fixed(u64),
    Dynamic,
}

impl Serialize for SegmentSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SegmentSize::Fixed(n) => s.serialize_str(&n.to_string()),
            SegmentSize::Dynamic => s.serialize_str("dynamic"),
        }
    }
}

impl<'de> Deserialize<'de> for SegmentSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "dynamic" {
            return Ok(SegmentSize::Dynamic);
        }
        parse_u64(&s)
            .map(SegmentSize::Fixed)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid segment size '{s}'")))
    }
}

/// The whole JSON document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metadata {
    pub keyslots: BTreeMap<u32, Keyslot>,
    pub tokens: BTreeMap<u32, Value>,
    pub segments: BTreeMap<u32, Segment>,
    pub digests: BTreeMap<u32, Digest>,
    pub config: Config,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Keyslot {
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: u32,
    pub af: Af,
    pub area: Area,
    pub kdf: KdfJson,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Af {
    #[serde(rename = "type")]
    pub kind: String,
    pub stripes: u32,
    pub hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Area {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: U64Str,
    pub size: U64Str,
    pub encryption: String,
    pub key_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum KdfJson {
    #[serde(rename = "pbkdf2")]
    Pbkdf2 {
        hash: String,
        iterations: u32,
        salt: B64,
    },
    #[serde(rename = "argon2i")]
    Argon2i {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: B64,
    },
    #[serde(rename = "argon2id")]
    Argon2id {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: B64,
    },
}

impl KdfJson {
    /// The KDF and its salt; the error names what is not supported.
    pub fn kdf(&self) -> Result<(Kdf, &[u8]), String> {
        Ok(match self {
            KdfJson::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => (
                Kdf::Pbkdf2 {
                    hash: hash_named(hash)?,
                    iterations: *iterations,
                },
                &salt.0,
            ),
            KdfJson::Argon2i {
                time,
                memory,
                cpus,
                salt,
            }
            | KdfJson::Argon2id {
                time,
                memory,
                cpus,
                salt,
            } => (
                Kdf::Argon2 {
                    variant: if matches!(self, KdfJson::Argon2i { .. }) {
                        Argon2Variant::I
                    } else {
                        Argon2Variant::Id
                    },
                    time: *time,
                    memory_kib: *memory,
                    lanes: *cpus,
                },
                &salt.0,
            ),
        })
    }

    /// The JSON form of `kdf` with `salt`.
    pub fn from_kdf(kdf: Kdf, salt: Vec<u8>) -> KdfJson {
        match kdf {
            Kdf::Pbkdf2 { hash, iterations } => KdfJson::Pbkdf2 {
                hash: hash.name().to_string(),
                iterations,
                salt: B64(salt),
            },
            Kdf::Argon2 {
                variant,
                time,
                memory_kib,
                lanes,
            } => {
                let (time, memory, cpus, salt) = (time, memory_kib, lanes, B64(salt));
                match variant {
                    Argon2Variant::I => KdfJson::Argon2i {
                        time,
                        memory,
                        cpus,
                        salt,
                    },
                    Argon2Variant::Id => KdfJson::Argon2id {
                        time,
                        memory,
                        cpus,
                        salt,
                    },
                }
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segment {
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: U64Str,
    pub size: SegmentSize,
    pub iv_tweak: U64Str,
    pub encryption: String,
    pub sector_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Digest {
    #[serde(rename = "type")]
    pub kind: String,
    pub keyslots: Vec<String>,
    pub segments: Vec<String>,
    pub hash: String,
    pub iterations: u32,
    pub salt: B64,
    pub digest: B64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub json_size: U64Str,
    pub keyslots_size: U64Str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn hash_named(name: &str) -> Result<HashAlg, String> {
    HashAlg::from_name(name).ok_or_else(|| format!("hash '{name}' is not supported"))
}

/// Why a header cannot be used: the metadata is wrong, or it uses something not implemented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Invalid(String),
    Unsupported(String),
}

fn invalid<T>(what: impl Into<String>) -> Result<T, Problem> {
    Err(Problem::Invalid(what.into()))
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, Problem> {
    Err(Problem::Unsupported(what.into()))
}

/// Refuses features this driver does not implement, with their name, before the typed parse
/// (their JSON may not have the shape the typed structs expect).
fn refuse_unimplemented(v: &Value) -> Result<(), Problem> {
    if let Some(reqs) = v.pointer("/config/requirements/mandatory") {
        let names: Vec<String> = reqs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        if !names.is_empty() {
            let what = if names.iter().any(|n| n.contains("reencrypt")) {
                "a reencryption is in progress"
            } else {
                "it has mandatory requirements vdisk does not implement"
            };
            return unsupported(format!(
                "LUKS2 image cannot be used: {what} ({})",
                names.join(", ")
            ));
        }
    }
    if let Some(slots) = v.get("keyslots").and_then(Value::as_object) {
        for (id, s) in slots {
            match s.get("type").and_then(Value::as_str) {
                Some("luks2") => {}
                Some("reencrypt") => {
                    return unsupported(format!(
                        "LUKS2 keyslot {id} is a reencryption keyslot: a reencryption is in \
                         progress, which vdisk does not implement"
                    ))
                }
                Some(t) => return unsupported(format!("LUKS2 keyslot {id} has type '{t}'")),
                None => return invalid(format!("LUKS2 keyslot {id} has no type")),
            }
        }
    }
    if let Some(segs) = v.get("segments").and_then(Value::as_object) {
        for (id, s) in segs {
            match s.get("type").and_then(Value::as_str) {
                Some("crypt") => {}
                Some(t) => {
                    return unsupported(format!(
                        "LUKS2 segment {id} has type '{t}' (only crypt segments are implemented; \
                         other types appear during reencryption)"
                    ))
                }
                None => return invalid(format!("LUKS2 segment {id} has no type")),
            }
            if s.get("integrity").is_some() {
                return unsupported(format!(
                    "LUKS2 segment {id} uses authenticated encryption (integrity), which vdisk \
                     does not implement"
                ));
            }
        }
    }
    Ok(())
}

/// Parses and validates the JSON text of a header copy whose size is `hdr_size`.
pub fn parse(json: &str, hdr_size: u64) -> Result<Metadata, Problem> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| Problem::Invalid(format!("LUKS2 metadata is not valid JSON: {e}")))?;
    refuse_unimplemented(&v)?;
    let m: Metadata = serde_json::from_value(v)
        .map_err(|e| Problem::Invalid(format!("LUKS2 metadata is malformed: {e}")))?;
    m.validate(hdr_size)?;
    Ok(m)
}

impl Metadata {
    /// The metadata as stored: compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("metadata always serialises")
    }

    /// Start of the keyslots area (after both header copies).
    pub fn keyslots_start(&self, hdr_size: u64) -> u64 {
        2 * hdr_size
    }

    /// The only segment.
    pub fn segment(&self) -> (u32, &Segment) {
        let (id, s) = self.segments.iter().next().expect("validated: one segment");
        (*id, s)
    }

    /// The digest that covers keyslot `slot` and the segment.
    pub fn digest_for(&self, slot: u32) -> Option<(u32, &Digest)> {
        let slot = slot.to_string();
        let seg = self.segment().0.to_string();
        self.digests
            .iter()
            .find(|(_, d)| d.keyslots.contains(&slot) && d.segments.contains(&seg))
            .map(|(id, d)| (*id, d))
    }

    /// How keyslot `id` stores its key (validated, so the names parse).
    pub fn slot_crypto(&self, id: u32) -> SlotCrypto {
        let k = &self.keyslots[&id];
        let (kdf, salt) = k.kdf.kdf().expect("validated kdf");
        SlotCrypto {
            kdf,
            salt: salt.to_vec(),
            area_cipher: CipherSpec::from_luks2(&k.area.encryption, k.area.key_size as usize)
                .expect("validated area cipher"),
            af_hash: HashAlg::from_name(&k.af.hash).expect("validated af hash"),
            stripes: k.af.stripes,
        }
    }

    /// The data cipher for a volume key of `key_len` bytes; the error says what is not supported.
    pub fn segment_cipher(&self, key_len: usize) -> Result<CipherSpec, String> {
        CipherSpec::from_luks2(&self.segment().1.encryption, key_len)
    }

    /// Length of the volume key: the key size of the keyslots bound to the segment's digest.
    pub fn volume_key_size(&self) -> usize {
        let seg = self.segment().0.to_string();
        self.digests
            .values()
            .filter(|d| d.segments.contains(&seg))
            .flat_map(|d| d.keyslots.iter())
            .filter_map(|k| k.parse::<u32>().ok())
            .filter_map(|k| self.keyslots.get(&k))
            .map(|k| k.key_size as usize)
            .next()
            .unwrap_or(0)
    }

    /// Checks sizes, offsets, overlaps and references.
    fn validate(&self, hdr_size: u64) -> Result<(), Problem> {
        let json_size = hdr_size - BIN_HDR_LEN as u64;
        if self.config.json_size.0 != json_size {
            return invalid(format!(
                "LUKS2 config json_size {} does not match the header size {hdr_size}",
                self.config.json_size.0
            ));
        }
        let ks_size = self.config.keyslots_size.0;
        if ks_size % AREA_ALIGN != 0 || ks_size > MAX_KEYSLOTS_SIZE {
            return invalid(format!(
                "LUKS2 keyslots_size {ks_size} is not a multiple of {AREA_ALIGN} up to \
                 {MAX_KEYSLOTS_SIZE}"
            ));
        }
        let ks_start = self.keyslots_start(hdr_size);
        let ks_end = ks_start + ks_size;
        // Key sizes bound every later cipher check and key material read.
        for (id, k) in &self.keyslots {
            if k.key_size == 0 || k.key_size > MAX_KEY_SIZE {
                return invalid(format!(
                    "LUKS2 keyslot {id} key size {} is out of range (1 to {MAX_KEY_SIZE})",
                    k.key_size
                ));
            }
        }
        self.validate_segments(ks_end)?;
        self.validate_digests()?;
        self.validate_keyslots(ks_start, ks_end)?;
        self.validate_tokens()
    }

    fn validate_segments(&self, ks_end: u64) -> Result<(), Problem> {
        if self.segments.len() != 1 {
            return unsupported(format!(
                "LUKS2 header has {} segments (exactly one is implemented; more appear during \
                 reencryption)",
                self.segments.len()
            ));
        }
        let (id, s) = self.segment();
        if let Some(flags) = s.flags.as_ref().filter(|f| !f.is_empty()) {
            return unsupported(format!(
                "LUKS2 segment {id} has flags {} (used by reencryption)",
                flags.join(", ")
            ));
        }
        if !matches!(s.sector_size, 512 | 1024 | 2048 | 4096) {
            return invalid(format!(
                "LUKS2 segment {id} sector size {} is not 512, 1024, 2048 or 4096",
                s.sector_size
            ));
        }
        let offset = s.offset.0;
        if offset == 0 {
            return unsupported("LUKS2 image with a detached header (data offset 0)");
        }
        if offset % u64::from(s.sector_size) != 0 || offset < ks_end {
            return invalid(format!(
                "LUKS2 segment {id} offset {offset} is not sector aligned or overlaps the \
                 keyslots area (ends at {ks_end})"
            ));
        }
        if let SegmentSize::Fixed(n) = s.size {
            if n == 0 || n % u64::from(s.sector_size) != 0 || offset.checked_add(n).is_none() {
                return invalid(format!("LUKS2 segment {id} size {n} is not valid"));
            }
        }
        // Without keyslots the key size is unknown; such a header cannot be unlocked anyway.
        let key_size = self.volume_key_size();
        if key_size > 0 {
            CipherSpec::from_luks2(&s.encryption, key_size)
                .map_err(|e| Problem::Unsupported(format!("LUKS2 segment {id}: {e}")))?;
        }
        if !self
            .digests
            .values()
            .any(|d| d.segments.contains(&id.to_string()))
        {
            return invalid(format!("LUKS2 segment {id} has no digest"));
        }
        Ok(())
    }

    fn validate_digests(&self) -> Result<(), Problem> {
        for (id, d) in &self.digests {
            if d.kind != "pbkdf2" {
                return unsupported(format!("LUKS2 digest {id} has type '{}'", d.kind));
            }
            hash_named(&d.hash)
                .map_err(|e| Problem::Unsupported(format!("LUKS2 digest {id}: {e}")))?;
            if d.iterations == 0 || d.iterations > MAX_PBKDF2_ITERATIONS {
                return invalid(format!(
                    "LUKS2 digest {id} iteration count {} is out of range (1 to \
                     {MAX_PBKDF2_ITERATIONS})",
                    d.iterations
                ));
            }
            if d.digest.0.is_empty() || d.digest.0.len() > 64 || d.salt.0.is_empty() {
                return invalid(format!("LUKS2 digest {id} has a bad digest or salt length"));
            }
            for k in &d.keyslots {
                if !k
                    .parse::<u32>()
                    .is_ok_and(|k| self.keyslots.contains_key(&k))
                {
                    return invalid(format!("LUKS2 digest {id} names missing keyslot '{k}'"));
                }
            }
            for s in &d.segments {
                if !s
                    .parse::<u32>()
                    .is_ok_and(|s| self.segments.contains_key(&s))
                {
                    return invalid(format!("LUKS2 digest {id} names missing segment '{s}'"));
                }
            }
        }
        Ok(())
    }

    fn validate_keyslots(&self, ks_start: u64, ks_end: u64) -> Result<(), Problem> {
        let mut areas: Vec<(u32, u64, u64)> = Vec::new();
        let vk_size = self.volume_key_size();
        for (&id, k) in &self.keyslots {
            if id >= MAX_KEYSLOTS {
                return invalid(format!("LUKS2 keyslot id {id} is not below {MAX_KEYSLOTS}"));
            }
            let n_digests = self
                .digests
                .values()
                .filter(|d| d.keyslots.contains(&id.to_string()))
                .count();
            if n_digests != 1 {
                return invalid(format!(
                    "LUKS2 keyslot {id} is bound to {n_digests} digests (must be one)"
                ));
            }
            if self.digest_for(id).is_some() && k.key_size as usize != vk_size {
                return invalid(format!(
                    "LUKS2 keyslot {id} key size {} differs from the volume key size {vk_size}",
                    k.key_size
                ));
            }
            if k.af.kind != "luks1" || k.af.stripes != AF_STRIPES {
                return unsupported(format!(
                    "LUKS2 keyslot {id} anti-forensic splitter '{}' with {} stripes (luks1 with \
                     {AF_STRIPES} is implemented)",
                    k.af.kind, k.af.stripes
                ));
            }
            hash_named(&k.af.hash)
                .map_err(|e| Problem::Unsupported(format!("LUKS2 keyslot {id}: {e}")))?;
            let (kdf, salt) = k
                .kdf
                .kdf()
                .map_err(|e| Problem::Unsupported(format!("LUKS2 keyslot {id}: {e}")))?;
            kdf.check_limits()
                .map_err(|e| Problem::Invalid(format!("LUKS2 keyslot {id}: {e}")))?;
            if salt.is_empty() || salt.len() > 64 {
                return invalid(format!("LUKS2 keyslot {id} KDF salt has a bad length"));
            }
            if k.area.kind != "raw" {
                return unsupported(format!(
                    "LUKS2 keyslot {id} area type '{}' (raw is implemented)",
                    k.area.kind
                ));
            }
            CipherSpec::from_luks2(&k.area.encryption, k.area.key_size as usize)
                .map_err(|e| Problem::Unsupported(format!("LUKS2 keyslot {id} area: {e}")))?;
            let (start, size) = (k.area.offset.0, k.area.size.0);
            let end = start.saturating_add(size);
            let need = material_len(k.key_size as usize, k.af.stripes) as u64;
            if start < ks_start || end > ks_end || size < need || start % IV_UNIT as u64 != 0 {
                return invalid(format!(
                    "LUKS2 keyslot {id} area {start}+{size} is not inside the keyslots area \
                     {ks_start}..{ks_end} or is smaller than its {need} bytes of key material"
                ));
            }
            if let Some((other, _, _)) = areas.iter().find(|&&(_, a, b)| start < b && a < end) {
                return invalid(format!(
                    "LUKS2 keyslots {other} and {id} have overlapping areas"
                ));
            }
            areas.push((id, start, end));
            if let Some(p) = k.priority {
                if p > 2 {
                    return invalid(format!("LUKS2 keyslot {id} priority {p} is not 0, 1 or 2"));
                }
            }
        }
        Ok(())
    }

    fn validate_tokens(&self) -> Result<(), Problem> {
        for (id, t) in &self.tokens {
            let ok = t.get("type").is_some_and(Value::is_string)
                && t.get("keyslots")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter().all(|k| {
                            k.as_str()
                                .and_then(|k| k.parse::<u32>().ok())
                                .is_some_and(|k| self.keyslots.contains_key(&k))
                        })
                    });
            if *id >= MAX_KEYSLOTS || !ok {
                return invalid(format!("LUKS2 token {id} is malformed"));
            }
        }
        Ok(())
    }

    /// Token types bound to keyslot `id` (they hold no passphrase vdisk can use).
    pub fn tokens_for(&self, id: u32) -> Vec<String> {
        let id = Value::String(id.to_string());
        self.tokens
            .values()
            .filter(|t| {
                t.get("keyslots")
                    .and_then(Value::as_array)
                    .is_some_and(|a| a.contains(&id))
            })
            .filter_map(|t| t.get("type").and_then(Value::as_str).map(String::from))
            .collect()
    }
}
