//! Pingora's phases, in the order a request meets them. `request_filter` applies the
//! [request policy](crate::policy) and answers everything it can itself: REST calls
//! ([`crate::rest`]), refusals, and plain pass-through requests relayed directly
//! ([`crate::passthrough`]). Only gRPC calls and the pass-through requests the direct relay
//! does not take (upgrades, HTTP/2 clients) go on to `upstream_peer` and Pingora's proxy loop.
//!
//! Plain HTTP/1 connections meet the [HTTP/1 front](crate::h1) first; it hands Pingora the
//! requests it does not serve itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use http::{Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use tracing::Instrument;

use shopverse_kit::Identity;

use crate::gateway::Gateway;
use crate::h1::forward;
use crate::passthrough::gateway_headers;
use crate::reply::Reply;
use crate::upstream::Target;

/// How a request is named in metrics: a route template shared with the router, or a fixed
/// label; neither copies on the request path.
pub(crate) enum Label {
    Fixed(&'static str),
    Shared(std::sync::Arc<str>),
    Owned(String),
}

impl Label {
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Label::Fixed(s) => s,
            Label::Shared(s) => s,
            Label::Owned(s) => s,
        }
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    /// The route for metrics.
    pub(crate) route: Label,
    pub(crate) request_id: String,
    /// Where a pass-through request goes, and whether over HTTP/2 (gRPC).
    pub(crate) passthrough: Option<(Target, bool)>,
    /// The verified caller of a pass-through request.
    pub(crate) identity: Option<Arc<Identity>>,
    /// The rate limit's headers, for a pass-through response.
    pub(crate) rate: Option<crate::admit::RateHeaders>,
    /// `Access-Control-Allow-Origin` for a cross-origin request from an allowed origin.
    pub(crate) cors: Option<String>,
    /// The request's server span (disabled when spans are not exported).
    pub(crate) span: tracing::Span,
}

/// The gateway as Pingora's proxy holds it; the HTTP/1 front ([`crate::h1`]) shares it.
pub struct Shared(pub Arc<Gateway>);

impl std::ops::Deref for Shared {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.0
    }
}

