//! Block I/O end to end: the test guest's virtio-blk driver (guest-images)
//! against minivmm's virtio-mmio transport and virtio-blk device on a host
//! image file. The host writes the image, the guest reads and writes it, and
//! the host checks the file byte for byte afterwards.
//!
//! The guest's block self-test (guest-images/README.md) with
//! `testguest.blk=write` writes sector 1 (one segment), sectors 2..=9 (one
//! request of three segments) and the last sector, each byte `pattern(sector,
//! i)`, flushes, reads them back, and expects IOERR for a read past the end.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tests::{Outcome, kvm_or_skip, minivmm, pattern, test_guest};

const TIMEOUT: Duration = Duration::from_secs(300);
const SECTOR: usize = 512;
/// Sectors the guest reads and checksums by default.
const READ_SECTORS: usize = 64;

/// FNV-1a, 64 bit, as the guest prints it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Deterministic pseudo-random bytes (xorshift), so a failure is reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Image {
    path: PathBuf,
}

impl Image {
    fn new(name: &str, bytes: &[u8]) -> Image {
        let path =
            std::env::temp_dir().join(format!("minivmm-block-{}-{name}.img", std::process::id()));
        fs::write(&path, bytes).unwrap();
        Image { path }
    }

    fn sparse(name: &str, len: u64) -> Image {
        let path =
            std::env::temp_dir().join(format!("minivmm-block-{}-{name}.img", std::process::id()));
        let _ = fs::remove_file(&path);
        fs::File::create(&path).unwrap().set_len(len).unwrap();
        Image { path }
    }

