//! Seed inputs for every target, built the way the unit tests build their
//! cases (the driver-side mock writing rings and chains into guest memory),
//! then encoded in each target's input format. `examples/seeds.rs` writes
//! them to `fuzz/corpus/<target>/`; `tests/replay.rs` also runs them directly.

use devices::virtio::mock::{INDIRECT, MockDriver, NEXT, RawDescriptor, WRITE};
use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::{Bytes, GuestAddress};

use crate::common::{GUEST_RAM, snapshot};

/// Where the seeds' rings start (16-byte aligned).
const RINGS: u64 = 0x1000;
const QUEUE: u16 = 16;
const DATA: u64 = 0x2000;

/// A seed: target name, seed name, bytes.
pub type Seed = (&'static str, &'static str, Vec<u8>);

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut out = Vec::new();
    for (name, flags, build) in queue_cases() {
        let bytes = queue_input(flags, build);
        out.push(("virtqueue", name, bytes.clone()));
        out.push(("queue_differential", name, bytes));
    }
    out.push(("virtio_mmio", "handshake-and-read", mmio_handshake(true)));
    out.push(("virtio_mmio", "handshake-only", mmio_handshake(false)));
    out.push(("virtio_mmio", "empty", Vec::new()));
    for (i, len) in [0usize, 64, 512, 4096].into_iter().enumerate() {
        out.push((
            "block",
            ["empty", "short", "medium", "long"][i],
            noise(len, i as u64 + 1),
        ));
    }
    for (i, len) in [0usize, 64, 512, 4096].into_iter().enumerate() {
        out.push((
            "net",
            ["empty", "short", "medium", "long"][i],
            noise(len, i as u64 + 11),
        ));
    }
    out.push(("serial", "setup-write-read-flood", serial_session()));
    out.push(("serial", "empty", Vec::new()));
    out.push(("ioapic", "guest-routes-pins", ioapic_session()));
    out.push(("ioapic", "empty", Vec::new()));
    for (name, session) in api_sessions() {
        out.push(("api_request", name, session));
    }
    let state = snapshot_state_file();
    out.push((
        "snapshot_state",
        "payload-one-vcpu-one-disk",
        state[32..].to_vec(),
    ));
    out.push(("snapshot_state", "file-one-vcpu-one-disk", state));
    out.push((
        "boot_image",
        "elf64-entry",
        boot_input("console=ttyS0", 0, 1, &elf64()),
    ));
    out.push((
        "boot_image",
        "bzimage-header",
        boot_input("console=ttyS0 panic=1", 0, 1, &bzimage()),
    ));
    // ACPI on: two vCPUs and three devices, and 127 vCPUs with sixteen.
    out.push((
        "boot_image",
        "elf64-acpi",
        boot_input("console=ttyS0", 0x81, 3, &elf64()),
    ));
    out.push((
        "boot_image",
        "bzimage-acpi-large",
        boot_input("console=ttyS0", 0xfe, 16, &bzimage64()),
    ));
    out.push(("boot_image", "empty", Vec::new()));
    out
}

/// Deterministic bytes (xorshift).
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

