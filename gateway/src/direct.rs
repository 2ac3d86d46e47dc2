//! Plain HTTP/1 pass-through, proxied by the gateway itself from `request_filter`.
//!
//! Pingora's proxy loop costs, per request: two task channels and a join of two futures, a
//! shared connection pool whose every return spawns an idle-watch task (with a lock, a oneshot
//! and a notifier) and two reads to test the connection. For the plain routes, where nothing of
//! that is needed, this module does the same HTTP work with Pingora's own HTTP/1 client session
//! (framing, chunked bodies, keep-alive rules) and a pool per thread: an idle connection is
//! tested once when it is taken, and a request that meets a connection the upstream has
//! closed meanwhile is sent again on a new one if it had no body.
//!
//! Upgrades (WebSocket) and HTTP/2 clients still take Pingora's proxy path; see
//! [`eligible`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession;
use tokio::io::AsyncReadExt;

/// Idle connections kept per upstream address and thread.
const MAX_IDLE: usize = 128;
/// An idle connection older than this is closed rather than reused (upstreams commonly close
/// idle keep-alive connections after 60 s or more; staying under that avoids most races).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// Idle upstream connections of this thread, newest last. Pingora runs each thread's
    /// connections on that thread's own runtime, so a pool per thread needs no lock.
    static IDLE: RefCell<IdlePool> = RefCell::new(IdlePool::default());
    /// Whether this thread's pool has a sweeper running.
    static SWEEPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How often a thread's idle connections are looked over, so that one the upstream closed (or
/// idle for too long) is closed here too rather than kept until the next request.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Keyed by configured upstream addresses, not by anything a client sends: a fast hash
/// (SipHash was a tenth of the pool's cost per request).
type IdlePool = HashMap<SocketAddr, Vec<(Stream, Instant)>, rustc_hash::FxBuildHasher>;

/// Why a request could not be proxied; nothing was sent downstream yet for the first two.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The upstream could not be reached or failed before its response header.
    #[error("upstream {addr}: {source}")]
    Unavailable {
        addr: SocketAddr,
        source: Box<pingora::Error>,
    },
    /// The upstream did not answer in time.
    #[error("upstream {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    /// The client's request body did not arrive in time.
    #[error("the request body did not arrive in time")]
    ClientTimeout,
    /// The client's request body could not be read.
    #[error("request body: {0}")]
    Client(Box<pingora::Error>),
    /// Failed after the response header went downstream: the connection can only be closed.
    #[error("after the response started: {0}")]
    Midway(Box<pingora::Error>),
}

/// Time limits of one pass-through request.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    /// Connecting, and each read and write to the upstream.
    pub upstream: Duration,
    /// The whole of the client's request body.
    pub client_body: Duration,
}

/// Whether this request takes the direct path: an HTTP/1 client, no protocol upgrade and no
/// `Expect: 100-continue` (Pingora's proxy handles those).
pub(crate) fn eligible(session: &Session) -> bool {
    if session.is_http2() || session.is_upgrade_req() {
        return false;
    }
    !session.req_header().headers.contains_key(header::EXPECT)
}

