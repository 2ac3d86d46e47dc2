//! Pass-through routes: plain HTTP upstreams behind the gateway, their access rules, rate
//! limits, connection reuse and framing.

use std::net::SocketAddr;

use crate::common::gateway::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_reach_a_plain_http_upstream_without_spoofed_identity() {
    let (up_addr, seen) = recording_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    );
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!("[{{prefix = \"/static/\", upstream = \"{up_addr}\"}}]");
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough)],
    );
    let r = http(
        app.addrs["gateway"],
        "GET",
        "/static/logo.txt",
        &[
            ("x-shopverse-user", "admin"),
            ("x-shopverse-roles", "admin"),
        ],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    let req = seen.lock().unwrap().pop().unwrap().to_lowercase();
    assert!(req.starts_with("get /static/logo.txt"), "{req}");
    assert!(
        !req.contains("x-shopverse-user"),
        "spoofed identity reached the upstream: {req}"
    );
    assert!(!req.contains("x-shopverse-roles"), "{req}");
    assert!(req.contains("x-request-id"), "{req}");
    app.stop();
}

/// An appliance passing `/private/` (customers only), `/static/` (anyone, rate limited to a
/// burst of 2) and `/p` (admins only) to `upstream`.
fn guarded_appliance(dir: &std::path::Path, upstream: SocketAddr) -> Appliance {
    // `/private/...` matches both `/private/` and the later `/p`: the first listed must win.
    // (Pass-through prefixes come before the REST routes, so none may cover `/v1/`.)
    let passthrough = format!(
        "[{{prefix = \"/private/\", upstream = \"{upstream}\", access = \"customer\"}}, \
          {{prefix = \"/static/\", upstream = \"{upstream}\"}}, \
          {{prefix = \"/p\", upstream = \"{upstream}\", access = \"admin\"}}]"
    );
    let limits = r#"[{name = "assets", paths = ["/static/"], requests = 1, per_secs = 60, burst = 2, by = "ip"}]"#;
    Appliance::start_with_env(
        dir,
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", limits),
        ],
    )
}

/// Pass-through prefixes are not a way around the edge: a route may require a signed-in
/// customer or an admin, and the caller's verified identity (never a spoofed one) reaches the
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_take_access_rules() {
    let (up_addr, seen) =
        recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    let app = guarded_appliance(dir.path(), up_addr);
    let gw = app.addrs["gateway"];
    let spoofed = ("x-shopverse-user", "admin");
    let r = http(gw, "GET", "/private/report.txt", &[spoofed], b"");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAUTHENTICATED", "{}", r.body);
    let reached = !seen.lock().unwrap().is_empty();
    assert!(!reached, "a refused request reached the upstream");

    let (_, token) = customer(gw, "pt@example.com");
    let as_customer = ("authorization", token.as_str());
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[as_customer, spoofed],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let req = seen.lock().unwrap().pop().unwrap().to_lowercase();
    assert!(req.starts_with("get /private/report.txt"), "{req}");
    let spoof_passed = req.contains("x-shopverse-user: admin");
    assert!(
        !spoof_passed,
        "spoofed identity reached the upstream: {req}"
    );
    let identified = req.contains("x-shopverse-user: ");
    assert!(identified, "the customer's identity is missing: {req}");
    assert!(req.contains("x-shopverse-roles: customer"), "{req}");
    // `/p...` is for admins only; a customer is refused with 403.
    let r = http(gw, "GET", "/pub/x", &[as_customer], b"");
    assert_eq!(r.status, 403, "{}", r.body);
    app.stop();
}

/// Rate limits apply to pass-through routes with the same 429 and headers as everywhere else:
/// a burst of 2, then 429 with Retry-After, headers on the admitted ones too; a route under no
/// policy is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_take_rate_limits() {
    let (up_addr, _) =
        recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    let app = guarded_appliance(dir.path(), up_addr);
    let gw = app.addrs["gateway"];
    for _ in 0..2 {
        let r = http(gw, "GET", "/static/logo.png", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        let policy = r.header("ratelimit-policy");
        assert!(
            policy.is_some_and(|v| v.starts_with("\"assets\"")),
            "{policy:?}"
        );
    }
    let r = http(gw, "GET", "/static/logo.png", &[], b"");
    assert_eq!(r.status, 429, "{}", r.body);
    let retry_after = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
    let (_, token) = customer(gw, "pt@example.com");
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("authorization", &token)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    app.stop();
}

