//! The service runtime: what every ShopVerse service is to the process that runs it.
//!
//! A service implements [`Service`]: its names, its migrations, its configuration section, and
//! [`Service::build`], which turns a [`Context`] (its database, its outbox relay, the event bus,
//! the clock, its peers) into gRPC routes, registering its event consumers and background tasks
//! on the way. [`serve`] does the rest the same way for every service: open and migrate the
//! database, build, run the relay, the consumers and the gRPC server (health and reflection
//! included) until shutdown, then close the database.
//!
//! A process runs one service (`shopverse serve orders`) or all of them with the gateway (the
//! appliance, `shopverse::Appliance` in the root crate); both go through [`serve`].

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::service::Routes;

use shopverse_events::EventBus;
use shopverse_events::consumer::{Consumer, ConsumerConfig, Handler};
use shopverse_events::outbox::Relay;
use shopverse_events::retention::Retention;
use shopverse_kit::{CancellationToken, Clock};
use shopverse_rpc::{Link, LocalServices};
use shopverse_storage::{Db, DbError, MigrationSpec};

/// What a service takes from the process it runs in: the event bus, the metrics registry, the
/// clock, how long shutdown may wait for in-flight calls, which gRPC addresses the process
/// serves itself (calls to those stay in-process), the services it runs (by name), and how its
/// consumers run.
#[derive(Clone)]
pub struct Platform {
    pub bus: Arc<dyn EventBus>,
    pub registry: prometheus::Registry,
    pub clock: Arc<dyn Clock>,
    pub grace: Duration,
    pub local: LocalServices,
    /// Every gRPC server's and client's call metrics, in `registry`.
    pub grpc: shopverse_rpc::GrpcMetrics,
    /// The addresses of the services this process runs, by [`Service::NAME`]. A service that
    /// calls a peer listed here reaches it in-process, whatever its configuration says.
    pub peers: Arc<HashMap<&'static str, SocketAddr>>,
    /// How consumers schedule and retry (`[events.consumers]`).
    pub consumers: ConsumerConfig,
    /// What the event log keeps (`[events] retention_*`): inbox entries and published outbox
    /// rows are kept as long.
    pub retention: Retention,
}

/// The configuration section of a service (`[services.<name>]`).
pub trait ServiceConfig: Clone + Send + Sync + 'static {
    /// Where its gRPC server listens by default.
    fn listen(&self) -> SocketAddr;
    /// Its database: the configured URL, or a SQLite file named after it in `data_dir`.
    fn database_url(&self, data_dir: &Path) -> String;
}

/// A ShopVerse service.
pub trait Service: 'static {
    /// Its short name: `orders`. Names its database file, its relay and its metrics.
    const NAME: &'static str;
    /// Its fully qualified gRPC service name, reported by health and reflection.
    const GRPC_NAME: &'static str;
    /// Its own migrations; the outbox and inbox's are applied with them.
    const MIGRATIONS: &'static [MigrationSpec];
    /// Its configuration section.
    type Config: ServiceConfig;

    /// Builds its gRPC routes from `cx`, registering consumers and background tasks there.
    fn build(
        cx: &mut Context<Self::Config>,
    ) -> impl Future<Output = Result<Routes, RunError>> + Send;
}

/// Why a service could not start or stopped with an error: which service, what failed, why.
#[derive(Debug, thiserror::Error)]
#[error("{service} {what}: {source}")]
pub struct RunError {
    pub service: &'static str,
    pub what: &'static str,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl RunError {
    /// A failure of `what` (`"signing keys"`, `"database"`) while building a service; [`serve`]
    /// fills in which.
    pub fn new(what: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        RunError {
            service: "",
            what,
            source: Box::new(source),
        }
    }

    fn of(mut self, service: &'static str) -> Self {
        self.service = service;
        self
    }
}

impl From<DbError> for RunError {
    fn from(e: DbError) -> Self {
        RunError::new("database", e)
    }
}

impl From<shopverse_rpc::server::ServeError> for RunError {
    fn from(e: shopverse_rpc::server::ServeError) -> Self {
        RunError::new("gRPC server", e)
    }
}

/// What [`Service::build`] works with.
pub struct Context<C> {
    pub config: C,
    pub data_dir: PathBuf,
    pub db: Db,
    pub platform: Platform,
    shutdown: CancellationToken,
    relay: Relay,
    background: Vec<BoxFuture<'static, ()>>,
    /// Other databases the service opened, closed after its own once everything has stopped.
    other_dbs: Vec<Db>,
}

impl<C> Context<C> {
    /// Wakes the outbox relay: call it after committing a transaction that wrote events.
    pub fn relay_waker(&self) -> Arc<Notify> {
        self.relay.waker()
    }

