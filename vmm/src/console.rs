//! The guest's console: COM1 (vm-superio's 16550) between the guest and
//! minivmm's stdin and stdout.
//!
//! - **Output** goes to stdout through [`ConsoleOut`]. A write error (a closed
//!   pipe, a full disk) is logged once; later output is dropped and counted.
//!   The guest never sees an error and cannot make minivmm log per byte.
//! - **Input** is read from stdin unbuffered (no bytes left behind in a std
//!   buffer that epoll knows nothing about), at most as many as the UART's
//!   receive FIFO has room for. When the FIFO is full, stdin is no longer
//!   watched; when the guest empties the FIFO ([`ConsoleEvents`], vm-superio's
//!   `in_buffer_empty`), it is watched again. So input waits in the kernel's
//!   pipe or terminal buffer instead of being dropped, memory stays bounded
//!   (64 bytes) and the loop never spins on readable stdin it cannot take.
//! - A terminal on stdin is put in raw mode for the run and its exact settings
//!   restored on every exit path ([`RawTerminal`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::Serial;
use vm_superio::serial::{SerialEvents, SerialState};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::terminal::Terminal;

use crate::irq::IrqFd;
use crate::pio::SerialDevice;

/// The console UART.
pub type ConsoleSerial = Serial<IrqFd, ConsoleEvents, ConsoleOut>;

/// A console UART on `out`, raising `irq`, in its reset state or in a saved
/// `state` (a snapshot's: checked by vm-superio, an error if its FIFO holds
/// more than the UART's 64 bytes); and the event its receive FIFO signals
/// when the guest has emptied it.
pub fn serial(
    irq: IrqFd,
    out: Box<dyn Write + Send>,
    state: Option<SerialState>,
) -> io::Result<(ConsoleSerial, EventFd)> {
    let room = EventFd::new(EFD_NONBLOCK)?;
    let events = ConsoleEvents {
        room: room.try_clone()?,
    };
    let uart = Serial::from_state(
        &state.unwrap_or_default(),
        irq,
        events,
        ConsoleOut::new(out),
    )
    .map_err(|e| io::Error::other(format!("the saved COM1 state: {e:?}")))?;
    Ok((uart, room))
}

/// What the console loop hears from the UART: the guest read the last byte
/// of its receive FIFO.
#[derive(Debug)]
pub struct ConsoleEvents {
    room: EventFd,
}

impl SerialEvents for ConsoleEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        // Only fails if the counter saturates, when the loop is woken anyway.
        let _ = self.room.write(1);
    }
}

/// The guest's output stream: errors are logged once, then output is dropped.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    failed: bool,
    dropped: u64,
}

impl ConsoleOut {
    /// Output to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            out,
            failed: false,
            dropped: 0,
        }
    }

    /// Bytes dropped since output failed.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn fail(&mut self, e: &io::Error, lost: usize) {
        if !self.failed {
            log::warn!("console output failed ({e}); the guest's further output is dropped");
            self.failed = true;
        }
        self.dropped += lost as u64;
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.failed {
            match self.out.write_all(buf) {
                Ok(()) => return Ok(buf.len()),
                Err(e) => self.fail(&e, buf.len()),
            }
        } else {
            self.dropped += buf.len() as u64;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.failed
            && let Err(e) = self.out.flush()
        {
            self.fail(&e, 0);
        }
        Ok(())
    }
}

impl std::fmt::Debug for ConsoleOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOut")
            .field("failed", &self.failed)
            .field("dropped", &self.dropped)
            .finish()
    }
}

/// Event data: which of the two the loop is telling the console about.
const INPUT: u32 = 0;
const ROOM: u32 = 1;

/// Feeds the console's input to the guest's UART, with flow control.
#[derive(Debug)]
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: File,
    room: EventFd,
    /// Input is not watched: the FIFO is full.
    paused: bool,
    /// Input ended (EOF, hang-up, error) or cannot be polled.
    closed: bool,
}

