//! Per-frame metadata: `FrameMeta`, 64 bytes per 4 KiB frame, and `FrameFlags`.
//!
//! Every field is atomic so that DMA pins can run concurrently on device threads
//! (`&self`) while the allocator, which mutates block state, is serialised by its
//! owner (`&mut FrameAllocator`).
//!
//! Block state (FREE, ALLOCATED, RESERVED, KERNEL, POISONED) and block attributes
//! (SHARED) are kept only at the *head* frame of a buddy block; the other frames of
//! the block carry none of them. Poisoned memory is kept as order-0 blocks, so
//! POISONED is on every poisoned frame. All-zero metadata is the default state,
//! so untouched metadata costs no memory. See DESIGN.md.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Flags of a frame or of the block it heads.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FrameFlags(u32);

impl FrameFlags {
    /// No flag.
    pub const EMPTY: Self = Self(0);
    /// Head of a free block, on a free list.
    pub const FREE: Self = Self(1 << 0);
    /// Head of a block handed out by `alloc`/`alloc_range`; freeable.
    pub const ALLOCATED: Self = Self(1 << 1);
    /// Head of a block reserved for firmware or boot data; never freed.
    pub const RESERVED: Self = Self(1 << 2);
    /// Head of a block holding the kernel image or initrd; never freed.
    pub const KERNEL: Self = Self(1 << 3);
    /// Head of a one-frame block of bad memory (poisoned ranges are split down to
    /// single frames, so every poisoned frame carries it); never used or pinned.
    pub const POISONED: Self = Self(1 << 4);
    /// Block attribute: memory shared with another party (e.g. a device process).
    pub const SHARED: Self = Self(1 << 5);
    /// Block attribute: ACPI tables the guest may reclaim once it has read
    /// them (e820 type 3, "ACPI reclaimable").
    pub const ACPI: Self = Self(1 << 6);
    /// Bookkeeping: first block of an `alloc_range` allocation.
    pub const RANGE_START: Self = Self(1 << 7);
    /// Bookkeeping: a later block of an `alloc_range` allocation.
    pub const RANGE_CONT: Self = Self(1 << 8);

    /// The mutually exclusive block states; a frame with one of them is a block head.
    pub const STATE_MASK: Self = Self(
        Self::FREE.0 | Self::ALLOCATED.0 | Self::RESERVED.0 | Self::KERNEL.0 | Self::POISONED.0,
    );
    /// Attributes a caller may add to an allocation or reservation.
    pub const ATTR_MASK: Self = Self(Self::SHARED.0 | Self::ACPI.0);
    /// Everything that describes a block rather than a frame: cleared when a frame
    /// stops being a head.
    pub const HEAD_MASK: Self =
        Self(Self::STATE_MASK.0 | Self::ATTR_MASK.0 | Self::RANGE_START.0 | Self::RANGE_CONT.0);
    /// States that hold an owner reference (everything but FREE).
    pub const OWNED_MASK: Self =
        Self(Self::ALLOCATED.0 | Self::RESERVED.0 | Self::KERNEL.0 | Self::POISONED.0);

    /// Raw bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from raw bits (unknown bits are kept, and ignored by the allocator).
    #[inline]
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// Whether every flag of `other` is set.
    #[inline]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set.
    #[inline]
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The block-state part of the flags.
    #[inline]
    pub const fn state(self) -> Self {
        Self(self.0 & Self::STATE_MASK.0)
    }

    /// Whether the flags hold exactly one owned state and otherwise only attributes:
    /// what `alloc_range` and `reserve` accept.
    #[inline]
    pub const fn is_valid_owned(self) -> bool {
        let state = self.0 & Self::OWNED_MASK.0;
        state.count_ones() == 1 && self.0 & !(Self::OWNED_MASK.0 | Self::ATTR_MASK.0) == 0
    }
}

impl BitOr for FrameFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for FrameFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for FrameFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Debug for FrameFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(FrameFlags, &str); 9] = [
            (FrameFlags::FREE, "FREE"),
            (FrameFlags::ALLOCATED, "ALLOCATED"),
            (FrameFlags::RESERVED, "RESERVED"),
            (FrameFlags::KERNEL, "KERNEL"),
            (FrameFlags::POISONED, "POISONED"),
            (FrameFlags::SHARED, "SHARED"),
            (FrameFlags::ACPI, "ACPI"),
            (FrameFlags::RANGE_START, "RANGE_START"),
            (FrameFlags::RANGE_CONT, "RANGE_CONT"),
        ];
        let mut first = true;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("EMPTY")?;
        }
        Ok(())
    }
}

