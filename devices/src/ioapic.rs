//! The I/O APIC (Intel 82093AA, version 0x11 as KVM's own), emulated in the
//! VMM when KVM runs a split irqchip: the local APICs stay in the kernel, the
//! I/O APIC and its redirection table are here.
//!
//! The device does not deliver interrupts itself. Its 24 redirection entries
//! are translated into MSI messages (address 0xfee0_0000 with the destination
//! APIC id and mode, data with the vector and delivery mode), which the VMM
//! installs as KVM's GSI routes ([`MsiRoutes`]): an irqfd signalled on pin `n`
//! then reaches the local APICs in the kernel, with no exit to the VMM. A
//! masked entry, or one with a delivery mode an MSI cannot carry (ExtINT), has
//! no route. Routes are pushed only when an entry's effective route changes,
//! so a guest reprogramming its pins costs as few route updates as possible.
//!
//! Registers (82093AA datasheet §3): IOREGSEL at 0x00 selects, IOWIN at 0x10
//! reads and writes the selected register: 0x00 ID (bits 24-27), 0x01 version
//! (read-only: 0x11, highest entry 23), 0x02 arbitration (the ID), 0x10-0x3f
//! the entries, low then high word. Delivery status and remote IRR read 0:
//! every pin is delivered as an edge (the devices signal their interrupts by
//! pulses through irqfds, as Firecracker's do), so no level state is kept and
//! EOIs need nothing. Accesses other than aligned 32-bit ones, unknown
//! registers and offsets are ignored and read 0 (counted).

use std::fmt;
use std::sync::Arc;

use crate::bus::BusDevice;

/// Guest-physical base of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of its MMIO window.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Redirection entries (pins).
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, highest entry index in bits 16-23.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_TABLE: u8 = 0x10;

/// Entry bits.
const MASKED: u64 = 1 << 16;
/// Read-only bits of an entry: delivery status (12) and remote IRR (14).
const READ_ONLY: u64 = (1 << 12) | (1 << 14);
/// Bits an entry keeps: vector, delivery and destination mode, polarity,
/// trigger, mask (low word); destination (bits 56-63).
const WRITABLE: u64 = (0x1_ffff & !READ_ONLY) | (0xff << 56);
/// Delivery mode ExtINT: an 8259 vector, which an MSI cannot carry.
const DELIVERY_EXTINT: u64 = 7;
/// Delivery mode values 3 and 6 are reserved.
const DELIVERY_RESERVED: [u64; 2] = [3, 6];

/// An MSI message: what a pin's entry says to deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Address: 0xfee0_0000, destination in bits 12-19, destination mode
    /// (logical) in bit 2.
    pub address: u64,
    /// Data: vector in bits 0-7, delivery mode in bits 8-10; always edge.
    pub data: u32,
}

/// Where the I/O APIC's routes go (the VMM: KVM's GSI routing table, GSI =
/// pin). Called with every pin's route whenever one changes.
pub trait MsiRoutes: Send + Sync + fmt::Debug {
    /// Installs `routes` (index = pin; `None`: no route).
    fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]);
}

/// Counters of what the guest did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoApicMetrics {
    /// Accesses of the wrong width or alignment, unknown offsets or registers,
    /// writes to read-only registers.
    pub bad_access: u64,
    /// Route table updates pushed.
    pub route_updates: u64,
}

/// What an [`IoApic`] needs to resume (snapshots): its registers; the
/// routes follow from the entries.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IoApicState {
    /// The ID register.
    pub id: u32,
    /// IOREGSEL.
    pub select: u8,
    /// The redirection entries.
    pub entries: Vec<u64>,
}

/// The I/O APIC.
#[derive(Debug)]
pub struct IoApic {
    id: u32,
    select: u8,
    entries: [u64; IOAPIC_PINS],
    routes: [Option<MsiMessage>; IOAPIC_PINS],
    sink: Arc<dyn MsiRoutes>,
    metrics: IoApicMetrics,
}

