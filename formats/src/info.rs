//! Static image descriptions, shaped like QEMU's `BlockGraphInfo` so the CLI can print `info`
//! output identical to qemu-img's.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::{Error, Result};

/// One node of the block graph: an image format layer or the protocol (file) layer below it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// The file name as the user gave it.
    pub filename: String,
    /// `raw`, `qcow2`, `luks`, or `file` for the protocol layer.
    pub format: String,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host (allocated blocks).
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub dirty_flag: bool,
    pub encrypted: Option<bool>,
    pub backing: Option<BackingInfo>,
    pub format_specific: Option<FormatSpecific>,
    /// Child nodes (`file` for the protocol layer).
    pub children: Vec<ChildInfo>,
    /// Internal snapshots (`Snapshot list:` / `"snapshots"`), in table order.
    pub snapshots: Vec<SnapshotInfo>,
}

/// One internal snapshot, as `qemu-img info` and `snapshot -l` show it (QEMU's `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// Bytes of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// When the snapshot was taken (seconds since the epoch, and nanoseconds).
    pub date_sec: u64,
    pub date_nsec: u32,
    /// Guest clock at that moment.
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u32,
    /// Instruction count, when recorded (`--` in the table otherwise).
    pub icount: Option<u64>,
}

/// The backing file named by an image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingInfo {
    /// The name as stored in the image.
    pub filename: String,
    /// The name resolved against the image's directory.
    pub full_filename: String,
    /// The backing format from the header extension, if any.
    pub format: Option<String>,
}

/// A named child node.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildInfo {
    pub name: String,
    pub info: NodeInfo,
}

/// Format-specific information (`format-specific` in qemu-img's JSON).
#[derive(Debug, Clone, PartialEq)]
pub enum FormatSpecific {
    /// The protocol layer: a host file.
    File,
    Qcow2(Qcow2Info),
    Luks(Box<LuksInfo>),
}

/// `format-specific.data` of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `0.10` or `1.1`.
    pub compat: String,
    /// `zlib` or `zstd` (v3 only).
    pub compression_type: Option<String>,
    pub lazy_refcounts: Option<bool>,
    /// The persistent dirty bitmaps; `None` when the image has none (qemu-img then omits
    /// `bitmaps`).
    pub bitmaps: Option<Vec<BitmapInfo>>,
    pub refcount_bits: u32,
    pub corrupt: Option<bool>,
    pub extended_l2: Option<bool>,
    /// The LUKS header of an encrypted image (`encrypt.format=luks`). qemu-img prints it as
    /// `encrypt`, after `refcount-bits`, with the keys of a LUKS image's data plus `"format":
    /// "luks"` (after `uuid`).
    pub encrypt: Option<Box<LuksInfo>>,
}

/// One persistent dirty bitmap of a qcow2 image, as `info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Marked in use on disk by a writer that did not close it: inconsistent.
    pub in_use: bool,
    /// Enabled: records writes.
    pub auto: bool,
}

/// `format-specific.data` of a LUKS image. qemu-img prints the first fields with these keys:
/// `cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg` (essiv only), `hash-alg`,
/// `detached-header`, `payload-offset`, `master-key-iters`, `uuid`, `slots`; `luks2` is vdisk's
/// own (QEMU reads only LUKS1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// 1 or 2.
    pub version: u32,
    /// `aes-128`, `aes-192` or `aes-256`.
    pub cipher_alg: String,
    /// `xts` or `cbc`.
    pub cipher_mode: String,
    /// `plain`, `plain64` or `essiv`.
    pub ivgen_alg: String,
    pub ivgen_hash_alg: Option<String>,
    /// LUKS1 `hash_spec`; LUKS2: the hash of the volume key digest.
    pub hash_alg: String,
    pub detached_header: bool,
    /// Byte offset of the encrypted data.
    pub payload_offset: u64,
    /// Iterations of the volume key digest.
    pub master_key_iters: u64,
    pub uuid: String,
    /// LUKS1: all eight slots; LUKS2: the existing keyslots in id order.
    pub slots: Vec<LuksSlotInfo>,
    pub luks2: Option<Luks2Info>,
}

/// One entry of `slots` (`active`, `iters`, `key-offset`, `stripes` in qemu-img's JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    pub active: bool,
    /// PBKDF2 iterations (Argon2 passes for LUKS2 Argon2 keyslots); active slots only.
    pub iters: Option<u64>,
    /// Byte offset of the key material.
    pub key_offset: u64,
    /// Active slots only.
    pub stripes: Option<u32>,
}

/// What only LUKS2 has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Info {
    pub sector_size: u32,
    /// Added to every IV, in 512-byte units.
    pub iv_tweak: u64,
    /// `None` for a `dynamic` segment (to the end of the file).
    pub segment_size: Option<u64>,
    pub label: String,
    pub subsystem: String,
    /// The header's sequence id (cryptsetup's "Epoch").
    pub seqid: u64,
    /// Size of one header copy (binary header + JSON area).
    pub metadata_size: u64,
    pub keyslots_size: u64,
    pub keyslots: Vec<Luks2KeyslotInfo>,
    /// Token types.
    pub tokens: Vec<String>,
    /// What is wrong with the other header copy, if anything.
    pub damaged_header: Option<String>,
}

/// One LUKS2 keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2KeyslotInfo {
    pub id: u32,
    /// `pbkdf2`, `argon2i` or `argon2id`.
    pub kdf: String,
    /// PBKDF2 iterations or Argon2 passes.
    pub iterations: u32,
    pub memory_kib: Option<u32>,
    pub parallel: Option<u32>,
    pub key_size: u32,
    pub area_offset: u64,
    pub area_size: u64,
    pub area_encryption: String,
    /// 0 ignore, 1 normal, 2 high.
    pub priority: u32,
}

/// Describes the protocol layer: the host file itself.
pub fn file_node(path: &Path, file: &File) -> Result<NodeInfo> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat file", e))?;
    Ok(NodeInfo {
        filename: path.display().to_string(),
        // QEMU's protocol driver for block devices is `host_device`.
        format: if meta.file_type().is_block_device() {
            "host_device".to_string()
        } else {
            "file".to_string()
        },
        // QEMU reports a file's length in whole 512-byte sectors.
        virtual_size: crate::host_file::file_len(file)
            .map_err(|e| Error::io(path, "cannot stat file", e))?
            .next_multiple_of(512),
        actual_size: Some(meta.blocks() * 512),
        cluster_size: None,
        dirty_flag: false,
        encrypted: None,
        backing: None,
        format_specific: Some(FormatSpecific::File),
        children: Vec::new(),
        snapshots: Vec::new(),
    })
}
