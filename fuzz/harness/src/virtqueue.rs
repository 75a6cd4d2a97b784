//! Target `virtqueue`: the device side of a split virtqueue (virtio 1.2 §2.7)
//! on an arbitrary memory image.
//!
//! Input: queue size (`1 << (b % 9)`), flags (bit 0 EVENT_IDX, bit 1
//! INDIRECT_DESC, bit 2 hold the chains until a reset instead of returning
//! each), the three ring addresses (u16 each, so inside or just past the 256
//! KiB of RAM, aligned or not), the used length to report, then the memory
//! image copied to address 0.
//!
//! Every chain the queue accepts is read to the end and its writable bytes
//! are filled, then returned (or held and dropped by a reset). Checks: only
//! device-writable buffers of accepted chains and the used ring change; the
//! used index counts at most the chains taken off the available ring;
//! after the last chain is returned only the rings are pinned, and after the
//! reset nothing is.

use devices::virtio::Queue;
use devices::virtio::queue::MAX_QUEUE_SIZE;
use vm_memory::{Bytes, GuestAddress};

use crate::common::{GUEST_RAM, Input, assert_writes_within, guest, pins, snapshot};

/// Most chains taken per run (the queue's own budget bounds it too).
const MAX_POPS: usize = 2 * MAX_QUEUE_SIZE as usize;

/// The queue as set up from the input.
struct Setup {
    size: u16,
    event_idx: bool,
    indirect: bool,
    hold: bool,
    desc: u64,
    avail: u64,
    used: u64,
    used_len: u32,
}

fn parse(input: &mut Input<'_>) -> Setup {
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    Setup {
        size,
        event_idx: flags & 1 != 0,
        indirect: flags & 2 != 0,
        hold: flags & 4 != 0,
        desc: u64::from(input.u16()) * 4,
        avail: u64::from(input.u16()) * 4,
        used: u64::from(input.u16()) * 4,
        used_len: input.u32(),
    }
}

fn configure(queue: &mut Queue, s: &Setup) {
    let _ = queue.try_set_size(s.size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(s.desc);
    queue.set_desc_table_address(l, h);
    let (l, h) = split(s.avail);
    queue.set_avail_ring_address(l, h);
    let (l, h) = split(s.used);
    queue.set_used_ring_address(l, h);
    queue.set_event_idx(s.event_idx);
    queue.set_indirect(s.indirect);
    queue.set_ready(true);
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let s = parse(&mut input);
    let frames = guest(GUEST_RAM, input.rest());
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    configure(&mut queue, &s);
    if queue.activate(&frames).is_err() {
        assert_eq!(pins(&frames), 0, "a refused queue pins");
        return;
    }
    let before = snapshot(&frames, GUEST_RAM);
    let used_len = 6 + 8 * u64::from(s.size);
    let mut allowed = vec![(s.used, used_len)];
    let used_idx = |f: &memory::GuestFrames| -> u16 {
        f.memory()
            .read_obj(GuestAddress(s.used + 2))
            .expect("used ring in RAM")
    };
    let first_used = used_idx(&frames);
    let mut taken = 0u16;
    // Entries the device was asked to put on the used ring.
    let mut pushed = 0u16;
    let mut held = Vec::new();
    let mut chunk = [0u8; 4096];
    for _ in 0..MAX_POPS {
        let chain = match queue.pop(&frames) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(e) if !e.is_fatal() => {
                taken = taken.wrapping_add(1);
                pushed = pushed.wrapping_add(1);
                continue;
            }
            Err(_) => break,
        };
        taken = taken.wrapping_add(1);
        for b in chain.writable() {
            allowed.push((b.addr().0, u64::from(b.len())));
        }
        let mut reader = chain.reader();
        while reader.remaining() > 0 {
            let n = reader.remaining().min(chunk.len() as u64) as usize;
            reader
                .read_exact(&frames, &mut chunk[..n])
                .expect("a validated chain reads to its end");
        }
        let mut writer = chain.writer();
        let mut fill = 0u8;
        while writer.remaining() > 0 {
            let n = writer.remaining().min(chunk.len() as u64) as usize;
            fill = fill.wrapping_add(0x5b);
            chunk[..n].fill(fill);
            writer
                .write_all(&frames, &chunk[..n])
                .expect("a validated chain writes to its end");
        }
        if s.hold {
            held.push(chain);
        } else if queue.add_used(&frames, chain, s.used_len).is_ok() {
            pushed = pushed.wrapping_add(1);
        } else {
            break;
        }
        let _ = queue.needs_notification(&frames);
    }
    let after = snapshot(&frames, GUEST_RAM);
    assert_writes_within(&before, &after, &allowed, "virtqueue");
    // The device's used index starts at 0 whatever the memory held (the
    // rings may even overlap the driver's) and is stored only with an entry:
    // it ends equal to the entries pushed, at most one per chain taken. (Not
    // checkable when a chain's writable buffer covers the field: the harness
    // itself wrote there.)
    let last_used = used_idx(&frames);
    let idx_field = s.used + 2;
    let clobbered = allowed[1..]
        .iter()
        .any(|&(a, l)| idx_field + 2 > a && idx_field < a + l);
    assert!(pushed <= taken, "{pushed} used entries for {taken} chains");
    if !clobbered {
        let expected = if pushed == 0 { first_used } else { pushed };
        assert_eq!(
            last_used, expected,
            "used index {last_used} after {pushed} entries ({taken} chains taken)"
        );
    }
    if held.is_empty() {
        // Only the three rings may still be pinned once the batch is over
        // (the transport drops what the spare lists kept for the next chain).
        queue.release_parked();
        assert_eq!(
            pins(&frames),
            if queue.is_active() { 3 } else { 0 },
            "pins held after every chain was returned"
        );
    }
    queue.reset();
    drop(held);
    assert_eq!(
        pins(&frames),
        0,
        "pins left after the queue was reset and its chains dropped"
    );
}
