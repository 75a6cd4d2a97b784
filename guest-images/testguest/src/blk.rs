//! virtio-blk driver (virtio 1.2 §5.2) and the block self-test.
//!
//! One request queue of up to 128 entries. A request is a chain of a 16-byte
//! header (ToDevice), the data segments (ToDevice for writes, FromDevice for
//! reads; at most SEG_MAX of at most SIZE_MAX bytes each) and a status byte
//! (FromDevice). The driver submits, notifies if the device asks for it, and
//! sleeps until the device's interrupt (or a watchdog of [`TIMEOUT_MS`]).
//!
//! The self-test (`testguest.blk=read|write|none`, default `read`) works on
//! each block device in turn; see the README for the lines it prints. Write
//! data is `pattern(sector, i)`, which tests/tests/block.rs reproduces on the
//! host. The guest's CPU work is kept small (it is emulated here): few, large
//! requests.

use core::fmt::{self, Write};

use crate::dma::{
    Bidirectional, CpuReads, DmaBuf, DmaError, DmaPool, FromDevice, Segment, Streaming, ToDevice,
};
use crate::irq::{self, Line};
use crate::log;
use crate::virtio_mmio::{
    F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, INT_CONFIG, MmioDevice, STATUS_NEEDS_RESET,
    TransportError,
};
use crate::virtq::{MAX_SEGMENTS, QueueError, SegmentList, Virtqueue};

/// DeviceID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
const SECTOR: usize = 512;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
/// Everything the driver can use.
const WANTED: u64 = F_VERSION_1
    | F_EVENT_IDX
    | F_INDIRECT_DESC
    | F_SIZE_MAX
    | F_SEG_MAX
    | F_RO
    | F_BLK_SIZE
    | F_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Queue entries the driver asks for: room for a burst of [`BURST`] requests
/// of three descriptors each.
const QUEUE_SIZE: u16 = 128;
/// Reads in flight at once in the burst check.
pub const BURST: usize = 32;
/// Sectors read and checksummed from the start of each disk.
pub const READ_SECTORS: u64 = 64;
/// Watchdog per request.
pub const TIMEOUT_MS: u64 = 20_000;
/// Sectors 0..=9 and the last one are used by the write test.
const WRITE_TEST_MIN_SECTORS: u64 = 11;
/// The sector written across the snapshot point (`testguest.snapshot`).
pub const ACROSS_SECTOR: u64 = 10;
/// How long the write across the snapshot point waits to be served before
/// the driver notifies.
const UNNOTIFIED_MS: u64 = 1000;
/// What read-back buffers hold before the device writes them.
const POISON: u8 = 0xa5;
/// Length of a GET_ID answer.
const ID_LEN: usize = 20;

/// What the self-test does with each block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Set the device up and report it; no I/O.
    None,
    /// Read-only checks: checksum, read past the end, GET_ID.
    #[default]
    Read,
    /// Also write, flush and read back (on a writable disk), or expect the
    /// write to fail (on a read-only one).
    Write,
}

/// The byte the write test puts at offset `i` of `sector`.
pub fn pattern(sector: u64, i: usize) -> u8 {
    (sector as u8).wrapping_mul(31) ^ (i as u8) ^ ((i >> 8) as u8) ^ 0x5a
}

