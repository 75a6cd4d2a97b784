//! virtio-blk against a temp-file disk and the driver-side mock: the request
//! types, every case of ../shared/ADVERSARIAL.md §7 and §11, and after each bad
//! request a well-formed one still works.

use std::path::PathBuf;

use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::disk::RawFile;
use crate::virtio::mock::MockDriver;

const RINGS: GuestAddress = GuestAddress(0x10_0000);
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
const DISK_SECTORS: u64 = 64;

struct Rig {
    frames: GuestFrames,
    path: PathBuf,
    block: Block,
    queue: Queue,
    original: Vec<u8>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rig(name: &str, read_only: bool) -> Rig {
    let path = std::env::temp_dir().join(format!("devices-blk-{}-{name}.img", std::process::id()));
    let original: Vec<u8> = (0..DISK_SECTORS * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect();
    std::fs::write(&path, &original).unwrap();
    let disk = RawFile::open(&path, read_only).unwrap();
    let config = BlockConfig {
        read_only,
        serial: Some("serial-0123456789abc".into()),
        ..BlockConfig::default()
    };
    let mut block = Block::new(Box::new(disk), config).unwrap();
    let features = block.avail_features();
    block.ack_features(features);
    let frames = GuestFrames::new(32 << 20, Backing::Anonymous).unwrap();
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    queue.set_indirect(true);
    queue.set_chain_limit(block.chain_limit(0));
    Rig {
        frames,
        path,
        block,
        queue,
        original,
    }
}

/// Writes a request header (type, sector) at `HDR`.
fn write_header(frames: &GuestFrames, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    frames.memory().write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// What Linux sends for one request: the header at `HDR`, every data
/// segment in its own descriptor, the status byte at `STATUS`.
fn linux_request(data: impl Iterator<Item = (u64, u32)>, writable: bool) -> Vec<(u64, u32, bool)> {
    let mut table = vec![(HDR, 16, false)];
    table.extend(data.map(|(addr, len)| (addr, len, writable)));
    table.push((STATUS, 1, true));
    table
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        write_header(&self.frames, kind, sector);
        self.frames
            .memory()
            .write_obj(0xeeu8, GuestAddress(STATUS))
            .unwrap();
    }

    /// Offers `chain` as the next request, runs the device, returns (status
    /// byte, used length).
    fn run(&mut self, chain: &[(u64, u32, bool)]) -> (u8, u32) {
        let frames = &self.frames;
        let mut driver = MockDriver::new(frames, 16, RINGS);
        if !self.queue.is_active() {
            driver.configure(&mut self.queue);
        }
        let used_before = driver.used_idx();
        driver.set_avail_idx(used_before);
        // Reuse descriptors from 0 each time: the previous chain is complete.
        driver.add_chain(chain);
        assert!(
            self.block
                .process_queue(0, &mut self.queue, frames)
                .unwrap()
                .used
        );
        assert_eq!(driver.used_idx(), used_before.wrapping_add(1));
        let (_, len) = driver.used_elem(used_before);
        (frames.memory().read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    fn assert_file_unchanged(&self) {
        assert!(self.file() == self.original, "the disk file changed");
    }

    /// A well-formed read of sector 3 still works.
    fn assert_still_serves(&mut self) {
        self.header(VIRTIO_BLK_T_IN, 3);
        let (status, len) = self.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 513));
        let mut got = vec![0u8; 512];
        self.frames
            .memory()
            .read_slice(&mut got, GuestAddress(DATA))
            .unwrap();
        assert_eq!(got, self.file()[3 * 512..4 * 512]);
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn block_config_space_reports_capacity_and_limits() {
    let r = rig("config", false);
    let mut cap = [0u8; 8];
    r.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut byte = [0xffu8; 1];
    r.block.read_config(20, &mut byte);
    assert_eq!(byte, [0]); // blk_size 512 = 0x200: low byte 0
    let mut seg_max = [0u8; 4];
    r.block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
    let mut beyond = [0xffu8; 4];
    r.block.read_config(1 << 40, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    r.block.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    assert_eq!(r.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(
        rig("config-ro", true).block.avail_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
}

#[test]
fn block_reads_multi_segment_and_writes_land_at_their_offsets() {
    let mut r = rig("rw", false);
    // Read sectors 4..8 into three segments.
    r.header(VIRTIO_BLK_T_IN, 4);
    let chain = [
        (HDR, 16, false),
        (DATA, 1024, true),
        (DATA + 0x1000, 512, true),
        (DATA + 0x2000, 512, true),
        (STATUS, 1, true),
    ];
    assert_eq!(r.run(&chain), (OK, 2049));
    let mut got = vec![0u8; 2048];
    let mem = r.frames.memory();
    mem.read_slice(&mut got[..1024], GuestAddress(DATA))
        .unwrap();
    mem.read_slice(&mut got[1024..1536], GuestAddress(DATA + 0x1000))
        .unwrap();
    mem.read_slice(&mut got[1536..], GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, r.original[4 * 512..8 * 512]);
    // Write sectors 10..12 from two segments.
    mem.write_slice(&[0xa1; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xb2; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 10);
    assert_eq!(
        r.run(&[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 0x1000, 512, false),
            (STATUS, 1, true)
        ]),
        (OK, 1)
    );
    let mut expected = r.original.clone();
    expected[10 * 512..11 * 512].fill(0xa1);
    expected[11 * 512..12 * 512].fill(0xb2);
    assert!(r.file() == expected);
    let m = r.block.metrics().snapshot();
    assert_eq!(
        (m.reads, m.writes, m.bytes_read, m.bytes_written),
        (1, 1, 2048, 1024)
    );
}

#[test]
fn block_accepts_header_with_data_and_data_with_status_in_one_descriptor() {
    let mut r = rig("layout", false);
    // OUT: header and data share one descriptor.
    r.header(VIRTIO_BLK_T_OUT, 1);
    r.frames
        .memory()
        .write_slice(&[0x33; 512], GuestAddress(HDR + 16))
        .unwrap();
    assert_eq!(r.run(&[(HDR, 16 + 512, false), (STATUS, 1, true)]), (OK, 1));
    assert!(r.file()[512..1024].iter().all(|&b| b == 0x33));
    // IN: data and status share one descriptor (status is its last byte).
    r.header(VIRTIO_BLK_T_IN, 1);
    r.frames
        .memory()
        .write_obj(0xeeu8, GuestAddress(DATA + 512))
        .unwrap();
    let (_, len) = r.run(&[(HDR, 16, false), (DATA, 513, true)]);
    assert_eq!(len, 513);
    assert_eq!(
        r.frames
            .memory()
            .read_obj::<u8>(GuestAddress(DATA + 512))
            .unwrap(),
        OK
    );
    assert_eq!(
        r.frames
            .memory()
            .read_obj::<u8>(GuestAddress(DATA))
            .unwrap(),
        0x33
    );
}

#[test]
fn block_last_sector_works_and_one_past_the_end_is_ioerr() {
    let mut r = rig("end", false);
    r.header(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1);
    r.frames
        .memory()
        .write_slice(&[0x77; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .0,
        OK
    );
    assert!(
        r.file()[(DISK_SECTORS as usize - 1) * 512..]
            .iter()
            .all(|&b| b == 0x77)
    );
    let after_last = r.file();
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_OUT, DISK_SECTORS, 512),
        (VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 1024),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512),
    ] {
        r.header(kind, sector);
        assert_eq!(
            r.run(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
                .0,
            IOERR,
            "{sector}"
        );
    }
    r.header(VIRTIO_BLK_T_IN, DISK_SECTORS);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .0,
        IOERR
    );
    assert!(r.file() == after_last, "nothing written past the end");
    assert_eq!(r.block.metrics().snapshot().out_of_range, 5);
    r.assert_still_serves();
}

#[test]
fn block_rejects_data_not_whole_sectors() {
    let mut r = rig("partial", false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 511, false), (STATUS, 1, true)])
            .0,
        IOERR
    );
    r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 700, true), (STATUS, 1, true)])
            .0,
        IOERR
    );
    r.assert_file_unchanged();
    r.assert_still_serves();
}

