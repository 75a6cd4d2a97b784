//! Polled output on the COM1 16550 UART (I/O port 0x3f8) and the `log!` macro.
//!
//! The UART is set to 115200 baud, 8N1, interrupts off; each byte waits for the
//! transmit holding register to be empty (LSR bit 5). Lines end with `\n` only,
//! so a test reading the console sees each line exactly as printed. Every line
//! the guest prints starts with `testguest: `.

use core::fmt::{self, Write};

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
/// Register offsets (DLAB = 0 unless noted).
const THR: u16 = 0;
const DLL: u16 = 0; // DLAB = 1
const IER: u16 = 1;
const DLM: u16 = 1; // DLAB = 1
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const MCR_DTR_RTS: u8 = 0x03;
const LSR_THR_EMPTY: u8 = 0x20;
/// Polls of LSR before a byte is sent anyway (a missing UART reads 0xff).
const MAX_POLLS: u32 = 100_000;

/// Programs COM1: no interrupts, divisor 1 (115200 baud), 8N1. Then ends any
/// line firmware left open (SeaBIOS prints "Booting from ROM.." without one),
/// so that every `testguest: ` line starts a line.
pub fn init() {
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, LCR_DLAB);
    outb(COM1 + DLL, 1);
    outb(COM1 + DLM, 0);
    outb(COM1 + LCR, LCR_8N1);
    outb(COM1 + MCR, MCR_DTR_RTS);
    put(b'\n');
}

fn put(byte: u8) {
    for _ in 0..MAX_POLLS {
        if inb(COM1 + LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1 + THR, byte);
}

/// The console as a `fmt::Write` sink.
#[derive(Debug)]
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put);
        Ok(())
    }
}

/// Prints one `testguest: ` line; use [`log!`](crate::log).
pub fn log_line(args: fmt::Arguments<'_>) {
    // Serial never fails.
    let _ = Serial.write_fmt(format_args!("testguest: {args}\n"));
}

/// Prints one line prefixed with `testguest: `.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::serial::log_line(format_args!($($arg)*))
    };
}
