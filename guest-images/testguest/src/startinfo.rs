//! Reading the PVH `hvm_start_info` (Xen's `arch-x86/hvm/start_info.h`).
//!
//! Everything the VMM hands over is untrusted input: the structure's magic is
//! checked, every pointer must be non-null and lie below 4 GiB (the boot page
//! tables map only that much), the command line is bounded to 4 KiB, and the
//! memory map and module list to fixed sizes. Each problem is an error or a
//! recorded warning, never a panic. The command line, memory map and module
//! ranges are copied into [`BootInfo`], so later code never reads (or aliases)
//! the VMM's copies.

use core::fmt;

/// `hvm_start_info.magic`: "xEn3" with the 0x80 bit of the "E" set.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Longest command line read, NUL included.
pub const MAX_CMDLINE: usize = 4096;
/// Most memory map entries accepted.
pub const MAX_MEMMAP: usize = 128;
/// Most modules whose memory is kept away from the allocator.
pub const MAX_MODULES: usize = 8;
/// E820 / memmap type of usable RAM.
pub const MEMMAP_RAM: u32 = 1;
/// Addresses below this are identity mapped from the first instruction on.
pub const BOOT_MAPPED_LIMIT: u64 = 4 << 30;

/// `struct hvm_start_info`, version 1 (version 0 ends at `rsdp_paddr`).
#[derive(Clone, Copy)]
#[repr(C)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_modlist_entry`.
#[derive(Clone, Copy)]
#[repr(C)]
struct RawModule {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

/// `struct hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MemmapEntry {
    /// Base address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// Types whose every bit pattern is a valid value: safe to read from memory
/// the VMM wrote.
///
/// # Safety
/// Implementors are `repr(C)` integers or structs of integers.
unsafe trait Plain: Copy {}
// SAFETY: repr(C) struct of integers.
unsafe impl Plain for RawStartInfo {}
// SAFETY: repr(C) struct of integers.
unsafe impl Plain for RawModule {}
// SAFETY: repr(C) struct of integers.
unsafe impl Plain for MemmapEntry {}
// SAFETY: an integer.
unsafe impl Plain for u8 {}
// SAFETY: an integer.
unsafe impl Plain for u32 {}

/// A physical byte range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl PhysRange {
    /// Whether the two ranges share a byte.
    pub fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Whether the range holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Why the boot information cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootError {
    /// `ebx` was 0.
    NoStartInfo,
    /// A structure does not lie below 4 GiB, or wraps.
    Unmapped {
        /// Which structure.
        what: &'static str,
        /// Its address.
        addr: u64,
        /// Its size.
        len: u64,
    },
    /// The magic is wrong.
    BadMagic(u32),
    /// Version 0 has no memory map.
    NoMemmap {
        /// Version found.
        version: u32,
    },
    /// Version 1 or later, but zero entries or a null pointer.
    EmptyMemmap,
    /// More entries than `MAX_MEMMAP`.
    TooManyMemmapEntries(u32),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::NoStartInfo => write!(f, "no hvm_start_info (ebx = 0)"),
            BootError::Unmapped { what, addr, len } => {
                write!(f, "{what} at 0x{addr:x} ({len} bytes) is not below 4 GiB")
            }
            BootError::BadMagic(m) => write!(
                f,
                "bad hvm_start_info magic 0x{m:08x}, expected 0x{START_INFO_MAGIC:08x}"
            ),
            BootError::NoMemmap { version } => write!(
                f,
                "hvm_start_info version {version} has no memory map (version 1 needed)"
            ),
            BootError::EmptyMemmap => write!(f, "hvm_start_info memory map is empty"),
            BootError::TooManyMemmapEntries(n) => write!(
                f,
                "memory map has {n} entries, at most {MAX_MEMMAP} are supported"
            ),
        }
    }
}

/// What the guest keeps of `hvm_start_info`.
#[derive(Debug)]
pub struct BootInfo {
    /// Version field.
    pub version: u32,
    /// The `hvm_start_info` structure itself.
    pub start_info: PhysRange,
    /// The command line bytes read, NUL included (empty if none).
    pub cmdline_at: PhysRange,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// No NUL within `MAX_CMDLINE` bytes: the command line was cut.
    pub cmdline_truncated: bool,
    /// The memory map table.
    pub memmap_at: PhysRange,
    memmap: [MemmapEntry; MAX_MEMMAP],
    memmap_len: usize,
    /// The module list (empty if none or unreadable).
    pub modlist_at: PhysRange,
    modules: [PhysRange; MAX_MODULES],
    module_count: usize,
    /// Modules beyond `MAX_MODULES`, or all of them if the list is not below 4 GiB.
    pub modules_ignored: u32,
    /// ACPI RSDP address (0 if none).
    pub rsdp: u64,
}

