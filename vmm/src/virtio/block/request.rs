//! One virtio-blk request: parse a descriptor chain, execute it against the [`BlockDev`],
//! produce the status for the completion (virtio 1.2, 5.2.6 "Device Operation").
//!
//! ```text
//!  descriptor chain ──parse──> Request { kind, sector, data segments, status address }
//!                                 │
//!                              execute (BlockDev read_at / write_at / flush / discard ...)
//!                                 │
//!                              Completion { status, bytes written } ──> status byte + used ring
//! ```
//!
//! Nothing the guest puts in a chain can make the host touch memory outside guest RAM or panic:
//! every descriptor is checked against guest memory before anything is executed, and every
//! copy goes through the bounds-checked [`Bytes`] accessors. A chain without a writable status
//! byte cannot be answered and is returned with a used length of 0; any other defect answers
//! `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vdisk_formats::{BlockDev, ErrorKind, ZeroFlags};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes per virtio-blk sector, whatever the advertised block size (5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// Length of `struct virtio_blk_req`'s header: type, reserved/ioprio, sector.
const HEADER_LEN: u64 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes`.
const DWZ_SEGMENT_LEN: u64 = 16;
/// Segments per discard / write-zeroes request (`max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DWZ_SEGMENTS: u64 = 1;
/// Sectors per discard / write-zeroes segment (`max_discard_sectors`, 1 GiB).
pub const MAX_DWZ_SECTORS: u32 = 1 << 21;
/// Size of the bounce buffer between guest memory and the block device.
pub const CHUNK: usize = 128 << 10;
/// Length of the `GET_ID` answer.
pub const ID_LEN: usize = 20;

/// The disk as the request path sees it.
#[derive(Debug, Clone)]
pub struct Disk {
    pub dev: Arc<dyn BlockDev>,
    pub read_only: bool,
    /// Serial number, zero padded.
    pub id: [u8; ID_LEN],
    /// Whether something may have been written since the last successful flush (shared by the
    /// clones: the VM flushes at exit only the disks that need it).
    unflushed: Arc<AtomicBool>,
}

