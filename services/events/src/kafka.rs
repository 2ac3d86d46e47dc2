//! The Kafka backend of the [`EventBus`], on `rdkafka` (librdkafka, bundled).
//!
//! - **Producer**: idempotent (`enable.idempotence=true`, so `acks=all` and no reordering or
//!   duplicates from retries), keyed by the aggregate id with the Java client's `murmur2`
//!   partitioner, envelope metadata in Kafka headers. [`EventBus::publish`] returns once every
//!   record of the batch is acknowledged by the broker. While the broker is away librdkafka keeps
//!   the records queued for `message_timeout_ms`; past that the publish fails and the outbox relay
//!   retries the same rows later, so nothing is lost either way.
//! - **Consumers**: one group per service. Offsets are *stored* only after the handler's database
//!   transaction has committed (`enable.auto.offset.store=false`) and committed from that store
//!   in the background, on rebalance and on close. A record handled by a member that lost its
//!   partition meanwhile is handled again by the new owner; the inbox makes that a no-op.
//! - **Topics** are created at start (and before the first publish to a topic this process has
//!   not seen, such as a `.dlq` topic) with the configured partitions and replication.
//! - **Namespace**: an optional prefix for every topic and group name, so several shops, or
//!   several test runs, can share one cluster. Records handed out carry the un-prefixed name.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use prometheus::{IntCounterVec, Registry};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use shopverse_kit::config::Invalid;
use shopverse_kit::metrics::int_counter_vec;

use crate::bus::{BusError, EventBus, OutRecord, Record, Subscription};

/// `[events.kafka]`: where the cluster is and how topics are made.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated (`host:port,host:port`).
    pub brokers: String,
    /// Prefix for every topic and consumer group (`<namespace>.shopverse.orders`); empty: none.
    pub namespace: String,
    /// Replication factor of the topics this creates.
    pub replication: i32,
    /// Consumer session timeout; a member silent this long loses its partitions.
    pub session_timeout_ms: u32,
    /// How long a record may wait for the broker before its publish fails (and is retried from
    /// the outbox).
    pub message_timeout_ms: u32,
    /// How long admin and metadata calls wait.
    pub request_timeout_ms: u32,
    /// Further librdkafka properties for every client (e.g. `security.protocol`,
    /// `sasl.mechanisms`); they cannot override the delivery guarantees set here.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            namespace: String::new(),
            replication: 1,
            session_timeout_ms: 10_000,
            message_timeout_ms: 30_000,
            request_timeout_ms: 10_000,
            properties: BTreeMap::new(),
        }
    }
}

/// Properties that carry the delivery guarantees; configuration may not set them.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.idempotence",
    "acks",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
];

impl KafkaConfig {
    /// Checks the section; `prefix` is its path for messages (`events.kafka`).
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let bad = |k: &str, why: String| Err(Invalid::new(format!("{prefix}.{k}"), why));
        if self.brokers.split(',').all(|b| b.trim().is_empty()) {
            return bad("brokers", "must name at least one host:port".into());
        }
        for b in self.brokers.split(',') {
            let b = b.trim();
            if b.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return bad("brokers", format!("`{b}` is not host:port"));
            }
        }
        if !self
            .namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return bad(
                "namespace",
                "may hold only letters, digits, `.`, `_` and `-` (it prefixes topic names)".into(),
            );
        }
        if !(1..=16).contains(&self.replication) {
            return bad("replication", "must be between 1 and 16".into());
        }
        // Some brokers (tansu among them) refuse shorter sessions.
        if !(6_000..=300_000).contains(&self.session_timeout_ms) {
            return bad(
                "session_timeout_ms",
                "must be between 6000 and 300000".into(),
            );
        }
        if !(1_000..=900_000).contains(&self.message_timeout_ms) {
            return bad(
                "message_timeout_ms",
                "must be between 1000 and 900000".into(),
            );
        }
        if !(500..=120_000).contains(&self.request_timeout_ms) {
            return bad(
                "request_timeout_ms",
                "must be between 500 and 120000".into(),
            );
        }
        if let Some(k) = self
            .properties
            .keys()
            .find(|k| RESERVED.contains(&k.as_str()))
        {
            return bad(
                "properties",
                format!("`{k}` is set by ShopVerse (it carries the delivery guarantees)"),
            );
        }
        Ok(())
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "shopverse")
            .set("socket.keepalive.enable", "true")
            .set("log_level", "4");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("kafka client configuration: {0}")]
    Client(#[from] KafkaError),
    #[error("{0}")]
    Config(String),
}

/// Logs librdkafka's own messages through `tracing`.
#[derive(Clone, Default)]
struct Logging;

