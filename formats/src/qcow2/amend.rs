//! Header rewrites for `amend` and `rebase`: the backing file name and format, the compatibility
//! level and lazy refcounts. Each change is one write of the header cluster; only a downgrade to
//! version 2 touches the tables first, to expand zero clusters.

use std::path::Path;

use super::header::{self, compat, default_feature_table, ext, incompat, Extension, Header};
use super::Qcow2;
use crate::block::{BlockDev, ExtentKind};
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::image::OptionDesc;

/// What to change; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderChanges {
    /// The new backing file (name and optional format), or `Some(None)` for none.
    pub backing: Option<Option<(String, Option<String>)>>,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
}

/// Applies `changes` to the header of the qcow2 image at `path`. Fails, changing nothing, when
/// the result would be invalid (lazy refcounts on version 2) or when a downgrade to version 2
/// would lose information (other refcount widths, v3-only features). A downgrade expands zero
/// clusters first, as QEMU does (see [`expand_zero_clusters`]).
pub fn rewrite_header(path: &Path, changes: &HeaderChanges) -> Result<()> {
    let file = HostFile::open(path, false)?;
    let len = file.len()?;
    let mut first = vec![0u8; (1usize << header::MAX_CLUSTER_BITS).min(len as usize)];
    file.read_at(&mut first, 0)?;
    let mut h = Header::parse(path, &first, len)?;
    let old_len = h.encode(path)?.len();
    if h.incompatible_features & (incompat::DIRTY | incompat::CORRUPT) != 0 {
        return Err(Error::unsupported(
            path,
            "the image is dirty or marked corrupt; repair it with check -r all first",
        ));
    }
    let unsupported = |what: &str| Err(Error::unsupported(path, what.to_string()));

    match changes.version {
        Some(3) if h.version == 2 => {
            h.version = 3;
            h.header_length = header::V3_HEADER_LEN;
            h.compression_type = 0;
            h.extra_fields = vec![0; (header::V3_HEADER_LEN - 105) as usize];
            if h.extension(ext::FEATURE_TABLE).is_none() {
                h.extensions.push(default_feature_table());
            }
        }
        Some(2) if h.version == 3 => {
            if h.incompatible_features & incompat::DATA_FILE != 0 {
                return unsupported("Cannot downgrade an image with a data file");
            }
            if h.incompatible_features != 0 || h.refcount_order != 4 {
                return unsupported(
                    "cannot downgrade to compat=0.10: the image uses version 3 features",
                );
            }
            if changes.lazy_refcounts != Some(false)
                && h.compatible_features & compat::LAZY_REFCOUNTS != 0
            {
                return unsupported(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                );
            }
            // Version 2 has no zero clusters; expanding them allocates, so the header (refcount
            // table offset, ...) is read again afterwards.
            expand_zero_clusters(path, h.backing_file.is_some())?;
            file.read_at(&mut first, 0)?;
            h = Header::parse(path, &first, file.len()?)?;
            h.version = 2;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.extensions.retain(|e| e.kind != ext::FEATURE_TABLE);
        }
        Some(2 | 3) | None => {}
        Some(v) => return unsupported(&format!("unknown qcow2 version {v}")),
    }
    if let Some(lazy) = changes.lazy_refcounts {
        if lazy && h.version < 3 {
            return Err(Error::argument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if lazy {
            h.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !compat::LAZY_REFCOUNTS;
        }
    }
    if let Some(backing) = &changes.backing {
        h.extensions.retain(|e| e.kind != ext::BACKING_FORMAT);
        match backing {
            Some((name, format)) => {
                if name.len() > header::MAX_BACKING_NAME as usize {
                    return Err(Error::argument("Backing file name too long"));
                }
                h.backing_file = Some(name.clone());
                if let Some(f) = format {
                    h.extensions.insert(
                        0,
                        Extension {
                            kind: ext::BACKING_FORMAT,
                            data: f.as_bytes().to_vec(),
                        },
                    );
                }
            }
            None => h.backing_file = None,
        }
    }
    let mut bytes = h.encode(path)?;
    // Clear what the old, longer header left behind (an old backing file name).
    if bytes.len() < old_len {
        bytes.resize(old_len, 0);
    }
    file.write_at(&bytes, 0)?;
    file.sync()
}

/// Turns the zero clusters of the active L1 table into what version 2 can express, as QEMU's
/// `qcow2_expand_zero_clusters` does before a downgrade: zero clusters without a host cluster
/// become unallocated when there is no backing file (that reads as zero there); all others
/// become data clusters holding zero bytes (in their own host cluster when they have one). The
/// image is opened without its backing file for this.
fn expand_zero_clusters(path: &Path, has_backing: bool) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let img = Qcow2::open_with(path, false, None)?;
    let size = img.size();
    let zeroes = vec![0u8; CHUNK.min(size) as usize];
    let mut off = 0;
    while off < size {
        let e = img.extent(off, size - off)?;
        if e.kind == ExtentKind::Zero && e.host_offset.is_none() && !has_backing {
            img.unallocate(off, off + e.length)?;
        } else if e.kind == ExtentKind::Zero {
            let mut at = off;
            while at < off + e.length {
                let n = CHUNK.min(off + e.length - at);
                img.write_at(&zeroes[..n as usize], at)?;
                at += n;
            }
        }
        off += e.length;
    }
    img.flush()
}

/// The key slot options of an encrypted image's `amend`, besides `encrypt.iter-time` (which
/// creation has too).
const KEYSLOT_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "encrypt.keyslot",
        kind: "num",
        help: "Select a single keyslot to modify explicitly",
    },
    OptionDesc {
        name: "encrypt.new-secret",
        kind: "str",
        help: "New secret to set in the matching keyslots. Empty string to erase",
    },
    OptionDesc {
        name: "encrypt.old-secret",
        kind: "str",
        help: "Select all keyslots that match this password",
    },
    OptionDesc {
        name: "encrypt.state",
        kind: "str",
        help: "Select new state of affected keyslots (active/inactive)",
    },
];

/// The creation options an existing image can change with `amend`.
const CHANGEABLE: &[&str] = &[
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];

/// The `-o` options `amend` takes for a qcow2 image, as qemu-img lists them: the creation options
/// an existing image can change, and the key slot options of an encrypted one.
pub fn amend_options_help() -> Vec<OptionDesc> {
    let create = crate::image::create_options_help(crate::Format::Qcow2);
    let changeable = create.iter().filter(|o| CHANGEABLE.contains(&o.name));
    changeable.chain(KEYSLOT_OPTIONS).copied().collect()
}

/// Every `-o` option `amend` knows for a qcow2 image: the creation options (most of which it
/// refuses to change, naming them) and the key slot options.
pub fn known_amend_options() -> Vec<OptionDesc> {
    let create = crate::image::create_options_help(crate::Format::Qcow2);
    create.iter().chain(KEYSLOT_OPTIONS).copied().collect()
}

/// Whether `name` is an option of [`crate::luks::LuksAmend`] (with the `encrypt.` prefix).
pub fn is_keyslot_option(name: &str) -> bool {
    name == "encrypt.iter-time" || KEYSLOT_OPTIONS.iter().any(|o| o.name == name)
}
