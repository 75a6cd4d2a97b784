//! The driver side of ACPI (ACPI 6.5 §5.2): the RSDP from `hvm_start_info`,
//! every table's signature, length and checksum checked, the MADT's vCPUs
//! and I/O APIC, the FADT's sleep control register, and the virtio-mmio
//! devices and `\_S5` read from the DSDT by a small reader for the AML
//! minivmm emits (§20.2: DefDevice, DefName, strings, integers, buffers
//! holding resource templates, packages; §6.4: Memory32Fixed, Extended
//! Interrupt, I/O and End Tag descriptors). Anything else in the DSDT is an
//! error: this checks minivmm's tables, it is not an AML interpreter.

use core::fmt;

use crate::startinfo::BOOT_MAPPED_LIMIT;
use crate::virtio_mmio::{Discovered, Window};

/// Largest table read (a DSDT of 16 devices is about 1.5 KiB, an MADT of
/// 254 vCPUs about 2.2 KiB).
const MAX_TABLE: usize = 8192;
/// Tables listed in the XSDT that are reported.
const MAX_LISTED: usize = 8;
/// `_HID` of a virtio-mmio device.
const LNRO0005: &[u8] = b"LNRO0005";

/// What the tables say.
#[derive(Clone, Copy, Debug)]
pub struct Tables {
    /// The RSDP's revision.
    pub revision: u8,
    /// Signatures the XSDT lists, in order.
    listed: [[u8; 4]; MAX_LISTED],
    listed_count: usize,
    /// Enabled local APICs in the MADT.
    pub cpus: u32,
    /// The MADT's (first) I/O APIC address.
    pub ioapic: u32,
    /// The FADT's sleep control register (a port).
    pub sleep_control: u16,
    /// `SLP_TYPa` of `\_S5`.
    pub s5: Option<u8>,
    /// Whether the DSDT has COM1 (`PNP0501`).
    pub com1: bool,
    /// The virtio-mmio devices of the DSDT, in its order.
    pub devices: Discovered,
}

impl Tables {
    /// Signatures the XSDT lists.
    pub fn listed(&self) -> &[[u8; 4]] {
        &self.listed[..self.listed_count]
    }
}

/// Why the tables were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// An address outside what the boot page tables map.
    Unmapped(u64),
    /// The RSDP's signature, checksum, revision or length.
    BadRsdp(&'static str),
    /// A table's signature differs from what points at it.
    Signature([u8; 4]),
    /// A table's length is under its header or over [`MAX_TABLE`].
    Length([u8; 4], u32),
    /// A table's bytes do not sum to zero.
    Checksum([u8; 4]),
    /// A table the XSDT must list.
    Missing(&'static str),
    /// A field of a table.
    Bad(&'static str),
    /// The DSDT holds AML this reader does not know, at this offset.
    Aml(&'static str, usize),
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            AcpiError::Unmapped(a) => write!(f, "table at 0x{a:x} is not mapped"),
            AcpiError::BadRsdp(why) => write!(f, "RSDP: {why}"),
            AcpiError::Signature(s) => write!(f, "unexpected table {}", Sig(s)),
            AcpiError::Length(s, n) => write!(f, "{}: length {n}", Sig(s)),
            AcpiError::Checksum(s) => write!(f, "{}: bad checksum", Sig(s)),
            AcpiError::Missing(what) => write!(f, "no {what}"),
            AcpiError::Bad(what) => write!(f, "bad {what}"),
            AcpiError::Aml(what, at) => write!(f, "DSDT: {what} at offset {at}"),
        }
    }
}

/// A table signature, printed as text.
pub struct Sig(pub [u8; 4]);

impl fmt::Display for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(core::str::from_utf8(&self.0).unwrap_or("????"))
    }
}

/// Copies `len` bytes at physical `addr` into `out`.
fn copy(addr: u64, out: &mut [u8]) -> Result<(), AcpiError> {
    match addr.checked_add(out.len() as u64) {
        Some(end) if addr != 0 && end <= BOOT_MAPPED_LIMIT => {}
        _ => return Err(AcpiError::Unmapped(addr)),
    }
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the range is below 4 GiB, identity mapped by the boot page
        // tables (checked above); a byte read of RAM or MMIO is always valid.
        *b = unsafe { core::ptr::read_volatile((addr + i as u64) as *const u8) };
    }
    Ok(())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

/// Reads the table at `addr` into `buf`, checking its signature (if
/// `want`), length and checksum; returns its length.
fn table(addr: u64, want: Option<&[u8; 4]>, buf: &mut [u8; MAX_TABLE]) -> Result<usize, AcpiError> {
    copy(addr, &mut buf[..36])?;
    let sig: [u8; 4] = [buf[0], buf[1], buf[2], buf[3]];
    if want.is_some_and(|w| *w != sig) {
        return Err(AcpiError::Signature(sig));
    }
    let len = u32_at(&buf[..], 4);
    if !(36..=MAX_TABLE as u32).contains(&len) {
        return Err(AcpiError::Length(sig, len));
    }
    copy(addr, &mut buf[..len as usize])?;
    if sum(&buf[..len as usize]) != 0 {
        return Err(AcpiError::Checksum(sig));
    }
    Ok(len as usize)
}