impl ClientContext for Logging {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{msg}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{msg}"),
            L::Notice | L::Info => tracing::info!(target: "librdkafka", facility = fac, "{msg}"),
            L::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{msg}"),
        }
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl ConsumerContext for Logging {}

/// A consumer's context: logs rebalances and keeps the current assignment.
#[derive(Clone, Default)]
struct Member {
    group: String,
    assigned: Arc<Mutex<HashSet<(String, i32)>>>,
    /// Records waiting after this member's positions, from librdkafka's statistics (which it
    /// computes from the fetcher's high watermarks, with no extra requests); -1: not known yet.
    lag: Arc<std::sync::atomic::AtomicI64>,
}

impl ClientContext for Member {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, msg: &str) {
        Logging.log(level, fac, msg)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        Logging.error(error, reason)
    }
    fn stats(&self, statistics: rdkafka::Statistics) {
        let assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        let mut lag = 0;
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                if assigned.contains(&(topic.clone(), *p)) && part.consumer_lag > 0 {
                    lag += part.consumer_lag;
                }
            }
        }
        self.lag.store(lag, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ConsumerContext for Member {
    fn pre_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut a = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
            for e in tpl.elements() {
                a.remove(&(e.topic().to_owned(), e.partition()));
            }
            tracing::info!(group = %self.group, revoked = tpl.count(), "kafka rebalance: partitions revoked");
        }
    }
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut a = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for e in tpl.elements() {
                    a.insert((e.topic().to_owned(), e.partition()));
                }
                tracing::info!(group = %self.group, assigned = a.len(), "kafka rebalance: partitions assigned");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "kafka rebalance failed")
            }
        }
    }
}

#[derive(Clone)]
struct BusMetrics {
    produced: IntCounterVec,
    produce_failures: IntCounterVec,
}

impl BusMetrics {
    fn new(registry: &Registry) -> BusMetrics {
        BusMetrics {
            produced: int_counter_vec(
                registry,
                "events_produced_total",
                "Records acknowledged by Kafka",
                &[],
                &["topic"],
            ),
            produce_failures: int_counter_vec(
                registry,
                "events_produce_failures_total",
                "Records Kafka did not acknowledge (published again from the outbox)",
                &[],
                &["topic"],
            ),
        }
    }
}

/// The Kafka event bus. Cheap to clone.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KafkaConfig,
    partitions: i32,
    producer: FutureProducer<Logging>,
    admin: AdminClient<Logging>,
    /// For metadata and watermark look-ups; never subscribes.
    meta: Arc<BaseConsumer<Logging>>,
    /// Topics known to exist (full names).
    known: Mutex<HashSet<String>>,
    metrics: BusMetrics,
}

fn unavailable(e: KafkaError) -> BusError {
    BusError::Unavailable(format!("kafka: {e}"))
}

