//! Host side: `GuestFrames` owns a guest's RAM and its frames.
//!
//! Guest RAM is a vm-memory `GuestMemoryMmap` laid out around the MMIO hole
//! (`layout`), anonymous or memfd-backed (so it can be shared with another
//! process later), together with the frame allocator over the same frames. The
//! VMM places every boot structure by allocating frames with a [`Purpose`]; the
//! e820 map is derived from the frame metadata. Devices take [`PinGuard`]s on the
//! guest buffers of in-flight requests and mark the frames they write dirty in a
//! [`DirtyLog`].
//!
//! The metadata and the dirty log live in [`ZeroedSlice`]s: memory that costs
//! nothing until written. Building a `GuestFrames` writes neither, so its cost
//! does not grow with the guest's RAM; pins touch one counter per 1 GiB
//! section, dirty marking one bit per frame.
//!
//! Frames the allocator still holds as FREE once the guest runs are the guest's
//! own RAM: the host allocates only while it builds the VM.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::vec::Vec;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, VolatileSlice,
};

use crate::addr::{FrameNumber, FrameRange, PAGE_SIZE, PhysAddr};
use crate::buddy::{self, FrameAllocator, Stats};
use crate::dirty::DirtyLog;
use crate::layout::{self, MAX_RAM};
use crate::meta::{FrameFlags, FrameMeta};
use crate::table::{self, FrameTable, HeldSection};
use crate::zeroed::ZeroedSlice;

type SharedMeta = ZeroedSlice<FrameMeta>;

/// Errors of `GuestFrames`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RAM size zero or not a multiple of the page size.
    #[error("Guest RAM size {0:#x} is not a positive multiple of 4 KiB")]
    InvalidSize(u64),
    /// RAM size above `MAX_RAM`.
    #[error("Guest RAM size {0:#x} is above the maximum of {MAX_RAM:#x}")]
    TooLarge(u64),
    /// The memfd backing could not be created.
    #[error("Cannot create the guest RAM memfd")]
    Memfd(#[source] io::Error),
    /// The frame metadata or dirty log could not be mapped.
    #[error("Cannot map the frame metadata")]
    Metadata(#[source] io::Error),
    /// Mapping guest RAM failed.
    #[error("Cannot map guest RAM")]
    Mmap(#[source] FromRangesError),
    /// A saved run of frame metadata cannot be placed again.
    #[error("Cannot place saved frames {addr:#x}+{bytes:#x} again")]
    Restore {
        /// First byte.
        addr: u64,
        /// Bytes.
        bytes: u64,
        /// Why.
        #[source]
        source: buddy::Error,
    },
    /// A memory file's size is not the guest's RAM size.
    #[error("The memory file holds {file:#x} bytes, the guest's RAM is {ram:#x}")]
    FileSize {
        /// Bytes in the file.
        file: u64,
        /// Bytes of RAM.
        ram: u64,
    },
    /// A memory file could not be read or mapped.
    #[error("Cannot map the memory file")]
    File(#[source] io::Error),
    /// The frame allocator rejected the layout.
    #[error("Cannot set up the frame allocator")]
    Frames(#[source] buddy::Error),
    /// A boot structure could not be placed.
    #[error("Cannot place the {purpose} ({len:#x} bytes)")]
    Place {
        /// What was being placed.
        purpose: Purpose,
        /// Its size in bytes.
        len: u64,
        /// Why it failed.
        #[source]
        source: buddy::Error,
    },
}

/// How guest RAM is backed.
#[derive(Clone, Debug, Default)]
pub enum Backing {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A memfd, so the RAM can be shared with another process.
    Memfd,
    /// A memory file (a snapshot's): the regions are mapped from it in order,
    /// not read. Private (`MAP_PRIVATE`) maps it copy-on-write: the file is
    /// never written and every process mapping it shares the pages none of
    /// them wrote. Shared (`MAP_SHARED`) writes the guest's changes through
    /// to the file. The file must hold exactly the guest's RAM.
    File {
        /// The open file (read-write if shared).
        file: Arc<File>,
        /// Map it shared instead of copy-on-write.
        shared: bool,
    },
}

/// What a placed boot structure is; decides its frame flags and so its e820 type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The kernel image (RAM the kernel owns: KERNEL).
    Kernel,
    /// The initial ramdisk (KERNEL).
    Initrd,
    /// Linux zero page / PVH start info (RESERVED).
    BootParams,
    /// Kernel command line (RESERVED).
    Cmdline,
    /// Page tables the VMM builds for long mode (RESERVED).
    PageTables,
    /// GDT the VMM builds (RESERVED).
    Gdt,
    /// Stack the boot vCPU starts on (RESERVED).
    BootStack,
    /// MP table (RESERVED).
    MpTable,
    /// Firmware areas such as the legacy VGA/BIOS hole (RESERVED).
    Firmware,
    /// ACPI tables (RESERVED | ACPI: e820 type 3).
    Acpi,
}

impl Purpose {
    /// Frame flags of blocks placed for this purpose.
    pub fn flags(self) -> FrameFlags {
        match self {
            Purpose::Kernel | Purpose::Initrd => FrameFlags::KERNEL,
            Purpose::Acpi => FrameFlags::RESERVED | FrameFlags::ACPI,
            _ => FrameFlags::RESERVED,
        }
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Purpose::Kernel => "kernel image",
            Purpose::Initrd => "initrd",
            Purpose::BootParams => "boot parameters",
            Purpose::Cmdline => "command line",
            Purpose::PageTables => "page tables",
            Purpose::Gdt => "GDT",
            Purpose::BootStack => "boot stack",
            Purpose::MpTable => "MP table",
            Purpose::Firmware => "firmware area",
            Purpose::Acpi => "ACPI tables",
        };
        f.write_str(name)
    }
}

/// e820 memory types (ACPI spec, "Address Range Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
    /// ACPI tables, reclaimable once read.
    Acpi = 3,
    /// Bad memory.
    Unusable = 5,
}

/// One entry of the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub size: u64,
    /// Memory type.
    pub kind: E820Kind,
}

