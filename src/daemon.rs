//! Running in the background the way qemu-nbd does, and ending cleanly on a signal.
//!
//! ```text
//!   vdisk serve --fork ──fork──> child: open image, listen ... ready() ──> serves
//!        │                         │ stderr = pipe until ready(), which also sends one byte
//!        │                         │ on a second pipe
//!        └── relays the stderr pipe until it closes, then exits 0 if the byte came (warnings
//!            printed on the way do not count), else 1
//! ```
//!
//! [`fork`] must run before any thread is started (only the calling thread survives a fork).
//! [`on_termination`] must run before the threads that should not see the signals are started:
//! the signal mask it sets is inherited by every thread created afterwards.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use anyhow::{Context, Result};

/// The child side of [`fork`]: its stderr still goes to the waiting parent.
#[derive(Debug)]
pub struct Child {
    /// The stderr the process had before the fork.
    original_stderr: OwnedFd,
    /// Where the "ready" byte goes.
    ready: File,
}

/// Where the daemon's stderr goes once it is running.
#[derive(Debug)]
pub enum Stderr<'a> {
    /// Back to the stderr the command was started with (qemu-nbd `--fork`).
    Original,
    /// Appended to a file (a log for `vdisk umount` to show).
    File(&'a Path),
    /// Discarded.
    Null,
}

impl Child {
    /// Tells the parent that start-up succeeded: stderr stops going to it, so it exits 0.
    pub fn ready(mut self, stderr: Stderr) -> Result<()> {
        let target: OwnedFd = match stderr {
            Stderr::Original => self.original_stderr,
            Stderr::File(path) => File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open '{}'", path.display()))?
                .into(),
            Stderr::Null => File::options().write(true).open("/dev/null")?.into(),
        };
        self.ready
            .write_all(&[1])
            .context("cannot tell the parent process")?;
        dup2(&target, libc::STDERR_FILENO)?;
        Ok(())
    }
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("cannot create a pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Forks. The parent never returns: it copies what the child writes to stderr until the child
/// calls [`Child::ready`] or exits, then exits itself with status 0 if the child became ready,
/// else 1. The child gets a new session, stdin and stdout on `/dev/null`, and returns.
pub fn fork() -> Result<Child> {
    let (read_end, write_end) = pipe()?;
    let (ready_read, ready_write) = pipe()?;
    // SAFETY: no other thread runs yet (the caller's contract), so the child is a complete copy.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()).context("Failed to fork"),
        0 => {
            drop(read_end);
            drop(ready_read);
            let original_stderr = io::stderr().as_raw_fd();
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an open descriptor returns a new one we own.
            let saved = unsafe { libc::fcntl(original_stderr, libc::F_DUPFD_CLOEXEC, 3) };
            if saved < 0 {
                return Err(io::Error::last_os_error()).context("cannot save stderr");
            }
            // SAFETY: `saved` was just returned by fcntl and is owned by nobody else.
            let original_stderr = unsafe { OwnedFd::from_raw_fd(saved) };
            // SAFETY: setsid has no memory-safety preconditions; failing (already a group
            // leader) is harmless.
            unsafe { libc::setsid() };
            let null: OwnedFd = File::options()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into();
            dup2(&null, libc::STDIN_FILENO)?;
            dup2(&null, libc::STDOUT_FILENO)?;
            dup2(&write_end, libc::STDERR_FILENO)?;
            Ok(Child {
                original_stderr,
                ready: File::from(ready_write),
            })
        }
        pid => {
            drop(write_end);
            drop(ready_write);
            std::process::exit(relay_until_ready(read_end, ready_read, pid))
        }
    }
}

/// The parent's side: copy the child's messages, then pick the exit status.
fn relay_until_ready(messages: OwnedFd, ready: OwnedFd, pid: libc::pid_t) -> i32 {
    let mut pipe = File::from(messages);
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = io::stderr().write_all(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let mut byte = [0u8; 1];
    if matches!(File::from(ready).read(&mut byte), Ok(1)) {
        return 0;
    }
    // The child ended before it was ready: reap it.
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    1
}

fn dup2(from: &OwnedFd, to: i32) -> Result<()> {
    // SAFETY: both are open descriptors; dup2 replaces `to` atomically.
    if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
        return Err(io::Error::last_os_error()).context("dup2");
    }
    Ok(())
}

/// Something that ends a background process's wait.
pub enum Event {
    /// SIGINT, SIGTERM or SIGHUP arrived.
    Signal,
    /// What was being served ended by itself (with its outcome).
    Ended(Result<()>),
}

/// A channel that receives [`Event::Signal`] for each termination signal (see
/// [`on_termination`]); the sender is for the caller's own [`Event::Ended`].
pub fn termination_events() -> Result<(Sender<Event>, Receiver<Event>)> {
    let (tx, rx) = mpsc::channel();
    let signals = tx.clone();
    on_termination(move |_| {
        let _ = signals.send(Event::Signal);
    })?;
    Ok((tx, rx))
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in every thread it starts
/// later) and runs `handler` with the signal number on a dedicated thread each time one arrives.
pub fn on_termination(handler: impl Fn(i32) + Send + 'static) -> Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised signal set; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc)).context("cannot block signals");
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a valid place for the result.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                handler(sig);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Writes this process's id to `path` (`--pid-file`), as `PID\n`.
pub fn write_pid_file(path: &Path) -> Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
        .with_context(|| format!("Failed to write pid file '{}'", path.display()))
}
