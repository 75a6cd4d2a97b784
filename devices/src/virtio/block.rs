//! virtio-blk (virtio 1.2 §5.2) over a [`DiskBackend`].
//!
//! One request queue. A request is read through the chain's cursors, never by
//! assuming one descriptor per part (1.x has no framing requirement, §2.7.4):
//! the 16-byte header is the first device-readable bytes, the status byte is
//! the last device-writable byte, and the data are the readable bytes after the
//! header (OUT) or the writable bytes before the status (IN, GET_ID). So a
//! header and its data may share a descriptor, and so may data and status.
//!
//! Policies for what the guest gets wrong (../shared/ADVERSARIAL.md §7, §11) —
//! each answered with a status byte and counted, nothing written to the disk:
//! - no writable byte for the status, or a header shorter than 16 bytes: the
//!   chain is returned with used length 0 (there is nowhere to put a status),
//!   or IOERR when a status byte exists;
//! - data not a multiple of 512 bytes, a sector range overflowing or past the
//!   capacity: IOERR;
//! - OUT data in device-writable buffers (wrong direction), or IN data in
//!   readable ones: IOERR (the device never writes a readable buffer);
//! - OUT, DISCARD and WRITE_ZEROES on a read-only disk: IOERR;
//! - an unknown type, or DISCARD/WRITE_ZEROES without the feature: UNSUPP;
//!   DISCARD with the UNMAP flag or unknown flags: UNSUPP;
//!   more segments than `max_*_seg`, or more sectors than `max_*_sectors`: IOERR;
//! - GET_ID writes min(20, buffer) bytes of the NUL-padded serial.
//!
//! - a chain holding more than a request can use — the header, SEG_MAX ×
//!   SIZE_MAX bytes of data (or the whole disk, if smaller) and the status —
//!   is refused by the queue before anything is pinned (used length 0);
//! - the used length is exactly what the device wrote: the data read (IN) or
//!   the serial (GET_ID), plus the status byte.
//!
//! Data moves between the file and guest memory with one vectored call per
//! request; the segment list is a scratch vector the device reuses, so no heap
//! allocation is sized by a guest number. One `process_queue` call serves at
//! most a batch of chains and bytes (`BATCH_CHAINS`, `BATCH_BYTES`).
//!
//! An optional [`RateLimiter`] charges each request one operation and the
//! bytes it moved (reads and writes; a refused request moves none). While it
//! refuses, no chain is taken; its timer (the device's one event source)
//! resumes the queue. A new backing file ([`DeviceUpdate::Block`]) takes
//! effect between requests; a new capacity changes the configuration space.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memory::GuestFrames;
use virtio_bindings::virtio_blk::*;
use vm_memory::GuestAddress;

use super::{
    BATCH_BYTES, BATCH_CHAINS, DescriptorChain, DeviceUpdate, EventSource, MAX_QUEUE_SIZE,
    Processed, Queue, QueueError, UpdateError, UpdateOutcome, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice,
};
use crate::disk::{DiskBackend, SECTOR_SIZE};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Request header bytes.
const HEADER_SIZE: u64 = 16;
/// Largest single data segment offered (SIZE_MAX).
const SIZE_MAX: u32 = 1 << 20;
/// Largest number of data segments (SEG_MAX): the queue minus header and status.
const SEG_MAX: u32 = MAX_QUEUE_SIZE as u32 - 2;
/// Most sectors of one DISCARD or WRITE_ZEROES segment (1 GiB).
const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// Bytes of configuration space (up to `write_zeroes_may_unmap` and padding).
const CONFIG_SIZE: usize = 60;
const QUEUE_SIZES: [u16; 1] = [MAX_QUEUE_SIZE];
/// The rate limiter's timer among the device's event sources.
const LIMITER: u32 = 0;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The serial does not fit GET_ID's 20 bytes, or is not ASCII.
    #[error("Disk serial {0:?} must be at most 20 ASCII bytes")]
    Serial(String),
    /// The rate limiter's timer could not be created.
    #[error("Cannot create the disk's rate limiter")]
    RateLimiter(#[source] std::io::Error),
}

