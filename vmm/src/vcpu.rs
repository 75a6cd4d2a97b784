//! vCPU threads: run KVM_RUN until the VM stops, handling each exit.
//!
//! `handle_exit` is a free function over a `VcpuExit` so tests feed it made-up
//! exits. A vCPU thread stops when the exit latch says so; the main thread kicks
//! vCPUs blocked in KVM_RUN with `KICK_SIGNAL` (a no-op handler makes KVM_RUN
//! return EINTR) until each thread has finished.

use std::collections::HashSet;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, register_signal_handler};

use devices::bus::Bus;

use crate::exit::{ExitLatch, VmExit};
use crate::vcpu_state::{self, VcpuState};

/// What a vCPU's I/O exits reach.
#[derive(Debug)]
pub struct Buses {
    /// Port I/O devices, by port.
    pub pio: Bus,
    /// MMIO devices (virtio-mmio transports).
    pub mmio: Bus,
    /// VM exits by kind, over every vCPU.
    pub exits: ExitCounters,
}

/// VM exits that reached userspace, by kind (the metrics' `vcpu` section).
/// Exits KVM handles itself (ioeventfd notifications among them) are not
/// seen here.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT (with the in-kernel local APIC only when the guest halts for good).
    pub hlt: AtomicU64,
    /// KVM_RUN interrupted by a signal (kicks, pause, stop).
    pub interrupted: AtomicU64,
    /// Every other exit.
    pub other: AtomicU64,
}

impl ExitCounters {
    fn count(&self, exit: &VcpuExit<'_>) {
        let counter = match exit {
            VcpuExit::IoIn(..) => &self.io_in,
            VcpuExit::IoOut(..) => &self.io_out,
            VcpuExit::MmioRead(..) => &self.mmio_read,
            VcpuExit::MmioWrite(..) => &self.mmio_write,
            VcpuExit::Hlt => &self.hlt,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
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
    buses.exits.count(&exit);
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
    gate: Arc<PauseGate>,
}

impl Default for VcpuThreads {
    fn default() -> Self {
        let (finished_tx, finished) = mpsc::channel();
        VcpuThreads {
            threads: Vec::new(),
            finished_tx,
            finished,
            gate: Arc::new(PauseGate::default()),
        }
    }
}

/// Where vCPU threads stop while the VM is paused: after handling an exit,
/// before entering the guest again (every I/O exit complete on the device
/// side; a pending MMIO or PIO read is delivered at the next KVM_RUN).
#[derive(Debug, Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// The threads to kick, as pthread ids (valid until they are joined,
    /// which happens only after the event loop, the gate's user, returns).
    threads: Mutex<Vec<libc::pthread_t>>,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    parked: usize,
    /// A request to parked vCPUs to save their state (snapshots).
    save: Option<SaveRequest>,
}

/// What `PauseGate::save_states` asks of the parked vCPUs: the MSRs to
/// read, and a slot per vCPU for its answer.
#[derive(Debug)]
struct SaveRequest {
    msrs: Arc<[u32]>,
    states: Vec<Option<Result<VcpuState, String>>>,
}

/// How long `pause` waits for every vCPU to reach the gate.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every vCPU at the gate and returns once all are there (false
    /// if some did not arrive within 5 s; they stop when they do).
    pub fn pause(&self) -> bool {
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.lock();
        state.paused = true;
        while state.parked < threads.len() {
            if Instant::now() >= deadline {
                return false;
            }
            drop(state);
            for &t in &threads {
                // SAFETY: `t` is a thread of this process that has not been
                // joined (see `threads`); the kick signal's handler is a no-op.
                unsafe { libc::pthread_kill(t, kick_signal()) };
            }
            state = self.lock();
            // A kick can land just before a thread enters KVM_RUN: kick again
            // every millisecond until every thread is parked.
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Makes vCPU threads not yet started park at the gate before their
    /// first entry into the guest (a VM restored paused); `pause` would
    /// wait for threads that do not exist yet.
    pub fn pause_from_start(&self) {
        self.lock().paused = true;
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// The state of every vCPU of a paused VM, each read by its own thread
    /// at the gate; `msrs` from [`vcpu_state::msr_list`].
    pub fn save_states(&self, msrs: Vec<u32>, vcpus: usize) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut state = self.lock();
        if !state.paused || state.parked < vcpus {
            return Err("the vCPUs are not paused".to_owned());
        }
        state.save = Some(SaveRequest {
            msrs: msrs.into(),
            states: (0..vcpus).map(|_| None).collect(),
        });
        self.changed.notify_all();
        loop {
            let done = state
                .save
                .as_ref()
                .is_some_and(|r| r.states.iter().all(Option::is_some));
            if done || Instant::now() >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let request = state.save.take().expect("set above");
        request
            .states
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(e)) => Err(format!("vCPU {i}: {e}")),
                None => Err(format!("vCPU {i} did not save its state within 5 s")),
            })
            .collect()
    }

    /// Called by a vCPU thread between exits: waits while paused (and the
    /// VM is not stopping), saving its state when asked.
    fn wait_if_paused(&self, exit: &ExitLatch, vcpu: &VcpuFd, index: u8) {
        let mut state = self.lock();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !exit.is_stopping() {
            let slot = usize::from(index);
            if let Some(request) = &state.save
                && request.states.get(slot).is_some_and(Option::is_none)
            {
                let msrs = request.msrs.clone();
                drop(state);
                let saved = vcpu_state::save(vcpu, &msrs).map_err(|e| crate::error_chain(&e));
                state = self.lock();
                if let Some(request) = &mut state.save
                    && let Some(s) = request.states.get_mut(slot)
                {
                    *s = Some(saved);
                }
                self.changed.notify_all();
                continue;
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.parked -= 1;
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
        let gate = self.gate.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _done = done;
                run_loop(vcpu, index, &buses, &exit, &gate)
            })?;
        self.gate
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(handle.as_pthread_t());
        self.threads.push(VcpuThread { handle });
        Ok(())
    }

    /// The gate that pauses these threads.
    pub fn gate(&self) -> Arc<PauseGate> {
        self.gate.clone()
    }

    /// Stops every thread (the latch must already be stopping) and joins them:
    /// kicks the ones still in KVM_RUN, then waits for their end reports,
    /// kicking again every millisecond (a kick can land just before a thread
    /// enters KVM_RUN).
    pub fn join(self) {
        let VcpuThreads {
            threads,
            finished,
            gate,
            ..
        } = self;
        // Parked threads see the stopping latch within 100 ms; waking them
        // now is quicker.
        gate.changed.notify_all();
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

fn run_loop(mut vcpu: VcpuFd, index: u8, buses: &Buses, exit: &ExitLatch, gate: &PauseGate) {
    let unknown = Mutex::new(HashSet::new());
    while !exit.is_stopping() {
        gate.wait_if_paused(exit, &vcpu, index);
        if exit.is_stopping() {
            break;
        }
        let action = match vcpu.run() {
            Ok(VcpuExit::InternalError) => None,
            Ok(e) => Some(handle_exit(e, buses, index, &unknown)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                buses.exits.interrupted.fetch_add(1, Ordering::Relaxed);
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
