//! `net-peer`: the host side of the network tests, run inside a test's
//! network namespace (`ip netns exec`): a UDP echo service, a one-shot
//! datagram sender and a flood.
//!
//!     net-peer echo ADDR:PORT SECONDS     echo every datagram back, for SECONDS
//!     net-peer send ADDR:PORT TEXT        send one datagram
//!     net-peer flood ADDR:PORT COUNT LEN  send COUNT datagrams of LEN bytes

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", addr, seconds] => echo(addr, seconds),
        ["send", addr, text] => send(addr, text),
        ["flood", addr, count, len] => flood(addr, count, len),
        _ => Err("usage: net-peer echo ADDR:PORT SECONDS | send ADDR:PORT TEXT | flood ADDR:PORT COUNT LEN".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad value `{s}`"))
}

fn echo(addr: &str, seconds: &str) -> Result<(), String> {
    let socket = UdpSocket::bind(parse::<SocketAddr>(addr)?).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(parse(seconds)?);
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    // Ready: the test waits for this line before starting the guest.
    println!("echo ready");
    while Instant::now() < deadline {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
    Ok(())
}

fn send(addr: &str, text: &str) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .send_to(text.as_bytes(), parse::<SocketAddr>(addr)?)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn flood(addr: &str, count: &str, len: &str) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let to = parse::<SocketAddr>(addr)?;
    let payload = vec![0x5au8; parse(len)?];
    let (mut sent, mut refused) = (0u64, 0u64);
    for _ in 0..parse::<u64>(count)? {
        // A full TAP queue drops in the kernel; ENOBUFS is counted too.
        match socket.send_to(&payload, to) {
            Ok(_) => sent += 1,
            Err(_) => refused += 1,
        }
    }
    println!("flood sent {sent} refused {refused}");
    Ok(())
}