/// How a block device is set up.
#[derive(Clone, Debug, Default)]
pub struct BlockConfig {
    /// Refuse writes (and offer VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// GET_ID's answer.
    pub serial: Option<String>,
    /// Limits on the guest's requests.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Per-device counters (shared with the VMM and tests).
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Requests by type.
    pub reads: AtomicU64,
    /// OUT requests.
    pub writes: AtomicU64,
    /// FLUSH requests.
    pub flushes: AtomicU64,
    /// GET_ID requests.
    pub get_ids: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests.
    pub zeroes: AtomicU64,
    /// Bytes read from the disk.
    pub bytes_read: AtomicU64,
    /// Bytes written to the disk.
    pub bytes_written: AtomicU64,
    /// Requests answered IOERR.
    pub ioerr: AtomicU64,
    /// Requests answered UNSUPP.
    pub unsupp: AtomicU64,
    /// Malformed chains returned by the queue.
    pub bad_chain: AtomicU64,
    /// Requests whose layout was wrong (no status, short header, directions).
    pub bad_layout: AtomicU64,
    /// Writes refused on a read-only disk.
    pub read_only_write: AtomicU64,
    /// Requests outside the disk, overflowing, or not whole sectors.
    pub out_of_range: AtomicU64,
    /// Host I/O errors.
    pub io_error: AtomicU64,
    /// Times the rate limiter held requests back.
    pub rate_limiter_throttled_events: AtomicU64,
    /// Backing files swapped while the device ran.
    pub disk_swaps: AtomicU64,
}

/// A plain copy of [`BlockMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub struct BlockMetricsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub ioerr: u64,
    pub unsupp: u64,
    pub bad_chain: u64,
    pub bad_layout: u64,
    pub read_only_write: u64,
    pub out_of_range: u64,
    pub io_error: u64,
    pub rate_limiter_throttled_events: u64,
    pub disk_swaps: u64,
}

impl BlockMetrics {
    /// The current values.
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            get_ids: g(&self.get_ids),
            zeroes: g(&self.zeroes),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            ioerr: g(&self.ioerr),
            unsupp: g(&self.unsupp),
            bad_chain: g(&self.bad_chain),
            bad_layout: g(&self.bad_layout),
            read_only_write: g(&self.read_only_write),
            out_of_range: g(&self.out_of_range),
            io_error: g(&self.io_error),
            rate_limiter_throttled_events: g(&self.rate_limiter_throttled_events),
            disk_swaps: g(&self.disk_swaps),
        }
    }
}

fn bump(counter: &AtomicU64) {
    add(counter, 1);
}

/// Adds `n` to a counter. Only the device (`&mut self`, one thread) writes
/// its counters, so a plain load and store suffice: no locked read-modify-
/// write on the request path. Readers see each value whole.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

/// What went wrong with a request, and its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Layout,
    ReadOnly,
    Range,
    Io,
    Unsupported,
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    disk: Box<dyn DiskBackend>,
    read_only: bool,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    capacity: u64,
    acked: u64,
    config: [u8; CONFIG_SIZE],
    metrics: Arc<BlockMetrics>,
    segments: Vec<(GuestAddress, usize)>,
    logged: u8,
    limiter: Option<RateLimiter>,
    sources: Vec<EventSource>,
}

