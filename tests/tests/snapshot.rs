//! Snapshots of a running VM through Firecracker's API (issue 14, first
//! part: creating them). The test guest serves pings in a namespace of its
//! own; paused, it is snapshotted with `PUT /snapshot/create`; the files are
//! checked (the state decodes with every vCPU and device, the memory file is
//! all of RAM); resumed, the guest answers every ping and passes.

use std::path::PathBuf;

use serde_json::json;
use tests::api::{ok, put_scratch_drive_and_tap, refused, wait_for_socket};
use tests::netns::{GUEST, Netns, finish, guest_net, net_or_skip, ping, wait_line};
use tests::{Running, minivmm_bin, test_guest};
use vmm::snapshot::format;
use vmm::snapshot::state::VmState;

#[test]
fn snapshot_of_a_paused_vm_holds_every_vcpu_and_device_and_the_vm_runs_on() {
    let test = "snapshot_of_a_paused_vm";
    if !net_or_skip(test) {
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("minivmm-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, disk) = (dir.join("api.sock"), dir.join("disk.img"));
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let ns = Netns::new("snap");
    ns.tap("tap0", "10.0.2.2/24");
    let _echo = ns.echo();
    let mut vm =
        Running::start(ns.command(&minivmm_bin(), &["--api-sock", sock.to_str().unwrap()]));
    wait_for_socket(&sock);
    ok(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
    );
    let boot = json!({"kernel_image_path": test_guest(),
                      "boot_args": format!("console=ttyS0 testguest.blk=write {}",
                                           guest_net(0, ",serve=200"))});
    ok(&sock, "PUT", "/boot-source", &boot.to_string());
    put_scratch_drive_and_tap(&sock, &disk);
    ok(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
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
