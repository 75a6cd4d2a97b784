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
//! `memory::PinSet` per chain, one atomic per buffer whatever its length) until
//! the chain is handed back through [`Queue::add_used`]. The two kinds are
//! different types: only [`WritableBuffer`]s can be written, through a
//! [`Writer`], which also marks the frames it writes dirty.
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
use std::sync::atomic::{Ordering, fence};

use memory::{GuestFrames, PinGuard, PinSet};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice,
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

/// A buffer the device may only read.
#[derive(Debug)]
pub struct ReadableBuffer {
    addr: GuestAddress,
    len: u32,
}

/// A buffer the device may write (and read back).
#[derive(Debug)]
pub struct WritableBuffer {
    addr: GuestAddress,
    len: u32,
}

macro_rules! buffer_accessors {
    ($t:ty) => {
        impl $t {
            /// Guest address.
            pub fn addr(&self) -> GuestAddress {
                self.addr
            }
            /// Length in bytes.
            pub fn len(&self) -> u32 {
                self.len
            }
            /// Whether the buffer is empty.
            pub fn is_empty(&self) -> bool {
                self.len == 0
            }
        }
    };
}
buffer_accessors!(ReadableBuffer);
buffer_accessors!(WritableBuffer);

/// A validated chain: device-readable buffers, then device-writable ones.
#[derive(Debug)]
pub struct DescriptorChain {
    head: u16,
    generation: u32,
    readable: Vec<ReadableBuffer>,
    writable: Vec<WritableBuffer>,
    /// Pins on every buffer (and indirect table) until the chain is returned
    /// or dropped.
    pins: PinSet,
}

impl DescriptorChain {
    /// Index of the head descriptor.
    pub fn head(&self) -> u16 {
        self.head
    }
    /// The generation of the queue it was popped from.
    pub fn generation(&self) -> u32 {
        self.generation
    }
    /// The device-readable buffers, in chain order.
    pub fn readable(&self) -> &[ReadableBuffer] {
        &self.readable
    }
    /// The device-writable buffers, in chain order.
    pub fn writable(&self) -> &[WritableBuffer] {
        &self.writable
    }
    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }
    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }
    /// A cursor over the readable bytes.
    pub fn reader(&self) -> Reader<'_> {
        Reader(Cursor::new(&self.readable))
    }
    /// A cursor over the writable bytes.
    pub fn writer(&self) -> Writer<'_> {
        Writer(Cursor::new(&self.writable))
    }
}

/// Not enough bytes left in the buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} bytes wanted, {left} left in the chain")]
pub struct ShortChain {
    /// Bytes asked for.
    pub wanted: u64,
    /// Bytes left.
    pub left: u64,
}

/// A buffer's place in guest memory.
trait Piece {
    fn piece(&self) -> (GuestAddress, u32);
}

impl Piece for ReadableBuffer {
    fn piece(&self) -> (GuestAddress, u32) {
        (self.addr, self.len)
    }
}

impl Piece for WritableBuffer {
    fn piece(&self) -> (GuestAddress, u32) {
        (self.addr, self.len)
    }
}

/// A byte position over a chain's buffers of one direction.
#[derive(Debug)]
struct Cursor<'a, B> {
    bufs: &'a [B],
    index: usize,
    offset: u32,
    left: u64,
}

impl<'a, B: Piece> Cursor<'a, B> {
    fn new(bufs: &'a [B]) -> Self {
        let left = bufs.iter().map(|b| u64::from(b.piece().1)).sum();
        Cursor {
            bufs,
            index: 0,
            offset: 0,
            left,
        }
    }

    /// Consumes `len` bytes, calling `f(addr, n)` for each contiguous piece.
    fn take(&mut self, len: u64, mut f: impl FnMut(GuestAddress, usize)) -> Result<(), ShortChain> {
        if len > self.left {
            return Err(ShortChain {
                wanted: len,
                left: self.left,
            });
        }
        let mut want = len;
        while want > 0 {
            let (addr, plen) = self.bufs[self.index].piece();
            let n = u64::from(plen - self.offset).min(want);
            if n > 0 {
                f(GuestAddress(addr.0 + u64::from(self.offset)), n as usize);
            }
            want -= n;
            self.offset += n as u32;
            if self.offset == plen {
                self.index += 1;
                self.offset = 0;
            }
        }
        self.left -= len;
        Ok(())
    }
}

/// Reads a chain's device-readable bytes in order.
#[derive(Debug)]
pub struct Reader<'a>(Cursor<'a, ReadableBuffer>);

impl Reader<'_> {
    /// Fills `buf` from the next bytes.
    pub fn read_exact(&mut self, frames: &GuestFrames, buf: &mut [u8]) -> Result<(), ShortChain> {
        let mut done = 0;
        let mem = frames.memory();
        self.0.take(buf.len() as u64, |addr, n| {
            // Validated and pinned RAM: the read cannot fail.
            let _ = mem.read_slice(&mut buf[done..done + n], addr);
            done += n;
        })
    }

    /// Reads a plain-data value.
    pub fn read_obj<T: ByteValued + Default>(
        &mut self,
        frames: &GuestFrames,
    ) -> Result<T, ShortChain> {
        let mut value = T::default();
        self.read_exact(frames, value.as_mut_slice())?;
        Ok(value)
    }
}

