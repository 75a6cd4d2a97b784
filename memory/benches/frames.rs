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

/// Pinned lengths: a sector's page up to a quarter of a GiB.
const PIN_SIZES: [(&str, u64); 4] = [
    ("4k", 4 << 10),
    ("64k", 64 << 10),
    ("1m", 1 << 20),
    ("256m", 256 << 20),
];

fn bench_pin(c: &mut Criterion) {
    let g = GuestFrames::new(512 << 20, Backing::Anonymous).unwrap();
    for (name, len) in PIN_SIZES {
        c.bench_function(&format!("pin_unpin_{name}"), |b| {
            b.iter(|| drop(g.pin(black_box(GuestAddress(0x10_0000)), len).unwrap()))
        });
    }
    // Side by side, alternating rounds: the cost of a pin must not depend on
    // its length (one count per 1 GiB section).
    let rounds = if std::env::args().any(|a| a == "--bench") {
        31
    } else {
        3
    };
    let per_round = 20_000u32;
    let mut ns = vec![Vec::new(); PIN_SIZES.len()];
    for _ in 0..rounds {
        for (i, &(_, len)) in PIN_SIZES.iter().enumerate() {
            let t = std::time::Instant::now();
            for _ in 0..per_round {
                drop(g.pin(black_box(GuestAddress(0x10_0000)), len).unwrap());
            }
            ns[i].push(t.elapsed().as_nanos() as f64 / f64::from(per_round));
        }
    }
    let medians: Vec<f64> = ns
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    let (lo, hi) = medians
        .iter()
        .fold((f64::MAX, 0f64), |(lo, hi), &m| (lo.min(m), hi.max(m)));
    let shown: Vec<String> = PIN_SIZES
        .iter()
        .zip(&medians)
        .map(|(&(name, _), m)| format!("{name} {m:.1} ns"))
        .collect();
    println!(
        "pin+unpin side by side: {}; slowest/fastest {:.2}",
        shown.join(", "),
        hi / lo
    );
}

criterion_group!(benches, bench_alloc, bench_pin);
criterion_main!(benches);
