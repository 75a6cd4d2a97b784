//! Tests of the device-side split virtqueue against a driver-side mock, one per
//! case of ../shared/ADVERSARIAL.md §1-8; each ends by checking that the queue
//! (or, after a fatal error, a reset queue) still serves a well-formed chain.

use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::mock::{INDIRECT, MockDriver, NEXT, RawDescriptor};

const RINGS: GuestAddress = GuestAddress(0x10_0000);
const DATA: u64 = 0x20_0000;
const SIZE: u16 = 16;

fn frames() -> GuestFrames {
    GuestFrames::new(32 << 20, Backing::Anonymous).unwrap()
}

fn setup(frames: &GuestFrames) -> (Queue, MockDriver<'_>) {
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    let driver = MockDriver::new(frames, SIZE, RINGS);
    driver.configure(&mut queue);
    (queue, driver)
}

/// Pops one chain and returns it with `len`; asserts it was well formed.
fn serve_one(queue: &mut Queue, frames: &GuestFrames) -> DescriptorChain {
    queue
        .pop(frames)
        .expect("well-formed chain")
        .expect("a chain is available")
}

/// Offers a two-buffer request and checks the queue pops and completes it.
fn assert_still_serves(queue: &mut Queue, driver: &mut MockDriver<'_>, frames: &GuestFrames) {
    let used_before = driver.used_idx();
    let head = driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8, true)]);
    let chain = serve_one(queue, frames);
    assert_eq!(chain.head(), head);
    assert_eq!((chain.readable_len(), chain.writable_len()), (16, 8));
    queue.add_used(frames, chain, 8).unwrap();
    assert_eq!(driver.used_idx(), used_before.wrapping_add(1));
    assert_eq!(driver.used_elem(used_before), (u32::from(head), 8));
}

fn assert_bad_chain(result: Result<Option<DescriptorChain>, QueueError>, expected: ChainError) {
    match result {
        Err(QueueError::BadChain { source, .. }) => assert_eq!(source, expected),
        other => panic!("expected BadChain({expected:?}), got {other:?}"),
    }
}

#[test]
fn queue_pops_chain_split_into_readable_and_writable() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    assert!(queue.pop(&frames).unwrap().is_none());
    frames
        .memory()
        .write_slice(b"0123456789abcdef", GuestAddress(DATA))
        .unwrap();
    let head = driver.add_chain(&[
        (DATA, 10, false),
        (DATA + 10, 6, false),
        (DATA + 0x1000, 32, true),
    ]);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.head(), head);
    assert_eq!(chain.readable().len(), 2);
    assert_eq!(chain.writable().len(), 1);
    let mut reader = chain.reader();
    let mut header = [0u8; 12];
    reader.read_exact(&frames, &mut header).unwrap();
    assert_eq!(&header, b"0123456789ab");
    assert_eq!(reader.remaining(), 4);
    assert!(reader.read_exact(&frames, &mut [0; 5]).is_err());
    let mut writer = chain.writer();
    writer.write_all(&frames, b"done").unwrap();
    assert_eq!(queue.in_flight(), 1);
    queue.add_used(&frames, chain, 4).unwrap();
    assert_eq!(queue.in_flight(), 0);
    assert_eq!(driver.used_idx(), 1);
    assert_eq!(driver.used_elem(0), (u32::from(head), 4));
    let mut out = [0u8; 4];
    frames
        .memory()
        .read_slice(&mut out, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&out, b"done");
}

#[test]
fn queue_pins_buffers_while_in_flight_and_marks_written_frames_dirty() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    frames.take_dirty();
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x3000, 4096, true)]);
    let rings = frames.table().pins();
    assert_eq!(rings, 3, "the three rings of the active queue");
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(
        frames.table().pins(),
        rings + 1,
        "one count for the buffers' section"
    );
    chain.writer().write_all(&frames, &[1; 100]).unwrap();
    queue.add_used(&frames, chain, 100).unwrap();
    assert_eq!(frames.table().pins(), rings + 1, "parked for the batch");
    assert!(queue.pop(&frames).unwrap().is_none());
    assert_eq!(frames.table().pins(), rings, "released when work runs out");
    let dirty = frames.take_dirty();
    assert!(
        dirty.contains(&(GuestAddress(DATA + 0x3000), 4096)),
        "{dirty:?}"
    );
    assert!(
        !dirty.iter().any(|&(a, _)| a == GuestAddress(DATA)),
        "readable buffer not dirty"
    );
}

