//! The Pingora side: one `ProxyHttp` whose `request_filter` answers REST calls itself
//! (route, authenticate, rate-limit, transcode, call the service) and lets only pass-through
//! routes continue to a plain HTTP upstream.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use prometheus::{HistogramVec, IntCounterVec};
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataMap;

use shopverse_edge_cache::Freshness;
use shopverse_kit::{Identity, Role};

use crate::auth::{AuthError, Verifier};
use crate::config::{GatewayConfig, LimitBy};
use crate::direct;
use crate::ratelimit::{Decision, Limiter};
use crate::router::{Access, MatchError, Router};
use crate::transcode::{request_message, response_json};
use crate::upstream::{Target, Upstreams};

/// How a request is named in metrics: a route template shared with the router, or a fixed
/// label; neither copies on the request path.
enum Label {
    Fixed(&'static str),
    Shared(std::sync::Arc<str>),
    Owned(String),
}

impl Label {
    fn as_str(&self) -> &str {
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
    route: Label,
    request_id: String,
    /// Where a pass-through request goes, and whether over HTTP/2 (gRPC).
    passthrough: Option<(Target, bool)>,
    /// The verified caller of a pass-through request.
    identity: Option<Arc<Identity>>,
    /// The rate limit's headers, for a pass-through response.
    rate_headers: Vec<(&'static str, String)>,
    /// `Access-Control-Allow-Origin` for a cross-origin request from an allowed origin.
    cors: Option<String>,
}

/// Everything shared across requests.
pub struct Gateway {
    pub(crate) router: Router,
    pub(crate) upstreams: Upstreams,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) limiter: Limiter,
    /// Policies and limits; SIGHUP swaps in a new one without touching connections.
    pub(crate) config: Arc<arc_swap::ArcSwap<GatewayConfig>>,
    pub(crate) metrics: Metrics,
    /// The OpenAPI document, rendered once.
    pub(crate) openapi: Bytes,
    /// The edge cache of public catalog responses, and who is fetching which key right now
    /// (concurrent misses on one key wait for one upstream call).
    pub(crate) cache: Option<Arc<shopverse_edge_cache::EdgeCache>>,
    pub(crate) inflight:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) clock: Arc<dyn shopverse_kit::Clock>,
    pub(crate) request_ids: RequestIds,
}

/// Request ids for requests that came without one: 32 hex digits, a random 64-bit prefix per
/// gateway process and a counter. Unique across gateways without a system call per request
/// (a random UUID was one `getrandom` each).
pub struct RequestIds {
    prefix: u64,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub fn new() -> RequestIds {
        RequestIds {
            prefix: uuid::Uuid::new_v4().as_u64_pair().0,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // By hand: `format!` costs more than the rest of the id's work together.
        let mut id = String::with_capacity(32);
        for word in [self.prefix, n] {
            for shift in (0..16).rev() {
                id.push(HEX[((word >> (shift * 4)) & 0xf) as usize] as char);
            }
        }
        id
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Metrics {
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub auth_failures: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_calls: IntCounterVec,
    pub cache_stale: prometheus::IntCounter,
    pub rate_limit_fallbacks: prometheus::IntCounter,
}

impl Metrics {
    pub fn new(registry: &prometheus::Registry) -> Metrics {
        use shopverse_kit::metrics::{int_counter_vec, register};
        #[allow(clippy::expect_used)] // constant names and buckets
        let latency = register(
            registry,
            HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "gateway_request_duration_seconds",
                    "Time to answer a request, by route",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ]),
                &["route"],
            )
            .expect("valid histogram"),
        );
        Metrics {
            requests: int_counter_vec(
                registry,
                "gateway_requests_total",
                "Requests by route, method and status",
                &[],
                &["route", "method", "status"],
            ),
            latency,
            auth_failures: int_counter_vec(
                registry,
                "gateway_auth_failures_total",
                "Refused tokens by reason",
                &[],
                &["reason"],
            ),
            rate_limited: int_counter_vec(
                registry,
                "gateway_rate_limited_total",
                "Requests refused by a rate limit, by policy",
                &[],
                &["policy"],
            ),
            rate_limit_fallbacks: shopverse_kit::metrics::int_counter(
                registry,
                "gateway_rate_limit_fallbacks_total",
                "Rate-limit decisions taken locally because Redis did not answer",
                &[],
            ),
            cache_stale: shopverse_kit::metrics::int_counter(
                registry,
                "gateway_edge_cache_stale_total",
                "Stale cache entries served",
                &[],
            ),
            upstream_calls: int_counter_vec(
                registry,
                "gateway_upstream_calls_total",
                "Calls to a service, by service",
                &[],
                &["service"],
            ),
            upstream_errors: int_counter_vec(
                registry,
                "gateway_upstream_errors_total",
                "Service calls that failed, by service and gRPC code",
                &[],
                &["service", "code"],
            ),
        }
    }
}

/// The HTTP status for a gRPC status code (the table Envoy and grpc-gateway use).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A response the gateway writes itself.
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    body: Bytes,
    pub(crate) headers: Vec<(&'static str, String)>,
    /// For an error: its gRPC code and message, so a gRPC caller gets the same refusal.
    grpc: Option<(Code, String)>,
}

impl Reply {
    fn json(status: StatusCode, body: Vec<u8>) -> Reply {
        Reply {
            status,
            body: Bytes::from(body),
            headers: Vec::new(),
            grpc: None,
        }
    }

