//! Snapshots through Firecracker's API and restores into new processes
//! (issue 14):
//!
//! - a paused VM's snapshot holds every vCPU and device, and the VM runs on;
//! - the test guest's self-test across snapshots (`testguest.snapshot`):
//!   restored by `--restore` and by `PUT /snapshot/load` (paused, its TAP
//!   renamed), it finds its RAM pattern and disk sectors, completes the
//!   write in flight at the snapshot exactly once, and its network I/O;
//! - eight clones of one snapshot share the pages none of them wrote;
//! - a diff snapshot holds what changed, and full-then-diff is a new full;
//! - every bad snapshot is refused with one line before a VM exists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tests::api::{ok, put_scratch_drive_and_tap, refused, wait_for_socket};
use tests::netns::{GUEST, Netns, finish, guest_net, net_or_skip, ping, wait_line};
use tests::{Running, kvm_or_skip, minivmm_bin, pattern, test_guest};
use vmm::snapshot::format;
use vmm::snapshot::state::VmState;

#[test]
fn snapshot_of_a_paused_vm_holds_every_vcpu_and_device_and_the_vm_runs_on() {
    let test = "snapshot_of_a_paused_vm";
    if !net_or_skip(test) {
        return;
    }
    let dir = scratch(test);
    let (sock, disk) = (dir.join("api.sock"), dir.join("disk.img"));
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let ns = Netns::new("snap");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let args = format!(
        "console=ttyS0 testguest.blk=write {}",
        guest_net(0, ",serve=200")
    );
    let mut vm = boot_in(&ns, &sock, &disk, 2, &args);
    wait_line(&mut vm, "net0: udp burst 200: ok");

    let (state_path, mem_path) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let params = json!({"snapshot_type": "Full", "snapshot_path": state_path,
                        "mem_file_path": mem_path});
    let message = refused(&sock, "PUT", "/snapshot/create", &params.to_string());
    assert!(message.contains("paused"), "{message}");
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let diff = json!({"snapshot_type": "Diff", "snapshot_path": state_path,
                      "mem_file_path": mem_path});
    assert!(refused(&sock, "PUT", "/snapshot/create", &diff.to_string()).contains("Diff"));
    let bad = json!({"snapshot_path": "/nonexistent/dir/vm.snap", "mem_file_path": mem_path});
    assert!(refused(&sock, "PUT", "/snapshot/create", &bad.to_string()).contains("/nonexistent"));
    ok(&sock, "PUT", "/snapshot/create", &params.to_string());

    let state: VmState = format::decode(&std::fs::read(&state_path).unwrap()).unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.mem, 128 << 20);
    let ram: u64 = state.regions.iter().map(|(_, len)| len).sum();
    assert_eq!(std::fs::metadata(&mem_path).unwrap().len(), ram);
    assert_eq!(ram, 128 << 20);
    assert_eq!(state.devices.len(), 2, "a disk and a network device");
    assert_eq!(
        (state.devices[0].device_type, state.devices[1].device_type),
        (2, 1)
    );
    assert!(state.devices[1].active, "the network device is live");
    assert_eq!(state.nets[0].mac, [2, 0, 0, 0, 0, 0x15]);
    assert_eq!(state.disks[0].size, 1 << 20);
    // The boot vCPU runs the guest in long mode (EFER.LMA); the test guest
    // never starts the other, which still waits for its INIT and SIPI.
    assert_ne!(state.vcpus[0].sregs.efer & (1 << 10), 0);
    assert_ne!(state.vcpus[1].mp_state.mp_state, 0, "not runnable");
    // The pattern the guest wrote to its disk is in no way part of RAM, but
    // its kernel is: the memory file is RAM, not zeros.
    let mem = std::fs::read(&mem_path).unwrap();
    assert!(mem.iter().any(|&b| b != 0));

    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    let (received, out) = ping(&ns, 5, 56);
    assert_eq!(received, 5, "{out}");
    let outcome = finish(&ns, vm, GUEST, 1);
    outcome.line("testguest: blk0: PASS");
    let _ = std::fs::remove_dir_all(&dir);
}

