//! From the memory map to a working frame allocator.
//!
//! 1. RAM ranges: the type-1 memory map entries, page-aligned inward, sorted,
//!    merged when adjacent or overlapping, cut below 2^47 (what identity
//!    mapping can reach); at most `MAX_RANGES` (8) are kept, the rest ignored.
//! 2. Metadata: one 64-byte `FrameMeta` per RAM frame, in one run of RAM below
//!    4 GiB (mapped from boot on) above the image, clear of the boot information
//!    and the modules.
//! 3. The allocator over the ranges, with these taken out: RAM below 1 MiB
//!    (RESERVED), the image (KERNEL), the metadata (KERNEL), and the pages of
//!    `hvm_start_info`, the command line, the memory map, the module list and
//!    the modules (RESERVED). KERNEL marks memory the guest itself lives in
//!    (image, metadata, later its page tables); RESERVED what others put there.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use memory::buddy::Error as AllocError;
use memory::{
    FrameAllocator, FrameFlags, FrameMeta, FrameNumber, FrameRange, MAX_RANGES, PAGE_SIZE,
};

use crate::startinfo::{BOOT_MAPPED_LIMIT, BootInfo, MAX_MEMMAP, MEMMAP_RAM, PhysRange};

/// The guest's allocator: metadata in guest RAM, borrowed for the whole run.
pub type Allocator = FrameAllocator<&'static mut [FrameMeta]>;

/// End of the legacy first megabyte.
pub const LOW_MEMORY_END: u64 = 1 << 20;
/// Highest RAM address used (exclusive): the lower canonical half.
const PHYS_LIMIT: u64 = 1 << 47;
const META_SIZE: u64 = core::mem::size_of::<FrameMeta>() as u64;

/// Why the allocator cannot be set up.
#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    /// The memory map holds no usable RAM.
    NoRam,
    /// No run of RAM below 4 GiB fits the metadata.
    NoRoomForMetadata {
        /// Bytes needed.
        bytes: u64,
    },
    /// The image is not (all) in RAM.
    ImageNotInRam(PhysRange),
    /// `setup` ran twice (it hands out the metadata memory once).
    AlreadySetUp,
    /// The allocator refused an operation.
    Alloc(&'static str, AllocError),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::NoRam => write!(f, "the memory map has no usable RAM"),
            SetupError::NoRoomForMetadata { bytes } => write!(
                f,
                "no free RAM run of {bytes} bytes below 4 GiB for the frame metadata"
            ),
            SetupError::ImageNotInRam(r) => {
                write!(f, "the image [0x{:x}-0x{:x}) is not in RAM", r.start, r.end)
            }
            SetupError::AlreadySetUp => write!(f, "the allocator is already set up"),
            SetupError::Alloc(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

/// RAM as the allocator sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ram {
    ranges: [FrameRange; MAX_RANGES],
    count: usize,
    /// RAM ranges dropped beyond `MAX_RANGES`.
    pub ignored: usize,
    /// RAM cut off above 2^47, in bytes.
    pub cut_bytes: u64,
}

impl Ram {
    /// The RAM ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[FrameRange] {
        &self.ranges[..self.count]
    }

    /// Frames in all ranges.
    pub fn frames(&self) -> u64 {
        self.ranges().iter().map(FrameRange::len).sum()
    }
}

