//! Per-frame metadata: `FrameMeta`, 64 bytes per 4 KiB frame, and `FrameFlags`.
//!
//! Every field is atomic so that DMA pins and dirty marking can run concurrently on
//! device threads (`&self`) while the allocator, which mutates block state, is
//! serialised by its owner (`&mut FrameAllocator`).
//!
//! Block state (FREE, ALLOCATED, RESERVED, KERNEL, POISONED) and block attributes
//! (SHARED) are kept only at the *head* frame of a buddy block; the other frames of
//! the block carry none of them. DIRTY is per frame. Poisoned memory is kept as
//! order-0 blocks, so POISONED is on every poisoned frame. See DESIGN.md.

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
    /// Per frame: written by a device since the last `take_dirty`.
    pub const DIRTY: Self = Self(1 << 6);
    /// Bookkeeping: first block of an `alloc_range` allocation.
    pub const RANGE_START: Self = Self(1 << 7);
    /// Bookkeeping: a later block of an `alloc_range` allocation.
    pub const RANGE_CONT: Self = Self(1 << 8);

    /// The mutually exclusive block states; a frame with one of them is a block head.
    pub const STATE_MASK: Self = Self(
        Self::FREE.0 | Self::ALLOCATED.0 | Self::RESERVED.0 | Self::KERNEL.0 | Self::POISONED.0,
    );
    /// Attributes a caller may add to an allocation or reservation.
    pub const ATTR_MASK: Self = Self(Self::SHARED.0);
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
            (FrameFlags::DIRTY, "DIRTY"),
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

/// Marks the end of a free list in `FrameMeta::next`/`prev`.
pub(crate) const NO_LINK: u64 = u64::MAX;

/// Metadata of one frame: exactly 64 bytes, 64-byte aligned (one cache line).
#[repr(C, align(64))]
pub struct FrameMeta {
    /// References: the owner's one reference at the head of an owned block, plus
    /// one per DMA pin on this frame.
    refcount: AtomicU32,
    /// Block flags (state, attributes, range marks) on heads; zero elsewhere.
    /// Written only by the allocator, which its owner serialises, so plain stores
    /// suffice.
    block_flags: AtomicU32,
    /// Per-frame flags (DIRTY), set concurrently by devices.
    frame_flags: AtomicU32,
    /// Buddy order of the block this frame heads (meaningful on heads only).
    order: AtomicU32,
    /// Free-list links: metadata indices of the neighbouring free blocks' heads.
    next: AtomicU64,
    prev: AtomicU64,
    _reserved: [u64; 4],
}

const _: () = assert!(core::mem::size_of::<FrameMeta>() == 64);
const _: () = assert!(core::mem::align_of::<FrameMeta>() == 64);

impl FrameMeta {
    /// Metadata of a frame nobody has touched: no flags, no references.
    pub const fn new() -> Self {
        Self {
            refcount: AtomicU32::new(0),
            block_flags: AtomicU32::new(0),
            frame_flags: AtomicU32::new(0),
            order: AtomicU32::new(0),
            next: AtomicU64::new(NO_LINK),
            prev: AtomicU64::new(NO_LINK),
            _reserved: [0; 4],
        }
    }

