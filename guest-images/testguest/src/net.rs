//! virtio-net driver (virtio 1.2 §5.1) and the network self-test.
//!
//! Queues: receive (0) and transmit (1), up to 128 entries each. The receive
//! ring is kept full of 2 KiB buffers from the network DMA pool
//! ([`crate::netpool`], device-writable) and each buffer is posted again as
//! soon as its frame is handled; a transmitted frame is a pool buffer
//! (device-readable) posted as two descriptors, the 12-byte header and the
//! frame, and returned to the pool on completion. Negotiated: VERSION_1,
//! EVENT_IDX, MAC, MTU, STATUS, MRG_RXBUF (a frame of at most 1514 bytes fits
//! one buffer, so `num_buffers` must be 1); no offloads.
//!
//! The self-test (`testguest.net=ip=A.B.C.D/N,peer=A.B.C.D,port=N[,serve=S]`)
//! resolves the peer with ARP, has the peer's UDP echo service return
//! datagrams of 1, 64 and 1472 bytes and a burst of 200, checking every
//! byte, and answers ARP and ping all along; with `serve=S` it then keeps
//! answering for up to S seconds, or until a UDP datagram `bye` reaches its
//! port. Its last line is `net<n>: PASS` or `net<n>: FAIL <reason>`.

use core::fmt;

use crate::dma::{DmaError, DmaPool, FromDevice, ToDevice};
use crate::irq::{self, Line};
use crate::log;
use crate::netpool::{NetPool, PACKET_SIZE, Packet};
use crate::netstack::{self, Config, ETH_HLEN, Received};
use crate::virtio_mmio::{
    F_EVENT_IDX, F_VERSION_1, INT_CONFIG, MmioDevice, STATUS_NEEDS_RESET, TransportError,
};
use crate::virtq::{QueueError, Virtqueue};

/// DeviceID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const WANTED: u64 = F_VERSION_1 | F_EVENT_IDX | F_MAC | F_MTU | F_STATUS | F_MRG_RXBUF;
const HDR: usize = 12;
const QUEUE_SIZE: u16 = 128;
/// Largest frame sent (no offloads): 1500 bytes of IP and the Ethernet header.
const MAX_FRAME: usize = 1514;
/// Our UDP port.
pub const PORT: u16 = 40000;
/// Datagrams in the burst.
pub const BURST: usize = 200;
/// Watchdog for one exchange.
const TIMEOUT_MS: u64 = 10_000;

/// Why the network self-test failed.
#[derive(Debug)]
pub enum NetError {
    /// The transport.
    Transport(TransportError),
    /// A virtqueue.
    Queue(QueueError),
    /// DMA memory.
    Dma(DmaError),
    /// No pool buffer for a frame to send.
    NoBuffer,
    /// Nothing came back in time.
    Timeout(&'static str),
    /// An echo differs from what was sent.
    Mismatch(usize),
    /// The link is down.
    LinkDown,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::Transport(e) => write!(f, "{e}"),
            NetError::Queue(e) => write!(f, "virtqueue: {e}"),
            NetError::Dma(e) => write!(f, "{e}"),
            NetError::NoBuffer => write!(f, "no packet buffer to send with"),
            NetError::Timeout(what) => write!(f, "{what}: nothing within {TIMEOUT_MS} ms"),
            NetError::Mismatch(len) => write!(f, "a {len}-byte echo differs from what was sent"),
            NetError::LinkDown => write!(f, "the link is down"),
        }
    }
}

impl From<TransportError> for NetError {
    fn from(e: TransportError) -> Self {
        NetError::Transport(e)
    }
}
impl From<QueueError> for NetError {
    fn from(e: QueueError) -> Self {
        NetError::Queue(e)
    }
}
impl From<DmaError> for NetError {
    fn from(e: DmaError) -> Self {
        NetError::Dma(e)
    }
}

/// Counters of the driver.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    rx_frames: u64,
    tx_frames: u64,
    arp_replies: u64,
    echo_replies: u64,
    ignored: u64,
    rx_errors: u64,
}

