//! The qcow2 driver (qemu `docs/interop/qcow2.rst`).
//!
//! ```text
//!   guest offset ──> L1 table (in memory) ──> L2 table (l2_cache.rs) ──> host cluster
//!                                                       │
//!   allocation: refcount.rs (refcount table ──> refcount blocks), write.rs
//! ```
//!
//! Concurrency: lookups copy an entry out of the L2 cache and do the data I/O without holding a
//! lock other than a shared `free_gate`. Everything that changes a mapping (allocating writes,
//! zeroing, discard) holds the `meta` mutex; operations that release host clusters also take the
//! `free_gate` exclusively, so no in-flight I/O can land in a cluster that is being reused. New
//! data is written before the L2 entry that publishes it, and refcounts are raised before and
//! lowered after the entries that use them.
//!
//! Extended L2 entries (subclusters) are in subcluster.rs; data writes are checked against the
//! metadata clusters and refused, marking the image corrupt, when they would overwrite them
//! (overlap.rs).
//!
//! An image left dirty (lazy refcounts, the writer died) gets its refcounts rebuilt on the first
//! read-write open, as QEMU does; vdisk itself keeps refcounts exact and never sets the bit.
//!
//! Encrypted images (`encrypt.format=luks`) decrypt and encrypt data clusters on the way
//! (crypt.rs). Images with an external data file are read-only.

pub mod amend;
pub mod bitmaps;
pub mod check;
pub mod compressed;
mod create;
mod crypt;
mod data_file;
pub mod entry;
pub mod header;
mod l2_cache;
mod lru;
pub mod make_empty;
mod mapping;
pub mod metadata_prealloc;
mod overlap;
pub mod refcount;
pub mod refcount_width;
mod resize;
pub mod snapshot;
mod subcluster;
mod write;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use compressed::CompressionType;
pub use create::{create, CreateOptions};
use crypt::Crypt;
pub use crypt::{amend_encryption, amend_pairs, crypto_area, CryptoArea};
use header::{crypt_method, incompat, Header};
use l2_cache::L2Cache;
pub use make_empty::make_empty;
use mapping::Mapping;
use overlap::MetadataClusters;
use refcount::Refcounts;
pub use resize::resize_under;

use crate::block::{check_range, BlockDev, Capabilities, Extent, ExtentKind, ZeroFlags};
use crate::chain::{self, ChainCtx};
use crate::error::{Error, Result};
use crate::host_file::HostFile;
use crate::image::{open_layer, OpenOptions};
use crate::info::{file_node, BackingInfo, ChildInfo, FormatSpecific, NodeInfo, Qcow2Info};
use crate::luks::Passphrase;

/// Memory the L2 cache may use (QEMU's default maximum on Linux).
const L2_CACHE_BYTES: u64 = 32 << 20;

/// Fixed sizes derived from the header.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    cluster_bits: u32,
    /// log2 of the entries of one L2 table.
    l2_bits: u32,
    size: u64,
    version: u32,
    /// L2 entries are 128 bits wide and clusters have 32 subclusters.
    extended_l2: bool,
}

impl Geometry {
    fn new(header: &Header) -> Geometry {
        let extended_l2 = header.extended_l2();
        Geometry {
            cluster_bits: header.cluster_bits,
            l2_bits: header.cluster_bits - if extended_l2 { 4 } else { 3 },
            size: header.size,
            version: header.version,
            extended_l2,
        }
    }
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// The unit of allocation inside a cluster: a subcluster, or the whole cluster.
    fn subcluster_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 5 } else { 0 }
    }
    fn subcluster_size(&self) -> u64 {
        1 << self.subcluster_bits()
    }
    /// Entries of one L2 table.
    fn l2_entries(&self) -> usize {
        1 << self.l2_bits
    }
    fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    fn l1_index(&self, off: u64) -> usize {
        (off >> (self.cluster_bits + self.l2_bits)) as usize
    }
    fn l2_index(&self, off: u64) -> usize {
        ((off >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }
    /// Guest bytes mapped by one L2 table.
    fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }
}

