//! ACPI tables (ACPI 6.5) describing the machine minivmm builds, generated
//! with rust-vmm's `acpi_tables` (no hand-assembled AML):
//!
//! - RSDP (revision 2, §5.2.5) at [`RSDP_ADDR`] in the BIOS area, where the
//!   legacy scan finds it; PVH and bzImage guests also get its address.
//! - XSDT (§5.2.8) listing the FADT and the MADT.
//! - FADT (§5.2.9) with `HW_REDUCED_ACPI`: no PM1 blocks, no SCI; a reset
//!   register and the sleep control and status registers (§4.8.3.7) in port
//!   I/O, served by `pio::PowerManagement`.
//! - MADT (§5.2.12): a local APIC per vCPU, the I/O APIC, and an interrupt
//!   source override for each ISA IRQ 1..=15 (identity, conforming), as the
//!   MP table lists them.
//! - DSDT (§5.2.11.1): COM1 (`PNP0501`), every virtio-mmio device
//!   (`LNRO0005`, its window and interrupt in `_CRS`) and `\_S5`.
//!
//! The tables (all but the RSDP) are placed like every other boot structure:
//! frames allocated through `GuestFrames` with the ACPI purpose, which the
//! e820 / PVH memory map reports as type 3. The MP table and these tables
//! are built from one [`Machine`].

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use memory::GuestFrames;
use memory::guest::Purpose;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use crate::pio;
use crate::x86::mptable;

/// Where the RSDP is written: the first 16-byte boundary the legacy scan
/// of 0xe0000..0xfffff looks at (inside the firmware area minivmm reserves).
pub const RSDP_ADDR: GuestAddress = GuestAddress(0xe_0000);
/// The FADT's sleep control register (write SLP_TYP << 2 | SLP_EN).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The FADT's sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The FADT's reset register, and the value that resets.
pub const RESET_PORT: u16 = 0x602;
/// Written to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 1;
/// `SLP_TYP` of S5 in `\_S5` (what the guest writes to power off).
pub const S5_SLP_TYP: u8 = 5;

const OEM_ID: [u8; 6] = *b"MINVMM";
/// The `_HID` Linux's virtio-mmio driver matches (`virtio_mmio_acpi_match`).
const LNRO0005: aml::AmlStr = "LNRO0005";
const OEM_TABLE_ID: [u8; 8] = *b"MINIVMM ";
const OEM_REVISION: u32 = 1;
/// ACPI 6.x `Interrupt Source Override` structure type.
const MADT_ISO: u8 = 2;
/// MPS INTI flags: polarity and trigger "conforms to the bus".
const INTI_CONFORMING: u16 = 0;

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// vCPUs (APIC ids 0..cpus).
    pub cpus: u8,
    /// virtio-mmio devices: (window base, window size, GSI).
    pub virtio: Vec<(u64, u64, u32)>,
}

/// Where the tables went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The RSDP.
    pub rsdp: GuestAddress,
    /// The frames holding the other tables.
    pub tables: GuestAddress,
    /// Their length in bytes.
    pub len: u64,
}

/// Why the tables could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No room for them.
    #[error("cannot place the ACPI tables: {0}")]
    Place(#[from] memory::guest::Error),
    /// Writing them failed.
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// An `Interrupt Source Override` (§5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Collects AML or a table into bytes.
fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    aml.to_aml_bytes(&mut out);
    out
}

/// The DSDT: COM1, the virtio-mmio devices, `\_S5`.
pub fn dsdt(machine: &Machine) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Each object is built and emitted in one statement: its parts are
    // borrowed temporaries.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(pio::COM1, pio::COM1, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, pio::COM1_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut dsdt);
    for (n, &(base, size, irq)) in machine.virtio.iter().enumerate() {
        aml::Device::new(
            format!("_SB_.V{n:03X}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &LNRO0005),
                &aml::Name::new("_UID".into(), &(n as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base as u32, size as u32),
                        &aml::Interrupt::new(true, true, false, false, irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut dsdt);
    }
    // \_S5: SLP_TYPa, SLP_TYPb (and two reserved), as ACPI 6.5 §7.4.2.
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut dsdt);
    dsdt.as_slice().to_vec()
}

/// The FADT, pointing at the DSDT at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io(SLEEP_STATUS_PORT);
    // "KVMKVMKVM" would claim KVM's paravirt interfaces: say nothing.
    bytes(&fadt.finalize())
}

/// The MADT: every vCPU, the I/O APIC, the ISA overrides.
fn madt(machine: &Machine) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(mptable::APIC_DEFAULT_PHYS_BASE),
    );
    for cpu in 0..machine.cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        mptable::ioapic_id(machine.cpus),
        mptable::IO_APIC_DEFAULT_PHYS_BASE,
        0,
    ));
    for irq in 1..16u8 {
        madt.add_structure(InterruptSourceOverride {
            r#type: MADT_ISO,
            length: 10,
            bus: 0,
            source: irq,
            gsi: u32::from(irq),
            flags: INTI_CONFORMING,
        });
    }
    bytes(&madt)
}

/// Builds every table for `machine` and writes them: the RSDP at
/// [`RSDP_ADDR`], the others in frames placed below `limit`.
pub fn place(
    frames: &GuestFrames,
    machine: &Machine,
    limit: GuestAddress,
) -> Result<Placed, Error> {
    let dsdt = dsdt(machine);
    let madt = madt(machine);
    let align = |n: usize| n.next_multiple_of(8);
    let fadt_at = align(dsdt.len());
    let madt_at = align(fadt_at + FADT_LEN);
    let xsdt_at = align(madt_at + madt.len());
    let len = (xsdt_at + XSDT_LEN) as u64;
    let base = frames.place(Purpose::Acpi, len, 4096, limit)?;
    let at = |off: usize| base.0 + off as u64;
    let fadt = fadt(at(0));
    debug_assert_eq!(fadt.len(), FADT_LEN);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(at(fadt_at));
    xsdt.add_entry(at(madt_at));
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), XSDT_LEN);
    let mem = frames.memory();
    for (off, table) in [
        (0, &dsdt),
        (fadt_at, &fadt),
        (madt_at, &madt),
        (xsdt_at, &xsdt),
    ] {
        mem.write_slice(table, GuestAddress(at(off)))?;
    }
    mem.write_slice(&bytes(&Rsdp::new(OEM_ID, at(xsdt_at))), RSDP_ADDR)?;
    Ok(Placed {
        rsdp: RSDP_ADDR,
        tables: base,
        len,
    })
}

/// Bytes of the FADT (ACPI 6.5: 276).
const FADT_LEN: usize = 276;
/// Bytes of the XSDT with its two entries.
const XSDT_LEN: usize = 36 + 2 * 8;

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
