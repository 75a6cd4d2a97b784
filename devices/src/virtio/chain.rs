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

use std::sync::atomic::Ordering;

use memory::{GuestFrames, PinSet};
use vm_memory::{ByteValued, Bytes, GuestAddress};

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
#[derive(Debug)]
pub struct DescriptorChain {
    pub(super) head: u16,
    pub(super) generation: u32,
    pub(super) readable: Vec<ReadableBuffer>,
    pub(super) writable: Vec<WritableBuffer>,
    /// Pins on every buffer (and indirect table) until the chain is returned
    /// or dropped.
    pub(super) pins: PinSet,
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
        self.0.take(buf.len() as u64, |addr, n| {
            // Validated and pinned RAM: the slice exists.
            if let Some(s) = frames.slice(addr, n) {
                s.copy_to(&mut buf[done..done + n]);
            }
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
            // Validated and pinned RAM: the slice exists, marking succeeds.
            if let Some(s) = frames.slice(addr, n) {
                s.copy_from(&buf[done..done + n]);
            }
            let _ = frames.mark_dirty(addr, n as u64);
            done += n;
        })
    }

    /// Writes one byte (a status byte) and marks its frame dirty.
    #[inline]
    pub fn write_u8(&mut self, frames: &GuestFrames, value: u8) -> Result<(), ShortChain> {
        self.0.take(1, |addr, _| {
            // Validated and pinned RAM: the slice exists, marking succeeds.
            if let Some(s) = frames.slice(addr, 1) {
                let _ = s.store(value, 0, Ordering::Relaxed);
            }
            let _ = frames.mark_dirty(addr, 1);
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
