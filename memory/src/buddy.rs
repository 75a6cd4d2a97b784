//! The buddy frame allocator.
//!
//! Free blocks of `2^order` frames (order 0..=`MAX_ORDER`) sit on one doubly
//! linked list per order, threaded through the head frames' metadata. Blocks are
//! aligned to their size in *physical* frame numbers and never cross a RAM range
//! boundary, so an order-9 block is a 2 MiB-aligned 2 MiB page.
//!
//! `alloc` and `free` touch O(MAX_ORDER) metadata entries and, for `free`, the
//! pin count of the block's section. `reserve`, `alloc_range` and `free_range`
//! walk the blocks of the range they work on. Nothing allocates heap memory.
//! Every error leaves the allocator's blocks and statistics exactly as they were.
//!
//! Building the allocator writes no metadata: every 4 MiB window starts
//! untouched (see `table`), its canonical blocks free but on no list. The
//! statistics are computed from the layout. A window is *touched* the first time
//! the allocator needs one of its blocks: `alloc` when the lists run dry (the
//! highest untouched window first, so allocations come from the top of RAM as
//! they did when every block was listed), `reserve` and `alloc_range` for the
//! windows they carve. Touching writes the window's block heads, puts them on
//! the free lists and sets the window's bit; nothing else changes, so the blocks
//! the table reports are the same before and after.

use crate::addr::{FrameNumber, FrameRange};
use crate::meta::{FrameFlags, FrameMeta, NO_LINK};
use crate::table::{
    self, Block, FrameTable, MAX_ORDER, MAX_RANGES, WINDOW_FRAMES, canonical_block, largest_order,
    window_of,
};

/// Number of free lists.
const ORDERS: usize = MAX_ORDER as usize + 1;

/// Errors of the allocator. Each leaves the allocator unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The layout or metadata given to `new` is invalid.
    #[error("Invalid frame table")]
    Table(#[from] table::Error),
    /// The order is above `MAX_ORDER`.
    #[error("Order {0} is above the maximum order {MAX_ORDER}")]
    InvalidOrder(u32),
    /// No free block of the order.
    #[error("No free block of order {0}")]
    OutOfMemory(u32),
    /// No run of free frames of the size and alignment below the limit.
    #[error("No {frames} contiguous free frames aligned to {align} below {limit}")]
    NoContiguousRange {
        /// Frames asked for.
        frames: u64,
        /// Alignment asked for, in frames.
        align: u64,
        /// Exclusive upper bound asked for.
        limit: FrameNumber,
    },
    /// The alignment is zero or not a power of two, or the size is zero.
    #[error("Invalid size or alignment")]
    InvalidRequest,
    /// The flags are not one owned state plus attributes.
    #[error("Invalid flags {0:?}")]
    InvalidFlags(FrameFlags),
    /// The frame or range is not RAM (outside the ranges, or across a hole).
    #[error("{0} is not RAM")]
    NotRam(FrameRange),
    /// The frame does not start an allocated block: a double free, or a frame
    /// inside a block.
    #[error("{0} does not start an allocated block")]
    NotAllocated(FrameNumber),
    /// The frame belongs to a reserved, kernel or poisoned block.
    #[error("{0} is reserved, not allocated")]
    Reserved(FrameNumber),
    /// The block was allocated with another order.
    #[error("{frame} heads an order-{actual} block, not order {requested}")]
    WrongOrder {
        /// Head frame.
        frame: FrameNumber,
        /// Order of the block.
        actual: u32,
        /// Order given to `free`.
        requested: u32,
    },
    /// The block belongs to an `alloc_range` allocation: use `free_range`.
    #[error("{0} belongs to a range allocation")]
    RangeAllocation(FrameNumber),
    /// `free_range` was given something other than one whole range allocation.
    #[error("Range at {0} is not exactly one range allocation")]
    NotARange(FrameNumber),
    /// A frame of the block carries a DMA pin.
    #[error("Block at {0} is pinned for DMA")]
    Pinned(FrameNumber),
    /// A frame of the range is not free.
    #[error("{0} is not free")]
    NotFree(FrameNumber),
}

/// Allocator statistics, in frames unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames on free lists.
    pub free: u64,
    /// Frames in ALLOCATED blocks.
    pub allocated: u64,
    /// Frames in RESERVED, KERNEL or POISONED blocks.
    pub reserved: u64,
    /// Allocation requests that failed for lack of memory.
    pub failed_allocations: u64,
    /// Free blocks per order.
    pub free_blocks: [u64; ORDERS],
}

/// A buddy allocator over the frames of a `FrameTable`.
pub struct FrameAllocator<S> {
    table: FrameTable<S>,
    lists: Lists,
    /// Per range: every window starting at or above this frame is touched.
    untouched_below: [u64; MAX_RANGES],
}

/// The free lists and the statistics. Apart from the table so that the hot
/// paths borrow the metadata slice once (`&[FrameMeta]`) while they update
/// the lists: through `&mut self` every access would reload the slice.
struct Lists {
    /// Metadata index of the first block on each free list.
    heads: [u64; ORDERS],
    stats: Stats,
}

impl Lists {
    /// Makes the frame at metadata `index` a FREE head of `order` and links
    /// it first on its list; the statistics already count it (it was free
    /// but untouched), or the caller counts it ([`Lists::push`]).
    #[inline]
    fn link(&mut self, metas: &[FrameMeta], index: usize, order: u32) {
        let m = &metas[index];
        let old = self.heads[order as usize];
        m.set_head(FrameFlags::FREE, order);
        m.set_prev(NO_LINK);
        m.set_next(old);
        if old != NO_LINK {
            metas[old as usize].set_prev(index as u64);
        }
        self.heads[order as usize] = index as u64;
    }

