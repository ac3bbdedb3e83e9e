//! The system calls each kind of VMM thread may make once it runs the guest.
//!
//! Found by reading the code and by running the VM under `strace -f` on raw, qcow2 (with a
//! backing file) and LUKS1/LUKS2 disks, in debug and release builds. What each thread does after
//! setup:
//!
//! * every thread: allocate and free memory (glibc malloc: `brk`, `mmap`, `mremap`, `munmap`,
//!   `mprotect` of a new arena, `madvise`), lock (`futex`), read and write eventfds and write
//!   messages to stderr, close descriptors (`fcntl(F_GETFD)` is debug Rust's check that a
//!   descriptor is still open before closing it), return from a signal handler, and end (Rust's
//!   and glibc's thread exit: `sigaltstack`, `munmap`, `rt_sigprocmask`, `madvise`, `exit`);
//!   `getrandom` seeds a thread's first `HashMap`;
//! * vCPU: `ioctl(KVM_RUN)` and nothing else of KVM (the vCPU fd was configured before);
//! * disk I/O: epoll on the queue notification and control eventfds; the block drivers'
//!   positional I/O, `fallocate` (discard, write-zeroes, allocation), `fdatasync`/`fsync`,
//!   `lseek` (SEEK_DATA/SEEK_HOLE) and `statx`/`fstat` of open files (the qcow2 driver checks
//!   offsets against the file length); and starting threads, because the LUKS cipher splits a
//!   large request over threads: `clone` with exactly the flags of `pthread_create` (glibc tries
//!   `clone3` first, whose flags are in memory a filter cannot read: it gets `ENOSYS`, so glibc
//!   falls back to `clone`), and what a new thread does before its code runs (`rseq`,
//!   `set_robust_list`, `sched_getaffinity`, `gettid`). The cipher asks the standard library
//!   how many CPUs it may use, which reads cgroup files: `openat` gets `ENOSYS` too, and the
//!   answer falls back to the CPU affinity mask;
//! * console: epoll on stdin and its stop eventfd, `read` of stdin, a 1 ms sleep when the UART's
//!   FIFO is full;
//! * main thread: waiting for the end, kicking the vCPU threads out of `KVM_RUN`
//!   (`pthread_kill`: `getpid`, `tgkill`, with signals blocked around it) and sleeping between
//!   kicks, joining the threads, restoring the terminal (`ioctl(TCSETS)`, then `TCGETS`: glibc's
//!   `tcsetattr` reads the settings back), flushing the disks
//!   (the disk I/O calls, which a qcow2 flush or a dirty-bit update may make), unmapping guest
//!   memory and exiting (`exit_group`).

use libc::{c_long, TCGETS, TCSETS};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// `_IO(KVMIO, 0x80)`: the one KVM ioctl of a vCPU thread once the guest runs.
pub(super) const KVM_RUN: u64 = 0xae80;

/// The flags glibc's `pthread_create` passes to `clone`.
pub(super) const PTHREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

/// A system call and the conditions on its arguments (any of the rules; none: always).
pub(super) type Allowed = (c_long, Vec<SeccompRule>);

/// What every thread does (see the module documentation).
const EVERY_THREAD: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Block-layer I/O on open files, for the disk I/O thread and the final flush on the main
/// thread.
const DISK_IO: &[c_long] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_fstat,
];

/// Waiting on eventfds and stdin.
const EPOLL: &[c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// What a thread started by an already confined thread does before its own code runs.
const NEW_THREAD: &[c_long] = &[
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
];

const SLEEP: &[c_long] = &[libc::SYS_clock_nanosleep, libc::SYS_nanosleep];

/// `arg` (of the given width) equals `value`.
fn arg_is(arg: u8, len: SeccompCmpArgLen, value: u64) -> SeccompRule {
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        len,
        SeccompCmpOp::Eq,
        value,
    )
    .expect("argument index below 6")])
    .expect("one condition")
}

/// The calls `kind` may make, in the form the filter compiler takes.
pub(super) fn allowed(kind: ThreadKind) -> Vec<Allowed> {
    let mut calls: Vec<c_long> = EVERY_THREAD.to_vec();
    match kind {
        ThreadKind::Vcpu => {}
        ThreadKind::DiskIo => {
            calls.extend(DISK_IO);
            calls.extend(EPOLL);
            calls.extend(NEW_THREAD);
            // Answered by the errno filter (see `refused`); allowed here so that the stricter
            // action of this filter does not override it.
            calls.extend([libc::SYS_clone3, libc::SYS_openat]);
        }
        ThreadKind::Console => {
            calls.extend(EPOLL);
            calls.extend(SLEEP);
        }
        ThreadKind::Main => {
            calls.extend(DISK_IO);
            calls.extend(SLEEP);
            calls.extend([libc::SYS_getpid, libc::SYS_tgkill]);
        }
    }
    let mut rules: Vec<Allowed> = calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    // Debug builds check a descriptor with F_GETFD before closing it.
    rules.push((
        libc::SYS_fcntl,
        vec![arg_is(1, SeccompCmpArgLen::Dword, libc::F_GETFD as u64)],
    ));
    match kind {
        ThreadKind::Vcpu => rules.push((
            libc::SYS_ioctl,
            vec![arg_is(1, SeccompCmpArgLen::Dword, KVM_RUN)],
        )),
        ThreadKind::Main => rules.push((
            libc::SYS_ioctl,
            vec![
                arg_is(1, SeccompCmpArgLen::Dword, TCSETS),
                arg_is(1, SeccompCmpArgLen::Dword, TCGETS),
            ],
        )),
        ThreadKind::DiskIo => rules.push((
            libc::SYS_clone,
            vec![arg_is(0, SeccompCmpArgLen::Qword, PTHREAD_CLONE_FLAGS)],
        )),
        ThreadKind::Console => {}
    }
    rules
}

/// Calls that fail with `ENOSYS` instead of stopping the VM.
pub(super) fn refused(kind: ThreadKind) -> &'static [c_long] {
    match kind {
        ThreadKind::DiskIo => &[libc::SYS_clone3, libc::SYS_openat],
        ThreadKind::Vcpu | ThreadKind::Console | ThreadKind::Main => &[],
    }
}
