//! A queue's state for snapshots (virtio 1.2 §2.7, §4.2.2): the registers
//! the driver wrote and the device's ring positions. Saved only with no
//! chain in flight (the device returned or un-popped everything first);
//! restored into a fresh queue, which re-validates and re-pins the rings
//! exactly as at DRIVER_OK, so a hostile snapshot cannot place a ring
//! outside guest RAM.

use std::num::Wrapping;

use memory::GuestFrames;
use vm_memory::GuestAddress;

use super::{DescriptorChain, Queue, QueueError};

/// What a [`Queue`] needs to resume where it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc_table: u64,
    /// QueueDriver (available ring).
    pub avail_ring: u64,
    /// QueueDevice (used ring).
    pub used_ring: u64,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device writes.
    pub next_used: u16,
    /// The used index last reported to the driver by an interrupt.
    pub signalled_used: Option<u16>,
    /// Validated and running.
    pub active: bool,
}

impl Queue {
    /// The state to save; `None` while chains are in flight.
    pub fn state(&self) -> Option<QueueState> {
        if self.in_flight.1 != 0 {
            return None;
        }
        Some(QueueState {
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table.0,
            avail_ring: self.avail_ring.0,
            used_ring: self.used_ring.0,
            event_idx: self.event_idx,
            indirect: self.indirect,
            next_avail: self.next_avail.0,
            next_used: self.next_used.0,
            signalled_used: self.signalled_used.map(|w| w.0),
            active: self.active,
        })
    }

    /// Restores `state` into this queue (fresh: nothing in flight), checking
    /// it as the transport checks the driver's writes; an active queue is
    /// activated again (ring alignment and placement in RAM, pins).
    pub fn restore(&mut self, state: &QueueState, frames: &GuestFrames) -> Result<(), QueueError> {
        self.reset();
        self.try_set_size(state.size)?;
        self.desc_table = GuestAddress(state.desc_table);
        self.avail_ring = GuestAddress(state.avail_ring);
        self.used_ring = GuestAddress(state.used_ring);
        self.event_idx = state.event_idx;
        self.indirect = state.indirect;
        self.next_avail = Wrapping(state.next_avail);
        self.next_used = Wrapping(state.next_used);
        self.signalled_used = state.signalled_used.map(Wrapping);
        self.ready = state.ready;
        if state.active {
            self.activate(frames)?;
        }
        Ok(())
    }

    /// Gives back `chain`, the last chain popped and not yet used: the
    /// device will pop it again (for a snapshot of a device holding chains
    /// it has not filled). Chains must be given back newest first.
    pub fn unpop(&mut self, chain: DescriptorChain) -> Result<(), QueueError> {
        let head = chain.head();
        if chain.generation() != self.generation {
            self.recycle(chain);
            return Err(QueueError::StaleChain { head });
        }
        if !self.in_flight.remove(head) {
            return Err(QueueError::HeadIndex(head));
        }
        self.next_avail -= Wrapping(1);
        self.recycle(chain);
        Ok(())
    }
}
