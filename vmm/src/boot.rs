//! Loading a kernel and building what it boots from, every piece placed in
//! guest RAM through `memory::GuestFrames`.
//!
//! Order matters: linux-loader writes the image where the image says, so the
//! kernel is loaded first into untouched RAM and its footprint reserved at once;
//! everything else (legacy BIOS area, MP table, command line, initrd, boot
//! parameters, page tables, GDT, stack) is then placed by allocation, which can
//! never overlap the kernel. The e820 map is read from the frames last.
//!
//! Formats: an ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) boots through PVH
//! (as Cloud Hypervisor prefers); another ELF through its 64-bit entry; anything
//! else must be a bzImage (64-bit boot protocol, entry at load address + 0x200).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use memory::{E820Entry, GuestFrames, Purpose};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi;
use crate::x86::mptable;
use crate::x86::regs::{self, EntryMode};

/// RAM below this is the legacy low-memory area; kernels load above it.
const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);
/// The 640 KiB..1 MiB legacy VGA/BIOS hole, reserved in the e820 map.
const LEGACY_HOLE: GuestAddress = GuestAddress(0xa_0000);
/// Boot structures go below 640 KiB, allocated top-down under the MP table.
const LOW_LIMIT: GuestAddress = LEGACY_HOLE;
/// Most command-line bytes for ELF and PVH kernels (bzImages say their own).
const MAX_CMDLINE: usize = 4096;
/// Most e820 entries a zero page holds.
const E820_MAX: usize = 128;
/// Boot protocol version that introduced `xloadflags` (2.12).
const BOOT_PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// Errors while loading the kernel or building its boot structures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ACPI tables could not be placed or written.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// The kernel or initrd file cannot be opened or read.
    #[error("Cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    /// Not a regular file (a directory, a FIFO, a device), or it cannot be
    /// opened: refused before it is opened for reading.
    #[error("Cannot read {}", .0.display())]
    Open(PathBuf, #[source] devices::file::OpenError),
    /// The image cannot fit in guest RAM at all.
    #[error("Kernel image {} ({size} bytes) is larger than guest RAM ({ram} bytes)", path.display())]
    KernelTooLarge {
        /// Image path.
        path: PathBuf,
        /// Image size.
        size: u64,
        /// Guest RAM size.
        ram: u64,
    },
    /// Neither ELF nor bzImage, or a malformed one.
    #[error("{} is not a loadable bzImage or ELF kernel", .0.display())]
    BadKernel(PathBuf, #[source] loader::Error),
    /// The entry point (an ELF's PVH or 64-bit entry, a bzImage's load
    /// address + 0x200) is not in the loaded image.
    #[error("{}: entry point {entry:#x} is outside the loaded image [{start:#x}, {end:#x})", path.display())]
    BadEntry {
        /// Image path.
        path: PathBuf,
        /// The entry point.
        entry: u64,
        /// First loaded byte.
        start: u64,
        /// End of the loaded segments.
        end: u64,
    },
    /// A bzImage without the 64-bit entry point minivmm enters it at
    /// (`XLF_KERNEL_64`, boot protocol 2.12).
    #[error("{} has no 64-bit entry point (a 32-bit or pre-2.12 bzImage)", .0.display())]
    No64BitEntry(PathBuf),
    /// An empty initrd.
    #[error("Initrd {} is empty", .0.display())]
    EmptyInitrd(PathBuf),
    /// The command line is not valid for the kernel.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Placing a structure in guest RAM failed (overlap, no room).
    #[error(transparent)]
    Place(#[from] memory::guest::Error),
    /// The command line could not be written.
    #[error("Cannot write the command line")]
    WriteCmdline(#[source] loader::Error),
    /// The MP table could not be written.
    #[error("Cannot write the MP table")]
    MpTable(#[source] mptable::Error),
    /// Writing boot parameters failed.
    #[error("Cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("Cannot write guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// What the boot vCPU needs to start the kernel.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// How it enters.
    pub mode: EntryMode,
    /// Entry point.
    pub entry: GuestAddress,
    /// GDT the registers refer to.
    pub gdt: GuestAddress,
    /// Page tables (PML4) for the 64-bit entry; 0 for PVH.
    pub pml4: u64,
    /// Initial stack pointer.
    pub stack: GuestAddress,
    /// The ACPI RSDP, with ACPI.
    pub rsdp: Option<GuestAddress>,
}

/// The kernel, initrd and command line to boot.
#[derive(Clone, Debug)]
pub struct BootConfig<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initrd path.
    pub initrd: Option<&'a Path>,
    /// Command line, passed as given.
    pub cmdline: &'a str,
    /// virtio-mmio devices to announce on it, as `(base, size, irq)`:
    /// `virtio_mmio.device=` words among the kernel's own arguments, before
    /// any ` -- ` (after it, Linux hands words to init).
    pub virtio_mmio: &'a [(u64, u64, u32)],
    /// vCPUs, for the MP table (and the MADT).
    pub cpus: u8,
    /// ACPI tables describe the machine, the devices among it, instead of
    /// `virtio_mmio.device=` words.
    pub acpi: bool,
}

/// Loads the kernel and builds every boot structure in `frames`.
pub fn load(frames: &GuestFrames, config: &BootConfig<'_>) -> Result<BootInfo, Error> {
    let mut kernel = open(config.kernel)?;
    let size = kernel
        .metadata()
        .map_err(|e| Error::Read(config.kernel.into(), e))?
        .len();
    if size > frames.ram_size() {
        let (path, ram) = (config.kernel.into(), frames.ram_size());
        return Err(Error::KernelTooLarge { path, size, ram });
    }
    let loaded = load_kernel(frames, config.kernel, &mut kernel)?;

    frames.place_at(
        Purpose::Firmware,
        LEGACY_HOLE,
        HIMEM_START.0 - LEGACY_HOLE.0,
    )?;
    let mp_size = mptable::mptable_size(config.cpus) as u64;
    frames.place_at(
        Purpose::MpTable,
        mptable::mptable_start(config.cpus),
        mp_size,
    )?;
    mptable::setup_mptable(frames.memory(), config.cpus).map_err(Error::MpTable)?;
    // One description of the machine for the MP table and the ACPI tables.
    let rsdp = if config.acpi {
        let machine = acpi::Machine {
            cpus: config.cpus,
            virtio: config.virtio_mmio.to_vec(),
        };
        Some(acpi::place(frames, &machine, LOW_LIMIT)?.rsdp)
    } else {
        None
    };
    // With ACPI the DSDT announces the devices: a kernel that read both
    // would probe each twice.
    let announced = if config.acpi {
        &[][..]
    } else {
        config.virtio_mmio
    };

    let cmdline_capacity = match &loaded.result.setup_header {
        Some(hdr) if hdr.cmdline_size > 0 => hdr.cmdline_size as usize + 1,
        _ => MAX_CMDLINE,
    };
    let cmdline =
        kernel_cmdline(config.cmdline, cmdline_capacity, announced).map_err(Error::Cmdline)?;
    // Without its NUL.
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    let cmdline_addr = frames.place(Purpose::Cmdline, cmdline_len as u64 + 1, 16, LOW_LIMIT)?;
    loader::load_cmdline(frames.memory(), cmdline_addr, &cmdline).map_err(Error::WriteCmdline)?;

    let initrd = match config.initrd {
        Some(path) => Some(load_initrd(frames, path, initrd_limit(&loaded.result))?),
        None => None,
    };

    let gdt = frames.place(Purpose::Gdt, regs::GDT_SIZE, 8, LOW_LIMIT)?;
    let stack_page = frames.place(Purpose::BootStack, 4096, 4096, LOW_LIMIT)?;
    let stack = GuestAddress(stack_page.0 + 4096 - 16);
    let params = frames.place(Purpose::BootParams, 4096, 4096, LOW_LIMIT)?;
    let (mode, pml4) = match loaded.pvh_entry {
        Some(_) => (EntryMode::Pvh { start_info: params }, 0),
        None => {
            let tables =
                frames.place(Purpose::PageTables, regs::PAGE_TABLES_SIZE, 4096, LOW_LIMIT)?;
            let pml4 = regs::write_identity_map(frames.memory(), tables).map_err(Error::Memory)?;
            (
                EntryMode::Linux64 {
                    boot_params: params,
                },
                pml4,
            )
        }
    };
    regs::write_gdt(frames.memory(), gdt, mode).map_err(Error::Memory)?;

    // Everything is placed: the e820 map is final.
    let e820 = frames.e820_map();
    match mode {
        EntryMode::Pvh { start_info } => {
            write_start_info(frames, start_info, cmdline_addr, initrd, rsdp, &e820)?
        }
        EntryMode::Linux64 { boot_params } => {
            let hdr = loaded.result.setup_header.unwrap_or_default();
            write_zero_page(
                frames,
                boot_params,
                hdr,
                cmdline_addr,
                cmdline_len,
                initrd,
                rsdp,
                &e820,
            )?
        }
    }
    let entry = loaded.pvh_entry.unwrap_or(loaded.entry);
    log::info!("kernel entry {:#x} ({mode:?})", entry.0);
    Ok(BootInfo {
        mode,
        entry,
        gdt,
        pml4,
        stack,
        rsdp,
    })
}

/// The command line the kernel gets: the user's, with a `virtio_mmio.device=`
/// word per device added to the kernel's own arguments (before any ` -- `).
fn kernel_cmdline(
    user: &str,
    capacity: usize,
    devices: &[(u64, u64, u32)],
) -> Result<Cmdline, linux_loader::cmdline::Error> {
    let mut cmdline = Cmdline::try_from(user, capacity)?;
    for &(base, size, irq) in devices {
        cmdline.add_virtio_mmio_device(size, GuestAddress(base), irq, None)?;
    }
    Ok(cmdline)
}

struct Loaded {
    result: KernelLoaderResult,
    entry: GuestAddress,
    pvh_entry: Option<GuestAddress>,
}

/// Opens a kernel or initrd: a regular file, checked before it is opened for
/// reading (a FIFO would block, a device node run its open side effects).
fn open(path: &Path) -> Result<File, Error> {
    devices::file::open_regular(path, false).map_err(|e| Error::Open(path.into(), e))
}

/// Loads the image and reserves its footprint.
fn load_kernel(frames: &GuestFrames, path: &Path, file: &mut File) -> Result<Loaded, Error> {
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mem = frames.memory();
    let bad = |e| Error::BadKernel(path.into(), e);
    if is_elf {
        let result = Elf::load(mem, None, file, Some(HIMEM_START)).map_err(bad)?;
        let start = lowest_load_address(file).map_err(|e| Error::Read(path.into(), e))?;
        let len = result.kernel_end.saturating_sub(start.0);
        frames.place_at(Purpose::Kernel, start, len)?;
        let pvh_entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
            _ => None,
        };
        // The vCPU starts there: it must be code the image brought, not
        // whatever lies (or does not lie) at an arbitrary address.
        let entry = pvh_entry.unwrap_or(result.kernel_load).0;
        if entry < start.0 || entry >= result.kernel_end {
            return Err(Error::BadEntry {
                path: path.into(),
                entry,
                start: start.0,
                end: result.kernel_end,
            });
        }
        Ok(Loaded {
            entry: result.kernel_load,
            pvh_entry,
            result,
        })
    } else {
        let result = BzImage::load(mem, None, file, Some(HIMEM_START)).map_err(bad)?;
        let hdr = result.setup_header.unwrap_or_default();
        // minivmm enters at load address + 0x200 in long mode; a kernel that
        // does not say it has that entry would run garbage and triple-fault.
        if hdr.version < BOOT_PROTOCOL_XLOADFLAGS || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::No64BitEntry(path.into()));
        }
        let image = result.kernel_end.saturating_sub(result.kernel_load.0);
        // As for an ELF: the entry must be code the image brought.
        let entry = result.kernel_load.0 + 0x200;
        if entry >= result.kernel_end {
            return Err(Error::BadEntry {
                path: path.into(),
                entry,
                start: result.kernel_load.0,
                end: result.kernel_end,
            });
        }
        // The kernel decompresses itself into `init_size` bytes from its load address.
        frames.place_at(
            Purpose::Kernel,
            result.kernel_load,
            image.max(u64::from(hdr.init_size)),
        )?;
        Ok(Loaded {
            entry: GuestAddress(entry),
            pvh_entry: None,
            result,
        })
    }
}

