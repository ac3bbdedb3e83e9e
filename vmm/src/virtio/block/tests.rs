//! Guest-less tests of the request path: chains built with virtio-queue's driver-side mock,
//! served by `process_queue` over an in-memory or qcow2 block device.

use std::sync::Arc;

use vdisk_formats::mem::MemDev;
use vdisk_formats::BlockDev;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{Disk, ID_LEN, MAX_DWZ_SECTORS, MAX_DWZ_SEGMENTS};
use super::worker::{process_queue, QueueRun, Worker};
use super::Block;
use crate::virtio::{Interrupt, VirtioDevice};

const MEM_SIZE: usize = 1 << 20;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A guest, a queue in it, and a disk.
struct Rig {
    mem: GuestMemoryMmap,
    dev: Arc<MemDev>,
    disk: Disk,
}

impl Rig {
    fn new(read_only: bool) -> Self {
        let dev = Arc::new(MemDev::new(64 * 1024));
        let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        dev.write_at(&pattern, 0).unwrap();
        let disk = Disk::new(dev.clone(), read_only, "serial-0123456789-abcdef");
        Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            dev,
            disk,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Puts `descs` (addr, len, flags) in the queue as one chain and serves it; returns the
    /// run, the used length, and the status byte.
    fn serve(&self, descs: &[(u64, u32, u16)]) -> (QueueRun, u32, u8) {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut buf = Vec::new();
        let run = process_queue(&mut queue, &self.mem, &self.disk, &mut buf);
        let used_len = vq.used().ring().ref_at(0).unwrap().load().len();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (run, used_len, status)
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn request(&self, kind: u32, sector: u64, data_len: u32, data_flags: u16) -> (u32, u8) {
        self.header(kind, sector);
        let (run, used, status) =
            self.serve(&[(HDR, 16, 0), (DATA, data_len, data_flags), (STATUS, 1, W)]);
        assert_eq!(run.completed, 1);
        (used, status)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_copies_the_sectors_into_guest_memory() {
    let rig = Rig::new(false);
    let (used, status) = rig.request(VIRTIO_BLK_T_IN, 3, 1024, W);
    assert_eq!((used, status), (1025, OK));
    assert_eq!(
        rig.data(1024),
        rig.dev.contents()[3 * 512..5 * 512].to_vec()
    );
}

#[test]
fn read_spread_over_several_descriptors_and_chunks() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // Header split in two, data in three pieces (the last one larger than a bounce chunk
    // would be for a 4 KiB buffer), status alone.
    let (run, used, status) = rig.serve(&[
        (HDR, 8, 0),
        (HDR + 8, 8, 0),
        (DATA, 512, W),
        (DATA + 512, 1536, W),
        (DATA + 2048, 62 * 1024, W),
        (STATUS, 1, W),
    ]);
    assert_eq!(run.completed, 1);
    let total = 512 + 1536 + 62 * 1024;
    assert_eq!(used as usize, total + 1);
    assert_eq!(status, OK);
    assert_eq!(rig.data(total), rig.dev.contents()[..total].to_vec());
}

#[test]
fn write_reaches_the_disk() {
    let rig = Rig::new(false);
    rig.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    let (used, status) = rig.request(VIRTIO_BLK_T_OUT, 10, 512, 0);
    assert_eq!((used, status), (1, OK));
    assert_eq!(rig.dev.contents()[10 * 512..11 * 512], [0x5a; 512]);
}

#[test]
fn flush_succeeds() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let (_, used, status) = rig.serve(&[(HDR, 16, 0), (STATUS, 1, W)]);
    assert_eq!((used, status), (1, OK));
}

#[test]
fn only_writes_after_the_last_flush_leave_the_disk_needing_one() {
    let rig = Rig::new(false);
    assert!(rig.disk.needs_flush(), "a fresh disk (opening may write)");
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.serve(&[(HDR, 16, 0), (STATUS, 1, W)]).2, OK);
    assert!(!rig.disk.needs_flush());
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 2, 512, W).1, OK);
    assert!(!rig.disk.needs_flush(), "a read");
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 2, 512, 0).1, OK);
    assert!(rig.disk.needs_flush(), "a write");
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.serve(&[(HDR, 16, 0), (STATUS, 1, W)]).2, OK);
    assert!(!rig.disk.needs_flush());
    dwz_segment(&rig, 4, 1, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0).1, OK);
    assert!(rig.disk.needs_flush(), "a discard");
}

#[test]
fn get_id_returns_the_first_20_bytes_of_the_serial() {
    let rig = Rig::new(false);
    let (used, status) = rig.request(VIRTIO_BLK_T_GET_ID, 0, 32, W);
    assert_eq!((used, status), (ID_LEN as u32 + 1, OK));
    assert_eq!(&rig.data(ID_LEN), b"serial-0123456789-ab");
}

fn dwz_segment(rig: &Rig, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    rig.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
}

