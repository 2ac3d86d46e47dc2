//! Retention of the embedded event log: records are kept by age and by size per topic, never
//! past what a consumer group still has to read, except past a hard size cap.
//!
//! Per partition, a pass works out where the retained records start:
//! - **age**: records appended more than [`Retention::max_age`] ago may go;
//! - **size**: past [`Retention::bytes`] per topic (shared evenly by its partitions), the
//!   oldest may go until the partition fits;
//! - **consumers**: neither rule deletes a record some consumer group has not committed past.
//!   On a `.dlq` topic the dead-letter replayer counts as a consumer, so a dead letter waits
//!   for its replay;
//! - **hard cap**: past [`Retention::max_bytes`] per topic the oldest records go whoever still
//!   needs them. Each group that loses records is counted and logged here, and again by its
//!   own subscription when it finds its next offset gone (it goes on from the oldest record
//!   left, as Kafka's `auto.offset.reset = earliest` does).
//!
//! A group that has committed nothing for [`Retention::group_expiry`] and has no member in
//! this process is forgotten first, as Kafka forgets the offsets of a group that has been empty
//! that long: a consumer that is gone for good (a throwaway group of a process that died)
//! stops holding records back. It is logged and counted.
//!
//! The last record of a partition is always kept: its offset is where the next append
//! continues. A partition's size is its record count (offsets are consecutive) times the
//! mean size of its newest records, so a pass reads a few index entries per partition, not the
//! records. Deletes go in small batches, each its own short write, so a pass never holds the
//! file's writer for long.

use std::collections::HashMap;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Registry};
use sqlx::Row;

use shopverse_kit::clock::{Clock, SystemClock};
use shopverse_kit::metrics::{int_counter_vec, int_gauge_vec};

use crate::bus::BusError;
use crate::dlq::REPLAYER_GROUP;
use crate::embedded::EmbeddedLog;

/// How long and how much the log keeps: `[events]`'s `retention_*` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Retention {
    /// Records older than this may go once every group has read them.
    pub max_age: Duration,
    /// Bytes per topic past which the oldest records may go once every group has read them.
    pub bytes: u64,
    /// Bytes per topic past which the oldest records go whoever still needs them.
    pub max_bytes: u64,
    /// A group that has committed nothing for this long and runs in no process here is
    /// forgotten.
    pub group_expiry: Duration,
    /// Records deleted per statement.
    pub batch: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(72 * 3600),
            bytes: 256 << 20,
            max_bytes: 1 << 30,
            group_expiry: Duration::from_secs(7 * 24 * 3600),
            batch: 500,
        }
    }
}

