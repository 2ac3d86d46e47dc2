//! Trace context across processes and events: W3C `traceparent` (and `tracestate`) read from
//! and written to gRPC metadata and event envelopes, so one client request is one trace from
//! the gateway through every service and every consumer of the events it causes.
//!
//! `tracing` stays the API: a span made here carries its OpenTelemetry context through
//! `tracing-opentelemetry`, and is exported over OTLP when `[telemetry] otlp_endpoint` is set
//! ([`crate::telemetry`]). When it is not, [`enabled`] is false and the request paths make no
//! spans and move no context: the client's own `traceparent` still travels as it came.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured and the exporter installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub(crate) fn set_enabled() {
    ENABLED.store(true, Ordering::Relaxed);
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A lone `traceparent` value, as an extractor.
struct Parent<'a>(&'a str);

impl Extractor for Parent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Makes `span` a child of the trace context in `headers` (a client's or a calling
/// service's `traceparent` and `tracestate`); without one, `span` starts a trace.
pub fn continue_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `span` a child of the context a `traceparent` names (an event's); an empty or
/// malformed one leaves `span` starting a trace.
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Parent(traceparent));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's context into `headers` (`traceparent`, `tracestate`), replacing
/// whatever came with the request: the callee's span is then a child of this one. Nothing is
/// written when there is no exported span.
pub fn inject_current(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(headers));
    }
}

/// The current span's `traceparent`, for an event raised inside it; `None` when there is no
/// exported span.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut headers = http::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(&mut headers));
    Some(headers.get("traceparent")?.to_str().ok()?.to_owned())
}

/// The trace id of an exported span, as 32 hex digits; `None` when it is not exported.
pub fn trace_id_of(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The `traceparent` of an exported span, for the request it makes next; `None` when it is not
/// exported.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_disabled() {
        return None;
    }
    span.in_scope(current_traceparent)
}
