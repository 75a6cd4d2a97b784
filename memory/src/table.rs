//! The frame table: which frames are RAM, their metadata, and what can be done to
//! frames without the allocator: look up the buddy block a frame belongs to, take
//! and drop DMA pins, mark frames dirty and collect them.
//!
//! RAM is one or more sorted, disjoint ranges of frames (`FrameMap`); the frames
//! between them (the x86 MMIO hole) have no metadata. The metadata of range `i`
//! starts at index `base_i` of the caller's `[FrameMeta]`.

use core::fmt;

use crate::addr::{FRAME_LIMIT, FrameNumber, FrameRange, PhysAddr};
use crate::meta::{FrameFlags, FrameMeta};

/// Largest buddy order: blocks of up to 2^MAX_ORDER frames (4 MiB).
pub const MAX_ORDER: u32 = 10;
/// Most RAM ranges a table describes.
pub const MAX_RANGES: usize = 8;
/// Most pins one frame can carry; further pins fail rather than overflow.
pub const MAX_PINS: u32 = 1 << 30;

/// Errors of the frame table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No RAM range was given.
    #[error("No RAM range given")]
    NoRanges,
    /// More ranges than `MAX_RANGES`.
    #[error("More than {MAX_RANGES} RAM ranges")]
    TooManyRanges,
    /// A range is empty, unsorted, overlapping or above the physical address limit.
    #[error("Invalid RAM range {0}")]
    InvalidRange(FrameRange),
    /// The metadata slice does not have one entry per RAM frame.
    #[error("Metadata holds {actual} entries for {expected} frames")]
    MetadataLength {
        /// Frames of RAM.
        expected: u64,
        /// Entries supplied.
        actual: u64,
    },
    /// A byte range wraps the address space.
    #[error("Range at {0} wraps the address space")]
    Wraps(PhysAddr),
    /// An empty byte range.
    #[error("Empty range at {0}")]
    Empty(PhysAddr),
    /// A range reaches outside RAM or across a hole.
    #[error("{0} is not contiguous RAM")]
    NotRam(FrameRange),
    /// A frame is poisoned and cannot be used for DMA.
    #[error("{0} is poisoned")]
    Poisoned(FrameNumber),
    /// A frame already carries `MAX_PINS` pins.
    #[error("{0} has too many pins")]
    TooManyPins(FrameNumber),
}

#[derive(Clone, Copy, Debug, Default)]
struct MapRange {
    frames: FrameRange,
    base: usize,
}

/// Where guest RAM is: up to `MAX_RANGES` sorted, disjoint frame ranges.
#[derive(Clone, Copy, Debug)]
pub struct FrameMap {
    ranges: [MapRange; MAX_RANGES],
    count: usize,
    total: u64,
}

impl FrameMap {
    /// A map of the given RAM ranges, which must be non-empty, sorted and disjoint.
    pub fn new(ranges: &[FrameRange]) -> Result<Self, Error> {
        if ranges.is_empty() {
            return Err(Error::NoRanges);
        }
        if ranges.len() > MAX_RANGES {
            return Err(Error::TooManyRanges);
        }
        let mut map = FrameMap {
            ranges: [MapRange::default(); MAX_RANGES],
            count: 0,
            total: 0,
        };
        let mut prev_end = 0;
        for (i, r) in ranges.iter().enumerate() {
            if r.is_empty() || r.end.0 > FRAME_LIMIT || (i > 0 && r.start.0 < prev_end) {
                return Err(Error::InvalidRange(*r));
            }
            prev_end = r.end.0;
            map.ranges[i] = MapRange {
                frames: *r,
                base: map.total as usize,
            };
            map.total += r.len();
        }
        map.count = ranges.len();
        Ok(map)
    }