/// FNV-1a, 64 bit.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// Why a request or a check failed.
#[derive(Clone, Copy, Debug)]
pub enum BlkError {
    /// Transport setup.
    Transport(TransportError),
    /// The virtqueue.
    Queue(QueueError),
    /// DMA memory.
    Dma(DmaError),
    /// The interrupt controller.
    Irq(irq::IrqError),
    /// No completion within [`TIMEOUT_MS`].
    Timeout {
        /// Request type.
        kind: u32,
        /// First sector.
        sector: u64,
    },
    /// A status other than the one expected.
    Status {
        /// What was done.
        what: &'static str,
        /// Status the device returned.
        status: u8,
        /// Status expected.
        expected: u8,
    },
    /// The used length does not match what the device wrote.
    UsedLength {
        /// What was done.
        what: &'static str,
        /// Used length reported.
        used: u32,
        /// Expected.
        expected: u32,
    },
    /// A request completed more than once (a second used entry).
    Twice,
    /// Read-back data differs.
    Mismatch {
        /// Sector.
        sector: u64,
        /// Byte in the sector.
        offset: usize,
        /// Read.
        found: u8,
        /// Written.
        expected: u8,
    },
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Transport(e) => write!(f, "{e}"),
            BlkError::Queue(e) => write!(f, "virtqueue: {e}"),
            BlkError::Dma(e) => write!(f, "{e}"),
            BlkError::Irq(e) => write!(f, "{e}"),
            BlkError::Timeout { kind, sector } => write!(
                f,
                "request type {kind} sector {sector}: no completion within {TIMEOUT_MS} ms"
            ),
            BlkError::Status {
                what,
                status,
                expected,
            } => write!(
                f,
                "{what}: status {} ({status}), expected {}",
                status_name(*status),
                status_name(*expected)
            ),
            BlkError::UsedLength {
                what,
                used,
                expected,
            } => write!(f, "{what}: used length {used}, expected {expected}"),
            BlkError::Twice => write!(f, "a request completed twice"),
            BlkError::Mismatch {
                sector,
                offset,
                found,
                expected,
            } => write!(
                f,
                "sector {sector} byte {offset} is 0x{found:02x}, expected 0x{expected:02x}"
            ),
        }
    }
}

impl From<TransportError> for BlkError {
    fn from(e: TransportError) -> Self {
        BlkError::Transport(e)
    }
}
impl From<QueueError> for BlkError {
    fn from(e: QueueError) -> Self {
        BlkError::Queue(e)
    }
}
impl From<DmaError> for BlkError {
    fn from(e: DmaError) -> Self {
        BlkError::Dma(e)
    }
}
impl From<irq::IrqError> for BlkError {
    fn from(e: irq::IrqError) -> Self {
        BlkError::Irq(e)
    }
}

fn status_name(status: u8) -> &'static str {
    match status {
        S_OK => "OK",
        S_IOERR => "IOERR",
        S_UNSUPP => "UNSUPP",
        _ => "invalid",
    }
}

/// A block device that passed initialisation.
#[derive(Debug)]
pub struct Blk<'p> {
    n: usize,
    pool: &'p DmaPool,
    dev: MmioDevice,
    queue: Virtqueue<'p>,
    line: Line,
    header: DmaBuf<'p, ToDevice>,
    status: DmaBuf<'p, FromDevice>,
    features: u64,
    capacity: u64,
    seg_max: usize,
    size_max: usize,
    /// The device served the last request across a snapshot point without
    /// its notification ([`Blk::request_across`]).
    served_unnotified: bool,
}