#[test]
fn queue_used_len_is_capped_at_writable_bytes() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8, true)]);
    let chain = serve_one(&mut queue, &frames);
    queue.add_used(&frames, chain, 1 << 20).unwrap();
    assert_eq!(driver.used_elem(0).1, 8);
}

// §1: descriptor loops.
#[test]
fn queue_rejects_descriptor_loop() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    // A self loop, then A -> B -> A, then a zero-length loop (CVE-2016-6490).
    let loops: [&[(u16, RawDescriptor)]; 3] = [
        &[(0, RawDescriptor::new(DATA, 16, NEXT, 0))],
        &[
            (0, RawDescriptor::new(DATA, 16, NEXT, 1)),
            (1, RawDescriptor::new(DATA, 16, NEXT, 0)),
        ],
        &[(0, RawDescriptor::new(DATA, 0, NEXT, 0))],
    ];
    for descs in loops {
        for &(i, d) in descs {
            driver.write_descriptor(i, d);
        }
        driver.publish(0);
        assert_bad_chain(queue.pop(&frames), ChainError::TooLong);
        let last = driver.used_idx().wrapping_sub(1);
        assert_eq!(driver.used_elem(last), (0, 0), "returned with length 0");
    }
    assert_eq!(queue.in_flight(), 0);
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_rejects_chain_longer_than_queue_size() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    // SIZE descriptors in a line are fine; the budget is exactly SIZE.
    let all: Vec<_> = (0..SIZE)
        .map(|i| (DATA + u64::from(i) * 64, 64, false))
        .collect();
    driver.add_chain(&all);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.readable().len(), usize::from(SIZE));
    queue.add_used(&frames, chain, 0).unwrap();
    // SIZE - 1 descriptors, then one pointing to an indirect table: SIZE in
    // the queue's table, within its budget; the table has its own.
    queue.set_indirect(true);
    let table = GuestAddress(DATA + 0x10000);
    driver.write_descriptor_at(table, 0, RawDescriptor::new(DATA, 16, 0, 0));
    for i in 0..SIZE {
        let d = if i + 1 < SIZE {
            RawDescriptor::new(DATA, 16, NEXT, i + 1)
        } else {
            RawDescriptor::new(table.0, 16, INDIRECT, 0)
        };
        driver.write_descriptor(i, d);
    }
    driver.publish(0);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.readable().len(), usize::from(SIZE));
    queue.add_used(&frames, chain, 0).unwrap();
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_indirect_table_has_its_own_budget_of_its_length() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    queue.set_indirect(true);
    let table = GuestAddress(DATA + 0x10000);
    // A table of exactly SIZE entries: served whole (its descriptor in the
    // queue's table does not count against it).
    let all: Vec<_> = (0..SIZE)
        .map(|i| (DATA + u64::from(i) * 64, 64, false))
        .collect();
    driver.add_indirect_chain(table, &all);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.readable().len(), usize::from(SIZE));
    queue.add_used(&frames, chain, 0).unwrap();
    // One entry more than the queue size is refused, however it links.
    let more: Vec<_> = (0..=SIZE).map(|_| (DATA, 64, false)).collect();
    driver.add_indirect_chain(table, &more);
    assert_bad_chain(
        queue.pop(&frames),
        ChainError::IndirectLength(16 * (u32::from(SIZE) + 1)),
    );
    // A loop inside a table ends at the table's budget.
    driver.write_descriptor_at(table, 0, RawDescriptor::new(DATA, 16, NEXT, 1));
    driver.write_descriptor_at(table, 1, RawDescriptor::new(DATA, 16, NEXT, 0));
    driver.write_descriptor(3, RawDescriptor::new(table.0, 32, INDIRECT, 0));
    driver.publish(3);
    assert_bad_chain(queue.pop(&frames), ChainError::TooLong);
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_serves_a_linux_sized_chain_on_a_256_entry_queue() {
    // What Linux's virtio-blk sends with SEG_MAX 254 on QueueNumMax 256: one
    // queue descriptor pointing to a table of header + 254 data + status.
    let frames = GuestFrames::new(64 << 20, Backing::Anonymous).unwrap();
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    queue.set_indirect(true);
    let mut driver = MockDriver::new(&frames, MAX_QUEUE_SIZE, RINGS);
    driver.configure(&mut queue);
    let mut table = vec![(DATA, 16, false)];
    table.extend((0..254).map(|i| (DATA + 0x1000 + i * 0x1000, 4096, true)));
    table.push((DATA + 0x10_0000, 1, true));
    assert_eq!(table.len(), usize::from(MAX_QUEUE_SIZE));
    let head = driver.add_indirect_chain(GuestAddress(DATA + 0x20_0000), &table);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.head(), head);
    assert_eq!((chain.readable().len(), chain.writable().len()), (1, 255));
    assert_eq!(chain.writable_len(), 254 * 4096 + 1);
    queue.add_used(&frames, chain, 254 * 4096 + 1).unwrap();
    assert_eq!(driver.used_elem(0), (u32::from(head), 254 * 4096 + 1));
}