impl Disk {
    pub fn new(dev: Arc<dyn BlockDev>, read_only: bool, id: &str) -> Self {
        let mut bytes = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        let read_only = read_only || dev.capabilities().read_only;
        Disk {
            dev,
            read_only,
            id: bytes,
            // Opening may have written (a qcow2 dirty bit, a repair): flushed unless the guest
            // flushes.
            unflushed: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether data may have been written since the last successful flush.
    pub fn needs_flush(&self) -> bool {
        self.unflushed.load(Ordering::SeqCst)
    }

    /// Flushes the device, recording that nothing is left unflushed if it succeeds.
    pub fn flush(&self) -> vdisk_formats::Result<()> {
        self.unflushed.store(false, Ordering::SeqCst);
        let flushed = self.dev.flush();
        if flushed.is_err() {
            self.unflushed.store(true, Ordering::SeqCst);
        }
        flushed
    }

    fn mark_written(&self) {
        self.unflushed.store(true, Ordering::SeqCst);
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// A type this device does not implement; answered `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        }
    }
}

/// A run of guest memory buffers, read or written as one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segments(Vec<(GuestAddress, u32)>);

impl Segments {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces covering stream bytes `offset..offset+len`. They stop short at a buffer that
    /// wraps around the end of the guest address space (no guest memory is there), so callers
    /// see an incomplete cover and fail the request.
    fn pieces(&self, mut offset: u64, mut len: u64) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        for &(addr, seg_len) in &self.0 {
            let seg_len = u64::from(seg_len);
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = (seg_len - offset).min(len);
            let Some(start) = addr.0.checked_add(offset) else {
                break;
            };
            out.push((GuestAddress(start), n as usize));
            len -= n;
            offset = 0;
            if len == 0 {
                break;
            }
        }
        out
    }

    /// Copies stream bytes starting at `offset` into `buf`.
    fn read_into(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<(), ()> {
        let mut done = 0;
        for (addr, n) in self.pieces(offset, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(())
        }
    }

    /// Copies `buf` into the stream starting at `offset`.
    fn write_from(&self, mem: &GuestMemoryMmap, offset: u64, buf: &[u8]) -> Result<(), ()> {
        let mut done = 0;
        for (addr, n) in self.pieces(offset, buf.len() as u64) {
            mem.write_slice(&buf[done..done + n], addr)
                .map_err(|_| ())?;
            done += n;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// A parsed request, ready to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// The data buffers: device-readable for `Out`, `Discard` and `WriteZeroes`, device-writable
    /// for `In` and `GetId`.
    pub data: Segments,
    /// The status byte (the last device-writable byte of the chain).
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("a descriptor lies outside guest memory")]
    OutsideGuestMemory,
    #[error("the chain has no device-writable status byte")]
    NoStatus,
    #[error("the request header is shorter than 16 bytes")]
    ShortHeader,
}

/// A chain that could not be parsed, with its status byte if it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    pub reason: Malformed,
    pub status: Option<GuestAddress>,
}

/// Parses a descriptor chain (already walked into its descriptors) into a [`Request`].
///
/// Spec 2.7.4.2: device-writable descriptors come after all device-readable ones. The header
/// and the status byte may be split across descriptors in any way ("Message Framing", 2.6.4).
pub fn parse(descriptors: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, ParseError> {
    let mut readable = Segments::default();
    let mut writable = Segments::default();
    let mut defect = None;
    for desc in descriptors {
        if desc.len() > 0 && !mem.check_range(desc.addr(), desc.len() as usize) {
            defect.get_or_insert(Malformed::OutsideGuestMemory);
        }
        if desc.is_write_only() {
            writable.0.push((desc.addr(), desc.len()));
        } else {
            if !writable.0.is_empty() {
                defect.get_or_insert(Malformed::ReadableAfterWritable);
            }
            readable.0.push((desc.addr(), desc.len()));
        }
    }

    // The status byte is the last writable byte; find it before judging anything else so that
    // every other defect can still be reported to the driver.
    let writable_len = writable.len();
    let status = if writable_len == 0 {
        None
    } else {
        writable
            .pieces(writable_len - 1, 1)
            .first()
            .map(|(addr, _)| *addr)
            .filter(|addr| mem.check_range(*addr, 1))
    };
    let Some(status) = status else {
        return Err(ParseError {
            reason: Malformed::NoStatus,
            status: None,
        });
    };
    let fail = |reason| {
        Err(ParseError {
            reason,
            status: Some(status),
        })
    };
    if let Some(reason) = defect {
        return fail(reason);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if readable.len() < HEADER_LEN || readable.read_into(mem, 0, &mut header).is_err() {
        return fail(Malformed::ShortHeader);
    }
    let kind = RequestKind::from_type(u32::from_le_bytes(header[0..4].try_into().unwrap()));
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());

    let data = match kind {
        RequestKind::In | RequestKind::GetId => Segments(trim(&writable, 0, writable_len - 1)),
        _ => Segments(trim(&readable, HEADER_LEN, readable.len() - HEADER_LEN)),
    };
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// The sub-stream `offset..offset+len` of `segs` as segments.
fn trim(segs: &Segments, offset: u64, len: u64) -> Vec<(GuestAddress, u32)> {
    segs.pieces(offset, len)
        .into_iter()
        .map(|(a, n)| (a, n as u32))
        .collect()
}

/// The outcome of executing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Bytes written into the request's device-writable data buffers.
    pub written: u32,
}

impl Completion {
    fn ok(written: u32) -> Self {
        Completion {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }

    fn status(status: u32) -> Self {
        Completion {
            status: status as u8,
            written: 0,
        }
    }

    /// The used-ring length: data written plus the status byte.
    pub fn used_len(&self) -> u32 {
        self.written + 1
    }
}

/// Maps a block-layer error to the virtio-blk status the guest sees.
pub fn status_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        _ => VIRTIO_BLK_S_IOERR as u8,
    }
}

/// Byte range of `sectors` sectors at `sector`, if it lies inside the device.
fn byte_range(disk: &Disk, sector: u64, bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= disk.dev.size()).then_some(offset)
}

/// Executes `req`; `buf` is the reusable bounce buffer.
pub fn execute(req: &Request, mem: &GuestMemoryMmap, disk: &Disk, buf: &mut Vec<u8>) -> Completion {
    let ioerr = Completion::status(VIRTIO_BLK_S_IOERR);
    let dev_err = |e: vdisk_formats::Error| Completion::status(u32::from(status_for(e.kind())));
    match req.kind {
        RequestKind::In | RequestKind::Out => {
            let len = req.data.len();
            // 5.2.6.1: data length is a multiple of 512 for IN and OUT.
            if len % SECTOR_SIZE != 0 {
                return ioerr;
            }
            // 5.2.6.2: writes to a read-only device fail and write nothing.
            if req.kind == RequestKind::Out && disk.read_only {
                return ioerr;
            }
            let Some(offset) = byte_range(disk, req.sector, len) else {
                return ioerr;
            };
            // Grown to the largest request seen (at most CHUNK), so small I/O keeps it small.
            if buf.len() < CHUNK.min(len as usize) {
                buf.resize(CHUNK.min(len as usize), 0);
            }
            if req.kind == RequestKind::Out {
                disk.mark_written();
            }
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                let chunk = &mut buf[..n];
                if req.kind == RequestKind::In {
                    if let Err(e) = disk.dev.read_at(chunk, offset + done) {
                        return dev_err(e);
                    }
                    if req.data.write_from(mem, done, chunk).is_err() {
                        return ioerr;
                    }
                } else {
                    if req.data.read_into(mem, done, chunk).is_err() {
                        return ioerr;
                    }
                    if let Err(e) = disk.dev.write_at(chunk, offset + done) {
                        return dev_err(e);
                    }
                }
                done += n as u64;
            }
            Completion::ok(if req.kind == RequestKind::In {
                len as u32
            } else {
                0
            })
        }
        RequestKind::Flush => match disk.flush() {
            Ok(()) => Completion::ok(0),
            Err(e) => dev_err(e),
        },
        RequestKind::GetId => {
            let n = (req.data.len() as usize).min(ID_LEN);
            match req.data.write_from(mem, 0, &disk.id[..n]) {
                Ok(()) => Completion::ok(n as u32),
                Err(()) => ioerr,
            }
        }
        RequestKind::Discard | RequestKind::WriteZeroes => discard_or_zero(req, mem, disk),
        RequestKind::Unsupported(_) => Completion::status(VIRTIO_BLK_S_UNSUPP),
    }
}