impl ConsoleInput {
    /// Reads `input` (a duplicate of stdin, or a pipe in tests) into the UART;
    /// `room` is the event [`serial`] returned with it.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: File, room: EventFd) -> Self {
        ConsoleInput {
            serial,
            input,
            room,
            paused: false,
            closed: false,
        }
    }

    /// A duplicate of stdin (so dropping it never closes fd 0).
    pub fn stdin() -> io::Result<File> {
        Ok(File::from(io::stdin().as_fd().try_clone_to_owned()?))
    }

    fn watch(&mut self, ops: &mut EventOps) {
        match ops.add(Events::with_data(&self.input, INPUT, EventSet::IN)) {
            Ok(()) => self.paused = false,
            Err(e) => {
                // stdin may be a file or /dev/null, which epoll refuses.
                log::debug!("console input is not pollable ({e:?}); the guest gets none");
                self.closed = true;
            }
        }
    }

    fn unwatch(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::with_data(&self.input, INPUT, EventSet::IN));
    }

    fn on_input(&mut self, ops: &mut EventOps) {
        let mut device = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let serial = device.uart();
        let room = serial.fifo_capacity();
        if room == 0 {
            // Wait for the guest to empty the FIFO (ROOM) before reading more.
            drop(device);
            self.unwatch(ops);
            self.paused = true;
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(n) if n > 0 => {
                // Fits: at most `room` bytes were read.
                let _ = serial.enqueue_raw_bytes(&buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            _ => {
                // EOF, hang-up or error: stop watching.
                drop(device);
                self.unwatch(ops);
                self.closed = true;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.room, ROOM, EventSet::IN)) {
            log::error!("cannot watch the console's receive FIFO: {e:?}");
        }
        // Also called again when the VM resumes from a pause.
        if !self.closed {
            self.watch(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ROOM => {
                let _ = self.room.read();
                if self.paused && !self.closed {
                    self.watch(ops);
                }
            }
            _ => self.on_input(ops),
        }
    }
}

/// Puts a terminal stdin in raw mode and restores its exact settings on drop.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Raw mode if stdin is a terminal (nothing otherwise).
    pub fn enter() -> Self {
        let stdin = io::stdin();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return RawTerminal { saved: None };
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return RawTerminal { saved: None };
        }
        if let Err(e) = stdin.lock().set_raw_mode() {
            log::warn!("cannot put the terminal in raw mode: {e}");
        }
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: `saved` is the termios tcgetattr returned for this terminal.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};

    /// A writer that fails like a closed pipe.
    struct Broken(Arc<Mutex<u64>>);
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            *self.0.lock().unwrap() += 1;
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn irq() -> IrqFd {
        IrqFd::unregistered().unwrap()
    }

    #[test]
    fn console_output_error_is_tried_once_then_output_is_dropped() {
        let attempts = Arc::new(Mutex::new(0));
        let (mut serial, _) = serial(irq(), Box::new(Broken(attempts.clone())), None).unwrap();
        for b in b"a lot of guest output\n" {
            // The guest sees no error.
            serial.write(0, *b).unwrap();
        }
        assert_eq!(
            *attempts.lock().unwrap(),
            1,
            "the failing stdout was written once"
        );
    }

    #[test]
    fn console_input_waits_for_room_and_loses_nothing() {
        let (serial, room) = serial(irq(), Box::new(io::sink()), None).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
        let (reader, mut writer) = io::pipe().unwrap();
        let input = File::from(std::os::fd::OwnedFd::from(reader));
        let sent: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
        writer.write_all(&sent).unwrap();
        let console = Arc::new(Mutex::new(ConsoleInput::new(serial.clone(), input, room)));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        manager.add_subscriber(console.clone());
        let mut received = Vec::new();
        for _ in 0..100 {
            manager.run_with_timeout(10).unwrap();
            let mut d = serial.lock().unwrap();
            let s = d.uart();
            // Input is taken only up to the FIFO's room: 64 bytes.
            assert!(s.fifo_capacity() <= 64);
            if s.fifo_capacity() == 0 {
                // The guest drains the FIFO through the data register.
                for _ in 0..64 {
                    received.push(s.read(0));
                }
            }
            if received.len() + 64 - s.fifo_capacity() >= sent.len() {
                while s.fifo_capacity() < 64 {
                    received.push(s.read(0));
                }
                break;
            }
        }
        assert_eq!(received, sent, "every byte, in order, none dropped");
        let c = console.lock().unwrap();
        assert!(!c.closed);
    }

    #[test]
    fn console_input_pauses_while_the_fifo_is_full() {
        let (serial, room) = serial(irq(), Box::new(io::sink()), None).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial)));
        let (reader, mut writer) = io::pipe().unwrap();
        writer.write_all(&[b'x'; 100]).unwrap();
        let input = File::from(std::os::fd::OwnedFd::from(reader));
        let console = Arc::new(Mutex::new(ConsoleInput::new(serial.clone(), input, room)));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        manager.add_subscriber(console.clone());
        for _ in 0..5 {
            manager.run_with_timeout(10).unwrap();
        }
        assert_eq!(serial.lock().unwrap().uart().fifo_capacity(), 0);
        assert!(
            console.lock().unwrap().paused,
            "not watching input it cannot take"
        );
        // Nothing to do while paused: the loop times out instead of spinning.
        assert_eq!(manager.run_with_timeout(10).unwrap(), 0);
    }

    #[test]
    fn a_saved_uart_state_restores_its_fifo_and_a_too_long_one_is_refused() {
        let state = SerialState {
            in_buffer: b"hi".to_vec(),
            line_status: 0x61,
            ..SerialState::default()
        };
        let (mut uart, _) = serial(irq(), Box::new(io::sink()), Some(state)).unwrap();
        assert_eq!((uart.read(0), uart.read(0)), (b'h', b'i'));
        let flood = SerialState {
            in_buffer: vec![0; 65],
            ..SerialState::default()
        };
        let e = serial(irq(), Box::new(io::sink()), Some(flood)).unwrap_err();
        assert!(e.to_string().contains("COM1"), "{e}");
    }
}
