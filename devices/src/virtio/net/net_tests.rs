//! virtio-net against the in-memory backend and the driver-side mock: both
//! queues, the offloads, MRG_RXBUF and the waiting frame, and every case of
//! ../shared/ADVERSARIAL.md §12; after each bad input a good frame still
//! goes through.

use std::sync::{Arc, Mutex};

use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mock::MockDriver;

const RX_RINGS: GuestAddress = GuestAddress(0x10_0000);
const TX_RINGS: GuestAddress = GuestAddress(0x18_0000);
const RX_BUFS: u64 = 0x20_0000;
const TX_BUFS: u64 = 0x80_0000;
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

struct Rig {
    frames: Arc<GuestFrames>,
    net: Net,
    fake: Arc<Mutex<FakeState>>,
    queues: Vec<Queue>,
}

impl Rig {
    fn new(size: u16, features: u64) -> Rig {
        let (backend, fake) = FakeBackend::new(false);
        let mut net = Net::new(
            Box::new(backend),
            NetConfig {
                mac: MAC,
                mtu: 1500,
            },
        );
        net.ack_features(features & net.avail_features());
        let frames = Arc::new(GuestFrames::new(32 << 20, Backing::Anonymous).unwrap());
        let queues = (0..2)
            .map(|i| {
                let mut q = Queue::new(MAX_QUEUE_SIZE);
                q.set_indirect(true);
                q.set_chain_limit(net.chain_limit(i));
                q
            })
            .collect();
        let mut rig = Rig {
            frames,
            net,
            fake,
            queues,
        };
        for (q, base) in [(0, RX_RINGS), (1, TX_RINGS)] {
            MockDriver::new(&rig.frames, size, base).configure(&mut rig.queues[q]);
        }
        let Rig {
            net,
            queues,
            frames,
            ..
        } = &mut rig;
        net.activate(queues, frames).unwrap();
        rig
    }

    /// The driver side of `queue`, on `frames` (a clone of the rig's, so
    /// the driver does not borrow the rig).
    fn driver<'a>(&self, frames: &'a GuestFrames, queue: usize) -> MockDriver<'a> {
        let base = [RX_RINGS, TX_RINGS][queue];
        MockDriver::new(frames, self.queues[queue].size(), base)
    }

    fn tap_readable(&mut self) -> Processed {
        let Rig {
            net,
            queues,
            frames,
            ..
        } = self;
        net.process_event(TAP, queues, frames).unwrap()
    }

    fn notify(&mut self, queue: usize) -> Processed {
        let Rig {
            net,
            queues,
            frames,
            ..
        } = self;
        net.process_queue(queue, &mut queues[queue], frames)
            .unwrap()
    }

    fn to_guest(&self, frame: Vec<u8>) {
        self.fake.lock().unwrap().to_guest.push_back(frame);
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.fake.lock().unwrap().from_guest)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.frames
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.frames
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    fn watching(&self) -> bool {
        !self.net.event_sources().is_empty()
    }
}

fn bit(b: u32) -> u64 {
    1 << b
}

/// What Linux negotiates (no UFO from this backend).
fn linux() -> u64 {
    [
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
    .fold(0, |f, &b| f | bit(b))
}

/// The minimal driver: VERSION_1 and MAC only.
fn plain() -> u64 {
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC)
}

/// A frame of `len` bytes after a header `hdr` (all zero: no offloads).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_SIZE];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn header(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, csum: (u16, u16)) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum.0.to_le_bytes());
    h[8..10].copy_from_slice(&csum.1.to_le_bytes());
    h
}

