//! How a VM ends, and the one-shot signal that carries it from whichever thread saw it (a vCPU,
//! the console, a device) to [`crate::Vm::run`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// Why the VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset through the keyboard controller (port 0x64, 0xFE), as Linux
    /// does for `reboot` with `reboot=k`. The VMM does not restart the guest.
    Reset,
    /// The guest powered off through ACPI (sleep state S5).
    PowerOff,
    /// A vCPU shut down (triple fault, or `reboot=t`).
    Shutdown,
    /// The user typed `Ctrl-A x` on the console.
    UserQuit,
}

/// The first exit request wins; later ones are ignored.
#[derive(Debug)]
pub(crate) struct VmExit {
    outcome: Mutex<Option<Result<ExitReason>>>,
    requested: AtomicBool,
    evt: EventFd,
}

impl VmExit {
    pub fn new() -> Result<Self> {
        Ok(VmExit {
            outcome: Mutex::new(None),
            requested: AtomicBool::new(false),
            evt: EventFd::new(0).map_err(|e| Error::os("eventfd", e))?,
        })
    }

    /// Records `outcome` unless another one came first, and wakes [`VmExit::wait`].
    pub fn request(&self, outcome: Result<ExitReason>) {
        let mut slot = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
            self.requested.store(true, Ordering::SeqCst);
            let _ = self.evt.write(1);
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Blocks until an exit is requested and takes its outcome.
    pub fn wait(&self) -> Result<ExitReason> {
        loop {
            if let Some(outcome) = self
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return outcome;
            }
            match self.evt.read() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::os("waiting for the VM to stop", e)),
            }
        }
    }
}