#[test]
fn write_zeroes_with_unmap_reads_back_zero() {
    let rig = Rig::new(false);
    dwz_segment(&rig, 2, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let (_, status) = rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, 0);
    assert_eq!(status, OK);
    let contents = rig.dev.contents();
    assert!(contents[2 * 512..5 * 512].iter().all(|&b| b == 0));
    assert_ne!(contents[5 * 512 + 1], 0);
}

#[test]
fn discard_works_and_rejects_the_unmap_flag() {
    let rig = Rig::new(false);
    dwz_segment(&rig, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0).1, UNSUPP);
    dwz_segment(&rig, 0, 1, 0x80);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0).1,
        UNSUPP,
        "unknown flag"
    );
    dwz_segment(&rig, 0, 1, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0).1, OK);
    // Two segments are more than max_discard_seg.
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, 32, 0).1, UNSUPP);
    assert_eq!(rig.request(VIRTIO_BLK_T_DISCARD, 0, 10, 0).1, IOERR);
    dwz_segment(&rig, 127, 2, 0);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, 16, 0).1,
        IOERR,
        "past the end"
    );
}

#[test]
fn read_only_disk_refuses_writes_and_offers_ro() {
    let rig = Rig::new(true);
    let before = rig.dev.contents();
    rig.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, 512, 0).1, IOERR);
    dwz_segment(&rig, 0, 1, 0);
    assert_eq!(rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, 0).1, IOERR);
    assert_eq!(rig.dev.contents(), before);
    let features = Block::new(rig.disk.clone(), "t", None).unwrap().features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn out_of_range_and_unaligned_transfers_fail() {
    let rig = Rig::new(false);
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 127, 1024, W).1, IOERR);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, u64::MAX / 256, 512, W).1,
        IOERR
    );
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, 100, W).1, IOERR);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let rig = Rig::new(false);
    assert_eq!(rig.request(0x1234, 0, 512, W).1, UNSUPP);
}

#[test]
fn backend_failure_is_an_io_error() {
    let rig = Rig::new(false);
    rig.dev.fail_write_after(0);
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, 512, 0).1, IOERR);
}

#[test]
fn chain_without_status_byte_is_returned_unanswered() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (run, used, status) = rig.serve(&[(HDR, 16, 0), (DATA, 512, 0)]);
    assert_eq!((run.completed, run.dropped, used), (1, 1, 0));
    assert_eq!(status, 0xff, "nothing written");
}

#[test]
fn malformed_chains_get_an_error_status() {
    let rig = Rig::new(false);
    // Header too short.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (_, used, status) = rig.serve(&[(HDR, 8, 0), (STATUS, 1, W)]);
    assert_eq!((used, status), (1, IOERR));
    // A data buffer outside guest memory (and one so long it would wrap).
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (_, _, status) = rig.serve(&[
        (HDR, 16, 0),
        (MEM_SIZE as u64 - 256, 512, W),
        (STATUS, 1, W),
    ]);
    assert_eq!(status, IOERR);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, _, status) = rig.serve(&[(HDR, 16, 0), (u64::MAX - 100, 4096, 0), (STATUS, 1, W)]);
    assert_eq!(status, IOERR);
    // A chain longer than 4 GiB in total ends where it overflows (virtio-queue stops the walk),
    // which leaves it without a status byte.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (run, used, _) = rig.serve(&[(HDR, 16, 0), (DATA, u32::MAX, 0), (STATUS, 1, W)]);
    assert_eq!((run.dropped, used), (1, 0));
    // Readable descriptor after a writable one.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (_, _, status) = rig.serve(&[
        (HDR, 16, 0),
        (DATA, 512, W),
        (DATA + 512, 512, 0),
        (STATUS, 1, W),
    ]);
    assert_eq!(status, IOERR);
    // Status byte itself outside memory: nothing can be answered.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (run, used, _) = rig.serve(&[(HDR, 16, 0), (MEM_SIZE as u64 + 4096, 1, W)]);
    assert_eq!((run.dropped, used), (1, 0));
}

#[test]
fn buffer_wrapping_around_the_address_space_has_no_status() {
    // Found by fuzz/virtio_blk: the last writable byte of this buffer is at 2^64 + 7. It must
    // not be taken for guest address 7 (nor panic on the overflow): the chain has no status.
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (run, used, _) = rig.serve(&[(HDR, 16, 0), (u64::MAX - 7, 16, W)]);
    assert_eq!((run.dropped, used), (1, 0));
    // Byte 7 is in descriptor 0 (the high bytes of its address, zero).
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(7)).unwrap(), 0);
}

#[test]
fn descriptor_loop_terminates() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&rig.mem, 16);
    // Descriptor 0 -> 1 -> 0 -> ...: the chain walk stops after the queue size.
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT as u16) | W,
            0,
        )),
    ];
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let run = process_queue(&mut queue, &rig.mem, &rig.disk, &mut Vec::new());
    assert_eq!(run.completed, 1);
}

#[test]
fn config_space_describes_the_disk() {
    let rig = Rig::new(false);
    let block = Block::new(rig.disk.clone(), "t", None).unwrap();
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
    let mut blk_size = [0u8; 4];
    block.read_config(20, &mut blk_size);
    assert_eq!(u32::from_le_bytes(blk_size), 512);
    let mut past = [0xffu8; 4];
    block.read_config(4096, &mut past);
    assert_eq!(past, [0; 4]);
    let f = block.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
}

