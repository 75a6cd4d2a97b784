//! The frame table: which frames are RAM, their metadata, and what can be done to
//! frames without the allocator: look up the buddy block a frame belongs to, take
//! and drop DMA pins.
//!
//! RAM is one or more sorted, disjoint ranges of frames (`FrameMap`); the frames
//! between them (the x86 MMIO hole) have no metadata. The metadata of range `i`
//! starts at index `base_i` of the caller's `[FrameMeta]`.
//!
//! Metadata is committed on use. RAM is cut into 4 MiB *windows* (one
//! `MAX_ORDER` block each) and 1 GiB *sections* (256 windows). A window whose
//! metadata was never written is *untouched*: its frames are free and tiled by
//! their canonical blocks (the largest aligned blocks inside the range, which
//! is what a fully coalesced allocator holds), and none of its metadata is
//! read to say so. The first frame of a range within a section, its *anchor*,
//! records which windows are touched; the allocator writes every head of a
//! window when it first touches it. DMA pins are counted per section on the
//! anchor: a pin costs one atomic per section it covers, whatever its length.

use core::fmt;

use crate::addr::{FRAME_LIMIT, FrameNumber, FrameRange, PhysAddr};
use crate::meta::{FrameFlags, FrameMeta};

/// Largest buddy order: blocks of up to 2^MAX_ORDER frames (4 MiB).
pub const MAX_ORDER: u32 = 10;
/// Most RAM ranges a table describes.
pub const MAX_RANGES: usize = 8;
/// Most pins one section can carry; further pins fail rather than overflow.
pub const MAX_PINS: u32 = 1 << 30;
/// log2 of the frames of a section (1 GiB), the granularity of DMA pins.
pub const SECTION_SHIFT: u32 = 18;
/// Frames of a section.
pub const SECTION_FRAMES: u64 = 1 << SECTION_SHIFT;
/// Frames of a window: one block of the largest order (4 MiB).
pub const WINDOW_FRAMES: u64 = 1 << MAX_ORDER;
/// Windows per section: one bit each in the anchor's `windows` words.
const WINDOWS_PER_SECTION: u64 = SECTION_FRAMES / WINDOW_FRAMES;
const _: () = assert!(WINDOWS_PER_SECTION == 256);

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
    /// The section starting at this frame already carries `MAX_PINS` pins.
    #[error("Section at {0} has too many pins")]
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

/// The canonical block holding `frame` of `range`: the largest aligned block of
/// order at most `MAX_ORDER` inside the range. Canonical blocks tile the range;
/// they are what a fresh (or fully coalesced) allocator holds.
#[inline]
pub(crate) fn canonical_block(range: FrameRange, frame: u64) -> (u64, u32) {
    let mut order = MAX_ORDER;
    loop {
        let head = frame & !((1u64 << order) - 1);
        if order == 0 || (head >= range.start.0 && head + (1 << order) <= range.end.0) {
            return (head, order);
        }
        order -= 1;
    }
}

/// The largest order of a block at frame `f` that is aligned and fits in `room`.
#[inline]
pub(crate) fn largest_order(f: u64, room: u64) -> u32 {
    let align_order = if f == 0 {
        MAX_ORDER
    } else {
        f.trailing_zeros().min(MAX_ORDER)
    };
    let room_order = 63 - room.leading_zeros();
    align_order.min(room_order)
}

/// The frames of the byte range `[addr, addr + len)`: an error when it is
/// empty or wraps.
#[inline]
pub(crate) fn covering(addr: PhysAddr, len: u64) -> Result<FrameRange, Error> {
    if len == 0 {
        return Err(Error::Empty(addr));
    }
    FrameRange::covering(addr, len).ok_or(Error::Wraps(addr))
}

/// The frames of one section inside one RAM range (byte addresses), on
/// which a caller holds a pin taken by [`FrameTable::pin_anchors`]. Only the
/// table makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldSection {
    anchor: usize,
    start: u64,
    end: u64,
}

impl HeldSection {
    /// The metadata index of the section's anchor, as recorded.
    pub fn anchor(&self) -> usize {
        self.anchor
    }

    /// Whether `[addr, addr + len)` is non-empty and inside the section.
    #[inline(always)]
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        len > 0 && addr >= self.start && addr.checked_add(len).is_some_and(|end| end <= self.end)
    }
}

