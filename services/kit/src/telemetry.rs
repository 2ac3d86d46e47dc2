//! The one place the `tracing` subscriber is built.

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

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
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".into(),
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), crate::config::Invalid> {
        EnvFilter::try_new(&self.log_level)
            .map(|_| ())
            .map_err(|e| crate::config::Invalid::new("telemetry.log_level", e.to_string()))
    }
}

/// The thread that writes log lines; dropped (by [`flush`]), it writes what is left.
static WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Installs the global subscriber; logs go to stderr. `filter_override` (from `RUST_LOG`, say)
/// wins over the configured level. Under journald (`JOURNAL_STREAM` set) lines carry no
/// timestamp of their own, since the journal stamps every line. Calling it twice is harmless.
///
/// Lines are written by a thread of their own, so a request path (the gateway's access log)
/// hands its line over instead of waiting on stderr; when that thread falls behind by more
/// than its buffer, callers wait rather than lines being dropped. Call [`flush`] before the
/// process exits.
pub fn init(config: &TelemetryConfig, filter_override: Option<&str>) {
    let filter = filter_override
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&config.log_level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("shopverse-log")
        .finish(std::io::stderr());
    let mut slot = WRITER.lock().unwrap_or_else(|p| p.into_inner());
    if slot.is_some() {
        return;
    }
    *slot = Some(guard);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(true);
    let _ = match (config.log_format, under_journald) {
        (LogFormat::Json, true) => builder.json().without_time().try_init(),
        (LogFormat::Json, false) => builder.json().try_init(),
        (LogFormat::Human, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Human, false) => builder.try_init(),
    };
}

/// Writes every line logged so far and stops the writing thread; later lines are lost.
pub fn flush() {
    drop(WRITER.lock().unwrap_or_else(|p| p.into_inner()).take());
}