/// Metadata that changes with allocation; its mutex is the metadata write lock.
#[derive(Debug)]
struct Meta {
    header: Header,
    refcounts: Refcounts,
    /// Where the next compressed cluster may be packed (just after the previous one).
    next_compressed_byte: Option<u64>,
    /// Guest clusters (first index, count) whose new host clusters are being written outside the
    /// lock; their mapping must not change until the writer publishes it (see `alloc_done`).
    allocating: Vec<(u64, u64)>,
}

impl Meta {
    fn allocating_overlaps(&self, first: u64, n: u64) -> bool {
        self.allocating
            .iter()
            .any(|&(f, k)| f < first + n && first < f + k)
    }
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    /// Shared with the LUKS header of an encrypted image.
    file: Arc<HostFile>,
    read_only: bool,
    geo: Geometry,
    l1_offset: u64,
    l1: Vec<AtomicU64>,
    l2_cache: L2Cache,
    /// Where metadata lives, for the overlap check of data writes.
    metadata: MetadataClusters,
    meta: Mutex<Meta>,
    /// Signalled (with `meta`) when an allocating write publishes its clusters.
    alloc_done: Condvar,
    free_gate: RwLock<()>,
    /// The backing image (opened read-only), unless opened without backing.
    backing: Option<Arc<dyn BlockDev>>,
    backing_info: Option<BackingInfo>,
    compression: CompressionType,
    /// The last decompressed cluster, keyed by its L2 entry.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// The external data file holding the guest data, when the image has one (read-only).
    data_file: Option<HostFile>,
    /// The image has an external data file that was left closed (an open for metadata only,
    /// [`Qcow2::open_metadata`]): data reads fail instead of reading the image file.
    data_file_closed: bool,
    /// The unlocked LUKS header of an encrypted image.
    crypt: Option<Crypt>,
    /// Persistent dirty bitmaps (bitmaps/); lock before `meta`.
    bitmaps: Mutex<bitmaps::BitmapSet>,
    /// Some bitmap records writes (a read-write open of an image with enabled bitmaps).
    tracking_bitmaps: AtomicBool,
}