/// First frame of the window holding `frame`, and one past its last.
#[inline]
pub(crate) fn window_of(frame: u64) -> (u64, u64) {
    let start = frame & !(WINDOW_FRAMES - 1);
    (start, start + WINDOW_FRAMES)
}

/// The anchor's bit for the window holding `frame`.
#[inline]
fn window_bit(frame: u64) -> usize {
    ((frame >> MAX_ORDER) & (WINDOWS_PER_SECTION - 1)) as usize
}

/// RAM ranges plus one `FrameMeta` per RAM frame, held in `S` (a `Vec`, a
/// zeroed mapping on the host, a `&'static mut [FrameMeta]` inside a guest).
#[derive(Clone)]
pub struct FrameTable<S> {
    map: FrameMap,
    meta: S,
}

impl<S: AsRef<[FrameMeta]>> FrameTable<S> {
    /// A table over `ranges`; `meta` must hold exactly one entry per RAM frame,
    /// all zero (`FrameMeta::new()`, or memory never written since it was
    /// zeroed): every frame is then free. Nothing is written or read per frame,
    /// so a table over untouched zeroed memory costs no memory.
    pub fn new(ranges: &[FrameRange], meta: S) -> Result<Self, Error> {
        let map = FrameMap::new(ranges)?;
        let len = meta.as_ref().len() as u64;
        if len != map.total_frames() {
            return Err(Error::MetadataLength {
                expected: map.total_frames(),
                actual: len,
            });
        }
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

    /// The anchor of the section holding `frame` (of range `ri`): the first
    /// frame of the range in that section.
    #[inline]
    pub(crate) fn anchor(&self, ri: usize, frame: u64) -> &FrameMeta {
        self.meta_at(self.anchor_index(ri, frame))
    }

    /// The anchor's frame and metadata index, for the section holding
    /// `frame` (of range `ri`).
    #[inline]
    fn anchor_frame(&self, ri: usize, frame: u64) -> FrameNumber {
        FrameNumber((frame & !(SECTION_FRAMES - 1)).max(self.map.range_at(ri).start.0))
    }

    #[inline]
    fn anchor_index(&self, ri: usize, frame: u64) -> usize {
        self.map.index_in(ri, self.anchor_frame(ri, frame))
    }

    /// The pieces of `range` (contiguous RAM) in one range and one section
    /// each, as `(range index, first frame, end frame)`: what a pin counts on.
    #[inline]
    fn pieces(&self, range: FrameRange) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        let mut f = range.start.0;
        core::iter::from_fn(move || {
            if f >= range.end.0 {
                return None;
            }
            let ri = self
                .map
                .range_index(FrameNumber(f))
                .expect("checked contiguous RAM");
            let section_end = (f | (SECTION_FRAMES - 1)) + 1;
            let end = range
                .end
                .0
                .min(self.map.range_at(ri).end.0)
                .min(section_end);
            let piece = (ri, f, end);
            f = end;
            Some(piece)
        })
    }

    /// Whether the window holding `frame` (of range `ri`) has explicit metadata.
    #[inline]
    pub fn is_window_touched(&self, ri: usize, frame: FrameNumber) -> bool {
        self.anchor(ri, frame.0).window_touched(window_bit(frame.0))
    }

    /// Records that the window holding `frame` (of range `ri`) has explicit
    /// metadata. Only the allocator calls this, after writing every head of it.
    #[inline]
    pub(crate) fn mark_window_touched(&self, ri: usize, frame: u64) {
        self.anchor(ri, frame).touch_window(window_bit(frame));
    }

    /// The highest untouched window of range `ri` that starts below `below`,
    /// as (start, end) frames clipped to the range. Reads one anchor word per
    /// 64 windows.
    pub(crate) fn highest_untouched_window(&self, ri: usize, below: u64) -> Option<(u64, u64)> {
        let range = self.map.range_at(ri);
        let mut top = below.min(range.end.0);
        while top > range.start.0 {
            let frame = top - 1;
            let word = (window_bit(frame) / 64) as u64;
            let bits = self.anchor(ri, frame).window_word(word as usize);
            // Windows of this word at or below `frame`, highest first.
            let shift = window_bit(frame) % 64;
            let mask = if shift == 63 {
                u64::MAX
            } else {
                (1u64 << (shift + 1)) - 1
            };
            let untouched = !bits & mask;
            let word_start = (frame & !(SECTION_FRAMES - 1)) + word * 64 * WINDOW_FRAMES;
            if untouched != 0 {
                let w = 63 - u64::from(untouched.leading_zeros());
                let start = word_start + w * WINDOW_FRAMES;
                if start + WINDOW_FRAMES > range.start.0 {
                    return Some((
                        start.max(range.start.0),
                        (start + WINDOW_FRAMES).min(range.end.0),
                    ));
                }
                return None;
            }
            top = word_start;
        }
        None
    }

