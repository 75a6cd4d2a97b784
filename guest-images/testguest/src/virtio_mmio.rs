//! virtio-mmio devices, driver side (virtio 1.2 §4.2.2 transport, §3.1.1
//! initialisation).
//!
//! Devices are found the way Linux finds them on a machine without a device
//! tree: from `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` words on the
//! command line (sizes and addresses as Linux's `memparse`: decimal, `0x` hex
//! or `0` octal, with an optional K, M or G suffix). Each window must be at
//! least 0x100 bytes, below 4 GiB (the boot mapping) and aligned to 4 bytes.
//! Only version 2 (non-legacy) devices are driven. Registers are accessed
//! with 32-bit volatile loads and stores; configuration space reads are
//! repeated until ConfigGeneration is stable (§4.2.2.2).

use core::fmt;

use crate::startinfo::BOOT_MAPPED_LIMIT;
use crate::virtq::Virtqueue;

/// Most devices taken from the command line.
pub const MAX_DEVICES: usize = 16;
const PARAM: &str = "virtio_mmio.device=";

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const MAGIC: u32 = u32::from_le_bytes(*b"virt");
/// Configuration reads repeated at most this often while the generation moves.
pub const CONFIG_RETRIES: u32 = 16;
const MIN_WINDOW: u64 = 0x100;

/// Device status bits (§2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest has a driver.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is ready.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// The device has hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 64;
/// The driver has given up on the device.
pub const STATUS_FAILED: u32 = 128;

/// InterruptStatus: a configuration change (or NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// A `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Base address.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// Interrupt line (I/O APIC pin).
    pub irq: u32,
}

/// The entries of a command line, and the words that could not be used.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discovered {
    windows: [Window; MAX_DEVICES],
    count: usize,
    /// Entries beyond [`MAX_DEVICES`].
    pub ignored: usize,
}

impl Discovered {
    /// Adds a window found elsewhere (the DSDT); beyond [`MAX_DEVICES`] it
    /// is counted as ignored.
    pub fn add(&mut self, w: Window) {
        if self.count < MAX_DEVICES {
            self.windows[self.count] = w;
            self.count += 1;
        } else {
            self.ignored += 1;
        }
    }

    /// The usable entries, in command-line order.
    pub fn windows(&self) -> &[Window] {
        &self.windows[..self.count]
    }
}

/// Linux's `memparse`: a number with an optional K/M/G suffix.
fn memparse(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse().ok()?
    };
    value.checked_mul(1 << shift)
}

/// Why a `virtio_mmio.device=` value is not usable.
fn parse_window(value: &str) -> Result<Window, &'static str> {
    let (size, rest) = value.split_once('@').ok_or("no '@'")?;
    let (base, irq) = rest.split_once(':').ok_or("no ':<irq>'")?;
    // An optional platform device id follows a second ':'.
    let irq = irq.split_once(':').map_or(irq, |(irq, _id)| irq);
    let size = memparse(size).ok_or("bad size")?;
    let base = memparse(base).ok_or("bad base address")?;
    let irq: u32 = irq.parse().map_err(|_| "bad irq")?;
    if size < MIN_WINDOW {
        return Err("window smaller than 0x100 bytes");
    }
    if base % 4 != 0
        || base
            .checked_add(size)
            .is_none_or(|end| end > BOOT_MAPPED_LIMIT)
    {
        return Err("window not 4-byte aligned below 4 GiB");
    }
    Ok(Window { base, size, irq })
}

/// The `virtio_mmio.device=` entries of `cmdline`; a bad one is reported
/// through `warn(word, why)` and skipped.
pub fn discover(cmdline: &str, mut warn: impl FnMut(&str, &str)) -> Discovered {
    let mut found = Discovered::default();
    for word in cmdline.split(' ').filter(|w| w.starts_with(PARAM)) {
        match parse_window(&word[PARAM.len()..]) {
            Ok(w) if found.count < MAX_DEVICES => {
                found.windows[found.count] = w;
                found.count += 1;
            }
            Ok(_) => found.ignored += 1,
            Err(why) => warn(word, why),
        }
    }
    found
}

/// Why a device cannot be driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportError {
    /// MagicValue is not "virt".
    Magic(u32),
    /// Not a version 2 (virtio 1.x) transport.
    Version(u32),
    /// DeviceID 0: an empty slot.
    NoDevice,
    /// A feature the driver needs was not offered.
    MissingFeature(u64),
    /// The device did not keep FEATURES_OK.
    FeaturesRefused,
    /// The queue does not exist or is already in use.
    QueueUnavailable(u32),
    /// The device did not read 0 after a reset.
    ResetIgnored(u32),
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Magic(v) => write!(f, "no virtio-mmio device (magic 0x{v:08x})"),
            TransportError::Version(v) => {
                write!(f, "transport version {v}, only version 2 is driven")
            }
            TransportError::NoDevice => write!(f, "device id 0 (no device)"),
            TransportError::MissingFeature(bits) => {
                write!(f, "required features 0x{bits:x} not offered")
            }
            TransportError::FeaturesRefused => write!(f, "the device refused FEATURES_OK"),
            TransportError::QueueUnavailable(q) => {
                write!(f, "queue {q} is unavailable or already live")
            }
            TransportError::ResetIgnored(s) => {
                write!(f, "status 0x{s:x} after reset, expected 0")
            }
            TransportError::NeedsReset => write!(f, "the device needs a reset"),
        }
    }
}

/// A probed virtio-mmio device.
#[derive(Debug)]
pub struct MmioDevice {
    window: Window,
    device_id: u32,
}