/// Marks the end of a free list in the allocator's view of `next`/`prev`.
/// Stored as 0 (links are kept as index + 1), so zeroed metadata has no links.
pub(crate) const NO_LINK: u64 = u64::MAX;

/// Metadata of one frame: exactly 64 bytes, 64-byte aligned (one cache line).
///
/// All zero bits is the default state: no flags, order 0, no links, no pins.
/// A frame whose metadata was never written is free RAM in its initial block
/// (see `FrameTable`), so metadata memory is committed only where used.
///
/// The last four words are meaningful only on a *section anchor*, the first
/// RAM frame of a range within a 1 GiB section (`table::SECTION_FRAMES`): the
/// DMA pins held anywhere in the section, whether the section has poisoned
/// frames, and which of its 4 MiB windows have explicit block metadata.
#[repr(C, align(64))]
pub struct FrameMeta {
    /// Block flags (state, attributes, range marks) on heads; zero elsewhere.
    /// Written only by the allocator, which its owner serialises, so plain stores
    /// suffice.
    block_flags: AtomicU32,
    /// Buddy order of the block this frame heads (meaningful on heads only).
    order: AtomicU32,
    /// Free-list links: metadata index + 1 of the neighbouring free blocks'
    /// heads, 0 for none.
    next: AtomicU64,
    prev: AtomicU64,
    /// Section anchor: DMA pins held on frames of the section (any thread).
    pins: AtomicU32,
    /// Section anchor: `SECTION_POISONED` when some frame of it is poisoned.
    section_flags: AtomicU32,
    /// Section anchor: one bit per 4 MiB window of the section whose blocks
    /// have explicit metadata (written by the allocator only).
    windows: [AtomicU64; 4],
}

const _: () = assert!(core::mem::size_of::<FrameMeta>() == 64);
const _: () = assert!(core::mem::align_of::<FrameMeta>() == 64);

/// `section_flags`: the section holds poisoned frames, so pins check frames.
pub(crate) const SECTION_POISONED: u32 = 1;

