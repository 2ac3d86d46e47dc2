//! The payments service's use cases: charge a placed order once, refund a cancelled paid one,
//! read a payment.

use std::sync::Arc;

use sqlx::AnyConnection;

use shopverse_events::consumer::HandlerError;
use shopverse_events::envelope::{
    Envelope, EventType, Origin, PAYMENT_FAILED, PAYMENT_REFUNDED, PAYMENT_SUCCEEDED,
    decode_payload, new_envelope,
};
use shopverse_events::outbox::enqueue;
use shopverse_kit::{Clock, ServiceError};
use shopverse_proto::common::v1::Money;
use shopverse_proto::orders::v1::OrderCancelled;
use shopverse_proto::payments::v1::payments_service_server::PaymentsServiceServer;
use shopverse_proto::payments::v1::*;
use shopverse_storage::Db;

use crate::provider::{ChargeOutcome, PaymentProvider, ProviderError};
use crate::store::{self, PaymentRow};

const SOURCE: &str = "payments";

#[derive(Clone)]
pub struct Payments {
    db: Db,
    provider: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
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
        let order = shopverse_events::order_of(ev)?;
        if let Some(existing) = store::payment(conn, &order.id).await?
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
                store::upsert(conn, &p, &order.payment_method_token, self.clock.now_ms()).await?;
                store::record(
                    conn,
                    &p,
                    &["AUTHORIZE", "CAPTURE"],
                    &reference,
                    self.clock.now_ms(),
                )
                .await?;
                self.emit(conn, &PAYMENT_SUCCEEDED, &p, ev).await?;
            }
            Ok(ChargeOutcome::Declined { reason }) => {
                p.status = "FAILED".into();
                p.failure_reason = reason;
                store::upsert(conn, &p, &order.payment_method_token, self.clock.now_ms()).await?;
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
        match store::payment(conn, &order.id).await? {
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
                store::upsert(conn, &p, "", self.clock.now_ms()).await?;
                store::record(conn, &p, &["REFUND"], &reference, self.clock.now_ms()).await?;
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
                store::upsert(conn, &p, &order.payment_method_token, self.clock.now_ms()).await?;
            }
        }
        Ok(())
    }

    pub async fn get(&self, order_id: &str) -> Result<Option<Payment>, ServiceError> {
        let mut conn = self.db.read().await?;
        let Some(p) = store::payment(&mut conn, order_id).await? else {
            return Ok(None);
        };
        let transactions = store::transactions(&mut conn, order_id).await?;
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
