//! The delivery service: a shipment for each confirmed order, moved by operators from scheduled
//! to shipped to delivered.
//!
//! # Carrier and ETA rule
//! Destination in `home_country` (default DE): DHL, 2 days. Elsewhere in the EU: DPD, 4 days.
//! Anywhere else: UPS, 7 days. Days are calendar days from confirmation. The tracking number is
//! the carrier's prefix and 12 hex digits derived from the order id, so it is stable across
//! redeliveries of `order.confirmed`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Row};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use shopverse_events::Platform;
use shopverse_events::consumer::{Handler, HandlerError};
use shopverse_events::envelope::{
    Envelope, EventType, ORDER_CANCELLED, ORDER_CONFIRMED, Origin, SHIPMENT_DELIVERED,
    SHIPMENT_SCHEDULED, SHIPMENT_SHIPPED, TOPIC_ORDERS, decode_payload, new_envelope,
};
use shopverse_events::outbox::{Relay, enqueue};
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::config::Invalid;
use shopverse_kit::db::{Db, MigrationSpec};
use shopverse_kit::identity::{Role, require};
use shopverse_kit::{CancellationToken, Clock, ServiceError};
use shopverse_proto::delivery::v1::delivery_service_server::{
    DeliveryService, DeliveryServiceServer,
};
use shopverse_proto::delivery::v1::*;
use shopverse_proto::orders::v1::OrderEvent;

pub const SERVICE_NAME: &str = "shopverse.delivery.v1.DeliveryService";
pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "shipments",
    include_str!("../migrations/0001_shipments.sql"),
)];
const SOURCE: &str = "delivery";
const DAY_MS: i64 = 86_400_000;
const EU: &[&str] = &[
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub listen: SocketAddr,
    /// Empty: `<data_dir>/delivery.db`.
    pub database: String,
    /// Where the warehouse is (ISO 3166-1 alpha-2).
    pub home_country: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50056)),
            database: String::new(),
            home_country: "DE".into(),
        }
    }
}

impl DeliveryConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        if self.home_country.len() != 2
            || !self.home_country.chars().all(|c| c.is_ascii_uppercase())
        {
            return Err(Invalid::new(
                format!("{prefix}.home_country"),
                "must be an ISO 3166-1 alpha-2 code such as DE",
            ));
        }
        shopverse_kit::config::check_database_url(&self.database)
            .map_err(|r| Invalid::new(format!("{prefix}.database"), r))
    }

    pub fn database_url(&self, data_dir: &Path) -> String {
        shopverse_kit::config::database_url_or_default(&self.database, data_dir, "delivery")
    }
}

/// `(carrier, days)` for a destination.
pub fn carrier_for(home: &str, country: &str) -> (&'static str, i64) {
    if country == home {
        ("DHL", 2)
    } else if EU.contains(&country) {
        ("DPD", 4)
    } else {
        ("UPS", 7)
    }
}

#[derive(Debug, Clone)]
struct ShipmentRow {
    id: String,
    order_id: String,
    user_id: String,
    carrier: String,
    tracking_number: String,
    status: String,
    country: String,
    eta: i64,
    created_at: i64,
    updated_at: i64,
}

fn to_proto(s: &ShipmentRow) -> Shipment {
    Shipment {
        id: s.id.clone(),
        order_id: s.order_id.clone(),
        user_id: s.user_id.clone(),
        carrier: s.carrier.clone(),
        tracking_number: s.tracking_number.clone(),
        status: match s.status.as_str() {
            "SCHEDULED" => ShipmentStatus::Scheduled,
            "SHIPPED" => ShipmentStatus::Shipped,
            "DELIVERED" => ShipmentStatus::Delivered,
            "CANCELLED" => ShipmentStatus::Cancelled,
            _ => ShipmentStatus::Unspecified,
        }
        .into(),
        eta: Some(to_timestamp(s.eta)),
        created_at: Some(to_timestamp(s.created_at)),
        updated_at: Some(to_timestamp(s.updated_at)),
        country: s.country.clone(),
    }
}

