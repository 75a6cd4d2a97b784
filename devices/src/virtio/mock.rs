//! A driver-side mock of a split virtqueue (virtio 1.2 §2.7) for tests and
//! fuzz targets: it writes descriptors and the available ring into guest
//! memory and reads the used ring back, as a guest driver would, so device
//! code runs without KVM. It is deliberately permissive: tests use it to write
//! malformed tables and rings too.

use std::sync::atomic::Ordering;

use memory::GuestFrames;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::queue::Queue;

/// Descriptor flag: another descriptor follows.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: device-writable.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect table.
pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A raw descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Flags (`NEXT`, `WRITE`, `INDIRECT`).
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

impl RawDescriptor {
    /// A descriptor for `len` bytes at `addr`.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        RawDescriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    fn bytes(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// The driver's side of one split virtqueue in guest memory.
#[derive(Debug)]
pub struct MockDriver<'a> {
    frames: &'a GuestFrames,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    avail_idx: u16,
    next_desc: u16,
}

impl<'a> MockDriver<'a> {
    /// Rings for a `size`-entry queue laid out from `base` (16-byte aligned):
    /// descriptor table, available ring, then the used ring 4-byte aligned.
    pub fn new(frames: &'a GuestFrames, size: u16, base: GuestAddress) -> Self {
        let desc = base;
        let avail = GuestAddress(desc.0 + 16 * u64::from(size));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
        MockDriver {
            frames,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Descriptor table address.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc
    }
    /// Available ring address.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail
    }
    /// Used ring address.
    pub fn used_ring(&self) -> GuestAddress {
        self.used
    }
    /// First address after the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used.0 + 6 + 8 * u64::from(self.size))
    }

    /// Programs `queue` with this layout, sets it ready and activates it.
    pub fn configure(&self, queue: &mut Queue) {
        queue.try_set_size(self.size).expect("valid mock size");
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (l, h) = split(self.desc);
        queue.set_desc_table_address(l, h);
        let (l, h) = split(self.avail);
        queue.set_avail_ring_address(l, h);
        let (l, h) = split(self.used);
        queue.set_used_ring_address(l, h);
        queue.set_ready(true);
        queue.activate(self.frames).expect("mock rings are valid");
    }

    /// Writes descriptor `index` of the table at `table` (the queue's own
    /// table or an indirect one).
    pub fn write_descriptor_at(&self, table: GuestAddress, index: u16, desc: RawDescriptor) {
        let addr = GuestAddress(table.0 + 16 * u64::from(index));
        self.frames
            .memory()
            .write_slice(&desc.bytes(), addr)
            .expect("descriptor in RAM");
    }

    /// Writes descriptor `index` of the queue's table.
    pub fn write_descriptor(&self, index: u16, desc: RawDescriptor) {
        self.write_descriptor_at(self.desc, index, desc);
    }

    /// Puts `head` in the next available slot and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.frames
            .memory()
            .write_obj(head, GuestAddress(self.avail.0 + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes `avail.idx` directly (also for corrupting it).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.frames
            .memory()
            .store(idx, GuestAddress(self.avail.0 + 2), Ordering::Release)
            .expect("avail ring");
    }

    /// Writes `avail.ring[slot]` directly.
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        let addr = GuestAddress(self.avail.0 + 4 + 2 * u64::from(slot));
        self.frames
            .memory()
            .write_obj(head, addr)
            .expect("avail ring");
    }

    /// Writes `avail.flags`.
    pub fn set_avail_flags(&self, flags: u16) {
        self.frames
            .memory()
            .write_obj(flags, self.avail)
            .expect("avail ring");
    }

    /// Writes `used_event` (the last field of the available ring).
    pub fn set_used_event(&self, value: u16) {
        let addr = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size));
        self.frames
            .memory()
            .write_obj(value, addr)
            .expect("avail ring");
    }

    /// Reads `avail_event` (the last field of the used ring).
    pub fn avail_event(&self) -> u16 {
        let addr = GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size));
        self.frames.memory().read_obj(addr).expect("used ring")
    }

    /// Builds a chain from `buffers` (`(addr, len, device_writable)`) in
    /// consecutive free descriptors, publishes it and returns its head.
    pub fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.write_chain(buffers);
        self.publish(head);
        head
    }

    /// Writes a chain like [`add_chain`](Self::add_chain) without publishing it.
    pub fn write_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == buffers.len();
            let mut flags = if writable { WRITE } else { 0 };
            if !last {
                flags |= NEXT;
            }
            let next = (index + 1) % self.size;
            self.write_descriptor(
                index,
                RawDescriptor::new(addr, len, flags, if last { 0 } else { next }),
            );
        }
        self.next_desc = (self.next_desc + buffers.len() as u16) % self.size;
        head
    }

    /// Writes `buffers` as an indirect table at `table`, points one queue
    /// descriptor at it, publishes it and returns the head.
    pub fn add_indirect_chain(&mut self, table: GuestAddress, buffers: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let mut flags = if writable { WRITE } else { 0 };
            if !last {
                flags |= NEXT;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            self.write_descriptor_at(table, i as u16, RawDescriptor::new(addr, len, flags, next));
        }
        let head = self.next_desc;
        let len = 16 * buffers.len() as u32;
        self.write_descriptor(head, RawDescriptor::new(table.0, len, INDIRECT, 0));
        self.next_desc = (self.next_desc + 1) % self.size;
        self.publish(head);
        head
    }

    /// `used.idx`.
    pub fn used_idx(&self) -> u16 {
        self.frames
            .memory()
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .expect("used ring")
    }

    /// `used.ring[slot]` as `(id, len)`.
    pub fn used_elem(&self, slot: u16) -> (u32, u32) {
        let addr = GuestAddress(self.used.0 + 4 + 8 * u64::from(slot % self.size));
        let mem = self.frames.memory();
        (
            mem.read_obj(addr).expect("used ring"),
            mem.read_obj(GuestAddress(addr.0 + 4)).expect("used ring"),
        )
    }
}