impl<'p> Blk<'p> {
    /// Initialises device `n` (§3.1.1): features, queue 0, DRIVER_OK.
    pub fn init(
        n: usize,
        dev: MmioDevice,
        pool: &'p DmaPool,
        line: Line,
    ) -> Result<Blk<'p>, BlkError> {
        let features = dev.negotiate(WANTED, F_VERSION_1)?;
        let max = dev.queue_max(0);
        if max == 0 {
            dev.fail();
            return Err(TransportError::QueueUnavailable(0).into());
        }
        // The largest power of two within both limits.
        let size = 1u16 << (u32::from(QUEUE_SIZE).min(max).ilog2());
        let queue = Virtqueue::new(
            pool,
            size,
            features & F_EVENT_IDX != 0,
            features & F_INDIRECT_DESC != 0,
        )?;
        dev.setup_queue(0, &queue)?;
        let capacity = dev.config_u64(0);
        let size_max = if features & F_SIZE_MAX != 0 {
            dev.config_u32(8) as usize
        } else {
            usize::MAX
        };
        let seg_max = if features & F_SEG_MAX != 0 {
            dev.config_u32(12) as usize
        } else {
            MAX_SEGMENTS
        };
        let header = pool.alloc(16)?;
        let status = pool.alloc(1)?;
        dev.driver_ok()?;
        Ok(Blk {
            n,
            pool,
            dev,
            queue,
            line,
            header,
            status,
            features,
            capacity,
            // Header and status take two of the chain's segments.
            seg_max: seg_max.clamp(1, MAX_SEGMENTS - 2),
            // Whole sectors, at least one.
            size_max: (size_max & !(SECTOR - 1)).max(SECTOR),
            served_unnotified: false,
        })
    }

    /// Runs one request with `data` between header and status and waits for
    /// it; returns the status byte and the used length.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[Segment<'_>],
    ) -> Result<(u8, u32), BlkError> {
        self.request_across(kind, sector, data, None)
    }

    /// As [`Blk::request`]; with `between` (the snapshot point), the request
    /// is made available but not notified, `between` runs, and the driver
    /// waits up to [`UNNOTIFIED_MS`] for the device to serve it anyway (a
    /// restored VM's device does: restore kicks every queue) before it
    /// notifies. `served_unnotified` says which happened.
    fn request_across(
        &mut self,
        kind: u32,
        sector: u64,
        data: &[Segment<'_>],
        between: Option<&mut dyn FnMut()>,
    ) -> Result<(u8, u32), BlkError> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.header.write_at(0, &header)?;
        self.header.sync_to_device();
        let interrupts = self.line.count();
        let head = {
            let h = self.header.whole()?;
            let s = self.status.whole()?;
            self.queue.submit(&[&[h], data, &[s]])?
        };
        match between {
            None => {
                if self.queue.should_notify() {
                    self.dev.notify(0);
                }
            }
            Some(between) => {
                between();
                let (queue, line) = (&self.queue, &self.line);
                let served = irq::wait_until(UNNOTIFIED_MS, || {
                    queue.has_used() && line.count() > interrupts
                });
                self.served_unnotified = served.is_ok();
                if served.is_err() {
                    self.dev.notify(0);
                }
            }
        }
        let used = loop {
            // The driver asks for an interrupt on every completion: wait for
            // it too, so it never lands in a later request's count.
            if self.line.count() > interrupts
                && let Some(used) = self.queue.take_completion(head)?
            {
                break used;
            }
            let (queue, line) = (&self.queue, &self.line);
            irq::wait_until(TIMEOUT_MS, || queue.has_used() && line.count() > interrupts)
                .map_err(|_| BlkError::Timeout { kind, sector })?;
            if self.dev.ack_interrupt() & INT_CONFIG != 0
                && self.dev.status() & STATUS_NEEDS_RESET != 0
            {
                return Err(TransportError::NeedsReset.into());
            }
        };
        self.status.sync_from_device()?;
        let mut status = [0u8];
        self.status.read_at(0, &mut status)?;
        Ok((status[0], used))
    }

    /// The first `len` bytes of `buf` as segments of at most SIZE_MAX bytes,
    /// at most SEG_MAX of them.
    fn split<'b, D: Streaming>(
        &self,
        buf: &'b DmaBuf<'p, D>,
        len: usize,
        list: &mut SegmentList<'b>,
    ) -> Result<(), BlkError> {
        let mut offset = 0;
        while offset < len {
            if list.len() == self.seg_max {
                return Err(QueueError::SegmentCount(list.len() + 1).into());
            }
            let chunk = (len - offset).min(self.size_max);
            list.push(buf.segment(offset, chunk)?)?;
            offset += chunk;
        }
        Ok(())
    }

    /// Reads `sectors` sectors from `sector` into `buf`; returns the status
    /// and used length. `buf` is synced for the CPU afterwards.
    fn read<D: CpuReads + Streaming>(
        &mut self,
        sector: u64,
        sectors: usize,
        buf: &mut DmaBuf<'p, D>,
    ) -> Result<(u8, u32), BlkError> {
        let mut list = SegmentList::new();
        self.split(buf, sectors * SECTOR, &mut list)?;
        let result = self.request(T_IN, sector, list.as_slice());
        drop(list);
        let result = result?;
        buf.sync_from_device()?;
        Ok(result)
    }

    fn expect(&mut self, what: &'static str, got: (u8, u32), expected: u8) -> Result<(), BlkError> {
        if got.0 != expected {
            return Err(BlkError::Status {
                what,
                status: got.0,
                expected,
            });
        }
        Ok(())
    }

    fn say(&self, args: fmt::Arguments<'_>) {
        log!("blk{}: {args}", self.n);
    }
}

