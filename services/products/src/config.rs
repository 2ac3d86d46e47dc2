//! The products service's configuration (`[services.products]`).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProductsConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`; empty: `<data_dir>/products.db`.
    pub database: String,
    /// The currency new products default to and the seed uses (ISO 4217).
    pub default_currency: String,
}

impl Default for ProductsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            database: String::new(),
            default_currency: "EUR".into(),
        }
    }
}

impl ProductsConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if !crate::service::is_currency(&self.default_currency) {
            return Err(Invalid::new(
                format!("{prefix}.default_currency"),
                "must be an ISO 4217 code such as EUR",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(format!("{prefix}.database"), r))
    }

    pub fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "products")
    }
}
