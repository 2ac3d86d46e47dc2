//! The consumer runner: a [`Handler`] applied to a consumer group's records, exactly once per
//! event in effect.
//!
//! For each record the runner opens a write transaction on the consumer's own database, records
//! the event id in the inbox (`ON CONFLICT DO NOTHING`: a second delivery finds it there and is
//! skipped), lets the handler apply its effect on the same transaction and commits. A crash
//! anywhere in between redelivers the record, and the inbox makes the redelivery a no-op.
//!
//! Records are scheduled by key ([`crate::schedule`]): records of different keys run
//! concurrently (up to [`ConsumerConfig::concurrency`]), records of one key one after another in
//! offset order. A retryable failure parks that record with a due time (exponential backoff);
//! the partition moves on, and later records of the same key wait behind the parked one, so a
//! key's order holds. After `max_attempts`, or at once for a poison event, the record goes to
//! `<topic>.dlq` with the reason. The bus offset of a partition is committed up to its lowest
//! unfinished record only, so a crash redelivers whatever was running, waiting or parked.
//! A handler with no external effects gets runs of ready records in one transaction
//! ([`Consumer::try_run`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use shopverse_kit::clock::{Clock, SystemClock};
use shopverse_kit::config::Invalid;
use shopverse_kit::error::BoxError;
use shopverse_kit::metrics::{int_counter, int_counter_vec, int_gauge};
use shopverse_storage::{Db, placeholders};

use crate::bus::{BusError, EventBus, OutRecord, Record};
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

impl From<crate::envelope::DecodeError> for HandlerError {
    fn from(e: crate::envelope::DecodeError) -> Self {
        HandlerError::Permanent(e.to_string())
    }
}

