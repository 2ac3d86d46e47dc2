//! The live event stream (`GET /v1/events/stream`) as a client reads it off the wire: the
//! caller's own events as they happen, resumable with `Last-Event-ID`, heartbeats on a quiet
//! stream, and a client that stops reading cut off.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::gateway::{now, sign_with_real_key};
use crate::common::*;

const PATH: &str = "/v1/events/stream";

/// One event off the stream.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    name: String,
    data: serde_json::Value,
}

/// An open stream: the response head, then its chunked body read as SSE.
struct Stream {
    status: u16,
    head: String,
    body: BufReader<TcpStream>,
    /// Decoded body bytes not yet read as lines.
    pending: Vec<u8>,
    /// Comment lines seen (heartbeats).
    comments: usize,
}

impl Stream {
    fn open(gw: SocketAddr, token: Option<&str>, last_event_id: Option<&str>) -> Stream {
        let s = TcpStream::connect(gw).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut req = format!("GET {PATH} HTTP/1.1\r\nHost: {gw}\r\n");
        if let Some(t) = token {
            req.push_str(&format!("authorization: {t}\r\n"));
        }
        if let Some(id) = last_event_id {
            req.push_str(&format!("last-event-id: {id}\r\n"));
        }
        req.push_str("accept: text/event-stream\r\n\r\n");
        (&s).write_all(req.as_bytes()).unwrap();
        let mut body = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            body.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap();
        Stream {
            status,
            head: head.to_lowercase(),
            body,
            pending: Vec::new(),
            comments: 0,
        }
    }

    /// The next chunk of the body; `None` at its end or when the server closed.
    fn chunk(&mut self) -> Option<Vec<u8>> {
        let mut size = String::new();
        if self.body.read_line(&mut size).ok()? == 0 {
            return None;
        }
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 {
            return None;
        }
        let mut data = vec![0u8; n + 2];
        self.body.read_exact(&mut data).ok()?;
        data.truncate(n);
        Some(data)
    }

    /// The next line of the event stream.
    fn line(&mut self) -> Option<String> {
        loop {
            if let Some(at) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=at).collect();
                let line = String::from_utf8(line).unwrap().trim_end().to_owned();
                self.comments += usize::from(line.starts_with(':'));
                return Some(line);
            }
            let chunk = self.chunk()?;
            self.pending.extend_from_slice(&chunk);
        }
    }

    /// The next event (comments and `retry` skipped); `None` when the stream ended.
    fn next(&mut self) -> Option<Event> {
        let (mut id, mut name, mut data) = (String::new(), String::new(), String::new());
        loop {
            let line = self.line()?;
            if line.is_empty() {
                if !data.is_empty() {
                    let data = serde_json::from_str(&data).unwrap();
                    return Some(Event { id, name, data });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((&line, ""));
            match field {
                "id" => id = value.to_owned(),
                "event" => name = value.to_owned(),
                "data" => data.push_str(value),
                "retry" => {}
                other => panic!("an unknown field {other:?} in {line:?}"),
            }
        }
    }

    /// Events until one named `last` for `order` has come.
    fn until(&mut self, order: &str, last: &str) -> Vec<Event> {
        let mut seen = Vec::new();
        while let Some(e) = self.next() {
            let done = e.name == last && e.data["orderId"] == order;
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("the stream ended before {last} of {order}: {seen:#?}");
    }
}

fn order_id(r: &HttpResponse) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["id"].as_str().unwrap().to_owned()
}

/// A customer's stream carries their order's saga in order, and nothing of another
/// customer's; an admin's carries both; nobody signed out gets one. A client that comes back
/// with the id of the last event it saw gets the rest, the same events with the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_streams_their_own_orders_saga_and_resumes_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (app, admin) = with_admin(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let (alice_id, alice) = customer(gw, "alice@example.com");
    let (_, bob) = customer(gw, "bob@example.com");

    let anonymous = Stream::open(gw, None, None);
    assert_eq!(anonymous.status, 401, "{}", anonymous.head);
    let mut mine = Stream::open(gw, Some(&alice), None);
    assert_eq!(mine.status, 200, "{}", mine.head);
    assert!(
        mine.head.contains("content-type: text/event-stream"),
        "{}",
        mine.head
    );
    assert!(
        mine.head.contains("cache-control: no-store"),
        "{}",
        mine.head
    );
    let mut all = Stream::open(gw, Some(&admin), None);

    let bobs = order_id(&buy_with(
        gw,
        &[("authorization", &bob)],
        0,
        "bob-order-1",
        "pm_card_ok",
    ));
    let (trace, traceparent) = (
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let headers = [
        ("authorization", alice.as_str()),
        ("traceparent", traceparent),
    ];
    let alices = order_id(&buy_with(gw, &headers, 1, "alice-order-1", "pm_card_ok"));
    let seen = mine.until(&alices, "shipment.scheduled");
    let names: Vec<&str> = seen.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "order.placed",
            "payment.succeeded",
            "order.confirmed",
            "shipment.scheduled"
        ],
        "{seen:#?}"
    );
    for e in &seen {
        assert_eq!(e.data["orderId"], alices.as_str(), "{e:?}");
        assert_eq!(e.data["traceId"], trace, "the client's trace: {e:?}");
    }
    assert_eq!(
        seen[2].data["status"], "ORDER_STATUS_CONFIRMED",
        "{:?}",
        seen[2]
    );
    let everything = all.until(&alices, "shipment.scheduled");
    assert!(
        everything
            .iter()
            .any(|e| e.data["orderId"] == bobs.as_str()),
        "the admin sees bob's order too: {everything:#?}"
    );
    let _ = alice_id;

    // Back after the first event: the three after it, with their ids.
    let mut again = Stream::open(gw, Some(&alice), Some(&seen[0].id));
    let rest = again.until(&alices, "shipment.scheduled");
    let ids = |es: &[Event]| es.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&rest), ids(&seen[1..]), "{rest:#?}");

    // An id this feed never gave: the client is told to reload before anything else.
    let mut stale = Stream::open(gw, Some(&alice), Some("0123456789abcdef-7"));
    let first = stale.next().unwrap();
    assert_eq!(first.name, "reset", "{first:?}");
    app.stop();
}

