//! What each subcommand does. Everything here is wiring: the work is in the crates.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::task::JoinSet;

use shopverse_events::embedded::EmbeddedLog;
use shopverse_events::envelope::ALL_TOPICS;
use shopverse_events::kafka::KafkaBus;
use shopverse_events::{EventBus, Platform};
use shopverse_kit::{Clock, SystemClock};

use crate::config::{AppConfig, EventsBackend};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    Users,
    Products,
    Orders,
    Payments,
    Notifications,
    Delivery,
}

/// Every service, in the order `up` starts them.
pub const ALL_SERVICES: [ServiceName; 6] = [
    ServiceName::Users,
    ServiceName::Products,
    ServiceName::Orders,
    ServiceName::Payments,
    ServiceName::Notifications,
    ServiceName::Delivery,
];

impl ServiceName {
    fn as_str(self) -> &'static str {
        match self {
            ServiceName::Users => "users",
            ServiceName::Products => "products",
            ServiceName::Orders => "orders",
            ServiceName::Payments => "payments",
            ServiceName::Notifications => "notifications",
            ServiceName::Delivery => "delivery",
        }
    }
    fn grpc_name(self) -> &'static str {
        match self {
            ServiceName::Users => shopverse_users::SERVICE_NAME,
            ServiceName::Products => shopverse_products::SERVICE_NAME,
            ServiceName::Orders => shopverse_orders::SERVICE_NAME,
            ServiceName::Payments => shopverse_payments::SERVICE_NAME,
            ServiceName::Notifications => shopverse_notifications::SERVICE_NAME,
            ServiceName::Delivery => shopverse_delivery::SERVICE_NAME,
        }
    }

    /// The configured gRPC address.
    pub fn listen(self, cfg: &AppConfig) -> SocketAddr {
        let s = &cfg.services;
        match self {
            ServiceName::Users => s.users.listen,
            ServiceName::Products => s.products.listen,
            ServiceName::Orders => s.orders.listen,
            ServiceName::Payments => s.payments.listen,
            ServiceName::Notifications => s.notifications.listen,
            ServiceName::Delivery => s.delivery.listen,
        }
    }

    /// The configured database URL, password removed.
    /// The service's database URL, as shown (the password removed).
    fn database(self, cfg: &AppConfig) -> String {
        shopverse_kit::db::redact(&self.database_url(cfg))
    }

    fn database_url(self, cfg: &AppConfig) -> String {
        let (s, d) = (&cfg.services, &cfg.data.dir);
        match self {
            ServiceName::Users => s.users.database_url(d),
            ServiceName::Products => s.products.database_url(d),
            ServiceName::Orders => s.orders.database_url(d),
            ServiceName::Payments => s.payments.database_url(d),
            ServiceName::Notifications => s.notifications.database_url(d),
            ServiceName::Delivery => s.delivery.database_url(d),
        }
    }

    /// Starts this service on `listener` in `tasks`.
    fn spawn(
        self,
        cfg: &AppConfig,
        listener: tokio::net::TcpListener,
        platform: Platform,
        stop: shopverse_kit::CancellationToken,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) {
        let (s, dir) = (cfg.services.clone(), cfg.data.dir.clone());
        match self {
            ServiceName::Users => tasks.spawn(async move {
                Ok(shopverse_users::run(listener, s.users, &dir, platform, stop).await?)
            }),
            ServiceName::Products => tasks.spawn(async move {
                Ok(shopverse_products::run(listener, s.products, &dir, platform, stop).await?)
            }),
            ServiceName::Orders => tasks.spawn(async move {
                Ok(shopverse_orders::run(listener, s.orders, &dir, platform, stop).await?)
            }),
            ServiceName::Payments => tasks.spawn(async move {
                Ok(shopverse_payments::run(listener, s.payments, &dir, platform, stop).await?)
            }),
            ServiceName::Notifications => tasks.spawn(async move {
                Ok(
                    shopverse_notifications::run(listener, s.notifications, &dir, platform, stop)
                        .await?,
                )
            }),
            ServiceName::Delivery => tasks.spawn(async move {
                Ok(shopverse_delivery::run(listener, s.delivery, &dir, platform, stop).await?)
            }),
        };
    }
}

