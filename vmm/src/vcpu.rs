//! vCPU threads: run `KVM_RUN`, hand I/O exits to the devices, turn stop conditions into a VM
//! exit, and stop when kicked.
//!
//! Stopping: [`stop_all`] sets the exit flag (already set by whoever ended the VM) and sends
//! each thread a real-time signal whose handler does nothing, which makes a blocking `KVM_RUN`
//! return `EINTR`. A signal that lands just before `KVM_RUN` is entered would be lost, so the kick
//! repeats until the thread has finished.
//!
//! Starting: each thread confines itself to the vCPU seccomp filter, then waits at the
//! [`StartGate`] until the main thread has confined itself too, so that no guest code runs
//! before every filter is in place.

use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::Devices;
use crate::error::{Error, Result};
use crate::exit::{ExitReason, VmExit};
use crate::seccomp::{self, ThreadFilter};

/// How long [`stop_all`] waits for a kicked thread before kicking it again: a thread that is
/// past `KVM_RUN` finishes in microseconds.
const KICK_INTERVAL: Duration = Duration::from_micros(50);

/// Stack of a vCPU thread: device emulation needs little.
const STACK_SIZE: usize = 256 << 10;

/// Holds the vCPU threads back until it is opened.
#[derive(Debug, Default)]
pub(crate) struct StartGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl StartGate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing: the interruption of KVM_RUN is the whole point.
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(|e| {
            Error::os(
                "installing the vCPU kick signal handler",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        });
    });
    result
}

/// Starts the thread running vCPU `id`, confined to `filter` when given; it enters the guest
/// once `gate` opens (and the VM is not stopping by then).
pub(crate) fn spawn(
    id: u8,
    vcpu: VcpuFd,
    devices: Arc<Devices>,
    exit: Arc<VmExit>,
    filter: Option<Arc<ThreadFilter>>,
    gate: Arc<StartGate>,
) -> Result<JoinHandle<()>> {
    seccomp::spawn(
        format!("vdisk-vcpu{id}"),
        STACK_SIZE,
        filter,
        "spawning a vCPU thread",
        move || {
            gate.wait();
            if let Some(outcome) = run_loop(id, vcpu, &devices, &exit) {
                exit.request(outcome);
            }
        },
    )
}

/// Runs until the VM should stop; returns the outcome this vCPU caused, if any.
fn run_loop(
    id: u8,
    mut vcpu: VcpuFd,
    devices: &Devices,
    exit: &VmExit,
) -> Option<Result<ExitReason>> {
    let fail = |what: String| Some(Err(Error::Vcpu { cpu: id, what }));
    while !exit.is_requested() {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => return Some(Ok(ExitReason::Shutdown)),
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel LAPIC does HLT reach user space; nothing can wake
                // the vCPU then.
                return fail("halted with interrupts that cannot arrive".into());
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return Some(Ok(ExitReason::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => return Some(Ok(ExitReason::Reset)),
                KVM_SYSTEM_EVENT_CRASH => return fail("guest crashed (system event)".into()),
                other => return fail(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return fail(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => return fail("KVM internal error".into()),
            Ok(other) => return fail(format!("unhandled exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(Err(Error::kvm("KVM_RUN", e))),
        }
    }
    None
}

/// Kicks every vCPU thread until it has stopped, then joins it. The exit must already be
/// requested.
pub(crate) fn stop_all(threads: Vec<JoinHandle<()>>) {
    for thread in threads {
        while !thread.is_finished() {
            let _ = thread.kill(kick_signal());
            std::thread::sleep(KICK_INTERVAL);
        }
        let _ = thread.join();
    }
}