impl FrameMeta {
    /// Metadata of a frame nobody has touched: all zero.
    pub const fn new() -> Self {
        Self {
            block_flags: AtomicU32::new(0),
            order: AtomicU32::new(0),
            next: AtomicU64::new(0),
            prev: AtomicU64::new(0),
            pins: AtomicU32::new(0),
            section_flags: AtomicU32::new(0),
            windows: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// Flags of the block this frame heads (empty unless it is a head).
    #[inline]
    pub fn block_flags(&self) -> FrameFlags {
        FrameFlags(self.block_flags.load(Ordering::Acquire))
    }

    /// Buddy order, meaningful when this frame is a block head.
    #[inline]
    pub fn order(&self) -> u32 {
        self.order.load(Ordering::Relaxed)
    }

    /// Whether this frame heads a block with explicit metadata.
    #[inline]
    pub fn is_head(&self) -> bool {
        self.block_flags().intersects(FrameFlags::STATE_MASK)
    }

    /// Makes this frame the head of a block with `flags` (one state plus
    /// attributes).
    #[inline]
    pub(crate) fn set_head(&self, flags: FrameFlags, order: u32) {
        self.order.store(order, Ordering::Relaxed);
        self.block_flags
            .store(flags.0 & FrameFlags::HEAD_MASK.0, Ordering::Release);
    }

    /// Makes this frame an interior frame of a block.
    #[inline]
    pub(crate) fn clear_head(&self) {
        self.block_flags.store(0, Ordering::Release);
    }

    #[inline]
    pub(crate) fn next(&self) -> u64 {
        self.next.load(Ordering::Relaxed).wrapping_sub(1)
    }

    #[inline]
    pub(crate) fn prev(&self) -> u64 {
        self.prev.load(Ordering::Relaxed).wrapping_sub(1)
    }

    #[inline]
    pub(crate) fn set_next(&self, v: u64) {
        self.next.store(v.wrapping_add(1), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn set_prev(&self, v: u64) {
        self.prev.store(v.wrapping_add(1), Ordering::Relaxed);
    }

    /// Section anchor: DMA pins held in the section.
    #[inline]
    pub fn section_pins(&self) -> u32 {
        self.pins.load(Ordering::Acquire)
    }

    /// Section anchor: takes a pin; fails (changing nothing) at `limit` pins.
    #[inline]
    pub(crate) fn try_pin(&self, limit: u32) -> bool {
        let old = self.pins.fetch_add(1, Ordering::AcqRel);
        if old >= limit {
            self.pins.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Sets the pin count (tests only: reaching `MAX_PINS` by pinning takes
    /// too long).
    #[cfg(test)]
    pub(crate) fn pins_for_test(&self, n: u32) {
        self.pins.store(n, Ordering::Relaxed);
    }

    /// Section anchor: drops a pin.
    #[inline]
    pub(crate) fn unpin(&self) {
        self.pins.fetch_sub(1, Ordering::AcqRel);
    }

    /// Section anchor: whether the section holds poisoned frames.
    #[inline]
    pub(crate) fn section_poisoned(&self) -> bool {
        self.section_flags.load(Ordering::Acquire) & SECTION_POISONED != 0
    }

    /// Section anchor: records that the section holds poisoned frames.
    #[inline]
    pub(crate) fn set_section_poisoned(&self) {
        self.section_flags
            .store(SECTION_POISONED, Ordering::Release);
    }

    /// Section anchor: whether window `w` (0..256) has explicit metadata.
    #[inline]
    pub(crate) fn window_touched(&self, w: usize) -> bool {
        self.windows[w / 64].load(Ordering::Acquire) & (1 << (w % 64)) != 0
    }

    /// Section anchor: the touched bits of windows `64 * word ..`.
    #[inline]
    pub(crate) fn window_word(&self, word: usize) -> u64 {
        self.windows[word].load(Ordering::Acquire)
    }

    /// Section anchor: marks window `w` touched (allocator only).
    #[inline]
    pub(crate) fn touch_window(&self, w: usize) {
        let word = &self.windows[w / 64];
        word.store(
            word.load(Ordering::Relaxed) | (1 << (w % 64)),
            Ordering::Release,
        );
    }
}

impl Default for FrameMeta {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FrameMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameMeta")
            .field("flags", &self.block_flags())
            .field("order", &self.order())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_flags_need_exactly_one_state() {
        assert!(FrameFlags::ALLOCATED.is_valid_owned());
        assert!((FrameFlags::KERNEL | FrameFlags::SHARED).is_valid_owned());
        assert!(!FrameFlags::FREE.is_valid_owned());
        assert!(!FrameFlags::SHARED.is_valid_owned());
        assert!(!(FrameFlags::RESERVED | FrameFlags::KERNEL).is_valid_owned());
        assert!(!(FrameFlags::ALLOCATED | FrameFlags::RANGE_START).is_valid_owned());
    }

    #[test]
    fn zeroed_metadata_is_the_default_state() {
        // SAFETY: FrameMeta is atomics only; all-zero bits are valid.
        let zeroed: FrameMeta = unsafe { core::mem::zeroed() };
        let m = FrameMeta::new();
        for x in [&zeroed, &m] {
            assert!(!x.is_head());
            assert_eq!(
                (x.order(), x.next(), x.prev(), x.section_pins()),
                (0, NO_LINK, NO_LINK, 0)
            );
            assert!(!x.section_poisoned() && !x.window_touched(0) && !x.window_touched(255));
        }
    }

    #[test]
    fn links_round_trip_through_the_zero_encoding() {
        let m = FrameMeta::new();
        m.set_next(0);
        m.set_prev(12345);
        assert_eq!((m.next(), m.prev()), (0, 12345));
        m.set_next(NO_LINK);
        assert_eq!(m.next(), NO_LINK);
        assert_eq!(m.next.load(Ordering::Relaxed), 0, "no link is stored as 0");
    }

    #[test]
    fn section_pin_refuses_to_pass_limit() {
        let m = FrameMeta::new();
        assert!(m.try_pin(1));
        assert!(!m.try_pin(1));
        assert_eq!(m.section_pins(), 1);
        m.unpin();
        assert_eq!(m.section_pins(), 0);
    }

    #[test]
    fn window_bits_are_per_window() {
        let m = FrameMeta::new();
        m.touch_window(3);
        m.touch_window(200);
        assert!(m.window_touched(3) && m.window_touched(200));
        assert!(!m.window_touched(4) && !m.window_touched(199));
        assert_eq!(m.window_word(3), 1 << (200 - 192));
    }

    #[test]
    fn flags_debug_names_each_bit() {
        let s = alloc::format!("{:?}", FrameFlags::ALLOCATED | FrameFlags::SHARED);
        assert_eq!(s, "ALLOCATED|SHARED");
    }
}