/// A guest's RAM, its frame metadata and its frame allocator.
#[derive(Debug)]
pub struct GuestFrames {
    memory: GuestMemoryMmap,
    table: Arc<FrameTable<SharedMeta>>,
    allocator: Mutex<FrameAllocator<SharedMeta>>,
    dirty: DirtyLog<ZeroedSlice<AtomicU64>>,
    meta: SharedMeta,
    dirty_words: ZeroedSlice<AtomicU64>,
    /// `(start, len)` of each memory region, in order (at most two: below
    /// and above the MMIO hole), for [`GuestFrames::slice`].
    regions: Vec<(u64, u64)>,
    size: u64,
}

impl GuestFrames {
    /// Maps `size` bytes of guest RAM around the MMIO hole, every frame free.
    pub fn new(size: u64, backing: Backing) -> Result<Self, Error> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidSize(size));
        }
        if size > MAX_RAM {
            return Err(Error::TooLarge(size));
        }
        let ranges = layout::ram_ranges(size);
        let (file, private) = match backing {
            Backing::Anonymous => (None, false),
            Backing::Memfd => (Some(Arc::new(memfd(size).map_err(Error::Memfd)?)), false),
            Backing::File { file, shared } => {
                let len = file.metadata().map_err(Error::File)?.len();
                if len != size {
                    return Err(Error::FileSize {
                        file: len,
                        ram: size,
                    });
                }
                (Some(file), !shared)
            }
        };
        let mut offset = 0;
        let regions: Vec<_> = ranges
            .iter()
            .map(|&(addr, len)| {
                let fo = file
                    .as_ref()
                    .map(|f| FileOffset::from_arc(f.clone(), offset));
                offset += len;
                (addr, len as usize, fo)
            })
            .collect();
        // vm-memory maps files shared and anonymous memory private.
        let memory = if private {
            map_private(regions)?
        } else {
            GuestMemoryMmap::from_ranges_with_files(&regions).map_err(Error::Mmap)?
        };

        let frame_ranges: Vec<FrameRange> = ranges
            .iter()
            .map(|&(addr, len)| FrameRange::covering(addr.into(), len).expect("layout fits"))
            .collect();
        let meta = SharedMeta::new((size / PAGE_SIZE) as usize).map_err(Error::Metadata)?;
        let allocator = FrameAllocator::new(&frame_ranges, meta.clone()).map_err(Error::Frames)?;
        let table = Arc::new(allocator.table().clone());
        let map = *table.map();
        let dirty_words = ZeroedSlice::new(DirtyLog::<ZeroedSlice<AtomicU64>>::words_for(&map))
            .map_err(Error::Metadata)?;
        let dirty = DirtyLog::new(map, dirty_words.clone())
            .map_err(|e| Error::Frames(buddy::Error::Table(e)))?;
        let regions = ranges.iter().map(|&(a, l)| (a.0, l)).collect();
        Ok(GuestFrames {
            memory,
            table,
            allocator: Mutex::new(allocator),
            dirty,
            meta,
            dirty_words,
            regions,
            size,
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.size
    }

    /// The frame table (metadata, block lookups).
    pub fn table(&self) -> &FrameTable<SharedMeta> {
        &self.table
    }

    /// Allocator statistics.
    pub fn stats(&self) -> Stats {
        self.allocator().stats()
    }

    /// Places `len` bytes for `purpose` as high as possible below `limit`, at a
    /// multiple of `align` bytes (a power of two; at least a frame is used).
    pub fn place(
        &self,
        purpose: Purpose,
        len: u64,
        align: u64,
        limit: GuestAddress,
    ) -> Result<GuestAddress, Error> {
        let place_err = |source| Error::Place {
            purpose,
            len,
            source,
        };
        if len == 0 || !align.is_power_of_two() {
            return Err(place_err(buddy::Error::InvalidRequest));
        }
        let frames = len.div_ceil(PAGE_SIZE);
        let align_frames = align.div_ceil(PAGE_SIZE);
        let limit = PhysAddr(limit.0).frame();
        let range = self
            .allocator()
            .alloc_range(frames, align_frames, limit, purpose.flags())
            .map_err(place_err)?;
        Ok(range.start.addr().into())
    }

    /// Places `len` bytes for `purpose` exactly at `addr` (every frame touched
    /// must be free RAM).
    pub fn place_at(&self, purpose: Purpose, addr: GuestAddress, len: u64) -> Result<(), Error> {
        let place_err = |source| Error::Place {
            purpose,
            len,
            source,
        };
        let range = FrameRange::covering(addr.into(), len)
            .filter(|r| !r.is_empty())
            .ok_or(place_err(buddy::Error::InvalidRequest))?;
        self.allocator()
            .reserve(range, purpose.flags())
            .map_err(place_err)
    }

    /// The e820 map, derived from the frame metadata: FREE, ALLOCATED and KERNEL
    /// blocks are RAM, RESERVED blocks reserved (ACPI tables if they carry the
    /// ACPI attribute), POISONED ones unusable; adjacent entries of one type
    /// are merged; holes are absent.
    pub fn e820_map(&self) -> Vec<E820Entry> {
        let mut map: Vec<E820Entry> = Vec::new();
        for block in self.table.blocks() {
            let state = block.flags.state();
            let kind = if state == FrameFlags::RESERVED && block.flags.contains(FrameFlags::ACPI) {
                E820Kind::Acpi
            } else if state == FrameFlags::RESERVED {
                E820Kind::Reserved
            } else if state == FrameFlags::POISONED {
                E820Kind::Unusable
            } else {
                E820Kind::Ram
            };
            let frames = block.frames();
            match map.last_mut() {
                Some(last)
                    if last.kind == kind && last.addr.0 + last.size == frames.start.addr().0 =>
                {
                    last.size += frames.bytes();
                }
                _ => map.push(E820Entry {
                    addr: frames.start.addr().into(),
                    size: frames.bytes(),
                    kind,
                }),
            }
        }
        map
    }

    /// Every block the VMM placed (all but FREE RAM), as runs of `(guest
    /// address, bytes, flag bits)` with adjacent blocks of equal flags
    /// merged: what a snapshot keeps of the frame metadata.
    pub fn placed(&self) -> Vec<(u64, u64, u32)> {
        let mut runs: Vec<(u64, u64, u32)> = Vec::new();
        for block in self.table.blocks() {
            if block.flags.state() == FrameFlags::FREE {
                continue;
            }
            let frames = block.frames();
            let (addr, bytes, flags) = (frames.start.addr().0, frames.bytes(), block.flags);
            let flags = (flags.state().bits()) | (flags.bits() & FrameFlags::ATTR_MASK.bits());
            match runs.last_mut() {
                Some(last) if last.2 == flags && last.0 + last.1 == addr => last.1 += bytes,
                _ => runs.push((addr, bytes, flags)),
            }
        }
        runs
    }

    /// Places again, on fresh frames of the same layout, the runs
    /// [`GuestFrames::placed`] returned (restoring a snapshot). The runs are
    /// hostile input: each must be page aligned, inside RAM, free here and
    /// carry one owned state; the first that is not fails the whole call.
    pub fn place_again(&self, runs: &[(u64, u64, u32)]) -> Result<(), Error> {
        let mut allocator = self.allocator();
        for &(addr, bytes, flags) in runs {
            let fail = |source| Error::Restore {
                addr,
                bytes,
                source,
            };
            if !addr.is_multiple_of(PAGE_SIZE) || !bytes.is_multiple_of(PAGE_SIZE) {
                return Err(fail(buddy::Error::InvalidRequest));
            }
            let range = FrameRange::covering(PhysAddr(addr), bytes)
                .filter(|r| !r.is_empty())
                .ok_or(fail(buddy::Error::InvalidRequest))?;
            allocator
                .reserve(range, FrameFlags::from_bits(flags))
                .map_err(fail)?;
        }
        Ok(())
    }

    /// Pins every frame of `[addr, addr + len)` for DMA until the guard drops.
    /// Fails for an empty or wrapping range, one outside RAM or across a hole, or
    /// a poisoned frame.
    pub fn pin(&self, addr: GuestAddress, len: u64) -> Result<PinGuard, table::Error> {
        let range = self.table.pin_frames(addr.into(), len)?;
        Ok(PinGuard {
            table: self.table.clone(),
            range,
        })
    }

    /// `len` bytes of guest RAM at `addr` as a volatile slice, if they lie
    /// inside one region. The device path's accessor: a linear check of the
    /// (at most two) regions, then the region's own slice, where vm-memory's
    /// generic accessors search and dispatch on every access.
    #[inline]
    pub fn slice(&self, addr: GuestAddress, len: usize) -> Option<VolatileSlice<'_>> {
        let (index, offset) = self
            .regions
            .iter()
            .enumerate()
            .find_map(|(i, &(start, size))| {
                let offset = addr.0.checked_sub(start)?;
                (offset < size).then_some((i, offset))
            })?;
        self.memory
            .iter()
            .nth(index)?
            .get_slice(MemoryRegionAddress(offset), len)
            .ok()
    }

    /// An empty [`PinSet`] on these frames.
    pub fn pin_set(&self) -> PinSet {
        PinSet {
            table: self.table.clone(),
            anchors: Vec::new(),
            pins: 0,
            held: None,
        }
    }

    /// Marks the frames of `[addr, addr + len)` dirty.
    #[inline]
    pub fn mark_dirty(&self, addr: GuestAddress, len: u64) -> Result<(), table::Error> {
        self.dirty.mark(addr.into(), len)
    }

    /// Returns the dirty ranges `(start, bytes)` and clears them.
    pub fn take_dirty(&self) -> Vec<(GuestAddress, u64)> {
        let mut out = Vec::new();
        self.dirty
            .take(|r| out.push((r.start.addr().into(), r.bytes())));
        out
    }

    /// Bytes of guest RAM the kernel has populated (pages the guest or a
    /// device wrote, or read), page-granular, from `mincore`: with
    /// [`GuestFrames::state_resident_bytes`], what separates the guest's
    /// memory from the VMM's in a process's RSS.
    pub fn guest_resident_bytes(&self) -> io::Result<u64> {
        let mut total = 0;
        for region in self.memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(io::Error::other)?;
            let len = region.len() as usize;
            let mut vec = std::vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
            // SAFETY: `host..host + len` is this region's live mapping (page
            // aligned, owned by `self`), and `vec` has one byte per page of it.
            let r = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE;
        }
        Ok(total)
    }

    /// The ranges `(start, bytes)` of the pages that may hold something
    /// other than zeros, as [`GuestFrames::take_dirty`] gives them: pages
    /// the kernel has populated (present or swapped out, from
    /// `/proc/self/pagemap`) or, for RAM mapped from a file, whose file
    /// range holds data (`SEEK_DATA`; a file system without it reports all
    /// data). Every other page reads as zeros, so a full snapshot can leave
    /// it a hole.
    pub fn populated(&self) -> io::Result<Vec<(GuestAddress, u64)>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const CHUNK: usize = 8192;
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut out = Vec::new();
        let mut entries = std::vec![0u8; CHUNK * 8];
        for region in self.memory.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(io::Error::other)? as u64;
            let pages = (region.len() / PAGE_SIZE) as usize;
            let mut bitmap = std::vec![0u64; pages.div_ceil(64)];
            let mut set = |p: usize| bitmap[p / 64] |= 1 << (p % 64);
            let mut page = 0;
            while page < pages {
                let n = CHUNK.min(pages - page);
                let at = (host / PAGE_SIZE + page as u64) * 8;
                pagemap.read_exact_at(&mut entries[..n * 8], at)?;
                for (i, e) in entries[..n * 8].chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    if e & (PRESENT | SWAPPED) != 0 {
                        set(page + i);
                    }
                }
                page += n;
            }
            if let Some(fo) = region.file_offset() {
                for (start, end) in data_extents(fo.file(), fo.start(), region.len())? {
                    let first = (start / PAGE_SIZE) as usize;
                    let last = end.div_ceil(PAGE_SIZE) as usize;
                    (first..last.min(pages)).for_each(&mut set);
                }
            }
            let base = region.start_addr().0;
            out.extend(
                crate::dirty::bit_runs(&bitmap)
                    .map(|(page, n)| (GuestAddress(base + page * PAGE_SIZE), n * PAGE_SIZE)),
            );
        }
        Ok(out)
    }

    /// Bytes of the VMM's own per-frame state (frame metadata, pin counters,
    /// dirty log) the kernel has populated: what this guest's RAM costs the
    /// VMM beyond the guest's pages. Page-granular, from `mincore`.
    pub fn state_resident_bytes(&self) -> io::Result<u64> {
        Ok(self.meta.resident_bytes()? + self.dirty_words.resident_bytes()?)
    }

    fn allocator(&self) -> MutexGuard<'_, FrameAllocator<SharedMeta>> {
        // A panic while holding the lock cannot leave the allocator half-updated
        // in a way later calls would trust less than a fresh lock: take it back.
        self.allocator.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// DMA pins on a range of guest frames, dropped with the guard.