#[async_trait]
impl ProxyHttp for Shared {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            route: Label::Fixed("unrouted"),
            request_id: String::new(),
            passthrough: None,
            identity: None,
            rate: None,
            cors: None,
            span: tracing::Span::none(),
        }
    }

    /// Applies the request policy, then answers every REST route here; only pass-through
    /// prefixes go on to `upstream_peer`.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        if let Err(refusal) = self.apply_policy(session) {
            ctx.request_id = self.request_ids.next();
            ctx.route = Label::Fixed("refused");
            session.set_keepalive(None);
            self.write(session, ctx, Reply::refused(refusal)).await?;
            return Ok(true);
        }
        ctx.request_id = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| self.request_ids.next());
        ctx.span = self.server_span(session);
        let pass = self
            .config
            .load()
            .passthrough_for(session.req_header().uri.path())
            .map(|p| (p.label.clone(), p.target.clone(), p.access));
        if let Some((label, target, access)) = pass {
            ctx.route = Label::Shared(label);
            ctx.passthrough = Some((target, false));
            if let Err(reply) = self.admit_passthrough(session, ctx, access).await {
                self.write(session, ctx, reply).await?;
                return Ok(true);
            }
            if !forward::eligible(session) {
                return Ok(false);
            }
            return self.forward_direct(session, ctx).await.map(|()| true);
        }
        let span = ctx.span.clone();
        match self.own(session.req_header().uri.path()) {
            Own::Web(asset) => {
                ctx.route = Label::Fixed("web");
                return self.write_asset(session, asset).await.map(|()| true);
            }
            Own::Feed => return self.stream(session, ctx).await.map(|()| true),
            Own::Session => {
                let reply = self.session_call(session, ctx).instrument(span).await;
                self.write(session, ctx, reply).await?;
                return Ok(true);
            }
            Own::Console => {
                let reply = self.console_call(session, ctx).instrument(span).await;
                self.write(session, ctx, reply).await?;
                return Ok(true);
            }
            Own::Api => {}
        }
        let path = session.req_header().uri.path().to_owned();
        let grpc = session
            .req_header()
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("application/grpc"));
        if grpc {
            return match self.grpc_gate(session, ctx, &path).await {
                Ok(()) => Ok(false),
                Err((code, message)) => {
                    self.write_grpc_error(session, code, &message).await?;
                    Ok(true)
                }
            };
        }
        let reply = self.rest(session, ctx).instrument(span).await;
        self.write(session, ctx, reply).await?;
        Ok(true)
    }

    /// A pass-through response carries the rate limit's headers, as every other one does.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        for (name, value) in ctx.rate.take().iter().flat_map(|r| r.pairs()) {
            upstream.insert_header(name, value)?;
        }
        Ok(())
    }

    /// The upstream of a pass-through request: a plain HTTP one, or a service for gRPC.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let Some((target, h2)) = &ctx.passthrough else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no upstream for this request",
            ));
        };
        // A socket address, not a string: `HttpPeer::new` would parse (or resolve, blocking
        // the thread, and panic on failure) a string on every request.
        let addr = target.resolve().await.map_err(|e| {
            pingora::Error::explain(
                pingora::ErrorType::ConnectNoRoute,
                format!("upstream address: {e}"),
            )
        })?;
        let mut peer = HttpPeer::new(addr, false, String::new());
        if *h2 {
            // gRPC: HTTP/2 with prior knowledge to the service (h2c).
            peer.options.alpn = pingora::protocols::ALPN::H2;
        }
        Ok(Box::new(peer))
    }

    /// Identity headers a client sent never reach an upstream; the request id does.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        gateway_headers(upstream, ctx)
    }

    /// Request metrics by route, method and status.
    async fn logging(&self, session: &mut Session, _e: Option<&pingora::Error>, ctx: &mut Ctx) {
        let written = session.response_written();
        let status = written.map(|r| r.status);
        let status = status.as_ref().map(StatusCode::as_str).unwrap_or("0");
        let req = session.req_header();
        // The access log's fields are looked up only when it is written or a span takes them.
        let access = match self.access_log || !ctx.span.is_disabled() {
            false => crate::gateway::Access::default(),
            true => crate::gateway::Access {
                request_id: &ctx.request_id,
                client: self.client_ip(session),
                path: req.uri.path(),
                traceparent: req.headers.get("traceparent").and_then(|v| v.to_str().ok()),
                bytes_in: Some(session.body_bytes_read() as u64),
                bytes_out: Some(session.body_bytes_sent() as u64),
                upstream: ctx
                    .passthrough
                    .as_ref()
                    .map(|(t, _)| t as &(dyn std::fmt::Display + Sync)),
                cache: written.and_then(|r| r.headers.get("x-cache")?.to_str().ok()),
                identity: ctx.identity.as_deref(),
                rated: written.is_some_and(|r| r.headers.contains_key("ratelimit")),
                span: Some(&ctx.span),
            },
        };
        self.record(
            ctx.route.as_str(),
            req.method.as_str(),
            status,
            ctx.start,
            access,
        );
    }
}

/// What answers a request no pass-through prefix takes, by its path.
pub(crate) enum Own<'a> {
    /// A file of the built-in site.
    Web(&'a crate::web::Asset),
    /// The live event feed (server-sent events).
    Feed,
    /// The browser session calls (a cookie, not a bearer token).
    Session,
    /// The operator console's calls.
    Console,
    /// A REST route (or 404/405), or a gRPC call by its content type.
    Api,
}

