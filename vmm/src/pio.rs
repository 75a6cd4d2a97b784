//! The legacy port I/O devices on the PIO bus (a `devices::bus::Bus` of
//! ports, like the MMIO one): COM1 (vm-superio's 16550), the i8042
//! (`i8042.rs`: CPU reset and a keyboard for Ctrl+Alt+Del), a debug-exit
//! port and, with ACPI,
//! the hardware-reduced power management registers the FADT names (ACPI 6.5
//! §4.8.3.7: sleep control and status; §4.8.3.6: reset). Ports no device
//! holds read as all ones and ignore writes; the vCPU's exit handler logs
//! each once.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, BusError};

use crate::acpi;
use crate::console::ConsoleSerial;
use crate::exit::{ExitLatch, VmExit};
use crate::i8042::I8042;

/// COM1 base port and its eight registers.
pub const COM1: u16 = 0x3f8;
/// The legacy IRQ COM1 raises.
pub const COM1_IRQ: u32 = 4;
/// The i8042's ports: data at 0x60, command/status at 0x64.
pub const I8042_PORT: u16 = 0x60;
/// The legacy IRQ the i8042's keyboard raises.
pub const KEYBOARD_IRQ: u32 = 1;
/// Debug-exit port (as QEMU's `isa-debug-exit,iobase=0xf4`).
pub const DEBUG_EXIT: u16 = 0xf4;

/// COM1 on the bus: byte-wide accesses reach the UART, others read all ones.
#[derive(Debug)]
pub struct SerialDevice {
    uart: ConsoleSerial,
    failed: bool,
}

impl SerialDevice {
    /// The bus side of `uart`.
    pub fn new(uart: ConsoleSerial) -> Self {
        SerialDevice {
            uart,
            failed: false,
        }
    }

    /// The UART (the console's input side enqueues bytes on it).
    pub fn uart(&mut self) -> &mut ConsoleSerial {
        &mut self.uart
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Output errors are the console's (logged once there); this is the
        // interrupt eventfd failing.
        if let [value] = data
            && let Err(e) = self.uart.write(offset as u8, *value)
            && !std::mem::replace(&mut self.failed, true)
        {
            log::warn!("serial: {e:?} (logged once)");
        }
    }
}

/// The debug-exit port: a write of any width stops the VM with
/// `VmExit::DebugExit` of its first byte; reads return all ones.
#[derive(Debug)]
pub struct DebugExitPort(Arc<ExitLatch>);

impl BusDevice for DebugExitPort {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, [value, ..]) = (offset, data) {
            self.0.stop(VmExit::DebugExit(*value));
        }
    }
}

/// `SLP_EN` in the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// The FADT's sleep control, sleep status and reset registers, at
/// `acpi::SLEEP_CONTROL_PORT`, `+ 1` and `+ 2`: S5 powers off, the reset
/// value resets; other values are ignored (logged once each register).
#[derive(Debug)]
pub struct PowerManagement {
    exit: Arc<ExitLatch>,
    logged: [bool; 2],
}

impl PowerManagement {
    fn ignore(&mut self, register: usize, what: std::fmt::Arguments<'_>) {
        if !std::mem::replace(&mut self.logged[register], true) {
            log::warn!("ACPI {what} ignored (logged once)");
        }
    }
}

impl BusDevice for PowerManagement {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear; the others read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = *data else {
            return;
        };
        match offset {
            0 if value & SLP_EN != 0 && (value >> 2) & 7 == acpi::S5_SLP_TYP => {
                self.exit.stop(VmExit::PowerOff);
            }
            0 => self.ignore(0, format_args!("sleep control value {value:#x}")),
            2 if value == acpi::RESET_VALUE => self.exit.stop(VmExit::Reset),
            2 => self.ignore(1, format_args!("reset register value {value:#x}")),
            // Sleep status: write-one-to-clear bits, none set.
            _ => {}
        }
    }
}

