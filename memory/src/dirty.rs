//! Dirty frame log: one bit per RAM frame, set when a device writes the frame
//! (DMA bypasses KVM's own dirty log) and collected by `take`.
//!
//! The bits live in the caller's `[AtomicU64]` (a zeroed mapping on the host,
//! committed only where devices write), indexed like the frame metadata: bit
//! `i` of the log is the frame at metadata index `i` of the `FrameMap`.
//! Marking is lock-free (`&self`, any device thread); a word is only written
//! when it gains a bit.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{FrameNumber, FrameRange, PhysAddr};
use crate::table::{Error, FrameMap, covering};

/// One dirty bit per RAM frame.
pub struct DirtyLog<B> {
    map: FrameMap,
    bits: B,
}

impl<B: AsRef<[AtomicU64]>> DirtyLog<B> {
    /// Words needed for the RAM of `map`.
    pub fn words_for(map: &FrameMap) -> usize {
        map.total_frames().div_ceil(64) as usize
    }

    /// A log over the RAM of `map`; `bits` holds [`Self::words_for`] zeroed
    /// words (more are ignored).
    pub fn new(map: FrameMap, bits: B) -> Result<Self, Error> {
        let need = Self::words_for(&map);
        if bits.as_ref().len() < need {
            return Err(Error::MetadataLength {
                expected: need as u64 * 64,
                actual: bits.as_ref().len() as u64 * 64,
            });
        }
        Ok(DirtyLog { map, bits })
    }

    /// Marks every frame of `[addr, addr + len)` dirty; fails, marking
    /// nothing, unless the range is non-empty contiguous RAM.
    #[inline]
    pub fn mark(&self, addr: PhysAddr, len: u64) -> Result<(), Error> {
        let range = covering(addr, len)?;
        // Nearly always inside one range: one lookup.
        if let Some(ri) = self.map.range_index(range.start)
            && range.end <= self.map.range_at(ri).end
        {
            let first = self.map.index_in(ri, range.start) as u64;
            self.set_bits(first, first + range.len());
            return Ok(());
        }
        if !self.map.is_contiguous_ram(&range) {
            return Err(Error::NotRam(range));
        }
        // Contiguous RAM has contiguous metadata indices.
        let first = self.map.index(range.start).expect("checked RAM") as u64;
        self.set_bits(first, first + range.len());
        Ok(())
    }

    #[inline]
    fn set_bits(&self, start: u64, end: u64) {
        let words = self.bits.as_ref();
        let mut i = start;
        while i < end {
            let word = (i / 64) as usize;
            let lo = i % 64;
            let n = (end - i).min(64 - lo);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            let w = &words[word];
            // Re-marking dirty frames is the common case: test before writing.
            if w.load(Ordering::Relaxed) & mask != mask {
                w.fetch_or(mask, Ordering::AcqRel);
            }
            i += n;
        }
    }

    /// Whether `frame` is marked dirty.
    pub fn is_dirty(&self, frame: FrameNumber) -> bool {
        self.map.index(frame).is_some_and(|i| {
            self.bits.as_ref()[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
        })
    }

    /// Clears the log and reports each run of frames that was dirty, in address
    /// order. Reads one word per 64 frames; clears only words with bits set.
    pub fn take(&self, mut report: impl FnMut(FrameRange)) {
        let total = self.map.total_frames();
        let mut run: Option<FrameRange> = None;
        for (wi, w) in self.bits.as_ref()[..Self::words_for(&self.map)]
            .iter()
            .enumerate()
        {
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let index = wi as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if index >= total {
                    break;
                }
                let frame = self.map.frame_at(index as usize);
                match &mut run {
                    Some(r) if r.end == frame => r.end = FrameNumber(frame.0 + 1),
                    _ => {
                        if let Some(r) = run.take() {
                            report(r);
                        }
                        run = Some(FrameRange {
                            start: frame,
                            end: FrameNumber(frame.0 + 1),
                        });
                    }
                }
            }
        }
        if let Some(r) = run {
            report(r);
        }
    }
}

/// The runs of set bits of a plain bitmap (bit `i` of word `i / 64` is
/// item `i`, as in KVM's dirty log) as `(first, count)`, in order; nothing
/// is allocated.
pub fn bit_runs(words: &[u64]) -> BitRuns<'_> {
    BitRuns {
        words,
        word: 0,
        bits: words.first().copied().unwrap_or(0),
    }
}