/// The lowest physical address of the ELF's loadable segments (linux-loader
/// reports only the entry and the end). The header was validated by the load.
fn lowest_load_address(file: &mut File) -> io::Result<GuestAddress> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().expect("8 bytes"));
    let phentsize = u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]) as u64;
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]);
    let mut lowest = u64::MAX;
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        file.read_exact(&mut phdr)?;
        let p_type = u32::from_le_bytes(phdr[0..4].try_into().expect("4 bytes"));
        let p_filesz = u64::from_le_bytes(phdr[0x20..0x28].try_into().expect("8 bytes"));
        if p_type == 1 && p_filesz > 0 {
            lowest = lowest.min(u64::from_le_bytes(
                phdr[0x18..0x20].try_into().expect("8 bytes"),
            ));
        }
    }
    Ok(GuestAddress(if lowest == u64::MAX {
        HIMEM_START.0
    } else {
        lowest
    }))
}

/// Highest address (exclusive) an initrd may end at.
fn initrd_limit(result: &KernelLoaderResult) -> GuestAddress {
    match &result.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => GuestAddress(u64::from(hdr.initrd_addr_max) + 1),
        _ => GuestAddress(memory::layout::MMIO_HOLE_START),
    }
}

/// Copies the initrd into RAM, as high as possible below `limit`.
fn load_initrd(
    frames: &GuestFrames,
    path: &Path,
    limit: GuestAddress,
) -> Result<(GuestAddress, u64), Error> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|e| Error::Read(path.into(), e))?
        .len();
    if size == 0 {
        return Err(Error::EmptyInitrd(path.into()));
    }
    let addr = frames.place(Purpose::Initrd, size, 4096, limit)?;
    frames
        .memory()
        .read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|e| Error::Read(path.into(), io::Error::other(e)))?;
    Ok((addr, size))
}