/// A declined card: the stream shows the failed payment and the cancellation with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_streams_the_cancellation_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let (_, carol) = customer(gw, "carol@example.com");
    let mut mine = Stream::open(gw, Some(&carol), None);
    let auth = [("authorization", carol.as_str())];
    let order = order_id(&buy_with(gw, &auth, 0, "carol-order-1", "pm_card_declined"));
    let seen = mine.until(&order, "order.cancelled");
    let failed = seen.iter().find(|e| e.name == "payment.failed").unwrap();
    assert_eq!(failed.data["reason"], "card declined", "{failed:?}");
    let cancelled = seen.last().unwrap();
    assert_eq!(
        cancelled.data["status"], "ORDER_STATUS_CANCELLED",
        "{cancelled:?}"
    );
    assert!(cancelled.data["reason"].is_string(), "{cancelled:?}");
    app.stop();
}

/// A quiet stream carries heartbeats; a client that stops reading is cut off once its writes
/// stall, and its place is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_streams_beat_and_a_client_that_stops_reading_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOPVERSE_GATEWAY__LIVE__HEARTBEAT_SECS", "1"),
        ("SHOPVERSE_GATEWAY__LIVE__WRITE_TIMEOUT_SECS", "1"),
        ("SHOPVERSE_GATEWAY__LIVE__MAX_CLIENTS", "2"),
    ];
    let (app, admin) = with_admin(dir.path(), &env);
    let gw = app.addrs["gateway"];
    let auth = [("authorization", admin.as_str())];

    let mut quiet = Stream::open(gw, Some(&admin), None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while quiet.comments == 0 {
        assert!(Instant::now() < deadline, "no heartbeat in 10 s");
        let _ = quiet.line();
    }
    // Two open: a third is refused until one leaves.
    let slow = Stream::open(gw, Some(&admin), None);
    assert_eq!(slow.status, 200);
    assert_eq!(Stream::open(gw, Some(&admin), None).status, 503);
    drop(quiet);

    // `slow` reads nothing while the catalog changes a few thousand times: its writes stall
    // once the socket buffers fill, and the gateway closes it.
    let products = http(gw, "GET", "/v1/products?pageSize=1", &[], b"").json();
    let p = products["products"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/products/{p}/stock");
    let streams_ended = || {
        let (_, text) = http_get(app.admin, "/metrics");
        text.lines()
            .filter(|l| l.starts_with("shopverse_gateway_requests_total{") && l.contains(PATH))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    until(
        "the quiet stream's end is noticed",
        Duration::from_secs(10),
        || streams_ended() >= 1.0,
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut changes = 0;
    while streams_ended() < 2.0 {
        assert!(
            Instant::now() < deadline,
            "a client that read nothing through {changes} events was never cut off"
        );
        for _ in 0..50 {
            let body = format!(r#"{{"available":{}}}"#, 1000 + changes % 7);
            let r = http(gw, "PUT", &path, &auth, body.as_bytes());
            assert_eq!(r.status, 200, "{}", r.body);
            changes += 1;
        }
    }
    drop(slow);
    eprintln!("cut off after {changes} stock changes");
    let again = Stream::open(gw, Some(&admin), None);
    assert_eq!(again.status, 200, "its place is free again: {}", again.head);
    app.stop();
}

/// A stream lasts as long as the token that opened it: when the token expires the client gets
/// an `expired` event and the stream ends, and the same token opens no new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let app =
        Appliance::start_with_env(dir.path(), &[], &[("SHOPVERSE_GATEWAY__LEEWAY_SECS", "0")]);
    let gw = app.addrs["gateway"];
    let (sub, _) = customer(gw, "dave@example.com");
    let lasts = 4;
    let claims = serde_json::json!({"iss": "shopverse", "aud": "shopverse-api", "sub": sub,
        "roles": ["customer"], "iat": now(), "nbf": now(), "exp": now() + lasts});
    let short = bearer(&sign_with_real_key(dir.path(), &claims));
    let opened = Instant::now();
    let mut stream = Stream::open(gw, Some(&short), None);
    assert_eq!(stream.status, 200, "{}", stream.head);
    let last = stream.next().expect("an event before the end");
    assert_eq!(last.name, "expired", "{last:?}");
    assert!(
        stream.next().is_none(),
        "the stream ends after the expired event"
    );
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(lasts as u64 - 2) && took < Duration::from_secs(14),
        "ended {took:?} after opening; the token lasted {lasts} s and heartbeats come every 15 s"
    );
    assert_eq!(Stream::open(gw, Some(&short), None).status, 401);
    app.stop();
}