#[test]
fn block_unknown_type_is_unsupp() {
    let mut r = rig("unknown", false);
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        0x7777_7777,
    ] {
        r.header(kind, 0);
        assert_eq!(
            r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
                .0,
            UNSUPP
        );
    }
    assert_eq!(r.block.metrics().snapshot().unsupp, 3);
    r.assert_file_unchanged();
    r.assert_still_serves();
}

#[test]
fn block_read_only_disk_rejects_every_write_and_the_file_is_unchanged() {
    let mut r = rig("ro", true);
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .0,
        IOERR
    );
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        r.header(kind, 0);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        r.frames
            .memory()
            .write_slice(&seg, GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
                .0,
            IOERR
        );
    }
    assert_eq!(r.block.metrics().snapshot().read_only_write, 3);
    r.assert_file_unchanged();
    r.assert_still_serves();
}

#[test]
fn block_get_id_fills_20_bytes_or_what_fits() {
    let mut r = rig("id", false);
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        (OK, 21)
    );
    let mut id = [0u8; 20];
    r.frames
        .memory()
        .read_slice(&mut id, GuestAddress(DATA))
        .unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
    r.frames
        .memory()
        .write_slice(&[0; 20], GuestAddress(DATA))
        .unwrap();
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 10, true), (STATUS, 1, true)])
            .0,
        OK
    );
    r.frames
        .memory()
        .read_slice(&mut id, GuestAddress(DATA))
        .unwrap();
    assert_eq!(&id[..10], b"serial-012");
    assert_eq!(&id[10..], &[0; 10], "nothing beyond the buffer");
}

