//! The orders service: carts, checkout, and each order's way from payment to delivery.
//!
//! # Layout
//! - [`config`]: the `services.orders` section.
//! - [`domain`]: the order state machine as a type (`OrderState`: `PendingPayment → Confirmed
//!   → Shipped → Delivered`, `→ Cancelled` from the first two) and the cart's limits; it
//!   depends on nothing else here.
//! - [`store`]: all SQL (SQLite or PostgreSQL, same statements).
//! - [`app`]: the use cases: cart, checkout, the transitions.
//! - [`grpc`]: `shopverse.orders.v1.OrdersService`, mapping only.
//! - [`events`]: the consumer of payment and shipment events, and the sweeper.
//!
//! Dependencies run `grpc`/`events` → `app` → `store`/`domain`.
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

pub mod app;
pub mod config;
pub mod domain;
pub mod events;
pub mod grpc;
pub mod store;

use std::time::Duration;

use tonic::service::Routes;

use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Orders;
pub use config::OrdersConfig;

pub const SERVICE_NAME: &str = "shopverse.orders.v1.OrdersService";

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "carts, checkouts and orders",
    include_str!("../migrations/0001_orders.sql"),
)];

/// The orders service, as [`shopverse_runtime::serve`] runs it: the gRPC server, the relay, the
/// saga's consumer and the sweeper.
pub struct OrdersService;

impl Service for OrdersService {
    const NAME: &'static str = "orders";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = MIGRATIONS;
    type Config = OrdersConfig;

    async fn build(cx: &mut Context<OrdersConfig>) -> Result<Routes, RunError> {
        let products = cx.peer(
            "products",
            shopverse_proto::products::v1::products_service_server::SERVICE_NAME,
            &cx.config.products_url,
            Duration::from_secs(10),
        )?;
        let orders = Orders::new(
            cx.db.clone(),
            products,
            cx.config.clone(),
            &cx.platform,
            cx.relay_waker(),
        );
        cx.consume(events::SagaHandler::new(
            orders.clone(),
            &cx.platform.registry,
        ));
        cx.spawn(events::run_sweeper(orders.clone(), cx.shutdown()));
        Ok(Routes::new(orders.into_server()))
    }
}