    fn arg(&self, options: &str) -> String {
        format!("{}{options}", self.path.display())
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        std::os::unix::fs::FileExt::read_exact_at(
            &fs::File::open(&self.path).unwrap(),
            &mut buf,
            offset,
        )
        .unwrap();
        buf
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Boots the test guest with 128 MiB, `disks` (`--disk` values) and `cmdline`.
fn boot(test: &str, disks: &[String], cmdline: &str) -> Option<Outcome> {
    boot_with(test, "128M", disks, cmdline)
}

fn boot_with(test: &str, mem: &str, disks: &[String], cmdline: &str) -> Option<Outcome> {
    if !kvm_or_skip(test) {
        return None;
    }
    let guest = test_guest();
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        guest.display().to_string(),
        "--mem".into(),
        mem.into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.push("--cmdline".into());
    args.push(cmdline.into());
    Some(minivmm(&args, TIMEOUT))
}

fn assert_passed(outcome: &Outcome) {
    assert_eq!(outcome.code(), 0, "{outcome}");
    assert!(outcome.stderr.is_empty(), "{outcome}");
    outcome.line("testguest: selftest: PASS");
}

/// The checksum the guest printed for disk `n`.
fn guest_checksum(outcome: &Outcome, n: usize) -> u64 {
    let line = outcome.line(&format!(
        "testguest: blk{n}: read sectors 0..{READ_SECTORS}: fnv1a64=0x"
    ));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// The image as the guest's write test leaves it.
fn expected_after_writes(original: &[u8]) -> Vec<u8> {
    let mut out = original.to_vec();
    let last = (original.len() / SECTOR - 1) as u64;
    for sector in (1..=9).chain([last]) {
        let at = sector as usize * SECTOR;
        for i in 0..SECTOR {
            out[at + i] = pattern(sector, i);
        }
    }
    out
}

#[test]
fn block_guest_reads_host_written_image_and_checksums_agree() {
    let data = noise(8 << 20, 1);
    let image = Image::new("read", &data);
    let Some(outcome) = boot(
        "block_guest_reads_host_written_image",
        &[image.arg("")],
        "testguest.blk=read",
    ) else {
        return;
    };
    assert_passed(&outcome);
    assert_eq!(
        outcome.line("testguest: blk0: capacity ").split(' ').next(),
        Some("16384"),
        "{outcome}"
    );
    assert_eq!(
        guest_checksum(&outcome, 0),
        fnv1a64(&data[..READ_SECTORS * SECTOR]),
        "{outcome}"
    );
    outcome.line("testguest: blk0: read past end: IOERR (expected)");
    assert_eq!(
        fs::read(&image.path).unwrap(),
        data,
        "a read-only test changed the image"
    );
}

#[test]
fn block_guest_writes_land_exactly_at_the_expected_sectors() {
    let data = noise(4 << 20, 2);
    let image = Image::new("write", &data);
    let Some(outcome) = boot(
        "block_guest_writes_land_exactly",
        &[image.arg("")],
        "testguest.blk=write",
    ) else {
        return;
    };
    assert_passed(&outcome);
    outcome.line("testguest: blk0: write sector 2 count 8 segments 3: ok");
    outcome.line("testguest: blk0: flush: ok");
    outcome.line("testguest: blk0: read back: ok");
    let after = fs::read(&image.path).unwrap();
    let expected = expected_after_writes(&data);
    assert_eq!(after.len(), expected.len());
    let differing: Vec<usize> = (0..after.len() / SECTOR)
        .filter(|&s| after[s * SECTOR..(s + 1) * SECTOR] != expected[s * SECTOR..(s + 1) * SECTOR])
        .collect();
    assert!(
        differing.is_empty(),
        "sectors not as expected: {differing:?}\n{outcome}"
    );
}

#[test]
fn block_read_only_disk_rejects_writes_and_file_is_unchanged() {
    let data = noise(1 << 20, 3);
    let image = Image::new("ro", &data);
    let Some(outcome) = boot(
        "block_read_only_disk_rejects_writes",
        &[image.arg(",ro")],
        "testguest.blk=write",
    ) else {
        return;
    };
    assert_passed(&outcome);
    assert!(
        outcome.line("testguest: blk0: capacity ").contains(" ro"),
        "{outcome}"
    );
    outcome.line("testguest: blk0: write on read-only disk: IOERR (expected)");
    assert_eq!(fs::read(&image.path).unwrap(), data);
}

#[test]
fn block_two_disks_with_serials() {
    let (a, b) = (noise(1 << 20, 4), noise(2 << 20, 5));
    let (first, second) = (Image::new("two-a", &a), Image::new("two-b", &b));
    let disks = [first.arg(",id=first-disk"), second.arg(",ro,id=second")];
    let Some(outcome) = boot(
        "block_two_disks_with_serials",
        &disks,
        "testguest.blk=write",
    ) else {
        return;
    };
    assert_passed(&outcome);
    assert!(
        outcome
            .line("testguest: blk0: capacity 2048 sectors")
            .contains("id \"first-disk\""),
        "{outcome}"
    );
    assert!(
        outcome
            .line("testguest: blk1: capacity 4096 sectors")
            .contains("id \"second\""),
        "{outcome}"
    );
    assert_eq!(
        guest_checksum(&outcome, 0),
        fnv1a64(&a[..READ_SECTORS * SECTOR])
    );
    assert_eq!(
        guest_checksum(&outcome, 1),
        fnv1a64(&b[..READ_SECTORS * SECTOR])
    );
    assert_eq!(fs::read(&first.path).unwrap(), expected_after_writes(&a));
    assert_eq!(
        fs::read(&second.path).unwrap(),
        b,
        "the read-only disk is unchanged"
    );
}

/// 5 GiB: the last sector's byte offset needs more than 32 bits.
#[test]
fn block_sparse_5gib_disk_writes_its_last_sector() {
    let len: u64 = 5 << 30;
    let image = Image::sparse("5g", len);
    let Some(outcome) = boot(
        "block_sparse_5gib_disk",
        &[image.arg("")],
        "testguest.blk=write",
    ) else {
        return;
    };
    assert_passed(&outcome);
    let last = len / SECTOR as u64 - 1;
    let expected: Vec<u8> = (0..SECTOR).map(|i| pattern(last, i)).collect();
    assert_eq!(
        image.read_at(last * SECTOR as u64, SECTOR),
        expected,
        "{outcome}"
    );
    assert_eq!(
        image.read_at((last - 1) * SECTOR as u64, SECTOR),
        vec![0; SECTOR]
    );
    assert_eq!(
        image.read_at(SECTOR as u64, SECTOR),
        (0..SECTOR).map(|i| pattern(1, i)).collect::<Vec<_>>()
    );
    assert_eq!(
        image.read_at(10 * SECTOR as u64, SECTOR * 64),
        vec![0; SECTOR * 64]
    );
    assert_eq!(fs::metadata(&image.path).unwrap().len(), len);
}

#[test]
fn block_bad_disk_arguments_are_reported() {
    let dir = std::env::temp_dir().join(format!("minivmm-block-{}-bad", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.img");
    fs::write(&empty, b"").unwrap();
    let guest = test_guest();
    let cases: [(&Path, &str); 3] = [
        (&dir.join("missing.img"), "missing.img"),
        (&dir, "directory"),
        (&empty, "empty"),
    ];
    for (path, needle) in cases {
        let args = [
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--disk".as_ref(),
            path.as_os_str(),
        ];
        let outcome = minivmm(args, Duration::from_secs(30));
        assert_eq!(outcome.code(), 1, "{outcome}");
        assert_eq!(outcome.stderr.lines().count(), 1, "{outcome}");
        assert!(
            outcome.stderr.to_lowercase().contains(needle),
            "{needle}: {outcome}"
        );
    }
    // A disk another process holds locked.
    let locked = dir.join("locked.img");
    fs::write(&locked, vec![0; 4096]).unwrap();
    let holder = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&locked)
        .unwrap();
    holder.try_lock().unwrap();
    let args = [
        "--kernel".as_ref(),
        guest.as_os_str(),
        "--disk".as_ref(),
        locked.as_os_str(),
    ];
    let outcome = minivmm(args, Duration::from_secs(30));
    assert_eq!(outcome.code(), 1, "{outcome}");
    assert!(outcome.stderr.contains("lock"), "{outcome}");
    drop(holder);
    let outcome = minivmm(
        ["--kernel", "/nonexistent", "--disk", "a.img,rw"],
        Duration::from_secs(30),
    );
    assert_eq!(outcome.code(), 2, "{outcome}");
    let _ = fs::remove_dir_all(&dir);
}

/// With 3 GiB the guest has RAM above the MMIO hole; its DMA buffers must
/// still come from below 4 GiB, and the I/O must land as with 128 MiB.
#[test]
fn block_dma_buffers_stay_below_4gib_with_3g_of_ram() {
    let data = noise(1 << 20, 6);
    let image = Image::new("3g", &data);
    let Some(outcome) = boot_with(
        "block_dma_buffers_stay_below_4gib",
        "3G",
        &[image.arg("")],
        "testguest.blk=write",
    ) else {
        return;
    };
    assert_passed(&outcome);
    outcome.line("testguest: high ram: ");
    let dma = outcome.line("testguest: dma: ");
    assert!(dma.contains(" in use 0 "), "{outcome}");
    let highest = dma
        .rsplit("highest end 0x")
        .next()
        .unwrap()
        .trim_end_matches(')');
    assert!(
        u64::from_str_radix(highest, 16).unwrap() <= 4 << 30,
        "{outcome}"
    );
    outcome.line("testguest: check dma: ok");
    assert_eq!(fs::read(&image.path).unwrap(), expected_after_writes(&data));
}

#[test]
fn block_devices_are_announced_before_init_arguments_after_a_double_dash() {
    if !kvm_or_skip("block_devices_are_announced_before_init_arguments") {
        return;
    }
    let image = Image::new("init-args", &noise(1 << 20, 3));
    let cmdline = "console=ttyS0 testguest.blk=read -- single init.arg=1";
    // With ACPI off the devices are command-line words among the kernel's
    // own arguments; with it on (the default) only the DSDT names them.
    for (acpi, seen) in [
        (
            "off",
            "console=ttyS0 testguest.blk=read virtio_mmio.device=4K@0xd0000000:5 -- single init.arg=1",
        ),
        ("on", cmdline),
    ] {
        let guest = test_guest();
        let disk = image.arg("");
        let args = [
            "--kernel",
            guest.to_str().unwrap(),
            "--mem",
            "128M",
            "--disk",
            &disk,
            "--acpi",
            acpi,
            "--cmdline",
            cmdline,
        ];
        let outcome = minivmm(args, TIMEOUT);
        assert_passed(&outcome);
        assert_eq!(
            outcome.line("testguest: cmdline: ").trim_end(),
            seen,
            "{outcome}"
        );
        outcome.line("testguest: blk0: read past end: IOERR (expected)");
    }
}

#[test]
fn block_burst_of_32_reads_costs_one_notification_and_one_interrupt() {
    let data = noise(1 << 20, 4);
    let image = Image::new("burst", &data);
    let Some(outcome) = boot(
        "block_burst_of_32_reads",
        &[image.arg("")],
        "testguest.blk=read",
    ) else {
        return;
    };
    assert_passed(&outcome);
    let line = outcome.line("testguest: blk0: burst 32 reads in flight: ok, fnv1a64=0x");
    let fields: Vec<&str> = line.split([',', ' ']).filter(|f| !f.is_empty()).collect();
    // ["<hex>", "notifications", "<n>", "interrupts", "<n>"]
    let sum = u64::from_str_radix(fields[0], 16).unwrap();
    assert_eq!(sum, fnv1a64(&data[..32 * SECTOR]), "{outcome}");
    let notifications: u64 = fields[2].parse().unwrap();
    let interrupts: u64 = fields[4].parse().unwrap();
    // With EVENT_IDX the driver kicks once for the burst and asks for one
    // interrupt at its end; the device serves it in one batch.
    assert!(
        notifications * 8 <= 32,
        "{notifications} notifications: {outcome}"
    );
    assert!(interrupts * 8 <= 32, "{interrupts} interrupts: {outcome}");
    assert_eq!((notifications, interrupts), (1, 1), "{outcome}");
}
