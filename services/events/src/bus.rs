//! The event-bus trait, shaped like Kafka so the Kafka backend fits behind it unchanged.

use std::time::Duration;

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event log storage: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("consumer group {0} already has an active member in this process")]
    GroupBusy(String),
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

/// A record to publish. The key chooses the partition, so records with one key stay in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRecord {
    pub topic: String,
    pub key: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub timestamp_ms: i64,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Creates the topics if missing.
    async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError>;

    /// Appends records; all of them are durable when this returns `Ok`.
    async fn publish(&self, records: &[OutRecord]) -> Result<(), BusError>;

    /// Joins consumer group `group` on `topics`. Reading starts at the group's committed offsets
    /// (the beginning for a new group).
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// The topics that exist.
    async fn topics(&self) -> Result<Vec<String>, BusError>;

    /// The number of partitions of `topic` (0 when it does not exist).
    async fn partitions(&self, topic: &str) -> Result<i32, BusError>;

    /// Reads up to `max` records of one partition from `from_offset`, outside any group.
    async fn fetch(
        &self,
        topic: &str,
        partition: i32,
        from_offset: i64,
        max: usize,
    ) -> Result<Vec<Record>, BusError>;

    /// The next offset `group` will read in a partition (0 when it has committed nothing).
    async fn committed(&self, group: &str, topic: &str, partition: i32) -> Result<i64, BusError>;

    /// Sets the next offset `group` will read in a partition.
    async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), BusError>;

    /// The offset the next record appended to a partition will get (0 for an empty or missing
    /// partition): with [`EventBus::committed`], how far a group is behind.
    async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, BusError>;

    /// The append time (ms) of the oldest record `group` could still be handed from
    /// `topics`: at or after its committed offsets. An event appended before it will not come
    /// again from the log, so the group's inbox may forget it. `i64::MAX` when nothing is
    /// waiting; `None` when the bus cannot tell (Kafka: the inbox then keeps entries for the
    /// configured retention).
    async fn redelivery_horizon(
        &self,
        _group: &str,
        _topics: &[String],
    ) -> Result<Option<i64>, BusError> {
        Ok(None)
    }

    /// Drops `group`'s committed offsets: a group that will not come back (a process's own
    /// throwaway group) then holds nothing back. Kafka forgets an empty group's offsets by
    /// itself, so there it does nothing.
    async fn forget_group(&self, _group: &str) -> Result<(), BusError> {
        Ok(())
    }

    /// Whether the bus answers now (readiness).
    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Where this bus is, for start-up output and messages (`sqlite://…/events.db`,
    /// `host:port,host:port`).
    fn describe(&self) -> String {
        "event bus".into()
    }

    /// Waits (briefly) for records still on their way to the bus; called at shutdown.
    async fn flush(&self) {}
}

/// One member of a consumer group.
#[async_trait]
pub trait Subscription: Send {
    /// The next records, waiting up to `wait` for some to arrive; may return none.
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, BusError>;

    /// Marks `record` and everything before it in its partition as done for this group.
    async fn commit(&mut self, record: &Record) -> Result<(), BusError>;

    /// [`Subscription::commit`] for each of `last` (at most one record per partition: the
    /// last one done there), in one write where the bus can.
    async fn commit_all(&mut self, last: &[Record]) -> Result<(), BusError> {
        for r in last {
            self.commit(r).await?;
        }
        Ok(())
    }

    /// Records waiting in this member's partitions after what it has read, when known.
    async fn lag(&mut self) -> Option<i64> {
        None
    }
}

/// The partition for `key`: FNV-1a, stable across processes and versions.
pub fn partition_for(key: &str, partitions: i32) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let n = u32::try_from(partitions.max(1)).unwrap_or(1);
    i32::try_from(h % n).unwrap_or(0)
}
