//! All of the delivery service's SQL (SQLite or PostgreSQL, same statements).

use sqlx::{AnyConnection, Row};

use crate::domain::ShipmentState;

/// A row of `shipments`.
#[derive(Debug, Clone)]
pub struct ShipmentRow {
    pub id: String,
    pub order_id: String,
    pub user_id: String,
    pub carrier: String,
    pub tracking_number: String,
    pub status: ShipmentState,
    pub country: String,
    pub eta: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The shipment of `order_id`, if it has one.
pub async fn shipment(
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
        let status: String = r.try_get("status")?;
        Ok(ShipmentRow {
            id: r.try_get("id")?,
            order_id: r.try_get("order_id")?,
            user_id: r.try_get("user_id")?,
            carrier: r.try_get("carrier")?,
            tracking_number: r.try_get("tracking_number")?,
            status: ShipmentState::parse(&status).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown shipment status {status:?}").into())
            })?,
            country: r.try_get("country")?,
            eta: r.try_get("eta")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
        })
    })
    .transpose()
}

pub async fn insert(conn: &mut AnyConnection, s: &ShipmentRow) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO shipments (id, order_id, user_id, carrier, tracking_number, status, country, eta, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&s.id)
    .bind(&s.order_id)
    .bind(&s.user_id)
    .bind(&s.carrier)
    .bind(&s.tracking_number)
    .bind(s.status.as_str())
    .bind(&s.country)
    .bind(s.eta)
    .bind(s.created_at)
    .bind(s.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the shipment of `order_id` from `from` to `to` at `now`; false if it was not `from`.
pub async fn set_status(
    conn: &mut AnyConnection,
    order_id: &str,
    from: ShipmentState,
    to: ShipmentState,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE shipments SET status = $1, updated_at = $2 WHERE order_id = $3 AND status = $4",
    )
    .bind(to.as_str())
    .bind(now)
    .bind(order_id)
    .bind(from.as_str())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}