/// A UDP datagram received, as the self-test sees it.
struct Datagram<'a> {
    to_port: u16,
    payload: &'a [u8],
}

/// An initialised network device.
struct NetDev<'n, 'p> {
    n: usize,
    dev: MmioDevice,
    pool: &'n NetPool<'p>,
    rxq: Virtqueue<'p>,
    txq: Virtqueue<'p>,
    line: Line,
    mac: [u8; 6],
    cfg: Config,
    rx: [Option<Packet<'n, 'p, FromDevice>>; QUEUE_SIZE as usize],
    tx: [Option<Packet<'n, 'p, ToDevice>>; QUEUE_SIZE as usize],
    peer_mac: Option<[u8; 6]>,
    ip_id: u16,
    counters: Counters,
    frame: [u8; PACKET_SIZE],
    reply: [u8; PACKET_SIZE],
}

impl<'n, 'p> NetDev<'n, 'p> {
    fn init(
        n: usize,
        dev: MmioDevice,
        dma: &'p DmaPool,
        pool: &'n NetPool<'p>,
        line: Line,
        cfg: Config,
    ) -> Result<Self, NetError> {
        let features = dev.negotiate(WANTED, F_VERSION_1 | F_MAC)?;
        let size = |q: u32| -> Result<u16, NetError> {
            let max = dev.queue_max(q);
            if max == 0 {
                dev.fail();
                return Err(TransportError::QueueUnavailable(q).into());
            }
            Ok(1u16 << (u32::from(QUEUE_SIZE).min(max).ilog2()))
        };
        let event_idx = features & F_EVENT_IDX != 0;
        let rxq = Virtqueue::new(dma, size(0)?, event_idx, false)?;
        let txq = Virtqueue::new(dma, size(1)?, event_idx, false)?;
        dev.setup_queue(0, &rxq)?;
        dev.setup_queue(1, &txq)?;
        let mut config = [0u8; 12];
        dev.read_config(0, &mut config);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&config[..6]);
        let status = u16::from_le_bytes([config[6], config[7]]);
        let mtu = u16::from_le_bytes([config[10], config[11]]);
        let mut net = NetDev {
            n,
            dev,
            pool,
            rxq,
            txq,
            line,
            mac,
            cfg,
            rx: [const { None }; QUEUE_SIZE as usize],
            tx: [const { None }; QUEUE_SIZE as usize],
            peer_mac: None,
            ip_id: 1,
            counters: Counters::default(),
            frame: [0; PACKET_SIZE],
            reply: [0; PACKET_SIZE],
        };
        net.dev.driver_ok()?;
        net.say(format_args!(
            "mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, mtu {}, link {}, mrg_rxbuf {}, event_idx {}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            if features & F_MTU != 0 { mtu } else { 1500 },
            if features & F_STATUS == 0 || status & 1 != 0 { "up" } else { "down" },
            features & F_MRG_RXBUF != 0,
            event_idx
        ));
        if features & F_STATUS != 0 && status & 1 == 0 {
            return Err(NetError::LinkDown);
        }
        net.fill_rx()?;
        Ok(net)
    }

    fn say(&self, args: fmt::Arguments<'_>) {
        log!("net{}: {args}", self.n);
    }

    /// Posts a fresh pool buffer in every free receive slot.
    fn fill_rx(&mut self) -> Result<(), NetError> {
        while self.rxq.free_descriptors() > 0 {
            let Some(p) = self.pool.alloc::<FromDevice>() else {
                break;
            };
            self.post_rx(p)?;
        }
        if self.rxq.should_notify() {
            self.dev.notify(0);
        }
        Ok(())
    }

    fn post_rx(&mut self, p: Packet<'n, 'p, FromDevice>) -> Result<(), NetError> {
        let seg = p.post(0, PACKET_SIZE)?;
        match self.rxq.submit(&[&[seg]]) {
            Ok(head) => {
                self.rx[usize::from(head)] = Some(p);
                Ok(())
            }
            Err(e) => {
                p.completed();
                Err(e.into())
            }
        }
    }

    /// Takes every completion: transmit buffers go back to the pool, each
    /// received frame is handled (`on_udp` sees datagrams to us) and its
    /// buffer posted again. Returns the frames received.
    fn service(&mut self, on_udp: &mut dyn FnMut(Datagram<'_>)) -> Result<usize, NetError> {
        while let Some((head, _)) = self.txq.take_used()? {
            if let Some(p) = self.tx[usize::from(head)].take() {
                p.completed();
            }
        }
        let mut got = 0;
        while let Some((head, len)) = self.rxq.take_used()? {
            let Some(p) = self.rx[usize::from(head)].take() else {
                continue;
            };
            p.completed();
            got += 1;
            let len = (len as usize).min(PACKET_SIZE);
            if len < HDR + ETH_HLEN || p.read_at(0, &mut self.frame[..len]).is_err() {
                self.counters.rx_errors += 1;
            } else if u16::from_le_bytes([self.frame[10], self.frame[11]]) != 1 {
                // num_buffers: every frame fits one 2 KiB buffer.
                self.counters.rx_errors += 1;
            } else {
                self.counters.rx_frames += 1;
                self.handle(len, on_udp)?;
            }
            self.post_rx(p)?;
        }
        if got > 0 && self.rxq.should_notify() {
            self.dev.notify(0);
        }
        Ok(got)
    }

    fn handle(&mut self, len: usize, on_udp: &mut dyn FnMut(Datagram<'_>)) -> Result<(), NetError> {
        let frame = &self.frame[HDR..len];
        match netstack::receive(&self.cfg, &self.mac, frame, &mut self.reply) {
            Received::ArpRequest { reply_len } => {
                if self.peer_mac.is_none() && frame[28..32] == self.cfg.peer {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(&frame[6..12]);
                    self.peer_mac = Some(m);
                }
                self.counters.arp_replies += 1;
                self.send_reply(reply_len)
            }
            Received::EchoRequest { reply_len } => {
                self.counters.echo_replies += 1;
                self.send_reply(reply_len)
            }
            Received::ArpLearned { ip, mac } => {
                if ip == self.cfg.peer {
                    self.peer_mac = Some(mac);
                }
                Ok(())
            }
            Received::Udp {
                to_port, payload, ..
            } => {
                on_udp(Datagram { to_port, payload });
                Ok(())
            }
            Received::Ignored => {
                self.counters.ignored += 1;
                Ok(())
            }
        }
    }

    fn send_reply(&mut self, len: usize) -> Result<(), NetError> {
        let reply = self.reply;
        self.send(&reply[..len])
    }

    /// Sends one frame: header and frame as two descriptors of one buffer.
    fn send(&mut self, frame: &[u8]) -> Result<(), NetError> {
        let frame = &frame[..frame.len().min(MAX_FRAME)];
        // Room for two descriptors: take completions, then wait for them.
        while self.txq.free_descriptors() < 2 {
            while let Some((head, _)) = self.txq.take_used()? {
                if let Some(p) = self.tx[usize::from(head)].take() {
                    p.completed();
                }
            }
            if self.txq.free_descriptors() < 2 {
                self.wait("transmit completions", |net| net.txq.has_used())?;
            }
        }
        let mut p = self.pool.alloc::<ToDevice>().ok_or(NetError::NoBuffer)?;
        p.write_at(0, &[0; HDR])?;
        p.write_at(HDR, frame)?;
        let (h, d) = (p.post(0, HDR)?, p.post(HDR, frame.len())?);
        match self.txq.submit(&[&[h, d]]) {
            Ok(head) => self.tx[usize::from(head)] = Some(p),
            Err(e) => {
                p.completed();
                return Err(e.into());
            }
        }
        self.counters.tx_frames += 1;
        if self.txq.should_notify() {
            self.dev.notify(1);
        }
        Ok(())
    }

    /// Sleeps until `ready` holds (checked after each interrupt), or the
    /// watchdog fires.
    fn wait(&mut self, what: &'static str, ready: impl Fn(&Self) -> bool) -> Result<(), NetError> {
        self.wait_ms(TIMEOUT_MS, ready)
            .map_err(|_| NetError::Timeout(what))
    }

    fn wait_ms(&mut self, ms: u64, ready: impl Fn(&Self) -> bool) -> Result<(), irq::TimedOut> {
        let result = irq::wait_until(ms, || ready(self) || self.rxq.has_used());
        if self.dev.ack_interrupt() & INT_CONFIG != 0 && self.dev.status() & STATUS_NEEDS_RESET != 0 {
            log!("net{}: the device needs a reset", self.n);
        }
        result
    }

    /// Sends `payload` to the peer's echo port and waits for it to come back.
    fn echo(&mut self, payload: &[u8]) -> Result<(), NetError> {
        self.send_udp(payload)?;
        let mut ok = None;
        for _ in 0..64 {
            self.service(&mut |d| {
                if d.to_port == PORT {
                    ok = Some(d.payload == payload);
                }
            })?;
            match ok {
                Some(true) => return Ok(()),
                Some(false) => return Err(NetError::Mismatch(payload.len())),
                None => self.wait("UDP echo", |_| false)?,
            }
        }
        Err(NetError::Timeout("UDP echo"))
    }

    fn send_udp(&mut self, payload: &[u8]) -> Result<(), NetError> {
        let peer_mac = self.peer_mac.ok_or(NetError::Timeout("ARP"))?;
        self.ip_id = self.ip_id.wrapping_add(1);
        let mut out = [0u8; PACKET_SIZE];
        let to = (peer_mac, self.cfg.peer, self.cfg.port);
        let len = netstack::udp(&self.cfg, &self.mac, to, PORT, payload, self.ip_id, &mut out);
        self.send(&out[..len])
    }

    fn resolve_peer(&mut self) -> Result<(), NetError> {
        for _ in 0..5 {
            let mut out = [0u8; 64];
            let len = netstack::arp_request(&self.cfg, &self.mac, self.cfg.peer, &mut out);
            self.send(&out[..len])?;
            for _ in 0..20 {
                self.service(&mut |_| {})?;
                if self.peer_mac.is_some() {
                    return Ok(());
                }
                let _ = self.wait_ms(100, |net| net.peer_mac.is_some());
            }
        }
        Err(NetError::Timeout("ARP for the peer"))
    }

    /// The burst: `BURST` datagrams sent as fast as the rings allow, every
    /// echo checked.
    fn burst(&mut self) -> Result<(), NetError> {
        let mut state = Burst {
            seen: [false; BURST],
            received: 0,
            bad: 0,
        };
        for seq in 0..BURST {
            let payload = burst_payload(seq);
            self.send_udp(&payload)?;
            self.service(&mut |d| state.take(d))?;
        }
        let mut idle = 0;
        while state.received < BURST && idle < 50 {
            if self.service(&mut |d| state.take(d))? == 0 {
                idle += 1;
                let _ = self.wait_ms(100, |_| false);
            }
        }
        if state.bad > 0 || state.received < BURST {
            self.say(format_args!(
                "burst: {} of {BURST} echoes, {} wrong",
                state.received, state.bad
            ));
            return Err(NetError::Mismatch(64));
        }
        Ok(())
    }

    /// Answers ARP and ping for up to `seconds`, until `bye` reaches our port.
    fn serve(&mut self, seconds: u32) -> Result<bool, NetError> {
        let mut bye = false;
        for _ in 0..seconds.saturating_mul(10) {
            self.service(&mut |d| bye |= d.to_port == PORT && d.payload == b"bye")?;
            if bye {
                return Ok(true);
            }
            let _ = self.wait_ms(100, |_| false);
        }
        Ok(false)
    }

    fn run(&mut self) -> Result<(), NetError> {
        self.resolve_peer()?;
        let mut sizes = [0usize; 3];
        for (i, len) in [1usize, 64, 1472].into_iter().enumerate() {
            let payload: [u8; 1472] = core::array::from_fn(|j| (j * 31 + len) as u8);
            self.echo(&payload[..len])?;
            sizes[i] = len;
        }
        self.say(format_args!(
            "udp echo {} {} {}: ok",
            sizes[0], sizes[1], sizes[2]
        ));
        self.burst()?;
        self.say(format_args!("udp burst {BURST}: ok"));
        if self.cfg.serve_s > 0 {
            self.say(format_args!(
                "serving ARP and ping for up to {} s (UDP `bye` to port {PORT} ends)",
                self.cfg.serve_s
            ));
            let ended = self.serve(self.cfg.serve_s)?;
            self.say(format_args!("serve: {}", if ended { "bye" } else { "time up" }));
        }
        Ok(())
    }

    /// Resets the device and takes every posted buffer back.
    fn shut_down(&mut self) {
        let _ = self.dev.reset();
        self.rxq.reclaim_after_reset();
        self.txq.reclaim_after_reset();
        for p in self.rx.iter_mut().filter_map(Option::take) {
            p.completed();
        }
        for p in self.tx.iter_mut().filter_map(Option::take) {
            p.completed();
        }
    }
}

/// The echoes of the burst seen so far.
struct Burst {
    seen: [bool; BURST],
    received: usize,
    bad: usize,
}

impl Burst {
    fn take(&mut self, d: Datagram<'_>) {
        if d.to_port != PORT || d.payload.len() != 64 {
            return;
        }
        let seq = usize::from(u16::from_le_bytes([d.payload[0], d.payload[1]]));
        if seq < BURST && !self.seen[seq] && d.payload[2..] == burst_payload(seq)[2..] {
            self.seen[seq] = true;
            self.received += 1;
        } else {
            self.bad += 1;
        }
    }
}

/// Datagram `seq` of the burst: its number, then a pattern.
fn burst_payload(seq: usize) -> [u8; 64] {
    let mut p: [u8; 64] = core::array::from_fn(|i| (i * 7 + seq * 13) as u8);
    p[..2].copy_from_slice(&(seq as u16).to_le_bytes());
    p
}

/// Runs the network self-test on device `n` with `cfg`; prints its lines and
/// returns whether it passed. The device is reset at the end and every pool
/// buffer returned.
/// `point`, if given, is a snapshot point, run once the device is live
/// with its receive buffers posted and before any frame is sent.
pub fn selftest(
    n: usize,
    dev: MmioDevice,
    dma: &DmaPool,
    line: Line,
    cfg: Option<Config>,
    point: Option<&mut dyn FnMut()>,
) -> bool {
    let Some(cfg) = cfg else {
        log!("net{n}: no testguest.net= configuration: device left alone");
        return true;
    };
    let pool = match NetPool::new(dma) {
        Ok(pool) => pool,
        Err(e) => {
            log!("net{n}: FAIL {e}");
            return false;
        }
    };
    let result = match NetDev::init(n, dev, dma, &pool, line, cfg) {
        Ok(mut net) => {
            if let Some(point) = point {
                point();
            }
            let result = net.run();
            let (rxs, txs) = (net.rxq.stats(), net.txq.stats());
            let c = net.counters;
            let interrupts = net.line.count();
            net.say(format_args!(
                "frames rx {} tx {}, arp replies {}, echo replies {}, ignored {}, rx errors {}",
                c.rx_frames, c.tx_frames, c.arp_replies, c.echo_replies, c.ignored, c.rx_errors
            ));
            net.say(format_args!(
                "interrupts {interrupts}, notifications rx {} tx {} (suppressed rx {} tx {})",
                rxs.notifications, txs.notifications, rxs.suppressed, txs.suppressed
            ));
            net.shut_down();
            result.and(if c.rx_errors > 0 {
                Err(NetError::Mismatch(0))
            } else {
                Ok(())
            })
        }
        Err(e) => Err(e),
    };
    let s = pool.stats();
    log!(
        "netpool: allocs {} frees {} failures {} orphaned {} in use {} peak {}",
        s.allocs,
        s.frees,
        s.failures,
        s.orphaned,
        s.in_use,
        s.peak
    );
    let result = result.and(if s.in_use == 0 && s.orphaned == 0 {
        Ok(())
    } else {
        Err(NetError::NoBuffer)
    });
    match result {
        Ok(()) => {
            log!("net{n}: PASS");
            true
        }
        Err(e) => {
            log!("net{n}: FAIL {e}");
            false
        }
    }
}
