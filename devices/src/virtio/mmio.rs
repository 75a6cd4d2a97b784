//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), with the device
//! status state machine of §2.1 and the initialization sequence of §3.1.1.
//!
//! Everything the driver writes is checked:
//! - registers below the config space take aligned 32-bit accesses only;
//!   other widths read 0 and are ignored (counted);
//! - the status only advances ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK
//!   (FAILED any time, 0 resets); a write that clears bits or skips a step is
//!   ignored (counted). FEATURES_OK is refused without VIRTIO_F_VERSION_1.
//!   DEVICE_NEEDS_RESET belongs to the device: the driver may not set it, and
//!   once set a write must keep it (it is cleared only by a reset). Once the
//!   driver sets FAILED it has given up (§3.1.1): no further step is accepted
//!   and no queue is processed until it resets the device;
//! - feature words are writable only after DRIVER and before FEATURES_OK; bits
//!   the device did not offer are dropped (counted);
//! - queue registers are writable only between FEATURES_OK and DRIVER_OK and,
//!   but for QueueReady=0, only while the queue is not ready: a queue's size or
//!   rings never change under an active queue (ADVERSARIAL.md §9). QueueReady
//!   takes 0 or 1 only; QueueNum keeps its old value when the new one is
//!   invalid;
//! - at DRIVER_OK every ready queue is validated ([`Queue::activate`]); a bad
//!   queue, or a fatal queue error later, sets DEVICE_NEEDS_RESET and raises a
//!   configuration-change interrupt (§2.1.2);
//! - QueueNotify for a queue that does not exist, before DRIVER_OK, for an
//!   inactive queue or while NEEDS_RESET is set touches nothing (counted);
//! - after the queues, the device itself is activated at DRIVER_OK
//!   ([`VirtioDevice::activate`]); its event sources are listed
//!   ([`MmioTransport::event_sources`]) only while it is live and active, and
//!   an event on one reaches it only then (otherwise counted like a bad
//!   notification). Whenever that list changes the transport's [`Notifier`]
//!   is told, so the VMM watches exactly what the device asks for.
//!
//! Notifications normally arrive through an ioeventfd on QueueNotify (the VMM
//! calls [`MmioTransport::process_queue`] from its event loop); a write that
//! reaches the transport does the same.
//!
//! Choices where the spec leaves room:
//! - ConfigGeneration counts resets and device updates that change the
//!   configuration space ([`MmioTransport::update_device`], a new disk
//!   capacity), which also raise a configuration-change interrupt while the
//!   device is live;
//! - there are no shared memory regions: SHMLen and SHMBase read all ones for
//!   any SHMSel; QueueReset (VIRTIO_F_RING_RESET) is not offered, so its
//!   register is unknown like the legacy ones (reads 0, counted);
//! - write-only registers read 0 and read-only ones ignore writes (counted);
//! - a queue or device error is logged once per transport (a guest that
//!   breaks its queues in a loop must not flood the log); the counters keep
//!   counting.

use std::fmt;
use std::sync::Arc;

use log::warn;
use memory::GuestFrames;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;

use super::{
    DeviceUpdate, EventSource, Interrupt, Notifier, Processed, Queue, QueueError, UpdateError,
    UpdateOutcome, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
};
use crate::bus::BusDevice;

/// Bytes of one virtio-mmio device window.
pub const MMIO_SIZE: u64 = 0x1000;
/// MagicValue: "virt", little endian.
const MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// Transport version 2 (virtio 1.x, no legacy).
const VERSION: u32 = 2;
/// VendorID: "MVMM" little endian (0x4d4d564d), minivmm's own; drivers match
/// on the device ID, not on this.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"MVMM");

