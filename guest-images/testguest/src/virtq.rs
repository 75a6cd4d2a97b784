//! The driver side of a split virtqueue (virtio 1.2 §2.7).
//!
//! The descriptor table, the available ring and the used ring live in one
//! coherent DMA buffer (one frame for up to [`MAX_SIZE`] entries), laid out as
//! §2.7 requires: table at 0 (16-byte aligned), available ring right after it
//! (2-byte aligned), used ring after that, 4-byte aligned.
//!
//! - Free descriptors form a list (a shadow of the `next` fields, so the
//!   device cannot corrupt it); a chain takes as many as it has segments, or
//!   one when it goes through an indirect table (§2.7.5.3): chains of more
//!   than [`INDIRECT_ABOVE`] segments do when VIRTIO_RING_F_INDIRECT_DESC was
//!   negotiated, shorter ones stay direct, so both paths are used. Indirect
//!   tables live in a second coherent buffer allocated with the queue, one
//!   slot of [`MAX_SEGMENTS`] entries per head: a head is outstanding at most
//!   once, so its slot is free whenever the head is, and no request allocates.
//! - Each segment's WRITE flag comes from its DMA buffer's type
//!   ([`crate::dma`]); the queue takes a pool reference on every buffer it
//!   posts and gives it back when the chain completes (or the device is reset),
//!   so a buffer is neither reused nor read by the CPU while the device holds it.
//! - Publishing: ring entry, then a release fence, then the available index.
//!   Whether to notify follows §2.7.10 (VIRTIO_F_EVENT_IDX: `avail_event`
//!   after a full fence; otherwise the used ring's NO_NOTIFY flag).
//! - Completions are read from the used ring after an acquire fence; an id
//!   that is not an outstanding head is a device error, reported, never trusted.
//!   With EVENT_IDX the driver asks for an interrupt on the very next used
//!   entry (`used_event` = the last index it consumed), or, for a batch it
//!   submitted at once, on the batch's last one ([`Virtqueue::interrupt_after`],
//!   as Linux's `virtqueue_enable_cb_delayed`).

use core::fmt;
use core::sync::atomic::{Ordering, fence};

use crate::dma::{Coherent, DmaBuf, DmaError, DmaPool, Segment};

/// Largest queue size the driver uses.
pub const MAX_SIZE: u16 = 128;
/// Most segments in one chain.
pub const MAX_SEGMENTS: usize = 16;
/// Chains longer than this go through an indirect table when negotiated.
pub const INDIRECT_ABOVE: usize = 3;

const DESC_SIZE: usize = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;
const NONE: u16 = u16::MAX;

/// Why a chain cannot be submitted or a completion not be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// No segments, or more than [`MAX_SEGMENTS`].
    SegmentCount(usize),
    /// Not enough free descriptors.
    Full,
    /// DMA memory for the ring or the indirect tables.
    Dma(DmaError),
    /// A segment of length 0.
    EmptySegment,
    /// The device returned an id that is not an outstanding chain.
    BadUsedId(u32),
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::SegmentCount(n) => {
                write!(f, "{n} segments (1..={MAX_SEGMENTS} allowed)")
            }
            QueueError::Full => write!(f, "no free descriptors"),
            QueueError::EmptySegment => write!(f, "a segment of length 0"),
            QueueError::Dma(e) => write!(f, "{e}"),
            QueueError::BadUsedId(id) => {
                write!(f, "the device used id {id}, which is not in flight")
            }
        }
    }
}

impl From<DmaError> for QueueError {
    fn from(e: DmaError) -> Self {
        QueueError::Dma(e)
    }
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains made available.
    pub submitted: u64,
    /// Chains that went through an indirect table.
    pub indirect: u64,
    /// Submissions after which the device asked to be notified.
    pub notifications: u64,
    /// Submissions after which it did not.
    pub suppressed: u64,
}

/// Up to [`MAX_SEGMENTS`] segments, gathered for one chain.
#[derive(Debug)]
pub struct SegmentList<'b> {
    items: [Segment<'b>; MAX_SEGMENTS],
    len: usize,
}