/// A stand-in disk of zeros, for configuration tests.
#[derive(Debug)]
struct ZeroDisk;

impl DiskBackend for ZeroDisk {
    fn size(&self) -> u64 {
        4096
    }
    fn read_at(
        &self,
        _: &GuestFrames,
        _: u64,
        s: &[(GuestAddress, usize)],
    ) -> std::io::Result<usize> {
        Ok(s.iter().map(|x| x.1).sum())
    }
    fn write_at(
        &self,
        _: &GuestFrames,
        _: u64,
        s: &[(GuestAddress, usize)],
    ) -> std::io::Result<usize> {
        Ok(s.iter().map(|x| x.1).sum())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn block_serial_longer_than_20_bytes_is_refused() {
    let config = BlockConfig {
        read_only: false,
        serial: Some("123456789012345678901".into()),
        ..BlockConfig::default()
    };
    assert!(matches!(
        Block::new(Box::new(ZeroDisk), config),
        Err(BlockError::Serial(_))
    ));
}

#[test]
fn block_flush_discard_and_write_zeroes() {
    let mut r = rig("zeroes", false);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(r.run(&[(HDR, 16, false), (STATUS, 1, true)]).0, OK);
    let segment = |sector: u64, sectors: u32, flags: u32| {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        seg
    };
    let mut expected = r.original.clone();
    for (kind, sector, flags) in [
        (VIRTIO_BLK_T_DISCARD, 8, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 20, 1),
    ] {
        r.frames
            .memory()
            .write_slice(&segment(sector, 8, flags), GuestAddress(DATA))
            .unwrap();
        r.header(kind, 0);
        assert_eq!(
            r.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
                .0,
            OK
        );
        expected[sector as usize * 512..(sector as usize + 8) * 512].fill(0);
    }
    assert!(r.file() == expected);
    // Out of range, two segments, UNMAP on discard.
    let bad: [(u32, &[u8], u8); 3] = [
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            &segment(DISK_SECTORS - 4, 8, 0),
            IOERR,
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            &[segment(0, 8, 0), segment(8, 8, 0)].concat(),
            IOERR,
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            &segment(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            UNSUPP,
        ),
    ];
    for (kind, segs, want) in bad {
        r.frames
            .memory()
            .write_slice(segs, GuestAddress(DATA))
            .unwrap();
        r.header(kind, 0);
        assert_eq!(
            r.run(&[
                (HDR, 16, false),
                (DATA, segs.len() as u32, false),
                (STATUS, 1, true)
            ])
            .0,
            want
        );
    }
    assert!(r.file() == expected, "bad zeroing requests changed nothing");
    r.assert_still_serves();
}

#[test]
fn block_chain_without_writable_status_is_returned_with_zero_length() {
    let mut r = rig("nostatus", false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    // Status byte in a read-only descriptor: no writable byte at all.
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, false)]),
        (0xee, 0)
    );
    // Header only.
    assert_eq!(r.run(&[(HDR, 16, false)]), (0xee, 0));
    assert_eq!(r.block.metrics().snapshot().bad_layout, 2);
    r.assert_file_unchanged();
    r.assert_still_serves();
}

