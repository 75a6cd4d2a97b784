//! minivmm device models.
//!
//! Guest-facing devices live here: the virtio-mmio transport (virtio 1.2 §4.2),
//! the device side of split virtqueues (§2.7), virtio-blk (§5.2), the I/O APIC
//! of a split irqchip, and the serial console. Device code is safe Rust and sees guest memory only through
//! [`memory`]'s types.

#![forbid(unsafe_code)]

pub mod bus;
pub mod disk;
pub mod file;
pub mod ioapic;
pub mod rate_limiter;
pub mod virtio;
