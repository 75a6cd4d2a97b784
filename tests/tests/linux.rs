//! A real distribution kernel nobody here wrote boots under minivmm at least to
//! its early console: Debian's linux-image-cloud-amd64 bzImage prints its
//! banner, the command line minivmm passed and the e820 map minivmm built.
//!
//! Slow and needs the network once, so it is `#[ignore]`d in the default suite:
//!
//!     scripts/fetch-linux.sh            # downloads the bzImage to target/linux/
//!     cargo build -p vmm && cargo test -p tests --test linux -- --ignored --nocapture
//!
//! `MINIVMM_LINUX_KERNEL` names another bzImage. On the project's nested-KVM
//! machines the kernel's early boot runs emulated (its decompressor alone takes a
//! while) and a full boot does not finish (../shared/HOST-KVM.md); on a host
//! with hardware virtualization the same kernel boots further.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::{Running, kvm_or_skip, minivmm_bin, workspace_root};

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 noxsave minivmm.test=linux";

fn linux_kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("MINIVMM_LINUX_KERNEL") {
        return PathBuf::from(path);
    }
    let dir = workspace_root().join("target/linux");
    let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("vmlinuz-"))
    });
    found.unwrap_or_else(|| panic!("no kernel in {}: run scripts/fetch-linux.sh", dir.display()))
}

/// The "BIOS-e820: [mem 0x...-0x...] kind" lines Linux printed.
fn e820_lines(console: &str) -> Vec<(u64, u64, String)> {
    console
        .lines()
        .filter_map(|l| l.split_once("BIOS-e820: [mem ").map(|(_, rest)| rest))
        .map(|rest| {
            let (range, kind) = rest.split_once("] ").expect("e820 line");
            let (start, end) = range.split_once('-').expect("range");
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
            (hex(start), hex(end), kind.trim().to_owned())
        })
        .collect()
}

#[test]
#[ignore = "slow, needs a distribution kernel: scripts/fetch-linux.sh"]
fn linux_distro_kernel_prints_banner_cmdline_and_our_e820_map() {
    if !kvm_or_skip("linux_distro_kernel_prints_banner_cmdline_and_our_e820_map") {
        return;
    }
    let mut command = Command::new(minivmm_bin());
    command
        .arg("--kernel")
        .arg(linux_kernel())
        .args(["--mem", "512M", "--cmdline", CMDLINE]);
    let mut vm = Running::start(command);
    let seen = vm.wait_for(Duration::from_secs(900), |out| {
        out.contains("Linux version")
            && out.contains("Command line:")
            && out.contains("printk: bootconsole")
    });
    let outcome = vm.terminate();
    assert!(seen, "early console incomplete: {outcome}");
    assert_eq!(
        outcome.code(),
        143,
        "SIGTERM stops minivmm with 128 + 15: {outcome}"
    );
    let command_line = outcome
        .stdout
        .lines()
        .find_map(|l| l.split_once("Command line: "))
        .map(|(_, c)| c.trim());
    assert_eq!(command_line, Some(CMDLINE), "{outcome}");
    // The map minivmm derived from its frame metadata: RAM from 0, the boot
    // structures and the legacy hole reserved up to 1 MiB, RAM from 1 MiB to
    // the end of the 512M.
    let map = e820_lines(&outcome.stdout);
    assert_eq!(
        map.first().map(|e| (e.0, e.2.as_str())),
        Some((0, "usable")),
        "{outcome}"
    );
    assert!(
        map.iter()
            .any(|e| e.0 <= 0xa_0000 && e.1 == 0xf_ffff && e.2 == "reserved"),
        "{outcome}"
    );
    assert_eq!(
        map.last().map(|e| (e.0, e.1, e.2.as_str())),
        Some((0x10_0000, 0x1fff_ffff, "usable")),
        "{outcome}"
    );
}

#[test]
#[ignore = "slow, needs a distribution kernel: scripts/fetch-linux.sh"]
fn linux_distro_kernel_finds_minivmm_acpi_tables_and_every_vcpu() {
    if !kvm_or_skip("linux_distro_kernel_finds_minivmm_acpi_tables_and_every_vcpu") {
        return;
    }
    // Debian's cloud kernel has no CONFIG_X86_MPPARSE: without ACPI it said
    // "A valid RSDP was not found" and "Allowing 1 CPUs" with --cpus 2.
    let mut command = Command::new(minivmm_bin());
    command.arg("--kernel").arg(linux_kernel()).args([
        "--mem",
        "512M",
        "--cpus",
        "2",
        "--cmdline",
        CMDLINE,
    ]);
    let mut vm = Running::start(command);
    let seen = vm.wait_for(Duration::from_secs(900), |out| {
        out.contains("smpboot: Allowing") || out.contains("ACPI BIOS Error")
    });
    let outcome = vm.terminate();
    assert!(seen, "no smpboot line: {outcome}");
    let out = &outcome.stdout;
    assert!(!out.contains("ACPI BIOS Error"), "{outcome}");
    assert!(out.contains("ACPI: RSDP 0x00000000000E0000"), "{outcome}");
    for table in ["XSDT", "FACP", "DSDT", "APIC"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("ACPI: {table} 0x")) && l.contains("MINVMM")),
            "{table}: {outcome}"
        );
    }
    assert!(out.contains("smpboot: Allowing 2 CPUs"), "{outcome}");
}