/// The gateway keeps its connections to a pass-through upstream alive across requests,
/// streams chunked answers and request bodies, survives the upstream closing an idle
/// connection, and answers 502 in the JSON error shape when the upstream is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_reuses_upstream_connections_and_frames_bodies() {
    let (up_addr, accepted) = keepalive_upstream();
    // Nothing listens on port 1, and no other test's server can be given it.
    let gone_addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!(
        "[{{prefix = \"/ka/\", upstream = \"{up_addr}\"}}, {{prefix = \"/gone/\", upstream = \"{gone_addr}\"}}]"
    );
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
        ],
    );
    let gw = app.addrs["gateway"];
    for i in 0..10 {
        let r = http(gw, "GET", "/ka/chunked", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(dechunk(&r.body), "hello", "request {i}: {:?}", r.body);
        assert!(
            r.header("keep-alive").is_none(),
            "the upstream's hop-by-hop header leaked"
        );
        let payload = format!("order {i}");
        let r = http(gw, "POST", "/ka/echo", &[], payload.as_bytes());
        assert_eq!((r.status, r.body.as_str()), (201, payload.as_str()));
    }
    let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // One per gateway thread at most (each thread keeps its own idle connections).
    assert!(
        (1..=2).contains(&opened),
        "20 sequential requests opened {opened} upstream connections"
    );
    // The upstream closes after each of these; the next request must not fail on the dead
    // connection.
    for _ in 0..4 {
        let r = http(gw, "GET", "/ka/bye", &[], b"");
        assert_eq!((r.status, r.body.as_str()), (200, "bye"));
    }
    let r = http(gw, "GET", "/gone/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAVAILABLE", "{}", r.body);
    app.stop();
}

/// An appliance whose gateway passes `/ka/` to a keep-alive upstream and `/silent/` to one that
/// takes connections and never answers, with 1.5 s request and body timeouts and no rate limits.
fn framing_appliance(dir: &std::path::Path) -> Appliance {
    let (up_addr, _) = keepalive_upstream();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let passthrough = format!(
        "[{{prefix = \"/ka/\", upstream = \"{up_addr}\"}}, {{prefix = \"/silent/\", upstream = \"{silent_addr}\"}}]"
    );
    Appliance::start_with_env(
        dir,
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
            ("SHOPVERSE_GATEWAY__REQUEST_TIMEOUT_MS", "1500"),
            ("SHOPVERSE_GATEWAY__CLIENT_BODY_TIMEOUT_MS", "1500"),
        ],
    )
}

/// One client connection to the gateway, with a 30 s read timeout.
struct Conn {
    w: std::net::TcpStream,
    r: std::io::BufReader<std::net::TcpStream>,
    /// `Host: <gateway>\r\n`.
    host: String,
}

type Response = (u16, Vec<(String, String)>, Vec<u8>);

impl Conn {
    fn open(gw: SocketAddr) -> Conn {
        let s = std::net::TcpStream::connect(gw).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        Conn {
            w: s.try_clone().unwrap(),
            r: std::io::BufReader::new(s),
            host: format!("Host: {gw}\r\n"),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        std::io::Write::write_all(&mut self.w, bytes).unwrap();
    }

    /// The next response; `head`: it answers a HEAD request (no body).
    fn read(&mut self, head: bool) -> Response {
        read_response(&mut self.r, head)
    }

    fn get(&mut self, path: &str) -> Response {
        let host = self.host.clone();
        self.send(format!("GET {path} HTTP/1.1\r\n{host}\r\n").as_bytes());
        self.read(false)
    }
}

/// The HTTP/1 front serves many requests on one client connection, pipelined too, and relays
/// each framing an upstream uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_connection_relays_every_framing_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let app = framing_appliance(dir.path());
    let mut c = Conn::open(app.addrs["gateway"]);
    let host = c.host.clone();
    for _ in 0..3 {
        let (status, headers, body) = c.get("/ka/chunked");
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        let keep_alive = headers.iter().any(|(k, _)| k == "keep-alive");
        assert!(!keep_alive, "{headers:?}");
    }
    // Two requests in one write: answered in order.
    c.send(format!("GET /ka/chunked HTTP/1.1\r\n{host}\r\nPOST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\nping").as_bytes());
    assert_eq!(c.read(false).2, b"hello");
    let (status, _, body) = c.read(false);
    assert_eq!((status, body.as_slice()), (201, &b"ping"[..]));
    // A body far larger than one read, sent after the head.
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    c.send(
        format!(
            "POST /ka/echo HTTP/1.1\r\n{host}content-length: {}\r\n\r\n",
            big.len()
        )
        .as_bytes(),
    );
    c.send(&big);
    let (status, _, body) = c.read(false);
    assert_eq!(status, 201);
    assert!(
        body == big,
        "the echoed body differs ({} bytes)",
        body.len()
    );
    // HEAD: a length, no body; the connection stays in step.
    c.send(format!("HEAD /ka/x HTTP/1.1\r\n{host}\r\n").as_bytes());
    let (status, headers, _) = c.read(true);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), "5".into())),
        "{headers:?}"
    );
    // A body delimited by the upstream closing reaches the client chunked.
    let (status, headers, body) = c.get("/ka/close");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"streamed"[..]),
        "{headers:?}"
    );
    assert!(
        !headers.iter().any(|(k, _)| k == "connection"),
        "{headers:?}"
    );
    // An answer with a hundred headers.
    let (status, headers, body) = c.get("/ka/many");
    assert_eq!((status, body.as_slice()), (200, &b"many"[..]));
    assert!(
        headers.contains(&("x-h99".into(), "99".into())),
        "{}",
        headers.len()
    );
    app.stop();
}

