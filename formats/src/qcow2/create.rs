//! Creating qcow2 images.
//!
//! Layout, as QEMU lays out a fresh image: header cluster, refcount table, refcount blocks, L1
//! table; with preallocation the L2 tables and data clusters follow; an encrypted image has its
//! LUKS header in the clusters after all that.

use std::path::Path;
use std::sync::Arc;

use super::compressed::CompressionType;
use super::crypt::{self, Crypt, CryptoArea};
use super::entry::COPIED;
use super::header::{
    self, default_feature_table, Extension, Header, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
};
use super::refcount::set_entry;
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::luks::LuksCreateOptions;
use crate::Preallocation;

/// Options of `create -f qcow2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size; `None` takes the size of the backing file.
    pub size: Option<u64>,
    pub cluster_size: u64,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`).
    pub version: u32,
    pub refcount_bits: u32,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    /// Backing file name, stored as given (relative names are relative to the new image).
    pub backing_file: Option<String>,
    /// Backing format, stored in the backing-format header extension.
    pub backing_format: Option<String>,
    /// Open the backing file to check it (and to take its size); `create -u` turns this off.
    pub open_backing: bool,
    /// How compressed clusters are compressed.
    pub compression_type: CompressionType,
    /// Extended L2 entries: 32 subclusters per cluster (`extended_l2=on`).
    pub extended_l2: bool,
    /// Encrypt the image with a LUKS1 header (`encrypt.format=luks` and the other `encrypt.*`
    /// options). `key_secret` names the secret object; the caller resolves it and stores the
    /// passphrase in `passphrase`, as for [`crate::CreateOptions::Luks`].
    pub encrypt: Option<LuksCreateOptions>,
    /// An external data file for the guest data (`data_file`): its name as stored in the image,
    /// resolved like a backing file name; the file is created (or replaced) with the image.
    pub data_file: Option<String>,
    /// The data file stays a valid raw image on its own (`data_file_raw`); implies metadata
    /// preallocation, as in QEMU.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            backing_file: None,
            backing_format: None,
            open_backing: true,
            compression_type: CompressionType::Zlib,
            extended_l2: false,
            encrypt: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

impl CreateOptions {
    /// Checks the options the way qemu-img does, with its messages.
    pub fn validate(&self) -> Result<()> {
        let cs = self.cluster_size;
        if self.extended_l2 && self.version < 3 {
            return Err(Error::argument(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::argument(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if self.extended_l2 && cs < 16384 {
            return Err(Error::argument(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Error::argument(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if self.version < 3 && self.refcount_bits != 16 {
            return Err(Error::argument(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        if self.version < 3 && self.lazy_refcounts {
            return Err(Error::argument(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        if self.version < 3 && self.compression_type != CompressionType::Zlib {
            return Err(Error::argument(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::argument("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::argument(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if self.data_file.is_some() && self.version < 3 {
            return Err(Error::argument(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.size.is_some_and(|s| s % 512 != 0) {
            return Err(Error::argument(
                "Image size must be a multiple of 512 bytes",
            ));
        }
        if let Some(e) = &self.encrypt {
            e.validate()?;
            if e.version != crate::luks::LuksVersion::V1 {
                return Err(Error::argument(
                    "qcow2 encryption uses LUKS1 headers (as QEMU does)",
                ));
            }
        }
        Ok(())
    }
}

/// Where each structure of the new image goes, in clusters.
#[derive(Debug)]
struct Layout {
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_entries: u64,
    l2: u64,
    l2_count: u64,
    data: u64,
    data_clusters: u64,
    /// The LUKS header of an encrypted image (its clusters end the image).
    crypto: u64,
    total: u64,
}

/// Entries of one L2 table (extended entries are 16 bytes).
fn l2_entries(opts: &CreateOptions) -> u64 {
    opts.cluster_size / if opts.extended_l2 { 16 } else { 8 }
}

/// Where everything goes; `crypto_bytes` is the size of the LUKS header (0 without encryption).
fn layout(opts: &CreateOptions, size: u64, crypto_bytes: u64) -> Result<Layout> {
    let cs = opts.cluster_size;
    let crypto_clusters = crypto_bytes.div_ceil(cs);
    let l2_entries = l2_entries(opts);
    let l1_entries = size.div_ceil(cs * l2_entries);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(Error::argument(format!(
            "Image size {size} is too large for cluster size {cs} (the L1 table would exceed {MAX_L1_BYTES} bytes)"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let prealloc = opts.preallocation != Preallocation::Off;
    let (l2_count, data_clusters) = match (prealloc, &opts.data_file) {
        (false, _) => (0, 0),
        // The data clusters are those of the data file.
        (true, Some(_)) => (l1_entries, 0),
        (true, None) => (l1_entries, size.div_ceil(cs)),
    };
    let fixed = 1 + l1_clusters + l2_count + data_clusters + crypto_clusters;
    let (rt, rb) = super::refcount::self_covering(fixed, cs, u64::from(opts.refcount_bits));
    if rt * cs > MAX_REFTABLE_BYTES {
        return Err(Error::argument(format!(
            "Image size {size} is too large for cluster size {cs} and refcount_bits {}",
            opts.refcount_bits
        )));
    }
    let reftable = 1;
    let refblocks = reftable + rt;
    let l1 = refblocks + rb;
    let l2 = l1 + l1_clusters;
    let data = l2 + l2_count;
    let crypto = data + data_clusters;
    Ok(Layout {
        reftable,
        reftable_clusters: rt,
        refblocks,
        refblock_count: rb,
        l1,
        l1_entries,
        l2,
        l2_count,
        data,
        data_clusters,
        crypto,
        total: crypto + crypto_clusters,
    })
}

/// The virtual size: as given, or the backing file's. Checks that the backing file opens (unless
/// told not to) and that its format is named, as qemu-img 10 requires.
fn resolve_size(path: &Path, opts: &CreateOptions) -> Result<u64> {
    let Some(name) = &opts.backing_file else {
        return opts
            .size
            .ok_or_else(|| Error::argument("Image creation needs a size parameter"));
    };
    let bpath = crate::chain::resolve_backing(path, name)?;
    let Some(format) = &opts.backing_format else {
        let detected = crate::image::probe(&bpath)
            .map(|f| format!("\nDetected format of {f}."))
            .unwrap_or_default();
        return Err(Error::argument(format!(
            "{}: Backing file specified without backing format{detected}",
            path.display()
        )));
    };
    if !opts.open_backing {
        return opts
            .size
            .ok_or_else(|| Error::argument("Image creation needs a size parameter"));
    }
    let open_opts = crate::image::OpenOptions {
        format: Some(crate::image::Format::from_name(format)?),
        read_only: true,
        no_backing: false,
        // The backing file is the one the user names; QEMU follows its chain.
        backing_policy: crate::chain::BackingPolicy::Follow,
    };
    let backing = crate::image::open(&bpath, open_opts).map_err(|e| Error::Backing {
        path: path.to_path_buf(),
        backing: bpath.clone(),
        source: Box::new(e),
    })?;
    Ok(opts.size.unwrap_or_else(|| backing.size()))
}

/// Creates a qcow2 image at `path` (an existing file is replaced).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    opts.validate()?;
    let mut raw_prealloc;
    let opts = if opts.data_file_raw && opts.preallocation == Preallocation::Off {
        // The data file must read like the image: every cluster is mapped to it (QEMU).
        raw_prealloc = opts.clone();
        raw_prealloc.preallocation = Preallocation::Metadata;
        &raw_prealloc
    } else {
        opts
    };
    let crypto_bytes = match &opts.encrypt {
        Some(e) => crypt::check_create(e)?,
        None => 0,
    };
    let size = resolve_size(path, opts)?;
    let lay = layout(opts, size, crypto_bytes)?;
    let cs = opts.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let file = Arc::new(HostFile::create(path)?);
    let crypto_area = opts.encrypt.as_ref().map(|_| CryptoArea {
        offset: lay.crypto * cs,
        length: crypto_bytes,
    });

    let v3 = opts.version >= 3;
    let header = Header {
        version: opts.version,
        cluster_bits,
        size,
        crypt_method: if crypto_area.is_some() {
            header::crypt_method::LUKS
        } else {
            header::crypt_method::NONE
        },
        l1_size: lay.l1_entries as u32,
        l1_table_offset: lay.l1 * cs,
        refcount_table_offset: lay.reftable * cs,
        refcount_table_clusters: lay.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.compression_type != CompressionType::Zlib {
            header::incompat::COMPRESSION
        } else {
            0
        } | if opts.extended_l2 {
            header::incompat::EXTL2
        } else {
            0
        } | if opts.data_file.is_some() {
            header::incompat::DATA_FILE
        } else {
            0
        },
        compatible_features: if opts.lazy_refcounts {
            header::compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if opts.data_file_raw {
            header::autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if v3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: opts.compression_type.header_value(),
        extra_fields: if v3 { vec![0; 7] } else { Vec::new() },
        extensions: opts
            .backing_format
            .iter()
            .map(|f| Extension {
                kind: header::ext::BACKING_FORMAT,
                data: f.as_bytes().to_vec(),
            })
            .chain(opts.data_file.iter().map(|name| Extension {
                kind: header::ext::DATA_FILE,
                data: name.as_bytes().to_vec(),
            }))
            .chain(crypto_area.map(|a| Extension {
                kind: header::ext::CRYPTO,
                data: a.encode(),
            }))
            .chain(v3.then(default_feature_table))
            .collect(),
        backing_file: opts.backing_file.clone(),
    };
    let mut cluster0 = header.encode(path)?;
    cluster0.resize(cs as usize, 0);
    file.write_at(&cluster0, 0)?;

    // Refcount table and blocks: clusters 0..total have refcount 1. The table is written whole,
    // as QEMU writes it (what the file allocates feeds QEMU's metadata preallocation guess).
    let mut table: Vec<u8> = (0..lay.refblock_count)
        .flat_map(|i| ((lay.refblocks + i) * cs).to_be_bytes())
        .collect();
    table.resize((lay.reftable_clusters * cs) as usize, 0);
    file.write_at(&table, lay.reftable * cs)?;
    let per_block = cs * 8 / u64::from(opts.refcount_bits);
    let order = opts.refcount_bits.trailing_zeros();
    for b in 0..lay.refblock_count {
        let mut block = vec![0u8; cs as usize];
        let first = b * per_block;
        for c in first..lay.total.min(first + per_block) {
            set_entry(&mut block, order, (c - first) as usize, 1);
        }
        file.write_at(&block, (lay.refblocks + b) * cs)?;
    }

    // L1 table, and with preallocation every L2 table and data cluster.
    let l1: Vec<u8> = (0..lay.l1_entries)
        .flat_map(|i| {
            let e = if i < lay.l2_count {
                ((lay.l2 + i) * cs) | COPIED
            } else {
                0
            };
            e.to_be_bytes()
        })
        .collect();
    file.write_at(&l1, lay.l1 * cs)?;
    let l2_entries = l2_entries(opts);
    for t in 0..lay.l2_count {
        let first = t * l2_entries;
        // Extended entries get an empty subcluster bitmap: the clusters are reserved, nothing is
        // written in them yet (as QEMU preallocates them).
        let bitmap = opts.extended_l2.then_some(0u64);
        let table: Vec<u8> = (first..first + l2_entries)
            .flat_map(|c| {
                let e = match &opts.data_file {
                    // Guest cluster c sits at the same offset of the data file.
                    Some(_) if c * cs < size => (c * cs) | COPIED,
                    None if c < lay.data_clusters => ((lay.data + c) * cs) | COPIED,
                    _ => 0,
                };
                std::iter::once(e).chain(bitmap).flat_map(u64::to_be_bytes)
            })
            .collect();
        file.write_at(&table, (lay.l2 + t) * cs)?;
    }
    let data_bytes = lay.data_clusters * cs;
    match opts.preallocation {
        Preallocation::Off if crypto_area.is_some() => file.set_len(lay.total * cs)?,
        Preallocation::Off => {
            let l1_end = lay.l1 * cs + (lay.l1_entries * 8).next_multiple_of(512).max(512);
            file.set_len(l1_end)?;
        }
        Preallocation::Metadata => file.set_len(lay.total * cs)?,
        Preallocation::Falloc => {
            file.allocate(lay.data * cs, data_bytes)?;
            file.set_len(lay.total * cs)?;
        }
        Preallocation::Full => {
            file.write_zero_bytes(lay.data * cs, data_bytes)?;
            file.set_len(lay.total * cs)?;
        }
    }
    if let Some(name) = &opts.data_file {
        create_data_file(path, name, size, opts.preallocation)?;
    }
    if let (Some(area), Some(e)) = (crypto_area, &opts.encrypt) {
        // The header clusters read as zero (a fresh file) before the header is written.
        Crypt::format(&file, area, e)?;
    }
    file.sync()
}

/// Creates (or replaces) the external data file `name` of the new image at `path`: `size` bytes,
/// sparse unless `prealloc` reserves (falloc) or writes (full) them. A sparse one gets its first
/// block written, as QEMU's file driver does for new files (`allocate_first_block`), so that
/// `map` sees the same allocation.
fn create_data_file(path: &Path, name: &str, size: u64, prealloc: Preallocation) -> Result<()> {
    let data_path = crate::chain::full_name(path, name);
    let file = HostFile::create(Path::new(&data_path))?;
    file.set_len(size)?;
    match prealloc {
        Preallocation::Falloc => file.allocate(0, size)?,
        Preallocation::Full => file.write_zero_bytes(0, size)?,
        Preallocation::Off | Preallocation::Metadata if size > 0 => {
            let first_block = if size < 4096 { 512 } else { 4096 };
            file.write_at(&vec![0u8; first_block.min(size as usize)], 0)?;
        }
        Preallocation::Off | Preallocation::Metadata => {}
    }
    file.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_qemu() {
        let lay = layout(&CreateOptions::default(), 1 << 30, 0).unwrap();
        assert_eq!(
            (lay.reftable, lay.refblocks, lay.l1, lay.total),
            (1, 2, 3, 4)
        );
        assert_eq!(lay.l1_entries, 2);
    }

    #[test]
    fn the_luks_header_follows_the_initial_metadata_as_in_qemu() {
        // qemu-img 10: AES-256-XTS header of 0x1f9000 bytes at cluster 4, file of 36 clusters.
        let lay = layout(&CreateOptions::default(), 64 << 20, 0x1f_9000).unwrap();
        assert_eq!((lay.l1, lay.crypto, lay.total), (3, 4, 36));
        let prealloc = CreateOptions {
            preallocation: Preallocation::Metadata,
            ..Default::default()
        };
        let lay = layout(&prealloc, 4 << 20, 0x1f_9000).unwrap();
        assert_eq!(lay.crypto * 65536, 0x45_0000, "after the preallocated data");
    }

    #[test]
    fn encryption_takes_luks1_only() {
        let opts = |version| CreateOptions {
            size: Some(1 << 20),
            encrypt: Some(LuksCreateOptions {
                version,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(opts(crate::luks::LuksVersion::V1).validate().is_ok());
        let err = opts(crate::luks::LuksVersion::V2).validate().unwrap_err();
        assert!(err.to_string().contains("LUKS1"), "{err}");
    }

    #[test]
    fn small_clusters_get_enough_refcount_blocks() {
        let opts = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        };
        let lay = layout(&opts, 8 << 30, 0).unwrap();
        let per_block = 512 * 8 / 64;
        assert!(lay.refblock_count * per_block >= lay.total);
        assert!(lay.reftable_clusters * 64 >= lay.refblock_count);
    }
}
