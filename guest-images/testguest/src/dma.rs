//! DMA memory for virtio drivers: a pool of buffers below 4 GiB, typed by who
//! writes them.
//!
//! Every buffer is a run of frames taken from the guest's buddy allocator
//! (`alloc_range` below 4 GiB, ALLOCATED), zeroed when handed out, and given
//! back when its last reference goes. The pool keeps a reference count per
//! buffer: one for the owning [`DmaBuf`], one more for every descriptor a
//! virtqueue has posted that points into it (taken at submission, dropped at
//! completion or when the device is reset). A buffer dropped while the device
//! still holds it is *orphaned*, not freed: its frames return only when the
//! device gives its last reference back, so a device can never write into
//! memory that was handed out again. The pool has a frame budget and a fixed
//! number of buffers; running out of either (or of memory) is an error the
//! caller sees and the statistics count, never a panic.
//!
//! The type parameter says who writes a buffer, after the Linux DMA API:
//!
//! | type            | CPU writes | device writes | CPU reads device output |
//! |-----------------|-----------|---------------|-------------------------|
//! | [`ToDevice`]      | yes       | no            | no                      |
//! | [`FromDevice`]    | no        | yes           | after `sync_from_device` |
//! | [`Bidirectional`] | yes       | yes           | after `sync_from_device` |
//! | [`Coherent`]      | shared: volatile loads and stores at any time (rings) |
//!
//! A streaming buffer (the first three) is *posted* through
//! [`DmaBuf::segment`], which borrows it while the segment exists and
//! carries the direction into the descriptor's WRITE flag, so a driver cannot
//! let the device write a `ToDevice` buffer, nor read a `ToDevice` buffer back
//! as device output (it has no read method). The ownership hand-over is
//! checked at run time: a buffer the CPU wrote must be `sync_to_device`d before
//! it is posted; device output can be read only after `sync_from_device`, which
//! fails while the buffer is still in flight. Every offset and length is range
//! checked. All accesses go through raw pointers, never references, so the
//! device writing guest RAM does not alias anything Rust holds.
//!
//! On x86 DMA is cache coherent: the syncs are ordering fences plus these
//! ownership checks.

use core::cell::{Cell, RefCell};
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{Ordering, fence};

use memory::buddy::Error as AllocError;
use memory::{FrameFlags, FrameNumber, FrameRange, PAGE_SIZE};

use crate::ram::Allocator;
use crate::startinfo::BOOT_MAPPED_LIMIT;

/// Buffers the pool tracks at once.
pub const MAX_BUFFERS: usize = 64;

mod sealed {
    pub trait Sealed {}
}

/// Who writes a buffer; see the module documentation.
pub trait Direction: sealed::Sealed {
    /// Whether descriptors for this buffer carry VIRTQ_DESC_F_WRITE.
    const DEVICE_WRITES: bool;
}

/// Buffers the CPU fills for the device.
pub trait CpuWrites: Direction {}
/// Buffers whose device output the CPU reads.
pub trait CpuReads: Direction {}
/// Buffers posted to the device one request at a time (not [`Coherent`]).
pub trait Streaming: Direction {}

/// The device reads, the CPU writes (request headers, data to write).
#[derive(Debug)]
pub enum ToDevice {}
/// The device writes, the CPU reads (data read, status bytes).
#[derive(Debug)]
pub enum FromDevice {}
/// Both write, in turn.
#[derive(Debug)]
pub enum Bidirectional {}
/// Shared for the buffer's whole life, accessed with volatile loads and
/// stores (virtqueue rings).
#[derive(Debug)]
pub enum Coherent {}

