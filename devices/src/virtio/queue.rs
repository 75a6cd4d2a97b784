//! Split virtqueue, device side (virtio 1.2 §2.7).
//!
//! The driver owns the descriptor table and the available ring; the device owns
//! the used ring. Everything the device reads is hostile input:
//! - queue setup is validated when the queue is made ready ([`Queue::activate`]):
//!   size a power of two within the maximum, rings aligned (§2.7: 16, 2, 4) and
//!   each inside one contiguous piece of RAM; the rings then stay DMA-pinned
//!   while the queue is active;
//! - [`Queue::pop`] treats `avail.idx` running more than the queue size ahead, a
//!   head index beyond the queue, or a head that is still in flight as a corrupt
//!   queue (a fatal [`QueueError`]: the device needs a reset);
//! - a malformed chain (loops, `next` out of range, nested indirect tables,
//!   INDIRECT with NEXT, a bad indirect length, readable after writable, a
//!   buffer outside RAM, wrapping or straddling the MMIO hole, more bytes than
//!   the device could ever use) is returned to the driver at once with used
//!   length 0 and reported as [`QueueError::BadChain`];
//! - walking a chain has budgets, so every walk ends: queue-size descriptors
//!   in the descriptor table (the one that points to an indirect table
//!   included), and, inside an indirect table, its own length, which may not
//!   exceed the queue size (as QEMU and virtio-queue count; Linux sends tables
//!   of `seg_max + 2` entries on a queue of that size).
//!
//! A valid chain becomes a [`DescriptorChain`]: device-readable buffers followed
//! by device-writable ones. Every buffer is checked to be guest RAM and the
//! chain's total length against the device's limit ([`Queue::set_chain_limit`])
//! *before* anything is pinned; then each buffer is pinned (one reusable
//! `memory::PinSet` per chain: at most one atomic per buffer whatever its
//! length, none for a buffer in the 1 GiB section of the one before) until
//! the chain is handed back through [`Queue::add_used`]. A returned chain's
//! set keeps its last section pinned for the next chain of the batch
//! (`PinSet::park`); [`Queue::release_parked`] drops those when the driver
//! has offered nothing more, and [`Queue::end_batch`] when the transport ends
//! a batch, so between batches only the rings and chains still in flight are
//! pinned. The two kinds are different types: only [`WritableBuffer`]s can be
//! written, through a [`Writer`], which also marks the frames it writes
//! dirty. The used ring is marked dirty once per batch, by `end_batch`, not
//! per entry: a reader of the dirty log still sees every write once the
//! batch has ended (a snapshot quiesces devices first; an iterative reader
//! finds it in its next pass).
//!
//! A chain carries the queue's generation, which a reset advances: a chain
//! from before a reset can never complete a request of the queue after it
//! ([`QueueError::StaleChain`]), even if its head number is in flight again.
//!
//! Notifications: `VIRTIO_F_EVENT_IDX` (§2.7.10) in both directions — the device
//! publishes `avail_event` when it runs out of work, and [`Queue::needs_notification`]
//! honours `used_event` — or, without it, `VIRTQ_AVAIL_F_NO_INTERRUPT`.
//! Memory ordering follows §2.7.13: an acquire after reading `avail.idx`, a
//! release before publishing `used.idx`, a full fence before reading the
//! driver's event index.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering, fence};

use memory::{GuestFrames, PinGuard};

use super::chain::ChainLists;
pub use super::chain::{
    DescriptorChain, ReadableBuffer, Reader, ShortChain, WritableBuffer, Writer,
};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use vm_memory::{
    AtomicInteger, Bytes, GuestAddress, GuestMemoryError, VolatileMemory, VolatileSlice,
};

/// Largest queue size minivmm offers (QueueNumMax).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Bytes per descriptor.
const DESC_SIZE: u64 = 16;
/// Emptied buffer lists kept for reuse.
const SPARE_LISTS: usize = 32;
/// Words in the in-flight bitmap.
const IN_FLIGHT_WORDS: usize = MAX_QUEUE_SIZE as usize / 64;

