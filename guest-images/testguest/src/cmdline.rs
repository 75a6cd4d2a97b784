//! The guest's command-line options.
//!
//! Words are separated by spaces; only words starting with `testguest.` are the
//! guest's, everything else (e.g. `console=ttyS0` a VMM adds) is ignored:
//!
//! - `testguest.action=reset`: after the report, reset through the i8042.
//! - `testguest.action=triplefault`: after the report, triple-fault the CPU.
//! - `testguest.action=exit:<n>`: after the report, write `n` (0..=255) to the
//!   debug-exit port whatever the result.
//! - `testguest.action=hang`: after the report, halt with interrupts off until
//!   the VMM stops the guest (tests of SIGTERM handling).
//! - `testguest.blk=none|read|write`: what the block self-test does with each
//!   virtio-blk device (`blk.rs`; default `read`).
//! - `testguest.net=ip=A.B.C.D/N,peer=A.B.C.D,port=N[,serve=S]`: the network
//!   self-test's addresses (`net.rs`); the first occurrence is for net0, the
//!   next for net1, and so on (at most four); a device without one is left
//!   alone.
//! - `testguest.exit=acpi`: after the report, power off through the ACPI
//!   FADT's sleep control register with the DSDT's `\_S5` value (the
//!   default report action only; the verdict is in the report).
//! - `testguest.check=full`: run the O(frames) allocator consistency check
//!   whatever the RAM size (by default only with at most 512 MiB of RAM).
//!
//! - `testguest.snapshot=MIB[,points=N][,touch=PAGES]`: the self-test that
//!   spans snapshots (`snapshot.rs`): a pattern in `MIB` MiB of RAM and
//!   snapshot points in the device tests, where the guest waits for a byte
//!   on COM1; without devices, `N` points (default 1) after the tests, and
//!   after each point the first `PAGES` pages of the pattern rewritten.
//!
//! Unknown `testguest.*` options and bad values are reported and ignored.

use crate::blk::Mode;
use crate::log;
use crate::netstack::{self, Config};

/// What the guest does after its report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    /// Exit through the debug-exit port with the self-test result.
    #[default]
    Report,
    /// Reset through the i8042 (0xfe to port 0x64).
    Reset,
    /// Triple-fault the CPU.
    TripleFault,
    /// Write this byte to the debug-exit port.
    Exit(u8),
    /// Halt until the VMM stops the guest.
    Hang,
}

/// The parsed options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// What to do after the report.
    pub action: Action,
    /// Run the full consistency check regardless of RAM size.
    pub full_check: bool,
    /// After the report, power off through the FADT's sleep control
    /// register with the DSDT's `\_S5` (instead of the debug exit).
    pub acpi_exit: bool,
    /// The block self-test's mode.
    pub blk: Mode,
    /// The network self-test's addresses, per network device.
    pub net: [Option<Config>; MAX_NETS],
    /// The snapshot self-test's settings.
    pub snapshot: Option<crate::snapshot::Settings>,
}

/// Network devices the options can configure.
pub const MAX_NETS: usize = 4;

const PREFIX: &str = "testguest.";

/// Parses the guest's options out of `cmdline`, printing a warning for each
/// one it does not understand. The last valid occurrence of an option wins.
pub fn parse(cmdline: &str) -> Options {
    let mut options = Options::default();
    for word in cmdline.split(' ').filter(|w| w.starts_with(PREFIX)) {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match (&key[PREFIX.len()..], value) {
            ("action", "reset") => options.action = Action::Reset,
            ("action", "triplefault") => options.action = Action::TripleFault,
            ("action", "hang") => options.action = Action::Hang,
            ("action", v) if v.starts_with("exit:") => match v["exit:".len()..].parse::<u8>() {
                Ok(code) => options.action = Action::Exit(code),
                Err(_) => log!("warning: ignoring {word}: the exit code must be 0..=255"),
            },
            ("check", "full") => options.full_check = true,
            ("snapshot", v) => match crate::snapshot::Settings::parse(v) {
                Ok(s) => options.snapshot = Some(s),
                Err(why) => log!("warning: ignoring {word}: {why}"),
            },
            ("exit", "acpi") => options.acpi_exit = true,
            ("blk", "none") => options.blk = Mode::None,
            ("blk", "read") => options.blk = Mode::Read,
            ("blk", "write") => options.blk = Mode::Write,
            ("net", v) => match netstack::parse_config(v) {
                Ok(c) => match options.net.iter_mut().find(|n| n.is_none()) {
                    Some(slot) => *slot = Some(c),
                    None => log!("warning: ignoring {word}: at most {MAX_NETS} network devices"),
                },
                Err(why) => log!("warning: ignoring {word}: {why}"),
            },
            _ => log!("warning: ignoring unknown option {word}"),
        }
    }
    options
}
