//! Boot-time x86 CPU state: GDT, identity page tables, registers, FPU, MSRs and
//! the LAPIC's LINT pins, for the two entry modes minivmm uses.
//!
//! - Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit Boot
//!   Protocol"): long mode, paging on with an identity map, `__BOOT_CS` = 0x10 and
//!   `__BOOT_DS` = 0x18 flat segments, `%rsi` = the zero page.
//! - PVH (xenbits pvh.html): 32-bit protected mode, paging off, flat 4 GiB CS/DS,
//!   `%ebx` = the `hvm_start_info` structure.
//!
//! Everything here builds values; `vm.rs` hands them to KVM.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// How a vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol; `boot_params` is the zero page.
    Linux64 { boot_params: GuestAddress },
    /// PVH 32-bit entry; `start_info` is the `hvm_start_info`.
    Pvh { start_info: GuestAddress },
}

/// Bytes of the GDT minivmm writes (5 descriptors).
pub const GDT_SIZE: u64 = 5 * 8;
/// Bytes of the identity page tables: PML4, PDPT, four page directories.
pub const PAGE_TABLES_SIZE: u64 = 6 * 4096;

const CODE_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT descriptor from its access/flags word (`flags` as in Firecracker's
/// `gdt_entry`: bits 0-7 access byte, bits 12-15 flags), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The GDT for `mode`: null, null, code at 0x10, data at 0x18, TSS at 0x20.
pub fn gdt(mode: EntryMode) -> [u64; 5] {
    let code = match mode {
        EntryMode::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, L=1
        EntryMode::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit code, D=1
    };
    [
        0,
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0x67),
    ]
}

/// The KVM segment a GDT descriptor describes.
fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        ..Default::default()
    }
}

/// Writes the GDT for `mode` at `addr`.
pub fn write_gdt(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    mode: EntryMode,
) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, addr.unchecked_add(i as u64 * 8))?;
    }
    Ok(())
}

/// Writes page tables at `addr` (6 pages) identity-mapping the first 4 GiB with
/// 2 MiB pages. Returns the PML4 address for CR3.
pub fn write_identity_map(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
) -> Result<u64, vm_memory::GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pml4 = addr.0;
    let pdpt = pml4 + 0x1000;
    mem.write_obj(pdpt | PRESENT_RW, GuestAddress(pml4))?;
    for gib in 0..4u64 {
        let pd = pdpt + 0x1000 * (1 + gib);
        mem.write_obj(pd | PRESENT_RW, GuestAddress(pdpt + gib * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((gib << 30) + (i << 21)) | PRESENT_RW | HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(pml4)
}

/// Special registers for `mode`, starting from the vCPU's current ones (which
/// keep KVM's APIC base and the like).
pub fn sregs(
    mut sregs: kvm_sregs,
    mode: EntryMode,
    gdt_addr: GuestAddress,
    pml4: u64,
) -> kvm_sregs {
    let table = gdt(mode);
    let code = segment(table[2], CODE_SEL);
    let data = segment(table[3], DATA_SEL);
    sregs.gdt.base = gdt_addr.0;
    sregs.gdt.limit = GDT_SIZE as u16 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(table[4], TSS_SEL);
    match mode {
        EntryMode::Linux64 { .. } => {
            sregs.cr3 = pml4;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers: entry point, boot structure pointer, and a stack for Linux.
pub fn regs(mode: EntryMode, entry: GuestAddress, stack: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 { boot_params } => {
            regs.rsi = boot_params.0;
            regs.rsp = stack.0;
            regs.rbp = stack.0;
        }
        EntryMode::Pvh { start_info } => regs.rbx = start_info.0,
    }
    regs
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs every vCPU starts with (as Firecracker): SYSENTER/SYSCALL MSRs cleared,
/// TSC 0, fast strings on, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const IA32_SYSENTER_CS: u32 = 0x174;
    const IA32_SYSENTER_ESP: u32 = 0x175;
    const IA32_SYSENTER_EIP: u32 = 0x176;
    const IA32_TSC: u32 = 0x10;
    const IA32_MISC_ENABLE: u32 = 0x1a0;
    const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const CSTAR: u32 = 0xc000_0083;
    const SYSCALL_MASK: u32 = 0xc000_0084;
    const KERNEL_GS_BASE: u32 = 0xc000_0102;
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(IA32_SYSENTER_CS, 0),
        entry(IA32_SYSENTER_ESP, 0),
        entry(IA32_SYSENTER_EIP, 0),
        entry(STAR, 0),
        entry(CSTAR, 0),
        entry(KERNEL_GS_BASE, 0),
        entry(SYSCALL_MASK, 0),
        entry(LSTAR, 0),
        entry(IA32_TSC, 0),
        entry(IA32_MISC_ENABLE, 1),
        entry(IA32_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// Routes LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as a PC BIOS does.
pub fn set_lint_pins(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: Vec<u8> = reg.iter().map(|&b| b as u8).collect();
        let old = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        let new = (old & !0x700) | mode;
        for (dst, src) in reg.iter_mut().zip(new.to_le_bytes()) {
            *dst = src as _;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_code_segment_is_64_bit_flat() {
        let cs = segment(
            gdt(EntryMode::Linux64 {
                boot_params: GuestAddress(0),
            })[2],
            CODE_SEL,
        );
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.type_),
            (1, 0, 1, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn pvh_code_segment_is_32_bit_flat() {
        let cs = segment(
            gdt(EntryMode::Pvh {
                start_info: GuestAddress(0),
            })[2],
            CODE_SEL,
        );
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.base, cs.limit),
            (0, 1, 1, 0, 0xffff_ffff)
        );
    }

    #[test]
    fn gdt_entries_match_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0x67), 0x0080_8b00_0000_0067);
    }

    #[test]
    fn identity_map_covers_4g_with_2m_pages() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let pml4 = write_identity_map(&mem, GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4, 0x9000);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0xa003);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xa000 + 3 * 8)).unwrap(),
            0xe003
        );
        let last_pd = 0xe000 + 511 * 8;
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(last_pd)).unwrap(),
            0xffe0_0083
        );
    }

    #[test]
    fn sregs_enter_long_mode_for_linux_and_protected_mode_for_pvh() {
        let s = sregs(
            kvm_sregs::default(),
            EntryMode::Linux64 {
                boot_params: GuestAddress(0),
            },
            GuestAddress(0x500),
            0x9000,
        );
        assert_eq!((s.cr3, s.cs.selector, s.ds.selector), (0x9000, 0x10, 0x18));
        assert!(s.cr0 & CR0_PG != 0 && s.efer & EFER_LMA != 0 && s.cr4 & CR4_PAE != 0);
        let s = sregs(
            kvm_sregs::default(),
            EntryMode::Pvh {
                start_info: GuestAddress(0),
            },
            GuestAddress(0x500),
            0,
        );
        assert_eq!((s.cr0, s.efer, s.cs.db), (CR0_PE | CR0_ET, 0, 1));
    }

    #[test]
    fn lint_pins_route_extint_and_nmi() {
        let mut lapic = kvm_lapic_state::default();
        set_lint_pins(&mut lapic);
        assert_eq!(lapic.regs[0x351] as u8, 0x7);
        assert_eq!(lapic.regs[0x361] as u8, 0x4);
    }
}
