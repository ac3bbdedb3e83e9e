//! The I/O thread of one disk: waits for queue notifications (the ioeventfd KVM signals when
//! the guest writes `QueueNotify`), drains the queue through [`super::request`], and raises the
//! interrupt (the irqfd) when it has used buffers.

use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{self, Disk};
use crate::error::{Error, Result};
use crate::virtio::Interrupt;

/// Counters of what a queue run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains returned to the used ring.
    pub completed: u32,
    /// Chains that could not be answered with a status (no writable status byte).
    pub dropped: u32,
}

/// Serves every available chain of `queue`: parse, execute, complete. Returns what it did; the
/// caller raises the interrupt if anything was completed.
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    buf: &mut Vec<u8>,
) -> QueueRun {
    let mut run = QueueRun::default();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let descriptors: Vec<_> = chain.collect();
        let used_len = match request::parse(&descriptors, mem) {
            Ok(req) => {
                let done = request::execute(&req, mem, disk, buf);
                if mem.write_obj(done.status, req.status).is_ok() {
                    done.used_len()
                } else {
                    0
                }
            }
            Err(err) => match err.status {
                Some(status) => {
                    let ioerr = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
                    if mem.write_obj(ioerr, status).is_ok() {
                        1
                    } else {
                        0
                    }
                }
                None => {
                    run.dropped += 1;
                    0
                }
            },
        };
        if queue.add_used(mem, head, used_len).is_err() {
            // The used ring itself is outside guest memory: nothing more can be returned.
            break;
        }
        run.completed += 1;
    }
    run
}

/// A running I/O thread; stops and joins when dropped.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_STOP: u64 = 1;

impl Worker {
    /// Starts the thread serving `queue`; `notify` is the queue's notification eventfd.
    pub fn spawn(
        name: String,
        mut queue: Queue,
        notify: EventFd,
        mem: Arc<GuestMemoryMmap>,
        disk: Disk,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))?;
        let epoll = Epoll::new().map_err(|e| Error::os("epoll_create", e))?;
        for (fd, token) in [(&notify, TOKEN_QUEUE), (&stop, TOKEN_STOP)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| Error::os("epoll_ctl", e))?;
        }
        let stop_clone = stop.try_clone().map_err(|e| Error::os("eventfd", e))?;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _keep_stop_open = stop_clone;
                let mut buf = Vec::new();
                let mut events = [EpollEvent::default(); 2];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            eprintln!("vdisk-vmm: disk I/O thread: epoll_wait: {e}");
                            return;
                        }
                    };
                    if events[..n].iter().any(|e| e.data() == TOKEN_STOP) {
                        return;
                    }
                    // Level of the eventfd does not matter: drain it, then the whole queue.
                    let _ = notify.read();
                    let run = process_queue(&mut queue, &mem, &disk, &mut buf);
                    if run.completed > 0 {
                        if let Err(e) = interrupt.signal_used_queue() {
                            eprintln!("vdisk-vmm: disk I/O thread: interrupt: {e}");
                        }
                    }
                }
            })
            .map_err(|e| Error::os("spawning the disk I/O thread", e))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
