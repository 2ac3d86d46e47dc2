//! The service kit: what every ShopVerse service stands on.
//!
//! # Layout
//! - [`config`]: typed configuration from a TOML file plus `SHOPVERSE_*` environment overrides,
//!   validated once at start-up, with errors that name the file, the key and the reason.
//! - [`telemetry`]: the one place the `tracing` subscriber is built (human or JSON logs, spans
//!   over OTLP); [`otlp`] exports the spans, one resource per service; [`trace`] carries the
//!   trace context across calls and events.
//! - [`metrics`]: the Prometheus registry handed to each component, and the small admin HTTP
//!   listener that serves `/metrics`, `/healthz` and `/readyz`.
//! - [`shutdown`]: SIGINT/SIGTERM turned into a cancellation token.
//! - [`systemd`]: `sd_notify` (READY, STOPPING, watchdog) for `Type=notify` units.
//! - [`identity`]: who is calling, from the gateway's `x-shopverse-user` / `x-shopverse-roles`
//!   metadata, and the one helper that enforces roles.
//! - [`error`]: the domain error every service returns, mapped to `tonic::Status` in one place.
//! - [`paging`]: cursor pagination by id (page size checks, opaque tokens).
//! - [`crash`]: named crash points for the crash tests (compiled out of release builds).
//! - [`clock`]: time as a dependency, so tests can drive token expiry and lockouts.
//! - [`validate`]: input rules several services share (text, postal addresses).
//! - `testing` (the `testing` feature, for tests only): helpers for tests (a fresh PostgreSQL
//!   database per run, port-0 servers).

#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod crash;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod otlp;
pub mod paging;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;
pub mod validate;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::ServiceError;
pub use identity::{Identity, Role};
pub use tokio_util::sync::CancellationToken;
