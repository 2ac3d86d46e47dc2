//! The payments service: charges each placed order exactly once and refunds cancelled paid ones.
//!
//! # Layout
//! - [`config`]: the `services.payments` section.
//! - [`provider`]: the provider trait and the simulator (its rules are documented there).
//! - [`store`]: all SQL.
//! - [`app`]: the use cases: charge an order once, refund it, read a payment.
//! - [`grpc`]: `shopverse.payments.v1.PaymentsService` (read a payment).
//! - [`events`]: the consumer of order events.
//!
//! # Exactly once
//! Three guards, each enough for its failure: the consumer's inbox (a redelivered event is
//! skipped), the provider's idempotency key per order (a charge repeated after a crash between
//! charge and commit returns the first charge), and a unique `(order, kind)` on transactions
//! (the ledger cannot hold two captures or two refunds for an order).

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod events;
pub mod grpc;
pub mod provider;
pub mod store;

use std::sync::Arc;

use tonic::service::Routes;

use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Payments;
pub use config::PaymentsConfig;

pub const SERVICE_NAME: &str = "shopverse.payments.v1.PaymentsService";

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "payments",
    include_str!("../migrations/0001_payments.sql"),
)];

/// The payments service, as [`shopverse_runtime::serve`] runs it: the gRPC server (read a
/// payment), the relay, and the consumer that charges and refunds.
pub struct PaymentsService;

impl Service for PaymentsService {
    const NAME: &'static str = "payments";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = MIGRATIONS;
    type Config = PaymentsConfig;

    async fn build(cx: &mut Context<PaymentsConfig>) -> Result<Routes, RunError> {
        let provider = provider::Simulator::open(
            &cx.config.simulator_url(&cx.data_dir),
            cx.config.flaky_failures,
        )
        .await?;
        cx.close_on_stop(provider.db().clone());
        let payments = Payments::new(cx.db.clone(), Arc::new(provider), cx.platform.clock.clone());
        cx.consume(events::PaymentHandler(payments.clone()));
        Ok(Routes::new(payments.into_server()))
    }
}