    /// Links a new free block and counts it.
    #[inline(always)]
    fn push(&mut self, metas: &[FrameMeta], index: usize, order: u32) {
        self.link(metas, index, order);
        self.stats.free += 1 << order;
        self.stats.free_blocks[order as usize] += 1;
    }

    /// Takes the free block at metadata `index` off the order-`order` list.
    /// Its own links are left as they are: only listed blocks' links are read.
    #[inline(always)]
    fn unlink(&mut self, metas: &[FrameMeta], index: usize, order: u32) {
        let m = &metas[index];
        let (prev, next) = (m.prev(), m.next());
        if prev == NO_LINK {
            self.heads[order as usize] = next;
        } else {
            metas[prev as usize].set_next(next);
        }
        if next != NO_LINK {
            metas[next as usize].set_prev(prev);
        }
        self.stats.free -= 1 << order;
        self.stats.free_blocks[order as usize] -= 1;
    }
}

impl<S: AsRef<[FrameMeta]>> FrameAllocator<S> {
    /// An allocator whose RAM is `ranges`, every frame free. `meta` holds one
    /// entry per frame of the ranges (in order), all zero (see
    /// [`FrameTable::new`]). Nothing is written or read: the statistics are
    /// O(ranges x MAX_ORDER) arithmetic.
    pub fn new(ranges: &[FrameRange], meta: S) -> Result<Self, Error> {
        let table = FrameTable::new(ranges, meta)?;
        let mut stats = Stats::default();
        let mut untouched_below = [0; MAX_RANGES];
        for (ri, range) in table.map().ranges().enumerate() {
            // The canonical blocks: small ones up to the first whole window,
            // every whole window at once, small ones after the last.
            let mut f = range.start.0;
            while f < range.end.0 {
                if f.is_multiple_of(WINDOW_FRAMES) && range.end.0 - f >= WINDOW_FRAMES {
                    let windows = (range.end.0 - f) / WINDOW_FRAMES;
                    stats.free += windows * WINDOW_FRAMES;
                    stats.free_blocks[MAX_ORDER as usize] += windows;
                    f += windows * WINDOW_FRAMES;
                    continue;
                }
                let order = largest_order(f, range.end.0 - f);
                stats.free += 1 << order;
                stats.free_blocks[order as usize] += 1;
                f += 1 << order;
            }
            untouched_below[ri] = range.end.0;
        }
        Ok(FrameAllocator {
            table,
            lists: Lists {
                heads: [NO_LINK; ORDERS],
                stats,
            },
            untouched_below,
        })
    }

    /// The frame table (metadata, pins, dirty frames).
    pub fn table(&self) -> &FrameTable<S> {
        &self.table
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        self.lists.stats
    }

    /// Allocates a block of `2^order` frames; its head gets ALLOCATED.
    pub fn alloc(&mut self, order: u32) -> Result<FrameNumber, Error> {
        if order > MAX_ORDER {
            return Err(Error::InvalidOrder(order));
        }
        let have = loop {
            if let Some(have) =
                (order..=MAX_ORDER).find(|&o| self.lists.heads[o as usize] != NO_LINK)
            {
                break have;
            }
            if !self.touch_highest_window() {
                self.lists.stats.failed_allocations += 1;
                return Err(Error::OutOfMemory(order));
            }
        };
        let (metas, lists) = (self.table.metadata(), &mut self.lists);
        let index = lists.heads[have as usize] as usize;
        lists.unlink(metas, index, have);
        // Split, giving back the upper half at each step (a block lies in
        // one range, whose metadata indices follow its frames).
        for o in (order..have).rev() {
            lists.push(metas, index + (1 << o), o);
        }
        metas[index].set_head(FrameFlags::ALLOCATED, order);
        lists.stats.allocated += 1 << order;
        Ok(self.table.map().frame_at(index))
    }

    /// Frees the block of `2^order` frames at `frame`, merging it with free buddies.
    pub fn free(&mut self, frame: FrameNumber, order: u32) -> Result<(), Error> {
        let block = self.allocated_block(frame)?;
        if block.order != order {
            return Err(Error::WrongOrder {
                frame,
                actual: block.order,
                requested: order,
            });
        }
        if self.table.is_range_pinned(&block.frames()) {
            return Err(Error::Pinned(frame));
        }
        self.release(block);
        Ok(())
    }

    /// Allocates `frames` contiguous frames starting at a multiple of `align`
    /// frames and ending at or below `limit`, as high as possible. The range is
    /// made of buddy blocks whose heads get `flags` (one owned state such as
    /// ALLOCATED, RESERVED or KERNEL, plus attributes). Free it with `free_range`.
    pub fn alloc_range(
        &mut self,
        frames: u64,
        align: u64,
        limit: FrameNumber,
        flags: FrameFlags,
    ) -> Result<FrameRange, Error> {
        if frames == 0 || align == 0 || !align.is_power_of_two() {
            return Err(Error::InvalidRequest);
        }
        if !flags.is_valid_owned() {
            return Err(Error::InvalidFlags(flags));
        }
        let Some(range) = self.find_free_run(frames, align, limit) else {
            self.lists.stats.failed_allocations += 1;
            return Err(Error::NoContiguousRange {
                frames,
                align,
                limit,
            });
        };
        self.carve(range, flags, true);
        Ok(range)
    }

