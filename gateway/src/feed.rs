//! The live event feed: every event on the bus from the moment this gateway started, kept in a
//! bounded ring and served as server-sent events (`GET /v1/events/stream`).
//!
//! - **What a caller sees.** An admin sees every event; a customer only the events of their own
//!   orders (the payloads of orders, payments and shipments name the user); an anonymous
//!   caller is refused.
//! - **Resuming.** Each event's id is `<feed>-<seq>`: `feed` names this gateway process's
//!   feed, `seq` counts its events. A client that reconnects with `Last-Event-ID` gets every
//!   event after that one still in the ring. When it cannot (another process's feed, or the
//!   events it missed have left the ring), it gets an `event: reset` first and should reload
//!   what it shows from the REST API: an event is never silently skipped.
//! - **Bounded.** A client holds a position in the ring, not a queue of its own: a client that
//!   reads slower than events arrive falls out of the ring and is cut off, and a write that
//!   does not finish within the write timeout cuts it off too. The number of open streams is
//!   capped.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use shopverse_events::envelope::{self, Envelope};
use shopverse_kit::CancellationToken;
use shopverse_kit::Identity;

use crate::config::LiveConfig;

/// Where the stream is served.
pub const PATH: &str = "/v1/events/stream";

/// One event as the feed serves it.
#[derive(Debug)]
pub struct LiveEvent {
    pub seq: u64,
    /// The user whose order it concerns, when it concerns one.
    pub user_id: Option<String>,
    /// The whole SSE frame: `id`, `event` and one `data` line of JSON.
    pub frame: Bytes,
}

/// Where a client resumes.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// After this sequence number of this feed.
    After(u64),
    /// From the next event, after telling the client to reload (`event: reset`).
    Reset,
    /// From the next event: the client asked for no history.
    Fresh,
}

/// What a client's next read of the ring gives.
pub enum Next {
    Events(Vec<Arc<LiveEvent>>),
    /// The client's position has left the ring: it read too slowly.
    Behind,
}

struct Ring {
    events: VecDeque<Arc<LiveEvent>>,
    /// The sequence number the next event gets (the first is 1).
    next: u64,
}

pub struct Feed {
    /// This process's feed name, the first part of every event id.
    id: String,
    ring: std::sync::Mutex<Ring>,
    /// The last sequence number, for waiting clients.
    last: tokio::sync::watch::Sender<u64>,
    capacity: usize,
    clients: AtomicUsize,
    pub(crate) config: LiveConfig,
    /// Cancelled when the gateway stops: every stream ends.
    closed: CancellationToken,
}

