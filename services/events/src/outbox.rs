//! The transactional outbox and its relay.
//!
//! A service calls [`enqueue`] inside the transaction that changes its state, so the event exists
//! exactly when the change does. The [`Relay`] publishes pending rows in the order they were
//! written (SQLite's rowid, PostgreSQL's `seq`: ids derived from a cause say nothing of time)
//! and then stamps them `published_at`. If the process dies between publishing
//! and stamping, the rows are published again on restart: consumers deduplicate by event id.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use prost::Message;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use shopverse_kit::clock::{Clock, SystemClock};
use shopverse_kit::metrics::{int_counter, int_gauge};
use shopverse_storage::{Db, DbKind, placeholders};

use crate::bus::{BusError, EventBus, OutRecord};
use crate::envelope::{Envelope, EventType};

/// How often the relay counts what is left to publish, for its backlog gauge.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);
/// How often published rows are pruned at the most (sooner with a short keep time).
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How long a woken relay waits before it reads the outbox.
const COALESCE: Duration = Duration::from_millis(2);

/// Writes `env` to the outbox on the caller's connection (inside its transaction).
pub async fn enqueue(
    conn: &mut sqlx::AnyConnection,
    kind: &EventType,
    env: &Envelope,
) -> Result<(), sqlx::Error> {
    enqueue_all(conn, kind, std::slice::from_ref(env)).await
}

/// Rows per statement of [`enqueue_all`]: 6 parameters a row stays far below SQLite's and
/// PostgreSQL's limits on parameters.
const ENQUEUE_ROWS: usize = 100;

/// Writes the events `envs`, all of `kind`, to the outbox on the caller's connection (inside
/// its transaction), in one statement per [`ENQUEUE_ROWS`]. An event whose id is there already
/// (the same cause handled again, see [`crate::envelope::Origin`]) is not written twice: a transaction that raises several
/// (a reservation's stock changes, one per line) pays one round trip to the database for them,
/// not one each. Nothing is written for none.
pub async fn enqueue_all(
    conn: &mut sqlx::AnyConnection,
    kind: &EventType,
    envs: &[Envelope],
) -> Result<(), sqlx::Error> {
    let Some(first) = envs.first() else {
        return Ok(());
    };
    let span = tracing::info_span!(
        "outbox.insert",
        event.type = kind.name,
        events = envs.len(),
        service.name = %first.source,
    );
    insert_all(conn, kind, envs).instrument(span).await
}

