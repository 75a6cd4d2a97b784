//! The self-test: the frame allocator on the RAM the VMM gave the guest.
//!
//! Each check prints `check <name>: ok` or `check <name>: FAIL <why>`:
//!
//! - `orders`: one block of every order 0..=MAX_ORDER held at once (aligned,
//!   ALLOCATED, disjoint), then freed; the statistics return to their start.
//! - `alloc-range`: 33 frames aligned to 8 below 4 GiB, written, freed.
//! - `double-free`: freeing a freed frame fails with `NotAllocated` and changes
//!   nothing.
//! - `free-reserved`: freeing a frame of the image, of the metadata and of low
//!   memory fails with `Reserved` and changes nothing.
//! - `pattern`: the first and last frame of every RAM range (high RAM included)
//!   take a pattern and read it back. Frames the guest itself lives in (KERNEL:
//!   image, metadata, page tables) are stepped over; others (firmware areas, boot
//!   information) are saved first and restored after.
//! - `batch`: 256 order-0 frames allocated, tagged, checked, freed.
//! - `consistency`: `check_consistency()`, O(frames) and slow at emulated CPL0:
//!   run with at most 512 MiB of RAM or with `testguest.check=full`.

// A failure message is formatted into a fixed buffer (there is no heap): the
// Err variant is large, and only ever built on the failure path.
#![allow(clippy::result_large_err)]

use core::fmt::{self, Write};

use memory::buddy::Error as AllocError;
use memory::{Block, FrameFlags, FrameNumber, FrameRange, MAX_ORDER, PAGE_SIZE, Stats};

use crate::cmdline::Options;
use crate::log;
use crate::ram::{Allocator, LOW_MEMORY_END, Setup, frames_of};
use crate::startinfo::BOOT_MAPPED_LIMIT;

/// Most frames `consistency` runs on by default: 512 MiB.
const CONSISTENCY_DEFAULT_FRAMES: u64 = (512 << 20) / PAGE_SIZE;
const BATCH: usize = 256;
const WORDS_PER_FRAME: usize = (PAGE_SIZE / 8) as usize;

/// A failure message, formatted into a fixed buffer (cut if too long).
struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    fn new(args: fmt::Arguments<'_>) -> Self {
        let mut m = Msg {
            buf: [0; 200],
            len: 0,
        };
        let _ = m.write_fmt(args);
        m
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only whole characters are ever copied in.
        f.write_str(core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?"))
    }
}

type CheckResult = Result<(), Msg>;

macro_rules! msg {
    ($($arg:tt)*) => { Msg::new(format_args!($($arg)*)) };
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(msg!($($arg)*));
        }
    };
}

fn report(name: &str, result: CheckResult) -> bool {
    match &result {
        Ok(()) => log!("check {name}: ok"),
        Err(why) => log!("check {name}: FAIL {why}"),
    }
    result.is_ok()
}

/// Runs every check; whether all passed.
pub fn run(setup: &mut Setup, options: &Options) -> bool {
    let mut pass = true;
    pass &= report("orders", check_orders(&mut setup.alloc));
    pass &= report("alloc-range", check_alloc_range(&mut setup.alloc));
    pass &= report("double-free", check_double_free(&mut setup.alloc));
    pass &= report("free-reserved", check_free_reserved(setup));
    pass &= report("pattern", check_pattern(setup));
    pass &= report("batch", check_batch(&mut setup.alloc));
    let frames = setup.ram.frames();
    if frames <= CONSISTENCY_DEFAULT_FRAMES || options.full_check {
        let r = setup.alloc.check_consistency().map_err(|e| msg!("{e}"));
        pass &= report("consistency", r);
    } else {
        log!(
            "check consistency: skipped ({} MiB of RAM > 512 MiB; testguest.check=full runs it)",
            (frames * PAGE_SIZE) >> 20
        );
    }
    pass
}

/// The statistics are back at `start`.
fn ensure_restored(alloc: &Allocator, start: &Stats) -> CheckResult {
    let now = alloc.stats();
    ensure!(
        now == *start,
        "stats not restored: free {} -> {}, allocated {} -> {}, reserved {} -> {}",
        start.free,
        now.free,
        start.allocated,
        now.allocated,
        start.reserved,
        now.reserved
    );
    Ok(())
}