    /// The block holding `frame`, O(MAX_ORDER); `None` if `frame` is not RAM.
    /// In an untouched window this is the canonical block, computed without
    /// reading its metadata; elsewhere the aligned candidate head at each order
    /// is probed.
    #[inline]
    pub fn block_containing(&self, frame: FrameNumber) -> Option<Block> {
        let ri = self.map.range_index(frame)?;
        let range = self.map.range_at(ri);
        if !self.is_window_touched(ri, frame) {
            let (head, order) = canonical_block(range, frame.0);
            return Some(Block {
                start: FrameNumber(head),
                order,
                flags: FrameFlags::FREE,
            });
        }
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

    /// Takes one DMA pin on `[addr, addr + len)` until the guard drops: one
    /// count on each section the range covers. Fails, changing nothing, for an
    /// empty or wrapping range, one outside RAM or across a hole, a poisoned
    /// frame, or a section with `MAX_PINS` pins.
    pub fn pin(&self, addr: PhysAddr, len: u64) -> Result<FramePin<'_, S>, Error> {
        let range = self.pin_frames(addr, len)?;
        Ok(FramePin { table: self, range })
    }

    /// Takes the pins of `pin`; the caller must `unpin` the returned range once.
    #[inline]
    pub(crate) fn pin_frames(&self, addr: PhysAddr, len: u64) -> Result<FrameRange, Error> {
        let range = self.ram_range(addr, len)?;
        self.pin_pieces(range, |_| {})?;
        Ok(range)
    }

    /// Takes one DMA pin on `[addr, addr + len)` like [`FrameTable::pin`], and
    /// passes the metadata index of every section anchor it counted on to
    /// `record`, so that [`FrameTable::unpin_anchors`] drops it without
    /// looking anything up. A buffer inside one range and one section (nearly
    /// all) takes one range lookup and one atomic, and returns that section
    /// as a [`HeldSection`]. Given back as `held` while the caller still holds
    /// that pin (the previous buffer of the same request, typically), it lets
    /// a buffer inside the same section take nothing at all: no lookup, no
    /// atomic, nothing recorded — the section is pinned either way. On error
    /// nothing is pinned and nothing recorded.
    #[inline]
    pub fn pin_anchors(
        &self,
        addr: PhysAddr,
        len: u64,
        held: Option<HeldSection>,
        mut record: impl FnMut(usize),
    ) -> Result<Option<HeldSection>, Error> {
        if let Some(h) = held
            && h.covers(addr.0, len)
            && !self.section_poisoned(h)
        {
            return Ok(held);
        }
        let range = covering(addr, len)?;
        let (start, last) = (range.start.0, range.end.0 - 1);
        // The common case, checked without walking pieces: one range, one
        // section, no poison.
        if let Some(ri) = self.map.range_index(range.start)
            && last < self.map.range_at(ri).end.0
            && start >> SECTION_SHIFT == last >> SECTION_SHIFT
        {
            let index = self.anchor_index(ri, start);
            let anchor = self.meta_at(index);
            if !anchor.section_poisoned() {
                if !anchor.try_pin(MAX_PINS) {
                    return Err(Error::TooManyPins(self.anchor_frame(ri, start)));
                }
                record(index);
                let first = self.anchor_frame(ri, start).0;
                let end = ((start | (SECTION_FRAMES - 1)) + 1).min(self.map.range_at(ri).end.0);
                return Ok(Some(HeldSection {
                    anchor: index,
                    start: FrameNumber(first).addr().0,
                    end: FrameNumber(end).addr().0,
                }));
            }
        }
        let range = self.ram_range(addr, len)?;
        self.pin_pieces(range, record)?;
        Ok(None)
    }