impl<'b> SegmentList<'b> {
    /// An empty list.
    pub fn new() -> Self {
        SegmentList {
            items: [Segment::EMPTY; MAX_SEGMENTS],
            len: 0,
        }
    }

    /// Appends `segment`; fails when the list is full.
    pub fn push(&mut self, segment: Segment<'b>) -> Result<(), QueueError> {
        let slot = self
            .items
            .get_mut(self.len)
            .ok_or(QueueError::SegmentCount(MAX_SEGMENTS + 1))?;
        *slot = segment;
        self.len += 1;
        Ok(())
    }

    /// Segments pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The segments, in order.
    pub fn as_slice(&self) -> &[Segment<'b>] {
        &self.items[..self.len]
    }
}

impl Default for SegmentList<'_> {
    fn default() -> Self {
        Self::new()
    }
}

/// An outstanding chain.
#[derive(Debug)]
struct Chain {
    /// Pool slots of the posted buffers.
    slots: [u16; MAX_SEGMENTS],
    segments: usize,
    /// Ring descriptors the chain took (one when indirect), in order.
    descs: [u16; MAX_SEGMENTS],
    descriptors: usize,
    /// The used length once completed.
    done: Option<u32>,
}

/// Writes descriptor `index` of the table in `buf` (the ring's own or an
/// indirect one).
fn write_desc(
    buf: &DmaBuf<'_, Coherent>,
    index: usize,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = index * DESC_SIZE;
    buf.store_u64(at, addr);
    buf.store_u32(at + 8, len);
    buf.store_u16(at + 12, flags);
    buf.store_u16(at + 14, next);
}

/// A split virtqueue, driver side.
#[derive(Debug)]
pub struct Virtqueue<'p> {
    pool: &'p DmaPool,
    ring: DmaBuf<'p, Coherent>,
    /// Indirect tables, one slot per head (with INDIRECT_DESC only).
    tables: Option<DmaBuf<'p, Coherent>>,
    size: u16,
    avail_offset: usize,
    used_offset: usize,
    free_head: u16,
    free: u16,
    next: [u16; MAX_SIZE as usize],
    chains: [Option<Chain>; MAX_SIZE as usize],
    avail_idx: u16,
    /// Available index at the last notification decision.
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
    stats: QueueStats,
}

