//! Tests of the virtio-mmio transport: the handshake, and every case of
//! ../shared/ADVERSARIAL.md §9-10, each ending with the transport serving a
//! fresh handshake and a well-formed request.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mock::MockDriver;
use crate::virtio::{
    ActivateError, DeviceUpdate, EventSource, MAX_QUEUE_SIZE, Notifier, Processed, QueueError,
    UpdateError, UpdateOutcome,
};

const RINGS: GuestAddress = GuestAddress(0x10_0000);
const DATA: u64 = 0x20_0000;
const SIZE: u16 = 8;
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 1;

/// A device that completes every chain with length 1, or fails fatally when
/// told to.
#[derive(Debug, Default)]
struct FakeDevice {
    acked: Arc<AtomicU64>,
    processed: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    fail: Arc<Mutex<bool>>,
    /// Serve one chain per batch (and report more).
    one_per_batch: Arc<Mutex<bool>>,
    /// Refuse to activate.
    fail_activate: Arc<Mutex<bool>>,
    /// Events handed to the device.
    events: Arc<AtomicU64>,
    /// Listed once activated.
    sources: Vec<EventSource>,
}

/// The source the fake device watches once active.
const SOURCE: EventSource = EventSource { fd: 7, token: 3 };

impl FakeDevice {
    fn serve(&self, queue: &mut Queue, frames: &GuestFrames) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = queue.pop(frames)? {
            queue.add_used(frames, chain, 1)?;
            done.used = true;
            if *self.one_per_batch.lock().unwrap() {
                done.more = queue.has_available(frames)?;
                break;
            }
        }
        Ok(done)
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[MAX_QUEUE_SIZE]
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked.store(features, Ordering::SeqCst);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn chain_limit(&self, _: usize) -> u64 {
        u64::MAX
    }
    fn process_queue(
        &mut self,
        _: usize,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        self.processed.fetch_add(1, Ordering::SeqCst);
        if *self.fail.lock().unwrap() {
            return Err(QueueError::HeadIndex(999));
        }
        self.serve(queue, frames)
    }
    fn activate(&mut self, _: &mut [Queue], _: &GuestFrames) -> Result<(), ActivateError> {
        if *self.fail_activate.lock().unwrap() {
            return Err(ActivateError {
                what: "the fake backend",
                source: std::io::Error::other("refused"),
            });
        }
        self.sources = vec![SOURCE];
        Ok(())
    }
    fn event_sources(&self) -> &[EventSource] {
        &self.sources
    }
    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        assert_eq!(token, SOURCE.token);
        self.events.fetch_add(1, Ordering::SeqCst);
        self.serve(&mut queues[0], frames)
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.sources.clear();
    }
    /// A net update is "a new configuration"; anything else is refused.
    fn update(&mut self, update: DeviceUpdate) -> Result<UpdateOutcome, UpdateError> {
        match update {
            DeviceUpdate::Net { .. } => Ok(UpdateOutcome {
                config_changed: true,
            }),
            DeviceUpdate::Block { .. } => Err(UpdateError::WrongDevice("fake")),
        }
    }
}

#[derive(Debug, Default)]
struct CountingInterrupt(AtomicU64);

impl Interrupt for CountingInterrupt {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct CountingNotifier(AtomicU64);

impl Notifier for CountingNotifier {
    fn notify(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    frames: Arc<GuestFrames>,
    transport: MmioTransport,
    irq: Arc<CountingInterrupt>,
    processed: Arc<AtomicU64>,
    fail: Arc<Mutex<bool>>,
    one_per_batch: Arc<Mutex<bool>>,
    fail_activate: Arc<Mutex<bool>>,
    events: Arc<AtomicU64>,
    notified: Arc<CountingNotifier>,
}

impl Rig {
    fn new() -> Rig {
        let frames = Arc::new(GuestFrames::new(16 << 20, Backing::Anonymous).unwrap());
        let device = FakeDevice::default();
        let (processed, fail) = (device.processed.clone(), device.fail.clone());
        let one_per_batch = device.one_per_batch.clone();
        let (fail_activate, events) = (device.fail_activate.clone(), device.events.clone());
        let irq = Arc::new(CountingInterrupt::default());
        let mut transport = MmioTransport::new(Box::new(device), frames.clone(), irq.clone());
        let notified = Arc::new(CountingNotifier::default());
        transport.set_notifier(notified.clone());
        Rig {
            frames,
            transport,
            irq,
            processed,
            fail,
            one_per_batch,
            fail_activate,
            events,
            notified,
        }
    }

