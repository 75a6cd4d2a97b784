//! The tables' checksums, lengths and contents; the DSDT decoded by `iasl`
//! (Debian's acpica-tools) when it is installed (required under CI).

use std::process::Command;

use memory::guest::{Backing, E820Kind};
use vm_memory::Bytes;

use super::*;

fn machine(cpus: u8, devices: usize) -> Machine {
    Machine {
        cpus,
        virtio: (0..devices)
            .map(|n| (0xd000_0000 + 0x1000 * n as u64, 0x1000, 5 + n as u32))
            .collect(),
    }
}

fn frames() -> GuestFrames {
    GuestFrames::new(64 << 20, Backing::Anonymous).unwrap()
}

fn read(frames: &GuestFrames, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    frames
        .memory()
        .read_slice(&mut v, GuestAddress(addr))
        .unwrap();
    v
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A table at `addr`: its whole length, checked to sum to zero.
fn table(frames: &GuestFrames, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let head = read(frames, addr, 36);
    assert_eq!(&head[..4], signature);
    let t = read(frames, addr, u32_at(&head, 4) as usize);
    assert_eq!(
        sum(&t),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    t
}

/// Follows RSDP -> XSDT -> FADT, MADT -> DSDT; returns (FADT, MADT, DSDT).
fn walk(frames: &GuestFrames, placed: &Placed) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let rsdp = read(frames, placed.rsdp.0, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "revision 2");
    let xsdt = table(frames, u64_at(&rsdp, 24), b"XSDT");
    assert_eq!(xsdt.len(), 36 + 16);
    let fadt = table(frames, u64_at(&xsdt, 36), b"FACP");
    let madt = table(frames, u64_at(&xsdt, 44), b"APIC");
    let dsdt = table(frames, u64_at(&fadt, 140), b"DSDT");
    (fadt, madt, dsdt)
}

#[test]
fn acpi_tables_chain_from_the_rsdp_with_valid_checksums() {
    let frames = frames();
    let placed = place(&frames, &machine(2, 3), GuestAddress(0xa_0000)).unwrap();
    assert_eq!(placed.rsdp, RSDP_ADDR);
    let (fadt, _, dsdt) = walk(&frames, &placed);
    assert_eq!(fadt.len(), 276);
    let flags = u32_at(&fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // Reset register: system I/O, byte, at RESET_PORT, value RESET_VALUE.
    assert_eq!(fadt[116], 1);
    assert_eq!(u64_at(&fadt, 120), u64::from(RESET_PORT));
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(u64_at(&fadt, 244 + 4), u64::from(SLEEP_CONTROL_PORT));
    assert_eq!(u64_at(&fadt, 256 + 4), u64::from(SLEEP_STATUS_PORT));
    assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
}

#[test]
fn acpi_madt_lists_every_vcpu_the_ioapic_and_the_isa_overrides() {
    for cpus in [1u8, 2, 4, 254] {
        let frames = frames();
        let placed = place(&frames, &machine(cpus, 0), GuestAddress(0xa_0000)).unwrap();
        let (_, madt, _) = walk(&frames, &placed);
        assert_eq!(u32_at(&madt, 36), mptable::APIC_DEFAULT_PHYS_BASE);
        let (mut apics, mut ioapics, mut overrides) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], usize::from(madt[at + 1]));
            match kind {
                0 => apics.push((madt[at + 2], madt[at + 3], u32_at(&madt, at + 4))),
                1 => ioapics.push((madt[at + 2], u32_at(&madt, at + 4), u32_at(&madt, at + 8))),
                2 => overrides.push((madt[at + 3], u32_at(&madt, at + 4))),
                other => panic!("unexpected MADT structure {other}"),
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        let expected: Vec<_> = (0..cpus).map(|c| (c, c, 1)).collect();
        assert_eq!(apics, expected, "one enabled local APIC per vCPU");
        // The MP table's I/O APIC: same id and address.
        assert_eq!(
            ioapics,
            [(
                mptable::ioapic_id(cpus),
                mptable::IO_APIC_DEFAULT_PHYS_BASE,
                0
            )]
        );
        let identity: Vec<_> = (1..16u8).map(|i| (i, u32::from(i))).collect();
        assert_eq!(overrides, identity);
    }
}

#[test]
fn acpi_tables_are_placed_as_acpi_memory_in_the_e820_map() {
    let frames = frames();
    let placed = place(&frames, &machine(1, 16), GuestAddress(0xa_0000)).unwrap();
    let e820 = frames.e820_map();
    assert!(
        e820.iter().any(|e| e.kind == E820Kind::Acpi
            && e.addr.0 <= placed.tables.0
            && placed.tables.0 + placed.len <= e.addr.0 + e.size),
        "{e820:?} {placed:?}"
    );
}

#[test]
fn acpi_dsdt_decodes_with_iasl_and_shows_every_device() {
    let Some(iasl) = which("iasl") else {
        assert!(
            std::env::var("MINIVMM_REQUIRE_KVM").as_deref() != Ok("1"),
            "iasl (acpica-tools) is required under CI"
        );
        eprintln!(
            "SKIPPED acpi_dsdt_decodes_with_iasl: iasl not installed (apt-get install acpica-tools)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("minivmm-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dat = dir.join("dsdt.dat");
    std::fs::write(&dat, dsdt(&machine(2, 3))).unwrap();
    let out = Command::new(iasl)
        .arg("-d")
        .arg(&dat)
        .current_dir(&dir)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl -d failed: {log}");
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    // And the decoded source compiles again without errors.
    let out = Command::new(which("iasl").unwrap())
        .args(["-p", "again"])
        .arg(dir.join("dsdt.dsl"))
        .current_dir(&dir)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && log.contains(" 0 Errors"),
        "iasl: {log}"
    );
    assert!(dsl.contains("PNP0501"), "{dsl}");
    assert_eq!(dsl.matches("\"LNRO0005\"").count(), 3, "{dsl}");
    for (base, irq) in [(0xD0000000u64, 5), (0xD0001000, 6), (0xD0002000, 7)] {
        assert!(
            dsl.contains(&format!("0x{base:08X}")),
            "window {base:#x}: {dsl}"
        );
        assert!(dsl.contains(&format!("0x{irq:08X},")), "irq {irq}: {dsl}");
    }
    assert!(dsl.contains("_S5_"), "{dsl}");
}

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(tool))
        .find(|p| p.is_file())
}