#[test]
fn queue_refuses_a_chain_over_the_device_limit_before_pinning() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    queue.set_chain_limit(4096 + 17);
    let rings = frames.table().pins();
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8192, true)]);
    assert_bad_chain(
        queue.pop(&frames),
        ChainError::TooLarge {
            len: 8208,
            limit: 4113,
        },
    );
    assert_eq!(frames.table().pins(), rings, "nothing pinned");
    assert_eq!(driver.used_elem(0), (0, 0), "returned with length 0");
    // Exactly at the limit is fine.
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 4097, true)]);
    let chain = serve_one(&mut queue, &frames);
    queue.add_used(&frames, chain, 1).unwrap();
    queue.reset();
    assert_eq!(queue.chain_limit(), 4113, "kept across a reset");
}

#[test]
fn queue_chain_from_before_a_reset_cannot_complete_a_new_request() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8, true)]);
    let old = serve_one(&mut queue, &frames);
    assert_eq!(old.head(), 0);
    // The driver resets the device and sets the queue up again; its first
    // new request reuses head 0 and is in flight when the old chain comes back.
    queue.reset();
    let mut driver = MockDriver::new(&frames, SIZE, RINGS);
    driver.configure(&mut queue);
    let new = {
        driver.add_chain(&[(DATA, 16, false), (DATA + 0x2000, 8, true)]);
        serve_one(&mut queue, &frames)
    };
    assert_eq!((new.head(), queue.in_flight()), (0, 1));
    assert!(old.generation() != new.generation());
    match queue.add_used(&frames, old, 8) {
        Err(e @ QueueError::StaleChain { head: 0 }) => assert!(!e.is_fatal()),
        other => panic!("expected StaleChain, got {other:?}"),
    }
    assert_eq!(driver.used_idx(), 0, "nothing published for the old chain");
    assert_eq!(queue.in_flight(), 1, "the new request is still in flight");
    queue.add_used(&frames, new, 8).unwrap();
    assert_eq!(driver.used_elem(0), (0, 8));
    queue.release_parked();
    assert_eq!(frames.table().pins(), 3, "only the rings stay pinned");
}