/// The RAM ranges of a memory map (step 1 of the module doc).
pub fn ram_ranges(memmap: &[crate::startinfo::MemmapEntry]) -> Ram {
    let mut found = [PhysRange::default(); MAX_MEMMAP];
    let mut n = 0;
    let mut ram = Ram::default();
    for e in memmap.iter().filter(|e| e.kind == MEMMAP_RAM) {
        let end = e.addr.saturating_add(e.size);
        let start = e.addr.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        let mut end_aligned = end & !(PAGE_SIZE - 1);
        if end_aligned > PHYS_LIMIT {
            ram.cut_bytes += end_aligned - PHYS_LIMIT.max(start);
            end_aligned = PHYS_LIMIT;
        }
        if start < end_aligned && n < found.len() {
            found[n] = PhysRange {
                start,
                end: end_aligned,
            };
            n += 1;
        }
    }
    let found = &mut found[..n];
    // Insertion sort: at most MAX_MEMMAP entries, usually sorted already. (core's
    // sort would bring a `ud2` trap into the image.)
    for i in 1..found.len() {
        let mut j = i;
        while j > 0 && found[j - 1].start > found[j].start {
            found.swap(j - 1, j);
            j -= 1;
        }
    }
    let mut merged: Option<PhysRange> = None;
    let push = |r: PhysRange, ram: &mut Ram| {
        if ram.count < MAX_RANGES {
            ram.ranges[ram.count] = FrameRange {
                start: FrameNumber(r.start / PAGE_SIZE),
                end: FrameNumber(r.end / PAGE_SIZE),
            };
            ram.count += 1;
        } else {
            ram.ignored += 1;
        }
    };
    for r in found.iter() {
        match merged {
            Some(ref mut m) if r.start <= m.end => m.end = m.end.max(r.end),
            Some(m) => {
                push(m, &mut ram);
                merged = Some(*r);
            }
            None => merged = Some(*r),
        }
    }
    if let Some(m) = merged {
        push(m, &mut ram);
    }
    ram
}

/// The lowest page-aligned run of `bytes` of RAM below 4 GiB, at or above
/// `floor`, overlapping none of `avoid`.
fn place_metadata(
    ram: &Ram,
    bytes: u64,
    floor: u64,
    avoid: impl Iterator<Item = PhysRange> + Clone,
) -> Option<PhysRange> {
    for r in ram.ranges() {
        let end = r.end.addr().0.min(BOOT_MAPPED_LIMIT);
        let mut start = r.start.addr().0.max(floor);
        loop {
            let candidate = PhysRange {
                start,
                end: start.checked_add(bytes)?,
            };
            if candidate.end > end {
                break;
            }
            match avoid
                .clone()
                .filter(|a| a.overlaps(&candidate))
                .map(|a| a.end)
                .max()
            {
                // Move past the obstacle; `start` only grows, so this ends.
                Some(obstacle_end) => {
                    start = obstacle_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1)
                }
                None => return Some(candidate),
            }
        }
    }
    None
}

/// The frames of the byte range `r`, rounded outward.
pub fn frames_of(r: PhysRange) -> FrameRange {
    FrameRange::covering(memory::PhysAddr(r.start), r.end.saturating_sub(r.start)).unwrap_or(
        FrameRange {
            start: FrameNumber(r.start / PAGE_SIZE),
            end: FrameNumber(r.start / PAGE_SIZE),
        },
    )
}

/// Reserves with `flags` every frame of `range` that is RAM and still free;
/// frames already taken or outside RAM are skipped. Returns the frames reserved.
pub fn reserve_where_free(
    alloc: &mut Allocator,
    range: FrameRange,
    flags: FrameFlags,
) -> Result<u64, AllocError> {
    let mut ranges = [FrameRange::default(); MAX_RANGES];
    let mut n = 0;
    for r in alloc.table().map().ranges() {
        ranges[n] = r;
        n += 1;
    }
    let mut reserved = 0;
    for r in &ranges[..n] {
        let (start, end) = (range.start.max(r.start), range.end.min(r.end));
        let mut f = start;
        while f < end {
            // Every RAM frame lies in exactly one block.
            let Some(block) = alloc.table().block_containing(f) else {
                break;
            };
            if block.flags.state() != FrameFlags::FREE {
                f = block.frames().end;
                continue;
            }
            // Grow a run of free blocks, then reserve it at once.
            let mut run_end = block.frames().end.min(end);
            while run_end < end {
                match alloc.table().block_containing(run_end) {
                    Some(b) if b.flags.state() == FrameFlags::FREE => {
                        run_end = b.frames().end.min(end)
                    }
                    _ => break,
                }
            }
            let run = FrameRange {
                start: f,
                end: run_end,
            };
            alloc.reserve(run, flags)?;
            reserved += run.len();
            f = run_end;
        }
    }
    Ok(reserved)
}

