//! The transmit queue (virtio 1.2 §5.1.6.2): each chain is a header and a
//! frame, device-readable only. The header is copied out of guest memory
//! first and checked on the copy (the guest may rewrite its buffer while the
//! device reads it); the backend gets the copy and the frame's guest bytes
//! in one write.
//!
//! Checks (§5.1.6.2.1, and what a TAP would act on):
//! - flags: only NEEDS_CSUM, and only with VIRTIO_NET_F_CSUM; its
//!   `csum_start + csum_offset + 2` inside the frame;
//! - gso_type: NONE, or TCPV4 / TCPV6 / UDP with HOST_TSO4 / HOST_TSO6 /
//!   HOST_UFO negotiated, with NEEDS_CSUM, a non-zero `gso_size` and
//!   `hdr_len` inside the frame; the ECN bit never (HOST_ECN is not offered).
//!
//! `num_buffers` is ignored (the driver sets it to 0).

use memory::GuestFrames;
use virtio_bindings::virtio_net::*;
use vm_memory::GuestAddress;

use super::{HEADER_SIZE, Net, add, bump};
use crate::rate_limiter;
use crate::virtio::{BATCH_BYTES, BATCH_CHAINS, DescriptorChain, Processed, Queue, QueueError};

/// Why a transmit header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Flags other than NEEDS_CSUM, or it without VIRTIO_NET_F_CSUM.
    Flags(u8),
    /// The checksum offsets outside the frame.
    Checksum,
    /// A GSO type that was not negotiated (or is unknown).
    GsoType(u8),
    /// GSO without NEEDS_CSUM, a zero segment size or headers past the frame.
    Gso,
}

/// Checks the copy `h` of a transmit header for a frame of `frame_len`
/// bytes, with features `acked`.
pub fn check_header(
    h: &[u8; HEADER_SIZE],
    frame_len: usize,
    acked: u64,
) -> Result<(), HeaderError> {
    let has = |bit: u32| acked & (1 << bit) != 0;
    let word = |at: usize| usize::from(u16::from_le_bytes([h[at], h[at + 1]]));
    let (flags, gso_type) = (h[0], h[1]);
    let (hdr_len, gso_size) = (word(2), word(4));
    let (csum_start, csum_offset) = (word(6), word(8));
    let needs_csum = u32::from(flags) == VIRTIO_NET_HDR_F_NEEDS_CSUM;
    if (flags != 0 && !needs_csum) || (needs_csum && !has(VIRTIO_NET_F_CSUM)) {
        return Err(HeaderError::Flags(flags));
    }
    if needs_csum && csum_start + csum_offset + 2 > frame_len {
        return Err(HeaderError::Checksum);
    }
    let feature = match u32::from(gso_type) {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
        _ => return Err(HeaderError::GsoType(gso_type)),
    };
    if !has(feature) {
        return Err(HeaderError::GsoType(gso_type));
    }
    if !needs_csum || gso_size == 0 || hdr_len > frame_len {
        return Err(HeaderError::Gso);
    }
    Ok(())
}

/// Frames checked before any is written: the writes then follow one another
/// with nothing between them but the next write (a system call costs the
/// code after it much of the CPU's predictions and caches: measured here,
/// one per frame between the device's steps cost 20 ns of its 45).
const SEND_BATCH: usize = 32;

/// A checked frame waiting to be written.
#[derive(Debug)]
pub(super) struct Checked {
    chain: DescriptorChain,
    header: [u8; HEADER_SIZE],
    /// Its pieces in `Tx::segments`, and the frame's length.
    segments: std::ops::Range<usize>,
    frame_len: usize,
}

/// The transmit side's scratch state.
#[derive(Debug, Default)]
pub(super) struct Tx {
    segments: Vec<(GuestAddress, usize)>,
    pub(super) checked: Vec<Checked>,
    written: Vec<bool>,
}

impl Net {
    /// Sends at most one batch of the guest's frames: sub-batches of
    /// [`SEND_BATCH`] chains popped and checked, then written, then returned.
    pub(super) fn transmit(
        &mut self,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        let (mut chains, mut bytes) = (0, 0u64);
        loop {
            if chains >= BATCH_CHAINS || bytes >= BATCH_BYTES {
                done.more = queue.has_available(frames)?;
                return Ok(done);
            }
            let checked = self.check_some(queue, frames, &mut done, &mut chains);
            // What was checked is sent even when the queue then turned out
            // corrupt: no chain outlives this call.
            bytes += self.send_checked(queue, frames)?;
            if checked? {
                return Ok(done);
            }
        }
    }

