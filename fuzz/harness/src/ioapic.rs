//! Target `ioapic`: register accesses of any offset, width and value to the
//! I/O APIC of the split irqchip.
//!
//! Input: a sequence of 7-byte operations (kind, offset, width, value).
//!
//! Invariants checked after every access:
//! - the routes last pushed to KVM are exactly those the current redirection
//!   entries ask for (masked or ExtINT pins have none; every MSI address is in
//!   0xfee0_0000..0xfeef_f00c);
//! - a push happens only when some pin's route changed (a guest rewriting its
//!   entries in a loop cannot make minivmm update KVM's table each time);
//! - the version register never changes and read-only entry bits read 0.

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::ioapic::{IOAPIC_PINS, IoApic, MsiMessage, MsiRoutes};

use crate::common::Input;

const MAX_OPS: usize = 4096;
type Routes = [Option<MsiMessage>; IOAPIC_PINS];

/// The routes pushed, as KVM would hold them.
#[derive(Debug, Default)]
struct Sink {
    current: Mutex<Routes>,
    pushes: Mutex<usize>,
}

impl MsiRoutes for Sink {
    fn set_routes(&self, routes: &Routes) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        assert_ne!(*current, *routes, "a route update that changes nothing");
        *current = *routes;
        *self.pushes.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }
}

fn reg(io: &mut IoApic, index: u32) -> u32 {
    io.write(0, &index.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0x10, &mut b);
    u32::from_le_bytes(b)
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let sink = Arc::new(Sink::default());
    let mut io = IoApic::new(1, sink.clone());
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let kind = input.u8() % 3;
        let offset = u64::from(input.u8()) & 0x7f;
        let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
        let value = input.u32();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&value.to_le_bytes());
        match kind {
            0 => io.write(offset, &buf[..width]),
            1 => io.read(offset, &mut buf[..width]),
            // The common pattern: select a table register, write it.
            _ => {
                io.write(0, &(0x10 + (value & 0x3f)).to_le_bytes());
                io.write(0x10, &(value >> 6).to_le_bytes());
            }
        }
        let current = *sink.current.lock().unwrap_or_else(|p| p.into_inner());
        for (pin, route) in current.iter().enumerate() {
            let entry = io.entry(pin).expect("pin exists");
            assert_eq!(entry & ((1 << 12) | (1 << 14)), 0, "read-only bits set");
            let masked = entry & (1 << 16) != 0;
            let mode = (entry >> 8) & 7;
            let routable = !masked && !matches!(mode, 3 | 6 | 7);
            assert_eq!(
                route.is_some(),
                routable,
                "pin {pin} entry {entry:#x}: route {route:?}"
            );
            if let Some(msi) = route {
                assert_eq!(msi.address & !0x000f_f00c, 0xfee0_0000, "{msi:?}");
                assert_eq!(msi.data & 0xff, (entry & 0xff) as u32);
            }
        }
    }
    // Register reads at the end (the select register may point anywhere).
    assert_eq!(reg(&mut io, 1), 0x0017_0011, "version changed");
}
