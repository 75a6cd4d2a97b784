//! virtio-net against the TAP itself, host side: 1514-byte Ethernet frames
//! (1500-byte IP packets) guest -> TAP through the split virtqueue and
//! virtio-net against a raw `writev` of the same bytes, and TAP -> guest
//! against a raw `readv` into the same guest buffers; plus the notifications
//! and interrupts per packet at full rings with EVENT_IDX.
//!
//!     sudo -E cargo bench -p vmm --bench net     (root: it makes a TAP)
//!
//! The bench moves itself into a network namespace of its own
//! (`unshare(CLONE_NEWNET)`), makes `tap0` there (10.0.2.1/24, IPv6 off so
//! the kernel sends nothing of its own), and opens it as minivmm does
//! (`vmm::tap::Tap`). The driver is `devices::virtio::net::linux_driver`, a
//! model of Linux's (256-entry queues, header and frame in separate
//! descriptors of one indirect table, 2 KiB mergeable receive buffers, a
//! notification check after every chain); its work is not timed, only the
//! device's passes are, as the transport makes them.
//!
//! - Transmit: the frames are addressed to another station, so the host
//!   kernel takes each in and drops it at IP input: the cheapest kernel path,
//!   on which the device's own cost shows most.
//! - Receive: before each round the host sends 256 UDP datagrams of 1472
//!   bytes to the guest's address (a permanent neighbour entry), which wait
//!   in the TAP; the round is the reading of all of them.
//!
//! Rounds of 256 packets alternate (raw, device, raw, device ...), so both
//! see the same machine load, and medians are compared. Receive is also
//! compared with a raw `readv` that has the device's second iovec (a host
//! spill buffer for a frame longer than the guest's buffer). First, without
//! a TAP, the device model's own time per frame (a backend that moves
//! nothing). Without root the TAP part is skipped, saying why.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use devices::virtio::net::NetBackend;
use devices::virtio::net::linux_driver::{BUFFER, LinuxNet, MEMORY, RING};
use memory::GuestFrames;
use memory::guest::Backing;
use vm_memory::GuestAddress;
use vmm::tap::Tap;

const TAP_NAME: &str = "tap0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GUEST_MAC: &str = "02:00:00:00:00:15";
const PAYLOAD: usize = 1472;
const FRAME: usize = 14 + 20 + 8 + PAYLOAD;
const HEADER: usize = 12;

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(status.success(), "{args:?} failed");
}

/// A namespace of our own with `tap0` in it, opened as minivmm opens it.
fn namespace_and_tap() -> Tap {
    // SAFETY: unshare only changes this (still single-threaded) process's
    // network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    for conf in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1")
            .expect("IPv6 off in the namespace");
    }
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "tuntap", "add", "dev", TAP_NAME, "mode", "tap"]);
    sh(&["ip", "addr", "add", "10.0.2.1/24", "dev", TAP_NAME]);
    sh(&["ip", "link", "set", TAP_NAME, "up"]);
    // No queueing discipline: the host's sends reach the TAP in the
    // sender's own context, never later from a softirq.
    sh(&["tc", "qdisc", "replace", "dev", TAP_NAME, "root", "noqueue"]);
    sh(&[
        "ip",
        "neigh",
        "add",
        "10.0.2.15",
        "lladdr",
        GUEST_MAC,
        "dev",
        TAP_NAME,
        "nud",
        "permanent",
    ]);
    Tap::open(TAP_NAME).unwrap_or_else(|e| panic!("{e}"))
}

/// An Ethernet frame from the guest to another station (10.0.2.99):
/// IPv4/UDP with a valid header checksum.
fn guest_frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x02, 0, 0, 0, 0, 0x15, 0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 8 + PAYLOAD) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&GUEST_IP.octets());
    ip[16..20].copy_from_slice(&[10, 0, 2, 99]);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&9000u16.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..PAYLOAD).map(|i| i as u8));
    assert_eq!(f.len(), FRAME);
    f
}

/// A raw iovec into guest memory.
fn guest_iovec(frames: &GuestFrames, addr: GuestAddress, len: usize) -> libc::iovec {
    let slice = frames.slice(addr, len).expect("buffer in RAM");
    libc::iovec {
        // Guest RAM is mmap-backed: the pointer stays valid after the guard.
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len,
    }
}

/// The host's side of receive rounds: a datagram socket sending to the
/// guest's address through the TAP.
struct Sender(UdpSocket);

impl Sender {
    fn new() -> Self {
        let socket = UdpSocket::bind((HOST_IP, 9000)).expect("bind 10.0.2.1");
        Sender(socket)
    }