/// The order an orders event (`order.placed`, `order.confirmed`) carries. A payload that does
/// not decode, or carries no order, will never be handled: it is permanent.
pub fn order_of(ev: &Envelope) -> Result<shopverse_proto::orders::v1::Order, HandlerError> {
    crate::envelope::decode_payload::<shopverse_proto::orders::v1::OrderEvent>(ev)?
        .order
        .ok_or_else(|| HandlerError::Permanent(format!("{} without an order", ev.r#type)))
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

/// Why a run of events was not applied: the handler's error, and which event of the run it
/// came from (none: the database itself).
struct RunError {
    at: Option<usize>,
    error: HandlerError,
}

impl RunError {
    fn db(e: sqlx::Error) -> RunError {
        RunError {
            at: None,
            error: e.into(),
        }
    }
}

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

/// How a consumer schedules and retries: `[events.consumers]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Records of different keys handled at once; a run of records applied in one transaction
    /// counts once.
    pub concurrency: usize,
    /// Tries of one record before it is dead-lettered.
    pub max_attempts: u32,
    /// The wait before the second try; it doubles for each try after that.
    pub initial_backoff_ms: u64,
    /// The longest wait between two tries.
    pub max_backoff_ms: u64,
    /// Records read and not finished yet (running, waiting behind their key, parked) at the
    /// most: past it the consumer stops reading until some finish.
    pub max_outstanding: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        let retry = RetryPolicy::default();
        Self {
            concurrency: 16,
            max_attempts: retry.max_attempts,
            initial_backoff_ms: u64::try_from(retry.initial_backoff.as_millis()).unwrap_or(200),
            max_backoff_ms: u64::try_from(retry.max_backoff.as_millis()).unwrap_or(10_000),
            max_outstanding: 10_000,
        }
    }
}

impl ConsumerConfig {
    /// Checks the values; `prefix` names the table in messages (`events.consumers`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let bad = |key: &str, reason: &str| Err(Invalid::new(format!("{prefix}.{key}"), reason));
        if !(1..=1024).contains(&self.concurrency) {
            return bad("concurrency", "must be between 1 and 1024");
        }
        if !(1..=100).contains(&self.max_attempts) {
            return bad("max_attempts", "must be between 1 and 100");
        }
        if self.max_backoff_ms > 3_600_000 {
            return bad("max_backoff_ms", "must be at most 3600000 (an hour)");
        }
        if self.initial_backoff_ms == 0 || self.initial_backoff_ms > self.max_backoff_ms {
            return bad(
                "initial_backoff_ms",
                "must be at least 1 and at most max_backoff_ms",
            );
        }
        if self.max_outstanding < 64 {
            return bad("max_outstanding", "must be at least 64");
        }
        Ok(())
    }

    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: Duration::from_millis(self.initial_backoff_ms),
            max_backoff: Duration::from_millis(self.max_backoff_ms),
        }
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

impl RetryPolicy {
    /// The wait after try number `tries` (1 for the first) failed.
    pub fn backoff(&self, tries: u32) -> Duration {
        let doublings = tries.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
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
pub(crate) struct ConsumerMetrics {
    pub(crate) handled: IntCounter,
    pub(crate) duplicates: IntCounter,
    /// Tries after a retryable failure, by what came of them: `parked` (it failed and waits
    /// for another try), `applied` (a later try worked), `dead_lettered` (tries ran out).
    pub(crate) retries: IntCounterVec,
    pub(crate) dead_lettered: IntCounter,
    pub(crate) lag: IntGauge,
    pub(crate) parked: IntGauge,
    pub(crate) parked_oldest: IntGauge,
    pub(crate) outstanding: IntGauge,
    pub(crate) inbox_pruned: IntCounter,
}

pub struct Consumer<H: Handler> {
    pub(crate) handler: Arc<H>,
    db: Db,
    pub(crate) bus: Arc<dyn EventBus>,
    pub(crate) retry: RetryPolicy,
    pub(crate) concurrency: usize,
    pub(crate) max_outstanding: usize,
    pub(crate) metrics: ConsumerMetrics,
    /// Woken after each applied event: the service's relay, so events the handler wrote go out
    /// at once instead of at the relay's next idle poll.
    after_commit: Option<Arc<tokio::sync::Notify>>,
    /// How long inbox entries are kept at the least ([`Consumer::prune_inbox`]).
    inbox_keep: Duration,
}

/// Inbox entries one pruning pass forgets at the most; the next pass takes the rest.
const INBOX_PRUNE_MAX: i64 = 20_000;
/// Inbox entries deleted per statement.
const INBOX_PRUNE_BATCH: usize = 500;

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Skipped,
    DeadLettered(String),
    /// Shutdown came while dead-lettering; the offset stays uncommitted.
    Interrupted,
}

/// The result of one try at a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tried {
    /// The record is finished.
    Done(Outcome),
    /// A retryable failure with tries left: park it and try again later.
    Retry(String),
    /// The consumer's own storage is out (a full disk, a database refusing connections): not
    /// the event's fault, so no try is spent; park it and try again in [`OUTAGE_WAIT`], for as
    /// long as the outage lasts.
    Wait(String),
}

/// How long a record waits for storage to come back between tries.
pub const OUTAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a handler's retryable error is the storage being out of service.
fn is_outage(e: &BoxError) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .is_some_and(shopverse_storage::is_outage)
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
            retries: int_counter_vec(
                registry,
                "events_retries_total",
                "Tries after a retryable failure, by outcome (parked, applied, dead_lettered)",
                &l,
                &["outcome"],
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
            parked: int_gauge(
                registry,
                "events_parked",
                "Records parked after a retryable failure, waiting for their next try",
                &l,
            ),
            parked_oldest: int_gauge(
                registry,
                "events_parked_oldest_seconds",
                "Age of the oldest parked record (0 when none is parked)",
                &l,
            ),
            outstanding: int_gauge(
                registry,
                "events_outstanding",
                "Records read and not finished: running, waiting behind their key, or parked",
                &l,
            ),
            inbox_pruned: int_counter(
                registry,
                "events_inbox_pruned_total",
                "Inbox entries forgotten once the log could no longer redeliver their events",
                &l,
            ),
        };
        let cfg = ConsumerConfig::default();
        Self {
            handler,
            db,
            bus,
            retry: RetryPolicy::default(),
            concurrency: cfg.concurrency,
            max_outstanding: cfg.max_outstanding,
            metrics,
            after_commit: None,
            inbox_keep: crate::retention::Retention::default().max_age,
        }
    }

    /// Keeps inbox entries at least `keep` (the log's retention age), and after that for as
    /// long as the log could still hand their events to this group.
    pub fn keeping_inbox(mut self, keep: Duration) -> Self {
        self.inbox_keep = keep;
        self
    }

    pub fn waking(mut self, relay: Arc<tokio::sync::Notify>) -> Self {
        self.after_commit = Some(relay);
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Applies `[events.consumers]`: retries, concurrency and the read-ahead bound.
    pub fn configured(mut self, cfg: &ConsumerConfig) -> Self {
        self.retry = cfg.retry();
        self.concurrency = cfg.concurrency.max(1);
        self.max_outstanding = cfg.max_outstanding.max(1);
        self
    }

    /// Consumes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let name = self.handler.name().to_owned();
        // A bus that is not there yet (a broker still starting) is waited for, not fatal.
        let mut backoff = Duration::from_millis(200);
        let sub = loop {
            match self
                .bus
                .subscribe(self.handler.name(), &self.handler.topics())
                .await
            {
                Ok(sub) => break sub,
                Err(e @ BusError::GroupBusy(_)) => {
                    return Err(ConsumerError::Bus {
                        consumer: name,
                        source: e,
                    });
                }
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
        tokio::join!(
            crate::schedule::run(&self, sub, shutdown.clone()),
            self.prune_inbox(shutdown)
        );
        Ok(())
    }

    /// Prunes the inbox every tenth of [`Consumer::keeping_inbox`] (between a second and a
    /// minute) until `shutdown`.
    async fn prune_inbox(&self, shutdown: CancellationToken) {
        let every = (self.inbox_keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.prune_inbox_once(SystemClock.now_ms()).await {
                Ok(n) => self.metrics.inbox_pruned.inc_by(n),
                Err(e) => {
                    tracing::warn!(consumer = %self.handler.name(), error = %e, "pruning the inbox failed");
                }
            }
        }
    }

    /// Forgets the inbox entries that can no longer be needed at `now_ms`: handled longer ago
    /// than the keep time, and before the oldest record the log could still hand this group
    /// (an event is appended before it is handled, so such an event will not come again).
    /// Returns how many went.
    pub async fn prune_inbox_once(&self, now_ms: i64) -> Result<u64, BusError> {
        let name = self.handler.name();
        let keep = i64::try_from(self.inbox_keep.as_millis()).unwrap_or(i64::MAX);
        let horizon = self
            .bus
            .redelivery_horizon(name, &self.handler.topics())
            .await?
            .unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(keep).min(horizon);
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT event_id FROM inbox WHERE consumer = $1 AND handled_at < $2 LIMIT $3",
        )
        .bind(name)
        .bind(cutoff)
        .bind(INBOX_PRUNE_MAX)
        .fetch_all(&mut *self.db.read().await?)
        .await?;
        let mut pruned = 0;
        for (i, chunk) in ids.chunks(INBOX_PRUNE_BATCH).enumerate() {
            if i > 0 {
                // Other writers of the file take their turn between batches.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let sql = format!(
                "DELETE FROM inbox WHERE consumer = $1 AND event_id IN {}",
                placeholders(2, 1, chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql)).bind(name);
            for id in chunk {
                q = q.bind(id);
            }
            let mut conn = self.db.write_conn().await?;
            pruned += q.execute(&mut *conn).await?.rows_affected();
        }
        Ok(pruned)
    }

    /// Whether runs of records may go in one transaction: only for a handler with no
    /// [`Handler::prepare`] step, whose effects all live in that transaction.
    pub(crate) fn batches(&self) -> bool {
        !self.handler.prepares()
    }

    /// Tries each of `records` once, in order, and says what came of each (same order).
    ///
    /// For a handler that [batches](Self::batches), runs of records are applied in one
    /// transaction: one `BEGIN` and `COMMIT`, one inbox insert for all of them. That is the
    /// consumer's share of a database's writer turn, paid once per run instead of once per
    /// event. When one record of a run fails, the transaction rolls back; the records before it
    /// are applied again as a run, the failing one is tried on its own (and retried or
    /// dead-lettered), and the run goes on after it. A failure no record can be blamed for
    /// (the database) leaves the rest to be tried one by one.
    pub async fn try_run(&self, records: &[Record], shutdown: &CancellationToken) -> Vec<Tried> {
        let mut out = Vec::with_capacity(records.len());
        // The end of the run tried next, in `records`, and the record a failed run blamed.
        let mut end = records.len();
        let mut blamed = None;
        while self.batches() && records.len() - out.len() > 1 {
            if blamed == Some(out.len()) {
                blamed = None;
                out.push(self.try_record(&records[out.len()], 1, shutdown).await);
                continue;
            }
            let run = &records[out.len()..end];
            // The leading records that decode and are known; the first that does not ends
            // the run, and is dead-lettered by `try_record`.
            let envs: Vec<Envelope> = run
                .iter()
                .map_while(|r| {
                    decode_envelope(&r.payload)
                        .ok()
                        .filter(|env| check_known(env).is_ok())
                })
                .collect();
            let wanted: Vec<(usize, &Envelope)> = envs
                .iter()
                .enumerate()
                .filter(|(_, env)| self.handler.wants(&env.r#type))
                .collect();
            if wanted.len() < 2 {
                // Nothing to gain from a transaction: the first record on its own.
                out.push(self.try_record(&run[0], 1, shutdown).await);
                end = records.len();
                continue;
            }
            let only: Vec<&Envelope> = wanted.iter().map(|(_, e)| *e).collect();
            match self.apply(&only).await {
                // An id applied is `Applied` once, at its first copy in the run.
                Ok(mut fresh) => {
                    out.extend(envs.iter().map(|env| {
                        Tried::Done(if !self.handler.wants(&env.r#type) {
                            Outcome::Skipped
                        } else if fresh.remove(&env.id) {
                            Outcome::Applied
                        } else {
                            Outcome::Duplicate
                        })
                    }));
                    end = records.len();
                }
                Err(RunError { at: Some(i), error }) => {
                    let failed = wanted[i].0;
                    tracing::debug!(
                        consumer = self.handler.name(), event_id = %only[i].id, error = %error,
                        "an event failed a run; the run goes on without it"
                    );
                    if failed == 0 {
                        out.push(self.try_record(&run[0], 1, shutdown).await);
                        end = records.len();
                    } else {
                        // The records before it first, as a run of their own.
                        blamed = Some(out.len() + failed);
                        end = out.len() + failed;
                    }
                }
                Err(RunError { at: None, error }) => {
                    tracing::debug!(
                        consumer = self.handler.name(), events = only.len(), error = %error,
                        "a run of events failed together; trying each on its own"
                    );
                    break;
                }
            }
        }
        for record in &records[out.len()..] {
            out.push(self.try_record(record, 1, shutdown).await);
        }
        out
    }

    /// Applies `envs` in one write transaction, each once: the inbox insert returns the ids
    /// it had not seen, and only those reach the handler (an id twice in `envs`, once).
    /// Returns the ids applied; the rest were duplicates. One record's attempt is the run of
    /// one.
    async fn apply(&self, envs: &[&Envelope]) -> Result<HashSet<String>, RunError> {
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
        let mut tx = self.db.begin_write().await.map_err(RunError::db)?;
        let fresh: HashSet<String> = q
            .fetch_all(&mut *tx)
            .await
            .map_err(RunError::db)?
            .into_iter()
            .collect();
        let duplicates = (envs.len() - fresh.len()) as u64;
        if fresh.is_empty() {
            tx.rollback().await.map_err(RunError::db)?;
            self.metrics.duplicates.inc_by(duplicates);
            return Ok(fresh);
        }
        shopverse_kit::crash::point("consumer.after_inbox", self.handler.name());
        let mut todo = fresh.clone();
        for (i, env) in envs.iter().enumerate() {
            if todo.remove(&env.id) {
                self.handler
                    .handle(&mut tx, env)
                    .instrument(handling_span(self.handler.name(), env))
                    .await
                    .map_err(|error| RunError { at: Some(i), error })?;
            }
        }
        tx.commit().await.map_err(RunError::db)?;
        self.metrics.handled.inc_by(fresh.len() as u64);
        self.metrics.duplicates.inc_by(duplicates);
        if let Some(n) = &self.after_commit {
            n.notify_one();
        }
        Ok(fresh)
    }

    /// Tries `record` once; `attempt` counts this try (1 for the first). A retryable failure on
    /// the last allowed try dead-letters the record.
    pub async fn try_record(
        &self,
        record: &Record,
        attempt: u32,
        shutdown: &CancellationToken,
    ) -> Tried {
        let env = match decode_envelope(&record.payload) {
            Ok(env) => env,
            Err(e) => {
                return Tried::Done(self.dead_letter(record, &e.to_string(), 1, shutdown).await);
            }
        };
        // An event of a type or schema version this build does not know is poison for every
        // consumer: park it with the reason instead of guessing.
        if let Err(e) = check_known(&env) {
            return Tried::Done(self.dead_letter(record, &e.to_string(), 1, shutdown).await);
        }
        if !self.handler.wants(&env.r#type) {
            return Tried::Done(Outcome::Skipped);
        }
        let reason = match self.attempt(&env).await {
            Ok(outcome) => return Tried::Done(outcome),
            Err(HandlerError::Permanent(reason)) => {
                return Tried::Done(self.dead_letter(record, &reason, attempt, shutdown).await);
            }
            Err(HandlerError::Retryable(e)) if is_outage(&e) => {
                tracing::warn!(
                    consumer = self.handler.name(), event_id = %env.id, event_type = %env.r#type,
                    key = %record.key, error = %e, "storage unavailable; the record waits for it"
                );
                return Tried::Wait(e.to_string());
            }
            Err(HandlerError::Retryable(e)) => e.to_string(),
        };
        if attempt >= self.retry.max_attempts {
            return Tried::Done(
                self.dead_letter(
                    record,
                    &format!("gave up after {attempt} attempts: {reason}"),
                    attempt,
                    shutdown,
                )
                .await,
            );
        }
        tracing::warn!(
            consumer = self.handler.name(), event_id = %env.id, event_type = %env.r#type,
            key = %record.key, attempt, error = %reason, "handler failed; parking the record for a retry"
        );
        Tried::Retry(reason)
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
        Ok(
            if self.apply(&[env]).await.map_err(|e| e.error)?.len() == 1 {
                Outcome::Applied
            } else {
                Outcome::Duplicate
            },
        )
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

/// The span of `consumer`'s handling of `env` when spans are exported: a child of the span
/// that raised the event (its `traceparent`), so the events an order causes are one trace.
/// Events the handler raises inside it carry its context in turn.
fn handling_span(consumer: &str, env: &Envelope) -> tracing::Span {
    if !shopverse_kit::trace::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "event.process",
        otel.name = %format_args!("{} process", env.r#type),
        otel.kind = "consumer",
        messaging.operation.type = "process",
        messaging.consumer.group.name = consumer,
        event.id = %env.id,
        event.subject = %env.subject,
        service.name = consumer,
    );
    shopverse_kit::trace::continue_from(&span, &env.traceparent);
    span
}