    /// Takes the free frames of `range` out of the allocator with `flags` (one
    /// owned state plus attributes): for the kernel image, firmware tables, bad
    /// memory. Fails unless every frame of `range` is free RAM.
    pub fn reserve(&mut self, range: FrameRange, flags: FrameFlags) -> Result<(), Error> {
        if !flags.is_valid_owned() {
            return Err(Error::InvalidFlags(flags));
        }
        if !self.table.map().is_contiguous_ram(&range) {
            return Err(Error::NotRam(range));
        }
        let mut f = range.start;
        while f < range.end {
            let block = self
                .table
                .block_containing(f)
                .expect("RAM frame is in a block");
            if block.flags.state() != FrameFlags::FREE {
                return Err(Error::NotFree(f));
            }
            f = block.frames().end;
        }
        if flags.contains(FrameFlags::POISONED) {
            self.table.mark_poisoned_sections(&range);
        }
        self.carve(range, flags, false);
        Ok(())
    }

    /// Frees a range that `alloc_range` returned with ALLOCATED: exactly that
    /// range, not a part of it nor a block from `alloc`.
    pub fn free_range(&mut self, range: FrameRange) -> Result<(), Error> {
        if !self.table.map().is_contiguous_ram(&range) {
            return Err(Error::NotRam(range));
        }
        let mut f = range.start;
        while f < range.end {
            let block = self.allocated_head(f)?;
            let mark = if f == range.start {
                FrameFlags::RANGE_START
            } else {
                FrameFlags::RANGE_CONT
            };
            if !block.flags.contains(mark) || block.frames().end > range.end {
                return Err(Error::NotARange(range.start));
            }
            if self.table.is_range_pinned(&block.frames()) {
                return Err(Error::Pinned(f));
            }
            f = block.frames().end;
        }
        // The allocation must not go on past the end of `range`.
        if let Some(next) = self.table.block_containing(range.end)
            && next.start == range.end
            && next.flags.contains(FrameFlags::RANGE_CONT)
        {
            return Err(Error::NotARange(range.start));
        }
        let mut f = range.start;
        while f < range.end {
            let block = self.allocated_head(f).expect("validated above");
            f = block.frames().end;
            self.release(block);
        }
        Ok(())
    }