async fn open_log(cfg: &AppConfig) -> anyhow::Result<EmbeddedLog> {
    let url = cfg.events_url();
    EmbeddedLog::open(&url, cfg.events.partitions)
        .await
        .with_context(|| format!("opening the event log {url}"))
}

/// The event bus the configuration names: the embedded log, or Kafka.
async fn open_bus(
    cfg: &AppConfig,
    registry: &prometheus::Registry,
) -> anyhow::Result<Arc<dyn EventBus>> {
    match cfg.events.backend {
        EventsBackend::Kafka => Ok(Arc::new(KafkaBus::new(
            cfg.events.kafka.clone(),
            cfg.events.partitions,
            registry,
        )?)),
        EventsBackend::Embedded => Ok(Arc::new(open_log(cfg).await?)),
    }
}

/// The event bus for commands that only inspect it: an embedded log must already exist, a
/// Kafka cluster must answer.
async fn existing_bus(cfg: &AppConfig) -> anyhow::Result<Arc<dyn EventBus>> {
    if cfg.events.backend == EventsBackend::Embedded {
        let url = cfg.events_url();
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        if !Path::new(path).exists() {
            bail!(
                "no event log at {path}; is --data-dir (or --config) the one the system runs with?"
            );
        }
    }
    let bus = open_bus(cfg, &prometheus::Registry::new()).await?;
    bus.check()
        .await
        .with_context(|| format!("the event bus ({}) does not answer", bus.describe()))?;
    Ok(bus)
}

async fn platform(cfg: &AppConfig, registry: prometheus::Registry) -> anyhow::Result<Platform> {
    let bus = open_bus(cfg, &registry).await?;
    Ok(Platform {
        bus,
        registry,
        clock: Arc::new(SystemClock),
        grace: Duration::from_secs(cfg.shutdown.grace_secs),
        local: shopverse_kit::LocalServices::default(),
        consumers: cfg.events.consumers.clone(),
    })
}

/// Creates the topics (and their dead-letter topics) if missing. A bus that does not answer yet
/// is not fatal: publishing and subscribing create what they need once it does.
async fn provision_topics(bus: &dyn EventBus) {
    if let Err(e) = shopverse_events::provision_topics(bus).await {
        tracing::warn!(bus = %bus.describe(), error = %e, "topics not provisioned yet; the bus does not answer (writes go on into the outboxes)");
    }
}

