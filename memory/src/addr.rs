//! Physical addresses, frame numbers and frame ranges.
//!
//! A frame is one 4 KiB page of guest physical memory. `PhysAddr` and
//! `FrameNumber` are distinct newtypes so that an address, an offset and a frame
//! number can never be confused; on the host side `PhysAddr` converts to and from
//! vm-memory's `GuestAddress`.

use core::fmt;

/// log2 of the frame size.
pub const PAGE_SHIFT: u32 = 12;
/// Size of one frame in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// One past the highest frame number a table accepts: 52-bit physical addresses,
/// the x86-64 architectural limit, so `FrameNumber::addr` never overflows.
pub const FRAME_LIMIT: u64 = 1 << (52 - PAGE_SHIFT);

/// A guest physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    /// The frame containing this address.
    #[inline]
    pub const fn frame(self) -> FrameNumber {
        FrameNumber(self.0 >> PAGE_SHIFT)
    }

    /// Whether the address is the first byte of a frame.
    pub const fn is_frame_aligned(self) -> bool {
        self.0 & (PAGE_SIZE - 1) == 0
    }

    /// `self + len`, or `None` if it wraps.
    #[inline]
    pub const fn checked_add(self, len: u64) -> Option<PhysAddr> {
        match self.0.checked_add(len) {
            Some(a) => Some(PhysAddr(a)),
            None => None,
        }
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A physical frame number: the physical address shifted right by `PAGE_SHIFT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrameNumber(pub u64);

impl FrameNumber {
    /// The address of the frame's first byte. Frame numbers held by a frame table
    /// are below `FRAME_LIMIT`, where this cannot overflow.
    #[inline]
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }

    /// The frame `n` frames further on, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, n: u64) -> Option<FrameNumber> {
        match self.0.checked_add(n) {
            Some(f) => Some(FrameNumber(f)),
            None => None,
        }
    }
}

impl fmt::Display for FrameNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame {:#x}", self.0)
    }
}

/// A half-open range of frames `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FrameRange {
    /// First frame of the range.
    pub start: FrameNumber,
    /// One past the last frame.
    pub end: FrameNumber,
}

impl FrameRange {
    /// `count` frames from `start`, or `None` if the end overflows.
    #[inline]
    pub const fn new(start: FrameNumber, count: u64) -> Option<FrameRange> {
        match start.checked_add(count) {
            Some(end) => Some(FrameRange { start, end }),
            None => None,
        }
    }

    /// The frames touched by the byte range `[addr, addr + len)`, or `None` if the
    /// byte range wraps the address space. `len == 0` gives an empty range.
    #[inline]
    pub const fn covering(addr: PhysAddr, len: u64) -> Option<FrameRange> {
        let Some(last) = addr.0.checked_add(len) else {
            return None;
        };
        let end = if len == 0 {
            addr.0 >> PAGE_SHIFT
        } else {
            // Round the end up; `last` does not wrap, so `last - 1` is in range.
            ((last - 1) >> PAGE_SHIFT) + 1
        };
        let start = if len == 0 { end } else { addr.0 >> PAGE_SHIFT };
        Some(FrameRange {
            start: FrameNumber(start),
            end: FrameNumber(end),
        })
    }

    /// Number of frames.
    #[inline]
    pub const fn len(&self) -> u64 {
        self.end.0.saturating_sub(self.start.0)
    }

    /// Whether the range holds no frame.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.end.0 <= self.start.0
    }

    /// Whether `frame` lies in the range.
    #[inline]
    pub const fn contains(&self, frame: FrameNumber) -> bool {
        self.start.0 <= frame.0 && frame.0 < self.end.0
    }

    /// Whether `other` lies entirely inside this range.
    pub const fn contains_range(&self, other: &FrameRange) -> bool {
        self.start.0 <= other.start.0 && other.end.0 <= self.end.0
    }

    /// Size of the range in bytes.
    pub const fn bytes(&self) -> u64 {
        self.len() << PAGE_SHIFT
    }
}

impl fmt::Display for FrameRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frames [{:#x}, {:#x})", self.start.0, self.end.0)
    }
}

#[cfg(feature = "std")]
mod host {
    use super::PhysAddr;
    use vm_memory::GuestAddress;

    impl From<GuestAddress> for PhysAddr {
        fn from(a: GuestAddress) -> Self {
            PhysAddr(a.0)
        }
    }

    impl From<PhysAddr> for GuestAddress {
        fn from(a: PhysAddr) -> Self {
            GuestAddress(a.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_rounds_to_whole_frames() {
        let r = FrameRange::covering(PhysAddr(0x1fff), 2).unwrap();
        assert_eq!(
            r,
            FrameRange {
                start: FrameNumber(1),
                end: FrameNumber(3)
            }
        );
        let r = FrameRange::covering(PhysAddr(0x1000), 0x1000).unwrap();
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn covering_rejects_wrapping_range() {
        assert!(FrameRange::covering(PhysAddr(u64::MAX - 10), 11).is_none());
        assert!(FrameRange::covering(PhysAddr(u64::MAX - 10), 10).is_some());
    }

    #[test]
    fn covering_empty_range_is_empty() {
        assert!(
            FrameRange::covering(PhysAddr(0x5000), 0)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn frame_and_address_round_trip() {
        assert_eq!(PhysAddr(0x12345).frame(), FrameNumber(0x12));
        assert_eq!(FrameNumber(0x12).addr(), PhysAddr(0x12000));
        assert!(PhysAddr(0x3000).is_frame_aligned());
        assert!(!PhysAddr(0x3001).is_frame_aligned());
    }
}
