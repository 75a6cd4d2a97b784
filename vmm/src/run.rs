//! Building and running a VM: a chain of small steps from a `VmConfig` to the
//! `VmExit` that ended it, with every exit path stopping and joining all vCPU
//! threads and restoring the terminal.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use memory::GuestFrames;
use memory::guest::Backing;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::signal::register_signal_handler;

use crate::boot::{self, BootConfig};
use crate::boot_timer::BootTimer;
use crate::console::{self, ConsoleInput, RawTerminal};
use crate::exit::{ExitLatch, VmExit};
use crate::i8042::I8042;
use crate::irq::IrqFd;
use crate::pio::{self, COM1_IRQ, KEYBOARD_IRQ, SerialDevice};
use crate::vcpu::{self, Buses, ExitCounters, PauseGate, VcpuThreads};
use crate::virtio::{self, DeviceEvents, DeviceHandle, Devices, DiskConfig, NetSpec};
use crate::vm::{self, Vm};
use crate::x86::cpuid::CpuTemplate;
use crate::x86::mptable;
use devices::bus::Bus;
use devices::ioapic::{IOAPIC_BASE, IOAPIC_SIZE, IoApic};
use devices::virtio::VirtioDevice;
use devices::virtio::block::Block;
use devices::virtio::mmio::MMIO_SIZE;
use devices::virtio::net::Net;
use kvm_ioctls::VcpuFd;

/// What to boot and with what.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u8,
    /// CPU template.
    pub template: CpuTemplate,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in order (after the disks).
    pub nets: Vec<NetSpec>,
    /// ACPI tables (and the power management registers) instead of
    /// command-line device announcements.
    pub acpi: bool,
    /// Firecracker's boot-time device in the first MMIO slot (`--boot-timer`).
    pub boot_timer: bool,
    /// KVM logs the pages the guest writes, for diff snapshots
    /// (`track_dirty_pages`).
    pub track_dirty_pages: bool,
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest RAM could not be set up.
    #[error("Cannot set up guest RAM")]
    Memory(#[source] memory::guest::Error),
    /// More guest RAM than the host has.
    #[error("--mem {}M is more than the host's {}M of RAM", .requested >> 20, .host >> 20)]
    MemoryTooLarge {
        /// Bytes asked for.
        requested: u64,
        /// Host physical memory in bytes.
        host: u64,
    },
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// KVM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// A virtio device could not be set up.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
    /// A host resource (eventfd, thread, signal handler, epoll) failed.
    #[error("Cannot set up {0}")]
    Host(&'static str, #[source] io::Error),
}

/// Boots the VM and runs it until it stops.
pub fn run(config: &VmConfig) -> Result<VmExit, Error> {
    Vmm::new(config)?.run()
}

/// A VM built from a [`VmConfig`] and ready to run: the KVM VM, its vCPUs,
/// buses and devices, the console and the stop latch. Fields drop in
/// declaration order: devices and the VM before guest RAM.
#[derive(Debug)]
pub struct Vmm {
    pub(crate) vcpus: Vec<VcpuFd>,
    buses: Arc<Buses>,
    console: ConsoleInput,
    pub(crate) device_events: Vec<DeviceEvents>,
    devices: Arc<Devices>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) machine: Machine,
    exit: Arc<ExitLatch>,
    pub(crate) vm: Vm,
    frames: Arc<GuestFrames>,
    /// The vCPUs and devices wait at the pause gate from the start (a
    /// restored VM loaded without `resume_vm`).
    pub(crate) start_paused: bool,
}

/// What a snapshot reads of a running VM besides its devices and vCPUs.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The KVM VM (its clock).
    pub vm: Arc<kvm_ioctls::VmFd>,
    /// The MSRs KVM saves for each vCPU.
    pub msrs: Arc<[u32]>,
    /// Guest RAM.
    pub frames: Arc<GuestFrames>,
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The I/O APIC.
    pub ioapic: Arc<Mutex<IoApic>>,
    /// What the VM was built from, as the API changed it since (drives
    /// swapped, limiters updated).
    pub config: Arc<Mutex<VmConfig>>,
    /// A memory file holds this VM's RAM as of the last snapshot (or the
    /// restore): what a diff snapshot is written on top of.
    pub has_base: Arc<AtomicBool>,
}

