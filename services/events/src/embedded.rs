//! The embedded event log: the appliance's event bus, durable in one SQLite file.
//!
//! Records are appended to `(topic, partition)` with consecutive offsets in one transaction per
//! publish, so a publish is all or nothing. Consumer groups commit the next offset to read; a
//! restarted consumer resumes there. In one process a group has one member, which reads every
//! partition (a second member of the same group is refused). Other processes may append to the
//! same file (the CLI's dead-letter replay does) and members see their records on the next poll.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::Notify;

use shopverse_kit::clock::{Clock, SystemClock};
use shopverse_storage::{Db, MigrationSpec, placeholders};

use crate::bus::{BusError, EventBus, OutRecord, Record, Subscription, partition_for};
use crate::retention::RetentionMetrics;

pub const MIGRATIONS: &[MigrationSpec] = &[
    (
        1,
        "embedded event log",
        include_str!("../migrations/0001_embedded_log.sql"),
    ),
    (
        2,
        "group commit time",
        include_str!("../migrations/0002_group_commit_time.sql"),
    ),
];

/// Rows per statement of a publish: 7 parameters a row stays far below SQLite's and
/// PostgreSQL's limits on parameters.
const PUBLISH_ROWS: usize = 500;
/// Partitions whose next offset one statement reads (SQLite takes at most 500 terms in a
/// compound SELECT).
const NEXT_PER_STATEMENT: usize = 100;

/// How often an idle member looks for records appended by another process.
const IDLE_POLL: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    url: String,
    partitions: i32,
    appended: Notify,
    active_groups: Mutex<HashSet<String>>,
    /// Each partition's end offset as far as this process knows it (what it appended, or read
    /// up to): a member woken by a publish reads only the partitions that grew.
    ends: Mutex<HashMap<String, Vec<i64>>>,
    /// Partitions per topic, for topics known to exist (a topic's count never changes).
    parts: Mutex<HashMap<String, i32>>,
    /// Retention's metrics, once [`EmbeddedLog::register`] has run.
    metrics: std::sync::OnceLock<RetentionMetrics>,
}

impl Inner {
    fn known_parts(&self, topic: &str) -> Option<i32> {
        self.parts.lock().ok()?.get(topic).copied()
    }

    /// Caches the counts of topics that exist (read, or created in a committed transaction).
    fn remember_parts(&self, counts: impl IntoIterator<Item = (String, i32)>) {
        if let Ok(mut known) = self.parts.lock() {
            known.extend(counts);
        }
    }

    fn known_end(&self, topic: &str, part: i32) -> Option<i64> {
        let ends = self.ends.lock().ok()?;
        ends.get(topic)?
            .get(usize::try_from(part).ok()?)
            .copied()
            .filter(|e| *e >= 0)
    }

    fn saw_end(&self, topic: &str, part: i32, end: i64) {
        let (Ok(mut ends), Ok(i)) = (self.ends.lock(), usize::try_from(part)) else {
            return;
        };
        let slots = ends.entry(topic.to_owned()).or_default();
        if slots.len() <= i {
            slots.resize(i + 1, -1);
        }
        slots[i] = slots[i].max(end);
    }
}