    /// The one error shape: `{"code", "message", "details"}`.
    pub(crate) fn error(
        status: StatusCode,
        code: Code,
        message: &str,
        details: serde_json::Value,
    ) -> Reply {
        let body =
            serde_json::json!({ "code": code_name(code), "message": message, "details": details });
        Reply {
            grpc: Some((code, message.to_owned())),
            ..Reply::json(status, body.to_string().into_bytes())
        }
    }

    /// A request the [policy](crate::policy) refuses, in the one error shape. The connection
    /// closes after it: what follows a refused head cannot be trusted to be the next request.
    pub(crate) fn refused(r: crate::policy::Refusal) -> Reply {
        let code = match r.status {
            StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
            StatusCode::REQUEST_TIMEOUT => Code::DeadlineExceeded,
            // 400, and 413 and 431 as the REST routes have always named them.
            _ => Code::InvalidArgument,
        };
        Reply::error(r.status, code, r.reason, serde_json::json!([])).with("connection", "close")
    }

    /// Whether the connection closes after this reply.
    pub(crate) fn closes(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| *k == "connection" && v.eq_ignore_ascii_case("close"))
    }

    /// The gRPC status of this refusal.
    fn into_grpc(self) -> (Code, String) {
        self.grpc.unwrap_or((Code::Unknown, String::new()))
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    /// The answer to a pass-through request that failed before its response began, on
    /// either HTTP/1 path.
    pub(crate) fn for_failure(e: direct::Failure, route: &str) -> Reply {
        match e {
            direct::Failure::Timeout { .. } => {
                tracing::warn!(route, "{e}");
                Reply::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    Code::DeadlineExceeded,
                    "the upstream did not answer in time",
                    serde_json::json!([]),
                )
            }
            direct::Failure::ClientTimeout => Reply::error(
                StatusCode::REQUEST_TIMEOUT,
                Code::DeadlineExceeded,
                "the request body did not arrive in time",
                serde_json::json!([]),
            )
            .with("connection", "close"),
            direct::Failure::Client(e) => Reply::error(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                &format!("reading the request body: {e}"),
                serde_json::json!([]),
            ),
            e => {
                tracing::warn!(route, "{e}");
                Reply::error(
                    StatusCode::BAD_GATEWAY,
                    Code::Unavailable,
                    "the upstream is unavailable",
                    serde_json::json!([]),
                )
            }
        }
    }

    /// Status, headers and body as they go out, on either HTTP/1 path.
    pub(crate) fn into_response(
        self,
        request_id: &str,
        cors: Option<&str>,
    ) -> (StatusCode, Vec<(&'static str, String)>, Bytes) {
        let mut headers = Vec::with_capacity(10 + self.headers.len());
        headers.push(("content-type", "application/json".to_owned()));
        // A 204 has no body and no length; a 304's length would be the full answer's
        // (RFC 9110 8.6, 15.4.5), which this reply does not carry: none.
        if !matches!(self.status.as_u16(), 204 | 304) {
            headers.push(("content-length", self.body.len().to_string()));
        }
        headers.push(("x-request-id", request_id.to_owned()));
        headers.extend(SECURITY_HEADERS.map(|(k, v)| (k, v.to_owned())));
        if !self.headers.iter().any(|(k, _)| *k == "cache-control") {
            headers.push(("cache-control", "no-store".to_owned()));
        }
        let preflight = self.status == StatusCode::NO_CONTENT;
        headers.extend(self.headers);
        if let Some(origin) = cors
            && !preflight
        {
            headers.push(("access-control-allow-origin", origin.to_owned()));
            headers.push((
                "access-control-expose-headers",
                "x-request-id, retry-after, ratelimit, ratelimit-policy".to_owned(),
            ));
            headers.push(("vary", "origin".to_owned()));
        }
        (self.status, headers, self.body)
    }
}

/// Whether an `If-None-Match` value names `etag` (or is `*`): the client has it, a 304.
pub(crate) fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// Sent with every JSON answer, after `x-request-id`.
pub(crate) const SECURITY_HEADERS: [(&str, &str); 3] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
];

