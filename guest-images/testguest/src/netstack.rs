//! Just enough of a network stack to be a real peer of the host's: ARP
//! (RFC 826) for our address, ICMP echo replies (RFC 792) and UDP (RFC 768)
//! over IPv4 (RFC 791), on Ethernet II frames. No fragments, no options
//! sent; frames not for us are ignored. Per-frame work is kept small (guest
//! code is emulated here): an echo reply updates the ICMP checksum
//! incrementally (RFC 1624) instead of summing the payload again.

/// Ethernet header bytes.
pub const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
/// Broadcast MAC.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// The guest's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Our IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length of our subnet.
    pub prefix: u8,
    /// The host side's address (the UDP echo peer).
    pub peer: [u8; 4],
    /// The peer's UDP echo port.
    pub port: u16,
    /// Seconds to keep answering ARP and ping after the self-test.
    pub serve_s: u32,
}

/// Parses `ip=A.B.C.D/N,peer=A.B.C.D,port=N[,serve=S]`.
pub fn parse_config(s: &str) -> Result<Config, &'static str> {
    let mut c = Config {
        ip: [0; 4],
        prefix: 24,
        peer: [0; 4],
        port: 7,
        serve_s: 0,
    };
    let (mut ip, mut peer) = (false, false);
    for item in s.split(',') {
        match item.split_once('=') {
            Some(("ip", v)) => {
                let (addr, prefix) = v.split_once('/').unwrap_or((v, "24"));
                c.ip = parse_ip(addr).ok_or("bad ip")?;
                c.prefix = prefix.parse().ok().filter(|p| *p <= 32).ok_or("bad prefix")?;
                ip = true;
            }
            Some(("peer", v)) => {
                c.peer = parse_ip(v).ok_or("bad peer")?;
                peer = true;
            }
            Some(("port", v)) => c.port = v.parse().map_err(|_| "bad port")?,
            Some(("serve", v)) => c.serve_s = v.parse().map_err(|_| "bad serve")?,
            _ => return Err("unknown item"),
        }
    }
    if !ip || !peer {
        return Err("ip and peer are required");
    }
    Ok(c)
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The ones' complement sum of `data` (RFC 1071), folded.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a received frame was.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// Not for us, or malformed: ignored.
    Ignored,
    /// An ARP request for our address: answer with `reply`'s first `len`
    /// bytes.
    ArpRequest { reply_len: usize },
    /// An ARP reply (or request) telling us a MAC for an address.
    ArpLearned { ip: [u8; 4], mac: [u8; 6] },
    /// An ICMP echo request: the reply was built in `reply`.
    EchoRequest { reply_len: usize },
    /// A UDP datagram to us.
    Udp {
        /// Source address and port.
        from: ([u8; 4], u16),
        /// Our port.
        to_port: u16,
        /// The payload.
        payload: &'a [u8],
    },
}

/// Looks at `frame` (an Ethernet frame, no virtio header); builds the answer
/// to ARP and ping requests into `reply`.
pub fn receive<'a>(cfg: &Config, mac: &[u8; 6], frame: &'a [u8], reply: &mut [u8]) -> Received<'a> {
    if frame.len() < ETH_HLEN || (frame[..6] != *mac && frame[..6] != BROADCAST) {
        return Received::Ignored;
    }
    let body = &frame[ETH_HLEN..];
    match be16(frame, 12) {
        ETHERTYPE_ARP => arp(cfg, mac, frame, body, reply),
        ETHERTYPE_IPV4 => ipv4(cfg, mac, frame, body, reply),
        _ => Received::Ignored,
    }
}

fn arp<'a>(cfg: &Config, mac: &[u8; 6], frame: &[u8], a: &[u8], reply: &mut [u8]) -> Received<'a> {
    // Ethernet/IPv4 ARP only.
    if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return Received::Ignored;
    }
    let op = be16(a, 6);
    let (sha, spa, tpa) = (&a[8..14], &a[14..18], &a[24..28]);
    if op == 1 && tpa == cfg.ip && reply.len() >= ETH_HLEN + 28 {
        let r = &mut reply[..ETH_HLEN + 28];
        r[..6].copy_from_slice(&frame[6..12]);
        r[6..12].copy_from_slice(mac);
        put16(r, 12, ETHERTYPE_ARP);
        let body = &mut r[ETH_HLEN..];
        body[..6].copy_from_slice(&a[..6]);
        put16(body, 6, 2);
        body[8..14].copy_from_slice(mac);
        body[14..18].copy_from_slice(&cfg.ip);
        body[18..24].copy_from_slice(sha);
        body[24..28].copy_from_slice(spa);
        return Received::ArpRequest {
            reply_len: ETH_HLEN + 28,
        };
    }
    if op == 2 && tpa == cfg.ip {
        let mut ip = [0; 4];
        ip.copy_from_slice(spa);
        let mut m = [0; 6];
        m.copy_from_slice(sha);
        return Received::ArpLearned { ip, mac: m };
    }
    Received::Ignored
}

