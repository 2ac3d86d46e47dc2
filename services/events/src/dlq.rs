//! Dead letters: listing parked events and replaying them onto their original topic.
//!
//! Replay progress is kept as the committed offset of the group [`REPLAYER_GROUP`] on each
//! `.dlq` topic, so `replay` sends each parked event once, and `list` shows which were replayed.
//! A replayed event keeps its id: consumers that already applied it skip it (inbox), the one that
//! parked it gets another go.

use crate::bus::{BusError, EventBus, OutRecord, Record};
use crate::envelope::{decode_envelope, dlq_topic};

pub const REPLAYER_GROUP: &str = "shopverse-dlq-replayer";

/// One parked event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub dlq_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub original_topic: String,
    pub event_id: String,
    pub event_type: String,
    pub consumer: String,
    pub reason: String,
    pub attempts: u32,
    pub failed_at_ms: i64,
    pub replayed: bool,
}

fn to_dead_letter(r: &Record, replayed: bool) -> DeadLetter {
    let env = decode_envelope(&r.payload).ok();
    DeadLetter {
        dlq_topic: r.topic.clone(),
        partition: r.partition,
        offset: r.offset,
        original_topic: r
            .header("dlq-original-topic")
            .map(str::to_owned)
            .unwrap_or_else(|| r.topic.trim_end_matches(".dlq").to_owned()),
        event_id: env
            .as_ref()
            .map(|e| e.id.clone())
            .or_else(|| r.header("event-id").map(str::to_owned))
            .unwrap_or_default(),
        event_type: env
            .as_ref()
            .map(|e| e.r#type.clone())
            .unwrap_or_else(|| "(undecodable)".into()),
        consumer: r.header("dlq-consumer").unwrap_or_default().to_owned(),
        reason: r.header("dlq-reason").unwrap_or_default().to_owned(),
        attempts: r
            .header("dlq-attempts")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        failed_at_ms: r
            .header("dlq-failed-at")
            .and_then(|a| a.parse().ok())
            .unwrap_or(r.timestamp_ms),
        replayed,
    }
}

async fn dlq_topics(bus: &dyn EventBus, only: Option<&str>) -> Result<Vec<String>, BusError> {
    let all = bus.topics().await?;
    Ok(all
        .into_iter()
        .filter(|t| t.ends_with(".dlq"))
        .filter(|t| only.is_none_or(|o| t == o || t.trim_end_matches(".dlq") == o))
        .collect())
}

async fn read_all(
    bus: &dyn EventBus,
    topic: &str,
    partition: i32,
) -> Result<Vec<Record>, BusError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let batch = bus.fetch(topic, partition, from, 500).await?;
        let Some(last) = batch.last() else {
            return Ok(out);
        };
        from = last.offset + 1;
        out.extend(batch);
    }
}

/// Every parked event, oldest first per partition; `topic` limits it to one topic (either the
/// original or its `.dlq`).
pub async fn list(bus: &dyn EventBus, topic: Option<&str>) -> Result<Vec<DeadLetter>, BusError> {
    let mut out = Vec::new();
    for t in dlq_topics(bus, topic).await? {
        for p in 0..bus.partitions(&t).await? {
            let done = bus.committed(REPLAYER_GROUP, &t, p).await?;
            for r in read_all(bus, &t, p).await? {
                out.push(to_dead_letter(&r, r.offset < done));
            }
        }
    }
    Ok(out)
}

/// How many events parked from `topic` (the original topic) are not yet replayed.
pub async fn waiting(bus: &dyn EventBus, topic: &str) -> Result<i64, BusError> {
    let dlq = dlq_topic(topic);
    let mut n = 0;
    for p in 0..bus.partitions(&dlq).await? {
        let end = bus.end_offset(&dlq, p).await?;
        if end > 0 {
            n += end - bus.committed(REPLAYER_GROUP, &dlq, p).await?;
        }
    }
    Ok(n)
}

/// Replays parked events to their original topics: every one not yet replayed, or with
/// `event_id` just that one (again, if it was). Returns what was replayed.
pub async fn replay(
    bus: &dyn EventBus,
    topic: Option<&str>,
    event_id: Option<&str>,
) -> Result<Vec<DeadLetter>, BusError> {
    let mut replayed = Vec::new();
    for t in dlq_topics(bus, topic).await? {
        for p in 0..bus.partitions(&t).await? {
            let done = bus.committed(REPLAYER_GROUP, &t, p).await?;
            let records = read_all(bus, &t, p).await?;
            let chosen: Vec<&Record> = records
                .iter()
                .filter(|r| match event_id {
                    Some(id) => to_dead_letter(r, false).event_id == id,
                    None => r.offset >= done,
                })
                .collect();
            for r in chosen {
                let dl = to_dead_letter(r, true);
                let out = OutRecord {
                    topic: dl.original_topic.clone(),
                    key: r.key.clone(),
                    headers: r
                        .headers
                        .iter()
                        .filter(|(k, _)| !k.starts_with("dlq-"))
                        .cloned()
                        .chain([("replayed-from".to_owned(), format!("{t}/{p}/{}", r.offset))])
                        .collect(),
                    payload: r.payload.clone(),
                };
                bus.publish(std::slice::from_ref(&out)).await?;
                if event_id.is_none() {
                    bus.commit_offset(REPLAYER_GROUP, &t, p, r.offset + 1)
                        .await?;
                }
                replayed.push(dl);
            }
        }
    }
    Ok(replayed)
}