/// Reads every table from the RSDP at `rsdp`.
pub fn read(rsdp: u64) -> Result<Tables, AcpiError> {
    let mut r = [0u8; 36];
    copy(rsdp, &mut r)?;
    if &r[..8] != b"RSD PTR " {
        return Err(AcpiError::BadRsdp("signature"));
    }
    if sum(&r[..20]) != 0 {
        return Err(AcpiError::BadRsdp("checksum"));
    }
    if r[15] < 2 || u32_at(&r, 20) != 36 || sum(&r) != 0 {
        return Err(AcpiError::BadRsdp("revision, length or extended checksum"));
    }
    let mut tables = Tables {
        revision: r[15],
        listed: [[0; 4]; MAX_LISTED],
        listed_count: 0,
        cpus: 0,
        ioapic: 0,
        sleep_control: 0,
        s5: None,
        com1: false,
        devices: Discovered::default(),
    };
    let mut xsdt = [0u8; MAX_TABLE];
    let len = table(u64_at(&r, 24), Some(b"XSDT"), &mut xsdt)?;
    let mut buf = [0u8; MAX_TABLE];
    let (mut dsdt, mut madt) = (None, false);
    for at in (36..len).step_by(8).filter(|at| at + 8 <= len) {
        let addr = u64_at(&xsdt, at);
        let n = table(addr, None, &mut buf)?;
        let sig = [buf[0], buf[1], buf[2], buf[3]];
        if tables.listed_count < MAX_LISTED {
            tables.listed[tables.listed_count] = sig;
            tables.listed_count += 1;
        }
        match &sig {
            b"FACP" => dsdt = Some(fadt(&buf[..n], &mut tables)?),
            b"APIC" => {
                madt_entries(&buf[..n], &mut tables)?;
                madt = true;
            }
            _ => {}
        }
    }
    let dsdt = dsdt.ok_or(AcpiError::Missing("FADT"))?;
    if !madt {
        return Err(AcpiError::Missing("MADT"));
    }
    let n = table(dsdt, Some(b"DSDT"), &mut buf)?;
    Dsdt::new(&buf[36..n]).read(&mut tables)?;
    Ok(tables)
}

/// The FADT's DSDT address; records the sleep control register.
fn fadt(t: &[u8], tables: &mut Tables) -> Result<u64, AcpiError> {
    if t.len() < 268 {
        return Err(AcpiError::Bad("FADT length"));
    }
    // Sleep control register: a GAS at 244 (space, width, offset, access,
    // address); minivmm's is in system I/O.
    if t[244] != 1 || u64_at(t, 248) > 0xffff {
        return Err(AcpiError::Bad("FADT sleep control register"));
    }
    tables.sleep_control = u64_at(t, 248) as u16;
    match (u64_at(t, 140), u32_at(t, 40)) {
        (0, 0) => Err(AcpiError::Missing("DSDT")),
        (0, d) => Ok(u64::from(d)),
        (x, _) => Ok(x),
    }
}

/// Counts the MADT's enabled local APICs and finds its I/O APIC.
fn madt_entries(t: &[u8], tables: &mut Tables) -> Result<(), AcpiError> {
    let mut at = 44;
    while at + 2 <= t.len() {
        let (kind, len) = (t[at], usize::from(t[at + 1]));
        if len < 2 || at + len > t.len() {
            return Err(AcpiError::Bad("MADT entry length"));
        }
        match kind {
            0 if len >= 8 && u32_at(t, at + 4) & 1 != 0 => tables.cpus += 1,
            1 if len >= 12 && tables.ioapic == 0 => tables.ioapic = u32_at(t, at + 4),
            _ => {}
        }
        at += len;
    }
    Ok(())
}

/// A cursor over the DSDT's AML.
struct Dsdt<'a> {
    b: &'a [u8],
    at: usize,
}

type AmlResult<T> = Result<T, AcpiError>;

impl<'a> Dsdt<'a> {
    fn new(b: &'a [u8]) -> Self {
        Dsdt { b, at: 0 }
    }

    fn err<T>(&self, what: &'static str) -> AmlResult<T> {
        // Offsets as iasl shows them: from the table's start.
        Err(AcpiError::Aml(what, self.at + 36))
    }

    fn byte(&mut self) -> AmlResult<u8> {
        match self.b.get(self.at) {
            Some(&b) => {
                self.at += 1;
                Ok(b)
            }
            None => self.err("unexpected end"),
        }
    }

