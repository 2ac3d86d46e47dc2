//! The orders service's configuration (`services.orders`).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrdersConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`; empty: `<data_dir>/orders.db`.
    pub database: String,
    /// Where the products service answers (prices, stock reservations): one URL, or a comma
    /// separated list of replicas, balanced over those that pass their gRPC health check.
    pub products_url: String,
    /// An order unpaid this long after checkout is cancelled and its stock released.
    pub payment_deadline_secs: i64,
    /// A checkout that crashed mid-way is given up (its reservation released) after this long.
    pub checkout_abandon_secs: i64,
    /// How often overdue orders and abandoned checkouts are looked for.
    pub sweep_interval_ms: u64,
    /// Orders whose subtotal reaches this ship free...
    pub free_shipping_from_minor: i64,
    /// ...the others pay this.
    pub shipping_fee_minor: i64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            database: String::new(),
            products_url: "http://127.0.0.1:50052".into(),
            payment_deadline_secs: 900,
            checkout_abandon_secs: 120,
            sweep_interval_ms: 1000,
            free_shipping_from_minor: 5000,
            shipping_fee_minor: 490,
        }
    }
}

impl OrdersConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        shopverse_rpc::pool::parse_list(&self.products_url)
            .map_err(|e| Invalid::new(key("products_url"), e.to_string()))?;
        if !(1..=7 * 86_400).contains(&self.payment_deadline_secs) {
            return Err(Invalid::new(
                key("payment_deadline_secs"),
                "must be between 1 second and 7 days",
            ));
        }
        if !(1..=86_400).contains(&self.checkout_abandon_secs) {
            return Err(Invalid::new(
                key("checkout_abandon_secs"),
                "must be between 1 and 86400",
            ));
        }
        if !(10..=600_000).contains(&self.sweep_interval_ms) {
            return Err(Invalid::new(
                key("sweep_interval_ms"),
                "must be between 10 and 600000",
            ));
        }
        if self.free_shipping_from_minor < 0 || self.shipping_fee_minor < 0 {
            return Err(Invalid::new(
                key("shipping_fee_minor"),
                "shipping amounts must not be negative",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(key("database"), r))
    }
}

impl shopverse_runtime::ServiceConfig for OrdersConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "orders")
    }
}
