//! Target `virtio_mmio`: register accesses against the virtio-mmio transport
//! (virtio 1.2 §4.2.2) with a block device on a small disk behind it.
//!
//! Input: a u16 count of operations, then the operations, then a memory image
//! copied to address 0 of 256 KiB of RAM (where the driver's rings and
//! buffers would be). Each operation is a kind byte, an offset (u16, any
//! value up to 0x1ff, config space included), a width byte and a u32 value:
//! kind % 4 = 0 write, 1 read, 2 notify through `process_queue` (the
//! ioeventfd path), 3 a write of the raw width (1, 2, 3, 4 or 8 bytes).
//!
//! Checks: no panic; the status never holds bits the driver cannot have
//! reached; a notification changes guest memory only inside the active
//! queue's used ring or a buffer some descriptor (direct or in an indirect
//! table) marks device-writable; a final reset leaves no pin and the device
//! in its initial state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::bus::BusDevice;
use devices::disk::RawFile;
use devices::virtio::Interrupt;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::MmioTransport;
use memory::GuestFrames;
use vm_memory::{Bytes, GuestAddress};

use crate::common::{
    GUEST_RAM, Input, TempFile, assert_writes_within, guest, pins, snapshot, temp_path,
};

const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// QueueNotify offset.
const QUEUE_NOTIFY: u64 = 0x50;

const DISK_BYTES: u64 = 64 << 10;
const MAX_OPS: u16 = 4096;
/// Status register offset.
const STATUS: u64 = 0x70;
/// Bits a status can hold: the four steps, FAILED, NEEDS_RESET.
const STATUS_BITS: u32 = 1 | 2 | 4 | 8 | 64 | 128;

#[derive(Debug, Default)]
struct CountingInterrupt(AtomicU64);

impl Interrupt for CountingInterrupt {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// `(addr, len, flags)` of descriptor `i` of the table at `table`.
fn descriptor(frames: &GuestFrames, table: u64, i: u64) -> Option<(u64, u32, u16)> {
    let mut raw = [0u8; 16];
    frames
        .memory()
        .read_slice(&mut raw, GuestAddress(table.checked_add(16 * i)?))
        .ok()?;
    Some((
        u64::from_le_bytes(raw[0..8].try_into().ok()?),
        u32::from_le_bytes(raw[8..12].try_into().ok()?),
        u16::from_le_bytes([raw[12], raw[13]]),
    ))
}

/// Where the device may write while serving queue 0: its used ring and every
/// buffer a descriptor marks device-writable (an over-approximation of the
/// chains it can accept).
fn writable_ranges(t: &MmioTransport, frames: &GuestFrames) -> Vec<(u64, u64)> {
    let Some(q) = t.queue(0).filter(|q| q.is_active()) else {
        return Vec::new();
    };
    let size = u64::from(q.size());
    let mut out = vec![(q.used_ring().0, 6 + 8 * size)];
    for i in 0..size {
        let Some((addr, len, flags)) = descriptor(frames, q.desc_table().0, i) else {
            continue;
        };
        if flags & DESC_F_WRITE != 0 {
            out.push((addr, u64::from(len)));
        }
        if flags & DESC_F_INDIRECT != 0 {
            for j in 0..(u64::from(len) / 16).min(size) {
                if let Some((a, l, f)) = descriptor(frames, addr, j)
                    && f & DESC_F_WRITE != 0
                {
                    out.push((a, u64::from(l)));
                }
            }
        }
    }
    out
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let count = input.u16().min(MAX_OPS);
    let ops = input.bytes(usize::from(count) * 8);
    let frames = Arc::new(guest(GUEST_RAM, input.rest()));

    let path = TempFile(temp_path("mmio.img"));
    let file = std::fs::File::create(&path.0).expect("temp disk");
    file.set_len(DISK_BYTES).expect("temp disk size");
    drop(file);
    let disk = RawFile::open(&path.0, false).expect("temp disk opens");
    let block = Block::new(Box::new(disk), BlockConfig::default()).expect("valid config");
    let irq = Arc::new(CountingInterrupt::default());
    let mut t = MmioTransport::new(Box::new(block), frames.clone(), irq);

    let mut ops = Input::new(ops);
    while !ops.is_empty() {
        let kind = ops.u8() % 4;
        let offset = u64::from(ops.u16() % 0x200);
        let width = ops.u8();
        let value = ops.u32();
        // A notification, however it arrives, is when the device writes RAM.
        let notify = kind == 2 || (kind == 0 && offset == QUEUE_NOTIFY);
        let before = notify.then(|| (snapshot(&frames, GUEST_RAM), writable_ranges(&t, &frames)));
        match kind {
            0 => t.write(offset, &value.to_le_bytes()),
            1 => {
                let mut b = [0u8; 8];
                let n = [1, 2, 4, 8][usize::from(width % 4)];
                t.read(offset, &mut b[..n]);
            }
            2 => {
                let _ = t.process_queue(usize::from(width % 2));
            }
            _ => {
                let wide = u64::from(value) | (u64::from(value) << 32);
                let n = [1, 2, 3, 4, 8][usize::from(width % 5)];
                t.write(offset, &wide.to_le_bytes()[..n]);
            }
        }
        if let Some((before, allowed)) = before {
            let after = snapshot(&frames, GUEST_RAM);
            assert_writes_within(&before, &after, &allowed, "virtio_mmio");
        }
        let status = read32(&mut t, STATUS);
        assert_eq!(
            status & !STATUS_BITS,
            0,
            "status {status:#x} has unknown bits"
        );
    }
    t.write(STATUS, &0u32.to_le_bytes());
    assert_eq!(read32(&mut t, STATUS), 0, "reset did not clear the status");
    assert_eq!(read32(&mut t, 0x44), 0, "queue still ready after reset");
    assert_eq!(pins(&frames), 0, "pins left after reset");
}
