//! The virtio-blk device model alone, host side: 4 KiB reads through the split
//! virtqueue and virtio-blk against the same preadv issued directly, on a file
//! in tmpfs. A driver-side mock offers requests in batches of 64 (the guest's
//! work, not timed); the device's part — pop, validate and pin, execute, write
//! the status, publish the used entries — is timed. Both are measured with
//! criterion, then side by side in alternating rounds, and the device model's
//! overhead is printed as a ratio.
//!
//!     cargo bench -p devices --bench blk

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Criterion;
use devices::disk::{DiskBackend, RawFile};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mock::MockDriver;
use devices::virtio::{Queue, VirtioDevice};
use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

const DISK_BYTES: u64 = 64 << 20;
const SECTORS: u64 = DISK_BYTES / 512 - 8;
const RINGS: GuestAddress = GuestAddress(0x10_0000);
const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x40_0000;
/// Requests offered at once (as a guest with a busy queue does).
const BATCH: u64 = 64;

struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image() -> TempImage {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let path = dir.join(format!("devices-bench-blk-{}.img", std::process::id()));
    let data: Vec<u8> = (0..DISK_BYTES).map(|i| (i * 13) as u8).collect();
    std::fs::write(&path, data).unwrap();
    TempImage(path)
}

/// The device side and its driver mock.
struct Rig<'a> {
    frames: &'a GuestFrames,
    block: Block,
    queue: Queue,
    driver: MockDriver<'a>,
    sector: u64,
}

impl<'a> Rig<'a> {
    fn new(frames: &'a GuestFrames, image: &TempImage) -> Self {
        let disk = RawFile::open(&image.0, true).unwrap();
        let mut block = Block::new(
            Box::new(disk),
            BlockConfig {
                read_only: true,
                serial: None,
                ..BlockConfig::default()
            },
        )
        .unwrap();
        let features = block.avail_features();
        block.ack_features(features);
        let mut queue = Queue::new(256);
        let driver = MockDriver::new(frames, 256, RINGS);
        driver.configure(&mut queue);
        Rig {
            frames,
            block,
            queue,
            driver,
            sector: 0,
        }
    }

    /// Offers `BATCH` 4 KiB read requests (the guest's part, not timed).
    fn offer_batch(&mut self) {
        for i in 0..BATCH {
            self.sector = (self.sector + 8) % SECTORS;
            let hdr = HDR + 16 * i;
            let mut h = [0u8; 16];
            h[8..16].copy_from_slice(&self.sector.to_le_bytes());
            self.frames
                .memory()
                .write_slice(&h, GuestAddress(hdr))
                .unwrap();
            self.driver.add_chain(&[
                (hdr, 16, false),
                (DATA + 4096 * i, 4096, true),
                (STATUS + i, 1, true),
            ]);
        }
    }

    /// The device's part: pops, executes and completes the batch; returns the
    /// time it took.
    fn device_batch(&mut self) -> Duration {
        let t = Instant::now();
        black_box(
            self.block
                .process_queue(0, &mut self.queue, self.frames)
                .unwrap(),
        );
        // As the transport ends every batch.
        self.queue.end_batch(self.frames);
        t.elapsed()
    }

    /// `iters` requests through the device, timing only the device's part.
    fn device_reads(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters.div_ceil(BATCH) {
            self.offer_batch();
            total += self.device_batch();
        }
        total.mul_f64(iters as f64 / (iters.div_ceil(BATCH) * BATCH) as f64)
    }
}

/// The same read as one direct preadv into guest memory (into the same
/// rotation of buffers the requests use).
fn direct_read(disk: &RawFile, frames: &GuestFrames, sector: &mut u64) {
    *sector = (*sector + 8) % SECTORS;
    let buf = DATA + 4096 * ((*sector / 8) % BATCH);
    black_box(
        disk.read_at(frames, *sector * 512, &[(GuestAddress(buf), 4096)])
            .unwrap(),
    );
}

fn main() {
    let image = image();
    let frames = GuestFrames::new(64 << 20, Backing::Anonymous).unwrap();
    let direct = RawFile::open(&image.0, true).unwrap();
    let mut rig = Rig::new(&frames, &image);

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("blk_4k_read");
    let mut sector = 0;
    group.bench_function("direct_preadv", |b| {
        b.iter(|| direct_read(&direct, &frames, &mut sector))
    });
    group.bench_function("queue_and_virtio_blk", |b| {
        b.iter_custom(|iters| rig.device_reads(iters))
    });
    group.finish();
    c.final_summary();

    // Side by side: alternate rounds so both see the same machine load, and
    // compare the medians.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        31
    } else {
        3
    };
    let per_round: u32 = 2048;
    let (mut direct_ns, mut device_ns) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..per_round {
            direct_read(&direct, &frames, &mut sector);
        }
        direct_ns.push(t.elapsed().as_nanos() as f64 / f64::from(per_round));
        let t = rig.device_reads(u64::from(per_round));
        device_ns.push(t.as_nanos() as f64 / f64::from(per_round));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (d, q) = (median(&mut direct_ns), median(&mut device_ns));
    println!(
        "blk 4K read: direct preadv {d:.0} ns, through queue + virtio-blk {q:.0} ns: ratio {:.3} (device model adds {:.1}%)",
        q / d,
        (q / d - 1.0) * 100.0
    );
    println!("requests/s through the device model: {:.0}", 1e9 / q);
}