/// The PIO bus: `serial` on COM1, `i8042` and the debug-exit port
/// stopping the VM through `exit`, and with `acpi` the power management
/// registers.
pub fn legacy_bus(
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    exit: &Arc<ExitLatch>,
    acpi: bool,
) -> Result<Bus, BusError> {
    let mut bus = Bus::new();
    bus.insert(u64::from(COM1), 8, serial)?;
    bus.insert(u64::from(I8042_PORT), 5, i8042)?;
    // Four ports wide so that `outl` reaches it as well as `outb`.
    bus.insert(
        u64::from(DEBUG_EXIT),
        4,
        Arc::new(Mutex::new(DebugExitPort(exit.clone()))),
    )?;
    if acpi {
        let pm = PowerManagement {
            exit: exit.clone(),
            logged: [false; 2],
        };
        bus.insert(
            u64::from(acpi::SLEEP_CONTROL_PORT),
            3,
            Arc::new(Mutex::new(pm)),
        )?;
    }
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqFd;
    use std::io::Write;

    const I8042_COMMAND: u64 = I8042_PORT as u64 + 4;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn new_bus() -> (Bus, Sink, Arc<ExitLatch>) {
        let sink = Sink::default();
        let (serial, _) =
            crate::console::serial(IrqFd::unregistered().unwrap(), Box::new(sink.clone()), None)
                .unwrap();
        let exit = Arc::new(ExitLatch::new().unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
        let i8042 = I8042::new(Arc::new(IrqFd::unregistered().unwrap()), exit.clone());
        let bus = legacy_bus(serial, Arc::new(Mutex::new(i8042)), &exit, true).unwrap();
        (bus, sink, exit)
    }

    #[test]
    fn acpi_s5_powers_off_and_the_reset_register_resets() {
        let (bus, _, exit) = new_bus();
        let control = u64::from(acpi::SLEEP_CONTROL_PORT);
        // Garbage: other sleep types, SLP_EN without S5, S5 without SLP_EN,
        // wide writes, the status register, a wrong reset value.
        for (port, value) in [
            (0, 0x14),
            (0, 0x20),
            (0, 0x24),
            (0, 0xff),
            (1, 0xff),
            (2, 0),
        ] {
            assert!(bus.write(control + port, &[value]));
        }
        assert!(bus.write(control, &0x34u16.to_le_bytes()));
        assert!(!exit.is_stopping(), "ignored");
        let mut status = [0xaa];
        assert!(bus.read(control + 1, &mut status));
        assert_eq!(status, [0]);
        bus.write(control, &[SLP_EN | acpi::S5_SLP_TYP << 2]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
        assert_eq!(VmExit::PowerOff.status(), 0);
        let (bus, _, exit) = new_bus();
        bus.write(control + 2, &[acpi::RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        let (bus, sink, _) = new_bus();
        for b in b"hi\n" {
            assert!(bus.write(u64::from(COM1), &[*b]));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_and_debug_exit_stop_the_vm() {
        let (bus, _, exit) = new_bus();
        let mut status = [0xaa];
        assert!(bus.read(I8042_COMMAND, &mut status));
        assert_eq!(status[0] & 1, 0, "nothing to read");
        bus.write(I8042_COMMAND, &[0x20]);
        assert!(!exit.is_stopping());
        bus.write(I8042_COMMAND, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        let (bus, _, exit) = new_bus();
        bus.write(u64::from(DEBUG_EXIT), &7u32.to_le_bytes());
        assert_eq!(exit.reason(), Some(VmExit::DebugExit(7)));
    }

    #[test]
    fn unknown_ports_and_odd_widths_are_ignored() {
        let (bus, sink, exit) = new_bus();
        let mut data = [0u8; 4];
        assert!(
            !bus.read(0x1234, &mut data),
            "no device: the exit reads ones"
        );
        bus.write(u64::from(COM1), b"xy");
        assert!(bus.read(u64::from(COM1), &mut data[..2]));
        assert_eq!(data[..2], [0xff; 2]);
        assert!(!bus.write(0x80, &[1]));
        bus.write(u64::from(DEBUG_EXIT) + 1, &[3]);
        assert!(sink.0.lock().unwrap().is_empty());
        assert!(!exit.is_stopping());
    }
}
