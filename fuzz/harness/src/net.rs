//! Target `net`: virtio-net (virtio 1.2 §5.1) over the in-memory backend,
//! driven by structured operations from `arbitrary`, interleaved: transmit
//! chains of any layout and header (direct or indirect, readable or
//! writable, short or long), receive buffers of any layout and number,
//! frames arriving from the TAP of any length, TAP readiness, queue
//! notifications, TAP read failures and device resets, with any subset of
//! the offered features acknowledged. The harness never rewrites the
//! descriptors of a chain in flight (a driver that does gets what the
//! device read at pop time, which the write check cannot follow); the
//! queue-level abuse of rings is the `virtqueue` and `virtio_mmio` targets'.
//!
//! Checks: guest memory changes only in the device-writable buffers of
//! receive chains the device holds (posted, not yet returned: a returned
//! buffer is never written again, QEMU CVE-2021-3748) and in the used rings
//! — never in a transmit buffer; every frame sent has passed the header
//! check on the bytes sent, is at least a header long and at most 64 KiB
//! after it; transmit chains come back with used length 0; after a reset
//! nothing is pinned.

use arbitrary::{Arbitrary, Unstructured};
use devices::virtio::mock::MockDriver;
use devices::virtio::net::{FakeBackend, HEADER_SIZE, MAX_FRAME, Net, NetConfig, check_header};
use devices::virtio::{Queue, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{assert_writes_within, guest, pins, snapshot};

const RAM: u64 = 256 << 10;
const QUEUE_SIZE: u16 = 16;
const RINGS: [u64; 2] = [0, 0x1000];
/// Buffers are placed from here up, wrapping back at the end of RAM.
const BUFFERS: u64 = 0x2000;
const MAX_OPS: usize = 48;
const MAX_SEGMENTS: usize = 6;

/// The whole input.
#[derive(Arbitrary, Debug)]
pub struct NetInput {
    /// Acknowledged = offered & this.
    features: u64,
    ufo: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A transmit chain: its buffers, the header written at its start, and
    /// whether it goes through an indirect table.
    Tx {
        segments: Vec<(u16, bool)>,
        header: [u8; 12],
        indirect: bool,
    },
    /// `count` receive chains of these buffers.
    RxBuffers {
        segments: Vec<(u16, bool)>,
        count: u8,
        indirect: bool,
    },
    /// A frame from the TAP of `len` bytes after its header.
    TapFrame {
        len: u16,
        header: [u8; 12],
    },
    TapReadable,
    NotifyRx,
    NotifyTx,
    TapReadError(bool),
    Reset,
}

/// A chain built by the harness: its head and buffers.
#[derive(Debug, Clone)]
struct Posted {
    head: u16,
    bufs: Vec<(u64, u32, bool)>,
}

struct Rig<'a> {
    drivers: [MockDriver<'a>; 2],
    queues: Vec<Queue>,
    next: u64,
    /// Receive chains the device holds, in posting order.
    rx_held: Vec<Posted>,
    /// Used entries of each queue already accounted for.
    seen_used: [u16; 2],
    /// Per queue: the descriptor the mock driver writes next, and the
    /// descriptors (by head) of chains not yet returned. The harness never
    /// rewrites those: the device acts on the descriptors as it read them,
    /// so an in-flight chain whose descriptors changed would no longer be
    /// the chain the write check allows.
    next_desc: [u16; 2],
    busy: [Vec<(u16, u16)>; 2],
}

impl Rig<'_> {
    /// Claims `n` descriptors from the next one on `queue`; false (nothing
    /// claimed) if one of them belongs to a chain in flight.
    fn claim(&mut self, queue: usize, n: u16) -> bool {
        let start = self.next_desc[queue];
        let overlaps = |&(head, len): &(u16, u16)| {
            (0..n).any(|i| {
                let d = (start + i) % QUEUE_SIZE;
                (d + QUEUE_SIZE - head) % QUEUE_SIZE < len
            })
        };
        if n > QUEUE_SIZE || self.busy[queue].iter().any(overlaps) {
            return false;
        }
        self.busy[queue].push((start, n));
        self.next_desc[queue] = (start + n) % QUEUE_SIZE;
        true
    }

    /// The chain at `head` came back: its descriptors are free.
    fn release(&mut self, queue: usize, head: u16) {
        if let Some(at) = self.busy[queue].iter().position(|b| b.0 == head) {
            self.busy[queue].remove(at);
        }
    }
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let Ok(input) = NetInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_input(&input);
}

