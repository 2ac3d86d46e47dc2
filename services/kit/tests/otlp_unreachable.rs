//! A collector that does not answer: spans are dropped, the failure is counted in
//! `shopverse_otlp_export_failures_total`, and nothing on the span's path waits or fails.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::time::{Duration, Instant};

use shopverse_kit::telemetry::{TelemetryConfig, flush, init};

#[test]
fn an_unreachable_collector_is_counted_not_an_error() {
    // Nothing listens on a port just bound and closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = TelemetryConfig {
        otlp_endpoint: format!("http://127.0.0.1:{port}"),
        ..Default::default()
    };
    init(&config, Some("info"));
    assert!(shopverse_kit::trace::enabled());
    let registry = shopverse_kit::metrics::new_registry();
    let t0 = Instant::now();
    for i in 0..100 {
        let span =
            tracing::info_span!(target: "shopverse_test", "work", service.name = "orders", i);
        let _entered = span.enter();
        assert!(shopverse_kit::trace::current_traceparent().is_some());
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "spans waited: {took:?}");
    // Exports what is buffered (and fails), then stops.
    flush();
    let failures: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "shopverse_otlp_export_failures_total")
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .sum();
    assert!(failures >= 1.0, "the failed export was not counted");
}
