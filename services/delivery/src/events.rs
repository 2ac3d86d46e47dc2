//! The events the delivery service consumes: `order.confirmed` schedules a shipment,
//! `order.cancelled` cancels one that has not left.

use async_trait::async_trait;
use sqlx::AnyConnection;

use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::{Envelope, ORDER_CANCELLED, ORDER_CONFIRMED, TOPIC_ORDERS};

use crate::app::Delivery;

pub struct DeliveryHandler(pub Delivery);

#[async_trait]
impl Handler for DeliveryHandler {
    fn name(&self) -> &str {
        "delivery"
    }
    fn topics(&self) -> Vec<String> {
        vec![TOPIC_ORDERS.to_owned()]
    }
    /// No effects outside this database: the inbox insert alone refuses a redelivery.
    fn prepares(&self) -> bool {
        false
    }

    fn wants(&self, t: &str) -> bool {
        t == ORDER_CONFIRMED.name || t == ORDER_CANCELLED.name
    }
    async fn handle(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        if ev.r#type == ORDER_CONFIRMED.name {
            self.0.schedule(conn, ev).await
        } else {
            self.0.cancel(conn, &ev.subject).await
        }
    }
}
