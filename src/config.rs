//! The whole process's configuration: one TOML file (see `configs/`) plus `SHOPVERSE_*`
//! environment overrides. Each service crate owns its own section's type; this file only puts
//! them together and validates the whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shopverse_delivery::DeliveryConfig;
use shopverse_gateway::GatewayConfig;
use shopverse_kit::config::{Invalid, Validate};
use shopverse_kit::telemetry::TelemetryConfig;
use shopverse_notifications::NotificationsConfig;
use shopverse_orders::OrdersConfig;
use shopverse_payments::PaymentsConfig;
use shopverse_products::ProductsConfig;
use shopverse_users::UsersConfig;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    pub telemetry: TelemetryConfig,
    pub data: DataConfig,
    pub events: EventsConfig,
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    pub gateway: GatewayConfig,
    pub services: ServicesConfig,
    /// The file this came from (SIGHUP reads it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Where SQLite databases, the event log and keys live unless configured elsewhere.
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./data"),
        }
    }
}

/// Where events go between services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventsBackend {
    /// The appliance's log, in one SQLite file.
    Embedded,
    /// A Kafka cluster (`[events.kafka]`).
    Kafka,
}

impl EventsBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            EventsBackend::Embedded => "embedded",
            EventsBackend::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// `embedded` (the appliance's log in one SQLite file) or `kafka` (`[events.kafka]`).
    pub backend: EventsBackend,
    /// The embedded log's file; empty: `<data.dir>/events.db`.
    pub path: String,
    /// Partitions of each new topic.
    pub partitions: i32,
    /// The Kafka cluster, with `backend = "kafka"`.
    pub kafka: shopverse_events::kafka::KafkaConfig,
    /// How every consumer schedules and retries: concurrency across keys, retry backoff, and
    /// how far it may read ahead of its unfinished records.
    pub consumers: shopverse_events::consumer::ConsumerConfig,
    /// Hours the embedded log keeps a record once every consumer group has read it; inbox
    /// entries and published outbox rows are kept as long. Fractions are allowed. On Kafka the
    /// topics' own `retention.ms` applies; set this at least as long.
    pub retention_hours: f64,
    /// Bytes per topic past which the embedded log deletes its oldest records once every
    /// group has read them.
    pub retention_bytes: u64,
    /// Bytes per topic past which the oldest records go even if a group has not read them
    /// (the group is told, counted and logged).
    pub retention_max_bytes: u64,
    /// A consumer group that has committed nothing for this many hours and runs in no process
    /// of the appliance is forgotten (as Kafka forgets an empty group's offsets), so a consumer
    /// that is gone for good stops holding records back.
    pub group_expiry_hours: f64,
}

impl EventsConfig {
    /// The embedded log's retention rules.
    pub fn retention(&self) -> shopverse_events::retention::Retention {
        shopverse_events::retention::Retention {
            max_age: Duration::from_secs_f64(self.retention_hours * 3600.0),
            bytes: self.retention_bytes,
            max_bytes: self.retention_max_bytes,
            group_expiry: Duration::from_secs_f64(self.group_expiry_hours * 3600.0),
            ..Default::default()
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            backend: EventsBackend::Embedded,
            path: String::new(),
            partitions: 4,
            kafka: Default::default(),
            consumers: Default::default(),
            retention_hours: 72.0,
            retention_bytes: 256 << 20,
            retention_max_bytes: 1 << 30,
            group_expiry_hours: 168.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz` and `/readyz` over HTTP.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight calls may finish after SIGTERM before connections are dropped.
    pub grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_secs: 10 }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    pub users: UsersConfig,
    pub products: ProductsConfig,
    pub orders: OrdersConfig,
    pub payments: PaymentsConfig,
    pub notifications: NotificationsConfig,
    pub delivery: DeliveryConfig,
}

impl Validate for AppConfig {
    fn validate(&self) -> Result<(), Invalid> {
        self.telemetry.validate()?;
        if self.data.dir.as_os_str().is_empty() {
            return Err(Invalid::new("data.dir", "must not be empty"));
        }
        if self.events.backend == EventsBackend::Kafka {
            self.events.kafka.validate("events.kafka")?;
        }
        self.events.consumers.validate("events.consumers")?;
        if !(1..=256).contains(&self.events.partitions) {
            return Err(Invalid::new(
                "events.partitions",
                "must be between 1 and 256",
            ));
        }
        let hours = self.events.retention_hours;
        if !(hours.is_finite() && (0.0005..=87_600.0).contains(&hours)) {
            return Err(Invalid::new(
                "events.retention_hours",
                "must be between 0.0005 (about 2 s) and 87600 (10 years)",
            ));
        }
        let expiry = self.events.group_expiry_hours;
        if !(expiry.is_finite() && expiry >= hours && expiry <= 87_600.0) {
            return Err(Invalid::new(
                "events.group_expiry_hours",
                "must be at least events.retention_hours and at most 87600",
            ));
        }
        if self.events.retention_bytes < 1 << 16 {
            return Err(Invalid::new(
                "events.retention_bytes",
                "must be at least 65536",
            ));
        }
        if self.events.retention_max_bytes < self.events.retention_bytes {
            return Err(Invalid::new(
                "events.retention_max_bytes",
                "must be at least events.retention_bytes",
            ));
        }
        if !(1..=300).contains(&self.shutdown.grace_secs) {
            return Err(Invalid::new(
                "shutdown.grace_secs",
                "must be between 1 and 300",
            ));
        }
        self.gateway.validate("gateway")?;
        self.services.users.validate("services.users")?;
        self.services.products.validate("services.products")?;
        self.services.orders.validate("services.orders")?;
        self.services.payments.validate("services.payments")?;
        self.services
            .notifications
            .validate("services.notifications")?;
        self.services.delivery.validate("services.delivery")?;
        Ok(())
    }
}

impl AppConfig {
    /// Loads `path` (or the built-in defaults when `None`) with environment overrides.
    pub fn load(path: Option<&Path>) -> Result<AppConfig, shopverse_kit::config::ConfigError> {
        let mut cfg: AppConfig = match path {
            Some(p) => shopverse_kit::config::load(p, std::env::vars())?,
            None => shopverse_kit::config::from_str("", "built-in defaults", std::env::vars())?,
        };
        cfg.source = path.map(Path::to_path_buf);
        Ok(cfg)
    }

    pub fn events_url(&self) -> String {
        if self.events.path.is_empty() {
            format!("sqlite://{}", self.data.dir.join("events.db").display())
        } else if self.events.path.starts_with("sqlite:") {
            self.events.path.clone()
        } else {
            format!("sqlite://{}", self.events.path)
        }
    }
}
