//! Plain HTTP/1 pass-through for a request Pingora's server parsed (TLS, HTTP/1.0, the
//! requests the front hands over), proxied by the gateway itself from `request_filter`.
//!
//! Pingora's proxy loop costs, per request: two task channels and a join of two futures, a
//! shared connection pool whose every return spawns an idle-watch task (with a lock, a oneshot
//! and a notifier) and two reads to test the connection. For the plain routes, where nothing of
//! that is needed, this module does the same HTTP work with Pingora's own HTTP/1 client session
//! (framing, chunked bodies, keep-alive rules) and a pool per thread: an idle connection is
//! tested once when it is taken, and a request that meets a connection the upstream has
//! closed meanwhile is sent again on a new one if it had no body. A body without a declared
//! length (chunked) is read whole first, within the body limit, and sent with its length, as
//! the front does: the upstream never sees a request cut short by bad framing or a body past
//! the limit.
//!
//! Upgrades (WebSocket) and HTTP/2 clients still take Pingora's proxy path; see
//! [`eligible`].

use std::net::SocketAddr;

use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use pingora::protocols::Stream;
use pingora::protocols::http::v1::client::HttpSession;

use super::pool::{Failure, Limits, dial, pooled_or_dial, release};
use crate::policy::{strip_request_hop_by_hop, strip_response_hop_by_hop};

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
    let declared = session
        .req_header()
        .headers
        .contains_key(header::CONTENT_LENGTH);
    let buffered = if has_body && !declared {
        Some(read_whole(session, limits).await?)
    } else {
        None
    };
    let body = match &buffered {
        Some(b) => Body::Buffered(b),
        None if has_body => Body::Stream,
        None => Body::None,
    };
    let mut upstream = {
        let (mut up, reused) = connect(addr, limits).await?;
        let req = upstream_request(session, &body, &prepare).map_err(unavailable)?;
        match send(session, &mut up, req, &body, limits, addr).await {
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
                let req = upstream_request(session, &body, &prepare).map_err(unavailable)?;
                send(session, &mut up, req, &body, limits, addr).await?;
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

/// A request's body, as it goes upstream.
enum Body<'a> {
    None,
    /// Read whole already (it came without a declared length).
    Buffered(&'a Bytes),
    /// Its declared length, streamed from the client as it arrives.
    Stream,
}

/// The client's next piece of request body (`None`: the body is over), before `deadline`.
async fn next_piece(
    session: &mut Session,
    deadline: tokio::time::Instant,
) -> Result<Option<Bytes>, Failure> {
    tokio::time::timeout_at(deadline, session.read_request_body())
        .await
        .map_err(|_| Failure::ClientTimeout)?
        .map_err(Failure::Client)
}

/// Reads a body without a declared length whole, within the client body timeout and at most
/// `max_body` bytes (413 beyond, before anything went upstream).
async fn read_whole(session: &mut Session, limits: Limits) -> Result<Bytes, Failure> {
    let deadline = tokio::time::Instant::now() + limits.client_body;
    let mut body = bytes::BytesMut::new();
    loop {
        match next_piece(session, deadline).await? {
            Some(b) => {
                if body.len() + b.len() > limits.max_body {
                    return Err(Failure::TooLarge {
                        max: limits.max_body,
                    });
                }
                body.extend_from_slice(&b);
            }
            None => return Ok(body.freeze()),
        }
    }
}

/// Writes the request (and its body) and reads the response header.
async fn send(
    session: &mut Session,
    up: &mut HttpSession,
    req: RequestHeader,
    body: &Body<'_>,
    limits: Limits,
    addr: SocketAddr,
) -> Result<(), Failure> {
    let fail = |e| classify(addr, e);
    up.write_request_header(Box::new(req)).await.map_err(fail)?;
    if let Body::Buffered(b) = body {
        up.write_body(b).await.map_err(fail)?;
        up.finish_body().await.map_err(fail)?;
    }
    if let Body::Stream = body {
        let deadline = tokio::time::Instant::now() + limits.client_body;
        loop {
            match next_piece(session, deadline).await? {
                // A read with no data writes nothing (an empty write is not data upstream).
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

fn session_for(stream: Stream, limits: Limits) -> HttpSession {
    let mut up = HttpSession::new(stream);
    up.read_timeout = Some(limits.upstream);
    up.write_timeout = Some(limits.upstream);
    up
}

/// The client's request as the upstream gets it: the headers that stay behind gone (RFC 9110
/// 7.6.1, and the gateway's own), HTTP/1.1, framed for its body.
fn upstream_request(
    session: &Session,
    body: &Body<'_>,
    prepare: &impl Fn(&mut RequestHeader) -> pingora::Result<()>,
) -> pingora::Result<RequestHeader> {
    let mut req = session.req_header().clone();
    strip_request_hop_by_hop(&mut req);
    req.set_version(http::Version::HTTP_11);
    if let Body::Buffered(b) = body {
        req.remove_header(&header::TRANSFER_ENCODING);
        req.insert_header(header::CONTENT_LENGTH, b.len())?;
    }
    prepare(&mut req)?;
    Ok(req)
}
