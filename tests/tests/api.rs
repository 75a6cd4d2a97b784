//! Firecracker's API and config file end to end: a VM with a drive and a
//! network interface booted, paused, resumed and stopped through the API
//! socket only, the same VM from `--config-file --no-api`, the schema
//! errors, and hostile clients. The network part runs in a namespace of its
//! own (`tests::netns`), with the host's `ping` and `net-peer` as the peer.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::api::{ok, put_scratch_drive_and_tap, refused, request, wait_for_socket};
use tests::netns::{GUEST, Netns, finish, guest_net, net_or_skip, ping, wait_line};
use tests::{Running, minivmm_bin, test_guest};

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("minivmm-api-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A 1 MiB disk image of sevens.
    fn disk(&self) -> PathBuf {
        let p = self.path("scratch.img");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's command line: the block write test, then the network test,
/// serving pings until `bye`.
fn cmdline() -> String {
    format!(
        "console=ttyS0 testguest.blk=write {}",
        guest_net(0, ",serve=200")
    )
}

/// Every line of the metrics file, parsed.
fn metric_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The sum of counter `section.field` over every line.
fn total(lines: &[Value], section: &str, field: &str) -> u64 {
    lines
        .iter()
        .map(|l| l[section][field].as_u64().unwrap_or(0))
        .sum()
}

/// A number the guest printed after `prefix` (up to the next space or comma).
fn guest_number(outcome: &tests::Outcome, prefix: &str, after: &str) -> u64 {
    let line = outcome.line(prefix);
    let rest = line
        .split(after)
        .nth(1)
        .unwrap_or_else(|| panic!("{after} in {line}"));
    rest.split([' ', ','])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{after} in {line}"))
}

/// The largest round trip `ping` reported, in milliseconds.
fn max_rtt_ms(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix("rtt min/avg/max/mdev = "))
        .and_then(|v| v.split('/').nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rtt line in {out}"))
}

/// Checks the guest's block and network reports against the metrics file.
fn check_metrics(outcome: &tests::Outcome, metrics: &Path) {
    let lines = metric_lines(metrics);
    assert!(lines.len() >= 2, "{lines:?}");
    let prefix = "testguest: net0: frames ";
    let rx = guest_number(outcome, prefix, "rx ");
    let tx = guest_number(outcome, prefix, "tx ");
    assert_eq!(total(&lines, "net_eth0", "rx_packets"), rx, "{lines:?}");
    assert_eq!(total(&lines, "net_eth0", "tx_packets"), tx, "{lines:?}");
    assert_eq!(total(&lines, "net", "tx_packets"), tx);
    // The write test's sectors (see tests/tests/block.rs), and no errors
    // but the read past the end the guest makes on purpose.
    assert!(total(&lines, "block_scratch", "writes") >= 3, "{lines:?}");
    assert_eq!(total(&lines, "block_scratch", "bad_layout"), 0);
    assert_eq!(total(&lines, "block_scratch", "disk_swaps"), 1, "{lines:?}");
    assert!(total(&lines, "net_eth0", "rx_rate_limiter_throttled") > 0);
    assert!(total(&lines, "vcpu", "exit_io_out") > 0);
    assert!(total(&lines, "api_server", "ok") >= 8, "{lines:?}");
    assert!(
        total(&lines, "api_server", "client_errors") >= 3,
        "{lines:?}"
    );
    assert_eq!(total(&lines, "vmm", "pauses"), 1);
    assert_eq!(total(&lines, "vmm", "resumes"), 1);
}

#[test]
fn api_boots_pauses_resumes_and_stops_a_vm_with_a_drive_and_a_network_interface() {
    let test = "api_boots_pauses_resumes_and_stops";
    if !net_or_skip(test) {
        return;
    }
    let scratch = Scratch::new("boot");
    let sock = scratch.path("api.sock");
    let metrics = scratch.path("metrics.json");
    let disk = scratch.disk();
    let ns = Netns::new("api");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let mut vm = Running::start(ns.command(
        &minivmm_bin(),
        &["--api-sock", sock.to_str().unwrap(), "--id", "api-test"],
    ));
    wait_for_socket(&sock);
    let info: Value = serde_json::from_str(&ok(&sock, "GET", "/", "")).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "api-test");
    // What firecracker-go-sdk sends, in its order.
    ok(
        &sock,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128, "smt": false}"#,
    );
    let boot = serde_json::json!({
        "kernel_image_path": test_guest(),
        "boot_args": cmdline(),
    });
    ok(&sock, "PUT", "/boot-source", &boot.to_string());
    put_scratch_drive_and_tap(&sock, &disk);
    let message = refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert!(message.contains("before starting"), "{message}");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    wait_line(&mut vm, "net0: udp burst 200: ok");
    assert!(vm.stdout_now().contains("testguest: blk0: PASS"));

    // Calls in the wrong state, and bad bodies: 400, and the VM runs on.
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    refused(&sock, "PUT", "/boot-source", &boot.to_string());
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
    );
    refused(&sock, "PATCH", "/vm", r#"{"state": "Sleeping"}"#);
    let config: Value = serde_json::from_str(&ok(&sock, "GET", "/vm/config", "")).unwrap();
    assert_eq!(config["drives"][0]["drive_id"], "scratch");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);

    // Paused: no vCPU answers a ping. Resumed: every one is answered.
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let info: Value = serde_json::from_str(&ok(&sock, "GET", "/", "")).unwrap();
    assert_eq!(info["state"], "Paused");
    let (received, out) = ping(&ns, 3, 56);
    assert_eq!(received, 0, "a paused guest answered:\n{out}");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let (received, out) = ping(&ns, 5, 56);
    assert_eq!(received, 5, "{out}");
    // After boot, PATCH swaps the drive's file and sets limits; the guest
    // goes on answering through a limited interface.
    let swapped = scratch.path("swapped.img");
    std::fs::write(&swapped, vec![9u8; 2 << 20]).unwrap();
    let patch = serde_json::json!({
        "drive_id": "scratch", "path_on_host": swapped,
        "rate_limiter": {"ops": {"size": 100, "refill_time": 100}},
    });
    ok(&sock, "PATCH", "/drives/scratch", &patch.to_string());
    let message = refused(&sock, "PATCH", "/drives/nope", r#"{"drive_id": "nope"}"#);
    assert!(message.contains("No drive nope"), "{message}");
    let message = refused(
        &sock,
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch", "path_on_host": "/nonexistent.img"}"#,
    );
    assert!(message.contains("/nonexistent.img"), "{message}");
    let message = refused(
        &sock,
        "PATCH",
        "/drives/scratch",
        r#"{"drive_id": "scratch", "rate_limiter": {"bandwidth": {"size": 10, "refill_time": 0}}}"#,
    );
    assert!(message.contains("refill_time"), "{message}");
    // Two frames a second to the guest: five pings 200 ms apart are all
    // answered, the last over a second late; without the limit, promptly.
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1000, "refill_time": 100}},
            "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 500}}}"#,
    );
    let config: Value = serde_json::from_str(&ok(&sock, "GET", "/vm/config", "")).unwrap();
    assert_eq!(
        config["drives"][0]["path_on_host"],
        swapped.to_str().unwrap()
    );
    assert_eq!(config["drives"][0]["rate_limiter"]["ops"]["size"], 100);
    assert_eq!(
        config["network-interfaces"][0]["rx_rate_limiter"]["ops"]["refill_time"],
        500
    );
    // `-w`: wait for every reply (plain `ping` stops after two round trips).
    let out = ns.run("ping", &["-c", "5", "-i", "0.2", "-w", "10", GUEST]);
    assert!(out.contains("5 received"), "{out}");
    // The fifth, sent at 0.8 s, is let in at 2 s at the earliest.
    assert!(max_rtt_ms(&out) >= 1100.0, "not paced:\n{out}");
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {}}"#,
    );
    let (received, out) = ping(&ns, 5, 56);
    assert_eq!(received, 5, "{out}");
    assert!(max_rtt_ms(&out) < 900.0, "still paced:\n{out}");
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    );
    assert!(!metric_lines(&metrics).is_empty());
    // Ctrl+Alt+Del reaches the keyboard controller (the test guest has no
    // keyboard driver: it goes on serving).
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );

    let outcome = finish(&ns, vm, GUEST, 1);
    outcome.line("testguest: blk0: PASS");
    outcome.line("testguest: net0: mac 02:00:00:00:00:15");
    // The last line is written as the VM stops.
    check_metrics(&outcome, &metrics);
}

