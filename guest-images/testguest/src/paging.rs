//! Identity mapping of RAM above 4 GiB.
//!
//! The boot code maps 0..4 GiB with 2 MiB pages. RAM above that (with 3 GiB
//! the VMM puts 1 GiB at 4..5 GiB, past the MMIO hole) must be mapped before it
//! is touched: this walks PML4 -> PDPT -> page directory for every 2 MiB page
//! overlapping high RAM, allocating missing tables from the frame allocator
//! below 4 GiB (where they can be written through the boot mapping) as KERNEL
//! (memory the guest itself lives in).

use core::fmt;

use memory::{FrameFlags, FrameNumber, FrameRange, PAGE_SIZE};

use crate::boot::{PTE_HUGE, PTE_PRESENT, PTE_WRITABLE, pml4_addr};
use crate::cpu;
use crate::ram::Allocator;
use crate::startinfo::BOOT_MAPPED_LIMIT;

const HUGE_PAGE: u64 = 2 << 20;
const ENTRIES: u64 = 512;
/// Physical address bits of a table entry (bits 12..52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why high RAM cannot be mapped.
#[derive(Clone, Copy, Debug)]
pub enum MapError {
    /// No frame below 4 GiB for a page table.
    NoTableFrame(memory::buddy::Error),
    /// A PML4 or PDPT entry maps a huge page where a table is needed.
    HugeEntry(u64),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::NoTableFrame(e) => write!(f, "no frame for a page table: {e}"),
            MapError::HugeEntry(a) => write!(f, "a huge page already covers 0x{a:x}"),
        }
    }
}

/// What [`map_high_ram`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mapped {
    /// 2 MiB pages mapped.
    pub pages: u64,
    /// Page-table frames allocated.
    pub tables: u64,
}

/// Maps every 2 MiB page overlapping a part of `ranges` above 4 GiB.
pub fn map_high_ram(alloc: &mut Allocator, ranges: &[FrameRange]) -> Result<Mapped, MapError> {
    let mut done = Mapped::default();
    for r in ranges {
        let start = r.start.addr().0.max(BOOT_MAPPED_LIMIT) & !(HUGE_PAGE - 1);
        let end = r.end.addr().0.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let mut addr = start;
        while addr < end {
            map_huge_page(alloc, addr, &mut done)?;
            addr += HUGE_PAGE;
        }
    }
    if done.pages > 0 {
        cpu::flush_tlb();
    }
    Ok(done)
}

/// Index of `addr` in the table of `level` (3 = PML4, 2 = PDPT, 1 = PD).
fn index(addr: u64, level: u32) -> u64 {
    (addr >> (12 + 9 * level)) & (ENTRIES - 1)
}

fn map_huge_page(alloc: &mut Allocator, addr: u64, done: &mut Mapped) -> Result<(), MapError> {
    let pdpt = next_table(alloc, pml4_addr(), index(addr, 3), addr, done)?;
    let pd = next_table(alloc, pdpt, index(addr, 2), addr, done)?;
    let entry = (pd + index(addr, 1) * 8) as *mut u64;
    // SAFETY: `pd` is a page directory of the live hierarchy, below 4 GiB and so
    // identity mapped; nothing else holds a reference to it. The new entry maps
    // the 2 MiB page at `addr` onto itself, which no live code or data uses yet.
    unsafe {
        if entry.read_volatile() & PTE_PRESENT == 0 {
            entry.write_volatile(addr | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE);
            done.pages += 1;
        }
    }
    Ok(())
}

/// The table entry `index` of `table` points to, allocating it if missing.
fn next_table(
    alloc: &mut Allocator,
    table: u64,
    index: u64,
    addr: u64,
    done: &mut Mapped,
) -> Result<u64, MapError> {
    let entry = (table + index * 8) as *mut u64;
    // SAFETY: `table` is a table of the live hierarchy below 4 GiB (the boot
    // PML4/PDPT in the bss or a frame allocated below), identity mapped.
    let value = unsafe { entry.read_volatile() };
    if value & PTE_PRESENT != 0 {
        if value & PTE_HUGE != 0 {
            return Err(MapError::HugeEntry(addr));
        }
        return Ok(value & ADDR_MASK);
    }
    let frame = alloc
        .alloc_range(
            1,
            1,
            FrameNumber(BOOT_MAPPED_LIMIT / PAGE_SIZE),
            FrameFlags::KERNEL,
        )
        .map_err(MapError::NoTableFrame)?;
    let new = frame.start.addr().0;
    // SAFETY: the frame was just allocated below 4 GiB (identity mapped) and is
    // ours alone. It is zeroed before the entry linking it in is written.
    unsafe {
        core::ptr::write_bytes(new as *mut u8, 0, PAGE_SIZE as usize);
        entry.write_volatile(new | PTE_PRESENT | PTE_WRITABLE);
    }
    done.tables += 1;
    Ok(new)
}
