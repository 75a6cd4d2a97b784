//! A virtio-net driver shaped like Linux's (`drivers/net/virtio_net.c`) over
//! [`MockDriver`], with the device driven the way minivmm's transport and
//! event loop drive it: for the benchmark (`cargo bench -p vmm --bench net`)
//! and for the tests that count notifications and interrupts per packet.
//!
//! - Both queues have 256 entries; EVENT_IDX, INDIRECT_DESC and MRG_RXBUF
//!   are negotiated, no offloads (headers are all zero).
//! - A transmit packet is one indirect table of two descriptors, the
//!   12-byte header and the frame (header and data separate, one ring entry,
//!   as Linux queues an skb when INDIRECT_DESC is on).
//! - A receive buffer is one 2 KiB device-writable descriptor (mergeable
//!   buffers; a 1514-byte frame and its header fit one).
//! - The driver decides whether to notify after **every** chain it adds
//!   (`virtqueue_kick_prepare` without `xmit_more`: the most notifications a
//!   driver can send) by `vring_need_event` on `avail_event` (virtio 1.2
//!   §2.7.10), and after reaping used entries asks for an interrupt at the
//!   next one (`virtqueue_enable_cb_prepare`, as NAPI does): the most
//!   interrupts a driver can ask for.
//! - The device runs one pass per notification, then again while a pass
//!   says `more` (its budget ran out), then decides the interrupt
//!   (`Queue::needs_notification`) and ends the batch (`Queue::end_batch`),
//!   as `MmioTransport` does. The TAP is level-triggered: it is served while
//!   the device lists it and the last pass did not drain it.
//!
//! The schedule is sequential (the driver fills, then the device serves),
//! so the counts are deterministic: at full rings they show how many
//! packets each notification and each interrupt covers.

use memory::GuestFrames;
use vm_memory::{Bytes, GuestAddress};

use super::{HEADER_SIZE, Net, NetBackend, NetConfig, RX, TAP, TX};
use crate::virtio::mock::MockDriver;
use crate::virtio::{
    Processed, Queue, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};

/// Entries of each queue.
pub const RING: u16 = 256;
/// Bytes of a receive buffer, and the largest frame (with its header) sent.
pub const BUFFER: u32 = 2048;
/// Guest RAM the model needs at least.
pub const MEMORY: u64 = 8 << 20;

const RX_RINGS: u64 = 0x10_0000;
const TX_RINGS: u64 = 0x11_0000;
const TX_TABLES: u64 = 0x12_0000;
const TX_HEADERS: u64 = 0x13_0000;
const TX_FRAMES: u64 = 0x20_0000;
const RX_BUFFERS: u64 = 0x40_0000;

/// What one queue saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueEvents {
    /// Packets completed (sent, or received into the driver's buffers).
    pub packets: u64,
    /// Notifications the driver sent the device.
    pub notifications: u64,
    /// Interrupts the device sent the driver.
    pub interrupts: u64,
}

/// One queue's driver state.
#[derive(Debug)]
struct Side<'a> {
    ring: MockDriver<'a>,
    /// Available index published so far, and used index reaped so far.
    avail: u16,
    reaped: u16,
    /// A notification the device has not served yet.
    kicked: bool,
    events: QueueEvents,
}

impl<'a> Side<'a> {
    fn new(frames: &'a GuestFrames, base: u64, queue: &mut Queue) -> Self {
        let ring = MockDriver::new(frames, RING, GuestAddress(base));
        ring.configure(queue);
        Side {
            ring,
            avail: 0,
            reaped: 0,
            kicked: false,
            events: QueueEvents::default(),
        }
    }

    fn in_flight(&self) -> u16 {
        self.avail.wrapping_sub(self.reaped)
    }

    /// After publishing one more chain: `virtqueue_kick_prepare`.
    fn published(&mut self) {
        let (old, new) = (self.avail, self.avail.wrapping_add(1));
        self.avail = new;
        let event = self.ring.avail_event();
        // vring_need_event(event, new, old)
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kicked = true;
            self.events.notifications += 1;
        }
    }

    /// Reaps used entries, calling `each(head, len)`; then asks for an
    /// interrupt at the next one.
    fn reap(&mut self, mut each: impl FnMut(u16, u32)) -> u16 {
        let used = self.ring.used_idx();
        let n = used.wrapping_sub(self.reaped);
        for i in 0..n {
            let (head, len) = self.ring.used_elem(self.reaped.wrapping_add(i));
            each(head as u16, len);
        }
        self.reaped = used;
        self.ring.set_used_event(used);
        n
    }
}

/// The driver model, the device and its queues.
#[derive(Debug)]
pub struct LinuxNet<'a> {
    frames: &'a GuestFrames,
    net: Net,
    queues: Vec<Queue>,
    rx: Side<'a>,
    tx: Side<'a>,
    frame_len: u32,
}