/// Writes a chain's device-writable bytes in order, marking them dirty.
#[derive(Debug)]
pub struct Writer<'a>(Cursor<'a, WritableBuffer>);

impl Writer<'_> {
    /// Writes all of `buf` to the next bytes.
    pub fn write_all(&mut self, frames: &GuestFrames, buf: &[u8]) -> Result<(), ShortChain> {
        let mut done = 0;
        self.0.take(buf.len() as u64, |addr, n| {
            // Validated and pinned RAM: neither call can fail.
            let _ = frames.memory().write_slice(&buf[done..done + n], addr);
            let _ = frames.mark_dirty(addr, n as u64);
            done += n;
        })
    }

    /// Writes a plain-data value.
    pub fn write_obj<T: ByteValued>(
        &mut self,
        frames: &GuestFrames,
        value: T,
    ) -> Result<(), ShortChain> {
        self.write_all(frames, value.as_slice())
    }
}

macro_rules! cursor_methods {
    ($t:ty) => {
        impl $t {
            /// Bytes not yet consumed.
            pub fn remaining(&self) -> u64 {
                self.0.left
            }

            /// Consumes `len` bytes, appending their guest memory pieces to
            /// `out`, for I/O straight between a file and guest memory (a
            /// caller that writes them marks them dirty, as
            /// `GuestFrames::read_file_at` does).
            pub fn take_segments(
                &mut self,
                len: u64,
                out: &mut Vec<(GuestAddress, usize)>,
            ) -> Result<(), ShortChain> {
                self.0.take(len, |addr, n| out.push((addr, n)))
            }

            /// Skips `len` bytes.
            pub fn skip(&mut self, len: u64) -> Result<(), ShortChain> {
                self.0.take(len, |_, _| {})
            }
        }
    };
}
cursor_methods!(Reader<'_>);
cursor_methods!(Writer<'_>);

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
    in_flight: InFlight,
    ring_pins: Vec<PinGuard>,
    /// Buffer lists of completed chains, reused so a request allocates nothing.
    spare: Vec<(Vec<ReadableBuffer>, Vec<WritableBuffer>, PinSet)>,
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
            pins.push(
                frames
                    .pin(addr, len)
                    .map_err(|_| QueueError::RingNotRam { ring, addr: addr.0 })?,
            );
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
    pub fn has_available(&self, frames: &GuestFrames) -> Result<bool, QueueError> {
        if !self.active {
            return Ok(false);
        }
        Ok(self.avail_idx(frames)? != self.next_avail)
    }

    /// Takes the next available chain, or `None` when the driver has offered
    /// nothing new. See the module docs for what each error means.
    pub fn pop(&mut self, frames: &GuestFrames) -> Result<Option<DescriptorChain>, QueueError> {
        if !self.active {
            return Err(QueueError::NotReady);
        }
        let mem = frames.memory();
        let mut avail = self.avail_idx(frames)?;
        if avail == self.next_avail && self.event_idx {
            // Out of work: ask to be notified at the next entry, then look again
            // (the driver may have added one before seeing avail_event).
            let avail_event = self.used_ring.0 + 4 + 8 * u64::from(self.size);
            mem.store(
                self.next_avail.0,
                GuestAddress(avail_event),
                Ordering::Relaxed,
            )
            .map_err(QueueError::Memory)?;
            let _ = frames.mark_dirty(GuestAddress(avail_event), 2);
            fence(Ordering::SeqCst);
            avail = self.avail_idx(frames)?;
        }
        let pending = (avail - self.next_avail).0;
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndex {
                avail: avail.0,
                pending,
            });
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let head: u16 = mem
            .read_obj(GuestAddress(self.avail_ring.0 + 4 + 2 * slot))
            .map_err(QueueError::Memory)?;
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
        let head = chain.head;
        // A chain from before a reset is not ours to return any more, even if
        // a chain with its head number is in flight again.
        if chain.generation != self.generation {
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
        let DescriptorChain {
            mut readable,
            mut writable,
            mut pins,
            ..
        } = chain;
        pins.clear();
        readable.clear();
        writable.clear();
        if self.spare.len() < SPARE_LISTS {
            self.spare.push((readable, writable, pins));
        }
    }

    /// Whether the driver wants an interrupt for the used entries added since
    /// the last call that returned true.
    pub fn needs_notification(&mut self, frames: &GuestFrames) -> Result<bool, QueueError> {
        if !self.active {
            return Ok(false);
        }
        let mem = frames.memory();
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if !self.event_idx {
            let flags: u16 = mem
                .load(self.avail_ring, Ordering::Acquire)
                .map_err(QueueError::Memory)?;
            let changed = self.signalled_used != Some(new);
            self.signalled_used = Some(new);
            return Ok(changed && u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0);
        }
        let used_event_addr = GuestAddress(self.avail_ring.0 + 4 + 2 * u64::from(self.size));
        let used_event = Wrapping(
            mem.load::<u16>(used_event_addr, Ordering::Acquire)
                .map_err(QueueError::Memory)?,
        );
        let old = match self.signalled_used.replace(new) {
            Some(old) => old,
            None => return Ok(true),
        };
        // vring_need_event (§2.7.10): did new pass used_event since old?
        Ok(new - used_event - Wrapping(1) < new - old)
    }

    fn avail_idx(&self, frames: &GuestFrames) -> Result<Wrapping<u16>, QueueError> {
        let idx: u16 = frames
            .memory()
            .load(GuestAddress(self.avail_ring.0 + 2), Ordering::Acquire)
            .map_err(QueueError::Memory)?;
        Ok(Wrapping(idx))
    }

    fn push_used(&mut self, frames: &GuestFrames, head: u16, len: u32) -> Result<(), QueueError> {
        let mem = frames.memory();
        let slot = u64::from(self.next_used.0 % self.size);
        let elem = GuestAddress(self.used_ring.0 + 4 + 8 * slot);
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        raw[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_obj(raw, elem).map_err(QueueError::Memory)?;
        self.next_used += Wrapping(1);
        // The element before the index that publishes it (§2.7.13).
        mem.store(
            self.next_used.0,
            GuestAddress(self.used_ring.0 + 2),
            Ordering::Release,
        )
        .map_err(QueueError::Memory)?;
        // The index and the element, in one call (the frames between them
        // are the ring's own).
        let idx = self.used_ring.0 + 2;
        let _ = frames.mark_dirty(GuestAddress(idx), elem.0 + 8 - idx);
        Ok(())
    }

    /// Descriptor `index` of `table` (a slice of the whole table, looked up
    /// once per chain; `index` is below the table's length).
    fn read_desc(table: &VolatileSlice<'_>, index: u16) -> Result<Descriptor, ChainError> {
        let raw: [u8; DESC_SIZE as usize] = table
            .read_obj(DESC_SIZE as usize * usize::from(index))
            .map_err(|_| ChainError::Memory)?;
        Ok(Descriptor {
            addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        })
    }

    /// Walks the chain at `head` within the descriptor budgets, validates
    /// every buffer and the total length, then pins the buffers.
    fn walk(&mut self, frames: &GuestFrames, head: u16) -> Result<DescriptorChain, ChainError> {
        let (readable, writable, pins) = match self.spare.pop() {
            Some(spare) if spare.2.belongs_to(frames) => spare,
            _ => (Vec::new(), Vec::new(), frames.pin_set()),
        };
        let mut chain = DescriptorChain {
            head,
            generation: self.generation,
            readable,
            writable,
            pins,
        };
        let indirect_table = self.collect(frames, head, &mut chain)?;
        let total = chain.readable_len() + chain.writable_len();
        if total > self.chain_limit {
            return Err(ChainError::TooLarge {
                len: total,
                limit: self.chain_limit,
            });
        }
        // Everything is RAM and the request is within bounds: pin it.
        let DescriptorChain {
            readable,
            writable,
            pins,
            ..
        } = &mut chain;
        let pieces = indirect_table
            .iter()
            .copied()
            .chain(readable.iter().map(|b| (b.addr, b.len)))
            .chain(writable.iter().map(|b| (b.addr, b.len)));
        for (addr, len) in pieces.filter(|&(_, len)| len > 0) {
            pins.pin(addr, u64::from(len))
                .map_err(|_| ChainError::Buffer { addr: addr.0, len })?;
        }
        Ok(chain)
    }

    /// Reads the descriptors of the chain at `head` into `chain`'s buffer
    /// lists, checking each buffer is guest RAM; returns the indirect table
    /// the chain went through, if any. Pins nothing.
    fn collect(
        &self,
        frames: &GuestFrames,
        head: u16,
        chain: &mut DescriptorChain,
    ) -> Result<Option<(GuestAddress, u32)>, ChainError> {
        let mem = frames.memory();
        let slice = |addr: GuestAddress, entries: u16| {
            mem.get_slice(addr, DESC_SIZE as usize * usize::from(entries))
                .map_err(|_| ChainError::Memory)
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
                if !frames.is_ram(addr, u64::from(desc.len)) {
                    return Err(ChainError::Buffer {
                        addr: desc.addr,
                        len: desc.len,
                    });
                }
                indirect_table = Some((addr, desc.len));
                table_len = entries as u16;
                table = slice(addr, table_len)?;
                // The table's own budget: its length.
                budget = table_len;
                index = 0;
                continue;
            }
            let (addr, len) = (GuestAddress(desc.addr), desc.len);
            if len > 0 && !frames.is_ram(addr, u64::from(len)) {
                return Err(ChainError::Buffer {
                    addr: desc.addr,
                    len,
                });
            }
            if desc.has(VRING_DESC_F_WRITE) {
                chain.writable.push(WritableBuffer { addr, len });
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable.push(ReadableBuffer { addr, len });
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

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
