//! The access log as an operator reads it: one JSON line per request under the target
//! `shopverse::access`, whichever path answered it (the HTTP/1 front's pass-through relay, its
//! refusals, Pingora's REST path), with the request id, trace id, client, route, status, sizes,
//! duration, upstream and caller; none when it is switched off.
//!
//! The process's telemetry is installed as the binary installs it (JSON lines, through the log
//! thread), into a buffer the test reads. Each test starts a gateway of its own (nextest runs
//! each test in a process of its own).

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shopverse_gateway::config::{GatewayConfig, Passthrough};
use shopverse_gateway::router::Access;

/// Everything the process logs, as JSON lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// The access-log lines so far, as their `fields`.
    fn access(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["target"] == "shopverse::access")
            .map(|l| l["fields"].clone())
            .collect()
    }
}

/// An origin that answers every request `200 ok` and closes.
fn origin() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    addr
}

/// A gateway with `/static/` passed to an origin and no services behind it, logging JSON into
/// what it returns; `access_log` as given.
fn gateway(access_log: bool) -> (SocketAddr, Captured) {
    let captured = Captured::default();
    let telemetry = shopverse_kit::telemetry::TelemetryConfig {
        log_format: shopverse_kit::telemetry::LogFormat::Json,
        ..Default::default()
    };
    shopverse_kit::telemetry::init_with_writer(&telemetry, Some("info"), captured.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cfg = GatewayConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                threads: 1,
                upstreams: [("products".to_owned(), vec!["http://127.0.0.1:9".to_owned()])]
                    .into_iter()
                    .chain([("users".to_owned(), vec!["http://127.0.0.1:9".to_owned()])])
                    .collect(),
                rate_limits: Vec::new(),
                passthrough: vec![Passthrough {
                    prefix: "/static/".into(),
                    upstream: origin().to_string(),
                    access: Access::Public,
                }],
                access_log,
                ..Default::default()
            };
            let mut cfg = cfg;
            cfg.cache.enabled = false;
            let running = shopverse_gateway::Builder::new(cfg).start().await.unwrap();
            tx.send(running.addr).unwrap();
            std::future::pending::<()>().await;
        });
    });
    (rx.recv().unwrap(), captured)
}

/// Sends `raw` on a connection of its own and reads the answer to its end.
fn send(addr: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Waits until there are `n` access lines, then returns them.
fn lines(captured: &Captured, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let got = captured.access();
        if got.len() >= n {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    captured.access()
}

#[test]
fn every_path_writes_one_line_with_what_it_knows() {
    let (gw, captured) = gateway(true);
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let relayed = send(
        gw,
        &format!(
            "GET /static/a/../logo.png?v=1 HTTP/1.1\r\nHost: x\r\nx-request-id: req-1\r\ntraceparent: {tp}\r\nconnection: close\r\n\r\n"
        ),
    );
    assert!(relayed.starts_with("HTTP/1.1 200"), "{relayed}");
    let refused = send(gw, "GET /static/x HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
    let rest = send(
        gw,
        "GET /v1/products HTTP/1.1\r\nHost: x\r\nx-request-id: req-3\r\nconnection: close\r\n\r\n",
    );
    assert!(rest.starts_with("HTTP/1.1 503"), "{rest}");

    let got = lines(&captured, 3);
    assert_eq!(got.len(), 3, "one line a request: {got:#?}");
    let relay = &got[0];
    assert_eq!(relay["request_id"], "req-1", "{relay}");
    assert_eq!(relay["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(relay["client"], "127.0.0.1");
    assert_eq!(
        (&relay["method"], &relay["path"]),
        (&"GET".into(), &"/static/logo.png".into())
    );
    assert_eq!(relay["status"], "200");
    assert_eq!(relay["upstream"], send_origin_of(relay));
    assert!(
        relay["bytes_in"].as_u64().is_some_and(|n| n > 50),
        "{relay}"
    );
    assert!(relay["duration_us"].as_u64().is_some(), "{relay}");
    assert!(relay.get("user").is_none(), "no caller, no user: {relay}");

    let refusal = &got[1];
    assert_eq!(
        (&refusal["route"], &refusal["status"]),
        (&"refused".into(), &"400".into())
    );
    assert_eq!(
        refusal["request_id"].as_str().map(str::len),
        Some(32),
        "{refusal}"
    );

    let pingora = &got[2];
    assert_eq!(pingora["request_id"], "req-3");
    assert_eq!(
        (&pingora["route"], &pingora["status"]),
        (&"/v1/products".into(), &"503".into())
    );
    assert!(
        pingora["bytes_out"].as_u64().is_some_and(|n| n > 0),
        "{pingora}"
    );
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        !text.to_ascii_lowercase().contains("bearer"),
        "no token is logged"
    );
}

/// The origin's address as the relay line names it (`127.0.0.1:<port>`).
fn send_origin_of(line: &serde_json::Value) -> serde_json::Value {
    let upstream = line["upstream"].as_str().unwrap_or_default();
    assert!(upstream.starts_with("127.0.0.1:"), "{line}");
    upstream.into()
}

#[test]
fn switched_off_it_writes_nothing() {
    let (gw, captured) = gateway(false);
    let relayed = send(
        gw,
        "GET /static/logo.png HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(relayed.starts_with("HTTP/1.1 200"), "{relayed}");
    let rest = send(
        gw,
        "GET /v1/products HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
    );
    assert!(rest.starts_with("HTTP/1.1 503"), "{rest}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(captured.access().is_empty(), "{:?}", captured.access());
}