    /// Counts one pin on the anchor of each piece of `range` (contiguous RAM),
    /// refusing poisoned frames and full sections; on error the pieces
    /// already counted are dropped again and nothing is recorded.
    fn pin_pieces(&self, range: FrameRange, mut record: impl FnMut(usize)) -> Result<(), Error> {
        // Records are passed on only once every piece is pinned.
        let mut failed = None;
        for (ri, f, end) in self.pieces(range) {
            let anchor = self.anchor(ri, f);
            if anchor.section_poisoned()
                && let Some(bad) = self.poisoned_frame(f, end)
            {
                failed = Some((f, Error::Poisoned(bad)));
                break;
            }
            if !anchor.try_pin(MAX_PINS) {
                failed = Some((f, Error::TooManyPins(self.anchor_frame(ri, f))));
                break;
            }
        }
        if let Some((f, err)) = failed {
            self.unpin(FrameRange {
                start: range.start,
                end: FrameNumber(f),
            });
            return Err(err);
        }
        for (ri, f, _) in self.pieces(range) {
            record(self.anchor_index(ri, f));
        }
        Ok(())
    }

    /// Whether the held section has been found to hold poisoned frames since
    /// (its pins then check frame by frame).
    #[inline(always)]
    pub fn section_poisoned(&self, held: HeldSection) -> bool {
        self.meta_at(held.anchor).section_poisoned()
    }

    /// Drops the pins recorded by [`FrameTable::pin_anchors`]; `anchors` must be
    /// exactly what it recorded, each once.
    #[inline]
    pub fn unpin_anchors(&self, anchors: &[usize]) {
        let metas = self.meta.as_ref();
        for &index in anchors {
            metas[index].unpin();
        }
    }

    /// Drops the pins `pin_frames` took on `range`. Only pin guards call this,
    /// with the range `pin_frames` returned.
    #[inline]
    pub(crate) fn unpin(&self, range: FrameRange) {
        for (ri, f, _) in self.pieces(range) {
            self.anchor(ri, f).unpin();
        }
    }

    /// The first poisoned frame of `[start, end)` (one range), if any.
    fn poisoned_frame(&self, start: u64, end: u64) -> Option<FrameNumber> {
        let mut f = FrameNumber(start);
        while f.0 < end {
            let block = self.block_containing(f)?;
            if block.flags.contains(FrameFlags::POISONED) {
                return Some(f);
            }
            f = block.frames().end;
        }
        None
    }

    /// Records that `range` (RAM) holds poisoned frames, on every section
    /// anchor it touches, so pins there check frame by frame.
    pub(crate) fn mark_poisoned_sections(&self, range: &FrameRange) {
        for (ri, f, _) in self.pieces(*range) {
            self.anchor(ri, f).set_section_poisoned();
        }
    }

    /// Whether any section overlapping `range` (RAM) carries a DMA pin: what
    /// keeps a block from being freed.
    #[inline]
    pub fn is_range_pinned(&self, range: &FrameRange) -> bool {
        self.pieces(*range)
            .any(|(ri, f, _)| self.anchor(ri, f).section_pins() > 0)
    }

    /// Whether any section overlapping `[addr, addr + len)` carries a DMA pin.
    pub fn is_pinned(&self, addr: PhysAddr, len: u64) -> Result<bool, Error> {
        let range = self.ram_range(addr, len)?;
        Ok(self.is_range_pinned(&range))
    }

    /// DMA pins held on all of RAM (each pin counts once per section it covers).
    pub fn pins(&self) -> u64 {
        self.map
            .ranges()
            .flat_map(|r| self.pieces(r))
            .map(|(ri, f, _)| u64::from(self.anchor(ri, f).section_pins()))
            .sum()
    }

    /// The frames of `[addr, addr + len)`, checked to be contiguous RAM.
    #[inline]
    pub(crate) fn ram_range(&self, addr: PhysAddr, len: u64) -> Result<FrameRange, Error> {
        let range = covering(addr, len)?;
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
                let at = self.next.0;
                let block = if self.table.is_window_touched(self.range, self.next) {
                    let m = self.table.meta_at(map.index_in(self.range, self.next));
                    Block {
                        start: self.next,
                        order: m.order(),
                        flags: m.block_flags(),
                    }
                } else {
                    // `at` starts a canonical block: the previous block ended here.
                    Block {
                        start: self.next,
                        order: largest_order(at, r.end.0 - at),
                        flags: FrameFlags::FREE,
                    }
                };
                // A well-formed table has a head here; step one frame otherwise so
                // a corrupted table still terminates.
                let step = if block.flags.intersects(FrameFlags::STATE_MASK) {
                    1u64 << block.order.min(MAX_ORDER)
                } else {
                    1
                };
                self.next = FrameNumber(at + step);
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
    use crate::test_util::{TILING_3_2053, fr, meta_for};
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
        assert_eq!(t.pins(), 0);
    }