// §2: indices and indirect tables.
#[test]
fn queue_rejects_next_beyond_queue_size() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.write_descriptor(0, RawDescriptor::new(DATA, 16, NEXT, SIZE));
    driver.publish(0);
    assert_bad_chain(queue.pop(&frames), ChainError::DescriptorIndex(SIZE));
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_rejects_nested_and_malformed_indirect_tables() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    let table = GuestAddress(DATA + 0x10000);
    // Not negotiated.
    driver.add_indirect_chain(table, &[(DATA, 16, false)]);
    assert_bad_chain(queue.pop(&frames), ChainError::IndirectNotNegotiated);
    queue.set_indirect(true);
    // An indirect descriptor inside the table.
    driver.write_descriptor_at(
        table,
        0,
        RawDescriptor::new(table.0 + 0x100, 16, INDIRECT, 0),
    );
    driver.write_descriptor(5, RawDescriptor::new(table.0, 16, INDIRECT, 0));
    driver.publish(5);
    assert_bad_chain(queue.pop(&frames), ChainError::NestedIndirect);
    // Lengths: zero and not a multiple of 16.
    for len in [0, 24] {
        driver.write_descriptor(5, RawDescriptor::new(table.0, len, INDIRECT, 0));
        driver.publish(5);
        assert_bad_chain(queue.pop(&frames), ChainError::IndirectLength(len));
    }
    // INDIRECT together with NEXT.
    driver.write_descriptor(5, RawDescriptor::new(table.0, 16, INDIRECT | NEXT, 6));
    driver.publish(5);
    assert_bad_chain(queue.pop(&frames), ChainError::IndirectWithNext);
    // `next` inside the table beyond its length.
    driver.write_descriptor_at(table, 0, RawDescriptor::new(DATA, 16, NEXT, 1));
    driver.write_descriptor(5, RawDescriptor::new(table.0, 16, INDIRECT, 0));
    driver.publish(5);
    assert_bad_chain(queue.pop(&frames), ChainError::DescriptorIndex(1));
    // The table itself outside RAM.
    driver.write_descriptor(5, RawDescriptor::new(1 << 40, 16, INDIRECT, 0));
    driver.publish(5);
    assert_bad_chain(
        queue.pop(&frames),
        ChainError::Buffer {
            addr: 1 << 40,
            len: 16,
        },
    );
    // A valid indirect chain works.
    let head = driver.add_indirect_chain(table, &[(DATA, 16, false), (DATA + 0x1000, 1, true)]);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(
        (chain.head(), chain.readable().len(), chain.writable().len()),
        (head, 1, 1)
    );
    queue.add_used(&frames, chain, 1).unwrap();
    assert_still_serves(&mut queue, &mut driver, &frames);
}

// §3: avail.idx running ahead.
#[test]
fn queue_treats_avail_index_beyond_queue_size_as_corrupt() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.set_avail_idx(SIZE + 1);
    let err = queue.pop(&frames).unwrap_err();
    assert!(
        matches!(err, QueueError::AvailIndex { pending, .. } if pending == SIZE + 1),
        "{err:?}"
    );
    assert!(err.is_fatal());
    // The transport resets the device; a fresh queue works.
    queue.reset();
    let mut driver = MockDriver::new(&frames, SIZE, GuestAddress(RINGS.0 + 0x1_0000));
    driver.configure(&mut queue);
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_treats_head_beyond_queue_size_as_corrupt() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.set_avail_entry(0, SIZE);
    driver.set_avail_idx(1);
    let err = queue.pop(&frames).unwrap_err();
    assert!(
        matches!(err, QueueError::HeadIndex(SIZE)) && err.is_fatal(),
        "{err:?}"
    );
}

// §4: the same head twice while in flight.
#[test]
fn queue_treats_head_offered_twice_in_flight_as_corrupt() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    let head = driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8, true)]);
    let chain = serve_one(&mut queue, &frames);
    driver.publish(head);
    let err = queue.pop(&frames).unwrap_err();
    assert!(
        matches!(err, QueueError::HeadInFlight(h) if h == head) && err.is_fatal(),
        "{err:?}"
    );
    // Completing the first one is still fine, and the head may then come again.
    queue.add_used(&frames, chain, 0).unwrap();
}

#[test]
fn queue_add_used_rejects_chain_not_in_flight_after_reset() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.add_chain(&[(DATA, 16, false)]);
    let chain = serve_one(&mut queue, &frames);
    queue.reset();
    driver.configure(&mut queue);
    assert!(queue.add_used(&frames, chain, 0).is_err());
    assert_eq!(driver.used_idx(), 0, "nothing published for a stale chain");
}