/// An open stream's place in the count of open streams; leaving frees it.
pub struct Slot(Arc<Feed>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Feed {
    pub fn new(config: LiveConfig, closed: CancellationToken) -> Arc<Feed> {
        let id = format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0);
        Arc::new(Feed {
            id,
            ring: std::sync::Mutex::new(Ring {
                events: VecDeque::with_capacity(config.buffer),
                next: 1,
            }),
            last: tokio::sync::watch::Sender::new(0),
            capacity: config.buffer.max(1),
            clients: AtomicUsize::new(0),
            config,
            closed,
        })
    }

    /// A place for one more stream, unless `max_clients` are open.
    pub fn join(self: &Arc<Feed>) -> Option<Slot> {
        let now = self.clients.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(self.clone());
        (now < self.config.max_clients).then_some(slot)
    }

    /// How many streams are open.
    pub fn open(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Where a client that sent `last_event_id` (if any) resumes.
    pub fn resume(&self, last_event_id: Option<&str>) -> Resume {
        let Some(last) = last_event_id.map(str::trim).filter(|s| !s.is_empty()) else {
            return Resume::Fresh;
        };
        let Some((feed, seq)) = last.rsplit_once('-') else {
            return Resume::Reset;
        };
        match (feed == self.id, seq.parse::<u64>()) {
            (true, Ok(seq)) if seq < self.next_seq() => match self.oldest() {
                // Everything after `seq` is still here.
                Some(oldest) if oldest <= seq + 1 => Resume::After(seq),
                None => Resume::After(seq),
                Some(_) => Resume::Reset,
            },
            _ => Resume::Reset,
        }
    }

    fn next_seq(&self) -> u64 {
        self.ring.lock().map(|r| r.next).unwrap_or(1)
    }

    fn oldest(&self) -> Option<u64> {
        self.ring.lock().ok()?.events.front().map(|e| e.seq)
    }

    /// The sequence number of the newest event (0 before the first).
    pub fn newest(&self) -> u64 {
        self.next_seq() - 1
    }

    /// The events after `after`, at most `max`.
    pub fn after(&self, after: u64, max: usize) -> Next {
        let Ok(ring) = self.ring.lock() else {
            return Next::Behind;
        };
        let Some(oldest) = ring.events.front().map(|e| e.seq) else {
            return Next::Events(Vec::new());
        };
        if after + 1 < oldest {
            return Next::Behind;
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Next::Events(ring.events.iter().skip(skip).take(max).cloned().collect())
    }

    /// Waits until there is an event after `after`, or `wait` has passed.
    pub async fn wait(&self, after: u64, wait: Duration) {
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|last| *last > after)).await;
    }

    /// Adds an event from the bus.
    pub fn push(&self, record: &shopverse_events::Record) {
        let Ok(env) = envelope::decode_envelope(&record.payload) else {
            return;
        };
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        let seq = ring.next;
        ring.next += 1;
        let (user_id, data) = describe(&env, record);
        let mut frame = String::with_capacity(data.len() + 96);
        frame.push_str("id: ");
        frame.push_str(&self.id);
        frame.push('-');
        frame.push_str(&seq.to_string());
        frame.push_str("\nevent: ");
        // An event name is one line of its own (a type is `[a-z.]+`; anything else is not
        // written as one).
        let name_ok = !env.r#type.is_empty()
            && env
                .r#type
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
        frame.push_str(if name_ok { &env.r#type } else { "event" });
        frame.push_str("\ndata: ");
        frame.push_str(&data);
        frame.push_str("\n\n");
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(Arc::new(LiveEvent {
            seq,
            user_id,
            frame: Bytes::from(frame),
        }));
        drop(ring);
        self.last.send_replace(seq);
    }

    /// The `event: reset` frame.
    pub fn reset_frame(&self) -> String {
        format!(
            "event: reset\ndata: {{\"reason\":\"events were missed; reload\",\"feed\":\"{}\"}}\n\n",
            self.id
        )
    }
}

/// Whether `who` may see `event`.
pub fn visible(event: &LiveEvent, who: &Identity) -> bool {
    who.is_admin() || event.user_id.as_deref() == Some(who.user_id.as_str())
}

/// The user an event concerns and its JSON line: what the envelope says (type, topic, subject,
/// time, trace id) and the payload's few facts a timeline shows.
fn describe(env: &Envelope, record: &shopverse_events::Record) -> (Option<String>, String) {
    use shopverse_proto::delivery::v1::ShipmentEvent;
    use shopverse_proto::orders::v1::OrderCancelled;
    use shopverse_proto::payments::v1::PaymentEvent;
    let mut data = serde_json::json!({
        "type": env.r#type,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "subject": env.subject,
        "source": env.source,
        "timeMs": record.timestamp_ms,
    });
    if let Some(trace) = env.traceparent.get(3..35) {
        data["traceId"] = trace.into();
    }
    let payload = env.payload.as_slice();
    let kind = env.r#type.split('.').next().unwrap_or("");
    let user = match kind {
        // `OrderEvent` is `OrderCancelled` without its reason: one decode reads both.
        "order" => OrderCancelled::decode(payload).ok().and_then(|c| {
            let o = c.order?;
            data["orderId"] = o.id.clone().into();
            data["status"] = order_status(o.status).into();
            if let Some(t) = &o.total {
                data["amountMinor"] = t.amount_minor.into();
                data["currency"] = t.currency.clone().into();
            }
            if !c.reason.is_empty() {
                data["reason"] = c.reason.into();
            }
            Some(o.user_id)
        }),
        "payment" => PaymentEvent::decode(payload).ok().map(|p| {
            data["orderId"] = p.order_id.into();
            if !p.reason.is_empty() {
                data["reason"] = p.reason.into();
            }
            p.user_id
        }),
        "shipment" => ShipmentEvent::decode(payload)
            .ok()
            .and_then(|s| s.shipment)
            .map(|s| {
                data["orderId"] = s.order_id.into();
                data["carrier"] = s.carrier.into();
                data["trackingNumber"] = s.tracking_number.into();
                data["status"] = shopverse_proto::delivery::v1::ShipmentStatus::try_from(s.status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("SHIPMENT_STATUS_UNSPECIFIED")
                    .into();
                s.user_id
            }),
        _ => None,
    };
    (user.filter(|u| !u.is_empty()), data.to_string())
}

fn order_status(status: i32) -> &'static str {
    use shopverse_proto::orders::v1::OrderStatus;
    OrderStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("ORDER_STATUS_UNSPECIFIED")
}

/// The topics the feed follows: every topic of the system and their dead-letter topics.
fn topics() -> Vec<String> {
    envelope::ALL_TOPICS
        .iter()
        .flat_map(|t| [(*t).to_owned(), envelope::dlq_topic(t)])
        .collect()
}

/// Follows the bus from its current end into `feed`, under a consumer group of this feed's own
/// (set to the end of every partition first, so the feed starts with what happens next).
pub async fn follow(
    feed: Arc<Feed>,
    bus: Arc<dyn shopverse_events::EventBus>,
    shutdown: CancellationToken,
) {
    // One name for every run: a gateway that died without forgetting its group has it set to
    // the end again by the next one, instead of leaving a group behind per run.
    let group = "gateway-live".to_owned();
    let topics = topics();
    for topic in &topics {
        let partitions = bus.partitions(topic).await.unwrap_or(0);
        for p in 0..partitions {
            if let Ok(end) = bus.end_offset(topic, p).await {
                let _ = bus.commit_offset(&group, topic, p, end).await;
            }
        }
    }
    let mut sub = match bus.subscribe(&group, &topics).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the live event feed cannot follow the bus; its streams stay quiet");
            return;
        }
    };
    // The group only follows the bus live (nothing is redelivered to it): its position is
    // committed once a second, so it never holds the log's retention back, and it is forgotten
    // when the gateway stops.
    let mut last: Vec<shopverse_events::Record> = Vec::new();
    let mut committed = tokio::time::Instant::now();
    loop {
        let records = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = bus.forget_group(&group).await;
                return;
            }
            r = sub.poll(256, Duration::from_secs(1)) => r,
        };
        if !last.is_empty() && committed.elapsed() >= Duration::from_secs(1) {
            committed = tokio::time::Instant::now();
            if sub.commit_all(&last).await.is_ok() {
                last.clear();
            }
        }
        match records {
            Ok(records) => {
                for r in records {
                    feed.push(&r);
                    shopverse_events::consumer::keep_last(&mut last, r);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the live event feed could not read the bus; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl crate::gateway::Gateway {
    /// `GET /v1/events/stream`: the caller's events as `text/event-stream` until the client
    /// leaves, falls behind, stops reading, or the gateway stops.
    pub(crate) async fn stream(
        &self,
        session: &mut pingora::prelude::Session,
        ctx: &mut crate::proxy::Ctx,
    ) -> pingora::Result<()> {
        use crate::reply::Reply;
        use http::{Method, StatusCode};
        use tonic::Code;
        ctx.route = crate::proxy::Label::Fixed(PATH);
        let Some(feed) = self.feed.clone() else {
            let reply = Reply::error(
                StatusCode::NOT_FOUND,
                Code::NotFound,
                "the event stream is switched off (gateway.live.enabled)",
                serde_json::json!([]),
            );
            return self.write(session, ctx, reply).await;
        };
        if session.req_header().method != Method::GET {
            let reply = Reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "the event stream is read with GET",
                serde_json::json!([]),
            )
            .with("allow", "GET");
            return self.write(session, ctx, reply).await;
        }
        let header = |name: &str| {
            session
                .req_header()
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
        };
        let ip = self.client_ip(session);
        let admitted = self
            .admit(
                PATH,
                crate::router::Access::Customer,
                header("authorization"),
                ip,
            )
            .await;
        let (identity, rate) = match admitted.map(|a| (a.identity, a.rate)) {
            Ok((Some(identity), rate)) => (identity, rate),
            // A customer route admits only a signed-in caller.
            Ok((None, _)) => {
                let reply = Reply::error(
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthenticated,
                    "sign in to read the event stream",
                    serde_json::json!([]),
                );
                return self.write(session, ctx, reply).await;
            }
            Err(reply) => return self.write(session, ctx, reply).await,
        };
        ctx.identity = Some(identity.clone());
        // Admission took the header apart already; the stream checks the same token again
        // whenever it wakes, so it ends when the token expires or its key is withdrawn.
        let token = header("authorization")
            .and_then(|h| h.get(7..))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        let Some(_slot) = feed.join() else {
            let reply = Reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                "too many event streams are open; retry later",
                serde_json::json!([]),
            )
            .with("retry-after", "5");
            return self.write(session, ctx, reply).await;
        };
        let resume = feed.resume(header("last-event-id"));
        let mut head = pingora::http::ResponseHeader::build(StatusCode::OK, Some(12))?;
        head.insert_header("content-type", "text/event-stream; charset=utf-8")?;
        head.insert_header("cache-control", "no-store")?;
        // Proxies in front (nginx) pass each event on at once.
        head.insert_header("x-accel-buffering", "no")?;
        head.insert_header("x-request-id", ctx.request_id.as_str())?;
        for (k, v) in crate::reply::SECURITY_HEADERS {
            head.insert_header(k, v)?;
        }
        for (k, v) in rate.iter().flat_map(|r| r.pairs()) {
            head.insert_header(k, v)?;
        }
        if let Some(origin) = ctx.cors.as_deref() {
            head.insert_header("access-control-allow-origin", origin)?;
            head.insert_header("vary", "origin")?;
        }
        if !session.is_http2() {
            head.insert_header("transfer-encoding", "chunked")?;
        }
        session.set_keepalive(None);
        session.write_response_header(Box::new(head), false).await?;
        let mut cursor = feed.newest();
        let mut first = String::from("retry: 2000\n\n");
        match resume {
            Resume::After(seq) => cursor = seq,
            Resume::Reset => first.push_str(&feed.reset_frame()),
            Resume::Fresh => {}
        }
        let limit = Duration::from_secs(feed.config.write_timeout_secs);
        let heartbeat = Duration::from_secs(feed.config.heartbeat_secs);
        let mut out = bytes::BytesMut::from(first.as_bytes());
        loop {
            let left = self.token_left(&token).await;
            if left.is_zero() {
                out.extend_from_slice(EXPIRED_FRAME);
            }
            if !out.is_empty() {
                let chunk = out.split().freeze();
                match tokio::time::timeout(limit, session.write_response_body(Some(chunk), false))
                    .await
                {
                    Ok(Ok(())) => {}
                    // Gone, or not reading: its place goes to another client.
                    _ => return Ok(()),
                }
            }
            if left.is_zero() {
                tracing::debug!(user = %identity.user_id, "an event stream's token expired");
                let _ = session.write_response_body(Some(Bytes::new()), true).await;
                return Ok(());
            }
            let events = match feed.after(cursor, 256) {
                Next::Behind => {
                    tracing::info!(user = %identity.user_id, "an event stream fell behind the ring and was closed");
                    return Ok(());
                }
                Next::Events(events) => events,
            };
            match events.last() {
                Some(last) => cursor = last.seq,
                None => {
                    tokio::select! {
                        _ = feed.closed.cancelled() => {
                            let _ = session.write_response_body(Some(Bytes::new()), true).await;
                            return Ok(());
                        }
                        _ = feed.wait(cursor, heartbeat.min(left)) => {}
                    }
                    if feed.newest() == cursor {
                        out.extend_from_slice(b": keep-alive\n\n");
                    }
                    continue;
                }
            }
            for e in events.iter().filter(|e| visible(e, &identity)) {
                out.extend_from_slice(&e.frame);
            }
        }
    }
}

impl crate::gateway::Gateway {
    /// How much longer a stream's `token` admits it: zero once it has expired or its key was
    /// withdrawn.
    async fn token_left(&self, token: &str) -> Duration {
        if let Some(left) = self.verifier.remaining(token) {
            return left;
        }
        // Not among the verified tokens any more (a key was withdrawn, or the cache was
        // emptied when full): verified afresh, or refused.
        match self.verifier.verify(token).await {
            Ok(_) => self.verifier.remaining(token).unwrap_or_default(),
            Err(_) => Duration::ZERO,
        }
    }
}

/// The last frame of a stream whose token has expired: the client signs in again (or
/// refreshes) and resumes from its last event id.
const EXPIRED_FRAME: &[u8] =
    b"event: expired\ndata: {\"reason\":\"the token has expired; refresh it and reconnect\"}\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: i64, user: &str) -> shopverse_events::Record {
        let payment = shopverse_proto::payments::v1::PaymentEvent {
            order_id: format!("o{n}"),
            user_id: user.into(),
            ..Default::default()
        };
        let env = Envelope {
            id: format!("e{n}"),
            r#type: "payment.succeeded".into(),
            subject: format!("o{n}"),
            payload: payment.encode_to_vec(),
            ..Default::default()
        };
        shopverse_events::Record {
            topic: envelope::TOPIC_PAYMENTS.into(),
            partition: 0,
            offset: n,
            key: format!("o{n}"),
            headers: Vec::new(),
            payload: env.encode_to_vec(),
            timestamp_ms: 0,
        }
    }

    fn feed(buffer: usize) -> Arc<Feed> {
        Feed::new(
            LiveConfig {
                buffer,
                ..Default::default()
            },
            CancellationToken::new(),
        )
    }

    fn seqs(next: Next) -> Vec<u64> {
        match next {
            Next::Events(e) => e.iter().map(|e| e.seq).collect(),
            Next::Behind => panic!("behind"),
        }
    }

    #[test]
    fn a_client_resumes_after_its_last_event_while_the_ring_holds_it() {
        let f = feed(4);
        for n in 0..3 {
            f.push(&record(n, "u1"));
        }
        let id = |seq: u64| format!("{}-{seq}", f.id);
        assert_eq!(f.resume(Some(&id(1))), Resume::After(1));
        assert_eq!(seqs(f.after(1, 10)), vec![2, 3]);
        assert_eq!(f.resume(None), Resume::Fresh);
        // Another process's feed, junk, or an id from the future: reload.
        assert_eq!(f.resume(Some("0123-1")), Resume::Reset);
        assert_eq!(f.resume(Some("junk")), Resume::Reset);
        assert_eq!(f.resume(Some(&id(99))), Resume::Reset);
        for n in 3..8 {
            f.push(&record(n, "u1"));
        }
        // Events 2..=4 have left the ring of four: a client after 1 missed some.
        assert_eq!(f.resume(Some(&id(1))), Resume::Reset);
        assert!(matches!(f.after(1, 10), Next::Behind));
        assert_eq!(f.resume(Some(&id(4))), Resume::After(4));
        assert_eq!(seqs(f.after(4, 10)), vec![5, 6, 7, 8]);
    }

    #[test]
    fn a_customer_sees_only_events_of_their_own_orders() {
        let f = feed(8);
        f.push(&record(1, "alice"));
        f.push(&record(2, "bob"));
        let Next::Events(all) = f.after(0, 10) else {
            panic!("behind")
        };
        let who = |user: &str, roles| Identity {
            user_id: user.into(),
            roles,
        };
        use shopverse_kit::identity::Role;
        let alice = who("alice", vec![Role::Customer]);
        let admin = who("root", vec![Role::Admin]);
        let seen: Vec<u64> = all
            .iter()
            .filter(|e| visible(e, &alice))
            .map(|e| e.seq)
            .collect();
        assert_eq!(seen, vec![1]);
        assert_eq!(all.iter().filter(|e| visible(e, &admin)).count(), 2);
        let frame = std::str::from_utf8(&all[0].frame).unwrap();
        assert!(frame.starts_with(&format!(
            "id: {}-1\nevent: payment.succeeded\ndata: {{",
            f.id
        )));
        assert!(frame.ends_with("}\n\n"), "{frame}");
        assert_eq!(frame.matches('\n').count(), 4, "one line each: {frame}");
    }

    #[test]
    fn streams_past_the_cap_are_refused_and_a_closed_one_frees_its_place() {
        let f = Feed::new(
            LiveConfig {
                max_clients: 2,
                ..Default::default()
            },
            CancellationToken::new(),
        );
        let a = f.join().unwrap();
        let _b = f.join().unwrap();
        assert!(f.join().is_none());
        drop(a);
        assert!(f.join().is_some());
    }
}
