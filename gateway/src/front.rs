//! The gateway's HTTP/1 front: pass-through requests are parsed and proxied here, ahead of
//! Pingora's HTTP server.
//!
//! Profiles put most of a plain proxied request's user time in Pingora's HTTP/1 server (see
//! bench/README.md): header maps, with a second map for the original header case, built for
//! every request and response; a session, with its cache, module and subrequest state, built
//! for every request; a future of several kilobytes boxed for every request. For the
//! pass-through routes none of that is needed. This front parses the request head where it
//! lies in the read buffer (`httparse`), applies the [request policy](crate::policy) to it,
//! admits it with the gateway's own code (the route's access rule, the rate limit), writes the
//! upstream request from the parsed head, and relays the response as it arrives, framed as the
//! upstream framed it. A chunked request body is decoded strictly ([`crate::chunked`]) and
//! sent with its length; `Expect: 100-continue` is answered here once the request is admitted.
//!
//! Fresh edge-cache hits are answered here too. Any other request (REST and gRPC routes,
//! HTTP/1.0, upgrades, other expectations, heads `httparse` refuses) is handed to Pingora's
//! HTTP/1 server with the bytes already read put back in front of the stream, and the
//! connection comes back after that request. TLS and HTTP/2 connections are Pingora's
//! throughout.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use http::StatusCode;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::chunked;
use crate::direct;
use crate::policy;
use crate::proxy::{Gateway, Reply, Shared};

/// Request heads longer than this, or with more headers than [`MAX_HEADERS`], are left to
/// Pingora (which applies its own limits).
const MAX_HEAD: usize = 16 * 1024;
/// At most this many request or response headers on this path (a bit per header below).
const MAX_HEADERS: usize = 64;
/// At most this many upstream response headers (there is no Pingora path to fall back to
/// once the request went upstream); more is a 502.
const MAX_RESPONSE_HEADERS: usize = 256;
/// The longest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long a client connection may sit idle between requests (Pingora's default too).
const KEEPALIVE: Duration = Duration::from_secs(60);
const BUF: usize = 8 * 1024;

/// The listening service's application: this front, with Pingora's proxy behind it.
pub struct Front {
    gateway: Arc<Gateway>,
    proxy: Arc<pingora::proxy::HttpProxy<Shared>>,
}

impl Front {
    pub(crate) fn new(gateway: Arc<Gateway>, proxy: pingora::proxy::HttpProxy<Shared>) -> Front {
        Front {
            gateway,
            proxy: Arc::new(proxy),
        }
    }
}

#[async_trait]
impl ServerApp for Front {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // TLS (and anything that is not a plain TCP stream) is Pingora's.
        if stream.get_ssl_digest().is_some() || !stream.as_any().is::<L4Stream>() {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let Ok(io) = stream.into_any().downcast::<L4Stream>() else {
            return None;
        };
        let (mut io, unread) = self.serve(io, shutdown).await?;
        io.rewind(&unread);
        ServerApp::process_new(&self.proxy, io, shutdown).await
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.proxy).await;
    }
}

/// What became of one request.
enum Step {
    /// The head is not complete yet.
    Partial,
    /// Answered; `consumed` bytes of the buffer were this request's, and `carry` holds bytes
    /// read past its body (the next request's).
    Done {
        consumed: usize,
        keep_alive: bool,
        carry: Option<Vec<u8>>,
    },
    /// Not a request for this path: Pingora's server takes the connection.
    HandOff,
}

/// A pass-through request's facts, from one pass over its headers (after
/// [`policy::check_head`] passed them).
#[derive(Default)]
struct Facts<'a> {
    close: bool,
    authorization: Option<&'a str>,
    forwarded_for: Option<&'a str>,
    request_id: Option<&'a str>,
    if_none_match: Option<&'a str>,
    /// An `Origin` header (CORS, which Pingora's path answers).
    origin: bool,
    /// `Cache-Control: no-cache` or `no-store`.
    no_cache: bool,
    /// `Expect: 100-continue`: the front answers it itself (and drops the header).
    expect_continue: bool,
    /// Headers not forwarded upstream, a bit each.
    dropped: u64,
}

/// Why the request head is not for this path.
struct NotOurs;

/// Reads the headers once: connection handling, what the gateway needs, and which ones stay
/// behind ([`policy::stays_behind`], the ones `Connection` names, and a `Content-Length` the
/// chunked framing overrides).
fn facts<'a>(
    headers: &[httparse::Header<'a>],
    framing: &policy::Framing,
) -> Result<Facts<'a>, NotOurs> {
    let mut f = Facts::default();
    let mut nominated = false;
    for (i, h) in headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            // The one expectation HTTP/1.1 defines is answered here; any other is Pingora's
            // (417).
            6 if is("expect") => {
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    return Err(NotOurs);
                }
                f.expect_continue = true;
                f.dropped |= 1 << i;
            }
            6 if is("origin") => f.origin = true,
            7 if is("upgrade") => return Err(NotOurs),
            10 if is("connection") => {
                for token in h.value.split(|b| *b == b',') {
                    if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                        f.close = true;
                    }
                }
                nominated |= policy::nominated(h.value).next().is_some();
            }
            12 if is("x-request-id") => {
                f.request_id = visible(h.value).filter(|v| !v.is_empty() && v.len() <= 128);
            }
            13 if is("cache-control") => {
                f.no_cache |= visible(h.value)
                    .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"));
            }
            13 if is("if-none-match") => f.if_none_match = visible(h.value),
            13 if is("authorization") => {
                f.authorization = Some(visible(h.value).ok_or(NotOurs)?);
            }
            14 if is("content-length") && framing.chunked => f.dropped |= 1 << i,
            15 if is("x-forwarded-for") => f.forwarded_for = visible(h.value),
            _ => {}
        }
        if policy::stays_behind(name) {
            f.dropped |= 1 << i;
        }
    }
    if nominated {
        // Rare: the headers a `Connection` names stay behind too (never `Host`).
        for c in headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        {
            for token in policy::nominated(c.value) {
                for (i, h) in headers.iter().enumerate() {
                    if h.name.as_bytes().eq_ignore_ascii_case(token) {
                        f.dropped |= 1 << i;
                    }
                }
            }
        }
    }
    f.close |= framing.close_after;
    Ok(f)
}