// §5 and §6: buffers outside RAM, wrapping, straddling the hole, huge lengths.
#[test]
fn queue_rejects_buffers_outside_ram_wrapping_or_across_the_hole() {
    let frames = GuestFrames::new(3 << 30, Backing::Anonymous).unwrap();
    let (mut queue, mut driver) = setup(&frames);
    let bad: [(u64, u32); 5] = [
        (3 << 30, 16),            // in the MMIO hole
        ((2 << 30) - 8, 16),      // straddles RAM and the hole
        (u64::MAX - 7, 16),       // wraps
        (DATA, u32::MAX),         // 4 GiB from low RAM runs into the hole
        ((5 << 30) - 4096, 8192), // past the end of high RAM
    ];
    for (addr, len) in bad {
        driver.add_chain(&[(addr, len, false)]);
        assert_bad_chain(queue.pop(&frames), ChainError::Buffer { addr, len });
    }
    // A writable buffer outside RAM after a valid readable one.
    driver.add_chain(&[(DATA, 16, false), (1 << 45, 16, true)]);
    assert_bad_chain(
        queue.pop(&frames),
        ChainError::Buffer {
            addr: 1 << 45,
            len: 16,
        },
    );
    // High RAM itself is fine.
    driver.add_chain(&[(4 << 30, 4096, true)]);
    let chain = serve_one(&mut queue, &frames);
    queue.add_used(&frames, chain, 0).unwrap();
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_accepts_chains_totalling_more_than_4gib_without_allocating_for_them() {
    // Lengths are summed in u64; nothing is allocated per byte. Chains of big
    // buffers over the same RAM are valid descriptors (the device bounds what
    // it does with them).
    let frames = GuestFrames::new(2 << 30, Backing::Anonymous).unwrap();
    let (mut queue, mut driver) = setup(&frames);
    let big = (1u32 << 31) - (64 << 20);
    driver.add_chain(&[
        (64 << 20, big, true),
        (64 << 20, big, true),
        (64 << 20, big, true),
    ]);
    let chain = serve_one(&mut queue, &frames);
    assert_eq!(chain.writable_len(), 3 * u64::from(big));
    queue.add_used(&frames, chain, u32::MAX).unwrap();
    assert_eq!(driver.used_elem(0).1, u32::MAX, "capped at u32");
}

// §7: direction.
#[test]
fn queue_rejects_readable_after_writable() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    driver.add_chain(&[(DATA, 16, true), (DATA + 0x1000, 16, false)]);
    assert_bad_chain(queue.pop(&frames), ChainError::ReadableAfterWritable);
    assert_still_serves(&mut queue, &mut driver, &frames);
}

#[test]
fn queue_writer_never_reaches_readable_buffers() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    frames
        .memory()
        .write_slice(&[0xaa; 32], GuestAddress(DATA))
        .unwrap();
    driver.add_chain(&[(DATA, 32, false), (DATA + 0x1000, 4, true)]);
    let chain = serve_one(&mut queue, &frames);
    let mut writer = chain.writer();
    assert!(
        writer.write_all(&frames, &[0; 8]).is_err(),
        "only 4 writable bytes"
    );
    writer.write_all(&frames, &[0; 4]).unwrap();
    let mut readable = [0u8; 32];
    frames
        .memory()
        .read_slice(&mut readable, GuestAddress(DATA))
        .unwrap();
    assert_eq!(readable, [0xaa; 32]);
    queue.add_used(&frames, chain, 4).unwrap();
}

// §8: queue setup.
#[test]
fn queue_rejects_invalid_sizes() {
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    for size in [0, 3, 100, MAX_QUEUE_SIZE * 2, u16::MAX] {
        assert!(matches!(queue.try_set_size(size), Err(QueueError::InvalidSize(s)) if s == size));
    }
    assert_eq!(queue.size(), MAX_QUEUE_SIZE);
    queue.try_set_size(1).unwrap();
    assert_eq!(Queue::new(1000).max_size(), MAX_QUEUE_SIZE);
    assert_eq!(Queue::new(100).max_size(), 64);
}

#[test]
fn queue_activation_rejects_misaligned_or_non_ram_rings() {
    let frames = frames();
    let driver = MockDriver::new(&frames, SIZE, RINGS);
    let cases: [(u64, u64, u64, &str); 5] = [
        (
            RINGS.0 + 8,
            driver.avail_ring().0,
            driver.used_ring().0,
            "descriptor table",
        ),
        (
            RINGS.0,
            driver.avail_ring().0 + 1,
            driver.used_ring().0,
            "available ring",
        ),
        (
            RINGS.0,
            driver.avail_ring().0,
            driver.used_ring().0 + 2,
            "used ring",
        ),
        (
            1 << 40,
            driver.avail_ring().0,
            driver.used_ring().0,
            "descriptor table",
        ),
        (RINGS.0, driver.avail_ring().0, (32 << 20) - 8, "used ring"),
    ];
    for (desc, avail, used, ring) in cases {
        let mut queue = Queue::new(MAX_QUEUE_SIZE);
        queue.try_set_size(SIZE).unwrap();
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        assert!(matches!(queue.activate(&frames), Err(QueueError::NotReady)));
        queue.set_ready(true);
        let err = queue.activate(&frames).unwrap_err();
        let named = match &err {
            QueueError::Misaligned { ring, .. } | QueueError::RingNotRam { ring, .. } => *ring,
            other => panic!("{other:?}"),
        };
        assert_eq!(named, ring);
        assert!(!queue.is_active());
        assert!(matches!(queue.pop(&frames), Err(QueueError::NotReady)));
    }
}

