//! minivmm's fuzz targets as plain functions over bytes.
//!
//! Each module is one target of `fuzz/` (libFuzzer, nightly) and is also run
//! by `cargo test` on stable over every file of the target's seed corpus and
//! regressions (`tests/replay.rs`), so an input that once crashed stays fixed.
//! Every target drives the real device code without KVM, on a fresh small
//! `memory::GuestFrames`, and checks invariants of ../shared/ADVERSARIAL.md
//! with `assert!` (a failed check is a crash to libFuzzer):
//!
//! - [`virtqueue`]: the device side of a split virtqueue on an arbitrary
//!   memory image; writes only into device-writable buffers and the used
//!   ring, the used index advances by at most the chains popped, no pin
//!   outlives its chain or the queue.
//! - [`virtio_mmio`]: register accesses of any offset, width and value against
//!   the transport with a block device behind it, interleaved with notifies.
//! - [`block`]: structured virtio-blk requests against a file-backed disk; the
//!   file changes only where a valid write request said.
//! - [`serial`]: COM1 register accesses with DLAB flips and input bytes.
//! - [`ioapic`]: I/O APIC register accesses; the routes pushed to KVM always
//!   match the redirection entries, and change only when an entry's does.
//! - [`boot_image`]: bytes as a kernel image and cmdline through minivmm's
//!   loading path.
//! - [`net`]: virtio-net's queues, TAP input and notifications interleaved;
//!   writes only into receive buffers the device holds and the used rings,
//!   only valid frames sent.
//! - [`api_request`]: bytes on the API socket through the HTTP framing,
//!   the router and the pre-boot controller.
//! - [`snapshot_state`]: bytes as a snapshot state file through its
//!   header checks and its decoder.
//! - [`queue_differential`]: our queue against rust-vmm's `virtio-queue` on
//!   the same rings.
//!
//! Inputs are parsed with [`Input`], which reads zeros once the bytes run out,
//! so every byte string is a valid input.

pub mod api_request;
pub mod block;
pub mod boot_image;
pub mod ioapic;
pub mod net;
pub mod queue_differential;
pub mod seeds;
pub mod serial;
pub mod snapshot_state;
pub mod virtio_mmio;
pub mod virtqueue;

mod common;

pub use common::Input;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/` and
/// `fuzz/regressions/`, and the libFuzzer target's name) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtqueue", virtqueue::run),
    ("virtio_mmio", virtio_mmio::run),
    ("block", block::run),
    ("serial", serial::run),
    ("ioapic", ioapic::run),
    ("boot_image", boot_image::run),
    ("queue_differential", queue_differential::run),
    ("net", net::run),
    ("api_request", api_request::run),
    ("snapshot_state", snapshot_state::run),
];