#[test]
fn block_short_header_is_ioerr() {
    let mut r = rig("shorthdr", false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(r.run(&[(HDR, 8, false), (STATUS, 1, true)]).0, IOERR);
    r.assert_still_serves();
}

#[test]
fn block_wrong_direction_data_is_ioerr_and_nothing_is_written() {
    let mut r = rig("direction", false);
    // OUT whose data buffer is device-writable.
    r.frames
        .memory()
        .write_slice(&[0x55; 512], GuestAddress(DATA))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 2);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .0,
        IOERR
    );
    r.assert_file_unchanged();
    let mut data = [0u8; 512];
    r.frames
        .memory()
        .read_slice(&mut data, GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        data, [0x55; 512],
        "the device did not write the data buffer"
    );
    // IN whose data buffer is device-readable: the device must not write it.
    r.header(VIRTIO_BLK_T_IN, 2);
    assert_eq!(
        r.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .0,
        IOERR
    );
    r.frames
        .memory()
        .read_slice(&mut data, GuestAddress(DATA))
        .unwrap();
    assert_eq!(data, [0x55; 512]);
    r.assert_still_serves();
}

#[test]
fn block_serves_indirect_chains_and_counts_bad_chains() {
    let mut r = rig("indirect", false);
    {
        let frames = &r.frames;
        let mut driver = MockDriver::new(frames, 16, RINGS);
        driver.configure(&mut r.queue);
        r.queue.set_indirect(true);
        r.header(VIRTIO_BLK_T_IN, 5);
        driver.add_indirect_chain(
            GuestAddress(0x50_0000),
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        // And a malformed chain: a buffer outside RAM.
        driver.add_chain(&[(1 << 40, 16, false), (STATUS, 1, true)]);
        assert!(r.block.process_queue(0, &mut r.queue, frames).unwrap().used);
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used_elem(1).1, 0);
    }
    assert_eq!(
        r.frames
            .memory()
            .read_obj::<u8>(GuestAddress(STATUS))
            .unwrap(),
        OK
    );
    assert_eq!(r.block.metrics().snapshot().bad_chain, 1);
}

/// A request: type, sector, chain, expected status and used length.
type Case<'a> = (u32, u64, &'a [(u64, u32, bool)], u8, u32);

#[test]
fn block_used_length_is_exactly_what_the_device_wrote() {
    let mut r = rig("used-len", false);
    let cases: [Case<'_>; 6] = [
        // GET_ID into 30 bytes writes the 20-byte serial and the status.
        (
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, false), (DATA, 30, true), (STATUS, 1, true)],
            OK,
            21,
        ),
        (
            VIRTIO_BLK_T_GET_ID,
            0,
            &[(HDR, 16, false), (DATA, 10, true), (STATUS, 1, true)],
            OK,
            11,
        ),
        (
            VIRTIO_BLK_T_IN,
            2,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            OK,
            1025,
        ),
        // Refused before any data moves: only the status byte.
        (
            VIRTIO_BLK_T_IN,
            DISK_SECTORS,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            IOERR,
            1,
        ),
        (
            VIRTIO_BLK_T_OUT,
            2,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            OK,
            1,
        ),
        (
            VIRTIO_BLK_T_FLUSH,
            0,
            &[(HDR, 16, false), (STATUS, 1, true)],
            OK,
            1,
        ),
    ];
    for (kind, sector, chain, status, used) in cases {
        r.header(kind, sector);
        assert_eq!(r.run(chain), (status, used), "type {kind} sector {sector}");
    }
}