#[test]
fn config_file_with_no_api_boots_the_same_vm() {
    let test = "config_file_with_no_api_boots_the_same_vm";
    if !net_or_skip(test) {
        return;
    }
    let scratch = Scratch::new("config");
    let metrics = scratch.path("metrics.json");
    let disk = scratch.disk();
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": cmdline()},
        "drives": [{"drive_id": "scratch", "path_on_host": disk, "is_root_device": false,
                    "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
        "metrics": {"metrics_path": metrics},
        "logger": {"level": "Info", "log_path": scratch.path("log")},
        "balloon": null,
    });
    let file = scratch.path("vm.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let ns = Netns::new("cfg");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let mut vm = Running::start(ns.command(
        &minivmm_bin(),
        &["--config-file", file.to_str().unwrap(), "--no-api"],
    ));
    wait_line(&mut vm, "net0: udp burst 200: ok");
    let outcome = finish(&ns, vm, GUEST, 1);
    outcome.line("testguest: blk0: PASS");
    let lines = metric_lines(&metrics);
    let rx = guest_number(&outcome, "testguest: net0: frames ", "rx ");
    assert_eq!(total(&lines, "net_eth0", "rx_packets"), rx, "{lines:?}");
    let log = std::fs::read_to_string(scratch.path("log")).unwrap();
    assert!(log.contains("virtio device 1"), "{log}");
}

