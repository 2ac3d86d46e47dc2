//! The saga's reconciliation, computed from each service's database alone: after checkouts
//! have run (through crashes, broker outages, replicas going away) and nothing is in flight,
//! the four databases must agree. One implementation for the crash and distributed tests and
//! for the checkout benchmark.
//!
//! 1. Each order's reservation and payments match its fate; abandoned and refused checkouts
//!    hold no stock.
//! 2. Stock: what left each product is exactly what committed reservations hold, and that is
//!    what confirmed orders bought; nothing stays reserved; no unit is lost or made up.
//! 3. No notification twice for one event, and one `order.placed` notice per order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::Row;

/// The saga's databases (any URL sqlx's `Any` driver takes: SQLite files, PostgreSQL).
pub struct Dbs {
    pub orders: sqlx::AnyPool,
    pub products: sqlx::AnyPool,
    pub payments: sqlx::AnyPool,
    pub notifications: sqlx::AnyPool,
}

impl Dbs {
    /// Opens the four databases, `max_connections` each.
    pub async fn open(
        orders: &str,
        products: &str,
        payments: &str,
        notifications: &str,
        max_connections: u32,
    ) -> Result<Dbs, sqlx::Error> {
        shopverse_kit::db::install_drivers();
        let open = |url: &str| {
            let url = url.to_owned();
            async move {
                sqlx::pool::PoolOptions::<sqlx::Any>::new()
                    .max_connections(max_connections)
                    .connect(&url)
                    .await
            }
        };
        Ok(Dbs {
            orders: open(orders).await?,
            products: open(products).await?,
            payments: open(payments).await?,
            notifications: open(notifications).await?,
        })
    }

    pub async fn close(self) {
        self.orders.close().await;
        self.products.close().await;
        self.payments.close().await;
        self.notifications.close().await;
    }
}

pub async fn scalar(pool: &sqlx::AnyPool, sql: &'static str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(pool).await
}