impl Vmm {
    /// Checks the configuration, opens every file, loads the kernel and
    /// builds the VM; nothing runs yet.
    pub fn new(config: &VmConfig) -> Result<Self, Error> {
        let host = host_memory();
        if config.mem > host {
            return Err(Error::MemoryTooLarge {
                requested: config.mem,
                host,
            });
        }
        let frames =
            Arc::new(GuestFrames::new(config.mem, Backing::Anonymous).map_err(Error::Memory)?);
        // Devices first: a bad disk or TAP is reported before anything else
        // is built. Disks take the first slots, then the network devices.
        let blocks = virtio::open_disks(&config.disks)?;
        let nets = virtio::open_nets(&config.nets)?;
        // The boot timer, when asked for, takes the first slot.
        let first_slot = usize::from(config.boot_timer);
        let slots = virtio::slots(first_slot, blocks.len() + nets.len());
        let boot_config = BootConfig {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
            virtio_mmio: &slots,
            cpus: config.cpus,
            acpi: config.acpi,
        };
        let boot = boot::load(&frames, &boot_config)?;
        let vm = Vm::new(&frames, config.track_dirty_pages)?;
        let mut vmm = Vmm::assemble(config, frames, vm, blocks, nets, None)?;
        vmm.vcpus = vmm.vm.create_vcpus(config.cpus, config.template, &boot)?;
        Ok(vmm)
    }

    /// Everything but the vCPUs, around `vm` (with `frames` mapped) and the
    /// opened devices: buses, I/O APIC, COM1 (from `serial` when restoring),
    /// the i8042, the virtio transports with their irqfds and ioeventfds.
    pub(crate) fn assemble(
        config: &VmConfig,
        frames: Arc<GuestFrames>,
        vm: Vm,
        blocks: Vec<Block>,
        nets: Vec<Net>,
        serial: Option<vm_superio::serial::SerialState>,
    ) -> Result<Self, Error> {
        let block_metrics: Vec<_> = blocks.iter().map(Block::metrics).collect();
        let net_metrics: Vec<_> = nets.iter().map(Net::metrics).collect();
        let virtio_devices: Vec<Box<dyn VirtioDevice>> = blocks
            .into_iter()
            .map(|b| Box::new(b) as Box<dyn VirtioDevice>)
            .chain(
                nets.into_iter()
                    .map(|n| Box::new(n) as Box<dyn VirtioDevice>),
            )
            .collect();
        let first_slot = usize::from(config.boot_timer);
        let exit = Arc::new(ExitLatch::new().map_err(|e| Error::Host("the exit eventfd", e))?);
        let (serial, console) = attach_serial(&vm, serial)?;
        let mut mmio = Bus::new();
        let ioapic = Arc::new(Mutex::new(IoApic::new(
            mptable::ioapic_id(config.cpus),
            Arc::new(vm.routes()),
        )));
        mmio.insert(IOAPIC_BASE, IOAPIC_SIZE, ioapic.clone())
            .map_err(|e| Error::Host("the I/O APIC", io::Error::other(e.to_string())))?;
        if config.boot_timer {
            let (base, _) = virtio::slot(0);
            mmio.insert(base, MMIO_SIZE, Arc::new(Mutex::new(BootTimer::new())))
                .map_err(|e| Error::Host("the boot timer", io::Error::other(e.to_string())))?;
        }
        let attached = virtio::attach(&vm, &frames, &mut mmio, virtio_devices, first_slot)?;
        let mut devices = Devices::default();
        let mut device_events = Vec::with_capacity(attached.len());
        for (i, a) in attached.into_iter().enumerate() {
            let transport = a.transport;
            let index = first_slot + i;
            match block_metrics.get(i) {
                Some(metrics) => devices.blocks.push(DeviceHandle {
                    index,
                    transport,
                    metrics: metrics.clone(),
                }),
                None => devices.nets.push(DeviceHandle {
                    index,
                    transport,
                    metrics: net_metrics[i - block_metrics.len()].clone(),
                }),
            }
            device_events.push(a.events);
        }
        let keyboard = Arc::new(IrqFd::new(&vm, KEYBOARD_IRQ)?);
        let i8042 = Arc::new(Mutex::new(I8042::new(keyboard, exit.clone())));
        let msrs = crate::vcpu_state::msr_list(vm.kvm())
            .map_err(|e| Error::Host("the MSR list", io::Error::other(e.to_string())))?;
        let machine = Machine {
            vm: vm.fd_arc(),
            msrs: msrs.into(),
            frames: frames.clone(),
            serial: serial.clone(),
            ioapic,
            config: Arc::new(Mutex::new(config.clone())),
            has_base: Arc::new(AtomicBool::new(false)),
        };
        let pio = pio::legacy_bus(serial, i8042.clone(), &exit, config.acpi)
            .map_err(|e| Error::Host("the legacy ports", io::Error::other(e.to_string())))?;
        let buses = Arc::new(Buses {
            pio,
            mmio,
            exits: ExitCounters::default(),
        });
        Ok(Vmm {
            vcpus: Vec::new(),
            buses,
            console,
            device_events,
            devices: Arc::new(devices),
            i8042,
            machine,
            exit,
            vm,
            frames,
            start_paused: false,
        })
    }

