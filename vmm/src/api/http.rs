//! The API's HTTP/1.1 server on a Unix socket (RFC 9112 framing), on its
//! own thread: one epoll loop over the listener and at most
//! [`MAX_CONNECTIONS`] non-blocking connections. `httparse` parses the
//! request line and headers; this module only frames requests
//! (`Content-Length`, `Expect: 100-continue`, keep-alive) and bounds what a
//! client can make it hold or wait for:
//!
//! - a request's headers are at most [`MAX_HEADERS_BYTES`], its body at most
//!   [`MAX_BODY`] (Firecracker's default payload limit); anything larger is
//!   answered 400 and the connection closed without reading the rest;
//! - a request must arrive whole within [`REQUEST_TIMEOUT`] of its first
//!   byte, or the connection is closed (a client that stalls halfway holds
//!   nothing for long);
//! - when every connection slot is taken, the least recently active
//!   connection is closed for the new one (idle keep-alive connections
//!   cannot lock clients out);
//! - a response is written with a [`WRITE_TIMEOUT`]; a client that does not
//!   read is dropped.
//!
//! Why not `tiny_http`: it spawns a thread per connection, reads header lines
//! without a length limit and has no read timeouts, so 1,000 connections,
//! an endless header line or a stalled request each cost it unbounded
//! threads, memory or time.
//!
//! Well-formed requests are routed here ([`super::router`]); the VMM gets
//! them through a channel, woken by an eventfd on its event loop, and
//! answers on a per-request channel. Nothing here holds a lock the VMM
//! takes.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::router::{self, ApiError, Method, Request};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Most bytes of a request line and headers.
pub const MAX_HEADERS_BYTES: usize = 8 << 10;
/// Most bytes of a request body (Firecracker's default payload limit).
pub const MAX_BODY: usize = 51_200;
/// Most headers in a request.
const MAX_HEADER_COUNT: usize = 32;
/// Time a request has to arrive whole, from its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a response has to be taken by the client.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Time the VMM has to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// An answer: status and an optional JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// JSON body (none for 204).
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    /// 200 with `body` as JSON.
    pub fn json<T: serde::Serialize>(body: &T) -> Response {
        match serde_json::to_string(body) {
            Ok(body) => Response {
                status: 200,
                body: Some(body),
            },
            Err(e) => Response::fault(500, &format!("Cannot encode the answer: {e}")),
        }
    }

    /// A status with `{"fault_message": ...}`.
    pub fn fault(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Response {
            status,
            body: Some(body),
        }
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Response {
        Response::fault(e.status, &e.message)
    }
}

/// A routed request and where its answer goes.
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub request: Request,
    /// Where the VMM sends the answer.
    pub reply: mpsc::SyncSender<Response>,
}

/// Requests by outcome, counted by the server (the VMM reads them for its
/// metrics).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Requests answered 2xx.
    pub ok: AtomicU64,
    /// Requests answered 4xx (bad HTTP, bad paths, bad bodies, refused).
    pub client_errors: AtomicU64,
    /// Requests answered 5xx.
    pub server_errors: AtomicU64,
    /// Connections closed for a timeout, a size limit or the slot limit.
    pub dropped_connections: AtomicU64,
}

/// The VMM's side of the server: the calls and the event that wakes it.
#[derive(Debug)]
pub struct ApiChannel {
    /// Routed requests.
    pub calls: mpsc::Receiver<ApiCall>,
    /// Written once per call sent.
    pub wake: Arc<EventFd>,
    /// The server's counters.
    pub metrics: Arc<HttpMetrics>,
}

/// Binds `path` and serves it on a new thread until the process ends.
pub fn spawn(path: &Path) -> io::Result<ApiChannel> {
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let metrics = Arc::new(HttpMetrics::default());
    let (tx, calls) = mpsc::channel();
    let server = Server {
        listener,
        epoll: Epoll::new()?,
        connections: HashMap::new(),
        next_token: 1,
        calls: tx,
        wake: wake.clone(),
        metrics: metrics.clone(),
    };
    server.watch(server.listener.as_raw_fd(), LISTENER)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || server.run())?;
    Ok(ApiChannel {
        calls,
        wake,
        metrics,
    })
}

/// The listener's epoll token.
const LISTENER: u64 = 0;

struct Server {
    listener: UnixListener,
    epoll: Epoll,
    connections: HashMap<u64, Connection>,
    next_token: u64,
    calls: mpsc::Sender<ApiCall>,
    wake: Arc<EventFd>,
    metrics: Arc<HttpMetrics>,
}

struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
    /// When the first byte of the pending request arrived.
    started: Option<Instant>,
    last_active: Instant,
    /// `100 Continue` sent for the pending request.
    continued: bool,
}

/// What to do with a connection after serving what it sent.
#[derive(PartialEq, Eq)]
enum Next {
    Keep,
    Close,
}

impl Server {
    fn watch(&self, fd: i32, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
        )
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); MAX_CONNECTIONS + 1];
        loop {
            let ready = match self.epoll.wait(500, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => {
                    log::error!("API server stopped: epoll failed: {e}");
                    return;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    LISTENER => self.accept(),
                    token => self.serve(token),
                }
            }
            self.expire();
        }
    }

    fn accept(&mut self) {
        // A bounded number per wake-up, so connections already open are
        // read between bursts of new ones.
        for _ in 0..MAX_CONNECTIONS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // EMFILE and the like: the connection stays queued.
                    log::warn!("API: cannot accept a connection: {e}");
                    return;
                }
            };
            if self.connections.len() >= MAX_CONNECTIONS
                && let Some(&oldest) = self
                    .connections
                    .iter()
                    .min_by_key(|(_, c)| c.last_active)
                    .map(|(t, _)| t)
            {
                self.close(oldest, true);
            }
            let token = self.next_token;
            self.next_token += 1;
            if stream.set_nonblocking(true).is_err()
                || self.watch(stream.as_raw_fd(), token).is_err()
            {
                continue;
            }
            self.connections.insert(
                token,
                Connection {
                    stream,
                    buf: Vec::new(),
                    started: None,
                    last_active: Instant::now(),
                    continued: false,
                },
            );
        }
    }

    fn close(&mut self, token: u64, dropped: bool) {
        if let Some(c) = self.connections.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if dropped {
                self.metrics
                    .dropped_connections
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Closes connections whose pending request is overdue.
    fn expire(&mut self) {
        let now = Instant::now();
        let overdue: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| c.started.is_some_and(|s| now - s > REQUEST_TIMEOUT))
            .map(|(t, _)| *t)
            .collect();
        for token in overdue {
            self.close(token, true);
        }
    }

    fn serve(&mut self, token: u64) {
        let Some(mut c) = self.connections.remove(&token) else {
            return;
        };
        let (eof, next) = match read_available(&mut c) {
            Ok(eof) => (eof, self.answer_all(&mut c)),
            Err(_) => (true, Next::Close),
        };
        let keep = next == Next::Keep && !eof;
        self.connections.insert(token, c);
        if !keep {
            self.close(token, next == Next::Close && !eof);
        }
    }

    /// Answers every whole request in the buffer.
    fn answer_all(&mut self, c: &mut Connection) -> Next {
        loop {
            if c.buf.is_empty() {
                c.started = None;
                return Next::Keep;
            }
            c.started.get_or_insert_with(Instant::now);
            match frame(&c.buf) {
                Frame::Partial { expects_continue } => {
                    if expects_continue && !std::mem::replace(&mut c.continued, true) {
                        let _ = write_all(&mut c.stream, b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    return Next::Keep;
                }
                Frame::Bad(message) => {
                    self.count(400);
                    let _ = write_response(&mut c.stream, &Response::fault(400, &message), true);
                    return Next::Close;
                }
                Frame::Whole {
                    method,
                    path,
                    body,
                    length,
                    close,
                } => {
                    let response = match router::route(method, &path, &c.buf[body..length]) {
                        Ok(request) => self.call(request),
                        Err(e) => e.into(),
                    };
                    self.count(response.status);
                    c.buf.drain(..length);
                    c.started = None;
                    c.continued = false;
                    if write_response(&mut c.stream, &response, close).is_err() || close {
                        return Next::Close;
                    }
                }
            }
        }
    }

    /// Hands a request to the VMM and waits for its answer.
    fn call(&self, request: Request) -> Response {
        let (reply, answer) = mpsc::sync_channel(1);
        if self.calls.send(ApiCall { request, reply }).is_err() {
            return Response::fault(500, "The VMM has stopped");
        }
        let _ = self.wake.write(1);
        answer
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::fault(500, "The VMM did not answer"))
    }

    fn count(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.metrics.ok,
            400..=499 => &self.metrics.client_errors,
            _ => &self.metrics.server_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads what the socket has, up to the most one request can hold beyond
/// what is buffered; true at end of stream.
fn read_available(c: &mut Connection) -> io::Result<bool> {
    let mut chunk = [0u8; 4096];
    loop {
        if c.buf.len() > MAX_HEADERS_BYTES + MAX_BODY {
            // Enough to answer (or refuse) what is buffered.
            return Ok(false);
        }
        match c.stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => {
                c.buf.extend_from_slice(&chunk[..n]);
                c.last_active = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What the buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// Not a whole request yet.
    Partial {
        /// The client waits for `100 Continue` before sending its body.
        expects_continue: bool,
    },
    /// A request that cannot be served; the connection closes after the 400.
    Bad(String),
    /// A whole request: its body is `buf[body..length]`.
    Whole {
        /// The method.
        method: Method,
        /// The request target.
        path: String,
        /// Where the body starts.
        body: usize,
        /// Where the request ends (the next one starts).
        length: usize,
        /// The client asked to close the connection after the answer.
        close: bool,
    },
}

/// Frames the first request in `buf`.
pub fn frame(buf: &[u8]) -> Frame {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_COUNT];
    let mut request = httparse::Request::new(&mut headers);
    let head = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEADERS_BYTES => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEADERS_BYTES => {
            return Frame::Partial {
                expects_continue: false,
            };
        }
        Ok(_) => {
            return Frame::Bad(format!(
                "The request headers are larger than {MAX_HEADERS_BYTES} bytes"
            ));
        }
        Err(e) => return Frame::Bad(format!("The request is not valid HTTP/1.1: {e}")),
    };
    let mut length = 0usize;
    let mut close = request.version == Some(0);
    let mut expects_continue = false;
    for h in request.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if n <= MAX_BODY => length = n,
                Ok(n) => {
                    return Frame::Bad(format!(
                        "Request payload with size {n} is larger than the limit of {MAX_BODY} allowed by server"
                    ));
                }
                Err(_) => return Frame::Bad("Content-Length is not a number".into()),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Frame::Bad("Transfer-Encoding is not supported; send Content-Length".into());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("expect") {
            expects_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    if buf.len() - head < length {
        return Frame::Partial { expects_continue };
    }
    Frame::Whole {
        method: Method::parse(request.method.unwrap_or("")),
        path: request.path.unwrap_or("/").to_owned(),
        body: head,
        length: head + length,
        close,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "",
    }
}

fn write_response(stream: &mut UnixStream, r: &Response, close: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: minivmm\r\n",
        r.status,
        reason(r.status)
    );
    if close {
        out.push_str("Connection: close\r\n");
    }
    if let Some(body) = &r.body {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        out.push_str("\r\n");
    }
    write_all(stream, out.as_bytes())
}

/// Writes with [`WRITE_TIMEOUT`] (the socket is non-blocking otherwise).
fn write_all(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let written = stream.write_all(bytes);
    stream.set_nonblocking(true)?;
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_wait_for_the_whole_body() {
        let req = b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert_eq!(
            frame(req),
            Frame::Partial {
                expects_continue: false
            }
        );
        let req = b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcdeGET";
        match frame(req) {
            Frame::Whole {
                method,
                path,
                body,
                length,
                close,
            } => {
                assert_eq!(
                    (method, path.as_str(), close),
                    (Method::Put, "/actions", false)
                );
                assert_eq!(&req[body..length], b"abcde");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_refuse_what_cannot_be_bounded_or_parsed() {
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 100 << 20);
        assert!(matches!(frame(big.as_bytes()), Frame::Bad(m) if m.contains("larger than")));
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(frame(chunked), Frame::Bad(_)));
        assert!(matches!(
            frame(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"),
            Frame::Bad(_)
        ));
        let endless = vec![b'A'; MAX_HEADERS_BYTES + 1];
        assert!(matches!(frame(&endless), Frame::Bad(_)));
        let long_header = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEADERS_BYTES));
        assert!(matches!(frame(long_header.as_bytes()), Frame::Bad(_)));
    }

    #[test]
    fn frames_note_expect_continue_and_connection_close() {
        let req = b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            frame(req),
            Frame::Partial {
                expects_continue: true
            }
        );
        let req = b"GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(frame(req), Frame::Whole { close: true, .. }));
        let req = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(matches!(frame(req), Frame::Whole { close: true, .. }));
    }
}
