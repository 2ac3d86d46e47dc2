//! The orders side of the saga: payment and shipment events move orders along, and a sweeper
//! cancels orders unpaid past their deadline and gives up checkouts a crash interrupted.

use std::time::Duration;

use async_trait::async_trait;
use tonic::Code;

use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::{
    Envelope, Origin, PAYMENT_FAILED, PAYMENT_REFUNDED, PAYMENT_SUCCEEDED, SHIPMENT_DELIVERED,
    SHIPMENT_SHIPPED, TOPIC_DELIVERY, TOPIC_PAYMENTS, decode_payload,
};
use shopverse_kit::CancellationToken;
use shopverse_proto::payments::v1::PaymentEvent;
use shopverse_proto::products::v1::ReservationRef;

use crate::app::Orders;
use crate::domain::{CheckoutState, OrderState};

pub struct SagaHandler {
    orders: Orders,
    /// From checkout to the payment's outcome: `shopverse_saga_payment_seconds{outcome}`.
    settled: prometheus::HistogramVec,
}

impl SagaHandler {
    pub fn new(orders: Orders, registry: &prometheus::Registry) -> Self {
        let opts = prometheus::HistogramOpts::new(
            "saga_payment_seconds",
            "Time from an order's checkout to its confirmation or its cancellation for a failed payment",
        )
        .namespace(shopverse_kit::metrics::NAMESPACE)
        .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]);
        #[allow(clippy::expect_used)] // a constant name, label and buckets
        let settled = shopverse_kit::metrics::register(
            registry,
            prometheus::HistogramVec::new(opts, &["outcome"]).expect("a valid histogram"),
        );
        Self { orders, settled }
    }

    /// Observes how long `order` took from checkout to `outcome`.
    fn settled(&self, order: &crate::store::OrderRow, outcome: &str) {
        let ms = self.orders.now().saturating_sub(order.created_at).max(0);
        self.settled
            .with_label_values(&[outcome])
            .observe(ms as f64 / 1000.0);
    }
}

#[async_trait]
impl Handler for SagaHandler {
    fn name(&self) -> &str {
        "orders"
    }

    fn topics(&self) -> Vec<String> {
        vec![TOPIC_PAYMENTS.to_owned(), TOPIC_DELIVERY.to_owned()]
    }

    /// No effects outside this database: the inbox insert alone refuses a redelivery.
    fn prepares(&self) -> bool {
        false
    }

    fn wants(&self, t: &str) -> bool {
        [
            PAYMENT_SUCCEEDED.name,
            PAYMENT_FAILED.name,
            PAYMENT_REFUNDED.name,
            SHIPMENT_SHIPPED.name,
            SHIPMENT_DELIVERED.name,
        ]
        .contains(&t)
    }

    async fn handle(
        &self,
        conn: &mut sqlx::AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        // Payment and shipment events are keyed by order id.
        let order_id = ev.subject.as_str();
        let Some(mut order) = self.orders.store().order(conn, order_id).await? else {
            return Err(HandlerError::Permanent(format!(
                "{} for unknown order {order_id}",
                ev.r#type
            )));
        };
        let t = ev.r#type.as_str();
        if t == PAYMENT_SUCCEEDED.name {
            if order.status == OrderState::PendingPayment {
                self.orders
                    .transition(
                        conn,
                        &mut order,
                        OrderState::Confirmed,
                        "",
                        Origin::Event(ev),
                    )
                    .await?;
                self.settled(&order, "confirmed");
            } else if !order.paid {
                // Paid after it was cancelled (the deadline passed first): remember the money;
                // payments refunds it when it sees the cancellation.
                let status = order.status;
                order.paid = true;
                order.updated_at = self.orders.now();
                self.orders
                    .store()
                    .update_order(conn, &order, status)
                    .await?;
            }
        } else if t == PAYMENT_FAILED.name {
            let p: PaymentEvent =
                decode_payload(ev).map_err(|e| HandlerError::Permanent(e.to_string()))?;
            if order.status == OrderState::PendingPayment {
                self.orders
                    .transition(
                        conn,
                        &mut order,
                        OrderState::Cancelled,
                        &format!("payment failed: {}", p.reason),
                        Origin::Event(ev),
                    )
                    .await?;
                self.settled(&order, "payment_failed");
            }
        } else if t == PAYMENT_REFUNDED.name {
            if !order.refunded {
                let status = order.status;
                order.refunded = true;
                order.updated_at = self.orders.now();
                self.orders
                    .store()
                    .update_order(conn, &order, status)
                    .await?;
            }
        } else if t == SHIPMENT_SHIPPED.name {
            self.orders
                .transition(conn, &mut order, OrderState::Shipped, "", Origin::Event(ev))
                .await?;
        } else if t == SHIPMENT_DELIVERED.name {
            self.orders
                .transition(
                    conn,
                    &mut order,
                    OrderState::Delivered,
                    "",
                    Origin::Event(ev),
                )
                .await?;
        }
        Ok(())
    }
}

/// One pass of the sweeper. Returns how many orders and checkouts it moved.
pub async fn sweep(orders: &Orders) -> Result<usize, shopverse_kit::ServiceError> {
    let now = orders.now();
    let mut moved = 0;
    for id in orders.store().overdue(now).await? {
        let mut tx = orders.store().db.begin_write().await?;
        let Some(mut order) = orders.store().order(&mut tx, &id).await? else {
            continue;
        };
        if order.status == OrderState::PendingPayment && order.payment_deadline < now {
            if orders
                .transition(
                    &mut tx,
                    &mut order,
                    OrderState::Cancelled,
                    "payment deadline passed",
                    Origin::Keyed {
                        key: &id,
                        traceparent: None,
                    },
                )
                .await?
            {
                moved += 1;
            }
            tx.commit().await?;
        }
    }
    // A checkout that reserved stock but never placed its order (the process died, or the
    // client went away mid-call): release its reservation.
    let stale = now - orders.config().checkout_abandon_secs * 1000;
    for id in orders
        .store()
        .checkouts_in(CheckoutState::Reserving, stale)
        .await?
    {
        let mut conn = orders.store().db.write_conn().await?;
        if orders
            .store()
            .move_checkout(
                &mut conn,
                &id,
                CheckoutState::Reserving,
                CheckoutState::Abandoning,
                None,
                now,
            )
            .await?
        {
            moved += 1;
        }
    }
    for id in orders
        .store()
        .checkouts_in(CheckoutState::Abandoning, i64::MAX)
        .await?
    {
        match orders
            .products()
            .release_reservation(ReservationRef {
                order_id: id.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.code() == Code::NotFound => {}
            Err(e) => {
                tracing::warn!(order_id = %id, error = %e, "releasing an abandoned checkout's stock failed; will retry");
                continue;
            }
        }
        let mut conn = orders.store().db.write_conn().await?;
        orders
            .store()
            .move_checkout(
                &mut conn,
                &id,
                CheckoutState::Abandoning,
                CheckoutState::Abandoned,
                None,
                now,
            )
            .await?;
        moved += 1;
    }
    if moved > 0 {
        orders.wake_relay();
    }
    Ok(moved)
}

/// Sweeps every `sweep_interval_ms` until `shutdown`.
pub async fn run_sweeper(orders: Orders, shutdown: CancellationToken) {
    let every = Duration::from_millis(orders.config().sweep_interval_ms);
    loop {
        if let Err(e) = sweep(&orders).await {
            tracing::warn!(error = %e, "order sweep failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
