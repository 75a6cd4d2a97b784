//! Snapshot and restore costs, measured side by side in one run:
//!
//! - restoring a 128 MiB trivial guest in a new process (`--restore`), as
//!   a whole process from spawn to reaped exit, against booting the same
//!   guest cold; and eight clones restored at once, for the time each
//!   additional clone adds;
//! - a diff snapshot of a 1 GiB guest that changed 1 % of its RAM against
//!   the full snapshot before it.
//!
//! ```text
//! cargo bench -p vmm --bench snapshot
//! MINIVMM_PEER_FIRECRACKER=/path/to/firecracker cargo bench -p vmm --bench snapshot
//! ```
//!
//! Under `cargo test` (no `--bench`) each step runs once and must succeed.
//!
//! The guest (32-bit PVH entry, paging off; the 1 GiB one first writes
//! every page of its RAM above 16 MiB) polls COM1 for a byte, then writes
//! one word into each of `N` pages from 16 MiB up (1 % of RAM), polls for
//! a second byte and exits: the debug-exit port (minivmm), then an i8042
//! reset (Firecracker). The snapshots are taken while it polls: a
//! restored guest runs a few instructions before it exits. With a
//! Firecracker binary (built from its own sources, outside this
//! repository) the same guest is snapshotted by Firecracker and both VMMs
//! load their snapshot through the API (`PUT /snapshot/load`, resume_vm)
//! in alternation, each from spawn to reaped exit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::api::{ok, wait_for_socket};

/// The guest: writes a word into each of `fill` pages from 16 MiB up (a
/// guest that used its RAM), polls COM1 for a byte, rewrites the first
/// `touch` (at least 1) of them, polls for a second byte and exits.
fn guest_code(fill: u32, touch: u32) -> Vec<u8> {
    /// `mov edi, 16 MiB; mov ecx, pages; 1: mov [edi], ecx; add edi, 4096;
    /// dec ecx; jnz 1b`.
    fn touch_loop(code: &mut Vec<u8>, pages: u32) {
        code.extend_from_slice(&[0xbf, 0x00, 0x00, 0x00, 0x01, 0xb9]);
        code.extend_from_slice(&pages.max(1).to_le_bytes());
        code.extend_from_slice(&[
            0x89, 0x0f, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x49, 0x75, 0xf5,
        ]);
    }
    let mut code = Vec::new();
    if fill > 0 {
        touch_loop(&mut code, fill);
    }
    code.extend_from_slice(&[
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
        0xec, 0xa8, 0x01, 0x74, 0xfb, // in al, dx; test al, 1; jz -5
        0x66, 0xba, 0xf8, 0x03, 0xec, // mov dx, 0x3f8; in al, dx (take it)
    ]);
    touch_loop(&mut code, touch);
    code.extend_from_slice(&[
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd
        0xec, 0xa8, 0x01, 0x74, 0xfb, // wait for the second byte
        0xb0, 0x00, 0xe6, 0xf4, // mov al, 0; out 0xf4, al
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ]);
    code
}

/// Resident memory of process `pid` in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or(0)
        >> 10
}

fn minivmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_minivmm"))
}

/// Starts `command` with its stdin a pipe, its output discarded.
fn start(mut command: Command) -> Child {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"))
}

/// Starts `command` with `input` on its stdin (a pipe, then closed).
fn spawn(command: Command, input: &[u8]) -> Child {
    let mut child = start(command);
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(input).expect("write the guest's bytes");
    child
}

fn reap(mut child: Child) {
    let status = child.wait().expect("wait for minivmm");
    assert!(status.success(), "minivmm ended with {status}");
}

