//! Network I/O end to end: the test guest's virtio-net driver (guest-images)
//! against minivmm's virtio-net on a TAP, with the host kernel's network
//! stack and programs nobody here wrote (its ARP and ICMP, Debian's `ping`)
//! as the peer. Each test makes its own network namespace with its TAPs,
//! runs minivmm and the UDP echo service (`net-peer`) inside it, and removes
//! it afterwards: no traffic leaves it.
//!
//! Needs KVM, root (namespaces, TAPs), `ip` and `ping`; skipped with a reason
//! otherwise, unless MINIVMM_REQUIRE_KVM=1 (CI), where they fail instead.
//! `scripts/test.sh` installs `iputils-ping` and `iproute2`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tests::{REQUIRE_KVM, Running, kvm_or_skip, minivmm_bin, test_guest};

const TIMEOUT: Duration = Duration::from_secs(240);
const GUEST: &str = "10.0.2.15";
const SERVE: &str = "serve=200";

/// Whether the network tests can run here (printing why not), or panics
/// when MINIVMM_REQUIRE_KVM=1 demands it.
fn net_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    let why = if !is_root() {
        Some("not root (network namespaces and TAPs need it)")
    } else if !Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun is missing")
    } else if !has("ip") {
        Some("`ip` (iproute2) is not installed")
    } else if !has("ping") {
        Some("`ping` (iputils-ping) is not installed")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var(REQUIRE_KVM).is_ok_and(|v| v == "1") => {
            panic!("{test}: {why}, and {REQUIRE_KVM}=1 requires the network tests")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn peer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_net-peer"))
}

/// A network namespace of this test, deleted (with its TAPs) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(test: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mvmm-{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let name: String = name.chars().take(40).collect();
        let ns = Netns { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TAP `tap` in the namespace, up, with the host side's address `cidr`.
    fn tap(&self, tap: &str, cidr: &str) {
        self.ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        self.ip(&["-n", &self.name, "addr", "add", cidr, "dev", tap]);
        self.ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// `program args` inside the namespace.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }

    /// Runs `program args` inside the namespace to its end; its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(Path::new(program), args)
            .output()
            .expect("run in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The UDP echo service on port 7 of every address, until killed.
    fn echo(&self) -> Peer {
        let mut child = self
            .command(&peer_bin(), &["echo", "0.0.0.0:7", "600"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start net-peer");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "echo ready");
        Peer(child)
    }

    fn send(&self, to: &str, text: &str) {
        let out = self.run(peer_bin().to_str().unwrap(), &["send", to, text]);
        assert!(out.is_empty(), "{out}");
    }

    /// minivmm with the test guest and `args`, inside the namespace.
    fn minivmm(&self, args: &[&str]) -> Running {
        let guest = test_guest();
        let mut all = vec!["--kernel", guest.to_str().unwrap(), "--log-level", "info"];
        all.extend_from_slice(args);
        Running::start(self.command(&minivmm_bin(), &all))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A background program in the namespace, killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn guest_net(n: usize, extra: &str) -> String {
    let subnet = 2 + n;
    format!("testguest.net=ip=10.0.{subnet}.15/24,peer=10.0.{subnet}.2,port=7{extra}")
}

/// Waits for `line` on the console, failing fast on a FAIL line.
fn wait_line(vm: &mut Running, line: &str) {
    let found = vm.wait_for(TIMEOUT, |out| out.contains(line) || out.contains(": FAIL"));
    assert!(found, "no {line:?} within {TIMEOUT:?}");
    let out = vm.stdout_now();
    assert!(out.contains(line), "{line:?} missing:\n{out}");
}

/// `ping -c count -s size` from the namespace; the received count.
fn ping(ns: &Netns, count: u32, size: u32) -> (u32, String) {
    let out = ns.run(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-s",
            &size.to_string(),
            "-W",
            "3",
            GUEST,
        ],
    );
    let received = out
        .lines()
        .find_map(|l| l.split(", ").find_map(|p| p.strip_suffix(" received")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (received, out)
}

/// Resident memory of the process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Ends the guest's serving with `bye` and checks its verdict.
fn finish(ns: &Netns, vm: Running, guest_ip: &str, nets: usize) -> tests::Outcome {
    ns.send(&format!("{guest_ip}:40000"), "bye");
    let mut vm = vm;
    assert!(vm.wait_exit(TIMEOUT), "the guest did not end after bye");
    let outcome = vm.collect();
    assert_eq!(outcome.code(), 0, "{outcome}");
    for n in 0..nets {
        outcome.line(&format!("testguest: net{n}: PASS"));
    }
    outcome.line("testguest: selftest: PASS");
    outcome
}

#[test]
fn net_host_pings_the_guest_and_udp_echo_checks_every_byte() {
    if !net_or_skip("net_host_pings_the_guest_and_udp_echo_checks_every_byte") {
        return;
    }
    let ns = Netns::new("ping");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let cmdline = format!("console=ttyS0 {}", guest_net(0, &format!(",{SERVE}")));
    let mut vm = ns.minivmm(&[
        "--net",
        "tap=tap0,mac=02:00:00:00:00:15",
        "--cmdline",
        &cmdline,
    ]);
    wait_line(&mut vm, "net0: udp burst 200: ok");
    let (received, out) = ping(&ns, 20, 1400);
    assert!(out.contains(" 0% packet loss") && received == 20, "{out}");
    let outcome = finish(&ns, vm, GUEST, 1);
    outcome.line("testguest: net0: udp echo 1 64 1472: ok");
    outcome.line("testguest: net0: mac 02:00:00:00:00:15, mtu 1500, link up");
    let echo = outcome.line("testguest: net0: frames rx ");
    assert!(echo.contains("echo replies 20,"), "{echo}");
}

#[test]
fn net_flood_keeps_memory_flat_and_a_ping_still_gets_through() {
    if !net_or_skip("net_flood_keeps_memory_flat_and_a_ping_still_gets_through") {
        return;
    }
    let ns = Netns::new("flood");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let cmdline = format!("console=ttyS0 {}", guest_net(0, &format!(",{SERVE}")));
    let mut vm = ns.minivmm(&["--net", "tap=tap0", "--cmdline", &cmdline]);
    wait_line(&mut vm, "net0: udp burst 200: ok");
    let before = rss_kib(vm.pid());
    // 100,000 frames at the TAP, faster than the guest takes them.
    let out = ns.run(
        peer_bin().to_str().unwrap(),
        &["flood", "10.0.2.15:9", "100000", "1000"],
    );
    assert!(out.starts_with("flood sent"), "{out}");
    let after = rss_kib(vm.pid());
    eprintln!("{out}minivmm RSS {before} KiB before the flood, {after} KiB after");
    assert!(
        after <= before + 1024,
        "minivmm grew from {before} KiB to {after} KiB during the flood"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (received, out) = ping(&ns, 5, 56);
    assert!(
        received >= 1,
        "no ping got through after the flood (RX frozen?):\n{out}"
    );
    let outcome = finish(&ns, vm, GUEST, 1);
    let metrics = outcome
        .stderr
        .lines()
        .find(|l| l.contains("virtio-net in slot 0"))
        .unwrap_or_else(|| panic!("no virtio-net counters: {outcome}"));
    let waits = metrics
        .split("rx_no_buffers: ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!("{metrics}");
    assert!(
        waits > 0,
        "the ring never ran out under the flood: {metrics}"
    );
}

#[test]
fn net_two_devices_each_pass_their_own_self_test() {
    if !net_or_skip("net_two_devices_each_pass_their_own_self_test") {
        return;
    }
    let ns = Netns::new("two");
    ns.tap("tap0", "10.0.2.2/24");
    ns.tap("tap1", "10.0.3.2/24");
    let _echo = ns.echo();
    let cmdline = format!("console=ttyS0 {} {}", guest_net(0, ""), guest_net(1, ""));
    let mut vm = ns.minivmm(&[
        "--net",
        "tap=tap0",
        "--net",
        "tap=tap1",
        "--cmdline",
        &cmdline,
    ]);
    assert!(vm.wait_exit(TIMEOUT));
    let outcome = vm.collect();
    assert_eq!(outcome.code(), 0, "{outcome}");
    outcome.line("testguest: net0: PASS");
    outcome.line("testguest: net1: PASS");
    // Slots: net0 at the first window, net1 after it.
    outcome.line("testguest: virtio1: 0xd0001000 irq 6: network");
}

#[test]
fn net_disk_and_network_device_in_one_vm() {
    if !net_or_skip("net_disk_and_network_device_in_one_vm") {
        return;
    }
    let ns = Netns::new("blknet");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let image = std::env::temp_dir().join(format!("minivmm-net-{}.img", std::process::id()));
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let disk = format!("{},id=scratch", image.display());
    let cmdline = format!("console=ttyS0 testguest.blk=write {}", guest_net(0, ""));
    let mut vm = ns.minivmm(&["--disk", &disk, "--net", "tap=tap0", "--cmdline", &cmdline]);
    assert!(vm.wait_exit(TIMEOUT));
    let outcome = vm.collect();
    let _ = std::fs::remove_file(&image);
    assert_eq!(outcome.code(), 0, "{outcome}");
    outcome.line("testguest: blk0: PASS");
    outcome.line("testguest: net0: PASS");
    outcome.line("testguest: virtio1: 0xd0001000 irq 6: network");
}

#[test]
fn net_missing_busy_or_wrong_taps_give_one_line() {
    if !net_or_skip("net_missing_busy_or_wrong_taps_give_one_line") {
        return;
    }
    let ns = Netns::new("bad");
    ns.tap("tap0", "10.0.2.2/24");
    ns.ip(&[
        "-n", &ns.name, "tuntap", "add", "dev", "tun0", "mode", "tun",
    ]);
    let cases: &[(&[&str], &str)] = &[
        (&["--net", "tap=nosuch"], "no network interface nosuch"),
        (&["--net", "tap=lo"], "Cannot attach to TAP lo"),
        (&["--net", "tap=tun0"], "Cannot attach to TAP tun0"),
        (&["--net", "tap=tap0", "--net", "tap=tap0"], "busy"),
        (&["--net", "fd=0"], "fd 0 is not"),
        (&["--net", "fd=99"], "fd 99 is not"),
    ];
    for (args, needle) in cases {
        let vm = ns.minivmm(args);
        let mut vm = vm;
        assert!(vm.wait_exit(Duration::from_secs(30)));
        let outcome = vm.collect();
        assert_eq!(outcome.code(), 1, "{args:?}: {outcome}");
        let lines: Vec<_> = outcome
            .stderr
            .lines()
            .filter(|l| !l.contains("INFO"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: {outcome}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: {needle:?} missing: {outcome}"
        );
        assert!(outcome.stdout.is_empty(), "{outcome}");
    }
}
