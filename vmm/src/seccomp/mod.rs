//! Seccomp filters: once the guest runs, each VMM thread can make only the system calls it
//! needs (listed, with the reasons, in `rules.rs`).
//!
//! ```text
//!   Vm::new   Filters::compile: one BPF program set per kind of thread, built once
//!             disk I/O threads start and confine themselves
//!   Vm::run   SIGSYS report handler; console and vCPU threads start and confine themselves;
//!             the calling (main) thread confines itself; then the vCPUs enter KVM_RUN
//! ```
//!
//! Filters are per thread (no `TSYNC`): a thread installs its own before it serves anything,
//! and [`spawn`] returns only once it has. Threads a confined thread starts inherit its filter.
//!
//! A call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`) in the thread that made it. The
//! handler writes which thread made which call to stderr, then makes the same call again:
//! `SIGSYS` is blocked inside its own handler, so the kernel now forces the default action and
//! the process dies by `SIGSYS`, exactly as with `SECCOMP_RET_KILL_PROCESS`, but with a message.
//! A few calls that the standard library makes and copes without (see [`rules`]) fail with
//! `ENOSYS` instead, through a second filter on the same thread.

mod names;
mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use vmm_sys_util::signal::register_signal_handler;

use crate::error::{Error, Result};

pub(crate) use names::syscall_name;

/// The kinds of VMM threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The thread that calls [`crate::Vm::run`]: waits for the end, stops the others, flushes
    /// the disks, and returns to its caller (which may still print and exit, nothing more).
    Main,
    /// A vCPU: `KVM_RUN` and the device emulation of its exits.
    Vcpu,
    /// The I/O thread of one disk: the queue and the block drivers.
    DiskIo,
    /// The stdin reader of the serial console.
    Console,
}

impl ThreadKind {
    /// All kinds.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::DiskIo,
        ThreadKind::Console,
    ];

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::DiskIo => "disk I/O",
            ThreadKind::Console => "console",
        }
    }
}

/// The compiled filter of one kind of thread.
#[derive(Debug)]
pub struct ThreadFilter {
    kind: ThreadKind,
    /// Installed in this order: the `ENOSYS` answers (if any), then the allow list.
    programs: Vec<BpfProgram>,
    /// What the threads started under this filter said about installing it, not yet read
    /// (see [`Filters::confirm_all`]).
    pending: Mutex<Vec<Installed>>,
}

/// A started thread's word on its filter.
#[derive(Debug)]
struct Installed {
    what: &'static str,
    result: Receiver<Result<()>>,
}

impl Installed {
    fn wait(self) -> Result<()> {
        self.result.recv().unwrap_or_else(|_| {
            Err(Error::os(
                self.what,
                std::io::Error::other("the thread ended before installing its seccomp filter"),
            ))
        })
    }
}

thread_local! {
    /// What the current thread is confined as, for the `SIGSYS` report ("" if not confined).
    /// A `const` thread-local without destructor: readable from a signal handler.
    static CONFINED_AS: Cell<&'static str> = const { Cell::new("") };
}