    /// Queues `RING` frames in the TAP (not timed).
    fn fill(&self) {
        let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7) as u8).collect();
        for _ in 0..RING {
            self.0
                .send_to(&payload, (GUEST_IP, 9))
                .expect("send to the guest");
        }
    }
}

/// Waits until the host's sends reach the TAP: the kernel starts the
/// interface's transmit queue only when it has seen the carrier come on
/// (its link watch, up to a second after the TAP is opened), and drops
/// what is sent before.
fn wait_for_carrier(fd: RawFd, sender: &Sender) {
    let mut buf = vec![0u8; 1 << 16];
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the TAP never came up"
        );
        sender.0.send_to(&[0; 8], (GUEST_IP, 9)).expect("send");
        std::thread::sleep(Duration::from_millis(10));
        // SAFETY: reads into a live local buffer of its length.
        if unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {
            break;
        }
    }
    // Drain what else arrived.
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// Raw transmit: one writev per frame, header (host) then frame (guest).
fn raw_tx(fd: RawFd, frames: &GuestFrames, model: &LinuxNet<'_>) -> Duration {
    let header = [0u8; HEADER];
    let iovs: Vec<[libc::iovec; 2]> = (0..RING)
        .map(|slot| {
            [
                libc::iovec {
                    iov_base: header.as_ptr() as *mut libc::c_void,
                    iov_len: HEADER,
                },
                guest_iovec(frames, model.tx_frame(slot), FRAME),
            ]
        })
        .collect();
    let t = Instant::now();
    for iov in &iovs {
        // SAFETY: both iovecs point into live memory (a local array and
        // mapped guest RAM) of their lengths; writev only reads them.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        assert_eq!(n, (HEADER + FRAME) as isize, "writev to the TAP");
    }
    t.elapsed()
}

/// Raw receive: one readv per waiting frame into the guest's buffers,
/// with `spill` as a second iovec when given (the device needs one for a
/// frame longer than a buffer: MRG_RXBUF continues it in further buffers).
fn raw_rx(
    fd: RawFd,
    frames: &GuestFrames,
    model: &LinuxNet<'_>,
    spill: Option<&mut [u8]>,
) -> (Duration, u32) {
    let spill = spill.map(|s| libc::iovec {
        iov_base: s.as_mut_ptr().cast(),
        iov_len: s.len(),
    });
    let iovs: Vec<[libc::iovec; 2]> = (0..RING)
        .map(|slot| {
            let buffer = guest_iovec(frames, model.rx_buffer(slot), BUFFER as usize);
            [buffer, spill.unwrap_or(buffer)]
        })
        .collect();
    let count = if spill.is_some() { 2 } else { 1 };
    let mut waits = 0;
    let start = Instant::now();
    let mut got = 0;
    while got < iovs.len() {
        // SAFETY: the iovecs point into mapped guest RAM and a live host
        // buffer, of their lengths.
        let n = unsafe { libc::readv(fd, iovs[got].as_ptr(), count) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "readv: {e}");
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "only {got} of {RING} frames reached the TAP"
            );
            std::thread::yield_now();
            waits += 1;
            continue;
        }
        assert_eq!(n, (HEADER + FRAME) as isize, "readv from the TAP");
        got += 1;
    }
    (start.elapsed(), waits)
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = if std::env::args().any(|a| a == "--bench") {
        31
    } else {
        3
    };
    let (tx, rx) = device_alone(rounds.max(11));
    println!("net device model alone (no TAP): TX {tx:.0} ns, RX {rx:.0} ns per 1514-byte frame");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "net bench: TAP part skipped: it needs root to make a TAP in a network namespace of its own"
        );
        return;
    }
    let tap = namespace_and_tap();
    // The raw side uses the same open TAP (a second attach is refused).
    // SAFETY: the descriptor is the TAP's, open while `tap` lives (it is
    // moved into the device below, which outlives this function's use).
    let raw: OwnedFd = unsafe { BorrowedFd::borrow_raw(tap.read_fd()) }
        .try_clone_to_owned()
        .expect("dup the TAP");
    let fd = raw.as_raw_fd();
    let frames = GuestFrames::new(MEMORY.max(64 << 20), Backing::Anonymous).unwrap();
    let mut model = LinuxNet::new(&frames, Box::new(tap));
    model.load_tx_frame(&guest_frame());
    let sender = Sender::new();
    wait_for_carrier(fd, &sender);
    assert_eq!(model.post_rx(RING), RING);

    let per_packet = |d: Duration| d.as_nanos() as f64 / f64::from(RING);
    let (mut raw_w, mut dev_w, mut raw_r, mut dev_r) = (vec![], vec![], vec![], vec![]);
    let mut raw_r2 = vec![];
    let mut spill = vec![0u8; HEADER + (1 << 16)];
    let mut retries = 0;
    for _ in 0..rounds {
        raw_w.push(per_packet(raw_tx(fd, &frames, &model)));

        assert_eq!(model.send(RING), RING);
        dev_w.push(per_packet(timed(|| model.device_tx())));
        assert_eq!(model.reap_tx(), RING, "every frame sent");

        sender.fill();
        let (t, r) = raw_rx(fd, &frames, &model, None);
        raw_r.push(per_packet(t));
        retries += r;

        sender.fill();
        let (t, r) = raw_rx(fd, &frames, &model, Some(&mut spill));
        raw_r2.push(per_packet(t));
        retries += r;

        sender.fill();
        dev_r.push(per_packet(timed(|| model.device_rx(true))));
        let mut bad = 0;
        let n = model.reap_rx(|_, len| bad += u32::from(len as usize != HEADER + FRAME));
        assert_eq!((n, bad), (RING, 0), "a ring of whole frames received");
        assert_eq!(model.post_rx(RING), RING);
    }
    let m = model.net().metrics().snapshot();
    assert_eq!(m.tx_packets, u64::from(RING) * rounds as u64);
    assert_eq!(m.rx_packets, u64::from(RING) * rounds as u64);

    let (rw, dw) = (median(&mut raw_w), median(&mut dev_w));
    let (rr, dr) = (median(&mut raw_r), median(&mut dev_r));
    let rr2 = median(&mut raw_r2);
    println!(
        "net TX 1514-byte frames: raw writev {rw:.0} ns, through queue + virtio-net {dw:.0} ns: ratio {:.3}",
        dw / rw
    );
    println!(
        "net RX 1514-byte frames: raw readv {rr:.0} ns, through queue + virtio-net {dr:.0} ns: ratio {:.3}",
        dr / rr
    );
    println!(
        "net RX 1514-byte frames: raw readv with a spill iovec as the device's {rr2:.0} ns: ratio {:.3}",
        dr / rr2
    );
    if retries > 0 {
        println!(
            "(raw readv found the TAP empty {retries} times while the host was still queueing)"
        );
    }
    for (what, e) in [("TX", model.tx_events()), ("RX", model.rx_events())] {
        println!(
            "net {what} at full rings with EVENT_IDX: {} packets, {} notifications ({:.4}/packet), {} interrupts ({:.4}/packet)",
            e.packets,
            e.notifications,
            e.notifications as f64 / e.packets as f64,
            e.interrupts,
            e.interrupts as f64 / e.packets as f64
        );
    }
}