async fn shipment(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<ShipmentRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, order_id, user_id, carrier, tracking_number, status, country, eta, created_at, updated_at \
         FROM shipments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(ShipmentRow {
            id: r.try_get("id")?,
            order_id: r.try_get("order_id")?,
            user_id: r.try_get("user_id")?,
            carrier: r.try_get("carrier")?,
            tracking_number: r.try_get("tracking_number")?,
            status: r.try_get("status")?,
            country: r.try_get("country")?,
            eta: r.try_get("eta")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}

#[derive(Clone)]
pub struct Delivery {
    db: Db,
    config: DeliveryConfig,
    clock: Arc<dyn Clock>,
    relay: Arc<tokio::sync::Notify>,
}

impl Delivery {
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

    async fn schedule(&self, conn: &mut AnyConnection, ev: &Envelope) -> Result<(), HandlerError> {
        let order = decode_payload::<OrderEvent>(ev)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?
            .order
            .ok_or_else(|| HandlerError::Permanent("order.confirmed without an order".into()))?;
        if shipment(conn, &order.id).await?.is_some() {
            return Ok(());
        }
        let country = order
            .shipping_address
            .map(|a| a.country)
            .unwrap_or_default();
        let (carrier, days) = carrier_for(&self.config.home_country, &country);
        let digest: String = Sha256::digest(order.id.as_bytes())
            .iter()
            .take(6)
            .map(|b| format!("{b:02X}"))
            .collect();
        let now = self.clock.now_ms();
        let s = ShipmentRow {
            id: uuid::Uuid::now_v7().to_string(),
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            carrier: carrier.to_owned(),
            tracking_number: format!("{carrier}{digest}"),
            status: "SCHEDULED".into(),
            country,
            eta: now + days * DAY_MS,
            created_at: now,
            updated_at: now,
        };
        sqlx::query(
            "INSERT INTO shipments (id, order_id, user_id, carrier, tracking_number, status, country, eta, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&s.id)
        .bind(&s.order_id)
        .bind(&s.user_id)
        .bind(&s.carrier)
        .bind(&s.tracking_number)
        .bind(&s.status)
        .bind(&s.country)
        .bind(s.eta)
        .bind(s.created_at)
        .bind(s.updated_at)
        .execute(&mut *conn)
        .await?;
        self.emit(conn, &SHIPMENT_SCHEDULED, &s, Origin::Event(ev))
            .await?;
        Ok(())
    }

    async fn set_status(
        &self,
        conn: &mut AnyConnection,
        s: &mut ShipmentRow,
        from: &str,
        to: &str,
    ) -> Result<bool, sqlx::Error> {
        s.status = to.to_owned();
        s.updated_at = self.clock.now_ms();
        let n = sqlx::query(
            "UPDATE shipments SET status = $1, updated_at = $2 WHERE order_id = $3 AND status = $4",
        )
        .bind(to)
        .bind(s.updated_at)
        .bind(&s.order_id)
        .bind(from)
        .execute(conn)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    async fn advance(
        &self,
        order_id: &str,
        from: &str,
        to: &str,
        kind: &EventType,
    ) -> Result<ShipmentRow, ServiceError> {
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required"));
        }
        let mut tx = self.db.begin_write().await?;
        let mut s = shipment(&mut tx, order_id)
            .await?
            .ok_or_else(|| ServiceError::not_found("shipment for order", order_id))?;
        if s.status == to {
            return Ok(s);
        }
        if s.status != from || !self.set_status(&mut tx, &mut s, from, to).await? {
            return Err(ServiceError::FailedPrecondition(format!(
                "the shipment of order {order_id} is {}; it must be {} first",
                s.status.to_lowercase(),
                from.to_lowercase()
            )));
        }
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
}

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
            return self.0.schedule(conn, ev).await;
        }
        // Cancelled before it left: the parcel is not sent.
        if let Some(mut s) = shipment(conn, &ev.subject).await?
            && s.status == "SCHEDULED"
        {
            self.0
                .set_status(conn, &mut s, "SCHEDULED", "CANCELLED")
                .await?;
        }
        Ok(())
    }
}

fn reply(r: Result<ShipmentRow, ServiceError>) -> Result<Response<Shipment>, Status> {
    r.map(|s| Response::new(to_proto(&s))).map_err(Status::from)
}

#[tonic::async_trait]
impl DeliveryService for Delivery {
    #[tracing::instrument(skip_all)]
    async fn get_shipment(
        &self,
        req: Request<GetShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        let caller = require(&req, Role::Customer)?;
        let order_id = &req.get_ref().order_id;
        if order_id.is_empty() {
            return Err(ServiceError::invalid("order_id", "is required").into());
        }
        let mut conn = self.db.read().await.map_err(ServiceError::from)?;
        match shipment(&mut conn, order_id)
            .await
            .map_err(ServiceError::from)?
        {
            Some(s) if s.user_id == caller.user_id || caller.is_admin() => reply(Ok(s)),
            _ => Err(ServiceError::not_found("shipment for order", order_id).into()),
        }
    }

    #[tracing::instrument(skip_all)]
    async fn mark_shipped(
        &self,
        req: Request<MarkShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        require(&req, Role::Admin)?;
        reply(
            self.advance(
                &req.get_ref().order_id,
                "SCHEDULED",
                "SHIPPED",
                &SHIPMENT_SHIPPED,
            )
            .await,
        )
    }

    #[tracing::instrument(skip_all)]
    async fn mark_delivered(
        &self,
        req: Request<MarkShipmentRequest>,
    ) -> Result<Response<Shipment>, Status> {
        require(&req, Role::Admin)?;
        reply(
            self.advance(
                &req.get_ref().order_id,
                "SHIPPED",
                "DELIVERED",
                &SHIPMENT_DELIVERED,
            )
            .await,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("delivery database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("delivery gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

pub async fn open_db(config: &DeliveryConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the delivery service on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: DeliveryConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "delivery",
        &platform.registry,
    );
    let delivery = Delivery {
        db: db.clone(),
        config,
        clock: platform.clock.clone(),
        relay: relay.waker(),
    };
    let handler = Arc::new(DeliveryHandler(delivery.clone()));
    let background = vec![shopverse_events::consumer_task(
        handler,
        db.clone(),
        &relay,
        &platform,
        shutdown.clone(),
    )];
    let routes = Routes::new(DeliveryServiceServer::new(delivery));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carriers() {
        assert_eq!(carrier_for("DE", "DE"), ("DHL", 2));
        assert_eq!(carrier_for("DE", "FR"), ("DPD", 4));
        assert_eq!(carrier_for("DE", "US"), ("UPS", 7));
    }
}