impl Block {
    /// A block device on `disk`.
    pub fn new(disk: Box<dyn DiskBackend>, config: BlockConfig) -> Result<Block, BlockError> {
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        if let Some(s) = &config.serial {
            if s.len() > serial.len() || !s.is_ascii() {
                return Err(BlockError::Serial(s.clone()));
            }
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        let capacity = disk.size() / SECTOR_SIZE;
        let mut block = Block {
            disk,
            read_only: config.read_only,
            serial,
            capacity,
            acked: 0,
            config: [0; CONFIG_SIZE],
            metrics: Arc::default(),
            segments: Vec::with_capacity(usize::from(MAX_QUEUE_SIZE)),
            logged: 0,
            limiter: None,
            sources: Vec::new(),
        };
        block.config = block.build_config();
        if let Some(limits) = config.rate_limiter {
            block
                .set_rate_limiter(limits)
                .map_err(BlockError::RateLimiter)?;
        }
        Ok(block)
    }

    fn set_rate_limiter(&mut self, config: RateLimiterConfig) -> std::io::Result<()> {
        RateLimiter::apply(&mut self.limiter, config)?;
        self.sources = self
            .limiter
            .iter()
            .map(|l| EventSource {
                fd: l.timer_fd(),
                token: LIMITER,
            })
            .collect();
        Ok(())
    }

    /// The counters, shareable.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn build_config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &SEG_MAX.to_le_bytes());
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
        put(48, &MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked & (1 << bit) != 0
    }

    fn count(&self, fault: Fault) {
        let m = &self.metrics;
        match fault {
            Fault::Layout => bump(&m.bad_layout),
            Fault::ReadOnly => bump(&m.read_only_write),
            Fault::Range => bump(&m.out_of_range),
            Fault::Io => bump(&m.io_error),
            Fault::Unsupported => {}
        }
        if fault == Fault::Unsupported {
            bump(&m.unsupp);
        } else {
            bump(&m.ioerr);
        }
    }

    /// Logs the first fault of each kind: malformed requests and host I/O
    /// errors as warnings; requests that are merely refused (outside the
    /// disk, a write to a read-only disk, an unknown type: the guest gets
    /// IOERR or UNSUPP, as from a real disk) at info level.
    fn log_once(&mut self, fault: Fault, what: &str) {
        let bit = 1 << fault as u8;
        if self.logged & bit == 0 {
            self.logged |= bit;
            let level = match fault {
                Fault::Layout | Fault::Io => log::Level::Warn,
                Fault::ReadOnly | Fault::Range | Fault::Unsupported => log::Level::Info,
            };
            log::log!(
                level,
                "virtio-blk: {what} (further such requests are only counted)"
            );
        }
    }

    /// Bytes moved between the disk and guest memory so far: what a batch's
    /// byte budget counts (a refused request moves nothing).
    fn bytes_moved(&self) -> u64 {
        let m = &self.metrics;
        m.bytes_read.load(Ordering::Relaxed) + m.bytes_written.load(Ordering::Relaxed)
    }

    /// The byte offset of `len` bytes at `sector`, if inside the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Fault> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Fault::Range);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Fault::Range)?;
        let end = offset.checked_add(len).ok_or(Fault::Range)?;
        if end > self.disk.size() {
            return Err(Fault::Range);
        }
        Ok(offset)
    }