impl Qcow2 {
    /// Opens a qcow2 image with its backing chain.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_secret(path, read_only, None)
    }

    /// [`Qcow2::open`], with the passphrase of an encrypted image (see
    /// [`Qcow2::open_with_secret`]).
    pub fn open_secret(path: &Path, read_only: bool, secret: Option<&Passphrase>) -> Result<Self> {
        Self::open_chain(path, read_only, Default::default(), secret)
    }

    /// [`Qcow2::open_secret`] with the backing chain and external data file opened only as
    /// `policy` allows.
    pub fn open_chain(
        path: &Path,
        read_only: bool,
        policy: chain::BackingPolicy,
        secret: Option<&Passphrase>,
    ) -> Result<Self> {
        let mut ctx = ChainCtx::new(policy);
        ctx.enter(path)?;
        Self::open_with_secret(path, read_only, Some(&mut ctx), secret)
    }

    /// Opens a qcow2 image; `chain` carries the images above it (already including this one), or
    /// is `None` to leave the backing file closed. An encrypted image fails to open: it needs
    /// [`Qcow2::open_with_secret`].
    pub fn open_with(path: &Path, read_only: bool, chain: Option<&mut ChainCtx>) -> Result<Self> {
        Self::open_with_secret(path, read_only, chain, None)
    }

    /// Opens a qcow2 image with its backing file closed (like [`Qcow2::open_with`] without a
    /// chain), opening the external data file it may name only if `policy` allows.
    pub fn open_alone(
        path: &Path,
        read_only: bool,
        policy: chain::BackingPolicy,
        secret: Option<&Passphrase>,
    ) -> Result<Self> {
        Self::open_under(path, read_only, None, policy, Key::Passphrase(secret))
    }

    /// [`Qcow2::open_with`], with the passphrase of an encrypted (`encrypt.format=luks`) image.
    /// Without one an encrypted image fails with `InvalidArgument` ("Parameter
    /// 'encrypt.key-secret' is required for cipher"); a wrong one with "Invalid password, cannot
    /// unlock any keyslot". The passphrase of an unencrypted image is ignored, and backing files
    /// are opened without it.
    pub fn open_with_secret(
        path: &Path,
        read_only: bool,
        chain: Option<&mut ChainCtx>,
        secret: Option<&Passphrase>,
    ) -> Result<Self> {
        Self::open_keyed(path, read_only, chain, Key::Passphrase(secret))
    }

    /// Closes the image and opens it again with its backing chain under `policy`, keeping the
    /// unlocked encryption header (no second key derivation); for changes that the open image
    /// does not follow (a new size).
    fn reopen(mut self, policy: chain::BackingPolicy) -> Result<Self> {
        let path = self.path().to_path_buf();
        let read_only = self.read_only;
        let key = match self.crypt.take() {
            Some(c) => Key::Unlocked(Box::new(c)),
            None => Key::Passphrase(None),
        };
        drop(self);
        let mut ctx = ChainCtx::new(policy);
        ctx.enter(&path)?;
        Self::open_keyed(&path, read_only, Some(&mut ctx), key)
    }

    /// Opens the image with the policy of `chain`, or QEMU's without one.
    fn open_keyed(
        path: &Path,
        read_only: bool,
        chain: Option<&mut ChainCtx>,
        key: Key,
    ) -> Result<Self> {
        let policy = chain.as_ref().map_or_else(Default::default, |c| c.policy);
        Self::open_under(path, read_only, chain, policy, key)
    }

    /// Opens the image; `chain` opens its backing chain (`None` leaves the backing file closed),
    /// and `policy` says whether the external data file it may name can be opened (an open for
    /// metadata only never opens it, as QEMU's `BDRV_O_NO_IO` open for `qemu-img info` does not).
    fn open_under(
        path: &Path,
        read_only: bool,
        chain: Option<&mut ChainCtx>,
        policy: chain::BackingPolicy,
        key: Key,
    ) -> Result<Self> {
        let file = Arc::new(HostFile::open(path, read_only)?);
        let file_len = file.len()?;
        let mut first = vec![0u8; (1usize << header::MAX_CLUSTER_BITS).min(file_len as usize)];
        file.read_at(&mut first, 0)?;
        let header = Header::parse(path, &first, file_len)?;
        check_features(path, &header, read_only)?;
        let crypto = crypto_area(path, &header, file_len)?;
        if crypto.is_some() && matches!(key, Key::Passphrase(None)) {
            return Err(crypt::secret_required(path));
        }
        if !read_only && header.incompatible_features & incompat::DIRTY != 0 {
            // Left dirty with lazy refcounts: QEMU rebuilds the refcounts on the first
            // read-write open, and so do we, before anything else touches the image.
            drop(file);
            let report = Self::check(path, Some(check::Repair::All))?;
            if let Some(why) = report.failure_line() {
                return Err(Error::corrupt(
                    path,
                    0,
                    format!("repairing the refcounts of a dirty image failed: {why}"),
                ));
            }
            return Self::open_under(path, read_only, chain, policy, key);
        }
        let metadata_only = matches!(key, Key::MetadataOnly);
        let crypt = match (crypto, key) {
            (Some(area), Key::Passphrase(Some(pw))) => Some(Crypt::unlock(&file, area, pw)?),
            (Some(area), Key::MetadataOnly) => Some(Crypt::locked(&file, area)?),
            (Some(area), Key::Unlocked(c)) if c.area == area => Some(*c),
            (Some(_), Key::Unlocked(_)) => {
                return Err(Error::invalid(
                    path,
                    "the encryption header moved while the image was reopened",
                ))
            }
            _ => None,
        };
        let cluster_bits = header.cluster_bits;
        let geo = Geometry::new(&header);
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut raw, header.l1_table_offset)?;
        let l1: Vec<AtomicU64> = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().unwrap())))
            .collect();
        let refcounts = Refcounts::load(
            &file,
            cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )?;
        let metadata = MetadataClusters::load(&file, &header, &l1)?;
        if let Some(c) = &crypt {
            let area = c.area;
            metadata.add(
                area.offset,
                area.clusters(header.cluster_size()),
                overlap::MetaKind::CryptoHeader,
            );
        }
        let backing_info = header.backing_file.as_ref().map(|name| BackingInfo {
            filename: name.clone(),
            full_filename: chain::full_name(path, name),
            format: header.backing_format(),
        });
        let backing = match (&header.backing_file, chain) {
            (Some(name), Some(ctx)) => {
                ctx.policy
                    .check_backing(path, name, header.backing_format().as_deref())?;
                let bpath = chain::resolve_backing(path, name)?;
                let format =
                    chain::backing_format(path, header.backing_format().as_deref(), &bpath)?;
                let opts = OpenOptions {
                    format: Some(format),
                    read_only: true,
                    no_backing: false,
                    backing_policy: ctx.policy,
                };
                Some(open_layer(&bpath, opts, ctx).map_err(|e| Error::Backing {
                    path: path.to_path_buf(),
                    backing: bpath.clone(),
                    source: Box::new(e),
                })?)
            }
            _ => None,
        };
        let data_file_closed =
            metadata_only && header.incompatible_features & incompat::DATA_FILE != 0;
        let data_file = if data_file_closed {
            None
        } else {
            data_file::open_data_file(path, &header, policy, read_only)?
        };
        let bitmap_set = bitmaps::BitmapSet::load(&file, &header)?;
        let cache_tables = (L2_CACHE_BYTES >> cluster_bits).max(16) as usize;
        let img = Qcow2 {
            file,
            read_only,
            geo,
            l1_offset: header.l1_table_offset,
            l1,
            l2_cache: L2Cache::new(cache_tables),
            metadata,
            compression: CompressionType::from_header(header.compression_type)
                .unwrap_or(CompressionType::Zlib),
            meta: Mutex::new(Meta {
                header,
                refcounts,
                next_compressed_byte: None,
                allocating: Vec::new(),
            }),
            alloc_done: Condvar::new(),
            free_gate: RwLock::new(()),
            backing,
            backing_info,
            last_compressed: Mutex::new(None),
            data_file,
            data_file_closed,
            crypt,
            bitmaps: Mutex::new(bitmap_set),
            tracking_bitmaps: AtomicBool::new(false),
        };
        if !read_only {
            img.clear_autoclear_bits()?;
            img.start_tracking_bitmaps()?;
        }
        Ok(img)
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    /// A writer that does not maintain the autoclear features must clear them (qcow2.rst);
    /// vdisk maintains the bitmaps one (bitmaps/) and the raw external data file one
    /// (data_file.rs).
    fn clear_autoclear_bits(&self) -> Result<()> {
        let mut keep = if self.bitmaps.lock().unwrap().is_empty() {
            0
        } else {
            header::autoclear::BITMAPS
        };
        if self.data_file.is_some() {
            keep |= header::autoclear::DATA_FILE_RAW;
        }
        let mut meta = self.meta.lock().unwrap();
        if meta.header.autoclear_features & !keep != 0 {
            meta.header.autoclear_features &= keep;
            self.write_header(&meta.header)?;
        }
        Ok(())
    }

    fn write_header(&self, header: &Header) -> Result<()> {
        let bytes = header.encode(self.path())?;
        self.file.write_at(&bytes, 0)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.path().to_path_buf(),
            });
        }
        if let Some(at) = self.metadata.refused() {
            return Err(Error::corrupt(
                self.path(),
                at,
                "the image was marked corrupt when a write overlapping metadata was refused; it is read-only now",
            ));
        }
        Ok(())
    }

    /// The header as it is now.
    pub fn header(&self) -> Header {
        self.meta.lock().unwrap().header.clone()
    }

    /// Every refcount of the image (cluster index to value); for consistency checks.
    pub fn refcounts(&self) -> Result<std::collections::HashMap<u64, u64>> {
        self.meta.lock().unwrap().refcounts.all(&self.file)
    }
}

