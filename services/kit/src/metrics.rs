//! Metrics: one `prometheus::Registry` per process, handed to each component, which registers
//! its own collectors (ShopVerse's own under [`NAMESPACE`]); and the admin listener that serves them.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The prefix of ShopVerse's own metrics (`shopverse_outbox_published_total`). Metrics named by
/// a convention others share carry none: `grpc_server_handled_total` (go-grpc-prometheus) and
/// `process_cpu_seconds_total` (every Prometheus client's process collector).
pub const NAMESPACE: &str = "shopverse";

/// A fresh registry with the process collector (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, ...) and the span export failures
/// (`shopverse_otlp_export_failures_total`) in it.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    let process = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(e) = registry.register(Box::new(process)) {
        tracing::warn!(error = %e, "the process collector could not be registered");
    }
    let otlp = crate::telemetry::OTLP_FAILURES.clone();
    if let Err(e) = registry.register(Box::new(otlp)) {
        tracing::warn!(error = %e, "the span export counter could not be registered");
    }
    registry
}

/// Registers a collector, logging instead of failing when the same metric is registered twice
/// (two instances of a component in one process share the first one's collectors).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::debug!(error = %e, "metric already registered");
    }
    c
}

/// Answers "is this process ready for traffic?" for `/readyz`: `Err` says what is not.
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A fixed document the admin listener serves: `(path, content type, body)`.
pub type AdminDocument = (String, String, Bytes);

/// Extra admin actions: given the method, path and query, `Some((status, JSON body))` when the
/// handler owns the path.
pub type AdminHandler =
    Arc<dyn Fn(&hyper::Method, &str, Option<&str>) -> Option<(u16, String)> + Send + Sync>;

/// Serves `/metrics`, `/healthz` (the process is up), `/readyz` (it can take traffic) and any
/// `documents` over HTTP/1.1 until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    ready: ReadyCheck,
    documents: Vec<AdminDocument>,
    handler: Option<AdminHandler>,
    shutdown: CancellationToken,
) {
    let documents = Arc::new(documents);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener accept failed");
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let ready = ready.clone();
        let documents = documents.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                let ready = ready.clone();
                let documents = documents.clone();
                let handler = handler.clone();
                async move {
                    let path = req.uri().path();
                    if let Some((status, body)) = handler
                        .as_ref()
                        .and_then(|h| h(req.method(), path, req.uri().query()))
                    {
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = StatusCode::from_u16(status)
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        if let Ok(v) = "application/json".parse() {
                            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                        }
                        return Ok::<_, Infallible>(resp);
                    }
                    if let Some((_, ctype, body)) = documents.iter().find(|(p, _, _)| p == path) {
                        let mut resp = Response::new(Full::new(body.clone()));
                        if let Ok(v) = ctype.parse() {
                            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                        }
                        return Ok::<_, Infallible>(resp);
                    }
                    Ok::<_, Infallible>(admin_response(path, &registry, &ready))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn admin_response(path: &str, registry: &Registry, ready: &ReadyCheck) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            let mut buf = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut buf) {
                Ok(()) => (StatusCode::OK, "text/plain; version=0.0.4", buf),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string().into_bytes(),
                ),
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => match ready() {
            Ok(()) => (StatusCode::OK, "text/plain", b"ready\n".to_vec()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into_bytes(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn opts(name: &str, help: &str, labels: &[(&str, &str)]) -> prometheus::Opts {
    let mut o = prometheus::Opts::new(name, help).namespace(NAMESPACE);
    for (k, v) in labels {
        o = o.const_label(*k, *v);
    }
    o
}

/// Builds and registers a counter. Names are constants in our code, so a bad one is a bug
/// caught by the first test that builds the component.
pub fn int_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
) -> prometheus::IntCounter {
    #[allow(clippy::expect_used)]
    let c = prometheus::IntCounter::with_opts(opts(name, help, labels)).expect("valid metric name");
    register(registry, c)
}

/// Builds and registers a gauge (see [`int_counter`]).
pub fn int_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
) -> prometheus::IntGauge {
    #[allow(clippy::expect_used)]
    let g = prometheus::IntGauge::with_opts(opts(name, help, labels)).expect("valid metric name");
    register(registry, g)
}

/// Builds and registers a counter with variable labels (see [`int_counter`]).
pub fn int_counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    const_labels: &[(&str, &str)],
    var_labels: &[&str],
) -> prometheus::IntCounterVec {
    #[allow(clippy::expect_used)]
    let c = prometheus::IntCounterVec::new(opts(name, help, const_labels), var_labels)
        .expect("valid metric name");
    register(registry, c)
}

/// Builds and registers a gauge with variable labels (see [`int_counter`]).
pub fn int_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    const_labels: &[(&str, &str)],
    var_labels: &[&str],
) -> prometheus::IntGaugeVec {
    #[allow(clippy::expect_used)]
    let g = prometheus::IntGaugeVec::new(opts(name, help, const_labels), var_labels)
        .expect("valid metric name");
    register(registry, g)
}
