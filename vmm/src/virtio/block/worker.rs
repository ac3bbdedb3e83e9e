//! The I/O thread of one disk. It starts with the device, before the guest runs, so that it can
//! confine itself to the disk I/O seccomp filter, and idles until the driver starts the device.
//! Then it waits for queue notifications (the ioeventfd KVM signals when the guest writes
//! `QueueNotify`), drains the queue through [`super::request`], and raises the interrupt (the
//! irqfd) when it has used buffers. A device reset stops the serving, not the thread; the thread
//! ends when its [`Worker`] is dropped.
//!
//! ```text
//!   vCPU thread: Worker::start / Worker::stop ──> commands + wake eventfd ──┐
//!   guest QueueNotify ──> ioeventfd (notify) ──────────────────────────────┤ epoll
//!                                          I/O thread: process_queue ──> irqfd
//! ```

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{self, Disk};
use crate::error::{Error, Result};
use crate::seccomp::{self, ThreadFilter};
use crate::virtio::Interrupt;

/// Stack of a disk I/O thread: the block drivers' deepest path (a read through a qcow2 backing
/// chain, decompression) uses a few tens of KiB.
const STACK_SIZE: usize = 1 << 20;

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

/// The queue a started device serves.
#[derive(Debug)]
struct Serving {
    queue: Queue,
    notify: Arc<EventFd>,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
}

/// What the device asks of its I/O thread.
#[derive(Debug)]
enum Command {
    Start(Box<Serving>),
    /// Stop serving; the sender hears back once the queue is no longer touched.
    Stop(Sender<()>),
}

/// The I/O thread of one disk; it ends (after the request in progress) when dropped.
#[derive(Debug)]
pub struct Worker {
    commands: Option<Sender<Command>>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_CONTROL: u64 = 1;

fn add_to(epoll: &Epoll, fd: &impl AsRawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, token),
    )
}

impl Worker {
    /// Starts the idle I/O thread of `disk`, confined to `filter` when given.
    pub fn spawn(name: String, disk: Disk, filter: Option<Arc<ThreadFilter>>) -> Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))?;
        let epoll = Epoll::new().map_err(|e| Error::os("epoll_create", e))?;
        add_to(&epoll, &wake, TOKEN_CONTROL).map_err(|e| Error::os("epoll_ctl", e))?;
        let thread_wake = wake.try_clone().map_err(|e| Error::os("eventfd", e))?;
        let (commands, received) = mpsc::channel();
        let thread = seccomp::spawn(
            name,
            STACK_SIZE,
            filter,
            "spawning the disk I/O thread",
            move || serve(&epoll, &thread_wake, &received, &disk),
        )?;
        Ok(Worker {
            commands: Some(commands),
            wake,
            thread: Some(thread),
        })
    }

    /// Starts serving `queue`, whose notification eventfd is `notify`.
    pub fn start(
        &self,
        queue: Queue,
        notify: Arc<EventFd>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<Interrupt>,
    ) -> Result<()> {
        self.send(Command::Start(Box::new(Serving {
            queue,
            notify,
            mem,
            interrupt,
        })))
    }

    /// Stops serving the queue; returns once the thread no longer touches it (the request in
    /// progress, if any, completes first).
    pub fn stop(&self) {
        let (done, stopped) = mpsc::channel();
        if self.send(Command::Stop(done)).is_ok() {
            let _ = stopped.recv();
        }
    }

    fn send(&self, command: Command) -> Result<()> {
        let gone = || {
            Error::os(
                "disk I/O thread",
                std::io::Error::other("the thread has ended"),
            )
        };
        self.commands
            .as_ref()
            .ok_or_else(gone)?
            .send(command)
            .map_err(|_| gone())?;
        self.wake
            .write(1)
            .map_err(|e| Error::os("waking the disk I/O thread", e))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A closed command channel ends the thread.
        self.commands = None;
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The body of the I/O thread.
fn serve(epoll: &Epoll, wake: &EventFd, commands: &Receiver<Command>, disk: &Disk) {
    let mut serving: Option<Box<Serving>> = None;
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
        for event in &events[..n] {
            if event.data() == TOKEN_CONTROL {
                let _ = wake.read();
                loop {
                    match commands.try_recv() {
                        Ok(Command::Start(s)) => match add_to(epoll, &*s.notify, TOKEN_QUEUE) {
                            Ok(()) => serving = Some(s),
                            Err(e) => eprintln!("vdisk-vmm: disk I/O thread: epoll_ctl: {e}"),
                        },
                        Ok(Command::Stop(done)) => {
                            if let Some(s) = serving.take() {
                                let fd = s.notify.as_raw_fd();
                                let _ =
                                    epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            }
                            let _ = done.send(());
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => return,
                    }
                }
            } else if let Some(s) = serving.as_mut() {
                // Level of the eventfd does not matter: drain it, then the whole queue.
                let _ = s.notify.read();
                let run = process_queue(&mut s.queue, &s.mem, disk, &mut buf);
                if run.completed > 0 {
                    if let Err(e) = s.interrupt.signal_used_queue() {
                        eprintln!("vdisk-vmm: disk I/O thread: interrupt: {e}");
                    }
                }
            }
        }
    }
}
