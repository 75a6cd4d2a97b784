//! A minimal `log` backend: one line per record on stderr, `minivmm: LEVEL: msg`.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let mut err = std::io::stderr().lock();
            // Logging must never fail the VMM.
            let _ = writeln!(err, "minivmm: {}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger with `level` (once; later calls only change the level).
pub fn init(level: LevelFilter) {
    static LOGGER: StderrLogger = StderrLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
