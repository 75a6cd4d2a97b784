//! virtio (virtio 1.2): the device side of split virtqueues (§2.7), and the
//! interface between a device model and its transport (§4.2 virtio-mmio).
//!
//! A device model implements [`VirtioDevice`]: its type, queue sizes, feature
//! bits, configuration space, and what it does with its queues. The transport
//! owns the [`Queue`]s, the device status and feature negotiation, and raises
//! interrupts through an [`Interrupt`]; it calls the device's
//! [`process_queue`](VirtioDevice::process_queue) when the driver notifies a
//! queue (from the event loop, through an ioeventfd in the VMM).
//!
//! A device may also be driven by file descriptors of its own (a TAP for
//! virtio-net, later timers): at DRIVER_OK, once the queues are validated,
//! the transport [activates](VirtioDevice::activate) it; from then until a
//! reset or NEEDS_RESET the VMM watches the [`EventSource`]s the device lists
//! and hands their readiness back through the transport
//! ([`process_event`](VirtioDevice::process_event)), gated like queue
//! notifications. A device changes the list (stops watching a TAP while the
//! guest has no receive buffers) simply by listing something else; the
//! transport tells the VMM through its [`Notifier`].
//!
//! A live device may be reconfigured (the API's PATCH after boot):
//! [`VirtioDevice::update`] swaps a block device's backing file or a
//! device's rate limiters; the transport then re-reads the chain limits and
//! the event sources, and raises a configuration-change interrupt (§2.1.2,
//! §4.2.2: ConfigGeneration advances) when the configuration space changed.
//!
//! Work per call is bounded: a device serves at most [`BATCH_CHAINS`] chains
//! or [`BATCH_BYTES`] bytes of requests per call and says whether chains are
//! left ([`Processed::more`]); the VMM then re-arms the queue's event, so the
//! event loop serves signals, the console and the other devices in between.

pub mod block;
pub mod chain;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod net;
pub mod queue;

use std::fmt;
use std::io;
use std::os::fd::RawFd;

use crate::disk::DiskBackend;
use crate::rate_limiter::RateLimiterConfig;
use memory::GuestFrames;
use vmm_sys_util::eventfd::EventFd;

pub use queue::{
    ChainError, DescriptorChain, MAX_QUEUE_SIZE, Queue, QueueError, QueueState, ReadableBuffer,
    Reader, ShortChain, WritableBuffer, Writer,
};

/// Feature bit: virtio 1.x device (§6).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: indirect descriptors (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used_event / avail_event notification suppression (§2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Most chains a device serves in one `process_queue` call: one queue's worth.
pub const BATCH_CHAINS: usize = MAX_QUEUE_SIZE as usize;
/// Bytes of data moved (disk or network to or from guest memory) after which a
/// device ends its batch; the request that crosses it is still served whole,
/// and refused requests move nothing.
pub const BATCH_BYTES: u64 = 32 << 20;

/// What one call of [`VirtioDevice::process_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Processed {
    /// Used entries were added: the transport asks the queue whether to
    /// interrupt the driver.
    pub used: bool,
    /// The batch budget ran out with chains still available: process the
    /// queue again (after the event loop has served everything else).
    pub more: bool,
}

/// A file descriptor a device wants watched for input while it is active.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventSource {
    /// The descriptor, owned by the device (open while it is listed).
    pub fd: RawFd,
    /// The device's name for it, passed back to `process_event`.
    pub token: u32,
}

/// Why a device could not start at DRIVER_OK (it then needs a reset).
#[derive(Debug, thiserror::Error)]
#[error("Cannot activate the device: {what}")]
pub struct ActivateError {
    /// What failed.
    pub what: &'static str,
    /// The host error.
    #[source]
    pub source: io::Error,
}