/// A header value as text, when it is visible ASCII (what `HeaderValue::to_str` accepts).
fn visible(v: &[u8]) -> Option<&str> {
    if v.iter().all(|&b| b == b'\t' || (32..127).contains(&b)) {
        std::str::from_utf8(v).ok()
    } else {
        None
    }
}

/// Reusable buffers and timers of one client connection.
struct Buffers {
    /// The request head as sent upstream, then the response head as sent to the client.
    out: Vec<u8>,
    /// What the upstream sent.
    up: BytesMut,
    /// Waiting for the client's next request.
    idle: Deadline,
    /// Waiting for the upstream.
    upstream: Deadline,
}

/// The time limit elapsed.
struct Elapsed;

/// A time limit that costs little to move later, as every request does: the timer is set
/// again only when it fires before the limit (which moved since), or the limit moves before
/// it. A timer per request cost more than parsing the request.
struct Deadline {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// When the timer fires.
    armed: tokio::time::Instant,
    /// The limit.
    at: tokio::time::Instant,
}

impl Deadline {
    fn new() -> Deadline {
        // Not registered with the runtime's timers until first polled.
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(far)),
            armed: far,
            at: far,
        }
    }

    /// `fut`, unless it takes longer than `limit`.
    async fn within<F: std::future::Future>(
        &mut self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, Elapsed> {
        self.at = tokio::time::Instant::now() + limit;
        if self.at < self.armed {
            self.armed = self.at;
            self.sleep.as_mut().reset(self.at);
        }
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(v) = fut.as_mut().poll(cx) {
                return std::task::Poll::Ready(Ok(v));
            }
            while self.sleep.as_mut().poll(cx).is_ready() {
                if self.armed >= self.at {
                    return std::task::Poll::Ready(Err(Elapsed));
                }
                self.armed = self.at;
                self.sleep.as_mut().reset(self.at);
            }
            std::task::Poll::Pending
        })
        .await
    }
}

