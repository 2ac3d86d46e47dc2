//! The event chain of one order, for a box without a tracing backend: every event about the
//! order on the bus (the orders, payments and delivery topics are keyed by order id), when it
//! was raised and published, and when each consumer handled it (from the services' inboxes).
//! `shopverse events trace ORDER_ID` prints it.

use shopverse_events::EventBus;
use shopverse_events::envelope::{TOPIC_DELIVERY, TOPIC_ORDERS, TOPIC_PAYMENTS, decode_envelope};

use crate::config::AppConfig;
use crate::services;

/// One event about the order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hop {
    pub event_id: String,
    pub event_type: String,
    pub topic: String,
    /// When the service raised it (the envelope's time), in epoch ms.
    pub raised_ms: i64,
    /// When the bus took it.
    pub published_ms: i64,
    /// Who handled it, and when: `(consumer, epoch ms)`, earliest first.
    pub handled: Vec<(String, i64)>,
    pub traceparent: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("reading the event bus: {0}")]
    Bus(#[from] shopverse_events::BusError),
    #[error("reading the {service} inbox: {source}")]
    Inbox {
        service: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

/// Records of `topic` keyed `key`, from every partition, in offset order per partition.
async fn records_of(
    bus: &dyn EventBus,
    topic: &str,
    key: &str,
) -> Result<Vec<shopverse_events::Record>, shopverse_events::BusError> {
    let mut out = Vec::new();
    for p in 0..bus.partitions(topic).await? {
        let mut from = 0;
        loop {
            let got = bus.fetch(topic, p, from, 1000).await?;
            let Some(last) = got.last() else { break };
            from = last.offset + 1;
            out.extend(got.into_iter().filter(|r| r.key == key));
        }
    }
    Ok(out)
}

/// The order's events, earliest raised first, each with its consumers' handling times.
pub async fn of_order(
    cfg: &AppConfig,
    bus: &dyn EventBus,
    order_id: &str,
) -> Result<Vec<Hop>, ChainError> {
    let mut hops = Vec::new();
    for topic in [TOPIC_ORDERS, TOPIC_PAYMENTS, TOPIC_DELIVERY] {
        for r in records_of(bus, topic, order_id).await? {
            let Ok(env) = decode_envelope(&r.payload) else {
                continue;
            };
            let raised_ms = env.time.map_or(r.timestamp_ms, |t| {
                t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
            });
            hops.push(Hop {
                event_id: env.id,
                event_type: env.r#type,
                topic: topic.to_owned(),
                raised_ms,
                published_ms: r.timestamp_ms,
                handled: Vec::new(),
                traceparent: env.traceparent,
            });
        }
    }
    // A redelivered or replayed event is on the bus twice: one hop.
    hops.sort_by(|a, b| (a.raised_ms, &a.event_id).cmp(&(b.raised_ms, &b.event_id)));
    hops.dedup_by(|a, b| a.event_id == b.event_id);
    shopverse_storage::install_drivers();
    for unit in services::ALL {
        let url = unit.database_url(cfg);
        let Ok(db) = shopverse_storage::Db::connect(&url, 1).await else {
            continue;
        };
        for hop in &mut hops {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT consumer, handled_at FROM inbox WHERE event_id = $1 ORDER BY handled_at",
            )
            .bind(&hop.event_id)
            .fetch_all(db.pool())
            .await
            .map_err(|source| ChainError::Inbox {
                service: unit.name(),
                source,
            })?;
            hop.handled.extend(rows);
        }
        db.close().await;
    }
    for hop in &mut hops {
        hop.handled.sort_by_key(|(_, at)| *at);
    }
    Ok(hops)
}
