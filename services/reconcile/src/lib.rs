//! The saga's reconciliation, computed from each service's database and the payment
//! provider's own ledger: after checkouts have run (through crashes, broker outages, replicas
//! going away) and nothing is in flight, they must agree with each other and with what the
//! clients were told. One implementation for the crash and distributed tests and for the
//! checkout benchmark.
//!
//! 1. Every order a client was told about exists and has settled (confirmed or cancelled);
//!    every order was made by a checkout that placed it.
//! 2. The provider's ledger, per order: captures minus refunds is the order's total if it was
//!    confirmed and zero if it was cancelled; every refund returns exactly the capture it names,
//!    in its currency; no capture or refund under a key the payments service does not use, or
//!    for an order that does not exist. The payments service's own transactions name exactly
//!    the provider's references.
//! 3. Each order's reservation matches its fate; abandoned and refused checkouts hold no stock.
//! 4. Stock: what left each product is exactly what committed reservations hold, and that is
//!    what confirmed orders bought; nothing stays reserved; no unit is lost or made up.
//! 5. One `order.placed` notice per order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::Row;

/// Where the saga's databases are (any URL sqlx's `Any` driver takes: SQLite files,
/// PostgreSQL).
pub struct Urls<'a> {
    pub orders: &'a str,
    pub products: &'a str,
    pub payments: &'a str,
    pub notifications: &'a str,
    /// The payment provider's ledger (the simulator's own database).
    pub provider: &'a str,
}

impl<'a> Urls<'a> {
    /// The databases of an appliance with SQLite files in `dir` (`<service>.db`, and the
    /// simulator's `payment-simulator.db`), as `shopverse up` lays them out.
    pub fn sqlite_files(dir: &std::path::Path) -> [String; 5] {
        [
            "orders",
            "products",
            "payments",
            "notifications",
            "payment-simulator",
        ]
        .map(|name| format!("sqlite://{}/{name}.db", dir.display()))
    }

    /// [`Urls`] of what [`Self::sqlite_files`] returned.
    pub fn of(files: &'a [String; 5]) -> Urls<'a> {
        Urls {
            orders: &files[0],
            products: &files[1],
            payments: &files[2],
            notifications: &files[3],
            provider: &files[4],
        }
    }
}

/// The saga's databases and the provider's ledger.
pub struct Dbs {
    pub orders: sqlx::AnyPool,
    pub products: sqlx::AnyPool,
    pub payments: sqlx::AnyPool,
    pub notifications: sqlx::AnyPool,
    pub provider: sqlx::AnyPool,
}

impl Dbs {
    /// Opens the five databases, `max_connections` each.
    pub async fn open(urls: &Urls<'_>, max_connections: u32) -> Result<Dbs, sqlx::Error> {
        shopverse_storage::install_drivers();
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
            orders: open(urls.orders).await?,
            products: open(urls.products).await?,
            payments: open(urls.payments).await?,
            notifications: open(urls.notifications).await?,
            provider: open(urls.provider).await?,
        })
    }

    pub async fn close(self) {
        self.orders.close().await;
        self.products.close().await;
        self.payments.close().await;
        self.notifications.close().await;
        self.provider.close().await;
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
    /// Captures and refunds in the provider's ledger.
    pub captures: usize,
    pub refunds: usize,
}

/// One captured charge or refund in the provider's ledger.
struct Entry {
    amount: i64,
    currency: String,
    reference: String,
    /// For a refund: the key of the charge it returns.
    refers_to: String,
}

/// The provider's ledger by order: captures and refunds under the keys the payments service
/// uses (`charge:<order>`, `refund:<order>`). An entry under any other key is a violation.
#[derive(Default)]
struct Ledger {
    captures: HashMap<String, Vec<Entry>>,
    refunds: HashMap<String, Vec<Entry>>,
}

async fn ledger(d: &Dbs, bad: &mut Vec<String>) -> Result<Ledger, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT idempotency_key, kind, amount_minor, currency, outcome, reference, refers_to \
         FROM simulator_operations WHERE outcome IN ('captured', 'refunded')",
    )
    .fetch_all(&d.provider)
    .await?;
    let mut l = Ledger::default();
    for row in &rows {
        let key: String = row.try_get("idempotency_key")?;
        let kind: String = row.try_get("kind")?;
        let entry = Entry {
            amount: row.try_get("amount_minor")?,
            currency: row.try_get("currency")?,
            reference: row.try_get("reference")?,
            refers_to: row.try_get("refers_to")?,
        };
        let (prefix, order) = key.split_once(':').unwrap_or(("", ""));
        let into = match (prefix, kind.as_str()) {
            ("charge", "charge") => &mut l.captures,
            ("refund", "refund") => &mut l.refunds,
            _ => {
                bad.push(format!(
                    "provider: a {kind} of {} {} under key {key:?}, which the payments service never uses",
                    entry.amount, entry.currency
                ));
                continue;
            }
        };
        into.entry(order.to_owned()).or_default().push(entry);
    }
    Ok(l)
}