#[allow(clippy::too_many_arguments)]
fn write_zero_page(
    frames: &GuestFrames,
    addr: GuestAddress,
    hdr: setup_header,
    cmdline: GuestAddress,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
    e820: &[E820Entry],
) -> Result<(), Error> {
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = cmdline.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x100_0000;
    if let Some((start, size)) = initrd {
        params.hdr.ramdisk_image = start.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: e.addr.0,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX) as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, addr), frames.memory())
        .map_err(Error::BootParams)
}

fn write_start_info(
    frames: &GuestFrames,
    addr: GuestAddress,
    cmdline: GuestAddress,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
    e820: &[E820Entry],
) -> Result<(), Error> {
    // One page holds the start info, the module list and the memory map.
    let memmap: Vec<_> = e820
        .iter()
        .take(E820_MAX)
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr.0,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modlist_addr = GuestAddress(addr.0 + 64);
    let memmap_addr = GuestAddress(addr.0 + 128);
    let info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: cmdline.0,
        memmap_paddr: memmap_addr.0,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { modlist_addr.0 } else { 0 },
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, addr);
    params.set_sections(&memmap, memmap_addr);
    if let Some((start, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: start.0,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], modlist_addr);
    }
    PvhBootConfigurator::write_bootparams(&params, frames.memory()).map_err(Error::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn virtio_devices_go_before_the_init_arguments() {
        let devices = [(0xd000_0000, 0x1000, 5), (0xd000_1000, 0x1000, 6)];
        let c = kernel_cmdline("console=ttyS0 -- single  init=x", 4096, &devices).unwrap();
        assert_eq!(
            text(&c),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 -- single  init=x"
        );
        let plain = kernel_cmdline("console=ttyS0", 4096, &devices[..1]).unwrap();
        assert_eq!(
            text(&plain),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(text(&kernel_cmdline("a b", 4096, &[]).unwrap()), "a b");
    }

    fn cstring_at(frames: &GuestFrames, addr: u64) -> String {
        let mut bytes = vec![0u8; 4096];
        frames
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        let end = bytes.iter().position(|&b| b == 0).unwrap();
        String::from_utf8(bytes[..end].to_vec()).unwrap()
    }

    #[test]
    fn acpi_boot_passes_the_rsdp_and_announces_devices_only_in_the_dsdt() {
        let dir = std::env::temp_dir().join(format!("minivmm-boot-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pvh = dir.join("pvh");
        std::fs::write(&pvh, ::tests::pvh_elf(&[0xf4])).unwrap();
        let bz = dir.join("bzimage");
        std::fs::write(&bz, ::tests::bzimage(0x020f, 1, &[0xf4; 16])).unwrap();
        for (kernel, acpi) in [(&pvh, false), (&pvh, true), (&bz, false), (&bz, true)] {
            let frames = GuestFrames::new(64 << 20, memory::guest::Backing::Anonymous).unwrap();
            let config = BootConfig {
                kernel,
                initrd: None,
                cmdline: "console=ttyS0",
                virtio_mmio: &[(0xd000_0000, 0x1000, 5)],
                cpus: 2,
                acpi,
            };
            let info = load(&frames, &config).unwrap();
            let expected = acpi.then_some(acpi::RSDP_ADDR);
            assert_eq!(info.rsdp, expected);
            let mem = frames.memory();
            let (cmdline, rsdp) = match info.mode {
                EntryMode::Pvh { start_info } => {
                    let si: hvm_start_info = mem.read_obj(start_info).unwrap();
                    (si.cmdline_paddr, si.rsdp_paddr)
                }
                EntryMode::Linux64 { boot_params } => {
                    let bp: boot_params = mem.read_obj(boot_params).unwrap();
                    (u64::from(bp.hdr.cmd_line_ptr), bp.acpi_rsdp_addr)
                }
            };
            assert_eq!(rsdp, expected.map_or(0, |a| a.0), "{kernel:?} acpi {acpi}");
            let words = cstring_at(&frames, cmdline);
            assert_eq!(words.contains("virtio_mmio.device="), !acpi, "{words}");
            let acpi_e820 = frames
                .e820_map()
                .iter()
                .any(|e| e.kind == memory::guest::E820Kind::Acpi);
            assert_eq!(acpi_e820, acpi);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn device_words_that_do_not_fit_are_an_error() {
        let devices = [(0xd000_0000, 0x1000, 5)];
        assert!(kernel_cmdline("console=ttyS0", 20, &devices).is_err());
    }
}
