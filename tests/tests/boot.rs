//! Booting the project's test guest kernel (guest-images/testguest, PVH) under
//! minivmm on KVM: its banner and self-check report on the serial console, and
//! minivmm's exit status for each way a guest can stop (README's table).
//!
//! Guest kernel code is emulated on the project's nested-KVM machines (about
//! 1000x slower than hardware), so each boot is given a generous deadline; the
//! guest keeps its own work small.

use std::process::Command;
use std::time::Duration;

use tests::{
    Outcome, Running, VMLINUX_LOAD, bzimage, kvm_or_skip, minivmm, minivmm_bin, test_guest,
    vmlinux_elf,
};

const TIMEOUT: Duration = Duration::from_secs(180);

/// Boots the test guest with `args` added; `None` when KVM is not usable.
fn boot(test: &str, args: &[&str]) -> Option<Outcome> {
    if !kvm_or_skip(test) {
        return None;
    }
    let guest = test_guest();
    let mut all = vec!["--kernel", guest.to_str().expect("UTF-8 path")];
    all.extend_from_slice(args);
    Some(minivmm(&all, TIMEOUT))
}

/// The guest's self-check passed and minivmm exited 0 with nothing on stderr.
fn assert_selftest_passed(outcome: &Outcome) {
    assert_eq!(outcome.code(), 0, "{outcome}");
    assert!(outcome.stderr.is_empty(), "{outcome}");
    outcome.line("testguest: booted via PVH");
    outcome.line("testguest: selftest: PASS");
    assert!(!outcome.stdout.contains(": FAIL"), "{outcome}");
}

/// The memory map the guest printed: (start, end inclusive, type).
fn memmap(outcome: &Outcome) -> Vec<(u64, u64, u32)> {
    let count: usize = outcome
        .line("testguest: memmap: ")
        .trim_end_matches(" entries")
        .parse()
        .unwrap();
    let entries: Vec<_> = outcome
        .stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("testguest:   ["))
        .map(|l| {
            let (range, kind) = l.split_once("] type ").expect("memmap line");
            let (start, end) = range.split_once('-').expect("start-end");
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex");
            (hex(start), hex(end), kind.trim().parse().expect("type"))
        })
        .collect();
    assert_eq!(entries.len(), count, "{outcome}");
    entries
}

/// What the guest's CPUID said: (APIC id, logical processors, leaf 1 ECX).
fn cpu_line(outcome: &Outcome) -> (u32, u32, u32) {
    let line = outcome.line("testguest: cpu: apic id ");
    let (apic, rest) = line.split_once(", ").expect("apic id");
    let (logical, rest) = rest.split_once(" logical, leaf1 ecx=0x").expect("logical");
    let ecx = u32::from_str_radix(&rest[..8], 16).expect("ecx");
    (
        apic.parse().expect("apic id"),
        logical.parse().expect("logical"),
        ecx,
    )
}

const CPUID_1_ECX_CX16: u32 = 1 << 13;
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Total bytes of type-1 (RAM) entries.
fn ram_bytes(map: &[(u64, u64, u32)]) -> u64 {
    map.iter().filter(|e| e.2 == 1).map(|e| e.1 - e.0 + 1).sum()
}

#[test]
fn boot_test_guest_prints_report_and_exits_zero() {
    let cmdline = "console=ttyS0 testguest.check=full";
    let Some(outcome) = boot(
        "boot_test_guest_prints_report_and_exits_zero",
        &["--cmdline", cmdline],
    ) else {
        return;
    };
    assert_selftest_passed(&outcome);
    assert_eq!(outcome.line("testguest: cmdline: "), cmdline);
    // Default 256M: the map covers RAM below 1 MiB and above it, and the
    // boot structures minivmm placed (reserved) sit below 1 MiB.
    let map = memmap(&outcome);
    let ram = ram_bytes(&map);
    assert!(ram > 250 << 20 && ram <= 256 << 20, "{ram:#x}: {outcome}");
    assert!(
        map.iter()
            .any(|e| e.0 == 0x10_0000 || (e.0 < 0x10_0000 && e.1 > 0x10_0000 && e.2 == 1))
    );
    assert!(
        map.iter().any(|e| e.2 == 2 && e.0 < 0x10_0000),
        "reserved boot area: {outcome}"
    );
    outcome.line("testguest: check consistency: ok");
    // The default (minimal) CPU template: boot vCPU 0 of 1, running under a
    // hypervisor, CMPXCHG16B hidden.
    let (apic, logical, ecx) = cpu_line(&outcome);
    assert_eq!((apic, logical), (0, 1), "{outcome}");
    assert_ne!(ecx & CPUID_1_ECX_HYPERVISOR, 0, "{outcome}");
    assert_eq!(ecx & CPUID_1_ECX_CX16, 0, "{outcome}");
}