    /// The VM's devices, by type.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// Guest RAM.
    pub fn frames(&self) -> &Arc<GuestFrames> {
        &self.frames
    }

    /// Runs the vCPUs and the event loop until the VM stops; every path
    /// stops and joins every vCPU thread and restores the terminal.
    pub fn run(self) -> Result<VmExit, Error> {
        self.run_with(|_| Vec::new())
    }

    /// As [`Vmm::run`], with the event-loop subscribers `control` makes
    /// from the running VM's handles (the API, the metrics timer).
    pub fn run_with(
        self,
        control: impl FnOnce(Running) -> Vec<Subscriber>,
    ) -> Result<VmExit, Error> {
        let Vmm {
            vcpus,
            buses,
            console,
            device_events,
            devices,
            i8042,
            machine,
            exit,
            vm,
            frames,
            start_paused,
        } = self;
        vcpu::install_kick_handler().map_err(|e| Error::Host("the vCPU kick signal", e))?;
        install_stop_signals(&exit).map_err(|e| Error::Host("SIGINT/SIGTERM handlers", e))?;
        let _terminal = RawTerminal::enter();

        let mut threads = VcpuThreads::default();
        if start_paused {
            threads.gate().pause_from_start();
        }
        let mut spawn_error = None;
        for (index, fd) in vcpus.into_iter().enumerate() {
            if let Err(e) = threads.spawn(fd, index as u8, buses.clone(), exit.clone()) {
                spawn_error = Some(Error::Host("a vCPU thread", e));
                break;
            }
        }
        let loop_result = match spawn_error {
            None => {
                let running = Running {
                    devices: devices.clone(),
                    buses: buses.clone(),
                    vcpus: threads.gate(),
                    i8042,
                    machine,
                    exit: exit.clone(),
                    devices_paused: Arc::new(AtomicBool::new(start_paused)),
                };
                let paused = running.devices_paused.clone();
                let control = control(running);
                event_loop(&exit, console, device_events, control, &paused)
            }
            Some(e) => Err(e),
        };
        // Every path stops and joins every vCPU before returning.
        exit.stop(VmExit::Signal(0));
        threads.join();
        loop_result?;
        devices.log_metrics();
        // Devices and the VM go before guest RAM.
        drop((buses, devices, vm));
        drop(frames);
        Ok(exit.reason().expect("stop recorded a reason"))
    }
}