/// Why a single chain was refused. The chain has already been returned to the
/// driver with used length 0; the queue keeps working.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// `next` (or an indirect index) beyond the table it indexes.
    #[error("Descriptor index {0} out of range")]
    DescriptorIndex(u16),
    /// More descriptors than the queue size: a loop or an oversized chain.
    #[error("Chain longer than the queue size")]
    TooLong,
    /// An indirect descriptor inside an indirect table.
    #[error("Nested indirect descriptor")]
    NestedIndirect,
    /// INDIRECT and NEXT on the same descriptor.
    #[error("Indirect descriptor with NEXT set")]
    IndirectWithNext,
    /// INDIRECT used without VIRTIO_RING_F_INDIRECT_DESC.
    #[error("Indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table length of zero, not a multiple of 16, or of more
    /// entries than the queue size.
    #[error("Indirect table length {0} is invalid")]
    IndirectLength(u32),
    /// A device-readable buffer after a device-writable one.
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer (or indirect table) that is not contiguous guest RAM.
    #[error("Buffer of {len} bytes at {addr:#x} is not guest RAM")]
    Buffer {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// More bytes in the buffers than the device can use in one request.
    #[error("Chain of {len} bytes exceeds the device's limit of {limit}")]
    TooLarge {
        /// Total bytes of the chain's buffers.
        len: u64,
        /// The device's limit.
        limit: u64,
    },
    /// Guest memory could not be read.
    #[error("Cannot read a descriptor")]
    Memory,
}

/// Errors of the queue itself.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Used before it was made ready and activated.
    #[error("Queue is not ready")]
    NotReady,
    /// Size 0, not a power of two, or above the maximum.
    #[error("Invalid queue size {0}")]
    InvalidSize(u16),
    /// A ring at an address the spec's alignment forbids.
    #[error("{ring} at {addr:#x} is misaligned")]
    Misaligned {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
    },
    /// A ring outside RAM, wrapping, or across a hole.
    #[error("{ring} at {addr:#x} is not guest RAM")]
    RingNotRam {
        /// Which ring.
        ring: &'static str,
        /// Its address.
        addr: u64,
    },
    /// `avail.idx` claims more entries than the queue holds.
    #[error("avail.idx {avail} is {pending} entries ahead of the device")]
    AvailIndex {
        /// The driver's index.
        avail: u16,
        /// Entries it claims pending.
        pending: u16,
    },
    /// A head index beyond the queue size in the available ring.
    #[error("Head index {0} out of range")]
    HeadIndex(u16),
    /// A head offered again while still in flight.
    #[error("Head {0} offered while still in flight")]
    HeadInFlight(u16),
    /// The rings could not be accessed.
    #[error("Cannot access the rings")]
    Memory(#[source] GuestMemoryError),
    /// One malformed chain, already returned with length 0. Not fatal.
    #[error("Malformed chain at head {head}")]
    BadChain {
        /// The chain's head.
        head: u16,
        /// What was wrong.
        #[source]
        source: ChainError,
    },
    /// A chain popped before the queue was reset: it is dropped, not
    /// returned. Not fatal.
    #[error("Chain at head {head} is from before a reset")]
    StaleChain {
        /// The chain's head.
        head: u16,
    },
}

impl QueueError {
    /// Whether the queue is unusable (the device must enter NEEDS_RESET).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            QueueError::BadChain { .. } | QueueError::StaleChain { .. }
        )
    }
}

/// One descriptor as read from guest memory.
#[derive(Clone, Copy, Debug)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Descriptor {
    fn has(&self, flag: u32) -> bool {
        u32::from(self.flags) & flag != 0
    }
}

/// `len` bytes of a ring at `addr` as a slice.
#[inline]
fn ring(
    frames: &GuestFrames,
    addr: GuestAddress,
    len: usize,
) -> Result<VolatileSlice<'_>, QueueError> {
    frames
        .slice(addr, len)
        .ok_or(QueueError::Memory(GuestMemoryError::InvalidGuestAddress(
            addr,
        )))
}

