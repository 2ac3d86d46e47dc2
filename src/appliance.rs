//! The appliance: any set of services, the admin listener and (optionally) the gateway, started
//! in one process on the addresses asked for (port 0 included), with their addresses handed
//! back. `shopverse up` and `shopverse serve` are this plus a table on stdout; tests and the
//! benchmark start it in-process.
//!
//! ```ignore
//! let running = Appliance::new(cfg).any_ports("127.0.0.1".parse()?).start().await?;
//! let gateway = running.gateway().expect("a gateway");
//! // ...
//! running.stop().await?;
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;

use shopverse_events::EventBus;
use shopverse_events::embedded::EmbeddedLog;
use shopverse_events::envelope::ALL_TOPICS;
use shopverse_events::kafka::KafkaBus;
use shopverse_kit::{CancellationToken, Clock, SystemClock};
use shopverse_runtime::{Platform, RunError};

use crate::config::{AppConfig, EventsBackend};
use crate::services::{self, Unit};

/// Why the appliance did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("data dir {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another shopverse process is using the data dir {0}")]
    Locked(PathBuf),
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the event log {url}: {source}")]
    EventLog {
        url: String,
        #[source]
        source: shopverse_events::embedded::OpenError,
    },
    #[error("the Kafka event bus: {0}")]
    Kafka(#[from] shopverse_events::kafka::KafkaSetupError),
    #[error("the event bus ({bus}) does not answer: {source}")]
    BusDown {
        bus: String,
        #[source]
        source: shopverse_events::BusError,
    },
    #[error("no event log at {0}; is --data-dir (or --config) the one the system runs with?")]
    NoEventLog(String),
    #[error(transparent)]
    Service(#[from] RunError),
    #[error("{name} at {addr} did not become healthy within 60 s")]
    NotHealthy {
        name: &'static str,
        addr: SocketAddr,
    },
    #[error("a service stopped during start-up")]
    StoppedEarly,
    #[error("a task crashed: {0}")]
    Crashed(#[from] tokio::task::JoinError),
    #[error("gateway: {0}")]
    Gateway(#[from] shopverse_gateway::GatewayError),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Locks `dir` (created if missing) for this process: a second `shopverse` on the same data,
/// or a `restore` under a running one, is refused. Held while the file lives.
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, ApplianceError> {
    let io = |source| ApplianceError::DataDir {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("shopverse.lock"))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ApplianceError::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The event bus the configuration names: the embedded log, or Kafka.
pub async fn open_bus(
    cfg: &AppConfig,
    registry: &prometheus::Registry,
) -> Result<Arc<dyn EventBus>, ApplianceError> {
    open_bus_retained(cfg, registry, None).await
}

/// [`open_bus`] for the process that runs the services: an embedded log also applies its
/// retention (`[events] retention_*`) until `retain` is cancelled.
async fn open_bus_retained(
    cfg: &AppConfig,
    registry: &prometheus::Registry,
    retain: Option<CancellationToken>,
) -> Result<Arc<dyn EventBus>, ApplianceError> {
    match cfg.events.backend {
        EventsBackend::Kafka => Ok(Arc::new(KafkaBus::new(
            cfg.events.kafka.clone(),
            cfg.events.partitions,
            registry,
        )?)),
        EventsBackend::Embedded => {
            let url = cfg.events_url();
            let log = EmbeddedLog::open(&url, cfg.events.partitions)
                .await
                .map_err(|source| ApplianceError::EventLog { url, source })?;
            if let Some(stop) = retain {
                log.register(registry);
                tokio::spawn(log.clone().retain(cfg.events.retention(), stop));
            }
            Ok(Arc::new(log))
        }
    }
}

/// The event bus for commands that only inspect it: an embedded log must already exist, a
/// Kafka cluster must answer.
pub async fn existing_bus(cfg: &AppConfig) -> Result<Arc<dyn EventBus>, ApplianceError> {
    if cfg.events.backend == EventsBackend::Embedded {
        let url = cfg.events_url();
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        if !Path::new(path).exists() {
            return Err(ApplianceError::NoEventLog(path.to_owned()));
        }
    }
    let bus = open_bus(cfg, &prometheus::Registry::new()).await?;
    bus.check()
        .await
        .map_err(|source| ApplianceError::BusDown {
            bus: bus.describe(),
            source,
        })?;
    Ok(bus)
}

/// What to start; [`Appliance::start`] starts it.
pub struct Appliance {
    cfg: AppConfig,
    services: Vec<(&'static dyn Unit, SocketAddr)>,
    admin: SocketAddr,
    gateway: Option<SocketAddr>,
    shutdown: CancellationToken,
}

impl Appliance {
    /// Every service and the gateway, on the configured addresses.
    pub fn new(cfg: AppConfig) -> Appliance {
        Appliance {
            services: services::ALL.iter().map(|u| (*u, u.listen(&cfg))).collect(),
            admin: cfg.admin.listen,
            gateway: Some(cfg.gateway.listen),
            shutdown: CancellationToken::new(),
            cfg,
        }
    }

    /// Only `unit`, without the gateway (`shopverse serve <service>`).
    pub fn one(cfg: AppConfig, unit: &'static dyn Unit) -> Appliance {
        Appliance {
            services: vec![(unit, unit.listen(&cfg))],
            gateway: None,
            ..Appliance::new(cfg)
        }
    }

    /// Every listener on `ip`, port 0.
    pub fn any_ports(mut self, ip: IpAddr) -> Appliance {
        let any = SocketAddr::new(ip, 0);
        for s in &mut self.services {
            s.1 = any;
        }
        self.admin = any;
        if self.gateway.is_some() {
            self.gateway = Some(any);
        }
        self
    }

    /// Service `name` listens on `addr` (ignored if it is not started).
    pub fn listen(mut self, name: &str, addr: SocketAddr) -> Appliance {
        for s in &mut self.services {
            if s.0.name() == name {
                s.1 = addr;
            }
        }
        self
    }

    pub fn admin(mut self, addr: SocketAddr) -> Appliance {
        self.admin = addr;
        self
    }

    /// The gateway on `addr`, or none.
    pub fn gateway(mut self, addr: Option<SocketAddr>) -> Appliance {
        self.gateway = addr;
        self
    }

    /// Stops everything when `token` is cancelled (SIGTERM, say).
    pub fn shutdown(mut self, token: CancellationToken) -> Appliance {
        self.shutdown = token;
        self
    }

    /// Binds every listener, starts every service and waits until each answers SERVING, then
    /// starts the gateway. A service that fails meanwhile fails the start.
    pub async fn start(self) -> Result<Running, ApplianceError> {
        let Appliance {
            cfg,
            services,
            admin,
            gateway,
            shutdown,
        } = self;
        let lock = lock_data_dir(&cfg.data.dir)?;
        let registry = shopverse_kit::metrics::new_registry();
        let mut tasks: JoinSet<Result<(), ApplianceError>> = JoinSet::new();
        // Bind everything first, so services that call each other learn the real addresses.
        let mut bound = Vec::new();
        for (unit, addr) in services {
            let listener = bind(addr, unit.name()).await?;
            let at = local_addr(&listener, addr, unit.name())?;
            bound.push((unit, listener, at));
        }
        let platform = Platform {
            bus: open_bus_retained(&cfg, &registry, Some(shutdown.clone())).await?,
            registry: registry.clone(),
            clock: Arc::new(SystemClock),
            grace: Duration::from_secs(cfg.shutdown.grace_secs),
            local: shopverse_rpc::LocalServices::default(),
            grpc: shopverse_rpc::GrpcMetrics::new(&registry)?,
            peers: Arc::new(bound.iter().map(|(u, _, at)| (u.name(), *at)).collect()),
            consumers: cfg.events.consumers.clone(),
            retention: cfg.events.retention(),
        };
        provision_topics(platform.bus.as_ref()).await;
        let bus_up = watch_bus(platform.bus.clone(), &registry, shutdown.clone());
        let mut addrs = Vec::new();
        let mut rows = Vec::new();
        for (unit, listener, at) in bound {
            // Calls between the services of this process (the gateway's, orders' to
            // products) stay in-process.
            platform.local.declare(at);
            let run = unit.start(&cfg, listener, platform.clone(), shutdown.clone());
            tasks.spawn(async move { Ok(run.await?) });
            let db = shopverse_storage::redact(&unit.database_url(&cfg));
            rows.push((
                unit.name().to_owned(),
                at.to_string(),
                format!("gRPC  {}  {db}", unit.grpc_name()),
            ));
            addrs.push((unit, at));
        }
        let admin_listener = bind(admin, "admin").await?;
        let admin = local_addr(&admin_listener, admin, "admin")?;
        let storage = watch_storage(
            addrs
                .iter()
                .map(|(u, _)| (u.name(), u.database_url(&cfg)))
                .collect(),
            (cfg.events.backend == EventsBackend::Embedded).then(|| cfg.events_url()),
            &registry,
            shutdown.clone(),
        );
        let ready = Arc::new(AtomicBool::new(false));
        let check = ready_check(ready.clone(), bus_up, storage);
        // The gateway starts after the admin listener; its cache joins the purge endpoint then.
        let cache_slot: Arc<std::sync::OnceLock<shopverse_kit::metrics::AdminHandler>> =
            Arc::default();
        let slot = cache_slot.clone();
        let handler: shopverse_kit::metrics::AdminHandler =
            Arc::new(move |m, p, q| slot.get().and_then(|h| h(m, p, q)));
        let documents = match gateway {
            Some(_) => vec![(
                "/openapi.json".to_owned(),
                "application/json".to_owned(),
                shopverse_gateway::openapi_json()?.into(),
            )],
            None => Vec::new(),
        };
        let (reg, stop) = (registry.clone(), shutdown.clone());
        tasks.spawn(async move {
            shopverse_kit::metrics::serve_admin(
                admin_listener,
                reg,
                check,
                documents,
                Some(handler),
                stop,
            )
            .await;
            Ok(())
        });
        rows.push((
            "admin".into(),
            admin.to_string(),
            "HTTP  /metrics /healthz /readyz".into(),
        ));
        rows.push((
            "events".into(),
            cfg.events.backend.as_str().to_owned(),
            platform.bus.describe(),
        ));
        let targets: Vec<_> = addrs.iter().map(|(u, a)| (*a, u.grpc_name())).collect();
        if let Err(e) = wait_serving(&targets, &mut tasks).await {
            shutdown.cancel();
            while tasks.join_next().await.is_some() {}
            return Err(e);
        }
        let mut running = Running {
            addrs: addrs.iter().map(|(u, a)| (u.name(), *a)).collect(),
            admin,
            gateway: None,
            rows,
            tasks,
            ready,
            shutdown,
            platform,
            registry,
            _lock: lock,
        };
        if let Some(listen) = gateway {
            let mut gcfg = cfg.gateway.clone();
            gcfg.listen = listen;
            if gcfg.cache.dir.is_empty() {
                gcfg.cache.dir = cfg.data.dir.join("edge-cache").display().to_string();
            }
            // The gateway talks to the services this process runs.
            for (name, at) in &running.addrs {
                gcfg.upstreams
                    .insert((*name).to_owned(), vec![format!("http://{at}")]);
            }
            let started = shopverse_gateway::Builder::new(gcfg)
                .registry(&running.registry)
                .shutdown(running.shutdown.clone())
                .events(running.platform.bus.clone())
                .local(&running.platform.local)
                .start()
                .await;
            let g = match started {
                Ok(g) => g,
                Err(e) => {
                    let _ = running.stop().await;
                    return Err(e.into());
                }
            };
            let _ = cache_slot.set(shopverse_gateway::purge_handler(g.cache.clone()));
            running.rows.insert(
                0,
                (
                    "gateway".into(),
                    g.addr.to_string(),
                    "HTTP  REST/JSON -> gRPC, JWT, rate limits".into(),
                ),
            );
            running.gateway = Some(g);
        }
        running.ready.store(true, Ordering::Relaxed);
        Ok(running)
    }
}

/// A started appliance.
pub struct Running {
    addrs: Vec<(&'static str, SocketAddr)>,
    admin: SocketAddr,
    gateway: Option<shopverse_gateway::Running>,
    rows: Vec<(String, String, String)>,
    tasks: JoinSet<Result<(), ApplianceError>>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
    platform: Platform,
    registry: prometheus::Registry,
    _lock: std::fs::File,
}

impl Running {
    /// The gRPC address of service `name`.
    pub fn service(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
    }

    /// The gateway's address, if one runs.
    pub fn gateway(&self) -> Option<SocketAddr> {
        self.gateway.as_ref().map(|g| g.addr)
    }

    /// The admin listener's address (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The metrics registry every component of this process registers in.
    pub fn registry(&self) -> &prometheus::Registry {
        &self.registry
    }

    /// The gateway's reloader (SIGHUP), if one runs.
    pub fn reloader(&self) -> Option<shopverse_gateway::Reloader> {
        self.gateway.as_ref().map(|g| g.reloader())
    }

    /// `gateway=… users=… … admin=…`: every component and its address.
    pub fn ready_line(&self) -> String {
        let mut parts: Vec<String> = self
            .gateway()
            .map(|g| format!("gateway={g}"))
            .into_iter()
            .collect();
        parts.extend(self.addrs.iter().map(|(n, a)| format!("{n}={a}")));
        parts.push(format!("admin={}", self.admin));
        parts.join(" ")
    }

    /// One line per component: name, address, what it serves.
    pub fn rows(&self) -> &[(String, String, String)] {
        &self.rows
    }

    /// The token that stops everything.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token fires or a component fails (which stops the rest); the
    /// first failure.
    pub async fn wait(mut self) -> Result<(), ApplianceError> {
        let mut failure = None;
        while let Some(done) = self.tasks.join_next().await {
            let err = match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(e) => ApplianceError::Crashed(e),
            };
            tracing::error!(error = %err, "stopping everything");
            self.ready.store(false, Ordering::Relaxed);
            self.shutdown.cancel();
            failure.get_or_insert(err);
        }
        if let Some(g) = self.gateway.take() {
            g.join().await;
        }
        self.platform.bus.flush().await;
        match failure {
            Some(e) => Err(e),
            None => {
                tracing::info!("stopped cleanly");
                Ok(())
            }
        }
    }

    /// Stops everything and waits for it, within the configured grace period.
    pub async fn stop(self) -> Result<(), ApplianceError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

async fn bind(
    addr: SocketAddr,
    what: &'static str,
) -> Result<tokio::net::TcpListener, ApplianceError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApplianceError::Bind { what, addr, source })
}

fn local_addr(
    l: &tokio::net::TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, ApplianceError> {
    l.local_addr()
        .map_err(|source| ApplianceError::Bind { what, addr, source })
}

/// Creates the topics (and their dead-letter topics) if missing. A bus that does not answer yet
/// is not fatal: publishing and subscribing create what they need once it does.
async fn provision_topics(bus: &dyn EventBus) {
    if let Err(e) = shopverse_events::provision_topics(bus).await {
        tracing::warn!(bus = %bus.describe(), error = %e, "topics not provisioned yet; the bus does not answer (writes go on into the outboxes)");
    }
}

/// Ready when started, the bus answers and every service's storage takes writes; otherwise
/// the reasons, for `/readyz`.
fn ready_check(
    ready: Arc<AtomicBool>,
    bus_up: Arc<AtomicBool>,
    storage: StorageState,
) -> shopverse_kit::metrics::ReadyCheck {
    Arc::new(move || {
        if !ready.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        if !bus_up.load(Ordering::Relaxed) {
            return Err("the event bus does not answer".into());
        }
        let failing: Vec<String> = storage
            .lock()
            .map(|s| {
                s.iter()
                    .filter_map(|(name, e)| e.as_ref().map(|e| format!("{name} storage: {e}")))
                    .collect()
            })
            .unwrap_or_default();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join("; "))
        }
    })
}

/// What each service's storage said to the last write probe: `None` while it takes writes.
type StorageState = Arc<std::sync::Mutex<Vec<(&'static str, Option<String>)>>>;

/// Probes each service's database with a one-row write every second (a full disk still
/// answers reads), so `/readyz` names a service whose storage is out; `storage_up{service}`
/// says the same to Prometheus. A probe that meets the service's own writer (busy) counts as
/// up.
///
/// `storage_file_bytes{service, file}` follows each SQLite file's size (and the embedded
/// event log's, `service="events"`, from `events_url`).
fn watch_storage(
    services: Vec<(&'static str, String)>,
    events_url: Option<String>,
    registry: &prometheus::Registry,
    stop: CancellationToken,
) -> StorageState {
    let up = shopverse_kit::metrics::int_gauge_vec(
        registry,
        "storage_up",
        "Whether the service's database took the last probe write (1) or not (0)",
        &[],
        &["service"],
    );
    let bytes = shopverse_kit::metrics::int_gauge_vec(
        registry,
        "storage_file_bytes",
        "Bytes on disk of a SQLite database: the file itself (main) and its write-ahead log (wal)",
        &[],
        &["service", "file"],
    );
    let state: StorageState = Arc::new(std::sync::Mutex::new(
        services.iter().map(|(name, _)| (*name, None)).collect(),
    ));
    if let Some(url) = events_url {
        let (bytes, stop) = (bytes.clone(), stop.clone());
        let path = std::path::PathBuf::from(
            url.trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default(),
        );
        tokio::spawn(async move {
            loop {
                let (main, wal) = shopverse_storage::sqlite_file_bytes(&path);
                for (file, n) in [("main", main), ("wal", wal)] {
                    bytes
                        .with_label_values(&["events", file])
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    for (i, (name, url)) in services.into_iter().enumerate() {
        let (state, up, bytes, stop) = (state.clone(), up.clone(), bytes.clone(), stop.clone());
        tokio::spawn(async move {
            let mut db = None;
            loop {
                if db.is_none() {
                    db = shopverse_storage::Db::connect(&url, 1).await.ok();
                }
                if let Some((main, wal)) = db.as_ref().and_then(|d| d.file_bytes()) {
                    let set = |file, n: u64| {
                        bytes
                            .with_label_values(&[name, file])
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    };
                    set("main", main);
                    set("wal", wal);
                }
                let outcome = match &db {
                    None => Err("cannot connect".to_owned()),
                    Some(db) => {
                        match shopverse_storage::probe_write(db, SystemClock.now_ms()).await {
                            Ok(()) => Ok(()),
                            Err(e) if shopverse_storage::is_busy(&e) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                };
                up.with_label_values(&[name])
                    .set(i64::from(outcome.is_ok()));
                if let Ok(mut s) = state.lock() {
                    let was_up = s[i].1.is_none();
                    match &outcome {
                        Err(e) if was_up => {
                            tracing::error!(service = name, error = %e, "storage does not take writes; not ready");
                        }
                        Ok(()) if !was_up => {
                            tracing::info!(service = name, "storage takes writes again");
                        }
                        _ => {}
                    }
                    s[i].1 = outcome.err();
                }
                tokio::select! {
                    _ = stop.cancelled() => {
                        if let Some(db) = db {
                            db.close().await;
                        }
                        return;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    state
}

/// Watches the bus: `shopverse_events_bus_up` and readiness follow whether it answers; every
/// half minute, how many dead-lettered events wait per topic.
fn watch_bus(
    bus: Arc<dyn EventBus>,
    registry: &prometheus::Registry,
    stop: CancellationToken,
) -> Arc<AtomicBool> {
    let up = Arc::new(AtomicBool::new(true));
    let gauge = shopverse_kit::metrics::int_gauge(
        registry,
        "events_bus_up",
        "Whether the event bus answered the last check (1) or not (0)",
        &[],
    );
    let waiting = shopverse_kit::metrics::int_gauge_vec(
        registry,
        "events_dlq_waiting",
        "Dead-lettered events not yet replayed, by original topic",
        &[],
        &["topic"],
    );
    let flag = up.clone();
    tokio::spawn(async move {
        let mut last_dlq = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            let ok = bus.check().await;
            if let Err(e) = &ok
                && flag.load(Ordering::Relaxed)
            {
                tracing::warn!(bus = %bus.describe(), error = %e, "the event bus does not answer; not ready (writes go on into the outboxes)");
            }
            flag.store(ok.is_ok(), Ordering::Relaxed);
            gauge.set(i64::from(ok.is_ok()));
            if ok.is_ok() && last_dlq.elapsed() >= Duration::from_secs(30) {
                last_dlq = tokio::time::Instant::now();
                for t in ALL_TOPICS {
                    if let Ok(n) = shopverse_events::dlq::waiting(bus.as_ref(), t).await {
                        waiting.with_label_values(&[t]).set(n);
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    });
    up
}

/// Waits until every `(address, gRPC service)` answers SERVING to a gRPC health check.
async fn wait_serving(
    targets: &[(SocketAddr, &'static str)],
    tasks: &mut JoinSet<Result<(), ApplianceError>>,
) -> Result<(), ApplianceError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (addr, name) in targets {
        loop {
            if let Some(done) = tasks.try_join_next() {
                match done {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => return Err(ApplianceError::StoppedEarly),
                    Err(e) => return Err(ApplianceError::Crashed(e)),
                }
            }
            let serving = match tonic::transport::Endpoint::from_shared(format!("http://{addr}")) {
                Ok(e) => match e.connect_timeout(Duration::from_secs(1)).connect().await {
                    Ok(channel) => {
                        shopverse_rpc::pool::is_serving(channel, name, Duration::from_secs(2)).await
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            };
            if serving {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ApplianceError::NotHealthy { name, addr: *addr });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