#[test]
fn net_offers_its_features_and_configuration() {
    let (backend, _) = FakeBackend::new(false);
    let net = Net::new(
        Box::new(backend),
        NetConfig {
            mac: MAC,
            mtu: 9000,
        },
    );
    let f = net.avail_features();
    assert_eq!(f & linux(), linux());
    assert_eq!(
        f & (bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO)),
        0
    );
    assert_eq!(f & bit(VIRTIO_NET_F_CTRL_VQ), 0, "no control queue");
    let (backend, _) = FakeBackend::new(true);
    let ufo = Net::new(
        Box::new(backend),
        NetConfig {
            mac: MAC,
            mtu: 1500,
        },
    );
    assert_ne!(ufo.avail_features() & bit(VIRTIO_NET_F_GUEST_UFO), 0);
    let mut config = [0xffu8; 16];
    net.read_config(0, &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(config[6..8], 1u16.to_le_bytes(), "link up");
    assert_eq!(config[8..10], 1u16.to_le_bytes());
    assert_eq!(config[10..12], 9000u16.to_le_bytes());
    assert_eq!(config[12..], [0; 4], "past the end reads 0");
    assert_eq!(net.queue_max_sizes(), [256, 256]);
    assert_eq!(net.device_type(), 1);
}

#[test]
fn net_activation_tells_the_backend_the_guest_offloads() {
    let rig = Rig::new(16, linux());
    assert_eq!(
        rig.fake.lock().unwrap().offloads,
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
    );
    let no_csum = Rig::new(16, linux() & !bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(
        no_csum.fake.lock().unwrap().offloads,
        Some(0),
        "TSO without checksum offload is not used"
    );
    let (backend, fake) = FakeBackend::new(false);
    fake.lock().unwrap().refuse_offloads = true;
    let mut net = Net::new(
        Box::new(backend),
        NetConfig {
            mac: MAC,
            mtu: 1500,
        },
    );
    let frames = GuestFrames::new(16 << 20, Backing::Anonymous).unwrap();
    assert!(net.activate(&mut [], &frames).is_err());
    assert!(net.event_sources().is_empty(), "not active");
}

#[test]
fn net_tx_sends_a_copy_of_the_header_then_the_frame_in_linux_layout() {
    let mut rig = Rig::new(256, linux());
    let frames = rig.frames.clone();
    let f = frame(1400, 3);
    rig.write(TX_BUFS, &f[..HEADER_SIZE]);
    rig.write(TX_BUFS + 0x1000, &f[HEADER_SIZE..]);
    let mut tx = rig.driver(&frames, 1);
    tx.add_chain(&[(TX_BUFS, 12, false), (TX_BUFS + 0x1000, 1400, false)]);
    let done = rig.notify(1);
    assert!(done.used && !done.more);
    assert_eq!(rig.sent(), [f]);
    assert_eq!(tx.used_elem(0).1, 0, "nothing written: used length 0");
    let m = rig.net.metrics().snapshot();
    assert_eq!((m.tx_packets, m.tx_bytes), (1, 1400));
}

#[test]
fn net_tx_sends_what_it_checked_before_a_corrupt_ring_and_keeps_nothing() {
    let mut rig = Rig::new(16, linux());
    let frames = rig.frames.clone();
    let f = frame(100, 9);
    rig.write(TX_BUFS, &f);
    let mut tx = rig.driver(&frames, 1);
    for _ in 0..2 {
        tx.add_chain(&[(TX_BUFS, f.len() as u32, false)]);
    }
    // A third entry naming a head beyond the queue: a fatal queue error.
    tx.set_avail_entry(2, 999);
    tx.set_avail_idx(3);
    let Rig {
        net,
        queues,
        frames: memory,
        ..
    } = &mut rig;
    let err = net.process_queue(1, &mut queues[1], memory).unwrap_err();
    assert!(err.is_fatal(), "{err:?}");
    assert_eq!(
        rig.sent(),
        [f.clone(), f.clone()],
        "the checked frames went out"
    );
    assert!(rig.net.tx.checked.is_empty(), "no chain outlives the call");
    assert_eq!(tx.used_idx(), 2);
}

#[test]
fn net_tx_with_checksum_and_tso_offload_passes_the_header_on() {
    let mut rig = Rig::new(16, linux());
    let frames = rig.frames.clone();
    let h = header(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 54, 1448, (34, 16));
    rig.write(TX_BUFS, &h);
    rig.write(TX_BUFS + 12, &[9; 3000]);
    rig.driver(&frames, 1).add_chain(&[(TX_BUFS, 3012, false)]);
    rig.notify(1);
    let sent = rig.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0][..12], h);
    assert_eq!(sent[0].len(), 3012);
}

