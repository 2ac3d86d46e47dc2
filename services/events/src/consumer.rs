//! The consumer runner: a [`Handler`] applied to a consumer group's records, exactly once per
//! event in effect.
//!
//! For each record the runner opens a write transaction on the consumer's own database, records
//! the event id in the inbox (`ON CONFLICT DO NOTHING`: a second delivery finds it there and is
//! skipped), lets the handler apply its effect on the same transaction, commits, and only then
//! commits the bus offset (batched: one write per partition every 200 ms at most). A crash
//! anywhere in between redelivers the record, and the inbox makes the redelivery a no-op. A
//! retryable failure is retried in place with exponential backoff (the partition waits, as
//! Kafka's does); after `max_attempts`, or at once for a poison event, the record is parked on
//! `<topic>.dlq` with the reason, and the partition moves on. A handler with no external
//! effects gets a poll's records in one transaction ([`Consumer::process_all`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounter, IntGauge, Registry};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;

use shopverse_kit::clock::{Clock, SystemClock};
use shopverse_kit::db::{Db, placeholders};
use shopverse_kit::error::BoxError;
use shopverse_kit::metrics::{int_counter, int_gauge};

use crate::bus::{BusError, EventBus, OutRecord, Record, Subscription};
use crate::envelope::{Envelope, check_known, decode_envelope, dlq_topic};

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: a dependency was down, the database was busy.
    #[error("{0}")]
    Retryable(BoxError),
    /// Never going to work (bad payload, broken invariant): dead-letter at once.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::Retryable(Box::new(e))
    }
}

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The consumer group, also the inbox namespace: e.g. `notifications`.
    fn name(&self) -> &str;

    /// The topics to consume.
    fn topics(&self) -> Vec<String>;

    /// Whether this handler acts on events of this type; others are skipped (and committed).
    fn wants(&self, event_type: &str) -> bool;

    /// Effects outside this database (an email, a call to a provider), run before the
    /// transaction and only for events not yet in the inbox. Each must be idempotent by its own
    /// key (the event id, the order id): after a crash it runs again. It runs with no
    /// transaction open, so it may write this database on its own connections.
    async fn prepare(&self, _event: &Envelope) -> Result<(), HandlerError> {
        Ok(())
    }

    /// Whether [`Handler::prepare`] does anything. When it does, the inbox is read before it,
    /// so a redelivered event does not run it again; a handler that keeps the default no-op
    /// says `false` and saves that read (the inbox insert in the transaction still refuses
    /// the duplicate).
    fn prepares(&self) -> bool {
        true
    }

    /// Applies `event` on `conn`, which is inside the transaction that also writes the inbox row.
    async fn handle(
        &self,
        conn: &mut sqlx::AnyConnection,
        event: &Envelope,
    ) -> Result<(), HandlerError>;
}

/// How often the consumer measures its lag.
const LAG_EVERY: Duration = Duration::from_secs(5);
/// How long a handled record's offset may wait to be committed with others. A crash in that
/// window redelivers the records, and the inbox skips them.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// Puts `record` in `pending` in place of the earlier record of its partition: what
/// [`Subscription::commit_all`] takes.
pub fn keep_last(pending: &mut Vec<Record>, record: Record) {
    match pending
        .iter_mut()
        .find(|p| p.partition == record.partition && p.topic == record.topic)
    {
        Some(p) => *p = record,
        None => pending.push(record),
    }
}

/// Commits `pending` once, at a stop: what fails is redelivered after the restart.
async fn flush(name: &str, sub: &mut dyn Subscription, pending: &[Record]) {
    if pending.is_empty() {
        return;
    }
    if let Err(e) = sub.commit_all(pending).await {
        tracing::warn!(consumer = %name, error = %e, "committing the offsets at stop failed; they are redelivered");
    }
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("consumer {consumer}: event bus: {source}")]
    Bus {
        consumer: String,
        #[source]
        source: BusError,
    },
}

#[derive(Clone)]
struct ConsumerMetrics {
    handled: IntCounter,
    duplicates: IntCounter,
    retries: IntCounter,
    dead_lettered: IntCounter,
    lag: IntGauge,
}

pub struct Consumer<H: Handler> {
    handler: Arc<H>,
    db: Db,
    bus: Arc<dyn EventBus>,
    retry: RetryPolicy,
    metrics: ConsumerMetrics,
    /// Woken after each applied event: the service's relay, so events the handler wrote go out
    /// at once instead of at the relay's next idle poll.
    after_commit: Option<Arc<tokio::sync::Notify>>,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Skipped,
    DeadLettered(String),
    /// Shutdown came while retrying; the offset stays uncommitted.
    Interrupted,
}