    /// The RAM ranges, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = FrameRange> + '_ {
        self.ranges[..self.count].iter().map(|r| r.frames)
    }

    /// Frames of RAM in all ranges.
    pub fn total_frames(&self) -> u64 {
        self.total
    }

    /// Index of the range holding `frame`.
    #[inline]
    pub(crate) fn range_index(&self, frame: FrameNumber) -> Option<usize> {
        self.ranges[..self.count]
            .iter()
            .position(|r| r.frames.contains(frame))
    }

    /// The RAM range holding `frame`.
    pub fn range_of(&self, frame: FrameNumber) -> Option<FrameRange> {
        self.range_index(frame).map(|i| self.ranges[i].frames)
    }

    /// Metadata index of `frame`, which must lie in range `ri`.
    #[inline]
    pub(crate) fn index_in(&self, ri: usize, frame: FrameNumber) -> usize {
        let r = &self.ranges[ri];
        debug_assert!(r.frames.contains(frame));
        r.base + (frame.0 - r.frames.start.0) as usize
    }

    /// Metadata index of `frame`, if it is RAM.
    #[inline]
    pub fn index(&self, frame: FrameNumber) -> Option<usize> {
        self.range_index(frame).map(|ri| self.index_in(ri, frame))
    }

    /// The frame whose metadata sits at `index`.
    #[inline]
    pub(crate) fn frame_at(&self, index: usize) -> FrameNumber {
        let r = self.ranges[..self.count]
            .iter()
            .rev()
            .find(|r| r.base <= index)
            .expect("metadata index below the first range base");
        FrameNumber(r.frames.start.0 + (index - r.base) as u64)
    }

    #[inline]
    pub(crate) fn range_count(&self) -> usize {
        self.count
    }

    #[inline]
    pub(crate) fn range_at(&self, ri: usize) -> FrameRange {
        self.ranges[ri].frames
    }

    /// Whether `range` is non-empty and made only of RAM, with no hole inside.
    #[inline]
    pub fn is_contiguous_ram(&self, range: &FrameRange) -> bool {
        if range.is_empty() {
            return false;
        }
        let Some(mut ri) = self.range_index(range.start) else {
            return false;
        };
        loop {
            let r = self.ranges[ri].frames;
            if range.end.0 <= r.end.0 {
                return true;
            }
            ri += 1;
            if ri >= self.count || self.ranges[ri].frames.start != r.end {
                return false;
            }
        }
    }
}

/// A buddy block: `2^order` frames from `start`, with the flags of its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Head frame.
    pub start: FrameNumber,
    /// Buddy order.
    pub order: u32,
    /// Head flags (state and attributes).
    pub flags: FrameFlags,
}

impl Block {
    /// The frames of the block.
    #[inline]
    pub fn frames(&self) -> FrameRange {
        FrameRange {
            start: self.start,
            end: FrameNumber(self.start.0 + (1 << self.order)),
        }
    }
}

/// RAM ranges plus one `FrameMeta` per RAM frame, held in `S` (a `Vec`, an
/// `Arc<[FrameMeta]>` on the host, a `&'static mut [FrameMeta]` inside a guest).
#[derive(Clone)]
pub struct FrameTable<S> {
    map: FrameMap,
    meta: S,
}

impl<S: AsRef<[FrameMeta]>> FrameTable<S> {
    /// A table over `ranges`; `meta` must hold exactly one entry per RAM frame. The
    /// metadata is reset: no frame is a block head yet.
    pub fn new(ranges: &[FrameRange], meta: S) -> Result<Self, Error> {
        let map = FrameMap::new(ranges)?;
        let len = meta.as_ref().len() as u64;
        if len != map.total_frames() {
            return Err(Error::MetadataLength {
                expected: map.total_frames(),
                actual: len,
            });
        }
        meta.as_ref().iter().for_each(FrameMeta::reset);
        Ok(FrameTable { map, meta })
    }

    /// The RAM map.
    #[inline]
    pub fn map(&self) -> &FrameMap {
        &self.map
    }

    /// All metadata, in map order.
    #[inline]
    pub fn metadata(&self) -> &[FrameMeta] {
        self.meta.as_ref()
    }

    /// Metadata of `frame`, if it is RAM.
    #[inline]
    pub fn meta(&self, frame: FrameNumber) -> Option<&FrameMeta> {
        self.map.index(frame).map(|i| &self.meta.as_ref()[i])
    }

    #[inline]
    pub(crate) fn meta_at(&self, index: usize) -> &FrameMeta {
        &self.meta.as_ref()[index]
    }