/// `RateLimit-Policy` and `RateLimit` for a decision of `policy`. Built by hand: on an admitted
/// request this runs every time, and `format!` cost more than the decision itself.
fn rate_headers(
    policy: &crate::config::RateLimitPolicy,
    d: &Decision,
) -> [(&'static str, String); 2] {
    let mut now = String::with_capacity(policy.name.len() + 24);
    now.push('"');
    now.push_str(&policy.name);
    now.push_str("\";r=");
    push_decimal(&mut now, u64::from(d.remaining));
    now.push_str(";t=");
    push_decimal(&mut now, d.reset_secs);
    [
        ("ratelimit-policy", policy.policy_header().to_owned()),
        ("ratelimit", now),
    ]
}

/// Whose budget a request spends. Its `Display`, `user:<id>` or `ip:<address>`, is the key in
/// the shared (Redis) limit; the in-process limit only hashes it, so a decision builds no string
/// (building one was a quarter of the limit's cost).
#[derive(Debug, Hash)]
enum Consumer<'a> {
    User(&'a str),
    Ip(IpAddr),
    Unknown,
}

impl std::fmt::Display for Consumer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consumer::User(id) => write!(f, "user:{id}"),
            Consumer::Ip(ip) => write!(f, "ip:{ip}"),
            Consumer::Unknown => f.write_str("ip:unknown"),
        }
    }
}

fn consumer_key<'a>(
    by: &LimitBy,
    identity: Option<&'a Identity>,
    ip: Option<IpAddr>,
) -> Consumer<'a> {
    match (by, identity, ip) {
        (LimitBy::User, Some(id), _) => Consumer::User(&id.user_id),
        (_, _, Some(ip)) => Consumer::Ip(ip),
        (_, _, None) => Consumer::Unknown,
    }
}

fn push_decimal(s: &mut String, n: u64) {
    for &d in decimal(n, &mut [0; 20]) {
        s.push(char::from(d));
    }
}

/// `n`'s decimal digits, written into the end of `digits`.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// A service call, kept whole so a background refresh can repeat it.
#[derive(Clone)]
struct UpstreamCall {
    service: String,
    path: String,
    body: Bytes,
    md: MetadataMap,
    output: prost_reflect::MessageDescriptor,
    tags: Vec<String>,
}

/// The client asked for a response from the service, not from a cache.
fn wants_fresh(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"))
}

/// Tags an entry is purged by: a product's id, or `catalog` for lists.
fn cache_tags(rpc: &str, bindings: &[(String, String)]) -> Vec<String> {
    match rpc {
        "GetProduct" => bindings
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| format!("product:{v}"))
            .collect(),
        _ => vec!["catalog".to_owned()],
    }
}

