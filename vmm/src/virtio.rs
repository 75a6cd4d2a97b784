//! virtio-mmio devices of a VM (virtio 1.2 §4.2): where they sit in the MMIO
//! hole, how the kernel learns of them (`virtio_mmio.device=<size>@<addr>:<irq>`
//! on its command line, as Firecracker and QEMU microvm do), and the KVM
//! wiring of their notifications — an ioeventfd per queue for QueueNotify and
//! an irqfd for the interrupt, so neither costs an exit to userspace
//! (../shared/HOST-KVM.md: 2 µs instead of 8 µs here). Queue work runs on the
//! event-manager loop, never on a vCPU thread.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::disk::RawFile;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::block::{Block, BlockConfig, BlockMetrics};
use devices::virtio::mmio::{MMIO_SIZE, MmioTransport};
use devices::virtio::net::{DEFAULT_MTU, Net, NetConfig, NetMetrics};
use devices::virtio::{EventSource, VirtioDevice};
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::IoEventAddress;
use memory::GuestFrames;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::irq::IrqFd;
use crate::lock;
use crate::tap::Tap;
use crate::vm::{self, Vm};

/// First virtio-mmio device window, in the MMIO hole below the I/O APIC.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// IRQ of the first device; the others follow (COM1 has 4).
pub const FIRST_IRQ: u32 = 5;
/// Most virtio devices (IRQs 5..=20).
pub const MAX_DEVICES: usize = 16;

/// A `--disk` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file.
    pub path: PathBuf,
    /// Read-only.
    pub read_only: bool,
    /// Serial reported by GET_ID (at most 20 bytes).
    pub serial: Option<String>,
    /// Limits on the guest's requests.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Where a `--net` device's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSpec {
    /// A TAP interface, by name.
    Name(String),
    /// An already-open TAP descriptor passed to minivmm.
    Fd(i32),
}

