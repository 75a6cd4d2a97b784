//! Rate-limited drives (Firecracker's `rate_limiter` in a config file): the
//! test guest's block self-test runs against the same image three times,
//! unlimited, with an operations bucket and with a bandwidth bucket, side
//! by side; the time its requests take (between two of its console lines,
//! as the host sees them) follows the bucket's rate, and the metrics count
//! the throttling.
//!
//! Tolerance: a limiter lets an operation start while its bucket holds a
//! token and charges it whole, so the guest may run ahead of the rate by
//! one request; timers never fire early, so the throttled phase lasts at
//! least the bucket's time for the requests beyond its size, less the
//! console's 100 ms polling at each end. It may last longer by what the
//! guest's own work costs (measured by the unlimited run) plus slack for a
//! noisy machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::{Running, kvm_or_skip, minivmm_bin, test_guest};

/// The block self-test's first and last lines.
const FIRST: &str = "testguest: blk0: capacity";
const LAST: &str = "testguest: blk0: requests ";

struct Run {
    phase: Duration,
    requests: u64,
    metrics: Vec<Value>,
}

impl Run {
    fn total(&self, field: &str) -> u64 {
        self.metrics
            .iter()
            .map(|l| l["block_limited"][field].as_u64().unwrap_or(0))
            .sum()
    }
}

/// Boots the test guest from a config file with a read-only drive limited
/// by `limiter`; times its block self-test.
fn run(dir: &Path, name: &str, disk: &Path, limiter: Value) -> Run {
    let metrics = dir.join(format!("{name}.metrics"));
    let config = json!({
        "boot-source": {"kernel_image_path": test_guest(),
                        "boot_args": "console=ttyS0 testguest.blk=read"},
        "drives": [{"drive_id": "limited", "path_on_host": disk, "is_root_device": false,
                    "is_read_only": true, "rate_limiter": limiter}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "metrics": {"metrics_path": metrics},
    });
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, config.to_string()).unwrap();
    let mut command = Command::new(minivmm_bin());
    command.args(["--config-file", file.to_str().unwrap(), "--no-api"]);
    let mut vm = Running::start(command);
    let timeout = Duration::from_secs(90);
    assert!(
        vm.wait_for(timeout, |out| out.contains(FIRST)),
        "{}",
        vm.stdout_now()
    );
    let start = Instant::now();
    assert!(
        vm.wait_for(timeout, |out| out.contains(LAST)),
        "{}",
        vm.stdout_now()
    );
    let phase = start.elapsed();
    assert!(vm.wait_exit(timeout), "the guest did not exit");
    let outcome = vm.collect();
    outcome.line("testguest: blk0: PASS");
    let requests = outcome
        .line(LAST)
        .split(',')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("request count");
    let metrics = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Run {
        phase,
        requests,
        metrics,
    }
}

#[test]
fn rate_limited_drive_paces_the_guests_requests_at_the_bucket_rate() {
    if !kvm_or_skip("rate_limited_drive_paces_the_guests_requests_at_the_bucket_rate") {
        return;
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("minivmm-rate-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![3u8; 1 << 20]).unwrap();

    let free = run(&dir, "free", &disk, json!({}));
    assert_eq!(free.total("rate_limiter_throttled_events"), 0);

    // 5 requests per second, 5 at once: every request beyond the first 5
    // waits 200 ms for its token.
    let ops = run(
        &dir,
        "ops",
        &disk,
        json!({"ops": {"size": 5, "refill_time": 1000}}),
    );
    assert_eq!(ops.requests, free.requests);
    let expected = Duration::from_millis(200) * (ops.requests as u32 - 5);
    check_phase("ops", &ops, &free, expected);

    // 32 KiB per second, 8 KiB at once, of the 48 KiB the self-test reads.
    let bytes = free.total("bytes_read");
    let bw = run(
        &dir,
        "bandwidth",
        &disk,
        json!({"bandwidth": {"size": 8192, "refill_time": 250}}),
    );
    assert_eq!(bw.total("bytes_read"), bytes);
    // The last request (one sector) may end in debt.
    let paced = bytes - 8192 - 512;
    let expected = Duration::from_micros(paced * 1_000_000 / 32768);
    check_phase("bandwidth", &bw, &free, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The limited run's phase lasts at least `expected` (less the polling) and
/// at most the unlimited run's phase plus `expected` plus slack.
fn check_phase(name: &str, limited: &Run, free: &Run, expected: Duration) {
    let polling = Duration::from_millis(250);
    let slack = Duration::from_secs(3);
    eprintln!(
        "{name}: {:?} for {} requests, expected {expected:?} (unlimited {:?})",
        limited.phase, limited.requests, free.phase
    );
    assert!(
        limited.phase + polling >= expected,
        "{name}: {:?} is faster than the limit allows ({expected:?})",
        limited.phase
    );
    assert!(
        limited.phase <= free.phase + expected + slack,
        "{name}: {:?}, expected {expected:?} beyond {:?}",
        limited.phase,
        free.phase
    );
    assert!(limited.total("rate_limiter_throttled_events") > 0);
}
