//! Products follows the order saga: a confirmed (paid) order commits its stock reservation, a
//! cancelled one releases it.

use async_trait::async_trait;
use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::{Envelope, ORDER_CANCELLED, ORDER_CONFIRMED, TOPIC_ORDERS};
use shopverse_kit::ServiceError;

use crate::app::Products;

pub struct StockSettler {
    products: Products,
}

impl StockSettler {
    pub fn new(products: Products) -> Self {
        Self { products }
    }
}

#[async_trait]
impl Handler for StockSettler {
    fn name(&self) -> &str {
        "products"
    }

    fn topics(&self) -> Vec<String> {
        vec![TOPIC_ORDERS.to_owned()]
    }

    /// No effects outside this database: the inbox insert alone refuses a redelivery.
    fn prepares(&self) -> bool {
        false
    }

    fn wants(&self, event_type: &str) -> bool {
        event_type == ORDER_CONFIRMED.name || event_type == ORDER_CANCELLED.name
    }

    async fn handle(
        &self,
        conn: &mut sqlx::AnyConnection,
        event: &Envelope,
    ) -> Result<(), HandlerError> {
        // The subject of an order event is the order id, which is also the reservation's key.
        let target = if event.r#type == ORDER_CONFIRMED.name {
            "COMMITTED"
        } else {
            "RELEASED"
        };
        match self.products.settle_on(conn, &event.subject, target).await {
            Ok(_) => Ok(()),
            // Cancelling an order that never reserved anything: nothing to give back.
            Err(ServiceError::NotFound { .. }) if target == "RELEASED" => Ok(()),
            Err(e @ (ServiceError::NotFound { .. } | ServiceError::FailedPrecondition(_))) => {
                Err(HandlerError::Permanent(e.to_string()))
            }
            Err(e) => Err(HandlerError::Retryable(Box::new(e))),
        }
    }
}
