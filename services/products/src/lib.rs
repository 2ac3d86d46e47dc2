//! The products service: the category tree, the catalog and the stock behind it.
//!
//! # Layout
//! - [`config`]: the `services.products` section.
//! - [`repo`]: the database (SQLite or PostgreSQL, same SQL).
//! - [`service`]: the gRPC service (`shopverse.products.v1.ProductsService`): public browsing,
//!   admin edits with optimistic concurrency, and the internal stock reservation RPCs orders use.
//! - [`seed`]: the demo catalog (`shopverse seed`, `shopverse up --demo`).
//!
//! Stock never goes negative: a reservation is one conditional `UPDATE … WHERE available >= n`
//! per line inside one transaction, so concurrent reservations cannot both take the last unit.

#![forbid(unsafe_code)]

pub mod config;
pub mod consumer;
pub mod repo;
pub mod seed;
pub mod service;

use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::Routes;

use shopverse_events::Platform;
use shopverse_events::outbox::Relay;
use shopverse_kit::CancellationToken;
use shopverse_kit::db::{Db, MigrationSpec};

pub use config::ProductsConfig;
pub use service::Products;

pub const SERVICE_NAME: &str = "shopverse.products.v1.ProductsService";

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "catalog and stock",
    include_str!("../migrations/0001_catalog.sql"),
)];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("products database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("products gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

/// Connects to the products database and applies its migrations (and the outbox's).
pub async fn open_db(config: &ProductsConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the products service on `listener` until `shutdown`: the gRPC server and the relay.
pub async fn run(
    listener: TcpListener,
    config: ProductsConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "products",
        &platform.registry,
    );
    let products = Products::new(db.clone(), config, &platform, relay.waker());
    let consumer = Arc::new(consumer::StockSettler::new(products.clone()));
    let background = vec![shopverse_events::consumer_task(
        consumer,
        db.clone(),
        &relay,
        &platform,
        shutdown.clone(),
    )];
    let routes = Routes::new(products.into_server());
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
