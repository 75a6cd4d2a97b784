//! Why a VM stopped, how minivmm's exit status follows from it, and the shared
//! latch vCPU threads and the event loop use to stop the VM once.
//!
//! Exit status (documented in the README):
//! | status | meaning |
//! |---|---|
//! | 0 | the guest reset through the i8042, or wrote 0 to the debug-exit port |
//! | 1 | minivmm could not set up or run the VM (one line on stderr says why) |
//! | 2 | bad command line |
//! | 3 | the guest triple-faulted (KVM_EXIT_SHUTDOWN) |
//! | 4 | KVM could not run the guest (internal error, e.g. an instruction the host cannot emulate; failed entry) |
//! | 32 + v | the guest wrote v (1..=95) to the debug-exit port; larger values give 127 |
//! | 128 + n | stopped by signal n (SIGINT 130, SIGTERM 143) |

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 command 0xfe, the ACPI reset
    /// register).
    Reset,
    /// The guest entered ACPI S5 (the FADT's sleep control register).
    PowerOff,
    /// The guest wrote a byte to the debug-exit port.
    DebugExit(u8),
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault {
        /// vCPU index.
        vcpu: u8,
    },
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        /// vCPU index.
        vcpu: u8,
        /// KVM's suberror (1: emulation failure).
        suberror: u32,
        /// Guest RIP at the failure.
        rip: u64,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// A vCPU thread hit an error KVM_RUN reported.
    RunError {
        /// vCPU index.
        vcpu: u8,
        /// errno.
        errno: i32,
    },
    /// minivmm received a signal.
    Signal(i32),
}

impl VmExit {
    /// The process exit status for this reason.
    pub fn status(self) -> i32 {
        match self {
            VmExit::Reset | VmExit::PowerOff | VmExit::DebugExit(0) => 0,
            VmExit::DebugExit(v) => 32 + i32::from(v.min(95)),
            VmExit::TripleFault { .. } => 3,
            VmExit::InternalError { .. } | VmExit::FailEntry { .. } => 4,
            VmExit::RunError { .. } => 1,
            VmExit::Signal(n) => 128 + n,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::PowerOff => write!(f, "guest powered off (ACPI S5)"),
            VmExit::DebugExit(v) => write!(f, "guest wrote {v} to the debug-exit port"),
            VmExit::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN)")
            }
            VmExit::InternalError {
                vcpu,
                suberror,
                rip,
            } => write!(
                f,
                "KVM internal error on vCPU {vcpu}: suberror {suberror}{} at guest RIP {rip:#x}",
                if suberror == 1 {
                    " (emulation failure)"
                } else {
                    ""
                }
            ),
            VmExit::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "KVM could not enter vCPU {vcpu}: hardware reason {reason:#x}"
                )
            }
            VmExit::RunError { vcpu, errno } => {
                write!(
                    f,
                    "KVM_RUN failed on vCPU {vcpu}: {}",
                    std::io::Error::from_raw_os_error(errno)
                )
            }
            VmExit::Signal(n) => write!(f, "stopped by signal {n}"),
        }
    }
}

/// The first stop reason wins; setting it wakes the event loop through an eventfd.
#[derive(Debug)]
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    stopping: AtomicBool,
    event: EventFd,
}

impl ExitLatch {
    /// A latch with no reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitLatch {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless a reason is already recorded, and wakes the loop.
    pub fn stop(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
        }
        self.stopping.store(true, Ordering::Release);
        // A full eventfd counter still wakes the loop; nothing to handle.
        let _ = self.event.write(1);
    }

    /// Whether the VM is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<VmExit> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The eventfd the event loop watches.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_the_documented_table() {
        assert_eq!(VmExit::Reset.status(), 0);
        assert_eq!(VmExit::DebugExit(0).status(), 0);
        assert_eq!(VmExit::DebugExit(1).status(), 33);
        assert_eq!(VmExit::DebugExit(255).status(), 127);
        assert_eq!(VmExit::TripleFault { vcpu: 0 }.status(), 3);
        assert_eq!(
            VmExit::InternalError {
                vcpu: 0,
                suberror: 1,
                rip: 0
            }
            .status(),
            4
        );
        assert_eq!(VmExit::Signal(15).status(), 143);
    }

    #[test]
    fn first_stop_reason_wins() {
        let latch = ExitLatch::new().unwrap();
        assert!(!latch.is_stopping());
        latch.stop(VmExit::DebugExit(3));
        latch.stop(VmExit::Reset);
        assert_eq!(latch.reason(), Some(VmExit::DebugExit(3)));
        assert!(latch.is_stopping());
        assert_eq!(latch.event().read().unwrap(), 2);
    }
}