/// A ring access that failed (it cannot, within a validated ring slice).
fn ring_err(e: vm_memory::VolatileMemoryError) -> QueueError {
    QueueError::Memory(e.into())
}

/// The aligned ring word at `at` as a std atomic: its loads and stores are
/// inlined, where vm-memory's `load`/`store` cost a call each.
#[inline]
fn word<'a, T: AtomicInteger>(ring: &'a VolatileSlice<'_>, at: usize) -> Result<&'a T, QueueError> {
    ring.get_atomic_ref::<T>(at).map_err(ring_err)
}

/// Heads handed to the device and not yet returned.
#[derive(Clone, Debug, Default)]
struct InFlight([u64; IN_FLIGHT_WORDS], u16);

impl InFlight {
    /// Marks `head` in flight; false if it already was.
    fn insert(&mut self, head: u16) -> bool {
        let (w, b) = (usize::from(head) / 64, head % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        if !was {
            self.1 += 1;
        }
        !was
    }
    /// Clears `head`; false if it was not in flight.
    fn remove(&mut self, head: u16) -> bool {
        let (w, b) = (usize::from(head) / 64, head % 64);
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] &= !(1 << b);
        if was {
            self.1 -= 1;
        }
        was
    }
}

/// A split virtqueue as the device sees it.
#[derive(Debug)]
pub struct Queue {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    event_idx: bool,
    indirect: bool,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    signalled_used: Option<Wrapping<u16>>,
    /// Used entries were written since the used ring was last marked dirty.
    used_unmarked: bool,
    in_flight: InFlight,
    ring_pins: Vec<PinGuard>,
    /// Buffer lists of completed chains, reused so a request allocates nothing.
    /// Boxed: a chain is the box itself, moved out and back without a copy.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<ChainLists>>,
    active: bool,
    /// Advanced by every reset; chains carry the value they were popped at.
    generation: u32,
    /// Most bytes (readable plus writable) a chain may hold.
    chain_limit: u64,
}