    /// Checks every invariant of the allocator against its metadata, O(frames):
    /// blocks tile RAM, are aligned and inside one range; interior frames are not
    /// heads; untouched windows hold only zero metadata; the free lists hold
    /// exactly the listed FREE heads of their order, correctly linked; poisoned
    /// frames are flagged on their section; the statistics agree with the
    /// metadata. For tests and fuzzing.
    pub fn check_consistency(&self) -> Result<(), &'static str> {
        let map = self.table.map();
        let (mut free, mut allocated, mut reserved) = (0, 0, 0);
        let mut free_blocks = [0u64; ORDERS];
        let mut listed = [0u64; ORDERS];
        for block in self.table.blocks() {
            let ri = map.range_index(block.start).ok_or("block outside RAM")?;
            let touched = self.table.is_window_touched(ri, block.start);
            let meta = self.table.meta(block.start).ok_or("block outside RAM")?;
            if touched && (!meta.is_head() || block.order > MAX_ORDER) {
                return Err("frame at a block boundary is not a head");
            }
            let frames = block.frames();
            if block.start.0 % (1 << block.order) != 0 {
                return Err("block not aligned to its size");
            }
            if map
                .range_of(block.start)
                .is_none_or(|r| !r.contains_range(&frames))
            {
                return Err("block crosses a range boundary");
            }
            let first = if touched {
                block.start.0 + 1
            } else {
                block.start.0
            };
            if (first..frames.end.0).any(|f| {
                self.table
                    .meta(FrameNumber(f))
                    .is_some_and(FrameMeta::is_head)
            }) {
                return Err("interior frame marked as a head");
            }
            if !touched && frames.end.0 > self.untouched_below[ri] {
                return Err("untouched window above the touch cursor");
            }
            let n = 1u64 << block.order;
            match block.flags.state() {
                s if s == FrameFlags::FREE => {
                    free += n;
                    free_blocks[block.order as usize] += 1;
                    if touched {
                        listed[block.order as usize] += 1;
                    }
                }
                s if s == FrameFlags::ALLOCATED => allocated += n,
                s if s == FrameFlags::POISONED => {
                    if !self.table.anchor(ri, block.start.0).section_poisoned() {
                        return Err("poisoned frame in a section not marked poisoned");
                    }
                    reserved += n;
                }
                s if s.is_valid_owned() => reserved += n,
                _ => return Err("head with an invalid state"),
            }
        }
        for (order, (&head, &expected)) in self.lists.heads.iter().zip(&listed).enumerate() {
            let (mut index, mut prev, mut count) = (head, NO_LINK, 0u64);
            while index != NO_LINK {
                let m = self
                    .table
                    .metadata()
                    .get(index as usize)
                    .ok_or("free-list link out of range")?;
                if m.block_flags().state() != FrameFlags::FREE || m.order() as usize != order {
                    return Err("free list holds a block that is not free at its order");
                }
                if m.prev() != prev {
                    return Err("free list back link broken");
                }
                count += 1;
                if count > expected {
                    return Err("free list longer than the free blocks of its order");
                }
                (prev, index) = (index, m.next());
            }
            if count != expected {
                return Err("free list misses free blocks");
            }
        }
        let s = &self.lists.stats;
        if (s.free, s.allocated, s.reserved, s.free_blocks)
            != (free, allocated, reserved, free_blocks)
        {
            return Err("statistics disagree with the metadata");
        }
        Ok(())
    }

    /// The block `alloc` handed out at `frame`, or why there is none.
    fn allocated_block(&self, frame: FrameNumber) -> Result<Block, Error> {
        let block = self.allocated_head(frame)?;
        if block
            .flags
            .intersects(FrameFlags::RANGE_START | FrameFlags::RANGE_CONT)
        {
            return Err(Error::RangeAllocation(frame));
        }
        Ok(block)
    }

    /// The ALLOCATED block headed by `frame`, or why there is none.
    fn allocated_head(&self, frame: FrameNumber) -> Result<Block, Error> {
        let one = FrameRange {
            start: frame,
            end: FrameNumber(frame.0.saturating_add(1)),
        };
        let block = self
            .table
            .block_containing(frame)
            .ok_or(Error::NotRam(one))?;
        let state = block.flags.state();
        if state != FrameFlags::FREE && state != FrameFlags::ALLOCATED {
            return Err(Error::Reserved(frame));
        }
        if state != FrameFlags::ALLOCATED || block.start != frame {
            return Err(Error::NotAllocated(frame));
        }
        Ok(block)
    }

    /// Returns an allocated block to the free lists, merging buddies.
    fn release(&mut self, block: Block) {
        let map = self.table.map();
        let ri = map.range_index(block.start).expect("block is RAM");
        let range = map.range_at(ri);
        // Metadata index of the range's first frame: frames of one range
        // have consecutive indices.
        let base = map.index_in(ri, range.start);
        let at = |frame: u64| base + (frame - range.start.0) as usize;
        let (metas, lists) = (self.table.metadata(), &mut self.lists);
        let mut head = block.start.0;
        let mut order = block.order;
        lists.stats.allocated -= 1 << order;
        metas[at(head)].clear_head();
        while order < MAX_ORDER {
            let buddy = head ^ (1 << order);
            if buddy < range.start.0 || buddy + (1 << order) > range.end.0 {
                break;
            }
            let bi = at(buddy);
            let bm = &metas[bi];
            if bm.block_flags().state() != FrameFlags::FREE || bm.order() != order {
                break;
            }
            lists.unlink(metas, bi, order);
            bm.clear_head();
            head &= !(1 << order);
            order += 1;
        }
        lists.push(metas, at(head), order);
    }

    /// Highest `[s, s + frames)` of free RAM with `s % align == 0`, ending at or
    /// below `limit`: walks blocks downwards from `limit`, growing a run of
    /// contiguous free blocks until the request fits in it.
    fn find_free_run(&self, frames: u64, align: u64, limit: FrameNumber) -> Option<FrameRange> {
        let map = self.table.map();
        let mut run_end: Option<u64> = None;
        let mut higher_start: Option<u64> = None;
        for ri in (0..map.range_count()).rev() {
            let r = map.range_at(ri);
            if higher_start != Some(r.end.0) || r.end.0 > limit.0 {
                run_end = None; // a hole (or the limit) ends the run
            }
            higher_start = Some(r.start.0);
            let mut cursor = r.end.0.min(limit.0);
            while cursor > r.start.0 {
                let block = self
                    .table
                    .block_containing(FrameNumber(cursor - 1))
                    .expect("RAM is tiled");
                let bstart = block.start.0;
                if block.flags.state() == FrameFlags::FREE {
                    let end = *run_end.get_or_insert(cursor);
                    if let Some(s) = end.checked_sub(frames).map(|top| top & !(align - 1))
                        && s >= bstart
                    {
                        return FrameRange::new(FrameNumber(s), frames);
                    }
                } else {
                    run_end = None;
                }
                cursor = bstart;
            }
        }
        None
    }

    /// Gives the frames of `range`, all free, the owned `flags`: every free block
    /// overlapping it is unlinked and split so that the parts inside become owned
    /// blocks and the parts outside go back on the free lists. With `mark`, the
    /// blocks are tagged as one range allocation for `free_range`.
    fn carve(&mut self, range: FrameRange, flags: FrameFlags, mark: bool) {
        let mut w = range.start.0;
        while w < range.end.0 {
            let ri = self.table.map().range_index(FrameNumber(w)).expect("RAM");
            self.touch_window(ri, w);
            w = window_of(w).1.min(self.table.map().range_at(ri).end.0);
        }
        let (table, lists) = (&self.table, &mut self.lists);
        let mut f = range.start;
        while f < range.end {
            let block = table.block_containing(f).expect("free RAM");
            let ri = table.map().range_index(f).expect("RAM");
            let index = table.map().index_in(ri, block.start);
            lists.unlink(table.metadata(), index, block.order);
            table.meta_at(index).clear_head();
            let piece = Piece {
                range: &range,
                flags,
                mark,
                base: (index as u64).wrapping_sub(block.start.0),
            };
            split_into(table.metadata(), lists, &piece, block.start.0, block.order);
            f = block.frames().end;
        }
    }

    /// Gives the window holding `frame` (of range `ri`) explicit metadata if it
    /// has none: each of its canonical blocks becomes a listed FREE head.
    fn touch_window(&mut self, ri: usize, frame: u64) {
        if self.table.is_window_touched(ri, FrameNumber(frame)) {
            return;
        }
        let range = self.table.map().range_at(ri);
        let (start, end) = window_of(frame);
        let (start, end) = (start.max(range.start.0), end.min(range.end.0));
        let first = self.table.map().index_in(ri, FrameNumber(start));
        let mut f = start;
        while f < end {
            let (head, order) = canonical_block(range, f);
            debug_assert_eq!(head, f);
            self.lists.link(
                self.table.metadata(),
                first + (head - start) as usize,
                order,
            );
            f += 1 << order;
        }
        // After the heads: a reader that sees the bit sees them.
        self.table.mark_window_touched(ri, start);
    }

    /// Touches the highest untouched window of RAM, if any is left; false when
    /// every window is touched.
    fn touch_highest_window(&mut self) -> bool {
        for ri in (0..self.table.map().range_count()).rev() {
            match self
                .table
                .highest_untouched_window(ri, self.untouched_below[ri])
            {
                Some((start, _)) => {
                    self.touch_window(ri, start);
                    self.untouched_below[ri] = start;
                    return true;
                }
                None => self.untouched_below[ri] = self.table.map().range_at(ri).start.0,
            }
        }
        false
    }
}

