//! The one place the `tracing` subscriber is built: log lines (human or JSON) and, when
//! `otlp_endpoint` is set, spans exported over OTLP ([`crate::otlp`]).

use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines for a terminal.
    #[default]
    Human,
    /// One JSON object per line, for log shippers and journald.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,shopverse_users=debug`.
    pub log_level: String,
    /// An OTLP/gRPC collector (`http://127.0.0.1:4317`) to export spans to; empty: none.
    pub otlp_endpoint: String,
    /// The share of traces started here that are kept (0 to 1); a trace a caller started keeps
    /// the caller's decision (parent-based sampling).
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".into(),
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), crate::config::Invalid> {
        use crate::config::Invalid;
        EnvFilter::try_new(&self.log_level)
            .map_err(|e| Invalid::new("telemetry.log_level", e.to_string()))?;
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(Invalid::new(
                "telemetry.sampling_ratio",
                "must be between 0 and 1",
            ));
        }
        let e = &self.otlp_endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            return Err(Invalid::new(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL (OTLP over gRPC, usually port 4317)",
            ));
        }
        Ok(())
    }
}

/// What [`flush`] finishes: the thread that writes log lines, and the span exporter.
struct Installed {
    writer: tracing_appender::non_blocking::WorkerGuard,
    spans: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

static INSTALLED: std::sync::Mutex<Option<Installed>> = std::sync::Mutex::new(None);

/// Where lines a component formats itself go (the gateway's access log): the same stream as
/// the log lines, in the same format. A line is appended to a buffer under a lock, and a
/// thread writes the buffer out every [`LINE_FLUSH_EVERY`] (sooner when it grows past
/// [`LINE_FLUSH_BYTES`]) in one write: no wake-up of a writing thread per line, which on the
/// request's core cost more than the line itself, and no queue of batches behind a busy
/// writer. Past 4 MiB waiting, the request that adds a line writes the batch itself.
pub struct LineSink {
    pending: std::sync::Mutex<Vec<u8>>,
    wake: std::sync::Condvar,
    /// The output itself: a batch is one write, with nothing queued behind it.
    out: std::sync::Mutex<Box<dyn std::io::Write + Send>>,
    json: bool,
    /// Under journald lines carry no timestamp of their own.
    timestamps: bool,
}

/// How long a self-formatted line may wait before it is handed to the log writer.
pub const LINE_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(20);
/// How many bytes of lines make a hand-over early.
pub const LINE_FLUSH_BYTES: usize = 256 << 10;
/// How many bytes may wait at most: past it the line's writer writes the batch itself.
const LINE_PENDING_MAX: usize = 4 << 20;

impl LineSink {
    /// Whether lines are JSON objects (`log_format = "json"`).
    pub fn json(&self) -> bool {
        self.json
    }

    /// Whether a line starts with its time.
    pub fn timestamps(&self) -> bool {
        self.timestamps
    }

    /// Appends a whole line (with its newline) for the next hand-over.
    pub fn write(&self, line: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.extend_from_slice(line);
        let waiting = pending.len();
        drop(pending);
        if waiting >= LINE_PENDING_MAX {
            self.flush();
        } else if waiting >= LINE_FLUSH_BYTES {
            self.wake.notify_one();
        }
    }

    /// Hands what is pending to the log writer now.
    pub fn flush(&self) {
        use std::io::Write;
        let batch = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *pending)
        };
        if !batch.is_empty() {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
    }

    /// Hands the pending lines over every [`LINE_FLUSH_EVERY`], for as long as the process runs.
    fn run(&'static self) {
        loop {
            {
                let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let _ = self
                    .wake
                    .wait_timeout_while(pending, LINE_FLUSH_EVERY, |p| p.len() < LINE_FLUSH_BYTES);
            }
            self.flush();
        }
    }
}

static LINES: std::sync::OnceLock<LineSink> = std::sync::OnceLock::new();

/// The sink for self-formatted lines, once [`init`] has run.
pub fn line_sink() -> Option<&'static LineSink> {
    LINES.get()
}

