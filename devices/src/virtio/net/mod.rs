//! virtio-net (virtio 1.2 §5.1) over a [`NetBackend`] (a TAP in the VMM).
//!
//! One receive queue (0) and one transmit queue (1) of 256 entries. Every
//! frame carries a 12-byte `virtio_net_hdr_v1`: VERSION_1 is required, so
//! the header's size never depends on other features (QEMU CVE-2023-6693).
//!
//! Offered: VERSION_1, MAC, STATUS (link up), MTU, CSUM, GUEST_CSUM,
//! HOST_TSO4/6, GUEST_TSO4/6, HOST_UFO/GUEST_UFO when the backend supports
//! them, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC. At activation the backend is
//! told the guest's receive offloads (`TUNSETOFFLOAD`); offloads whose
//! dependency was not negotiated (TSO without checksum offload) are not used.
//!
//! Transmit ([`tx`]): the header is copied out of guest memory, then checked
//! against what was negotiated, then the copy and the frame go to the
//! backend in one write; a frame shorter than the header, longer than 64 KiB
//! (refused by the queue before anything is pinned) or with an invalid header
//! is dropped and counted, never sent.
//!
//! Receive ([`rx`]): frames are read from the backend straight into the
//! guest's buffers; with MRG_RXBUF a frame longer than its first buffer
//! continues in further ones (`num_buffers`), the rest held in a spill
//! buffer until the guest posts them. The TAP is watched only while the
//! guest has buffers: when it has none (or a frame waits for more), the
//! device stops listing the TAP and resumes when the guest notifies the
//! receive queue — frames wait in the TAP's own queue meanwhile, so the TAP
//! is never left readable with nobody to drain it (Firecracker
//! CVE-2020-16843) and minivmm's memory stays flat under any flood.
//!
//! Optional rate limiters ([`DeviceUpdate::Net`]) charge each frame one
//! operation and its bytes (header excluded): the transmit limiter before a
//! chain is taken, the receive limiter before a frame is read from the TAP.
//! While one refuses, its side stops (the TAP is not watched, or no transmit
//! chain is taken) and its timer, watched as an event source, resumes it.
//!
//! Work per call is bounded like virtio-blk's (`BATCH_CHAINS` frames or
//! `BATCH_BYTES`).

mod backend;
#[cfg(any(test, feature = "test-utils"))]
pub mod linux_driver;
mod rx;
mod tx;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memory::GuestFrames;
use virtio_bindings::virtio_net::*;

pub use backend::NetBackend;
#[cfg(any(test, feature = "test-utils"))]
pub use backend::{FakeBackend, FakeState};
pub use tx::{HeaderError, check_header};

use super::{
    ActivateError, DeviceUpdate, EventSource, MAX_QUEUE_SIZE, Processed, Queue, QueueError,
    UpdateError, UpdateOutcome, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig};

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Bytes of `virtio_net_hdr_v1`.
pub const HEADER_SIZE: usize = 12;
/// Largest frame (without the header) sent or received: 64 KiB, what a
/// TSO/GSO frame may reach.
pub const MAX_FRAME: usize = 1 << 16;
/// Default MTU offered.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest and largest MTU accepted (IPv4's minimum; what fits a frame).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 68..=(MAX_FRAME - 18) as u16;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [MAX_QUEUE_SIZE, MAX_QUEUE_SIZE];
/// The TAP's token among the device's event sources.
const TAP: u32 = 0;
/// The receive limiter's timer.
const RX_LIMITER: u32 = 1;
/// The transmit limiter's timer.
const TX_LIMITER: u32 = 2;
/// Bytes of configuration space: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_SIZE: usize = 12;

/// How a network device is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU offered (VIRTIO_NET_F_MTU).
    pub mtu: u16,
}