/// Proxies the request to `addr` and streams the response back with `extra` headers added.
/// `prepare` adds the gateway's own request headers (identity, request id) to the copy sent
/// upstream.
pub(crate) async fn forward(
    session: &mut Session,
    addr: SocketAddr,
    limits: Limits,
    prepare: impl Fn(&mut RequestHeader) -> pingora::Result<()>,
    extra: Vec<(&'static str, String)>,
) -> Result<(), Failure> {
    let has_body = !session.is_body_empty();
    let unavailable = |e: Box<pingora::Error>| classify(addr, e);
    let mut upstream = {
        let (mut up, reused) = connect(addr, limits).await?;
        let req = upstream_request(session, has_body, &prepare).map_err(unavailable)?;
        match send(session, &mut up, req, has_body, limits, addr).await {
            Ok(()) => up,
            // A pooled connection the upstream closed meanwhile: once more on a new one, for
            // a method a client may repeat on its own (RFC 9110 9.2.2) with no body to read
            // again.
            Err(Failure::Unavailable { .. })
                if reused
                    && !has_body
                    && crate::policy::idempotent(session.req_header().method.as_str()) =>
            {
                let (mut up, _) = fresh(addr, limits).await?;
                let req = upstream_request(session, has_body, &prepare).map_err(unavailable)?;
                send(session, &mut up, req, has_body, limits, addr).await?;
                up
            }
            Err(e) => return Err(e),
        }
    };

    let mut resp: ResponseHeader = match upstream.resp_header() {
        Some(r) => r.clone(),
        None => {
            return Err(unavailable(pingora::Error::explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "no response header",
            )));
        }
    };
    // A transfer coding other than chunked last cannot be framed for the client (RFC 9112
    // 6.3): a 502 rather than a body relayed under a false framing.
    let mut codings = resp.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        let last = codings.next_back().unwrap_or(first);
        let chunked_last = last
            .as_bytes()
            .rsplit(|b| *b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        if !chunked_last {
            return Err(unavailable(pingora::Error::explain(
                pingora::ErrorType::InvalidHTTPHeader,
                "a response transfer coding other than chunked",
            )));
        }
    }
    strip_response_hop_by_hop(&mut resp);
    let no_body = session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304);
    let done = no_body || upstream.is_body_done();
    if !done
        && resp.headers.get(header::TRANSFER_ENCODING).is_none()
        && resp.headers.get(header::CONTENT_LENGTH).is_none()
    {
        // A close-delimited (HTTP/1.0 style) body: chunk it, so the client's connection lives.
        resp.set_version(http::Version::HTTP_11);
        resp.insert_header(header::TRANSFER_ENCODING, "chunked")
            .map_err(Failure::Midway)?;
    }
    for (name, value) in extra {
        resp.insert_header(name, value).map_err(Failure::Midway)?;
    }
    session
        .write_response_header(Box::new(resp), done)
        .await
        .map_err(Failure::Midway)?;
    if !done {
        loop {
            match upstream.read_body_bytes().await.map_err(Failure::Midway)? {
                Some(chunk) => {
                    let end = upstream.is_body_done();
                    session
                        .write_response_body(Some(chunk), end)
                        .await
                        .map_err(Failure::Midway)?;
                    if end {
                        break;
                    }
                }
                None => {
                    session
                        .write_response_body(Some(Bytes::new()), true)
                        .await
                        .map_err(Failure::Midway)?;
                    break;
                }
            }
        }
    }
    upstream.respect_keepalive();
    if let Some(stream) = upstream.reuse().await {
        release(addr, stream);
    }
    Ok(())
}

/// Writes the request (and its body, read from the client) and reads the response header.
async fn send(
    session: &mut Session,
    up: &mut HttpSession,
    req: RequestHeader,
    has_body: bool,
    limits: Limits,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let fail = |e| classify(addr, e);
    up.write_request_header(Box::new(req)).await.map_err(fail)?;
    if has_body {
        let deadline = tokio::time::Instant::now() + limits.client_body;
        loop {
            let chunk = tokio::time::timeout_at(deadline, session.read_request_body())
                .await
                .map_err(|_| Failure::ClientTimeout)?
                .map_err(Failure::Client)?;
            match chunk {
                // A read that ended inside chunk framing yields no data: writing it would
                // send Pingora's chunked writer's terminating empty chunk.
                Some(b) if b.is_empty() => {}
                Some(b) => {
                    up.write_body(&b).await.map_err(fail)?;
                }
                None => break,
            }
        }
        up.finish_body().await.map_err(fail)?;
    }
    loop {
        up.read_response().await.map_err(fail)?;
        // 100 Continue and other interim answers are the upstream's business, not the client's.
        match up.resp_header() {
            Some(r) if r.status.is_informational() => continue,
            _ => return Ok(()),
        }
    }
}