impl<'a> LinuxNet<'a> {
    /// A device on `backend`, negotiated and activated, in `frames` (at
    /// least [`MEMORY`]).
    pub fn new(frames: &'a GuestFrames, backend: Box<dyn NetBackend>) -> Self {
        let mut net = Net::new(
            backend,
            NetConfig {
                mac: [0x02, 0, 0, 0, 0, 0x15],
                mtu: 1500,
            },
        );
        let wanted = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |f, &b| f | (1 << b));
        net.ack_features(wanted & net.avail_features());
        let mut queues: Vec<Queue> = (0..2)
            .map(|i| {
                let mut q = Queue::new(RING);
                q.set_event_idx(true);
                q.set_indirect(true);
                q.set_chain_limit(net.chain_limit(i));
                q
            })
            .collect();
        let rx = Side::new(frames, RX_RINGS, &mut queues[RX]);
        let tx = Side::new(frames, TX_RINGS, &mut queues[TX]);
        net.activate(&mut queues, frames)
            .expect("the model's device activates");
        LinuxNet {
            frames,
            net,
            queues,
            rx,
            tx,
            frame_len: 0,
        }
    }

    /// The device.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// What the transmit queue saw.
    pub fn tx_events(&self) -> QueueEvents {
        self.tx.events
    }

    /// What the receive queue saw.
    pub fn rx_events(&self) -> QueueEvents {
        self.rx.events
    }

    /// Guest address of transmit slot `slot`'s frame (for a baseline that
    /// sends the same bytes).
    pub fn tx_frame(&self, slot: u16) -> GuestAddress {
        GuestAddress(TX_FRAMES + u64::from(BUFFER) * u64::from(slot % RING))
    }

    /// Guest address of receive buffer `slot`.
    pub fn rx_buffer(&self, slot: u16) -> GuestAddress {
        GuestAddress(RX_BUFFERS + u64::from(BUFFER) * u64::from(slot % RING))
    }

    /// Writes `frame` (at most [`BUFFER`] - 12 bytes) into every transmit
    /// slot, with zero headers: the packets [`send`](Self::send) queues.
    pub fn load_tx_frame(&mut self, frame: &[u8]) {
        assert!(frame.len() + HEADER_SIZE <= BUFFER as usize);
        let mem = self.frames.memory();
        for slot in 0..RING {
            mem.write_slice(frame, self.tx_frame(slot)).expect("RAM");
            mem.write_slice(
                &[0; HEADER_SIZE],
                GuestAddress(TX_HEADERS + 16 * u64::from(slot)),
            )
            .expect("RAM");
        }
        self.frame_len = frame.len() as u32;
    }

    /// The driver queues up to `n` packets, as many as the ring has room
    /// for; returns how many.
    pub fn send(&mut self, n: u16) -> u16 {
        let n = n.min(RING - self.tx.in_flight());
        for _ in 0..n {
            let slot = u64::from(self.tx.avail % RING);
            self.tx.ring.add_indirect_chain(
                GuestAddress(TX_TABLES + 32 * slot),
                &[
                    (TX_HEADERS + 16 * slot, HEADER_SIZE as u32, false),
                    (self.tx_frame(slot as u16).0, self.frame_len, false),
                ],
            );
            self.tx.published();
        }
        n
    }

    /// The device serves the transmit queue: one pass per notification,
    /// then while passes say `more`.
    pub fn device_tx(&mut self) {
        let mut more = std::mem::take(&mut self.tx.kicked);
        while more {
            let done = self
                .net
                .process_queue(TX, &mut self.queues[TX], self.frames)
                .expect("transmit queue");
            more = done.more;
            self.after_pass(TX, done);
        }
    }

    /// The driver reaps transmit completions; returns how many.
    pub fn reap_tx(&mut self) -> u16 {
        let n = self.tx.reap(|_, _| {});
        self.tx.events.packets += u64::from(n);
        n
    }

    /// The driver posts up to `n` receive buffers, as many as the ring has
    /// room for; returns how many.
    pub fn post_rx(&mut self, n: u16) -> u16 {
        let n = n.min(RING - self.rx.in_flight());
        for _ in 0..n {
            let addr = self.rx_buffer(self.rx.avail).0;
            self.rx.ring.add_chain(&[(addr, BUFFER, true)]);
            self.rx.published();
        }
        n
    }

    /// The device serves the receive side after the backend became
    /// readable (`readable`) or the driver notified: until a pass drains the
    /// backend, or the device stops listing it (no buffers).
    pub fn device_rx(&mut self, readable: bool) {
        let mut readable = readable;
        loop {
            let done = if std::mem::take(&mut self.rx.kicked) {
                self.net
                    .process_queue(RX, &mut self.queues[RX], self.frames)
            } else if readable && !self.net.event_sources().is_empty() {
                self.net.process_event(TAP, &mut self.queues, self.frames)
            } else {
                return;
            }
            .expect("receive queue");
            readable = done.more;
            self.after_pass(RX, done);
        }
    }

    /// The driver reaps received frames, calling `each(buffer, len)` with
    /// each frame's first buffer and length (header included); returns how
    /// many buffers came back.
    pub fn reap_rx(&mut self, mut each: impl FnMut(GuestAddress, u32)) -> u16 {
        let mut frames = 0;
        // One descriptor per chain, in order: a chain's head is its slot.
        let buffer = |head| GuestAddress(RX_BUFFERS + u64::from(BUFFER) * u64::from(head % RING));
        let n = self.rx.reap(|head, len| {
            if len > 0 {
                frames += 1;
            }
            each(buffer(head), len);
        });
        self.rx.events.packets += frames;
        n
    }

    /// What the transport does after a pass: the interrupt decision, and
    /// the batch ended (used ring marked dirty, parked pins released).
    fn after_pass(&mut self, index: usize, done: Processed) {
        let queue = &mut self.queues[index];
        if done.used && queue.needs_notification(self.frames).expect("rings") {
            let side = if index == TX {
                &mut self.tx
            } else {
                &mut self.rx
            };
            side.events.interrupts += 1;
        }
        queue.end_batch(self.frames);
    }
}