/// Per-device counters (shared with the VMM and tests).
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Their bytes (headers excluded).
    pub rx_bytes: AtomicU64,
    /// Frames sent for the guest.
    pub tx_packets: AtomicU64,
    /// Their bytes (headers excluded).
    pub tx_bytes: AtomicU64,
    /// TX frames shorter than the header, dropped.
    pub tx_short: AtomicU64,
    /// TX frames with an invalid header (flags, GSO type, offsets), dropped.
    pub tx_bad_header: AtomicU64,
    /// TX chains with device-writable buffers, dropped.
    pub tx_bad_layout: AtomicU64,
    /// RX chains with device-readable buffers or under 12 bytes, returned
    /// unused.
    pub rx_bad_buffer: AtomicU64,
    /// Received frames larger than the guest's buffer (no MRG_RXBUF), or
    /// than all the buffers it can ever post, dropped.
    pub rx_too_large: AtomicU64,
    /// Times the TAP stopped being watched for want of receive buffers.
    pub rx_no_buffers: AtomicU64,
    /// Frames that waited for more buffers (MRG_RXBUF) in the spill buffer.
    pub rx_deferred: AtomicU64,
    /// Frames partly delivered when a snapshot was taken, dropped (their
    /// buffers went back to the ring unused).
    pub rx_dropped_at_snapshot: AtomicU64,
    /// Malformed chains returned by the queue (both queues).
    pub bad_chain: AtomicU64,
    /// Backend read errors (but for nothing to read).
    pub tap_read_errors: AtomicU64,
    /// Backend write errors.
    pub tap_write_errors: AtomicU64,
    /// Times the receive limiter held frames back.
    pub rx_rate_limiter_throttled: AtomicU64,
    /// Times the transmit limiter held frames back.
    pub tx_rate_limiter_throttled: AtomicU64,
}

/// A plain copy of [`NetMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub struct NetMetricsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_short: u64,
    pub tx_bad_header: u64,
    pub tx_bad_layout: u64,
    pub rx_bad_buffer: u64,
    pub rx_too_large: u64,
    pub rx_no_buffers: u64,
    pub rx_deferred: u64,
    pub rx_dropped_at_snapshot: u64,
    pub bad_chain: u64,
    pub tap_read_errors: u64,
    pub tap_write_errors: u64,
    pub rx_rate_limiter_throttled: u64,
    pub tx_rate_limiter_throttled: u64,
}

impl NetMetrics {
    /// The current values.
    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            tx_short: g(&self.tx_short),
            tx_bad_header: g(&self.tx_bad_header),
            tx_bad_layout: g(&self.tx_bad_layout),
            rx_bad_buffer: g(&self.rx_bad_buffer),
            rx_too_large: g(&self.rx_too_large),
            rx_no_buffers: g(&self.rx_no_buffers),
            rx_deferred: g(&self.rx_deferred),
            rx_dropped_at_snapshot: g(&self.rx_dropped_at_snapshot),
            bad_chain: g(&self.bad_chain),
            tap_read_errors: g(&self.tap_read_errors),
            tap_write_errors: g(&self.tap_write_errors),
            rx_rate_limiter_throttled: g(&self.rx_rate_limiter_throttled),
            tx_rate_limiter_throttled: g(&self.tx_rate_limiter_throttled),
        }
    }
}

/// Adds `n` to a counter only the device writes (one thread): a plain load
/// and store, no locked read-modify-write on the data path.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

fn bump(counter: &AtomicU64) {
    add(counter, 1);
}

/// A virtio network device.
#[derive(Debug)]
pub struct Net {
    backend: Box<dyn NetBackend>,
    config: [u8; CONFIG_SIZE],
    acked: u64,
    active: bool,
    /// The limiters' timers, then the TAP (last, so it can be left out).
    sources: Vec<EventSource>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    rx: rx::Rx,
    tx: tx::Tx,
    metrics: Arc<NetMetrics>,
    /// Faults already logged (a bit per kind).
    logged: u8,
}