/// The initialization steps, in the order the driver must take them (§3.1.1).
const STATUS_STEPS: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// Counters of what the driver did wrong (or merely oddly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransportMetrics {
    /// Accesses of the wrong width or alignment, or to unknown registers.
    pub bad_access: u64,
    /// Status writes that clear bits, skip a step, set DEVICE_NEEDS_RESET or
    /// advance after FAILED.
    pub bad_status: u64,
    /// Feature writes outside DRIVER..FEATURES_OK, or bits that were not
    /// offered.
    pub bad_features: u64,
    /// FEATURES_OK refused (no VIRTIO_F_VERSION_1).
    pub features_refused: u64,
    /// Queue register writes outside the allowed window, for no queue, to a
    /// ready queue, or QueueReady values other than 0 and 1.
    pub bad_queue_write: u64,
    /// QueueNum values rejected (0, not a power of two, above QueueNumMax).
    pub bad_queue_size: u64,
    /// Notifications that could not be acted on (no such queue, not live,
    /// queue not active).
    pub bad_notify: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Device resets (status 0).
    pub resets: u64,
    /// Queue notifications processed.
    pub notifies: u64,
    /// Malformed chains the device reported (returned to the driver; not
    /// fatal).
    pub bad_chains: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Notifications whose work was cut at the batch budget and resumed later.
    pub batches_cut: u64,
    /// Events of the device's own sources handed to it.
    pub source_events: u64,
    /// Times the device failed to activate at DRIVER_OK.
    pub activate_failed: u64,
}

/// A virtio device behind a virtio-mmio register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    frames: Arc<GuestFrames>,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    metrics: TransportMetrics,
    logged_fatal: bool,
    /// The device was activated at DRIVER_OK (and not reset since).
    active: bool,
    /// The event sources the VMM is told to watch.
    watched: Vec<EventSource>,
    notifier: Option<Arc<dyn Notifier>>,
}