    /// The token that stops the service.
    pub fn shutdown(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs `handler` over its consumer group until shutdown; each applied event wakes the
    /// relay. A bus failure is logged.
    pub fn consume<H: Handler>(&mut self, handler: H) {
        let c = Consumer::new(
            Arc::new(handler),
            self.db.clone(),
            self.platform.bus.clone(),
            &self.platform.registry,
        )
        .waking(self.relay.waker())
        .configured(&self.platform.consumers)
        .keeping_inbox(self.platform.retention.max_age);
        let shutdown = self.shutdown.clone();
        self.background.push(Box::pin(async move {
            if let Err(e) = c.run(shutdown).await {
                tracing::error!(error = %e, "consumer stopped");
            }
        }));
    }

    /// Closes `db` (a store of the service's besides its own database) once the service has
    /// stopped, so its file is left whole (no WAL).
    pub fn close_on_stop(&mut self, db: Db) {
        self.other_dbs.push(db);
    }

    /// Runs `task` beside the server; it must end when [`Context::shutdown`] fires.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.background.push(Box::pin(task));
    }

    /// A link to the peer service `name` (gRPC service `grpc_name`): in-process when this
    /// process runs it, else the configured `urls` (one, or several balanced over the healthy).
    /// Its calls are counted in the `grpc_client_*` metrics.
    pub fn peer(
        &self,
        name: &str,
        grpc_name: &'static str,
        urls: &str,
        timeout: Duration,
    ) -> Result<Link, RunError> {
        let local = self.platform.peers.get(name).map(|a| format!("http://{a}"));
        shopverse_rpc::pool::balanced(
            local.as_deref().unwrap_or(urls),
            grpc_name,
            timeout,
            &self.platform.local,
            self.shutdown.clone(),
        )
        .map(|link| link.metered(&self.platform.grpc))
        .map_err(|e| RunError::new("upstream", e))
    }
}

/// How long published outbox rows are kept at the most (less when the log keeps less).
const OUTBOX_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Connects a service's database and applies its migrations with the outbox and inbox's.
pub async fn open_db<S: Service>(config: &S::Config, data_dir: &Path) -> Result<Db, RunError> {
    open_db_at(&config.database_url(data_dir), S::MIGRATIONS)
        .await
        .map(|db| db.for_service(S::NAME))
        .map_err(|e| RunError::from(e).of(S::NAME))
}

/// [`open_db`] for a URL.
pub async fn open_db_at(url: &str, own: &[MigrationSpec]) -> Result<Db, DbError> {
    let db = Db::connect(url, 8).await?;
    db.migrate(&[own, shopverse_events::MIGRATIONS]).await?;
    Ok(db)
}

/// Runs service `S` on `listener` until `shutdown`: its relay, consumers and background tasks
/// and its gRPC server; then closes its database.
pub async fn serve<S: Service>(
    listener: TcpListener,
    config: S::Config,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db::<S>(&config, data_dir).await?;
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        S::NAME,
        &platform.registry,
    )
    .keeping(platform.retention.max_age.min(OUTBOX_KEEP));
    let mut cx = Context {
        config,
        data_dir: data_dir.to_owned(),
        db: db.clone(),
        platform,
        shutdown: shutdown.clone(),
        relay,
        background: Vec::new(),
        other_dbs: Vec::new(),
    };
    let routes = match S::build(&mut cx).await {
        Ok(routes) => routes,
        Err(e) => {
            for other in &cx.other_dbs {
                other.close().await;
            }
            db.close().await;
            return Err(e.of(S::NAME));
        }
    };
    let Context {
        platform,
        relay,
        background,
        other_dbs,
        ..
    } = cx;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(relay.run(shutdown.clone()));
    for task in background {
        tasks.spawn(task);
    }
    let served = shopverse_rpc::server::serve_grpc(
        listener,
        routes,
        &[S::GRPC_NAME],
        &platform.local,
        &platform.grpc,
        shutdown.clone(),
        platform.grace,
    )
    .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    for other in &other_dbs {
        other.close().await;
    }
    db.close().await;
    served.map_err(|e| RunError::from(e).of(S::NAME))
}

/// Helpers for tests that run a service (the `testing` feature).
#[cfg(feature = "testing")]
pub mod testing {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use shopverse_events::embedded::{EmbeddedLog, OpenError};

    use crate::Platform;

    /// A platform whose bus is an embedded log at `dir/events.db`, with the given clock.
    pub async fn platform(
        dir: &Path,
        clock: Arc<dyn shopverse_kit::Clock>,
    ) -> Result<(Platform, EmbeddedLog), OpenError> {
        let log = EmbeddedLog::open(&format!("sqlite://{}/events.db", dir.display()), 2).await?;
        let registry = prometheus::Registry::new();
        let grpc = shopverse_rpc::GrpcMetrics::new(&registry).expect("a new registry");
        Ok((
            Platform {
                bus: Arc::new(log.clone()),
                registry,
                grpc,
                clock,
                grace: Duration::from_secs(2),
                local: shopverse_rpc::LocalServices::default(),
                peers: Default::default(),
                consumers: Default::default(),
                retention: Default::default(),
            },
            log,
        ))
    }
}