#[test]
fn net_tx_drops_and_counts_what_it_must_not_send() {
    let mut rig = Rig::new(
        64,
        plain() | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4),
    );
    let frames = rig.frames.clone();
    let good = frame(60, 1);
    rig.write(TX_BUFS, &good);
    let mut tx = rig.driver(&frames, 1);
    let bad_headers = [
        header(2, 0, 0, 0, (0, 0)),   // DATA_VALID from the driver
        header(1, 0, 0, 0, (50, 10)), // checksum past the frame
        header(1, VIRTIO_NET_HDR_GSO_TCPV6 as u8, 54, 1448, (34, 16)), // TSO6 not negotiated
        header(1, VIRTIO_NET_HDR_GSO_UDP as u8, 42, 1448, (34, 6)), // UFO not offered
        header(1, 0x81, 54, 1448, (34, 16)), // ECN
        header(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 54, 1448, (0, 0)), // GSO without NEEDS_CSUM
        header(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 54, 0, (34, 16)), // gso_size 0
        header(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 61, 1448, (34, 16)), // hdr_len past the frame
        header(1, 9, 0, 0, (34, 16)), // unknown type
    ];
    for (i, h) in bad_headers.iter().enumerate() {
        let at = TX_BUFS + 0x1000 * (i as u64 + 1);
        rig.write(at, h);
        rig.write(at + 12, &good[12..]);
        tx.add_chain(&[(at, 72, false)]);
    }
    // Shorter than the header, in two descriptors; a writable buffer.
    tx.add_chain(&[(TX_BUFS, 6, false), (TX_BUFS + 6, 5, false)]);
    tx.add_chain(&[(TX_BUFS, 72, false), (TX_BUFS + 0x20_0000, 16, true)]);
    // Over 64 KiB: refused by the queue before anything is pinned.
    tx.add_chain(&[(TX_BUFS, 12 + 65536 + 1, false)]);
    tx.add_chain(&[(TX_BUFS, 72, false)]);
    rig.notify(1);
    assert_eq!(rig.sent(), [good], "only the good frame");
    let m = rig.net.metrics().snapshot();
    assert_eq!(
        (
            m.tx_bad_header,
            m.tx_short,
            m.tx_bad_layout,
            m.bad_chain,
            m.tx_packets
        ),
        (9, 1, 1, 1, 1)
    );
    assert_eq!(tx.used_idx(), 13, "every chain returned");
}

#[test]
fn net_tx_header_is_checked_on_the_copy_that_is_sent() {
    // What is checked is what is sent: the backend gets the device's copy,
    // never guest memory read a second time.
    let h = header(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 54, 1448, (34, 16));
    let acked = plain() | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    assert_eq!(tx::check_header(&h, 100, acked), Ok(()));
    assert!(tx::check_header(&h, 100, plain()).is_err());
    assert!(tx::check_header(&header(0, 0, 0, 0, (0, 0)), 0, plain()).is_ok());
}

#[test]
fn net_tap_errors_are_counted_and_the_device_goes_on() {
    let mut rig = Rig::new(16, plain());
    let frames = rig.frames.clone();
    rig.fake.lock().unwrap().write_error = Some(std::io::ErrorKind::WouldBlock);
    rig.write(TX_BUFS, &frame(60, 0));
    let mut tx = rig.driver(&frames, 1);
    tx.add_chain(&[(TX_BUFS, 72, false)]);
    rig.notify(1);
    assert_eq!(rig.net.metrics().snapshot().tap_write_errors, 1);
    rig.fake.lock().unwrap().write_error = None;
    tx.add_chain(&[(TX_BUFS, 72, false)]);
    rig.notify(1);
    assert_eq!(rig.sent().len(), 1);
    // A read error: counted, and the TAP is left alone until the guest posts
    // buffers (a broken TAP must not spin the event loop).
    let mut rx = rig.driver(&frames, 0);
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rx.add_chain(&[(RX_BUFS + 0x1000, 2048, true)]);
    rig.fake.lock().unwrap().read_error = Some(std::io::ErrorKind::Other);
    rig.to_guest(frame(60, 0));
    rig.tap_readable();
    assert_eq!(rig.net.metrics().snapshot().tap_read_errors, 1);
    assert!(!rig.watching());
    rig.fake.lock().unwrap().read_error = None;
    rig.notify(0);
    assert_eq!(rig.net.metrics().snapshot().rx_packets, 1);
    assert!(rig.watching());
}

