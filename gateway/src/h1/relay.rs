//! One pass-through request relayed to its upstream, and the response relayed back as the
//! upstream framed it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chunked::Chunks;
use super::deadline::Deadline;
use super::head::{Facts, head_end, status_of};
use super::pool;
use super::write::{push_decimal, push_header, push_hex};
use super::{BUF, Buffers, MAX_HEADERS, MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS};
use crate::policy;
use crate::reply::Reply;

/// One request on its way upstream.
pub(super) struct Exchange<'a> {
    /// The route, for logs.
    pub(super) label: &'a str,
    pub(super) method: &'a str,
    /// Forwarded in origin form, its path normalised.
    pub(super) target: &'a policy::Target<'a>,
    pub(super) headers: &'a [httparse::Header<'a>],
    pub(super) facts: &'a Facts<'a>,
    pub(super) request_id: &'a str,
    pub(super) body_len: u64,
    /// The body bytes at hand: what followed the head in the client's read buffer, or a
    /// whole decoded chunked body.
    pub(super) buffered_body: &'a [u8],
    /// Send a `Content-Length` of `body_len` (for a body that came chunked).
    pub(super) length_header: bool,
    pub(super) limits: pool::Limits,
    pub(super) keep_alive: bool,
    /// The gateway span's context, sent in place of the client's `traceparent` so that the
    /// upstream's span is its child; `None` when spans are not exported.
    pub(super) traceparent: Option<&'a str>,
}

/// How a relayed request ended.
pub(super) struct Relayed {
    pub(super) status: u16,
    /// Whether the client connection can take another request.
    pub(super) keep_alive: bool,
}

/// How the response body is delimited.
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked(Chunks),
    /// Until the upstream closes; re-framed as chunked for the client.
    Close,
}

impl Exchange<'_> {
    /// Sends the request and relays the answer. `Err` is a reply for the client, when nothing
    /// was sent to it yet; a failure after that closes the connection (`keep_alive: false`).
    pub(super) async fn run(
        &self,
        io: &mut L4Stream,
        addr: SocketAddr,
        identity: Option<&shopverse_kit::Identity>,
        rate: Option<&crate::admit::RateHeaders>,
        bufs: &mut Buffers,
    ) -> Result<Relayed, Reply> {
        self.request_head(identity, &mut bufs.out);
        let in_buffer = usize::try_from(self.body_len)
            .unwrap_or(usize::MAX)
            .min(self.buffered_body.len());
        bufs.out.extend_from_slice(&self.buffered_body[..in_buffer]);
        let rest = self.body_len - in_buffer as u64;

        let (mut up, reused) = pool::pooled_or_dial(addr, self.limits.upstream)
            .await
            .map_err(|e| Reply::for_failure(e, self.label))?;
        let head_len = match self.attempt(&mut up, addr, rest, io, bufs).await {
            Ok(n) => n,
            // A pooled connection the upstream closed meanwhile: once more on a new one, when
            // the request had no body to read again.
            // Only a method a client may repeat on its own (RFC 9110 9.2.2).
            Err(pool::Failure::Unavailable { .. })
                if reused && self.body_len == 0 && policy::idempotent(self.method) =>
            {
                up = pool::dial(addr, self.limits.upstream)
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
                // As strict as a request's (`+3` and the like are malformed).
                let n = policy::content_length(h.value)
                    .map_err(|_| Reply::for_failure(malformed(addr), self.label))?;
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
        if let Some(r) = rate {
            r.write(out);
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
                    pool::release(addr, up);
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
    pub(super) async fn attempt(
        &self,
        up: &mut Stream,
        addr: SocketAddr,
        rest: u64,
        io: &mut L4Stream,
        bufs: &mut Buffers,
    ) -> Result<usize, pool::Failure> {
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
            .unwrap_or(Err(pool::Failure::Timeout { addr }))
    }

    /// The request line and headers as the upstream gets them.
    pub(super) fn request_head(
        &self,
        identity: Option<&shopverse_kit::Identity>,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.path.as_bytes());
        if let Some(q) = self.target.query {
            out.push(b'?');
            out.extend_from_slice(q.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let replaced =
            |name: &str| self.traceparent.is_some() && name.eq_ignore_ascii_case("traceparent");
        for (i, h) in self.headers.iter().enumerate() {
            if self.facts.dropped & (1 << i) == 0 && !replaced(h.name) {
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(h.value);
                out.extend_from_slice(b"\r\n");
            }
        }
        push_header(out, "x-request-id", self.request_id);
        if let Some(parent) = self.traceparent {
            push_header(out, "traceparent", parent);
        }
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
pub(super) async fn send(
    upstream: &mut Stream,
    addr: SocketAddr,
    head: &[u8],
    mut rest: u64,
    client: &mut L4Stream,
    client_body: Duration,
    up: &mut BytesMut,
) -> Result<usize, pool::Failure> {
    let io = |e: std::io::Error| pool::Failure::Unavailable {
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
                Err(_) => return Err(pool::Failure::ClientTimeout),
                Ok(Ok(0)) => {
                    return Err(pool::Failure::Client(pingora::Error::explain(
                        pingora::ErrorType::ReadError,
                        "the client closed during the request body",
                    )));
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    return Err(pool::Failure::Client(pingora::Error::because(
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

/// Relays the response body after the head in `out` (already built), starting with what is
/// in `up`. `Ok(true)`: the body ended exactly, so the upstream connection can be reused.
pub(super) async fn relay_body(
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

pub(super) fn malformed(addr: SocketAddr) -> pool::Failure {
    pool::Failure::Unavailable {
        addr,
        source: pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "malformed response head",
        ),
    }
}
