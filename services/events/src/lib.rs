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

#![forbid(unsafe_code)]

pub mod bus;
pub mod consumer;
pub mod dlq;
pub mod embedded;
pub mod envelope;
pub mod kafka;
pub mod outbox;
mod schedule;

pub use bus::{BusError, EventBus, OutRecord, Record, Subscription};

use std::sync::Arc;
use std::time::Duration;

/// What a service takes from the process it runs in: the event bus, the metrics registry, the
/// clock, how long shutdown may wait for in-flight calls, which gRPC addresses the process
/// serves itself (calls to those stay in-process), and how its consumers run.
#[derive(Clone)]
pub struct Platform {
    pub bus: Arc<dyn EventBus>,
    pub registry: prometheus::Registry,
    pub clock: Arc<dyn shopverse_kit::Clock>,
    pub grace: Duration,
    pub local: shopverse_kit::LocalServices,
    /// How consumers schedule and retry (`[events.consumers]`).
    pub consumers: consumer::ConsumerConfig,
}
pub use envelope::{Envelope, EventType};

/// Migrations every service that publishes or consumes runs in its own database (outbox, inbox).
pub const MIGRATIONS: &[shopverse_kit::db::MigrationSpec] = &[
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

/// Connects a service's database and applies its own migrations with the outbox and inbox's.
pub async fn open_service_db(
    url: &str,
    own: &[shopverse_kit::db::MigrationSpec],
) -> Result<shopverse_kit::Db, shopverse_kit::db::DbError> {
    let db = shopverse_kit::Db::connect(url, 8).await?;
    db.migrate(&[own, MIGRATIONS]).await?;
    Ok(db)
}

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

/// What [`run_service`] runs: a service's gRPC routes, its database, its outbox relay and its
/// background tasks (consumers, sweepers).
pub struct ServiceParts {
    pub routes: tonic::service::Routes,
    /// Fully qualified gRPC service names, reported by health and reflection.
    pub names: &'static [&'static str],
    pub db: shopverse_kit::Db,
    pub relay: outbox::Relay,
    pub background: Vec<futures::future::BoxFuture<'static, ()>>,
}

/// Runs a service to its end: relay, background tasks and gRPC server, all stopped by
/// `shutdown`; then closes the database.
pub async fn run_service(
    listener: tokio::net::TcpListener,
    parts: ServiceParts,
    platform: &Platform,
    shutdown: shopverse_kit::CancellationToken,
) -> Result<(), shopverse_kit::server::ServeError> {
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(parts.relay.run(shutdown.clone()));
    for task in parts.background {
        tasks.spawn(task);
    }
    let served = shopverse_kit::server::serve_grpc(
        listener,
        parts.routes,
        parts.names,
        &platform.local,
        shutdown.clone(),
        platform.grace,
    )
    .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    parts.db.close().await;
    served
}

/// A consumer as a background task for [`run_service`]; a bus failure is logged. `relay` is
/// woken after each applied event.
pub fn consumer_task<H: consumer::Handler>(
    handler: Arc<H>,
    db: shopverse_kit::Db,
    relay: &outbox::Relay,
    platform: &Platform,
    shutdown: shopverse_kit::CancellationToken,
) -> futures::future::BoxFuture<'static, ()> {
    let c = consumer::Consumer::new(handler, db, platform.bus.clone(), &platform.registry)
        .waking(relay.waker())
        .configured(&platform.consumers);
    Box::pin(async move {
        if let Err(e) = c.run(shutdown).await {
            tracing::error!(error = %e, "consumer stopped");
        }
    })
}

/// Helpers for tests that run a service: a [`Platform`] on an embedded log in a folder.
pub mod testing {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::Platform;
    use crate::embedded::{EmbeddedLog, OpenError};

    /// A platform whose bus is an embedded log at `dir/events.db`, with the given clock.
    pub async fn platform(
        dir: &Path,
        clock: Arc<dyn shopverse_kit::Clock>,
    ) -> Result<(Platform, EmbeddedLog), OpenError> {
        let log = EmbeddedLog::open(&format!("sqlite://{}/events.db", dir.display()), 2).await?;
        Ok((
            Platform {
                bus: Arc::new(log.clone()),
                registry: prometheus::Registry::new(),
                clock,
                grace: Duration::from_secs(2),
                local: shopverse_kit::LocalServices::default(),
                consumers: Default::default(),
            },
            log,
        ))
    }
}