type Build = fn(&mut MockDriver<'_>, &GuestFrames);

/// The unit tests' queue cases: (name, flags byte, how the chains are built).
fn queue_cases() -> Vec<(&'static str, u8, Build)> {
    vec![
        ("two-chains", 0, |d, _| {
            d.add_chain(&[
                (DATA, 16, false),
                (DATA + 0x200, 512, true),
                (DATA + 0x400, 1, true),
            ]);
            d.add_chain(&[(DATA + 0x600, 64, false)]);
        }),
        ("event-idx", 1, |d, _| {
            d.set_used_event(0);
            d.add_chain(&[(DATA, 16, false), (DATA + 0x200, 4096, true)]);
        }),
        ("indirect", 2, |d, _| {
            d.add_indirect_chain(
                GuestAddress(DATA + 0x800),
                &[
                    (DATA, 16, false),
                    (DATA + 0x200, 1024, true),
                    (DATA + 0x400, 1, true),
                ],
            );
        }),
        ("loop", 0, |d, _| {
            d.write_descriptor(0, RawDescriptor::new(DATA, 16, NEXT, 1));
            d.write_descriptor(1, RawDescriptor::new(DATA, 16, NEXT, 0));
            d.publish(0);
        }),
        ("nested-indirect", 2, |d, f| {
            let inner = DATA + 0xa00;
            d.write_descriptor_at(GuestAddress(inner), 0, RawDescriptor::new(DATA, 16, 0, 0));
            d.write_descriptor_at(
                GuestAddress(DATA + 0x800),
                0,
                RawDescriptor::new(inner, 16, INDIRECT, 0),
            );
            d.write_descriptor(0, RawDescriptor::new(DATA + 0x800, 16, INDIRECT, 0));
            d.publish(0);
            let _ = f;
        }),
        ("outside-ram", 0, |d, _| {
            d.add_chain(&[(GUEST_RAM - 8, 16, false), (DATA, 1, true)]);
        }),
        ("readable-after-writable", 0, |d, _| {
            d.write_descriptor(0, RawDescriptor::new(DATA, 16, WRITE | NEXT, 1));
            d.write_descriptor(1, RawDescriptor::new(DATA + 0x100, 16, 0, 0));
            d.publish(0);
        }),
        ("avail-index-far-ahead", 0, |d, _| {
            d.add_chain(&[(DATA, 16, false)]);
            d.set_avail_idx(QUEUE + 5);
        }),
    ]
}

/// The queue targets' input: size exponent, flags, ring addresses / 4, used
/// length, memory image (trailing zeros cut).
fn queue_input(flags: u8, build: Build) -> Vec<u8> {
    let frames = GuestFrames::new(GUEST_RAM, Backing::Anonymous).expect("guest RAM");
    let mut driver = MockDriver::new(&frames, QUEUE, GuestAddress(RINGS));
    build(&mut driver, &frames);
    let mut out = vec![QUEUE.trailing_zeros() as u8, flags];
    for a in [driver.desc_table(), driver.avail_ring(), driver.used_ring()] {
        out.extend_from_slice(&((a.0 / 4) as u16).to_le_bytes());
    }
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    out.extend_from_slice(&trimmed(snapshot(&frames, GUEST_RAM)));
    out
}

fn trimmed(mut image: Vec<u8>) -> Vec<u8> {
    let end = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    image.truncate(end);
    image
}

/// One virtio_mmio operation.
fn op(out: &mut Vec<u8>, kind: u8, offset: u16, width: u8, value: u32) {
    out.push(kind);
    out.extend_from_slice(&offset.to_le_bytes());
    out.push(width);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A driver's handshake (§3.1.1) on the transport, queue 0 set up, and (with
/// `request`) one 512-byte read of sector 0 notified.
fn mmio_handshake(request: bool) -> Vec<u8> {
    let frames = GuestFrames::new(GUEST_RAM, Backing::Anonymous).expect("guest RAM");
    let mut driver = MockDriver::new(&frames, QUEUE, GuestAddress(RINGS));
    if request {
        frames
            .memory()
            .write_slice(&[0u8; 16], GuestAddress(DATA))
            .expect("in RAM");
        driver.add_chain(&[
            (DATA, 16, false),
            (DATA + 0x200, 512, true),
            (DATA + 0x400, 1, true),
        ]);
    }
    let mut ops = Vec::new();
    let w = |ops: &mut Vec<u8>, offset: u16, value: u32| op(ops, 0, offset, 4, value);
    w(&mut ops, 0x70, 0);
    w(&mut ops, 0x70, 1);
    w(&mut ops, 0x70, 3);
    op(&mut ops, 1, 0x10, 2, 0);
    w(&mut ops, 0x24, 1);
    w(&mut ops, 0x20, 1); // VERSION_1
    w(&mut ops, 0x24, 0);
    w(&mut ops, 0x20, 0);
    w(&mut ops, 0x70, 0xb);
    w(&mut ops, 0x30, 0);
    w(&mut ops, 0x38, u32::from(QUEUE));
    for (low, a) in [
        (0x80, driver.desc_table()),
        (0x90, driver.avail_ring()),
        (0xa0, driver.used_ring()),
    ] {
        w(&mut ops, low, a.0 as u32);
        w(&mut ops, low + 4, (a.0 >> 32) as u32);
    }
    w(&mut ops, 0x44, 1);
    w(&mut ops, 0x70, 0xf);
    if request {
        w(&mut ops, 0x50, 0);
        op(&mut ops, 1, 0x60, 2, 0);
        w(&mut ops, 0x64, 1);
    }
    op(&mut ops, 1, 0x100, 3, 0); // config: capacity
    let mut out = ((ops.len() / 8) as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&ops);
    out.extend_from_slice(&trimmed(snapshot(&frames, GUEST_RAM)));
    out
}

/// Divisor set with DLAB, 8N1, "hi" sent, LSR and RBR read, input flooded.
fn serial_session() -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, offset, value) in [
        (0u8, 3u8, 0x80u8),
        (0, 0, 1),
        (0, 1, 0),
        (0, 3, 3),
        (0, 1, 1), // IER: receive interrupts
        (0, 0, b'h'),
        (0, 0, b'i'),
        (1, 5, 0),
        (2, b'x', 79),
        (2, b'y', 10),
        (1, 0, 0),
        (1, 5, 0),
        (0, 4, 0x10), // loopback
        (0, 0, b'!'),
        (1, 0, 0),
        (3, 0, 0),
        (1, 2, 0),
    ] {
        out.extend_from_slice(&[kind, offset, value]);
    }
    out
}