#[test]
fn config_file_errors_are_one_line() {
    let scratch = Scratch::new("badconfig");
    let file = scratch.path("vm.json");
    for (text, expected) in [
        ("{", "Invalid config file"),
        (
            r#"{"vsock": {"guest_cid": 3, "uds_path": "/v"}}"#,
            "`vsock`",
        ),
        (
            r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
            "vcpu_count 0",
        ),
        (r#"{"machine-config": {"vcpu_count": 1}}"#, "mem_size_mib"),
        (r#"{"drives": [], "extra": 1}"#, "unknown field `extra`"),
        ("{}", "boot source"),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = Command::new(minivmm_bin())
            .args(["--config-file", file.to_str().unwrap(), "--no-api"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
    }
    let out = Command::new(minivmm_bin())
        .args(["--config-file", "/nonexistent.json"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.json"));
}

/// minivmm serving its API with no VM yet (needs no KVM), killed on drop.
struct Server {
    vm: Option<Running>,
    sock: PathBuf,
    _scratch: Scratch,
}

impl Server {
    fn start(test: &str) -> Server {
        let scratch = Scratch::new(test);
        let sock = scratch.path("api.sock");
        let mut command = Command::new(minivmm_bin());
        command.args(["--api-sock", sock.to_str().unwrap()]);
        let vm = Running::start(command);
        wait_for_socket(&sock);
        Server {
            vm: Some(vm),
            sock,
            _scratch: scratch,
        }
    }

    /// GET / answers within a second.
    fn still_serves(&self) {
        let start = Instant::now();
        let info = ok(&self.sock, "GET", "/", "");
        assert!(info.contains("Not started"), "{info}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            vm.kill();
        }
    }
}

#[test]
fn api_schema_errors_are_400_with_a_fault_message() {
    let server = Server::start("schema");
    let s = &server.sock;
    let kernel = an_existing_file();
    for (method, path, body, expected) in [
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 128}"#,
            "vcpu_count 0",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 0}"#,
            "mem_size_mib 0",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"mem_size_mib": 128}"#,
            "missing field `vcpu_count`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "1", "mem_size_mib": 128}"#,
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#,
            "unknown field `x`",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#,
            "smt",
        ),
        (
            "PATCH",
            "/machine-config",
            r#"{"vcpu_count": 300}"#,
            "vcpu_count 300",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"boot_args": "x"}"#,
            "missing field `kernel_image_path`",
        ),
        (
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent"}"#,
            "/nonexistent",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "path_on_host": "/nonexistent", "is_root_device": false}"#,
            "/nonexistent",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#,
            "does not match",
        ),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id": "a", "is_root_device": false}"#,
            "path_on_host",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
            "missing field `host_dev_name`",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "t", "guest_mac": "zz"}"#,
            "guest_mac",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "Reboot"}"#,
            "unknown variant",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "SendCtrlAltDel"}"#,
            "before starting",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#,
            "not initialized",
        ),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
            "boot source",
        ),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#, "before starting"),
        (
            "PATCH",
            "/drives/a",
            r#"{"drive_id": "a"}"#,
            "before starting",
        ),
        ("PUT", "/logger", r#"{"level": "Loud"}"#, "level"),
        (
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/nonexistent/dir/m"}"#,
            "/nonexistent",
        ),
        (
            "PUT",
            "/balloon",
            r#"{"amount_mib": 1, "deflate_on_oom": true}"#,
            "balloon",
        ),
        ("PUT", "/vsock", "{}", "vsock"),
        ("PUT", "/mmds", "{}", "MMDS"),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m"}"#,
            "before starting",
        ),
        (
            "PUT",
            "/snapshot/load",
            "{}",
            "missing field `snapshot_path`",
        ),
        ("PUT", "/entropy", "{}", "entropy"),
        ("PUT", "/hotplug/memory", "{}", "hotplug"),
        ("DELETE", "/", "", "Invalid request"),
        ("GET", "/nowhere", "", "Invalid request"),
        ("PUT", "/boot-source", "", "needs a JSON body"),
    ] {
        let message = refused(s, method, path, body);
        assert!(
            message.contains(expected),
            "{method} {path} {body}: {message}"
        );
    }
    // The good ones still work, and GET /machine-config shows the defaults.
    let machine: Value = serde_json::from_str(&ok(s, "GET", "/machine-config", "")).unwrap();
    assert_eq!(
        (
            machine["vcpu_count"].as_u64(),
            machine["mem_size_mib"].as_u64()
        ),
        (Some(1), Some(128))
    );
    ok(
        s,
        "PUT",
        "/boot-source",
        &serde_json::json!({"kernel_image_path": kernel}).to_string(),
    );
    ok(s, "GET", "/version", "");
    server.still_serves();
}