/// How an encrypted image gets its key when it is opened.
enum Key<'a> {
    Passphrase(Option<&'a Passphrase>),
    /// The unlocked header of the same image, opened before.
    Unlocked(Box<Crypt>),
    /// No key: the encryption header is read for `info` only (see [`Qcow2::open_metadata`]).
    MetadataOnly,
}

fn check_features(path: &Path, h: &Header, read_only: bool) -> Result<()> {
    let known = incompat::DIRTY
        | incompat::CORRUPT
        | incompat::COMPRESSION
        | incompat::EXTL2
        | incompat::DATA_FILE;
    let unsupported = |what: String| Err(Error::unsupported(path, what));
    if h.extended_l2() && h.cluster_bits < 14 {
        // 32 subclusters must be at least 512 bytes each (qcow2.rst, "cluster_bits").
        return unsupported(format!(
            "Unsupported subcluster size: {}",
            h.cluster_size() / u64::from(entry::SUBCLUSTERS)
        ));
    }
    let has_bit = h.incompatible_features & incompat::COMPRESSION != 0;
    if has_bit && h.compression_type == 0 {
        return Err(Error::invalid(
            path,
            "compression type bit is set but the compression type field is zero (zlib)",
        ));
    }
    if !has_bit && h.compression_type != 0 {
        return Err(Error::invalid(
            path,
            format!(
                "compression type {} needs the compression type incompatible bit",
                h.compression_type
            ),
        ));
    }
    if CompressionType::from_header(h.compression_type).is_none() {
        return unsupported(format!("Unknown compression type {}", h.compression_type));
    }
    if let Some(names) = h.describe_unknown_incompat(known) {
        return unsupported(format!("Unsupported qcow2 feature(s): {names}"));
    }
    if h.crypt_method > crypt_method::LUKS {
        return unsupported(format!("Unsupported encryption method: {}", h.crypt_method));
    }
    if read_only {
        return Ok(());
    }
    if h.incompatible_features & incompat::CORRUPT != 0 {
        return Err(Error::corrupt(
            path,
            72,
            "image is marked corrupt; it can only be opened read-only (repair it with check -r all)",
        ));
    }
    Ok(())
}