/// Watches the bus: `shopverse_events_bus_up` and readiness follow whether it answers; every
/// half minute, how many dead-lettered events wait per topic.
/// What each service's storage said to the last write probe: `None` while it takes writes.
type StorageState = Arc<std::sync::Mutex<Vec<(&'static str, Option<String>)>>>;

/// Probes each service's database with a one-row write every second (a full disk still
/// answers reads), so `/readyz` names a service whose storage is out; `storage_up{service}`
/// says the same to Prometheus. A probe that meets the service's own writer (busy) counts as
/// up.
fn watch_storage(
    services: Vec<(&'static str, String)>,
    registry: &prometheus::Registry,
    stop: shopverse_kit::CancellationToken,
) -> StorageState {
    let up = shopverse_kit::metrics::int_gauge_vec(
        registry,
        "storage_up",
        "Whether the service's database took the last probe write (1) or not (0)",
        &[],
        &["service"],
    );
    let state: StorageState = Arc::new(std::sync::Mutex::new(
        services.iter().map(|(name, _)| (*name, None)).collect(),
    ));
    for (i, (name, url)) in services.into_iter().enumerate() {
        let (state, up, stop) = (state.clone(), up.clone(), stop.clone());
        tokio::spawn(async move {
            let mut db = None;
            loop {
                if db.is_none() {
                    db = shopverse_kit::Db::connect(&url, 1).await.ok();
                }
                let outcome = match &db {
                    None => Err("cannot connect".to_owned()),
                    Some(db) => {
                        match shopverse_kit::db::probe_write(
                            db,
                            shopverse_kit::SystemClock.now_ms(),
                        )
                        .await
                        {
                            Ok(()) => Ok(()),
                            Err(e) if shopverse_kit::db::is_busy(&e) => Ok(()),
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
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
    }
    state
}

fn watch_bus(
    bus: Arc<dyn EventBus>,
    registry: &prometheus::Registry,
    up: Arc<AtomicBool>,
    stop: shopverse_kit::CancellationToken,
) {
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
    tokio::spawn(async move {
        let mut last_dlq = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            let ok = bus.check().await;
            if let Err(e) = &ok
                && up.load(Ordering::Relaxed)
            {
                tracing::warn!(bus = %bus.describe(), error = %e, "the event bus does not answer; not ready (writes go on into the outboxes)");
            }
            up.store(ok.is_ok(), Ordering::Relaxed);
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
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

/// Waits until every `(address, gRPC service)` answers SERVING to a gRPC health check.
async fn wait_serving(
    targets: &[(SocketAddr, &'static str)],
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (addr, name) in targets {
        loop {
            if let Some(done) = tasks.try_join_next() {
                match done {
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(())) => bail!("a service stopped during start-up"),
                    Err(e) => bail!("a service crashed during start-up: {e}"),
                }
            }
            let ok = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(1))
                .connect()
                .await
            {
                Ok(channel) => {
                    shopverse_kit::upstream::is_serving(channel, name, Duration::from_secs(2)).await
                }
                Err(_) => false,
            };
            if ok {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} at {addr} did not become healthy within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

struct Started {
    rows: Vec<(String, String, String)>,
    ready_line: Vec<String>,
}

/// Binds and starts `services` plus the admin listener, waits until they are healthy, prints
/// the table and the ready line, then runs until a signal (or a service fails).
async fn run_services(
    cfg: AppConfig,
    services: &[(ServiceName, SocketAddr)],
    admin_addr: SocketAddr,
    title: &str,
    demo_orders: bool,
    gateway_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let shutdown = shopverse_kit::shutdown::on_signals();
    // Held while we run, so `restore` refuses to write under us.
    let _lock = crate::backup::lock_data_dir(&cfg.data.dir)?;
    let registry = shopverse_kit::metrics::new_registry();
    let registry_for_gateway = registry.clone();
    let platform = platform(&cfg, registry.clone()).await?;
    provision_topics(platform.bus.as_ref()).await;
    let ready = Arc::new(AtomicBool::new(false));
    let bus_up = Arc::new(AtomicBool::new(true));
    watch_bus(
        platform.bus.clone(),
        &registry,
        bus_up.clone(),
        shutdown.clone(),
    );
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut started = Started {
        rows: Vec::new(),
        ready_line: Vec::new(),
    };
    let mut targets = Vec::new();
    // Bind everything first, so services that call each other learn the real addresses.
    let mut cfg = cfg;
    let mut bound_listeners = Vec::new();
    for (name, addr) in services {
        let listener = bind(*addr, name.as_str()).await?;
        let bound = listener.local_addr()?;
        // Calls between the services of this process (the gateway's, orders' to products)
        // stay in-process.
        platform.local.declare(bound);
        if *name == ServiceName::Products {
            cfg.services.orders.products_url = format!("http://{bound}");
        }
        bound_listeners.push((*name, listener, bound));
    }
    for (name, listener, bound) in bound_listeners {
        name.spawn(
            &cfg,
            listener,
            platform.clone(),
            shutdown.clone(),
            &mut tasks,
        );
        started.rows.push((
            name.as_str().into(),
            bound.to_string(),
            format!("gRPC  {}  {}", name.grpc_name(), name.database(&cfg)),
        ));
        started
            .ready_line
            .push(format!("{}={bound}", name.as_str()));
        targets.push((bound, name.grpc_name()));
    }
    let admin = bind(admin_addr, "admin").await?;
    let admin_bound = admin.local_addr()?;
    let storage = watch_storage(
        services
            .iter()
            .map(|(name, _)| (name.as_str(), name.database_url(&cfg)))
            .collect(),
        &registry,
        shutdown.clone(),
    );
    let r = ready.clone();
    let b = bus_up.clone();
    let check: shopverse_kit::metrics::ReadyCheck = Arc::new(move || {
        if !r.load(Ordering::Relaxed) {
            return Err("starting".into());
        }
        if !b.load(Ordering::Relaxed) {
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
    });
    let stop = shutdown.clone();
    let documents = if gateway_addr.is_some() {
        admin_documents()?
    } else {
        Vec::new()
    };
    // The gateway starts after the admin listener; its cache joins the purge endpoint then.
    let cache_slot: Arc<std::sync::OnceLock<shopverse_kit::metrics::AdminHandler>> = Arc::default();
    let slot = cache_slot.clone();
    let handler: shopverse_kit::metrics::AdminHandler =
        Arc::new(move |m, p, q| slot.get().and_then(|h| h(m, p, q)));
    tasks.spawn(async move {
        shopverse_kit::metrics::serve_admin(admin, registry, check, documents, Some(handler), stop)
            .await;
        Ok(())
    });
    started.rows.push((
        "admin".into(),
        admin_bound.to_string(),
        "HTTP  /metrics /healthz /readyz".into(),
    ));
    started.ready_line.push(format!("admin={admin_bound}"));
    started.rows.push((
        "events".into(),
        cfg.events.backend.as_str().to_owned(),
        platform.bus.describe(),
    ));

    wait_serving(&targets, &mut tasks).await?;
    if demo_orders {
        let addr = |n: ServiceName| {
            targets
                .iter()
                .find(|(_, g)| *g == n.grpc_name())
                .map(|(a, _)| *a)
        };
        if let (Some(u), Some(p), Some(o)) = (
            addr(ServiceName::Users),
            addr(ServiceName::Products),
            addr(ServiceName::Orders),
        ) {
            match place_demo_orders(u, p, o).await {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "placing the demo orders failed")
                }
            }
        }
    }
    let mut gateway = None;
    if let Some(addr) = gateway_addr {
        let mut gcfg = cfg.gateway.clone();
        gcfg.listen = addr;
        if gcfg.cache.dir.is_empty() {
            gcfg.cache.dir = cfg.data.dir.join("edge-cache").display().to_string();
        }
        // The gateway talks to the services this process runs.
        for (name, bound) in targets.iter().filter_map(|(a, g)| {
            ALL_SERVICES
                .iter()
                .find(|s| s.grpc_name() == *g)
                .map(|s| (s.as_str(), a))
        }) {
            gcfg.upstreams
                .insert(name.to_owned(), vec![format!("http://{bound}")]);
        }
        let running = shopverse_gateway::Builder::new(gcfg)
            .registry(&registry_for_gateway)
            .shutdown(shutdown.clone())
            .events(platform.bus.clone())
            .local(&platform.local)
            .start()
            .await?;
        reload_on_sighup(
            cfg.source.clone(),
            running.reloader(),
            shutdown.clone(),
            &registry_for_gateway,
        );
        if let Some(cache) = running.cache.clone() {
            let _ = cache_slot.set(shopverse_gateway::purge_handler(cache));
        }
        started.rows.insert(
            0,
            (
                "gateway".into(),
                running.addr.to_string(),
                "HTTP  REST/JSON -> gRPC, JWT, rate limits".into(),
            ),
        );
        started
            .ready_line
            .insert(0, format!("gateway={}", running.addr));
        gateway = Some(running);
    }
    ready.store(true, Ordering::Relaxed);
    print_table(title, &cfg.data.dir, &started);
    shopverse_kit::systemd::ready(shutdown.clone(), &started.ready_line.join(" "));

    let mut failure: Option<anyhow::Error> = None;
    while let Some(done) = tasks.join_next().await {
        let err = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => anyhow::anyhow!("a task crashed: {e}"),
        };
        tracing::error!(error = %format!("{err:#}"), "stopping everything");
        ready.store(false, Ordering::Relaxed);
        shutdown.cancel();
        failure.get_or_insert(err);
    }
    if let Some(g) = gateway {
        g.join().await;
    }
    platform.bus.flush().await;
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
    }
}

fn print_table(title: &str, data_dir: &Path, s: &Started) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ShopVerse {} — {title}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "  data dir   {}", data_dir.display());
    let _ = writeln!(out, "  {:<14} {:<22} detail", "component", "address");
    for (name, addr, detail) in &s.rows {
        let _ = writeln!(out, "  {name:<14} {addr:<22} {detail}");
    }
    let _ = writeln!(out, "ready: {}", s.ready_line.join(" "));
    let _ = out.flush();
}

async fn products_is_empty(cfg: &AppConfig) -> anyhow::Result<bool> {
    let db = shopverse_products::open_db(&cfg.services.products, &cfg.data.dir).await?;
    let n = shopverse_products::repo::Repo { db: db.clone() }
        .count_products()
        .await?;
    db.close().await;
    Ok(n == 0)
}

pub async fn up(
    cfg: AppConfig,
    demo: bool,
    overrides: &[(ServiceName, Option<SocketAddr>)],
    admin: Option<SocketAddr>,
    gateway_addr: Option<SocketAddr>,
) -> anyhow::Result<()> {
    if demo {
        std::fs::create_dir_all(&cfg.data.dir)
            .with_context(|| format!("creating data dir {}", cfg.data.dir.display()))?;
        if products_is_empty(&cfg).await? {
            seed(cfg.clone()).await?;
        } else {
            println!("demo: the catalog is not empty; nothing seeded");
        }
    }
    let services: Vec<(ServiceName, SocketAddr)> = ALL_SERVICES
        .iter()
        .map(|s| {
            let o = overrides.iter().find(|(n, _)| n == s).and_then(|(_, a)| *a);
            (*s, o.unwrap_or_else(|| s.listen(&cfg)))
        })
        .collect();
    let admin = admin.unwrap_or(cfg.admin.listen);
    let gateway_addr = gateway_addr.unwrap_or(cfg.gateway.listen);
    run_services(cfg, &services, admin, "appliance", demo, Some(gateway_addr)).await
}

/// On SIGHUP, reads the configuration again and swaps the gateway's policies; a bad file is
/// reported and the running policies stay. Each reload is counted in
/// `shopverse_config_reloads_total{outcome="applied"|"refused"}`.
fn reload_on_sighup(
    source: Option<PathBuf>,
    reloader: shopverse_gateway::Reloader,
    shutdown: shopverse_kit::CancellationToken,
    registry: &prometheus::Registry,
) {
    let reloads = shopverse_kit::metrics::int_counter_vec(
        registry,
        "shopverse_config_reloads_total",
        "Configuration reloads on SIGHUP, by outcome (applied, refused)",
        &[],
        &["outcome"],
    );
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match AppConfig::load(source.as_deref()) {
                Ok(cfg) => {
                    let ignored = reloader.reload(cfg.gateway);
                    reloads.with_label_values(&["applied"]).inc();
                    tracing::info!(
                        ?ignored,
                        "SIGHUP: gateway policies reloaded (listed keys need a restart)"
                    );
                }
                Err(e) => {
                    reloads.with_label_values(&["refused"]).inc();
                    tracing::error!(error = %e, "SIGHUP: configuration not reloaded; keeping the running one")
                }
            }
        }
    });
}

/// What the admin listener serves besides metrics and probes when a gateway runs.
fn admin_documents() -> anyhow::Result<Vec<shopverse_kit::metrics::AdminDocument>> {
    Ok(vec![(
        "/openapi.json".to_owned(),
        "application/json".to_owned(),
        shopverse_gateway::openapi_json()?.into(),
    )])
}

pub const DEMO_EMAIL: &str = "demo@shopverse.example";
pub const DEMO_PASSWORD: &str = "demo password 1234";

/// A demo customer with three orders (two paid, one declined), placed through the services'
/// own APIs; idempotent: a customer who already has orders gets no more.
/// `shopverse seed --orders`: the demo customer and orders, through running services.
pub async fn demo_orders(
    users: SocketAddr,
    products: SocketAddr,
    orders: SocketAddr,
) -> anyhow::Result<String> {
    place_demo_orders(users, products, orders)
        .await
        .context("placing demo orders (are the services running at those addresses?)")
}

async fn place_demo_orders(
    users: SocketAddr,
    products: SocketAddr,
    orders: SocketAddr,
) -> anyhow::Result<String> {
    use shopverse_kit::Role;
    use shopverse_kit::identity::request_as as as_user;
    use shopverse_proto::orders::v1 as o;
    use shopverse_proto::products::v1 as p;
    use shopverse_proto::users::v1 as u;
    let ch = |a: SocketAddr| async move {
        anyhow::Ok(
            tonic::transport::Endpoint::from_shared(format!("http://{a}"))?
                .connect()
                .await?,
        )
    };
    let mut users = u::users_service_client::UsersServiceClient::new(ch(users).await?);
    let registered = users
        .register(u::RegisterRequest {
            email: DEMO_EMAIL.into(),
            password: DEMO_PASSWORD.into(),
            display_name: "Demo Customer".into(),
        })
        .await;
    let user_id = match registered {
        Ok(r) => r.into_inner().user.map(|u| u.id).unwrap_or_default(),
        Err(e) if e.code() == tonic::Code::AlreadyExists => {
            let found = users
                .list_users(as_user(
                    u::ListUsersRequest {
                        email: DEMO_EMAIL.into(),
                        ..Default::default()
                    },
                    "shopverse-cli",
                    &[Role::Admin],
                ))
                .await?
                .into_inner();
            found
                .users
                .first()
                .map(|u| u.id.clone())
                .context("the demo customer vanished")?
        }
        Err(e) => return Err(e.into()),
    };
    let me = |m| as_user(m, &user_id, &[Role::Customer]);
    let mut orders = o::orders_service_client::OrdersServiceClient::new(ch(orders).await?);
    let existing = orders
        .list_my_orders(me(o::ListMyOrdersRequest::default()))
        .await?
        .into_inner()
        .orders
        .len();
    if existing == 0 {
        let mut catalog =
            p::products_service_client::ProductsServiceClient::new(ch(products).await?);
        let picks = catalog
            .list_products(p::ListProductsRequest {
                page_size: 3,
                ..Default::default()
            })
            .await?
            .into_inner()
            .products;
        for (i, (product, token)) in picks
            .iter()
            .zip(["pm_card_ok", "pm_card_ok", "pm_card_declined"])
            .enumerate()
        {
            orders
                .add_cart_item(as_user(
                    o::AddCartItemRequest {
                        product_id: product.id.clone(),
                        quantity: 1,
                    },
                    &user_id,
                    &[Role::Customer],
                ))
                .await?;
            orders
                .checkout(as_user(
                    o::CheckoutRequest {
                        shipping_address: Some(shopverse_proto::common::v1::Address {
                            recipient: "Demo Customer".into(),
                            line1: "1 Example Street".into(),
                            city: "Berlin".into(),
                            postal_code: "10115".into(),
                            country: "DE".into(),
                            ..Default::default()
                        }),
                        payment_method_token: token.into(),
                        idempotency_key: format!("demo-order-{i}"),
                    },
                    &user_id,
                    &[Role::Customer],
                ))
                .await?;
        }
    }
    let n = orders
        .list_my_orders(me(o::ListMyOrdersRequest::default()))
        .await?
        .into_inner()
        .orders
        .len();
    Ok(format!(
        "demo: customer {DEMO_EMAIL} (password \"{DEMO_PASSWORD}\") has {n} orders"
    ))
}

pub async fn serve(
    cfg: AppConfig,
    service: ServiceName,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let addr = listen.unwrap_or_else(|| service.listen(&cfg));
    let admin = admin.unwrap_or(cfg.admin.listen);
    let title = format!("{} service", service.as_str());
    run_services(cfg, &[(service, addr)], admin, &title, false, None).await
}

/// `shopverse gateway`: the gateway alone, in front of the configured upstreams.
pub async fn gateway(
    cfg: AppConfig,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    take_over: bool,
) -> anyhow::Result<()> {
    let shutdown = shopverse_kit::shutdown::on_signals();
    let registry = shopverse_kit::metrics::new_registry();
    let mut gcfg = cfg.gateway.clone();
    if let Some(l) = listen {
        gcfg.listen = l;
    }
    if gcfg.cache.dir.is_empty() {
        gcfg.cache.dir = cfg.data.dir.join("edge-cache").display().to_string();
    }
    // SIGQUIT: hand the listening sockets to a process started with --upgrade, then leave.
    let handover = shopverse_kit::CancellationToken::new();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut quit = signal(SignalKind::quit())?;
        let h = handover.clone();
        tokio::spawn(async move {
            if quit.recv().await.is_some() {
                tracing::info!("SIGQUIT: handing the listening sockets to the new process");
                h.cancel();
            }
        });
    }
    std::fs::create_dir_all(&cfg.data.dir)
        .with_context(|| format!("creating data dir {}", cfg.data.dir.display()))?;
    let upgrade = shopverse_gateway::Upgrade {
        sock: cfg.data.dir.join("gateway-upgrade.sock"),
        take_over,
        trigger: handover.clone(),
    };
    let admin_wanted = admin.unwrap_or(cfg.admin.listen);
    // Taking over: the old process holds the admin port until it leaves; wait for it.
    let mut admin_listener = bind(admin_wanted, "admin").await;
    for _ in 0..100 {
        if admin_listener.is_ok() || !take_over {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        admin_listener = bind(admin_wanted, "admin").await;
    }
    let admin = admin_listener?;
    let admin_addr = admin.local_addr()?;
    let running = shopverse_gateway::Builder::new(gcfg)
        .registry(&registry)
        .shutdown(shutdown.clone())
        .upgrade(upgrade)
        .start()
        .await?;
    reload_on_sighup(
        cfg.source.clone(),
        running.reloader(),
        shutdown.clone(),
        &registry,
    );
    let ready: shopverse_kit::metrics::ReadyCheck = Arc::new(|| Ok(()));
    let purge = running.cache.clone().map(shopverse_gateway::purge_handler);
    let admin_task = tokio::spawn(shopverse_kit::metrics::serve_admin(
        admin,
        registry,
        ready,
        admin_documents()?,
        purge,
        shutdown.clone(),
    ));
    println!("ShopVerse {} — gateway", env!("CARGO_PKG_VERSION"));
    let tls = running
        .tls_addr
        .map(|t| format!(" gateway-tls={t}"))
        .unwrap_or_default();
    println!("ready: gateway={}{tls} admin={admin_addr}", running.addr);
    shopverse_kit::systemd::ready(shutdown.clone(), &format!("gateway={}", running.addr));
    running.join().await;
    // Pingora is done (stopped, or handed over): stop the rest too.
    shutdown.cancel();
    let _ = admin_task.await;
    Ok(())
}

pub async fn seed(cfg: AppConfig) -> anyhow::Result<()> {
    let db = shopverse_products::open_db(&cfg.services.products, &cfg.data.dir).await?;
    let products = shopverse_products::Products::standalone(
        db.clone(),
        cfg.services.products.clone(),
        Arc::new(SystemClock),
    );
    println!(
        "seeding the demo catalog into {} ...",
        shopverse_kit::db::redact(&cfg.services.products.database_url(&cfg.data.dir))
    );
    let report = shopverse_products::seed::seed_demo(&products)
        .await
        .map_err(|e| anyhow::anyhow!("seeding: {e}"))?;
    db.close().await;
    println!(
        "demo catalog: {} categories and {} products added ({} products in the demo set; existing ones kept)",
        report.categories_created, report.products_created, report.products_total
    );
    Ok(())
}

pub fn keys_rotate(cfg: AppConfig) -> anyhow::Result<()> {
    let dir = cfg.services.users.keys_dir(&cfg.data.dir);
    let kid = shopverse_users::keys::rotate(&dir, SystemClock.now_ms())?;
    println!("new signing key {kid} in {}", dir.display());
    println!(
        "the previous key stays in the JWKS for {} s so tokens it signed keep working; a running users service switches on its own",
        cfg.services.users.access_ttl_secs + shopverse_users::keys::LEEWAY_SECS
    );
    Ok(())
}

pub async fn admin_create(
    cfg: AppConfig,
    email: &str,
    password_stdin: bool,
    password_env: &str,
) -> anyhow::Result<()> {
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        std::env::var(password_env).with_context(|| {
            format!("no password: set {password_env} or pass --password-stdin (it is never taken as an argument)")
        })?
    };
    let db = shopverse_users::open_db(&cfg.services.users, &cfg.data.dir).await?;
    let result = shopverse_users::service::create_admin(&db, &SystemClock, email, &password).await;
    db.close().await;
    match result {
        Ok((user, true)) => println!("created admin {} ({})", user.email, user.id),
        Ok((user, false)) => println!(
            "{} ({}) already existed; it now has the admin role (password unchanged)",
            user.email, user.id
        ),
        Err(e) => bail!("{e}"),
    }
    Ok(())
}

pub fn check_config(files: &[PathBuf]) -> std::process::ExitCode {
    let mut bad = 0;
    for f in files {
        // Files are checked as written: environment overrides are not applied.
        match shopverse_kit::config::load::<AppConfig>(f, std::iter::empty()) {
            Ok(_) => println!("ok      {}", f.display()),
            Err(e) => {
                bad += 1;
                println!("invalid {e}");
            }
        }
    }
    if bad == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("{bad} of {} configuration files are invalid", files.len());
        std::process::ExitCode::FAILURE
    }
}

pub async fn dlq_list(cfg: AppConfig, topic: Option<&str>, json: bool) -> anyhow::Result<()> {
    let bus = existing_bus(&cfg).await?;
    let parked = shopverse_events::dlq::list(bus.as_ref(), topic).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for d in &parked {
            writeln!(out, "{}", serde_json::to_string(d)?)?;
        }
        return Ok(());
    }
    if parked.is_empty() {
        writeln!(out, "no dead-lettered events")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<22} {:<9} {:<38} {:<20} {:<14} {:<8} reason",
        "topic", "position", "event id", "type", "consumer", "status"
    )?;
    for d in &parked {
        writeln!(
            out,
            "{:<22} {:<9} {:<38} {:<20} {:<14} {:<8} {}",
            d.dlq_topic,
            format!("{}/{}", d.partition, d.offset),
            d.event_id,
            d.event_type,
            d.consumer,
            if d.replayed { "replayed" } else { "parked" },
            d.reason
        )?;
    }
    let waiting = parked.iter().filter(|d| !d.replayed).count();
    writeln!(out, "{} parked, {waiting} not yet replayed", parked.len())?;
    Ok(())
}

pub async fn dlq_replay(
    cfg: AppConfig,
    topic: Option<&str>,
    event: Option<&str>,
) -> anyhow::Result<()> {
    let bus = existing_bus(&cfg).await?;
    let replayed = shopverse_events::dlq::replay(bus.as_ref(), topic, event).await?;
    if let (Some(id), true) = (event, replayed.is_empty()) {
        bail!("no dead-lettered event with id {id}");
    }
    for d in &replayed {
        println!(
            "replayed {} ({}) to {}",
            d.event_id, d.event_type, d.original_topic
        );
    }
    println!("{} events replayed", replayed.len());
    Ok(())
}