    /// The block holding `frame`: the aligned candidate head at each order is
    /// probed, O(MAX_ORDER). `None` if `frame` is not RAM.
    #[inline]
    pub fn block_containing(&self, frame: FrameNumber) -> Option<Block> {
        let ri = self.map.range_index(frame)?;
        let range = self.map.range_at(ri);
        for order in 0..=MAX_ORDER {
            let head = FrameNumber(frame.0 & !((1u64 << order) - 1));
            if head < range.start {
                break;
            }
            let m = self.meta_at(self.map.index_in(ri, head));
            if m.is_head() && m.order() == order {
                return Some(Block {
                    start: head,
                    order,
                    flags: m.block_flags(),
                });
            }
        }
        None
    }

    /// Every block, in address order. Blocks tile RAM exactly.
    pub fn blocks(&self) -> Blocks<'_, S> {
        Blocks {
            table: self,
            range: 0,
            next: self.map.ranges[0].frames.start,
        }
    }

    /// Takes one DMA pin on every frame of `[addr, addr + len)` until the guard
    /// drops. Fails, changing nothing, for an empty or wrapping range, one outside
    /// RAM or across a hole, a poisoned frame, or a frame with `MAX_PINS` pins.
    pub fn pin(&self, addr: PhysAddr, len: u64) -> Result<FramePin<'_, S>, Error> {
        let range = self.pin_frames(addr, len)?;
        Ok(FramePin { table: self, range })
    }

    /// Takes the pins of `pin`; the caller must `unpin` the returned range once.
    pub(crate) fn pin_frames(&self, addr: PhysAddr, len: u64) -> Result<FrameRange, Error> {
        let range = self.ram_range(addr, len)?;
        let first = self.map.index(range.start).expect("checked RAM");
        let metas = &self.meta.as_ref()[first..first + range.len() as usize];
        for (i, m) in metas.iter().enumerate() {
            let frame = FrameNumber(range.start.0 + i as u64);
            let err = if m.block_flags().contains(FrameFlags::POISONED) {
                Some(Error::Poisoned(frame))
            } else if !m.try_pin(MAX_PINS) {
                Some(Error::TooManyPins(frame))
            } else {
                None
            };
            if let Some(err) = err {
                metas[..i].iter().for_each(FrameMeta::unpin);
                return Err(err);
            }
        }
        Ok(range)
    }

    /// Drops the pins `pin_frames` took on `range`. Only pin guards call this,
    /// with the range `pin_frames` returned.
    pub(crate) fn unpin(&self, range: FrameRange) {
        let first = self.map.index(range.start).expect("pinned range is RAM");
        self.meta.as_ref()[first..first + range.len() as usize]
            .iter()
            .for_each(FrameMeta::unpin);
    }

    /// Whether any frame of `block` carries a DMA pin.
    #[inline]
    pub fn is_block_pinned(&self, block: &Block) -> bool {
        let first = self.map.index(block.start).expect("block is RAM");
        self.meta.as_ref()[first..first + (1usize << block.order)]
            .iter()
            .any(FrameMeta::is_pinned)
    }

    /// Marks every frame of `[addr, addr + len)` dirty.
    pub fn mark_dirty(&self, addr: PhysAddr, len: u64) -> Result<(), Error> {
        let range = self.ram_range(addr, len)?;
        let first = self.map.index(range.start).expect("checked RAM");
        self.meta.as_ref()[first..first + range.len() as usize]
            .iter()
            .for_each(FrameMeta::mark_dirty);
        Ok(())
    }

    /// Clears DIRTY on every frame and reports each run of frames that had it.
    pub fn take_dirty(&self, mut report: impl FnMut(FrameRange)) {
        for range in self.map.ranges() {
            let first = self.map.index(range.start).expect("range is RAM");
            let metas = &self.meta.as_ref()[first..first + range.len() as usize];
            let mut run: Option<FrameRange> = None;
            for (i, m) in metas.iter().enumerate() {
                let frame = FrameNumber(range.start.0 + i as u64);
                if m.take_dirty() {
                    match &mut run {
                        Some(r) => r.end = FrameNumber(frame.0 + 1),
                        None => {
                            run = Some(FrameRange {
                                start: frame,
                                end: FrameNumber(frame.0 + 1),
                            })
                        }
                    }
                } else if let Some(r) = run.take() {
                    report(r);
                }
            }
            if let Some(r) = run {
                report(r);
            }
        }
    }

    /// Whether any frame of `[addr, addr + len)` carries a DMA pin.
    pub fn is_pinned(&self, addr: PhysAddr, len: u64) -> Result<bool, Error> {
        let range = self.ram_range(addr, len)?;
        let first = self.map.index(range.start).expect("checked RAM");
        Ok(self.meta.as_ref()[first..first + range.len() as usize]
            .iter()
            .any(FrameMeta::is_pinned))
    }

    /// The frames of `[addr, addr + len)`, checked to be contiguous RAM.
    fn ram_range(&self, addr: PhysAddr, len: u64) -> Result<FrameRange, Error> {
        if len == 0 {
            return Err(Error::Empty(addr));
        }
        let range = FrameRange::covering(addr, len).ok_or(Error::Wraps(addr))?;
        if !self.map.is_contiguous_ram(&range) {
            return Err(Error::NotRam(range));
        }
        Ok(range)
    }
}