/// What the test guest and Linux do: version read, then per pin mask,
/// destination, vector; a remask; an odd-width access.
/// An HTTP/1.1 request as an API client sends it.
fn http(method: &str, path: &str, body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !body.is_empty() {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// A state file with one vCPU (KVM's reset values) and one disk's transport.
fn snapshot_state_file() -> Vec<u8> {
    use vmm::snapshot::state::{SavedDisk, VmState};
    let vcpu = vmm::vcpu_state::VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        events: Default::default(),
        mp_state: Default::default(),
        msrs: vec![Default::default(); 3],
        cpuid: vec![Default::default(); 2],
        tsc_khz: Some(2_000_000),
    };
    let device = devices::virtio::mmio::TransportState {
        device_type: 2,
        status: 0xf,
        acked_features: 1 << 32,
        active: true,
        queues: vec![Default::default()],
        ..Default::default()
    };
    let state = VmState {
        mem: 128 << 20,
        regions: vec![(0, 128 << 20)],
        frames: vec![(0x9f000, 0x61000, 4), (0x100000, 0x200000, 8)],
        acpi: true,
        boot_timer: false,
        disks: vec![SavedDisk {
            path: "/disk.img".into(),
            read_only: false,
            serial: Some("rootfs".into()),
            size: 1 << 20,
            rate_limiter: None,
        }],
        nets: vec![],
        vcpus: vec![vcpu],
        clock: Default::default(),
        ioapic: devices::ioapic::IoApicState {
            id: 0,
            select: 0,
            entries: vec![1 << 16; 24],
        },
        serial: Default::default(),
        i8042: Default::default(),
        devices: vec![device],
    };
    vmm::snapshot::format::encode(&state).expect("encodes")
}

/// Keep-alive sessions: a whole boot's configuration, reads, refusals.
fn api_sessions() -> Vec<(&'static str, Vec<u8>)> {
    let boot = [
        http("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        http("PUT", "/boot-source", r#"{"kernel_image_path": "/proc/self/exe", "boot_args": "console=ttyS0"}"#),
        http("PUT", "/drives/rootfs", r#"{"drive_id": "rootfs", "path_on_host": "/proc/self/exe", "is_root_device": true, "is_read_only": true}"#),
        http("PUT", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:01", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#),
        http("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ]
    .concat();
    let reads = [
        http("GET", "/", ""),
        http("PATCH", "/machine-config", r#"{"vcpu_count": 4}"#),
        http("GET", "/vm/config", ""),
        http("GET", "/machine-config", ""),
        http("GET", "/version", ""),
        http("PATCH", "/vm", r#"{"state": "Paused"}"#),
    ]
    .concat();
    let refused = [
        http("PUT", "/balloon", r#"{"amount_mib": 1, "deflate_on_oom": false}"#),
        http("PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 0}"#),
        b"PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 31\r\n\r\n{\"action_type\": \"FlushMetrics\"}".to_vec(),
    ]
    .concat();
    let load = [
        http("PUT", "/snapshot/load", r#"{"snapshot_path": "/s/snapshot", "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"}, "resume_vm": true, "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}"#),
        http("PUT", "/snapshot/load", r#"{"snapshot_path": "/s", "mem_file_path": "/m", "track_dirty_pages": true}"#),
    ]
    .concat();
    vec![
        ("boot", boot),
        ("reads", reads),
        ("refused", refused),
        ("load", load),
    ]
}

fn ioapic_session() -> Vec<u8> {
    let mut out = Vec::new();
    let mut op = |kind: u8, offset: u8, width: u8, value: u32| {
        out.extend_from_slice(&[kind, offset, width]);
        out.extend_from_slice(&value.to_le_bytes());
    };
    op(0, 0x00, 2, 0x01);
    op(1, 0x10, 2, 0);
    for pin in [4u32, 5, 6] {
        op(0, 0x00, 2, 0x10 + 2 * pin);
        op(0, 0x10, 2, 1 << 16);
        op(0, 0x00, 2, 0x11 + 2 * pin);
        op(0, 0x10, 2, 0);
        op(0, 0x00, 2, 0x10 + 2 * pin);
        op(0, 0x10, 2, 0x30 + pin);
    }
    op(0, 0x00, 2, 0x1a);
    op(0, 0x10, 2, (1 << 16) | 0x35);
    op(0, 0x10, 1, 0x35);
    out
}

fn boot_input(cmdline: &str, cpu_byte: u8, devices: u8, image: &[u8]) -> Vec<u8> {
    let mut out = vec![cmdline.len() as u8];
    out.extend_from_slice(cmdline.as_bytes());
    out.extend_from_slice(&[cpu_byte, devices]);
    out.extend_from_slice(image);
    out
}

/// A vmlinux-style ELF64: one PT_LOAD at 16 MiB, entry there, no PVH note
/// (the image of tests/tests/boot.rs).
fn elf64() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let mut elf = vec![0u8; 0x1000];
    elf[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(0x10, &2u16.to_le_bytes());
    put(0x12, &62u16.to_le_bytes());
    put(0x14, &1u32.to_le_bytes());
    put(0x18, &LOAD.to_le_bytes());
    put(0x20, &64u64.to_le_bytes());
    put(0x34, &64u16.to_le_bytes());
    put(0x36, &56u16.to_le_bytes());
    put(0x38, &1u16.to_le_bytes());
    put(0x3a, &64u16.to_le_bytes());
    put(64, &1u32.to_le_bytes());
    put(68, &5u32.to_le_bytes());
    put(72, &0x1000u64.to_le_bytes());
    put(80, &LOAD.to_le_bytes());
    put(88, &LOAD.to_le_bytes());
    put(96, &16u64.to_le_bytes());
    put(104, &16u64.to_le_bytes());
    put(112, &0x1000u64.to_le_bytes());
    elf.extend_from_slice(&[0xf4; 16]); // hlt
    elf
}

/// The setup header of a bzImage (boot protocol 2.15) with one setup sector
/// and 1 KiB of "kernel".
/// [`bzimage`] declaring the 64-bit entry (`XLF_KERNEL_64`): it loads.
fn bzimage64() -> Vec<u8> {
    let mut img = bzimage();
    img[0x236] = 1;
    img
}

fn bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 1024 + 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes()); // init_size
    img
}
