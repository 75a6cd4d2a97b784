//! Target `serial`: COM1 through minivmm's port I/O bus (vm-superio's 16550,
//! ../shared/ADVERSARIAL.md §13).
//!
//! Input: operations of three bytes (kind, offset 0..7, value): kind % 4 = 0
//! write, 1 read, 2 input bytes from the host side (value % 80 copies of the
//! offset byte: floods included), 3 a write to the line control register
//! flipping DLAB. Checks: no panic; the input FIFO never holds more than its
//! 64 bytes; the console gets at most one byte per write to the transmit
//! register (no amplification); no access stops the VM.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm::exit::ExitLatch;
use vmm::i8042::I8042;
use vmm::irq::IrqFd;
use vmm::pio::{COM1, SerialDevice, legacy_bus};

use crate::common::Input;

const FIFO: usize = 64;
const LCR: u8 = 3;
const DLAB: u8 = 0x80;
const MAX_OPS: usize = 8192;

/// The console: counts what it is given.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<usize>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let sink = Sink::default();
    let trigger = IrqFd::unregistered().expect("eventfd");
    let (serial, _room) =
        vmm::console::serial(trigger, Box::new(sink.clone()), None).expect("eventfd");
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
    let exit = Arc::new(ExitLatch::new().expect("eventfd"));
    let keyboard = Arc::new(IrqFd::unregistered().expect("eventfd"));
    let i8042 = Arc::new(Mutex::new(I8042::new(keyboard, exit.clone())));
    let bus = legacy_bus(serial.clone(), i8042, &exit, true).expect("the legacy ports fit");
    let mut input = Input::new(data);
    let mut writes = 0usize;
    let mut dlab = false;
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let kind = input.u8() % 4;
        let offset = input.u8() % 8;
        let value = input.u8();
        let port = u64::from(COM1 + u16::from(offset));
        match kind {
            0 => {
                if offset == 0 && !dlab {
                    writes += 1;
                }
                if offset == LCR {
                    dlab = value & DLAB != 0;
                }
                bus.write(port, &[value]);
            }
            1 => {
                let mut b = [0u8];
                bus.read(port, &mut b);
            }
            2 => {
                let bytes = vec![offset; usize::from(value % 80)];
                let mut d = serial.lock().unwrap_or_else(|p| p.into_inner());
                let s = d.uart();
                let _ = s.enqueue_raw_bytes(&bytes);
                assert!(s.fifo_capacity() <= FIFO, "FIFO capacity above {FIFO}");
            }
            _ => {
                dlab = !dlab;
                bus.write(
                    u64::from(COM1 + u16::from(LCR)),
                    &[if dlab { DLAB | 3 } else { 3 }],
                );
            }
        }
        let out = *sink.0.lock().unwrap_or_else(|p| p.into_inner());
        assert!(
            out <= writes,
            "{out} console bytes from {writes} THR writes"
        );
    }
    assert!(!exit.is_stopping(), "a COM1 access stopped the VM");
}