impl Gateway {
    /// Which of the gateway's own answers a path gets: decided here for both HTTP/1 paths
    /// (Pingora's `request_filter` and the [front](crate::h1)'s REST calls).
    pub(crate) fn own(&self, path: &str) -> Own<'_> {
        if let Some(asset) = self.web.as_ref().and_then(|w| w.get(path)) {
            Own::Web(asset)
        } else if path == crate::feed::PATH {
            Own::Feed
        } else if path.starts_with(crate::rest::session::PREFIX) {
            Own::Session
        } else if crate::rest::console::is_console(path) {
            Own::Console
        } else {
            Own::Api
        }
    }

    /// The request's server span when spans are exported: a child of the trace the client's
    /// `traceparent` names, or the root of a new one.
    fn server_span(&self, session: &Session) -> tracing::Span {
        let req = session.req_header();
        let span = crate::gateway::server_span(req.method.as_str(), req.uri.path());
        if !span.is_disabled() {
            shopverse_kit::trace::continue_from_headers(&span, &req.headers);
        }
        span
    }

    /// The caller's address, from the peer and `X-Forwarded-For` ([`Self::client_ip_of`]).
    pub(crate) fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let xff = session
            .req_header()
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        self.client_ip_of(peer, xff)
    }

    /// Writes a file of the built-in site (GET and HEAD; anything else is 405).
    async fn write_asset(
        &self,
        session: &mut Session,
        asset: &crate::web::Asset,
    ) -> pingora::Result<()> {
        let req = session.req_header();
        let head = req.method == Method::HEAD;
        let header = |name| req.headers.get(name).and_then(|v| v.to_str().ok());
        let (status, headers, body) = if head || req.method == Method::GET {
            let gzip = crate::web::accepts_gzip(header("accept-encoding"));
            crate::web::answer(asset, gzip, header("if-none-match"))
        } else {
            let allow = vec![
                ("allow", "GET, HEAD".to_owned()),
                ("content-length", "0".to_owned()),
            ];
            (StatusCode::METHOD_NOT_ALLOWED, allow, bytes::Bytes::new())
        };
        let mut resp = ResponseHeader::build(status, Some(headers.len()))?;
        for (k, v) in headers {
            resp.insert_header(k, v)?;
        }
        let empty = head || body.is_empty();
        session.write_response_header(Box::new(resp), empty).await?;
        if !empty {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// Writes the gateway's own answer on Pingora's session.
    pub(crate) async fn write(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        reply: Reply,
    ) -> pingora::Result<()> {
        let (status, headers, body) = reply.into_response(&ctx.request_id, ctx.cors.as_deref());
        let mut resp = ResponseHeader::build(status, Some(headers.len()))?;
        for (k, v) in headers {
            resp.insert_header(k, v)?;
        }
        let head = session.req_header().method == Method::HEAD;
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// The [request policy](crate::policy) for a request Pingora's server parsed (HTTP/1 the
    /// front handed over, HTTP/2, TLS): the HTTP/1 framing and size rules, then the target,
    /// put in origin form with its path normalised, in place, so that the route, its access
    /// rule and what is forwarded all see the same path.
    fn apply_policy(&self, session: &mut Session) -> Result<(), crate::policy::Refusal> {
        use crate::policy::{self, Refusal};
        let bad = |reason| Refusal {
            status: StatusCode::BAD_REQUEST,
            reason,
        };
        let req = session.req_header();
        let limits = self.config.load().head_limits;
        let headers = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
        if session.is_http2() {
            // HTTP/2 frames its own messages: the size limits only.
            policy::check_size(headers, limits)?;
        } else {
            policy::check_head(req.version == http::Version::HTTP_11, headers, limits)?;
        }
        if !req.raw_path_is_utf8() {
            return Err(bad("the request target is not text"));
        }
        let raw = std::str::from_utf8(req.raw_path())
            .map_err(|_| bad("the request target is not text"))?;
        let target = policy::target(req.method.as_str(), raw)?;
        // Rewritten only when normalising changed the path (it borrows otherwise) or the target
        // came in absolute form: no string is built for the usual request.
        let rewritten = matches!(target.path, std::borrow::Cow::Owned(_))
            || !(raw.starts_with('/') || raw == "*");
        if rewritten {
            let uri = target
                .origin_form()
                .parse::<http::Uri>()
                .map_err(|_| bad("the request target is not a URI"))?;
            session.req_header_mut().set_uri(uri);
        }
        Ok(())
    }
}