    /// Executes one request; returns the status and the bytes written before
    /// it (the used length is those plus the status byte), or `None` when
    /// there is no byte for a status.
    fn execute(&mut self, chain: &DescriptorChain, frames: &GuestFrames) -> Option<(u8, u64)> {
        let mut writer = chain.writer();
        let writable = writer.remaining();
        if writable == 0 {
            self.count(Fault::Layout);
            self.log_once(Fault::Layout, "request without a writable status byte");
            return None;
        }
        let data_in = writable - 1;
        let mut reader = chain.reader();
        let mut header = [0u8; HEADER_SIZE as usize];
        if reader.read_exact(frames, &mut header).is_err() {
            self.count(Fault::Layout);
            self.log_once(Fault::Layout, "request header shorter than 16 bytes");
            return Some((VIRTIO_BLK_S_IOERR as u8, 0));
        }
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        // Bytes written into the data buffers (IN, GET_ID).
        let mut written = 0;
        let result = match kind {
            VIRTIO_BLK_T_IN => self.read(
                frames,
                &mut writer,
                sector,
                data_in,
                reader.remaining(),
                &mut written,
            ),
            VIRTIO_BLK_T_OUT => self.write(frames, &mut reader, sector, data_in),
            VIRTIO_BLK_T_FLUSH => {
                bump(&self.metrics.flushes);
                self.disk.flush().map_err(|_| Fault::Io)
            }
            VIRTIO_BLK_T_GET_ID => {
                bump(&self.metrics.get_ids);
                let n = data_in.min(self.serial.len() as u64) as usize;
                let serial = self.serial;
                written = n as u64;
                writer
                    .write_all(frames, &serial[..n])
                    .map_err(|_| Fault::Layout)
            }
            VIRTIO_BLK_T_DISCARD if self.acked(VIRTIO_BLK_F_DISCARD) => {
                self.zeroes(frames, &mut reader, data_in, true)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.acked(VIRTIO_BLK_F_WRITE_ZEROES) => {
                self.zeroes(frames, &mut reader, data_in, false)
            }
            _ => Err(Fault::Unsupported),
        };
        let status = match result {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(fault) => {
                self.count(fault);
                let what = match fault {
                    Fault::Layout => "request with a wrong buffer layout or direction",
                    Fault::ReadOnly => "write to a read-only disk",
                    Fault::Range => "request outside the disk or not whole sectors",
                    Fault::Io => "host I/O error",
                    Fault::Unsupported => "unsupported request type",
                };
                self.log_once(fault, what);
                if fault == Fault::Unsupported {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
        };
        Some((status as u8, written))
    }

    fn read(
        &mut self,
        frames: &GuestFrames,
        writer: &mut super::Writer<'_>,
        sector: u64,
        len: u64,
        readable_left: u64,
        written: &mut u64,
    ) -> Result<(), Fault> {
        bump(&self.metrics.reads);
        if readable_left != 0 {
            return Err(Fault::Layout); // IN data offered in readable buffers
        }
        let offset = self.range(sector, len)?;
        self.segments.clear();
        writer
            .take_segments(len, &mut self.segments)
            .map_err(|_| Fault::Layout)?;
        let n = self
            .disk
            .read_at(frames, offset, &self.segments)
            .map_err(|_| Fault::Io)?;
        *written = n as u64;
        add(&self.metrics.bytes_read, n as u64);
        if (n as u64) < len {
            Err(Fault::Io)
        } else {
            Ok(())
        }
    }

    fn write(
        &mut self,
        frames: &GuestFrames,
        reader: &mut super::Reader<'_>,
        sector: u64,
        writable_data: u64,
    ) -> Result<(), Fault> {
        bump(&self.metrics.writes);
        if self.read_only {
            return Err(Fault::ReadOnly);
        }
        if writable_data != 0 {
            return Err(Fault::Layout); // OUT data in device-writable buffers
        }
        let len = reader.remaining();
        let offset = self.range(sector, len)?;
        self.segments.clear();
        reader
            .take_segments(len, &mut self.segments)
            .map_err(|_| Fault::Layout)?;
        let n = self
            .disk
            .write_at(frames, offset, &self.segments)
            .map_err(|_| Fault::Io)?;
        add(&self.metrics.bytes_written, n as u64);
        if (n as u64) < len {
            Err(Fault::Io)
        } else {
            Ok(())
        }
    }

    /// DISCARD (`discard`) or WRITE_ZEROES: one 16-byte segment.
    fn zeroes(
        &mut self,
        frames: &GuestFrames,
        reader: &mut super::Reader<'_>,
        writable_data: u64,
        discard: bool,
    ) -> Result<(), Fault> {
        bump(&self.metrics.zeroes);
        if self.read_only {
            return Err(Fault::ReadOnly);
        }
        if writable_data != 0 || reader.remaining() != 16 {
            // Zero or several segments (max_*_seg is 1), or a partial one.
            return Err(Fault::Layout);
        }
        let mut seg = [0u8; 16];
        reader
            .read_exact(frames, &mut seg)
            .map_err(|_| Fault::Layout)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(Fault::Unsupported);
        }
        if sectors > MAX_ZERO_SECTORS {
            return Err(Fault::Range);
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = self.range(sector, len)?;
        if len == 0 {
            return Ok(());
        }
        let done = if discard {
            self.disk.discard(offset, len)
        } else {
            self.disk.write_zeroes(offset, len)
        };
        done.map_err(|_| Fault::Io)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        .iter()
        .fold(0u64, |f, &b| f | (1 << b));
        // GET_ID has no feature bit in virtio 1.2; it is always answered.
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        }
        bits
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|at| self.config.get(usize::try_from(at).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the configuration is writable (no CONFIG_WCE).
    }

    fn chain_limit(&self, _index: usize) -> u64 {
        // Header, the most data one request can move, status.
        let data = (u64::from(SEG_MAX) * u64::from(SIZE_MAX))
            .min(self.disk.size())
            .max(u64::from(VIRTIO_BLK_ID_BYTES));
        HEADER_SIZE + data + 1
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        let (mut chains, mut bytes) = (0, 0);
        loop {
            if chains >= BATCH_CHAINS || bytes >= BATCH_BYTES {
                done.more = queue.has_available(frames)?;
                return Ok(done);
            }
            let throttled = &self.metrics.rate_limiter_throttled_events;
            if !rate_limiter::allows_next(&mut self.limiter, throttled, queue, frames)? {
                return Ok(done);
            }
            chains += 1;
            let chain = match queue.pop(frames) {
                Ok(Some(chain)) => chain,
                Ok(None) => return Ok(done),
                Err(QueueError::BadChain { .. }) => {
                    bump(&self.metrics.bad_chain);
                    done.used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let moved = self.bytes_moved();
            let result = self.execute(&chain, frames);
            let request_bytes = self.bytes_moved() - moved;
            bytes += request_bytes;
            rate_limiter::charge(&mut self.limiter, request_bytes);
            let len = match result {
                Some((status, written)) => {
                    // The status is the last writable byte (there is one).
                    let _ = chain.write_last_u8(frames, status);
                    u32::try_from(written + 1).unwrap_or(u32::MAX)
                }
                None => 0,
            };
            queue.add_used(frames, chain, len)?;
            done.used = true;
        }
    }

    fn event_sources(&self) -> &[EventSource] {
        &self.sources
    }

    fn process_event(
        &mut self,
        token: u32,
        queues: &mut [Queue],
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        let fired = token == LIMITER && rate_limiter::fired(&mut self.limiter);
        match queues.first_mut() {
            Some(queue) if fired && queue.is_active() => {
                let done = self.process_queue(0, queue, frames)?;
                // No notification re-arms the queue: the timer does.
                rate_limiter::continue_soon(&mut self.limiter, done);
                Ok(done)
            }
            _ => Ok(Processed::default()),
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
    }

    fn update(&mut self, update: DeviceUpdate) -> Result<UpdateOutcome, UpdateError> {
        let DeviceUpdate::Block { disk, rate_limiter } = update else {
            return Err(UpdateError::WrongDevice("block"));
        };
        if let Some(limits) = rate_limiter {
            self.set_rate_limiter(limits).map_err(UpdateError::Timer)?;
        }
        let mut outcome = UpdateOutcome::default();
        if let Some(disk) = disk {
            self.disk = disk;
            bump(&self.metrics.disk_swaps);
            let capacity = self.disk.size() / SECTOR_SIZE;
            if capacity != self.capacity {
                self.capacity = capacity;
                self.config = self.build_config();
                outcome.config_changed = true;
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
