//! minivmm's VMM library: KVM setup, vCPUs, boot and the event loop.
//!
//! The binary `minivmm` is a thin CLI over this library so that integration
//! tests drive the same code.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod boot_timer;
pub mod cli;
pub mod console;
pub mod exit;
pub mod i8042;
pub mod irq;
pub mod logger;
pub mod pio;
pub mod run;
pub mod snapshot;
pub mod tap;
pub mod vcpu;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;
pub mod x86;

/// Locks `m`, taking it back if a thread panicked while holding it (every
/// shared state here stays consistent between statements).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its sources on one line: "Cannot read x: No such file".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