    fn r(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    fn w(&mut self, offset: u32, value: u32) {
        self.transport
            .write(u64::from(offset), &value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(&mut self) {
        self.w(VIRTIO_MMIO_STATUS, 0);
        self.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1 (bit 32)
        self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.w(VIRTIO_MMIO_DRIVER_FEATURES, 0);
        self.w(VIRTIO_MMIO_STATUS, 0b1011);
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), 0b1011);
    }

    fn setup_queue(&mut self, driver: &MockDriver<'_>) {
        self.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        self.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(driver.size()));
        for (lo, hi, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                driver.desc_table(),
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                driver.avail_ring(),
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                driver.used_ring(),
            ),
        ] {
            self.w(lo, addr.0 as u32);
            self.w(hi, (addr.0 >> 32) as u32);
        }
        self.w(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn driver_ok(&mut self) {
        self.w(VIRTIO_MMIO_STATUS, 0b1111);
    }

    /// A full handshake and one completed request.
    fn assert_serves(&mut self) {
        let frames = self.frames.clone();
        let mut driver = MockDriver::new(&frames, SIZE, RINGS);
        self.negotiate();
        self.setup_queue(&driver);
        self.driver_ok();
        assert_eq!(self.r(VIRTIO_MMIO_STATUS), 0b1111);
        let irqs = self.irq.0.load(Ordering::SeqCst);
        let head = driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 1, true)]);
        self.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(driver.used_idx(), 1);
        assert_eq!(driver.used_elem(0), (u32::from(head), 1));
        assert_eq!(self.irq.0.load(Ordering::SeqCst), irqs + 1);
        assert_eq!(
            self.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_VRING,
            VIRTIO_MMIO_INT_VRING
        );
        self.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(self.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }
}

#[test]
fn mmio_identifies_itself_and_serves_a_request() {
    let mut rig = Rig::new();
    assert_eq!(rig.r(VIRTIO_MMIO_MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
    assert_eq!(rig.r(VIRTIO_MMIO_VERSION), 2);
    assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(rig.r(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_FEATURES), 1);
    rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        rig.r(VIRTIO_MMIO_DEVICE_FEATURES),
        (1 << VIRTIO_RING_F_EVENT_IDX) | 1
    );
    rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
    assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
    assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(MAX_QUEUE_SIZE));
    assert_eq!(rig.r(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    rig.assert_serves();
    assert_eq!(rig.transport.metrics().bad_access, 0);
}

#[test]
fn mmio_batch_cut_short_leaves_only_the_rings_pinned() {
    let mut rig = Rig::new();
    let frames = rig.frames.clone();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    rig.driver_ok();
    let rings = frames.table().pins();
    *rig.one_per_batch.lock().unwrap() = true;
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 1, true)]);
    driver.add_chain(&[(DATA + 0x2000, 16, false), (DATA + 0x3000, 1, true)]);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(driver.used_idx(), 1);
    // The device's spare lists kept their section pinned for the next
    // chain; the transport dropped it when the batch ended.
    assert_eq!(frames.table().pins(), rings);
    assert!(
        !rig.transport.process_queue(0),
        "the second chain, the last"
    );
    assert_eq!(driver.used_idx(), 2);
    assert_eq!(frames.table().pins(), rings);
}

#[test]
fn mmio_config_space_is_forwarded_at_any_width() {
    let mut rig = Rig::new();
    let mut one = [0u8; 1];
    rig.transport.read(0x105, &mut one);
    assert_eq!(one, [5]);
    let mut eight = [0u8; 8];
    rig.transport.read(0x100, &mut eight);
    assert_eq!(eight, [0, 1, 2, 3, 4, 5, 6, 7]);
}

