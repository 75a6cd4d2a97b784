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