impl<H: Handler> Consumer<H> {
    pub fn new(handler: Arc<H>, db: Db, bus: Arc<dyn EventBus>, registry: &Registry) -> Self {
        let l = [("consumer", handler.name())];
        let metrics = ConsumerMetrics {
            handled: int_counter(
                registry,
                "events_consumed_total",
                "Events applied by a consumer",
                &l,
            ),
            duplicates: int_counter(
                registry,
                "events_duplicates_total",
                "Redelivered events the inbox skipped",
                &l,
            ),
            retries: int_counter(
                registry,
                "events_retries_total",
                "Handler attempts that will be retried",
                &l,
            ),
            dead_lettered: int_counter(
                registry,
                "events_dead_lettered_total",
                "Events parked on a dead-letter topic",
                &l,
            ),
            lag: int_gauge(
                registry,
                "events_consumer_lag",
                "Records waiting in this consumer's partitions",
                &l,
            ),
        };
        Self {
            handler,
            db,
            bus,
            retry: RetryPolicy::default(),
            metrics,
            after_commit: None,
        }
    }

    pub fn waking(mut self, relay: Arc<tokio::sync::Notify>) -> Self {
        self.after_commit = Some(relay);
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Consumes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let name = self.handler.name().to_owned();
        let bus_err = |source| ConsumerError::Bus {
            consumer: name.clone(),
            source,
        };
        // A bus that is not there yet (a broker still starting) is waited for, not fatal.
        let mut backoff = Duration::from_millis(200);
        let mut sub = loop {
            match self
                .bus
                .subscribe(self.handler.name(), &self.handler.topics())
                .await
            {
                Ok(sub) => break sub,
                Err(e @ BusError::GroupBusy(_)) => return Err(bus_err(e)),
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "subscribing failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let mut lag_measured = tokio::time::Instant::now() - LAG_EVERY;
        // The last record done in each partition whose offset is not committed yet, and since
        // when the oldest of them waits: offsets go in one write per `COMMIT_EVERY` at most.
        let mut pending: Vec<Record> = Vec::new();
        let mut pending_since = tokio::time::Instant::now();
        loop {
            if lag_measured.elapsed() >= LAG_EVERY {
                lag_measured = tokio::time::Instant::now();
                if let Some(lag) = sub.lag().await {
                    self.metrics.lag.set(lag);
                }
            }
            let wait = if pending.is_empty() {
                Duration::from_secs(1)
            } else {
                COMMIT_EVERY.saturating_sub(pending_since.elapsed())
            };
            let records = tokio::select! {
                _ = shutdown.cancelled() => {
                    flush(&name, &mut *sub, &pending).await;
                    return Ok(());
                }
                r = sub.poll(64, wait) => r,
            };
            let records = match records {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(consumer = %name, error = %e, "polling the event bus failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            let total = records.len();
            let done = self.process_all(&records, &shutdown).await;
            // The effects are committed (or parked); their offsets go with the next write.
            for record in records.into_iter().take(done) {
                if pending.is_empty() {
                    pending_since = tokio::time::Instant::now();
                }
                keep_last(&mut pending, record);
            }
            if done < total {
                flush(&name, &mut *sub, &pending).await;
                return Ok(());
            }
            if pending.is_empty() || pending_since.elapsed() < COMMIT_EVERY {
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = sub.commit_all(&pending).await {
                tracing::warn!(consumer = %name, error = %e, "committing the offsets failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            pending.clear();
        }
    }

    /// Handles `records` in order, each to its end; returns how many were done (all of them,
    /// unless shutdown interrupted a retry).
    ///
    /// When the handler has no [`Handler::prepare`] step, a run of records is applied in one
    /// transaction: one `BEGIN` and `COMMIT`, one inbox insert for all of them. That is the
    /// consumer's share of a database's writer turn, paid once per poll instead of once per
    /// event, and it grows with the backlog: a consumer that keeps up gets runs of one or two,
    /// one that falls behind catches up in runs of up to a poll's worth. If any record of the
    /// run fails, the whole transaction rolls back and each record of the run is handled on
    /// its own, with the retries and dead-lettering of [`Consumer::process`].
    pub async fn process_all(&self, records: &[Record], shutdown: &CancellationToken) -> usize {
        let mut done = 0;
        if !self.handler.prepares() && records.len() > 1 {
            // The leading records that decode and are known; the first that does not ends
            // the run, and is parked by `process` below.
            let envs: Vec<Envelope> = records
                .iter()
                .map_while(|r| {
                    decode_envelope(&r.payload)
                        .ok()
                        .filter(|env| check_known(env).is_ok())
                })
                .collect();
            let wanted: Vec<&Envelope> = envs
                .iter()
                .filter(|env| self.handler.wants(&env.r#type))
                .collect();
            if wanted.len() > 1 {
                match self.apply(&wanted).await {
                    Ok(_) => done = envs.len(),
                    Err(e) => tracing::debug!(
                        consumer = self.handler.name(), events = wanted.len(), error = %e,
                        "a run of events failed together; handling each on its own"
                    ),
                }
            }
        }
        for record in &records[done..] {
            if self.process(record, shutdown).await == Outcome::Interrupted {
                return done;
            }
            done += 1;
        }
        done
    }

    /// Applies `envs` in one write transaction, each once: the inbox insert returns the ids
    /// it had not seen, and only those reach the handler (an id twice in `envs`, once).
    /// Returns how many were applied; the rest were duplicates. One record's attempt is the
    /// run of one.
    async fn apply(&self, envs: &[&Envelope]) -> Result<usize, HandlerError> {
        let now = SystemClock.now_ms();
        let sql = format!(
            "INSERT INTO inbox (consumer, event_id, handled_at) VALUES {} \
             ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id",
            placeholders(1, envs.len(), 3)
        );
        let mut q = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
        for env in envs {
            q = q.bind(self.handler.name()).bind(&env.id).bind(now);
        }
        let mut tx = self.db.begin_write().await?;
        let mut fresh: HashSet<String> = q.fetch_all(&mut *tx).await?.into_iter().collect();
        let applied = fresh.len();
        let duplicates = (envs.len() - applied) as u64;
        if applied == 0 {
            tx.rollback().await?;
            self.metrics.duplicates.inc_by(duplicates);
            return Ok(0);
        }
        for env in envs {
            if fresh.remove(&env.id) {
                self.handler.handle(&mut tx, env).await?;
            }
        }
        tx.commit().await?;
        self.metrics.handled.inc_by(applied as u64);
        self.metrics.duplicates.inc_by(duplicates);
        if let Some(n) = &self.after_commit {
            n.notify_one();
        }
        Ok(applied)
    }

    /// Handles one record to its end: applied, skipped, duplicate or dead-lettered.
    pub async fn process(&self, record: &Record, shutdown: &CancellationToken) -> Outcome {
        let env = match decode_envelope(&record.payload) {
            Ok(env) => env,
            Err(e) => return self.dead_letter(record, &e.to_string(), 1, shutdown).await,
        };
        // An event of a type or schema version this build does not know is poison for every
        // consumer: park it with the reason instead of guessing.
        if let Err(e) = check_known(&env) {
            return self.dead_letter(record, &e.to_string(), 1, shutdown).await;
        }
        if !self.handler.wants(&env.r#type) {
            return Outcome::Skipped;
        }
        let mut attempt: u32 = 0;
        let mut backoff = self.retry.initial_backoff;
        loop {
            attempt += 1;
            let reason = match self.attempt(&env).await {
                Ok(outcome) => return outcome,
                Err(HandlerError::Permanent(reason)) => {
                    return self.dead_letter(record, &reason, attempt, shutdown).await;
                }
                Err(HandlerError::Retryable(e)) => e.to_string(),
            };
            if attempt >= self.retry.max_attempts {
                return self
                    .dead_letter(
                        record,
                        &format!("gave up after {attempt} attempts: {reason}"),
                        attempt,
                        shutdown,
                    )
                    .await;
            }
            self.metrics.retries.inc();
            tracing::warn!(
                consumer = self.handler.name(), event_id = %env.id, event_type = %env.r#type,
                attempt, error = %reason, "handler failed; retrying"
            );
            tokio::select! {
                _ = shutdown.cancelled() => return Outcome::Interrupted,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
    }

    async fn attempt(&self, env: &Envelope) -> Result<Outcome, HandlerError> {
        if self.handler.prepares() {
            let seen: Option<i64> = sqlx::query_scalar(
                "SELECT handled_at FROM inbox WHERE consumer = $1 AND event_id = $2",
            )
            .bind(self.handler.name())
            .bind(&env.id)
            .fetch_optional(&mut *self.db.read().await?)
            .await?;
            if seen.is_some() {
                self.metrics.duplicates.inc();
                return Ok(Outcome::Duplicate);
            }
            self.handler.prepare(env).await?;
        }
        Ok(if self.apply(&[env]).await? == 1 {
            Outcome::Applied
        } else {
            Outcome::Duplicate
        })
    }

    async fn dead_letter(
        &self,
        record: &Record,
        reason: &str,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> Outcome {
        tracing::error!(
            consumer = self.handler.name(), topic = %record.topic, partition = record.partition,
            offset = record.offset, reason, "parking event on the dead-letter topic"
        );
        let mut headers = record.headers.clone();
        headers.retain(|(k, _)| !k.starts_with("dlq-"));
        headers.extend([
            ("dlq-original-topic".to_owned(), record.topic.clone()),
            (
                "dlq-original-partition".to_owned(),
                record.partition.to_string(),
            ),
            ("dlq-original-offset".to_owned(), record.offset.to_string()),
            ("dlq-consumer".to_owned(), self.handler.name().to_owned()),
            ("dlq-reason".to_owned(), reason.to_owned()),
            ("dlq-attempts".to_owned(), attempts.to_string()),
            ("dlq-failed-at".to_owned(), SystemClock.now_ms().to_string()),
        ]);
        let out = OutRecord {
            topic: dlq_topic(&record.topic),
            key: record.key.clone(),
            headers,
            payload: record.payload.clone(),
        };
        // Parking must not be lost: keep trying until it works or we are told to stop.
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = self.bus.publish(std::slice::from_ref(&out)).await {
            tracing::warn!(error = %e, "publishing to the dead-letter topic failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Outcome::Interrupted,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        self.metrics.dead_lettered.inc();
        Outcome::DeadLettered(reason.to_owned())
    }
}
