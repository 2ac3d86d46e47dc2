//! The delivery service's use cases: schedule a shipment for a confirmed order, move it on,
//! cancel it with its order. Each writes its state and its event in one transaction.

use std::sync::Arc;

use sqlx::AnyConnection;

use shopverse_events::consumer::HandlerError;
use shopverse_events::envelope::{
    Envelope, EventType, Origin, SHIPMENT_DELIVERED, SHIPMENT_SCHEDULED, SHIPMENT_SHIPPED,
    new_envelope,
};
use shopverse_events::outbox::enqueue;
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::delivery::v1::ShipmentEvent;
use shopverse_storage::Db;

use crate::config::DeliveryConfig;
use crate::domain::{self, DAY_MS, ShipmentState};
use crate::grpc::to_proto;
use crate::store::{self, ShipmentRow};

const SOURCE: &str = "delivery";

#[derive(Clone)]
pub struct Delivery {
    pub(crate) db: Db,
    config: DeliveryConfig,
    clock: Arc<dyn Clock>,
    relay: Arc<tokio::sync::Notify>,
}

impl Delivery {
    pub fn new(
        db: Db,
        config: DeliveryConfig,
        clock: Arc<dyn Clock>,
        relay: Arc<tokio::sync::Notify>,
    ) -> Delivery {
        Delivery {
            db,
            config,
            clock,
            relay,
        }
    }

    async fn emit(
        &self,
        conn: &mut AnyConnection,
        kind: &EventType,
        s: &ShipmentRow,
        origin: Origin<'_>,
    ) -> Result<(), sqlx::Error> {
        let payload = ShipmentEvent {
            shipment: Some(to_proto(s)),
        };
        // Keyed by order id, so an order's shipment events stay in order with each other.
        let env = new_envelope(
            kind,
            SOURCE,
            &s.order_id,
            self.clock.now_ms(),
            origin,
            &payload,
        );
        enqueue(conn, kind, &env).await
    }

    /// `order.confirmed`: a shipment, once per order.
    pub(crate) async fn schedule(
        &self,
        conn: &mut AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        let order = shopverse_events::order_of(ev)?;
        if store::shipment(conn, &order.id).await?.is_some() {
            return Ok(());
        }
        let country = order
            .shipping_address
            .map(|a| a.country)
            .unwrap_or_default();
        let (carrier, days) = domain::carrier_for(&self.config.home_country, &country);
        let now = self.clock.now_ms();
        let s = ShipmentRow {
            id: uuid::Uuid::now_v7().to_string(),
            tracking_number: domain::tracking_number(carrier, &order.id),
            order_id: order.id,
            user_id: order.user_id,
            carrier: carrier.to_owned(),
            status: ShipmentState::Scheduled,
            country,
            eta: now + days * DAY_MS,
            created_at: now,
            updated_at: now,
        };
        store::insert(conn, &s).await?;
        self.emit(conn, &SHIPMENT_SCHEDULED, &s, Origin::Event(ev))
            .await?;
        Ok(())
    }

    /// `order.cancelled`: a shipment that has not left is not sent.
    pub(crate) async fn cancel(
        &self,
        conn: &mut AnyConnection,
        order_id: &str,
    ) -> Result<(), HandlerError> {
        if let Some(s) = store::shipment(conn, order_id).await?
            && s.status.can_become(ShipmentState::Cancelled)
        {
            store::set_status(
                conn,
                order_id,
                s.status,
                ShipmentState::Cancelled,
                self.clock.now_ms(),
            )
            .await?;
        }
        Ok(())
    }

    pub async fn mark_shipped(&self, order_id: &str) -> Result<ShipmentRow, ServiceError> {
        self.advance(order_id, ShipmentState::Shipped, &SHIPMENT_SHIPPED)
            .await
    }

    pub async fn mark_delivered(&self, order_id: &str) -> Result<ShipmentRow, ServiceError> {
        self.advance(order_id, ShipmentState::Delivered, &SHIPMENT_DELIVERED)
            .await
    }

    /// Moves the shipment of `order_id` to `to`; repeating a move that was made answers the
    /// shipment as it is.
    async fn advance(
        &self,
        order_id: &str,
        to: ShipmentState,
        kind: &EventType,
    ) -> Result<ShipmentRow, ServiceError> {
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required"));
        }
        let mut tx = self.db.begin_write().await?;
        let mut s = store::shipment(&mut tx, order_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("shipment for order", order_id))?;
        if s.status == to {
            return Ok(s);
        }
        let now = self.clock.now_ms();
        if !s.status.can_become(to)
            || !store::set_status(&mut tx, order_id, s.status, to, now).await?
        {
            let before = match to {
                ShipmentState::Delivered => ShipmentState::Shipped,
                _ => ShipmentState::Scheduled,
            };
            return Err(ServiceError::FailedPrecondition(format!(
                "the shipment of order {order_id} is {}; it must be {} first",
                s.status.word(),
                before.word()
            )));
        }
        s.status = to;
        s.updated_at = now;
        // An order's shipment moves to each status once: keyed by the order, a repeated
        // request raises the same event.
        let origin = Origin::Keyed {
            key: order_id,
            traceparent: None,
        };
        self.emit(&mut tx, kind, &s, origin).await?;
        tx.commit().await?;
        self.relay.notify_one();
        Ok(s)
    }

    /// The shipment of `order_id` as `caller` may see it: their own, or any for an admin.
    pub async fn shipment_for(
        &self,
        order_id: &str,
        caller: &shopverse_kit::Identity,
    ) -> Result<ShipmentRow, ServiceError> {
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required"));
        }
        let mut conn = self.db.read().await?;
        match store::shipment(&mut conn, order_id).await? {
            Some(s) if s.user_id == caller.user_id || caller.is_admin() => Ok(s),
            _ => Err(ServiceError::not_found("shipment for order", order_id)),
        }
    }
}
