//! The events the payments service consumes: `order.placed` charges, `order.cancelled` refunds a paid order.

use async_trait::async_trait;
use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::{Envelope, ORDER_CANCELLED, ORDER_PLACED, TOPIC_ORDERS};
use sqlx::AnyConnection;

use crate::app::Payments;

/// The consumer: `order.placed` charges, `order.cancelled` refunds.
pub struct PaymentHandler(pub Payments);

#[async_trait]
impl Handler for PaymentHandler {
    fn name(&self) -> &str {
        "payments"
    }

    fn topics(&self) -> Vec<String> {
        vec![TOPIC_ORDERS.to_owned()]
    }

    /// No effects outside this database: the inbox insert alone refuses a redelivery.
    fn prepares(&self) -> bool {
        false
    }

    fn wants(&self, t: &str) -> bool {
        t == ORDER_PLACED.name || t == ORDER_CANCELLED.name
    }

    async fn handle(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        if ev.r#type == ORDER_PLACED.name {
            self.0.charge(conn, ev).await
        } else {
            self.0.refund(conn, ev).await
        }
    }
}
