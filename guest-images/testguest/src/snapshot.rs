//! The self-test that spans a snapshot (`testguest.snapshot=MIB`).
//!
//! Before the device tests the guest takes `MIB` MiB of RAM from its
//! allocator and writes one word into every page of it: `pattern(address)`,
//! so a page restored from the wrong offset, or not at all, shows. It keeps
//! the frames (the allocator's books stay balanced for the DMA check, which
//! starts later). At each snapshot point (`drivers.rs`: the first block
//! device's write test with one more write submitted, the first network
//! device once it is live; after the device tests if neither) it prints
//! `snapshot: ready` and waits for one byte on COM1: the host snapshots
//! the paused guest meanwhile, and sends the byte to whichever VM runs on
//! (the original or a restored clone). The guest then prints `snapshot:
//! resumed`, checks every page's word and prints the verdict.
//!
//! The guest's CPU work is a few thousand loads and stores (it is emulated
//! here): one word per 4 KiB page.

use crate::cpu::inb;
use crate::irq;
use crate::log;
use crate::ram::Allocator;
use crate::startinfo::BOOT_MAPPED_LIMIT;
use memory::{FrameFlags, PAGE_SIZE, PhysAddr};

const COM1_LSR: u16 = 0x3fd;
const COM1_RBR: u16 = 0x3f8;
const LSR_DATA_READY: u8 = 1;
/// How long the guest waits for the host's byte.
const WAIT_MS: u64 = 300_000;
/// Largest pattern accepted (MiB).
pub const MAX_MIB: u64 = 1024;

/// `testguest.snapshot=MIB[,points=N][,touch=PAGES]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// MiB of RAM holding the pattern.
    pub mib: u64,
    /// Points after the device tests when no device had one.
    pub points: u32,
    /// Pages of the pattern rewritten after each point.
    pub touch: u64,
}

impl Settings {
    /// Parses the option's value.
    pub fn parse(v: &str) -> Result<Settings, &'static str> {
        let mut parts = v.split(',');
        let mib = parts
            .next()
            .and_then(|m| m.parse().ok())
            .filter(|m| (1..=MAX_MIB).contains(m))
            .ok_or("the pattern is 1 to 1024 MiB")?;
        let mut s = Settings {
            mib,
            points: 1,
            touch: 0,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("points", n)) => {
                    s.points = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=16).contains(n))
                        .ok_or("points is 1 to 16")?
                }
                Some(("touch", n)) => s.touch = n.parse().map_err(|_| "touch is a page count")?,
                _ => return Err("expected points=N or touch=PAGES"),
            }
        }
        Ok(s)
    }
}

/// The word page `addr` holds.
pub fn pattern(addr: u64) -> u64 {
    (addr ^ 0x5eed_5eed_0000_0000).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The pages holding the pattern, and how many points changed the first
/// `touch` of them.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    start: u64,
    pages: u64,
    touch: u64,
    generation: u64,
    /// Points after the device tests.
    pub points: u32,
}

/// Takes `settings.mib` MiB of frames and writes the pattern into them;
/// `None` (reported) if the allocator cannot give them.
pub fn prepare(alloc: &mut Allocator, settings: Settings) -> Option<Pattern> {
    let mib = settings.mib;
    let frames = mib * (1 << 20) / PAGE_SIZE;
    let limit = PhysAddr(BOOT_MAPPED_LIMIT).frame();
    let range = match alloc.alloc_range(frames, 1, limit, FrameFlags::ALLOCATED) {
        Ok(r) => r,
        Err(e) => {
            log!("snapshot: FAIL cannot take {mib} MiB for the pattern: {e:?}");
            return None;
        }
    };
    let held = Pattern {
        start: range.start.addr().0,
        pages: range.len(),
        touch: settings.touch.min(range.len()),
        generation: 0,
        points: settings.points,
    };
    for page in 0..held.pages {
        let addr = held.start + page * PAGE_SIZE;
        // SAFETY: the frames were just allocated to the guest's own use,
        // below 4 GiB (identity mapped, writable); nothing else refers to
        // them.
        unsafe { core::ptr::write_volatile(addr as *mut u64, pattern(addr)) };
    }
    log!(
        "snapshot: pattern in {} pages at 0x{:x}",
        held.pages,
        held.start
    );
    Some(held)
}

impl Pattern {
    /// The word page `page` holds now.
    fn expected(&self, page: u64) -> u64 {
        let addr = self.start + page * PAGE_SIZE;
        let generation = if page < self.touch { self.generation } else { 0 };
        pattern(addr) ^ generation
    }

    /// The snapshot point: prints `snapshot: ready`, waits for the host's
    /// byte, then checks every page, and rewrites the first `touch` pages
    /// with the next generation; whether the pattern was intact.
    pub fn wait_and_check(&mut self) -> bool {
        log!("snapshot: ready");
        // Nothing may stay in the receive buffer from before.
        let ready = || inb(COM1_LSR) & LSR_DATA_READY != 0;
        let mut waited = 0;
        while !ready() {
            if waited >= WAIT_MS {
                log!("snapshot: FAIL no byte from the host within {WAIT_MS} ms");
                return false;
            }
            let _ = irq::wait_until(10, ready);
            waited += 10;
        }
        let byte = inb(COM1_RBR);
        log!("snapshot: resumed (0x{byte:02x})");
        let mut bad = 0u64;
        let mut first = None;
        for page in 0..self.pages {
            let addr = self.start + page * PAGE_SIZE;
            // SAFETY: as in `prepare`: the guest's own frames, still held.
            let word = unsafe { core::ptr::read_volatile(addr as *const u64) };
            if word != self.expected(page) {
                bad += 1;
                first.get_or_insert((addr, word));
            }
        }
        self.generation += 1;
        for page in 0..self.touch {
            let addr = self.start + page * PAGE_SIZE;
            // SAFETY: as in `prepare`.
            unsafe { core::ptr::write_volatile(addr as *mut u64, self.expected(page)) };
        }
        match first {
            None => {
                log!("snapshot: pattern in {} pages: ok", self.pages);
                if self.touch > 0 {
                    log!("snapshot: {} pages rewritten", self.touch);
                }
                true
            }
            Some((addr, word)) => {
                log!(
                    "snapshot: FAIL {bad} of {} pages differ (first 0x{addr:x}: 0x{word:x})",
                    self.pages
                );
                false
            }
        }
    }
}
