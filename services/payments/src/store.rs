//! All of the payments service's SQL (SQLite or PostgreSQL, same statements). The payment
//! provider's own ledger is the provider's (see `provider.rs`).

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use shopverse_kit::clock::to_timestamp;
use shopverse_proto::common::v1::Money;
use shopverse_proto::payments::v1::{Transaction, TransactionKind};
use shopverse_storage::placeholders;

#[derive(Debug, Clone)]
pub struct PaymentRow {
    pub order_id: String,
    pub user_id: String,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub failure_reason: String,
    pub attempts: i64,
}

pub async fn payment(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Option<PaymentRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT order_id, user_id, status, amount_minor, currency, failure_reason, attempts FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(PaymentRow {
            order_id: r.try_get("order_id")?,
            user_id: r.try_get("user_id")?,
            status: r.try_get("status")?,
            amount_minor: r.try_get("amount_minor")?,
            currency: r.try_get("currency")?,
            failure_reason: r.try_get("failure_reason")?,
            attempts: r.try_get("attempts")?,
        })
    })
    .transpose()
}

pub async fn upsert(
    conn: &mut AnyConnection,
    p: &PaymentRow,
    method: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO payments (order_id, user_id, status, amount_minor, currency, payment_method, failure_reason, attempts, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
         ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, failure_reason = excluded.failure_reason, \
         attempts = excluded.attempts, updated_at = excluded.updated_at",
    )
    .bind(&p.order_id)
    .bind(&p.user_id)
    .bind(&p.status)
    .bind(p.amount_minor)
    .bind(&p.currency)
    .bind(method)
    .bind(&p.failure_reason)
    .bind(p.attempts)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the provider's transactions of `kinds` for `p`, in one statement.
pub async fn record(
    conn: &mut AnyConnection,
    p: &PaymentRow,
    kinds: &[&str],
    reference: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO transactions (id, order_id, kind, amount_minor, currency, provider_ref, created_at) \
         VALUES {}",
        placeholders(1, kinds.len(), 7)
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for kind in kinds {
        q = q
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&p.order_id)
            .bind(*kind)
            .bind(p.amount_minor)
            .bind(&p.currency)
            .bind(reference)
            .bind(now);
    }
    q.execute(conn).await?;
    Ok(())
}

/// The provider's transactions recorded for `order_id`, oldest first.
pub async fn transactions(
    conn: &mut AnyConnection,
    order_id: &str,
) -> Result<Vec<Transaction>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, kind, amount_minor, currency, provider_ref, created_at FROM transactions WHERE order_id = $1 ORDER BY created_at, id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?;
    let mut transactions = Vec::new();
    for r in &rows {
        let kind: String = r.try_get("kind")?;
        transactions.push(Transaction {
            id: r.try_get("id")?,
            kind: match kind.as_str() {
                "AUTHORIZE" => TransactionKind::Authorize,
                "CAPTURE" => TransactionKind::Capture,
                "REFUND" => TransactionKind::Refund,
                _ => TransactionKind::Unspecified,
            }
            .into(),
            amount: Some(Money {
                amount_minor: r.try_get("amount_minor")?,
                currency: r.try_get("currency")?,
            }),
            provider_ref: r.try_get("provider_ref")?,
            created_at: Some(to_timestamp(r.try_get("created_at")?)),
        });
    }
    Ok(transactions)
}