/// Physical memory of the host in bytes (u64::MAX if unknown).
fn host_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(size)) {
        (Ok(p), Ok(s)) if p > 0 && s > 0 => p.saturating_mul(s),
        _ => u64::MAX,
    }
}

/// COM1 on stdout, its IRQ raised through an irqfd; and the event loop's
/// side of it, reading stdin.
fn attach_serial(
    vm: &Vm,
    state: Option<vm_superio::serial::SerialState>,
) -> Result<(Arc<Mutex<SerialDevice>>, ConsoleInput), Error> {
    let irq = IrqFd::new(vm, COM1_IRQ)?;
    let (serial, room) = console::serial(irq, Box::new(io::stdout()), state)
        .map_err(|e| Error::Host("the console", e))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
    let stdin = ConsoleInput::stdin().map_err(|e| Error::Host("the console's stdin", e))?;
    Ok((serial.clone(), ConsoleInput::new(serial, stdin, room)))
}

/// An event-loop subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The handles of a running VM that its controls (the API) use.
#[derive(Debug, Clone)]
pub struct Running {
    /// The virtio devices.
    pub devices: Arc<Devices>,
    /// The buses and the vCPUs' exit counters.
    pub buses: Arc<Buses>,
    /// Pauses and resumes the vCPUs.
    pub vcpus: Arc<PauseGate>,
    /// The keyboard controller (Ctrl+Alt+Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// The VM, RAM and legacy devices, for snapshots.
    pub machine: Machine,
    /// Stops the VM.
    pub exit: Arc<ExitLatch>,
    /// Whether the event loop serves the devices and the console.
    devices_paused: Arc<AtomicBool>,
}

impl Running {
    /// Stops the vCPUs at a safe point, then the devices and the console
    /// (after the batch the event loop is in, if any). False if a vCPU did
    /// not stop within the gate's timeout.
    pub fn pause(&self) -> bool {
        let stopped = self.vcpus.pause();
        self.devices_paused.store(true, Ordering::Release);
        stopped
    }

    /// Lets the devices and the vCPUs run again; notifications that came
    /// while paused are served (the loop's sources are level-triggered).
    pub fn resume(&self) {
        self.devices_paused.store(false, Ordering::Release);
        self.vcpus.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }
}

/// Runs the event loop on this thread until the VM stops. While
/// `devices_paused`, the console and the devices are off the loop (their
/// notifications wait in their eventfds); `control` and the stop watcher
/// stay on it.
fn event_loop(
    exit: &Arc<ExitLatch>,
    console: ConsoleInput,
    notifiers: Vec<DeviceEvents>,
    control: Vec<Subscriber>,
    devices_paused: &AtomicBool,
) -> Result<(), Error> {
    let host =
        |e: event_manager::Error| Error::Host("the event loop", io::Error::other(e.to_string()));
    let mut manager: EventManager<Subscriber> = EventManager::new().map_err(host)?;
    manager.add_subscriber(Arc::new(Mutex::new(StopWatcher(exit.clone()))));
    for c in control {
        manager.add_subscriber(c);
    }
    let mut pausable: Vec<Subscriber> = vec![Arc::new(Mutex::new(console))];
    pausable.extend(
        notifiers
            .into_iter()
            .map(|n| Arc::new(Mutex::new(n)) as Subscriber),
    );
    let mut ids: Vec<_> = pausable
        .iter()
        .map(|s| manager.add_subscriber(s.clone()))
        .collect();
    while !exit.is_stopping() {
        manager.run_with_timeout(100).map_err(host)?;
        let signal = SIGNAL.load(Ordering::Acquire);
        if signal != 0 {
            exit.stop(VmExit::Signal(signal));
        }
        match (devices_paused.load(Ordering::Acquire), ids.is_empty()) {
            (true, false) => {
                for id in ids.drain(..) {
                    manager.remove_subscriber(id).map_err(host)?;
                }
            }
            (false, true) => {
                ids = pausable
                    .iter()
                    .map(|s| manager.add_subscriber(s.clone()))
                    .collect();
            }
            _ => {}
        }
    }
    Ok(())
}