fn ipv4<'a>(cfg: &Config, mac: &[u8; 6], frame: &'a [u8], ip: &'a [u8], reply: &mut [u8]) -> Received<'a> {
    if ip.len() < IP_HLEN || ip[0] >> 4 != 4 {
        return Received::Ignored;
    }
    let hlen = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if hlen < IP_HLEN || total < hlen || total > ip.len() || ip[16..20] != cfg.ip {
        return Received::Ignored;
    }
    // Fragments (MF set or an offset) are not reassembled.
    if be16(ip, 6) & 0x3fff != 0 || checksum(&ip[..hlen], 0) != 0 {
        return Received::Ignored;
    }
    let mut src = [0u8; 4];
    src.copy_from_slice(&ip[12..16]);
    let payload = &ip[hlen..total];
    match ip[9] {
        PROTO_ICMP if payload.len() >= 8 && payload[0] == 8 && payload[1] == 0 => {
            let len = ETH_HLEN + IP_HLEN + payload.len();
            if reply.len() < len {
                return Received::Ignored;
            }
            let r = &mut reply[..len];
            r[..6].copy_from_slice(&frame[6..12]);
            r[6..12].copy_from_slice(mac);
            put16(r, 12, ETHERTYPE_IPV4);
            ip_header(&mut r[ETH_HLEN..], PROTO_ICMP, cfg.ip, src, payload.len(), be16(ip, 4));
            let icmp = &mut r[ETH_HLEN + IP_HLEN..];
            icmp.copy_from_slice(payload);
            icmp[0] = 0;
            // RFC 1624: type 8 -> 0 changes one 16-bit word by 0x0800.
            let old = !be16(payload, 2);
            let sum = u32::from(old) + u32::from(!0x0800u16);
            let sum = (sum & 0xffff) + (sum >> 16);
            put16(icmp, 2, !((sum & 0xffff) + (sum >> 16)) as u16);
            Received::EchoRequest { reply_len: len }
        }
        PROTO_UDP if payload.len() >= UDP_HLEN => {
            let len = usize::from(be16(payload, 4));
            if len < UDP_HLEN || len > payload.len() {
                return Received::Ignored;
            }
            if be16(payload, 6) != 0 && udp_checksum(src, cfg.ip, &payload[..len]) != 0 {
                return Received::Ignored;
            }
            Received::Udp {
                from: (src, be16(payload, 0)),
                to_port: be16(payload, 2),
                payload: &payload[UDP_HLEN..len],
            }
        }
        _ => Received::Ignored,
    }
}

fn ip_header(h: &mut [u8], proto: u8, src: [u8; 4], dst: [u8; 4], payload: usize, id: u16) {
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, (IP_HLEN + payload) as u16);
    put16(h, 4, id);
    put16(h, 6, 0x4000); // don't fragment
    h[8] = 64;
    h[9] = proto;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let sum = checksum(&h[..IP_HLEN], 0);
    put16(h, 10, sum);
}

fn udp_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
    let pseudo = u32::from(be16(&src, 0))
        + u32::from(be16(&src, 2))
        + u32::from(be16(&dst, 0))
        + u32::from(be16(&dst, 2))
        + u32::from(PROTO_UDP)
        + udp.len() as u32;
    checksum(udp, pseudo)
}

/// Builds an ARP request for `target` into `out`; returns its length.
pub fn arp_request(cfg: &Config, mac: &[u8; 6], target: [u8; 4], out: &mut [u8]) -> usize {
    let r = &mut out[..ETH_HLEN + 28];
    r[..6].copy_from_slice(&BROADCAST);
    r[6..12].copy_from_slice(mac);
    put16(r, 12, ETHERTYPE_ARP);
    let a = &mut r[ETH_HLEN..];
    put16(a, 0, 1);
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, 1);
    a[8..14].copy_from_slice(mac);
    a[14..18].copy_from_slice(&cfg.ip);
    a[18..24].fill(0);
    a[24..28].copy_from_slice(&target);
    ETH_HLEN + 28
}

/// Builds a UDP datagram from our `port` to `to` (MAC, address, port) into
/// `out`; returns its length, or 0 if it does not fit.
pub fn udp(
    cfg: &Config,
    mac: &[u8; 6],
    to: ([u8; 6], [u8; 4], u16),
    port: u16,
    payload: &[u8],
    id: u16,
    out: &mut [u8],
) -> usize {
    let len = ETH_HLEN + IP_HLEN + UDP_HLEN + payload.len();
    if out.len() < len {
        return 0;
    }
    let r = &mut out[..len];
    r[..6].copy_from_slice(&to.0);
    r[6..12].copy_from_slice(mac);
    put16(r, 12, ETHERTYPE_IPV4);
    ip_header(&mut r[ETH_HLEN..], PROTO_UDP, cfg.ip, to.1, UDP_HLEN + payload.len(), id);
    let u = &mut r[ETH_HLEN + IP_HLEN..];
    put16(u, 0, port);
    put16(u, 2, to.2);
    put16(u, 4, (UDP_HLEN + payload.len()) as u16);
    put16(u, 6, 0);
    u[UDP_HLEN..].copy_from_slice(payload);
    let sum = match udp_checksum(cfg.ip, to.1, u) {
        0 => 0xffff,
        s => s,
    };
    put16(u, 6, sum);
    len
}
