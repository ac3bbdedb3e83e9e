//! virtio-blk descriptor chains: the input lays out a split virtqueue (descriptor table and
//! available ring, built with virtio-queue's mock module as the vmm tests do) and the guest
//! memory the descriptors point at (request headers, data, discard segments, indirect tables).
//! `process_queue` then serves it against a small in-memory disk, twice (the second pass sees
//! the queue as the first left it).
//!
//! Input: mode byte (bit 0: read-only disk), descriptor count, that many descriptors
//! (u32 addr, u32 len, u16 flags, u16 next), ring entry count, that many u16 head indices, and
//! the rest copied into guest memory at `DATA`.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vdisk_formats::mem::MemDev;
use vdisk_fuzz::Input;
use vdisk_vmm::virtio::block::request::Disk;
use vdisk_vmm::virtio::block::worker::process_queue;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: u64 = 256 << 10;
const QUEUE_SIZE: u16 = 16;
/// Guest memory past the queue structures; the input's tail is copied here.
const DATA: u64 = 0x1000;
const DISK_SIZE: usize = 64 << 10;

/// A guest address: mostly inside guest memory, sometimes just past it.
fn addr(raw: u32) -> u64 {
    u64::from(raw) % (MEM_SIZE + MEM_SIZE / 4)
}

/// A descriptor length: small mostly, any `u32` when the top bit is set.
fn len(raw: u32) -> u32 {
    if raw & 0x8000_0000 != 0 {
        raw
    } else {
        raw % (MEM_SIZE as u32 + 1)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let read_only = input.u8() & 1 != 0;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);

    let ndesc = input.u8() % (QUEUE_SIZE as u8 + 1);
    let flag_mask = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
    for i in 0..u16::from(ndesc) {
        let a = addr(input.u32());
        let l = len(input.u32());
        let flags = input.u16() & flag_mask;
        let next = input.u16() % (2 * QUEUE_SIZE);
        let desc = RawDescriptor::from(Descriptor::new(a, l, flags, next));
        vq.desc_table().store(i, desc).unwrap();
    }
    let navail = input.u8() % (QUEUE_SIZE as u8 + 1);
    for i in 0..usize::from(navail) {
        let head = input.u16() % (2 * QUEUE_SIZE);
        vq.avail().ring().ref_at(i).unwrap().store(head);
    }
    vq.avail().idx().store(u16::from(navail));
    let tail = input.rest();
    let n = tail.len().min((MEM_SIZE - DATA) as usize);
    mem.write_slice(&tail[..n], GuestAddress(DATA)).unwrap();

    let dev = Arc::new(MemDev::new(DISK_SIZE));
    let disk = Disk::new(dev, read_only, "fuzz-serial");
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut buf = Vec::new();
    let first = process_queue(&mut queue, &mem, &disk, &mut buf);
    assert!(
        first.completed <= u32::from(navail),
        "{first:?} for {navail} available chains"
    );
    let _ = process_queue(&mut queue, &mem, &disk, &mut buf);
});