    /// Whether every metadata entry is still all zero (nothing written).
    fn untouched(t: &FrameTable<Vec<FrameMeta>>) -> bool {
        t.metadata().iter().all(|m| {
            !m.is_head()
                && m.order() == 0
                && m.section_pins() == 0
                && (0..4).all(|w| m.window_word(w) == 0)
        })
    }

    #[test]
    fn pin_counts_once_per_section_and_unpins() {
        let t = table(&[fr(0, 16)]);
        let pin = t.pin(PhysAddr(0x1800), 0x1000).unwrap();
        assert_eq!(pin.frames(), fr(1, 3));
        assert_eq!(t.pins(), 1);
        assert!(t.is_pinned(PhysAddr(0x2000), 1).unwrap());
        assert!(
            t.is_pinned(PhysAddr(0x3000), 1).unwrap(),
            "a pin holds its whole section"
        );
        drop(pin);
        assert_eq!(t.pins(), 0);
        assert!(untouched(&t), "pins leave no trace");
    }

    #[test]
    fn pin_across_sections_and_adjacent_ranges_counts_each_piece() {
        let s = SECTION_FRAMES;
        let t = table(&[fr(0, s + 10), fr(s + 10, s + 20), fr(2 * s, 2 * s + 4)]);
        // The last frame of section 0 to the end of the second range: section
        // 0 of range 0, section 1 of range 0, section 1 of range 1.
        let pin = t.pin(FrameNumber(s - 1).addr(), 21 << 12).unwrap();
        assert_eq!(pin.frames(), fr(s - 1, s + 20));
        assert_eq!(t.pins(), 3);
        assert!(t.is_range_pinned(&fr(5, 6)));
        assert!(!t.is_range_pinned(&fr(2 * s, 2 * s + 1)), "other section");
        drop(pin);
        assert_eq!(t.pins(), 0);
    }

    #[test]
    fn pin_costs_the_same_for_any_length() {
        let t = table(&[fr(0, SECTION_FRAMES)]);
        // 1 GiB minus a page: still one count on one anchor.
        let pin = t.pin(PhysAddr(0x1000), (SECTION_FRAMES - 1) << 12).unwrap();
        assert_eq!(t.pins(), 1);
        let written = t
            .metadata()
            .iter()
            .filter(|m| m.section_pins() != 0)
            .count();
        assert_eq!(written, 1, "only the anchor holds the count");
        drop(pin);
    }

    #[test]
    fn pin_refuses_a_section_at_max_pins() {
        let t = table(&[fr(0, 16)]);
        t.meta(FrameNumber(0)).unwrap().pins_for_test(MAX_PINS);
        assert_eq!(
            t.pin(PhysAddr(0x3000), 1).unwrap_err(),
            Error::TooManyPins(FrameNumber(0))
        );
        assert_eq!(t.pins(), u64::from(MAX_PINS), "the failed pin rolled back");
    }

    #[test]
    fn untouched_table_is_tiled_by_canonical_blocks_without_writes() {
        let t = table(&[fr(3, 2048 + 5)]);
        let blocks: Vec<(u64, u32)> = t.blocks().map(|b| (b.start.0, b.order)).collect();
        assert_eq!(blocks, TILING_3_2053);
        assert!(t.blocks().all(|b| b.flags == FrameFlags::FREE));
        let b = t.block_containing(FrameNumber(700)).unwrap();
        assert_eq!((b.start.0, b.order, b.flags), (512, 9, FrameFlags::FREE));
        assert!(untouched(&t));
    }