/// DISCARD and WRITE_ZEROES (5.2.6.2, `struct virtio_blk_discard_write_zeroes`).
fn discard_or_zero(req: &Request, mem: &GuestMemoryMmap, disk: &Disk) -> Completion {
    let ioerr = Completion::status(VIRTIO_BLK_S_IOERR);
    let unsupp = Completion::status(VIRTIO_BLK_S_UNSUPP);
    let len = req.data.len();
    if len == 0 || len % DWZ_SEGMENT_LEN != 0 {
        return ioerr;
    }
    if len / DWZ_SEGMENT_LEN > MAX_DWZ_SEGMENTS {
        return unsupp;
    }
    if disk.read_only {
        return ioerr;
    }
    let mut seg = [0u8; DWZ_SEGMENT_LEN as usize];
    if req.data.read_into(mem, 0, &mut seg).is_err() {
        return ioerr;
    }
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
    let num_sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Unknown flags, and unmap on a discard, are unsupported.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        || (req.kind == RequestKind::Discard && unmap)
    {
        return unsupp;
    }
    if num_sectors > MAX_DWZ_SECTORS {
        return ioerr;
    }
    let bytes = u64::from(num_sectors) * SECTOR_SIZE;
    disk.mark_written();
    let Some(offset) = byte_range(disk, sector, bytes) else {
        return ioerr;
    };
    let result = if req.kind == RequestKind::Discard {
        disk.dev.discard(offset, bytes)
    } else {
        disk.dev.write_zeroes(
            offset,
            bytes,
            ZeroFlags {
                may_unmap: unmap,
                fast_only: false,
            },
        )
    };
    match result {
        Ok(()) => Completion::ok(0),
        Err(e) => Completion::status(u32::from(status_for(e.kind()))),
    }
}