impl IoApic {
    /// An I/O APIC with APIC id `id`, every pin masked (no routes), pushing
    /// its routes to `sink`.
    pub fn new(id: u8, sink: Arc<dyn MsiRoutes>) -> Self {
        IoApic {
            id: u32::from(id & 0xf) << 24,
            select: 0,
            entries: [MASKED; IOAPIC_PINS],
            routes: [None; IOAPIC_PINS],
            sink,
            metrics: IoApicMetrics::default(),
        }
    }

    /// The counters.
    pub fn metrics(&self) -> IoApicMetrics {
        self.metrics
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// The state to save.
    pub fn state(&self) -> IoApicState {
        IoApicState {
            id: self.id,
            select: self.select,
            entries: self.entries.to_vec(),
        }
    }

    /// Restores `state` (bits a driver cannot write are cleared, as on a
    /// register write) and pushes the routes it implies. False, with
    /// nothing changed, for a state with the wrong number of pins.
    pub fn restore(&mut self, state: &IoApicState) -> bool {
        let Ok(entries) = <[u64; IOAPIC_PINS]>::try_from(state.entries.as_slice()) else {
            return false;
        };
        self.id = state.id & (0xf << 24);
        self.select = state.select;
        self.entries = entries.map(|e| e & WRITABLE);
        self.routes = self.entries.map(Self::route);
        self.sink.set_routes(&self.routes);
        true
    }

    /// The route an entry asks for, if an MSI can carry it.
    fn route(entry: u64) -> Option<MsiMessage> {
        let delivery = (entry >> 8) & 7;
        if entry & MASKED != 0
            || delivery == DELIVERY_EXTINT
            || DELIVERY_RESERVED.contains(&delivery)
        {
            return None;
        }
        let dest = (entry >> 56) & 0xff;
        let logical = (entry >> 11) & 1;
        Some(MsiMessage {
            address: 0xfee0_0000 | (dest << 12) | (logical << 2),
            data: (entry & 0xff) as u32 | ((delivery as u32) << 8),
        })
    }

    fn read_register(&mut self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS as u8).contains(&r) => {
                let n = r - REG_TABLE;
                let entry = self.entries[usize::from(n / 2)];
                if n.is_multiple_of(2) {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => {
                self.metrics.bad_access += 1;
                0
            }
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & (0xf << 24),
            r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS as u8).contains(&r) => {
                let n = r - REG_TABLE;
                let pin = usize::from(n / 2);
                let old = self.entries[pin];
                let new = if n.is_multiple_of(2) {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                self.entries[pin] = new & WRITABLE;
                let route = Self::route(self.entries[pin]);
                if route != self.routes[pin] {
                    self.routes[pin] = route;
                    self.metrics.route_updates += 1;
                    self.sink.set_routes(&self.routes);
                }
            }
            _ => self.metrics.bad_access += 1,
        }
    }
}

impl BusDevice for IoApic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.select),
            (IOWIN, 4) => self.read_register(),
            _ => {
                self.metrics.bad_access += 1;
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.metrics.bad_access += 1;
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(value),
            _ => self.metrics.bad_access += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every route table pushed.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<[Option<MsiMessage>; IOAPIC_PINS]>>);

    impl MsiRoutes for Recorder {
        fn set_routes(&self, routes: &[Option<MsiMessage>; IOAPIC_PINS]) {
            self.0.lock().unwrap().push(*routes);
        }
    }

    fn ioapic() -> (IoApic, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (IoApic::new(0, rec.clone()), rec)
    }

    fn write_reg(io: &mut IoApic, reg: u8, value: u32) {
        io.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        io.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(io: &mut IoApic, reg: u8) -> u32 {
        io.write(IOREGSEL, &u32::from(reg).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ioapic_reports_version_pins_and_id() {
        let (mut io, _) = ioapic();
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011);
        write_reg(&mut io, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0f00_0000);
        write_reg(&mut io, REG_VERSION, 0);
        assert_eq!(read_reg(&mut io, REG_VERSION), 0x0017_0011, "read-only");
        assert_eq!(io.metrics().bad_access, 1);
    }

    #[test]
    fn ioapic_state_restored_pushes_the_same_routes() {
        let (mut io, rec) = ioapic();
        write_reg(&mut io, REG_TABLE + 8, 0x31);
        write_reg(&mut io, REG_TABLE + 9, 0x0100_0000);
        let state = io.state();
        let (mut fresh, fresh_rec) = ioapic();
        assert!(fresh.restore(&state));
        assert_eq!(fresh.state(), state);
        assert_eq!(
            fresh_rec.0.lock().unwrap().last(),
            rec.0.lock().unwrap().last()
        );
        let short = IoApicState {
            entries: vec![0; 3],
            ..state
        };
        assert!(!fresh.restore(&short));
    }

    #[test]
    fn ioapic_pins_start_masked_without_routes() {
        let (mut io, rec) = ioapic();
        for pin in 0..IOAPIC_PINS as u8 {
            assert_eq!(read_reg(&mut io, REG_TABLE + 2 * pin), MASKED as u32);
        }
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn ioapic_unmasked_entry_becomes_an_msi_route() {
        let (mut io, rec) = ioapic();
        // What the test guest and Linux do: mask, destination, then vector.
        write_reg(&mut io, REG_TABLE + 2 * 5, MASKED as u32);
        write_reg(&mut io, REG_TABLE + 2 * 5 + 1, 3 << 24);
        assert!(
            rec.0.lock().unwrap().is_empty(),
            "still masked: no route change"
        );
        write_reg(&mut io, REG_TABLE + 2 * 5, 0x31);
        let pushed = rec.0.lock().unwrap().clone();
        assert_eq!(pushed.len(), 1);
        assert_eq!(
            pushed[0][5],
            Some(MsiMessage {
                address: 0xfee0_3000,
                data: 0x31
            })
        );
        assert!(
            pushed[0]
                .iter()
                .enumerate()
                .all(|(p, r)| p == 5 || r.is_none())
        );
        // Logical destination, lowest priority.
        write_reg(&mut io, REG_TABLE + 2 * 5, 0x31 | (1 << 11) | (1 << 8));
        assert_eq!(
            rec.0.lock().unwrap().last().unwrap()[5],
            Some(MsiMessage {
                address: 0xfee0_3004,
                data: 0x131
            })
        );
        // Masking removes it again.
        write_reg(&mut io, REG_TABLE + 2 * 5, MASKED as u32 | 0x31);
        assert_eq!(rec.0.lock().unwrap().last().unwrap()[5], None);
        assert_eq!(io.metrics().route_updates, 3);
    }

    #[test]
    fn ioapic_rewriting_the_same_route_pushes_nothing() {
        let (mut io, rec) = ioapic();
        write_reg(&mut io, REG_TABLE, 0x40);
        write_reg(&mut io, REG_TABLE, 0x40);
        // Level trigger and polarity do not change an edge route.
        write_reg(&mut io, REG_TABLE, 0x40 | (1 << 15) | (1 << 13));
        assert_eq!(rec.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn ioapic_read_only_bits_and_extint_or_reserved_modes_have_no_route() {
        let (mut io, rec) = ioapic();
        write_reg(&mut io, REG_TABLE + 2, 0x30 | (1 << 12) | (1 << 14));
        assert_eq!(read_reg(&mut io, REG_TABLE + 2), 0x30, "status bits read 0");
        for mode in [3u32, 6, 7] {
            write_reg(&mut io, REG_TABLE + 4, 0x30 | (mode << 8));
            assert_eq!(rec.0.lock().unwrap().last().unwrap()[2], None);
        }
        write_reg(&mut io, REG_TABLE + 5, 0xffff_ffff);
        assert_eq!(read_reg(&mut io, REG_TABLE + 5), 0xff00_0000);
    }

    #[test]
    fn ioapic_ignores_bad_widths_offsets_and_registers() {
        let (mut io, rec) = ioapic();
        io.write(IOREGSEL, &[0x10]);
        io.write(IOWIN, &[0, 0, 0, 0, 0, 0, 0, 0]);
        io.write(0x20, &0u32.to_le_bytes());
        let mut b = [0xaau8; 2];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(read_reg(&mut io, 0x40), 0, "beyond the table");
        write_reg(&mut io, 0xff, 1);
        assert_eq!(io.metrics().bad_access, 6);
        assert!(rec.0.lock().unwrap().is_empty());
        let mut b = [0u8; 4];
        io.read(0x800, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
