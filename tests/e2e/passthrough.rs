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

/// Pass-through prefixes are not a way around the edge: a route may require a signed-in
/// customer, the caller's verified identity (never a spoofed one) reaches the upstream, and the
/// rate limits apply to it with the same 429 and headers as everywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_take_access_rules_and_rate_limits() {
    let (up_addr, seen) =
        recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    // `/private/...` matches both `/private/` and the later `/p`: the first listed must win.
    // (Pass-through prefixes come before the REST routes, so none may cover `/v1/`.)
    let passthrough = format!(
        "[{{prefix = \"/private/\", upstream = \"{up_addr}\", access = \"customer\"}}, \
          {{prefix = \"/static/\", upstream = \"{up_addr}\"}}, \
          {{prefix = \"/p\", upstream = \"{up_addr}\", access = \"admin\"}}]"
    );
    let limits = r#"[{name = "assets", paths = ["/static/"], requests = 1, per_secs = 60, burst = 2, by = "ip"}]"#;
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", limits),
        ],
    );
    let gw = app.addrs["gateway"];

    // Access: no token, a spoofed identity header, then a real customer.
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("x-shopverse-user", "admin")],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAUTHENTICATED", "{}", r.body);
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
    http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"pt@example.com","password":"a long password"}"#,
    );
    let token = bearer(&login(gw, "pt@example.com", "a long password"));
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("authorization", &token), ("x-shopverse-user", "admin")],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let req = seen.lock().unwrap().pop().unwrap().to_lowercase();
    assert!(req.starts_with("get /private/report.txt"), "{req}");
    assert!(
        !req.contains("x-shopverse-user: admin"),
        "spoofed identity reached the upstream: {req}"
    );
    assert!(
        req.contains("x-shopverse-user: "),
        "the customer's identity is missing: {req}"
    );
    assert!(req.contains("x-shopverse-roles: customer"), "{req}");
    // `/p...` is for admins only; a customer is refused with 403.
    let r = http(gw, "GET", "/pub/x", &[("authorization", &token)], b"");
    assert_eq!(r.status, 403, "{}", r.body);

    // Rate limits: a burst of 2, then 429 with Retry-After; headers on the admitted ones too.
    for _ in 0..2 {
        let r = http(gw, "GET", "/static/logo.png", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.header("ratelimit-policy")
                .is_some_and(|v| v.starts_with("\"assets\"")),
            "{:?}",
            r.header("ratelimit-policy")
        );
    }
    let r = http(gw, "GET", "/static/logo.png", &[], b"");
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)
    );
    // Another route under no policy is not limited.
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

/// The HTTP/1 front serves many requests on one client connection (pipelined too), relays
/// each framing an upstream uses, and hands a request it does not serve (REST, here) to
/// Pingora's server mid-connection without losing a byte, getting the connection back after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_connection_carries_pass_through_and_rest_requests() {
    use std::io::{Read, Write};
    let (up_addr, _) = keepalive_upstream();
    // Takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!(
        "[{{prefix = \"/ka/\", upstream = \"{up_addr}\"}}, {{prefix = \"/silent/\", upstream = \"{silent_addr}\"}}]"
    );
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
            ("SHOPVERSE_GATEWAY__REQUEST_TIMEOUT_MS", "1500"),
            ("SHOPVERSE_GATEWAY__CLIENT_BODY_TIMEOUT_MS", "1500"),
        ],
    );
    let gw = app.addrs["gateway"];
    let s = std::net::TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let host = format!("Host: {gw}\r\n");

    for _ in 0..3 {
        write!(w, "GET /ka/chunked HTTP/1.1\r\n{host}\r\n").unwrap();
        let (status, headers, body) = read_response(&mut r, false);
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        assert!(
            !headers.iter().any(|(k, _)| k == "keep-alive"),
            "{headers:?}"
        );
    }
    // Two requests in one write: answered in order.
    write!(
        w,
        "GET /ka/chunked HTTP/1.1\r\n{host}\r\nPOST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\nping"
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).2, b"hello");
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (201, &b"ping"[..]));
    // A body far larger than one read, sent after the head.
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    write!(
        w,
        "POST /ka/echo HTTP/1.1\r\n{host}content-length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    w.write_all(&big).unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 201);
    assert!(
        body == big,
        "the echoed body differs ({} bytes)",
        body.len()
    );
    // HEAD: a length, no body; the connection stays in step.
    write!(w, "HEAD /ka/x HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, _) = read_response(&mut r, true);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), "5".into())),
        "{headers:?}"
    );
    // A body delimited by the upstream closing reaches the client chunked.
    write!(w, "GET /ka/close HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, body) = read_response(&mut r, false);
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
    write!(w, "GET /ka/many HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (200, &b"many"[..]));
    assert!(
        headers.contains(&("x-h99".into(), "99".into())),
        "{}",
        headers.len()
    );
    // An upstream that does not answer in time: 504 in the JSON error shape, and the client's
    // connection goes on.
    write!(w, "GET /silent/x HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "DEADLINE_EXCEEDED");
    write!(w, "GET /ka/chunked HTTP/1.1\r\n{host}\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).2, b"hello");
    // A REST request is Pingora's server's to answer...
    write!(w, "GET /openapi.json HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // ...and the connection comes back to the front after it: pipelined requests are answered
    // (Pingora's server would close after the first, having read past it).
    write!(
        w,
        "POST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\npongGET /ka/chunked HTTP/1.1\r\n{host}\r\n"
    )
    .unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (201, &b"pong"[..]));
    assert_eq!(read_response(&mut r, false).2, b"hello");

    // A head that stops half way: answered 408 and closed once the head timeout is up (well
    // before the socket's own 30 s read timeout).
    let mut slow = std::net::TcpStream::connect(gw).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(slow, "GET /ka/chunked HTTP/1.1\r\n{host}").unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "a half-sent head held the connection for {:?} ({ended:?})",
        started.elapsed()
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408 "), "{rest}");
    assert!(rest.contains("connection: close"), "{rest}");

    // `Connection: close` is honoured: the answer says so, then the connection ends.
    let s = std::net::TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    write!(
        w,
        "GET /ka/chunked HTTP/1.1\r\n{host}connection: close\r\n\r\n"
    )
    .unwrap();
    let (status, headers, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert!(
        headers.contains(&("connection".into(), "close".into())),
        "{headers:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
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
