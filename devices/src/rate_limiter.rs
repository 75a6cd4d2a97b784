//! Rate limiters for device queues: Firecracker's token buckets (its API's
//! `RateLimiter` with `bandwidth` and `ops`), refilled lazily from a monotonic
//! clock and woken by a timerfd the VMM's event loop watches.
//!
//! A bucket holds up to `size` tokens and refills at `size` per
//! `refill_time_ms`; a `one_time_burst` of extra tokens is spent first and
//! never refilled. A bucket with `size` 0 or `refill_time_ms` 0 limits
//! nothing (as in Firecracker).
//!
//! Policy: an operation is allowed while every bucket it draws on has at
//! least one token, and is then charged whole, which may leave the bucket in
//! debt (a negative budget) that later refills repay first. So a request
//! larger than the bucket still goes through (after the bucket filled), the
//! long-run rate is exactly `size / refill_time`, and at any moment the
//! guest is ahead of the limit by at most one request. Firecracker instead
//! refuses a request that does not fit the tokens left; both converge on the
//! same rate.
//!
//! When an operation is refused the limiter arms its timer for the moment
//! the buckets have a token again (at least [`MIN_WAIT`] from now, so a
//! stream of small requests costs at most one wake-up per millisecond); the
//! device stops taking chains until then (no busy loop) and resumes on the
//! timer's event. The timer is never re-armed while armed and is read only
//! once it fired, so reading it never blocks the event loop.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memory::GuestFrames;
use vmm_sys_util::timerfd::TimerFd;

use crate::virtio::{Queue, QueueError};

/// The shortest wait the timer is armed for.
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// One bucket's settings (Firecracker's `TokenBucket`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens spent before the bucket's, once.
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time_ms: u64,
}

/// A limiter's settings: either bucket may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, frames).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .all(|b| b.is_none_or(|b| TokenBucket::new(b).is_none()))
    }
}

/// A token bucket, refilled from the time elapsed since its last update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    /// Tokens available; negative while the bucket is in debt.
    budget: i128,
    burst: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket, or `None` for a bucket that limits nothing.
    pub fn new(config: TokenBucketConfig) -> Option<TokenBucket> {
        if config.size == 0 || config.refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time_ms) * 1_000_000,
            budget: i128::from(config.size),
            burst: config.one_time_burst,
            last: None,
        })
    }

    /// Adds the tokens earned since the last update (at most up to `size`).
    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last else {
            self.last = Some(now);
            return;
        };
        let size = u128::from(self.size);
        let elapsed = now.saturating_duration_since(last).as_nanos();
        let earned = elapsed * size / self.refill_ns;
        if earned == 0 {
            return;
        }
        let budget = self.budget + earned as i128;
        if budget >= size as i128 {
            self.budget = size as i128;
            self.last = Some(now);
        } else {
            self.budget = budget;
            // Keep the fraction of a token already earned.
            let spent = earned * self.refill_ns / size;
            self.last = Some(last + Duration::from_nanos(spent as u64));
        }
    }

    /// Whether an operation may start now.
    fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.burst > 0 || self.budget > 0
    }

    /// Charges `tokens`: the one-time burst first, then the budget.
    fn charge(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// How long until the bucket has a token again.
    fn wait(&self, now: Instant) -> Duration {
        if self.burst > 0 || self.budget > 0 {
            return Duration::ZERO;
        }
        let missing = (1 - self.budget) as u128;
        let ns = (missing * self.refill_ns).div_ceil(u128::from(self.size));
        let due = self.last.unwrap_or(now) + Duration::from_nanos(ns.min(u64::MAX as u128) as u64);
        due.saturating_duration_since(now)
    }
}

/// Throttling counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateLimiterMetrics {
    /// Times an operation was held back (the device stopped taking chains).
    pub throttled: u64,
    /// Timer wake-ups that let the device go on.
    pub timer_wakeups: u64,
}

/// Both buckets of one queue and the timer that wakes it.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer is set and has not been read since.
    armed: bool,
    /// The last `allow` refused: the device is waiting for the timer.
    blocked: bool,
    metrics: RateLimiterMetrics,
}

impl RateLimiter {
    /// A limiter with `config`'s buckets, full.
    pub fn new(config: RateLimiterConfig) -> io::Result<RateLimiter> {
        Ok(RateLimiter {
            bandwidth: config.bandwidth.and_then(TokenBucket::new),
            ops: config.ops.and_then(TokenBucket::new),
            timer: TimerFd::new()?,
            armed: false,
            blocked: false,
            metrics: RateLimiterMetrics::default(),
        })
    }