/// What `carve` gives the blocks inside its range.
struct Piece<'a> {
    range: &'a FrameRange,
    flags: FrameFlags,
    mark: bool,
    /// Metadata index minus frame number (wrapping), for the block's range.
    base: u64,
}

/// Splits the free block of `2^order` frames at `head` (unlinked, no head)
/// so that its parts inside `piece.range` become owned blocks with the
/// piece's flags and the parts outside go back on the free lists.
fn split_into(metas: &[FrameMeta], lists: &mut Lists, piece: &Piece<'_>, head: u64, order: u32) {
    let (range, flags) = (piece.range, piece.flags);
    let end = head + (1 << order);
    let inside = range.start.0 <= head && end <= range.end.0;
    let outside = end <= range.start.0 || range.end.0 <= head;
    // Poisoned memory is kept frame by frame, so each bad frame is a head.
    let whole = !flags.contains(FrameFlags::POISONED) || order == 0;
    let index = piece.base.wrapping_add(head) as usize;
    if outside {
        lists.push(metas, index, order);
    } else if inside && whole {
        let mut flags = flags;
        if piece.mark {
            flags |= if head == range.start.0 {
                FrameFlags::RANGE_START
            } else {
                FrameFlags::RANGE_CONT
            };
        }
        metas[index].set_head(flags, order);
        if flags.contains(FrameFlags::ALLOCATED) {
            lists.stats.allocated += 1 << order;
        } else {
            lists.stats.reserved += 1 << order;
        }
    } else {
        let half = order - 1;
        split_into(metas, lists, piece, head, half);
        split_into(metas, lists, piece, head + (1 << half), half);
    }
}

