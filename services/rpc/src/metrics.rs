//! Per-call gRPC metrics, server side and client side, under the names and labels of
//! grpc-ecosystem's go-grpc-prometheus, so dashboards written for it work unchanged:
//!
//! - `grpc_server_handled_total` (with `grpc_code`) and the `grpc_server_handling_seconds`
//!   histogram, labelled `grpc_type`, `grpc_service`, `grpc_method`;
//! - `grpc_client_handled_total` and `grpc_client_handling_seconds`, the same for calls this
//!   process makes.
//!
//! go-grpc-prometheus's `*_started_total` is left out: it would be labelled before the answer
//! says whether the method exists, which is what keeps the labels bounded (below).
//!
//! A call's code is its `grpc-status`: a trailers-only answer carries it in its headers (every
//! error tonic returns from a unary handler); an answer whose headers carry none is counted
//! `OK`, which for a unary call is what its trailers will say unless the body fails mid-way.
//! The time is until the answer's headers, which for a unary call is when the handler ended.
//!
//! Label values are bounded: a call to a method nobody serves (answered `Unimplemented`) is
//! counted under `grpc_service="unknown", grpc_method="unknown"`, so a client sending random
//! paths cannot grow the series without bound.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tonic::Code;
use tracing::Instrument;

/// The call histograms' buckets, in seconds: from a cached read (~100 µs) to a slow provider.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One side's (server's or client's) two families.
#[derive(Clone)]
struct Side {
    /// The server side: calls get a span of their own, child of the caller's.
    server: bool,
    handled: IntCounterVec,
    seconds: HistogramVec,
}

impl Side {
    fn new(registry: &Registry, side: &str) -> Result<Side, prometheus::Error> {
        let labels = ["grpc_type", "grpc_service", "grpc_method"];
        let handled = IntCounterVec::new(
            Opts::new(
                format!("grpc_{side}_handled_total"),
                format!("RPCs completed on the {side}, by gRPC status code."),
            ),
            &["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                format!("grpc_{side}_handling_seconds"),
                format!("Time to the answer of RPCs on the {side}, in seconds."),
            )
            .buckets(BUCKETS.to_vec()),
            &labels,
        )?;
        registry.register(Box::new(handled.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(Side {
            server: side == "server",
            handled,
            seconds,
        })
    }
}

/// The gRPC call metrics of one process (one registry), shared by every server and client in
/// it.
#[derive(Clone)]
pub struct GrpcMetrics {
    server: Side,
    client: Side,
}

impl std::fmt::Debug for GrpcMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrpcMetrics")
    }
}

impl GrpcMetrics {
    /// Registers the four families in `registry`; once per registry.
    pub fn new(registry: &Registry) -> Result<GrpcMetrics, prometheus::Error> {
        Ok(GrpcMetrics {
            server: Side::new(registry, "server")?,
            client: Side::new(registry, "client")?,
        })
    }

    /// A tower layer that counts and times the calls a server answers.
    pub fn server_layer(&self) -> MeteredLayer {
        MeteredLayer(self.server.clone())
    }

    /// A tower layer that counts and times the calls a client makes.
    pub fn client_layer(&self) -> MeteredLayer {
        MeteredLayer(self.client.clone())
    }
}

/// The span of a call this server answers, child of the caller's context in `headers`: named
/// `Service/Method`, of the service whose package it is (`shopverse.orders.v1` is `orders`).
/// None for health checks and reflection, and when spans are not exported.
fn server_span(service: &str, method: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !shopverse_kit::trace::enabled() {
        return tracing::Span::none();
    }
    let Some(owner) = service
        .strip_prefix("shopverse.")
        .and_then(|s| s.split('.').next())
    else {
        return tracing::Span::none();
    };
    let short = service.rsplit('.').next().unwrap_or(service);
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = format!("{short}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        service.name = owner,
        enduser.id = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(user) = headers
        .get(shopverse_kit::identity::USER_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        span.record("enduser.id", user);
    }
    shopverse_kit::trace::continue_from_headers(&span, headers);
    span
}

/// Whether a code is the server's fault, which OpenTelemetry's gRPC conventions mark a server
/// span as an error for; a refusal of the caller's input or rights is not.
fn server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// Splits `/pkg.Service/Method` into its service and method.
fn service_and_method(path: &str) -> (&str, &str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    match (parts.next(), parts.next()) {
        (Some(s), Some(m)) if !s.is_empty() && !m.is_empty() => (s, m),
        _ => ("unknown", "unknown"),
    }
}

/// go-grpc-prometheus's `grpc_type` of the few streaming methods a ShopVerse server has
/// (health's watch, reflection); everything else is unary.
fn call_type(method: &str) -> &'static str {
    match method {
        "Watch" => "server_stream",
        "ServerReflectionInfo" => "bidi_stream",
        _ => "unary",
    }
}

/// The name Go's `codes.Code.String()` gives, which go-grpc-prometheus puts in `grpc_code`.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The code an answer's headers carry (`OK` when they carry none: see the module docs).
fn code_of(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// Counts and times the calls of the service it wraps.
#[derive(Clone)]
pub struct MeteredLayer(Side);

impl<S> tower_layer::Layer<S> for MeteredLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            side: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    side: Side,
}

impl<S> Metered<S> {
    /// The service it meters.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Metered<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (service, method) = service_and_method(req.uri().path());
        let (service, method) = (service.to_owned(), method.to_owned());
        let kind = call_type(&method);
        let side = self.side.clone();
        let span = match self.side.server {
            true => server_span(&service, &method, req.headers()),
            false => {
                shopverse_kit::trace::inject_current(req.headers_mut());
                tracing::Span::none()
            }
        };
        let t0 = Instant::now();
        let answer = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let result = answer.await;
            let code = match &result {
                Ok(response) => code_of(response.headers()),
                Err(_) => Code::Unavailable,
            };
            if !span.is_disabled() {
                span.record("rpc.grpc.status_code", code as i32);
                if server_fault(code) {
                    span.record("otel.status_code", "ERROR");
                }
            }
            // A method nobody serves: one series for all of them.
            let (service, method) = match code {
                Code::Unimplemented => ("unknown", "unknown"),
                _ => (service.as_str(), method.as_str()),
            };
            side.handled
                .with_label_values(&[kind, service, method, code_name(code)])
                .inc();
            side.seconds
                .with_label_values(&[kind, service, method])
                .observe(t0.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method_and_junk_is_unknown() {
        assert_eq!(
            service_and_method("/shopverse.orders.v1.OrdersService/Checkout"),
            ("shopverse.orders.v1.OrdersService", "Checkout")
        );
        assert_eq!(service_and_method("/"), ("unknown", "unknown"));
        assert_eq!(service_and_method("/x"), ("unknown", "unknown"));
        assert_eq!(service_and_method("/x/"), ("unknown", "unknown"));
    }

    #[test]
    fn codes_are_named_as_go_names_them() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), Code::Ok);
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(code_of(&h), Code::NotFound);
    }
}
