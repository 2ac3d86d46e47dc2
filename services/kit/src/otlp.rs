//! Span export over OTLP (gRPC), one resource per service.
//!
//! The appliance runs every service in one process, but a tracing backend should show a
//! checkout as spans of `gateway`, `orders`, `products`, ... each under its own `service.name`.
//! So the exporter routes each finished span to a per-service OTLP exporter whose resource
//! names that service: by the span's `service.name` attribute when it has one (the spans the
//! shared crates make say whose work they are), else by the crate that made it
//! (`shopverse_orders::app` is `orders`), else `shopverse`.
//!
//! Export runs on the batch processor's own thread, on a small runtime of its own (tonic needs
//! one), so it never runs on, or waits for, a request path. A collector that does not answer
//! fails the batch: counted in `shopverse_otlp_export_failures_total` and warned about at most
//! once a minute.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Where spans go, and what the resources say.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `http://collector:4317`.
    pub endpoint: String,
    pub version: String,
    /// `service.instance.id`: the host and process, so two units of one service differ.
    pub instance: String,
}

/// The service a span belongs to (see the module docs).
fn service_of(span: &SpanData) -> String {
    let attr = |key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    };
    if let Some(s) = attr("service.name") {
        return s;
    }
    attr("code.module.name")
        .and_then(|m| {
            let krate = m.split("::").next()?.strip_prefix("shopverse_")?.to_owned();
            (!matches!(
                krate.as_str(),
                "kit" | "rpc" | "storage" | "events" | "runtime"
            ))
            .then_some(krate)
        })
        .unwrap_or_else(|| "shopverse".to_owned())
}

/// Per-service OTLP exporters, made on first use.
pub struct RoutingExporter {
    config: ExportConfig,
    runtime: tokio::runtime::Runtime,
    exporters: Mutex<HashMap<String, std::sync::Arc<opentelemetry_otlp::SpanExporter>>>,
    failures: prometheus::IntCounter,
    last_warned: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RoutingExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RoutingExporter({})", self.config.endpoint)
    }
}

impl RoutingExporter {
    pub fn new(
        config: ExportConfig,
        failures: prometheus::IntCounter,
    ) -> std::io::Result<RoutingExporter> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("shopverse-otlp")
            .build()?;
        Ok(RoutingExporter {
            config,
            runtime,
            exporters: Mutex::new(HashMap::new()),
            failures,
            last_warned: Mutex::new(None),
        })
    }

    /// The exporter for `service`, made on first use, inside the export runtime.
    fn exporter(
        &self,
        service: &str,
    ) -> Result<std::sync::Arc<opentelemetry_otlp::SpanExporter>, OTelSdkError> {
        let mut map = self.exporters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get(service) {
            return Ok(e.clone());
        }
        let _in_runtime = self.runtime.enter();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(self.config.endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        let resource = Resource::builder_empty()
            .with_service_name(service.to_owned())
            .with_attributes([
                KeyValue::new("service.version", self.config.version.clone()),
                KeyValue::new("service.instance.id", self.config.instance.clone()),
            ])
            .build();
        exporter.set_resource(&resource);
        let exporter = std::sync::Arc::new(exporter);
        map.insert(service.to_owned(), exporter.clone());
        Ok(exporter)
    }

    fn failed(&self, why: &str) {
        self.failures.inc();
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(
                endpoint = %self.config.endpoint, error = why,
                "spans could not be exported (counted; warned about once a minute)"
            );
        }
    }
}

impl SpanExporter for RoutingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut by_service: HashMap<String, Vec<SpanData>> = HashMap::new();
        for span in batch {
            by_service.entry(service_of(&span)).or_default().push(span);
        }
        let mut result = Ok(());
        for (service, spans) in by_service {
            let exported = self
                .exporter(&service)
                .and_then(|e| self.runtime.block_on(e.export(spans)));
            if let Err(e) = exported {
                self.failed(&e.to_string());
                result = Err(e);
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let map = self.exporters.lock().unwrap_or_else(|p| p.into_inner());
        for e in map.values() {
            let _in_runtime = self.runtime.enter();
            e.shutdown_with_timeout(timeout)?;
        }
        Ok(())
    }
}