impl BlockDev for Qcow2 {
    fn capabilities(&self) -> Capabilities {
        let cs = self.geo.cluster_size() as u32;
        let sub = self.geo.subcluster_size() as u32;
        Capabilities {
            size: self.geo.size,
            // Encryption works on whole sectors.
            min_block: if self.crypt.is_some() {
                crypt::SECTOR as u32
            } else {
                1
            },
            preferred_block: cs,
            read_only: self.read_only,
            discard_granularity: sub,
            zero_granularity: sub,
            flush_persists: true,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), offset, buf.len() as u64, self.geo.size)?;
        let _gate = self.free_gate.read().unwrap();
        let mut done = 0usize;
        while done < buf.len() {
            let cur = offset + done as u64;
            let m = self.lookup(cur, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + m.len as usize];
            match m.entry {
                entry::L2Entry::Data { host, .. } => {
                    self.read_data(chunk, host + self.geo.in_cluster(cur))?
                }
                entry::L2Entry::Unallocated => self.read_backing(chunk, cur)?,
                entry::L2Entry::Zero { .. } => chunk.fill(0),
                entry::L2Entry::Compressed(raw) => {
                    let at = self.geo.in_cluster(cur) as usize;
                    let data = self.read_compressed(raw, cur)?;
                    chunk.copy_from_slice(&data[at..at + chunk.len()]);
                }
            }
            done += m.len as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), offset, buf.len() as u64, self.geo.size)?;
        self.mark_dirty(offset, buf.len() as u64);
        let _rmw = self.write_guard(offset, buf.len() as u64);
        let mut done = 0usize;
        while done < buf.len() {
            let cur = offset + done as u64;
            let rest = &buf[done..];
            done += match self.write_in_place(rest, cur)? {
                Some(n) => n,
                None => self.write_allocating(cur, rest)? as usize,
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync_data_file()?;
        self.file.sync()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), offset, len, self.geo.size)?;
        self.mark_dirty(offset, len);
        self.zero_range(offset, len, flags)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(self.path(), offset, len, self.geo.size)?;
        self.mark_dirty(offset, len);
        self.discard_range(offset, len)
    }

    fn extent(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(self.path(), offset, len, self.geo.size)?;
        let Mapping {
            entry,
            len: length,
            host,
        } = self.lookup(offset, len)?;
        if entry == entry::L2Entry::Unallocated {
            if let Some(b) = &self.backing {
                let bsize = b.size();
                if offset < bsize {
                    let mut e = b.extent(offset, length.min(bsize - offset))?;
                    e.depth += 1;
                    return Ok(e);
                }
            }
        }
        let kind = match entry {
            entry::L2Entry::Unallocated => ExtentKind::Unallocated,
            entry::L2Entry::Zero { .. } => ExtentKind::Zero,
            entry::L2Entry::Data { .. } | entry::L2Entry::Compressed(_) => ExtentKind::Data,
        };
        Ok(Extent {
            offset,
            length,
            kind,
            depth: 0,
            // Encrypted data is not stored plainly at any host offset (nor does QEMU report one).
            host_offset: host.filter(|_| self.crypt.is_none()),
            compressed: matches!(entry, entry::L2Entry::Compressed(_)),
        })
    }

    fn compress_cluster(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check_compression_allowed()?;
        self.check_no_data_file()?;
        if data.len() as u64 != self.geo.cluster_size() {
            return Err(Error::argument(format!(
                "compressed writes take whole clusters of {} bytes",
                self.geo.cluster_size()
            )));
        }
        Ok(compressed::compress(self.compression, data))
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_compression_allowed()?;
        self.check_no_data_file()?;
        let cs = self.geo.cluster_size();
        if offset % cs != 0 || compressed.len() as u64 >= cs {
            return Err(Error::argument(format!(
                "compressed cluster at {offset:#x} must be cluster aligned and smaller than a cluster"
            )));
        }
        check_range(self.path(), offset, 1, self.geo.size)?;
        self.mark_dirty(offset, cs);
        self.store_compressed(offset, compressed)
    }

    fn compressed_cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn info(&self) -> Result<NodeInfo> {
        let h = self.header();
        let file = file_node(self.path(), self.file.file())?;
        let v3 = h.version >= 3;
        let specific = Qcow2Info {
            compat: if v3 { "1.1" } else { "0.10" }.to_string(),
            compression_type: Some(
                if h.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                }
                .into(),
            ),
            lazy_refcounts: v3
                .then_some(h.compatible_features & header::compat::LAZY_REFCOUNTS != 0),
            bitmaps: Some(self.bitmap_infos()).filter(|b| !b.is_empty()),
            refcount_bits: h.refcount_bits(),
            corrupt: v3.then_some(h.incompatible_features & incompat::CORRUPT != 0),
            extended_l2: v3.then_some(h.extended_l2()),
            encrypt: self.encryption_info().map(Box::new),
        };
        Ok(NodeInfo {
            filename: file.filename.clone(),
            format: "qcow2".to_string(),
            virtual_size: h.size,
            actual_size: file.actual_size,
            cluster_size: Some(h.cluster_size()),
            dirty_flag: h.incompatible_features & incompat::DIRTY != 0,
            encrypted: self.crypt.is_some().then_some(true),
            backing: self.backing_info.clone(),
            format_specific: Some(FormatSpecific::Qcow2(specific)),
            children: vec![ChildInfo {
                name: "file".to_string(),
                info: file,
            }],
            snapshots: self.snapshot_infos()?,
        })
    }
}

impl Qcow2 {
    /// Takes the metadata lock once no allocating write is in flight on guest bytes
    /// `offset..offset+len` (whole clusters).
    fn lock_meta_for(&self, offset: u64, len: u64) -> MutexGuard<'_, Meta> {
        let cb = self.geo.cluster_bits;
        let first = offset >> cb;
        let n = ((offset + len.max(1)).div_ceil(1 << cb)) - first;
        let mut meta = self.meta.lock().unwrap();
        while meta.allocating_overlaps(first, n) {
            meta = self.alloc_done.wait(meta).unwrap();
        }
        meta
    }

    fn l1_entry(&self, index: usize) -> u64 {
        self.l1[index].load(Ordering::Acquire)
    }

    /// Reads guest bytes that this layer does not allocate: from the backing file, zero past its
    /// end or without one.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Whether unallocated clusters read as zero (no backing data can show through).
    fn unallocated_reads_zero(&self, offset: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| offset >= b.size())
    }
}