    /// Pops and checks up to [`SEND_BATCH`] chains (within the batch's
    /// budget); refused ones are returned at once. True when the driver has
    /// offered nothing more.
    fn check_some(
        &mut self,
        queue: &mut Queue,
        frames: &GuestFrames,
        done: &mut Processed,
        chains: &mut usize,
    ) -> Result<bool, QueueError> {
        self.tx.segments.clear();
        while self.tx.checked.len() < SEND_BATCH && *chains < BATCH_CHAINS {
            let throttled = &self.metrics.tx_rate_limiter_throttled;
            if !rate_limiter::allows_next(&mut self.tx_limiter, throttled, queue, frames)? {
                // Resumed by the limiter's timer.
                return Ok(true);
            }
            *chains += 1;
            let chain = match queue.pop(frames) {
                Ok(Some(chain)) => chain,
                Ok(None) => return Ok(true),
                Err(QueueError::BadChain { .. }) => {
                    bump(&self.metrics.bad_chain);
                    done.used = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            done.used = true;
            let checked = self.check(&chain, frames);
            let frame_len = checked.map_or(0, |(_, len)| len);
            rate_limiter::charge(&mut self.tx_limiter, frame_len as u64);
            match checked {
                Some((header, frame_len)) => {
                    let from = self.tx.segments.len();
                    let mut reader = chain.reader();
                    let _ = reader.skip(HEADER_SIZE as u64);
                    let _ = reader.take_segments(frame_len as u64, &mut self.tx.segments);
                    let segments = from..self.tx.segments.len();
                    self.tx.checked.push(Checked {
                        chain,
                        header,
                        segments,
                        frame_len,
                    });
                }
                // Nothing is written to a transmit buffer: used length 0.
                None => queue.add_used(frames, chain, 0)?,
            }
        }
        Ok(false)
    }

    /// Writes the checked frames one after the other, then counts them and
    /// returns their chains; the frames' bytes.
    fn send_checked(&mut self, queue: &mut Queue, frames: &GuestFrames) -> Result<u64, QueueError> {
        let Tx {
            segments,
            checked,
            written,
        } = &mut self.tx;
        written.clear();
        let mut failure = None;
        for c in checked.iter() {
            let result = self
                .backend
                .write_frame(frames, &c.header, &segments[c.segments.clone()]);
            written.push(result.is_ok());
            if let Err(e) = result {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            self.log_once(3, format_args!("TAP write failed: {e}"));
        }
        let mut bytes = 0;
        for (c, &ok) in self.tx.checked.drain(..).zip(self.tx.written.iter()) {
            if ok {
                bump(&self.metrics.tx_packets);
                add(&self.metrics.tx_bytes, c.frame_len as u64);
                bytes += c.frame_len as u64;
            } else {
                bump(&self.metrics.tap_write_errors);
            }
            queue.add_used(frames, c.chain, 0)?;
        }
        Ok(bytes)
    }

    /// Checks one chain's layout and header (read into a copy first); the
    /// header and the frame's length, or `None` (dropped and counted).
    fn check(
        &mut self,
        chain: &DescriptorChain,
        frames: &GuestFrames,
    ) -> Option<([u8; HEADER_SIZE], usize)> {
        if chain.writable_len() > 0 {
            bump(&self.metrics.tx_bad_layout);
            self.log_once(
                0,
                format_args!("transmit chain with device-writable buffers"),
            );
            return None;
        }
        let len = chain.readable_len() as usize;
        if len < HEADER_SIZE {
            bump(&self.metrics.tx_short);
            self.log_once(
                1,
                format_args!("transmit chain of {len} bytes, shorter than its header"),
            );
            return None;
        }
        // The chain holds `len` >= HEADER_SIZE readable bytes.
        let header: [u8; HEADER_SIZE] = chain.reader().read_array(frames).unwrap_or_default();
        let frame_len = len - HEADER_SIZE;
        if let Err(e) = check_header(&header, frame_len, self.acked) {
            bump(&self.metrics.tx_bad_header);
            self.log_once(2, format_args!("transmit header refused: {e:?}"));
            return None;
        }
        Some((header, frame_len))
    }
}
