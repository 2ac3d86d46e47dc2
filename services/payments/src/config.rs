//! The payments service's configuration (`services.payments`).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    pub listen: SocketAddr,
    /// Empty: `<data_dir>/payments.db`.
    pub database: String,
    /// The payment provider: `simulator` (see `provider.rs` for its rules).
    pub provider: String,
    /// The simulator's own store; empty: `<data_dir>/payment-simulator.db`.
    pub simulator_database: String,
    /// How many times `pm_card_flaky` fails for an order before it succeeds.
    pub flaky_failures: i64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50054)),
            database: String::new(),
            provider: "simulator".into(),
            simulator_database: String::new(),
            flaky_failures: 2,
        }
    }
}

impl PaymentsConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        if self.provider != "simulator" {
            return Err(Invalid::new(
                key("provider"),
                "only `simulator` is available in this build",
            ));
        }
        if !(0..=10).contains(&self.flaky_failures) {
            return Err(Invalid::new(
                key("flaky_failures"),
                "must be between 0 and 10",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(key("database"), r))?;
        shopverse_kit::config::check_database_url(&self.simulator_database)
            .map_err(|r| Invalid::new(key("simulator_database"), r))
    }

    pub fn simulator_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(
            &self.simulator_database,
            data_dir,
            "payment-simulator",
        )
    }
}

impl shopverse_runtime::ServiceConfig for PaymentsConfig {
    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "payments")
    }
}
