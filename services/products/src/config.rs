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
    /// The highest price a product may have, in minor units. The default (10^11, a billion
    /// euros) keeps a full cart's total (100 lines of 99 items) far inside an i64.
    pub max_price_minor: i64,
    /// How many of a search's newest matches (per group: name matches, then the rest) are
    /// ordered by relevance; older matches follow newest first. Bounds a search's work
    /// whatever the catalog's size.
    pub search_rank_window: i64,
}

impl Default for ProductsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            database: String::new(),
            default_currency: "EUR".into(),
            max_price_minor: 100_000_000_000,
            search_rank_window: 100,
        }
    }
}

impl ProductsConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if let Err(e) = shopverse_money::Currency::parse(&self.default_currency) {
            return Err(Invalid::new(
                format!("{prefix}.default_currency"),
                e.to_string(),
            ));
        }
        // 100 lines of 99 items at the highest price must still add up.
        if !(1..=i64::MAX / 9_900 / 10).contains(&self.max_price_minor) {
            return Err(Invalid::new(
                format!("{prefix}.max_price_minor"),
                format!("must be between 1 and {}", i64::MAX / 9_900 / 10),
            ));
        }
        if !(20..=10_000).contains(&self.search_rank_window) {
            return Err(Invalid::new(
                format!("{prefix}.search_rank_window"),
                "must be between 20 and 10000",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(format!("{prefix}.database"), r))
    }
}

impl shopverse_runtime::ServiceConfig for ProductsConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "products")
    }
}