/// Wakes the loop when the stop latch fires.
struct StopWatcher(Arc<ExitLatch>);

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch the stop event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.event().read();
    }
}

/// Signal number received (SIGINT, SIGTERM), 0 if none.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The stop latch's eventfd, written by the signal handler to wake the loop.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

fn install_stop_signals(exit: &ExitLatch) -> io::Result<()> {
    extern "C" fn on_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        SIGNAL.store(num, Ordering::Release);
        let fd = STOP_FD.load(Ordering::Acquire);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte value
            // and `fd` is the eventfd the latch owns for the whole run.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
    use std::os::fd::AsRawFd;
    STOP_FD.store(exit.event().as_raw_fd(), Ordering::Release);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        register_signal_handler(sig, on_signal)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tests::NoInterrupt;
    use devices::virtio::mmio::MmioTransport;
    use devices::virtio::{Processed, Queue, QueueError, VirtioDevice};
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_config::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    /// A device whose queue never runs dry: every batch ends with more.
    #[derive(Debug)]
    struct Endless(Arc<AtomicU64>);

    impl VirtioDevice for Endless {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn avail_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn chain_limit(&self, _: usize) -> u64 {
            u64::MAX
        }
        fn process_queue(
            &mut self,
            _: usize,
            _: &mut Queue,
            _: &GuestFrames,
        ) -> Result<Processed, QueueError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Processed {
                used: false,
                more: true,
            })
        }
        fn reset(&mut self) {}
    }

    #[test]
    fn event_loop_serves_a_pending_signal_between_batches_of_endless_work() {
        let frames = Arc::new(GuestFrames::new(16 << 20, Backing::Anonymous).unwrap());
        let batches = Arc::new(AtomicU64::new(0));
        let mut t = MmioTransport::new(
            Box::new(Endless(batches.clone())),
            frames,
            Arc::new(NoInterrupt),
        );
        crate::virtio::tests::handshake(&mut t);
        let event = EventFd::new(EFD_NONBLOCK).unwrap();
        event.write(1).unwrap();
        let notifier = DeviceEvents::new(Arc::new(Mutex::new(t)), vec![event]).unwrap();
        let exit = Arc::new(ExitLatch::new().unwrap());
        let (serial, room) =
            console::serial(IrqFd::unregistered().unwrap(), Box::new(io::sink()), None).unwrap();
        let (reader, _writer) = io::pipe().unwrap();
        let input = std::fs::File::from(std::os::fd::OwnedFd::from(reader));
        let console =
            ConsoleInput::new(Arc::new(Mutex::new(SerialDevice::new(serial))), input, room);
        let loop_exit = exit.clone();
        let runner = std::thread::spawn(move || {
            event_loop(
                &loop_exit,
                console,
                vec![notifier],
                Vec::new(),
                &AtomicBool::new(false),
            )
        });
        // The device is being served batch after batch, each re-armed.
        let start = Instant::now();
        while batches.load(Ordering::Relaxed) < 100 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no batches served"
            );
            std::thread::yield_now();
        }
        // What the SIGTERM handler does: record the signal, wake the loop.
        SIGNAL.store(libc::SIGTERM, Ordering::Release);
        exit.event().write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !runner.is_finished() {
            assert!(Instant::now() < deadline, "the loop ignored the signal");
            std::thread::sleep(Duration::from_millis(1));
        }
        runner.join().unwrap().unwrap();
        SIGNAL.store(0, Ordering::Release);
        assert_eq!(exit.reason(), Some(VmExit::Signal(libc::SIGTERM)));
    }
}
