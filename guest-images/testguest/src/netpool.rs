//! The network DMA pool: 2 KiB packet buffers carved out of one coherent DMA
//! buffer below 4 GiB, allocated once when the network device starts.
//!
//! Each packet buffer has its own reference count: one for the owning
//! [`Packet`], one while a posted descriptor points into it (taken by the
//! driver at submission, dropped at completion). A buffer is zeroed when it is
//! handed out and free again with its last reference; one dropped while the
//! device holds it is counted as orphaned and comes back only when the device
//! returns it. Packets are typed by direction like `dma` streams: a
//! [`Packet<FromDevice>`] (receive) can only be posted device-writable and
//! read after the device returned it, a [`Packet<ToDevice>`] (transmit) only
//! written by the CPU and posted device-readable. Statistics: allocations,
//! frees, failures, in use, peak.

use core::cell::Cell;
use core::marker::PhantomData;
use core::sync::atomic::{Ordering, fence};

use crate::dma::{Coherent, DmaBuf, DmaError, DmaPool, Direction, FromDevice, Segment, ToDevice};

/// Bytes of one packet buffer: a 12-byte virtio-net header and a 1514-byte
/// Ethernet frame fit, with room to spare.
pub const PACKET_SIZE: usize = 2048;
/// Packet buffers in the pool: a full receive ring and a full transmit ring
/// of 128 each.
pub const PACKETS: usize = 256;

/// Pool counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers handed out.
    pub allocs: u64,
    /// Buffers that became free again.
    pub frees: u64,
    /// Allocations refused (all in use).
    pub failures: u64,
    /// Owners that dropped a buffer the device still held.
    pub orphaned: u64,
    /// Buffers in use now.
    pub in_use: u64,
    /// Most in use at once.
    pub peak: u64,
}

/// The pool.
pub struct NetPool<'p> {
    region: DmaBuf<'p, Coherent>,
    refs: [Cell<u8>; PACKETS],
    stats: Cell<PoolStats>,
}

impl core::fmt::Debug for NetPool<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetPool").field("stats", &self.stats.get()).finish()
    }
}

impl<'p> NetPool<'p> {
    /// Takes the pool's memory (`PACKETS` × 2 KiB) from `dma`.
    pub fn new(dma: &'p DmaPool) -> Result<Self, DmaError> {
        Ok(NetPool {
            region: dma.alloc_coherent(PACKETS * PACKET_SIZE)?,
            refs: [const { Cell::new(0) }; PACKETS],
            stats: Cell::new(PoolStats::default()),
        })
    }

    /// Counters.
    pub fn stats(&self) -> PoolStats {
        self.stats.get()
    }

    fn update(&self, f: impl FnOnce(&mut PoolStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// A zeroed packet buffer, or `None` (counted) when all are in use.
    pub fn alloc<D: Direction>(&self) -> Option<Packet<'_, 'p, D>> {
        let Some(index) = self.refs.iter().position(|r| r.get() == 0) else {
            self.update(|s| s.failures += 1);
            return None;
        };
        // In range: `index` < PACKETS.
        let _ = self.region.zero(index * PACKET_SIZE, PACKET_SIZE);
        self.refs[index].set(1);
        self.update(|s| {
            s.allocs += 1;
            s.in_use += 1;
            s.peak = s.peak.max(s.in_use);
        });
        Some(Packet {
            pool: self,
            index,
            _direction: PhantomData,
        })
    }

    fn hold(&self, index: usize) {
        let r = &self.refs[index];
        r.set(r.get().saturating_add(1));
    }

    fn release(&self, index: usize) {
        let r = &self.refs[index];
        match r.get() {
            0 => {}
            1 => {
                r.set(0);
                self.update(|s| {
                    s.frees += 1;
                    s.in_use -= 1;
                });
            }
            n => r.set(n - 1),
        }
    }
}

/// One packet buffer.
#[derive(Debug)]
pub struct Packet<'n, 'p, D: Direction> {
    pool: &'n NetPool<'p>,
    index: usize,
    _direction: PhantomData<D>,
}

impl<D: Direction> Packet<'_, '_, D> {
    /// Whether a posted descriptor still points into the buffer.
    pub fn posted(&self) -> bool {
        self.pool.refs[self.index].get() > 1
    }

    /// `[offset, offset + len)` as a segment to post, its direction from the
    /// type; the device's reference is taken here and must be given back with
    /// [`Packet::completed`].
    pub fn post(&self, offset: usize, len: usize) -> Result<Segment<'_>, DmaError> {
        if offset + len > PACKET_SIZE {
            return Err(DmaError::OutOfRange {
                offset,
                len,
                size: PACKET_SIZE,
            });
        }
        let seg = self
            .pool
            .region
            .carve(self.index * PACKET_SIZE + offset, len, D::DEVICE_WRITES)?;
        self.pool.hold(self.index);
        Ok(seg)
    }

    /// The device returned every descriptor posted from this buffer (its
    /// chain completed, or the device was reset).
    pub fn completed(&self) {
        while self.posted() {
            self.pool.release(self.index);
        }
        fence(Ordering::Acquire);
    }
}

impl Packet<'_, '_, ToDevice> {
    /// Copies `data` to `offset`; fails while the device holds the buffer.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        if self.posted() {
            return Err(DmaError::InFlight);
        }
        if offset + data.len() > PACKET_SIZE {
            return Err(DmaError::OutOfRange {
                offset,
                len: data.len(),
                size: PACKET_SIZE,
            });
        }
        self.pool.region.copy_in(self.index * PACKET_SIZE + offset, data)?;
        // The bytes before the descriptor that publishes them.
        fence(Ordering::Release);
        Ok(())
    }
}

impl Packet<'_, '_, FromDevice> {
    /// Copies `out.len()` bytes from `offset` of what the device wrote; fails
    /// while the device holds the buffer.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaError> {
        if self.posted() {
            return Err(DmaError::NotSynced);
        }
        if offset + out.len() > PACKET_SIZE {
            return Err(DmaError::OutOfRange {
                offset,
                len: out.len(),
                size: PACKET_SIZE,
            });
        }
        self.pool.region.copy_out(self.index * PACKET_SIZE + offset, out)
    }
}

impl<D: Direction> Drop for Packet<'_, '_, D> {
    fn drop(&mut self) {
        if self.posted() {
            self.pool.update(|s| s.orphaned += 1);
        }
        self.pool.release(self.index);
    }
}
