//! The receive queue (virtio 1.2 §5.1.6.3, §5.1.6.4): frames are read from
//! the backend straight into a receive chain's buffers, header included; the
//! device sets `num_buffers` (1 without MRG_RXBUF, §5.1.6.4.1).
//!
//! - A receive chain must be device-writable and hold at least the 12-byte
//!   header (§5.1.6.3.1); another is returned unused (used length 0) and
//!   counted, so a header never spans chains.
//! - A frame longer than its chain: without MRG_RXBUF it is dropped and
//!   counted, and the chain kept for the next frame; with it, the part past
//!   the first chain lands in the spill buffer (one frame, allocated at
//!   activation) and is copied into further chains, which are returned
//!   together once the frame is whole. If the guest has no more buffers yet,
//!   the frame waits and the TAP is not watched until the guest posts some;
//!   if every entry of the ring is already holding part of it, it can never
//!   fit: its chains are returned unused and it is counted as too large.
//! - No receive buffer at all: the TAP is no longer watched (counted), and
//!   watched again when the guest notifies the receive queue. Frames wait in
//!   the TAP meanwhile; a flood costs minivmm nothing.
//! - A chain popped while the TAP had nothing waits for the next frame.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU16, Ordering};

use memory::GuestFrames;
use vm_memory::{GuestAddress, VolatileMemory};

use super::{HEADER_SIZE, MAX_FRAME, Net, add, bump};
use crate::rate_limiter;
use crate::virtio::{BATCH_BYTES, BATCH_CHAINS, DescriptorChain, Processed, Queue, QueueError};

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: u64 = 10;

/// The receive side's state.
#[derive(Debug, Default)]
pub(super) struct Rx {
    mergeable: bool,
    /// Popped while the backend had nothing: filled first next time.
    pub(super) next: Option<DescriptorChain>,
    /// The chains of a frame being delivered, with the bytes each holds.
    pub(super) held: Vec<(DescriptorChain, u32)>,
    /// What of that frame is still in `spill`, and its whole length.
    tail: Range<usize>,
    frame_len: usize,
    /// Not watching the backend: waiting for receive buffers.
    waiting: bool,
    spill: Vec<u8>,
    segments: Vec<(GuestAddress, usize)>,
}

impl Rx {
    /// At DRIVER_OK: whether MRG_RXBUF was negotiated; the spill buffer is
    /// allocated once, here, not before the device is used.
    pub(super) fn activate(&mut self, mergeable: bool) {
        self.mergeable = mergeable;
        if self.spill.is_empty() {
            self.spill = vec![0; HEADER_SIZE + MAX_FRAME];
        }
        self.waiting = false;
    }

    /// Whether the backend is not to be watched now.
    pub(super) fn waiting(&self) -> bool {
        self.waiting
    }

    /// The guest posted receive buffers: watch the backend again.
    pub(super) fn resume(&mut self) {
        self.waiting = false;
    }

    /// Gives every chain held back to `queue`, newest first, for a snapshot:
    /// the chain waiting for a frame, or those of a frame partly delivered
    /// (which is dropped: the guest never saw it).
    pub(super) fn give_back(
        &mut self,
        queue: &mut Queue,
        metrics: &super::NetMetrics,
    ) -> Result<(), QueueError> {
        if let Some(chain) = self.next.take() {
            queue.unpop(chain)?;
        }
        if !self.held.is_empty() {
            bump(&metrics.rx_dropped_at_snapshot);
        }
        while let Some((chain, _)) = self.held.pop() {
            queue.unpop(chain)?;
        }
        self.tail = 0..0;
        // The chains are available again: if the VM resumes, the TAP must
        // be watched (the guest will not notify for them a second time).
        self.waiting = false;
        Ok(())
    }

    /// Drops every chain held (a reset: they are from an old generation).
    pub(super) fn reset(&mut self) {
        self.next = None;
        self.held.clear();
        self.tail = 0..0;
        self.waiting = false;
        self.mergeable = false;
    }
}

