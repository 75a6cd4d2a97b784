//! Property tests: random alloc/free/reserve/pin sequences against a per-frame
//! model of who owns what.

use std::sync::Arc;

use memory::buddy::Error;
use memory::{Block, FrameAllocator, FrameFlags, FrameMeta, FrameNumber, FrameRange, MAX_ORDER};
use proptest::prelude::*;

type Alloc = FrameAllocator<Arc<[FrameMeta]>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    Allocated(usize),
    Reserved,
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u32),
    Free(usize),
    BadFree(usize, u8),
    AllocRange {
        frames: u64,
        align_log: u32,
        limit_pct: u64,
    },
    FreeRange(usize),
    Reserve {
        at_pct: u64,
        frames: u64,
        poison: bool,
    },
    PinAndFree(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=MAX_ORDER + 1).prop_map(Op::Alloc),
        3 => any::<usize>().prop_map(Op::Free),
        1 => (any::<usize>(), 0..4u8).prop_map(|(i, k)| Op::BadFree(i, k)),
        2 => (1..700u64, 0..7u32, 0..=100u64)
            .prop_map(|(frames, align_log, limit_pct)| Op::AllocRange { frames, align_log, limit_pct }),
        1 => any::<usize>().prop_map(Op::FreeRange),
        1 => (0..=100u64, 1..64u64, any::<bool>())
            .prop_map(|(at_pct, frames, poison)| Op::Reserve { at_pct, frames, poison }),
        1 => any::<usize>().prop_map(Op::PinAndFree),
    ]
}

/// 1 to 3 RAM ranges at unaligned starts with holes between them.
fn layout() -> impl Strategy<Value = Vec<FrameRange>> {
    prop::collection::vec((0..40u64, 1..2500u64), 1..=3).prop_map(|parts| {
        let mut at = 0;
        parts
            .into_iter()
            .map(|(gap, len)| {
                let r = FrameRange::new(FrameNumber(at + gap), len).unwrap();
                at = r.end.0 + 1 + gap % 7;
                r
            })
            .collect()
    })
}

fn new_alloc(ranges: &[FrameRange]) -> Alloc {
    let n: u64 = ranges.iter().map(FrameRange::len).sum();
    FrameAllocator::new(
        ranges,
        (0..n).map(|_| FrameMeta::new()).collect::<Arc<[_]>>(),
    )
    .unwrap()
}

struct Model {
    ranges: Vec<FrameRange>,
    owner: std::collections::BTreeMap<u64, Owner>,
    /// Live allocations: (id, range, Some(order) for `alloc`, None for `alloc_range`).
    live: Vec<(usize, FrameRange, Option<u32>)>,
    freed: Vec<(FrameNumber, u32)>,
    reserves: Vec<(FrameRange, FrameFlags)>,
    next_id: usize,
}

impl Model {
    fn new(ranges: &[FrameRange]) -> Self {
        let owner = ranges
            .iter()
            .flat_map(|r| r.start.0..r.end.0)
            .map(|f| (f, Owner::Free))
            .collect();
        Model {
            ranges: ranges.to_vec(),
            owner,
            live: vec![],
            freed: vec![],
            reserves: vec![],
            next_id: 0,
        }
    }

    fn all_free(&self, r: FrameRange) -> bool {
        (r.start.0..r.end.0).all(|f| self.owner.get(&f) == Some(&Owner::Free))
    }

    fn set(&mut self, r: FrameRange, o: Owner) {
        for f in r.start.0..r.end.0 {
            *self.owner.get_mut(&f).unwrap() = o;
        }
    }

    /// Whether some aligned 2^order block inside one range is entirely free: the
    /// buddy allocator must then succeed.
    fn has_free_block(&self, order: u32) -> bool {
        let n = 1u64 << order;
        self.ranges.iter().any(|r| {
            let mut s = r.start.0.div_ceil(n) * n;
            while s + n <= r.end.0 {
                if self.all_free(FrameRange::new(FrameNumber(s), n).unwrap()) {
                    return true;
                }
                s += n;
            }
            false
        })
    }