fn check_orders(alloc: &mut Allocator) -> CheckResult {
    let start = alloc.stats();
    let mut held = [FrameRange::default(); MAX_ORDER as usize + 1];
    for order in 0..=MAX_ORDER {
        let f = alloc
            .alloc(order)
            .map_err(|e| msg!("alloc order {order}: {e}"))?;
        let block = FrameRange::new(f, 1 << order).ok_or_else(|| msg!("block wraps"))?;
        ensure!(
            f.0 % (1 << order) == 0,
            "order-{order} block at {f} misaligned"
        );
        let expected = Block {
            start: f,
            order,
            flags: FrameFlags::ALLOCATED,
        };
        ensure!(
            alloc.table().block_containing(f) == Some(expected),
            "order-{order} block at {f} is {:?}",
            alloc.table().block_containing(f)
        );
        if let Some(other) = held[..order as usize]
            .iter()
            .find(|h| h.start < block.end && block.start < h.end)
        {
            return Err(msg!("order-{order} block {block} overlaps {other}"));
        }
        held[order as usize] = block;
    }
    let total: u64 = held.iter().map(FrameRange::len).sum();
    ensure!(
        alloc.stats().allocated == start.allocated + total,
        "allocated {} frames, stats grew by {}",
        total,
        alloc.stats().allocated - start.allocated
    );
    for (order, block) in held.iter().enumerate().rev() {
        alloc
            .free(block.start, order as u32)
            .map_err(|e| msg!("free order {order}: {e}"))?;
    }
    ensure_restored(alloc, &start)
}

fn check_alloc_range(alloc: &mut Allocator) -> CheckResult {
    let start = alloc.stats();
    let limit = FrameNumber(BOOT_MAPPED_LIMIT / PAGE_SIZE);
    let r = alloc
        .alloc_range(33, 8, limit, FrameFlags::ALLOCATED)
        .map_err(|e| msg!("alloc_range: {e}"))?;
    ensure!(
        r.len() == 33 && r.start.0 % 8 == 0 && r.end <= limit,
        "alloc_range(33, align 8, below 4 GiB) gave {r}"
    );
    ensure!(alloc.table().map().is_contiguous_ram(&r), "{r} is not RAM");
    ensure!(
        alloc.stats().allocated == start.allocated + 33,
        "stats.allocated grew by {}",
        alloc.stats().allocated - start.allocated
    );
    for f in [r.start, FrameNumber(r.end.0 - 1)] {
        let p = f.addr().0 as *mut u64;
        // SAFETY: the frame was just allocated to us, is RAM below 4 GiB and so
        // identity mapped; nothing else refers to it.
        let back = unsafe {
            p.write_volatile(f.0 ^ 0xa5a5_a5a5_a5a5_a5a5);
            p.read_volatile()
        };
        ensure!(
            back == f.0 ^ 0xa5a5_a5a5_a5a5_a5a5,
            "{f} does not hold a write"
        );
    }
    alloc.free_range(r).map_err(|e| msg!("free_range: {e}"))?;
    ensure_restored(alloc, &start)
}

/// Runs `op`, which must fail with `expected` and leave the statistics and
/// the block holding `frame` as they were.
fn ensure_rejected(
    alloc: &mut Allocator,
    frame: FrameNumber,
    expected: AllocError,
    op: impl FnOnce(&mut Allocator) -> Result<(), AllocError>,
) -> CheckResult {
    let before = (alloc.stats(), alloc.table().block_containing(frame));
    let result = op(alloc);
    let after = (alloc.stats(), alloc.table().block_containing(frame));
    ensure!(
        result == Err(expected),
        "expected {expected:?}, got {result:?}"
    );
    ensure!(before == after, "the rejected call changed {frame}");
    Ok(())
}

fn check_double_free(alloc: &mut Allocator) -> CheckResult {
    let start = alloc.stats();
    let f = alloc.alloc(0).map_err(|e| msg!("alloc: {e}"))?;
    alloc.free(f, 0).map_err(|e| msg!("first free: {e}"))?;
    ensure_rejected(alloc, f, AllocError::NotAllocated(f), |a| a.free(f, 0))?;
    ensure_restored(alloc, &start)
}

fn check_free_reserved(setup: &mut Setup) -> CheckResult {
    let start = setup.alloc.stats();
    let mut frames = [
        frames_of(setup.image).start,
        frames_of(setup.meta).start,
        FrameNumber(0),
    ];
    let mut n = 2;
    // A frame of RAM below 1 MiB, if there is one.
    if let Some(low) = setup.ram.ranges().first()
        && low.start.addr().0 < LOW_MEMORY_END
    {
        frames[2] = low.start;
        n = 3;
    }
    for &f in &frames[..n] {
        ensure_rejected(&mut setup.alloc, f, AllocError::Reserved(f), |a| {
            a.free(f, 0)
        })?;
    }
    ensure_restored(&setup.alloc, &start)
}

/// The pattern word `i` of the frame at `addr`.
fn pattern(addr: u64, i: usize) -> u64 {
    (addr + i as u64 * 8).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_5a5a_5a5a_5a5a
}