impl Net {
    /// Delivers at most one batch of frames from the backend.
    pub(super) fn receive(
        &mut self,
        queue: &mut Queue,
        frames: &GuestFrames,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        if !self.rx.tail.is_empty() && !self.deliver_tail(queue, frames, &mut done)? {
            return Ok(done);
        }
        let (mut count, mut bytes) = (0, 0u64);
        while count < BATCH_CHAINS && bytes < BATCH_BYTES {
            if !rate_limiter::allows(
                &mut self.rx_limiter,
                &self.metrics.rx_rate_limiter_throttled,
            ) {
                // The TAP is not watched until the limiter's timer fires.
                return Ok(done);
            }
            count += 1;
            let chain = match self.rx.next.take() {
                Some(chain) => chain,
                None => match self.rx_chain(queue, frames, &mut done)? {
                    Some(chain) => chain,
                    None => {
                        self.stop_watching();
                        return Ok(done);
                    }
                },
            };
            let cap = chain.writable_len() as usize;
            self.rx.segments.clear();
            let _ = chain
                .writer()
                .take_segments(cap as u64, &mut self.rx.segments);
            let read = self
                .backend
                .read_frame(frames, &self.rx.segments, &mut self.rx.spill);
            let n = match read {
                Ok(n) => n,
                Err(e) => {
                    self.rx.next = Some(chain);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        // Not watched again until the guest posts buffers:
                        // a broken TAP must not spin the loop.
                        bump(&self.metrics.tap_read_errors);
                        self.log_once(4, format_args!("TAP read failed: {e}"));
                        self.rx.waiting = true;
                    }
                    return Ok(done);
                }
            };
            if n < HEADER_SIZE {
                bump(&self.metrics.tap_read_errors);
                self.rx.next = Some(chain);
                continue;
            }
            bytes += n as u64;
            rate_limiter::charge(&mut self.rx_limiter, (n - HEADER_SIZE) as u64);
            if n <= cap {
                set_num_buffers(&chain, frames, 1);
                queue.add_used(frames, chain, n as u32)?;
                self.count_rx(n);
                done.used = true;
            } else if !self.rx.mergeable {
                bump(&self.metrics.rx_too_large);
                self.log_once(
                    5,
                    format_args!("a {n}-byte frame does not fit a {cap}-byte receive buffer"),
                );
                self.rx.next = Some(chain);
            } else {
                self.rx.held.push((chain, cap as u32));
                self.rx.tail = 0..n - cap;
                self.rx.frame_len = n;
                if !self.deliver_tail(queue, frames, &mut done)? {
                    bump(&self.metrics.rx_deferred);
                    return Ok(done);
                }
            }
        }
        // The budget ran out: the TAP (level-triggered) or the re-armed
        // receive queue brings the next batch.
        done.more = true;
        Ok(done)
    }

    fn count_rx(&self, n: usize) {
        bump(&self.metrics.rx_packets);
        add(&self.metrics.rx_bytes, (n - HEADER_SIZE) as u64);
    }

    fn stop_watching(&mut self) {
        if !self.rx.waiting {
            self.rx.waiting = true;
            bump(&self.metrics.rx_no_buffers);
        }
    }

    /// The next usable receive chain, returning unusable ones (used length
    /// 0); `None` when the guest has offered nothing more.
    fn rx_chain(
        &mut self,
        queue: &mut Queue,
        frames: &GuestFrames,
        done: &mut Processed,
    ) -> Result<Option<DescriptorChain>, QueueError> {
        for _ in 0..BATCH_CHAINS {
            match queue.pop(frames) {
                Ok(Some(chain))
                    if chain.readable_len() > 0 || chain.writable_len() < HEADER_SIZE as u64 =>
                {
                    bump(&self.metrics.rx_bad_buffer);
                    self.log_once(
                        6,
                        format_args!("receive chain device-readable or under {HEADER_SIZE} bytes"),
                    );
                    queue.add_used(frames, chain, 0)?;
                    done.used = true;
                }
                Ok(next) => return Ok(next),
                Err(QueueError::BadChain { .. }) => {
                    bump(&self.metrics.bad_chain);
                    done.used = true;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Continues the frame whose rest is in the spill buffer into further
    /// chains. True once it is whole and returned; false when the guest has
    /// no more buffers yet (the backend is then not watched).
    fn deliver_tail(
        &mut self,
        queue: &mut Queue,
        frames: &GuestFrames,
        done: &mut Processed,
    ) -> Result<bool, QueueError> {
        while !self.rx.tail.is_empty() {
            let chain = match self.rx.next.take() {
                Some(chain) => chain,
                None => match self.rx_chain(queue, frames, done)? {
                    Some(chain) => chain,
                    None if queue.in_flight() == queue.size() => {
                        // Every entry of the ring holds part of this frame:
                        // the guest's buffers can never hold it.
                        for (chain, _) in self.rx.held.drain(..) {
                            queue.add_used(frames, chain, 0)?;
                        }
                        self.rx.tail = 0..0;
                        bump(&self.metrics.rx_too_large);
                        done.used = true;
                        return Ok(true);
                    }
                    None => {
                        self.rx.waiting = true;
                        return Ok(false);
                    }
                },
            };
            let n = (chain.writable_len() as usize).min(self.rx.tail.len());
            let part = &self.rx.spill[self.rx.tail.start..self.rx.tail.start + n];
            let _ = chain.writer().write_all(frames, part);
            self.rx.tail.start += n;
            self.rx.held.push((chain, n as u32));
        }
        let buffers = self.rx.held.len() as u16;
        if let Some((first, _)) = self.rx.held.first() {
            set_num_buffers(first, frames, buffers);
        }
        for (chain, len) in self.rx.held.drain(..) {
            queue.add_used(frames, chain, len)?;
        }
        self.count_rx(self.rx.frame_len);
        done.used = true;
        Ok(true)
    }
}

/// Sets `num_buffers` in the header at the start of `chain` (which holds at
/// least the header, just written by the backend's read).
fn set_num_buffers(chain: &DescriptorChain, frames: &GuestFrames, n: u16) {
    // Nearly always the header lies in the first buffer: one store, and no
    // marking (the read that wrote the header marked its frame dirty).
    if let Some(first) = chain.writable().first()
        && u64::from(first.len) >= HEADER_SIZE as u64
        && let Some(s) = frames.slice(GuestAddress(first.addr.0 + NUM_BUFFERS), 2)
    {
        match s.get_atomic_ref::<AtomicU16>(0) {
            Ok(word) => word.store(n.to_le(), Ordering::Relaxed),
            Err(_) => s.copy_from(&n.to_le_bytes()),
        }
        return;
    }
    let mut writer = chain.writer();
    let _ = writer
        .skip(NUM_BUFFERS)
        .and_then(|()| writer.write_all(frames, &n.to_le_bytes()));
}
