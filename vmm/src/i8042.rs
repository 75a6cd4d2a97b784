//! The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status and
//! command), with a keyboard behind it that only ever sends what the VMM
//! types: Ctrl+Alt+Del for the API's `SendCtrlAltDel`, which Linux treats
//! as a reboot request (kernel/reboot.c `ctrl_alt_del`).
//!
//! vm-superio's i8042 only pulses the reset line; this one also keeps the
//! controller's command byte, an output buffer and the keyboard interrupt
//! (IRQ 1), as the IBM PC/AT controller Linux's `i8042` driver probes:
//! self-test (0xAA → 0x55), keyboard interface test (0xAB → 0x00), read and
//! write the command byte (0x20, 0x60), read and write the output port
//! (0xD0, 0xD1), enable and disable the keyboard (0xAE, 0xAD), and CPU
//! reset (0xFE). Keyboard commands written to the data port are
//! acknowledged (0xFA; reset adds 0xAA, identify adds 0xAB 0x83). Scancodes
//! are set 2, with translation off in the command byte, so the driver takes
//! them as they are. Nothing the guest writes can grow the buffer past
//! [`BUFFER`] bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use devices::bus::BusDevice;
use devices::virtio::Interrupt;

use crate::exit::{ExitLatch, VmExit};

/// Bytes the output buffer holds (a real controller holds one; a short
/// queue lets a key sequence wait for the driver).
pub const BUFFER: usize = 16;

/// Status: output buffer full.
const STATUS_OBF: u8 = 1 << 0;
/// Status: system flag, set once the self-test passed.
const STATUS_SYS: u8 = 1 << 2;
/// Status: the last write was a command (port 0x64).
const STATUS_CMD: u8 = 1 << 3;

/// Command byte: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 1 << 0;
/// Command byte: system flag.
const CTR_SYS: u8 = 1 << 2;
/// Command byte: keyboard disabled.
const CTR_KBD_DISABLED: u8 = 1 << 4;

/// Set-2 scancodes of Left Ctrl, Left Alt and Delete, pressed.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// The controller.
#[derive(Debug)]
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    /// A command waiting for its data byte (0x60, 0xD1, 0xD4...).
    pending: Option<u8>,
    buffer: VecDeque<u8>,
    irq: Arc<dyn Interrupt>,
    exit: Arc<ExitLatch>,
}

/// The controller's registers and keyboard buffer, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes the guest has not read.
    pub buffer: Vec<u8>,
}

impl I8042 {
    /// The state to save.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Restores `state`; false (nothing changed) for a buffer longer than
    /// the controller's.
    pub fn restore(&mut self, state: &I8042State) -> bool {
        if state.buffer.len() > BUFFER {
            return false;
        }
        self.status = state.status;
        self.control = state.control;
        self.output_port = state.output_port;
        self.pending = state.pending;
        self.buffer = state.buffer.iter().copied().collect();
        true
    }

    /// A controller raising `irq` (IRQ 1) and resetting through `exit`.
    pub fn new(irq: Arc<dyn Interrupt>, exit: Arc<ExitLatch>) -> Self {
        I8042 {
            status: STATUS_SYS,
            control: CTR_KBD_INT | CTR_SYS,
            output_port: 0x01,
            pending: None,
            buffer: VecDeque::with_capacity(BUFFER),
            irq,
            exit,
        }
    }

    /// Types Ctrl+Alt+Del; false if the buffer has no room for it (the
    /// driver has not read an earlier one).
    pub fn ctrl_alt_del(&mut self) -> bool {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER {
            return false;
        }
        self.buffer.extend(CTRL_ALT_DEL);
        self.output_ready();
        true
    }

    /// Queues a reply byte of the controller or the keyboard (dropped when
    /// full: only a guest writing commands without reading fills it).
    fn reply(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER {
            self.buffer.push_back(byte);
        }
        self.output_ready();
    }

