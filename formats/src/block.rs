//! The block device trait every driver implements.
//!
//! ```text
//!   NBD connections ─┐
//!   virtio queues  ──┼──> Arc<dyn BlockDev> ──> Qcow2 ──> host file
//!   convert/bench  ──┘                     └──> Raw  ──> host file
//! ```
//!
//! All methods take `&self` and are safe to call from many threads at once: one open image serves
//! every NBD connection and every virtio queue without a global lock on the data path. Offsets and
//! lengths are guest bytes. A request that reaches past [`BlockDev::size`] fails with
//! `ErrorKind::OutOfRange`; a zero-length request succeeds and does nothing. Transfers are full:
//! a read fills the whole buffer or fails.

use crate::error::Result;
use crate::info::NodeInfo;

/// What a device can do, filled once at open; the NBD handshake and the virtio-blk config space are
/// both built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Virtual size in bytes.
    pub size: u64,
    /// Smallest I/O size that needs no read-modify-write by the driver (1 for byte-granular files).
    pub min_block: u32,
    /// Preferred I/O size (the cluster size for qcow2).
    pub preferred_block: u32,
    /// The image cannot be written.
    pub read_only: bool,
    /// Granularity at which `discard` actually releases space; smaller pieces are ignored.
    pub discard_granularity: u32,
    /// Granularity at which `write_zeroes` can avoid writing data.
    pub zero_granularity: u32,
    /// Whether `flush` reaches stable storage (false for purely in-memory devices).
    pub flush_persists: bool,
}

/// Flags of [`BlockDev::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The driver may release the space (the range must still read back as zero).
    pub may_unmap: bool,
    /// Fail with `ErrorKind::Unsupported` rather than write zero bytes the slow way.
    pub fast_only: bool,
}

/// What a run of guest bytes is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data is stored in this layer (it may happen to be zero bytes).
    Data,
    /// Known to read as zero in this layer, without reading data.
    Zero,
    /// Not allocated anywhere in the chain: reads as zero, and an overlay would show its backing.
    Unallocated,
}

/// One contiguous run of guest bytes with a single mapping state, as returned by
/// [`BlockDev::extent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First guest byte of the run (the offset asked for).
    pub offset: u64,
    /// Length of the run in bytes; at least 1 and at most the length asked for.
    pub length: u64,
    pub kind: ExtentKind,
    /// Index in the backing chain of the layer that resolved the run (0 = this image). For
    /// `Unallocated`, the depth of the deepest layer.
    pub depth: u32,
    /// Byte offset in the host file where the run's data starts, when it is stored plainly there
    /// (not for compressed, encrypted or unallocated data). Consecutive guest bytes of one run are at
    /// consecutive host offsets.
    pub host_offset: Option<u64>,
    /// The run is stored compressed.
    pub compressed: bool,
}

/// A thread-safe virtual block device.
///
/// The trait is object safe and used as `Arc<dyn BlockDev>`.
pub trait BlockDev: Send + Sync + std::fmt::Debug {
    /// Size and abilities of the device; cheap, no I/O.
    fn capabilities(&self) -> Capabilities;

    /// Virtual size in bytes.
    fn size(&self) -> u64 {
        self.capabilities().size
    }

    /// Reads `buf.len()` bytes at `offset`. Unallocated and zero ranges read as zero bytes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`. Data is durable only after [`BlockDev::flush`].
    /// Concurrent writes to overlapping ranges leave either writer's bytes, never a mix from outside
    /// those ranges.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable (metadata included).
    fn flush(&self) -> Result<()>;

    /// Makes `len` bytes at `offset` read back as zero. With `may_unmap` the space may be released;
    /// with `fast_only` the call fails with `ErrorKind::Unsupported` instead of writing zero bytes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Tells the device the range is no longer needed. Afterwards the contents of the range are
    /// undefined (each byte reads either its old value or zero) but never expose data of a backing
    /// file. Whole allocation units (see `Capabilities::discard_granularity`) are released; partial
    /// ones may be left alone.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Describes the run of bytes starting at `offset`, at most `len` long (`len` > 0, within the
    /// device). Returns one contiguous run with a single state; it may be shorter than the true run
    /// when finding the end would need extra metadata I/O.
    fn extent(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Writes do CPU work worth spreading over threads (encryption) and may land in any order:
    /// `convert` then lets every worker write its own chunks. False for plain files, where the
    /// kernel serializes writes to one file anyway, and for qcow2, where the order of writes
    /// decides where clusters are allocated.
    fn parallel_writes(&self) -> bool {
        false
    }

    /// The cluster size when the format can store compressed clusters (`convert -c`).
    fn compressed_cluster_size(&self) -> Option<u64> {
        None
    }

    /// Compresses one whole cluster for [`BlockDev::write_compressed`]. CPU work only: safe to
    /// run on many threads at once. `None` when the data does not shrink (write it plainly).
    fn compress_cluster(&self, _data: &[u8]) -> Result<Option<Vec<u8>>> {
        Err(crate::Error::argument(
            "this image format cannot store compressed clusters",
        ))
    }

    /// Stores data made by [`BlockDev::compress_cluster`] as the cluster at `offset` (cluster
    /// aligned; the cluster must not be allocated in this layer). Compressed data is packed in the
    /// order of these calls.
    fn write_compressed(&self, _offset: u64, _compressed: &[u8]) -> Result<()> {
        Err(crate::Error::argument(
            "this image format cannot store compressed clusters",
        ))
    }

    /// Static description of the image for `info`: format, sizes, format-specific data and the
    /// protocol layer below it.
    fn info(&self) -> Result<NodeInfo>;
}

/// Checks that `offset..offset+len` lies within `size`; used by every driver.
pub(crate) fn check_range(path: &std::path::Path, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}
