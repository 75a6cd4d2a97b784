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
use devices::virtio::VirtioDevice;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{MMIO_SIZE, MmioTransport};
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::IoEventAddress;
use memory::GuestFrames;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::irq::IrqFd;
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
    /// The MMIO bus refused the device window.
    #[error("Cannot place a virtio device at {0:#x}")]
    Bus(u64, #[source] devices::bus::BusError),
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

/// The windows of `count` devices, as `(base, size, irq)`: what the kernel
/// command line announces (`virtio_mmio.device=4K@0xd0000000:5`).
pub fn slots(count: usize) -> Vec<(u64, u64, u32)> {
    (0..count)
        .map(|i| {
            let (base, irq) = slot(i);
            (base, MMIO_SIZE, irq)
        })
        .collect()
}

/// Opens every disk (before KVM is touched, so a bad disk is reported first).
pub fn open_disks(disks: &[DiskConfig]) -> Result<Vec<Box<dyn VirtioDevice>>, Error> {
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
            };
            let block = Block::new(Box::new(file), config)?;
            Ok(Box::new(block) as Box<dyn VirtioDevice>)
        })
        .collect()
}

/// Puts each device on the MMIO bus at its slot, with an irqfd for its
/// interrupt and an ioeventfd per queue. Returns the event-loop side.
pub fn attach(
    vm: &Vm,
    frames: &Arc<GuestFrames>,
    bus: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<Vec<QueueNotifier>, Error> {
    let mut notifiers = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
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
        notifiers.push(QueueNotifier::new(transport, events));
    }
    Ok(notifiers)
}

/// The event-loop side of one device: its queues' ioeventfds.
#[derive(Debug)]
pub struct QueueNotifier {
    transport: Arc<Mutex<MmioTransport>>,
    events: Vec<EventFd>,
}

impl QueueNotifier {
    /// The event-loop side of `transport`, whose queue `i` is notified
    /// through `events[i]`.
    pub(crate) fn new(transport: Arc<Mutex<MmioTransport>>, events: Vec<EventFd>) -> Self {
        QueueNotifier { transport, events }
    }
}

impl MutEventSubscriber for QueueNotifier {
    fn init(&mut self, ops: &mut EventOps) {
        for (queue, event) in self.events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(event, queue as u32, EventSet::IN)) {
                log::error!("cannot watch virtio queue {queue}: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _: &mut EventOps) {
        let queue = events.data() as usize;
        if let Some(event) = self.events.get(queue) {
            // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
            let _ = event.read();
            let more = self
                .transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .process_queue(queue);
            if more {
                // One batch per wake-up: signal ourselves, so the loop serves
                // its other events (signals, the console, other devices)
                // before the next batch.
                if let Err(e) = event.write(1) {
                    log::warn!("cannot re-arm virtio queue {queue}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_follow_each_other_below_the_io_apic() {
        assert_eq!(slot(0), (0xd000_0000, 5));
        assert_eq!(slot(2), (0xd000_2000, 7));
        assert_eq!(
            slots(2),
            [(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)]
        );
        assert!(slots(0).is_empty());
        let (last_base, last_irq) = slot(MAX_DEVICES - 1);
        assert!(last_irq < 24 && last_base + MMIO_SIZE <= 0xfec0_0000);
    }
}