impl Front {
    /// Serves requests on a plain TCP connection until it closes (`None`) or a request needs
    /// Pingora's server (`Some`: the stream, and the bytes read from it but not used).
    async fn serve(
        &self,
        mut io: Box<L4Stream>,
        shutdown: &ShutdownWatch,
    ) -> Option<(Box<L4Stream>, BytesMut)> {
        let peer = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let mut watch = shutdown.clone();
        let mut buf = BytesMut::with_capacity(BUF);
        let mut bufs = Buffers {
            out: Vec::with_capacity(1024),
            up: BytesMut::with_capacity(BUF),
            idle: Deadline::new(),
            upstream: Deadline::new(),
        };
        // When the head being read began to arrive: it must be complete within the client
        // timeout of that, so a client trickling a head cannot hold the connection for long.
        let mut head_since: Option<Instant> = None;
        // Whether this connection has had an answer yet, and when the server began to stop if
        // it had not: a client that connected just before the stop is still answered, once.
        let (mut answered, mut stopping_since) = (false, None::<Instant>);
        loop {
            if !buf.is_empty() {
                match self.one(&mut io, &buf, peer, shutdown, &mut bufs).await {
                    Step::Partial if buf.len() < MAX_HEAD => {}
                    // HTTP/2 with prior knowledge (h2c): the connection is Pingora's.
                    Step::HandOff if buf.starts_with(b"PRI * HTTP/2") => return Some((io, buf)),
                    Step::Partial | Step::HandOff => {
                        // This request is Pingora's; the connection comes back after it.
                        io = self.by_pingora(io, buf.split(), shutdown).await?;
                        (head_since, answered) = (None, true);
                        continue;
                    }
                    Step::Done {
                        consumed,
                        keep_alive,
                        carry,
                    } => {
                        buf.advance(consumed);
                        if let Some(carry) = carry {
                            buf.extend_from_slice(&carry);
                        }
                        (head_since, answered) = (None, true);
                        if !keep_alive {
                            let _ = io.shutdown().await;
                            return None;
                        }
                        if !buf.is_empty() {
                            // A pipelined request is already here.
                            continue;
                        }
                    }
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(BUF);
            }
            // A head must be complete within the client timeout of its first bytes. A
            // connection with no request yet when the server began to stop gets as long from
            // then for its first one.
            let since = if buf.is_empty() {
                stopping_since
            } else {
                Some(*head_since.get_or_insert_with(Instant::now))
            };
            let limit = match since {
                None => KEEPALIVE,
                Some(since) => {
                    let total =
                        Duration::from_millis(self.gateway.config.load().client_header_timeout_ms);
                    match total.checked_sub(since.elapsed()) {
                        Some(left) if !left.is_zero() => left,
                        _ => return self.head_too_slow(&mut io, &buf, &mut bufs).await,
                    }
                }
            };
            let read = tokio::select! {
                r = bufs.idle.within(limit, io.read_buf(&mut buf)) => r,
                _ = watch.changed(), if buf.is_empty() && stopping_since.is_none() => {
                    // Idle between requests when the server stops: close now. A connection
                    // that has not sent its first request yet was accepted to be answered.
                    if answered {
                        return None;
                    }
                    stopping_since = Some(Instant::now());
                    continue;
                }
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                // A head begun and not finished in time (slowloris): 408, then close.
                Err(Elapsed) if !buf.is_empty() => {
                    return self.head_too_slow(&mut io, &buf, &mut bufs).await;
                }
                // Closed, failed, or idle too long.
                _ => return None,
            }
        }
    }

    /// A request head that did not arrive within `client_header_timeout_ms` of its first
    /// byte: 408, and the connection closes.
    async fn head_too_slow(
        &self,
        io: &mut L4Stream,
        buf: &[u8],
        bufs: &mut Buffers,
    ) -> Option<(Box<L4Stream>, BytesMut)> {
        if !buf.is_empty() {
            let refusal = policy::Refusal {
                status: StatusCode::REQUEST_TIMEOUT,
                reason: "the request head did not arrive in time",
            };
            let _ = self.refuse(io, refusal, "-", Instant::now(), bufs).await;
        }
        let _ = io.shutdown().await;
        None
    }

    /// Lets Pingora's server answer one request, from the bytes read so far (`unread`) on;
    /// the connection again when it can take another request.
    async fn by_pingora(
        &self,
        mut io: Box<L4Stream>,
        unread: BytesMut,
        shutdown: &ShutdownWatch,
    ) -> Option<Box<L4Stream>> {
        io.rewind(&unread);
        let mut session = ServerSession::new_http1(io);
        session.set_keepalive((!*shutdown.borrow()).then_some(KEEPALIVE.as_secs()));
        let reused = HttpServerApp::process_new_http(&self.proxy, session, shutdown).await?;
        let (stream, _) = reused.consume();
        stream.into_any().downcast::<L4Stream>().ok()
    }

    /// One request from the head at the start of `buf`.
    async fn one(
        &self,
        io: &mut L4Stream,
        buf: &[u8],
        peer: Option<IpAddr>,
        shutdown: &ShutdownWatch,
        bufs: &mut Buffers,
    ) -> Step {
        let start = Instant::now();
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Step::Partial,
            // Malformed, too many headers, or not HTTP/1 (an HTTP/2 preface): Pingora answers.
            Err(_) => return Step::HandOff,
        };
        // HTTP/1.0 is Pingora's (which applies the same policy).
        let (Some(method), Some(raw_target), Some(1)) = (req.method, req.path, req.version) else {
            return Step::HandOff;
        };
        // The one policy, before anything else: framing and limits, then the target; then
        // the route, on the normalised path. One look at the configuration for all of it.
        let config = self.gateway.config.load();
        let limits = direct::Limits {
            upstream: Duration::from_millis(config.request_timeout_ms),
            client_body: Duration::from_millis(config.client_body_timeout_ms),
        };
        let head_limits = policy::HeadLimits {
            max_headers: config.max_headers,
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
        };
        let checked = policy::check_head(
            true,
            req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
            head_limits,
        )
        .and_then(|framing| Ok((framing, policy::target(method, raw_target)?)));
        let (framing, target) = match checked {
            Ok(ok) => ok,
            Err(refusal) => {
                drop(config);
                return self.refuse(io, refusal, method, start, bufs).await;
            }
        };
        let path: &str = &target.path;
        let pass = config
            .passthrough_for(path)
            .map(|p| (p.label(), p.target(), p.access));
        drop(config);
        let Some((label, upstream, access)) = pass else {
            if framing.chunked || framing.content_length.is_some_and(|n| n > 0) {
                // REST calls with a body are Pingora's.
                return Step::HandOff;
            }
            return self
                .cache_hit(
                    io,
                    (method, &target, head_len, start),
                    req.headers,
                    peer,
                    shutdown,
                    bufs,
                )
                .await;
        };
        let Ok(facts) = facts(req.headers, &framing) else {
            return Step::HandOff;
        };
        let request_id = match facts.request_id {
            Some(id) => id.to_owned(),
            None => self.gateway.request_ids.next(),
        };
        let keep_alive = !facts.close && !*shutdown.borrow();
        let ip = self.gateway.client_ip_of(peer, facts.forwarded_for);
        let admitted = self
            .gateway
            .admit(path, access, facts.authorization, ip)
            .await;
        let (identity, rate_headers) = match admitted {
            Ok(a) => a,
            Err(reply) => {
                // The request body, if any, was not read: the connection cannot go on.
                let keep =
                    keep_alive && !framing.chunked && framing.content_length.unwrap_or(0) == 0;
                return match self
                    .answer(io, reply, &label, method, &request_id, keep, start, bufs)
                    .await
                {
                    Step::Done { keep_alive, .. } => Step::Done {
                        consumed: head_len,
                        keep_alive,
                        carry: None,
                    },
                    other => other,
                };
            }
        };
        // The client waits for a go-ahead before it sends its body (RFC 9110 10.1.1): given
        // now that the request is admitted, unless some of the body is already here.
        let wants_body = framing.chunked || framing.content_length.is_some_and(|n| n > 0);
        if facts.expect_continue
            && wants_body
            && buf.len() == head_len
            && (io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
                || io.flush().await.is_err())
        {
            return Step::Done {
                consumed: 0,
                keep_alive: false,
                carry: None,
            };
        }
        // A chunked body is read whole and checked before anything goes upstream, and sent
        // with its length (as nginx does by default): the upstream never sees a request cut
        // short by a framing error.
        let mut carry = None;
        let (body_len, buffered_body, body_from_buf) = if framing.chunked {
            let max = head_limits.max_body_bytes;
            match read_chunked(io, &buf[head_len..], max, limits.client_body).await {
                Ok(body) => {
                    carry = Some(body.carry);
                    (
                        body.data.len() as u64,
                        Cow::Owned(body.data),
                        body.from_buffer,
                    )
                }
                Err(Some(refusal)) => return self.refuse(io, refusal, method, start, bufs).await,
                Err(None) => {
                    return Step::Done {
                        consumed: 0,
                        keep_alive: false,
                        carry: None,
                    };
                }
            }
        } else {
            let n = framing.content_length.unwrap_or(0);
            let in_buf = usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(buf.len() - head_len);
            (n, Cow::Borrowed(&buf[head_len..head_len + in_buf]), in_buf)
        };
        let exchange = Exchange {
            label: &label,
            method,
            target: &target,
            headers: req.headers,
            facts: &facts,
            request_id: &request_id,
            body_len,
            buffered_body: &buffered_body,
            length_header: framing.chunked,
            limits,
            keep_alive,
        };
        let outcome = match upstream.resolve().await {
            Err(e) => Err(Reply::error(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                &format!("upstream address: {e}"),
                serde_json::json!([]),
            )),
            Ok(addr) => {
                exchange
                    .run(io, addr, identity.as_deref(), &rate_headers, bufs)
                    .await
            }
        };
        match outcome {
            Ok(done) => {
                let status = StatusCode::from_u16(done.status).unwrap_or(StatusCode::BAD_GATEWAY);
                self.gateway.record(&label, method, status.as_str(), start);
                Step::Done {
                    consumed: head_len + body_from_buf,
                    keep_alive: keep_alive && done.keep_alive,
                    carry,
                }
            }
            Err(reply) => {
                // A body not read to its end leaves the connection out of step.
                let whole = framing.chunked || buffered_body.len() as u64 == body_len;
                let step = self
                    .answer(
                        io,
                        reply,
                        &label,
                        method,
                        &request_id,
                        keep_alive && whole,
                        start,
                        bufs,
                    )
                    .await;
                match step {
                    Step::Done { keep_alive, .. } => Step::Done {
                        consumed: head_len + body_from_buf,
                        keep_alive,
                        carry,
                    },
                    other => other,
                }
            }
        }
    }