fn classify(addr: SocketAddr, e: Box<pingora::Error>) -> Failure {
    match e.etype() {
        pingora::ErrorType::ReadTimedout
        | pingora::ErrorType::WriteTimedout
        | pingora::ErrorType::ConnectTimedout => Failure::Timeout { addr },
        _ => Failure::Unavailable { addr, source: e },
    }
}

/// A pooled connection that still looks open, or a new one; `true` when pooled.
async fn connect(addr: SocketAddr, limits: Limits) -> Result<(HttpSession, bool), Failure> {
    let (stream, reused) = pooled_or_dial(addr, limits.upstream).await?;
    Ok((session_for(stream, limits), reused))
}

async fn fresh(addr: SocketAddr, limits: Limits) -> Result<(HttpSession, bool), Failure> {
    Ok((
        session_for(dial(addr, limits.upstream).await?, limits),
        false,
    ))
}

/// A pooled connection to `addr` that still looks open (`true`), or a new one.
pub(crate) async fn pooled_or_dial(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(Stream, bool), Failure> {
    while let Some(mut stream) = take(addr) {
        if idle_and_open(&mut stream) {
            return Ok((stream, true));
        }
    }
    Ok((dial(addr, timeout).await?, false))
}

/// A new connection to `addr`.
pub(crate) async fn dial(addr: SocketAddr, timeout: Duration) -> Result<Stream, Failure> {
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Timeout { addr })?
        .map_err(|e| Failure::Unavailable {
            addr,
            source: pingora::Error::because(pingora::ErrorType::ConnectError, "connect", e),
        })?;
    // Small requests and answers: Nagle would hold each for the peer's delayed ACK.
    let _ = tcp.set_nodelay(true);
    Ok(Box::new(pingora::protocols::l4::stream::Stream::from(tcp)))
}

fn session_for(stream: Stream, limits: Limits) -> HttpSession {
    let mut up = HttpSession::new(stream);
    up.read_timeout = Some(limits.upstream);
    up.write_timeout = Some(limits.upstream);
    up
}

/// The newest idle connection to `addr` that has not been idle too long.
fn take(addr: SocketAddr) -> Option<Stream> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&addr)?;
        while let Some((stream, since)) = list.pop() {
            if since.elapsed() < IDLE_TIMEOUT {
                return Some(stream);
            }
            // The rest are older still.
            list.clear();
        }
        None
    })
}

/// Keeps an upstream connection for the next request to `addr`.
pub(crate) fn release(addr: SocketAddr, stream: Stream) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() >= MAX_IDLE {
            // Drop the oldest: it is the likeliest to have been closed by the upstream.
            list.remove(0);
        }
        list.push((stream, Instant::now()));
    });
    if !SWEEPING.replace(true) {
        // Spawned on this thread's runtime (each Pingora thread runs its own), so it sweeps
        // this thread's pool.
        tokio::spawn(sweep());
    }
}

/// Closes idle connections the upstream closed, and those idle too long; ends when the pool
/// is empty (the next release starts another).
async fn sweep() {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let any_left = IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            for list in idle.values_mut() {
                list.retain_mut(|(stream, since)| {
                    since.elapsed() < IDLE_TIMEOUT && idle_and_open(stream)
                });
            }
            idle.retain(|_, list| !list.is_empty());
            !idle.is_empty()
        });
        if !any_left {
            SWEEPING.set(false);
            return;
        }
    }
}

/// An idle connection has nothing to read: data or end of stream means it cannot be reused.
/// This reads only if the runtime saw the socket become readable, so usually no system call.
fn idle_and_open(stream: &mut Stream) -> bool {
    let mut buf = [0u8; 1];
    tokio::task::unconstrained(stream.read(&mut buf))
        .now_or_never()
        .is_none()
}