impl sealed::Sealed for ToDevice {}
impl sealed::Sealed for FromDevice {}
impl sealed::Sealed for Bidirectional {}
impl sealed::Sealed for Coherent {}
impl Direction for ToDevice {
    const DEVICE_WRITES: bool = false;
}
impl Direction for FromDevice {
    const DEVICE_WRITES: bool = true;
}
impl Direction for Bidirectional {
    const DEVICE_WRITES: bool = true;
}
impl Direction for Coherent {
    const DEVICE_WRITES: bool = true;
}
impl CpuWrites for ToDevice {}
impl CpuWrites for Bidirectional {}
impl CpuReads for FromDevice {}
impl CpuReads for Bidirectional {}
impl Streaming for ToDevice {}
impl Streaming for FromDevice {}
impl Streaming for Bidirectional {}

/// Why a DMA operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// A zero-length buffer was asked for.
    Empty,
    /// The frame budget or the buffer slots are used up.
    Exhausted {
        /// Frames asked for.
        frames: u64,
        /// Frames in use.
        in_use: u64,
        /// The budget.
        budget: u64,
    },
    /// The allocator has no such run below 4 GiB.
    NoMemory(AllocError),
    /// An access or segment outside the buffer.
    OutOfRange {
        /// Start of the access.
        offset: usize,
        /// Its length.
        len: usize,
        /// The buffer's length.
        size: usize,
    },
    /// The device still holds the buffer.
    InFlight,
    /// CPU writes not yet handed over with `sync_to_device`, or device output
    /// not yet taken back with `sync_from_device`.
    NotSynced,
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaError::Empty => write!(f, "empty DMA buffer"),
            DmaError::Exhausted {
                frames,
                in_use,
                budget,
            } => write!(
                f,
                "DMA pool exhausted: {frames} frames asked, {in_use} of {budget} in use (or all {MAX_BUFFERS} buffers)"
            ),
            DmaError::NoMemory(e) => write!(f, "no DMA memory below 4 GiB: {e}"),
            DmaError::OutOfRange { offset, len, size } => write!(
                f,
                "DMA access [{offset}, {offset}+{len}) outside a {size}-byte buffer"
            ),
            DmaError::InFlight => write!(f, "the device still holds the DMA buffer"),
            DmaError::NotSynced => write!(f, "DMA buffer not synced for this access"),
        }
    }
}

/// Pool statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Buffers handed out.
    pub allocs: u64,
    /// Buffers whose frames went back to the allocator.
    pub frees: u64,
    /// Allocations refused (budget, slots or memory).
    pub failures: u64,
    /// Buffers dropped by their owner while the device still held them.
    pub orphaned: u64,
    /// Buffers not yet freed.
    pub buffers_in_use: u64,
    /// Their frames.
    pub frames_in_use: u64,
    /// Most frames in use at once.
    pub peak_frames: u64,
    /// End of the highest buffer handed out (exclusive), 0 before the first.
    pub highest_end: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    frames: FrameRange,
    /// 0: slot free.
    refs: u32,
}

/// The pool; owns the frame allocator from its creation on.
pub struct DmaPool {
    alloc: RefCell<Allocator>,
    slots: [Cell<Slot>; MAX_BUFFERS],
    stats: Cell<DmaStats>,
    budget: u64,
}

