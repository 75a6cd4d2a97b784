//! Target `queue_differential`: our split virtqueue against rust-vmm's
//! `virtio-queue` (0.18) on the same rings in the same memory.
//!
//! Input: as for [`crate::virtqueue`] (size, flags, ring addresses, used
//! length, memory image). Both queues are set up alike; each step pops one
//! chain from each and returns it at once.
//!
//! Agreement required: whenever our queue accepts a chain, `virtio-queue`
//! yields the same head and exactly the same descriptors (address, length,
//! direction; indirect tables followed), ending normally. Where our queue
//! refuses a chain that `virtio-queue` yields whole, the reason must be one
//! of our documented, stricter policies:
//!
//! - a buffer not in guest RAM (or across a hole): `virtio-queue` checks
//!   memory only when the buffer is accessed, we at pop time, so a request is
//!   never half-executed;
//! - a device-readable buffer after a device-writable one (§2.7.4.2 MUST);
//! - an indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC negotiated,
//!   or with NEXT set as well (§2.7.5.3.1 MUST NOT);
//! - an indirect table of more entries than the queue size (it accepts up
//!   to 65535; §2.7.5.3.1 bounds a chain by the queue size), or of length 0
//!   (it yields an empty chain).
//!
//! The descriptor budgets agree: queue-size descriptors in the descriptor
//! table, the indirect descriptor included, and the table's length inside an
//! indirect table. (Our chain-byte limit is not set here.)
//!
//! Not compared: an available ring at guest address 0, which `virtio-queue`
//! treats as a queue that was never set up (it serves nothing) and we accept.
//!
//! Our fatal errors (avail index too far ahead, head out of range, a head
//! still in flight) end the run: the device would enter NEEDS_RESET, and
//! `virtio-queue` has no equivalent state to compare.

use devices::virtio::queue::{ChainError, MAX_QUEUE_SIZE};
use devices::virtio::{Queue, QueueError};
use virtio_queue::QueueT;

use crate::common::{GUEST_RAM, Input, guest};

const MAX_STEPS: usize = 2 * MAX_QUEUE_SIZE as usize;

/// A descriptor as both sides expose it.
type Desc = (u64, u32, bool);

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    let (event_idx, indirect) = (flags & 1 != 0, flags & 2 != 0);
    let desc = u64::from(input.u16()) * 4;
    let avail = u64::from(input.u16()) * 4;
    let used = u64::from(input.u16()) * 4;
    let used_len = input.u32();
    let frames = guest(GUEST_RAM, input.rest());
    let mem = frames.memory();

    let mut ours = Queue::new(MAX_QUEUE_SIZE);
    let _ = ours.try_set_size(size);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(desc);
    ours.set_desc_table_address(l, h);
    let (l, h) = split(avail);
    ours.set_avail_ring_address(l, h);
    let (l, h) = split(used);
    ours.set_used_ring_address(l, h);
    ours.set_event_idx(event_idx);
    ours.set_indirect(indirect);
    ours.set_ready(true);
    // virtio-queue takes an available ring at address 0 for "not set up"
    // and serves nothing from it; ours accepts any RAM address.
    if ours.activate(&frames).is_err() || avail == 0 {
        return;
    }
    let Ok(mut theirs) = virtio_queue::Queue::new(MAX_QUEUE_SIZE) else {
        return;
    };
    theirs.set_size(size);
    theirs.set_desc_table_address(l_h(desc).0, l_h(desc).1);
    theirs.set_avail_ring_address(l_h(avail).0, l_h(avail).1);
    theirs.set_used_ring_address(l_h(used).0, l_h(used).1);
    theirs.set_event_idx(event_idx);
    theirs.set_ready(true);

    for _ in 0..MAX_STEPS {
        // Theirs reads the whole chain first: ours may write the used ring
        // when it refuses a chain, and the rings may overlap.
        let theirs_chain = theirs.pop_descriptor_chain(mem).map(|chain| {
            let head = chain.head_index();
            (
                head,
                chain.collect::<Vec<virtio_queue::desc::split::Descriptor>>(),
            )
        });
        let mine = ours.pop(&frames);
        let Some((head, descs)) = theirs_chain else {
            assert!(
                !matches!(mine, Ok(Some(_))),
                "we took a chain where virtio-queue found none"
            );
            return;
        };
        let whole = descs.last().is_some_and(|d| !d.has_next());
        let theirs_list: Vec<Desc> = descs
            .iter()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        match mine {
            Ok(Some(chain)) => {
                assert_eq!(chain.head(), head, "heads differ");
                assert!(
                    whole,
                    "virtio-queue stopped in a chain we accepted: {theirs_list:?}"
                );
                let mut our_list: Vec<Desc> = chain
                    .readable()
                    .iter()
                    .map(|b| (b.addr().0, b.len(), false))
                    .collect();
                our_list.extend(chain.writable().iter().map(|b| (b.addr().0, b.len(), true)));
                assert_eq!(our_list, theirs_list, "the chains at head {head} differ");
                let len = used_len.min(chain.writable_len() as u32);
                if ours.add_used(&frames, chain, len).is_err() {
                    return;
                }
                let _ = theirs.add_used(mem, head, len);
            }
            Ok(None) => panic!("virtio-queue found chain {head}, we found none"),
            Err(QueueError::BadChain { head: bad, source }) => {
                assert_eq!(bad, head, "heads differ");
                if whole {
                    assert!(
                        stricter(&source, indirect, size),
                        "we refused chain {head} ({source}) that virtio-queue accepts whole: {theirs_list:?}"
                    );
                }
                // Ours returned it with length 0 already.
                let _ = theirs.add_used(mem, head, 0);
            }
            Err(_) => return,
        }
    }
}

fn l_h(a: u64) -> (Option<u32>, Option<u32>) {
    (Some(a as u32), Some((a >> 32) as u32))
}

/// Whether refusing a chain that `virtio-queue` accepts whole is one of our
/// documented policies (module docs).
fn stricter(why: &ChainError, indirect_negotiated: bool, size: u16) -> bool {
    match why {
        ChainError::Buffer { .. }
        | ChainError::ReadableAfterWritable
        | ChainError::IndirectWithNext
        | ChainError::IndirectLength(0) => true,
        ChainError::IndirectLength(len) => len % 16 == 0 && len / 16 > u32::from(size),
        ChainError::IndirectNotNegotiated => !indirect_negotiated,
        _ => false,
    }
}