/// A running guest of `mem` behind an API socket, polling for its first
/// byte; and its stdin.
fn boot(dir: &Path, kernel: &Path, mem: &str) -> (Child, PathBuf) {
    let sock = dir.join(format!("api-{mem}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut c = minivmm();
    c.args(["--kernel", kernel.to_str().unwrap(), "--mem", mem]);
    c.args(["--track-dirty-pages", "--api-sock", sock.to_str().unwrap()]);
    let child = start(c);
    wait_for_socket(&sock);
    (child, sock)
}

/// Pauses and snapshots into `dir` (`--restore`'s layout); milliseconds.
fn snapshot(sock: &Path, dir: &Path, kind: &str) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    ok(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let body = format!(
        r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        dir.join("snapshot").display(),
        dir.join("memory").display()
    );
    let start = Instant::now();
    ok(sock, "PUT", "/snapshot/create", &body);
    start.elapsed().as_secs_f64() * 1e3
}

/// Waits for `sock` to accept, polling every 0.2 ms.
fn wait_listening(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            sock.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// `PUT /snapshot/load` of `snap` (`snapshot`, `memory`) into a fresh
/// `vmm --api-sock`, resumed; milliseconds from spawn to reaped exit.
fn api_load(vmm: &Path, sock: &Path, snap: &Path) -> f64 {
    let _ = std::fs::remove_file(sock);
    let start = Instant::now();
    let mut c = Command::new(vmm);
    c.args(["--api-sock", sock.to_str().unwrap()]);
    let child = spawn(c, b"gg");
    wait_listening(sock);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        snap.join("snapshot").display(),
        snap.join("memory").display()
    );
    ok(sock, "PUT", "/snapshot/load", &body);
    reap(child);
    start.elapsed().as_secs_f64() * 1e3
}

/// Boots `kernel` in Firecracker through its API and snapshots it into
/// `snap` while it polls for its first byte.
fn firecracker_snapshot(firecracker: &Path, kernel: &Path, dir: &Path, snap: &Path) {
    let sock = dir.join("fc-boot.sock");
    let _ = std::fs::remove_file(&sock);
    let mut c = Command::new(firecracker);
    c.args(["--api-sock", sock.to_str().unwrap()]);
    let mut child = start(c);
    wait_listening(&sock);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    );
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0"}}"#,
        kernel.display()
    );
    ok(&sock, "PUT", "/boot-source", &boot);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    std::thread::sleep(Duration::from_millis(200));
    snapshot(&sock, snap, "Full");
    let _ = child.kill();
    let _ = child.wait();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !tests::kvm_or_skip("snapshot bench") {
        return;
    }
    let rounds = if bench { 15 } else { 1 };
    let dir = std::env::temp_dir().join(format!("minivmm-snapbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Restore against a cold boot, 128 MiB.
    let small = dir.join("guest-128m.elf");
    std::fs::write(&small, tests::pvh_elf(&guest_code(0, 327))).unwrap();
    let (mut vm, sock) = boot(&dir, &small, "128M");
    let snap = dir.join("snap-128m");
    snapshot(&sock, &snap, "Full");
    let _ = vm.kill();
    let _ = vm.wait();
    let restore = || {
        let mut c = minivmm();
        c.args(["--restore", snap.to_str().unwrap()]);
        c
    };
    let cold = || {
        let mut c = minivmm();
        c.args(["--kernel", small.to_str().unwrap(), "--mem", "128M"]);
        c
    };
    let (mut restores, mut boots, mut clones) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        reap(spawn(restore(), b"gg"));
        restores.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        reap(spawn(cold(), b"gg"));
        boots.push(start.elapsed().as_secs_f64() * 1e3);
        let start = Instant::now();
        let eight: Vec<Child> = (0..8).map(|_| spawn(restore(), b"gg")).collect();
        eight.into_iter().for_each(reap);
        clones.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let (restore_ms, boot_ms, eight_ms) = (median(restores), median(boots), median(clones));
    println!("128 MiB trivial guest, {rounds} rounds, medians, whole processes:");
    println!("| | wall |");
    println!("|---|---|");
    println!("| restore (--restore, to the guest's exit) | {restore_ms:.1} ms |");
    println!("| cold boot of the same guest | {boot_ms:.1} ms |");
    println!("| 8 clones restored at once | {eight_ms:.1} ms |");
    println!(
        "restore/boot {:.2}; each clone after the first adds {:.1} ms",
        restore_ms / boot_ms,
        (eight_ms - restore_ms).max(0.0) / 7.0
    );
    if let Some(firecracker) = std::env::var_os("MINIVMM_PEER_FIRECRACKER").map(PathBuf::from) {
        let fc_snap = dir.join("snap-fc");
        firecracker_snapshot(&firecracker, &small, &dir, &fc_snap);
        let minivmm_bin = PathBuf::from(env!("CARGO_BIN_EXE_minivmm"));
        let sock = dir.join("load.sock");
        let (mut ours, mut theirs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = api_load(&minivmm_bin, &sock, &snap);
            let b = api_load(&firecracker, &sock, &fc_snap);
            ours.push(a);
            theirs.push(b);
            ratios.push(a / b);
        }
        println!("snapshot load through the API (PUT /snapshot/load, resume_vm), spawn to exit:");
        println!("| | wall median |");
        println!("|---|---|");
        println!("| minivmm | {:.1} ms |", median(ours));
        println!("| Firecracker | {:.1} ms |", median(theirs));
        println!(
            "minivmm/Firecracker {:.2} (median of pairs; target at most 1.0)",
            median(ratios)
        );
    }

    // Diff against full, 1 GiB with 1 % changed.
    let large = dir.join("guest-1g.elf");
    // It fills its RAM first: a full snapshot of pages never written is
    // holes, nearly free.
    std::fs::write(&large, tests::pvh_elf(&guest_code(258_048, 2621))).unwrap();
    let (mut fulls, mut diffs) = (Vec::new(), Vec::new());
    for round in 0..rounds.min(5) {
        let (mut vm, sock) = boot(&dir, &large, "1G");
        let deadline = Instant::now() + Duration::from_secs(60);
        while rss_mib(vm.id()) < 1000 {
            assert!(Instant::now() < deadline, "the guest did not fill its RAM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let full = snapshot(&sock, &dir.join(format!("full-{round}")), "Full");
        ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        let mut stdin = vm.stdin.take().expect("piped");
        stdin.write_all(b"g").unwrap();
        // 2621 pages at emulation speed: a few milliseconds.
        std::thread::sleep(Duration::from_millis(300));
        let diff_dir = dir.join(format!("diff-{round}"));
        let diff = snapshot(&sock, &diff_dir, "Diff");
        let _ = vm.kill();
        let _ = vm.wait();
        use std::os::unix::fs::MetadataExt;
        let written = std::fs::metadata(diff_dir.join("memory")).unwrap().blocks() * 512;
        assert!(written >= 2621 * 4096, "the diff holds every touched page");
        std::fs::remove_dir_all(dir.join(format!("full-{round}"))).unwrap();
        std::fs::remove_dir_all(&diff_dir).unwrap();
        fulls.push(full);
        diffs.push(diff);
    }
    let (full_ms, diff_ms) = (median(fulls), median(diffs));
    println!("1 GiB guest, 1 % of RAM changed after a full snapshot:");
    println!("| snapshot | PUT /snapshot/create |");
    println!("|---|---|");
    println!("| full | {full_ms:.1} ms |");
    println!("| diff | {diff_ms:.1} ms |");
    println!("diff/full {:.3} (target at most 0.05)", diff_ms / full_ms);
    let _ = std::fs::remove_dir_all(&dir);
}