impl<S> fmt::Debug for FrameTable<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameTable")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

/// DMA pins on a range of frames, borrowed from the table; dropped with the guard.
/// (The host's `GuestFrames::pin` gives an owned `PinGuard` instead.)
pub struct FramePin<'a, S: AsRef<[FrameMeta]>> {
    table: &'a FrameTable<S>,
    range: FrameRange,
}

impl<S: AsRef<[FrameMeta]>> FramePin<'_, S> {
    /// The pinned frames.
    #[inline]
    pub fn frames(&self) -> FrameRange {
        self.range
    }
}

impl<S: AsRef<[FrameMeta]>> Drop for FramePin<'_, S> {
    fn drop(&mut self) {
        self.table.unpin(self.range);
    }
}

impl<S: AsRef<[FrameMeta]>> fmt::Debug for FramePin<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FramePin")
            .field("range", &self.range)
            .finish()
    }
}

/// Iterator over the blocks of a table, in address order.
#[derive(Debug)]
pub struct Blocks<'a, S> {
    table: &'a FrameTable<S>,
    range: usize,
    next: FrameNumber,
}

impl<S: AsRef<[FrameMeta]>> Iterator for Blocks<'_, S> {
    type Item = Block;

    fn next(&mut self) -> Option<Block> {
        let map = &self.table.map;
        while self.range < map.count {
            let r = map.range_at(self.range);
            if self.next < r.end {
                let m = self.table.meta_at(map.index_in(self.range, self.next));
                let block = Block {
                    start: self.next,
                    order: m.order(),
                    flags: m.block_flags(),
                };
                // A well-formed table has a head here; step one frame otherwise so
                // a corrupted table still terminates.
                let step = if m.is_head() { 1u64 << m.order() } else { 1 };
                self.next = FrameNumber(self.next.0 + step);
                return Some(block);
            }
            self.range += 1;
            if self.range < map.count {
                self.next = map.range_at(self.range).start;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{fr, meta_for};
    use alloc::vec::Vec;

    fn table(ranges: &[FrameRange]) -> FrameTable<Vec<FrameMeta>> {
        FrameTable::new(ranges, meta_for(ranges)).unwrap()
    }

    #[test]
    fn map_rejects_bad_layouts() {
        assert_eq!(FrameMap::new(&[]).unwrap_err(), Error::NoRanges);
        assert_eq!(
            FrameMap::new(&[fr(5, 5)]).unwrap_err(),
            Error::InvalidRange(fr(5, 5))
        );
        assert_eq!(
            FrameMap::new(&[fr(10, 20), fr(15, 30)]).unwrap_err(),
            Error::InvalidRange(fr(15, 30))
        );
        assert_eq!(
            FrameMap::new(&[fr(10, 20), fr(0, 5)]).unwrap_err(),
            Error::InvalidRange(fr(0, 5))
        );
        let too_high = fr(0, FRAME_LIMIT + 1);
        assert_eq!(
            FrameMap::new(&[too_high]).unwrap_err(),
            Error::InvalidRange(too_high)
        );
        assert_eq!(
            FrameMap::new(&[fr(0, 1); MAX_RANGES + 1]).unwrap_err(),
            Error::TooManyRanges
        );
    }

    #[test]
    fn table_rejects_wrong_metadata_length() {
        let err = FrameTable::new(&[fr(0, 4)], Vec::from([FrameMeta::new()])).unwrap_err();
        assert_eq!(
            err,
            Error::MetadataLength {
                expected: 4,
                actual: 1
            }
        );
    }

    #[test]
    fn map_indexes_across_hole() {
        let map = FrameMap::new(&[fr(0, 16), fr(32, 48)]).unwrap();
        assert_eq!(map.index(FrameNumber(15)), Some(15));
        assert_eq!(map.index(FrameNumber(16)), None);
        assert_eq!(map.index(FrameNumber(32)), Some(16));
        assert_eq!(map.frame_at(16), FrameNumber(32));
        assert!(map.is_contiguous_ram(&fr(10, 16)));
        assert!(!map.is_contiguous_ram(&fr(10, 17)));
        assert!(!map.is_contiguous_ram(&fr(15, 33)));
    }

    #[test]
    fn adjacent_ranges_are_contiguous_ram() {
        let map = FrameMap::new(&[fr(0, 16), fr(16, 20)]).unwrap();
        assert!(map.is_contiguous_ram(&fr(10, 20)));
    }

    #[test]
    fn pin_rejects_ranges_outside_ram_and_changes_nothing() {
        let t = table(&[fr(0, 16), fr(32, 48)]);
        let hole = t.pin(PhysAddr(0xf000), 0x2000).unwrap_err();
        assert_eq!(hole, Error::NotRam(fr(15, 17)));
        assert_eq!(
            t.pin(PhysAddr(0x30000), 0x1000).unwrap_err(),
            Error::NotRam(fr(48, 49))
        );
        assert_eq!(
            t.pin(PhysAddr(u64::MAX), 2).unwrap_err(),
            Error::Wraps(PhysAddr(u64::MAX))
        );
        assert_eq!(
            t.pin(PhysAddr(0), 0).unwrap_err(),
            Error::Empty(PhysAddr(0))
        );
        assert!(t.metadata().iter().all(|m| m.refcount() == 0));
    }

    #[test]
    fn pin_and_unpin_touch_every_frame_of_the_range() {
        let t = table(&[fr(0, 16)]);
        let pin = t.pin(PhysAddr(0x1800), 0x1000).unwrap();
        assert_eq!(pin.frames(), fr(1, 3));
        assert!(t.is_pinned(PhysAddr(0x2000), 1).unwrap());
        assert!(!t.is_pinned(PhysAddr(0x3000), 1).unwrap());
        drop(pin);
        assert!(t.metadata().iter().all(|m| m.refcount() == 0));
    }

    #[test]
    fn pin_of_poisoned_frame_fails_and_rolls_back() {
        let t = table(&[fr(0, 16)]);
        t.meta(FrameNumber(3))
            .unwrap()
            .set_head(FrameFlags::POISONED, 0);
        assert_eq!(
            t.pin(PhysAddr(0x1000), 0x3000).unwrap_err(),
            Error::Poisoned(FrameNumber(3))
        );
        assert_eq!(t.meta(FrameNumber(1)).unwrap().refcount(), 0);
        assert_eq!(t.meta(FrameNumber(2)).unwrap().refcount(), 0);
    }

    #[test]
    fn take_dirty_reports_runs_and_clears() {
        let t = table(&[fr(0, 16), fr(32, 48)]);
        t.mark_dirty(PhysAddr(0x1000), 0x2000).unwrap();
        t.mark_dirty(PhysAddr(0xf000), 1).unwrap();
        t.mark_dirty(PhysAddr(0x20000), 1).unwrap();
        let mut runs = Vec::new();
        t.take_dirty(|r| runs.push(r));
        assert_eq!(runs, [fr(1, 3), fr(15, 16), fr(32, 33)]);
        runs.clear();
        t.take_dirty(|r| runs.push(r));
        assert!(runs.is_empty());
        assert!(t.mark_dirty(PhysAddr(0x10000), 1).is_err());
    }
}
