//! vCPU threads: run KVM_RUN until the VM stops, handling each exit.
//!
//! `handle_exit` is a free function over a `VcpuExit` so tests feed it made-up
//! exits. A vCPU thread stops when the exit latch says so; the main thread kicks
//! vCPUs blocked in KVM_RUN with `KICK_SIGNAL` (a no-op handler makes KVM_RUN
//! return EINTR) until each thread has finished.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, register_signal_handler};

use devices::bus::Bus;

use crate::exit::{ExitLatch, VmExit};

/// What a vCPU's I/O exits reach.
#[derive(Debug)]
pub struct Buses {
    /// Port I/O devices, by port.
    pub pio: Bus,
    /// MMIO devices (virtio-mmio transports).
    pub mmio: Bus,
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Enter the guest again.
    Continue,
    /// Stop the VM with this reason.
    Stop(VmExit),
}

/// Handles one exit (everything but KVM_EXIT_INTERNAL_ERROR, which needs the
/// vCPU's registers). Port I/O and MMIO outside every device read all ones
/// and ignore writes, each port or address logged once.
pub fn handle_exit(
    exit: VcpuExit<'_>,
    buses: &Buses,
    vcpu: u8,
    unknown: &Mutex<HashSet<u64>>,
) -> Action {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !buses.pio.read(u64::from(port), data) {
                log_once(unknown, PIO_KEY | u64::from(port), "PIO read");
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !buses.pio.write(u64::from(port), data) {
                log_once(unknown, PIO_KEY | u64::from(port), "PIO write");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log_once(unknown, addr, "MMIO read");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log_once(unknown, addr, "MMIO write");
            }
        }
        VcpuExit::Shutdown => return Action::Stop(VmExit::TripleFault { vcpu }),
        VcpuExit::FailEntry(reason, _) => return Action::Stop(VmExit::FailEntry { vcpu, reason }),
        VcpuExit::SystemEvent(..) => return Action::Stop(VmExit::Reset),
        // With the split irqchip, an EOI of a level-triggered vector the
        // I/O APIC routes: every pin is an edge here, nothing to do.
        VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {}
        other => {
            log::error!("vCPU {vcpu}: unexpected exit {other:?}");
            return Action::Stop(VmExit::RunError {
                vcpu,
                errno: libc::ENOSYS,
            });
        }
    }
    Action::Continue
}

/// Set in the log-once key of a port (MMIO addresses never have it).
const PIO_KEY: u64 = 1 << 63;

fn log_once(seen: &Mutex<HashSet<u64>>, key: u64, what: &str) {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() < 64 && seen.insert(key) {
        log::info!("ignoring {what} at {:#x} (logged once)", key & !PIO_KEY);
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the no-op handler for `kick_signal` (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuThread {
    handle: JoinHandle<()>,
}

/// Tells its channel that a vCPU thread has finished, when dropped (also when
/// the thread unwinds).
struct Finished(mpsc::Sender<()>);

impl Drop for Finished {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The vCPU threads of a VM, and the channel each reports its end on.
#[derive(Debug)]
pub struct VcpuThreads {
    threads: Vec<VcpuThread>,
    finished_tx: mpsc::Sender<()>,
    finished: mpsc::Receiver<()>,
}

impl Default for VcpuThreads {
    fn default() -> Self {
        let (finished_tx, finished) = mpsc::channel();
        VcpuThreads {
            threads: Vec::new(),
            finished_tx,
            finished,
        }
    }
}

impl VcpuThreads {
    /// Starts vCPU `index` on its own thread.
    pub fn spawn(
        &mut self,
        vcpu: VcpuFd,
        index: u8,
        buses: Arc<Buses>,
        exit: Arc<ExitLatch>,
    ) -> std::io::Result<()> {
        let done = Finished(self.finished_tx.clone());
        let handle = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _done = done;
                run_loop(vcpu, index, &buses, &exit)
            })?;
        self.threads.push(VcpuThread { handle });
        Ok(())
    }

    /// Stops every thread (the latch must already be stopping) and joins them:
    /// kicks the ones still in KVM_RUN, then waits for their end reports,
    /// kicking again every millisecond (a kick can land just before a thread
    /// enters KVM_RUN).
    pub fn join(self) {
        let VcpuThreads {
            threads, finished, ..
        } = self;
        let mut running = threads.len();
        while running > 0 {
            for t in threads.iter().filter(|t| !t.handle.is_finished()) {
                // Fails only once the thread is gone.
                let _ = t.handle.kill(kick_signal());
            }
            while running > 0 && finished.recv_timeout(Duration::from_millis(1)).is_ok() {
                running -= 1;
            }
        }
        for t in threads {
            if t.handle.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

fn run_loop(mut vcpu: VcpuFd, index: u8, buses: &Buses, exit: &ExitLatch) {
    let unknown = Mutex::new(HashSet::new());
    while !exit.is_stopping() {
        let action = match vcpu.run() {
            Ok(VcpuExit::InternalError) => None,
            Ok(e) => Some(handle_exit(e, buses, index, &unknown)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Some(Action::Continue)
            }
            Err(e) => Some(Action::Stop(VmExit::RunError {
                vcpu: index,
                errno: e.errno(),
            })),
        };
        match action {
            Some(Action::Continue) => {}
            Some(Action::Stop(reason)) => exit.stop(reason),
            None => exit.stop(internal_error(&mut vcpu, index)),
        }
    }
}

/// Reads KVM_EXIT_INTERNAL_ERROR's suberror and the guest RIP.
fn internal_error(vcpu: &mut VcpuFd, index: u8) -> VmExit {
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM_RUN just returned KVM_EXIT_INTERNAL_ERROR, for which the kernel
    // fills the `internal` member of the exit union.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    VmExit::InternalError {
        vcpu: index,
        suberror,
        rip,
    }
}
