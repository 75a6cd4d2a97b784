//! Network namespaces with TAPs for the tests that need a network peer:
//! the host kernel's stack, `ping` and the UDP echo service `net-peer`
//! (`src/bin/net_peer.rs`) inside a namespace each test makes and removes,
//! so no traffic leaves it. Needs root, `/dev/net/tun`, `ip` and `ping`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{REQUIRE_KVM, Running, kvm_or_skip, minivmm_bin, test_guest};

/// How long a network test waits for the guest.
pub const TIMEOUT: Duration = Duration::from_secs(240);
/// The test guest's address on its first network device.
pub const GUEST: &str = "10.0.2.15";

/// Whether the network tests can run here (printing why not), or panics
/// when MINIVMM_REQUIRE_KVM=1 demands it.
pub fn net_or_skip(test: &str) -> bool {
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

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `net-peer` program, built beside the test binaries
/// (`target/<profile>/net-peer`, the tests run from `target/<profile>/deps`).
pub fn peer_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    dir.join("net-peer")
}

/// A network namespace of this test, deleted (with its TAPs) on drop.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`ip -n NAME ...`).
    pub name: String,
}

impl Netns {
    pub fn new(test: &str) -> Netns {
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

    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A TAP `tap` in the namespace, up, with the host side's address `cidr`.
    pub fn tap(&self, tap: &str, cidr: &str) {
        self.ip(&["-n", &self.name, "tuntap", "add", "dev", tap, "mode", "tap"]);
        self.ip(&["-n", &self.name, "addr", "add", cidr, "dev", tap]);
        self.ip(&["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// `program args` inside the namespace.
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .args(args);
        c
    }

    /// Runs `program args` inside the namespace to its end; its stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(Path::new(program), args)
            .output()
            .expect("run in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The UDP echo service on port 7 of every address, until killed.
    pub fn echo(&self) -> Peer {
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

    pub fn send(&self, to: &str, text: &str) {
        let out = self.run(peer_bin().to_str().unwrap(), &["send", to, text]);
        assert!(out.is_empty(), "{out}");
    }

    /// minivmm with the test guest and `args`, inside the namespace.
    pub fn minivmm(&self, args: &[&str]) -> Running {
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
#[derive(Debug)]
pub struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn guest_net(n: usize, extra: &str) -> String {
    let subnet = 2 + n;
    format!("testguest.net=ip=10.0.{subnet}.15/24,peer=10.0.{subnet}.2,port=7{extra}")
}

/// Waits for `line` on the console, failing fast on a FAIL line.
pub fn wait_line(vm: &mut Running, line: &str) {
    let found = vm.wait_for(TIMEOUT, |out| out.contains(line) || out.contains(": FAIL"));
    assert!(found, "no {line:?} within {TIMEOUT:?}");
    let out = vm.stdout_now();
    assert!(out.contains(line), "{line:?} missing:\n{out}");
}

/// `ping -c count -s size` from the namespace; the received count.
pub fn ping(ns: &Netns, count: u32, size: u32) -> (u32, String) {
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

/// Ends the guest's serving with `bye` and checks its verdict.
pub fn finish(ns: &Netns, vm: Running, guest_ip: &str, nets: usize) -> crate::Outcome {
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