impl<'p> Virtqueue<'p> {
    /// A queue of `size` entries (a power of two up to [`MAX_SIZE`]) with the
    /// negotiated ring features.
    pub fn new(
        pool: &'p DmaPool,
        size: u16,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, QueueError> {
        let size = size.clamp(1, MAX_SIZE);
        let n = usize::from(size);
        let avail_offset = DESC_SIZE * n;
        let used_offset = (avail_offset + 6 + 2 * n).next_multiple_of(4);
        let ring = pool.alloc_coherent(used_offset + 6 + 8 * n)?;
        let tables = if indirect {
            Some(pool.alloc_coherent(n * MAX_SEGMENTS * DESC_SIZE)?)
        } else {
            None
        };
        let mut next = [NONE; MAX_SIZE as usize];
        for (i, link) in next.iter_mut().enumerate().take(n - 1) {
            *link = i as u16 + 1;
        }
        Ok(Virtqueue {
            pool,
            ring,
            tables,
            size,
            avail_offset,
            used_offset,
            free_head: 0,
            free: size,
            next,
            chains: [const { None }; MAX_SIZE as usize],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx,
            stats: QueueStats::default(),
        })
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and
    /// used ring, for the transport's queue registers.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let base = self.ring.addr();
        (
            base,
            base + self.avail_offset as u64,
            base + self.used_offset as u64,
        )
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(&self.ring, usize::from(index), addr, len, flags, next);
    }

    fn take_descriptor(&mut self) -> u16 {
        let d = self.free_head;
        self.free_head = self.next[usize::from(d)];
        self.free -= 1;
        d
    }

    /// Makes a chain of the segments of `parts`, concatenated, available
    /// (driver-readable ones must come before device-writable ones, §2.7.4.2)
    /// and returns its head. Call [`Virtqueue::should_notify`] after one or
    /// more submissions.
    pub fn submit(&mut self, parts: &[&[Segment<'_>]]) -> Result<u16, QueueError> {
        let count: usize = parts.iter().map(|p| p.len()).sum();
        if count == 0 || count > MAX_SEGMENTS {
            return Err(QueueError::SegmentCount(count));
        }
        let segments = || parts.iter().flat_map(|p| p.iter());
        if segments().any(|s| s.len == 0) {
            return Err(QueueError::EmptySegment);
        }
        let indirect = self.tables.is_some() && count > INDIRECT_ABOVE;
        let needed = if indirect { 1 } else { count as u16 };
        if self.free < needed {
            return Err(QueueError::Full);
        }
        let mut chain = Chain {
            slots: [0; MAX_SEGMENTS],
            segments: count,
            descs: [NONE; MAX_SEGMENTS],
            descriptors: usize::from(needed),
            done: None,
        };
        let flags = |s: &Segment<'_>, last: bool| {
            (if s.device_writes { DESC_F_WRITE } else { 0 }) | if last { 0 } else { DESC_F_NEXT }
        };
        let head;
        if indirect {
            head = self.take_descriptor();
            // The head's own slot of the table area (`indirect` implies it).
            let base = usize::from(head) * MAX_SEGMENTS;
            let mut table = 0;
            if let Some(tables) = &self.tables {
                for (i, s) in segments().enumerate() {
                    let last = i + 1 == count;
                    let next = if last { 0 } else { i as u16 + 1 };
                    write_desc(tables, base + i, s.addr, s.len, flags(s, last), next);
                }
                table = tables.addr() + (base * DESC_SIZE) as u64;
            }
            self.write_desc(head, table, (DESC_SIZE * count) as u32, DESC_F_INDIRECT, 0);
            chain.descs[0] = head;
            self.stats.indirect += 1;
        } else {
            let descs: [u16; MAX_SEGMENTS] = core::array::from_fn(|i| {
                if i < count {
                    self.take_descriptor()
                } else {
                    NONE
                }
            });
            for (i, s) in segments().enumerate() {
                let last = i + 1 == count;
                let next = if last { 0 } else { descs[i + 1] };
                self.write_desc(descs[i], s.addr, s.len, flags(s, last), next);
            }
            head = descs[0];
            chain.descs = descs;
        }
        for (slot, s) in chain.slots.iter_mut().zip(segments()) {
            self.pool.hold(s.slot);
            *slot = s.slot;
        }
        self.chains[usize::from(head)] = Some(chain);
        let n = usize::from(self.size);
        let entry = self.avail_offset + 4 + 2 * (usize::from(self.avail_idx) % n);
        self.ring.store_u16(entry, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry (and the descriptors) before the index that publishes it.
        fence(Ordering::Release);
        self.ring.store_u16(self.avail_offset + 2, self.avail_idx);
        self.stats.submitted += 1;
        Ok(head)
    }

    /// Whether the device wants a notification for the chains submitted since
    /// the last call (§2.7.10).
    pub fn should_notify(&mut self) -> bool {
        // The published index before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        let notify = if self.event_idx {
            let event = self
                .ring
                .load_u16(self.used_offset + 4 + 8 * usize::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.ring.load_u16(self.used_offset) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            self.stats.notifications += 1;
        } else {
            self.stats.suppressed += 1;
        }
        notify
    }

    /// Whether the used ring holds entries the driver has not taken.
    pub fn has_used(&self) -> bool {
        self.used_pending() != 0
    }

    /// Used entries the driver has not taken yet.
    pub fn used_pending(&self) -> u16 {
        self.ring
            .load_u16(self.used_offset + 2)
            .wrapping_sub(self.last_used)
    }

    /// With EVENT_IDX: asks for the next interrupt only once `n` more chains
    /// have completed (§2.7.10 `used_event`), e.g. a batch submitted at once.
    /// Without it, interrupts are not suppressed.
    pub fn interrupt_after(&mut self, n: u16) {
        if self.event_idx && n > 0 {
            let used_event = self.avail_offset + 4 + 2 * usize::from(self.size);
            self.ring
                .store_u16(used_event, self.last_used.wrapping_add(n - 1));
            fence(Ordering::SeqCst);
        }
    }

    /// Takes every new used entry, then returns the used length of `head` if
    /// it has completed (forgetting it).
    pub fn take_completion(&mut self, head: u16) -> Result<Option<u32>, QueueError> {
        let used_idx = self.ring.load_u16(self.used_offset + 2);
        // The entries after the index that published them.
        fence(Ordering::Acquire);
        let n = usize::from(self.size);
        while self.last_used != used_idx {
            let at = self.used_offset + 4 + 8 * (usize::from(self.last_used) % n);
            let (id, len) = (self.ring.load_u32(at), self.ring.load_u32(at + 4));
            self.last_used = self.last_used.wrapping_add(1);
            let chain = usize::try_from(id)
                .ok()
                .and_then(|i| self.chains.get_mut(i))
                .and_then(Option::as_mut)
                .filter(|c| c.done.is_none())
                .ok_or(QueueError::BadUsedId(id))?;
            chain.done = Some(len);
        }
        if self.event_idx {
            let used_event = self.avail_offset + 4 + 2 * n;
            self.ring.store_u16(used_event, self.last_used);
            fence(Ordering::SeqCst);
        }
        let done = self
            .chains
            .get(usize::from(head))
            .and_then(Option::as_ref)
            .and_then(|c| c.done);
        if done.is_some() {
            self.retire(head);
        }
        Ok(done)
    }

    /// The next used entry, in the device's order, as `(head, used length)`;
    /// its chain is retired (descriptors free, buffer references returned).
    /// For queues whose chains complete out of submission order (network).
    pub fn take_used(&mut self) -> Result<Option<(u16, u32)>, QueueError> {
        let used_idx = self.ring.load_u16(self.used_offset + 2);
        // The entries after the index that published them.
        fence(Ordering::Acquire);
        let n = usize::from(self.size);
        if self.last_used == used_idx {
            if self.event_idx {
                // Interrupt on the next entry, then look again (one may have
                // arrived before the device saw used_event).
                let used_event = self.avail_offset + 4 + 2 * n;
                self.ring.store_u16(used_event, self.last_used);
                fence(Ordering::SeqCst);
                if self.ring.load_u16(self.used_offset + 2) != self.last_used {
                    return self.take_used();
                }
            }
            return Ok(None);
        }
        let at = self.used_offset + 4 + 8 * (usize::from(self.last_used) % n);
        let (id, len) = (self.ring.load_u32(at), self.ring.load_u32(at + 4));
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| self.chains.get(usize::from(h)).is_some_and(Option::is_some))
            .ok_or(QueueError::BadUsedId(id))?;
        self.retire(head);
        Ok(Some((head, len)))
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> u16 {
        self.free
    }

    /// Returns a chain's descriptors to the free list and its buffers' pool
    /// references.
    fn retire(&mut self, head: u16) {
        let Some(chain) = self.chains[usize::from(head)].take() else {
            return;
        };
        for &slot in &chain.slots[..chain.segments] {
            self.pool.release(slot);
        }
        // Our own record of the chain, not the device-visible `next` fields.
        for &d in &chain.descs[..chain.descriptors] {
            self.next[usize::from(d)] = self.free_head;
            self.free_head = d;
            self.free += 1;
        }
    }

    /// After the device was reset: every outstanding chain is given up and
    /// its buffers' references returned, and the rings start over.
    pub fn reclaim_after_reset(&mut self) {
        for head in 0..self.size {
            if self.chains[usize::from(head)].is_some() {
                self.retire(head);
            }
        }
        let n = usize::from(self.size);
        self.free_head = 0;
        self.free = self.size;
        for (i, link) in self.next.iter_mut().enumerate().take(n) {
            *link = if i + 1 < n { i as u16 + 1 } else { NONE };
        }
        self.avail_idx = 0;
        self.kicked_idx = 0;
        self.last_used = 0;
        let len = self.ring.len();
        for at in (0..len & !1).step_by(2) {
            self.ring.store_u16(at, 0);
        }
    }
}