    /// Writes the gateway's own answer to a request; the request's bytes are the caller's to
    /// count.
    #[allow(clippy::too_many_arguments)]
    async fn answer(
        &self,
        io: &mut L4Stream,
        reply: Reply,
        label: &str,
        method: &str,
        request_id: &str,
        keep_alive: bool,
        start: Instant,
        bufs: &mut Buffers,
    ) -> Step {
        let status = reply.status;
        let keep_alive = keep_alive && !reply.closes();
        let written = write_reply(
            io,
            reply,
            request_id,
            keep_alive,
            method == "HEAD",
            &mut bufs.out,
        )
        .await;
        self.gateway.record(label, method, status.as_str(), start);
        Step::Done {
            consumed: 0,
            keep_alive: keep_alive && written.is_ok(),
            carry: None,
        }
    }

    /// Answers a request the policy refused, and closes the connection.
    async fn refuse(
        &self,
        io: &mut L4Stream,
        refusal: policy::Refusal,
        method: &str,
        start: Instant,
        bufs: &mut Buffers,
    ) -> Step {
        let id = self.gateway.request_ids.next();
        self.answer(
            io,
            Reply::refused(refusal),
            "refused",
            method,
            &id,
            false,
            start,
            bufs,
        )
        .await
    }
}

/// A chunked request body, read and decoded.
struct ChunkedBody {
    data: Vec<u8>,
    /// Bytes of it that were in the connection's read buffer.
    from_buffer: usize,
    /// Bytes read from the client past the body's end: the next request's.
    carry: Vec<u8>,
}