impl KafkaBus {
    /// Connects lazily: creating the clients does not need the broker. `partitions` is the
    /// partition count of topics this creates.
    pub fn new(
        cfg: KafkaConfig,
        partitions: i32,
        registry: &Registry,
    ) -> Result<KafkaBus, KafkaSetupError> {
        cfg.validate("events.kafka")
            .map_err(|i| KafkaSetupError::Config(format!("{}: {}", i.key, i.reason)))?;
        let producer: FutureProducer<Logging> = cfg
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "2")
            .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
            .set("request.timeout.ms", cfg.request_timeout_ms.to_string())
            .create_with_context(Logging)?;
        let admin: AdminClient<Logging> = cfg.client().create_with_context(Logging)?;
        let meta: BaseConsumer<Logging> = cfg
            .client()
            .set("enable.auto.commit", "false")
            .create_with_context(Logging)?;
        Ok(KafkaBus {
            inner: Arc::new(Inner {
                partitions: partitions.max(1),
                producer,
                admin,
                meta: Arc::new(meta),
                known: Mutex::new(HashSet::new()),
                metrics: BusMetrics::new(registry),
                cfg,
            }),
        })
    }

    /// The full (namespaced) name of `topic` or group.
    fn full(&self, name: &str) -> String {
        if self.inner.cfg.namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.inner.cfg.namespace)
        }
    }

    /// The name without the namespace, or `None` for a name outside it.
    fn short<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.inner.cfg.namespace.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.inner.cfg.namespace.as_str())
                .and_then(|r| r.strip_prefix('.'))
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.inner.cfg.request_timeout_ms))
    }

    /// A throwaway consumer for calls outside any subscription.
    fn side_consumer(&self, group: Option<&str>) -> Result<BaseConsumer<Logging>, BusError> {
        let mut c = self.inner.cfg.client();
        c.set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        // librdkafka wants a group even for assign-only reading; a reader's is its own and
        // never commits.
        let g = match group {
            Some(g) => self.full(g),
            None => self.full(&format!(
                "shopverse-reader-{}",
                uuid::Uuid::new_v4().simple()
            )),
        };
        c.set("group.id", g);
        c.create_with_context(Logging).map_err(unavailable)
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
    ) -> Result<T, BusError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BusError::Other(format!("kafka call panicked: {e}")))?
    }

    /// Full topic names that exist, with their partition counts.
    async fn metadata(&self, topic: Option<String>) -> Result<Vec<(String, i32)>, BusError> {
        let meta = self.inner.meta.clone();
        let timeout = self.timeout();
        Self::blocking(move || {
            let md = match meta.fetch_metadata(topic.as_deref(), timeout) {
                Ok(md) => md,
                // Asked about one topic that does not exist.
                Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    return Ok(Vec::new());
                }
                Err(e) => return Err(unavailable(e)),
            };
            Ok(md
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .map(|t| {
                    (
                        t.name().to_owned(),
                        i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                    )
                })
                .collect())
        })
        .await
    }

    async fn create(&self, full_names: Vec<String>) -> Result<(), BusError> {
        let missing: Vec<String> = {
            let known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            full_names
                .into_iter()
                .filter(|t| !known.contains(t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.inner.partitions,
                    TopicReplication::Fixed(self.inner.cfg.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(self.timeout()));
        let results = tokio::time::timeout(
            self.timeout() + Duration::from_secs(1),
            self.inner.admin.create_topics(&new, &opts),
        )
        .await
        .map_err(|_| BusError::Unavailable("kafka: creating topics timed out".into()))?
        .map_err(unavailable)?;
        for r in results {
            match r {
                Ok(t) => {
                    tracing::info!(topic = %t, partitions = self.inner.partitions, "kafka topic created");
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "kafka: creating topic {t}: {code}"
                    )));
                }
            }
        }
        self.inner
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing);
        Ok(())
    }

    fn to_record(&self, m: &BorrowedMessage<'_>) -> Record {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic: self.short(m.topic()).unwrap_or(m.topic()).to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        }
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        self.create(topics.iter().map(|t| self.full(t)).collect())
            .await
    }

    async fn publish(&self, records: &[OutRecord]) -> Result<(), BusError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut topics: Vec<String> = records.iter().map(|r| self.full(&r.topic)).collect();
        topics.sort();
        topics.dedup();
        self.create(topics).await?;
        // Enqueue every record in order (so one key's records stay in order), then wait for
        // all acknowledgements.
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            let topic = self.full(&r.topic);
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&topic)
                .key(r.key.as_bytes())
                .payload(r.payload.as_slice())
                .headers(headers);
            let delivery = loop {
                match self.inner.producer.send_result(record) {
                    Ok(d) => break d,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        self.inner
                            .metrics
                            .produce_failures
                            .with_label_values(&[&r.topic])
                            .inc();
                        return Err(unavailable(e));
                    }
                }
            };
            pending.push((r.topic.as_str(), delivery));
        }
        let mut first_error = None;
        for (topic, d) in pending {
            match d.await {
                Ok(Ok(_)) => self
                    .inner
                    .metrics
                    .produced
                    .with_label_values(&[topic])
                    .inc(),
                Ok(Err((e, _))) => {
                    self.inner
                        .metrics
                        .produce_failures
                        .with_label_values(&[topic])
                        .inc();
                    first_error.get_or_insert(unavailable(e));
                }
                Err(_) => {
                    first_error.get_or_insert(BusError::Unavailable(
                        "kafka: the producer went away".into(),
                    ));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError> {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.ensure_topics(&refs).await?;
        let cfg = &self.inner.cfg;
        let member = Member {
            group: self.full(group),
            assigned: Arc::default(),
            lag: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
        };
        let consumer: StreamConsumer<Member> = cfg
            .client()
            .set("group.id", self.full(group))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", "5000")
            .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (cfg.session_timeout_ms / 3).max(1000).to_string(),
            )
            .create_with_context(member.clone())
            .map_err(unavailable)?;
        let full: Vec<String> = topics.iter().map(|t| self.full(t)).collect();
        let full_refs: Vec<&str> = full.iter().map(String::as_str).collect();
        consumer.subscribe(&full_refs).map_err(unavailable)?;
        Ok(Box::new(KafkaSubscription {
            bus: self.clone(),
            consumer: Arc::new(consumer),
            member,
        }))
    }

    async fn topics(&self) -> Result<Vec<String>, BusError> {
        let mut out: Vec<String> = self
            .metadata(None)
            .await?
            .into_iter()
            .filter_map(|(t, _)| self.short(&t).map(str::to_owned))
            .filter(|t| !t.starts_with("__"))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        let full = self.full(topic);
        Ok(self
            .metadata(Some(full.clone()))
            .await?
            .into_iter()
            .find(|(t, _)| *t == full)
            .map(|(_, n)| n)
            .unwrap_or(0))
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        from_offset: i64,
        max: usize,
    ) -> Result<Vec<Record>, BusError> {
        let end = self.end_offset(topic, partition).await?;
        if from_offset >= end || max == 0 {
            return Ok(Vec::new());
        }
        let consumer = self.side_consumer(None)?;
        let full = self.full(topic);
        let this = self.clone();
        let timeout = self.timeout();
        Self::blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&full, partition, Offset::Offset(from_offset))
                .map_err(unavailable)?;
            consumer.assign(&tpl).map_err(unavailable)?;
            let deadline = std::time::Instant::now() + timeout;
            let mut out = Vec::new();
            while out.len() < max && std::time::Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) => {
                        let done = m.offset() + 1 >= end;
                        out.push(this.to_record(&m));
                        if done {
                            break;
                        }
                    }
                    Some(Err(e)) => return Err(unavailable(e)),
                    None => {}
                }
            }
            Ok(out)
        })
        .await
    }

    async fn committed(&self, group: &str, topic: &str, partition: i32) -> Result<i64, BusError> {
        let consumer = self.side_consumer(Some(group))?;
        let full = self.full(topic);
        let timeout = self.timeout();
        Self::blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&full, partition);
            let got = consumer
                .committed_offsets(tpl, timeout)
                .map_err(unavailable)?;
            Ok(got
                .elements()
                .first()
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0))
        })
        .await
    }

    async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), BusError> {
        let consumer = self.side_consumer(Some(group))?;
        let full = self.full(topic);
        Self::blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&full, partition, Offset::Offset(next_offset))
                .map_err(unavailable)?;
            consumer.commit(&tpl, CommitMode::Sync).map_err(unavailable)
        })
        .await
    }

    async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, BusError> {
        let meta = self.inner.meta.clone();
        let full = self.full(topic);
        let timeout = self.timeout();
        Self::blocking(
            move || match meta.fetch_watermarks(&full, partition, timeout) {
                Ok((_, high)) => Ok(high.max(0)),
                Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => Ok(0),
                Err(e) => Err(unavailable(e)),
            },
        )
        .await
    }

    async fn check(&self) -> Result<(), BusError> {
        let meta = self.inner.meta.clone();
        let timeout = self.timeout().min(Duration::from_secs(3));
        Self::blocking(move || {
            let md = meta.fetch_metadata(None, timeout).map_err(unavailable)?;
            if md.brokers().is_empty() {
                return Err(BusError::Unavailable("kafka: no broker answered".into()));
            }
            Ok(())
        })
        .await
    }

    fn describe(&self) -> String {
        let ns = &self.inner.cfg.namespace;
        if ns.is_empty() {
            self.inner.cfg.brokers.clone()
        } else {
            format!("{} (namespace {ns})", self.inner.cfg.brokers)
        }
    }

    async fn flush(&self) {
        let producer = self.inner.producer.clone();
        let _ = Self::blocking(move || producer.flush(Duration::from_secs(5)).map_err(unavailable))
            .await;
    }
}

struct KafkaSubscription {
    bus: KafkaBus,
    consumer: Arc<StreamConsumer<Member>>,
    member: Member,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError> {
        let first = match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(Err(e)) => return Err(unavailable(e)),
            Ok(Ok(m)) => self.bus.to_record(&m),
        };
        let mut out = vec![first];
        while out.len() < max.max(1) {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => out.push(self.bus.to_record(&m)),
                Some(Err(e)) => {
                    tracing::warn!(group = %self.member.group, error = %e, "kafka consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, record: &Record) -> Result<(), BusError> {
        let full = self.bus.full(&record.topic);
        match self
            .consumer
            .store_offset(&full, record.partition, record.offset)
        {
            Ok(()) => Ok(()),
            // The partition moved to another member meanwhile: it reads from the last committed
            // offset and its inbox skips what this member applied.
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State))
            | Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition)) => {
                tracing::debug!(group = %self.member.group, topic = %record.topic, partition = record.partition,
                    "offset not stored: partition no longer assigned here");
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn lag(&mut self) -> Option<i64> {
        let lag = self.member.lag.load(std::sync::atomic::Ordering::Relaxed);
        (lag >= 0).then_some(lag)
    }
}
