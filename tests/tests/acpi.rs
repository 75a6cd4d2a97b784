//! ACPI power management end to end (KVM): a PVH guest of a few
//! instructions writes the FADT's sleep control and reset registers, as a
//! kernel's `poweroff` and `reboot=acpi` do. (The tables themselves are
//! checked in `vmm::acpi`'s tests, iasl included.)

use std::time::Duration;

use tests::{Outcome, kvm_or_skip, minivmm, pvh_elf};

const TIMEOUT: Duration = Duration::from_secs(60);

/// 32-bit code: `mov dx, port; mov al, value; out dx, al` for each write,
/// then `mov al, 7; out 0xf4, al` (debug exit: status 39) and `hlt`.
fn guest(writes: &[(u16, u8)]) -> Vec<u8> {
    let mut code = Vec::new();
    for &(port, value) in writes {
        code.extend_from_slice(&[0x66, 0xba]);
        code.extend_from_slice(&port.to_le_bytes());
        code.extend_from_slice(&[0xb0, value, 0xee]);
    }
    code.extend_from_slice(&[0xb0, 0x07, 0xe6, 0xf4, 0xf4]);
    code
}

fn run(test: &str, writes: &[(u16, u8)], acpi: &str) -> Option<Outcome> {
    if !kvm_or_skip(test) {
        return None;
    }
    let path = std::env::temp_dir().join(format!("minivmm-{test}-{}.elf", std::process::id()));
    std::fs::write(&path, pvh_elf(&guest(writes))).unwrap();
    let outcome = minivmm(
        [
            "--kernel",
            path.to_str().unwrap(),
            "--mem",
            "64M",
            "--acpi",
            acpi,
            "--log-level",
            "info",
        ],
        TIMEOUT,
    );
    let _ = std::fs::remove_file(&path);
    Some(outcome)
}

#[test]
fn acpi_s5_powers_off_with_status_zero() {
    let Some(outcome) = run("acpi_s5", &[(0x600, 0x34)], "on") else {
        return;
    };
    assert_eq!(outcome.code(), 0, "{outcome}");
    assert!(outcome.stderr.contains("ACPI S5"), "{outcome}");
}

#[test]
fn acpi_reset_register_exits_zero() {
    let Some(outcome) = run("acpi_reset", &[(0x602, 1)], "on") else {
        return;
    };
    assert_eq!(outcome.code(), 0, "{outcome}");
    assert!(outcome.stderr.contains("guest reset"), "{outcome}");
}

#[test]
fn acpi_garbage_in_the_power_registers_is_ignored_and_logged_once() {
    let garbage = [
        (0x600, 0xff),
        (0x600, 0x14),
        (0x600, 0x20),
        (0x601, 0xff),
        (0x602, 0),
        (0x602, 7),
    ];
    let Some(outcome) = run("acpi_garbage", &garbage, "on") else {
        return;
    };
    assert_eq!(
        outcome.code(),
        39,
        "the guest ran on to its debug exit: {outcome}"
    );
    assert_eq!(
        outcome.stderr.matches("sleep control value").count(),
        1,
        "{outcome}"
    );
    assert_eq!(
        outcome.stderr.matches("reset register value").count(),
        1,
        "{outcome}"
    );
}

#[test]
fn acpi_off_has_no_power_registers() {
    let Some(outcome) = run("acpi_off", &[(0x600, 0x34), (0x602, 1)], "off") else {
        return;
    };
    assert_eq!(outcome.code(), 39, "{outcome}");
}

/// The test guest with `--acpi on`, `cpus` vCPUs and two disks (a third
/// device slot would be a network device; two block devices show the DSDT's
/// order and IRQs), powering off through ACPI when done.
fn test_guest_with_acpi(cpus: u8) -> Option<Outcome> {
    let test = format!("acpi_test_guest_cpus_{cpus}");
    if !kvm_or_skip(&test) {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("minivmm-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disks: Vec<_> = (0..2)
        .map(|i| {
            let p = dir.join(format!("disk{i}.img"));
            std::fs::write(&p, vec![i as u8; 1 << 20]).unwrap();
            p
        })
        .collect();
    let guest = tests::test_guest();
    let cpus = cpus.to_string();
    let outcome = minivmm(
        [
            "--kernel",
            guest.to_str().unwrap(),
            "--mem",
            "128M",
            "--cpus",
            &cpus,
            "--acpi",
            "on",
            "--disk",
            disks[0].to_str().unwrap(),
            "--disk",
            disks[1].to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 testguest.exit=acpi",
            "--log-level",
            "info",
        ],
        Duration::from_secs(180),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Some(outcome)
}

#[test]
fn acpi_test_guest_finds_every_vcpu_and_device_in_the_tables_and_powers_off() {
    for cpus in [1u8, 2, 4] {
        let Some(outcome) = test_guest_with_acpi(cpus) else {
            return;
        };
        let out = &outcome.stdout;
        assert_eq!(outcome.code(), 0, "{outcome}");
        assert!(outcome.stderr.contains("ACPI S5"), "powered off: {outcome}");
        assert!(
            out.contains("testguest: action: ACPI power-off (S5, SLP_TYP 5, port 0x600)"),
            "{out}"
        );
        assert!(
            out.contains("testguest: acpi: RSDP 0xe0000 revision 2, XSDT: FACP APIC"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "testguest: acpi: MADT: {cpus} cpus, I/O APIC 0xfec00000"
            )),
            "{out}"
        );
        assert!(
            out.contains("testguest: acpi: DSDT: 2 virtio-mmio devices, COM1 yes, S5 5"),
            "{out}"
        );
        for (base, irq) in [(0xd000_0000u64, 5), (0xd000_1000, 6)] {
            assert!(
                out.contains(&format!(
                    "testguest: acpi:   LNRO0005 0x{base:x} size 0x1000 irq {irq}"
                )),
                "{out}"
            );
        }
        // Found through the DSDT, not the command line (which has no
        // virtio_mmio.device= words with ACPI on).
        assert!(!out.contains("virtio_mmio.device="), "{out}");
        assert!(
            out.contains("testguest: blk0: PASS") && out.contains("testguest: blk1: PASS"),
            "{out}"
        );
        assert!(out.contains("testguest: selftest: PASS"), "{out}");
        // The e820 / PVH map shows the tables as ACPI memory.
        assert!(out.contains("] type 3"), "{out}");
    }
}