/// Reads a chunked body: `buffered` first (what followed the head in the read buffer), then
/// from the client, within `timeout` in all and at most `max` bytes of data. `Err(Some)`: a
/// refusal for the client (400 for bad framing, 413, 408); `Err(None)`: the client went away.
async fn read_chunked(
    io: &mut L4Stream,
    buffered: &[u8],
    max: usize,
    timeout: Duration,
) -> Result<ChunkedBody, Option<policy::Refusal>> {
    let too_large = || policy::Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        reason: "the request body is too large",
    };
    let bad = |e: chunked::ChunkError| policy::Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: e.reason(),
    };
    let mut d = chunked::Decoder::default();
    let mut data = Vec::new();
    if let Some(n) = d.decode(buffered, &mut data).map_err(|e| Some(bad(e)))? {
        return if data.len() > max {
            Err(Some(too_large()))
        } else {
            Ok(ChunkedBody {
                data,
                from_buffer: n,
                carry: Vec::new(),
            })
        };
    }
    let deadline = Instant::now() + timeout;
    let mut chunk = vec![0u8; BUF];
    loop {
        if data.len() > max {
            return Err(Some(too_large()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match pingora::time::timeout(left, io.read(&mut chunk)).await {
            Err(_) => {
                return Err(Some(policy::Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    reason: "the request body did not arrive in time",
                }));
            }
            Ok(Ok(0)) | Ok(Err(_)) => return Err(None),
            Ok(Ok(n)) => n,
        };
        if let Some(end) = d.decode(&chunk[..n], &mut data).map_err(|e| Some(bad(e)))? {
            if data.len() > max {
                return Err(Some(too_large()));
            }
            return Ok(ChunkedBody {
                data,
                from_buffer: buffered.len(),
                carry: chunk[end..n].to_vec(),
            });
        }
    }
}

impl Front {
    /// A fresh edge-cache hit, answered here: a public GET or HEAD of a cached route, from a
    /// caller that is not signed in and sent no `Origin`. Anything else, a miss included, is
    /// left to Pingora's path, before it counts against a rate limit.
    async fn cache_hit(
        &self,
        io: &mut L4Stream,
        (method, target, head_len, start): (&str, &policy::Target<'_>, usize, Instant),
        headers: &[httparse::Header<'_>],
        peer: Option<IpAddr>,
        shutdown: &ShutdownWatch,
        bufs: &mut Buffers,
    ) -> Step {
        let Some(cache) = &self.gateway.cache else {
            return Step::HandOff;
        };
        let verb = match method {
            "GET" => http::Method::GET,
            "HEAD" => http::Method::HEAD,
            _ => return Step::HandOff,
        };
        let Ok(facts) = facts(headers, &policy::Framing::default()) else {
            return Step::HandOff;
        };
        if facts.authorization.is_some() || facts.origin || facts.no_cache {
            return Step::HandOff;
        }
        let (path, query) = (&*target.path, target.query.unwrap_or(""));
        let Ok(m) = self.gateway.router.find(&verb, path) else {
            return Step::HandOff;
        };
        if !self.gateway.cacheable(&verb, m.route) {
            return Step::HandOff;
        }
        let mut key = String::with_capacity(path.len() + 1 + query.len());
        key.push_str(path);
        key.push('?');
        key.push_str(query);
        let now_ms = self.gateway.clock.now_ms();
        let Ok(Some((entry, shopverse_edge_cache::Freshness::Fresh))) = cache.get(&key, now_ms)
        else {
            return Step::HandOff;
        };
        let request_id = match facts.request_id {
            Some(id) => id.to_owned(),
            None => self.gateway.request_ids.next(),
        };
        let ip = self.gateway.client_ip_of(peer, facts.forwarded_for);
        let keep_alive = !facts.close && !*shutdown.borrow();
        let head_only = verb == http::Method::HEAD;
        let reply = match self
            .gateway
            .admit(path, crate::router::Access::Public, None, ip)
            .await
        {
            Ok((_, limit_headers))
                if !crate::proxy::etag_matches(
                    facts.if_none_match,
                    entry.etag.as_deref().unwrap_or(""),
                ) =>
            {
                // The common answer, written straight from the entry.
                let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
                let hit = Hit {
                    status,
                    entry: &entry,
                    max_age: entry.max_age_secs(now_ms),
                    request_id: &request_id,
                    limit_headers: &limit_headers,
                    keep_alive,
                };
                let written = hit.write(io, head_only, &mut bufs.out).await;
                self.gateway
                    .record(&m.route.template, method, status.as_str(), start);
                return Step::Done {
                    consumed: head_len,
                    keep_alive: keep_alive && written.is_ok(),
                    carry: None,
                };
            }
            Ok((_, limit_headers)) => {
                let mut reply = self
                    .gateway
                    .reply_from_entry(facts.if_none_match, &entry, "HIT");
                reply.headers.extend(limit_headers);
                reply
            }
            Err(refused) => refused,
        };
        let status = reply.status;
        let written =
            write_reply(io, reply, &request_id, keep_alive, head_only, &mut bufs.out).await;
        self.gateway
            .record(&m.route.template, method, status.as_str(), start);
        Step::Done {
            consumed: head_len,
            keep_alive: keep_alive && written.is_ok(),
            carry: None,
        }
    }
}

/// One request on its way upstream.
struct Exchange<'a> {
    /// The route, for logs.
    label: &'a str,
    method: &'a str,
    /// Forwarded in origin form, its path normalised.
    target: &'a policy::Target<'a>,
    headers: &'a [httparse::Header<'a>],
    facts: &'a Facts<'a>,
    request_id: &'a str,
    body_len: u64,
    /// The body bytes at hand: what followed the head in the client's read buffer, or a
    /// whole decoded chunked body.
    buffered_body: &'a [u8],
    /// Send a `Content-Length` of `body_len` (for a body that came chunked).
    length_header: bool,
    limits: direct::Limits,
    keep_alive: bool,
}

/// How a relayed request ended.
struct Relayed {
    status: u16,
    /// Whether the client connection can take another request.
    keep_alive: bool,
}

/// How the response body is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked(Chunks),
    /// Until the upstream closes; re-framed as chunked for the client.
    Close,
}