    fn output_ready(&mut self) {
        if self.buffer.is_empty() {
            self.status &= !STATUS_OBF;
            return;
        }
        self.status |= STATUS_OBF;
        if self.control & CTR_KBD_INT != 0 && self.control & CTR_KBD_DISABLED == 0 {
            self.irq.trigger();
        }
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_CMD;
        match command {
            0x20 => self.reply(self.control),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(command),
            0xaa => {
                self.status |= STATUS_SYS;
                self.reply(0x55);
            }
            0xab => self.reply(0x00),
            0xad => self.control |= CTR_KBD_DISABLED,
            0xae => self.control &= !CTR_KBD_DISABLED,
            0xd0 => self.reply(self.output_port),
            0xfe => self.exit.stop(VmExit::Reset),
            // The auxiliary port (absent), and the rest.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_CMD;
        match self.pending.take() {
            Some(0x60) => {
                self.control = value;
                self.output_ready();
            }
            Some(0xd1) => {
                self.output_port = value;
                // Bit 0 clear is the CPU reset line pulled low.
                if value & 1 == 0 {
                    self.exit.stop(VmExit::Reset);
                }
            }
            // Write to the output buffer as if the keyboard sent it.
            Some(0xd2) => self.reply(value),
            // Aux port: none here.
            Some(_) => {}
            // A keyboard command.
            None => match value {
                0xff => {
                    self.reply(0xfa);
                    self.reply(0xaa);
                }
                0xf2 => {
                    self.reply(0xfa);
                    self.reply(0xab);
                    self.reply(0x83);
                }
                _ => self.reply(0xfa),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            0 => {
                let value = self.buffer.pop_front().unwrap_or(0);
                self.output_ready();
                value
            }
            4 => self.status,
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [value]) => self.data(*value),
            (4, [value]) => self.command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, Default)]
    struct Count(AtomicU32);
    impl Interrupt for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn controller() -> (I8042, Arc<Count>, Arc<ExitLatch>) {
        let irq = Arc::new(Count::default());
        let exit = Arc::new(ExitLatch::new().unwrap());
        (I8042::new(irq.clone(), exit.clone()), irq, exit)
    }

    fn read(i: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        i.read(port, &mut b);
        b[0]
    }

    #[test]
    fn linux_probe_sequence_is_answered() {
        let (mut i, _, exit) = controller();
        // i8042_flush: nothing buffered.
        assert_eq!(read(&mut i, 4) & STATUS_OBF, 0);
        i.write(4, &[0xaa]);
        assert_ne!(read(&mut i, 4) & STATUS_OBF, 0);
        assert_eq!(read(&mut i, 0), 0x55);
        i.write(4, &[0x20]);
        let ctr = read(&mut i, 0);
        assert_eq!(ctr & 0x40, 0, "no translation");
        i.write(4, &[0x60]);
        i.write(0, &[ctr | CTR_KBD_INT]);
        i.write(4, &[0xab]);
        assert_eq!(read(&mut i, 0), 0x00);
        i.write(0, &[0xf2]);
        assert_eq!(
            [read(&mut i, 0), read(&mut i, 0), read(&mut i, 0)],
            [0xfa, 0xab, 0x83]
        );
        assert!(!exit.is_stopping());
    }

    #[test]
    fn ctrl_alt_del_sends_set_2_scancodes_with_an_interrupt() {
        let (mut i, irq, _) = controller();
        assert!(i.ctrl_alt_del());
        assert!(irq.0.load(Ordering::Relaxed) >= 1);
        let codes: Vec<u8> = (0..4).map(|_| read(&mut i, 0)).collect();
        assert_eq!(codes, CTRL_ALT_DEL);
        assert_eq!(read(&mut i, 4) & STATUS_OBF, 0);
        // With the keyboard interrupt off, no interrupt; the bytes wait.
        i.write(4, &[0x60]);
        i.write(0, &[0]);
        let before = irq.0.load(Ordering::Relaxed);
        assert!(i.ctrl_alt_del());
        assert_eq!(irq.0.load(Ordering::Relaxed), before);
        assert_ne!(read(&mut i, 4) & STATUS_OBF, 0);
    }

    #[test]
    fn a_guest_cannot_grow_the_buffer_and_reset_stops_the_vm() {
        let (mut i, _, exit) = controller();
        for _ in 0..10_000 {
            i.write(0, &[0xff]);
            i.write(4, &[0xaa]);
        }
        assert_eq!(i.buffer.len(), BUFFER);
        assert!(!i.ctrl_alt_del(), "no room");
        i.write(0, &[1, 2]);
        i.write(4, &[0xfe, 0xfe]);
        assert!(!exit.is_stopping(), "wide accesses are ignored");
        i.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        let (mut i, _, exit) = controller();
        i.write(4, &[0xd1]);
        i.write(0, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