impl Net {
    /// A network device on `backend`.
    pub fn new(backend: Box<dyn NetBackend>, config: NetConfig) -> Self {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..6].copy_from_slice(&config.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&config.mtu.to_le_bytes());
        let sources = vec![EventSource {
            fd: backend.read_fd(),
            token: TAP,
        }];
        Net {
            backend,
            config: c,
            acked: 0,
            active: false,
            sources,
            rx_limiter: None,
            tx_limiter: None,
            rx: rx::Rx::default(),
            tx: tx::Tx::default(),
            metrics: Arc::default(),
            logged: 0,
        }
    }

    /// The counters, shareable.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// Sets the receive and transmit limiters (`None` keeps one as it is).
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) -> std::io::Result<()> {
        if let Some(config) = rx {
            RateLimiter::apply(&mut self.rx_limiter, config)?;
        }
        if let Some(config) = tx {
            RateLimiter::apply(&mut self.tx_limiter, config)?;
        }
        let tap = self.sources[self.sources.len() - 1];
        self.sources.clear();
        for (limiter, token) in [
            (&self.rx_limiter, RX_LIMITER),
            (&self.tx_limiter, TX_LIMITER),
        ] {
            if let Some(l) = limiter {
                self.sources.push(EventSource {
                    fd: l.timer_fd(),
                    token,
                });
            }
        }
        self.sources.push(tap);
        Ok(())
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    /// Logs the first fault of kind `bit` (further ones are only counted).
    fn log_once(&mut self, bit: u8, what: std::fmt::Arguments<'_>) {
        if self.logged & (1 << bit) == 0 {
            self.logged |= 1 << bit;
            log::warn!("virtio-net: {what} (further such faults are only counted)");
        }
    }

    /// The `TUN_F_*` offloads the guest accepts on received frames.
    fn guest_offloads(&self) -> u32 {
        if !self.acked(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = libc::TUN_F_CSUM;
        for (bit, flag) in [
            (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
        ] {
            if self.acked(bit) {
                flags |= flag;
            }
        }
        flags
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |f, &b| f | (1 << b));
        if self.backend.supports_ufo() {
            bits |= (1 << VIRTIO_NET_F_HOST_UFO) | (1 << VIRTIO_NET_F_GUEST_UFO);
        }
        bits
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Read-only in virtio 1.x (no CTRL_MAC_ADDR).
    }

    fn chain_limit(&self, index: usize) -> u64 {
        if index == TX {
            (HEADER_SIZE + MAX_FRAME) as u64
        } else {
            // Linux's "big packets" chains (no MRG_RXBUF, with TSO) hold a
            // header and 17 pages; nothing a receive chain holds is pinned
            // per byte, so be generous.
            1 << 20
        }
    }

    fn activate(
        &mut self,
        _queues: &mut [Queue],
        _frames: &GuestFrames,
    ) -> Result<(), ActivateError> {
        let offloads = self.guest_offloads();
        self.backend
            .set_offloads(offloads)
            .map_err(|source| ActivateError {
                what: "setting the TAP's offloads (TUNSETOFFLOAD)",
                source,
            })?;
        self.rx.activate(self.acked(VIRTIO_NET_F_MRG_RXBUF));
        self.active = true;
        Ok(())
    }

    fn event_sources(&self) -> &[EventSource] {
        let throttled = self
            .rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked);
        match self.sources.len() {
            _ if !self.active => &[],
            n if self.rx.waiting() || throttled => &self.sources[..n - 1],
            _ => &self.sources,
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        match index {
            // New receive buffers: finish a waiting frame, take new ones.
            RX => {
                self.rx.resume();
                self.receive(queue, frames)
            }
            TX => self.transmit(queue, frames),
            _ => Ok(Processed::default()),
        }
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        let (index, limiter) = match token {
            TAP => (RX, None),
            RX_LIMITER => (RX, Some(&mut self.rx_limiter)),
            TX_LIMITER => (TX, Some(&mut self.tx_limiter)),
            _ => return Ok(Processed::default()),
        };
        if let Some(slot) = limiter
            && !rate_limiter::fired(slot)
        {
            return Ok(Processed::default());
        }
        let Some(queue) = queues.get_mut(index).filter(|q| q.is_active()) else {
            return Ok(Processed::default());
        };
        let done = if index == RX {
            self.receive(queue, frames)?
        } else {
            self.transmit(queue, frames)?
        };
        // A limiter's wake-up is not level-triggered like the TAP, and no
        // notification re-arms the queue: the timer continues the work.
        match token {
            RX_LIMITER => rate_limiter::continue_soon(&mut self.rx_limiter, done),
            TX_LIMITER => rate_limiter::continue_soon(&mut self.tx_limiter, done),
            _ => {}
        }
        Ok(done)
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.active = false;
        self.rx.reset();
    }

    fn quiesce(&mut self, queues: &mut [Queue], _frames: &GuestFrames) -> Result<(), QueueError> {
        let Some(queue) = queues.get_mut(RX) else {
            return Ok(());
        };
        self.rx.give_back(queue, &self.metrics)
    }

    fn update(&mut self, update: DeviceUpdate) -> Result<UpdateOutcome, UpdateError> {
        let DeviceUpdate::Net {
            rx_rate_limiter,
            tx_rate_limiter,
        } = update
        else {
            return Err(UpdateError::WrongDevice("network"));
        };
        self.set_rate_limiters(rx_rate_limiter, tx_rate_limiter)
            .map_err(UpdateError::Timer)?;
        Ok(UpdateOutcome::default())
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