impl Exchange<'_> {
    /// Sends the request and relays the answer. `Err` is a reply for the client, when nothing
    /// was sent to it yet; a failure after that closes the connection (`keep_alive: false`).
    async fn run(
        &self,
        io: &mut L4Stream,
        addr: SocketAddr,
        identity: Option<&shopverse_kit::Identity>,
        rate_headers: &[(&'static str, String)],
        bufs: &mut Buffers,
    ) -> Result<Relayed, Reply> {
        self.request_head(identity, &mut bufs.out);
        let in_buffer = usize::try_from(self.body_len)
            .unwrap_or(usize::MAX)
            .min(self.buffered_body.len());
        bufs.out.extend_from_slice(&self.buffered_body[..in_buffer]);
        let rest = self.body_len - in_buffer as u64;

        let (mut up, reused) = direct::pooled_or_dial(addr, self.limits.upstream)
            .await
            .map_err(|e| Reply::for_failure(e, self.label))?;
        let head_len = match self.attempt(&mut up, addr, rest, io, bufs).await {
            Ok(n) => n,
            // A pooled connection the upstream closed meanwhile: once more on a new one, when
            // the request had no body to read again.
            // Only a method a client may repeat on its own (RFC 9110 9.2.2).
            Err(direct::Failure::Unavailable { .. })
                if reused && self.body_len == 0 && policy::idempotent(self.method) =>
            {
                up = direct::dial(addr, self.limits.upstream)
                    .await
                    .map_err(|e| Reply::for_failure(e, self.label))?;
                self.attempt(&mut up, addr, 0, io, bufs)
                    .await
                    .map_err(|e| Reply::for_failure(e, self.label))?
            }
            Err(e) => return Err(Reply::for_failure(e, self.label)),
        };

        // The response head, for the client.
        let head = &bufs.up[..head_len];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut many;
        let mut resp = httparse::Response::new(&mut headers);
        let resp = match resp.parse(head) {
            Ok(httparse::Status::Complete(_)) => resp,
            // Rare: a second try with room for more, rather than a refusal.
            Err(httparse::Error::TooManyHeaders) => {
                many = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                let mut resp = httparse::Response::new(&mut many);
                match resp.parse(head) {
                    Ok(httparse::Status::Complete(_)) => resp,
                    _ => return Err(Reply::for_failure(malformed(addr), self.label)),
                }
            }
            _ => return Err(Reply::for_failure(malformed(addr), self.label)),
        };
        let status = resp.code.unwrap_or(502);
        // First the headers that decide the framing and the connection.
        let mut upstream_close = resp.version == Some(0);
        let mut nominated: Vec<&[u8]> = Vec::new();
        let (mut length, mut encoded, mut chunked) = (None, false, false);
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if name.len() == 10 && name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        upstream_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        upstream_close &= resp.version != Some(0);
                    } else if !token.is_empty() {
                        nominated.push(token);
                    }
                }
            } else if name.len() == 17 && name.eq_ignore_ascii_case(b"transfer-encoding") {
                encoded = true;
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.len() == 14 && name.eq_ignore_ascii_case(b"content-length") {
                let n = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| Reply::for_failure(malformed(addr), self.label))?;
                if length.is_some_and(|m| m != n) {
                    return Err(Reply::for_failure(malformed(addr), self.label));
                }
                length = Some(n);
            }
        }
        if encoded && !chunked {
            // A coding we cannot frame (RFC 9112 6.3: the body would run to the close, and
            // relaying the field would tell the client otherwise).
            return Err(Reply::for_failure(malformed(addr), self.label));
        }
        let mut framing = if self.method == "HEAD" || matches!(status, 204 | 304) {
            Framing::None
        } else if chunked {
            Framing::Chunked(Chunks::default())
        } else {
            match length {
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        let out = &mut bufs.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(status));
        out.push(b' ');
        out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
            let hop = match name.len() {
                7 => is("upgrade") || is("trailer"),
                10 => is("connection") || is("keep-alive"),
                // With a transfer coding, a length says nothing (RFC 9112 6.3).
                14 => encoded && is("content-length"),
                16 => is("proxy-connection"),
                18 => is("proxy-authenticate"),
                _ => false,
            };
            let named = !nominated.is_empty()
                && nominated.iter().any(|n| name.eq_ignore_ascii_case(n))
                && !is("transfer-encoding");
            if !hop && !named {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        for (name, value) in rate_headers {
            push_header(out, name, value);
        }
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if matches!(framing, Framing::Close) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            upstream_close = true;
        }
        out.extend_from_slice(b"\r\n");
        bufs.up.advance(head_len);

        let relayed = Relayed {
            status,
            keep_alive: self.keep_alive,
        };
        let body = relay_body(
            &mut up,
            io,
            &mut framing,
            out,
            &mut bufs.up,
            (&mut bufs.upstream, self.limits.upstream),
        )
        .await;
        match body {
            Ok(clean) => {
                if clean && !upstream_close {
                    direct::release(addr, up);
                }
                Ok(relayed)
            }
            Err(e) => {
                tracing::warn!(upstream = %addr, "pass-through response cut short: {e}");
                Ok(Relayed {
                    keep_alive: false,
                    ..relayed
                })
            }
        }
    }

    /// One try of [`send`] on `up`, within the upstream time limit.
    async fn attempt(
        &self,
        up: &mut Stream,
        addr: SocketAddr,
        rest: u64,
        io: &mut L4Stream,
        bufs: &mut Buffers,
    ) -> Result<usize, direct::Failure> {
        let sending = send(
            up,
            addr,
            &bufs.out,
            rest,
            io,
            self.limits.client_body,
            &mut bufs.up,
        );
        bufs.upstream
            .within(self.limits.upstream, sending)
            .await
            .unwrap_or(Err(direct::Failure::Timeout { addr }))
    }

    /// The request line and headers as the upstream gets them.
    fn request_head(&self, identity: Option<&shopverse_kit::Identity>, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.path.as_bytes());
        if let Some(q) = self.target.query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (i, h) in self.headers.iter().enumerate() {
            if self.facts.dropped & (1 << i) == 0 {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        push_header(out, "x-request-id", self.request_id);
        if self.length_header {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, self.body_len);
            out.extend_from_slice(b"\r\n");
        }
        if let Some(id) = identity {
            push_header(out, shopverse_kit::identity::USER_HEADER, &id.user_id);
            out.extend_from_slice(shopverse_kit::identity::ROLES_HEADER.as_bytes());
            out.extend_from_slice(b": ");
            for (i, role) in id.roles.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(role.as_str().as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes the request (`head`, with the body bytes the client already sent, then `rest` more
/// read from the client) and reads up to the end of the final response head into `up`.
/// Returns the head's length.
async fn send(
    upstream: &mut Stream,
    addr: SocketAddr,
    head: &[u8],
    mut rest: u64,
    client: &mut L4Stream,
    client_body: Duration,
    up: &mut BytesMut,
) -> Result<usize, direct::Failure> {
    let io = |e: std::io::Error| direct::Failure::Unavailable {
        addr,
        source: pingora::Error::because(pingora::ErrorType::WriteError, "upstream", e),
    };
    upstream.write_all(head).await.map_err(io)?;
    if rest > 0 {
        let mut chunk = vec![0u8; BUF];
        let deadline = Instant::now() + client_body;
        while rest > 0 {
            let want = usize::try_from(rest).unwrap_or(usize::MAX).min(chunk.len());
            let left = deadline.saturating_duration_since(Instant::now());
            let n = match pingora::time::timeout(left, client.read(&mut chunk[..want])).await {
                Err(_) => return Err(direct::Failure::ClientTimeout),
                Ok(Ok(0)) => {
                    return Err(direct::Failure::Client(pingora::Error::explain(
                        pingora::ErrorType::ReadError,
                        "the client closed during the request body",
                    )));
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    return Err(direct::Failure::Client(pingora::Error::because(
                        pingora::ErrorType::ReadError,
                        "request body",
                        e,
                    )));
                }
            };
            upstream.write_all(&chunk[..n]).await.map_err(io)?;
            rest -= n as u64;
        }
    }
    upstream.flush().await.map_err(io)?;
    up.clear();
    loop {
        if up.capacity() - up.len() < 1024 {
            up.reserve(BUF);
        }
        let n = upstream.read_buf(up).await.map_err(io)?;
        if n == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        // Only where the head ends, and its status: the caller parses it, once.
        while let Some(len) = head_end(up) {
            match status_of(up) {
                // Interim answers (100 Continue and the like) are the upstream's business.
                Some(c) if (100..200).contains(&c) && c != 101 => up.advance(len),
                Some(101) => return Err(io(std::io::ErrorKind::InvalidData.into())),
                _ => return Ok(len),
            }
        }
        if up.len() >= MAX_RESPONSE_HEAD {
            return Err(io(std::io::ErrorKind::InvalidData.into()));
        }
    }
}

/// The length of the head at the start of `buf`, up to its empty line, if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = buf[from..].iter().position(|&b| b == b'\n') {
        let lf = from + p;
        match buf.get(lf + 1..lf + 3) {
            Some([b'\r', b'\n']) => return Some(lf + 3),
            Some([b'\n', _]) => return Some(lf + 2),
            None if buf.get(lf + 1) == Some(&b'\n') => return Some(lf + 2),
            _ => from = lf + 1,
        }
    }
    None
}

/// The status code of a response head (`HTTP/1.x NNN`), if it has one.
fn status_of(head: &[u8]) -> Option<u16> {
    match head.get(..12)? {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', _, b' ', d @ ..]
            if d.iter().all(u8::is_ascii_digit) =>
        {
            Some(d.iter().fold(0, |n, b| n * 10 + u16::from(b - b'0')))
        }
        _ => None,
    }
}

/// Relays the response body after the head in `out` (already built), starting with what is
/// in `up`. `Ok(true)`: the body ended exactly, so the upstream connection can be reused.
async fn relay_body(
    upstream: &mut Stream,
    client: &mut L4Stream,
    framing: &mut Framing,
    out: &mut Vec<u8>,
    up: &mut BytesMut,
    (deadline, timeout): (&mut Deadline, Duration),
) -> std::io::Result<bool> {
    loop {
        // Take what belongs to this response from `up`; `done` when the body is complete.
        let (take, done) = match framing {
            Framing::None => (0, true),
            Framing::Length(left) => {
                let take = usize::try_from(*left).unwrap_or(usize::MAX).min(up.len());
                *left -= take as u64;
                (take, *left == 0)
            }
            Framing::Chunked(chunks) => match chunks.scan(up)? {
                Some(end) => (end, true),
                None => (up.len(), false),
            },
            Framing::Close => (up.len(), false),
        };
        if matches!(framing, Framing::Close) {
            if take > 0 {
                push_hex(out, take);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&up[..take]);
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(&up[..take]);
        }
        up.advance(take);
        if !out.is_empty() {
            client.write_all(out).await?;
            client.flush().await?;
            out.clear();
        }
        if done {
            // Bytes past the end: the upstream is out of step; do not reuse it.
            return Ok(up.is_empty());
        }
        up.clear();
        if up.capacity() < BUF {
            up.reserve(BUF);
        }
        let n = deadline
            .within(timeout, upstream.read_buf(up))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            if matches!(framing, Framing::Close) {
                client.write_all(b"0\r\n\r\n").await?;
                client.flush().await?;
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Finds the end of a chunked body (RFC 9112 7.1) across the reads it arrives in.
#[derive(Default, Debug)]
struct Chunks {
    state: ChunkState,
    /// Bytes left in the current chunk's data.
    left: u64,
}

#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
enum ChunkState {
    /// In the chunk-size digits.
    #[default]
    Size,
    /// In extensions, up to the line's LF.
    SizeLine,
    Data,
    /// The CR LF after a chunk's data.
    DataEnd,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// In a trailer line, up to its LF.
    TrailerLine,
    /// The final empty line's LF.
    LastLf,
}

impl Chunks {
    /// How far into `data` the body ends, or `None` if it goes on past it.
    fn scan(&mut self, data: &[u8]) -> std::io::Result<Option<usize>> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked framing");
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from((b as char).to_digit(16).ok_or_else(bad)?);
                        self.left = self
                            .left
                            .checked_mul(16)
                            .and_then(|v| v.checked_add(digit))
                            .ok_or_else(bad)?;
                    }
                    b';' | b' ' | b'\t' | b'\r' => self.state = ChunkState::SizeLine,
                    b'\n' => self.state = self.after_size(),
                    _ => return Err(bad()),
                },
                ChunkState::SizeLine => {
                    if b == b'\n' {
                        self.state = self.after_size();
                    }
                }
                ChunkState::Data => {
                    let n = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(bad()),
                },
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::LastLf,
                    b'\n' => return Ok(Some(i + 1)),
                    _ => self.state = ChunkState::TrailerLine,
                },
                ChunkState::TrailerLine => {
                    if b == b'\n' {
                        self.state = ChunkState::TrailerStart;
                    }
                }
                ChunkState::LastLf => {
                    if b == b'\n' {
                        return Ok(Some(i + 1));
                    }
                    return Err(bad());
                }
            }
            i += 1;
        }
        Ok(None)
    }

    fn after_size(&mut self) -> ChunkState {
        if self.left == 0 {
            ChunkState::TrailerStart
        } else {
            ChunkState::Data
        }
    }
}