#[derive(Debug)]
pub struct PinGuard {
    table: Arc<FrameTable<SharedMeta>>,
    range: FrameRange,
}

impl PinGuard {
    /// The pinned frames.
    pub fn frames(&self) -> FrameRange {
        self.range
    }

    /// First pinned frame.
    pub fn first_frame(&self) -> FrameNumber {
        self.range.start
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.table.unpin(self.range);
    }
}

/// DMA pins on several ranges, dropped together: what a device holds for one
/// request. [`PinSet::clear`] unpins and keeps both the list's allocation and
/// the table reference, so a device that reuses its sets pins a request with
/// at most one locked increment per buffer and nothing else (a [`PinGuard`]
/// per buffer also clones and drops an `Arc`). A buffer in the section of the
/// set's last single-section pin takes no new count and no lookup: the set
/// holds that section pinned until it is cleared, so a request whose buffers
/// share a section (nearly all) costs one increment and one decrement.
pub struct PinSet {
    table: Arc<FrameTable<SharedMeta>>,
    /// Metadata index of the section anchor of each count the set holds (one
    /// per pinned range and section it covers, but for consecutive ranges in
    /// one section).
    anchors: Vec<usize>,
    /// Ranges pinned.
    pins: usize,
    /// The section of the last single-section pin, which the set holds.
    held: Option<HeldSection>,
}