    #[test]
    fn canonical_block_is_the_largest_aligned_block_inside_the_range() {
        let r = fr(1, 9);
        let got: Vec<_> = (1..9).map(|f| canonical_block(r, f)).collect();
        assert_eq!(
            got,
            [
                (1, 0),
                (2, 1),
                (2, 1),
                (4, 2),
                (4, 2),
                (4, 2),
                (4, 2),
                (8, 0)
            ]
        );
        assert_eq!(canonical_block(fr(0, 1 << 20), 5000), (4096, MAX_ORDER));
    }

    #[test]
    fn highest_untouched_window_skips_touched_ones_and_stays_in_range() {
        let w = WINDOW_FRAMES;
        let t = table(&[fr(5, 3 * w + 7)]);
        assert_eq!(
            t.highest_untouched_window(0, u64::MAX),
            Some((3 * w, 3 * w + 7))
        );
        t.mark_window_touched(0, 3 * w);
        t.mark_window_touched(0, 2 * w);
        assert_eq!(t.highest_untouched_window(0, u64::MAX), Some((w, 2 * w)));
        assert_eq!(t.highest_untouched_window(0, w), Some((5, w)));
        t.mark_window_touched(0, 5);
        assert_eq!(t.highest_untouched_window(0, w), None);
    }

    #[test]
    fn highest_untouched_window_crosses_sections() {
        let s = SECTION_FRAMES;
        let t = table(&[fr(s - WINDOW_FRAMES, s + WINDOW_FRAMES)]);
        t.mark_window_touched(0, s);
        assert_eq!(
            t.highest_untouched_window(0, u64::MAX),
            Some((s - WINDOW_FRAMES, s))
        );
    }

    #[test]
    fn pin_anchors_records_one_anchor_per_section_and_unpins_them() {
        let s = SECTION_FRAMES;
        let t = table(&[fr(0, s + 10), fr(s + 10, s + 20)]);
        let mut anchors = Vec::new();
        t.pin_anchors(PhysAddr(0x3000), 0x2000, None, |a| anchors.push(a))
            .unwrap();
        assert_eq!(anchors, [0], "one section: its anchor");
        t.pin_anchors(FrameNumber(s - 1).addr(), 21 << 12, None, |a| {
            anchors.push(a)
        })
        .unwrap();
        assert_eq!(anchors[1..], [0, s as usize, (s + 10) as usize]);
        assert_eq!(t.pins(), 4);
        let before = anchors.len();
        assert!(
            t.pin_anchors(PhysAddr(u64::MAX), 2, None, |a| anchors.push(a))
                .is_err()
        );
        assert!(
            t.pin_anchors(FrameNumber(s + 19).addr(), 0x2000, None, |a| anchors
                .push(a))
                .is_err(),
            "past the end of RAM"
        );
        assert_eq!(anchors.len(), before, "nothing recorded on errors");
        t.unpin_anchors(&anchors);
        assert_eq!(t.pins(), 0);
    }

    #[test]
    fn pin_anchors_takes_nothing_more_on_a_held_section() {
        let s = SECTION_FRAMES;
        let t = table(&[fr(0, s + 10), fr(s + 20, 2 * s)]);
        let mut anchors = Vec::new();
        let mut pin = |addr: u64, len: u64, held| {
            t.pin_anchors(PhysAddr(addr), len, held, |a| anchors.push(a))
        };
        let held = pin(0x3000, 0x1000, None).unwrap();
        assert!(held.is_some(), "one section: returned as held");
        assert_eq!(pin(0x8000, 0x1000, held).unwrap(), held, "inside it");
        assert_eq!(t.pins(), 1, "the held section counted once");
        let past = FrameNumber(s).addr().0;
        let other = pin(past, 0x1000, held).unwrap();
        assert!(other.is_some() && other != held, "the next section");
        assert_eq!(t.pins(), 2);
        // The held span ends with its range, not only with its section.
        let end = FrameNumber(s + 10).addr().0;
        assert!(pin(end - 0x1000, 0x2000, other).is_err(), "into the hole");
        assert!(pin(end, 1, other).is_err(), "in the hole");
        assert!(pin(0, 0, held).is_err(), "empty");
        assert!(pin(u64::MAX, 2, held).is_err(), "wrapping");
        // A poisoned section is checked frame by frame again.
        t.anchor(0, 0).set_section_poisoned();
        assert_eq!(pin(0x8000, 0x1000, held).unwrap(), None);
        assert_eq!(t.pins(), 3);
        t.unpin_anchors(&anchors);
        assert_eq!(t.pins(), 0);
    }
}