impl Drop for Blk<'_> {
    /// Resets the device before the rings and buffers go back to the pool, so
    /// it holds no reference to them; requests it never completed are then
    /// given up.
    fn drop(&mut self) {
        if let Err(e) = self.dev.reset() {
            log!("blk{}: reset: {e}", self.n);
        }
        self.queue.reclaim_after_reset();
    }
}

/// Bytes shown as a quoted string: printable ASCII as is, others as `\xNN`.
struct Escaped<'a>(&'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            match b {
                b'"' | b'\\' => write!(f, "\\{}", b as char)?,
                0x20..=0x7e => f.write_char(b as char)?,
                _ => write!(f, "\\x{b:02x}")?,
            }
        }
        Ok(())
    }
}

impl<'p> Blk<'p> {
    /// Reads sectors `0..BURST` as `BURST` one-sector requests submitted at
    /// once, with one notification decision and `used_event` set for the last
    /// of them; returns the FNV-1a of the data and the notifications and
    /// interrupts the burst took. Three buffers serve all requests (headers,
    /// data and statuses each at their own offsets).
    fn burst(&mut self) -> Result<(u64, u64, u64), BlkError> {
        let pool = self.pool;
        let mut headers = pool.alloc::<ToDevice>(16 * BURST)?;
        for i in 0..BURST {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&T_IN.to_le_bytes());
            h[8..].copy_from_slice(&(i as u64).to_le_bytes());
            headers.write_at(16 * i, &h)?;
        }
        headers.sync_to_device();
        let mut data = pool.alloc::<FromDevice>(BURST * SECTOR)?;
        let mut statuses = pool.alloc::<FromDevice>(BURST)?;
        let (notified, interrupted) = (self.queue.stats().notifications, self.line.count());
        let mut heads = [0u16; BURST];
        for (i, head) in heads.iter_mut().enumerate() {
            let h = headers.segment(16 * i, 16)?;
            let d = data.segment(i * SECTOR, SECTOR)?;
            let s = statuses.segment(i, 1)?;
            *head = self.queue.submit(&[&[h], &[d], &[s]])?;
        }
        self.queue.interrupt_after(BURST as u16);
        if self.queue.should_notify() {
            self.dev.notify(0);
        }
        let (queue, line) = (&self.queue, &self.line);
        irq::wait_until(TIMEOUT_MS, || {
            usize::from(queue.used_pending()) >= BURST && line.count() > interrupted
        })
        .map_err(
            |_| BlkError::Timeout {
                kind: T_IN,
                sector: 0,
            },
        )?;
        if self.dev.ack_interrupt() & INT_CONFIG != 0 && self.dev.status() & STATUS_NEEDS_RESET != 0
        {
            return Err(TransportError::NeedsReset.into());
        }
        for head in heads {
            let used = self
                .queue
                .take_completion(head)?
                .ok_or(BlkError::Timeout {
                    kind: T_IN,
                    sector: 0,
                })?;
            self.expect_used("burst read", used, SECTOR + 1)?;
        }
        let notifications = self.queue.stats().notifications - notified;
        let interrupts = self.line.count() - interrupted;
        statuses.sync_from_device()?;
        let mut status = [0u8; BURST];
        statuses.read_at(0, &mut status)?;
        if let Some(&bad) = status.iter().find(|&&b| b != S_OK) {
            return Err(BlkError::Status {
                what: "burst read",
                status: bad,
                expected: S_OK,
            });
        }
        data.sync_from_device()?;
        let sum = data.fold(0, BURST * SECTOR, FNV_OFFSET, |h, _, b| {
            (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        })?;
        Ok((sum, notifications, interrupts))
    }

    /// The serial from GET_ID: up to 20 bytes, cut at the first NUL; empty
    /// when the device answers UNSUPP.
    fn get_id(&mut self, out: &mut [u8; ID_LEN]) -> Result<usize, BlkError> {
        let mut buf = self.pool.alloc::<FromDevice>(ID_LEN)?;
        let result = {
            let seg = buf.whole()?;
            self.request(T_GET_ID, 0, &[seg])?
        };
        if result.0 == S_UNSUPP {
            return Ok(0);
        }
        self.expect("GET_ID", result, S_OK)?;
        buf.sync_from_device()?;
        buf.read_at(0, out)?;
        Ok(out.iter().position(|&b| b == 0).unwrap_or(ID_LEN))
    }

