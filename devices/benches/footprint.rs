//! What DMA into all of a guest's RAM costs the VMM: a driver-side mock
//! reads a sparse disk into every frame of a 16 GiB `GuestFrames` through the
//! split virtqueue and virtio-blk, in Linux-shaped requests (an indirect table
//! of header + 254 one-MiB segments + status, queue size 256), then compares
//! the process's RSS with the guest pages it populated.
//!
//!     cargo bench -p devices --bench footprint     # 16 GiB (needs that much free RAM)
//!
//! Under `cargo test` (no `--bench`) the guest has 512 MiB. Either way the run
//! fails if the VMM's part — RSS minus populated guest pages — reaches 8 MiB:
//! a memory bound, not a timing. The guest's pages are the guest's; the
//! frame metadata, pin counters and dirty log are the VMM's
//! (`GuestFrames::state_resident_bytes`, also printed).

use std::time::Instant;

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mock::MockDriver;
use devices::virtio::{MAX_QUEUE_SIZE, Queue, VirtioDevice};
use memory::GuestFrames;
use memory::guest::Backing;
use memory::layout::ram_ranges;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
/// Rings, headers, tables and status bytes live below this; data above it.
const CONTROL: u64 = 8 * MIB;
const RINGS: GuestAddress = GuestAddress(MIB);
const HEADER: u64 = 2 * MIB;
const STATUS: u64 = 2 * MIB + 0x1000;
const TABLES: u64 = 3 * MIB;
/// Requests offered per notification (each with its own indirect table).
const BATCH: u64 = 16;
const SEGMENTS: u64 = 254;
const VMM_LIMIT: u64 = 8 * MIB;

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let size: u64 = if bench { 16 << 30 } else { 512 * MIB };
    let disk_path =
        std::env::temp_dir().join(format!("devices-footprint-{}.img", std::process::id()));
    std::fs::File::create(&disk_path)
        .unwrap()
        .set_len(SEGMENTS * MIB)
        .unwrap();
    let disk = devices::disk::RawFile::open(&disk_path, true).unwrap();
    let mut block = Block::new(Box::new(disk), BlockConfig::default()).unwrap();
    let features = block.avail_features();
    block.ack_features(features);

    let rss_before = rss();
    let frames = GuestFrames::new(size, Backing::Anonymous).unwrap();
    let mut queue = Queue::new(MAX_QUEUE_SIZE);
    queue.set_indirect(true);
    queue.set_chain_limit(block.chain_limit(0));
    let mut driver = MockDriver::new(&frames, MAX_QUEUE_SIZE, RINGS);
    driver.configure(&mut queue);
    // One IN header for every request: sector 0 of the (sparse) disk.
    frames
        .memory()
        .write_slice(&[0u8; 16], GuestAddress(HEADER))
        .unwrap();

    // Every MiB of RAM above CONTROL, as 1 MiB segments.
    let segments: Vec<u64> = ram_ranges(size)
        .into_iter()
        .flat_map(|(start, len)| (0..len / MIB).map(move |i| start.0 + i * MIB))
        .filter(|&a| a >= CONTROL)
        .collect();
    let start = Instant::now();
    let mut requests = 0u64;
    for batch in segments.chunks((SEGMENTS * BATCH) as usize) {
        for (i, chunk) in batch.chunks(SEGMENTS as usize).enumerate() {
            let mut table = vec![(HEADER, 16, false)];
            table.extend(chunk.iter().map(|&a| (a, MIB as u32, true)));
            table.push((STATUS + i as u64, 1, true));
            driver.add_indirect_chain(GuestAddress(TABLES + i as u64 * 0x1000), &table);
            requests += 1;
        }
        while block.process_queue(0, &mut queue, &frames).unwrap().more {}
    }
    let elapsed = start.elapsed();
    assert_eq!(u64::from(driver.used_idx()), requests % 65536);
    let m = block.metrics().snapshot();
    assert_eq!(m.ioerr, 0, "{m:?}");
    assert_eq!(m.bytes_read, segments.len() as u64 * MIB);

    let guest = frames.guest_resident_bytes().unwrap();
    let state = frames.state_resident_bytes().unwrap();
    let rss_after = rss();
    let vmm = rss_after.saturating_sub(guest).saturating_sub(rss_before);
    println!(
        "DMA into all of a {} MiB guest: {} requests of up to {SEGMENTS} MiB in {:.1} s",
        size / MIB,
        requests,
        elapsed.as_secs_f64()
    );
    println!(
        "guest pages populated {:.1} MiB; process RSS {:.1} MiB (before the guest existed {:.1} MiB)",
        guest as f64 / MIB as f64,
        rss_after as f64 / MIB as f64,
        rss_before as f64 / MIB as f64
    );
    println!(
        "RSS beyond the guest's pages, grown since start: {:.2} MiB (limit {} MiB); of it the VMM's per-frame state (metadata, pin counters, dirty log): {:.2} MiB",
        vmm as f64 / MIB as f64,
        VMM_LIMIT / MIB,
        state as f64 / MIB as f64
    );
    let dirty: u64 = frames.take_dirty().iter().map(|d| d.1).sum();
    assert!(
        dirty >= segments.len() as u64 * MIB,
        "every frame DMA wrote is dirty"
    );
    drop(frames);
    let _ = std::fs::remove_file(&disk_path);
    assert!(
        vmm < VMM_LIMIT,
        "the VMM's own memory grew by {vmm} bytes while DMA covered the guest"
    );
}