impl fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaPool")
            .field("stats", &self.stats.get())
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl DmaPool {
    /// A pool handing out at most `budget` frames at once from `alloc`.
    pub fn new(alloc: Allocator, budget: u64) -> DmaPool {
        DmaPool {
            alloc: RefCell::new(alloc),
            slots: [const {
                Cell::new(Slot {
                    frames: FrameRange {
                        start: FrameNumber(0),
                        end: FrameNumber(0),
                    },
                    refs: 0,
                })
            }; MAX_BUFFERS],
            stats: Cell::new(DmaStats::default()),
            budget,
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> DmaStats {
        self.stats.get()
    }

    /// The allocator's own statistics.
    pub fn allocator_stats(&self) -> memory::Stats {
        self.alloc.borrow().stats()
    }

    fn update(&self, f: impl FnOnce(&mut DmaStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// A zeroed streaming buffer of `len` bytes.
    pub fn alloc<D: Streaming>(&self, len: usize) -> Result<DmaBuf<'_, D>, DmaError> {
        self.alloc_any(len)
    }

    /// A zeroed buffer of `len` bytes shared with the device for its whole life.
    pub fn alloc_coherent(&self, len: usize) -> Result<DmaBuf<'_, Coherent>, DmaError> {
        self.alloc_any(len)
    }

    fn alloc_any<D: Direction>(&self, len: usize) -> Result<DmaBuf<'_, D>, DmaError> {
        let result = self.take(len);
        if result.is_err() {
            self.update(|s| s.failures += 1);
        }
        let (slot, frames) = result?;
        let addr = frames.start.addr().0;
        // SAFETY: the frames were just allocated below 4 GiB (identity mapped,
        // writable) and belong to this buffer alone; no device knows them yet.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, (frames.len() * PAGE_SIZE) as usize) };
        Ok(DmaBuf {
            pool: self,
            slot,
            addr,
            len,
            cpu_dirty: false,
            synced: Cell::new(true),
            _direction: PhantomData,
        })
    }

    fn take(&self, len: usize) -> Result<(u16, FrameRange), DmaError> {
        if len == 0 {
            return Err(DmaError::Empty);
        }
        let frames = (len as u64).div_ceil(PAGE_SIZE);
        let stats = self.stats.get();
        let free_slot = self.slots.iter().position(|s| s.get().refs == 0);
        let Some(slot) = free_slot.filter(|_| stats.frames_in_use + frames <= self.budget) else {
            return Err(DmaError::Exhausted {
                frames,
                in_use: stats.frames_in_use,
                budget: self.budget,
            });
        };
        let range = self
            .alloc
            .borrow_mut()
            .alloc_range(
                frames,
                1,
                FrameNumber(BOOT_MAPPED_LIMIT / PAGE_SIZE),
                FrameFlags::ALLOCATED,
            )
            .map_err(DmaError::NoMemory)?;
        self.slots[slot].set(Slot {
            frames: range,
            refs: 1,
        });
        self.update(|s| {
            s.allocs += 1;
            s.buffers_in_use += 1;
            s.frames_in_use += frames;
            s.peak_frames = s.peak_frames.max(s.frames_in_use);
            s.highest_end = s.highest_end.max(range.end.addr().0);
        });
        Ok((slot as u16, range))
    }

    /// Takes a device reference on buffer `slot` (a descriptor was posted).
    pub fn hold(&self, slot: u16) {
        let cell = &self.slots[usize::from(slot)];
        let mut s = cell.get();
        s.refs = s.refs.saturating_add(1);
        cell.set(s);
    }

    /// Drops a reference on buffer `slot`; frees its frames with the last one.
    pub fn release(&self, slot: u16) {
        let cell = &self.slots[usize::from(slot)];
        let mut s = cell.get();
        if s.refs == 0 {
            return;
        }
        s.refs -= 1;
        cell.set(s);
        if s.refs > 0 {
            return;
        }
        // Only ranges `take` got from `alloc_range` reach here, once each, so
        // `free_range` cannot refuse; were it to, the frames stay allocated and
        // are counted as in use: leaked, never reused.
        if self.alloc.borrow_mut().free_range(s.frames).is_ok() {
            self.update(|st| {
                st.frees += 1;
                st.buffers_in_use -= 1;
                st.frames_in_use -= s.frames.len();
            });
        }
    }

    fn refs(&self, slot: u16) -> u32 {
        self.slots[usize::from(slot)].get().refs
    }
}

/// One posted piece of a buffer: what a descriptor says. The buffer stays
/// borrowed while the segment exists (no CPU writes, no sync, no drop).
#[derive(Clone, Copy, Debug)]
pub struct Segment<'b> {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (VIRTQ_DESC_F_WRITE), from the type.
    pub device_writes: bool,
    /// The pool slot to hold while the descriptor is in flight.
    pub slot: u16,
    _buffer: PhantomData<&'b ()>,
}

impl Segment<'static> {
    /// A zero-length filler for fixed-size arrays; a queue refuses to post it.
    pub const EMPTY: Segment<'static> = Segment {
        addr: 0,
        len: 0,
        device_writes: false,
        slot: 0,
        _buffer: PhantomData,
    };
}