async fn insert_all(
    conn: &mut sqlx::AnyConnection,
    kind: &EventType,
    envs: &[Envelope],
) -> Result<(), sqlx::Error> {
    for chunk in envs.chunks(ENQUEUE_ROWS) {
        let sql = format!(
            "INSERT INTO outbox (id, topic, event_key, event_type, envelope, created_at) VALUES {} \
             ON CONFLICT (id) DO NOTHING",
            placeholders(1, chunk.len(), 6)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for env in chunk {
            q = q
                .bind(&env.id)
                .bind(kind.topic)
                .bind(&env.subject)
                .bind(&env.r#type)
                .bind(env.encode_to_vec())
                .bind(
                    env.time
                        .as_ref()
                        .map(|t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
                        .unwrap_or(0),
                );
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Headers every published record carries, so a consumer (or an operator with a Kafka tool) can
/// route and trace without decoding the payload.
pub fn envelope_headers(env: &Envelope) -> Vec<(String, String)> {
    let mut h = vec![
        ("event-id".to_owned(), env.id.clone()),
        ("event-type".to_owned(), env.r#type.clone()),
        ("event-source".to_owned(), env.source.clone()),
    ];
    if !env.traceparent.is_empty() {
        h.push(("traceparent".to_owned(), env.traceparent.clone()));
    }
    h
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading or marking the outbox: {0}")]
    Db(#[from] sqlx::Error),
    #[error("publishing outbox rows: {0}")]
    Bus(#[from] BusError),
}

#[derive(Clone)]
struct RelayMetrics {
    published: IntCounter,
    backlog: IntGauge,
    failures: IntCounter,
}

/// Publishes a service's outbox.
#[derive(Clone)]
pub struct Relay {
    db: Db,
    bus: Arc<dyn EventBus>,
    batch_size: usize,
    idle_interval: Duration,
    retention: Duration,
    wake: Arc<Notify>,
    metrics: RelayMetrics,
    /// The service whose outbox this is.
    service: String,
}

impl Relay {
    /// `service` names the relay in metrics (`shopverse_outbox_published_total{service=…}`).
    pub fn new(db: Db, bus: Arc<dyn EventBus>, service: &str, registry: &Registry) -> Relay {
        let l = [("service", service)];
        let metrics = RelayMetrics {
            published: int_counter(
                registry,
                "outbox_published_total",
                "Outbox events published",
                &l,
            ),
            backlog: int_gauge(
                registry,
                "outbox_backlog",
                "Outbox events waiting to be published",
                &l,
            ),
            failures: int_counter(
                registry,
                "outbox_publish_failures_total",
                "Failed outbox publish attempts",
                &l,
            ),
        };
        Relay {
            db,
            bus,
            batch_size: 200,
            idle_interval: Duration::from_millis(250),
            retention: Duration::from_secs(24 * 3600),
            wake: Arc::new(Notify::new()),
            metrics,
            service: service.to_owned(),
        }
    }

    /// Keeps published rows for `keep` (24 hours unless told), for `shopverse events trace`
    /// and for looking back after an incident.
    pub fn keeping(mut self, keep: Duration) -> Self {
        self.retention = keep;
        self
    }

    /// Deletes rows published before `cutoff_ms`, a batch per statement so that other
    /// writers of the file take their turn in between; returns how many went.
    pub async fn prune(&self, cutoff_ms: i64) -> Result<u64, sqlx::Error> {
        let mut pruned = 0;
        loop {
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT id FROM outbox WHERE published_at IS NOT NULL AND published_at < $1 \
                 LIMIT 500",
            )
            .bind(cutoff_ms)
            .fetch_all(&mut *self.db.read().await?)
            .await?;
            if ids.is_empty() {
                return Ok(pruned);
            }
            let sql = format!(
                "DELETE FROM outbox WHERE id IN {}",
                placeholders(1, 1, ids.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in &ids {
                q = q.bind(id);
            }
            pruned += q
                .execute(&mut *self.db.write_conn().await?)
                .await?
                .rows_affected();
            if ids.len() < 500 {
                return Ok(pruned);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn with_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// A handle that wakes the relay right after a commit that enqueued events.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes one batch of pending rows; returns how many were published.
    pub async fn publish_batch(&self) -> Result<usize, RelayError> {
        match self.db.kind() {
            // With several replicas on PostgreSQL, row locks held across the publish keep them
            // from publishing the same rows at once (SKIP LOCKED: each takes other rows).
            DbKind::Postgres => {
                let mut tx = self.db.pool().begin().await?;
                let rows = sqlx::query(
                    "SELECT id, topic, event_key, envelope FROM outbox WHERE published_at IS NULL \
                     ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
                )
                .bind(i64::try_from(self.batch_size).unwrap_or(200))
                .fetch_all(&mut *tx)
                .await?;
                match self.publish_rows(Some(&mut tx), &rows).await {
                    Ok(n) => {
                        tx.commit().await?;
                        Ok(n)
                    }
                    Err(e) => {
                        // Released now, not when the dropped transaction's rollback gets its
                        // turn on the pooled connection: until then the next batch (this
                        // replica's retry included) would skip the locked rows as taken.
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            // SQLite has one process per file. No transaction spans the publish: a read
            // transaction that later writes fails once another connection has committed.
            DbKind::Sqlite => {
                let rows = sqlx::query(
                    "SELECT id, topic, event_key, envelope FROM outbox WHERE published_at IS NULL \
                     ORDER BY rowid LIMIT $1",
                )
                .bind(i64::try_from(self.batch_size).unwrap_or(200))
                .fetch_all(&mut *self.db.read().await?)
                .await?;
                self.publish_rows(None, &rows).await
            }
        }
    }

    /// Publishes `rows`, then stamps them sent on `conn`, or (SQLite) on the file's writer
    /// connection, taken only for the stamp.
    async fn publish_rows(
        &self,
        conn: Option<&mut sqlx::AnyConnection>,
        rows: &[sqlx::any::AnyRow],
    ) -> Result<usize, RelayError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let payload: Vec<u8> = row.try_get("envelope")?;
            let headers = match Envelope::decode(payload.as_slice()) {
                Ok(env) => envelope_headers(&env),
                Err(_) => vec![("event-id".to_owned(), id.clone())],
            };
            records.push(OutRecord {
                topic: row.try_get("topic")?,
                key: row.try_get("event_key")?,
                headers,
                payload,
            });
            ids.push(id);
        }
        if let Err(e) = self.bus.publish(&records).await {
            self.metrics.failures.inc();
            return Err(e.into());
        }
        shopverse_kit::crash::point("relay.after_publish", &self.service);
        let mark = format!(
            "UPDATE outbox SET published_at = $1 WHERE id IN {}",
            placeholders(2, 1, ids.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(mark)).bind(SystemClock.now_ms());
        for id in &ids {
            q = q.bind(id);
        }
        match conn {
            Some(conn) => q.execute(conn).await?,
            None => {
                let mut conn = self.db.write_conn().await?;
                q.execute(&mut *conn).await?
            }
        };
        self.metrics.published.inc_by(ids.len() as u64);
        Ok(ids.len())
    }

    /// Rows not yet published.
    pub async fn backlog(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&mut *self.db.read().await?)
            .await
    }

    /// Publishes until `shutdown`, waking on [`Relay::waker`] or every idle interval. While the
    /// bus is down, writes go on piling up in the outbox and are published when it returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_prune = tokio::time::Instant::now();
        let mut last_count = tokio::time::Instant::now() - BACKLOG_EVERY;
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            match self.publish_batch().await {
                Ok(n) if n >= self.batch_size => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox relay failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            // The gauge is for dashboards: once a second is enough, and under load the
            // count would otherwise run after every small batch.
            if last_count.elapsed() >= BACKLOG_EVERY {
                last_count = tokio::time::Instant::now();
                if let Ok(n) = self.backlog().await {
                    self.metrics.backlog.set(n);
                }
            }
            let prune_every = (self.retention / 10).clamp(Duration::from_secs(1), PRUNE_EVERY);
            if last_prune.elapsed() > prune_every {
                last_prune = tokio::time::Instant::now();
                let cutoff =
                    SystemClock.now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(0);
                if let Err(e) = self.prune(cutoff).await {
                    tracing::warn!(error = %e, "pruning published outbox rows failed");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // One last pass so a clean stop leaves nothing behind.
                    let _ = self.publish_batch().await;
                    return;
                }
                _ = &mut wake => {
                    // A moment for the commits right behind this one, so that under load one
                    // batch (one read, one publish, one mark) carries several events.
                    tokio::time::sleep(COALESCE).await;
                }
                _ = tokio::time::sleep(self.idle_interval) => {}
            }
        }
    }
}
