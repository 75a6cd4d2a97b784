//! A plain HTTP/1.1 client for minivmm's API socket, as Firecracker's SDKs
//! talk to it: one request per connection, JSON bodies.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Sends `method path` with `body` (empty for none); the status and body.
pub fn request(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send the request");
    // Until the body Content-Length announces is in, or the server closes
    // (a server may keep the connection open despite `Connection: close`).
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !is_whole(&answer) {
        let n = s.read(&mut buf).expect("read the answer");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    parse(&String::from_utf8_lossy(&answer))
}

/// Whether `answer` holds its headers and the whole body they announce.
fn is_whole(answer: &[u8]) -> bool {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let headers = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let length = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    answer.len() >= end + 4 + length
}

/// The status and body of a whole response.
pub fn parse(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// Sends a request that must succeed (2xx); its body.
pub fn ok(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let (status, answer) = request(sock, method, path, body);
    assert!(
        (200..300).contains(&status),
        "{method} {path} {body}: {status} {answer}"
    );
    answer
}

/// Sends a request that must be refused with 400 and a fault message; the
/// message.
pub fn refused(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let (status, answer) = request(sock, method, path, body);
    assert_eq!(status, 400, "{method} {path} {body}: {answer}");
    let prefix = "{\"fault_message\":\"";
    assert!(answer.starts_with(prefix), "{answer}");
    answer[prefix.len()..].trim_end_matches("\"}").to_owned()
}

/// Waits until `sock` exists (minivmm is listening).
pub fn wait_for_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `PUT`s the drive `scratch` on `disk` and the interface `eth0` on TAP
/// `tap0` with MAC 02:00:00:00:00:15, as firecracker-go-sdk words them.
pub fn put_scratch_drive_and_tap(sock: &Path, disk: &Path) {
    let drive = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        disk.display()
    );
    ok(sock, "PUT", "/drives/scratch", &drive);
    ok(
        sock,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:15"}"#,
    );
}
