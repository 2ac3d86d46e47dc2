//! The notifications service: tells customers what happens to their account and orders, by
//! email (SMTP), SMS (an HTTP webhook) and an in-app inbox they list over gRPC.
//!
//! # Layout
//! - [`templates`]: what each event says.
//! - [`channels`]: email and SMS senders.
//! - this file: configuration, the consumer and the gRPC service.
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

pub mod channels;
pub mod templates;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use sqlx::{AnyConnection, Row};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use shopverse_events::Platform;
use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::*;
use shopverse_events::outbox::Relay;
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::config::Invalid;
use shopverse_kit::db::{Db, MigrationSpec};
use shopverse_kit::identity::{Role, require};
use shopverse_kit::{CancellationToken, Clock, ServiceError};
use shopverse_proto::notifications::v1::notifications_service_server::{
    NotificationsService, NotificationsServiceServer,
};
use shopverse_proto::notifications::v1::*;

pub const SERVICE_NAME: &str = "shopverse.notifications.v1.NotificationsService";
pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "notifications",
    include_str!("../migrations/0001_notifications.sql"),
)];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    pub listen: SocketAddr,
    /// Empty: `<data_dir>/notifications.db`.
    pub database: String,
    /// SMTP relay host; empty: no email.
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_from: String,
    /// SMS provider webhook (`http://…`); empty: no SMS.
    pub sms_webhook_url: String,
    /// How long one send may take.
    pub send_timeout_ms: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50055)),
            database: String::new(),
            smtp_host: String::new(),
            smtp_port: 25,
            smtp_from: "ShopVerse <no-reply@shopverse.local>".into(),
            sms_webhook_url: String::new(),
            send_timeout_ms: 5000,
        }
    }
}

impl NotificationsConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        let timeout = Duration::from_millis(self.send_timeout_ms);
        if !(100..=120_000).contains(&self.send_timeout_ms) {
            return Err(Invalid::new(
                key("send_timeout_ms"),
                "must be between 100 and 120000",
            ));
        }
        if !self.smtp_host.is_empty() {
            channels::Email::new(&self.smtp_host, self.smtp_port, &self.smtp_from, timeout)
                .map_err(|e| Invalid::new(key("smtp_from"), e.to_string()))?;
        }
        if !self.sms_webhook_url.is_empty() {
            channels::Sms::new(&self.sms_webhook_url, timeout)
                .map_err(|e| Invalid::new(key("sms_webhook_url"), e.to_string()))?;
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(key("database"), r))
    }

    pub fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "notifications")
    }
}

#[derive(Clone)]
pub struct Notifications {
    db: Db,
    email: Option<channels::Email>,
    sms: Option<channels::Sms>,
    clock: Arc<dyn Clock>,
}

impl Notifications {
    async fn delivered(&self, event_id: &str, channel: &str) -> Result<bool, sqlx::Error> {
        let s: Option<String> = sqlx::query_scalar(
            "SELECT status FROM deliveries WHERE event_id = $1 AND channel = $2",
        )
        .bind(event_id)
        .bind(channel)
        .fetch_optional(&mut *self.db.read().await?)
        .await?;
        Ok(s.as_deref() == Some("SENT"))
    }

    async fn record(
        &self,
        event_id: &str,
        channel: &str,
        recipient: &str,
        error: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        let q = sqlx::query(
            "INSERT INTO deliveries (event_id, channel, recipient, status, attempts, last_error, updated_at) \
             VALUES ($1, $2, $3, $4, 1, $5, $6) \
             ON CONFLICT (event_id, channel) DO UPDATE SET status = excluded.status, \
             attempts = deliveries.attempts + 1, last_error = excluded.last_error, updated_at = excluded.updated_at",
        )
        .bind(event_id)
        .bind(channel)
        .bind(recipient)
        .bind(if error.is_some() { "FAILED" } else { "SENT" })
        .bind(error.unwrap_or_default())
        .bind(self.clock.now_ms());
        let mut conn = self.db.write_conn().await?;
        q.execute(&mut *conn).await?;
        Ok(())
    }

    async fn email_of(&self, r: &templates::Rendered) -> Result<Option<String>, sqlx::Error> {
        if let Some(e) = &r.email {
            return Ok(Some(e.clone()));
        }
        sqlx::query_scalar("SELECT email FROM contacts WHERE user_id = $1")
            .bind(&r.user_id)
            .fetch_optional(&mut *self.db.read().await?)
            .await
    }
}

pub struct NotificationHandler(pub Notifications);

const WANTED: &[&str] = &[
    "user.registered",
    "order.placed",
    "order.confirmed",
    "order.cancelled",
    "payment.failed",
    "shipment.scheduled",
    "shipment.shipped",
    "shipment.delivered",
];

fn rendered(ev: &Envelope) -> Result<Option<templates::Rendered>, HandlerError> {
    templates::render(ev).map_err(|e| HandlerError::Permanent(e.to_string()))
}

#[async_trait]
impl Handler for NotificationHandler {
    fn name(&self) -> &str {
        "notifications"
    }

    fn topics(&self) -> Vec<String> {
        [TOPIC_USERS, TOPIC_ORDERS, TOPIC_PAYMENTS, TOPIC_DELIVERY]
            .iter()
            .map(|t| (*t).to_owned())
            .collect()
    }

    fn wants(&self, t: &str) -> bool {
        WANTED.contains(&t)
    }