impl MmioTransport {
    /// Wraps `device`, with one queue per entry of its `queue_max_sizes`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        frames: Arc<GuestFrames>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                let mut q = Queue::new(max);
                q.set_chain_limit(device.chain_limit(i));
                q
            })
            .collect();
        MmioTransport {
            device,
            frames,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            metrics: TransportMetrics::default(),
            logged_fatal: false,
            active: false,
            watched: Vec::new(),
            notifier: None,
        }
    }

    /// Tells `notifier` whenever [`MmioTransport::event_sources`] changes.
    pub fn set_notifier(&mut self, notifier: Arc<dyn Notifier>) {
        self.notifier = Some(notifier);
    }

    /// The device's event sources to watch now: none unless it is live
    /// (DRIVER_OK, neither NEEDS_RESET nor FAILED) and activated.
    pub fn event_sources(&self) -> &[EventSource] {
        &self.watched
    }

    /// Offset of QueueNotify, for the VMM's ioeventfds.
    pub const fn queue_notify_offset() -> u64 {
        VIRTIO_MMIO_QUEUE_NOTIFY as u64
    }

    /// The counters.
    pub fn metrics(&self) -> TransportMetrics {
        self.metrics
    }
    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// InterruptStatus.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }
    /// Queue `index`.
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }
    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// DRIVER_OK set, and neither NEEDS_RESET nor FAILED.
    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) == 0
    }

    /// Brings the watched sources up to date with the device's list (none
    /// unless live and active), telling the notifier when they change.
    fn update_sources(&mut self) {
        let now = if self.active && self.live() {
            self.device.event_sources()
        } else {
            &[]
        };
        if now != self.watched.as_slice() {
            self.watched.clear();
            self.watched.extend_from_slice(now);
            if let Some(n) = &self.notifier {
                n.notify();
            }
        }
    }

    /// Source `token` of the device is readable: one batch of the device's
    /// work on it when the device is live and active (counted otherwise),
    /// then an interrupt for each queue that asks for one.
    pub fn process_event(&mut self, token: u32) -> bool {
        if !(self.active && self.live()) {
            self.metrics.bad_notify += 1;
            return false;
        }
        self.metrics.source_events += 1;
        let processed = self
            .device
            .process_event(token, &mut self.queues, &self.frames);
        for queue in &mut self.queues {
            queue.end_batch(&self.frames);
        }
        let result = self.interrupt_for_all(processed);
        let more = self.finish(result, format_args!("event {token}"));
        self.update_sources();
        more
    }

    /// After a device call over every queue: whether any queue wants an
    /// interrupt (asked of every active queue: one without new used entries
    /// never does).
    fn interrupt_for_all(
        &mut self,
        processed: Result<Processed, QueueError>,
    ) -> Result<(bool, bool), QueueError> {
        let done = match processed {
            Ok(done) => done,
            Err(e) if !e.is_fatal() => {
                self.metrics.bad_chains += 1;
                Processed {
                    used: true,
                    more: false,
                }
            }
            Err(e) => return Err(e),
        };
        let mut raise = false;
        if done.used {
            for queue in self.queues.iter_mut().filter(|q| q.is_active()) {
                raise |= queue.needs_notification(&self.frames)?;
            }
        }
        Ok((raise, done.more))
    }

    /// Raises the interrupt or enters NEEDS_RESET after a device call;
    /// returns whether more work is left.
    fn finish(
        &mut self,
        result: Result<(bool, bool), QueueError>,
        what: fmt::Arguments<'_>,
    ) -> bool {
        match result {
            Ok((raise, more)) => {
                if raise {
                    self.raise(VIRTIO_MMIO_INT_VRING);
                }
                self.metrics.batches_cut += u64::from(more);
                more
            }
            Err(e) => {
                self.log_once(format_args!("{what}: {e}; the device needs a reset"));
                self.needs_reset();
                false
            }
        }
    }

    /// Handles a notification of queue `index`: runs one batch of the device
    /// on it when the device is live (DRIVER_OK, neither NEEDS_RESET nor
    /// FAILED) and the queue active, and interrupts the driver if the queue
    /// asks for it. Otherwise nothing touches the queue (counted). Returns
    /// whether chains are left for another batch: the caller runs it after
    /// serving its other events.
    pub fn process_queue(&mut self, index: usize) -> bool {
        let live = self.live();
        let Some(queue) = self.queues.get_mut(index).filter(|q| live && q.is_active()) else {
            self.metrics.bad_notify += 1;
            return false;
        };
        self.metrics.notifies += 1;
        let processed = self.device.process_queue(index, queue, &self.frames);
        // The batch is over: nothing stays pinned for chains not yet popped.
        queue.end_batch(&self.frames);
        let result = match processed {
            Ok(done) if done.used => queue
                .needs_notification(&self.frames)
                .map(|raise| (raise, done.more)),
            Ok(done) => Ok((false, done.more)),
            // The device model handles non-fatal errors itself; one reaching
            // here is a chain already returned to the driver with length 0.
            Err(e) if !e.is_fatal() => {
                self.metrics.bad_chains += 1;
                queue
                    .needs_notification(&self.frames)
                    .map(|raise| (raise, false))
            }
            Err(e) => Err(e),
        };
        let more = self.finish(result, format_args!("queue {index}"));
        self.update_sources();
        more
    }

    /// Logs a guest-caused fault, once per transport.
    fn log_once(&mut self, message: fmt::Arguments<'_>) {
        if !self.logged_fatal {
            self.logged_fatal = true;
            warn!(
                "virtio device {}: {message} (further faults are only counted)",
                self.device.device_type()
            );
        }
    }

    /// Applies `update` to the device (between batches: the caller holds
    /// the transport). Afterwards the chain limits and event sources are
    /// re-read, and a configuration change advances ConfigGeneration and,
    /// while the device is live, raises a configuration-change interrupt
    /// (§4.2.2, §2.1.2). A refused update changes nothing.
    pub fn update_device(&mut self, update: DeviceUpdate) -> Result<UpdateOutcome, UpdateError> {
        let outcome = self.device.update(update)?;
        for (i, queue) in self.queues.iter_mut().enumerate() {
            queue.set_chain_limit(self.device.chain_limit(i));
        }
        if outcome.config_changed {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.live() {
                self.raise(VIRTIO_MMIO_INT_CONFIG);
            }
        }
        self.update_sources();
        Ok(outcome)
    }

    fn raise(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        self.metrics.interrupts += 1;
        self.interrupt.trigger();
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.metrics.needs_reset += 1;
        self.raise(VIRTIO_MMIO_INT_CONFIG);
        self.update_sources();
    }

    fn reset(&mut self) {
        self.device.reset();
        self.active = false;
        self.queues.iter_mut().for_each(Queue::reset);
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.metrics.resets += 1;
        self.update_sources();
    }

    /// A Status write (§2.1, §3.1.1): 0 resets; otherwise the write must keep
    /// every bit already set and add either FAILED or exactly the next step.
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let added = value & !old;
        let next_step = STATUS_STEPS.iter().copied().find(|&s| old & s == 0);
        let legal = value & old == old
            && (added == 0
                || added == VIRTIO_CONFIG_S_FAILED
                || (old & VIRTIO_CONFIG_S_FAILED == 0 && Some(added) == next_step));
        if !legal {
            self.metrics.bad_status += 1;
            return;
        }
        match added {
            // FEATURES_OK stays clear when refused; the driver reads it back.
            VIRTIO_CONFIG_S_FEATURES_OK if !self.accept_features() => {
                self.metrics.features_refused += 1;
                return;
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status = value;
                self.activate();
                return;
            }
            _ => {}
        }
        self.status = value;
        // FAILED stops the device's sources.
        self.update_sources();
    }

    /// At FEATURES_OK: refuses a driver without VIRTIO_F_VERSION_1, otherwise
    /// tells the device and the queues what was negotiated.
    fn accept_features(&mut self) -> bool {
        let acked = self.acked_features;
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            return false;
        }
        self.device.ack_features(acked);
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let indirect = acked & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        for queue in &mut self.queues {
            queue.set_event_idx(event_idx);
            queue.set_indirect(indirect);
        }
        true
    }

    /// At DRIVER_OK: validates every ready queue, then activates the device;
    /// the first queue that fails, or the device, puts it in NEEDS_RESET
    /// (the other queues stay inactive or are never used).
    fn activate(&mut self) {
        let frames = &self.frames;
        let failed = self
            .queues
            .iter_mut()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .find_map(|(i, q)| q.activate(frames).err().map(|e| (i, e)));
        if let Some((index, e)) = failed {
            self.log_once(format_args!("queue {index} at DRIVER_OK: {e}"));
            self.needs_reset();
            return;
        }
        match self.device.activate(&mut self.queues, &self.frames) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.metrics.activate_failed += 1;
                self.log_once(format_args!("{e}"));
                self.needs_reset();
            }
        }
        self.update_sources();
    }

    /// Whether queue registers may be written now (FEATURES_OK, not DRIVER_OK).
    fn queue_writable(&self) -> Option<usize> {
        let window = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0;
        let index = self.queue_sel as usize;
        (window && index < self.queues.len()).then_some(index)
    }

    fn write_queue_register(&mut self, offset: u32, value: u32) {
        let Some(index) = self.queue_writable() else {
            self.metrics.bad_queue_write += 1;
            return;
        };
        let queue = &mut self.queues[index];
        match (offset, value) {
            (VIRTIO_MMIO_QUEUE_READY, 0) => {
                queue.set_ready(false);
                return;
            }
            (VIRTIO_MMIO_QUEUE_READY, 1) => {}
            (VIRTIO_MMIO_QUEUE_READY, _) => {
                self.metrics.bad_queue_write += 1;
                return;
            }
            _ => {}
        }
        if queue.ready() {
            self.metrics.bad_queue_write += 1;
            return;
        }
        match offset {
            // Validated and activated at DRIVER_OK; the window closes there,
            // so a queue never becomes ready after it.
            VIRTIO_MMIO_QUEUE_READY => queue.set_ready(true),
            VIRTIO_MMIO_QUEUE_NUM => {
                let ok = u16::try_from(value)
                    .ok()
                    .is_some_and(|size| queue.try_set_size(size).is_ok());
                if !ok {
                    self.metrics.bad_queue_size += 1;
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => self.metrics.bad_access += 1,
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all ones (§4.2.2), base too.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.metrics.bad_access += 1;
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            // With the VMM's ioeventfds a valid notification never reaches
            // here; a direct write serves one batch.
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                let _ = self.process_queue(value as usize);
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.metrics.bad_access += 1,
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            || self.status & VIRTIO_CONFIG_S_DRIVER == 0
        {
            self.metrics.bad_features += 1;
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            // No feature bits above 63 are offered.
            _ => {
                if value != 0 {
                    self.metrics.bad_features += 1;
                }
                return;
            }
        };
        let offered = self.device.avail_features();
        let word = u64::from(value) << shift;
        if word & !offered != 0 {
            self.metrics.bad_features += 1;
        }
        self.acked_features = (self.acked_features & !(0xffff_ffff << shift)) | (word & offered);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.metrics.bad_access += 1;
            data.fill(0);
            return;
        }
        let value = self.read_register(offset as u32);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.metrics.bad_access += 1;
            return;
        };
        if !offset.is_multiple_of(4) {
            self.metrics.bad_access += 1;
            return;
        }
        self.write_register(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[path = "mmio_state.rs"]
mod state;
pub use state::{StateError, TransportState};

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