#[test]
fn mmio_queue_registers_ignored_before_features_ok() {
    let mut rig = Rig::new();
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 4);
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rig.transport.queue(0).unwrap().size(), MAX_QUEUE_SIZE);
    assert!(!rig.transport.queue(0).unwrap().ready());
    assert_eq!(rig.transport.metrics().bad_queue_write, 2);
    rig.assert_serves();
}

#[test]
fn mmio_queue_num_ignored_after_driver_ok() {
    let mut rig = Rig::new();
    rig.assert_serves();
    for (reg, value) in [
        (VIRTIO_MMIO_QUEUE_NUM, 256),
        (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x40_0000),
        (VIRTIO_MMIO_QUEUE_USED_HIGH, 1),
        (VIRTIO_MMIO_QUEUE_READY, 0),
    ] {
        rig.w(reg, value);
    }
    let queue = rig.transport.queue(0).unwrap();
    assert_eq!(
        (queue.size(), queue.desc_table(), queue.ready()),
        (SIZE, RINGS, true)
    );
    assert_eq!(rig.transport.metrics().bad_queue_write, 4);
}

#[test]
fn mmio_queue_registers_ignored_while_queue_ready() {
    let mut rig = Rig::new();
    let frames = rig.frames.clone();
    let driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(rig.transport.queue(0).unwrap().size(), SIZE);
    // QueueReady=0 is allowed, and then the size may change.
    rig.w(VIRTIO_MMIO_QUEUE_READY, 0);
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(rig.transport.queue(0).unwrap().size(), 16);
}

#[test]
fn mmio_invalid_queue_sizes_and_selectors_are_ignored() {
    let mut rig = Rig::new();
    rig.negotiate();
    for size in [0, 3, 512, 0x1_0000 + 8] {
        rig.w(VIRTIO_MMIO_QUEUE_NUM, size);
    }
    assert_eq!(rig.transport.queue(0).unwrap().size(), MAX_QUEUE_SIZE);
    assert_eq!(rig.transport.metrics().bad_queue_size, 4);
    rig.w(VIRTIO_MMIO_QUEUE_SEL, 5);
    assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    rig.w(VIRTIO_MMIO_QUEUE_NUM, 8);
    assert_eq!(rig.transport.metrics().bad_queue_write, 1);
    rig.assert_serves();
}

#[test]
fn mmio_illegal_status_transitions_are_ignored() {
    let mut rig = Rig::new();
    // Skipping ACKNOWLEDGE, DRIVER_OK first, setting NEEDS_RESET itself.
    for bad in [
        VIRTIO_CONFIG_S_DRIVER,
        VIRTIO_CONFIG_S_DRIVER_OK,
        0b1111,
        VIRTIO_CONFIG_S_NEEDS_RESET,
    ] {
        rig.w(VIRTIO_MMIO_STATUS, bad);
        assert_eq!(rig.r(VIRTIO_MMIO_STATUS), 0);
    }
    rig.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    assert_eq!(rig.r(VIRTIO_MMIO_STATUS), 0, "two steps at once");
    rig.negotiate();
    // Clearing a bit.
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(rig.r(VIRTIO_MMIO_STATUS), 0b1011);
    assert_eq!(rig.transport.metrics().bad_status, 6);
    rig.assert_serves();
}

#[test]
fn mmio_features_ok_requires_version_1_and_freezes_features() {
    let mut rig = Rig::new();
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    rig.w(VIRTIO_MMIO_STATUS, 0b11);
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << 30); // not offered
    assert_eq!(rig.transport.metrics().bad_features, 1);
    rig.w(VIRTIO_MMIO_STATUS, 0b1011);
    assert_eq!(
        rig.r(VIRTIO_MMIO_STATUS),
        0b11,
        "no VERSION_1: FEATURES_OK stays clear"
    );
    assert_eq!(rig.transport.metrics().features_refused, 1);
    rig.negotiate();
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    rig.w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(rig.transport.metrics().bad_features, 2, "after FEATURES_OK");
    rig.assert_serves();
}