/// Batches of spans the collector did not take, in this process; every registry made by
/// [`crate::metrics::new_registry`] serves it.
pub(crate) static OTLP_FAILURES: std::sync::LazyLock<prometheus::IntCounter> =
    std::sync::LazyLock::new(|| {
        let opts = prometheus::Opts::new(
            "otlp_export_failures_total",
            "Batches of spans the OTLP collector did not take",
        )
        .namespace(crate::metrics::NAMESPACE);
        prometheus::IntCounter::with_opts(opts).unwrap_or_else(|_| unreachable!("a valid name"))
    });

/// The span exporter for `config`, when it names a collector.
fn span_provider(config: &TelemetryConfig) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
    if config.otlp_endpoint.is_empty() {
        return None;
    }
    let failures = OTLP_FAILURES.clone();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let export = crate::otlp::ExportConfig {
        endpoint: config.otlp_endpoint.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: format!("{}/{}", host.trim(), std::process::id()),
    };
    let exporter = match crate::otlp::RoutingExporter::new(export, failures) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "span export is off: its runtime could not start");
            return None;
        }
    };
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio)));
    Some(
        SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_sampler(sampler)
            .build(),
    )
}

/// Installs the global subscriber; logs go to stderr. `filter_override` (from `RUST_LOG`, say)
/// wins over the configured level. Under journald (`JOURNAL_STREAM` set) lines carry no
/// timestamp of their own, since the journal stamps every line. Calling it twice is harmless.
/// With an `otlp_endpoint`, spans are exported too.
///
/// Lines are written by a thread of their own, so a request path (the gateway's access log)
/// hands its line over instead of waiting on stderr; when that thread falls behind by more
/// than its buffer, callers wait rather than lines being dropped. Call [`flush`] before the
/// process exits.
pub fn init(config: &TelemetryConfig, filter_override: Option<&str>) {
    init_with_writer(config, filter_override, Stderr);
}

/// Standard error, as a value that can be cloned for each writer.
#[derive(Clone, Copy)]
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// [`init`], writing lines to `out` instead of stderr (tests read what was logged).
pub fn init_with_writer(
    config: &TelemetryConfig,
    filter_override: Option<&str>,
    out: impl std::io::Write + Clone + Send + 'static,
) {
    let mut slot = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return;
    }
    let filter = filter_override
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&config.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("shopverse-log")
        .finish(out.clone());
    let sink = LineSink {
        pending: std::sync::Mutex::new(Vec::new()),
        wake: std::sync::Condvar::new(),
        out: std::sync::Mutex::new(Box::new(out)),
        json: config.log_format == LogFormat::Json,
        timestamps: !under_journald,
    };
    if LINES.set(sink).is_ok()
        && let Some(sink) = LINES.get()
    {
        let _ = std::thread::Builder::new()
            .name("shopverse-lines".into())
            .spawn(|| sink.run());
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(true);
    let lines = match (config.log_format, under_journald) {
        (LogFormat::Json, true) => fmt.json().without_time().boxed(),
        (LogFormat::Json, false) => fmt.json().boxed(),
        (LogFormat::Human, true) => fmt.without_time().with_ansi(false).boxed(),
        (LogFormat::Human, false) => fmt.boxed(),
    };
    let spans = span_provider(config);
    // Spans are ShopVerse's own at `info`, whatever the log level: an operator who logs only
    // warnings still gets traces.
    let ours =
        tracing_subscriber::filter::Targets::new().with_target("shopverse", tracing::Level::INFO);
    let otel = spans.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider;
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("shopverse"))
            .with_location(true)
            .with_filter(ours)
    });
    let installed = tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(otel)
        .try_init();
    if installed.is_ok() && spans.is_some() {
        crate::trace::set_enabled();
        tracing::info!(endpoint = %config.otlp_endpoint, ratio = config.sampling_ratio, "exporting spans over OTLP");
    }
    *slot = Some(Installed {
        writer: guard,
        spans,
    });
}

/// Exports the spans still buffered and writes every line logged so far, then stops both;
/// later spans and lines are lost. Call it last, outside any async runtime.
pub fn flush() {
    let Some(installed) = INSTALLED.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return;
    };
    if let Some(lines) = LINES.get() {
        lines.flush();
    }
    if let Some(spans) = installed.spans
        && let Err(e) = spans.shutdown()
    {
        tracing::warn!(error = %e, "the last spans could not be exported");
    }
    drop(installed.writer);
}
