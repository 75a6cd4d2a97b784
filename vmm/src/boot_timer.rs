//! `--boot-timer`: Firecracker's boot-time pseudo device. A guest's init
//! writes the byte 123 at its address, the first virtio-mmio slot
//! (0xd0000000, where Firecracker's guests look for it; the virtio devices
//! then start one slot later), and minivmm logs the time since the VM was
//! built, at info level: `Guest-boot-time = <us> us <ms> ms`.

use std::time::Instant;

use devices::bus::BusDevice;

/// The value that marks the end of the guest's boot.
pub const BOOT_COMPLETE: u8 = 123;

/// The device.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    logged: bool,
}

impl BootTimer {
    /// A timer started now.
    pub fn new() -> Self {
        BootTimer {
            start: Instant::now(),
            logged: false,
        }
    }
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Once: a guest writing it in a loop cannot flood the log.
        if offset == 0 && data == [BOOT_COMPLETE] && !std::mem::replace(&mut self.logged, true) {
            let us = self.start.elapsed().as_micros();
            log::info!("Guest-boot-time = {us:>6} us {} ms", us / 1000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_0_counts_and_only_once() {
        let mut t = BootTimer::new();
        t.write(1, &[BOOT_COMPLETE]);
        t.write(0, &[BOOT_COMPLETE, 0]);
        t.write(0, &[122]);
        assert!(!t.logged);
        t.write(0, &[BOOT_COMPLETE]);
        assert!(t.logged);
        let mut data = [0xff; 4];
        t.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