/// A DMA buffer; see the module documentation.
pub struct DmaBuf<'p, D: Direction> {
    pool: &'p DmaPool,
    slot: u16,
    addr: u64,
    len: usize,
    /// CPU writes since the last `sync_to_device`.
    cpu_dirty: bool,
    /// Device output taken back since the buffer was last posted.
    synced: Cell<bool>,
    _direction: PhantomData<D>,
}

impl<D: Direction> fmt::Debug for DmaBuf<'_, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<D: Direction> DmaBuf<'_, D> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Guest-physical address of the first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Whether a posted descriptor still references the buffer.
    pub fn in_flight(&self) -> bool {
        self.pool.refs(self.slot) > 1
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok((self.addr + offset as u64) as *mut u8),
            _ => Err(DmaError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }
}

impl<D: Streaming> DmaBuf<'_, D> {
    /// `[offset, offset + len)` as a descriptor segment. CPU writes must have
    /// been synced to the device; device output read earlier must be synced
    /// again after this posting.
    pub fn segment(&self, offset: usize, len: usize) -> Result<Segment<'_>, DmaError> {
        self.check(offset, len)?;
        let len = u32::try_from(len).map_err(|_| DmaError::OutOfRange {
            offset,
            len,
            size: self.len,
        })?;
        if self.cpu_dirty {
            return Err(DmaError::NotSynced);
        }
        self.synced.set(false);
        Ok(Segment {
            addr: self.addr + offset as u64,
            len,
            device_writes: D::DEVICE_WRITES,
            slot: self.slot,
            _buffer: PhantomData,
        })
    }

    /// The whole buffer as one segment.
    pub fn whole(&self) -> Result<Segment<'_>, DmaError> {
        self.segment(0, self.len)
    }
}

impl DmaBuf<'_, Coherent> {
    /// `[offset, offset + len)` as a descriptor segment the device reads or
    /// writes as `device_writes` says: for a pool that carves this buffer
    /// into packet buffers of its own (`netpool`), which tracks each piece's
    /// direction and ownership itself.
    pub fn carve(&self, offset: usize, len: usize, device_writes: bool) -> Result<Segment<'_>, DmaError> {
        self.check(offset, len)?;
        let len = u32::try_from(len).map_err(|_| DmaError::OutOfRange {
            offset,
            len,
            size: self.len,
        })?;
        Ok(Segment {
            addr: self.addr + offset as u64,
            len,
            device_writes,
            slot: self.slot,
            _buffer: PhantomData,
        })
    }

    /// Copies `data` into the buffer at `offset` (for a carving pool).
    pub fn copy_in(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let p = self.check(offset, data.len())?;
        // SAFETY: `check` put the range inside the buffer, identity mapped;
        // the carving pool writes only pieces the device does not hold.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes from `offset` (for a carving pool).
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaError> {
        let p = self.check(offset, out.len())?;
        // SAFETY: inside the buffer; the carving pool reads only pieces the
        // device has given back (after an acquire fence).
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Zeroes `[offset, offset + len)` (for a carving pool).
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        let p = self.check(offset, len)?;
        // SAFETY: as for `copy_in`.
        unsafe { core::ptr::write_bytes(p, 0, len) };
        Ok(())
    }
}

impl<D: CpuWrites + Streaming> DmaBuf<'_, D> {
    /// Sets `[offset, offset + len)` to `byte(i)` for each index `i` from
    /// `offset`. Fails while the device holds the buffer.
    pub fn fill(
        &mut self,
        offset: usize,
        len: usize,
        mut byte: impl FnMut(usize) -> u8,
    ) -> Result<(), DmaError> {
        if self.in_flight() {
            return Err(DmaError::InFlight);
        }
        let p = self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: `check` put `p + i` inside the buffer, which is ours
            // (not in flight) and identity mapped.
            unsafe { p.add(i).write(byte(offset + i)) };
        }
        self.cpu_dirty = true;
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        self.fill(offset, data.len(), |i| data[i - offset])
    }

    /// Hands the CPU's writes to the device: they are visible to it before any
    /// later store that publishes the buffer.
    pub fn sync_to_device(&mut self) {
        fence(Ordering::Release);
        self.cpu_dirty = false;
    }
}