#[test]
fn worker_thread_serves_notifications_and_raises_the_interrupt() {
    let rig = Rig::new(false);
    let mem = Arc::new(rig.mem.clone());
    rig.header(VIRTIO_BLK_T_IN, 1);
    let vq = MockSplitQueue::new(mem.as_ref(), 16);
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            DATA,
            512,
            (VRING_DESC_F_NEXT as u16) | W,
            2,
        )),
        RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)),
    ];
    vq.add_desc_chains(&raw, 0).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = EventFd::new(0).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let worker = Worker::spawn("test-blk".into(), rig.disk.clone(), None).unwrap();
    worker
        .start(queue, notify.clone(), mem.clone(), interrupt.clone())
        .unwrap();
    notify.write(1).unwrap();
    assert_eq!(irq.read().unwrap(), 1, "blocks until the interrupt");
    assert_eq!(interrupt.status(), crate::virtio::INT_VRING);
    assert_eq!(rig.data(512), rig.dev.contents()[512..1024].to_vec());
    drop(worker);
}

/// A new qcow2 image of `size` bytes at `path`, opened read-write.
fn qcow2_disk(path: &std::path::Path, size: u64) -> Arc<dyn BlockDev> {
    let format = vdisk_formats::Format::Qcow2;
    let opts = vdisk_formats::CreateOptions::from_pairs(format, Some(size), &[]).unwrap();
    vdisk_formats::create(path, &opts).unwrap();
    vdisk_formats::open(path, Default::default()).unwrap()
}

#[test]
fn qcow2_backend_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let dev = qcow2_disk(&path, 1 << 20);
    let mut rig = Rig::new(false);
    rig.disk = Disk::new(dev, false, "q");
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    rig.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 100, 4096, 0).1, OK);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.serve(&[(HDR, 16, 0), (STATUS, 1, W)]).2, OK);
    rig.mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 100, 4096, W).1, OK);
    assert_eq!(rig.data(4096), payload);
    drop(rig);
    // Reopened from the file, the data is there.
    let dev = vdisk_formats::open(&path, Default::default()).unwrap();
    let mut back = vec![0; 4096];
    dev.read_at(&mut back, 100 * 512).unwrap();
    assert_eq!(back, payload);
}

/// One discard or write-zeroes segment may cover `MAX_DWZ_SECTORS` sectors, as the config space
/// says; one sector more is an I/O error that changes nothing (on a 2 GiB qcow2 disk, so the
/// range itself is valid).
#[test]
fn discard_and_write_zeroes_take_max_dwz_sectors_and_not_one_more() {
    let dir = tempfile::tempdir().unwrap();
    let dev = qcow2_disk(&dir.path().join("big.qcow2"), 2 << 30);
    let mut rig = Rig::new(false);
    rig.disk = Disk::new(dev.clone(), false, "q");
    let block = Block::new(rig.disk.clone(), "t", None).unwrap();
    let config = |offset: u64| {
        let mut v = [0u8; 4];
        block.read_config(offset, &mut v);
        u32::from_le_bytes(v)
    };
    // max_discard_sectors, max_discard_seg, max_write_zeroes_sectors, max_write_zeroes_seg.
    assert_eq!(config(36), MAX_DWZ_SECTORS);
    assert_eq!(config(40), MAX_DWZ_SEGMENTS as u32);
    assert_eq!(config(48), MAX_DWZ_SECTORS);
    assert_eq!(config(52), MAX_DWZ_SEGMENTS as u32);
    // The last sector inside the limit holds data that only an accepted request clears.
    let last = (u64::from(MAX_DWZ_SECTORS) - 1) * 512;
    let sector_at = |offset: u64| {
        let mut buf = [0u8; 512];
        dev.read_at(&mut buf, offset).unwrap();
        buf
    };
    for kind in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        dev.write_at(&[0x5a; 512], last).unwrap();
        dwz_segment(&rig, 0, MAX_DWZ_SECTORS + 1, 0);
        assert_eq!(
            rig.request(kind, 0, 16, 0).1,
            IOERR,
            "{kind}: one sector over"
        );
        assert_eq!(
            sector_at(last),
            [0x5a; 512],
            "{kind}: a refused request wrote"
        );
        dwz_segment(&rig, 0, MAX_DWZ_SECTORS, 0);
        assert_eq!(rig.request(kind, 0, 16, 0).1, OK, "{kind}: at the limit");
        // Whole clusters without a backing file: discarded ones read as zero too.
        assert_eq!(sector_at(last), [0; 512], "{kind}: at the limit");
    }
    // Past the segment limit, as past the sector limit, nothing happens.
    dev.write_at(&[0x5a; 512], 0).unwrap();
    dwz_segment(&rig, 0, 1, 0);
    let two = (MAX_DWZ_SEGMENTS + 1) as u32 * 16;
    assert_eq!(rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, two, 0).1, UNSUPP);
    assert_eq!(sector_at(0), [0x5a; 512]);
}
