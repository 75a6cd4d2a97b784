//! A descriptor chain as the device holds it (virtio 1.2 §2.7.4, §2.7.5):
//! device-readable buffers, then device-writable ones, as different types, and
//! cursors over their bytes.
//!
//! Only [`WritableBuffer`]s can be written, through a [`Writer`], which marks
//! the frames it writes dirty; a [`Reader`] reads the readable bytes in order.
//! Both cursors hand out contiguous guest-memory pieces for vectored I/O
//! straight between a file and guest memory. The queue ([`super::queue`])
//! builds chains from validated descriptors and keeps their buffers pinned
//! until they are returned.

use std::sync::atomic::{AtomicU8, Ordering};

use memory::{GuestFrames, PinSet};
use vm_memory::{ByteValued, GuestAddress, VolatileMemory, VolatileSlice};

/// A buffer the device may only read.
#[derive(Debug)]
pub struct ReadableBuffer {
    pub(super) addr: GuestAddress,
    pub(super) len: u32,
}

/// A buffer the device may write (and read back).
#[derive(Debug)]
pub struct WritableBuffer {
    pub(super) addr: GuestAddress,
    pub(super) len: u32,
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
/// One pointer: it moves from the queue through the device and back in a
/// register (a wider value returned through memory is read back before the
/// stores that wrote it can be forwarded), and the queue reuses the box with
/// its lists' allocations.
#[derive(Debug)]
pub struct DescriptorChain {
    pub(super) lists: Box<ChainLists>,
}

/// A chain's head, generation, buffers and pins.
#[derive(Debug)]
pub(super) struct ChainLists {
    pub(super) head: u16,
    pub(super) generation: u32,
    pub(super) readable: Vec<ReadableBuffer>,
    pub(super) writable: Vec<WritableBuffer>,
    /// Total bytes of `readable` and of `writable` (summed as they are
    /// collected: at most 2^16 buffers of 2^32 bytes each).
    pub(super) readable_len: u64,
    pub(super) writable_len: u64,
    /// Pins on every buffer (and indirect table) until the chain is returned
    /// or dropped.
    pub(super) pins: PinSet,
}

impl ChainLists {
    /// Empty lists pinning frames of `frames`.
    pub(super) fn new(frames: &GuestFrames) -> Self {
        ChainLists {
            head: 0,
            generation: 0,
            readable: Vec::new(),
            writable: Vec::new(),
            readable_len: 0,
            writable_len: 0,
            pins: frames.pin_set(),
        }
    }

    /// Empties the lists, keeping their allocations, and unpins everything
    /// but the last buffer's section, which stays pinned for the next chain
    /// until the queue ends the batch (see `PinSet::park`).
    pub(super) fn clear(&mut self) {
        self.pins.park();
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }
}

impl DescriptorChain {
    /// Index of the head descriptor.
    pub fn head(&self) -> u16 {
        self.lists.head
    }
    /// The generation of the queue it was popped from.
    pub fn generation(&self) -> u32 {
        self.lists.generation
    }
    /// The device-readable buffers, in chain order.
    pub fn readable(&self) -> &[ReadableBuffer] {
        &self.lists.readable
    }
    /// The device-writable buffers, in chain order.
    pub fn writable(&self) -> &[WritableBuffer] {
        &self.lists.writable
    }
    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.lists.readable_len
    }
    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u64 {
        self.lists.writable_len
    }
    /// A cursor over the readable bytes.
    pub fn reader(&self) -> Reader<'_> {
        Reader(Cursor::new(&self.lists.readable, self.lists.readable_len))
    }
    /// A cursor over the writable bytes.
    pub fn writer(&self) -> Writer<'_> {
        Writer(Cursor::new(&self.lists.writable, self.lists.writable_len))
    }

    /// Writes `value` to the last device-writable byte (where virtio-blk and
    /// others put a status byte) and marks its frame dirty; fails if the
    /// chain has no writable byte.
    pub fn write_last_u8(&self, frames: &GuestFrames, value: u8) -> Result<(), ShortChain> {
        let last = self.lists.writable.iter().rev().find(|b| b.len > 0);
        let Some(buf) = last else {
            return Err(ShortChain { wanted: 1, left: 0 });
        };
        let addr = GuestAddress(buf.addr.0 + u64::from(buf.len - 1));
        // Validated and pinned RAM: the slice exists, marking succeeds.
        if let Some(s) = frames.slice(addr, 1) {
            // A std atomic: inlined, where vm-memory's `store` is a call.
            if let Ok(byte) = s.get_atomic_ref::<AtomicU8>(0) {
                byte.store(value, Ordering::Relaxed);
            }
        }
        let _ = frames.mark_dirty(addr, 1);
        Ok(())
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
    /// A cursor at the start of `bufs`, which hold `left` bytes in all.
    fn new(bufs: &'a [B], left: u64) -> Self {
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
        self.0.take(buf.len() as u64, |addr, n| {
            // Validated and pinned RAM: the slice exists.
            if let Some(s) = frames.slice(addr, n) {
                copy_to(&s, &mut buf[done..done + n]);
            }
            done += n;
        })
    }

    /// Reads the next `N` bytes (a small header): from the current buffer
    /// directly when it holds them, the usual case.
    #[inline]
    pub fn read_array<const N: usize>(
        &mut self,
        frames: &GuestFrames,
    ) -> Result<[u8; N], ShortChain> {
        let mut out = [0u8; N];
        let c = &mut self.0;
        if let Some(buf) = c.bufs.get(c.index)
            && (buf.len - c.offset) as usize >= N
            && let Some(s) = frames.slice(GuestAddress(buf.addr.0 + u64::from(c.offset)), N)
        {
            copy_to(&s, &mut out);
            c.offset += N as u32;
            if c.offset == buf.len {
                c.index += 1;
                c.offset = 0;
            }
            c.left -= N as u64;
            return Ok(out);
        }
        self.read_exact(frames, &mut out)?;
        Ok(out)
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

/// Copies `s` into `out` (of its length). Small aligned pieces — a request
/// header, a net header — are read as whole words, which costs a load each
/// where the general copy costs a call and a loop.
#[inline]
fn copy_to(s: &VolatileSlice<'_>, out: &mut [u8]) {
    macro_rules! by_words {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            for (i, word) in out.chunks_exact_mut(N).enumerate() {
                match s.get_ref::<$t>(N * i) {
                    Ok(r) => word.copy_from_slice(&r.load().to_ne_bytes()),
                    Err(_) => {
                        s.copy_to(out);
                        return;
                    }
                }
            }
        }};
    }
    let at = s.ptr_guard().as_ptr() as usize;
    if out.len() > 32 {
        s.copy_to(out);
    } else if out.len().is_multiple_of(8) && at.is_multiple_of(8) {
        by_words!(u64)
    } else if out.len().is_multiple_of(4) && at.is_multiple_of(4) {
        by_words!(u32)
    } else {
        s.copy_to(out);
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
            // Validated and pinned RAM: the slice exists, marking succeeds.
            if let Some(s) = frames.slice(addr, n) {
                s.copy_from(&buf[done..done + n]);
            }
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
