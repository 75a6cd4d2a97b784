//! Helpers shared by the crate's unit tests.

use alloc::vec::Vec;

use crate::addr::{FrameNumber, FrameRange};
use crate::meta::FrameMeta;

/// Frames `[start, end)`.
pub(crate) fn fr(start: u64, end: u64) -> FrameRange {
    FrameRange {
        start: FrameNumber(start),
        end: FrameNumber(end),
    }
}

/// Fresh metadata for the frames of `ranges`.
pub(crate) fn meta_for(ranges: &[FrameRange]) -> Vec<FrameMeta> {
    let n: u64 = ranges.iter().map(FrameRange::len).sum();
    (0..n).map(|_| FrameMeta::new()).collect()
}

/// The canonical tiling of frames `[3, 2053)`: `(head, order)` of each block,
/// what a fresh allocator (or an untouched table) holds.
pub(crate) const TILING_3_2053: [(u64, u32); 12] = [
    (3, 0),
    (4, 2),
    (8, 3),
    (16, 4),
    (32, 5),
    (64, 6),
    (128, 7),
    (256, 8),
    (512, 9),
    (1024, 10),
    (2048, 2),
    (2052, 0),
];
