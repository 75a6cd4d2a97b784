//! x86-64 guest physical layout: where RAM goes around the 32-bit MMIO hole.
//!
//! RAM starts at 0 and runs up to `MMIO_HOLE_START`; whatever does not fit goes
//! above 4 GiB. The hole (2 GiB..4 GiB, like QEMU q35 for large guests) holds
//! the LAPIC, IOAPIC and virtio-mmio devices. A 3 GiB guest therefore has 2 GiB
//! below the hole and 1 GiB above it.

use std::vec::Vec;

use vm_memory::GuestAddress;

/// First byte of the 32-bit MMIO hole; RAM below 4 GiB ends here.
pub const MMIO_HOLE_START: u64 = 0x8000_0000;
/// One past the last byte of the hole: where high RAM starts.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Largest guest RAM minivmm accepts. Its frame metadata (1/64 of it) and dirty
/// log (1/32768) are address space until used, so this is bounded by what the
/// host can map, not by what the VMM keeps.
pub const MAX_RAM: u64 = 1 << 40;

/// The RAM ranges `(start, size)` of a guest with `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = Vec::from([(GuestAddress(0), low)]);
    if size > low {
        ranges.push((GuestAddress(MMIO_HOLE_END), size - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range_below_hole() {
        assert_eq!(ram_ranges(128 << 20), [(GuestAddress(0), 128 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_HOLE_START),
            [(GuestAddress(0), MMIO_HOLE_START)]
        );
    }

    #[test]
    fn large_guest_continues_above_4g() {
        assert_eq!(
            ram_ranges(3 << 30),
            [(GuestAddress(0), 2 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
    }
}
