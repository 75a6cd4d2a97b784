//! Start-up and memory cost of minivmm as a whole process: a trivial PVH guest
//! that exits at once, at several RAM sizes, and side by side with
//! Firecracker and Cloud Hypervisor when their binaries are given.
//!
//!     cargo bench -p vmm --bench startup
//!     MINIVMM_PEER_FIRECRACKER=/path/to/firecracker \
//!     MINIVMM_PEER_CLOUD_HYPERVISOR=/path/to/cloud-hypervisor \
//!         cargo bench -p vmm --bench startup
//!
//! Every run is timed from spawn to reaped exit, and its peak RSS is the
//! kernel's own accounting for that child (`wait4`'s `ru_maxrss`). Commands
//! alternate within each round (A B C A B C ...), so all see the same machine
//! load, and medians are compared. Under `cargo test` (no `--bench`) each
//! command runs once, at two sizes: the table still prints and every run must
//! exit 0.
//!
//! The guest (32-bit PVH entry, paging off) writes 0 to the debug-exit port
//! (minivmm), S5 to port 0x600 (Cloud Hypervisor's ACPI shutdown device),
//! then 0xfe to port 0x64 (i8042 reset: Firecracker); each VMM ignores the
//! ports it does not have. The peers are built from their own sources,
//! outside this repository.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const GUEST_CODE: [u8; 18] = [
    0xb0, 0x00, 0xe6, 0xf4, // mov al, 0; out 0xf4, al
    0x66, 0xba, 0x00, 0x06, // mov dx, 0x600
    0xb0, 0x34, 0xee, // mov al, 0x34; out dx, al
    0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
    0xf4, 0xeb, 0xfd, // hlt; jmp hlt
];
/// One whole-process run: wall milliseconds and peak RSS in KiB.
// The child is reaped by wait4 (for its rusage), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run(argv: &[String]) -> (f64, u64) {
    let start = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", argv[0]));
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into live locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let wall = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{argv:?} ended with status {status:#x}"
    );
    (wall, usage.ru_maxrss as u64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Commands run in alternation; each one's (walls, peaks).
fn alternate(commands: &[(String, Vec<String>)], rounds: usize) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut out = vec![(Vec::new(), Vec::new()); commands.len()];
    for _ in 0..rounds {
        for (i, (_, argv)) in commands.iter().enumerate() {
            let (wall, peak) = run(argv);
            out[i].0.push(wall);
            out[i].1.push(peak as f64 / 1024.0);
        }
    }
    out
}

fn minivmm(kernel: &Path, mem: &str) -> Vec<String> {
    vec![
        env!("CARGO_BIN_EXE_minivmm").into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--mem".into(),
        mem.into(),
    ]
}

/// The host's RAM in MiB (from /proc/meminfo).
fn host_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !tests::kvm_or_skip("startup bench") {
        return;
    }
    let rounds = if bench { 15 } else { 1 };
    let dir = std::env::temp_dir().join(format!("minivmm-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("trivial-pvh.elf");
    std::fs::write(&kernel, tests::pvh_elf(&GUEST_CODE)).unwrap();

    // minivmm across RAM sizes, the largest ones the host can back.
    let sizes: &[(&str, u64)] = if bench {
        &[("128M", 128), ("1G", 1024), ("4G", 4096), ("16G", 16384)]
    } else {
        &[("128M", 128), ("1G", 1024)]
    };
    let sizes: Vec<_> = sizes
        .iter()
        .filter(|&&(_, mib)| mib + 1024 <= host_mib())
        .collect();
    let commands: Vec<_> = sizes
        .iter()
        .map(|&&(name, _)| (name.to_string(), minivmm(&kernel, name)))
        .collect();
    let results = alternate(&commands, rounds);
    println!("minivmm, trivial PVH guest, {rounds} runs each, alternated:");
    println!("| --mem | wall median (min-max) | peak RSS median |");
    println!("|---|---|---|");
    let mut medians = Vec::new();
    for ((name, _), (walls, peaks)) in commands.iter().zip(results) {
        let (mut walls, mut peaks) = (walls, peaks);
        let (lo, hi) = walls
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), &w| (l.min(w), h.max(w)));
        let (w, p) = (median(&mut walls), median(&mut peaks));
        println!("| {name} | {w:.1} ms ({lo:.1}-{hi:.1}) | {p:.2} MiB |");
        medians.push((name.clone(), w, p));
    }
    if let (Some(first), Some(last)) = (medians.first(), medians.last())
        && medians.len() > 1
    {
        println!(
            "{} vs {}: wall {:.2}x, peak RSS {:+.2} MiB",
            last.0,
            first.0,
            last.1 / first.1,
            last.2 - first.2
        );
    }

    // Side by side with the peers, 128M, 1 vCPU.
    let mut peers = vec![("minivmm".to_string(), minivmm(&kernel, "128M"))];
    if let Some(fc) = std::env::var_os("MINIVMM_PEER_FIRECRACKER") {
        let config = dir.join("firecracker.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"boot-source":{{"kernel_image_path":"{}"}},"drives":[],"machine-config":{{"vcpu_count":1,"mem_size_mib":128}}}}"#,
                kernel.display()
            ),
        )
        .unwrap();
        peers.push((
            "firecracker".into(),
            vec![
                PathBuf::from(fc).display().to_string(),
                "--no-api".into(),
                "--config-file".into(),
                config.display().to_string(),
                "--level".into(),
                "Error".into(),
            ],
        ));
    }
    if let Some(ch) = std::env::var_os("MINIVMM_PEER_CLOUD_HYPERVISOR") {
        peers.push((
            "cloud-hypervisor".into(),
            [
                &PathBuf::from(ch).display().to_string(),
                "--kernel",
                &kernel.display().to_string(),
                "--memory",
                "size=128M",
                "--cpus",
                "boot=1",
                "--serial",
                "off",
                "--console",
                "off",
                "--log-file",
                "/dev/null",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ));
    }
    if peers.len() > 1 {
        let results = alternate(&peers, rounds);
        println!("128M, 1 vCPU, {rounds} runs each, alternated:");
        println!("| VMM | wall median | peak RSS median | minivmm / it (wall) |");
        println!("|---|---|---|---|");
        let mut ours = None;
        for ((name, _), (mut walls, mut peaks)) in peers.iter().zip(results) {
            let (w, p) = (median(&mut walls), median(&mut peaks));
            let ratio = *ours.get_or_insert(w) / w;
            println!("| {name} | {w:.1} ms | {p:.2} MiB | {ratio:.2} |");
        }
    } else {
        println!(
            "(no peers: set MINIVMM_PEER_FIRECRACKER and/or MINIVMM_PEER_CLOUD_HYPERVISOR to compare)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