#[test]
fn net_rx_reads_a_frame_into_the_buffer_and_sets_num_buffers() {
    let mut rig = Rig::new(256, plain());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    rig.write(RX_BUFS, &[0xee; 2048]);
    let head = rx.add_chain(&[(RX_BUFS, 1526, true)]);
    let f = frame(1514, 5);
    rig.to_guest(f.clone());
    assert!(rig.watching());
    let done = rig.tap_readable();
    assert!(done.used);
    assert_eq!(rx.used_elem(0), (u32::from(head), 1526));
    let mut expected = f;
    expected[10..12].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(rig.read(RX_BUFS, 1526), expected);
    let m = rig.net.metrics().snapshot();
    assert_eq!((m.rx_packets, m.rx_bytes), (1, 1514));
    // Nothing more waiting: the popped... nothing popped, nothing held.
    assert!(!rig.tap_readable().used);
}

#[test]
fn net_rx_stops_watching_the_tap_without_buffers_and_resumes_when_posted() {
    let mut rig = Rig::new(16, plain());
    let frames = rig.frames.clone();
    for i in 0..3 {
        rig.to_guest(frame(100, i));
    }
    rig.tap_readable();
    assert!(!rig.watching(), "no buffers: the TAP is not watched");
    let m = rig.net.metrics().snapshot();
    assert_eq!((m.rx_no_buffers, m.rx_packets), (1, 0));
    assert_eq!(
        rig.fake.lock().unwrap().to_guest.len(),
        3,
        "frames wait in the TAP"
    );
    let mut rx = rig.driver(&frames, 0);
    for i in 0..2 {
        rx.add_chain(&[(RX_BUFS + 0x1000 * i, 2048, true)]);
    }
    // The guest's notification delivers at once and watches the TAP again
    // only while buffers remain.
    rig.notify(0);
    assert_eq!(rx.used_idx(), 2);
    assert!(
        !rig.watching(),
        "out of buffers again, one frame still waiting"
    );
    rx.add_chain(&[(RX_BUFS + 0x4000, 2048, true)]);
    rx.add_chain(&[(RX_BUFS + 0x5000, 2048, true)]);
    rig.notify(0);
    assert_eq!(rx.used_idx(), 3);
    assert!(rig.watching(), "a buffer left: the TAP is watched");
    assert_eq!(rig.read(RX_BUFS + 0x4000 + 12, 100), frame(100, 2)[12..]);
    assert_eq!(rig.net.metrics().snapshot().rx_no_buffers, 2);
}

#[test]
fn net_rx_mergeable_frame_spans_chains_with_num_buffers() {
    let mut rig = Rig::new(256, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    for i in 0..4 {
        rx.add_chain(&[(RX_BUFS + 0x1000 * i, 2048, true)]);
    }
    let f = frame(5000, 9);
    rig.to_guest(f.clone());
    rig.tap_readable();
    assert_eq!(rx.used_idx(), 3);
    let lens: Vec<u32> = (0..3).map(|i| rx.used_elem(i).1).collect();
    assert_eq!(lens, [2048, 2048, 5012 - 4096]);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(rig.read(RX_BUFS + 0x1000 * i as u64, *len as usize));
    }
    let mut expected = f;
    expected[10..12].copy_from_slice(&3u16.to_le_bytes());
    assert_eq!(got, expected);
    assert!(rig.watching());
}

