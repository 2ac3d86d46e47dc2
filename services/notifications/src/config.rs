//! The notifications service's configuration (`services.notifications`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

use crate::channels;

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
}

impl shopverse_runtime::ServiceConfig for NotificationsConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "notifications")
    }
}