#[test]
fn boot_test_guest_with_default_cmdline() {
    let Some(outcome) = boot("boot_test_guest_with_default_cmdline", &[]) else {
        return;
    };
    assert_selftest_passed(&outcome);
    assert!(
        outcome
            .line("testguest: cmdline: ")
            .starts_with("console=ttyS0 reboot=k panic=1"),
        "{outcome}"
    );
}

#[test]
fn boot_test_guest_with_two_cpus() {
    let Some(outcome) = boot("boot_test_guest_with_two_cpus", &["--cpus", "2"]) else {
        return;
    };
    assert_selftest_passed(&outcome);
    let (apic, logical, _) = cpu_line(&outcome);
    assert_eq!((apic, logical), (0, 2), "{outcome}");
}

#[test]
fn boot_sigterm_stops_a_running_guest() {
    if !kvm_or_skip("boot_sigterm_stops_a_running_guest") {
        return;
    }
    let mut command = Command::new(minivmm_bin());
    command
        .arg("--kernel")
        .arg(test_guest())
        .args(["--mem", "64M", "--cpus", "2"]);
    command.args(["--cmdline", "testguest.action=hang"]);
    let mut vm = Running::start(command);
    let hanging = vm.wait_for(TIMEOUT, |out| out.contains("testguest: action: hang"));
    let outcome = vm.terminate();
    assert!(hanging, "{outcome}");
    assert_eq!(outcome.code(), 143, "{outcome}");
    assert_eq!(
        outcome.stderr.trim(),
        "minivmm: stopped by signal 15",
        "{outcome}"
    );
}

#[test]
fn boot_test_guest_with_128m() {
    let Some(outcome) = boot("boot_test_guest_with_128m", &["--mem", "128M"]) else {
        return;
    };
    assert_selftest_passed(&outcome);
    let ram = ram_bytes(&memmap(&outcome));
    assert!(ram > 120 << 20 && ram <= 128 << 20, "{ram:#x}: {outcome}");
}

/// 3 GiB does not fit below the MMIO hole (2..4 GiB): the last GiB is above 4 GiB
/// and the guest maps, writes and reads it back.
#[test]
fn boot_test_guest_with_3g_uses_ram_above_the_mmio_hole() {
    let Some(outcome) = boot(
        "boot_test_guest_with_3g_uses_ram_above_the_mmio_hole",
        &["--mem", "3G"],
    ) else {
        return;
    };
    assert_selftest_passed(&outcome);
    let map = memmap(&outcome);
    assert!(
        map.contains(&(0x1_0000_0000, 0x1_3fff_ffff, 1)),
        "RAM at 4..5 GiB: {outcome}"
    );
    assert!(
        !map.iter()
            .any(|e| e.2 == 1 && e.1 >= 0x8000_0000 && e.0 < 0x1_0000_0000),
        "hole: {outcome}"
    );
    assert!(ram_bytes(&map) > (3 << 30) - (8 << 20), "{outcome}");
}

#[test]
fn boot_i8042_reset_exits_zero() {
    let args = ["--mem", "64M", "--cmdline", "testguest.action=reset"];
    let Some(outcome) = boot("boot_i8042_reset_exits_zero", &args) else {
        return;
    };
    assert_eq!(outcome.code(), 0, "{outcome}");
    outcome.line("testguest: selftest: PASS");
    assert!(outcome.stderr.is_empty(), "{outcome}");
}

#[test]
fn boot_triple_fault_exits_three() {
    let args = ["--mem", "64M", "--cmdline", "testguest.action=triplefault"];
    let Some(outcome) = boot("boot_triple_fault_exits_three", &args) else {
        return;
    };
    assert_eq!(outcome.code(), 3, "{outcome}");
    assert_eq!(outcome.stderr.lines().count(), 1, "{outcome}");
    assert!(outcome.stderr.contains("triple-faulted"), "{outcome}");
}

#[test]
fn boot_debug_exit_value_maps_to_status() {
    for (value, status) in [(0, 0), (1, 33), (5, 37), (200, 127)] {
        let cmdline = format!("testguest.action=exit:{value}");
        let Some(outcome) = boot(
            "boot_debug_exit_value_maps_to_status",
            &["--mem", "64M", "--cmdline", &cmdline],
        ) else {
            return;
        };
        assert_eq!(outcome.code(), status, "{outcome}");
        if status != 0 {
            assert!(
                outcome
                    .stderr
                    .contains(&format!("guest wrote {value} to the debug-exit port")),
                "{outcome}"
            );
        }
    }
}