impl<S> core::fmt::Debug for FrameAllocator<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("table", &self.table)
            .field("stats", &self.lists.stats)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PhysAddr;
    use crate::test_util::{TILING_3_2053, fr, meta_for};
    use alloc::vec::Vec;

    fn allocator(ranges: &[FrameRange]) -> FrameAllocator<Vec<FrameMeta>> {
        FrameAllocator::new(ranges, meta_for(ranges)).unwrap()
    }

    /// Everything observable: statistics, blocks, pins.
    fn snapshot(a: &FrameAllocator<Vec<FrameMeta>>) -> (Stats, Vec<Block>, u64) {
        (a.stats(), a.table().blocks().collect(), a.table().pins())
    }

    /// Metadata entries that are not all zero.
    fn written(a: &FrameAllocator<Vec<FrameMeta>>) -> usize {
        a.table()
            .metadata()
            .iter()
            .filter(|m| m.is_head() || m.order() != 0 || (0..4).any(|w| m.window_word(w) != 0))
            .count()
    }

    /// Runs `op`, which must fail with `expected` and change nothing.
    fn assert_rejected<T: core::fmt::Debug>(
        a: &mut FrameAllocator<Vec<FrameMeta>>,
        expected: Error,
        op: impl FnOnce(&mut FrameAllocator<Vec<FrameMeta>>) -> Result<T, Error>,
    ) {
        let before = snapshot(a);
        assert_eq!(op(a).unwrap_err(), expected);
        let mut after = snapshot(a);
        after.0.failed_allocations = before.0.failed_allocations;
        assert_eq!(before, after, "a rejected operation changed the allocator");
        a.check_consistency().unwrap();
    }

    #[test]
    fn new_tiles_ranges_into_maximal_aligned_blocks() {
        let a = allocator(&[fr(3, 2048 + 5)]);
        let orders: Vec<(u64, u32)> = a.table().blocks().map(|b| (b.start.0, b.order)).collect();
        assert_eq!(orders, TILING_3_2053);
        assert_eq!(a.stats().free, 2050);
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_splits_and_free_coalesces_back() {
        let mut a = allocator(&[fr(0, 1024)]);
        let f = a.alloc(0).unwrap();
        assert_eq!(a.stats().free_blocks[..10], [1; 10]);
        assert_eq!(a.stats().allocated, 1);
        a.check_consistency().unwrap();
        a.free(f, 0).unwrap();
        assert_eq!(a.stats().free_blocks[10], 1);
        assert_eq!(a.stats().free, 1024);
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_returns_blocks_aligned_to_their_size() {
        let mut a = allocator(&[fr(1, 4096)]);
        for order in [9, 3, 0, 5, 9] {
            let f = a.alloc(order).unwrap();
            assert_eq!(f.0 % (1 << order), 0);
            let b = a.table().block_containing(f).unwrap();
            assert_eq!(
                (b.start, b.order, b.flags),
                (f, order, FrameFlags::ALLOCATED)
            );
        }
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_rejects_order_above_max() {
        let mut a = allocator(&[fr(0, 16)]);
        assert_rejected(&mut a, Error::InvalidOrder(MAX_ORDER + 1), |a| {
            a.alloc(MAX_ORDER + 1)
        });
    }

    #[test]
    fn alloc_out_of_memory_fails_cleanly_and_is_counted() {
        let mut a = allocator(&[fr(0, 4)]);
        a.alloc(2).unwrap();
        assert_rejected(&mut a, Error::OutOfMemory(0), |a| a.alloc(0));
        assert_eq!(a.stats().failed_allocations, 1);
    }

    #[test]
    fn double_free_is_rejected_and_changes_nothing() {
        let mut a = allocator(&[fr(0, 64)]);
        let f = a.alloc(0).unwrap();
        let g = a.alloc(0).unwrap();
        a.free(f, 0).unwrap();
        // f is now a free order-0 block (its buddy g is allocated).
        assert_rejected(&mut a, Error::NotAllocated(f), |a| a.free(f, 0));
        a.free(g, 0).unwrap();
        // Both merged away into one large block: f is now an interior frame.
        assert_rejected(&mut a, Error::NotAllocated(g), |a| a.free(g, 0));
    }

    #[test]
    fn free_with_wrong_order_is_rejected() {
        let mut a = allocator(&[fr(0, 64)]);
        let f = a.alloc(3).unwrap();
        let err = Error::WrongOrder {
            frame: f,
            actual: 3,
            requested: 2,
        };
        assert_rejected(&mut a, err, |a| a.free(f, 2));
    }

    #[test]
    fn free_of_interior_frame_is_rejected() {
        let mut a = allocator(&[fr(0, 64)]);
        let f = a.alloc(3).unwrap();
        let inner = FrameNumber(f.0 + 1);
        assert_rejected(&mut a, Error::NotAllocated(inner), |a| a.free(inner, 0));
    }

    #[test]
    fn free_of_reserved_frame_is_rejected() {
        let mut a = allocator(&[fr(0, 64)]);
        a.reserve(fr(8, 16), FrameFlags::RESERVED).unwrap();
        a.reserve(fr(16, 17), FrameFlags::KERNEL).unwrap();
        assert_rejected(&mut a, Error::Reserved(FrameNumber(8)), |a| {
            a.free(FrameNumber(8), 3)
        });
        assert_rejected(&mut a, Error::Reserved(FrameNumber(16)), |a| {
            a.free(FrameNumber(16), 0)
        });
        assert_rejected(&mut a, Error::Reserved(FrameNumber(8)), |a| {
            a.free_range(fr(8, 16))
        });
    }

    #[test]
    fn free_outside_ranges_is_rejected() {
        let mut a = allocator(&[fr(0, 16), fr(32, 48)]);
        assert_rejected(&mut a, Error::NotRam(fr(20, 21)), |a| {
            a.free(FrameNumber(20), 0)
        });
        assert_rejected(&mut a, Error::NotRam(fr(u64::MAX, u64::MAX)), |a| {
            a.free(FrameNumber(u64::MAX), 0)
        });
        assert_rejected(&mut a, Error::NotRam(fr(8, 40)), |a| {
            a.free_range(fr(8, 40))
        });
    }

    #[test]
    fn free_of_pinned_block_is_rejected_until_unpinned() {
        let mut a = allocator(&[fr(0, 64)]);
        let f = a.alloc(2).unwrap();
        // A pin on an interior frame (held without a guard, so `a` stays mutable).
        let pin = a
            .table()
            .pin_frames(PhysAddr(f.addr().0 + 0x2000), 1)
            .unwrap();
        assert!(a.table().is_range_pinned(&pin));
        let before = snapshot(&a);
        assert_eq!(a.free(f, 2).unwrap_err(), Error::Pinned(f));
        assert_eq!(before, snapshot(&a));
        a.table().unpin(pin);
        a.free(f, 2).unwrap();
        a.check_consistency().unwrap();
    }

    #[test]
    fn buddies_do_not_merge_across_ranges() {
        let mut a = allocator(&[fr(0, 8), fr(8, 16)]);
        let b: Vec<_> = a.table().blocks().map(|b| (b.start.0, b.order)).collect();
        assert_eq!(b, [(0, 3), (8, 3)]);
        let f = a.alloc(3).unwrap();
        a.free(f, 3).unwrap();
        assert_eq!(a.stats().free_blocks[3], 2);
        assert_eq!(a.stats().free_blocks[4], 0);
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_range_places_highest_aligned_run_below_limit() {
        let mut a = allocator(&[fr(0, 4096)]);
        let r = a
            .alloc_range(3, 4, FrameNumber(1000), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(r, fr(996, 999));
        let r = a
            .alloc_range(5, 1, FrameNumber(1000), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(r, fr(991, 996));
        a.check_consistency().unwrap();
        assert_eq!(a.stats().allocated, 8);
    }

    #[test]
    fn alloc_range_spans_several_max_order_blocks() {
        let mut a = allocator(&[fr(0, 8192)]);
        let r = a
            .alloc_range(3000, 1, FrameNumber(8192), FrameFlags::KERNEL)
            .unwrap();
        assert_eq!(r, fr(8192 - 3000, 8192));
        assert_eq!(a.stats().reserved, 3000);
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_range_does_not_cross_a_hole() {
        let mut a = allocator(&[fr(0, 100), fr(200, 260)]);
        let r = a
            .alloc_range(80, 1, FrameNumber(1000), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(
            r,
            fr(20, 100),
            "the high range is too small, the run must not span the hole"
        );
        assert_rejected(
            &mut a,
            Error::NoContiguousRange {
                frames: 61,
                align: 1,
                limit: FrameNumber(1000),
            },
            |a| a.alloc_range(61, 1, FrameNumber(1000), FrameFlags::ALLOCATED),
        );
    }

    #[test]
    fn alloc_range_spans_adjacent_ranges() {
        let mut a = allocator(&[fr(0, 8), fr(8, 16)]);
        let r = a
            .alloc_range(16, 1, FrameNumber(16), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(r, fr(0, 16));
        a.free_range(r).unwrap();
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_range_below_limit_ignores_free_memory_above_it() {
        let mut a = allocator(&[fr(0, 64)]);
        a.reserve(fr(0, 30), FrameFlags::RESERVED).unwrap();
        assert_rejected(
            &mut a,
            Error::NoContiguousRange {
                frames: 4,
                align: 1,
                limit: FrameNumber(33),
            },
            |a| a.alloc_range(4, 1, FrameNumber(33), FrameFlags::ALLOCATED),
        );
        assert_eq!(
            a.alloc_range(3, 1, FrameNumber(33), FrameFlags::ALLOCATED)
                .unwrap(),
            fr(30, 33)
        );
    }

    #[test]
    fn alloc_range_rejects_bad_arguments() {
        let mut a = allocator(&[fr(0, 64)]);
        let lim = FrameNumber(64);
        assert_rejected(&mut a, Error::InvalidRequest, |a| {
            a.alloc_range(0, 1, lim, FrameFlags::ALLOCATED)
        });
        assert_rejected(&mut a, Error::InvalidRequest, |a| {
            a.alloc_range(1, 3, lim, FrameFlags::ALLOCATED)
        });
        assert_rejected(&mut a, Error::InvalidRequest, |a| {
            a.alloc_range(1, 0, lim, FrameFlags::ALLOCATED)
        });
        let bad = FrameFlags::FREE;
        assert_rejected(&mut a, Error::InvalidFlags(bad), |a| {
            a.alloc_range(1, 1, lim, bad)
        });
        let huge = Error::NoContiguousRange {
            frames: u64::MAX,
            align: 1,
            limit: lim,
        };
        assert_rejected(&mut a, huge, |a| {
            a.alloc_range(u64::MAX, 1, lim, FrameFlags::ALLOCATED)
        });
    }

    #[test]
    fn reserve_carves_range_and_leaves_the_rest_free() {
        let mut a = allocator(&[fr(0, 1024)]);
        a.reserve(fr(5, 300), FrameFlags::KERNEL | FrameFlags::SHARED)
            .unwrap();
        assert_eq!(a.stats().reserved, 295);
        assert_eq!(a.stats().free, 1024 - 295);
        for f in [5, 100, 299] {
            let b = a.table().block_containing(FrameNumber(f)).unwrap();
            assert_eq!(b.flags, FrameFlags::KERNEL | FrameFlags::SHARED);
        }
        for f in [4, 300] {
            assert_eq!(
                a.table()
                    .block_containing(FrameNumber(f))
                    .unwrap()
                    .flags
                    .state(),
                FrameFlags::FREE
            );
        }
        a.check_consistency().unwrap();
    }

    #[test]
    fn reserve_rejects_frames_that_are_not_free() {
        let mut a = allocator(&[fr(0, 64), fr(128, 192)]);
        a.reserve(fr(10, 20), FrameFlags::RESERVED).unwrap();
        assert_rejected(&mut a, Error::NotFree(FrameNumber(10)), |a| {
            a.reserve(fr(0, 12), FrameFlags::RESERVED)
        });
        assert_rejected(&mut a, Error::NotRam(fr(60, 130)), |a| {
            a.reserve(fr(60, 130), FrameFlags::RESERVED)
        });
        assert_rejected(&mut a, Error::NotRam(fr(30, 30)), |a| {
            a.reserve(fr(30, 30), FrameFlags::RESERVED)
        });
        let flags = FrameFlags::RESERVED | FrameFlags::KERNEL;
        assert_rejected(&mut a, Error::InvalidFlags(flags), |a| {
            a.reserve(fr(30, 31), flags)
        });
    }

    #[test]
    fn poisoned_frames_become_single_frame_blocks_that_cannot_be_pinned() {
        let mut a = allocator(&[fr(0, 64)]);
        a.reserve(fr(8, 12), FrameFlags::POISONED).unwrap();
        let b: Vec<_> = a
            .table()
            .blocks()
            .filter(|b| b.flags.contains(FrameFlags::POISONED))
            .collect();
        assert_eq!(b.len(), 4);
        assert!(b.iter().all(|b| b.order == 0));
        let err = a.table().pin(FrameNumber(7).addr(), 0x2000).unwrap_err();
        assert_eq!(err, table::Error::Poisoned(FrameNumber(8)));
        a.check_consistency().unwrap();
    }

    #[test]
    fn free_range_rejects_anything_but_one_whole_range_allocation() {
        let mut a = allocator(&[fr(0, 64)]);
        let f = a.alloc(3).unwrap();
        let cut = FrameRange::new(f, 4).unwrap();
        assert_rejected(&mut a, Error::NotARange(f), |a| a.free_range(cut));
        let whole_block = FrameRange::new(f, 8).unwrap();
        assert_rejected(&mut a, Error::NotARange(f), |a| a.free_range(whole_block));
        let r = a
            .alloc_range(11, 1, FrameNumber(64), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(r, fr(53, 64));
        assert_rejected(&mut a, Error::NotARange(FrameNumber(53)), |a| {
            a.free_range(fr(53, 56))
        });
        assert_rejected(&mut a, Error::NotARange(FrameNumber(56)), |a| {
            a.free_range(fr(56, 64))
        });
        a.free_range(r).unwrap();
        a.check_consistency().unwrap();
    }

    #[test]
    fn free_rejects_a_block_of_a_range_allocation() {
        let mut a = allocator(&[fr(0, 64)]);
        a.alloc_range(3, 1, FrameNumber(64), FrameFlags::ALLOCATED)
            .unwrap();
        // Frames 61..64: an order-0 block at 61 and an order-1 block at 62.
        assert_rejected(&mut a, Error::RangeAllocation(FrameNumber(61)), |a| {
            a.free(FrameNumber(61), 0)
        });
        assert_rejected(&mut a, Error::RangeAllocation(FrameNumber(62)), |a| {
            a.free(FrameNumber(62), 1)
        });
    }

    #[test]
    fn free_range_returns_every_frame() {
        let mut a = allocator(&[fr(0, 2048)]);
        let r = a
            .alloc_range(777, 8, FrameNumber(2000), FrameFlags::ALLOCATED)
            .unwrap();
        assert_eq!(r.start.0 % 8, 0);
        a.free_range(r).unwrap();
        assert_eq!(a.stats().free_blocks[MAX_ORDER as usize], 2);
        a.check_consistency().unwrap();
    }

    #[test]
    fn new_writes_no_metadata_and_counts_the_canonical_blocks() {
        let ranges = [fr(3, 5000), fr(6000, 6000 + 3 * 1024)];
        let a = allocator(&ranges);
        assert_eq!(written(&a), 0);
        assert_eq!(a.stats().free, 4997 + 3 * 1024);
        assert_eq!(a.stats().free_blocks[MAX_ORDER as usize], 3 + 2);
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_touches_one_window_at_the_top_of_ram() {
        let w = table::WINDOW_FRAMES;
        let mut a = allocator(&[fr(0, 8 * w)]);
        let f = a.alloc(0).unwrap();
        assert!(f.0 >= 7 * w, "from the highest window: {f}");
        assert_eq!(
            written(&a),
            12,
            "the anchor, the block and ten split-off heads"
        );
        a.check_consistency().unwrap();
        a.free(f, 0).unwrap();
        a.check_consistency().unwrap();
        assert_eq!(a.stats().free_blocks[MAX_ORDER as usize], 8);
    }

    #[test]
    fn reserve_touches_only_the_windows_it_overlaps() {
        let w = table::WINDOW_FRAMES;
        let mut a = allocator(&[fr(0, 16 * w)]);
        a.reserve(fr(5 * w - 2, 5 * w + 2), FrameFlags::RESERVED)
            .unwrap();
        let touched: Vec<u64> = (0..16)
            .filter(|&i| a.table().is_window_touched(0, FrameNumber(i * w)))
            .collect();
        assert_eq!(touched, [4, 5]);
        a.check_consistency().unwrap();
        // Everything else stays allocatable.
        let mut n = 0;
        while a.alloc(MAX_ORDER).is_ok() {
            n += 1;
        }
        assert_eq!(n, 14);
        a.check_consistency().unwrap();
    }

    #[test]
    fn untouched_windows_are_allocated_from_before_failing() {
        // Two ranges with an unaligned edge window each.
        let mut a = allocator(&[fr(3, 1024 + 9), fr(4096, 4096 + 1030)]);
        let total = a.stats().free;
        let mut got = 0;
        while a.alloc(0).is_ok() {
            got += 1;
        }
        assert_eq!(got, total);
        assert_eq!(a.alloc(0).unwrap_err(), Error::OutOfMemory(0));
        a.check_consistency().unwrap();
    }

    #[test]
    fn alloc_range_in_untouched_memory_leaves_far_windows_untouched() {
        let w = table::WINDOW_FRAMES;
        let mut a = allocator(&[fr(0, 64 * w)]);
        let r = a
            .alloc_range(10, 1, FrameNumber(3 * w), FrameFlags::KERNEL)
            .unwrap();
        assert_eq!(r, fr(3 * w - 10, 3 * w));
        assert!(a.table().is_window_touched(0, FrameNumber(2 * w)));
        assert!(!a.table().is_window_touched(0, FrameNumber(40 * w)));
        a.check_consistency().unwrap();
    }

    #[test]
    fn pin_in_a_poisoned_section_checks_frames_others_do_not() {
        let mut a = allocator(&[fr(0, 64)]);
        a.reserve(fr(40, 41), FrameFlags::POISONED).unwrap();
        let pin = a.table().pin(FrameNumber(0).addr(), 0x10000).unwrap();
        assert_eq!(a.table().pins(), 1);
        drop(pin);
        assert_eq!(
            a.table().pin(FrameNumber(39).addr(), 0x3000).unwrap_err(),
            table::Error::Poisoned(FrameNumber(40))
        );
        assert_eq!(a.table().pins(), 0);
        a.check_consistency().unwrap();
    }
}
