//! The serial console on the host terminal: raw mode while the VM runs, keystrokes fed to the
//! UART by an input thread, and the escape `Ctrl-A x` that quits.
//!
//! Escapes (as QEMU's `-nographic`): `Ctrl-A x` ends the VM with [`ExitReason::UserQuit`];
//! `Ctrl-A Ctrl-A` sends one `Ctrl-A`; `Ctrl-A` followed by anything else sends both bytes.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::Devices;
use crate::error::{Error, Result};
use crate::exit::{ExitReason, VmExit};
use crate::seccomp::{self, ThreadFilter};

const CTRL_A: u8 = 0x01;

/// Stack of the console thread.
const STACK_SIZE: usize = 128 << 10;

/// The escape-sequence decoder: turns typed bytes into bytes for the guest, or a quit.
#[derive(Debug, Default)]
pub struct Escapes {
    pending_ctrl_a: bool,
}

/// What a run of typed bytes amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Typed {
    /// Send these bytes to the guest.
    Input(Vec<u8>),
    /// Send these bytes, then quit.
    Quit(Vec<u8>),
}

impl Escapes {
    pub fn feed(&mut self, bytes: &[u8]) -> Typed {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.pending_ctrl_a {
                self.pending_ctrl_a = false;
                match b {
                    b'x' | b'X' => return Typed::Quit(out),
                    CTRL_A => out.push(CTRL_A),
                    other => out.extend_from_slice(&[CTRL_A, other]),
                }
            } else if b == CTRL_A {
                self.pending_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        Typed::Input(out)
    }
}

/// The terminal in raw mode; the saved settings come back on drop.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd` in raw mode if it is a terminal.
    fn enter(fd: i32) -> Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios and `fd` an open descriptor.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(Error::os(
                "reading terminal settings",
                io::Error::last_os_error(),
            ));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(Error::os("setting raw mode", io::Error::last_os_error()));
        }
        Ok(Some(RawMode { fd, saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// A running stdio console; dropping it stops the input thread and restores the terminal.
pub(crate) struct Console {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    _raw: Option<RawMode>,
}

impl Console {
    /// Starts reading stdin into the UART of `devices`, in a thread confined to `filter` when
    /// given. Returns `None` when stdin gives no input to wait for (`/dev/null`, a regular
    /// file: epoll refuses those), so no thread is started.
    pub fn start(
        devices: Arc<Devices>,
        exit: Arc<VmExit>,
        filter: Option<Arc<ThreadFilter>>,
    ) -> Result<Option<Self>> {
        let stdin = io::stdin();
        let fd = stdin.as_raw_fd();
        let epoll = Epoll::new().map_err(|e| Error::os("epoll_create", e))?;
        if epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
            .is_err()
        {
            return Ok(None);
        }
        let raw = RawMode::enter(fd)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::os("eventfd", e))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 1),
            )
            .map_err(|e| Error::os("epoll_ctl", e))?;
        let thread_stop = stop.try_clone().map_err(|e| Error::os("eventfd", e))?;
        let thread = seccomp::spawn(
            "vdisk-console".into(),
            STACK_SIZE,
            filter,
            "spawning the console thread",
            move || input_loop(fd, epoll, thread_stop, devices, exit),
        )?;
        Ok(Some(Console {
            stop,
            thread: Some(thread),
            _raw: raw,
        }))
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn input_loop(fd: i32, epoll: Epoll, stop: EventFd, devices: Arc<Devices>, exit: Arc<VmExit>) {
    let _keep = stop;
    let mut escapes = Escapes::default();
    let mut events = [EpollEvent::default(); 2];
    let mut buf = [0u8; 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if events[..n].iter().any(|e| e.data() == 1) {
            return;
        }
        // SAFETY: `buf` is a writable buffer of the length passed; `fd` is stdin.
        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            // End of input (or an error): the guest keeps running without a keyboard.
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            continue;
        }
        let (bytes, quit) = match escapes.feed(&buf[..got as usize]) {
            Typed::Input(b) => (b, false),
            Typed::Quit(b) => (b, true),
        };
        let mut rest = &bytes[..];
        while !rest.is_empty() && !exit.is_requested() {
            let sent = devices.serial().enqueue_raw_bytes(rest).unwrap_or(0);
            rest = &rest[sent..];
            if !rest.is_empty() {
                // The guest has not drained the 64-byte FIFO yet.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if quit {
            exit.request(Ok(ExitReason::UserQuit));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut e = Escapes::default();
        assert_eq!(e.feed(b"ls\r"), Typed::Input(b"ls\r".to_vec()));
        assert_eq!(
            e.feed(&[CTRL_A, CTRL_A, b'z']),
            Typed::Input(vec![CTRL_A, b'z'])
        );
        assert_eq!(e.feed(&[CTRL_A, b'c']), Typed::Input(vec![CTRL_A, b'c']));
        // The escape may straddle two reads.
        assert_eq!(e.feed(&[b'a', CTRL_A]), Typed::Input(b"a".to_vec()));
        assert_eq!(e.feed(b"x"), Typed::Quit(Vec::new()));
    }
}