#[test]
fn mmio_reset_while_in_flight_then_works_again() {
    let mut rig = Rig::new();
    rig.assert_serves();
    let frames = rig.frames.clone();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    driver.set_avail_idx(1); // continue from the first request
    driver.add_chain(&[(DATA, 16, false)]);
    let generation = rig.r(VIRTIO_MMIO_CONFIG_GENERATION);
    rig.w(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rig.r(VIRTIO_MMIO_STATUS), 0);
    assert!(!rig.transport.queue(0).unwrap().ready());
    assert_eq!(rig.r(VIRTIO_MMIO_CONFIG_GENERATION), generation + 1);
    let before = rig.processed.load(Ordering::SeqCst);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(
        rig.processed.load(Ordering::SeqCst),
        before,
        "a reset device touches no queue"
    );
    // Fresh rings elsewhere.
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
}

#[test]
fn mmio_notify_out_of_range_or_before_driver_ok_touches_nothing() {
    let mut rig = Rig::new();
    let frames = rig.frames.clone();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    driver.add_chain(&[(DATA, 16, false)]);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0); // before DRIVER_OK
    rig.driver_ok();
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1); // no such queue
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    assert_eq!(rig.processed.load(Ordering::SeqCst), 0);
    assert_eq!(driver.used_idx(), 0);
    assert_eq!(rig.transport.metrics().bad_notify, 3);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(driver.used_idx(), 1);
}

#[test]
fn mmio_notify_on_queue_not_ready_touches_nothing() {
    let mut rig = Rig::new();
    rig.negotiate();
    rig.driver_ok();
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(rig.processed.load(Ordering::SeqCst), 0);
    assert_eq!(rig.transport.metrics().bad_notify, 1);
    rig.assert_serves();
}

#[test]
fn mmio_odd_widths_and_misaligned_accesses_are_ignored() {
    let mut rig = Rig::new();
    rig.negotiate();
    let status = rig.r(VIRTIO_MMIO_STATUS);
    rig.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[0]); // 1 byte: would reset
    rig.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[0, 0]);
    rig.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[0; 8]);
    rig.transport
        .write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[0; 4]);
    assert_eq!(rig.r(VIRTIO_MMIO_STATUS), status);
    let mut two = [0xffu8; 2];
    rig.transport
        .read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut two);
    assert_eq!(two, [0, 0]);
    let mut eight = [0xffu8; 8];
    rig.transport
        .read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut eight);
    assert_eq!(eight, [0; 8]);
    assert_eq!(rig.transport.metrics().bad_access, 6);
    rig.assert_serves();
}