impl ThreadFilter {
    /// Compiles the filter of `kind` to BPF.
    pub fn compile(kind: ThreadKind) -> Result<Self> {
        let fail = |source: seccompiler::Error| Error::Seccomp {
            thread: kind.name(),
            source,
        };
        let compile = |rules: BTreeMap<i64, _>, mismatch, matched| {
            SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
                .and_then(BpfProgram::try_from)
                .map_err(|e| fail(e.into()))
        };
        let mut programs = Vec::new();
        let refused = rules::refused(kind);
        if !refused.is_empty() {
            programs.push(compile(
                refused.iter().map(|&nr| (nr, Vec::new())).collect(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
            )?);
        }
        programs.push(compile(
            rules::allowed(kind).into_iter().collect(),
            SeccompAction::Trap,
            SeccompAction::Allow,
        )?);
        Ok(ThreadFilter {
            kind,
            programs,
            pending: Mutex::new(Vec::new()),
        })
    }

    pub fn kind(&self) -> ThreadKind {
        self.kind
    }

    /// Confines the calling thread, for good (filters cannot be removed). Call
    /// [`install_violation_report`] first, or a forbidden call kills the process without a word.
    pub fn install(&self) -> Result<()> {
        CONFINED_AS.with(|c| c.set(self.kind.name()));
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(|source| Error::Seccomp {
                thread: self.kind.name(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The filters of every kind of thread of a VM, compiled once.
#[derive(Debug, Clone)]
pub struct Filters {
    main: Arc<ThreadFilter>,
    vcpu: Arc<ThreadFilter>,
    disk_io: Arc<ThreadFilter>,
    console: Arc<ThreadFilter>,
}

impl Filters {
    pub fn compile() -> Result<Self> {
        let compile = |kind| ThreadFilter::compile(kind).map(Arc::new);
        Ok(Filters {
            main: compile(ThreadKind::Main)?,
            vcpu: compile(ThreadKind::Vcpu)?,
            disk_io: compile(ThreadKind::DiskIo)?,
            console: compile(ThreadKind::Console)?,
        })
    }

    /// Waits until every thread started under these filters has installed its own, and returns
    /// the first failure. Threads run nothing before their filter is in place, so the VM only
    /// has to call this before the guest runs, not after each start: the threads then start
    /// while the rest of the VM is set up.
    pub fn confirm_all(&self) -> Result<()> {
        let mut result = Ok(());
        for filter in [&self.main, &self.vcpu, &self.disk_io, &self.console] {
            let pending = std::mem::take(&mut *filter.pending.lock().unwrap());
            for installed in pending {
                result = result.and(installed.wait());
            }
        }
        result
    }

    pub fn get(&self, kind: ThreadKind) -> Arc<ThreadFilter> {
        match kind {
            ThreadKind::Main => &self.main,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::DiskIo => &self.disk_io,
            ThreadKind::Console => &self.console,
        }
        .clone()
    }
}

/// Starts a thread that installs `filter` (when given) before it runs `body`; if the filter
/// cannot be installed, the thread ends without running `body`. Whether it was installed is
/// told by [`Filters::confirm_all`].
pub(crate) fn spawn(
    name: String,
    stack_size: usize,
    filter: Option<Arc<ThreadFilter>>,
    what: &'static str,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    let (installed_tx, installed_rx) = std::sync::mpsc::sync_channel(1);
    let filter_of_parent = filter.clone();
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(stack_size)
        .spawn(move || {
            let installed = filter.as_ref().map_or(Ok(()), |f| f.install());
            let confined = installed.is_ok();
            let _ = installed_tx.send(installed);
            if confined {
                body();
            }
        })
        .map_err(|e| Error::os(what, e))?;
    if let Some(filter) = filter_of_parent {
        filter.pending.lock().unwrap().push(Installed {
            what,
            result: installed_rx,
        });
    }
    Ok(thread)
}

/// `si_code` of a `SIGSYS` raised by a seccomp filter (`asm-generic/siginfo.h`).
const SYS_SECCOMP: i32 = 1;

/// Installs, once per process, the `SIGSYS` handler that reports a forbidden call and then
/// lets the process die by `SIGSYS` (see the module documentation).
pub fn install_violation_report() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(libc::SIGSYS, on_forbidden_call).map_err(|e| {
            Error::os(
                "installing the seccomp violation report (SIGSYS handler)",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        });
    });
    result
}

/// A message built without allocating (in a signal handler); longer text is cut.
struct MessageBuf {
    bytes: [u8; 320],
    len: usize,
}

impl std::fmt::Write for MessageBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_forbidden_call(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel hands an SA_SIGINFO handler valid siginfo and ucontext pointers; the
    // handler only reads them.
    let (code, regs) = unsafe {
        (
            (*info).si_code,
            (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs,
        )
    };
    let mut msg = MessageBuf {
        bytes: [0; 320],
        len: 0,
    };
    // The kernel rolls the registers back to the call for SECCOMP_RET_TRAP: RAX holds its
    // number, the argument registers its arguments.
    let nr = regs[libc::REG_RAX as usize];
    if code == SYS_SECCOMP {
        let _ = writeln!(
            msg,
            "vdisk-vmm: seccomp: the {} thread made system call {nr} ({}), which its filter \
             forbids; the VM is stopped (run vdisk boot with --no-seccomp to debug)",
            CONFINED_AS.with(Cell::get),
            syscall_name(nr).unwrap_or("unknown"),
        );
    } else {
        let _ = writeln!(msg, "vdisk-vmm: SIGSYS received; stopping");
    }
    // SAFETY: write(2) from a signal handler with a valid buffer of `len` bytes.
    unsafe { libc::write(libc::STDERR_FILENO, msg.bytes.as_ptr().cast(), msg.len) };
    if code == SYS_SECCOMP {
        // SAFETY: the same call with the same arguments, which this thread's filter refused a
        // moment ago and refuses again (filters are only ever added): the kernel does not run
        // it but raises SIGSYS, blocked here, so the process dies by SIGSYS.
        unsafe {
            libc::syscall(
                nr,
                regs[libc::REG_RDI as usize],
                regs[libc::REG_RSI as usize],
                regs[libc::REG_RDX as usize],
                regs[libc::REG_R10 as usize],
                regs[libc::REG_R8 as usize],
                regs[libc::REG_R9 as usize],
            )
        };
    }
    // SAFETY: _exit ends the process at once; nothing else runs in this handler.
    unsafe { libc::_exit(128 + libc::SIGSYS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_vcpus_get_no_errno_answers() {
        let filters = Filters::compile().unwrap();
        for kind in ThreadKind::ALL {
            let filter = filters.get(kind);
            assert_eq!(filter.kind(), kind);
            let expected = if kind == ThreadKind::DiskIo { 2 } else { 1 };
            assert_eq!(filter.programs.len(), expected, "{kind:?}");
        }
    }

    #[test]
    fn only_the_disk_io_thread_may_start_threads() {
        for kind in ThreadKind::ALL {
            let allowed = rules::allowed(kind);
            let has = |nr| allowed.iter().any(|(n, _)| *n == nr);
            assert_eq!(has(libc::SYS_clone), kind == ThreadKind::DiskIo, "{kind:?}");
            assert!(!has(libc::SYS_execve) && !has(libc::SYS_socket), "{kind:?}");
        }
    }
}
