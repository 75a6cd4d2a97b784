//! The legacy port I/O devices on the PIO bus (a `devices::bus::Bus` of
//! ports, like the MMIO one): COM1 (vm-superio's 16550), the i8042
//! (vm-superio's: the CPU reset command) and a debug-exit port. Ports no
//! device holds read as all ones and ignore writes; the vCPU's exit handler
//! logs each once.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, BusError};
use vm_superio::{I8042Device, Trigger};

use crate::console::ConsoleSerial;
use crate::exit::{ExitLatch, VmExit};

/// COM1 base port and its eight registers.
pub const COM1: u16 = 0x3f8;
/// The legacy IRQ COM1 raises.
pub const COM1_IRQ: u32 = 4;
/// The i8042's ports: data at 0x60, command/status at 0x64.
pub const I8042: u16 = 0x60;
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

/// What the i8042's CPU reset line does: stop the VM with `VmExit::Reset`.
#[derive(Debug)]
pub struct ResetLine(Arc<ExitLatch>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.stop(VmExit::Reset);
        Ok(())
    }
}

/// vm-superio's i8042 on ports 0x60..=0x64: status and data read 0, command
/// 0xfe pulses the reset line; other accesses are ignored.
#[derive(Debug)]
pub struct I8042Port(I8042Device<ResetLine>);

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.0.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            let Ok(()) = self.0.write(offset as u8, *value);
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

/// The PIO bus: `serial` on COM1, the i8042 and the debug-exit port
/// stopping the VM through `exit`.
pub fn legacy_bus(
    serial: Arc<Mutex<SerialDevice>>,
    exit: &Arc<ExitLatch>,
) -> Result<Bus, BusError> {
    let mut bus = Bus::new();
    bus.insert(u64::from(COM1), 8, serial)?;
    let i8042 = I8042Device::new(ResetLine(exit.clone()));
    bus.insert(u64::from(I8042), 5, Arc::new(Mutex::new(I8042Port(i8042))))?;
    // Four ports wide so that `outl` reaches it as well as `outb`.
    bus.insert(
        u64::from(DEBUG_EXIT),
        4,
        Arc::new(Mutex::new(DebugExitPort(exit.clone()))),
    )?;
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqFd;
    use std::io::Write;

    const I8042_COMMAND: u64 = I8042 as u64 + 4;

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
            crate::console::serial(IrqFd::unregistered().unwrap(), Box::new(sink.clone())).unwrap();
        let exit = Arc::new(ExitLatch::new().unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
        (legacy_bus(serial, &exit).unwrap(), sink, exit)
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
        assert_eq!(status, [0]);
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