    fn expect_used(&self, what: &'static str, used: u32, expected: usize) -> Result<(), BlkError> {
        if used as usize != expected {
            return Err(BlkError::UsedLength {
                what,
                used,
                expected: expected as u32,
            });
        }
        Ok(())
    }

    /// A ToDevice buffer of `sectors` sectors holding the pattern of the
    /// sectors from `first`.
    fn pattern_buffer(&self, first: u64, sectors: usize) -> Result<DmaBuf<'p, ToDevice>, BlkError> {
        let mut buf = self.pool.alloc::<ToDevice>(sectors * SECTOR)?;
        buf.fill(0, sectors * SECTOR, |off| {
            pattern(first + (off / SECTOR) as u64, off % SECTOR)
        })?;
        buf.sync_to_device();
        Ok(buf)
    }

    /// Reads `sectors` sectors from `first` into a poisoned buffer and
    /// checks they hold the pattern.
    fn read_back(&mut self, first: u64, sectors: usize) -> Result<(), BlkError> {
        // Poisoned first, so every byte compared is one the device wrote.
        let mut buf = self.pool.alloc::<Bidirectional>(sectors * SECTOR)?;
        buf.fill(0, sectors * SECTOR, |_| POISON)?;
        buf.sync_to_device();
        let result = self.read(first, sectors, &mut buf)?;
        self.expect("read back", result, S_OK)?;
        let mismatch = buf.fold(0, sectors * SECTOR, None, |found, off, b| {
            found.or_else(|| {
                let sector = first + (off / SECTOR) as u64;
                let expected = pattern(sector, off % SECTOR);
                (b != expected).then_some(BlkError::Mismatch {
                    sector,
                    offset: off % SECTOR,
                    found: b,
                    expected,
                })
            })
        })?;
        match mismatch {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The snapshot point with a write in flight across it: a write of
    /// sector [`ACROSS_SECTOR`] is made available (not notified), `point`
    /// runs, and the request must then complete exactly once with the data
    /// on disk: served by a restored device without a notification, or by
    /// the original after the driver's.
    fn write_across(&mut self, point: &mut dyn FnMut()) -> Result<(), BlkError> {
        let data = self.pattern_buffer(ACROSS_SECTOR, 1)?;
        let result = self.request_across(T_OUT, ACROSS_SECTOR, &[data.whole()?], Some(point))?;
        self.expect("write across the snapshot", result, S_OK)?;
        if self.queue.has_used() {
            return Err(BlkError::Twice);
        }
        let when = if self.served_unnotified {
            "served without a notification"
        } else {
            "served after its notification"
        };
        self.read_back(ACROSS_SECTOR, 1)?;
        self.say(format_args!(
            "write sector {ACROSS_SECTOR} across the snapshot: ok, completed once ({when})"
        ));
        Ok(())
    }

    fn run(&mut self, mode: Mode, point: Option<&mut dyn FnMut()>) -> Result<(), BlkError> {
        let ro = self.features & F_RO != 0;
        let mut id = [0u8; ID_LEN];
        let id_len = self.get_id(&mut id)?;
        self.say(format_args!(
            "capacity {} sectors, {}, id \"{}\"",
            self.capacity,
            if ro { "ro" } else { "rw" },
            Escaped(&id[..id_len])
        ));
        self.say(format_args!(
            "features 0x{:x}, queue {}, seg_max {}, size_max {}",
            self.features,
            self.queue.size(),
            self.seg_max,
            self.size_max
        ));
        if mode == Mode::None {
            return Ok(());
        }
        let pool = self.pool;

        let sectors = READ_SECTORS.min(self.capacity) as usize;
        if sectors > 0 {
            let mut buf = pool.alloc::<FromDevice>(sectors * SECTOR)?;
            let result = self.read(0, sectors, &mut buf)?;
            self.expect("read", result, S_OK)?;
            self.expect_used("read", result.1, sectors * SECTOR + 1)?;
            let sum = buf.fold(0, sectors * SECTOR, FNV_OFFSET, |h, _, b| {
                (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
            })?;
            self.say(format_args!(
                "read sectors 0..{sectors}: fnv1a64=0x{sum:016x}"
            ));
        }

        let mut one = pool.alloc::<FromDevice>(SECTOR)?;
        let result = self.read(self.capacity, 1, &mut one)?;
        self.expect("read past end", result, S_IOERR)?;
        self.say(format_args!("read past end: IOERR (expected)"));

        if self.capacity >= BURST as u64 && usize::from(self.queue.size()) >= 3 * BURST {
            let (sum, notifications, interrupts) = self.burst()?;
            self.say(format_args!(
                "burst {BURST} reads in flight: ok, fnv1a64=0x{sum:016x}, notifications {notifications}, interrupts {interrupts}"
            ));
        }

        if mode != Mode::Write {
            return Ok(());
        }
        if ro {
            let data = self.pattern_buffer(1, 1)?;
            let result = self.request(T_OUT, 1, &[data.whole()?])?;
            self.expect("write on read-only disk", result, S_IOERR)?;
            self.say(format_args!("write on read-only disk: IOERR (expected)"));
            return Ok(());
        }
        if self.capacity < WRITE_TEST_MIN_SECTORS {
            self.say(format_args!(
                "write: skipped (capacity {} < {WRITE_TEST_MIN_SECTORS} sectors)",
                self.capacity
            ));
            return Ok(());
        }
        let last = self.capacity - 1;
        for (sector, parts) in [(1, &[1usize][..]), (2, &[1, 3, 4][..]), (last, &[1][..])] {
            let mut bufs: [Option<DmaBuf<'p, ToDevice>>; 3] = [None, None, None];
            let mut first = sector;
            for (slot, &n) in bufs.iter_mut().zip(parts) {
                *slot = Some(self.pattern_buffer(first, n)?);
                first += n as u64;
            }
            let mut list = SegmentList::new();
            for b in bufs.iter().flatten() {
                list.push(b.whole()?)?;
            }
            let result = self.request(T_OUT, sector, list.as_slice())?;
            self.expect("write", result, S_OK)?;
            self.expect_used("write", result.1, 1)?;
            let count: usize = parts.iter().sum();
            self.say(format_args!(
                "write sector {sector} count {count} segments {}: ok",
                parts.len()
            ));
        }

        if self.features & F_FLUSH != 0 {
            let result = self.request(T_FLUSH, 0, &[])?;
            self.expect("flush", result, S_OK)?;
            self.say(format_args!("flush: ok"));
        } else {
            self.say(format_args!("flush: not offered"));
        }

        for (first, sectors) in [(1u64, 9usize), (last, 1)] {
            self.read_back(first, sectors)?;
        }
        self.say(format_args!("read back: ok"));
        match point {
            Some(point) => self.write_across(point),
            None => Ok(()),
        }
    }
}

/// Runs the block self-test on device `n` (already probed as a block device,
/// its interrupt routed to `line`); prints its lines and returns whether it
/// passed. The device is reset at the end.
/// `point`, if given, is the snapshot point: run with a write in flight
/// (write mode on a writable disk) or, if the test never gets there, not
/// at all (the caller runs it then).
pub fn selftest(
    n: usize,
    dev: MmioDevice,
    pool: &DmaPool,
    line: Line,
    mode: Mode,
    point: Option<&mut dyn FnMut()>,
) -> bool {
    let mut blk = match Blk::init(n, dev, pool, line) {
        Ok(blk) => blk,
        Err(e) => {
            log!("blk{n}: FAIL {e}");
            return false;
        }
    };
    let result = blk.run(mode, point);
    let stats = blk.queue.stats();
    blk.say(format_args!(
        "requests {}, interrupts {}, notifications {} (suppressed {}), indirect {}",
        stats.submitted,
        blk.line.count(),
        stats.notifications,
        stats.suppressed,
        stats.indirect
    ));
    match result {
        Ok(()) => {
            blk.say(format_args!("PASS"));
            true
        }
        Err(e) => {
            blk.say(format_args!("FAIL {e}"));
            false
        }
    }
}
