//! Static image descriptions, shaped like QEMU's `BlockGraphInfo` so the CLI can print `info`
//! output identical to qemu-img's.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
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
}

/// `format-specific.data` of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    /// `0.10` or `1.1`.
    pub compat: String,
    /// `zlib` or `zstd` (v3 only).
    pub compression_type: Option<String>,
    pub lazy_refcounts: Option<bool>,
    pub refcount_bits: u32,
    pub corrupt: Option<bool>,
    pub extended_l2: Option<bool>,
}

/// Describes the protocol layer: the host file itself.
pub fn file_node(path: &Path, file: &File) -> Result<NodeInfo> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "cannot stat file", e))?;
    Ok(NodeInfo {
        filename: path.display().to_string(),
        format: "file".to_string(),
        // QEMU reports a file's length in whole 512-byte sectors.
        virtual_size: meta.len().next_multiple_of(512),
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
