//! The gRPC service `shopverse.payments.v1.PaymentsService` and the consumer that charges and
//! refunds orders.

use std::sync::Arc;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use shopverse_events::consumer::HandlerError;
use shopverse_events::envelope::{
    Envelope, EventType, Origin, PAYMENT_FAILED, PAYMENT_REFUNDED, PAYMENT_SUCCEEDED,
    decode_payload, new_envelope,
};
use shopverse_events::outbox::enqueue;
use shopverse_kit::clock::to_timestamp;
use shopverse_kit::db::placeholders;
use shopverse_kit::{Clock, Db, ServiceError};
use shopverse_proto::common::v1::Money;
use shopverse_proto::orders::v1::{OrderCancelled, OrderEvent};
use shopverse_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use shopverse_proto::payments::v1::*;

use crate::provider::{ChargeOutcome, PaymentProvider, ProviderError};

const SOURCE: &str = "payments";

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

#[derive(Clone)]
pub struct Payments {
    db: Db,
    provider: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
}

pub(crate) async fn payment(
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

impl Payments {
    pub fn new(db: Db, provider: Arc<dyn PaymentProvider>, clock: Arc<dyn Clock>) -> Payments {
        Payments {
            db,
            provider,
            clock,
        }
    }

    pub fn into_server(self) -> PaymentsServiceServer<Payments> {
        PaymentsServiceServer::new(self)
    }

    pub(crate) async fn upsert(
        &self,
        conn: &mut AnyConnection,
        p: &PaymentRow,
        method: &str,
    ) -> Result<(), sqlx::Error> {
        let now = self.clock.now_ms();
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
    pub(crate) async fn record(
        &self,
        conn: &mut AnyConnection,
        p: &PaymentRow,
        kinds: &[&str],
        reference: &str,
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "INSERT INTO transactions (id, order_id, kind, amount_minor, currency, provider_ref, created_at) \
             VALUES {}",
            placeholders(1, kinds.len(), 7)
        );
        let now = self.clock.now_ms();
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

    pub(crate) async fn emit(
        &self,
        conn: &mut AnyConnection,
        kind: &EventType,
        p: &PaymentRow,
        cause: &Envelope,
    ) -> Result<(), sqlx::Error> {
        let payload = PaymentEvent {
            order_id: p.order_id.clone(),
            user_id: p.user_id.clone(),
            amount: Some(Money {
                amount_minor: p.amount_minor,
                currency: p.currency.clone(),
            }),
            reason: p.failure_reason.clone(),
        };
        let env = new_envelope(
            kind,
            SOURCE,
            &p.order_id,
            self.clock.now_ms(),
            Origin::Event(cause),
            &payload,
        );
        enqueue(conn, kind, &env).await
    }

    /// `order.placed`: charge once.
    pub(crate) async fn charge(
        &self,
        conn: &mut AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        let order = decode_payload::<OrderEvent>(ev)
            .map_err(|e| HandlerError::Permanent(e.to_string()))?
            .order
            .ok_or_else(|| HandlerError::Permanent("order.placed without an order".into()))?;
        if let Some(existing) = payment(conn, &order.id).await?
            && existing.status != "PENDING"
        {
            return Ok(());
        }
        let total = order.total.unwrap_or_default();
        let mut p = PaymentRow {
            order_id: order.id.clone(),
            user_id: order.user_id.clone(),
            status: "PENDING".into(),
            amount_minor: total.amount_minor,
            currency: total.currency,
            failure_reason: String::new(),
            attempts: 1,
        };
        // The provider is idempotent by key: asking again after a crash returns the same charge.
        let outcome = self
            .provider
            .charge(
                &format!("charge:{}", order.id),
                &order.payment_method_token,
                p.amount_minor,
                &p.currency,
            )
            .await;
        match outcome {
            Ok(ChargeOutcome::Captured {
                reference,
                attempts,
            }) => {
                shopverse_kit::crash::point("payments.after_charge", "");
                p.status = "SUCCEEDED".into();
                p.attempts = attempts;
                self.upsert(conn, &p, &order.payment_method_token).await?;
                self.record(conn, &p, &["AUTHORIZE", "CAPTURE"], &reference)
                    .await?;
                self.emit(conn, &PAYMENT_SUCCEEDED, &p, ev).await?;
            }
            Ok(ChargeOutcome::Declined { reason }) => {
                p.status = "FAILED".into();
                p.failure_reason = reason;
                self.upsert(conn, &p, &order.payment_method_token).await?;
                self.emit(conn, &PAYMENT_FAILED, &p, ev).await?;
            }
            Err(e @ ProviderError::Transient(_)) => {
                return Err(HandlerError::Retryable(Box::new(e)));
            }
            Err(e) => return Err(HandlerError::Retryable(Box::new(e))),
        }
        Ok(())
    }

    /// `order.cancelled`: refund what was captured, once.
    pub(crate) async fn refund(
        &self,
        conn: &mut AnyConnection,
        ev: &Envelope,
    ) -> Result<(), HandlerError> {
        let c: OrderCancelled =
            decode_payload(ev).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let order = c
            .order
            .ok_or_else(|| HandlerError::Permanent("order.cancelled without an order".into()))?;
        match payment(conn, &order.id).await? {
            Some(mut p) if p.status == "SUCCEEDED" => {
                let reference = self
                    .provider
                    .refund(
                        &format!("refund:{}", order.id),
                        &format!("charge:{}", order.id),
                        p.amount_minor,
                        &p.currency,
                    )
                    .await
                    .map_err(|e| match e {
                        // The provider will not change its mind: the dead-letter queue, where
                        // an operator sees it.
                        ProviderError::Refused(why) => HandlerError::Permanent(why),
                        e => HandlerError::Retryable(Box::new(e)),
                    })?;
                p.status = "REFUNDED".into();
                p.failure_reason = c.reason;
                self.upsert(conn, &p, "").await?;
                self.record(conn, &p, &["REFUND"], &reference).await?;
                self.emit(conn, &PAYMENT_REFUNDED, &p, ev).await?;
            }
            Some(_) => {}
            None => {
                // Cancelled before we saw it placed: make sure it is never charged later.
                let total = order.total.unwrap_or_default();
                let p = PaymentRow {
                    order_id: order.id.clone(),
                    user_id: order.user_id.clone(),
                    status: "FAILED".into(),
                    amount_minor: total.amount_minor,
                    currency: total.currency,
                    failure_reason: "order cancelled before payment".into(),
                    attempts: 0,
                };
                self.upsert(conn, &p, &order.payment_method_token).await?;
            }
        }
        Ok(())
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<Payment>, ServiceError> {
        let mut conn = self.db.read().await?;
        let Some(p) = payment(&mut conn, order_id).await? else {
            return Ok(None);
        };
        let rows = sqlx::query(
            "SELECT id, kind, amount_minor, currency, provider_ref, created_at FROM transactions WHERE order_id = $1 ORDER BY created_at, id",
        )
        .bind(order_id)
        .fetch_all(&mut *conn)
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
        let status = match p.status.as_str() {
            "PENDING" => PaymentStatus::Pending,
            "SUCCEEDED" => PaymentStatus::Succeeded,
            "FAILED" => PaymentStatus::Failed,
            "REFUNDED" => PaymentStatus::Refunded,
            _ => PaymentStatus::Unspecified,
        };
        Ok(Some(Payment {
            order_id: p.order_id,
            user_id: p.user_id,
            status: status.into(),
            amount: Some(Money {
                amount_minor: p.amount_minor,
                currency: p.currency,
            }),
            transactions,
            failure_reason: p.failure_reason,
            attempts: i32::try_from(p.attempts).unwrap_or(0),
        }))
    }
}
