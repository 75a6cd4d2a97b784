//! The Intel MultiProcessor Specification 1.4 table: how a Linux guest without
//! ACPI finds its vCPUs, the I/O APIC and the ISA interrupt routing.
//!
//! Layout, at the top of base memory (below 640 KiB): the configuration table
//! (header, one processor entry per vCPU, the ISA bus, the I/O APIC, ISA IRQs
//! 0..=23 routed to I/O APIC pins 0..=23, LINT0 as ExtINT and LINT1 as NMI),
//! then the 16-byte floating pointer in the last paragraph below 640 KiB, which
//! is one of the places Linux scans ("last KiB of base memory", MP spec §4).
//! The table is serialised byte by byte (little endian) and written in one go.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Local APIC base address, as every vCPU sees it.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// I/O APIC base address (minivmm's I/O APIC, `devices::ioapic`).
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;
/// Most vCPUs an MP table describes: local APIC ids are `0..cpus`, the I/O APIC
/// takes id `cpus`, and 0xff means "all local APICs".
pub const MAX_CPUS: u8 = 254;
/// I/O APIC pins, and ISA/legacy IRQs routed to them.
pub const IOAPIC_PINS: u8 = 24;

/// End of base memory: the floating pointer is in the paragraph just below.
const BASE_MEMORY_END: u64 = 0xa_0000;
const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const PROCESSOR_ENTRY_SIZE: usize = 20;
const SHORT_ENTRY_SIZE: usize = 8;
const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

// Entry types (MP spec §4.3).
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
// Interrupt types.
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
// Family 6 signature; FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No vCPU, or more than APIC ids allow.
    #[error("An MP table describes 1 to {MAX_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// Guest memory could not be written.
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The I/O APIC's id: the first after the vCPUs' APIC ids (0..cpus).
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Bytes the whole table (configuration table and floating pointer) spans for
/// `cpus` vCPUs, from [`mptable_start`] to 640 KiB.
pub fn mptable_size(cpus: u8) -> usize {
    (BASE_MEMORY_END - mptable_start(cpus).0) as usize
}

/// Where the table starts for `cpus` vCPUs: 16-byte aligned, as high as it fits
/// below 640 KiB.
pub fn mptable_start(cpus: u8) -> GuestAddress {
    let end = BASE_MEMORY_END - FLOATING_POINTER_SIZE as u64;
    GuestAddress((end - config_table_len(cpus) as u64) & !0xf)
}

/// Writes the MP table for `cpus` vCPUs at [`mptable_start`]; the I/O APIC gets
/// id `cpus` (after the local APIC ids `0..cpus`).
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<GuestAddress, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::CpuCount(cpus));
    }
    let start = mptable_start(cpus);
    let table = build(start, cpus);
    mem.write_slice(&table, start).map_err(Error::Write)?;
    Ok(start)
}

/// Length of the configuration table (header and entries).
fn config_table_len(cpus: u8) -> usize {
    HEADER_SIZE
        + PROCESSOR_ENTRY_SIZE * usize::from(cpus)
        + SHORT_ENTRY_SIZE * (1 + 1 + usize::from(IOAPIC_PINS) + 2)
}

/// The table's bytes from `start` up to 640 KiB.
fn build(start: GuestAddress, cpus: u8) -> Vec<u8> {
    let ioapic_id = ioapic_id(cpus);
    let mut entries = Vec::new();
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // IRQ 0 is the 8259's ExtINT on pin 0, the others conform to the bus.
        let kind = if irq == 0 { MP_EXTINT } else { MP_INT };
        entries.extend_from_slice(&[MP_INTSRC, kind, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0 of every local APIC (id 0xff) is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(cpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let mut config = Vec::with_capacity(config_table_len(cpus));
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&(config_table_len(cpus) as u16).to_le_bytes());
    config.extend_from_slice(&[SPEC_REVISION, 0]); // checksum patched below
    config.extend_from_slice(b"MINIVMM ");
    config.extend_from_slice(b"000000000000");
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&entry_count.to_le_bytes());
    config.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    config.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(config.len(), HEADER_SIZE);
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = config;
    let floating = BASE_MEMORY_END as usize - FLOATING_POINTER_SIZE - start.0 as usize;
    table.resize(floating, 0);
    let mut fp = [0u8; FLOATING_POINTER_SIZE];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(start.0 as u32).to_le_bytes());
    fp[8] = 1; // length in paragraphs
    fp[9] = SPEC_REVISION;
    fp[10] = checksum(&fp);
    table.extend_from_slice(&fp);
    table
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn mptable_floating_pointer_is_in_last_kib_and_points_at_config() {
        let mem = guest_memory();
        for cpus in [1u8, 2, 8, 64, MAX_CPUS] {
            let start = setup_mptable(&mem, cpus).unwrap();
            let fp_addr = BASE_MEMORY_END - 16;
            assert!(fp_addr >= 0x9_fc00);
            let fp = read(&mem, fp_addr, 16);
            assert_eq!(&fp[0..4], b"_MP_");
            assert_eq!(sum(&fp), 0, "floating pointer checksum");
            let config = u32::from_le_bytes(fp[4..8].try_into().unwrap());
            assert_eq!(u64::from(config), start.0);
            assert_eq!(start.0 % 16, 0);
            assert_eq!(start.0 + mptable_size(cpus) as u64, BASE_MEMORY_END);
        }
    }

    #[test]
    fn mptable_config_table_lists_every_cpu_the_ioapic_and_irqs() {
        let mem = guest_memory();
        let cpus = 4;
        let start = setup_mptable(&mem, cpus).unwrap();
        let header = read(&mem, start.0, HEADER_SIZE);
        assert_eq!(&header[0..4], b"PCMP");
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let config = read(&mem, start.0, len);
        assert_eq!(sum(&config), 0, "config table checksum");
        let count = u16::from_le_bytes([header[34], header[35]]);
        let mut at = HEADER_SIZE;
        let (mut processors, mut ioapics, mut intsrc, mut lintsrc) = (vec![], 0, 0, 0);
        for _ in 0..count {
            match config[at] {
                MP_PROCESSOR => {
                    processors.push((config[at + 1], config[at + 3]));
                    at += PROCESSOR_ENTRY_SIZE;
                }
                kind => {
                    match kind {
                        MP_BUS => assert_eq!(&config[at + 2..at + 8], b"ISA   "),
                        MP_IOAPIC => {
                            assert_eq!(config[at + 1], cpus);
                            ioapics += 1;
                        }
                        MP_INTSRC => {
                            assert_eq!(config[at + 5], config[at + 7], "IRQ n on pin n");
                            intsrc += 1;
                        }
                        MP_LINTSRC => lintsrc += 1,
                        other => panic!("unexpected entry type {other}"),
                    }
                    at += SHORT_ENTRY_SIZE;
                }
            }
        }
        assert_eq!(at, len);
        assert_eq!(processors, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!((ioapics, intsrc, lintsrc), (1, 24, 2));
    }

    #[test]
    fn mptable_rejects_zero_or_too_many_cpus() {
        for cpus in [0, 255] {
            assert!(matches!(
                setup_mptable(&guest_memory(), cpus),
                Err(Error::CpuCount(_))
            ));
        }
    }

    #[test]
    fn mptable_write_outside_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(setup_mptable(&mem, 1), Err(Error::Write(_))));
    }
}