/// A `--net` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The interface's name (the API's `iface_id`; `net0`, `net1`... from
    /// the command line): what a snapshot's network overrides refer to.
    pub id: Option<String>,
    /// The TAP.
    pub tap: TapSpec,
    /// The guest's MAC address (default: a random locally administered one).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered to the guest (default 1500).
    pub mtu: Option<u16>,
    /// Limits on frames to the guest.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames from the guest.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Errors setting up virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// More devices than IRQs set aside.
    #[error("At most {MAX_DEVICES} virtio devices are supported, {0} requested")]
    TooManyDevices(usize),
    /// The disk image cannot be used (the message names the file).
    #[error(transparent)]
    Disk(#[from] devices::disk::DiskError),
    /// The block device rejected its configuration.
    #[error(transparent)]
    Block(#[from] devices::virtio::block::BlockError),
    /// A TAP cannot be used.
    #[error(transparent)]
    Tap(#[from] crate::tap::TapError),
    /// The same descriptor passed for two devices.
    #[error("fd {0} is given to more than one --net")]
    DuplicateFd(i32),
    /// The MMIO bus refused the device window.
    #[error("Cannot place a virtio device at {0:#x}")]
    Bus(u64, #[source] devices::bus::BusError),
    /// A network device's limiter timer could not be created.
    #[error("Cannot create a network device's rate limiter")]
    RateLimiter(#[source] io::Error),
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The interrupt line could not be set up.
    #[error(transparent)]
    Irq(#[from] vm::Error),
}

/// Where device `index` sits: (MMIO base, IRQ).
pub fn slot(index: usize) -> (u64, u32) {
    (
        MMIO_BASE + index as u64 * MMIO_SIZE,
        FIRST_IRQ + index as u32,
    )
}

/// The windows of `count` devices from slot `first` on, as `(base, size,
/// irq)`: what the kernel command line announces
/// (`virtio_mmio.device=4K@0xd0000000:5`) and the DSDT describes.
pub fn slots(first: usize, count: usize) -> Vec<(u64, u64, u32)> {
    (first..first + count)
        .map(|i| {
            let (base, irq) = slot(i);
            (base, MMIO_SIZE, irq)
        })
        .collect()
}

/// Opens every disk (before KVM is touched, so a bad disk is reported first).
pub fn open_disks(disks: &[DiskConfig]) -> Result<Vec<Block>, Error> {
    if disks.len() > MAX_DEVICES {
        return Err(Error::TooManyDevices(disks.len()));
    }
    disks
        .iter()
        .map(|d| {
            let file = RawFile::open(&d.path, d.read_only)?;
            let config = BlockConfig {
                read_only: d.read_only,
                serial: d.serial.clone(),
                rate_limiter: d.rate_limiter,
            };
            Ok(Block::new(Box::new(file), config)?)
        })
        .collect()
}

/// Opens every TAP (before KVM is touched, like the disks).
pub fn open_nets(nets: &[NetSpec]) -> Result<Vec<Net>, Error> {
    if nets.len() > MAX_DEVICES {
        return Err(Error::TooManyDevices(nets.len()));
    }
    for (i, a) in nets.iter().enumerate() {
        if let TapSpec::Fd(fd) = a.tap
            && nets[..i].iter().any(|b| b.tap == TapSpec::Fd(fd))
        {
            return Err(Error::DuplicateFd(fd));
        }
    }
    nets.iter()
        .map(|n| {
            let tap = match &n.tap {
                TapSpec::Name(name) => Tap::open(name)?,
                TapSpec::Fd(fd) => Tap::from_fd(*fd)?,
            };
            let config = NetConfig {
                mac: n.mac.unwrap_or_else(random_mac),
                mtu: n.mtu.unwrap_or(DEFAULT_MTU),
            };
            log::info!("virtio-net on TAP {}", tap.name());
            let mut net = Net::new(Box::new(tap), config);
            net.set_rate_limiters(n.rx_rate_limiter, n.tx_rate_limiter)
                .map_err(Error::RateLimiter)?;
            Ok(net)
        })
        .collect()
}

/// A random locally administered unicast MAC address (std's hasher keys
/// come from the OS's randomness).
pub fn random_mac() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        .to_le_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bits[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// A device of a running VM, as the VMM (metrics, later an API and
/// snapshots) reaches it: its slot, its transport and its own counters, of
/// the device's type, so nothing needs a downcast.
#[derive(Debug)]
pub struct DeviceHandle<M> {
    /// Its virtio-mmio slot ([`slot`]).
    pub index: usize,
    /// The transport, shared with the MMIO bus and the event loop.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// The device's counters.
    pub metrics: Arc<M>,
}

/// The virtio devices of a VM, by type, in slot order within each type.
#[derive(Debug, Default)]
pub struct Devices {
    /// virtio-blk, one per `--disk`.
    pub blocks: Vec<DeviceHandle<BlockMetrics>>,
    /// virtio-net, one per `--net`, in the slots after the disks.
    pub nets: Vec<DeviceHandle<NetMetrics>>,
}

impl Devices {
    /// Logs every device's counters (at info level: at the end of a run).
    pub fn log_metrics(&self) {
        for b in &self.blocks {
            log::info!("virtio-blk in slot {}: {:?}", b.index, b.metrics.snapshot());
        }
        for n in &self.nets {
            log::info!("virtio-net in slot {}: {:?}", n.index, n.metrics.snapshot());
        }
    }
}

/// A device put on the bus: its transport and its event-loop side.
#[derive(Debug)]
pub struct Attached {
    /// The transport.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What the event loop watches for it.
    pub events: DeviceEvents,
}

/// Puts each device on the MMIO bus at its slot (from `first` on), with an irqfd for its
/// interrupt and an ioeventfd per queue, in slot order.
pub fn attach(
    vm: &Vm,
    frames: &Arc<GuestFrames>,
    bus: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
    first: usize,
) -> Result<Vec<Attached>, Error> {
    if first + devices.len() > MAX_DEVICES {
        return Err(Error::TooManyDevices(first + devices.len()));
    }
    let mut attached = Vec::with_capacity(devices.len());
    for (i, device) in devices.into_iter().enumerate() {
        let index = first + i;
        let (base, irq) = slot(index);
        let irqfd = IrqFd::new(vm, irq)?;
        let queues = device.queue_max_sizes().len();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            frames.clone(),
            Arc::new(irqfd),
        )));
        let mut events = Vec::with_capacity(queues);
        for queue in 0..queues {
            let event = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
            let notify = IoEventAddress::Mmio(base + MmioTransport::queue_notify_offset());
            vm.fd()
                .register_ioevent(&event, &notify, queue as u32)
                .map_err(|e| Error::Kvm("IOEVENTFD", e))?;
            events.push(event);
        }
        bus.insert(base, MMIO_SIZE, transport.clone())
            .map_err(|e| Error::Bus(base, e))?;
        log::info!("virtio device {index} at {base:#x}, IRQ {irq}, {queues} queue(s)");
        let events = DeviceEvents::new(transport.clone(), events)?;
        attached.push(Attached { transport, events });
    }
    Ok(attached)
}

/// Event data of a device's wake event (its sources changed elsewhere).
const WAKE: u32 = u32::MAX;
/// Set in the event data of a device's own source; the rest is its token.
const SOURCE: u32 = 1 << 31;

/// The event-loop side of one device: its queues' ioeventfds, the event its
/// transport signals when the device's sources change, and those sources.
#[derive(Debug)]
pub struct DeviceEvents {
    transport: Arc<Mutex<MmioTransport>>,
    queues: Vec<EventFd>,
    wake: Arc<EventFd>,
    /// The sources registered with the loop.
    watched: Vec<EventSource>,
    logged: bool,
}

impl DeviceEvents {
    /// The event-loop side of `transport`, whose queue `i` is notified
    /// through `queues[i]`; sets the transport's notifier.
    pub(crate) fn new(
        transport: Arc<Mutex<MmioTransport>>,
        queues: Vec<EventFd>,
    ) -> Result<Self, Error> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        lock(&transport).set_notifier(wake.clone());
        Ok(DeviceEvents {
            transport,
            queues,
            wake,
            watched: Vec::new(),
            logged: false,
        })
    }

    /// Signals every queue as if the guest had notified it: after a
    /// restore, chains the guest made available before the snapshot are
    /// served without waiting for its next notification (a queue that is
    /// not live ignores it).
    pub(crate) fn kick(&self) {
        for queue in &self.queues {
            // Fails only if the counter is saturated, which serves it too.
            let _ = queue.write(1);
        }
    }

    /// Registers what the device lists now and unregisters what it no
    /// longer lists.
    fn sync_sources(&mut self, now: &[EventSource], ops: &mut EventOps) {
        let events = |s: &EventSource| Events::with_data_raw(s.fd, SOURCE | s.token, EventSet::IN);
        for gone in self.watched.iter().filter(|s| !now.contains(s)) {
            // Fails only if the descriptor was closed, which unregisters it.
            let _ = ops.remove(events(gone));
        }
        for new in now.iter().filter(|s| !self.watched.contains(s)) {
            if let Err(e) = ops.add(events(new))
                && !std::mem::replace(&mut self.logged, true)
            {
                log::error!("cannot watch a virtio device's source: {e:?} (logged once)");
            }
        }
        self.watched.clear();
        self.watched.extend_from_slice(now);
    }
}

impl MutEventSubscriber for DeviceEvents {
    fn init(&mut self, ops: &mut EventOps) {
        // Also called again when the VM resumes from a pause, after the
        // loop dropped every registration.
        self.watched.clear();
        for (queue, event) in self.queues.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, queue as u32, EventSet::IN)) {
                log::error!("cannot watch virtio queue {queue}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&*self.wake, WAKE, EventSet::IN)) {
            log::error!("cannot watch a virtio device's wake event: {e:?}");
        }
        let transport = self.transport.clone();
        let transport = lock(&transport);
        self.sync_sources(transport.event_sources(), ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        let transport = self.transport.clone();
        let mut transport = lock(&transport);
        match data {
            // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
            WAKE => {
                let _ = self.wake.read();
            }
            // Level-triggered: a source the device left readable at its
            // batch budget is reported again after the loop's other events.
            _ if data & SOURCE != 0 => {
                transport.process_event(data & !SOURCE);
            }
            _ => {
                if let Some(event) = self.queues.get(data as usize) {
                    let _ = event.read();
                    if transport.process_queue(data as usize) {
                        // One batch per wake-up: signal ourselves, so the
                        // loop serves its other events (signals, the console,
                        // other devices) before the next batch.
                        if let Err(e) = event.write(1) {
                            log::warn!("cannot re-arm virtio queue {data}: {e}");
                        }
                    }
                }
            }
        }
        self.sync_sources(transport.event_sources(), ops);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use devices::bus::BusDevice;
    use devices::virtio::{ActivateError, Interrupt, Processed, Queue, QueueError};
    use event_manager::{EventManager, SubscriberOps};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicU64, Ordering};
    use virtio_bindings::virtio_config::*;
    use virtio_bindings::virtio_mmio::*;

    #[derive(Debug)]
    pub(crate) struct NoInterrupt;
    impl Interrupt for NoInterrupt {
        fn trigger(&self) {}
    }

    fn write32(t: &mut MmioTransport, offset: u32, value: u32) {
        t.write(u64::from(offset), &value.to_le_bytes());
    }

    /// The driver's handshake up to DRIVER_OK, with queue 0 (16 entries) in
    /// the first 16 KiB of RAM.
    pub(crate) fn handshake(t: &mut MmioTransport) {
        for status in [1, 3] {
            write32(t, VIRTIO_MMIO_STATUS, status);
        }
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(t, VIRTIO_MMIO_STATUS, 3 | VIRTIO_CONFIG_S_FEATURES_OK);
        write32(t, VIRTIO_MMIO_QUEUE_NUM, 16);
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        write32(
            t,
            VIRTIO_MMIO_STATUS,
            3 | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    /// A device watching a pipe once active, draining what it reads.
    #[derive(Debug)]
    struct PipeDevice {
        pipe: std::fs::File,
        sources: Vec<EventSource>,
        read: Arc<AtomicU64>,
    }

    impl VirtioDevice for PipeDevice {
        fn device_type(&self) -> u32 {
            1
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
            Ok(Processed::default())
        }
        fn activate(&mut self, _: &mut [Queue], _: &GuestFrames) -> Result<(), ActivateError> {
            self.sources = vec![EventSource {
                fd: self.pipe.as_raw_fd(),
                token: 9,
            }];
            Ok(())
        }
        fn event_sources(&self) -> &[EventSource] {
            &self.sources
        }
        fn process_event(
            &mut self,
            token: u32,
            _: &mut [Queue],
            _: &GuestFrames,
        ) -> Result<Processed, QueueError> {
            assert_eq!(token, 9);
            let mut buf = [0u8; 64];
            let n = self.pipe.read(&mut buf).unwrap_or(0);
            self.read.fetch_add(n as u64, Ordering::SeqCst);
            Ok(Processed::default())
        }
        fn reset(&mut self) {
            self.sources.clear();
        }
    }

    #[test]
    fn device_source_is_watched_from_driver_ok_until_reset() {
        let frames =
            Arc::new(GuestFrames::new(16 << 20, memory::guest::Backing::Anonymous).unwrap());
        let (reader, mut writer) = std::io::pipe().unwrap();
        let read = Arc::new(AtomicU64::new(0));
        let device = PipeDevice {
            pipe: std::fs::File::from(std::os::fd::OwnedFd::from(reader)),
            sources: Vec::new(),
            read: read.clone(),
        };
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(device),
            frames,
            Arc::new(NoInterrupt),
        )));
        let queue = EventFd::new(EFD_NONBLOCK).unwrap();
        let events = DeviceEvents::new(transport.clone(), vec![queue]).unwrap();
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(events)));
        let run = |m: &mut EventManager<_>| {
            for _ in 0..4 {
                m.run_with_timeout(10).unwrap();
            }
        };
        writer.write_all(b"early").unwrap();
        run(&mut manager);
        assert_eq!(
            read.load(Ordering::SeqCst),
            0,
            "not watched before DRIVER_OK"
        );
        // DRIVER_OK from another thread (a vCPU's MMIO write): the wake event
        // has the loop register the pipe, which is then drained.
        handshake(&mut transport.lock().unwrap());
        run(&mut manager);
        assert_eq!(read.load(Ordering::SeqCst), 5);
        writer.write_all(b"more").unwrap();
        run(&mut manager);
        assert_eq!(read.load(Ordering::SeqCst), 9);
        // A reset unregisters it: readable input stays in the pipe and the
        // loop does not spin on it.
        write32(&mut transport.lock().unwrap(), VIRTIO_MMIO_STATUS, 0);
        writer.write_all(b"late").unwrap();
        run(&mut manager);
        assert_eq!(read.load(Ordering::SeqCst), 9);
        assert_eq!(
            manager.run_with_timeout(10).unwrap(),
            0,
            "nothing watched fires"
        );
    }

    #[test]
    fn virtio_slots_follow_each_other_below_the_io_apic() {
        assert_eq!(slot(0), (0xd000_0000, 5));
        assert_eq!(slot(2), (0xd000_2000, 7));
        assert_eq!(
            slots(0, 2),
            [(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)]
        );
        assert!(slots(0, 0).is_empty());
        assert_eq!(slots(1, 1), vec![(0xd000_1000, 0x1000, 6)]);
        let (last_base, last_irq) = slot(MAX_DEVICES - 1);
        assert!(last_irq < 24 && last_base + MMIO_SIZE <= 0xfec0_0000);
    }
}