#[test]
fn net_rx_mergeable_frame_waits_for_more_buffers() {
    let mut rig = Rig::new(256, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    let f = frame(4000, 4);
    rig.to_guest(f.clone());
    rig.to_guest(frame(50, 5));
    rig.tap_readable();
    assert_eq!(
        rx.used_idx(),
        0,
        "nothing returned before the frame is whole"
    );
    assert!(!rig.watching());
    assert_eq!(rig.net.metrics().snapshot().rx_deferred, 1);
    assert_eq!(
        rig.fake.lock().unwrap().to_guest.len(),
        1,
        "one frame held, no more read"
    );
    rx.add_chain(&[(RX_BUFS + 0x1000, 2048, true)]);
    rx.add_chain(&[(RX_BUFS + 0x2000, 2048, true)]);
    rig.notify(0);
    assert_eq!(rx.used_idx(), 3, "the whole frame, then the next");
    assert_eq!(rx.used_elem(1).1, 4012 - 2048);
    let mut got = rig.read(RX_BUFS, 2048);
    got.extend(rig.read(RX_BUFS + 0x1000, 4012 - 2048));
    let mut expected = f;
    expected[10..12].copy_from_slice(&2u16.to_le_bytes());
    assert_eq!(got, expected);
    assert_eq!(rx.used_elem(2).1, 62);
}

#[test]
fn net_rx_frame_too_large_for_the_buffer_is_dropped_and_the_buffer_reused() {
    let mut rig = Rig::new(16, plain());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    let head = rx.add_chain(&[(RX_BUFS, 1526, true)]);
    rig.to_guest(frame(3000, 0));
    rig.to_guest(frame(64, 1));
    rig.tap_readable();
    assert_eq!(rig.net.metrics().snapshot().rx_too_large, 1);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(
        rx.used_elem(0),
        (u32::from(head), 76),
        "the next frame, same buffer"
    );
}

#[test]
fn net_rx_unusable_buffers_are_returned_unused() {
    let mut rig = Rig::new(16, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    rx.add_chain(&[(RX_BUFS, 8, true)]); // under the header
    rx.add_chain(&[(RX_BUFS + 0x1000, 64, false), (RX_BUFS + 0x2000, 64, true)]); // readable
    rx.add_chain(&[(RX_BUFS + 0x3000, 2048, true)]);
    rig.write(RX_BUFS + 0x1000, &[0x5a; 64]);
    rig.to_guest(frame(100, 0));
    rig.tap_readable();
    assert_eq!(rx.used_idx(), 3);
    assert_eq!(
        (rx.used_elem(0).1, rx.used_elem(1).1, rx.used_elem(2).1),
        (0, 0, 112)
    );
    assert_eq!(
        rig.read(RX_BUFS + 0x1000, 64),
        [0x5a; 64],
        "readable buffer untouched"
    );
    assert_eq!(rig.net.metrics().snapshot().rx_bad_buffer, 2);
}

#[test]
fn net_rx_ring_of_tiny_buffers_cannot_hold_the_frame_and_drops_it() {
    let mut rig = Rig::new(4, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    for i in 0..4 {
        rx.add_chain(&[(RX_BUFS + 0x1000 * i, 12, true)]);
    }
    rig.to_guest(frame(100, 0));
    rig.tap_readable();
    assert_eq!(rx.used_idx(), 4, "the chains are returned");
    assert!((0..4).all(|i| rx.used_elem(i).1 == 0));
    assert_eq!(rig.net.metrics().snapshot().rx_too_large, 1);
}

#[test]
fn net_rx_flood_is_served_a_batch_at_a_time_and_waits_in_the_tap() {
    let mut rig = Rig::new(256, plain());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    for i in 0..256 {
        rx.add_chain(&[(RX_BUFS + 0x800 * i, 2048, true)]);
    }
    for i in 0..10_000u32 {
        rig.to_guest(frame(60, i as u8));
    }
    let done = rig.tap_readable();
    assert!(done.used && done.more, "one batch");
    assert_eq!(rx.used_idx(), 256);
    rig.tap_readable();
    assert!(!rig.watching(), "no buffers left: the TAP waits");
    assert_eq!(rig.fake.lock().unwrap().to_guest.len(), 10_000 - 256);
    // Refilled, the flood goes on at the guest's pace.
    for i in 0..16 {
        rx.add_chain(&[(RX_BUFS + 0x800 * i, 2048, true)]);
    }
    rig.notify(0);
    assert_eq!(rx.used_idx(), 272);
}

#[test]
fn net_reset_drops_held_chains_and_stops_watching() {
    let mut rig = Rig::new(256, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rig.to_guest(frame(4000, 0));
    rig.tap_readable();
    assert!(!rig.net.rx.held.is_empty());
    rig.net.reset();
    assert!(rig.net.rx.held.is_empty() && rig.net.rx.next.is_none());
    assert!(rig.net.event_sources().is_empty());
    for q in &mut rig.queues {
        q.reset();
    }
    assert_eq!(
        rig.frames.table().pins(),
        0,
        "nothing pinned after the reset"
    );
}

#[test]
fn net_at_full_rings_with_event_idx_notifies_and_interrupts_once_per_ring() {
    use super::linux_driver::{LinuxNet, MEMORY, RING};
    const ROUNDS: u64 = 8;
    let frames = GuestFrames::new(MEMORY, Backing::Anonymous).unwrap();
    let (backend, fake) = FakeBackend::new(false);
    let mut model = LinuxNet::new(&frames, Box::new(backend));
    let frame: Vec<u8> = (0..1514).map(|i| i as u8).collect();

    // Transmit: the driver fills the ring, the device serves it, the driver
    // reaps; a device that stopped without re-arming avail_event would never
    // be notified of the next round (reap_tx would find nothing).
    model.load_tx_frame(&frame);
    for _ in 0..ROUNDS {
        assert_eq!(model.send(RING), RING);
        model.device_tx();
        assert_eq!(model.reap_tx(), RING, "every packet of the round sent");
    }
    let sent = std::mem::take(&mut fake.lock().unwrap().from_guest);
    assert_eq!(sent.len() as u64, ROUNDS * u64::from(RING));
    assert!(
        sent.iter()
            .all(|f| f[..12] == [0; 12] && f[12..] == frame[..])
    );
    let tx = model.tx_events();
    assert_eq!(
        (tx.notifications, tx.interrupts),
        (ROUNDS, ROUNDS),
        "{tx:?}"
    );

    // Receive: a full ring of buffers, a TAP with a ring's worth of frames
    // each round.
    let mut with_header = vec![0u8; 12];
    with_header.extend_from_slice(&frame);
    assert_eq!(model.post_rx(RING), RING);
    for _ in 0..ROUNDS {
        fake.lock()
            .unwrap()
            .to_guest
            .extend(std::iter::repeat_n(with_header.clone(), usize::from(RING)));
        model.device_rx(true);
        let mut received = Vec::new();
        assert_eq!(
            model.reap_rx(|addr, len| received.push((addr, len))),
            RING,
            "every buffer filled"
        );
        for (addr, len) in received {
            assert_eq!(len as usize, with_header.len());
            let mut got = vec![0u8; with_header.len()];
            frames.memory().read_slice(&mut got, addr).unwrap();
            assert_eq!(got[10..12], 1u16.to_le_bytes(), "num_buffers");
            assert_eq!(got[12..], frame[..]);
        }
        assert_eq!(model.post_rx(RING), RING);
    }
    let rx = model.rx_events();
    assert_eq!(rx.packets, ROUNDS * u64::from(RING));
    // One notification per ring of buffers posted (the first fill and each
    // refill), one interrupt per ring of frames.
    assert_eq!(
        (rx.notifications, rx.interrupts),
        (ROUNDS + 1, ROUNDS),
        "{rx:?}"
    );
    assert!(fake.lock().unwrap().to_guest.is_empty());
}

fn ops_limit(size: u64, refill_time_ms: u64) -> Option<RateLimiterConfig> {
    Some(RateLimiterConfig {
        bandwidth: None,
        ops: Some(crate::rate_limiter::TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms,
        }),
    })
}

impl Rig {
    fn event(&mut self, token: u32) -> Processed {
        let Rig {
            net,
            queues,
            frames,
            ..
        } = self;
        net.process_event(token, queues, frames).unwrap()
    }
}

#[test]
fn net_tx_rate_limiter_holds_frames_until_its_timer_fires() {
    let mut rig = Rig::new(256, plain());
    rig.net.set_rate_limiters(None, ops_limit(2, 30)).unwrap();
    let frames = rig.frames.clone();
    let mut tx = rig.driver(&frames, 1);
    for i in 0..5u64 {
        rig.write(TX_BUFS + i * 0x1000, &frame(100, i as u8));
        tx.add_chain(&[(TX_BUFS + i * 0x1000, 112, false)]);
    }
    let done = rig.notify(1);
    assert!(!done.more, "throttled is not more work: no busy loop");
    assert_eq!(rig.sent().len(), 2);
    assert_eq!(rig.net.metrics().snapshot().tx_rate_limiter_throttled, 1);
    assert!(
        rig.net
            .event_sources()
            .iter()
            .any(|s| s.token == TX_LIMITER),
        "its timer is watched"
    );
    assert!(rig.watching(), "receiving is not held back");
    rig.event(TX_LIMITER); // not fired yet: nothing, and no blocking read
    assert!(rig.sent().is_empty());
    std::thread::sleep(std::time::Duration::from_millis(50));
    rig.event(TX_LIMITER);
    assert_eq!(rig.sent().len(), 2, "two more tokens, two more frames");
    assert_eq!(tx.used_idx(), 4);
}

#[test]
fn net_rx_rate_limiter_stops_watching_the_tap_until_its_timer_fires() {
    let mut rig = Rig::new(256, plain());
    rig.net.set_rate_limiters(ops_limit(1, 30), None).unwrap();
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    for i in 0..4 {
        rx.add_chain(&[(RX_BUFS + 0x1000 * i, 2048, true)]);
    }
    for i in 0..3 {
        rig.to_guest(frame(100, i));
    }
    rig.tap_readable();
    assert_eq!(rx.used_idx(), 1, "one token");
    let sources = rig.net.event_sources();
    assert!(
        sources.iter().all(|s| s.token != TAP),
        "throttled: the TAP is not watched, frames wait in it"
    );
    assert!(sources.iter().any(|s| s.token == RX_LIMITER));
    std::thread::sleep(std::time::Duration::from_millis(40));
    rig.event(RX_LIMITER);
    assert_eq!(rx.used_idx(), 2);
    assert_eq!(rig.fake.lock().unwrap().to_guest.len(), 1);
    // Removing the limits lets the rest through.
    rig.net
        .set_rate_limiters(Some(RateLimiterConfig::default()), None)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(40));
    rig.event(RX_LIMITER);
    assert_eq!(rx.used_idx(), 3);
    assert!(rig.watching() && rig.net.event_sources().iter().any(|s| s.token == TAP));
}

impl Rig {
    fn quiesce(&mut self) {
        let Rig {
            net,
            queues,
            frames,
            ..
        } = self;
        net.quiesce(queues, frames).unwrap();
        assert!(
            queues.iter().all(|q| q.state().is_some()),
            "nothing in flight"
        );
    }
}

#[test]
fn net_quiesce_gives_back_the_chain_waiting_for_a_frame() {
    let mut rig = Rig::new(256, plain());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    let head = rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rig.tap_readable(); // pops the chain, the TAP has nothing
    assert_eq!(rig.queues[0].in_flight(), 1);
    rig.quiesce();
    rig.to_guest(frame(100, 1));
    rig.tap_readable();
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(
        rx.used_elem(0).0,
        u32::from(head),
        "the same chain, taken again"
    );
}

#[test]
fn net_quiesce_drops_a_partly_delivered_frame_and_returns_its_buffers_unused() {
    let mut rig = Rig::new(256, linux());
    let frames = rig.frames.clone();
    let mut rx = rig.driver(&frames, 0);
    rx.add_chain(&[(RX_BUFS, 2048, true)]);
    rig.to_guest(frame(4000, 4));
    rig.to_guest(frame(50, 5));
    rig.tap_readable();
    assert_eq!(
        rig.queues[0].in_flight(),
        1,
        "held for the rest of the frame"
    );
    rig.quiesce();
    assert_eq!(rig.net.metrics().snapshot().rx_dropped_at_snapshot, 1);
    assert_eq!(rx.used_idx(), 0);
    // After the snapshot the buffers serve the next frame whole.
    rig.notify(0);
    assert_eq!(rx.used_idx(), 1);
    assert_eq!(rx.used_elem(0).1, 62);
}