    /// Only a configured channel (email, SMS) sends anything before the transaction: without
    /// one, events skip the inbox read and are applied in runs, like any handler without a
    /// `prepare`.
    fn prepares(&self) -> bool {
        self.0.email.is_some() || self.0.sms.is_some()
    }

    async fn prepare(&self, ev: &Envelope) -> Result<(), HandlerError> {
        let n = &self.0;
        let Some(r) = rendered(ev)? else {
            return Ok(());
        };
        let mut failures = Vec::new();
        let email_due = n.email.is_some() && !n.delivered(&ev.id, "email").await?;
        let to = if email_due {
            n.email_of(&r).await?
        } else {
            None
        };
        if email_due && to.is_none() && !r.user_id.is_empty() {
            // Events of different keys run concurrently: this user's `user.registered`, which
            // tells the address, may not be applied yet. Parked and tried again, not dropped.
            failures.push(format!(
                "no email address for user {} yet (its user.registered is not applied)",
                r.user_id
            ));
        }
        if let (Some(email), Some(to)) = (&n.email, to) {
            let res = email
                .send(&to, &r.subject, &r.body, &format!("{}.email", ev.id))
                .await;
            n.record(
                &ev.id,
                "email",
                &to,
                res.as_ref().err().map(|e| e.to_string()).as_deref(),
            )
            .await?;
            if let Err(e) = res {
                failures.push(e.to_string());
            }
        }
        if let Some(sms) = &n.sms
            && let Some(to) = &r.phone
            && !n.delivered(&ev.id, "sms").await?
        {
            let res = sms.send(&format!("{}.sms", ev.id), to, &r.sms).await;
            n.record(
                &ev.id,
                "sms",
                to,
                res.as_ref().err().map(|e| e.to_string()).as_deref(),
            )
            .await?;
            if let Err(e) = res {
                failures.push(e.to_string());
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(HandlerError::Retryable(failures.join("; ").into()))
        }
    }

    async fn handle(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        let Some(r) = rendered(ev)? else {
            return Ok(());
        };
        if let (Some(email), Some(name)) = (&r.email, &r.display_name) {
            sqlx::query(
                "INSERT INTO contacts (user_id, email, display_name) VALUES ($1, $2, $3) \
                 ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, display_name = excluded.display_name",
            )
            .bind(&r.user_id)
            .bind(email)
            .bind(name)
            .execute(&mut *conn)
            .await?;
        }
        sqlx::query(
            "INSERT INTO inbox_items (id, user_id, event_id, event_type, subject, body, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(&r.user_id)
        .bind(&ev.id)
        .bind(&ev.r#type)
        .bind(&r.subject)
        .bind(&r.body)
        .bind(self.0.clock.now_ms())
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl NotificationsService for Notifications {
    #[tracing::instrument(skip_all)]
    async fn list_my_notifications(
        &self,
        req: Request<ListMyNotificationsRequest>,
    ) -> Result<Response<ListMyNotificationsResponse>, Status> {
        let caller = require(&req, Role::Customer)?;
        let r = req.into_inner();
        let page = shopverse_kit::paging::Page::parse(r.page_size, &r.page_token, 20, 100)?;
        let rows = sqlx::query(
            "SELECT id, event_type, subject, body, created_at FROM inbox_items \
             WHERE user_id = $1 AND ($2 = '' OR id < $2) ORDER BY id DESC LIMIT $3",
        )
        .bind(&caller.user_id)
        .bind(&page.cursor)
        .bind(page.fetch())
        .fetch_all(&mut *self.db.read().await.map_err(ServiceError::from)?)
        .await
        .map_err(ServiceError::from)?;
        let mut out = Vec::new();
        for row in &rows {
            out.push(Notification {
                id: row.try_get("id").map_err(ServiceError::from)?,
                event_type: row.try_get("event_type").map_err(ServiceError::from)?,
                subject: row.try_get("subject").map_err(ServiceError::from)?,
                body: row.try_get("body").map_err(ServiceError::from)?,
                created_at: Some(to_timestamp(
                    row.try_get("created_at").map_err(ServiceError::from)?,
                )),
            });
        }
        let next_page_token = page.finish(&mut out, |n| &n.id);
        Ok(Response::new(ListMyNotificationsResponse {
            notifications: out,
            next_page_token,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("notifications database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("notifications channel: {0}")]
    Channel(#[from] channels::SendError),
    #[error("notifications gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

pub async fn open_db(config: &NotificationsConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the notifications service on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: NotificationsConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let timeout = Duration::from_millis(config.send_timeout_ms);
    let email = if config.smtp_host.is_empty() {
        None
    } else {
        Some(channels::Email::new(
            &config.smtp_host,
            config.smtp_port,
            &config.smtp_from,
            timeout,
        )?)
    };
    let sms = if config.sms_webhook_url.is_empty() {
        None
    } else {
        Some(channels::Sms::new(&config.sms_webhook_url, timeout)?)
    };
    let n = Notifications {
        db: db.clone(),
        email,
        sms,
        clock: platform.clock.clone(),
    };
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "notifications",
        &platform.registry,
    );
    let handler = Arc::new(NotificationHandler(n.clone()));
    let background = vec![shopverse_events::consumer_task(
        handler,
        db.clone(),
        &relay,
        &platform,
        shutdown.clone(),
    )];
    let routes = Routes::new(NotificationsServiceServer::new(n));
    shopverse_events::run_service(
        listener,
        shopverse_events::ServiceParts {
            routes,
            names: &[SERVICE_NAME],
            db,
            relay,
            background,
        },
        &platform,
        shutdown,
    )
    .await
    .map_err(Into::into)
}
