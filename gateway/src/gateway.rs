//! What every request path shares: the gateway's state, its metrics and request ids.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use prometheus::{HistogramVec, IntCounterVec};

use crate::auth::Verifier;
use crate::live::Live;
use crate::ratelimit::Limiter;
use crate::router::Router;
use crate::upstream::Upstreams;

/// Everything shared across requests.
pub struct Gateway {
    pub(crate) router: Router,
    pub(crate) upstreams: Upstreams,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) limiter: Limiter,
    /// Policies and limits; SIGHUP swaps in a new one without touching connections.
    pub(crate) config: Arc<arc_swap::ArcSwap<Live>>,
    pub(crate) metrics: Metrics,
    /// The OpenAPI document, rendered once.
    pub(crate) openapi: Bytes,
    /// The edge cache of public catalog responses, and who is fetching which key right now
    /// (concurrent misses on one key wait for one upstream call).
    pub(crate) cache: Arc<crate::CacheSlot>,
    pub(crate) inflight:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    pub(crate) clock: Arc<dyn shopverse_kit::Clock>,
    pub(crate) request_ids: RequestIds,
    /// Whether each request is written to the access log.
    pub(crate) access_log: bool,
    /// The live event stream, when served.
    pub(crate) feed: Option<Arc<crate::feed::Feed>>,
    /// Where the process's metrics are registered: the console reads the consumers' lag
    /// from it when they run in this process.
    pub(crate) registry: prometheus::Registry,
    /// The storefront and console, when served.
    pub(crate) web: Option<crate::web::Web>,
    /// The event bus, when the gateway has one (the console's dead letters).
    pub(crate) bus: Option<Arc<dyn shopverse_events::EventBus>>,
}

/// What the access log says of one finished request, beyond its route, method, status and
/// time (which the metrics take too). What a path does not know is left out of the line.
#[derive(Default)]
pub(crate) struct Access<'a> {
    pub request_id: &'a str,
    pub client: Option<std::net::IpAddr>,
    /// The path as routed (normalised), without the query.
    pub path: &'a str,
    /// The client's `traceparent`, whose trace id the line carries.
    pub traceparent: Option<&'a str>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    /// Where it went: a service, or a pass-through upstream's address.
    pub upstream: Option<&'a (dyn std::fmt::Display + Sync)>,
    /// `HIT`, `MISS`, `STALE`, `BYPASS`: the edge cache's `x-cache`.
    pub cache: Option<&'a str>,
    /// The verified caller (the line names its user id, never the token).
    pub identity: Option<&'a shopverse_kit::Identity>,
    /// Whether a rate-limit policy admitted the request (a refusal is its 429).
    pub rated: bool,
    /// The request's server span, when spans are exported: finished with what the request
    /// got, and the trace id the line carries.
    pub span: Option<&'a tracing::Span>,
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn trace_id(traceparent: &str) -> Option<&str> {
    let id = traceparent.get(3..35)?;
    let ok = traceparent.as_bytes().get(2) == Some(&b'-')
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && id.bytes().any(|b| b != b'0');
    ok.then_some(id)
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
        // By hand, into bytes, then one validated copy: `format!`, or a `char` push per
        // digit, costs more than the rest of the id's work together.
        let mut digits = [0u8; 32];
        for (i, word) in [self.prefix, n].into_iter().enumerate() {
            for j in 0..16 {
                digits[i * 16 + j] = HEX[((word >> ((15 - j) * 4)) & 0xf) as usize];
            }
        }
        std::str::from_utf8(&digits).unwrap_or_default().to_owned()
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
    /// REST calls the HTTP/1 front answered itself (the rest went through Pingora's session).
    pub front_rest_calls: prometheus::IntCounter,
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
                .namespace(shopverse_kit::metrics::NAMESPACE)
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
            front_rest_calls: shopverse_kit::metrics::int_counter(
                registry,
                "gateway_front_rest_calls_total",
                "REST calls answered on the HTTP/1 front rather than on a Pingora session",
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

impl Gateway {
    /// Counts a finished request and its latency under its route, and writes its access-log
    /// line.
    pub(crate) fn record(
        &self,
        route: &str,
        method: &str,
        status: &str,
        start: Instant,
        access: Access<'_>,
    ) {
        let elapsed = start.elapsed();
        self.metrics
            .requests
            .with_label_values(&[route, method, status])
            .inc();
        // An event stream lasts as long as its client stays: not a latency.
        if route != crate::feed::PATH {
            self.metrics
                .latency
                .with_label_values(&[route])
                .observe(elapsed.as_secs_f64());
        }
        let span_trace = match access.span {
            Some(span) if !span.is_disabled() => {
                finish_span(span, route, status, &access);
                shopverse_kit::trace::trace_id_of(span)
            }
            _ => None,
        };
        if !self.access_log {
            return;
        }
        let line = crate::access::Line {
            route,
            method,
            status,
            elapsed,
            trace_id: span_trace
                .as_deref()
                .or_else(|| access.traceparent.and_then(trace_id)),
        };
        crate::access::write(shopverse_kit::telemetry::line_sink(), &line, &access);
    }
}

/// The server span of a request on any path, when spans are exported; the caller makes it
/// the child of the client's trace context, or leaves it starting a trace.
pub(crate) fn server_span(method: &str, path: &str) -> tracing::Span {
    if !shopverse_kit::trace::enabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "http.server",
        otel.name = %format_args!("{method} {path}"),
        otel.kind = "server",
        http.request.method = method,
        url.path = path,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        service.name = "gateway",
        server.address = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
        shopverse.consumer = tracing::field::Empty,
        shopverse.cache = tracing::field::Empty,
        shopverse.rate_limit = tracing::field::Empty,
    )
}

/// What the gateway decided about a request, on its server span: the route template, the
/// status, who called (the user id and `anonymous`, `customer` or `admin`, never the token),
/// where it went, the edge cache's outcome and the rate limit's verdict (`limited`,
/// `admitted`, or `none` on a route without a policy).
fn finish_span(span: &tracing::Span, route: &str, status: &str, access: &Access<'_>) {
    span.record("http.route", route);
    let code = status.parse::<u16>().unwrap_or(0);
    span.record("http.response.status_code", code);
    if code >= 500 || code == 0 {
        span.record("otel.status_code", "ERROR");
    }
    let consumer = match access.identity {
        None => "anonymous",
        Some(id) if id.is_admin() => "admin",
        Some(_) => "customer",
    };
    if let Some(id) = access.identity {
        span.record("enduser.id", id.user_id.as_str());
    }
    span.record("shopverse.consumer", consumer);
    if let Some(upstream) = access.upstream {
        span.record("server.address", tracing::field::display(upstream));
    }
    if let Some(cache) = access.cache {
        span.record("shopverse.cache", cache);
    }
    let verdict = match (code, access.rated) {
        (429, _) => "limited",
        (_, true) => "admitted",
        (_, false) => "none",
    };
    span.record("shopverse.rate_limit", verdict);
}

#[cfg(test)]
mod tests {
    use super::RequestIds;

    #[test]
    fn the_trace_id_of_a_traceparent_and_nothing_of_junk() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            super::trace_id(tp),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        for junk in [
            "",
            "00-",
            "00-zzz",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ] {
            assert_eq!(super::trace_id(junk), None, "{junk}");
        }
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