#[test]
fn mmio_bad_ring_at_driver_ok_sets_needs_reset_with_config_interrupt() {
    let mut rig = Rig::new();
    rig.negotiate();
    rig.w(VIRTIO_MMIO_QUEUE_NUM, u32::from(SIZE));
    rig.w(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x100); // far outside RAM
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1);
    rig.driver_ok();
    assert_ne!(rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(rig.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(rig.irq.0.load(Ordering::SeqCst), 1);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(rig.processed.load(Ordering::SeqCst), 0);
    rig.assert_serves();
}

#[test]
fn mmio_fatal_queue_error_sets_needs_reset() {
    let mut rig = Rig::new();
    rig.assert_serves();
    *rig.fail.lock().unwrap() = true;
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(
        rig.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    let processed = rig.processed.load(Ordering::SeqCst);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(
        rig.processed.load(Ordering::SeqCst),
        processed,
        "no work while NEEDS_RESET"
    );
    assert_eq!(rig.transport.metrics().needs_reset, 1);
    *rig.fail.lock().unwrap() = false;
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
}

#[test]
fn mmio_failed_driver_gets_no_service_until_reset() {
    let mut rig = Rig::new();
    rig.assert_serves();
    rig.w(VIRTIO_MMIO_STATUS, 0b1111 | VIRTIO_CONFIG_S_FAILED);
    assert_ne!(rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    let processed = rig.processed.load(Ordering::SeqCst);
    rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(rig.processed.load(Ordering::SeqCst), processed);
    assert_eq!(rig.transport.metrics().bad_notify, 1);
    // After FAILED no further step is taken, even from a fresh handshake bit.
    rig.w(VIRTIO_MMIO_STATUS, 0);
    rig.w(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    rig.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED,
    );
    rig.w(
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_DRIVER,
    );
    assert_eq!(
        rig.r(VIRTIO_MMIO_STATUS),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FAILED
    );
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
}

#[test]
fn mmio_queue_ready_takes_only_zero_or_one() {
    let mut rig = Rig::new();
    let frames = rig.frames.clone();
    let driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    rig.w(VIRTIO_MMIO_QUEUE_READY, 0);
    rig.w(VIRTIO_MMIO_QUEUE_READY, 2);
    assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(rig.transport.metrics().bad_queue_write, 1);
    rig.w(VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 1);
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
}

// Devices' own event sources (a TAP): listed and served only while live and
// active.
#[test]
fn mmio_device_sources_are_watched_only_while_live_and_active() {
    let mut rig = Rig::new();
    let frames = rig.frames.clone();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    assert!(rig.transport.event_sources().is_empty(), "before DRIVER_OK");
    assert!(!rig.transport.process_event(SOURCE.token));
    assert_eq!(rig.events.load(Ordering::SeqCst), 0, "not handed over");
    rig.driver_ok();
    assert_eq!(rig.transport.event_sources(), [SOURCE]);
    assert_eq!(
        rig.notified.0.load(Ordering::SeqCst),
        1,
        "told at activation"
    );
    // An event serves the device's queue and interrupts the driver.
    let irqs = rig.irq.0.load(Ordering::SeqCst);
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 1, true)]);
    assert!(!rig.transport.process_event(SOURCE.token));
    assert_eq!(rig.events.load(Ordering::SeqCst), 1);
    assert_eq!(driver.used_idx(), 1);
    assert_eq!(rig.irq.0.load(Ordering::SeqCst), irqs + 1);
    assert_eq!(rig.transport.metrics().source_events, 1);
    assert_eq!(
        rig.notified.0.load(Ordering::SeqCst),
        1,
        "no change, no word"
    );
    // FAILED: nothing is watched any more, nothing handed over.
    rig.w(VIRTIO_MMIO_STATUS, 0b1111 | VIRTIO_CONFIG_S_FAILED);
    assert!(rig.transport.event_sources().is_empty());
    assert_eq!(rig.notified.0.load(Ordering::SeqCst), 2);
    assert!(!rig.transport.process_event(SOURCE.token));
    assert_eq!(rig.events.load(Ordering::SeqCst), 1);
    // Reset, then a fresh handshake activates it again.
    rig.w(VIRTIO_MMIO_STATUS, 0);
    assert!(rig.transport.event_sources().is_empty());
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
    assert_eq!(rig.transport.event_sources(), [SOURCE]);
    assert_eq!(rig.notified.0.load(Ordering::SeqCst), 3);
}

