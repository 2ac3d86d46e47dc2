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
//! Like a real provider it refuses what no provider accepts: a charge of zero or less, or in a
//! currency not on the ISO 4217 list, is declined; a refund must name a capture, in its currency,
//! and all refunds of a capture together never exceed it.
//!
//! Like a real provider it is idempotent by key: asking again for a charge it made returns that
//! charge, it never charges twice. It keeps that memory in its own database, apart from the
//! payments database, so a crash of the payments service between charge and commit does not
//! make it forget.

use async_trait::async_trait;
use shopverse_kit::{Clock, SystemClock};
use shopverse_storage::{Db, MigrationSpec};
use sqlx::Row;

pub const MIGRATIONS: &[MigrationSpec] = &[
    (
        1,
        "simulator",
        include_str!("../migrations/0001_simulator.sql"),
    ),
    (
        2,
        "simulator refunds",
        include_str!("../migrations/0002_simulator_refunds.sql"),
    ),
];

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
    /// Refused for good: asking again will not change the answer.
    #[error("payment provider refused: {0}")]
    Refused(String),
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
    /// Refunds `amount_minor` of the capture made under `charge_key`, once per `key`; returns
    /// the refund's reference.
    async fn refund(
        &self,
        key: &str,
        charge_key: &str,
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
    /// For a refund: the charge's key.
    refers_to: &'a str,
}

pub struct Simulator {
    db: Db,
    flaky_failures: i64,
}

impl Simulator {
    pub async fn open(
        url: &str,
        flaky_failures: i64,
    ) -> Result<Simulator, shopverse_storage::DbError> {
        let db = Db::connect(url, 4).await?;
        db.migrate(&[MIGRATIONS]).await?;
        Ok(Simulator { db, flaky_failures })
    }

    /// Its store, for the runtime to close once the service has stopped.
    pub fn db(&self) -> &Db {
        &self.db
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
            "INSERT INTO simulator_operations (idempotency_key, kind, amount_minor, currency, outcome, reference, reason, attempts, created_at, refers_to) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
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
        .bind(SystemClock.now_ms())
        .bind(op.refers_to);
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
            refers_to: "",
        };
        let valid = if amount <= 0 {
            Err(declined("the amount must be positive"))
        } else if shopverse_money::Currency::parse(currency).is_err() {
            Err(declined("unknown currency"))
        } else {
            Ok(())
        };
        let outcome = match token {
            _ if valid.is_err() => valid,
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
        charge_key: &str,
        amount: i64,
        currency: &str,
    ) -> Result<String, ProviderError> {
        if let Some((_, reference, _, _)) = self.recorded(key).await? {
            return Ok(reference);
        }
        let refused = |why: String| Err(ProviderError::Refused(why));
        if amount <= 0 {
            return refused(format!("a refund of {amount} is not positive"));
        }
        let capture = sqlx::query(
            "SELECT amount_minor, currency FROM simulator_operations \
             WHERE idempotency_key = $1 AND kind = 'charge' AND outcome = 'captured'",
        )
        .bind(charge_key)
        .fetch_optional(&mut *self.db.read().await?)
        .await?;
        let Some(capture) = capture else {
            return refused(format!("no capture under {charge_key} to refund"));
        };
        let (captured, captured_in): (i64, String) = (
            capture.try_get("amount_minor")?,
            capture.try_get("currency")?,
        );
        if captured_in != currency {
            return refused(format!(
                "the capture was in {captured_in}, the refund asks for {currency}"
            ));
        }
        let refunded: i64 = sqlx::query(
            "SELECT COALESCE(SUM(amount_minor), 0) AS refunded FROM simulator_operations \
             WHERE kind = 'refund' AND refers_to = $1",
        )
        .bind(charge_key)
        .fetch_one(&mut *self.db.read().await?)
        .await?
        .try_get("refunded")?;
        if refunded
            .checked_add(amount)
            .is_none_or(|sum| sum > captured)
        {
            return refused(format!(
                "refunding {amount} would return more than the {captured} captured ({refunded} refunded already)"
            ));
        }
        Ok(self
            .record(
                &Op {
                    key,
                    kind: "refund",
                    amount,
                    currency,
                    refers_to: charge_key,
                },
                "refunded",
                "",
                1,
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// What the simulator's ledger holds for `key`: (kind, amount, outcome).
    async fn ledger(sim: &Simulator, key: &str) -> Option<(String, i64, String)> {
        let row = sqlx::query(
            "SELECT kind, amount_minor, outcome FROM simulator_operations WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&mut *sim.db.read().await.unwrap())
        .await
        .unwrap()?;
        Some((
            row.try_get("kind").unwrap(),
            row.try_get("amount_minor").unwrap(),
            row.try_get("outcome").unwrap(),
        ))
    }

    #[tokio::test]
    async fn charges_must_be_positive_and_refunds_never_exceed_their_capture() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/simulator.db", dir.path().display());
        let sim = Simulator::open(&url, 2).await.unwrap();
        let declined = |reason: &str| ChargeOutcome::Declined {
            reason: reason.to_owned(),
        };

        for (key, amount, currency, why) in [
            ("c:zero", 0, "EUR", "the amount must be positive"),
            (
                "c:neg",
                -3_133_720_368_547_758_080,
                "EUR",
                "the amount must be positive",
            ),
            ("c:cur", 500, "ABC", "unknown currency"),
        ] {
            let outcome = sim
                .charge(key, "pm_card_ok", amount, currency)
                .await
                .unwrap();
            assert_eq!(outcome, declined(why), "{key}");
            let recorded = ledger(&sim, key).await.map(|(_, _, o)| o);
            assert_eq!(recorded.as_deref(), Some("declined"), "{key}");
        }

        let ChargeOutcome::Captured { .. } = sim
            .charge("charge:o1", "pm_card_ok", 1_000, "EUR")
            .await
            .unwrap()
        else {
            panic!("a valid charge is captured");
        };
        let first = sim
            .refund("refund:o1:a", "charge:o1", 600, "EUR")
            .await
            .unwrap();
        // The same key again: the same refund, not a second one.
        let again = sim
            .refund("refund:o1:a", "charge:o1", 600, "EUR")
            .await
            .unwrap();
        assert_eq!(first, again);

        for (key, charge, amount, currency) in [
            ("refund:o1:b", "charge:o1", 401, "EUR"),
            ("refund:o1:c", "charge:o1", 400, "USD"),
            ("refund:o1:d", "charge:o1", 0, "EUR"),
            ("refund:o1:e", "charge:o1", i64::MAX, "EUR"),
            ("refund:zero", "c:zero", 1, "EUR"),
            ("refund:none", "charge:nobody", 1, "EUR"),
        ] {
            let refused = sim.refund(key, charge, amount, currency).await;
            assert!(
                matches!(refused, Err(ProviderError::Refused(_))),
                "{key}: {refused:?}"
            );
            assert_eq!(ledger(&sim, key).await, None, "{key}: nothing recorded");
        }
        sim.refund("refund:o1:f", "charge:o1", 400, "EUR")
            .await
            .unwrap();
        assert_eq!(
            ledger(&sim, "refund:o1:f").await,
            Some(("refund".into(), 400, "refunded".into()))
        );
        let more = sim.refund("refund:o1:g", "charge:o1", 1, "EUR").await;
        assert!(matches!(more, Err(ProviderError::Refused(_))), "{more:?}");
    }
}
