//! The users service's configuration (`[services.users]`).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsersConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`; empty: `<data_dir>/users.db`.
    pub database: String,
    /// Where signing keys live; empty: `<data_dir>/keys`.
    pub keys_dir: String,
    /// `iss` of access tokens.
    pub issuer: String,
    /// `aud` of access tokens.
    pub audience: String,
    pub access_ttl_secs: i64,
    pub refresh_ttl_secs: i64,
    /// Failed sign-ins on one email before it is locked for `login_lockout_secs`.
    pub login_max_failures: i64,
    pub login_lockout_secs: i64,
}

impl Default for UsersConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database: String::new(),
            keys_dir: String::new(),
            issuer: "shopverse".into(),
            audience: "shopverse-api".into(),
            access_ttl_secs: 900,
            refresh_ttl_secs: 30 * 24 * 3600,
            login_max_failures: 5,
            login_lockout_secs: 300,
        }
    }
}

impl UsersConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        if !(60..=86_400).contains(&self.access_ttl_secs) {
            return Err(Invalid::new(
                key("access_ttl_secs"),
                "must be between 60 and 86400 seconds",
            ));
        }
        if self.refresh_ttl_secs < self.access_ttl_secs {
            return Err(Invalid::new(
                key("refresh_ttl_secs"),
                "must be at least access_ttl_secs",
            ));
        }
        if self.issuer.trim().is_empty() {
            return Err(Invalid::new(key("issuer"), "must not be empty"));
        }
        if self.audience.trim().is_empty() {
            return Err(Invalid::new(key("audience"), "must not be empty"));
        }
        if !(1..=100).contains(&self.login_max_failures) {
            return Err(Invalid::new(
                key("login_max_failures"),
                "must be between 1 and 100",
            ));
        }
        if !(1..=86_400).contains(&self.login_lockout_secs) {
            return Err(Invalid::new(
                key("login_lockout_secs"),
                "must be between 1 and 86400 seconds",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(key("database"), r))
    }

    pub fn keys_dir(&self, data_dir: &Path) -> std::path::PathBuf {
        if self.keys_dir.is_empty() {
            data_dir.join("keys")
        } else {
            self.keys_dir.clone().into()
        }
    }
}

impl shopverse_runtime::ServiceConfig for UsersConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "users")
    }
}