/// A backend with no TAP behind it: sends nothing, and "receives" a frame
/// of the bench's size without writing it (the kernel's copy is what the
/// TAP side measures). What is left is the device model's own work.
#[derive(Debug)]
struct NullBackend;

impl NetBackend for NullBackend {
    fn read_frame(
        &mut self,
        frames: &GuestFrames,
        segments: &[(GuestAddress, usize)],
        _spill: &mut [u8],
    ) -> std::io::Result<usize> {
        let _ = frames.mark_dirty(segments[0].0, (HEADER + FRAME) as u64);
        Ok(HEADER + FRAME)
    }
    fn write_frame(
        &mut self,
        _frames: &GuestFrames,
        header: &[u8],
        segments: &[(GuestAddress, usize)],
    ) -> std::io::Result<usize> {
        Ok(header.len() + segments.iter().map(|s| s.1).sum::<usize>())
    }
    fn set_offloads(&mut self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn supports_ufo(&self) -> bool {
        false
    }
    fn read_fd(&self) -> RawFd {
        -1
    }
}

/// The device model alone, per packet: median transmit and receive ns.
fn device_alone(rounds: usize) -> (f64, f64) {
    let frames = GuestFrames::new(MEMORY, Backing::Anonymous).unwrap();
    let mut model = LinuxNet::new(&frames, Box::new(NullBackend));
    model.load_tx_frame(&guest_frame());
    assert_eq!(model.post_rx(RING), RING);
    let per_packet = |d: Duration| d.as_nanos() as f64 / f64::from(RING);
    let (mut tx, mut rx) = (vec![], vec![]);
    for _ in 0..rounds {
        assert_eq!(model.send(RING), RING);
        tx.push(per_packet(timed(|| model.device_tx())));
        assert_eq!(model.reap_tx(), RING);
        rx.push(per_packet(timed(|| model.device_rx(true))));
        assert_eq!(model.reap_rx(|_, _| {}), RING);
        assert_eq!(model.post_rx(RING), RING);
    }
    (median(&mut tx), median(&mut rx))
}