impl Retention {
    /// How often a pass runs: a tenth of the age limit, between one second and a minute.
    pub fn every(&self) -> Duration {
        (self.max_age / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// The log's retention metrics.
#[derive(Clone)]
pub(crate) struct RetentionMetrics {
    pub pruned: IntCounterVec,
    pub forced: IntCounterVec,
    pub oldest: IntGaugeVec,
    pub bytes: IntGaugeVec,
    /// Records a group never got because the hard cap deleted them first.
    pub skipped: IntCounterVec,
    pub expired: IntCounterVec,
}

impl RetentionMetrics {
    pub(crate) fn new(registry: &Registry) -> RetentionMetrics {
        RetentionMetrics {
            pruned: int_counter_vec(
                registry,
                "events_records_pruned_total",
                "Records the embedded log's retention deleted",
                &[],
                &["topic"],
            ),
            forced: int_counter_vec(
                registry,
                "events_records_forced_out_total",
                "Records deleted by the hard size cap before this group had read them",
                &[],
                &["topic", "group"],
            ),
            oldest: int_gauge_vec(
                registry,
                "events_oldest_record_age_seconds",
                "Age of the oldest record the embedded log still holds",
                &[],
                &["topic"],
            ),
            bytes: int_gauge_vec(
                registry,
                "events_topic_bytes",
                "Estimated bytes of the records the embedded log holds",
                &[],
                &["topic"],
            ),
            skipped: int_counter_vec(
                registry,
                "events_records_skipped_total",
                "Records a consumer group found deleted before it read them",
                &[],
                &["group", "topic"],
            ),
            expired: int_counter_vec(
                registry,
                "events_groups_expired_total",
                "Consumer groups forgotten after committing nothing for events.group_expiry_hours",
                &[],
                &["group"],
            ),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Records deleted, per topic.
    pub records: HashMap<String, u64>,
    /// Records deleted before a group had read them (hard cap), per (topic, group).
    pub forced: HashMap<(String, String), u64>,
    /// Groups forgotten after committing nothing for the expiry time.
    pub expired: Vec<String>,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.records.values().sum()
    }
}

/// One partition as a pass sees it.
struct Span {
    first: i64,
    last: i64,
    /// Mean bytes of a record (key, headers, payload and the row's own keys).
    mean: u64,
}

/// A row's bytes besides the key, headers and payload: topic, partition, offset, time.
const ROW_OVERHEAD: u64 = 40;
/// Records whose sizes make a partition's mean.
const SAMPLE: i64 = 64;
/// The pause between two delete batches, in which other writers take their turn.
const BETWEEN_BATCHES: Duration = Duration::from_millis(2);

impl EmbeddedLog {
    /// Runs retention passes every [`Retention::every`] until `shutdown`.
    pub async fn retain(self, rules: Retention, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(rules.every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.prune(&rules, SystemClock.now_ms(), &shutdown).await {
                Ok(p) if p.total() > 0 => {
                    tracing::debug!(records = p.total(), "event log retention pass");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "event log retention pass failed"),
            }
        }
    }

    /// One retention pass at time `now_ms`; stops early at `shutdown`.
    pub async fn prune(
        &self,
        rules: &Retention,
        now_ms: i64,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Pruned, BusError> {
        let mut out = Pruned {
            expired: self.expire_groups(rules, now_ms).await?,
            ..Pruned::default()
        };
        let cutoff = now_ms.saturating_sub(i64::try_from(rules.max_age.as_millis()).unwrap_or(0));
        let topics: Vec<(String, i64)> =
            sqlx::query_as("SELECT topic, partitions FROM topics ORDER BY topic")
                .fetch_all(&mut *self.db().read().await?)
                .await?;
        for (topic, parts) in topics {
            let committed = self.group_positions(&topic).await?;
            let parts = i32::try_from(parts).unwrap_or(1).max(1);
            let share = |bytes: u64| bytes / u64::try_from(parts).unwrap_or(1);
            let (mut oldest, mut bytes) = (None::<i64>, 0u64);
            for part in 0..parts {
                if shutdown.is_cancelled() {
                    return Ok(out);
                }
                let Some(span) = self.span(&topic, part).await? else {
                    continue;
                };
                let count = u64::try_from(span.last - span.first + 1).unwrap_or(0);
                let size = count.saturating_mul(span.mean);
                // Records of this partition past a byte limit, oldest first.
                let over = |limit: u64| -> i64 {
                    let excess = size.saturating_sub(limit);
                    i64::try_from(excess.div_ceil(span.mean.max(1))).unwrap_or(i64::MAX)
                };
                let by_age = self.first_since(&topic, part, &span, cutoff).await?;
                let by_size = span.first.saturating_add(over(share(rules.bytes)));
                // Groups read this partition up to their committed offset; none: nobody to wait
                // for (a `.dlq` topic waits for its replayer).
                let groups = committed.get(&part);
                let read_by_all = groups
                    .map(|g| g.iter().map(|(_, next)| *next).min().unwrap_or(0))
                    .unwrap_or(span.last);
                let soft = by_age.max(by_size).min(read_by_all);
                let hard = span.first.saturating_add(over(share(rules.max_bytes)));
                let to = soft.max(hard).min(span.last);
                if to > span.first {
                    if to > read_by_all {
                        for (group, next) in groups.into_iter().flatten() {
                            if *next < to {
                                let lost = to - (*next).max(span.first);
                                tracing::warn!(
                                    topic,
                                    partition = part,
                                    group,
                                    records = lost,
                                    "the event log's hard size cap deleted records this group had not read"
                                );
                                if let Some(m) = self.metrics() {
                                    m.forced
                                        .with_label_values(&[topic.as_str(), group.as_str()])
                                        .inc_by(u64::try_from(lost).unwrap_or(0));
                                }
                                *out.forced
                                    .entry((topic.clone(), group.clone()))
                                    .or_default() += u64::try_from(lost).unwrap_or(0);
                            }
                        }
                    }
                    let n = self
                        .delete_range(&topic, part, span.first, to, rules.batch)
                        .await?;
                    *out.records.entry(topic.clone()).or_default() += n;
                    if let Some(m) = self.metrics() {
                        m.pruned.with_label_values(&[topic.as_str()]).inc_by(n);
                    }
                }
                let kept_from = to.max(span.first);
                bytes += u64::try_from(span.last - kept_from + 1)
                    .unwrap_or(0)
                    .saturating_mul(span.mean);
                if let Some(at) = self.appended_at(&topic, part, kept_from).await? {
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
            }
            if let Some(m) = self.metrics() {
                let age = oldest.map_or(0, |o| (now_ms - o).max(0) / 1000);
                m.oldest.with_label_values(&[topic.as_str()]).set(age);
                m.bytes
                    .with_label_values(&[topic.as_str()])
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        Ok(out)
    }

    /// Forgets the groups that have committed nothing for [`Retention::group_expiry`] and have
    /// no member here; starts the clock of offsets committed before commit times were kept.
    async fn expire_groups(&self, rules: &Retention, now_ms: i64) -> Result<Vec<String>, BusError> {
        {
            let mut conn = self.db().write_conn().await?;
            sqlx::query("UPDATE group_offsets SET committed_at = $1 WHERE committed_at = 0")
                .bind(now_ms)
                .execute(&mut *conn)
                .await?;
        }
        let before =
            now_ms.saturating_sub(i64::try_from(rules.group_expiry.as_millis()).unwrap_or(0));
        let idle: Vec<String> = sqlx::query_scalar(
            "SELECT group_id FROM group_offsets GROUP BY group_id HAVING MAX(committed_at) < $1",
        )
        .bind(before)
        .fetch_all(&mut *self.db().read().await?)
        .await?;
        let mut expired = Vec::new();
        for group in idle.into_iter().filter(|g| !self.is_active(g)) {
            tracing::warn!(
                group,
                idle_hours = rules.group_expiry.as_secs() / 3600,
                "a consumer group that committed nothing for the expiry time was forgotten"
            );
            crate::bus::EventBus::forget_group(self, &group).await?;
            if let Some(m) = self.metrics() {
                m.expired.with_label_values(&[group.as_str()]).inc();
            }
            expired.push(group);
        }
        Ok(expired)
    }

    /// Each group's committed next offset in `topic`, by partition; a group that committed in
    /// some partition of the topic and not in another has read nothing of that other one.
    async fn group_positions(
        &self,
        topic: &str,
    ) -> Result<HashMap<i32, Vec<(String, i64)>>, BusError> {
        let rows =
            sqlx::query("SELECT group_id, part, next_offset FROM group_offsets WHERE topic = $1")
                .bind(topic)
                .fetch_all(&mut *self.db().read().await?)
                .await?;
        let parts = crate::bus::EventBus::partitions(self, topic).await?;
        let mut groups: Vec<String> = Vec::new();
        let mut at: HashMap<(String, i32), i64> = HashMap::new();
        for row in &rows {
            let group: String = row.try_get("group_id")?;
            let part = i32::try_from(row.try_get::<i64, _>("part")?).unwrap_or(0);
            if !groups.contains(&group) {
                groups.push(group.clone());
            }
            at.insert((group, part), row.try_get("next_offset")?);
        }
        if topic.ends_with(".dlq") && !groups.iter().any(|g| g == REPLAYER_GROUP) {
            groups.push(REPLAYER_GROUP.to_owned());
        }
        let mut out: HashMap<i32, Vec<(String, i64)>> = HashMap::new();
        for part in 0..parts {
            for g in &groups {
                let next = at.get(&(g.clone(), part)).copied().unwrap_or(0);
                out.entry(part).or_default().push((g.clone(), next));
            }
        }
        Ok(out)
    }

    /// The first and last offsets of a partition and its records' mean size; `None` when it
    /// holds nothing.
    async fn span(&self, topic: &str, part: i32) -> Result<Option<Span>, BusError> {
        let mut conn = self.db().read().await?;
        let row = sqlx::query(
            "SELECT (SELECT MIN(offs) FROM records WHERE topic = $1 AND part = $2) AS first, \
                    (SELECT MAX(offs) FROM records WHERE topic = $1 AND part = $2) AS last",
        )
        .bind(topic)
        .bind(i64::from(part))
        .fetch_one(&mut *conn)
        .await?;
        let (Some(first), Some(last)) = (
            row.try_get::<Option<i64>, _>("first")?,
            row.try_get::<Option<i64>, _>("last")?,
        ) else {
            return Ok(None);
        };
        let sample = sqlx::query(
            "SELECT COUNT(*) AS n, \
                    COALESCE(SUM(LENGTH(record_key) + LENGTH(headers) + LENGTH(payload)), 0) AS b \
             FROM records WHERE topic = $1 AND part = $2 AND offs > $3",
        )
        .bind(topic)
        .bind(i64::from(part))
        .bind(last - SAMPLE)
        .fetch_one(&mut *conn)
        .await?;
        let n = u64::try_from(sample.try_get::<i64, _>("n")?)
            .unwrap_or(0)
            .max(1);
        let b = u64::try_from(sample.try_get::<i64, _>("b")?).unwrap_or(0);
        Ok(Some(Span {
            first,
            last,
            mean: b / n + ROW_OVERHEAD,
        }))
    }

    /// When the record at `offset` was appended.
    async fn appended_at(
        &self,
        topic: &str,
        part: i32,
        offset: i64,
    ) -> Result<Option<i64>, BusError> {
        Ok(sqlx::query_scalar(
            "SELECT appended_at FROM records WHERE topic = $1 AND part = $2 AND offs = $3",
        )
        .bind(topic)
        .bind(i64::from(part))
        .bind(offset)
        .fetch_optional(&mut *self.db().read().await?)
        .await?)
    }

    /// The first offset of the span appended at or after `cutoff` (the last one when all are
    /// older): records are appended in time order, so a binary search over point reads.
    async fn first_since(
        &self,
        topic: &str,
        part: i32,
        span: &Span,
        cutoff: i64,
    ) -> Result<i64, BusError> {
        let (mut lo, mut hi) = (span.first, span.last);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.appended_at(topic, part, mid).await? {
                Some(at) if at >= cutoff => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// Deletes offsets `from..to` of a partition, `batch` at a time; returns how many went.
    async fn delete_range(
        &self,
        topic: &str,
        part: i32,
        from: i64,
        to: i64,
        batch: i64,
    ) -> Result<u64, BusError> {
        let mut deleted = 0;
        let mut at = from;
        while at < to {
            let end = at.saturating_add(batch.max(1)).min(to);
            let done = {
                let mut conn = self.db().write_conn().await?;
                sqlx::query(
                    "DELETE FROM records WHERE topic = $1 AND part = $2 AND offs >= $3 AND offs < $4",
                )
                .bind(topic)
                .bind(i64::from(part))
                .bind(at)
                .bind(end)
                .execute(&mut *conn)
                .await?
            };
            deleted += done.rows_affected();
            at = end;
            if at < to {
                tokio::time::sleep(BETWEEN_BATCHES).await;
            }
        }
        Ok(deleted)
    }
}