/// The allocator and where things went.
#[derive(Debug)]
pub struct Setup {
    /// The allocator.
    pub alloc: Allocator,
    /// Its RAM.
    pub ram: Ram,
    /// The metadata array.
    pub meta: PhysRange,
    /// The image (text to bss).
    pub image: PhysRange,
}

static METADATA_TAKEN: AtomicBool = AtomicBool::new(false);

/// Builds the allocator over the RAM of `info`'s memory map (steps 2 and 3 of
/// the module doc). `image` is the loaded image, bss included.
pub fn setup(info: &BootInfo, image: PhysRange) -> Result<Setup, SetupError> {
    let ram = ram_ranges(info.memmap());
    if ram.ranges().is_empty() {
        return Err(SetupError::NoRam);
    }
    let frames = ram.frames();
    let bytes = frames * META_SIZE;
    let floor = image.end.max(LOW_MEMORY_END);
    let meta = place_metadata(&ram, bytes, floor, info.occupied().chain([image]))
        .ok_or(SetupError::NoRoomForMetadata { bytes })?;
    if METADATA_TAKEN.swap(true, Ordering::AcqRel) {
        return Err(SetupError::AlreadySetUp);
    }
    // SAFETY: `meta` is RAM below 4 GiB (identity mapped, writable), page
    // aligned (FrameMeta needs 64), `frames` entries long, and overlaps neither
    // the image (code, statics, stack) nor boot information or modules. The
    // `METADATA_TAKEN` flag makes this the only reference ever made to it.
    // The allocator wants zeroed metadata (its default state): RAM from the
    // VMM may hold anything, so it is cleared first, in one `rep stos`; all
    // zero is a valid FrameMeta (atomic integers only).
    let metadata: &'static mut [FrameMeta] = unsafe {
        let p = meta.start as *mut FrameMeta;
        core::ptr::write_bytes(p, 0, frames as usize);
        core::slice::from_raw_parts_mut(p, frames as usize)
    };
    let mut alloc =
        FrameAllocator::new(ram.ranges(), metadata).map_err(|e| SetupError::Alloc("new", e))?;

    let image_frames = frames_of(image);
    if !alloc.table().map().is_contiguous_ram(&image_frames) {
        return Err(SetupError::ImageNotInRam(image));
    }
    let low = frames_of(PhysRange {
        start: 0,
        end: LOW_MEMORY_END,
    });
    reserve_where_free(&mut alloc, low, FrameFlags::RESERVED)
        .map_err(|e| SetupError::Alloc("reserve low memory", e))?;
    // Anything between 1 MiB and the image start (nothing with link.ld's layout).
    let below_image = FrameRange {
        start: low.end,
        end: image_frames.start,
    };
    reserve_where_free(&mut alloc, below_image, FrameFlags::RESERVED)
        .map_err(|e| SetupError::Alloc("reserve below the image", e))?;
    alloc
        .reserve(image_frames, FrameFlags::KERNEL)
        .map_err(|e| SetupError::Alloc("reserve the image", e))?;
    alloc
        .reserve(frames_of(meta), FrameFlags::KERNEL)
        .map_err(|e| SetupError::Alloc("reserve the metadata", e))?;
    for r in info.occupied() {
        reserve_where_free(&mut alloc, frames_of(r), FrameFlags::RESERVED)
            .map_err(|e| SetupError::Alloc("reserve boot information", e))?;
    }
    Ok(Setup {
        alloc,
        ram,
        meta,
        image,
    })
}
