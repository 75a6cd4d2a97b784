//! minivmm's VMM library: KVM setup, vCPUs, boot and the event loop.
//!
//! The binary `minivmm` is a thin CLI over this library so that integration
//! tests drive the same code.

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod console;
pub mod exit;
pub mod irq;
pub mod logger;
pub mod pio;
pub mod run;
pub mod tap;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod x86;
