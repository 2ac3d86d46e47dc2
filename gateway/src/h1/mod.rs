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
//! upstream framed it. A chunked request body is decoded strictly ([`chunked`]) and
//! sent with its length; `Expect: 100-continue` is answered here once the request is admitted.
//!
//! Fresh edge-cache hits are answered here too. Any other request (REST and gRPC routes,
//! HTTP/1.0, upgrades, other expectations, heads `httparse` refuses) is handed to Pingora's
//! HTTP/1 server with the bytes already read put back in front of the stream, and the
//! connection comes back after that request. TLS and HTTP/2 connections are Pingora's
//! throughout.

mod body;
pub mod chunked;
mod deadline;
pub(crate) mod forward;
mod head;
mod hit;
pub(crate) mod pool;
mod relay;
mod rest;
mod write;

use std::borrow::Cow;
use std::net::IpAddr;
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

use crate::gateway::Gateway;
use crate::policy;
use crate::proxy::Shared;
use crate::reply::Reply;

use body::read_chunked;
use deadline::{Deadline, Elapsed};
use head::facts;
use relay::Exchange;
use write::write_reply;

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
        let (limits, head_limits) = (config.relay_limits, config.head_limits);
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
            .map(|p| (p.label.clone(), p.target.clone(), p.access));
        drop(config);
        let Some((label, upstream, access)) = pass else {
            if framing.chunked || framing.content_length.is_some_and(|n| n > 0) {
                // REST calls with a body are Pingora's.
                return Step::HandOff;
            }
            return self
                .rest(
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
        let span = server_span(method, path, facts.traceparent);
        let traceparent = shopverse_kit::trace::traceparent_of(&span);
        // What the access log says of this request, whichever answer it gets.
        let seen = seen(&request_id, ip, path, &facts, head_len, &span);
        let admitted = self
            .gateway
            .admit(path, access, facts.authorization, ip)
            .await;
        let admitted = match admitted {
            Ok(a) => a,
            Err(reply) => {
                // The request body, if any, was not read: the connection cannot go on.
                let keep =
                    keep_alive && !framing.chunked && framing.content_length.unwrap_or(0) == 0;
                return match self
                    .answer(io, reply, &label, method, seen, keep, start, bufs)
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
            traceparent: traceparent.as_deref(),
        };
        let outcome = match upstream.resolve().await {
            Err(e) => Err(Reply::upstream_address(&e)),
            Ok(addr) => {
                exchange
                    .run(
                        io,
                        addr,
                        admitted.identity.as_deref(),
                        admitted.rate.as_ref(),
                        bufs,
                    )
                    .await
            }
        };
        let access = crate::gateway::Access {
            bytes_in: Some(head_len as u64 + body_len),
            upstream: Some(&upstream),
            identity: admitted.identity.as_deref(),
            rated: admitted.rate.is_some(),
            ..seen
        };
        match outcome {
            Ok(done) => {
                let status = StatusCode::from_u16(done.status).unwrap_or(StatusCode::BAD_GATEWAY);
                self.gateway
                    .record(&label, method, status.as_str(), start, access);
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
                        access,
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
        mut access: crate::gateway::Access<'_>,
        keep_alive: bool,
        start: Instant,
        bufs: &mut Buffers,
    ) -> Step {
        let status = reply.status;
        let keep_alive = keep_alive && !reply.closes();
        let head = method == "HEAD";
        access.bytes_out = (!head).then_some(reply.body.len() as u64);
        let written = write_reply(
            io,
            reply,
            access.request_id,
            keep_alive,
            head,
            &mut bufs.out,
        )
        .await;
        self.gateway
            .record(label, method, status.as_str(), start, access);
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
        let access = crate::gateway::Access {
            request_id: &id,
            ..Default::default()
        };
        self.answer(
            io,
            Reply::refused(refusal),
            "refused",
            method,
            access,
            false,
            start,
            bufs,
        )
        .await
    }
}

/// The server span of a request the front answers, a child of the client's `traceparent`
/// (disabled when spans are not exported).
fn server_span(method: &str, path: &str, traceparent: Option<&str>) -> tracing::Span {
    let span = crate::gateway::server_span(method, path);
    if !span.is_disabled() {
        shopverse_kit::trace::continue_from(&span, traceparent.unwrap_or(""));
    }
    span
}

/// What the access log and the span know of a request once its head is read: who sent it,
/// where to, and the head's size.
fn seen<'a>(
    request_id: &'a str,
    client: Option<IpAddr>,
    path: &'a str,
    facts: &head::Facts<'a>,
    head_len: usize,
    span: &'a tracing::Span,
) -> crate::gateway::Access<'a> {
    crate::gateway::Access {
        request_id,
        client,
        path,
        traceparent: facts.traceparent,
        bytes_in: Some(head_len as u64),
        span: Some(span),
        ..Default::default()
    }
}