impl PinSet {
    /// Pins the frames of `[addr, addr + len)` until the set is cleared or
    /// dropped. Fails, changing nothing, as [`GuestFrames::pin`] does.
    #[inline(always)]
    pub fn pin(&mut self, addr: GuestAddress, len: u64) -> Result<(), table::Error> {
        // Inside the held section: nothing to look up or count (checked
        // here, inlined into the device's loop, before any call).
        if let Some(held) = self.held
            && held.covers(addr.0, len)
            && !self.table.section_poisoned(held)
        {
            self.pins += 1;
            return Ok(());
        }
        self.pin_new(addr, len)
    }

    /// [`PinSet::pin`] outside the held section.
    #[inline(never)]
    fn pin_new(&mut self, addr: GuestAddress, len: u64) -> Result<(), table::Error> {
        let anchors = &mut self.anchors;
        let held = self.held;
        self.held = self
            .table
            .pin_anchors(addr.into(), len, held, |a| anchors.push(a))?
            .or(held);
        self.pins += 1;
        Ok(())
    }

    /// Ranges pinned (none once parked).
    pub fn len(&self) -> usize {
        self.pins
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.pins == 0
    }

    /// Drops every pin of the set; the set stays usable.
    #[inline]
    pub fn clear(&mut self) {
        self.table.unpin_anchors(&self.anchors);
        self.anchors.clear();
        self.held = None;
        self.pins = 0;
    }

