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

use std::time::Duration;

use tests::netns::{
    GUEST, Netns, TIMEOUT, finish, guest_net, net_or_skip, peer_bin, ping, wait_line,
};
const SERVE: &str = "serve=200";

/// Resident memory of the process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
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