/// A reply of the gateway's own (a refusal, an upstream failure), in the JSON error shape.
async fn write_reply(
    io: &mut L4Stream,
    reply: Reply,
    request_id: &str,
    keep_alive: bool,
    head_only: bool,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    let (status, headers, body) = reply.into_response(request_id, None);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (i, (name, value)) in headers.iter().enumerate() {
        // A later header of the same name replaces an earlier one.
        if !headers[i + 1..].iter().any(|(n, _)| n == name) {
            push_header(out, name, value);
        }
    }
    push_date(out);
    if !keep_alive && !headers.iter().any(|(n, _)| *n == "connection") {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&body);
    }
    io.write_all(out).await?;
    io.flush().await
}

/// A fresh edge-cache hit's answer: the head `Gateway::reply_from_entry` and [`write_reply`]
/// give (the same headers, in the same order), written without building a string per header.
struct Hit<'a> {
    status: StatusCode,
    entry: &'a shopverse_edge_cache::Entry,
    max_age: u64,
    request_id: &'a str,
    limit_headers: &'a [(&'static str, String)],
    keep_alive: bool,
}

impl Hit<'_> {
    async fn write(
        &self,
        io: &mut L4Stream,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(self.status.as_u16()));
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        push_decimal(out, self.entry.body.len() as u64);
        out.extend_from_slice(b"\r\n");
        push_header(out, "x-request-id", self.request_id);
        for (name, value) in crate::proxy::SECURITY_HEADERS {
            push_header(out, name, value);
        }
        push_header(out, "x-cache", "HIT");
        push_header(out, "etag", self.entry.etag.as_deref().unwrap_or(""));
        out.extend_from_slice(b"cache-control: public, max-age=");
        push_decimal(out, self.max_age);
        out.extend_from_slice(b"\r\n");
        for (name, value) in self.limit_headers {
            push_header(out, name, value);
        }
        push_date(out);
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.entry.body);
        }
        io.write_all(out).await?;
        io.flush().await
    }
}