/// Whether the guest itself lives in `frame` (image, metadata, page tables).
fn is_kernel(alloc: &Allocator, frame: FrameNumber) -> Option<Block> {
    alloc
        .table()
        .block_containing(frame)
        .filter(|b| b.flags.state() == FrameFlags::KERNEL)
}

/// The first and last frame of `range` that are not KERNEL, if any.
fn test_frames(alloc: &Allocator, range: &FrameRange) -> Option<(FrameNumber, FrameNumber)> {
    let mut first = range.start;
    while let Some(b) = is_kernel(alloc, first) {
        first = b.frames().end;
    }
    let mut last = FrameNumber(range.end.0 - 1);
    while let Some(b) = is_kernel(alloc, last) {
        last = FrameNumber(b.start.0.checked_sub(1)?);
    }
    (range.contains(first) && range.contains(last) && first <= last).then_some((first, last))
}

/// Writes the pattern over the frame at `addr`, reads it back, then puts the
/// old contents back. Returns the first mismatch `(word, value)`.
fn pattern_frame(addr: u64) -> Option<(usize, u64)> {
    let mut saved = [0u64; WORDS_PER_FRAME];
    let p = addr as *mut u64;
    let mut bad = None;
    // SAFETY: `addr` is a RAM frame, identity mapped (below 4 GiB from boot, high
    // RAM by `paging`), that is not KERNEL: not the image (code, stack, statics),
    // the metadata or a page table, so no Rust reference covers it and the CPU
    // does not walk it. Its contents are restored before returning; nothing
    // else runs meanwhile (one CPU, interrupts off).
    unsafe {
        for (i, s) in saved.iter_mut().enumerate() {
            *s = p.add(i).read_volatile();
        }
        for i in 0..WORDS_PER_FRAME {
            p.add(i).write_volatile(pattern(addr, i));
        }
        for i in 0..WORDS_PER_FRAME {
            let v = p.add(i).read_volatile();
            if v != pattern(addr, i) && bad.is_none() {
                bad = Some((i, v));
            }
        }
        for (i, s) in saved.iter().enumerate() {
            p.add(i).write_volatile(*s);
        }
    }
    bad
}

fn check_pattern(setup: &Setup) -> CheckResult {
    let mut tested = 0;
    for range in setup.ram.ranges() {
        let Some((first, last)) = test_frames(&setup.alloc, range) else {
            continue;
        };
        for f in [first, last]
            .into_iter()
            .take(if first == last { 1 } else { 2 })
        {
            let addr = f.addr().0;
            if let Some((i, v)) = pattern_frame(addr) {
                return Err(msg!(
                    "0x{:x} read 0x{v:x}, wrote 0x{:x}",
                    addr + i as u64 * 8,
                    pattern(addr, i)
                ));
            }
            tested += 1;
        }
    }
    ensure!(tested > 0, "no frame to test");
    Ok(())
}

fn check_batch(alloc: &mut Allocator) -> CheckResult {
    let start = alloc.stats();
    let mut frames = [FrameNumber(0); BATCH];
    for (i, slot) in frames.iter_mut().enumerate() {
        let f = alloc.alloc(0).map_err(|e| msg!("alloc #{i}: {e}"))?;
        let expected = Block {
            start: f,
            order: 0,
            flags: FrameFlags::ALLOCATED,
        };
        ensure!(
            alloc.table().block_containing(f) == Some(expected),
            "#{i} at {f} is {:?}",
            alloc.table().block_containing(f)
        );
        // SAFETY: the frame is ours (just allocated) and identity mapped (all
        // RAM is, after `paging::map_high_ram`).
        unsafe { (f.addr().0 as *mut u64).write_volatile(i as u64) };
        *slot = f;
    }
    // A frame handed out twice would hold the later tag.
    for (i, f) in frames.iter().enumerate() {
        // SAFETY: as above; the frames are still allocated.
        let tag = unsafe { (f.addr().0 as *const u64).read_volatile() };
        ensure!(tag == i as u64, "{f} handed out twice (#{tag} and #{i})");
    }
    ensure!(
        alloc.stats().allocated == start.allocated + BATCH as u64,
        "stats.allocated grew by {}",
        alloc.stats().allocated - start.allocated
    );
    // Even ones first, so that the odd ones merge pairs back on the way.
    for f in frames
        .iter()
        .step_by(2)
        .chain(frames.iter().skip(1).step_by(2))
    {
        alloc.free(*f, 0).map_err(|e| msg!("free {f}: {e}"))?;
    }
    ensure_restored(alloc, &start)
}