fn etag_of(body: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(body);
    format!(
        "\"{}\"",
        d.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

impl Gateway {
    /// Calls the service and turns its answer into a cache entry (`Err`: the reply to send).
    async fn fetch_entry(
        upstreams: &Upstreams,
        call: &UpstreamCall,
        config: &crate::config::EdgeCacheConfig,
        now: i64,
    ) -> Result<shopverse_edge_cache::Entry, tonic::Status> {
        let bytes = upstreams
            .unary(
                &call.service,
                &call.path,
                call.body.clone(),
                call.md.clone(),
                true,
            )
            .await?;
        let json = response_json(&call.output, &bytes).map_err(tonic::Status::internal)?;
        let mut tags = call.tags.clone();
        if call.tags.is_empty()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
            && let Some(id) = v["id"].as_str()
        {
            tags.push(format!("product:{id}"));
        }
        Ok(shopverse_edge_cache::Entry {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            etag: Some(etag_of(&json)),
            body: Bytes::from(json),
            stored_at_ms: now,
            ttl_ms: i64::try_from(config.ttl_secs * 1000).unwrap_or(i64::MAX),
            stale_while_revalidate_ms: i64::try_from(config.stale_while_revalidate_secs * 1000)
                .unwrap_or(i64::MAX),
            stale_if_error_ms: i64::try_from(config.stale_if_error_secs * 1000).unwrap_or(i64::MAX),
            tags,
        })
    }

    /// A reply from a cache entry: 304 when the client has it, else the body; `label` is the
    /// `x-cache` value.
    fn reply_from_cache(
        &self,
        session: &Session,
        e: &shopverse_edge_cache::Entry,
        label: &'static str,
    ) -> Reply {
        let inm = session
            .req_header()
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok());
        self.reply_from_entry(inm, e, label)
    }

    /// [`Self::reply_from_cache`] for a request with this `If-None-Match`.
    pub(crate) fn reply_from_entry(
        &self,
        inm: Option<&str>,
        e: &shopverse_edge_cache::Entry,
        label: &'static str,
    ) -> Reply {
        let etag = e.etag.clone().unwrap_or_default();
        let max_age = e.max_age_secs(self.clock.now_ms());
        let mut reply = if etag_matches(inm, &etag) {
            Reply {
                status: StatusCode::NOT_MODIFIED,
                body: Bytes::new(),
                headers: Vec::new(),
                grpc: None,
            }
        } else {
            Reply {
                // The entry's bytes, shared rather than copied.
                body: e.body.clone(),
                ..Reply::json(
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::OK),
                    Vec::new(),
                )
            }
        };
        if label == "STALE" {
            self.metrics.cache_stale.inc();
        }
        reply.headers.push(("x-cache", label.to_owned()));
        reply.headers.push(("etag", etag));
        reply
            .headers
            .push(("cache-control", format!("public, max-age={max_age}")));
        reply
    }

    /// The edge cache: fresh entries are served, stale ones served while refreshed, misses
    /// fetched once however many ask at the same time, and a failing service answered from a
    /// stale entry while `stale_if_error` allows.
    async fn cached(
        &self,
        cache: &Arc<shopverse_edge_cache::EdgeCache>,
        session: &Session,
        key: String,
        // What the caller found under `key` (None: nothing, or the client wants it fresh).
        looked_up: Option<(Arc<shopverse_edge_cache::Entry>, Freshness)>,
        call: UpstreamCall,
    ) -> Reply {
        // The live configuration, shared (not its cache section copied per request).
        let config = self.config.load_full();
        let no_cache = wants_fresh(session);
        let mut stale = None;
        if let Some((e, f)) = looked_up {
            match f {
                Freshness::Fresh => return self.reply_from_cache(session, &e, "HIT"),
                Freshness::Stale => {
                    // Serve now, refresh behind.
                    let (cache, upstreams, key, call, clock) = (
                        cache.clone(),
                        self.upstreams.clone(),
                        key.clone(),
                        call.clone(),
                        self.clock.clone(),
                    );
                    self.metrics
                        .upstream_calls
                        .with_label_values(&[&call.service])
                        .inc();
                    tokio::spawn(async move {
                        if let Ok(fresh) =
                            Self::fetch_entry(&upstreams, &call, &config.cache, clock.now_ms())
                                .await
                        {
                            let _ = cache.put(&key, &fresh);
                        }
                    });
                    return self.reply_from_cache(session, &e, "STALE");
                }
                Freshness::StaleIfError => stale = Some(e),
                Freshness::Expired => {}
            }
        }
        let lock = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "cache lock poisoned",
                    serde_json::json!([]),
                );
            };
            inflight.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock().await;
        // Someone else may have fetched it while we waited.
        if !no_cache && let Ok(Some((e, Freshness::Fresh))) = cache.get(&key, self.clock.now_ms()) {
            return self.reply_from_cache(session, &e, "HIT");
        }
        self.metrics
            .upstream_calls
            .with_label_values(&[&call.service])
            .inc();
        let fetched =
            Self::fetch_entry(&self.upstreams, &call, &config.cache, self.clock.now_ms()).await;
        // Stored before the lock is released: a request that takes the lock next (or a new
        // one, once the lock is gone) must find the entry, not fetch it again.
        if let Ok(entry) = &fetched
            && let Err(e) = cache.put(&key, entry)
        {
            tracing::warn!(error = %e, "storing in the edge cache failed");
        }
        drop(guard);
        if let Ok(mut inflight) = self.inflight.lock()
            && inflight
                .get(&key)
                .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            inflight.remove(&key);
        }
        match fetched {
            Ok(entry) => self.reply_from_cache(session, &entry, "MISS"),
            Err(status) => match stale {
                Some(e) => self.reply_from_cache(session, &e, "STALE"),
                None => {
                    let message = match status.code() {
                        Code::Unavailable => format!("the {} service is unavailable", call.service),
                        _ => status.message().to_owned(),
                    };
                    Reply::error(
                        http_status(status.code()),
                        status.code(),
                        &message,
                        serde_json::json!([]),
                    )
                    .with("x-cache", "MISS")
                }
            },
        }
    }

    fn client_ip(&self, session: &Session) -> Option<IpAddr> {
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

    /// The caller's address: the peer's, or the right-most `X-Forwarded-For` entry when the
    /// peer is a trusted proxy.
    pub(crate) fn client_ip_of(&self, peer: Option<IpAddr>, xff: Option<&str>) -> Option<IpAddr> {
        if let Some(p) = peer
            && let Some(xff) = xff
            && self.config.load().trusted_proxies.contains(&p)
            && let Some(first) = xff
                .split(',')
                .next_back()
                .and_then(|s| s.trim().parse().ok())
        {
            // The right-most address is the one our trusted proxy saw.
            return Some(first);
        }
        peer
    }

    async fn authenticate(
        &self,
        session: &Session,
        access: Access,
    ) -> Result<Option<Arc<Identity>>, Reply> {
        let header = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.authorize(header, access).await
    }

    /// The caller of a request with this `Authorization` header, if `access` lets it in.
    pub(crate) async fn authorize(
        &self,
        header: Option<&str>,
        access: Access,
    ) -> Result<Option<Arc<Identity>>, Reply> {
        let token = match header {
            Some(h) if h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer ") => Some(h[7..].trim()),
            Some(_) => return Err(self.unauthorized(AuthError::Malformed)),
            None => None,
        };
        let identity = match token {
            Some(t) => Some(
                self.verifier
                    .verify(t)
                    .await
                    .map_err(|e| self.unauthorized(e))?,
            ),
            None => None,
        };
        match (access, &identity) {
            (Access::Public, _) => Ok(identity),
            (_, None) => Err(self.unauthorized(AuthError::Missing)),
            (Access::Customer, Some(id)) if id.has(Role::Customer) => Ok(identity),
            (Access::Admin, Some(id)) if id.has(Role::Admin) => Ok(identity),
            (_, Some(_)) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&["role"])
                    .inc();
                Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    Code::PermissionDenied,
                    "your account lacks the role this call needs",
                    serde_json::json!([]),
                ))
            }
        }
    }

    fn unauthorized(&self, e: AuthError) -> Reply {
        self.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        let www = match e {
            AuthError::Missing => "Bearer realm=\"shopverse\"".to_owned(),
            _ => format!(
                "Bearer realm=\"shopverse\", error=\"invalid_token\", error_description=\"{e}\""
            ),
        };
        Reply::error(
            StatusCode::UNAUTHORIZED,
            Code::Unauthenticated,
            &e.to_string(),
            serde_json::json!([]),
        )
        .with("www-authenticate", www)
    }

    async fn rate_limit(
        &self,
        path: &str,
        identity: Option<&Identity>,
        ip: Option<IpAddr>,
    ) -> Result<Vec<(&'static str, String)>, Reply> {
        let config = self.config.load();
        let Some((i, policy)) = config.rate_limits.iter().enumerate().find(|(_, p)| {
            p.paths.is_empty() || p.paths.iter().any(|pre| path.starts_with(pre.as_str()))
        }) else {
            return Ok(Vec::new());
        };
        let consumer = consumer_key(&policy.by, identity, ip);
        let d = self.limiter.check(i, policy, &consumer).await;
        let headers = rate_headers(policy, &d);
        if d.allowed {
            return Ok(Vec::from(headers));
        }
        self.metrics
            .rate_limited
            .with_label_values(&[&policy.name])
            .inc();
        let mut reply = Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            Code::ResourceExhausted,
            &format!(
                "rate limit `{}` exceeded; retry in {} s",
                policy.name, d.retry_after_secs
            ),
            serde_json::json!([]),
        )
        .with("retry-after", d.retry_after_secs.to_string());
        reply.headers.extend(headers);
        Err(reply)
    }

    async fn read_body(&self, session: &mut Session) -> Result<Vec<u8>, Reply> {
        let too_big = || {
            Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
                &format!(
                    "the request body is larger than {} bytes",
                    self.config.load().max_body_bytes
                ),
                serde_json::json!([]),
            )
        };
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.config.load().max_body_bytes) {
            return Err(too_big());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(0));
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.load().client_body_timeout_ms);
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, session.read_request_body()).await
            else {
                return Err(Reply::error(
                    StatusCode::REQUEST_TIMEOUT,
                    Code::DeadlineExceeded,
                    "the request body did not arrive in time",
                    serde_json::json!([]),
                )
                .with("connection", "close"));
            };
            match next {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.config.load().max_body_bytes {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(Reply::error(
                        StatusCode::BAD_REQUEST,
                        Code::InvalidArgument,
                        &format!("reading the request body: {e}"),
                        serde_json::json!([]),
                    ));
                }
            }
        }
    }

    /// Routes, authenticates, limits, transcodes and calls. `Ok(None)`: not a REST route (a
    /// pass-through continues to its upstream).
    async fn handle(&self, session: &mut Session, ctx: &mut Ctx) -> Reply {
        let method = session.req_header().method.clone();
        let uri = session.req_header().uri.clone();
        let path = uri.path();
        if let Some(reply) = self.preflight(session, ctx, &method, path) {
            return reply;
        }
        if path == "/openapi.json" && (method == Method::GET || method == Method::HEAD) {
            ctx.route = Label::Fixed("/openapi.json");
            return Reply::json(StatusCode::OK, self.openapi.to_vec());
        }
        let m = match self.router.find(&method, path) {
            Ok(m) => m,
            Err(MatchError::NotFound) => {
                ctx.route = Label::Fixed("not_found");
                return Reply::error(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    &format!("no route for {path}"),
                    serde_json::json!([]),
                );
            }
            Err(MatchError::MethodNotAllowed(allowed)) => {
                ctx.route = Label::Fixed("method_not_allowed");
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Reply::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Code::Unimplemented,
                    &format!("{method} is not allowed on {path}"),
                    serde_json::json!([]),
                )
                .with("allow", allow);
            }
        };
        ctx.route = Label::Shared(m.route.template.clone());
        let identity = match self.authenticate(session, m.route.access).await {
            Ok(id) => id,
            Err(r) => return r,
        };
        let ip = self.client_ip(session);
        let limit_headers = match self.rate_limit(path, identity.as_deref(), ip).await {
            Ok(h) => h,
            Err(r) => return r,
        };
        let cacheable = self.cacheable(&method, m.route);
        // A signed-in caller may see more than the public (an admin sees archived products):
        // such responses are neither served from nor stored in the shared cache.
        let bypass = cacheable && identity.is_some();
        let cache_key =
            (cacheable && !bypass).then(|| format!("{}?{}", path, uri.query().unwrap_or("")));
        // A fresh hit is answered before the request is transcoded: an entry exists only for
        // a request (the same path and query) that was valid and answered before.
        // The one lookup of this request; `cached` goes on from it on a miss.
        let looked_up = match (&self.cache, &cache_key) {
            (Some(cache), Some(key)) if !wants_fresh(session) => {
                cache.get(key, self.clock.now_ms()).ok().flatten()
            }
            _ => None,
        };
        if let Some((e, Freshness::Fresh)) = &looked_up {
            let mut reply = self.reply_from_cache(session, e, "HIT");
            reply.headers.extend(limit_headers);
            return reply;
        }
        let body = match self.read_body(session).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let msg = match request_message(m.route, &m.bindings, uri.query(), &body) {
            Ok(msg) => msg,
            Err(e) => {
                let details = match &e.field {
                    Some(f) => serde_json::json!([{ "field": f }]),
                    None => serde_json::json!([]),
                };
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidArgument,
                    &e.message,
                    details,
                );
            }
        };
        let mut md = MetadataMap::new();
        if let Some(id) = &identity {
            id.write_to(&mut md);
        }
        if let Ok(v) = ctx.request_id.parse() {
            md.insert("x-request-id", v);
        }
        if let Some(tp) = session
            .req_header()
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            && let Ok(v) = tp.parse()
        {
            md.insert("traceparent", v);
        }
        let service = m.route.service.clone();
        if let Some(cache) = self.cache.clone()
            && let Some(key) = cache_key
        {
            let call = UpstreamCall {
                service,
                path: m.route.grpc_path.clone(),
                body: msg.encode_to_vec().into(),
                md,
                output: m.route.method.output(),
                tags: cache_tags(m.route.method.name(), &m.bindings),
            };
            let mut reply = self.cached(&cache, session, key, looked_up, call).await;
            reply.headers.extend(limit_headers);
            return reply;
        }
        self.metrics
            .upstream_calls
            .with_label_values(&[&service])
            .inc();
        let result = self
            .upstreams
            .unary(
                &service,
                &m.route.grpc_path,
                msg.encode_to_vec().into(),
                md,
                m.route.http_method == Method::GET,
            )
            .await;
        let mut reply = match result {
            Ok(bytes) => match response_json(&m.route.method.output(), &bytes) {
                Ok(json) => Reply::json(StatusCode::OK, json),
                Err(e) => Reply::error(
                    StatusCode::BAD_GATEWAY,
                    Code::Internal,
                    &e,
                    serde_json::json!([]),
                ),
            },
            Err(status) => {
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown
                ) {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[&service, code_name(status.code())])
                        .inc();
                }
                let details = match status
                    .metadata()
                    .get("x-shopverse-field")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(f) => serde_json::json!([{ "field": f }]),
                    None => serde_json::json!([]),
                };
                let message = match status.code() {
                    Code::Unavailable => format!("the {service} service is unavailable"),
                    _ => status.message().to_owned(),
                };
                Reply::error(http_status(status.code()), status.code(), &message, details)
            }
        };
        reply.headers.extend(limit_headers);
        if bypass {
            reply.headers.push(("x-cache", "BYPASS".to_owned()));
        }
        reply
    }

    /// Whether answers to `method` on `route` are kept in the edge cache.
    pub(crate) fn cacheable(&self, method: &Method, route: &crate::router::Route) -> bool {
        self.cache.is_some()
            && (*method == Method::GET || *method == Method::HEAD)
            && route.access == Access::Public
            && self
                .config
                .load()
                .cache
                .rpcs
                .iter()
                .any(|r| r == route.method.name())
    }

    /// Notes the CORS origin of the request and answers a preflight (`OPTIONS` with
    /// `Access-Control-Request-Method`) itself.
    fn preflight(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        method: &Method,
        path: &str,
    ) -> Option<Reply> {
        let headers = &session.req_header().headers;
        let origin = headers.get("origin").and_then(|v| v.to_str().ok())?;
        ctx.cors = self.config.load().cors.allow(origin);
        if *method != Method::OPTIONS || !headers.contains_key("access-control-request-method") {
            return None;
        }
        ctx.route = Label::Fixed("preflight");
        let Some(allow_origin) = ctx.cors.clone() else {
            return Some(Reply::error(
                StatusCode::FORBIDDEN,
                Code::PermissionDenied,
                "this origin may not call the API",
                serde_json::json!([]),
            ));
        };
        let methods = match self.router.find(&Method::OPTIONS, path) {
            Err(MatchError::MethodNotAllowed(m)) => {
                m.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
            }
            _ => {
                return Some(Reply::error(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    &format!("no route for {path}"),
                    serde_json::json!([]),
                ));
            }
        };
        Some(Reply {
            status: StatusCode::NO_CONTENT,
            body: Bytes::new(),
            headers: vec![
                ("access-control-allow-origin", allow_origin),
                ("access-control-allow-methods", methods),
                (
                    "access-control-allow-headers",
                    self.config.load().cors.allowed_headers.join(", "),
                ),
                (
                    "access-control-max-age",
                    self.config.load().cors.max_age_secs.to_string(),
                ),
                ("vary", "origin".into()),
            ],
            grpc: None,
        })
    }

    /// A plain pass-through request, proxied here rather than by Pingora's proxy loop
    /// (see [`direct`]); a failure before the response started is answered as JSON.
    async fn forward_direct(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<()> {
        let Some((target, _)) = &ctx.passthrough else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no upstream for this request",
            ));
        };
        let reply = match target.resolve().await {
            Err(e) => Reply::error(
                StatusCode::BAD_GATEWAY,
                Code::Unavailable,
                &format!("upstream address: {e}"),
                serde_json::json!([]),
            ),
            Ok(addr) => {
                let limits = {
                    let config = self.config.load();
                    direct::Limits {
                        upstream: Duration::from_millis(config.request_timeout_ms),
                        client_body: Duration::from_millis(config.client_body_timeout_ms),
                    }
                };
                let extra = std::mem::take(&mut ctx.rate_headers);
                let prepare = |req: &mut RequestHeader| gateway_headers(req, ctx);
                match direct::forward(session, addr, limits, prepare, extra).await {
                    Ok(()) => return Ok(()),
                    Err(direct::Failure::Midway(e) | direct::Failure::Client(e)) => return Err(e),
                    Err(e) => Reply::for_failure(e, ctx.route.as_str()),
                }
            }
        };
        self.write(session, ctx, reply).await
    }

    /// The route's access rule and the rate limits, for a plain HTTP pass-through request.
    async fn admit_passthrough(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        access: Access,
    ) -> Result<(), Reply> {
        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let ip = self.client_ip(session);
        let (identity, rate_headers) = self
            .admit(session.req_header().uri.path(), access, authorization, ip)
            .await?;
        ctx.identity = identity;
        ctx.rate_headers = rate_headers;
        Ok(())
    }

    /// [`Self::admit_passthrough`] for a request the HTTP/1 front parsed itself: the caller
    /// and the rate limit's headers.
    pub(crate) async fn admit(
        &self,
        path: &str,
        access: Access,
        authorization: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<(Option<Arc<Identity>>, Vec<(&'static str, String)>), Reply> {
        let identity = self.authorize(authorization, access).await?;
        let headers = self.rate_limit(path, identity.as_deref(), ip).await?;
        Ok((identity, headers))
    }

    /// Lets a gRPC call through to its service if its method is public or the caller's token
    /// carries the role, within the rate limits; `Err` is the gRPC status to answer with.
    async fn grpc_gate(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        path: &str,
    ) -> Result<(), (Code, String)> {
        let (service, access) = self
            .router
            .grpc_method(path)
            .ok_or_else(|| (Code::Unimplemented, format!("unknown method {path}")))?;
        let access = access.ok_or((
            Code::PermissionDenied,
            "internal methods are not reachable through the gateway".to_owned(),
        ))?;
        ctx.route = Label::Owned(format!("grpc:{path}"));
        let identity = self
            .authenticate(session, access)
            .await
            .map_err(Reply::into_grpc)?;
        let ip = self.client_ip(session);
        self.rate_limit(path, identity.as_deref(), ip)
            .await
            .map_err(Reply::into_grpc)?;
        let upstream = self.upstreams.pick_address(&service).ok_or_else(|| {
            (
                Code::Unavailable,
                format!("no upstream is configured for the {service} service"),
            )
        })?;
        ctx.identity = identity;
        ctx.passthrough = Some((upstream, true));
        Ok(())
    }

    /// A trailers-only gRPC response carrying `code`.
    async fn write_grpc_error(
        &self,
        session: &mut Session,
        code: Code,
        message: &str,
    ) -> pingora::Result<()> {
        let mut resp = ResponseHeader::build(StatusCode::OK, Some(4))?;
        resp.insert_header("content-type", "application/grpc")?;
        resp.insert_header("grpc-status", (code as i32).to_string())?;
        let msg: String = message
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
            .collect();
        resp.insert_header("grpc-message", msg)?;
        session.write_response_header(Box::new(resp), true).await
    }

    async fn write(&self, session: &mut Session, ctx: &Ctx, reply: Reply) -> pingora::Result<()> {
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
        let limits = {
            let config = self.config.load();
            policy::HeadLimits {
                max_headers: config.max_headers,
                max_header_bytes: config.max_header_bytes,
                max_body_bytes: config.max_body_bytes,
            }
        };
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

    /// Counts a finished request and its latency under its route.
    pub(crate) fn record(&self, route: &str, method: &str, status: &str, start: Instant) {
        self.metrics
            .requests
            .with_label_values(&[route, method, status])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[route])
            .observe(start.elapsed().as_secs_f64());
    }
}

/// The gateway as Pingora's proxy holds it; the HTTP/1 front ([`crate::front`]) shares it.
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
            rate_headers: Vec::new(),
            cors: None,
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
        let pass = self
            .config
            .load()
            .passthrough_for(session.req_header().uri.path())
            .map(|p| (p.label(), p.target(), p.access));
        if let Some((label, target, access)) = pass {
            ctx.route = Label::Shared(label);
            ctx.passthrough = Some((target, false));
            if let Err(reply) = self.admit_passthrough(session, ctx, access).await {
                self.write(session, ctx, reply).await?;
                return Ok(true);
            }
            if !direct::eligible(session) {
                return Ok(false);
            }
            return self.forward_direct(session, ctx).await.map(|()| true);
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
        let reply = self.handle(session, ctx).await;
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
        for (name, value) in std::mem::take(&mut ctx.rate_headers) {
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
        let status = session.response_written().map(|r| r.status);
        let status = status.as_ref().map(StatusCode::as_str).unwrap_or("0");
        self.record(
            ctx.route.as_str(),
            session.req_header().method.as_str(),
            status,
            ctx.start,
        );
    }
}

/// Identity headers a client sent never reach an upstream: the verified caller's do, and the
/// request id.
fn gateway_headers(upstream: &mut RequestHeader, ctx: &Ctx) -> pingora::Result<()> {
    // Parsed header names: a `&str` would be parsed again on every request.
    static USER: http::HeaderName =
        http::HeaderName::from_static(shopverse_kit::identity::USER_HEADER);
    static ROLES: http::HeaderName =
        http::HeaderName::from_static(shopverse_kit::identity::ROLES_HEADER);
    static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
    // The identity headers a client sent, in any spelling ([`crate::policy::is_identity`]):
    // one pass to see whether there is any, since removing costs even when absent.
    let claimed = |k: &http::HeaderName| crate::policy::is_identity(k.as_str().as_bytes());
    if upstream.headers.keys().any(claimed) {
        let names: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|k| claimed(k))
            .cloned()
            .collect();
        for name in names {
            upstream.remove_header(&name);
        }
    }
    upstream.insert_header(&REQUEST_ID, ctx.request_id.as_str())?;
    if let Some(id) = &ctx.identity {
        upstream.insert_header(&USER, id.user_id.as_str())?;
        let roles: Vec<&str> = id.roles.iter().map(|r| r.as_str()).collect();
        upstream.insert_header(&ROLES, roles.join(","))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{IpAddr, LimitBy, Reply, RequestIds, StatusCode, consumer_key};

    #[test]
    fn a_304_and_a_204_carry_no_length() {
        for status in [StatusCode::NOT_MODIFIED, StatusCode::NO_CONTENT] {
            let (_, headers, body) = Reply::json(status, Vec::new()).into_response("id", None);
            assert!(body.is_empty());
            assert!(
                !headers.iter().any(|(k, _)| *k == "content-length"),
                "{status}: {headers:?}"
            );
        }
        let (_, headers, _) = Reply::json(StatusCode::OK, b"{}".to_vec()).into_response("id", None);
        assert!(headers.contains(&("content-length", "2".to_owned())));
    }

    #[test]
    fn rate_headers_read_as_the_ietf_draft_spells_them() {
        let policy = crate::config::RateLimitPolicy {
            name: "default".into(),
            paths: vec![],
            requests: 50,
            per_secs: 1,
            burst: 100,
            by: crate::config::LimitBy::User,
            policy_header: Default::default(),
        };
        for (remaining, reset) in [(0u32, 0u64), (7, 10), (99, 1234567890123)] {
            let d = crate::ratelimit::Decision {
                allowed: true,
                limit: 100,
                remaining,
                reset_secs: reset,
                retry_after_secs: 0,
            };
            let [p, r] = super::rate_headers(&policy, &d);
            assert_eq!(p, ("ratelimit-policy", "\"default\";q=100;w=1".to_owned()));
            assert_eq!(
                r,
                ("ratelimit", format!("\"default\";r={remaining};t={reset}"))
            );
        }
    }

    #[test]
    fn consumer_keys_read_as_format_would_write_them() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        for v4 in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(10, 20, 255, 9),
        ] {
            let ip = IpAddr::V4(v4);
            assert_eq!(
                consumer_key(&LimitBy::Ip, None, Some(ip)).to_string(),
                format!("ip:{ip}")
            );
        }
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            consumer_key(&LimitBy::Ip, None, Some(v6)).to_string(),
            "ip:::1"
        );
        assert_eq!(
            consumer_key(&LimitBy::User, None, None).to_string(),
            "ip:unknown"
        );
    }

    #[test]
    fn request_ids_are_32_hex_digits_and_differ_within_and_across_gateways() {
        let known = RequestIds {
            prefix: 0x0123_4567_89ab_cdef,
            next: std::sync::atomic::AtomicU64::new(0xfe),
        };
        assert_eq!(known.next(), "0123456789abcdef00000000000000fe");
        let (a, b) = (RequestIds::new(), RequestIds::new());
        let ids = [a.next(), a.next(), b.next()];
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_ne!(ids[0], ids[1]);
        assert_ne!(ids[0], ids[2], "two gateways made the same id");
    }
}