impl MmioDevice {
    /// Checks the registers of `window` and returns the device if it is a
    /// version 2 virtio-mmio device.
    pub fn probe(window: Window) -> Result<MmioDevice, TransportError> {
        let mut dev = MmioDevice {
            window,
            device_id: 0,
        };
        match dev.read(MAGIC_VALUE) {
            MAGIC => {}
            v => return Err(TransportError::Magic(v)),
        }
        match dev.read(VERSION) {
            2 => {}
            v => return Err(TransportError::Version(v)),
        }
        dev.device_id = dev.read(DEVICE_ID);
        if dev.device_id == 0 {
            return Err(TransportError::NoDevice);
        }
        Ok(dev)
    }

    /// DeviceID (2: block).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Reads the register at `offset`; 0 outside the window.
    fn read(&self, offset: u64) -> u32 {
        if offset + 4 > self.window.size {
            return 0;
        }
        // SAFETY: `offset` is inside the window, which `parse_window` checked
        // to be 4-aligned and below 4 GiB (identity mapped); it is device
        // memory, not RAM Rust knows of, and a 4-aligned 32-bit read is what
        // the transport defines.
        unsafe { ((self.window.base + offset) as *const u32).read_volatile() }
    }

    /// Writes the register at `offset`; nothing outside the window.
    fn write(&self, offset: u64, value: u32) {
        if offset + 4 > self.window.size {
            return;
        }
        // SAFETY: as for `read`; a 32-bit register write of the device.
        unsafe { ((self.window.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn add_status(&self, bits: u32) {
        self.write(STATUS, self.status() | bits);
    }

    /// Resets the device (status 0) and checks that it reads back 0: the
    /// device has then dropped every request and forgotten the rings.
    pub fn reset(&self) -> Result<(), TransportError> {
        self.write(STATUS, 0);
        match self.status() {
            0 => Ok(()),
            s => Err(TransportError::ResetIgnored(s)),
        }
    }

    /// Tells the device the driver gave up on it.
    pub fn fail(&self) {
        self.add_status(STATUS_FAILED);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation and FEATURES_OK
    /// (§3.1.1 steps 1-6). Accepts the offered subset of `wanted`, which must
    /// include `required`; returns the negotiated features.
    pub fn negotiate(&self, wanted: u64, required: u64) -> Result<u64, TransportError> {
        self.reset()?;
        self.add_status(STATUS_ACKNOWLEDGE);
        self.add_status(STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(DEVICE_FEATURES)) << (32 * sel);
        }
        let missing = required & !offered;
        if missing != 0 {
            self.fail();
            return Err(TransportError::MissingFeature(missing));
        }
        let accepted = offered & wanted;
        for sel in 0..2 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        self.add_status(STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.fail();
            return Err(TransportError::FeaturesRefused);
        }
        Ok(accepted)
    }

    /// QueueNumMax of queue `index` (0: no such queue).
    pub fn queue_max(&self, index: u32) -> u32 {
        self.write(QUEUE_SEL, index);
        self.read(QUEUE_NUM_MAX)
    }

    /// Gives queue `index` the rings of `queue` and marks it ready.
    pub fn setup_queue(&self, index: u32, queue: &Virtqueue<'_>) -> Result<(), TransportError> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 || self.read(QUEUE_NUM_MAX) < u32::from(queue.size()) {
            return Err(TransportError::QueueUnavailable(index));
        }
        self.write(QUEUE_NUM, u32::from(queue.size()));
        let (desc, driver, device) = queue.addresses();
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, driver),
            (QUEUE_DEVICE_LOW, device),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        Ok(())
    }

    /// DRIVER_OK (§3.1.1 step 8); fails if the device then needs a reset
    /// (e.g. it rejected the rings).
    pub fn driver_ok(&self) -> Result<(), TransportError> {
        self.add_status(STATUS_DRIVER_OK);
        if self.status() & STATUS_NEEDS_RESET != 0 {
            return Err(TransportError::NeedsReset);
        }
        Ok(())
    }

    /// Notifies queue `index` (through minivmm's ioeventfd when it has one).
    pub fn notify(&self, index: u32) {
        self.write(QUEUE_NOTIFY, index);
    }

    /// Reads and acknowledges InterruptStatus; returns the bits that were set.
    pub fn ack_interrupt(&self) -> u32 {
        let status = self.read(INTERRUPT_STATUS);
        if status != 0 {
            self.write(INTERRUPT_ACK, status);
        }
        status
    }

    /// Reads `out.len()` bytes of configuration space from `offset`, 32 bits
    /// at a time, until ConfigGeneration is the same before and after (at
    /// most [`CONFIG_RETRIES`] times; a device that keeps changing it gets the
    /// last read).
    pub fn read_config(&self, offset: u64, out: &mut [u8]) {
        for _ in 0..CONFIG_RETRIES {
            let generation = self.read(CONFIG_GENERATION);
            for (i, chunk) in out.chunks_mut(4).enumerate() {
                let word = self.read(CONFIG + offset + 4 * i as u64).to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            if self.read(CONFIG_GENERATION) == generation {
                return;
            }
        }
    }

    /// A 32-bit configuration field.
    pub fn config_u32(&self, offset: u64) -> u32 {
        let mut b = [0; 4];
        self.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// A 64-bit configuration field.
    pub fn config_u64(&self, offset: u64) -> u64 {
        let mut b = [0; 8];
        self.read_config(offset, &mut b);
        u64::from_le_bytes(b)
    }
}
