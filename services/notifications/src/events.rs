//! The events the notifications service consumes: what happens to an account, an order, its
//! payment and its shipment, each told to the customer.

use async_trait::async_trait;
use sqlx::AnyConnection;

use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::*;

use crate::app::Notifications;

pub struct NotificationHandler(pub Notifications);

const WANTED: &[&str] = &[
    "user.registered",
    "order.placed",
    "order.confirmed",
    "order.cancelled",
    "payment.failed",
    "shipment.scheduled",
    "shipment.shipped",
    "shipment.delivered",
];

#[async_trait]
impl Handler for NotificationHandler {
    fn name(&self) -> &str {
        "notifications"
    }

    fn topics(&self) -> Vec<String> {
        [TOPIC_USERS, TOPIC_ORDERS, TOPIC_PAYMENTS, TOPIC_DELIVERY]
            .iter()
            .map(|t| (*t).to_owned())
            .collect()
    }

    fn wants(&self, t: &str) -> bool {
        WANTED.contains(&t)
    }

    /// Only a configured channel (email, SMS) sends anything before the transaction: without
    /// one, events skip the inbox read and are applied in runs, like any handler without a
    /// `prepare`.
    fn prepares(&self) -> bool {
        self.0.sends()
    }

    async fn prepare(&self, ev: &Envelope) -> Result<(), HandlerError> {
        self.0.send(ev).await
    }

    async fn handle(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        self.0.file(conn, ev).await
    }
}