/// The guest is built for x86_64-unknown-none (soft-float): no SSE/AVX register
/// use, and none of the instructions the nested hosts cannot emulate at CPL0.
#[test]
fn test_guest_has_no_sse_avx_or_unemulatable_instructions() {
    let guest = test_guest();
    let output = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&guest)
        .output()
        .expect("objdump (binutils) is installed");
    assert!(
        output.status.success(),
        "objdump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.lines().count() > 100, "objdump printed no code");
    let banned = [
        "%xmm",
        "%ymm",
        "%zmm",
        "cmpxchg16b",
        "xsave",
        "xrstor",
        "int3",
    ];
    for line in text.lines() {
        // The instruction without the symbol objdump names after it
        // (`jmp 10a650 <...Point3run>` is no int3).
        let insn = line.split_once(":\t").map_or("", |(_, i)| i);
        let insn = insn.split('<').next().unwrap_or("").trim();
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        assert!(
            !banned.iter().any(|b| insn.contains(b)),
            "forbidden instruction: {line}"
        );
        assert_ne!(mnemonic, "int", "software interrupt: {line}");
    }
}

/// 64-bit code for [`vmlinux_elf`]: in long mode `mov rax, 7 << 32; shr rax,
/// 32` leaves 7 in `al` (in 32-bit mode the REX prefixes decode as `dec eax`
/// and the rest is garbage); then, if the zero page at `rsi` has e820 entries
/// and its `cmd_line_ptr` points at a command line starting with 'E', it
/// writes `al` to the debug-exit port, otherwise 9. Assembled with GNU as:
///
/// ```text
///     mov rax, 0x0000000700000000
///     shr rax, 32
///     cmp byte ptr [rsi + 0x1e8], 0      # boot_params.e820_entries
///     je bad
///     mov ecx, dword ptr [rsi + 0x228]   # boot_params.hdr.cmd_line_ptr
///     cmp byte ptr [rcx], 'E'
///     jne bad
///     jmp out
/// bad: mov al, 9
/// out: mov dx, 0xf4
///     out dx, al
/// 1:  hlt
///     jmp 1b
/// ```
const ELF64_ENTRY_CODE: [u8; 46] = [
    0x48, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x48, 0xc1, 0xe8, 0x20, 0x80, 0xbe,
    0xe8, 0x01, 0x00, 0x00, 0x00, 0x74, 0x0d, 0x8b, 0x8e, 0x28, 0x02, 0x00, 0x00, 0x80, 0x39, 0x45,
    0x75, 0x02, 0xeb, 0x02, 0xb0, 0x09, 0x66, 0xba, 0xf4, 0x00, 0xee, 0xf4, 0xeb, 0xfd,
];

#[test]
fn boot_elf_without_pvh_note_enters_64_bit_with_zero_page() {
    if !kvm_or_skip("boot_elf_without_pvh_note_enters_64_bit_with_zero_page") {
        return;
    }
    let path = std::env::temp_dir().join(format!("minivmm-elf64-{}.elf", std::process::id()));
    std::fs::write(&path, vmlinux_elf(VMLINUX_LOAD, &ELF64_ENTRY_CODE)).unwrap();
    let kernel = path.to_str().unwrap();
    let outcome = minivmm(
        [
            "--kernel",
            kernel,
            "--mem",
            "64M",
            "--cmdline",
            "ELF64 entry test",
        ],
        TIMEOUT,
    );
    let _ = std::fs::remove_file(&path);
    // 32 + 7: long mode, entry at e_entry, a zero page with our cmdline.
    assert_eq!(outcome.code(), 39, "{outcome}");
    assert!(outcome.stderr.contains("wrote 7"), "{outcome}");
}

#[test]
fn boot_bzimage_with_64_bit_entry_is_entered_at_load_address_plus_0x200() {
    if !kvm_or_skip("boot_bzimage_with_64_bit_entry_is_entered_at_load_address_plus_0x200") {
        return;
    }
    // mov al, 5; out 0xf4, al; hlt (the same bytes in 64-bit mode).
    let code = [0xb0, 0x05, 0xe6, 0xf4, 0xf4];
    let path = std::env::temp_dir().join(format!("minivmm-bz64-{}.img", std::process::id()));
    std::fs::write(&path, bzimage(0x020f, 1, &code)).unwrap();
    let outcome = minivmm(
        ["--kernel", path.to_str().unwrap(), "--mem", "64M"],
        TIMEOUT,
    );
    let _ = std::fs::remove_file(&path);
    assert_eq!(outcome.code(), 32 + 5, "{outcome}");
}

#[test]
fn boot_with_stdout_closed_logs_one_line_and_runs_to_the_end() {
    if !kvm_or_skip("boot_with_stdout_closed_logs_one_line_and_runs_to_the_end") {
        return;
    }
    let mut child = Command::new(minivmm_bin())
        .args(["--kernel", test_guest().to_str().unwrap(), "--mem", "128M"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end at once: every console write fails with EPIPE.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one warning, not one per byte: {stderr}"
    );
    assert!(stderr.contains("console output failed"), "{stderr}");
}