    fn bytes(&mut self, n: usize) -> AmlResult<&'a [u8]> {
        match self.b.get(self.at..self.at + n) {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => self.err("unexpected end"),
        }
    }

    /// PkgLength (§20.2.4): the offset where the package ends.
    fn pkg_end(&mut self) -> AmlResult<usize> {
        let start = self.at;
        let lead = self.byte()?;
        let follow = usize::from(lead >> 6);
        let mut len = if follow == 0 {
            usize::from(lead & 0x3f)
        } else {
            usize::from(lead & 0x0f)
        };
        for i in 0..follow {
            len |= usize::from(self.byte()?) << (4 + 8 * i);
        }
        match start.checked_add(len) {
            Some(end) if end <= self.b.len() && end > self.at - 1 => Ok(end),
            _ => self.err("package length"),
        }
    }

    /// A NameString (§20.2.2): its last segment.
    fn name(&mut self) -> AmlResult<[u8; 4]> {
        while matches!(self.b.get(self.at), Some(b'\\' | b'^')) {
            self.at += 1;
        }
        let segs = match self.byte()? {
            0x2e => 2,
            0x2f => usize::from(self.byte()?),
            0x00 => return Ok([0; 4]),
            _ => {
                self.at -= 1;
                1
            }
        };
        let mut last = [0; 4];
        for _ in 0..segs {
            last.copy_from_slice(self.bytes(4)?);
        }
        Ok(last)
    }

    /// A constant integer (§20.2.3).
    fn integer(&mut self) -> AmlResult<u64> {
        Ok(match self.byte()? {
            0x00 => 0,
            0x01 => 1,
            0xff => u64::MAX,
            0x0a => u64::from(self.byte()?),
            0x0b => u64::from(u16_at(self.bytes(2)?, 0)),
            0x0c => u64::from(u32_at(self.bytes(4)?, 0)),
            0x0e => u64_at(self.bytes(8)?, 0),
            _ => return self.err("not an integer"),
        })
    }

    /// The top level: Devices and Names.
    fn read(mut self, tables: &mut Tables) -> AmlResult<()> {
        while self.at < self.b.len() {
            match self.byte()? {
                0x5b if self.byte()? == 0x82 => self.device(tables)?,
                0x08 => {
                    let name = self.name()?;
                    if &name != b"_S5_" || self.byte()? != 0x12 {
                        return self.err("unexpected Name");
                    }
                    let end = self.pkg_end()?;
                    let _count = self.byte()?;
                    tables.s5 = Some(self.integer()? as u8);
                    self.at = end;
                }
                _ => return self.err("unexpected opcode"),
            }
        }
        Ok(())
    }

    /// A Device: its `_HID`, `_UID`, `_CCA` and `_CRS`.
    fn device(&mut self, tables: &mut Tables) -> AmlResult<()> {
        let end = self.pkg_end()?;
        let _name = self.name()?;
        let (mut virtio, mut com1) = (false, false);
        let (mut window, mut irq) = (None, None);
        while self.at < end {
            if self.byte()? != 0x08 {
                return self.err("a Device holds only Names here");
            }
            match &self.name()? {
                b"_HID" if self.b.get(self.at) == Some(&0x0d) => {
                    self.at += 1;
                    let start = self.at;
                    while self.byte()? != 0 {}
                    virtio = &self.b[start..self.at - 1] == LNRO0005;
                }
                // EisaId("PNP0501"), compressed (§19.6.35).
                b"_HID" => com1 = self.integer()? == 0x0105_d041,
                b"_UID" | b"_CCA" => {
                    self.integer()?;
                }
                b"_CRS" => {
                    if self.byte()? != 0x11 {
                        return self.err("_CRS is not a Buffer");
                    }
                    let buf_end = self.pkg_end()?;
                    let _size = self.integer()?;
                    let resources = self.bytes(buf_end.saturating_sub(self.at))?;
                    (window, irq) = resources_of(resources).map_err(|w| AcpiError::Aml(w, end))?;
                }
                _ => return self.err("unexpected Name in a Device"),
            }
        }
        tables.com1 |= com1;
        if virtio {
            match (window, irq) {
                (Some((base, size)), Some(irq)) => tables.devices.add(Window { base, size, irq }),
                _ => return self.err("virtio-mmio device without a window and an interrupt"),
            }
        }
        Ok(())
    }
}

/// A resource template's first Memory32Fixed window and Extended Interrupt.
fn resources_of(r: &[u8]) -> Result<(Option<(u64, u64)>, Option<u32>), &'static str> {
    let (mut window, mut irq, mut at) = (None, None, 0);
    while at < r.len() {
        let tag = r[at];
        if tag & 0x80 == 0 {
            // Small descriptor: End Tag (0x79) ends the template.
            if tag & 0x78 == 0x78 {
                return Ok((window, irq));
            }
            at += 1 + usize::from(tag & 7);
            continue;
        }
        let body = r.get(at + 3..).ok_or("resource descriptor")?;
        let len = usize::from(u16_at(r.get(at + 1..at + 3).ok_or("resource length")?, 0));
        if body.len() < len {
            return Err("resource descriptor length");
        }
        match tag {
            0x86 if len >= 9 => {
                window = Some((u64::from(u32_at(body, 1)), u64::from(u32_at(body, 5))))
            }
            0x89 if len >= 6 && body[1] >= 1 => irq = Some(u32_at(body, 2)),
            _ => {}
        }
        at += 3 + len;
    }
    Err("resource template without an End Tag")
}