    /// Drops every pin of the set but its count on the section of its last
    /// single-section pin, which it keeps: a device reusing the set for the
    /// next request of a batch pins buffers in that section without an
    /// atomic. The caller [`PinSet::clear`]s parked sets when the batch ends,
    /// so nothing stays pinned while no request is in progress.
    pub fn park(&mut self) {
        let Some(held) = self.held else {
            return self.clear();
        };
        // Already parked on the held section (every buffer since was inside
        // it): nothing to unpin.
        if let [only] = self.anchors[..]
            && only == held.anchor()
        {
            self.pins = 0;
            return;
        }
        // The held section's count is recorded once (later buffers inside
        // it recorded nothing); any other counts on it go with the rest.
        let Some(at) = self.anchors.iter().position(|&a| a == held.anchor()) else {
            return self.clear();
        };
        self.anchors.swap_remove(at);
        self.table.unpin_anchors(&self.anchors);
        self.anchors.clear();
        self.anchors.push(held.anchor());
        self.pins = 0;
    }

    /// Whether the set pins frames of `frames` (and not of another VM's).
    pub fn belongs_to(&self, frames: &GuestFrames) -> bool {
        Arc::ptr_eq(&self.table, &frames.table)
    }
}

impl Drop for PinSet {
    fn drop(&mut self) {
        self.clear();
    }
}

impl std::fmt::Debug for PinSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinSet")
            .field("pins", &self.pins)
            .field("anchors", &self.anchors)
            .finish()
    }
}

/// The data extents of `file` within `[start, start + len)`, as offsets
/// from `start`.
fn data_extents(file: &File, start: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a descriptor `file` owns; it moves only that
        // descriptor's offset, which nothing here reads (mappings and
        // positioned reads ignore it).
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // No data from `at` to the end of the file.
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data - start, hole - start));
        at = hole;
    }
    Ok(out)
}