impl<D: CpuReads + Streaming> DmaBuf<'_, D> {
    /// Takes the device's output back after the request completed. Fails while
    /// a posted descriptor still references the buffer.
    pub fn sync_from_device(&mut self) -> Result<(), DmaError> {
        if self.in_flight() {
            return Err(DmaError::InFlight);
        }
        fence(Ordering::Acquire);
        self.synced.set(true);
        Ok(())
    }

    fn readable(&self, offset: usize, len: usize) -> Result<*const u8, DmaError> {
        if !self.synced.get() || self.in_flight() {
            return Err(DmaError::NotSynced);
        }
        Ok(self.check(offset, len)?.cast_const())
    }

    /// Copies `out.len()` bytes from `offset`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), DmaError> {
        let p = self.readable(offset, out.len())?;
        // SAFETY: `readable` checked the range and that the device gave the
        // buffer back; `out` is a distinct Rust buffer.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Folds `f` over the bytes of `[offset, offset + len)`.
    pub fn fold<T>(
        &self,
        offset: usize,
        len: usize,
        init: T,
        mut f: impl FnMut(T, usize, u8) -> T,
    ) -> Result<T, DmaError> {
        let p = self.readable(offset, len)?;
        let mut acc = init;
        for i in 0..len {
            // SAFETY: inside the range `readable` checked, device output synced.
            acc = f(acc, offset + i, unsafe { p.add(i).read() });
        }
        Ok(acc)
    }
}

impl DmaBuf<'_, Coherent> {
    fn shared(&self, offset: usize, len: usize) -> *mut u8 {
        match self.check(offset, len) {
            Ok(p) => p,
            Err(e) => crate::fail(format_args!("virtqueue ring: {e}")),
        }
    }

    /// Volatile 16-bit load at `offset` (little endian, as virtio rings are).
    pub fn load_u16(&self, offset: usize) -> u16 {
        let p = self.shared(offset, 2).cast::<u16>();
        // SAFETY: in range (checked), 2-aligned for the ring layouts, coherent
        // memory that the device may write at any time: hence volatile.
        u16::from_le(unsafe { p.read_volatile() })
    }

    /// Volatile 32-bit load at `offset`.
    pub fn load_u32(&self, offset: usize) -> u32 {
        let p = self.shared(offset, 4).cast::<u32>();
        // SAFETY: as for `load_u16`, 4-aligned.
        u32::from_le(unsafe { p.read_volatile() })
    }

    /// Volatile 16-bit store at `offset`.
    pub fn store_u16(&self, offset: usize, value: u16) {
        let p = self.shared(offset, 2).cast::<u16>();
        // SAFETY: as for `load_u16`; the CPU side of a shared ring field.
        unsafe { p.write_volatile(value.to_le()) }
    }

    /// Volatile 32-bit store at `offset`.
    pub fn store_u32(&self, offset: usize, value: u32) {
        let p = self.shared(offset, 4).cast::<u32>();
        // SAFETY: as for `load_u32`.
        unsafe { p.write_volatile(value.to_le()) }
    }

    /// Volatile 64-bit store at `offset`.
    pub fn store_u64(&self, offset: usize, value: u64) {
        let p = self.shared(offset, 8).cast::<u64>();
        // SAFETY: as for `load_u16`, 8-aligned.
        unsafe { p.write_volatile(value.to_le()) }
    }
}

impl<D: Direction> Drop for DmaBuf<'_, D> {
    fn drop(&mut self) {
        if self.in_flight() {
            self.pool.update(|s| s.orphaned += 1);
        }
        self.pool.release(self.slot);
    }
}