fn malformed(addr: SocketAddr) -> direct::Failure {
    direct::Failure::Unavailable {
        addr,
        source: pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "malformed response head",
        ),
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `date`, as Pingora's server sends it: formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(pingora::protocols::http::date::get_cached_date().as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::proxy::decimal(n, &mut [0; 20]));
}

fn push_hex(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        // In one piece...
        assert_eq!(Chunks::default().scan(body).unwrap(), Some(end));
        // ...and split at every byte.
        for cut in 0..body.len() {
            let mut c = Chunks::default();
            let (a, b) = body.split_at(cut);
            match c.scan(a).unwrap() {
                Some(e) => assert_eq!(e, end, "cut at {cut}"),
                None => assert_eq!(c.scan(b).unwrap().map(|e| e + cut), Some(end), "cut {cut}"),
            }
        }
        assert_eq!(Chunks::default().scan(b"0\r\n\r\n").unwrap(), Some(5));
        assert_eq!(Chunks::default().scan(b"3\r\nab").unwrap(), None);
        assert!(Chunks::default().scan(b"zz\r\n").is_err());
        assert!(Chunks::default().scan(b"2\r\nabX").is_err());
    }

    #[test]
    fn headers_that_stay_behind_and_requests_left_to_pingora() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\
            Keep-Alive: 5\r\nX-Shopverse-User: mallory\r\nX-Request-Id: abc\r\n\
            Authorization: Bearer t\r\nContent-Length: 3\r\nTE: trailers\r\n\r\n";
        req.parse(raw).unwrap();
        let framing = policy::Framing {
            content_length: Some(3),
            ..Default::default()
        };
        let f = facts(req.headers, &framing)
            .map_err(|_| "not ours")
            .unwrap();
        assert!(f.close);
        assert_eq!(f.request_id, Some("abc"));
        assert_eq!(f.authorization, Some("Bearer t"));
        let kept: Vec<&str> = req
            .headers
            .iter()
            .enumerate()
            .filter(|(i, _)| f.dropped & (1 << i) == 0)
            .map(|(_, h)| h.name)
            .collect();
        assert_eq!(kept, ["Host", "Authorization", "Content-Length"]);

        // What `Connection` names stays behind too, `Host` never.
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: host, x-secret\r\nX-Secret: 1\r\n\r\n",
        )
        .unwrap();
        let f = facts(req.headers, &policy::Framing::default())
            .map_err(|_| "not ours")
            .unwrap();
        assert_eq!(f.dropped, 0b110, "Connection and X-Secret, not Host");

        for raw in [
            &b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nExpect: something-else\r\n\r\n",
        ] {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(raw).unwrap();
            assert!(
                facts(req.headers, &policy::Framing::default()).is_err(),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn response_heads_end_at_their_empty_line() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(head_end(head), Some(head.len() - 2));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\nx: 1\n\nok"), Some(22));
        for cut in 0..head.len() - 2 {
            assert_eq!(head_end(&head[..cut]), None, "cut at {cut}");
        }
        assert_eq!(status_of(b"HTTP/1.1 100 Continue\r\n"), Some(100));
        assert_eq!(status_of(b"HTTP/1.0 404 Not Found\r\n"), Some(404));
        assert_eq!(status_of(b"HTTP/1.1 2x0 OK\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 20"), None);
    }

    #[tokio::test]
    async fn a_deadline_moved_later_still_fires_at_the_latest_limit() {
        let mut d = Deadline::new();
        let quick = tokio::time::sleep(Duration::from_millis(1));
        assert!(d.within(Duration::from_millis(20), quick).await.is_ok());
        // The timer is still set for the first limit: it fires early here and is set again.
        let slower = tokio::time::sleep(Duration::from_millis(60));
        assert!(d.within(Duration::from_secs(5), slower).await.is_ok());
        let never = std::future::pending::<()>();
        let started = Instant::now();
        assert!(d.within(Duration::from_millis(50), never).await.is_err());
        assert!(started.elapsed() >= Duration::from_millis(50));
        // An earlier limit than the timer's sets it sooner.
        let mut d = Deadline::new();
        let never = std::future::pending::<()>();
        assert!(d.within(Duration::from_secs(3600), async {}).await.is_ok());
        assert!(d.within(Duration::from_millis(30), never).await.is_err());
    }

    #[test]
    fn numbers_are_written_as_text() {
        let mut out = Vec::new();
        push_decimal(&mut out, 0);
        out.push(b' ');
        push_decimal(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        push_hex(&mut out, 0);
        out.push(b' ');
        push_hex(&mut out, 0x1f40);
        assert_eq!(out, b"0 18446744073709551615 0 1f40");
    }
}