/// The client's request as the upstream gets it: the headers that stay behind gone (RFC 9110
/// 7.6.1, and the gateway's own), HTTP/1.1, framed for its body.
fn upstream_request(
    session: &Session,
    has_body: bool,
    prepare: &impl Fn(&mut RequestHeader) -> pingora::Result<()>,
) -> pingora::Result<RequestHeader> {
    let mut req = session.req_header().clone();
    strip_request_hop_by_hop(&mut req);
    req.set_version(http::Version::HTTP_11);
    if has_body && req.headers.get(header::CONTENT_LENGTH).is_none() {
        req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    prepare(&mut req)?;
    Ok(req)
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Header names a `Connection` header lists (at most a few are honoured), as
/// [`crate::policy::nominated`] reads them: never `Host`.
fn nominated(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| crate::policy::nominated(v.as_bytes()))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .take(16)
        .collect()
}

/// Hop-by-hop response headers besides the ones `Connection` names (`Transfer-Encoding`
/// stays: it says how the body is framed).
static RESPONSE_HOP: [&HeaderName; 6] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::TRAILER,
    &header::UPGRADE,
];

/// One pass over the names (most requests have none of these), instead of a lookup per name.
fn any_of(headers: &http::HeaderMap, names: &[&HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(&k))
}

/// `Connection: keep-alive` or `close` is the only one of `hop` present.
fn plain_connection_only(headers: &http::HeaderMap, hop: &[&HeaderName]) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    let plain = match (values.next(), values.next()) {
        (Some(v), None) => {
            v.as_bytes().eq_ignore_ascii_case(b"keep-alive")
                || v.as_bytes().eq_ignore_ascii_case(b"close")
        }
        _ => false,
    };
    plain
        && !headers
            .keys()
            .any(|k| *k != header::CONNECTION && hop.contains(&k))
}

/// Removes the request headers that stay behind: [`crate::policy::stays_behind`] (the table
/// the HTTP/1 front uses too) and the ones `Connection` names.
fn strip_request_hop_by_hop(req: &mut RequestHeader) {
    let behind = |k: &HeaderName| crate::policy::stays_behind(k.as_str().as_bytes());
    if !req.headers.keys().any(behind) {
        return;
    }
    let mut names = nominated(&req.headers);
    names.extend(req.headers.keys().filter(|k| behind(k)).cloned());
    for name in names {
        req.remove_header(&name);
    }
}

/// The upstream's connection headers are its own; Pingora writes the client's
/// `Connection` itself.
fn strip_response_hop_by_hop(resp: &mut ResponseHeader) {
    if !any_of(&resp.headers, &RESPONSE_HOP) {
        return;
    }
    if plain_connection_only(&resp.headers, &RESPONSE_HOP) {
        // The usual case, `Connection: keep-alive` and nothing else: one removal.
        resp.remove_header(&header::CONNECTION);
        return;
    }
    for name in nominated(&resp.headers) {
        if name != header::TRANSFER_ENCODING {
            resp.remove_header(&name);
        }
    }
    for name in RESPONSE_HOP {
        resp.remove_header(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("connection", "keep-alive, x-secret")
            .unwrap();
        req.insert_header("x-secret", "1").unwrap();
        req.insert_header("keep-alive", "timeout=5").unwrap();
        req.insert_header("te", "trailers").unwrap();
        req.insert_header("upgrade", "h2c").unwrap();
        req.insert_header("x_shopverse_user", "mallory").unwrap();
        req.insert_header("accept", "*/*").unwrap();
        strip_request_hop_by_hop(&mut req);
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);

        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "close").unwrap();
        resp.insert_header("keep-alive", "timeout=5").unwrap();
        resp.insert_header("transfer-encoding", "chunked").unwrap();
        strip_response_hop_by_hop(&mut resp);
        let names: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["transfer-encoding"]);

        // The shortcut for a lone `Connection: keep-alive` leaves the rest alone...
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.insert_header("connection", "keep-alive").unwrap();
        resp.insert_header("content-length", "2").unwrap();
        strip_response_hop_by_hop(&mut resp);
        let names: Vec<&str> = resp.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
        // ...and is not taken when another hop-by-hop header is there too.
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        req.insert_header("connection", "close").unwrap();
        req.insert_header("te", "trailers").unwrap();
        req.insert_header("proxy-authorization", "Basic eA==")
            .unwrap();
        strip_request_hop_by_hop(&mut req);
        assert!(req.headers.is_empty(), "{:?}", req.headers);
    }
}