/// Reads a `T` at physical address `addr`, which `mapped` has checked.
fn read<T: Plain>(addr: u64) -> T {
    // SAFETY: callers pass addresses that `mapped` accepted: non-null, below
    // 4 GiB (identity mapped by the boot page tables) with the whole `T` below
    // it too. `T: Plain` makes any byte pattern a valid value, and the read is
    // unaligned-safe. Reading MMIO-hole addresses returns device data, not UB.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// `[addr, addr + len)` if it is non-null and lies below 4 GiB.
fn mapped(what: &'static str, addr: u64, len: u64) -> Result<PhysRange, BootError> {
    match addr.checked_add(len) {
        Some(end) if addr != 0 && end <= BOOT_MAPPED_LIMIT => Ok(PhysRange { start: addr, end }),
        _ => Err(BootError::Unmapped { what, addr, len }),
    }
}

/// Reads and checks the `hvm_start_info` at `paddr`.
pub fn parse(paddr: u64) -> Result<BootInfo, BootError> {
    if paddr == 0 {
        return Err(BootError::NoStartInfo);
    }
    // Version 0's size first: the magic and version decide how much to read.
    let v0_len = core::mem::offset_of!(RawStartInfo, memmap_paddr) as u64;
    mapped("hvm_start_info", paddr, v0_len)?;
    let magic: u32 = read(paddr + core::mem::offset_of!(RawStartInfo, magic) as u64);
    if magic != START_INFO_MAGIC {
        return Err(BootError::BadMagic(magic));
    }
    let version: u32 = read(paddr + core::mem::offset_of!(RawStartInfo, version) as u64);
    if version == 0 {
        return Err(BootError::NoMemmap { version });
    }
    let start_info = mapped(
        "hvm_start_info",
        paddr,
        core::mem::size_of::<RawStartInfo>() as u64,
    )?;
    let raw: RawStartInfo = read(paddr);

    let mut info = BootInfo {
        version,
        start_info,
        cmdline_at: PhysRange::default(),
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        cmdline_truncated: false,
        memmap_at: PhysRange::default(),
        memmap: [MemmapEntry::default(); MAX_MEMMAP],
        memmap_len: 0,
        modlist_at: PhysRange::default(),
        modules: [PhysRange::default(); MAX_MODULES],
        module_count: 0,
        modules_ignored: 0,
        rsdp: raw.rsdp_paddr,
    };
    read_memmap(&mut info, &raw)?;
    read_cmdline(&mut info, raw.cmdline_paddr)?;
    read_modules(&mut info, &raw);
    Ok(info)
}

fn read_memmap(info: &mut BootInfo, raw: &RawStartInfo) -> Result<(), BootError> {
    let count = raw.memmap_entries;
    if count == 0 || raw.memmap_paddr == 0 {
        return Err(BootError::EmptyMemmap);
    }
    if count as usize > MAX_MEMMAP {
        return Err(BootError::TooManyMemmapEntries(count));
    }
    let entry = core::mem::size_of::<MemmapEntry>() as u64;
    info.memmap_at = mapped("memory map", raw.memmap_paddr, u64::from(count) * entry)?;
    for (i, slot) in info.memmap[..count as usize].iter_mut().enumerate() {
        *slot = read(raw.memmap_paddr + i as u64 * entry);
    }
    info.memmap_len = count as usize;
    Ok(())
}

fn read_cmdline(info: &mut BootInfo, addr: u64) -> Result<(), BootError> {
    if addr == 0 {
        return Ok(());
    }
    // At least the first byte must be readable; read on up to 4 KiB or 4 GiB.
    mapped("command line", addr, 1)?;
    let limit = (BOOT_MAPPED_LIMIT - addr).min(MAX_CMDLINE as u64) as usize;
    let mut len = 0;
    while len < limit {
        let byte: u8 = read(addr + len as u64);
        if byte == 0 {
            break;
        }
        info.cmdline[len] = byte;
        len += 1;
    }
    // No NUL within the bound: keep what was read and say so.
    info.cmdline_truncated = len == limit;
    info.cmdline_len = len;
    let occupied = if info.cmdline_truncated { len } else { len + 1 };
    info.cmdline_at = PhysRange {
        start: addr,
        end: addr + occupied as u64,
    };
    Ok(())
}

fn read_modules(info: &mut BootInfo, raw: &RawStartInfo) {
    if raw.nr_modules == 0 || raw.modlist_paddr == 0 {
        return;
    }
    let size = core::mem::size_of::<RawModule>() as u64;
    let count = raw.nr_modules.min(MAX_MODULES as u32);
    let Ok(list) = mapped("module list", raw.modlist_paddr, u64::from(count) * size) else {
        info.modules_ignored = raw.nr_modules;
        return;
    };
    info.modlist_at = list;
    for i in 0..count as usize {
        let module: RawModule = read(raw.modlist_paddr + i as u64 * size);
        info.modules[i] = PhysRange {
            start: module.paddr,
            end: module.paddr.saturating_add(module.size),
        };
    }
    info.module_count = count as usize;
    info.modules_ignored = raw.nr_modules - count;
}

impl BootInfo {
    /// The command line: its longest valid UTF-8 prefix.
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            // The prefix up to `valid_up_to` is valid UTF-8 by definition.
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// Whether the command line had bytes that are not UTF-8 (dropped from
    /// [`cmdline`](Self::cmdline)).
    pub fn cmdline_is_cut_utf8(&self) -> bool {
        self.cmdline().len() != self.cmdline_len
    }

    /// The memory map entries.
    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// The byte ranges of the modules kept.
    pub fn modules(&self) -> &[PhysRange] {
        &self.modules[..self.module_count]
    }

    /// Every byte range boot information occupies: `hvm_start_info`, the command
    /// line, the memory map, the module list and the modules.
    pub fn occupied(&self) -> impl Iterator<Item = PhysRange> + Clone + '_ {
        [
            self.start_info,
            self.cmdline_at,
            self.memmap_at,
            self.modlist_at,
        ]
        .into_iter()
        .chain(self.modules().iter().copied())
        .filter(|r| !r.is_empty())
    }
}