fn place(next: &mut u64, len: u32) -> u64 {
    if *next + u64::from(len) > RAM {
        *next = BUFFERS;
    }
    let addr = *next;
    *next += u64::from(len).next_multiple_of(16);
    addr
}

/// Places up to [`MAX_SEGMENTS`] buffers of the given lengths (mod 4 KiB)
/// and directions: `(addr, len, device_writable)`.
fn place_all(next: &mut u64, segments: &[(u16, bool)]) -> Vec<(u64, u32, bool)> {
    segments
        .iter()
        .take(MAX_SEGMENTS)
        .map(|&(len, w)| {
            let len = u32::from(len % 4096);
            (place(next, len), len, w)
        })
        .collect()
}

fn run_input(input: &NetInput) {
    let (backend, fake) = FakeBackend::new(input.ufo);
    let mut net = Net::new(
        Box::new(backend),
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
        },
    );
    let acked = net.avail_features() & input.features;
    net.ack_features(acked);
    let frames = guest(RAM, &[]);
    let new_queues = |net: &Net| -> Vec<Queue> {
        (0..2)
            .map(|i| {
                let mut q = Queue::new(QUEUE_SIZE);
                q.set_event_idx(acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
                q.set_indirect(acked & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0);
                q.set_chain_limit(net.chain_limit(i));
                q
            })
            .collect()
    };
    let mut rig = Rig {
        drivers: RINGS.map(|r| MockDriver::new(&frames, QUEUE_SIZE, GuestAddress(r))),
        queues: new_queues(&net),
        next: BUFFERS,
        rx_held: Vec::new(),
        seen_used: [0; 2],
        next_desc: [0; 2],
        busy: [Vec::new(), Vec::new()],
    };
    for (d, q) in rig.drivers.iter().zip(rig.queues.iter_mut()) {
        d.configure(q);
    }
    if net.activate(&mut rig.queues, &frames).is_err() {
        return;
    }
    for op in input.ops.iter().take(MAX_OPS) {
        // Memory as the harness (the driver) left it; compared after the
        // device ran (the harness's own writes happen before this).
        let mut before = None;
        match op {
            Op::Tx {
                segments,
                header,
                indirect,
            } => {
                let bufs = place_all(&mut rig.next, segments);
                if bufs.is_empty() || !rig.claim(1, descriptors(&bufs, *indirect)) {
                    continue;
                }
                // The header across the first buffers, then a pattern.
                let mut byte = 0usize;
                for &(addr, len, _) in &bufs {
                    let data: Vec<u8> = (0..len as usize)
                        .map(|i| header.get(byte + i).copied().unwrap_or((byte + i) as u8))
                        .collect();
                    byte += len as usize;
                    frames
                        .memory()
                        .write_slice(&data, GuestAddress(addr))
                        .unwrap();
                }
                add_chain(&mut rig, 1, &bufs, *indirect);
            }
            Op::RxBuffers {
                segments,
                count,
                indirect,
            } => {
                for _ in 0..count % 8 {
                    let bufs = place_all(&mut rig.next, segments);
                    if bufs.is_empty() || !rig.claim(0, descriptors(&bufs, *indirect)) {
                        break;
                    }
                    let head = add_chain(&mut rig, 0, &bufs, *indirect);
                    rig.rx_held.push(Posted { head, bufs });
                }
            }
            Op::TapFrame { len, header } => {
                let mut frame = header.to_vec();
                frame.extend((0..usize::from(*len)).map(|i| i as u8));
                let mut state = fake.lock().unwrap();
                if state.to_guest.len() < 64 {
                    state.to_guest.push_back(frame);
                }
            }
            Op::TapReadable => {
                before = Some(snapshot(&frames, RAM));
                let _ = net.process_event(0, &mut rig.queues, &frames);
            }
            Op::NotifyRx => {
                before = Some(snapshot(&frames, RAM));
                let _ = net.process_queue(0, &mut rig.queues[0], &frames);
            }
            Op::NotifyTx => {
                before = Some(snapshot(&frames, RAM));
                let _ = net.process_queue(1, &mut rig.queues[1], &frames);
            }
            Op::TapReadError(on) => {
                fake.lock().unwrap().read_error = on.then_some(std::io::ErrorKind::Other);
            }
            Op::Reset => {
                net.reset();
                for q in &mut rig.queues {
                    q.reset();
                }
                assert_eq!(pins(&frames), 0, "pins left after a reset");
                frames
                    .memory()
                    .write_slice(&[0; 0x2000], GuestAddress(0))
                    .unwrap();
                rig.drivers = RINGS.map(|r| MockDriver::new(&frames, QUEUE_SIZE, GuestAddress(r)));
                rig.queues = new_queues(&net);
                for (d, q) in rig.drivers.iter().zip(rig.queues.iter_mut()) {
                    d.configure(q);
                }
                rig.rx_held.clear();
                rig.seen_used = [0; 2];
                rig.next_desc = [0; 2];
                rig.busy = [Vec::new(), Vec::new()];
                net.ack_features(acked);
                if net.activate(&mut rig.queues, &frames).is_err() {
                    return;
                }
                continue;
            }
        }
        let Some(before) = before else {
            continue;
        };
        let after = snapshot(&frames, RAM);
        let mut allowed: Vec<(u64, u64)> = rig
            .rx_held
            .iter()
            .flat_map(|p| p.bufs.iter())
            .filter(|b| b.2)
            .map(|b| (b.0, u64::from(b.1)))
            .collect();
        for d in &rig.drivers {
            allowed.push((d.used_ring().0, 6 + 8 * u64::from(QUEUE_SIZE)));
        }
        assert_writes_within(&before, &after, &allowed, "net");
        account_used(&mut rig);
        for sent in fake.lock().unwrap().from_guest.drain(..) {
            assert!(
                sent.len() >= HEADER_SIZE,
                "a frame shorter than its header was sent"
            );
            let frame_len = sent.len() - HEADER_SIZE;
            assert!(frame_len <= MAX_FRAME, "a {frame_len}-byte frame was sent");
            let header: [u8; 12] = sent[..12].try_into().unwrap();
            assert!(
                check_header(&header, frame_len, acked).is_ok(),
                "a frame with an invalid header was sent: {header:?}"
            );
        }
    }
    net.reset();
    for q in &mut rig.queues {
        q.reset();
    }
    drop(rig);
    assert_eq!(pins(&frames), 0, "pins left after the final reset");
}