/// The iterator of [`bit_runs`].
#[derive(Debug)]
pub struct BitRuns<'a> {
    words: &'a [u64],
    /// Index of the word `bits` is what is left of.
    word: usize,
    bits: u64,
}

impl BitRuns<'_> {
    /// The next set bit, cleared.
    fn next_bit(&mut self) -> Option<u64> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.words.get(self.word)?;
        }
        let i = self.word as u64 * 64 + u64::from(self.bits.trailing_zeros());
        self.bits &= self.bits - 1;
        Some(i)
    }

    /// Whether bit `i` is set (and not yet taken).
    fn peek_is(&self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        match w.cmp(&self.word) {
            core::cmp::Ordering::Equal => self.bits & (1 << b) != 0,
            core::cmp::Ordering::Greater => self.words.get(w).is_some_and(|x| x & (1 << b) != 0),
            core::cmp::Ordering::Less => false,
        }
    }
}

impl Iterator for BitRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let first = self.next_bit()?;
        let mut count = 1;
        while self.peek_is(first + count) {
            self.next_bit();
            count += 1;
        }
        Some((first, count))
    }
}

impl<B> fmt::Debug for DirtyLog<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::fr;
    use alloc::vec::Vec;

    fn log(ranges: &[FrameRange]) -> DirtyLog<Vec<AtomicU64>> {
        let map = FrameMap::new(ranges).unwrap();
        let words = (0..DirtyLog::<Vec<AtomicU64>>::words_for(&map))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyLog::new(map, words).unwrap()
    }

    #[test]
    fn bit_runs_join_adjacent_bits_across_words() {
        let mut words = [0u64; 3];
        for i in [0, 1, 2, 63, 64, 65, 130] {
            words[i / 64] |= 1 << (i % 64);
        }
        let runs = |w: &[u64]| bit_runs(w).collect::<Vec<_>>();
        assert_eq!(runs(&words), [(0, 3), (63, 3), (130, 1)]);
        assert!(runs(&[0, 0]).is_empty() && runs(&[]).is_empty());
        assert_eq!(runs(&[u64::MAX, u64::MAX]), [(0, 128)]);
        assert_eq!(runs(&[0, 1 << 63, 1]), [(127, 2)]);
    }

    #[test]
    fn take_reports_runs_split_at_holes_and_clears() {
        let d = log(&[fr(0, 16), fr(32, 48)]);
        d.mark(PhysAddr(0x1000), 0x2000).unwrap();
        d.mark(PhysAddr(0xf000), 1).unwrap();
        d.mark(PhysAddr(0x20000), 1).unwrap();
        assert!(d.is_dirty(FrameNumber(2)) && !d.is_dirty(FrameNumber(3)));
        let mut runs = Vec::new();
        d.take(|r| runs.push(r));
        assert_eq!(runs, [fr(1, 3), fr(15, 16), fr(32, 33)]);
        runs.clear();
        d.take(|r| runs.push(r));
        assert!(runs.is_empty());
    }

    #[test]
    fn mark_rejects_ranges_outside_ram_and_marks_nothing() {
        let d = log(&[fr(0, 16), fr(32, 48)]);
        assert_eq!(
            d.mark(PhysAddr(0xf000), 0x2000).unwrap_err(),
            Error::NotRam(fr(15, 17))
        );
        assert!(d.mark(PhysAddr(0x10000), 1).is_err());
        assert!(d.mark(PhysAddr(u64::MAX), 2).is_err());
        assert!(d.mark(PhysAddr(0), 0).is_err());
        let mut runs = Vec::new();
        d.take(|r| runs.push(r));
        assert!(runs.is_empty());
    }

    #[test]
    fn mark_spanning_many_words_sets_exactly_its_bits() {
        let d = log(&[fr(0, 1000)]);
        d.mark(PhysAddr(63 << 12), 130 << 12).unwrap();
        let mut runs = Vec::new();
        d.take(|r| runs.push(r));
        assert_eq!(runs, [fr(63, 193)]);
    }

    #[test]
    fn adjacent_ranges_give_one_run() {
        let d = log(&[fr(0, 16), fr(16, 20)]);
        d.mark(PhysAddr(0xe000), 0x4000).unwrap();
        let mut runs = Vec::new();
        d.take(|r| runs.push(r));
        assert_eq!(runs, [fr(14, 18)]);
    }
}
