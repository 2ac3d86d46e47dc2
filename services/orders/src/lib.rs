//! The orders service: carts, checkout, and each order's way from payment to delivery.
//!
//! # Layout
//! - [`config`]: the `services.orders` section.
//! - [`domain`]: the order state machine as a type (`OrderState`: `PendingPayment → Confirmed
//!   → Shipped → Delivered`, `→ Cancelled` from the first two) and the cart's limits; it
//!   depends on nothing else here.
//! - [`store`]: the database (SQLite or PostgreSQL, same SQL).
//! - [`service`]: the gRPC service: cart, checkout, the transitions.
//! - [`saga`]: the consumer of payment and shipment events, and the sweeper.
//!
//! # Checkout across two databases
//! Stock lives in the products service, orders here, so checkout cannot be one transaction.
//! It is made safe by an attempt record written first: `(user, idempotency key)` gets a fresh
//! order id and the cart's lines in state `RESERVING`; stock is reserved under that order id
//! (idempotent in products); then one local transaction places the order, empties those cart
//! lines, writes `order.placed` to the outbox and marks the attempt `PLACED`. A retry with the
//! same key resumes from wherever the last try stopped; a crash leaves at worst a `RESERVING`
//! attempt, which the sweeper gives up after `checkout_abandon_secs`, releasing its stock.

#![forbid(unsafe_code)]

pub mod config;
pub mod domain;
pub mod saga;
pub mod service;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;

use shopverse_events::Platform;
use shopverse_events::outbox::Relay;
use shopverse_kit::CancellationToken;
use shopverse_kit::db::{Db, MigrationSpec};

pub use config::OrdersConfig;
pub use service::Orders;

pub const SERVICE_NAME: &str = "shopverse.orders.v1.OrdersService";

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "carts, checkouts and orders",
    include_str!("../migrations/0001_orders.sql"),
)];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("orders database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("orders: products_url {url}: {source}")]
    Endpoint {
        url: String,
        #[source]
        source: shopverse_kit::upstream::UpstreamError,
    },
    #[error("orders gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

pub async fn open_db(config: &OrdersConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the orders service on `listener` until `shutdown`: gRPC, relay, saga consumer, sweeper.
pub async fn run(
    listener: TcpListener,
    config: OrdersConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let products = shopverse_kit::upstream::balanced(
        &config.products_url,
        shopverse_proto::products::v1::products_service_server::SERVICE_NAME,
        Duration::from_secs(10),
        &platform.local,
        shutdown.clone(),
    )
    .map_err(|source| RunError::Endpoint {
        url: config.products_url.clone(),
        source,
    })?;
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "orders",
        &platform.registry,
    );
    let orders = Orders::new(db.clone(), products, config, &platform, relay.waker());
    let background = vec![
        shopverse_events::consumer_task(
            Arc::new(saga::SagaHandler::new(orders.clone())),
            db.clone(),
            &relay,
            &platform,
            shutdown.clone(),
        ),
        Box::pin(saga::run_sweeper(orders.clone(), shutdown.clone()))
            as futures::future::BoxFuture<'static, ()>,
    ];
    let routes = Routes::new(orders.into_server());
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
