//! The delivery service's configuration (`services.delivery`).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub listen: SocketAddr,
    /// Empty: `<data_dir>/delivery.db`.
    pub database: String,
    /// Where the warehouse is (ISO 3166-1 alpha-2).
    pub home_country: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50056)),
            database: String::new(),
            home_country: "DE".into(),
        }
    }
}

impl DeliveryConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if self.home_country.len() != 2
            || !self.home_country.chars().all(|c| c.is_ascii_uppercase())
        {
            return Err(Invalid::new(
                format!("{prefix}.home_country"),
                "must be an ISO 3166-1 alpha-2 code such as DE",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(format!("{prefix}.database"), r))
    }
}

impl shopverse_runtime::ServiceConfig for DeliveryConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "delivery")
    }
}