/// An upstream that does not answer in time is a 504 and the connection goes on; a request the
/// front does not serve (REST) is handed to Pingora's server mid-connection without losing a
/// byte, and the connection comes back to the front after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_and_a_rest_request_leave_the_connection_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let app = framing_appliance(dir.path());
    let mut c = Conn::open(app.addrs["gateway"]);
    let host = c.host.clone();
    let (status, _, body) = c.get("/silent/x");
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "DEADLINE_EXCEEDED");
    assert_eq!(c.get("/ka/chunked").2, b"hello");
    let (status, _, body) = c.get("/openapi.json");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // Pipelined requests after it are answered (Pingora's server would close after the first,
    // having read past it).
    c.send(format!("POST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\npongGET /ka/chunked HTTP/1.1\r\n{host}\r\n").as_bytes());
    let (status, _, body) = c.read(false);
    assert_eq!((status, body.as_slice()), (201, &b"pong"[..]));
    assert_eq!(c.read(false).2, b"hello");
    app.stop();
}

/// A head that stops half way is answered 408 and closed once the head timeout is up (well
/// before the socket's own 30 s read timeout); `Connection: close` is honoured: the answer says
/// so, then the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_head_is_408_and_connection_close_ends_the_connection() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let app = framing_appliance(dir.path());
    let mut slow = Conn::open(app.addrs["gateway"]);
    let host = slow.host.clone();
    slow.send(format!("GET /ka/chunked HTTP/1.1\r\n{host}").as_bytes());
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = slow.r.read_to_end(&mut rest);
    let held = started.elapsed();
    assert!(
        held < std::time::Duration::from_secs(20),
        "a half-sent head held the connection for {held:?} ({ended:?})"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408 "), "{rest}");
    assert!(rest.contains("connection: close"), "{rest}");

    let mut c = Conn::open(app.addrs["gateway"]);
    c.send(format!("GET /ka/chunked HTTP/1.1\r\n{host}connection: close\r\n\r\n").as_bytes());
    let (status, headers, body) = c.read(false);
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert!(
        headers.contains(&("connection".into(), "close".into())),
        "{headers:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(c.r.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
    app.stop();
}

/// An idle upstream connection the upstream has closed is closed by the gateway too, without
/// waiting for the next request to that upstream (no connections left in CLOSE_WAIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_the_upstream_closed_are_closed() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        // Done with the connection: our side closes, and we wait for the gateway's end.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(25)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let ended = s.read_to_end(&mut rest);
        let _ = tx.send((ended.is_ok(), started.elapsed()));
    });
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!("[{{prefix = \"/up/\", upstream = \"{up_addr}\"}}]");
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
        ],
    );
    let r = http(app.addrs["gateway"], "GET", "/up/x", &[], b"");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let (closed, after) = rx.recv_timeout(std::time::Duration::from_secs(40)).unwrap();
    assert!(
        closed,
        "the gateway kept the closed upstream connection open for {after:?}"
    );
    app.stop();
}