impl EmbeddedLog {
    /// Opens (creating if needed) the log at `url` (`sqlite://…/events.db`); new topics get
    /// `partitions` partitions.
    pub async fn open(url: &str, partitions: i32) -> Result<EmbeddedLog, OpenError> {
        let db = Db::connect(url, 4).await?;
        db.migrate(&[MIGRATIONS]).await?;
        Ok(EmbeddedLog {
            inner: Arc::new(Inner {
                db,
                url: shopverse_storage::redact(url),
                partitions: partitions.max(1),
                appended: Notify::new(),
                active_groups: Mutex::new(HashSet::new()),
                ends: Mutex::default(),
                parts: Mutex::default(),
                metrics: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Registers the log's retention metrics in `registry` (once; later calls do nothing).
    pub fn register(&self, registry: &prometheus::Registry) {
        let _ = self
            .inner
            .metrics
            .get_or_init(|| RetentionMetrics::new(registry));
    }

    pub(crate) fn metrics(&self) -> Option<&RetentionMetrics> {
        self.inner.metrics.get()
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Whether a member of `group` runs in this process.
    pub(crate) fn is_active(&self, group: &str) -> bool {
        self.inner
            .active_groups
            .lock()
            .is_ok_and(|a| a.contains(group))
    }

    async fn topic_partitions(
        conn: &mut sqlx::AnyConnection,
        topic: &str,
        default: i32,
    ) -> Result<i32, sqlx::Error> {
        if let Some(n) =
            sqlx::query_scalar::<_, i64>("SELECT partitions FROM topics WHERE topic = $1")
                .bind(topic)
                .fetch_optional(&mut *conn)
                .await?
        {
            return Ok(i32::try_from(n).unwrap_or(1));
        }
        sqlx::query(
            "INSERT INTO topics (topic, partitions) VALUES ($1, $2) ON CONFLICT (topic) DO NOTHING",
        )
        .bind(topic)
        .bind(i64::from(default))
        .execute(&mut *conn)
        .await?;
        Ok(default)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening the embedded event log: {0}")]
    Db(#[from] shopverse_storage::DbError),
}

fn decode_headers(s: &str) -> Vec<(String, String)> {
    serde_json::from_str(s).unwrap_or_default()
}

fn row_to_record(row: &sqlx::any::AnyRow) -> Result<Record, sqlx::Error> {
    Ok(Record {
        topic: row.try_get("topic")?,
        partition: i32::try_from(row.try_get::<i64, _>("part")?).unwrap_or(0),
        offset: row.try_get("offs")?,
        key: row.try_get("record_key")?,
        headers: decode_headers(&row.try_get::<String, _>("headers")?),
        payload: row.try_get("payload")?,
        timestamp_ms: row.try_get("appended_at")?,
    })
}

#[async_trait]
impl EventBus for EmbeddedLog {
    async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let mut tx = self.inner.db.begin_write().await?;
        let mut counts = Vec::with_capacity(topics.len());
        for t in topics {
            let n = Self::topic_partitions(&mut tx, t, self.inner.partitions).await?;
            counts.push(((*t).to_owned(), n));
        }
        tx.commit().await?;
        self.inner.remember_parts(counts);
        Ok(())
    }

    async fn publish(&self, records: &[OutRecord]) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        let now = SystemClock.now_ms();
        let mut tx = self.inner.db.begin_write().await?;
        let mut parts: HashMap<String, i32> = HashMap::new();
        let mut placed = Vec::with_capacity(records.len());
        for r in records {
            let n = match parts
                .get(&r.topic)
                .copied()
                .or_else(|| self.inner.known_parts(&r.topic))
            {
                Some(n) => n,
                None => {
                    let n =
                        Self::topic_partitions(&mut tx, &r.topic, self.inner.partitions).await?;
                    parts.insert(r.topic.clone(), n);
                    n
                }
            };
            placed.push((r, partition_for(&r.key, n)));
        }
        // The next offset of every partition the batch appends to, in one statement (the write
        // transaction holds the file's lock, so no other writer appends meanwhile); each
        // partition's `MAX` is its own subquery, answered from the end of its index.
        let mut next: Vec<((&str, i32), i64)> = Vec::new();
        let mut slot_of = Vec::with_capacity(placed.len());
        for (r, part) in &placed {
            let slot = match next
                .iter()
                .position(|((t, p), _)| *t == r.topic && p == part)
            {
                Some(i) => i,
                None => {
                    next.push(((r.topic.as_str(), *part), 0));
                    next.len() - 1
                }
            };
            slot_of.push(slot);
        }
        for chunk in next.chunks_mut(NEXT_PER_STATEMENT) {
            let sql = (0..chunk.len())
                .map(|i| {
                    format!(
                        "SELECT {i} AS i, (SELECT COALESCE(MAX(offs) + 1, 0) FROM records \
                         WHERE topic = ${} AND part = ${}) AS next",
                        2 * i + 1,
                        2 * i + 2
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for ((topic, part), _) in chunk.iter() {
                q = q.bind(*topic).bind(i64::from(*part));
            }
            for row in q.fetch_all(&mut *tx).await? {
                let i: i64 = row.try_get("i")?;
                if let Some(slot) = usize::try_from(i).ok().and_then(|i| chunk.get_mut(i)) {
                    slot.1 = row.try_get("next")?;
                }
            }
        }
        // Then the records, in order, with consecutive offsets per partition.
        let mut rows = Vec::with_capacity(placed.len());
        for ((r, part), &slot) in placed.iter().zip(&slot_of) {
            rows.push((*r, *part, next[slot].1));
            next[slot].1 += 1;
        }
        for chunk in rows.chunks(PUBLISH_ROWS) {
            let sql = format!(
                "INSERT INTO records (topic, part, offs, record_key, headers, payload, appended_at) \
                 VALUES {}",
                placeholders(1, chunk.len(), 7)
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (r, part, offs) in chunk {
                let headers = serde_json::to_string(&r.headers).unwrap_or_else(|_| "[]".into());
                q = q
                    .bind(&r.topic)
                    .bind(i64::from(*part))
                    .bind(*offs)
                    .bind(&r.key)
                    .bind(headers)
                    .bind(r.payload.clone())
                    .bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.inner.remember_parts(parts);
        for ((topic, part), end) in &next {
            self.inner.saw_end(topic, *part, *end);
        }
        self.inner.appended.notify_waiters();
        Ok(())
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        {
            let mut active = self
                .inner
                .active_groups
                .lock()
                .map_err(|_| BusError::Other("group registry poisoned".into()))?;
            if !active.insert(group.to_owned()) {
                return Err(BusError::GroupBusy(group.to_owned()));
            }
        }
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.ensure_topics(&refs).await?;
        Ok(Box::new(EmbeddedSubscription {
            log: self.clone(),
            group: group.to_owned(),
            topics: topics.to_vec(),
            positions: HashMap::new(),
            last_full: None,
        }))
    }

    async fn topics(&self) -> Result<Vec<String>, BusError> {
        Ok(
            sqlx::query_scalar("SELECT topic FROM topics ORDER BY topic")
                .fetch_all(&mut *self.inner.db.read().await?)
                .await?,
        )
    }

    async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        if let Some(n) = self.inner.known_parts(topic) {
            return Ok(n);
        }
        let n: Option<i64> = sqlx::query_scalar("SELECT partitions FROM topics WHERE topic = $1")
            .bind(topic)
            .fetch_optional(&mut *self.inner.db.read().await?)
            .await?;
        let n = n.and_then(|n| i32::try_from(n).ok()).unwrap_or(0);
        if n > 0 {
            self.inner.remember_parts([(topic.to_owned(), n)]);
        }
        Ok(n)
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        from_offset: i64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let rows = sqlx::query(
            "SELECT topic, part, offs, record_key, headers, payload, appended_at FROM records \
             WHERE topic = $1 AND part = $2 AND offs >= $3 ORDER BY offs LIMIT $4",
        )
        .bind(topic)
        .bind(i64::from(partition))
        .bind(from_offset)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *self.inner.db.read().await?)
        .await?;
        Ok(rows.iter().map(row_to_record).collect::<Result<_, _>>()?)
    }

    async fn committed(&self, group: &str, topic: &str, partition: i32) -> Result<i64, BusError> {
        let n: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM group_offsets WHERE group_id = $1 AND topic = $2 AND part = $3",
        )
        .bind(group)
        .bind(topic)
        .bind(i64::from(partition))
        .fetch_optional(&mut *self.inner.db.read().await?)
        .await?;
        Ok(n.unwrap_or(0))
    }

    async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), BusError> {
        let q = upsert_offset(group, topic, partition, next_offset);
        let mut conn = self.inner.db.write_conn().await?;
        q.execute(&mut *conn).await?;
        Ok(())
    }

    async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, BusError> {
        Ok(sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(MAX(offs) + 1, 0) FROM records WHERE topic = $1 AND part = $2",
        )
        .bind(topic)
        .bind(i64::from(partition))
        .fetch_one(&mut *self.inner.db.read().await?)
        .await?)
    }

    async fn redelivery_horizon(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Option<i64>, BusError> {
        let mut oldest = i64::MAX;
        for topic in topics {
            for part in 0..self.partitions(topic).await? {
                let next = self.committed(group, topic, part).await?;
                let at: Option<i64> = sqlx::query_scalar(
                    "SELECT appended_at FROM records WHERE topic = $1 AND part = $2 AND offs >= $3 \
                     ORDER BY offs LIMIT 1",
                )
                .bind(topic)
                .bind(i64::from(part))
                .bind(next)
                .fetch_optional(&mut *self.inner.db.read().await?)
                .await?;
                if let Some(at) = at {
                    oldest = oldest.min(at);
                }
            }
        }
        Ok(Some(oldest))
    }

    /// At shutdown: the log's WAL goes into the file, so a stopped appliance leaves it whole.
    async fn flush(&self) {
        self.inner.db.truncate_wal().await;
    }

    async fn forget_group(&self, group: &str) -> Result<(), BusError> {
        let mut conn = self.inner.db.write_conn().await?;
        sqlx::query("DELETE FROM group_offsets WHERE group_id = $1")
            .bind(group)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.inner.url.clone()
    }
}

/// Sets a group's next offset in a partition.
fn upsert_offset<'q>(
    group: &'q str,
    topic: &'q str,
    partition: i32,
    next_offset: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    sqlx::query(
        "INSERT INTO group_offsets (group_id, topic, part, next_offset, committed_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (group_id, topic, part) \
         DO UPDATE SET next_offset = excluded.next_offset, committed_at = excluded.committed_at",
    )
    .bind(group)
    .bind(topic)
    .bind(i64::from(partition))
    .bind(next_offset)
    .bind(SystemClock.now_ms())
}

struct EmbeddedSubscription {
    log: EmbeddedLog,
    group: String,
    topics: Vec<String>,
    /// Next offset to hand out per (topic, partition); starts at the committed offset.
    positions: HashMap<(String, i32), i64>,
    /// When every partition was last read whatever this process knew of its end: records
    /// another process appended are found this way, within [`IDLE_POLL`].
    last_full: Option<tokio::time::Instant>,
}

impl EmbeddedSubscription {
    async fn fetch_available(&mut self, max: usize) -> Result<Vec<Record>, BusError> {
        let full = self.last_full.is_none_or(|t| t.elapsed() >= IDLE_POLL);
        if full {
            self.last_full = Some(tokio::time::Instant::now());
        }
        let mut out = Vec::new();
        for topic in &self.topics {
            let parts = self.log.partitions(topic).await?;
            for p in 0..parts {
                if out.len() >= max {
                    return Ok(out);
                }
                let key = (topic.clone(), p);
                let pos = match self.positions.get(&key) {
                    Some(p) => *p,
                    None => {
                        let c = self.log.committed(&self.group, topic, p).await?;
                        self.positions.insert(key.clone(), c);
                        c
                    }
                };
                if !full
                    && self
                        .log
                        .inner
                        .known_end(topic, p)
                        .is_some_and(|end| end <= pos)
                {
                    continue;
                }
                let room = max - out.len();
                let recs = self.log.fetch(topic, p, pos, room).await?;
                if let Some(first) = recs.first()
                    && first.offset > pos
                    && pos > 0
                {
                    // Offsets are consecutive: the ones before `first` were deleted by the
                    // log's hard size cap before this group read them. (A group that has read
                    // nothing here starts at the oldest record left, as a new group does;
                    // retention counted what it lost.)
                    let lost = first.offset - pos;
                    tracing::warn!(
                        group = %self.group, topic, partition = p, records = lost,
                        "records this group had not read were deleted; going on from the oldest left"
                    );
                    if let Some(m) = self.log.metrics() {
                        m.skipped
                            .with_label_values(&[self.group.as_str(), topic.as_str()])
                            .inc_by(u64::try_from(lost).unwrap_or(0));
                    }
                }
                let next = recs.last().map_or(pos, |last| last.offset + 1);
                if recs.len() < room {
                    // Read to the end.
                    self.log.inner.saw_end(topic, p, next);
                }
                self.positions.insert(key, next);
                out.extend(recs);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Subscription for EmbeddedSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError> {
        let deadline = tokio::time::Instant::now() + wait;
        let log = self.log.clone();
        loop {
            let notified = log.inner.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let recs = self.fetch_available(max.max(1)).await?;
            let now = tokio::time::Instant::now();
            if !recs.is_empty() || now >= deadline {
                return Ok(recs);
            }
            let nap = (deadline - now).min(IDLE_POLL);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    async fn lag(&mut self) -> Option<i64> {
        let mut lag = 0;
        for ((topic, p), pos) in &self.positions {
            lag += (self.log.end_offset(topic, *p).await.ok()? - pos).max(0);
        }
        Some(lag)
    }

    async fn commit(&mut self, record: &Record) -> Result<(), BusError> {
        self.log
            .commit_offset(
                &self.group,
                &record.topic,
                record.partition,
                record.offset + 1,
            )
            .await
    }

    async fn commit_all(&mut self, last: &[Record]) -> Result<(), BusError> {
        match last {
            [] => return Ok(()),
            [one] => return self.commit(one).await,
            _ => {}
        }
        // One statement for every partition: a write transaction of one upsert per partition
        // cost two more hand-offs to SQLite's thread and one per partition. A partition named
        // twice keeps its highest offset (one row may not be updated twice in a statement).
        let mut next: Vec<(&str, i32, i64)> = Vec::with_capacity(last.len());
        for r in last {
            match next
                .iter_mut()
                .find(|(t, p, _)| *p == r.partition && *t == r.topic)
            {
                Some(n) => n.2 = n.2.max(r.offset + 1),
                None => next.push((&r.topic, r.partition, r.offset + 1)),
            }
        }
        let sql = format!(
            "INSERT INTO group_offsets (group_id, topic, part, next_offset, committed_at) \
             VALUES {} ON CONFLICT (group_id, topic, part) DO UPDATE SET \
             next_offset = excluded.next_offset, committed_at = excluded.committed_at",
            placeholders(1, next.len(), 5)
        );
        let now = SystemClock.now_ms();
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (topic, partition, offset) in next {
            q = q
                .bind(&self.group)
                .bind(topic)
                .bind(i64::from(partition))
                .bind(offset)
                .bind(now);
        }
        let mut conn = self.log.inner.db.write_conn().await?;
        q.execute(&mut *conn).await?;
        Ok(())
    }
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        if let Ok(mut active) = self.log.inner.active_groups.lock() {
            active.remove(&self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(topic: &str, key: &str, n: u8) -> OutRecord {
        OutRecord {
            topic: topic.into(),
            key: key.into(),
            headers: vec![("n".into(), n.to_string())],
            payload: vec![n],
        }
    }

    #[tokio::test]
    async fn per_key_order_groups_and_durability() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/events.db", dir.path().display());
        let log = EmbeddedLog::open(&url, 4).await.expect("open");
        let batch: Vec<OutRecord> = (0..20)
            .map(|i| rec("t", &format!("k{}", i % 3), i))
            .collect();
        log.publish(&batch).await.expect("publish");

        let mut sub = log.subscribe("g", &["t".into()]).await.expect("subscribe");
        assert!(matches!(
            log.subscribe("g", &["t".into()]).await,
            Err(BusError::GroupBusy(_))
        ));
        let got = sub
            .poll(100, Duration::from_millis(10))
            .await
            .expect("poll");
        assert_eq!(got.len(), 20);
        for k in ["k0", "k1", "k2"] {
            let ns: Vec<u8> = got
                .iter()
                .filter(|r| r.key == k)
                .map(|r| r.payload[0])
                .collect();
            let mut sorted = ns.clone();
            sorted.sort();
            assert_eq!(ns, sorted, "key {k} out of order");
            let parts: HashSet<i32> = got
                .iter()
                .filter(|r| r.key == k)
                .map(|r| r.partition)
                .collect();
            assert_eq!(parts.len(), 1);
        }
        // Commit only the first record of each partition, then come back as a new member.
        let mut firsts: HashMap<i32, &Record> = HashMap::new();
        for r in &got {
            firsts.entry(r.partition).or_insert(r);
        }
        for r in firsts.values() {
            sub.commit(r).await.expect("commit");
        }
        drop(sub);
        drop(log);
        let log = EmbeddedLog::open(&url, 4).await.expect("reopen");
        let mut sub = log
            .subscribe("g", &["t".into()])
            .await
            .expect("resubscribe");
        let again = sub
            .poll(100, Duration::from_millis(10))
            .await
            .expect("poll");
        assert_eq!(again.len(), 20 - firsts.len());

        // A waiting member wakes on a publish.
        let log2 = log.clone();
        let waiter = tokio::spawn(async move {
            let mut s = log2.subscribe("h", &["u".into()]).await.expect("subscribe");
            s.poll(10, Duration::from_secs(5)).await.expect("poll")
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.publish(&[rec("u", "x", 1)]).await.expect("publish");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woke")
            .expect("join");
        assert_eq!(got.len(), 1);
    }

    /// A member woken by this process's publishes reads only the partitions that grew, yet
    /// still finds records another process appended to a partition it had read to the end
    /// (here a second handle on the same file); `commit_all` commits every partition at once.
    #[tokio::test]
    async fn appends_by_another_process_are_found_and_commits_go_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/events.db", dir.path().display());
        let log = EmbeddedLog::open(&url, 4).await.expect("open");
        let other = EmbeddedLog::open(&url, 4).await.expect("second handle");
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let batch: Vec<OutRecord> = keys.iter().map(|k| rec("t", k, 1)).collect();
        log.publish(&batch).await.expect("publish");
        let mut sub = log.subscribe("g", &["t".into()]).await.expect("subscribe");
        let first = sub
            .poll(100, Duration::from_millis(10))
            .await
            .expect("poll");
        assert_eq!(first.len(), 40);
        let parts: HashSet<i32> = first.iter().map(|r| r.partition).collect();
        assert!(parts.len() > 1, "40 keys land on several partitions");

        // Another process appends; this process publishes to a different topic, which wakes
        // the member without growing any partition it knows of.
        other
            .publish(&[rec("t", "k0", 2)])
            .await
            .expect("publish elsewhere");
        log.publish(&[rec("u", "x", 3)]).await.expect("publish");
        let started = tokio::time::Instant::now();
        let mut seen = Vec::new();
        while seen.is_empty() {
            seen = sub.poll(100, Duration::from_secs(2)).await.expect("poll");
            assert!(started.elapsed() < Duration::from_secs(2), "never found it");
        }
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].key.as_str(), seen[0].payload[0]), ("k0", 2));

        // Commit the last record of each partition together; a new member starts after them.
        let mut last: Vec<Record> = Vec::new();
        for r in first.into_iter().chain(seen) {
            last.retain(|l| l.partition != r.partition);
            last.push(r);
        }
        sub.commit_all(&last).await.expect("commit all");
        drop(sub);
        let mut again = log
            .subscribe("g", &["t".into()])
            .await
            .expect("resubscribe");
        let rest = again
            .poll(100, Duration::from_millis(10))
            .await
            .expect("poll");
        assert!(
            rest.is_empty(),
            "everything was committed: {} left",
            rest.len()
        );
        for p in &parts {
            let end = log.end_offset("t", *p).await.expect("end");
            assert_eq!(log.committed("g", "t", *p).await.expect("committed"), end);
        }

        again
            .commit_all(&[])
            .await
            .expect("an empty commit is nothing to do");

        // A partition named twice in one commit keeps the higher of its offsets.
        let newest = last[0].clone();
        let mut older = newest.clone();
        older.offset -= 1;
        again
            .commit_all(&[newest.clone(), older, last[1].clone()])
            .await
            .expect("commit a partition twice");
        assert_eq!(
            log.committed("g", "t", newest.partition)
                .await
                .expect("committed"),
            newest.offset + 1
        );
    }

    /// A publish appends a batch across topics and partitions in one statement: each
    /// partition's records take consecutive offsets from its end, in publish order.
    #[tokio::test]
    async fn a_batch_takes_consecutive_offsets_from_each_partitions_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/events.db", dir.path().display());
        let log = EmbeddedLog::open(&url, 4).await.expect("open");
        let first: Vec<OutRecord> = (0..30u8)
            .map(|i| {
                rec(
                    if i % 3 == 0 { "u" } else { "t" },
                    &format!("k{}", i % 7),
                    i,
                )
            })
            .collect();
        log.publish(&first).await.expect("publish");
        let second: Vec<OutRecord> = (30..60u8)
            .map(|i| rec("t", &format!("k{}", i % 5), i))
            .collect();
        log.publish(&second).await.expect("publish again");

        let mut sub = log
            .subscribe("g", &["t".into(), "u".into()])
            .await
            .expect("subscribe");
        let mut got = Vec::new();
        loop {
            let more = sub
                .poll(1000, Duration::from_millis(10))
                .await
                .expect("poll");
            if more.is_empty() {
                break;
            }
            got.extend(more);
        }
        assert_eq!(got.len(), 60, "every record once");
        let mut by_part: HashMap<(String, i32), Vec<&Record>> = HashMap::new();
        for r in &got {
            by_part
                .entry((r.topic.clone(), r.partition))
                .or_default()
                .push(r);
        }
        assert!(by_part.len() > 2, "several partitions: {}", by_part.len());
        for ((topic, part), mut records) in by_part {
            records.sort_by_key(|r| r.offset);
            let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
            let expected: Vec<i64> = (0..i64::try_from(records.len()).expect("len")).collect();
            assert_eq!(offsets, expected, "{topic}/{part}: consecutive from 0");
            let payloads: Vec<u8> = records.iter().map(|r| r.payload[0]).collect();
            let mut sorted = payloads.clone();
            sorted.sort();
            assert_eq!(payloads, sorted, "{topic}/{part}: in publish order");
            assert_eq!(
                log.end_offset(&topic, part).await.expect("end"),
                i64::try_from(records.len()).expect("len")
            );
        }
    }
}