/// Checks the databases against each other, against the provider's ledger and against `told`,
/// the ids of the orders clients were told were placed. `expected` holds, per product to check,
/// what its available plus committed units must add up to: its stock before the checkouts plus
/// what was already committed then.
pub async fn check(
    d: &Dbs,
    expected: &HashMap<String, i64>,
    told: &[String],
) -> Result<Report, sqlx::Error> {
    let mut r = Report::default();
    let bad = &mut r.violations;
    let mut ledger = ledger(d, bad).await?;
    r.captures = ledger.captures.values().map(Vec::len).sum();
    r.refunds = ledger.refunds.values().map(Vec::len).sum();
    let rows = sqlx::query(
        "SELECT o.id, o.status, o.currency, o.total_minor, c.state AS checkout \
         FROM orders o LEFT JOIN checkouts c ON c.order_id = o.id",
    )
    .fetch_all(&d.orders)
    .await?;
    r.orders = rows.len();
    let mut settled = HashMap::new();
    for row in &rows {
        let id: String = row.try_get("id")?;
        let status: String = row.try_get("status")?;
        let currency: String = row.try_get("currency")?;
        let total: i64 = row.try_get("total_minor")?;
        let checkout: Option<String> = row.try_get("checkout")?;
        if checkout.as_deref() != Some("PLACED") {
            bad.push(format!(
                "order {id}: no checkout placed it (checkout {checkout:?})"
            ));
        }
        let reservation: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(&d.products)
                .await?;
        let captures = ledger.captures.remove(&id).unwrap_or_default();
        let refunds = ledger.refunds.remove(&id).unwrap_or_default();
        let mut net = 0i64;
        for e in &captures {
            net = net.saturating_add(e.amount);
            if e.currency != currency {
                bad.push(format!(
                    "order {id}: in {currency}, captured {} {}",
                    e.amount, e.currency
                ));
            }
        }
        for refund in &refunds {
            net = net.saturating_sub(refund.amount);
            let returns = captures
                .iter()
                .find(|c| refund.refers_to == format!("charge:{id}") && c.amount == refund.amount);
            if returns.is_none() || refund.currency != currency {
                bad.push(format!(
                    "order {id}: refund {} of {} {} does not return its capture ({} captured)",
                    refund.reference,
                    refund.amount,
                    refund.currency,
                    captures
                        .iter()
                        .map(|c| c.amount.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let want = match status.as_str() {
            "CONFIRMED" => {
                r.confirmed += 1;
                if reservation.as_deref() != Some("COMMITTED") {
                    bad.push(format!(
                        "order {id}: confirmed, reservation {reservation:?}"
                    ));
                }
                total
            }
            "CANCELLED" => {
                r.cancelled += 1;
                if reservation.as_deref() != Some("RELEASED") {
                    bad.push(format!(
                        "order {id}: cancelled, reservation {reservation:?}"
                    ));
                }
                0
            }
            other => {
                bad.push(format!("order {id} ended {other}"));
                net
            }
        };
        if net != want {
            bad.push(format!(
                "order {id}: {status} with total {total} {currency}, but the provider holds {net} \
                 ({} captures, {} refunds)",
                captures.len(),
                refunds.len()
            ));
        }
        // The payments service's record names exactly the provider's references.
        let mut recorded: Vec<String> = sqlx::query_scalar(
            "SELECT provider_ref FROM transactions WHERE order_id = $1 AND kind IN ('CAPTURE', 'REFUND')",
        )
        .bind(&id)
        .fetch_all(&d.payments)
        .await?;
        let mut provider: Vec<String> = captures
            .iter()
            .chain(&refunds)
            .map(|e| e.reference.clone())
            .collect();
        recorded.sort();
        provider.sort();
        if recorded != provider {
            bad.push(format!(
                "order {id}: the payments service recorded {recorded:?}, the provider {provider:?}"
            ));
        }
        settled.insert(id, status);
    }
    for (order, entries) in ledger.captures.iter().chain(&ledger.refunds) {
        bad.push(format!(
            "provider: {} entries for order {order:?}, which does not exist",
            entries.len()
        ));
    }
    for id in told {
        match settled.get(id).map(String::as_str) {
            Some("CONFIRMED" | "CANCELLED") => {}
            Some(other) => bad.push(format!("order {id}, as a client was told, is {other}")),
            None => bad.push(format!("order {id}, as a client was told, does not exist")),
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