/// minivmm in `ns` booting the test guest through the API: `cpus` vCPUs,
/// 128 MiB, `boot_args`, the scratch drive on `disk` and `eth0` on `tap0`.
fn boot_in(ns: &Netns, sock: &Path, disk: &Path, cpus: u8, boot_args: &str) -> Running {
    let vm =
        Running::start_typing(ns.command(&minivmm_bin(), &["--api-sock", sock.to_str().unwrap()]));
    wait_for_socket(sock);
    let machine = json!({"vcpu_count": cpus, "mem_size_mib": 128});
    ok(sock, "PUT", "/machine-config", &machine.to_string());
    let boot = json!({"kernel_image_path": test_guest(), "boot_args": boot_args});
    ok(sock, "PUT", "/boot-source", &boot.to_string());
    put_scratch_drive_and_tap(sock, disk);
    ok(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    vm
}

/// A fresh scratch directory for `test`.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("minivmm-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Pauses the VM behind `sock` and snapshots it into `dir` (as `--restore`
/// reads it), then kills the process.
fn snapshot_into(sock: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    ok(sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let params = json!({"snapshot_type": "Full", "snapshot_path": dir.join("snapshot"),
                        "mem_file_path": dir.join("memory")});
    ok(sock, "PUT", "/snapshot/create", &params.to_string());
}

/// Waits for the `count`th `snapshot: ready` line.
fn wait_ready(vm: &mut Running, count: usize) {
    let ready = |out: &str| out.matches("testguest: snapshot: ready").count() >= count;
    let found = vm.wait_for(Duration::from_secs(120), |out| {
        ready(out) || out.contains(": FAIL")
    });
    let out = vm.stdout_now();
    assert!(found && ready(&out), "no snapshot point {count}:\n{out}");
}

/// Whether `sectors` of `disk` hold the guest's write pattern.
fn has_pattern(disk: &Path, sectors: std::ops::Range<u64>) -> bool {
    let data = std::fs::read(disk).unwrap();
    sectors.clone().all(|s| {
        let at = (s * 512) as usize;
        data[at..at + 512]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(s, i))
    })
}

#[test]
fn a_vm_restored_in_a_new_process_finds_its_ram_and_disk_and_finishes_its_io() {
    let test = "restore";
    if !net_or_skip(test) {
        return;
    }
    let dir = scratch(test);
    let (sock, disk) = (dir.join("api.sock"), dir.join("disk.img"));
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let ns = Netns::new(test);
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let args = format!(
        "console=ttyS0 testguest.blk=write testguest.snapshot=16 {}",
        guest_net(0, ",serve=120")
    );
    let mut vm = boot_in(&ns, &sock, &disk, 1, &args);
    // Point 1: the block test's writes are done and one more is in flight.
    wait_ready(&mut vm, 1);
    let (at_blk, at_net) = (dir.join("at-blk"), dir.join("at-net"));
    snapshot_into(&sock, &at_blk);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    vm.type_in(b"g");
    // Point 2: the network device is live, its receive buffers posted.
    wait_ready(&mut vm, 2);
    snapshot_into(&sock, &at_net);
    let original = vm.kill();
    // The original VM's device saw the write only once the driver, tired
    // of waiting, notified it.
    assert!(
        original.stdout.contains(
            "blk0: write sector 10 across the snapshot: ok, completed once (served after its notification)"
        ),
        "{original}"
    );
    // Every write made before the snapshots is on disk.
    assert!(has_pattern(&disk, 1..11), "sectors 1..=10");
    // Sector 10 was written after snapshot A (by the original VM): undo it,
    // so that the restored VM's write of it shows.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&[7u8; 512], 10 * 512).unwrap();
    }

    // The first snapshot, by --restore, on the same TAP: the guest goes
    // through the rest of its block test and stops at point 2 again.
    let restored = ns.command(
        &minivmm_bin(),
        &["--restore", at_blk.to_str().unwrap(), "--log-level", "info"],
    );
    let mut vm = Running::start_typing(restored);
    vm.type_in(b"g");
    wait_ready(&mut vm, 1);
    // The write in flight at the snapshot (made available, never notified)
    // completed exactly once: the restored device served it unasked (every
    // queue is kicked at restore), the guest saw one used entry and read
    // its data back — from the disk as this process left it, since the
    // sector was reset before the restore.
    let out = vm.stdout_now();
    assert!(
        out.contains(
            "blk0: write sector 10 across the snapshot: ok, completed once (served without a notification)"
        ),
        "{out}"
    );
    assert!(has_pattern(&disk, 10..11));
    vm.type_in(b"g");
    wait_line(&mut vm, "net0: udp burst 200: ok");
    let (received, out) = ping(&ns, 3, 56);
    assert_eq!(received, 3, "{out}");
    let outcome = finish(&ns, vm, GUEST, 1);
    for line in [
        "testguest: snapshot: pattern in 4096 pages: ok",
        "testguest: blk0: PASS",
    ] {
        outcome.line(line);
    }
    assert!(
        !outcome.stdout.contains("booted via PVH"),
        "restored, not booted"
    );

    // The second, through the API, paused, on a TAP of another name in
    // another namespace.
    let ns2 = Netns::new("restore2");
    ns2.tap("tap9", "10.0.2.2/24");
    let _echo2 = ns2.echo();
    let sock2 = dir.join("api2.sock");
    let mut vm = Running::start_typing(
        ns2.command(&minivmm_bin(), &["--api-sock", sock2.to_str().unwrap()]),
    );
    wait_for_socket(&sock2);
    let load = |overrides: serde_json::Value, backend: &str| {
        json!({"snapshot_path": at_net.join("snapshot"),
               "mem_backend": {"backend_type": backend, "backend_path": at_net.join("memory")},
               "resume_vm": false, "network_overrides": overrides})
        .to_string()
    };
    let rename = json!([{"iface_id": "eth0", "host_dev_name": "tap9"}]);
    let unknown = json!([{"iface_id": "eth7", "host_dev_name": "tap9"}]);
    let message = refused(&sock2, "PUT", "/snapshot/load", &load(unknown, "File"));
    assert!(
        message.contains("eth7") && message.contains("eth0"),
        "{message}"
    );
    let message = refused(
        &sock2,
        "PUT",
        "/snapshot/load",
        &load(rename.clone(), "Uffd"),
    );
    assert!(message.contains("Uffd"), "{message}");
    // The saved TAP does not exist in this namespace.
    let message = refused(&sock2, "PUT", "/snapshot/load", &load(json!([]), "File"));
    assert!(message.contains("tap0"), "{message}");
    ok(&sock2, "PUT", "/snapshot/load", &load(rename, "File"));
    let info = ok(&sock2, "GET", "/", "");
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    // The restored VM's devices go by their saved names.
    let config = ok(&sock2, "GET", "/vm/config", "");
    assert!(
        config.contains(r#""iface_id":"eth0""#)
            && config.contains(r#""host_dev_name":"tap9""#)
            && config.contains(r#""drive_id":"scratch""#),
        "{config}"
    );
    let limit =
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}}"#;
    ok(&sock2, "PATCH", "/network-interfaces/eth0", limit);
    let message = refused(&sock2, "PUT", "/snapshot/load", &load(json!([]), "File"));
    assert!(message.contains("after starting"), "{message}");
    vm.type_in(b"g");
    ok(&sock2, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    wait_line(&mut vm, "net0: udp burst 200: ok");
    let (received, out) = ping(&ns2, 3, 56);
    assert_eq!(received, 3, "{out}");
    let outcome = finish(&ns2, vm, GUEST, 1);
    outcome.line("testguest: snapshot: pattern in 4096 pages: ok");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/proc/PID/smaps_rollup`'s `field` in bytes.
fn rollup(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in smaps_rollup:\n{text}"))
        * 1024
}

#[test]
fn eight_clones_of_one_snapshot_share_the_pages_none_of_them_wrote() {
    let test = "clones";
    if !kvm_or_skip(test) {
        return;
    }
    const MIB: u64 = 1 << 20;
    let dir = scratch(test);
    let (sock, snap) = (dir.join("api.sock"), dir.join("snap"));
    let guest = test_guest();
    let mut command = std::process::Command::new(minivmm_bin());
    command.args([
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "128M",
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 testguest.snapshot=64 testguest.action=hang",
    ]);
    let mut vm = Running::start_typing(command);
    wait_for_socket(&sock);
    wait_ready(&mut vm, 1);
    snapshot_into(&sock, &snap);
    drop(vm.kill());

    let mut clones: Vec<Running> = (0..8)
        .map(|_| {
            let mut c = std::process::Command::new(minivmm_bin());
            c.args(["--restore", snap.to_str().unwrap()]);
            let mut clone = Running::start_typing(c);
            clone.type_in(b"g");
            clone
        })
        .collect();
    for clone in &mut clones {
        let done = clone.wait_for(Duration::from_secs(60), |out| out.contains("action: hang"));
        let out = clone.stdout_now();
        assert!(done, "{out}");
        assert!(
            out.contains("snapshot: pattern in 16384 pages: ok"),
            "{out}"
        );
    }
    let (mut private, mut shared) = (0, 0);
    for clone in &clones {
        let pid = clone.pid();
        let p = rollup(pid, "Private_Clean") + rollup(pid, "Private_Dirty");
        let s = rollup(pid, "Shared_Clean") + rollup(pid, "Shared_Dirty");
        println!(
            "clone {pid}: private {} KiB, shared {} KiB",
            p >> 10,
            s >> 10
        );
        // Each clone has the 64 MiB pattern mapped, from the page cache.
        assert!(s >= 64 * MIB, "clone {pid}: shared {s}");
        private += p;
        shared += s;
    }
    println!(
        "8 clones of a 128 MiB guest: private {} MiB in all, shared {} MiB",
        private >> 20,
        shared >> 20
    );
    // What they share is one copy; what each owns is its VMM and the few
    // pages its guest wrote since the restore.
    assert!(
        private < 8 * 128 * MIB / 32,
        "private {} MiB",
        private >> 20
    );
    for clone in clones {
        drop(clone.kill());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_snapshots_are_refused_with_one_line_before_any_vm_exists() {
    let test = "badsnap";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = scratch(test);
    let (sock, disk, good) = (dir.join("api.sock"), dir.join("disk.img"), dir.join("good"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let guest = test_guest();
    let mut command = std::process::Command::new(minivmm_bin());
    command.args([
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "32M",
        "--disk",
        disk.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 testguest.snapshot=1 testguest.blk=read",
    ]);
    let mut vm = Running::start_typing(command);
    wait_for_socket(&sock);
    wait_ready(&mut vm, 1);
    snapshot_into(&sock, &good);
    drop(vm.kill());
    let state = std::fs::read(good.join("snapshot")).unwrap();
    let memory = good.join("memory");

    // A directory with `state` as its state file and a memory file of
    // `mem_len` bytes (the good one's when it has the right size).
    let case = |name: &str, state: &[u8], mem_len: Option<u64>| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("snapshot"), state).unwrap();
        match mem_len {
            None => std::os::unix::fs::symlink(&memory, d.join("memory")).unwrap(),
            Some(len) => std::fs::File::create(d.join("memory"))
                .unwrap()
                .set_len(len)
                .unwrap(),
        }
        d
    };
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut s = state.clone();
        edit(&mut s);
        s
    };
    let mut many: VmState = format::decode(&state).unwrap();
    many.vcpus = (0..1025)
        .map(|_| format::decode::<VmState>(&state).unwrap().vcpus.remove(0))
        .collect();
    let mut no_devices: VmState = format::decode(&state).unwrap();
    no_devices.devices.clear();
    let cases = [
        (case("truncated", &state[..100], None), "truncated"),
        (case("empty", &[], None), "truncated"),
        (case("magic", &with(&|s| s[0] ^= 0xff), None), "bad magic"),
        (
            case("version", &with(&|s| s[8] = 99), None),
            "version 99 is not supported",
        ),
        (
            case("checksum", &with(&|s| *s.last_mut().unwrap() ^= 1), None),
            "corrupt (checksum",
        ),
        (case("trailing", &with(&|s| s.push(0)), None), "malformed"),
        (
            case("memory", &state, Some(16 << 20)),
            "holds 16777216 bytes, the snapshot's guest has 33554432",
        ),
        (
            case("vcpus", &format::encode(&many).unwrap(), None),
            "1025 vCPUs, this host runs at most",
        ),
        (
            case("devices", &format::encode(&no_devices).unwrap(), None),
            "0 device states for 1 disks",
        ),
    ];
    let refused = |d: &Path, expected: &str| {
        let outcome = tests::minivmm(["--restore", d.to_str().unwrap()], Duration::from_secs(20));
        assert_eq!(outcome.code(), 1, "{}: {outcome}", d.display());
        let lines: Vec<&str> = outcome.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}: {outcome}", d.display());
        assert!(
            lines[0].starts_with("minivmm: ") && lines[0].contains(expected),
            "{}: {:?} lacks {expected:?}",
            d.display(),
            lines[0]
        );
        // Nothing ran: no guest output.
        assert!(outcome.stdout.is_empty(), "{outcome}");
    };
    for (d, expected) in &cases {
        refused(d, expected);
    }
    let missing = case("missing", &state, None);
    std::fs::remove_file(missing.join("memory")).unwrap();
    refused(&missing, "Cannot read the memory file");
    // The disk image changed size since the snapshot.
    std::fs::write(&disk, vec![0u8; (1 << 20) + 4096]).unwrap();
    refused(
        &good,
        "was 1048576 bytes when the snapshot was taken and is 1052672 now",
    );
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // And the good one restores: its guest finishes.
    let mut c = std::process::Command::new(minivmm_bin());
    c.args(["--restore", good.to_str().unwrap()]);
    let mut vm = Running::start_typing(c);
    vm.type_in(b"g");
    assert!(vm.wait_exit(Duration::from_secs(60)));
    let outcome = vm.collect();
    assert_eq!(outcome.code(), 0, "{outcome}");
    outcome.line("testguest: selftest: PASS");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Copies the data extents of the sparse file `diff` onto `base`.
fn merge(diff: &Path, base: &Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;
    let mut d = std::fs::File::open(diff).unwrap();
    let mut b = std::fs::OpenOptions::new().write(true).open(base).unwrap();
    let len = d.metadata().unwrap().len() as i64;
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on a descriptor this function owns.
        let data = unsafe { libc::lseek(d.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break; // No data after `at` (ENXIO).
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(d.as_raw_fd(), data, libc::SEEK_HOLE) };
        let mut buf = vec![0u8; (hole - data) as usize];
        d.seek(SeekFrom::Start(data as u64)).unwrap();
        d.read_exact(&mut buf).unwrap();
        b.seek(SeekFrom::Start(data as u64)).unwrap();
        b.write_all(&buf).unwrap();
        at = hole;
    }
}

#[test]
fn a_diff_snapshot_holds_what_changed_and_full_then_diff_is_a_new_full() {
    use std::os::unix::fs::MetadataExt;
    let test = "diff";
    if !kvm_or_skip(test) {
        return;
    }
    const MIB: u64 = 1 << 20;
    let dir = scratch(test);
    let sock = dir.join("api.sock");
    let (base, diff, full) = (dir.join("base"), dir.join("diff"), dir.join("full"));
    let guest = test_guest();
    let mut command = std::process::Command::new(minivmm_bin());
    // 328 pages are 1 % of 128 MiB: the guest rewrites them after point 1.
    command.args([
        "--kernel",
        guest.to_str().unwrap(),
        "--mem",
        "128M",
        "--track-dirty-pages",
        "--api-sock",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 testguest.snapshot=32,points=2,touch=328 testguest.action=hang",
    ]);
    let mut vm = Running::start_typing(command);
    wait_for_socket(&sock);
    wait_ready(&mut vm, 1);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let params = |kind: &str, d: &Path| {
        std::fs::create_dir_all(d).unwrap();
        json!({"snapshot_type": kind, "snapshot_path": d.join("snapshot"),
               "mem_file_path": d.join("memory")})
        .to_string()
    };
    let message = refused(&sock, "PUT", "/snapshot/create", &params("Diff", &diff));
    assert!(message.contains("full one first"), "{message}");
    ok(&sock, "PUT", "/snapshot/create", &params("Full", &base));
    ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
    vm.type_in(b"g");
    wait_ready(&mut vm, 2);
    ok(&sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    ok(&sock, "PUT", "/snapshot/create", &params("Diff", &diff));
    ok(&sock, "PUT", "/snapshot/create", &params("Full", &full));
    drop(vm.kill());

    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let (diff_mem, full_mem) = (diff.join("memory"), full.join("memory"));
    assert_eq!(size(&diff_mem), 128 * MIB, "a sparse file the size of RAM");
    println!(
        "full snapshot: {} KiB allocated (pages never written are holes); diff after 1 % of RAM changed: {} KiB",
        allocated(&full_mem) >> 10,
        allocated(&diff_mem) >> 10
    );
    assert!(allocated(&diff_mem) >= 328 * 4096, "every rewritten page");
    // A full snapshot leaves pages never written as holes: the diff is
    // compared with RAM, what a guest that used all of it saves in full.
    assert!(
        allocated(&diff_mem) * 100 <= 128 * MIB * 3,
        "the diff is about 1 % of RAM"
    );
    // The diff merged onto its base is the new full snapshot's memory.
    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    // Sparse like its parts (std::fs::copy would fill the holes).
    std::fs::File::create(merged.join("memory"))
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    merge(&base.join("memory"), &merged.join("memory"));
    merge(&diff_mem, &merged.join("memory"));
    assert!(
        std::fs::read(merged.join("memory")).unwrap() == std::fs::read(&full_mem).unwrap(),
        "base + diff differs from the full snapshot"
    );
    // And it restores: the guest finds generation 1 in the pages it
    // rewrote and the pattern in the rest. Mapped shared, the memory file
    // then holds what the guest wrote since (generation 2).
    std::fs::copy(diff.join("snapshot"), merged.join("snapshot")).unwrap();
    let mut c = std::process::Command::new(minivmm_bin());
    let sock2 = dir.join("api2.sock");
    c.args(["--restore", merged.to_str().unwrap(), "--restore-shared"]);
    c.args(["--api-sock", sock2.to_str().unwrap()]);
    let mut vm = Running::start_typing(c);
    vm.type_in(b"g");
    let done = vm.wait_for(Duration::from_secs(60), |out| out.contains("action: hang"));
    // A snapshot into the memory file this VM runs from is refused.
    ok(&sock2, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let own =
        json!({"snapshot_path": dir.join("own.snap"), "mem_file_path": merged.join("memory")});
    let message = refused(&sock2, "PUT", "/snapshot/create", &own.to_string());
    assert!(message.contains("runs from"), "{message}");
    // A full snapshot of the restored VM elsewhere is its RAM, with holes
    // where neither its memory file nor the guest since put anything.
    let again = dir.join("again");
    ok(&sock2, "PUT", "/snapshot/create", &params("Full", &again));
    let again_mem = again.join("memory");
    assert!(
        allocated(&again_mem) < 64 * MIB,
        "{} KiB",
        allocated(&again_mem) >> 10
    );
    assert!(std::fs::read(&again_mem).unwrap() == std::fs::read(merged.join("memory")).unwrap());
    let outcome = vm.kill();
    assert!(done, "{outcome}");
    outcome.line("testguest: snapshot: pattern in 8192 pages: ok");
    outcome.line("testguest: selftest: PASS");
    let after = std::fs::read(merged.join("memory")).unwrap();
    let before = std::fs::read(&full_mem).unwrap();
    let changed = (0..after.len() / 4096)
        .filter(|p| after[p * 4096..(p + 1) * 4096] != before[p * 4096..(p + 1) * 4096])
        .count();
    assert!(changed >= 328, "{changed} pages of the shared file changed");
    let _ = std::fs::remove_dir_all(&dir);
}