/// Descriptors a chain of `bufs` takes in the queue's table.
fn descriptors(bufs: &[(u64, u32, bool)], indirect: bool) -> u16 {
    if indirect { 1 } else { bufs.len() as u16 }
}

fn add_chain(rig: &mut Rig<'_>, queue: usize, bufs: &[(u64, u32, bool)], indirect: bool) -> u16 {
    if indirect {
        let table = place(&mut rig.next, 16 * bufs.len() as u32);
        rig.drivers[queue].add_indirect_chain(GuestAddress(table), bufs)
    } else {
        rig.drivers[queue].add_chain(bufs)
    }
}

/// Takes the new used entries: transmit chains must come back with length
/// 0, and returned receive chains are no longer the device's to write.
fn account_used(rig: &mut Rig<'_>) {
    let mut released = Vec::new();
    for (q, driver) in rig.drivers.iter().enumerate() {
        let idx = driver.used_idx();
        while rig.seen_used[q] != idx {
            let (id, len) = driver.used_elem(rig.seen_used[q]);
            rig.seen_used[q] = rig.seen_used[q].wrapping_add(1);
            released.push((q, id as u16));
            if q == 1 {
                assert_eq!(len, 0, "a transmit chain came back with used length {len}");
            } else if let Some(at) = rig.rx_held.iter().position(|p| u32::from(p.head) == id) {
                rig.rx_held.remove(at);
            }
        }
    }
    for (q, head) in released {
        rig.release(q, head);
    }
}