#[test]
fn mmio_needs_reset_stops_the_device_sources() {
    let mut rig = Rig::new();
    rig.assert_serves();
    assert_eq!(rig.transport.event_sources(), [SOURCE]);
    *rig.fail.lock().unwrap() = true;
    rig.transport.process_queue(0);
    assert_ne!(rig.r(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(rig.transport.event_sources().is_empty());
    assert!(!rig.transport.process_event(SOURCE.token));
    assert_eq!(rig.events.load(Ordering::SeqCst), 0);
    *rig.fail.lock().unwrap() = false;
    rig.w(VIRTIO_MMIO_STATUS, 0);
    rig.frames.memory().write_slice(&[0; 4096], RINGS).unwrap();
    rig.assert_serves();
    assert_eq!(rig.transport.event_sources(), [SOURCE]);
}

#[test]
fn mmio_device_that_cannot_activate_needs_reset() {
    let mut rig = Rig::new();
    *rig.fail_activate.lock().unwrap() = true;
    let frames = rig.frames.clone();
    let driver = MockDriver::new(&frames, SIZE, RINGS);
    rig.negotiate();
    rig.setup_queue(&driver);
    rig.driver_ok();
    let status = rig.r(VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        rig.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(rig.transport.metrics().activate_failed, 1);
    assert!(rig.transport.event_sources().is_empty());
    assert!(!rig.transport.process_event(SOURCE.token));
    *rig.fail_activate.lock().unwrap() = false;
    rig.w(VIRTIO_MMIO_STATUS, 0);
    rig.assert_serves();
}

#[test]
fn mmio_device_update_that_changes_the_config_interrupts_a_live_driver() {
    let net = || DeviceUpdate::Net {
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    };
    let mut rig = Rig::new();
    // Before DRIVER_OK: the generation moves, nobody is interrupted.
    let generation = rig.r(VIRTIO_MMIO_CONFIG_GENERATION);
    rig.transport.update_device(net()).unwrap();
    assert_eq!(rig.r(VIRTIO_MMIO_CONFIG_GENERATION), generation + 1);
    assert_eq!(rig.irq.0.load(Ordering::SeqCst), 0);
    rig.assert_serves();
    let irqs = rig.irq.0.load(Ordering::SeqCst);
    rig.transport.update_device(net()).unwrap();
    assert_eq!(rig.irq.0.load(Ordering::SeqCst), irqs + 1);
    assert_eq!(
        rig.r(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    // A refused update changes nothing.
    let generation = rig.r(VIRTIO_MMIO_CONFIG_GENERATION);
    let refused = DeviceUpdate::Block {
        disk: None,
        rate_limiter: None,
    };
    assert!(rig.transport.update_device(refused).is_err());
    assert_eq!(rig.r(VIRTIO_MMIO_CONFIG_GENERATION), generation);
    rig.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    rig.assert_serves();
}

#[test]
fn mmio_state_restored_into_a_new_transport_serves_the_next_request() {
    let mut rig = Rig::new();
    rig.assert_serves();
    let frames = rig.frames.clone();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    driver.set_avail_idx(1);
    // Offered before the snapshot, served after it.
    let head = driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 1, true)]);
    let state = rig.transport.save_state().unwrap();
    assert!(state.active && state.queues[0].active);

    let irq = Arc::new(CountingInterrupt::default());
    let mut restored =
        MmioTransport::new(Box::new(FakeDevice::default()), frames.clone(), irq.clone());
    restored.restore_state(&state).unwrap();
    assert_eq!(restored.status(), 0b1111);
    assert_eq!(
        restored.event_sources(),
        [SOURCE],
        "the device was activated again"
    );
    restored.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &0u32.to_le_bytes());
    assert_eq!(driver.used_idx(), 2);
    assert_eq!(driver.used_elem(1), (u32::from(head), 1));
    assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    assert_eq!(restored.save_state().unwrap().queues[0].next_avail, 2);
}

#[test]
fn mmio_hostile_state_is_refused_and_leaves_a_reset_device() {
    let mut rig = Rig::new();
    rig.assert_serves();
    let good = rig.transport.save_state().unwrap();
    let frames = rig.frames.clone();
    let fresh = || {
        MmioTransport::new(
            Box::new(FakeDevice::default()),
            frames.clone(),
            Arc::new(CountingInterrupt::default()),
        )
    };
    let cases: Vec<(TransportState, &str)> = vec![
        (
            TransportState {
                device_type: 2,
                ..good.clone()
            },
            "device type",
        ),
        (
            TransportState {
                queues: vec![],
                ..good.clone()
            },
            "queues",
        ),
        (
            TransportState {
                status: 0b1101,
                ..good.clone()
            },
            "step skipped",
        ),
        (
            TransportState {
                status: 0x1000_000f,
                ..good.clone()
            },
            "undefined bits",
        ),
        (
            TransportState {
                acked_features: good.acked_features | 1 << 40,
                ..good.clone()
            },
            "not offered",
        ),
        (
            TransportState {
                interrupt_status: 4,
                ..good.clone()
            },
            "interrupt status",
        ),
        (
            TransportState {
                status: 0b1011,
                ..good.clone()
            },
            "not live",
        ),
    ];
    for (state, expected) in cases {
        let mut t = fresh();
        let e = t.restore_state(&state).unwrap_err();
        assert!(e.to_string().contains(expected), "{expected}: {e}");
        assert_eq!(t.status(), 0);
        assert!(t.event_sources().is_empty());
    }
    let mut bad_queue = good.clone();
    bad_queue.queues[0].used_ring = 1 << 40;
    let e = fresh().restore_state(&bad_queue).unwrap_err();
    assert!(matches!(e, StateError::Queue { index: 0, .. }), "{e}");
    fresh().restore_state(&good).unwrap();
}