#[test]
fn queue_indices_wrap_at_65536() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    // Run the indices across the u16 wrap with one chain at a time.
    for round in 0..(u32::from(u16::MAX) + 40) {
        if round % 4096 == 0 || round > u32::from(u16::MAX) - 40 {
            assert_still_serves(&mut queue, &mut driver, &frames);
        } else {
            driver.add_chain(&[(DATA, 1, true)]);
            let chain = serve_one(&mut queue, &frames);
            queue.add_used(&frames, chain, 1).unwrap();
        }
    }
    assert!(driver.used_idx() < 100, "wrapped");
}

// Notifications (§2.7.10).
#[test]
fn queue_without_event_idx_notifies_unless_no_interrupt_is_set() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    assert!(!queue.needs_notification(&frames).unwrap() || driver.used_idx() == 0);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert!(queue.needs_notification(&frames).unwrap());
    assert!(
        !queue.needs_notification(&frames).unwrap(),
        "nothing new since"
    );
    driver.set_avail_flags(1);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert!(!queue.needs_notification(&frames).unwrap());
}

#[test]
fn queue_with_event_idx_notifies_when_used_event_is_crossed() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    queue.set_event_idx(true);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert!(
        queue.needs_notification(&frames).unwrap(),
        "first notification"
    );
    // The driver wants an interrupt only once used.idx passes 3.
    driver.set_used_event(3);
    assert_still_serves(&mut queue, &mut driver, &frames); // used.idx 2
    assert!(!queue.needs_notification(&frames).unwrap());
    assert_still_serves(&mut queue, &mut driver, &frames); // used.idx 3
    assert!(!queue.needs_notification(&frames).unwrap());
    assert_still_serves(&mut queue, &mut driver, &frames); // used.idx 4: crossed 3
    assert!(queue.needs_notification(&frames).unwrap());
}

#[test]
fn queue_with_event_idx_publishes_avail_event_when_out_of_work() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    queue.set_event_idx(true);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert!(queue.pop(&frames).unwrap().is_none());
    assert_eq!(driver.avail_event(), 2, "notify me at the next entry");
}

#[test]
fn queue_with_event_idx_asks_for_a_notification_when_a_batch_ends_the_ring() {
    // A device that stops at its budget just as it took the last chain asks
    // `has_available` rather than popping once more: that must arm
    // avail_event too, or the driver's next chain never notifies (a driver
    // kicks only when its new index passes avail_event, §2.7.10).
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    queue.set_event_idx(true);
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert!(queue.pop(&frames).unwrap().is_none());
    assert_eq!(driver.avail_event(), 1);
    for _ in 0..3 {
        let chain = {
            driver.add_chain(&[(DATA, 16, false)]);
            serve_one(&mut queue, &frames)
        };
        queue.add_used(&frames, chain, 0).unwrap();
    }
    assert!(!queue.has_available(&frames).unwrap());
    assert_eq!(driver.avail_event(), 4, "notify me at the next entry");
    driver.add_chain(&[(DATA, 16, false)]);
    assert!(queue.has_available(&frames).unwrap());
}

#[test]
fn queue_marks_the_used_ring_dirty_once_when_the_batch_ends() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    let used_frame = GuestAddress(driver.used_ring().0 & !0xfff);
    let dirty_used = |frames: &GuestFrames| {
        frames
            .take_dirty()
            .iter()
            .any(|&(a, len)| a <= used_frame && used_frame.0 < a.0 + len)
    };
    frames.take_dirty();
    assert_still_serves(&mut queue, &mut driver, &frames);
    assert_still_serves(&mut queue, &mut driver, &frames);
    queue.end_batch(&frames);
    assert!(
        dirty_used(&frames),
        "used ring marked at the end of the batch"
    );
    queue.end_batch(&frames);
    assert!(!dirty_used(&frames), "and not again without new entries");
}

