//! Bad input on minivmm's command line and in the files it names: one line on
//! stderr, the documented exit status (2 for the command line, 1 for files and
//! host resources), never a panic. Most of these fail before KVM is touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{
    Outcome, VMLINUX_LOAD, bzimage, kvm_or_skip, minivmm, minivmm_bin, run_with_timeout,
    test_guest, vmlinux_elf,
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A scratch directory for this test, removed first if left over.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minivmm-cli-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts exit `code` and exactly one stderr line `minivmm: ...` containing
/// every one of `needles`.
fn assert_one_line_error(outcome: &Outcome, code: i32, needles: &[&str]) {
    assert_eq!(outcome.code(), code, "{outcome}");
    let lines: Vec<_> = outcome.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one stderr line: {outcome}");
    assert!(lines[0].starts_with("minivmm: "), "{outcome}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} missing: {outcome}");
    }
    assert!(!outcome.stderr.contains("panicked"), "{outcome}");
    assert!(
        outcome.stdout.is_empty(),
        "no guest output expected: {outcome}"
    );
}

fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn cli_missing_kernel_flag_is_a_usage_error() {
    assert_one_line_error(&minivmm(["--mem", "64M"], TIMEOUT), 2, &["--kernel"]);
}

#[test]
fn cli_rejects_bad_flag_values() {
    let cases: &[(&[&str], &str)] = &[
        (&["--mem", "lots"], "lots"),
        (&["--mem", "1M"], "minimum"),
        (&["--mem", "1025G"], "maximum"),
        (&["--mem", "100001K"], "4K"),
        (&["--cpus", "0"], "--cpus"),
        (&["--cpus", "255"], "--cpus"),
        (&["--cpus", "two"], "--cpus"),
        (&["--cpu-template", "host"], "minimal or passthrough"),
        (&["--log-level", "loud"], "log level"),
        (&["--acpi", "maybe"], "possible values: on, off"),
        (&["--frobnicate"], "--frobnicate"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--kernel", "/nonexistent"];
        all.extend_from_slice(args);
        assert_one_line_error(&minivmm(&all, TIMEOUT), 2, &[needle]);
    }
}

#[test]
fn cli_help_and_version_exit_zero() {
    for flag in ["--help", "--version"] {
        let outcome = minivmm([flag], TIMEOUT);
        assert_eq!(outcome.code(), 0, "{outcome}");
        assert!(outcome.stdout.contains("minivmm"), "{outcome}");
    }
}

#[test]
fn cli_kernel_that_cannot_be_read_is_reported() {
    let dir = scratch("kernel-missing");
    let missing = dir.join("no-such-kernel");
    let outcome = minivmm(["--kernel".as_ref(), missing.as_os_str()], TIMEOUT);
    assert_one_line_error(
        &outcome,
        1,
        &["Cannot read", "no-such-kernel", "No such file"],
    );
    let outcome = minivmm(["--kernel".as_ref(), dir.as_os_str()], TIMEOUT);
    assert_one_line_error(&outcome, 1, &["a directory, not a regular file"]);
}

#[test]
fn cli_fifo_or_device_node_as_kernel_initrd_or_disk_is_refused_at_once() {
    let dir = scratch("special-files");
    let fifo = dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let guest = test_guest();
    let cases: [(&[&std::ffi::OsStr], &str); 5] = [
        (&["--kernel".as_ref(), fifo.as_os_str()], "a FIFO"),
        (
            &["--kernel".as_ref(), "/dev/zero".as_ref()],
            "a character device",
        ),
        (
            &[
                "--kernel".as_ref(),
                guest.as_os_str(),
                "--initrd".as_ref(),
                fifo.as_os_str(),
            ],
            "a FIFO",
        ),
        (
            &[
                "--kernel".as_ref(),
                guest.as_os_str(),
                "--disk".as_ref(),
                fifo.as_os_str(),
            ],
            "a FIFO",
        ),
        (
            &[
                "--kernel".as_ref(),
                guest.as_os_str(),
                "--disk".as_ref(),
                "/dev/null".as_ref(),
            ],
            "a character device",
        ),
    ];
    for (args, needle) in cases {
        // A FIFO nobody writes would block open(2) forever: the timeout is
        // the test.
        let outcome = minivmm(args, TIMEOUT);
        assert_one_line_error(&outcome, 1, &[needle, "not a regular file"]);
    }
}

#[test]
fn cli_bzimage_without_64_bit_entry_is_refused_before_it_runs() {
    let dir = scratch("bzimage-32");
    let code = [0xf4; 16];
    // A 2.15 kernel without XLF_KERNEL_64, and a 2.11 one (no xloadflags).
    let no_64 = file_with(&dir, "no-xlf-64", &bzimage(0x020f, 0, &code));
    let old = file_with(&dir, "protocol-2.11", &bzimage(0x020b, 1, &code));
    for kernel in [no_64, old] {
        let outcome = minivmm(["--kernel".as_ref(), kernel.as_os_str()], TIMEOUT);
        assert_one_line_error(&outcome, 1, &["has no 64-bit entry point"]);
    }
}

#[test]
fn cli_kernel_that_is_not_an_image_is_reported() {
    let dir = scratch("kernel-garbage");
    let garbage = file_with(&dir, "garbage", &[0x5a; 8192]);
    let empty = file_with(&dir, "empty", b"");
    let mut elf = vec![0u8; 4096];
    elf[..4].copy_from_slice(b"\x7fELF");
    let bad_elf = file_with(&dir, "bad-elf", &elf);
    for kernel in [garbage, empty, bad_elf] {
        let outcome = minivmm(["--kernel".as_ref(), kernel.as_os_str()], TIMEOUT);
        assert_one_line_error(&outcome, 1, &["is not a loadable bzImage or ELF kernel"]);
    }
}

#[test]
fn cli_kernel_entry_outside_its_image_is_reported() {
    if !kvm_or_skip("cli_kernel_entry_outside_its_image_is_reported") {
        return;
    }
    // Found by fuzzing (boot_image): an entry outside the image was taken.
    let dir = scratch("kernel-entry");
    for (name, entry) in [
        ("past-end", VMLINUX_LOAD + 16),
        ("below", 0x10_0000),
        ("far", 1 << 40),
    ] {
        let kernel = file_with(&dir, name, &vmlinux_elf(entry, &[0xf4; 16]));
        let outcome = minivmm(
            [
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--mem".as_ref(),
                "64M".as_ref(),
            ],
            TIMEOUT,
        );
        assert_one_line_error(&outcome, 1, &["entry point", "outside the loaded image"]);
    }
}

#[test]
fn cli_bzimage_that_ends_before_its_entry_is_refused() {
    // Found by fuzzing (boot_image): a bzImage whose protected-mode part is
    // shorter than 0x200 bytes was entered past its end.
    let dir = scratch("bzimage-entry");
    for (name, code) in [("nothing-at-entry", &[][..]), ("short", &[0xf4; 16][..])] {
        let mut image = bzimage(0x020f, 1, code);
        if name == "short" {
            // Cut the protected-mode part to 0x100 bytes.
            image.truncate(5 * 512 + 0x100);
        }
        let kernel = file_with(&dir, name, &image);
        let outcome = minivmm(["--kernel".as_ref(), kernel.as_os_str()], TIMEOUT);
        assert_one_line_error(&outcome, 1, &["entry point", "outside the loaded image"]);
    }
}

#[test]
fn cli_kernel_larger_than_guest_ram_is_reported() {
    let dir = scratch("kernel-large");
    let big = dir.join("big");
    fs::File::create(&big).unwrap().set_len(20 << 20).unwrap();
    let outcome = minivmm(
        [
            "--kernel".as_ref(),
            big.as_os_str(),
            "--mem".as_ref(),
            "16M".as_ref(),
        ],
        TIMEOUT,
    );
    assert_one_line_error(&outcome, 1, &["larger than guest RAM"]);
}

#[test]
fn cli_mem_larger_than_the_host_is_reported() {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let gib = kib.div_ceil(1 << 20) + 1;
    if gib > 1024 {
        eprintln!("SKIPPED: this host has more RAM than minivmm's 1T maximum");
        return;
    }
    let mem = format!("{gib}G");
    let outcome = minivmm(["--kernel", "/nonexistent", "--mem", &mem], TIMEOUT);
    assert_one_line_error(&outcome, 1, &["more than the host's"]);
}

#[test]
fn cli_bad_initrd_is_reported() {
    let dir = scratch("initrd");
    let guest = test_guest();
    let missing = dir.join("no-such-initrd");
    let empty = file_with(&dir, "empty", b"");
    let huge = dir.join("huge");
    fs::File::create(&huge).unwrap().set_len(80 << 20).unwrap();
    let cases = [
        (missing, "Cannot read"),
        (empty, "is empty"),
        (huge, "Cannot place the initrd"),
    ];
    for (initrd, needle) in cases {
        let args = [
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--mem".as_ref(),
            "64M".as_ref(),
            "--initrd".as_ref(),
            initrd.as_os_str(),
        ];
        assert_one_line_error(&minivmm(args, TIMEOUT), 1, &[needle]);
    }
}

#[test]
fn cli_overlong_cmdline_is_reported() {
    let guest = test_guest();
    let cmdline = "x".repeat(5000);
    let args = [
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ];
    assert_one_line_error(&minivmm(args, TIMEOUT), 1, &["command line"]);
}

/// With /dev/kvm replaced by a file that is not KVM (a private mount namespace;
/// needs root), minivmm says so and exits 1.
#[test]
fn cli_missing_kvm_is_reported() {
    if !is_root() || !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED cli_missing_kvm_is_reported: needs root and a /dev/kvm to hide");
        return;
    }
    let dir = scratch("nokvm");
    let fake = file_with(&dir, "not-kvm", b"");
    let script = format!(
        "mount --bind {} /dev/kvm && exec {} --kernel {} --mem 64M",
        fake.display(),
        minivmm_bin().display(),
        test_guest().display()
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let outcome = run_with_timeout(command, TIMEOUT);
    assert_one_line_error(&outcome, 1, &["/dev/kvm"]);
}

/// Whether the effective uid is 0 (from /proc, to keep tests free of unsafe).
fn is_root() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// A guest that cannot run still leaves the terminal as it found it: run under
/// a pseudo-terminal (`script`), compare `stty -g` before and after.
#[test]
fn cli_terminal_settings_survive_every_exit() {
    if !kvm_or_skip("cli_terminal_settings_survive_every_exit") {
        return;
    }
    let bin = minivmm_bin();
    let guest = test_guest();
    let runs = [
        format!("{} --kernel /nonexistent", bin.display()),
        format!("{} --kernel {} --mem 64M", bin.display(), guest.display()),
        format!(
            "{} --kernel {} --mem 64M --cmdline testguest.action=triplefault",
            bin.display(),
            guest.display()
        ),
    ];
    for run in runs {
        let inner = format!("stty -g; {run} >/dev/null 2>&1; echo status=$?; stty -g");
        let mut command = Command::new("script");
        command.args(["-qec", &inner, "/dev/null"]);
        let outcome = run_with_timeout(command, Duration::from_secs(120));
        let lines: Vec<_> = outcome
            .stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        assert!(lines.len() >= 3, "{outcome}");
        let before = lines[0];
        let after = lines[lines.len() - 1];
        assert!(lines.iter().any(|l| l.starts_with("status=")), "{outcome}");
        assert_eq!(
            before, after,
            "terminal settings changed by `{run}`: {outcome}"
        );
    }
}