    /// Highest aligned run of free, contiguous RAM ending at or below `limit`.
    fn highest_run(&self, frames: u64, align: u64, limit: u64) -> Option<FrameRange> {
        let top = self.ranges.last().unwrap().end.0.min(limit);
        let mut s = top.checked_sub(frames)? & !(align - 1);
        loop {
            let r = FrameRange::new(FrameNumber(s), frames).unwrap();
            if (s..s + frames).all(|f| self.owner.get(&f) == Some(&Owner::Free)) {
                return Some(r);
            }
            s = s.checked_sub(align)?;
        }
    }
}

/// The allocator's view of every frame, in the model's terms.
fn observed(a: &Alloc, m: &Model) -> Vec<Owner> {
    m.owner
        .iter()
        .map(|(&f, &o)| {
            let b = a
                .table()
                .block_containing(FrameNumber(f))
                .expect("RAM frame has a block");
            match b.flags.state() {
                s if s == FrameFlags::FREE => Owner::Free,
                s if s == FrameFlags::ALLOCATED => o, // ids are the model's; state checked below
                _ => Owner::Reserved,
            }
        })
        .collect()
}

fn check(a: &Alloc, m: &Model) -> Result<(), TestCaseError> {
    a.check_consistency().map_err(TestCaseError::fail)?;
    let seen = observed(a, m);
    for ((&f, &o), s) in m.owner.iter().zip(&seen) {
        let model_alloc = matches!(o, Owner::Allocated(_));
        let seen_alloc = matches!(s, Owner::Allocated(_));
        prop_assert!(
            model_alloc == seen_alloc && (o == Owner::Free) == (*s == Owner::Free),
            "frame {f:#x}: model {o:?}, allocator {s:?}"
        );
    }
    let count = |want: fn(&Owner) -> bool| m.owner.values().filter(|o| want(o)).count() as u64;
    let st = a.stats();
    prop_assert_eq!(st.free, count(|o| *o == Owner::Free));
    prop_assert_eq!(st.allocated, count(|o| matches!(o, Owner::Allocated(_))));
    prop_assert_eq!(st.reserved, count(|o| *o == Owner::Reserved));
    Ok(())
}

