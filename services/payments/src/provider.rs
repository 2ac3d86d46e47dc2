//! Payment providers. The one in this build is a simulator with fixed, documented rules, so that
//! every path of the saga can be driven on purpose:
//!
//! | payment method token | what happens |
//! | --- | --- |
//! | `pm_card_ok` | authorised and captured |
//! | `pm_card_declined` | declined: "card declined" |
//! | `pm_card_insufficient_funds` | declined: "insufficient funds" |
//! | `pm_card_flaky` | fails transiently `flaky_failures` times (default 2) for an order, then captured |
//! | anything else | declined: "unknown payment method" |
//!
//! Like a real provider it is idempotent by key: asking again for a charge it made returns that
//! charge, it never charges twice. It keeps that memory in its own database, apart from the
//! payments database, so a crash of the payments service between charge and commit does not
//! make it forget.

use async_trait::async_trait;
use shopverse_kit::db::{Db, MigrationSpec};
use shopverse_kit::{Clock, SystemClock};
use sqlx::Row;

pub const MIGRATIONS: &[MigrationSpec] = &[(
    1,
    "simulator",
    include_str!("../migrations/0001_simulator.sql"),
)];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    Captured { reference: String, attempts: i64 },
    Declined { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Try again later.
    #[error("payment provider temporarily failed: {0}")]
    Transient(String),
    #[error("payment provider: {0}")]
    Storage(#[from] sqlx::Error),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Authorises and captures `amount_minor` with `token`, once per `key`.
    async fn charge(
        &self,
        key: &str,
        token: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<ChargeOutcome, ProviderError>;
    /// Refunds a capture, once per `key`; returns the refund's reference.
    async fn refund(
        &self,
        key: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<String, ProviderError>;
}

/// One operation asked of the simulator.
struct Op<'a> {
    key: &'a str,
    kind: &'a str,
    amount: i64,
    currency: &'a str,
}

pub struct Simulator {
    db: Db,
    flaky_failures: i64,
}

impl Simulator {
    pub async fn open(
        url: &str,
        flaky_failures: i64,
    ) -> Result<Simulator, shopverse_kit::db::DbError> {
        let db = Db::connect(url, 4).await?;
        db.migrate(&[MIGRATIONS]).await?;
        Ok(Simulator { db, flaky_failures })
    }

    async fn recorded(
        &self,
        key: &str,
    ) -> Result<Option<(String, String, String, i64)>, sqlx::Error> {
        let row = sqlx::query("SELECT outcome, reference, reason, attempts FROM simulator_operations WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&mut *self.db.read().await?)
            .await?;
        row.map(|r| {
            Ok((
                r.try_get("outcome")?,
                r.try_get("reference")?,
                r.try_get("reason")?,
                r.try_get("attempts")?,
            ))
        })
        .transpose()
    }

    /// Remembers what happened for `op`: `outcome` (transient, captured, declined, refunded).
    async fn record(
        &self,
        op: &Op<'_>,
        outcome: &str,
        reason: &str,
        attempts: i64,
    ) -> Result<String, sqlx::Error> {
        let reference = format!("sim_{}", &uuid::Uuid::now_v7().simple().to_string()[..20]);
        let q = sqlx::query(
            "INSERT INTO simulator_operations (idempotency_key, kind, amount_minor, currency, outcome, reference, reason, attempts, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (idempotency_key) DO UPDATE SET outcome = excluded.outcome, reference = excluded.reference, \
             reason = excluded.reason, attempts = excluded.attempts",
        )
        .bind(op.key)
        .bind(op.kind)
        .bind(op.amount)
        .bind(op.currency)
        .bind(outcome)
        .bind(&reference)
        .bind(reason)
        .bind(attempts)
        .bind(SystemClock.now_ms());
        let mut conn = self.db.write_conn().await?;
        q.execute(&mut *conn).await?;
        Ok(reference)
    }
}

#[async_trait]
impl PaymentProvider for Simulator {
    async fn charge(
        &self,
        key: &str,
        token: &str,
        amount: i64,
        currency: &str,
    ) -> Result<ChargeOutcome, ProviderError> {
        let previous = self.recorded(key).await?;
        let attempts = match &previous {
            Some((outcome, reference, reason, attempts)) => match outcome.as_str() {
                "captured" => {
                    return Ok(ChargeOutcome::Captured {
                        reference: reference.clone(),
                        attempts: *attempts,
                    });
                }
                "declined" => {
                    return Ok(ChargeOutcome::Declined {
                        reason: reason.clone(),
                    });
                }
                _ => attempts + 1,
            },
            None => 1,
        };
        let declined = |reason: &str| reason.to_owned();
        let op = Op {
            key,
            kind: "charge",
            amount,
            currency,
        };
        let outcome = match token {
            "pm_card_ok" => Ok(()),
            "pm_card_flaky" if attempts <= self.flaky_failures => {
                self.record(&op, "transient", "", attempts).await?;
                return Err(ProviderError::Transient(format!(
                    "simulated outage (attempt {attempts})"
                )));
            }
            "pm_card_flaky" => Ok(()),
            "pm_card_declined" => Err(declined("card declined")),
            "pm_card_insufficient_funds" => Err(declined("insufficient funds")),
            _ => Err(declined("unknown payment method")),
        };
        match outcome {
            Ok(()) => {
                let reference = self.record(&op, "captured", "", attempts).await?;
                Ok(ChargeOutcome::Captured {
                    reference,
                    attempts,
                })
            }
            Err(reason) => {
                self.record(&op, "declined", &reason, attempts).await?;
                Ok(ChargeOutcome::Declined { reason })
            }
        }
    }

    async fn refund(
        &self,
        key: &str,
        amount: i64,
        currency: &str,
    ) -> Result<String, ProviderError> {
        if let Some((_, reference, _, _)) = self.recorded(key).await? {
            return Ok(reference);
        }
        Ok(self
            .record(
                &Op {
                    key,
                    kind: "refund",
                    amount,
                    currency,
                },
                "refunded",
                "",
                1,
            )
            .await?)
    }
}
