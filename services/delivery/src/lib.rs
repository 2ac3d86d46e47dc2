//! The delivery service: a shipment for each confirmed order, moved by operators from scheduled
//! to shipped to delivered.
//!
//! # Layout
//! The layout every service has; dependencies run `grpc`/`events` → `app` → `store`/`domain`:
//! - [`config`]: the `services.delivery` section.
//! - [`domain`]: shipment states and their moves, the carrier and ETA rule.
//! - [`store`]: all SQL.
//! - [`app`]: the use cases (schedule, ship, deliver, cancel).
//! - [`grpc`]: `shopverse.delivery.v1.DeliveryService`, mapping only.
//! - [`events`]: the consumer of `order.confirmed` and `order.cancelled`.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod domain;
pub mod events;
pub mod grpc;
pub mod store;

use tonic::service::Routes;

use shopverse_proto::delivery::v1::delivery_service_server::DeliveryServiceServer;
use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Delivery;
pub use config::DeliveryConfig;

pub const SERVICE_NAME: &str = "shopverse.delivery.v1.DeliveryService";

pub struct DeliveryService;

impl Service for DeliveryService {
    const NAME: &'static str = "delivery";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = &[(
        1,
        "shipments",
        include_str!("../migrations/0001_shipments.sql"),
    )];
    type Config = DeliveryConfig;

    async fn build(cx: &mut Context<DeliveryConfig>) -> Result<Routes, RunError> {
        let delivery = Delivery::new(
            cx.db.clone(),
            cx.config.clone(),
            cx.platform.clock.clone(),
            cx.relay_waker(),
        );
        cx.consume(events::DeliveryHandler(delivery.clone()));
        Ok(Routes::new(DeliveryServiceServer::new(delivery)))
    }
}
