//! Frame allocator and DMA pin costs.
//!
//! `cargo bench -p memory --bench frames`. Figures measured on the project's
//! machines are in memory/README.md.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use memory::guest::Backing;
use memory::{FrameAllocator, FrameMeta, FrameNumber, FrameRange, GuestFrames};
use vm_memory::GuestAddress;

/// 256 MiB of frames in one range.
const FRAMES: u64 = 1 << 16;

fn allocator() -> FrameAllocator<Vec<FrameMeta>> {
    let range = FrameRange::new(FrameNumber(0), FRAMES).unwrap();
    FrameAllocator::new(&[range], (0..FRAMES).map(|_| FrameMeta::new()).collect()).unwrap()
}

/// A small xorshift generator: the benchmark needs repeatable randomness only.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn bench_alloc(c: &mut Criterion) {
    let mut a = allocator();
    c.bench_function("order0_alloc_free", |b| {
        b.iter(|| {
            let f = a.alloc(black_box(0)).unwrap();
            a.free(f, 0).unwrap();
        })
    });
    c.bench_function("order9_alloc_free", |b| {
        b.iter(|| {
            let f = a.alloc(black_box(9)).unwrap();
            a.free(f, 9).unwrap();
        })
    });

    // Half of the frames allocated, chosen at random: free blocks are scattered
    // and small, buddies rarely coalesce.
    let mut a = allocator();
    let mut frames: Vec<FrameNumber> = (0..FRAMES).map(|_| a.alloc(0).unwrap()).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for i in (1..frames.len()).rev() {
        frames.swap(i, (xorshift(&mut seed) % (i as u64 + 1)) as usize);
    }
    for f in frames.drain(..FRAMES as usize / 2) {
        a.free(f, 0).unwrap();
    }
    c.bench_function("order0_alloc_free_fragmented", |b| {
        b.iter(|| {
            let f = a.alloc(black_box(0)).unwrap();
            a.free(f, 0).unwrap();
        })
    });
}

fn bench_pin(c: &mut Criterion) {
    let g = GuestFrames::new(256 << 20, Backing::Anonymous).unwrap();
    c.bench_function("pin_unpin_64k", |b| {
        b.iter(|| drop(g.pin(black_box(GuestAddress(0x10_0000)), 64 << 10).unwrap()))
    });
}

criterion_group!(benches, bench_alloc, bench_pin);
criterion_main!(benches);