    /// Current reference count.
    #[inline]
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }

    /// Block flags and per-frame flags together.
    #[inline]
    pub fn flags(&self) -> FrameFlags {
        FrameFlags(self.block_flags().0 | self.frame_flags.load(Ordering::Acquire))
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

    /// Whether this frame heads a block.
    #[inline]
    pub fn is_head(&self) -> bool {
        self.block_flags().intersects(FrameFlags::STATE_MASK)
    }

    /// The reference the block owner holds on this frame: 1 at the head of an
    /// owned block, 0 elsewhere. A frame is DMA-pinned while its refcount exceeds it.
    #[inline]
    pub fn owner_refs(&self) -> u32 {
        u32::from(self.block_flags().intersects(FrameFlags::OWNED_MASK))
    }

    /// Whether a DMA pin is held on this frame.
    #[inline]
    pub fn is_pinned(&self) -> bool {
        self.refcount() > self.owner_refs()
    }

    pub(crate) fn reset(&self) {
        // Only write what differs, so untouched zeroed metadata pages of a large
        // guest stay unpopulated.
        for word in [
            &self.refcount,
            &self.block_flags,
            &self.frame_flags,
            &self.order,
        ] {
            if word.load(Ordering::Relaxed) != 0 {
                word.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Makes this frame the head of a block with `flags` (one state plus
    /// attributes) and moves the owner reference accordingly; pins and DIRTY,
    /// which devices change concurrently, live in other words.
    #[inline]
    pub(crate) fn set_head(&self, flags: FrameFlags, order: u32) {
        self.order.store(order, Ordering::Relaxed);
        let old = FrameFlags(self.block_flags.load(Ordering::Relaxed));
        self.block_flags
            .store(flags.0 & FrameFlags::HEAD_MASK.0, Ordering::Release);
        self.move_owner_ref(old, flags);
    }

    /// Makes this frame an interior frame of a block (no state, no owner reference).
    #[inline]
    pub(crate) fn clear_head(&self) {
        let old = FrameFlags(self.block_flags.load(Ordering::Relaxed));
        self.block_flags.store(0, Ordering::Release);
        self.move_owner_ref(old, FrameFlags::EMPTY);
    }

    fn move_owner_ref(&self, old: FrameFlags, new: FrameFlags) {
        match (
            old.intersects(FrameFlags::OWNED_MASK),
            new.intersects(FrameFlags::OWNED_MASK),
        ) {
            (false, true) => {
                self.refcount.fetch_add(1, Ordering::AcqRel);
            }
            (true, false) => {
                self.refcount.fetch_sub(1, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    /// Takes a pin; fails (and changes nothing) if the count would pass `limit`.
    #[inline]
    pub(crate) fn try_pin(&self, limit: u32) -> bool {
        let old = self.refcount.fetch_add(1, Ordering::AcqRel);
        if old >= limit {
            self.refcount.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    #[inline]
    pub(crate) fn unpin(&self) {
        self.refcount.fetch_sub(1, Ordering::AcqRel);
    }

    #[inline]
    pub(crate) fn mark_dirty(&self) {
        // Test first: re-marking a dirty frame is far more common than a new one.
        if self.frame_flags.load(Ordering::Relaxed) & FrameFlags::DIRTY.0 == 0 {
            self.frame_flags
                .fetch_or(FrameFlags::DIRTY.0, Ordering::AcqRel);
        }
    }

    /// Clears DIRTY and says whether it was set.
    #[inline]
    pub(crate) fn take_dirty(&self) -> bool {
        let dirty = FrameFlags::DIRTY.0;
        self.frame_flags.load(Ordering::Relaxed) & dirty != 0
            && self.frame_flags.fetch_and(!dirty, Ordering::AcqRel) & dirty != 0
    }

    #[inline]
    pub(crate) fn next(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn prev(&self) -> u64 {
        self.prev.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn set_next(&self, v: u64) {
        self.next.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn set_prev(&self, v: u64) {
        self.prev.store(v, Ordering::Relaxed);
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
            .field("refcount", &self.refcount())
            .field("flags", &self.flags())
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
        assert!(!(FrameFlags::ALLOCATED | FrameFlags::DIRTY).is_valid_owned());
    }

    #[test]
    fn head_of_owned_block_holds_one_owner_reference() {
        let m = FrameMeta::new();
        m.set_head(FrameFlags::ALLOCATED, 3);
        assert_eq!((m.refcount(), m.order(), m.is_pinned()), (1, 3, false));
        assert!(m.try_pin(u32::MAX));
        assert!(m.is_pinned());
        m.set_head(FrameFlags::FREE, 3);
        assert_eq!(m.refcount(), 1, "pin survives the state change");
        m.unpin();
        assert_eq!((m.refcount(), m.is_pinned()), (0, false));
    }

    #[test]
    fn pin_refuses_to_pass_limit() {
        let m = FrameMeta::new();
        assert!(m.try_pin(1));
        assert!(!m.try_pin(1));
        assert_eq!(m.refcount(), 1);
    }

    #[test]
    fn dirty_survives_state_changes_and_is_taken_once() {
        let m = FrameMeta::new();
        m.mark_dirty();
        m.set_head(FrameFlags::ALLOCATED, 0);
        m.clear_head();
        assert!(m.take_dirty());
        assert!(!m.take_dirty());
    }

    #[test]
    fn flags_debug_names_each_bit() {
        let s = alloc::format!("{:?}", FrameFlags::ALLOCATED | FrameFlags::SHARED);
        assert_eq!(s, "ALLOCATED|SHARED");
    }
}
