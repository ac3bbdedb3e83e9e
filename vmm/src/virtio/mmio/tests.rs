//! Register-level tests of the transport, driving it as a guest driver would.

use std::sync::Arc;

use vdisk_formats::mem::MemDev;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
use crate::virtio::block::{Block, Disk};

fn transport(mem: &Arc<GuestMemoryMmap>) -> (MmioTransport, EventFd) {
    let dev = Arc::new(MemDev::new(8192));
    let block = Block::new(Disk::new(dev, false, "t"), "test-blk", None).unwrap();
    let irq = EventFd::new(0).unwrap();
    let t = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
    (t, irq)
}

fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

#[test]
fn identification_registers() {
    let (mut t, _) = transport(&memory());
    assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "only one queue");
    // Narrow accesses to registers read zero.
    let mut b = [0xffu8; 2];
    t.read(0, &mut b);
    assert_eq!(b, [0, 0]);
    // Config space: capacity 16 sectors, readable byte by byte.
    let mut c = [0u8; 1];
    t.read(0x100, &mut c);
    assert_eq!(c[0], 16);
}

#[test]
fn features_ok_needs_version_1_and_no_unknown_bits() {
    let (mut t, _) = transport(&memory());
    wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 is bit 32"
    );
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    wr(&mut t, VIRTIO_MMIO_STATUS, s);
    wr(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), s, "legacy driver refused");
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 | 2);
    wr(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), s, "unknown feature refused");
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_STATUS),
        s | VIRTIO_CONFIG_S_FEATURES_OK
    );
    // Status bits cannot be taken back except by a reset.
    wr(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(
        rd(&mut t, VIRTIO_MMIO_STATUS),
        s | VIRTIO_CONFIG_S_FEATURES_OK
    );
    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
}

/// Runs the whole driver init sequence with the queue at `vq`'s addresses.
fn init(t: &mut MmioTransport, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u32 {
    let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    wr(t, VIRTIO_MMIO_STATUS, s);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    s |= VIRTIO_CONFIG_S_FEATURES_OK;
    wr(t, VIRTIO_MMIO_STATUS, s);
    wr(t, VIRTIO_MMIO_QUEUE_SEL, 0);
    wr(t, VIRTIO_MMIO_QUEUE_NUM, 16);
    let addr = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    for (reg, a) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr()),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr()),
        (VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr()),
    ] {
        let (lo, hi) = addr(a);
        wr(t, reg, lo);
        wr(t, reg + 4, hi);
    }
    wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
    s |= VIRTIO_CONFIG_S_DRIVER_OK;
    wr(t, VIRTIO_MMIO_STATUS, s);
    rd(t, VIRTIO_MMIO_STATUS)
}

#[test]
fn driver_ok_starts_the_device_and_notify_completes_a_request() {
    let mem = memory();
    let (mut t, irq) = transport(&mem);
    let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1000), 16);
    let status = init(&mut t, &vq);
    assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    // GET_ID through the running I/O thread.
    mem.write_slice(
        &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        GuestAddress(0x8000),
    )
    .unwrap();
    let w = VRING_DESC_F_WRITE as u16;
    let n = VRING_DESC_F_NEXT as u16;
    vq.add_desc_chains(
        &[
            RawDescriptor::from(Descriptor::new(0x8000, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(0x9000, 20, n | w, 2)),
            RawDescriptor::from(Descriptor::new(0xa000, 1, w, 0)),
        ],
        0,
    )
    .unwrap();
    wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    let status: u8 = mem.read_obj(GuestAddress(0xa000)).unwrap();
    assert_eq!(status, 0);
    let mut id = [0u8; 2];
    mem.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
    assert_eq!(&id, b"t\0");
    assert_eq!(vq.used().idx().load(), 1);

    // Queue setup is frozen while running; a reset stops the device and allows it again.
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
    wr(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn driver_ok_with_a_queue_outside_memory_needs_reset() {
    let mem = memory();
    let (mut t, _) = transport(&mem);
    let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1000), 16);
    wr(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0); // placeholder write before init
    let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    wr(&mut t, VIRTIO_MMIO_STATUS, s);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    s |= VIRTIO_CONFIG_S_FEATURES_OK;
    wr(&mut t, VIRTIO_MMIO_STATUS, s);
    wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    wr(
        &mut t,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        vq.desc_table_addr().0 as u32,
    );
    wr(
        &mut t,
        VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        vq.avail_addr().0 as u32,
    );
    wr(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0xfff0_0000); // beyond guest RAM
    wr(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    wr(&mut t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    assert_ne!(
        rd(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}