/// A sparse disk image of `bytes` and a block device on it.
fn sparse_block(name: &str, bytes: u64) -> (Block, PathBuf) {
    let path = std::env::temp_dir().join(format!("devices-blk-{}-{name}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let disk = RawFile::open(&path, false).unwrap();
    let mut block = Block::new(Box::new(disk), BlockConfig::default()).unwrap();
    let features = block.avail_features();
    block.ack_features(features);
    (block, path)
}

fn queue_256<'a>(frames: &'a GuestFrames, block: &Block) -> (Queue, MockDriver<'a>) {
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    queue.set_indirect(true);
    queue.set_chain_limit(block.chain_limit(0));
    let driver = MockDriver::new(frames, MAX_QUEUE_SIZE, RINGS);
    driver.configure(&mut queue);
    (queue, driver)
}

#[test]
fn block_serves_linux_sized_254_segment_requests_on_a_256_entry_queue() {
    // Linux's shape: queue size 256, SEG_MAX 254, header, data and status in
    // separate descriptors of one indirect table of 256 entries.
    let (mut block, path) = sparse_block("linux-shape", 4 << 20);
    let frames = GuestFrames::new(32 << 20, Backing::Anonymous).unwrap();
    let (mut queue, mut driver) = queue_256(&frames, &block);
    let data = |i: u64| 0x100_0000 + i * 0x1000;
    let pattern: Vec<u8> = (0..254 * 4096u64)
        .map(|i| (i * 31 + i / 4096) as u8)
        .collect();
    for (i, chunk) in pattern.chunks(4096).enumerate() {
        frames
            .memory()
            .write_slice(chunk, GuestAddress(data(i as u64)))
            .unwrap();
    }
    let request = |kind: u32, writable: bool| {
        write_header(&frames, kind, 8);
        linux_request((0..254).map(|i| (data(i), 4096)), writable)
    };
    // Write 254 pages at sector 8, then read them back into cleared pages.
    driver.add_indirect_chain(GuestAddress(0x50_0000), &request(VIRTIO_BLK_T_OUT, false));
    block.process_queue(0, &mut queue, &frames).unwrap();
    assert_eq!(driver.used_elem(0).1, 1);
    let status: u8 = frames.memory().read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, OK);
    let file = std::fs::read(&path).unwrap();
    assert!(
        file[4096..4096 + pattern.len()] == pattern[..],
        "the disk holds the data"
    );
    for i in 0..254 {
        frames
            .memory()
            .write_slice(&[0u8; 4096], GuestAddress(data(i)))
            .unwrap();
    }
    driver.add_indirect_chain(GuestAddress(0x50_0000), &request(VIRTIO_BLK_T_IN, true));
    block.process_queue(0, &mut queue, &frames).unwrap();
    assert_eq!(driver.used_elem(1).1, 254 * 4096 + 1);
    let status: u8 = frames.memory().read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, OK);
    let mut back = vec![0u8; pattern.len()];
    for (i, chunk) in back.chunks_mut(4096).enumerate() {
        frames
            .memory()
            .read_slice(chunk, GuestAddress(data(i as u64)))
            .unwrap();
    }
    assert!(back == pattern, "the data read back is what was written");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn block_ring_of_chains_covering_all_ram_is_answered_touching_bounded_state() {
    // 256 requests, each reading 254 MiB (all of RAM above 6 MiB) from past
    // the end of a large disk: every one is answered IOERR in one batch, with
    // one pin per buffer on one section counter and one dirty bit per status
    // byte; no per-frame state is written, no data moves.
    let (mut block, path) = sparse_block("all-ram", 64 << 30);
    // RAM: the rings, header, table and status below 6 MiB, then 254 MiB.
    let frames = GuestFrames::new(260 << 20, Backing::Anonymous).unwrap();
    let (mut queue, mut driver) = queue_256(&frames, &block);
    let capacity = block.capacity();
    write_header(&frames, VIRTIO_BLK_T_IN, capacity);
    let table = linux_request((0..254).map(|i| (0x60_0000 + i * (1 << 20), 1 << 20)), true);
    let before = frames.state_resident_bytes().unwrap();
    for _ in 0..MAX_QUEUE_SIZE {
        driver.add_indirect_chain(GuestAddress(0x50_0000), &table);
    }
    let done = block.process_queue(0, &mut queue, &frames).unwrap();
    assert_eq!(
        done,
        Processed {
            used: true,
            more: false
        }
    );
    assert_eq!(driver.used_idx(), MAX_QUEUE_SIZE);
    for i in 0..MAX_QUEUE_SIZE {
        assert_eq!(driver.used_elem(i).1, 1, "IOERR status only");
    }
    let m = block.metrics().snapshot();
    assert_eq!((m.ioerr, m.out_of_range, m.bytes_read), (256, 256, 0));
    let touched = frames.state_resident_bytes().unwrap() - before;
    assert!(touched <= 2 * 4096, "{touched} bytes of VMM state touched");
    // The batch ended at its budget: as the transport does after each one.
    queue.release_parked();
    assert_eq!(frames.table().pins(), 3, "only the rings stay pinned");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn block_batch_ends_at_its_byte_budget_and_the_rest_follows() {
    let (mut block, path) = sparse_block("budget", 256 << 20);
    let frames = GuestFrames::new(128 << 20, Backing::Anonymous).unwrap();
    let (mut queue, mut driver) = queue_256(&frames, &block);
    write_header(&frames, VIRTIO_BLK_T_IN, 0);
    // Four reads of 16 MiB: two fill the 32 MiB budget.
    let chunk = 16u32 << 20;
    for i in 0..4u64 {
        driver.add_chain(&[
            (HDR, 16, false),
            (0x100_0000 + i * u64::from(chunk), chunk, true),
            (STATUS + i, 1, true),
        ]);
    }
    let first = block.process_queue(0, &mut queue, &frames).unwrap();
    assert_eq!(
        first,
        Processed {
            used: true,
            more: true
        }
    );
    assert_eq!(driver.used_idx(), 2);
    let second = block.process_queue(0, &mut queue, &frames).unwrap();
    assert_eq!(
        second,
        Processed {
            used: true,
            more: false
        }
    );
    assert_eq!(driver.used_idx(), 4);
    assert_eq!(block.metrics().snapshot().bytes_read, 4 * u64::from(chunk));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn block_chain_larger_than_any_request_is_refused_before_pinning() {
    // 64 KiB of data for a 32 KiB disk can never be a legal request.
    let mut r = rig("too-large", false);
    r.header(VIRTIO_BLK_T_IN, 0);
    let (_, len) = r.run(&[(HDR, 16, false), (DATA, 64 << 10, true), (STATUS, 1, true)]);
    assert_eq!(len, 0, "returned with length 0");
    assert_eq!(r.frames.table().pins(), 3, "only the rings are pinned");
    assert_eq!(r.block.metrics().snapshot().bad_chain, 1);
    r.assert_still_serves();
}

#[test]
fn block_rate_limiter_holds_requests_until_its_timer_fires() {
    use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let (mut block, path) = sparse_block("limited", 1 << 20);
    let ops = TokenBucketConfig {
        size: 2,
        one_time_burst: 0,
        refill_time_ms: 30,
    };
    block
        .update(DeviceUpdate::Block {
            disk: None,
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(ops),
            }),
        })
        .unwrap();
    let sources = block.event_sources().to_vec();
    assert_eq!(sources.len(), 1, "the limiter's timer is watched");
    let frames = GuestFrames::new(32 << 20, Backing::Anonymous).unwrap();
    let (queue, mut driver) = queue_256(&frames, &block);
    let mut queues = [queue];
    write_header(&frames, VIRTIO_BLK_T_IN, 0);
    for i in 0..4u64 {
        driver.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS + i, 1, true)]);
    }
    let done = block.process_queue(0, &mut queues[0], &frames).unwrap();
    assert!(
        done.used && !done.more,
        "throttled is not 'more': no busy loop"
    );
    assert_eq!(driver.used_idx(), 2, "the bucket's two requests");
    // Another notification while throttled takes nothing.
    block.process_queue(0, &mut queues[0], &frames).unwrap();
    assert_eq!(driver.used_idx(), 2);
    assert_eq!(block.metrics().snapshot().rate_limiter_throttled_events, 1);
    // Before the timer fired, its event does nothing (and does not block).
    block.process_event(0, &mut queues, &frames).unwrap();
    assert_eq!(driver.used_idx(), 2);
    std::thread::sleep(std::time::Duration::from_millis(60));
    block.process_event(0, &mut queues, &frames).unwrap();
    assert_eq!(driver.used_idx(), 4, "resumed by the timer");
    // An unlimited config lets everything through.
    block
        .update(DeviceUpdate::Block {
            disk: None,
            rate_limiter: Some(RateLimiterConfig::default()),
        })
        .unwrap();
    for i in 0..8u64 {
        driver.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS + i, 1, true)]);
    }
    block.process_queue(0, &mut queues[0], &frames).unwrap();
    assert_eq!(driver.used_idx(), 12);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn block_swapped_disk_serves_the_new_file_and_reports_its_capacity() {
    let mut r = rig("swap-old", false);
    let new_path =
        std::env::temp_dir().join(format!("devices-blk-{}-swap-new.img", std::process::id()));
    std::fs::write(&new_path, vec![0x5a; 128 * 512]).unwrap();
    let disk = RawFile::open(&new_path, false).unwrap();
    let outcome = r
        .block
        .update(DeviceUpdate::Block {
            disk: Some(Box::new(disk)),
            rate_limiter: None,
        })
        .unwrap();
    assert!(outcome.config_changed);
    assert_eq!(r.block.capacity(), 128);
    let mut capacity = [0u8; 8];
    r.block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 128);
    r.header(VIRTIO_BLK_T_IN, 100);
    let (status, _) = r.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
    let mut data = [0u8; 512];
    r.frames
        .memory()
        .read_slice(&mut data, GuestAddress(DATA))
        .unwrap();
    assert!(data.iter().all(|&b| b == 0x5a), "read from the new file");
    assert_eq!(r.block.metrics().snapshot().disk_swaps, 1);
    // A net update is refused and changes nothing.
    assert!(
        r.block
            .update(DeviceUpdate::Net {
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .is_err()
    );
    std::fs::remove_file(&new_path).unwrap();
}
