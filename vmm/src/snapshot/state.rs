//! What a snapshot's state file holds: the VM's description (what restore
//! rebuilds the devices from and checks the host against), the layout of
//! the memory file, and the state of every vCPU and device.
//!
//! Not in it: guest RAM (the memory file), the rate limiters' buckets
//! (their settings are saved; they start full), counters and logs, the
//! console's host side, the dirty log (a restored VM's first diff snapshot
//! is relative to the snapshot it was restored from).

use devices::ioapic::IoApicState;
use devices::rate_limiter::RateLimiterConfig;
use devices::virtio::mmio::TransportState;
use kvm_bindings::kvm_clock_data;
use serde::{Deserialize, Serialize};

use crate::i8042::I8042State;
use crate::vcpu_state::VcpuState;

/// A disk as it was when saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The image.
    pub path: String,
    /// Read-only to the guest.
    pub read_only: bool,
    /// GET_ID's answer.
    pub serial: Option<String>,
    /// Its size in bytes: restore refuses an image that changed size.
    pub size: u64,
    /// Its limiter's settings (the buckets start full on restore).
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A network interface as it was when saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    /// The interface's name (`iface_id`), what network overrides match.
    pub id: String,
    /// The TAP's name (restore may rename it).
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU offered.
    pub mtu: u16,
    /// Limits on frames to the guest.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames from the guest.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// COM1's 16550 registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// The whole state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// RAM regions as (guest address, bytes), in memory-file order.
    pub regions: Vec<(u64, u64)>,
    /// The frames minivmm placed (boot structures, ACPI tables) as
    /// `(guest address, bytes, frame flags)`: `GuestFrames::placed`.
    pub frames: Vec<(u64, u64, u32)>,
    /// ACPI tables were given to the guest.
    pub acpi: bool,
    /// The boot timer device occupies the first MMIO slot.
    pub boot_timer: bool,
    /// Disks, in slot order.
    pub disks: Vec<SavedDisk>,
    /// Network interfaces, after the disks.
    pub nets: Vec<SavedNet>,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// The I/O APIC.
    pub ioapic: IoApicState,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Every virtio device's transport and queues, disks then nets.
    pub devices: Vec<TransportState>,
}
