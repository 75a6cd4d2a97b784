//! A minimal `log` backend: one line per record, `minivmm: LEVEL: msg` on
//! stderr by default. The API's `PUT /logger` (and a config file's `logger`)
//! sends the lines to a file or named pipe instead, with or without the
//! level and the source location, optionally for one module path only.

use std::fs::File;
use std::io::Write;
use std::sync::RwLock;

use log::{LevelFilter, Log, Metadata, Record};

/// Where and how lines are written.
#[derive(Debug, Default)]
struct Target {
    /// None: stderr.
    file: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct Logger {
    target: RwLock<Target>,
}

impl Log for Logger {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let target = self.target.read().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &target.module
            && !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
        {
            return;
        }
        let mut line = String::from("minivmm: ");
        if target.show_level || target.file.is_none() {
            line.push_str(&format!("{}: ", record.level()));
        }
        if target.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("{}\n", record.args()));
        // Logging must never fail the VMM (a full pipe loses the line).
        match &target.file {
            Some(f) => {
                let _ = (&*f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger {
    target: RwLock::new(Target {
        file: None,
        show_level: false,
        show_origin: false,
        module: None,
    }),
};

/// Installs the logger with `level` (once; later calls only change the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Sends lines to `file` (None: stderr), with the level and the source
/// location if asked, only for `module` and below if given.
pub fn configure(file: Option<File>, show_level: bool, show_origin: bool, module: Option<String>) {
    let _ = log::set_logger(&LOGGER);
    *LOGGER.target.write().unwrap_or_else(|p| p.into_inner()) = Target {
        file,
        show_level,
        show_origin,
        module,
    };
}
