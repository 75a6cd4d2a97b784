//! Target `block`: structured virtio-blk requests (virtio 1.2 §5.2) from
//! `arbitrary` against a file-backed disk of 2 MiB.
//!
//! Each request has a type (the six the device knows or any number), a
//! sector (low, counted from the end, or any), data segments of whole sectors
//! or any length in either direction, a header that is separate, short (split
//! across buffers) or merged with the first data buffer, a status buffer of 0
//! to 3 bytes, and may go through an indirect table. The disk may be
//! read-only, and any subset of the offered features is acknowledged.
//!
//! A model of the disk follows every request the device answers OK. Checks:
//! the file ends equal to the model (it changed only where a valid write,
//! discard or write-zeroes named); data read with status OK equals the
//! model; nothing succeeds in writing a read-only disk; guest memory changes
//! only in device-writable buffers and the used ring; no pin survives.

use arbitrary::{Arbitrary, Unstructured};
use devices::disk::RawFile;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mock::MockDriver;
use devices::virtio::{Queue, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{TempFile, assert_writes_within, guest, pins, snapshot, temp_path};

const DISK_BYTES: u64 = 2 << 20;
const SECTORS: u64 = DISK_BYTES / 512;
const RAM: u64 = 256 << 10;
const QUEUE_SIZE: u16 = 64;
/// Buffers are placed from here up.
const BUFFERS: u64 = 0x4000;
const MAX_REQUESTS: usize = 16;
const MAX_SEGMENTS: usize = 8;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
/// What a status byte holds before the device writes it.
const UNWRITTEN: u8 = 0xee;

/// The whole input.
#[derive(Arbitrary, Debug)]
pub struct BlockInput {
    read_only: bool,
    /// Acknowledged = offered & this.
    features: u64,
    requests: Vec<Request>,
}

#[derive(Arbitrary, Debug)]
struct Request {
    kind: Kind,
    sector: SectorSpec,
    segments: Vec<Segment>,
    header: HeaderLayout,
    status_len: u8,
    indirect: bool,
    /// DISCARD / WRITE_ZEROES payload: sector, sector count, flags.
    zero: (SectorSpec, u16, u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::In => T_IN,
            Kind::Out => T_OUT,
            Kind::Flush => T_FLUSH,
            Kind::GetId => T_GET_ID,
            Kind::Discard => T_DISCARD,
            Kind::WriteZeroes => T_WRITE_ZEROES,
            Kind::Other(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SectorSpec {
    Low(u8),
    FromEnd(u8),
    Any(u64),
}

impl SectorSpec {
    fn sector(self) -> u64 {
        match self {
            SectorSpec::Low(s) => u64::from(s),
            SectorSpec::FromEnd(k) => SECTORS.wrapping_sub(u64::from(k)),
            SectorSpec::Any(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Segment {
    len: SegLen,
    writable: bool,
}

#[derive(Arbitrary, Debug)]
enum SegLen {
    Sectors(u8),
    Bytes(u16),
}

impl SegLen {
    fn bytes(&self) -> u32 {
        match *self {
            SegLen::Sectors(n) => u32::from(n % 9) * 512,
            SegLen::Bytes(n) => u32::from(n % 8192),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum HeaderLayout {
    Separate,
    Short(u8),
    Merged,
}

/// A buffer of the chain being built.
#[derive(Clone, Copy, Debug)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

/// Runs the target on `data`.
pub fn run(data: &[u8]) {
    let Ok(input) = BlockInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run_input(&input);
}

fn run_input(input: &BlockInput) {
    let path = TempFile(temp_path("block.img"));
    let file = std::fs::File::create(&path.0).expect("temp disk");
    file.set_len(DISK_BYTES).expect("temp disk size");
    drop(file);
    let disk = RawFile::open(&path.0, input.read_only).expect("temp disk opens");
    let mut block = Block::new(
        Box::new(disk),
        BlockConfig {
            read_only: input.read_only,
            serial: Some("fuzz".into()),
            ..BlockConfig::default()
        },
    )
    .expect("valid config");
    let acked = block.avail_features() & input.features;
    block.ack_features(acked);

    let frames = guest(RAM, &[]);
    let mut driver = MockDriver::new(&frames, QUEUE_SIZE, GuestAddress(0));
    let mut queue = Queue::new(QUEUE_SIZE);
    queue.set_event_idx(acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
    let indirect_ok = acked & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
    queue.set_indirect(indirect_ok);
    driver.configure(&mut queue);

    let mut model = vec![0u8; DISK_BYTES as usize];
    let mut next = BUFFERS;
    for (n, req) in input.requests.iter().take(MAX_REQUESTS).enumerate() {
        let Some(bufs) = layout(req, &mut next) else {
            break;
        };
        let table = if req.indirect { next } else { 0 };
        if req.indirect {
            next += 16 * bufs.len() as u64;
        }
        if next > RAM {
            break;
        }
        fill(&frames, req, n, &bufs);
        let tuples: Vec<(u64, u32, bool)> =
            bufs.iter().map(|b| (b.addr, b.len, b.writable)).collect();
        if req.indirect {
            driver.add_indirect_chain(GuestAddress(table), &tuples);
        } else {
            driver.add_chain(&tuples);
        }
        let before = snapshot(&frames, RAM);
        let _ = block.process_queue(0, &mut queue, &frames);
        let after = snapshot(&frames, RAM);
        let mut allowed: Vec<(u64, u64)> = bufs
            .iter()
            .filter(|b| b.writable)
            .map(|b| (b.addr, u64::from(b.len)))
            .collect();
        allowed.push((driver.used_ring().0, 6 + 8 * u64::from(QUEUE_SIZE)));
        assert_writes_within(&before, &after, &allowed, "block");
        check_and_apply(input.read_only, req, &bufs, &after, &mut model);
    }
    queue.reset();
    block.reset();
    assert_eq!(pins(&frames), 0, "pins left after reset");
    drop(block);
    let on_disk = std::fs::read(&path.0).expect("temp disk reads");
    assert_eq!(on_disk.len(), model.len(), "the disk changed size");
    if on_disk == model {
        return;
    }
    if let Some(at) = on_disk.iter().zip(&model).position(|(a, b)| a != b) {
        panic!(
            "disk byte {at:#x} (sector {}) is {:#04x}, but no valid request wrote {:#04x} there",
            at / 512,
            on_disk[at],
            model[at]
        );
    }
}

/// The chain's buffers in order, placed from `*next` up; `None` when RAM is
/// used up.
fn layout(req: &Request, next: &mut u64) -> Option<Vec<Buf>> {
    let mut lens: Vec<(u32, bool)> = Vec::new();
    let data: Vec<(u32, bool)> = req
        .segments
        .iter()
        .take(MAX_SEGMENTS)
        .map(|s| (s.len.bytes(), s.writable))
        .collect();
    let mut data = data.into_iter();
    match req.header {
        HeaderLayout::Separate => lens.push((16, false)),
        HeaderLayout::Short(n) => lens.push((u32::from(n % 16), false)),
        HeaderLayout::Merged => match data.next() {
            Some((len, false)) => lens.push((16 + len, false)),
            Some((len, true)) => {
                lens.push((16, false));
                lens.push((len, true));
            }
            None => lens.push((16, false)),
        },
    }
    lens.extend(data);
    let status = u32::from(req.status_len % 4);
    if status > 0 {
        lens.push((status, true));
    }
    let mut bufs = Vec::new();
    for (len, writable) in lens {
        if len == 0 {
            continue;
        }
        let addr = *next;
        *next = (*next + u64::from(len) + 15) & !15;
        if *next > RAM {
            return None;
        }
        bufs.push(Buf {
            addr,
            len,
            writable,
        });
    }
    if bufs.is_empty() {
        bufs.push(Buf {
            addr: *next,
            len: 16,
            writable: false,
        });
        *next += 16;
    }
    Some(bufs)
}

/// Writes the header and payload into the readable buffers (as one stream)
/// and marks every writable byte as unwritten.
fn fill(frames: &memory::GuestFrames, req: &Request, n: usize, bufs: &[Buf]) {
    let mut stream = Vec::new();
    stream.extend_from_slice(&req.kind.code().to_le_bytes());
    stream.extend_from_slice(&0u32.to_le_bytes());
    stream.extend_from_slice(&req.sector.sector().to_le_bytes());
    let readable: u64 = bufs
        .iter()
        .filter(|b| !b.writable)
        .map(|b| u64::from(b.len))
        .sum();
    match req.kind.code() {
        T_DISCARD | T_WRITE_ZEROES => {
            let (s, count, flags) = req.zero;
            stream.extend_from_slice(&s.sector().to_le_bytes());
            stream.extend_from_slice(&u32::from(count).to_le_bytes());
            stream.extend_from_slice(&flags.to_le_bytes());
        }
        _ => {}
    }
    while (stream.len() as u64) < readable {
        let i = stream.len();
        stream.push((i as u8) ^ (n as u8).wrapping_mul(37) ^ 0xa5);
    }
    let mut at = 0usize;
    let mem = frames.memory();
    for b in bufs {
        let len = b.len as usize;
        let bytes = if b.writable {
            vec![UNWRITTEN; len]
        } else {
            let chunk = stream[at..at + len].to_vec();
            at += len;
            chunk
        };
        mem.write_slice(&bytes, GuestAddress(b.addr))
            .expect("buffer in RAM");
    }
}

/// Concatenated contents of the readable or writable buffers after the run.
fn stream(bufs: &[Buf], writable: bool, mem: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bufs.iter().filter(|b| b.writable == writable) {
        out.extend_from_slice(&mem[b.addr as usize..b.addr as usize + b.len as usize]);
    }
    out
}

/// Checks the device's answer to `req` and applies it to the model.
fn check_and_apply(read_only: bool, req: &Request, bufs: &[Buf], mem: &[u8], model: &mut [u8]) {
    let written = stream(bufs, true, mem);
    let Some((&status, data_in)) = written.split_last() else {
        return; // no status byte: returned with length 0, nothing executed
    };
    if status != S_OK {
        return;
    }
    let readable = stream(bufs, false, mem);
    let sector = req.sector.sector();
    let offset = |sector: u64, len: usize| -> usize {
        let start = sector
            .checked_mul(512)
            .filter(|s| s + len as u64 <= DISK_BYTES);
        let start = start
            .unwrap_or_else(|| panic!("OK for sector {sector} + {len} bytes: outside the disk"));
        start as usize
    };
    // By code: `Other(1)` is an OUT like `Out`.
    match req.kind.code() {
        T_IN => {
            let at = offset(sector, data_in.len());
            assert_eq!(
                data_in,
                &model[at..at + data_in.len()],
                "read data differs from the disk"
            );
        }
        T_OUT => {
            assert!(!read_only, "a write to a read-only disk succeeded");
            let payload = &readable[16..];
            assert!(
                data_in.is_empty(),
                "OUT succeeded with device-writable data"
            );
            let at = offset(sector, payload.len());
            model[at..at + payload.len()].copy_from_slice(payload);
        }
        T_DISCARD | T_WRITE_ZEROES => {
            assert!(
                !read_only,
                "a discard/write-zeroes on a read-only disk succeeded"
            );
            let payload = &readable[16..];
            assert_eq!(
                payload.len(),
                16,
                "zeroing with a payload of {} bytes",
                payload.len()
            );
            let s = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes"));
            let len = count as usize * 512;
            let at = offset(s, len);
            model[at..at + len].fill(0);
        }
        _ => {}
    }
}