/// Maps each region from its file offset copy-on-write.
fn map_private(
    regions: Vec<(GuestAddress, usize, Option<FileOffset>)>,
) -> Result<GuestMemoryMmap, Error> {
    let mapped = regions
        .into_iter()
        .map(|(addr, len, fo)| {
            let mut builder = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE);
            if let Some(fo) = fo {
                builder = builder.with_file_offset(fo);
            }
            let region = builder
                .build()
                .map_err(|e| Error::Mmap(FromRangesError::MmapRegion(e)))?;
            GuestRegionMmap::new(region, addr)
                .ok_or(Error::Mmap(FromRangesError::InvalidGuestRegion))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(mapped).map_err(|e| Error::Mmap(FromRangesError::Collection(e)))
}

fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated string literal and the flags are valid;
    // memfd_create reads nothing else.
    let fd = unsafe { libc::memfd_create(c"minivmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor returned above and owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
    use std::string::ToString;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: u64 = 1 << 20;

    fn frames(size: u64) -> GuestFrames {
        GuestFrames::new(size, Backing::Anonymous).unwrap()
    }

    #[test]
    fn new_rejects_bad_sizes() {
        assert!(matches!(
            GuestFrames::new(0, Backing::Anonymous),
            Err(Error::InvalidSize(0))
        ));
        assert!(matches!(
            GuestFrames::new(MIB + 1, Backing::Anonymous),
            Err(Error::InvalidSize(_))
        ));
        assert!(matches!(
            GuestFrames::new(MAX_RAM + PAGE_SIZE, Backing::Anonymous),
            Err(Error::TooLarge(_))
        ));
    }

    #[test]
    fn small_guest_is_one_ram_entry() {
        let g = frames(128 * MIB);
        assert_eq!(g.memory().num_regions(), 1);
        assert_eq!(
            g.e820_map(),
            [E820Entry {
                addr: GuestAddress(0),
                size: 128 * MIB,
                kind: E820Kind::Ram
            }]
        );
        assert_eq!(g.stats().free, 128 * MIB / PAGE_SIZE);
    }

    #[test]
    fn large_guest_has_ram_above_the_mmio_hole() {
        let g = frames(3 << 30);
        assert_eq!(g.memory().num_regions(), 2);
        let e820 = g.e820_map();
        assert_eq!(e820.len(), 2);
        assert_eq!((e820[0].addr.0, e820[0].size), (0, MMIO_HOLE_START));
        assert_eq!(
            (e820[1].addr.0, e820[1].size),
            (MMIO_HOLE_END, (3 << 30) - MMIO_HOLE_START)
        );
        g.memory()
            .write_obj(0xabu8, GuestAddress(MMIO_HOLE_END + 5))
            .unwrap();
        assert!(
            g.memory()
                .write_obj(0u8, GuestAddress(MMIO_HOLE_START))
                .is_err()
        );
    }

    #[test]
    fn memfd_backed_ram_is_file_backed_and_usable() {
        let g = GuestFrames::new(3 << 30, Backing::Memfd).unwrap();
        let regions: Vec<_> = g.memory().iter().collect();
        assert_eq!(regions[0].file_offset().unwrap().start(), 0);
        assert_eq!(regions[1].file_offset().unwrap().start(), MMIO_HOLE_START);
        g.memory()
            .write_obj(0x1234_5678u32, GuestAddress(MMIO_HOLE_END))
            .unwrap();
        assert_eq!(
            g.memory()
                .read_obj::<u32>(GuestAddress(MMIO_HOLE_END))
                .unwrap(),
            0x1234_5678
        );
    }

    /// A memory file of `size` bytes with `marker` at offset `at`.
    fn memory_file(size: u64, at: u64, marker: u32) -> Arc<File> {
        use std::os::unix::fs::FileExt;
        let file = memfd(size).unwrap();
        file.write_all_at(&marker.to_le_bytes(), at).unwrap();
        Arc::new(file)
    }

    fn read_u32(g: &GuestFrames, addr: u64) -> u32 {
        g.memory().read_obj::<u32>(GuestAddress(addr)).unwrap()
    }

    fn file_u32(file: &File, at: u64) -> u32 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, at).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn private_file_backing_is_copy_on_write_and_shared_between_mappings() {
        // 3 GiB: the second region starts at file offset MMIO_HOLE_START.
        let file = memory_file(3 << 30, MMIO_HOLE_START + 8, 0xfeed);
        let backing = || Backing::File {
            file: file.clone(),
            shared: false,
        };
        let (a, b) = (
            GuestFrames::new(3 << 30, backing()).unwrap(),
            GuestFrames::new(3 << 30, backing()).unwrap(),
        );
        assert_eq!(read_u32(&a, MMIO_HOLE_END + 8), 0xfeed);
        a.memory()
            .write_obj(0x1111u32, GuestAddress(MMIO_HOLE_END + 8))
            .unwrap();
        assert_eq!(read_u32(&a, MMIO_HOLE_END + 8), 0x1111);
        // Neither the file nor the other mapping sees the write.
        assert_eq!(read_u32(&b, MMIO_HOLE_END + 8), 0xfeed);
        assert_eq!(file_u32(&file, MMIO_HOLE_START + 8), 0xfeed);
    }

    #[test]
    fn shared_file_backing_writes_through_to_the_file() {
        let file = memory_file(16 * MIB, 0x1000, 7);
        let g = GuestFrames::new(
            16 * MIB,
            Backing::File {
                file: file.clone(),
                shared: true,
            },
        )
        .unwrap();
        assert_eq!(read_u32(&g, 0x1000), 7);
        g.memory().write_obj(9u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(file_u32(&file, 0x1000), 9);
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        for len in [16 * MIB - PAGE_SIZE, 16 * MIB + PAGE_SIZE, 0] {
            let file = Arc::new(memfd(len).unwrap());
            let result = GuestFrames::new(
                16 * MIB,
                Backing::File {
                    file,
                    shared: false,
                },
            );
            assert!(
                matches!(result, Err(Error::FileSize { file, ram }) if file == len && ram == 16 * MIB),
                "{len:#x}"
            );
        }
    }

    #[test]
    fn placed_runs_are_placed_again_on_fresh_frames() {
        let g = frames(64 * MIB);
        g.place_at(Purpose::Firmware, GuestAddress(0x9f000), 0x61000)
            .unwrap();
        g.place(Purpose::Acpi, 0x1800, 4096, GuestAddress(0x9f000))
            .unwrap();
        g.place_at(Purpose::Kernel, GuestAddress(0x100000), 0x20_0000)
            .unwrap();
        g.place(Purpose::PageTables, 0x3000, 4096, GuestAddress(0x9f000))
            .unwrap();
        let runs = g.placed();
        assert!(runs.len() >= 3, "{runs:x?}");
        let fresh = frames(64 * MIB);
        fresh.place_again(&runs).unwrap();
        assert_eq!(fresh.placed(), runs);
        assert_eq!(e820(&fresh), e820(&g));
        // Placing them twice fails: the frames are no longer free.
        assert!(matches!(
            fresh.place_again(&runs[..1]),
            Err(Error::Restore { .. })
        ));
    }

    #[test]
    fn hostile_placed_runs_are_refused() {
        let g = frames(64 * MIB);
        let reserved = FrameFlags::RESERVED.bits();
        for run in [
            (0x1001, 0x1000, reserved),
            (0x1000, 0x1001, reserved),
            (0x1000, 0, reserved),
            (64 * MIB, 0x1000, reserved),
            (!0xfff, 0x2000, reserved),
            (0x1000, 0x1000, FrameFlags::FREE.bits()),
            (0x1000, 0x1000, 0),
            (0x1000, 0x1000, u32::MAX),
        ] {
            assert!(
                matches!(g.place_again(&[run]), Err(Error::Restore { .. })),
                "{run:x?}"
            );
        }
        assert!(g.placed().is_empty());
    }

    /// The e820 map as `(start, bytes, kind)`.
    fn e820(g: &GuestFrames) -> Vec<(u64, u64, E820Kind)> {
        g.e820_map()
            .iter()
            .map(|e| (e.addr.0, e.size, e.kind))
            .collect()
    }

    #[test]
    fn e820_map_shows_acpi_tables_as_their_own_type_between_reserved_blocks() {
        let g = frames(64 * MIB);
        g.place_at(Purpose::Firmware, GuestAddress(0x9f000), 0x61000)
            .unwrap();
        let acpi = g
            .place(Purpose::Acpi, 0x1800, 4096, GuestAddress(0x9f000))
            .unwrap();
        assert_eq!(acpi, GuestAddress(0x9d000));
        let zp = g
            .place(Purpose::BootParams, 4096, 4096, GuestAddress(0x9d000))
            .unwrap();
        assert_eq!(zp, GuestAddress(0x9c000));
        assert_eq!(
            e820(&g),
            [
                (0, 0x9c000, E820Kind::Ram),
                (0x9c000, 0x1000, E820Kind::Reserved),
                (0x9d000, 0x2000, E820Kind::Acpi),
                (0x9f000, 0x61000, E820Kind::Reserved),
                (0x100000, 64 * MIB - 0x100000, E820Kind::Ram),
            ]
        );
    }

    #[test]
    fn e820_map_follows_placed_structures() {
        let g = frames(64 * MIB);
        g.place_at(Purpose::Firmware, GuestAddress(0x9f000), 0x61000)
            .unwrap();
        g.place_at(Purpose::Kernel, GuestAddress(0x100000), 0x2345)
            .unwrap();
        let zp = g
            .place(Purpose::BootParams, 4096, 4096, GuestAddress(0x9f000))
            .unwrap();
        assert_eq!(
            zp,
            GuestAddress(0x9e000),
            "placed as high as possible below the limit"
        );
        let initrd = g
            .place(
                Purpose::Initrd,
                5 * MIB + 3,
                2 * MIB,
                GuestAddress(64 * MIB),
            )
            .unwrap();
        assert_eq!(initrd, GuestAddress(58 * MIB));
        assert_eq!(
            e820(&g),
            [
                (0, 0x9e000, E820Kind::Ram),
                (0x9e000, 0x62000, E820Kind::Reserved),
                (0x100000, 64 * MIB - 0x100000, E820Kind::Ram),
            ]
        );
        assert_eq!(
            g.stats().reserved,
            0x62000 / PAGE_SIZE + 3 + (5 * MIB / PAGE_SIZE + 1)
        );
    }

    #[test]
    fn place_rejects_overlap_and_bad_requests() {
        let g = frames(16 * MIB);
        g.place_at(Purpose::Kernel, GuestAddress(0x100000), MIB)
            .unwrap();
        let err = g
            .place_at(Purpose::Initrd, GuestAddress(0x1ff000), 0x2000)
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Place {
                purpose: Purpose::Initrd,
                source: buddy::Error::NotFree(_),
                ..
            }
        ));
        assert!(
            g.place_at(Purpose::Kernel, GuestAddress(16 * MIB), 1)
                .is_err()
        );
        assert!(
            g.place_at(Purpose::Kernel, GuestAddress(u64::MAX), 2)
                .is_err()
        );
        assert!(g.place_at(Purpose::Kernel, GuestAddress(0), 0).is_err());
        assert!(
            g.place(Purpose::Initrd, 0, 4096, GuestAddress(MIB))
                .is_err()
        );
        assert!(
            g.place(Purpose::Initrd, 4096, 3, GuestAddress(MIB))
                .is_err()
        );
        assert!(
            g.place(Purpose::Initrd, 32 * MIB, 4096, GuestAddress(u64::MAX))
                .is_err()
        );
        assert_eq!(g.stats().failed_allocations, 1);
        assert_eq!(
            err.to_string(),
            "Cannot place the initrd (0x2000 bytes)",
            "short message; the cause is the source"
        );
    }

    #[test]
    fn pin_guard_holds_frames_until_dropped() {
        let g = frames(16 * MIB);
        let guard = g.pin(GuestAddress(0x3ff0), 0x20).unwrap();
        assert_eq!(guard.frames().len(), 2);
        assert!(g.table().is_pinned(PhysAddr(0x4000), 1).unwrap());
        let second = g.pin(GuestAddress(0x4000), 1).unwrap();
        assert_eq!(g.table().pins(), 2);
        drop(guard);
        assert!(g.table().is_pinned(PhysAddr(0x4000), 1).unwrap());
        drop(second);
        assert_eq!(g.table().pins(), 0);
    }

    #[test]
    fn pin_set_holds_its_ranges_until_cleared_or_dropped() {
        let g = frames(16 * MIB);
        let other = frames(16 * MIB);
        let mut set = g.pin_set();
        assert!(set.belongs_to(&g) && !set.belongs_to(&other));
        set.pin(GuestAddress(0x3ff0), 0x20).unwrap();
        set.pin(GuestAddress(0x4000), 1).unwrap();
        assert!(set.pin(GuestAddress(0), 0).is_err());
        assert_eq!(set.len(), 2);
        assert_eq!(g.table().pins(), 1, "one count on the shared section");
        set.clear();
        assert!(set.is_empty());
        assert_eq!(g.table().pins(), 0);
        set.pin(GuestAddress(0x8000), 0x1000).unwrap();
        assert!(g.table().is_pinned(PhysAddr(0x8000), 1).unwrap());
        drop(set);
        assert_eq!(g.table().pins(), 0);
    }

    #[test]
    fn parked_pin_set_keeps_one_count_until_cleared() {
        let g = frames(16 * MIB);
        let mut set = g.pin_set();
        set.pin(GuestAddress(0x1000), 0x1000).unwrap();
        set.pin(GuestAddress(0x3000), 0x1000).unwrap();
        set.park();
        assert!(set.is_empty());
        assert_eq!(g.table().pins(), 1, "the section stays pinned, once");
        set.pin(GuestAddress(0x5000), 0x1000).unwrap();
        assert_eq!(g.table().pins(), 1, "a buffer inside it takes no count");
        set.park();
        set.park();
        assert_eq!(g.table().pins(), 1);
        set.clear();
        assert_eq!(g.table().pins(), 0);
        set.park();
        assert_eq!(g.table().pins(), 0, "nothing held: nothing kept");
        set.pin(GuestAddress(0x1000), 0x1000).unwrap();
        set.park();
        drop(set);
        assert_eq!(g.table().pins(), 0, "dropped with the set");
    }

    #[test]
    fn pin_rejects_ranges_outside_ram_wrapping_or_across_the_hole() {
        let g = frames(3 << 30);
        let across = GuestAddress(MMIO_HOLE_START - PAGE_SIZE);
        assert!(matches!(
            g.pin(across, 2 * PAGE_SIZE),
            Err(table::Error::NotRam(_))
        ));
        assert!(matches!(
            g.pin(GuestAddress(MMIO_HOLE_START), 1),
            Err(table::Error::NotRam(_))
        ));
        assert!(matches!(
            g.pin(GuestAddress(u64::MAX - 1), 4),
            Err(table::Error::Wraps(_))
        ));
        assert!(matches!(
            g.pin(GuestAddress(5 << 30), 1),
            Err(table::Error::NotRam(_))
        ));
        assert!(matches!(
            g.pin(GuestAddress(0), 0),
            Err(table::Error::Empty(_))
        ));
        assert!(g.pin(GuestAddress(MMIO_HOLE_END), 1 << 30).is_ok());
    }

    #[test]
    fn take_dirty_returns_written_ranges_once() {
        let g = frames(3 << 30);
        g.mark_dirty(GuestAddress(0x1800), 0x1000).unwrap();
        g.mark_dirty(GuestAddress(MMIO_HOLE_END), 1).unwrap();
        assert!(g.mark_dirty(GuestAddress(MMIO_HOLE_START), 1).is_err());
        assert_eq!(
            g.take_dirty(),
            [
                (GuestAddress(0x1000), 0x2000),
                (GuestAddress(MMIO_HOLE_END), PAGE_SIZE)
            ]
        );
        assert!(g.take_dirty().is_empty());
    }

    #[test]
    fn populated_pages_are_the_written_ones_and_a_files_data() {
        let g = frames(64 * MIB);
        for addr in [0x3000u64, 0x4000, 40 * MIB + 0x1000] {
            g.memory().write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        assert_eq!(
            g.populated().unwrap(),
            [
                (GuestAddress(0x3000), 2 * PAGE_SIZE),
                (GuestAddress(40 * MIB + 0x1000), PAGE_SIZE)
            ]
        );
        // Mapped from a file: its data extents count, written or not.
        let file = memory_file(16 * MIB, 5 * PAGE_SIZE, 9);
        let shared = false;
        let backed = GuestFrames::new(16 * MIB, Backing::File { file, shared }).unwrap();
        backed
            .memory()
            .write_obj(1u8, GuestAddress(0x9000))
            .unwrap();
        assert_eq!(
            backed.populated().unwrap(),
            [
                (GuestAddress(5 * PAGE_SIZE), PAGE_SIZE),
                (GuestAddress(9 * PAGE_SIZE), PAGE_SIZE)
            ]
        );
    }

    #[test]
    fn new_guest_costs_no_state_memory_whatever_its_size() {
        for size in [128 * MIB, 16 << 30, MAX_RAM] {
            let g = frames(size);
            let resident = g.state_resident_bytes().unwrap();
            assert!(
                resident <= 4 * PAGE_SIZE,
                "{size:#x}: {resident} bytes of metadata populated by new()"
            );
        }
    }

    #[test]
    fn booting_a_large_guest_touches_only_what_it_places() {
        let g = frames(MAX_RAM);
        g.place_at(Purpose::Firmware, GuestAddress(0x9f000), 0x61000)
            .unwrap();
        g.place_at(Purpose::Kernel, GuestAddress(0x100000), 32 * MIB)
            .unwrap();
        for purpose in [Purpose::Cmdline, Purpose::BootParams, Purpose::Gdt] {
            g.place(purpose, 4096, 4096, GuestAddress(0x9f000)).unwrap();
        }
        let e820 = g.e820_map();
        assert_eq!(e820.last().unwrap().kind, E820Kind::Ram);
        assert_eq!(
            e820.iter().map(|e| e.size).sum::<u64>(),
            MAX_RAM,
            "every byte of RAM described"
        );
        let resident = g.state_resident_bytes().unwrap();
        // The first windows' metadata, written; and the e820 walk reads each
        // section's anchor (one page per GiB, mapped to the zero page: address
        // space, not memory, but mincore counts it).
        let sections = MAX_RAM / (table::SECTION_FRAMES * PAGE_SIZE);
        assert!(
            resident <= MIB + sections * PAGE_SIZE,
            "{resident} bytes populated"
        );
    }

    #[test]
    fn dma_into_every_frame_costs_one_bit_per_frame() {
        let size = 4u64 << 30;
        let g = frames(size);
        let mut set = g.pin_set();
        // Every frame pinned and marked dirty, as devices writing all of RAM
        // in 1 MiB buffers would.
        for (start, len) in layout::ram_ranges(size) {
            for offset in (0..len).step_by(MIB as usize) {
                let a = GuestAddress(start.0 + offset);
                set.pin(a, MIB).unwrap();
                g.mark_dirty(a, MIB).unwrap();
            }
        }
        // One count per section: the set's consecutive buffers share them.
        let sections: u64 = layout::ram_ranges(size)
            .into_iter()
            .map(|(start, len)| ((start.0 + len - 1) >> 30) - (start.0 >> 30) + 1)
            .sum();
        assert_eq!(g.table().pins(), sections);
        set.clear();
        let resident = g.state_resident_bytes().unwrap();
        let bitmap = size / PAGE_SIZE / 8;
        assert!(
            resident <= bitmap + 16 * PAGE_SIZE,
            "{resident} bytes of state for {bitmap} bytes of dirty bits"
        );
        let dirty = g.take_dirty();
        assert_eq!(dirty.iter().map(|d| d.1).sum::<u64>(), size);
    }

    #[test]
    fn guest_resident_bytes_counts_written_pages() {
        let g = frames(3 << 30);
        assert_eq!(g.guest_resident_bytes().unwrap(), 0);
        g.memory().write_obj(1u8, GuestAddress(0x5000)).unwrap();
        g.memory()
            .write_obj(1u8, GuestAddress(MMIO_HOLE_END + 0x1000))
            .unwrap();
        assert_eq!(g.guest_resident_bytes().unwrap(), 2 * PAGE_SIZE);
    }
}
