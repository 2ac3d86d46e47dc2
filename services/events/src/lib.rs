//! The event backbone.
//!
//! # Layout
//! - [`envelope`]: the envelope every event travels in, the topics, and the catalogue of event
//!   types (name, topic, payload message, schema version).
//! - [`bus`]: the [`EventBus`] trait, shaped like Kafka: topics split into partitions, records
//!   keyed by aggregate id so one aggregate's events stay in order, consumer groups that commit
//!   offsets. [`embedded::EmbeddedLog`] is the first backend: a durable log in one SQLite file
//!   (`events.db`), for the appliance; [`kafka::KafkaBus`] is the second, for the distributed
//!   deployment.
//! - [`outbox`]: a service writes its state change and its events in one transaction
//!   ([`outbox::enqueue`]); the [`outbox::Relay`] publishes pending rows and then marks them sent.
//!   A crash between the two republishes: delivery is at least once.
//! - [`consumer`]: runs a [`consumer::Handler`] over a consumer group. Each event is handled in a
//!   transaction of the consumer's own database that also records the event id in its inbox, so
//!   redelivery changes nothing: effects are exactly once. Failures retry with backoff, then the
//!   event is parked on `<topic>.dlq`.
//! - [`dlq`]: listing and replaying parked events (`shopverse events dlq list|replay`).
//! - [`retention`]: what the embedded log keeps (by age and size, never what a group has yet to
//!   read, except past a hard cap); the consumer prunes its inbox once the log can no longer
//!   redeliver what it forgets, and the relay its published outbox rows.

#![forbid(unsafe_code)]

pub mod bus;
pub mod consumer;
pub mod dlq;
pub mod embedded;
pub mod envelope;
pub mod kafka;
pub mod outbox;
pub mod retention;
mod schedule;

pub use bus::{BusError, EventBus, OutRecord, Record, Subscription};

pub use consumer::order_of;
pub use envelope::{Envelope, EventType};

/// Migrations every service that publishes or consumes runs in its own database (outbox, inbox).
pub const MIGRATIONS: &[shopverse_storage::MigrationSpec] = &[
    (
        1000,
        "event outbox and inbox",
        include_str!("../migrations/1000_outbox_inbox.sql"),
    ),
    (
        1001,
        "outbox publish order",
        include_str!("../migrations/1001_outbox_order.sql"),
    ),
];

/// Creates every topic of the system and its dead-letter topic, where missing.
pub async fn provision_topics(bus: &dyn EventBus) -> Result<(), BusError> {
    let dlqs: Vec<String> = envelope::ALL_TOPICS
        .iter()
        .map(|t| envelope::dlq_topic(t))
        .collect();
    let mut all: Vec<&str> = envelope::ALL_TOPICS.to_vec();
    all.extend(dlqs.iter().map(String::as_str));
    bus.ensure_topics(&all).await
}
