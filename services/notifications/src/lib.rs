//! The notifications service: tells customers what happens to their account and orders, by
//! email (SMTP), SMS (an HTTP webhook) and an in-app inbox they list over gRPC.
//!
//! # Layout
//! The layout every service has; dependencies run `grpc`/`events` → `app` → `store`/`domain`:
//! - [`config`]: the `services.notifications` section.
//! - [`templates`] (its domain): what each event says.
//! - [`channels`]: the email and SMS senders.
//! - [`store`]: all SQL.
//! - [`app`]: the use cases (send once per channel, file the in-app item, list the inbox).
//! - [`grpc`]: `shopverse.notifications.v1.NotificationsService`, mapping only.
//! - [`events`]: the consumer of the events customers are told about.
//!
//! # Once per event and channel
//! The consumer's `prepare` step sends email and SMS before the inbox transaction, recording
//! each send in `deliveries` keyed by (event, channel); a channel already `SENT` for an event is
//! skipped, so a redelivered or replayed event sends only what did not go out. A failing
//! channel makes the event retry with backoff and then park on the dead-letter topic (its own
//! consumer group: orders never wait for it); `shopverse events dlq replay` retries it. The
//! in-app item is written in the inbox transaction. A crash between an SMTP send and its record
//! may send that one email twice; it carries the same Message-ID both times.

#![forbid(unsafe_code)]

pub mod app;
pub mod channels;
pub mod config;
pub mod events;
pub mod grpc;
pub mod store;
pub mod templates;

use std::time::Duration;

use tonic::service::Routes;

use shopverse_proto::notifications::v1::notifications_service_server::NotificationsServiceServer;
use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Notifications;
pub use config::NotificationsConfig;

pub const SERVICE_NAME: &str = "shopverse.notifications.v1.NotificationsService";
pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "notifications",
    include_str!("../migrations/0001_notifications.sql"),
)];

pub struct NotificationsService;

impl Service for NotificationsService {
    const NAME: &'static str = "notifications";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = MIGRATIONS;
    type Config = NotificationsConfig;

    async fn build(cx: &mut Context<NotificationsConfig>) -> Result<Routes, RunError> {
        let c = &cx.config;
        let timeout = Duration::from_millis(c.send_timeout_ms);
        let channel = |e| RunError::new("channel", e);
        let email = match c.smtp_host.as_str() {
            "" => None,
            host => Some(
                channels::Email::new(host, c.smtp_port, &c.smtp_from, timeout).map_err(channel)?,
            ),
        };
        let sms = match c.sms_webhook_url.as_str() {
            "" => None,
            url => Some(channels::Sms::new(url, timeout).map_err(channel)?),
        };
        let n = Notifications::new(cx.db.clone(), email, sms, cx.platform.clock.clone());
        cx.consume(events::NotificationHandler(n.clone()));
        Ok(Routes::new(NotificationsServiceServer::new(n)))
    }
}