impl Queue {
    /// A queue offering at most `max_size` entries (a power of two no larger than
    /// [`MAX_QUEUE_SIZE`]; larger values are clamped).
    pub fn new(max_size: u16) -> Self {
        let max_size = max_size.clamp(1, MAX_QUEUE_SIZE);
        let max_size = if max_size.is_power_of_two() {
            max_size
        } else {
            max_size.next_power_of_two() / 2
        };
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            event_idx: false,
            indirect: false,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            signalled_used: None,
            used_unmarked: false,
            in_flight: InFlight::default(),
            ring_pins: Vec::new(),
            spare: Vec::new(),
            active: false,
            generation: 0,
            chain_limit: u64::MAX,
        }
    }

    /// Sets the most bytes (readable plus writable) a chain may hold: what the
    /// device can legally use in one request. Longer chains are refused
    /// before their buffers are pinned. Kept across resets.
    pub fn set_chain_limit(&mut self, bytes: u64) {
        self.chain_limit = bytes;
    }

    /// The chain limit.
    pub fn chain_limit(&self) -> u64 {
        self.chain_limit
    }

    /// The current generation (advanced by each reset).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// QueueNumMax.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }
    /// Current size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// QueueReady as the driver set it.
    pub fn ready(&self) -> bool {
        self.ready
    }
    /// Whether the queue is ready and passed validation.
    pub fn is_active(&self) -> bool {
        self.active
    }
    /// Descriptor table address.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc_table
    }
    /// Available ring address.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail_ring
    }
    /// Used ring address.
    pub fn used_ring(&self) -> GuestAddress {
        self.used_ring
    }
    /// Chains popped and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.in_flight.1
    }

    /// Sets the size (QueueNum): a power of two, 1..=max.
    pub fn try_set_size(&mut self, size: u16) -> Result<(), QueueError> {
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        self.size = size;
        Ok(())
    }

    /// Sets the low and/or high half of the descriptor table address.
    pub fn set_desc_table_address(&mut self, low: Option<u32>, high: Option<u32>) {
        self.desc_table = GuestAddress(merge(self.desc_table.0, low, high));
    }
    /// Sets the low and/or high half of the available ring address.
    pub fn set_avail_ring_address(&mut self, low: Option<u32>, high: Option<u32>) {
        self.avail_ring = GuestAddress(merge(self.avail_ring.0, low, high));
    }
    /// Sets the low and/or high half of the used ring address.
    pub fn set_used_ring_address(&mut self, low: Option<u32>, high: Option<u32>) {
        self.used_ring = GuestAddress(merge(self.used_ring.0, low, high));
    }
    /// Sets QueueReady. Clearing it deactivates the queue.
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
        if !ready {
            self.active = false;
            self.ring_pins.clear();
        }
    }
    /// Whether VIRTIO_F_EVENT_IDX was negotiated.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }
    /// Whether VIRTIO_RING_F_INDIRECT_DESC was negotiated.
    pub fn set_indirect(&mut self, on: bool) {
        self.indirect = on;
    }

    /// Validates a ready queue's setup and pins its rings; called when the
    /// driver sets QueueReady (or at DRIVER_OK). On error the queue stays
    /// inactive.
    pub fn activate(&mut self, frames: &GuestFrames) -> Result<(), QueueError> {
        self.active = false;
        self.ring_pins.clear();
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        if self.size == 0 || self.size > self.max_size || !self.size.is_power_of_two() {
            return Err(QueueError::InvalidSize(self.size));
        }
        let size = u64::from(self.size);
        let rings = [
            ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + 8 * size),
        ];
        let mut pins = Vec::with_capacity(3);
        for (ring, addr, align, len) in rings {
            if addr.0 % align != 0 {
                return Err(QueueError::Misaligned { ring, addr: addr.0 });
            }
            let not_ram = || QueueError::RingNotRam { ring, addr: addr.0 };
            // Pinned, and inside one memory region, where `ring` finds it.
            pins.push(frames.pin(addr, len).map_err(|_| not_ram())?);
            frames.slice(addr, len as usize).ok_or_else(not_ram)?;
        }
        self.ring_pins = pins;
        self.active = true;
        Ok(())
    }

    /// Back to the initial state: not ready, nothing in flight, rings unpinned,
    /// and a new generation, so chains popped before can no longer complete.
    pub fn reset(&mut self) {
        let (generation, limit) = (self.generation.wrapping_add(1), self.chain_limit);
        *self = Queue::new(self.max_size);
        self.generation = generation;
        self.chain_limit = limit;
    }

    /// Whether the driver has made chains available that `pop` has not taken.
    /// With EVENT_IDX, when it has not, asks to be notified at the next one
    /// as `pop` does when it runs out: a device that stops at its budget just
    /// as the ring empties must still be woken by the driver's next chain.
    pub fn has_available(&mut self, frames: &GuestFrames) -> Result<bool, QueueError> {
        if !self.active {
            return Ok(false);
        }
        let ring = self.avail(frames)?;
        Ok(self.avail_idx_or_arm(frames, &ring)? != self.next_avail)
    }

    /// Takes the next available chain, or `None` when the driver has offered
    /// nothing new. See the module docs for what each error means.
    pub fn pop(&mut self, frames: &GuestFrames) -> Result<Option<DescriptorChain>, QueueError> {
        if !self.active {
            return Err(QueueError::NotReady);
        }
        let ring = self.avail(frames)?;
        let avail = self.avail_idx_or_arm(frames, &ring)?;
        let pending = (avail - self.next_avail).0;
        if pending == 0 {
            self.release_parked();
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndex {
                avail: avail.0,
                pending,
            });
        }
        let slot = usize::from(self.next_avail.0 % self.size);
        // The ring is 2-aligned (checked at activation): one load.
        let head = u16::from_le(word::<AtomicU16>(&ring, 4 + 2 * slot)?.load(Ordering::Relaxed));
        if head >= self.size {
            return Err(QueueError::HeadIndex(head));
        }
        if !self.in_flight.insert(head) {
            return Err(QueueError::HeadInFlight(head));
        }
        self.next_avail += Wrapping(1);
        match self.walk(frames, head) {
            Ok(chain) => Ok(Some(chain)),
            Err(source) => {
                self.in_flight.remove(head);
                self.push_used(frames, head, 0)?;
                Err(QueueError::BadChain { head, source })
            }
        }
    }

    /// Returns `chain` to the driver with `len` bytes written; its buffers are
    /// unpinned once the used entry is published.
    pub fn add_used(
        &mut self,
        frames: &GuestFrames,
        chain: DescriptorChain,
        len: u32,
    ) -> Result<(), QueueError> {
        let head = chain.head();
        // A chain from before a reset is not ours to return any more, even if
        // a chain with its head number is in flight again.
        if chain.generation() != self.generation {
            self.recycle(chain);
            return Err(QueueError::StaleChain { head });
        }
        if !self.active {
            return Err(QueueError::NotReady);
        }
        if !self.in_flight.remove(head) {
            return Err(QueueError::HeadIndex(head));
        }
        let len = len.min(u32::try_from(chain.writable_len()).unwrap_or(u32::MAX));
        self.push_used(frames, head, len)?;
        self.recycle(chain);
        Ok(())
    }

    /// Unpins a chain's buffers and keeps its emptied lists and pin set for
    /// the next chains.
    fn recycle(&mut self, chain: DescriptorChain) {
        let mut lists = chain.lists;
        lists.clear();
        if self.spare.len() < SPARE_LISTS {
            self.spare.push(lists);
        }
    }

    /// Drops the pins the spare lists keep between chains of a batch: called
    /// when the driver has offered nothing more, and by the transport after
    /// every batch, so no frame stays pinned while no request is in progress.
    pub fn release_parked(&mut self) {
        for lists in &mut self.spare {
            lists.pins.clear();
        }
    }

    /// Ends a batch: marks the used ring dirty if entries were added, and
    /// releases the pins parked for the batch. The transport calls it after
    /// every call into the device.
    pub fn end_batch(&mut self, frames: &GuestFrames) {
        if self.used_unmarked {
            self.used_unmarked = false;
            let _ = frames.mark_dirty(
                GuestAddress(self.used_ring.0 + 2),
                2 + 8 * u64::from(self.size),
            );
        }
        self.release_parked();
    }

    /// Whether the driver wants an interrupt for the used entries added since
    /// the last call that returned true.
    pub fn needs_notification(&mut self, frames: &GuestFrames) -> Result<bool, QueueError> {
        if !self.active {
            return Ok(false);
        }
        let ring = self.avail(frames)?;
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if !self.event_idx {
            let flags = word::<AtomicU16>(&ring, 0)?.load(Ordering::Acquire);
            let changed = self.signalled_used != Some(new);
            self.signalled_used = Some(new);
            return Ok(changed && u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0);
        }
        let used_event = Wrapping(
            word::<AtomicU16>(&ring, 4 + 2 * usize::from(self.size))?.load(Ordering::Acquire),
        );
        let old = match self.signalled_used.replace(new) {
            Some(old) => old,
            None => return Ok(true),
        };
        // vring_need_event (§2.7.10): did new pass used_event since old?
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    /// The available ring as a slice (found at activation, so it exists).
    #[inline]
    fn avail<'m>(&self, frames: &'m GuestFrames) -> Result<VolatileSlice<'m>, QueueError> {
        ring(frames, self.avail_ring, 6 + 2 * usize::from(self.size))
    }

    /// The used ring as a slice.
    #[inline]
    fn used<'m>(&self, frames: &'m GuestFrames) -> Result<VolatileSlice<'m>, QueueError> {
        ring(frames, self.used_ring, 6 + 8 * usize::from(self.size))
    }

    /// `avail.idx` from `ring`. With EVENT_IDX, when it shows nothing new:
    /// asks to be notified at the next entry (`avail_event`), then looks
    /// again (the driver may have added one before seeing avail_event).
    #[inline]
    fn avail_idx_or_arm(
        &self,
        frames: &GuestFrames,
        ring: &VolatileSlice<'_>,
    ) -> Result<Wrapping<u16>, QueueError> {
        let avail_idx = || {
            Ok::<_, QueueError>(Wrapping(
                word::<AtomicU16>(ring, 2)?.load(Ordering::Acquire),
            ))
        };
        let avail = avail_idx()?;
        if avail != self.next_avail || !self.event_idx {
            return Ok(avail);
        }
        let at = 4 + 8 * usize::from(self.size);
        word::<AtomicU16>(&self.used(frames)?, at)?.store(self.next_avail.0, Ordering::Relaxed);
        let _ = frames.mark_dirty(GuestAddress(self.used_ring.0 + at as u64), 2);
        fence(Ordering::SeqCst);
        avail_idx()
    }

    fn push_used(&mut self, frames: &GuestFrames, head: u16, len: u32) -> Result<(), QueueError> {
        let ring = self.used(frames)?;
        let elem = 4 + 8 * usize::from(self.next_used.0 % self.size);
        // The used ring is 4-aligned (checked at activation): two stores.
        word::<AtomicU32>(&ring, elem)?.store(u32::from(head).to_le(), Ordering::Relaxed);
        word::<AtomicU32>(&ring, elem + 4)?.store(len.to_le(), Ordering::Relaxed);
        self.next_used += Wrapping(1);
        // The element before the index that publishes it (§2.7.13).
        word::<AtomicU16>(&ring, 2)?.store(self.next_used.0, Ordering::Release);
        // Marked dirty when the batch ends.
        self.used_unmarked = true;
        Ok(())
    }

    /// Descriptor `index` of `table` (a slice of the whole table, looked up
    /// once per chain; `index` is below the table's length).
    #[inline]
    fn read_desc(table: &VolatileSlice<'_>, index: u16) -> Result<Descriptor, ChainError> {
        let at = DESC_SIZE as usize * usize::from(index);
        // Two 8-byte loads where the table is 8-aligned (the queue's own is
        // 16-aligned; an indirect table need not be): a copy otherwise.
        let (lo, hi) = if (table.ptr_guard().as_ptr() as usize).is_multiple_of(8) {
            let load = |off| table.get_ref::<u64>(off).map(|r| u64::from_le(r.load()));
            (load(at), load(at + 8))
        } else {
            let read = |off| table.read_obj::<u64>(off).map(u64::from_le);
            (read(at), read(at + 8))
        };
        let (lo, hi) = (
            lo.map_err(|_| ChainError::Memory)?,
            hi.map_err(|_| ChainError::Memory)?,
        );
        Ok(Descriptor {
            addr: lo,
            len: hi as u32,
            flags: (hi >> 32) as u16,
            next: (hi >> 48) as u16,
        })
    }

    /// Walks the chain at `head` within the descriptor budgets, checks its
    /// total length, then pins its buffers. Inlined into `pop`, its one
    /// caller: returned through memory, the chain was read back before the
    /// stores that wrote it could be forwarded.
    #[inline(always)]
    fn walk(&mut self, frames: &GuestFrames, head: u16) -> Result<DescriptorChain, ChainError> {
        let mut lists = match self.spare.pop() {
            Some(spare) if spare.pins.belongs_to(frames) => spare,
            _ => Box::new(ChainLists::new(frames)),
        };
        lists.head = head;
        lists.generation = self.generation;
        let mut chain = DescriptorChain { lists };
        match self.fill(frames, &mut chain) {
            Ok(()) => Ok(chain),
            Err(e) => {
                // A refused chain's lists are reused too: a guest sending
                // bad chains makes the device allocate nothing.
                self.recycle(chain);
                Err(e)
            }
        }
    }

    /// Collects the chain's buffers, checks its length against the device's
    /// limit, then pins its buffers (which also checks they are RAM).
    fn fill(&self, frames: &GuestFrames, chain: &mut DescriptorChain) -> Result<(), ChainError> {
        let indirect_table = self.collect(frames, chain.head(), &mut chain.lists)?;
        let total = chain.readable_len() + chain.writable_len();
        if total > self.chain_limit {
            return Err(ChainError::TooLarge {
                len: total,
                limit: self.chain_limit,
            });
        }
        let ChainLists {
            readable,
            writable,
            pins,
            ..
        } = &mut *chain.lists;
        let mut pin = |addr: GuestAddress, len: u32| {
            if len == 0 {
                return Ok(());
            }
            pins.pin(addr, u64::from(len))
                .map_err(|_| ChainError::Buffer { addr: addr.0, len })
        };
        if let Some((addr, len)) = indirect_table {
            pin(addr, len)?;
        }
        for b in readable.iter() {
            pin(b.addr, b.len)?;
        }
        for b in writable.iter() {
            pin(b.addr, b.len)?;
        }
        Ok(())
    }

    /// Reads the descriptors of the chain at `head` into `chain`'s buffer
    /// lists; returns the indirect table the chain went through, if any.
    /// Touches no buffer and pins nothing (RAM-ness is checked by the pins).
    fn collect(
        &self,
        frames: &GuestFrames,
        head: u16,
        chain: &mut ChainLists,
    ) -> Result<Option<(GuestAddress, u32)>, ChainError> {
        let slice = |addr: GuestAddress, entries: u16| {
            frames
                .slice(addr, DESC_SIZE as usize * usize::from(entries))
                .ok_or(ChainError::Memory)
        };
        let mut table = slice(self.desc_table, self.size)?;
        let mut table_len = self.size;
        let mut indirect_table = None;
        let mut index = head;
        // Descriptors left in the current table's budget.
        let mut budget = self.size;
        loop {
            if budget == 0 {
                return Err(ChainError::TooLong);
            }
            budget -= 1;
            let desc = Self::read_desc(&table, index)?;
            if desc.has(VRING_DESC_F_INDIRECT) {
                if indirect_table.is_some() {
                    return Err(ChainError::NestedIndirect);
                }
                if !self.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if desc.has(VRING_DESC_F_NEXT) {
                    return Err(ChainError::IndirectWithNext);
                }
                let entries = u64::from(desc.len) / DESC_SIZE;
                if desc.len == 0
                    || u64::from(desc.len) % DESC_SIZE != 0
                    || entries > u64::from(self.size)
                {
                    return Err(ChainError::IndirectLength(desc.len));
                }
                let addr = GuestAddress(desc.addr);
                table_len = entries as u16;
                // Not RAM (or across a hole): no slice.
                table = slice(addr, table_len).map_err(|_| ChainError::Buffer {
                    addr: desc.addr,
                    len: desc.len,
                })?;
                indirect_table = Some((addr, desc.len));
                // The table's own budget: its length.
                budget = table_len;
                index = 0;
                continue;
            }
            // RAM-ness is checked when the buffer is pinned, after the
            // chain's length: nothing here touches the buffer.
            let (addr, len) = (GuestAddress(desc.addr), desc.len);
            if desc.has(VRING_DESC_F_WRITE) {
                chain.writable.push(WritableBuffer { addr, len });
                chain.writable_len += u64::from(len);
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable.push(ReadableBuffer { addr, len });
                chain.readable_len += u64::from(len);
            }
            if !desc.has(VRING_DESC_F_NEXT) {
                return Ok(indirect_table);
            }
            if desc.next >= table_len {
                return Err(ChainError::DescriptorIndex(desc.next));
            }
            index = desc.next;
        }
    }
}

/// Replaces the low and/or high 32 bits of `value`.
fn merge(value: u64, low: Option<u32>, high: Option<u32>) -> u64 {
    let low = low.map_or(value & 0xffff_ffff, u64::from);
    let high = high.map_or(value >> 32, u64::from);
    (high << 32) | low
}

#[path = "queue_state.rs"]
mod state;
pub use state::QueueState;

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