#[test]
fn queue_state_saved_between_chains_resumes_in_a_new_queue() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    for _ in 0..3 {
        assert_still_serves(&mut queue, &mut driver, &frames);
    }
    // A chain offered but not taken when the state is saved is taken after.
    let head = driver.add_chain(&[(DATA, 16, false), (DATA + 0x1000, 8, true)]);
    let state = queue.state().expect("nothing in flight");
    assert_eq!(
        (state.next_avail, state.next_used, state.active),
        (3, 3, true)
    );
    let mut restored = Queue::new(MAX_QUEUE_SIZE);
    restored.restore(&state, &frames).unwrap();
    assert_eq!(restored.state(), Some(state));
    let chain = serve_one(&mut restored, &frames);
    assert_eq!(chain.head(), head);
    restored.add_used(&frames, chain, 8).unwrap();
    assert_eq!(driver.used_idx(), 4);
    assert_still_serves(&mut restored, &mut driver, &frames);
}

#[test]
fn queue_state_of_a_linux_shaped_queue_resumes_past_the_wrap_with_a_full_indirect_table() {
    // Linux's shapes: 256 entries, indices run past a wrap of the ring,
    // and the chain waiting at the snapshot is one indirect table of
    // seg_max + 2 descriptors (header, 126 data segments, status).
    let frames = frames();
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    let mut driver = MockDriver::new(&frames, 256, RINGS);
    driver.configure(&mut queue);
    queue.set_indirect(true);
    for _ in 0..300 {
        assert_still_serves(&mut queue, &mut driver, &frames);
    }
    let mut table = vec![(DATA, 16, false)];
    table.extend((0..126).map(|i| (DATA + 0x1000 + i * 0x1000, 0x1000, false)));
    table.push((DATA + 0x10_0000, 1, true));
    let head = driver.add_indirect_chain(GuestAddress(DATA + 0x20_0000), &table);
    let state = queue.state().expect("nothing in flight");
    assert_eq!(
        (state.next_avail, state.size, state.indirect),
        (300, 256, true)
    );
    let mut restored = Queue::new(MAX_QUEUE_SIZE);
    restored.restore(&state, &frames).unwrap();
    let chain = serve_one(&mut restored, &frames);
    assert_eq!(chain.head(), head);
    assert_eq!((chain.readable().len(), chain.writable().len()), (127, 1));
    restored.add_used(&frames, chain, 1).unwrap();
    assert_eq!(driver.used_idx(), 301);
    assert_still_serves(&mut restored, &mut driver, &frames);
}

#[test]
fn queue_state_is_refused_with_chains_in_flight_until_they_are_given_back() {
    let frames = frames();
    let (mut queue, mut driver) = setup(&frames);
    let first = driver.add_chain(&[(DATA, 16, false)]);
    let second = driver.add_chain(&[(DATA + 0x1000, 16, false)]);
    let a = serve_one(&mut queue, &frames);
    let b = serve_one(&mut queue, &frames);
    assert_eq!(queue.state(), None);
    queue.unpop(b).unwrap();
    queue.unpop(a).unwrap();
    let state = queue.state().expect("given back");
    assert_eq!(state.next_avail, 0);
    assert_eq!(serve_one(&mut queue, &frames).head(), first);
    assert_eq!(serve_one(&mut queue, &frames).head(), second);
}

#[test]
fn queue_state_from_a_hostile_snapshot_is_checked_like_the_drivers_writes() {
    let frames = frames();
    let (queue, _driver) = setup(&frames);
    let good = queue.state().unwrap();
    let mut fresh = Queue::new(MAX_QUEUE_SIZE);
    for (state, expected) in [
        (
            QueueState {
                size: 3,
                ..good.clone()
            },
            "size",
        ),
        (
            QueueState {
                size: 512,
                ..good.clone()
            },
            "size",
        ),
        (
            QueueState {
                used_ring: 64 << 20,
                ..good.clone()
            },
            "RAM",
        ),
        (
            QueueState {
                desc_table: good.desc_table + 8,
                ..good.clone()
            },
            "misaligned",
        ),
        (
            QueueState {
                ready: false,
                ..good.clone()
            },
            "ready",
        ),
    ] {
        let e = fresh.restore(&state, &frames).unwrap_err();
        assert!(e.to_string().contains(expected), "{e}");
        assert!(!fresh.is_active());
    }
    fresh.restore(&good, &frames).unwrap();
    assert!(fresh.is_active());
}