/// What is still in flight: orders waiting for payment, checkouts mid-way, unpublished outbox
/// rows, held stock, orders whose `order.placed` notice has not arrived yet.
pub async fn in_flight(d: &Dbs) -> Result<i64, sqlx::Error> {
    Ok(scalar(
        &d.orders,
        "SELECT COUNT(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
    )
    .await?
        + scalar(
            &d.orders,
            "SELECT COUNT(*) FROM checkouts WHERE state IN ('RESERVING', 'ABANDONING')",
        )
        .await?
        + scalar(
            &d.orders,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await?
        + scalar(
            &d.payments,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await?
        + scalar(
            &d.products,
            "SELECT COUNT(*) FROM reservations WHERE state = 'HELD'",
        )
        .await?
        + (scalar(&d.orders, "SELECT COUNT(*) FROM orders").await?
            - scalar(
                &d.notifications,
                "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.placed'",
            )
            .await?)
            .max(0))
}

/// Waits up to `within` for nothing to be in flight; returns what still is (0: settled).
pub async fn settle(d: &Dbs, within: Duration) -> Result<i64, sqlx::Error> {
    let t0 = Instant::now();
    loop {
        let pending = in_flight(d).await?;
        if pending == 0 || t0.elapsed() >= within {
            return Ok(pending);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Units of `product` that committed reservations hold.
pub async fn committed(products: &sqlx::AnyPool, product: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_lines l \
         JOIN reservations r ON r.order_id = l.order_id \
         WHERE l.product_id = $1 AND r.state = 'COMMITTED'",
    )
    .bind(product)
    .fetch_one(products)
    .await
}

/// The outcome: what does not hold, and what was counted.
#[derive(Debug, Default)]
pub struct Report {
    pub violations: Vec<String>,
    pub orders: usize,
    pub confirmed: usize,
    pub cancelled: usize,
    pub abandoned_checkouts: usize,
    pub products: usize,
}

/// Checks the databases against each other. `expected` holds, per product to check, what its
/// available plus committed units must add up to: its stock before the checkouts plus what was
/// already committed then.
pub async fn check(d: &Dbs, expected: &HashMap<String, i64>) -> Result<Report, sqlx::Error> {
    let mut r = Report::default();
    let bad = &mut r.violations;
    let rows = sqlx::query("SELECT id, status, paid, refunded, total_minor FROM orders")
        .fetch_all(&d.orders)
        .await?;
    r.orders = rows.len();
    for row in &rows {
        let id: String = row.try_get("id")?;
        let status: String = row.try_get("status")?;
        let paid = row.try_get::<i64, _>("paid")? != 0;
        let refunded = row.try_get::<i64, _>("refunded")? != 0;
        let total: i64 = row.try_get("total_minor")?;
        let reservation: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(&d.products)
                .await?;
        let captures: Vec<i64> = sqlx::query_scalar(
            "SELECT amount_minor FROM transactions WHERE order_id = $1 AND kind = 'CAPTURE'",
        )
        .bind(&id)
        .fetch_all(&d.payments)
        .await?;
        let refunds: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM transactions WHERE order_id = $1 AND kind = 'REFUND'",
        )
        .bind(&id)
        .fetch_one(&d.payments)
        .await?;
        match status.as_str() {
            "CONFIRMED" => {
                r.confirmed += 1;
                if reservation.as_deref() != Some("COMMITTED") {
                    bad.push(format!(
                        "order {id}: confirmed, reservation {reservation:?}"
                    ));
                }
                if captures != vec![total] || refunds != 0 {
                    bad.push(format!(
                        "order {id}: confirmed, captures {captures:?} of {total}, {refunds} refunds (one capture of the total, no refund)"
                    ));
                }
            }
            "CANCELLED" => {
                r.cancelled += 1;
                if reservation.as_deref() != Some("RELEASED")
                    || captures.len() > 1
                    || refunds != captures.len() as i64
                    || paid == captures.is_empty()
                    || refunded != (refunds == 1)
                {
                    bad.push(format!(
                        "order {id}: cancelled (paid {paid}, refunded {refunded}), reservation {reservation:?}, captures {captures:?}, {refunds} refunds (released, every capture refunded once)"
                    ));
                }
            }
            other => bad.push(format!("order {id} ended {other}")),
        }
    }
    let abandoned: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM checkouts WHERE state IN ('ABANDONED', 'FAILED')")
            .fetch_all(&d.orders)
            .await?;
    r.abandoned_checkouts = abandoned.len();
    for id in &abandoned {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(id)
                .fetch_optional(&d.products)
                .await?;
        if !matches!(state.as_deref(), None | Some("RELEASED")) {
            bad.push(format!("checkout {id} left stock {state:?}"));
        }
    }
    let mut products: Vec<(&String, &i64)> = expected.iter().collect();
    products.sort();
    for (p, expected) in products {
        let Some(row) = sqlx::query("SELECT available, reserved FROM stock WHERE product_id = $1")
            .bind(p)
            .fetch_optional(&d.products)
            .await?
        else {
            bad.push(format!("product {p}: no stock row"));
            continue;
        };
        r.products += 1;
        let available: i64 = row.try_get("available")?;
        let reserved: i64 = row.try_get("reserved")?;
        let committed = committed(&d.products, p).await?;
        let sold: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM order_lines l \
             JOIN orders o ON o.id = l.order_id \
             WHERE l.product_id = $1 AND o.status = 'CONFIRMED'",
        )
        .bind(p)
        .fetch_one(&d.orders)
        .await?;
        if reserved != 0 || committed != sold || available + committed != *expected {
            bad.push(format!(
                "product {p}: available {available} + committed {committed} (sold {sold}, reserved {reserved}) is not {expected}"
            ));
        }
    }
    let dupes = scalar(
        &d.notifications,
        "SELECT COUNT(*) FROM (SELECT event_id FROM inbox_items GROUP BY event_id HAVING COUNT(*) > 1) d",
    )
    .await?;
    if dupes != 0 {
        bad.push(format!("{dupes} events notified twice"));
    }
    let placed = scalar(
        &d.notifications,
        "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.placed'",
    )
    .await?;
    if placed != rows.len() as i64 {
        bad.push(format!(
            "{placed} order.placed notices for {} orders",
            rows.len()
        ));
    }
    Ok(r)
}