    /// New settings (a PATCH after boot): the buckets start full; the timer
    /// stays as it is (a device waiting on it is woken as planned and finds
    /// the new buckets).
    pub fn update(&mut self, config: RateLimiterConfig) {
        self.bandwidth = config.bandwidth.and_then(TokenBucket::new);
        self.ops = config.ops.and_then(TokenBucket::new);
    }

    /// Applies `config` to the limiter in `slot`: updates it, or creates one
    /// if the config limits anything (an unlimited one is kept, idle, so its
    /// timer's descriptor stays the one the event loop watches).
    pub fn apply(slot: &mut Option<RateLimiter>, config: RateLimiterConfig) -> io::Result<()> {
        match slot {
            Some(limiter) => limiter.update(config),
            None if config.is_unlimited() => {}
            None => *slot = Some(RateLimiter::new(config)?),
        }
        Ok(())
    }

    /// The timer's descriptor, for the event loop.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Whether the device is waiting for the timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The counters.
    pub fn metrics(&self) -> RateLimiterMetrics {
        self.metrics
    }

    /// Whether an operation may start now; if not, the timer is armed for
    /// when it may, and the device must stop taking chains until
    /// [`on_timer`](RateLimiter::on_timer).
    pub fn allow(&mut self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`allow`](RateLimiter::allow) at `now`.
    pub fn allow_at(&mut self, now: Instant) -> bool {
        let (mut ready, mut wait) = (true, Duration::ZERO);
        for bucket in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            if !bucket.ready(now) {
                ready = false;
                wait = wait.max(bucket.wait(now));
            }
        }
        if ready {
            self.blocked = false;
            return true;
        }
        if !self.blocked {
            self.metrics.throttled += 1;
        }
        self.blocked = true;
        self.arm(wait.max(MIN_WAIT));
        false
    }

    /// Charges an operation of `bytes` bytes that was allowed.
    pub fn charge(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.charge(bytes);
        }
        if let Some(o) = &mut self.ops {
            o.charge(1);
        }
    }

    /// Arms the timer to fire soon (at [`MIN_WAIT`]) when it is not armed:
    /// a device whose batch budget ran out on a timer wake-up continues on
    /// the next one.
    pub fn wake_soon(&mut self) {
        self.arm(MIN_WAIT);
    }

    fn arm(&mut self, wait: Duration) {
        if self.armed {
            return;
        }
        match self.timer.reset(wait, None) {
            Ok(()) => self.armed = true,
            // Cannot happen for a valid timerfd and duration; the device then
            // resumes on the guest's next notification instead.
            Err(e) => log::warn!("cannot arm a rate limiter's timer: {e}"),
        }
    }

    /// The timer's descriptor was readable: reads it (only if it fired, so
    /// this never blocks). Returns whether the device should try again.
    pub fn on_timer(&mut self) -> bool {
        if !self.armed || self.timer.is_armed().unwrap_or(true) {
            return false;
        }
        let _ = self.timer.wait();
        self.armed = false;
        self.metrics.timer_wakeups += 1;
        true
    }
}

/// Whether the limiter in `slot` (if any) lets one more operation start;
/// a refusal is counted in `throttled` (a device's metric).
pub fn allows(slot: &mut Option<RateLimiter>, throttled: &AtomicU64) -> bool {
    let Some(limiter) = slot else {
        return true;
    };
    if limiter.allow() {
        return true;
    }
    throttled.store(limiter.metrics().throttled, Ordering::Relaxed);
    false
}

/// As [`allows`], asked only when `queue` has a chain waiting (an idle
/// queue neither arms the timer nor counts as throttled).
pub fn allows_next(
    slot: &mut Option<RateLimiter>,
    throttled: &AtomicU64,
    queue: &mut Queue,
    frames: &GuestFrames,
) -> Result<bool, QueueError> {
    if slot.is_none() || !queue.has_available(frames)? {
        return Ok(true);
    }
    Ok(allows(slot, throttled))
}

/// Charges an allowed operation of `bytes` to the limiter in `slot`.
pub fn charge(slot: &mut Option<RateLimiter>, bytes: u64) {
    if let Some(limiter) = slot {
        limiter.charge(bytes);
    }
}

/// The limiter in `slot` woke its device: whether it should go on.
pub fn fired(slot: &mut Option<RateLimiter>) -> bool {
    slot.as_mut().is_some_and(RateLimiter::on_timer)
}

/// The device's batch ran out on a timer wake-up: continue on the next.
pub fn continue_soon(slot: &mut Option<RateLimiter>, done: crate::virtio::Processed) {
    if done.more
        && let Some(limiter) = slot
    {
        limiter.wake_soon();
    }
}

#[cfg(test)]
#[path = "rate_limiter_tests.rs"]
mod tests;