/// A change to a live device (the API's PATCH after boot); `None` keeps
/// what is there.
#[derive(Debug)]
pub enum DeviceUpdate {
    /// A block device's backing file (same read-only setting) and limiter.
    Block {
        /// The new backing file.
        disk: Option<Box<dyn DiskBackend>>,
        /// New limits (an unlimited config removes them).
        rate_limiter: Option<RateLimiterConfig>,
    },
    /// A network device's limiters.
    Net {
        /// Limits on frames to the guest.
        rx_rate_limiter: Option<RateLimiterConfig>,
        /// Limits on frames from the guest.
        tx_rate_limiter: Option<RateLimiterConfig>,
    },
}

/// What an update changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateOutcome {
    /// The configuration space changed (a new capacity): the driver is told.
    pub config_changed: bool,
}

/// Why an update was refused (nothing was changed).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The update is for another kind of device.
    #[error("This update does not apply to a {0} device")]
    WrongDevice(&'static str),
    /// A limiter's timer could not be created.
    #[error("Cannot create a rate limiter's timer")]
    Timer(#[source] io::Error),
}

/// What a device model does behind a transport.
pub trait VirtioDevice: Send + fmt::Debug {
    /// Device ID (§5: 2 for block).
    fn device_type(&self) -> u32;
    /// QueueNumMax of each queue; the transport creates that many queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including transport bits such as
    /// VERSION_1, EVENT_IDX, INDIRECT_DESC when it supports them).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`), told at
    /// FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space at `offset` (out-of-range bytes read 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Most bytes (readable plus writable) one chain of queue `index` can
    /// legally hold; longer chains are refused before anything is pinned.
    fn chain_limit(&self, index: usize) -> u64;
    /// Handles at most one batch ([`BATCH_CHAINS`], [`BATCH_BYTES`]) of the
    /// chains the driver made available on queue `index`. A fatal
    /// [`QueueError`] puts the device in DEVICE_NEEDS_RESET; the device model
    /// handles non-fatal ones itself.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError>;
    /// Starts the device at DRIVER_OK, after its queues passed validation and
    /// the features were acknowledged. An error puts the device in
    /// NEEDS_RESET.
    fn activate(
        &mut self,
        _queues: &mut [Queue],
        _frames: &GuestFrames,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    /// The sources to watch now. Consulted only while the device is active,
    /// after activation and after every call into it.
    fn event_sources(&self) -> &[EventSource] {
        &[]
    }
    /// Source `token` is readable: at most one batch of work, as for
    /// [`VirtioDevice::process_queue`]; the transport then interrupts the
    /// driver for any queue that asks for it.
    fn process_event(
        &mut self,
        _token: u32,
        _queues: &mut [Queue],
        _frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        Ok(Processed::default())
    }
    /// Back to the initial state, inactive (the transport resets the queues).
    fn reset(&mut self);
    /// Gives back to its queue every chain the device holds but has not
    /// used ([`Queue::unpop`], newest first), so a snapshot finds no chain
    /// in flight; the VM is paused. A device holding nothing (the default)
    /// does nothing.
    fn quiesce(&mut self, _queues: &mut [Queue], _frames: &GuestFrames) -> Result<(), QueueError> {
        Ok(())
    }
    /// Applies a change while the device may be live (the transport calls
    /// this between batches). Refused by devices that have nothing to change.
    fn update(&mut self, _update: DeviceUpdate) -> Result<UpdateOutcome, UpdateError> {
        Err(UpdateError::WrongDevice("this"))
    }
}

/// Raises the device's interrupt line (an irqfd in the VMM, a counter in
/// tests). The transport has already set InterruptStatus.
pub trait Interrupt: Send + Sync + fmt::Debug {
    /// Signals the interrupt.
    fn trigger(&self);
}

/// Tells the VMM's event loop that a transport's event sources changed
/// outside it (activation, reset, NEEDS_RESET, a device call from a vCPU).
pub trait Notifier: Send + Sync + fmt::Debug {
    /// Wakes the watcher.
    fn notify(&self);
}

impl Notifier for EventFd {
    fn notify(&self) {
        // Fails only if the counter saturates, when the loop is awake anyway.
        let _ = self.write(1);
    }
}
