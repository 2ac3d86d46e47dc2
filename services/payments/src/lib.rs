//! The payments service: charges each placed order exactly once and refunds cancelled paid ones.
//!
//! # Layout
//! - [`config`]: the `services.payments` section.
//! - [`provider`]: the provider trait and the simulator (its rules are documented there).
//! - [`service`]: the gRPC service (read a payment) and the consumer of order events.
//!
//! # Exactly once
//! Three guards, each enough for its failure: the consumer's inbox (a redelivered event is
//! skipped), the provider's idempotency key per order (a charge repeated after a crash between
//! charge and commit returns the first charge), and a unique `(order, kind)` on transactions
//! (the ledger cannot hold two captures or two refunds for an order).

#![forbid(unsafe_code)]

pub mod config;
pub mod provider;
pub mod service;

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::Routes;

use shopverse_events::Platform;
use shopverse_events::outbox::Relay;
use shopverse_kit::CancellationToken;
use shopverse_kit::db::{Db, MigrationSpec};

pub use config::PaymentsConfig;
pub use service::Payments;

pub const SERVICE_NAME: &str = "shopverse.payments.v1.PaymentsService";

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "payments",
    include_str!("../migrations/0001_payments.sql"),
)];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("payments database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("payments gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

pub async fn open_db(config: &PaymentsConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the payments service on `listener` until `shutdown`: gRPC, relay and the consumer.
pub async fn run(
    listener: TcpListener,
    config: PaymentsConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let provider =
        provider::Simulator::open(&config.simulator_url(data_dir), config.flaky_failures).await?;
    let payments = Payments::new(db.clone(), Arc::new(provider), platform.clock.clone());
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "payments",
        &platform.registry,
    );
    let handler = Arc::new(service::PaymentHandler(payments.clone()));
    let background = vec![shopverse_events::consumer_task(
        handler,
        db.clone(),
        &relay,
        &platform,
        shutdown.clone(),
    )];
    let routes = Routes::new(payments.into_server());
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
