use super::*;

fn bucket(size: u64, burst: u64, refill_time_ms: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: burst,
        refill_time_ms,
    }
}

fn ops(size: u64, refill_time_ms: u64) -> RateLimiter {
    RateLimiter::new(RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(size, 0, refill_time_ms)),
    })
    .unwrap()
}

/// How many operations of `bytes` the limiter lets through between `start`
/// and `start + span`, asked every millisecond.
fn allowed_over(l: &mut RateLimiter, start: Instant, span: Duration, bytes: u64) -> u64 {
    let mut n = 0;
    let mut t = Duration::ZERO;
    while t <= span {
        while l.allow_at(start + t) {
            l.charge(bytes);
            n += 1;
        }
        t += Duration::from_millis(1);
    }
    n
}

#[test]
fn a_bucket_of_size_or_refill_zero_limits_nothing() {
    assert!(TokenBucket::new(bucket(0, 5, 100)).is_none());
    assert!(TokenBucket::new(bucket(10, 0, 0)).is_none());
    let config = RateLimiterConfig {
        bandwidth: Some(bucket(0, 0, 100)),
        ops: None,
    };
    assert!(config.is_unlimited());
    let mut l = RateLimiter::new(config).unwrap();
    let now = Instant::now();
    for _ in 0..10_000 {
        assert!(l.allow_at(now));
        l.charge(1 << 30);
    }
    assert_eq!(l.metrics().throttled, 0);
}

#[test]
fn ops_bucket_lets_its_size_through_then_its_rate() {
    // 10 operations per second: 10 at once, then one per 100 ms.
    let mut l = ops(10, 1000);
    let start = Instant::now();
    assert_eq!(allowed_over(&mut l, start, Duration::ZERO, 0), 10);
    assert!(l.is_blocked());
    assert_eq!(l.metrics().throttled, 1);
    // Over the next 2 s: 20 more (t = 100, 200, ... 2000 ms).
    let more = allowed_over(
        &mut l,
        start + Duration::from_millis(1),
        Duration::from_millis(1999),
        0,
    );
    assert_eq!(more, 20);
}

#[test]
fn bandwidth_debt_is_repaid_before_the_next_request() {
    // 1000 bytes per 100 ms; a 2500-byte request goes through whole, then
    // the bucket owes 1500 bytes: nothing more for 150 ms.
    let mut l = RateLimiter::new(RateLimiterConfig {
        bandwidth: Some(bucket(1000, 0, 100)),
        ops: None,
    })
    .unwrap();
    let t0 = Instant::now();
    assert!(l.allow_at(t0));
    l.charge(2500);
    assert!(!l.allow_at(t0 + Duration::from_millis(150)));
    assert!(l.allow_at(t0 + Duration::from_micros(150_100)));
}

#[test]
fn long_run_rate_matches_the_bucket() {
    // 64 KiB per 50 ms with 4 KiB requests, over 5 s: the bucket's size at
    // the start plus 5000 / 50 refills, within one request.
    let mut l = RateLimiter::new(RateLimiterConfig {
        bandwidth: Some(bucket(64 << 10, 0, 50)),
        ops: None,
    })
    .unwrap();
    let n = allowed_over(&mut l, Instant::now(), Duration::from_secs(5), 4096);
    let expected = (64 << 10) * (1 + 5000 / 50) / 4096;
    assert!(
        n.abs_diff(expected) <= 1,
        "{n} requests, expected {expected}"
    );
}

#[test]
fn one_time_burst_is_spent_first_and_not_refilled() {
    let mut l = RateLimiter::new(RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(2, 3, 1000)),
    })
    .unwrap();
    let t0 = Instant::now();
    assert_eq!(allowed_over(&mut l, t0, Duration::ZERO, 0), 5);
    // A full refill brings back the bucket, not the burst.
    let later = t0 + Duration::from_secs(10);
    assert_eq!(allowed_over(&mut l, later, Duration::ZERO, 0), 2);
}

#[test]
fn refill_keeps_fractions_of_a_token() {
    // 3 tokens per 10 ms, asked every 1 ms: earned tokens are not lost to
    // rounding (3.33 ms per token).
    let mut l = ops(3, 10);
    let n = allowed_over(&mut l, Instant::now(), Duration::from_millis(1000), 0);
    assert!((302..=304).contains(&n), "{n}");
}

#[test]
fn both_buckets_must_have_tokens() {
    let mut l = RateLimiter::new(RateLimiterConfig {
        bandwidth: Some(bucket(1 << 20, 0, 1000)),
        ops: Some(bucket(1, 0, 1000)),
    })
    .unwrap();
    let t0 = Instant::now();
    assert!(l.allow_at(t0));
    l.charge(512);
    assert!(!l.allow_at(t0), "ops empty, bandwidth not");
}

#[test]
fn refused_operation_arms_the_timer_which_then_fires_once() {
    let mut l = ops(1, 20);
    assert!(l.allow());
    l.charge(0);
    assert!(!l.allow());
    assert!(
        !l.on_timer(),
        "not fired yet: must not read (it would block)"
    );
    std::thread::sleep(Duration::from_millis(40));
    assert!(l.on_timer());
    assert!(!l.on_timer(), "read once");
    assert!(l.allow());
    assert_eq!(l.metrics().timer_wakeups, 1);
}

#[test]
fn an_armed_timer_is_not_pushed_back() {
    let mut l = ops(1, 10_000);
    assert!(l.allow());
    l.charge(0);
    l.wake_soon(); // armed at 1 ms
    assert!(!l.allow()); // would arm for 10 s: must keep the 1 ms
    std::thread::sleep(Duration::from_millis(20));
    assert!(l.on_timer());
}

#[test]
fn update_replaces_the_buckets_full() {
    let mut l = ops(1, 10_000);
    assert!(l.allow());
    l.charge(0);
    assert!(!l.allow());
    l.update(RateLimiterConfig::default());
    assert!(l.allow());
    l.update(RateLimiterConfig {
        bandwidth: None,
        ops: Some(bucket(2, 0, 10_000)),
    });
    let now = Instant::now();
    assert_eq!(allowed_over(&mut l, now, Duration::ZERO, 0), 2);
}