/// A file that exists, for boot-source bodies that are never started.
fn an_existing_file() -> PathBuf {
    std::env::current_exe().unwrap()
}

#[test]
fn api_hostile_clients_are_answered_or_closed_and_the_next_is_served() {
    let server = Server::start("hostile");
    let s = &server.sock;
    // A 100 MB body: refused from its headers, without reading the rest.
    let mut c = UnixStream::connect(s).unwrap();
    c.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 104857600\r\n\r\n")
        .unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.200}");
    assert!(answer.contains("larger than the limit"), "{answer:.400}");
    server.still_serves();
    // Half a request, then silence: others are served meanwhile, and the
    // stalled connection is closed after the request timeout.
    let mut half = UnixStream::connect(s).unwrap();
    half.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"vcpu")
        .unwrap();
    server.still_serves();
    half.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = half.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    // Bytes that are not HTTP.
    let mut junk = UnixStream::connect(s).unwrap();
    junk.write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = junk.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A header line that never ends.
    let mut endless = UnixStream::connect(s).unwrap();
    let _ = endless.write_all(&vec![b'A'; 64 << 10]);
    let mut answer = String::new();
    let _ = endless.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.200}");
    // 1,000 connections at once, each idle: the oldest make room.
    let crowd: Vec<UnixStream> = (0..1000)
        .filter_map(|_| UnixStream::connect(s).ok())
        .collect();
    assert!(crowd.len() >= 100, "{} connected", crowd.len());
    server.still_serves();
    drop(crowd);
    server.still_serves();
    // Keep-alive: two requests on one connection, both answered.
    let mut two = UnixStream::connect(s).unwrap();
    two.write_all(b"GET /version HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    two.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let (status, _) = request(s, "GET", "/", "");
    assert_eq!(status, 200);
}

#[test]
fn boot_timer_takes_the_first_slot_and_the_disks_follow() {
    let test = "boot_timer_takes_the_first_slot_and_the_disks_follow";
    if !tests::kvm_or_skip(test) {
        return;
    }
    let scratch = Scratch::new("timer");
    let disk = scratch.disk();
    let guest = test_guest();
    let outcome = tests::minivmm(
        [
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
            "--boot-timer".as_ref(),
            "--cmdline".as_ref(),
            "console=ttyS0 testguest.blk=read".as_ref(),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(outcome.code(), 0, "{outcome}");
    outcome.line("testguest: virtio0: 0xd0001000 irq 6: block");
    outcome.line("testguest: blk0: PASS");
}