fn apply(a: &mut Alloc, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let before: Vec<Block> = a.table().blocks().collect();
    let unchanged = |a: &Alloc| a.table().blocks().collect::<Vec<_>>() == before;
    match *op {
        Op::Alloc(order) => match a.alloc(order) {
            Ok(f) => {
                prop_assert!(order <= MAX_ORDER);
                let r = FrameRange::new(f, 1 << order).unwrap();
                prop_assert_eq!(f.0 % (1 << order), 0, "block not aligned");
                prop_assert!(m.all_free(r), "handed out a frame that is not free: {}", r);
                let id = m.next_id;
                m.next_id += 1;
                m.set(r, Owner::Allocated(id));
                m.live.push((id, r, Some(order)));
            }
            Err(Error::InvalidOrder(o)) => prop_assert!(o > MAX_ORDER),
            Err(e) => {
                prop_assert_eq!(e, Error::OutOfMemory(order));
                prop_assert!(
                    !m.has_free_block(order),
                    "order-{} alloc failed with a free block",
                    order
                );
                prop_assert!(unchanged(a));
            }
        },
        Op::Free(i) | Op::FreeRange(i) if !m.live.is_empty() => {
            let k = i % m.live.len();
            let (_, r, order) = m.live[k];
            let fail = |e: Error| TestCaseError::fail(e.to_string());
            match (order, op) {
                (Some(o), Op::Free(_)) => {
                    a.free(r.start, o).map_err(fail)?;
                    m.freed.push((r.start, o));
                }
                (Some(_), _) => {
                    let res = a.free_range(r);
                    prop_assert_eq!(
                        res,
                        Err(Error::NotARange(r.start)),
                        "free_range of an alloc block"
                    );
                    prop_assert!(unchanged(a));
                    return Ok(());
                }
                (None, Op::Free(_)) => {
                    let b = a.table().block_containing(r.start).unwrap();
                    let res = a.free(r.start, b.order);
                    prop_assert_eq!(
                        res,
                        Err(Error::RangeAllocation(r.start)),
                        "free of a range block"
                    );
                    prop_assert!(unchanged(a));
                    return Ok(());
                }
                (None, _) => a.free_range(r).map_err(fail)?,
            }
            m.live.swap_remove(k);
            m.set(r, Owner::Free);
        }
        Op::BadFree(i, kind) => {
            let target = match kind {
                0 if !m.freed.is_empty() => m.freed[i % m.freed.len()],
                1 if !m.live.is_empty() => {
                    let (_, r, o) = m.live[i % m.live.len()];
                    (r.start, o.map_or(MAX_ORDER, |o| (o + 1) % (MAX_ORDER + 1)))
                }
                2 if !m.live.is_empty() => {
                    let (_, r, _) = m.live[i % m.live.len()];
                    (FrameNumber(r.end.0 - 1), 0)
                }
                _ => (FrameNumber(i as u64 % 10_000), (i % 11) as u32),
            };
            // A frame freed earlier may have been handed out again: then the free is
            // legitimate only if it names that allocation exactly, which we skip.
            let legit = m
                .live
                .iter()
                .any(|&(_, r, o)| r.start == target.0 && o == Some(target.1));
            if !legit {
                prop_assert!(
                    a.free(target.0, target.1).is_err(),
                    "bad free of {:?} accepted",
                    target
                );
                prop_assert!(unchanged(a), "bad free changed the allocator");
            }
        }
        Op::AllocRange {
            frames,
            align_log,
            limit_pct,
        } => {
            let align = 1 << align_log;
            let span = m.ranges.last().unwrap().end.0;
            let limit = span * limit_pct / 100;
            let expected = m.highest_run(frames, align, limit);
            match a.alloc_range(frames, align, FrameNumber(limit), FrameFlags::ALLOCATED) {
                Ok(r) => {
                    prop_assert_eq!(
                        Some(r),
                        expected,
                        "alloc_range did not take the highest fit"
                    );
                    let id = m.next_id;
                    m.next_id += 1;
                    m.set(r, Owner::Allocated(id));
                    m.live.push((id, r, None));
                }
                Err(e) => {
                    prop_assert!(
                        expected.is_none(),
                        "alloc_range failed ({}) but {:?} fits",
                        e,
                        expected
                    );
                    prop_assert!(unchanged(a));
                }
            }
        }
        Op::Reserve {
            at_pct,
            frames,
            poison,
        } => {
            let span = m.ranges.last().unwrap().end.0;
            let r = FrameRange::new(FrameNumber(span * at_pct / 100), frames).unwrap();
            let flags = if poison {
                FrameFlags::POISONED
            } else {
                FrameFlags::RESERVED
            };
            let ok = m.all_free(r);
            prop_assert_eq!(
                a.reserve(r, flags).is_ok(),
                ok,
                "reserve {} with model free={}",
                r,
                ok
            );
            if ok {
                m.set(r, Owner::Reserved);
                m.reserves.push((r, flags));
            } else {
                prop_assert!(unchanged(a));
            }
        }
        Op::PinAndFree(i) if !m.live.is_empty() => {
            let (_, r, order) = m.live[i % m.live.len()];
            let table = a.table().clone();
            let pin = table.pin(FrameNumber(r.end.0 - 1).addr(), 1).unwrap();
            let res = match order {
                Some(o) => a.free(r.start, o),
                None => a.free_range(r),
            };
            prop_assert!(
                matches!(res, Err(Error::Pinned(_))),
                "freed a pinned block: {:?}",
                res
            );
            prop_assert!(unchanged(a));
            drop(pin);
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_the_model(ranges in layout(), ops in prop::collection::vec(op(), 1..120)) {
        let mut a = new_alloc(&ranges);
        let mut m = Model::new(&ranges);
        for op in &ops {
            apply(&mut a, &mut m, op)?;
            check(&a, &m)?;
        }
        // Freeing everything coalesces back to the canonical tiling: that of a
        // fresh allocator with the same reservations.
        for (_, r, order) in std::mem::take(&mut m.live) {
            match order {
                Some(o) => a.free(r.start, o).unwrap(),
                None => a.free_range(r).unwrap(),
            }
            m.set(r, Owner::Free);
        }
        check(&a, &m)?;
        let mut fresh = new_alloc(&ranges);
        for (r, flags) in &m.reserves {
            fresh.reserve(*r, *flags).unwrap();
        }
        let got: Vec<Block> = a.table().blocks().collect();
        let want: Vec<Block> = fresh.table().blocks().collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(a.stats().free, fresh.stats().free);
    }
}
