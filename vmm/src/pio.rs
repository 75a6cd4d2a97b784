//! The port I/O bus: COM1 (vm-superio's 16550), the i8042 reset line, and a
//! debug-exit port. Unknown ports read as all ones and ignore writes; each is
//! logged once so a guest cannot flood the log.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleSerial;
use crate::exit::{ExitLatch, VmExit};

/// COM1 base port and its eight registers.
pub const COM1: u16 = 0x3f8;
/// The legacy IRQ COM1 raises.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command/status ports.
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
/// i8042 command: pulse the CPU reset line.
const I8042_RESET: u8 = 0xfe;
/// Debug-exit port (as QEMU's `isa-debug-exit,iobase=0xf4`).
pub const DEBUG_EXIT: u16 = 0xf4;

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Devices reached through `in`/`out`.
pub struct PioBus {
    serial: Arc<Mutex<ConsoleSerial>>,
    exit: Arc<ExitLatch>,
    logged: Mutex<HashSet<u16>>,
    serial_failed: AtomicBool,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus").finish_non_exhaustive()
    }
}

impl PioBus {
    /// A bus with `serial` on COM1, stopping the VM through `exit`.
    pub fn new(serial: Arc<Mutex<ConsoleSerial>>, exit: Arc<ExitLatch>) -> Self {
        PioBus {
            serial,
            exit,
            logged: Mutex::new(HashSet::new()),
            serial_failed: AtomicBool::new(false),
        }
    }

    /// Handles an `in` from `port`, filling `data`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff if data.len() == 1 => {
                data[0] = self.serial().read((port - COM1) as u8);
            }
            // i8042 status: output buffer empty, input buffer empty.
            I8042_COMMAND if data.len() == 1 => data[0] = 0,
            I8042_DATA if data.len() == 1 => data[0] = 0,
            _ => {
                self.log_unknown(port, "read");
                data.fill(0xff);
            }
        }
    }

    /// Handles an `out` of `data` to `port`.
    pub fn write(&self, port: u16, data: &[u8]) {
        match (port, data) {
            (COM1..=0x3ff, [value]) => {
                // Output errors are the console's (logged once there); this
                // is the interrupt eventfd failing.
                if let Err(e) = self.serial().write((port - COM1) as u8, *value)
                    && !self.serial_failed.swap(true, Ordering::Relaxed)
                {
                    log::warn!("serial: {e:?} (logged once)");
                }
            }
            (I8042_COMMAND, [I8042_RESET]) => self.exit.stop(VmExit::Reset),
            (I8042_COMMAND | I8042_DATA, [_]) => {}
            (DEBUG_EXIT, [value, ..]) => self.exit.stop(VmExit::DebugExit(*value)),
            _ => self.log_unknown(port, "write"),
        }
    }

    fn serial(&self) -> std::sync::MutexGuard<'_, ConsoleSerial> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_unknown(&self, port: u16, what: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() < 64 && logged.insert(port) {
            log::info!("ignoring PIO {what} at port {port:#x} (logged once)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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

    fn new_bus() -> (PioBus, Sink, Arc<ExitLatch>) {
        let sink = Sink::default();
        let trigger = IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap());
        let (serial, _) = crate::console::serial(trigger, Box::new(sink.clone())).unwrap();
        let exit = Arc::new(ExitLatch::new().unwrap());
        (
            PioBus::new(Arc::new(Mutex::new(serial)), exit.clone()),
            sink,
            exit,
        )
    }

    #[test]
    fn serial_output_reaches_the_writer() {
        let (bus, sink, _) = new_bus();
        for b in b"hi\n" {
            bus.write(COM1, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn i8042_reset_and_debug_exit_stop_the_vm() {
        let (bus, _, exit) = new_bus();
        bus.write(I8042_COMMAND, &[0x20]);
        assert!(!exit.is_stopping());
        bus.write(I8042_COMMAND, &[I8042_RESET]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        let (bus, _, exit) = new_bus();
        bus.write(DEBUG_EXIT, &[7]);
        assert_eq!(exit.reason(), Some(VmExit::DebugExit(7)));
    }

    #[test]
    fn unknown_ports_and_odd_widths_are_ignored() {
        let (bus, sink, exit) = new_bus();
        let mut data = [0u8; 4];
        bus.read(0x1234, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(COM1, b"xy");
        bus.read(COM1, &mut data[..2]);
        bus.write(0x80, &[1]);
        assert!(sink.0.lock().unwrap().is_empty());
        assert!(!exit.is_stopping());
    }
}
