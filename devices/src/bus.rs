//! A bus of devices: address ranges — guest-physical addresses for MMIO, port
//! numbers for port I/O — mapped to devices. A vCPU's exit is delivered to
//! the device whose range holds the whole access, with the offset into that
//! range; anything else is not delivered (the VMM logs it once and reads all
//! ones).

use std::fmt;
use std::sync::{Arc, Mutex};

/// A device reached through MMIO or port I/O.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// An empty or wrapping range.
    #[error("Invalid range of {len:#x} bytes at {base:#x}")]
    InvalidRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("Range at {0:#x} overlaps another device")]
    Overlap(u64),
}

struct Entry {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices by address range, sorted by base.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap(base));
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// The device holding all of `[addr, addr + len)`, and the offset.
    fn find(&self, addr: u64, len: usize) -> Option<(&Entry, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(at.checked_sub(1)?)?;
        let offset = addr - entry.base;
        let end = offset.checked_add(len as u64)?;
        (end <= entry.len).then_some((entry, offset))
    }

    /// Runs `f` on the device holding `[addr, addr + len)` with the offset
    /// into it; false if no device holds the whole access.
    fn with_device(&self, addr: u64, len: usize, f: impl FnOnce(&mut dyn BusDevice, u64)) -> bool {
        let Some((entry, offset)) = self.find(addr, len) else {
            return false;
        };
        let mut device = entry.device.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut *device, offset);
        true
    }

    /// Delivers a read; false if no device holds the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.with_device(addr, data.len(), |d, offset| d.read(offset, data))
    }

    /// Delivers a write; false if no device holds the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.with_device(addr, data.len(), |d, offset| d.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(&'static str, u64, usize)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.0.push(("read", offset, data.len()));
            data.fill(0xab);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push(("write", offset, data.len()));
        }
    }

    #[test]
    fn bus_delivers_accesses_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x2000, 0x1000, b.clone()).unwrap();
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1ffc, &mut data));
        assert_eq!(data, [0xab; 4]);
        assert!(bus.write(0x2000, &[1, 2]));
        assert_eq!(a.lock().unwrap().0, vec![("read", 0xffc, 4)]);
        assert_eq!(b.lock().unwrap().0, vec![("write", 0, 2)]);
    }

    #[test]
    fn bus_ignores_accesses_outside_or_across_devices() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x1000, a.clone()).unwrap();
        let mut data = [0u8; 8];
        assert!(!bus.read(0xfff, &mut data[..1]));
        assert!(!bus.read(0x1ffc, &mut data), "crosses the end");
        assert!(!bus.write(0x2000, &[0]));
        assert!(!bus.write(u64::MAX, &[0, 0]), "wraps");
        assert!(a.lock().unwrap().0.is_empty());
    }

    #[test]
    fn bus_rejects_overlapping_empty_or_wrapping_ranges() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(0x1000, 0x1000, dev()).unwrap();
        assert_eq!(
            bus.insert(0x1800, 0x1000, dev()),
            Err(BusError::Overlap(0x1800))
        );
        assert_eq!(
            bus.insert(0x800, 0x1000, dev()),
            Err(BusError::Overlap(0x800))
        );
        assert!(matches!(
            bus.insert(0x3000, 0, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(0x2000, 0x1000, dev()).unwrap();
    }

    #[test]
    fn bus_survives_a_poisoned_device_lock() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0, 0x10, a.clone()).unwrap();
        let poison = a.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poison.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(bus.write(0, &[1]));
    }
}
