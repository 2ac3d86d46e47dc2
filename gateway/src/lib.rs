//! The ShopVerse API gateway, on Pingora: every client request passes through it.
//!
//! # Layout
//! Read in this order; a request meets them in about this order too.
//! - [`config`]: the `gateway` section as read; [`live`]: what is compiled from it on each
//!   load (the pass-through route index, rate-limit headers), swapped whole on SIGHUP.
//! - [`h1`]: the HTTP/1 front, ahead of Pingora's server on plain connections. It parses and
//!   relays pass-through requests and answers fresh cache hits itself, and hands Pingora the
//!   rest. Its parts: request heads (`head`), strict chunked framing ([`h1::chunked`]), the
//!   relay, the per-thread upstream pool ([`h1::pool`]).
//! - [`policy`]: the request policy every path applies first: framing and size rules, the
//!   normalised target, the one table of headers that never go upstream.
//! - `proxy`: Pingora's `ProxyHttp` phases, for everything the front does not serve (REST,
//!   gRPC, HTTP/2, TLS, HTTP/1.0).
//! - `admit`: the one admission of every path: the route's access rule against the caller's
//!   token ([`auth`]), then the rate limit ([`ratelimit`]).
//! - `rest`: a REST call in its steps: route ([`router`]), admit, the edge cache, transcode
//!   ([`transcode`]), call the service ([`upstream`]).
//! - `passthrough`: pass-through and gRPC requests on Pingora's path.
//! - `reply`: the answers the gateway writes itself, in one JSON error shape; `gateway`: the
//!   state every path shares, with its metrics.
//! - [`openapi`]: the OpenAPI 3.1 document derived from the same routes.
//!
//! [`Builder::start`] runs Pingora on a thread of its own (it builds its own runtimes), stopped
//! by the same cancellation token as the rest of the process.

#![forbid(unsafe_code)]

mod access;
mod admit;
pub mod auth;
pub mod config;
pub mod feed;
mod gateway;
pub mod h1;
pub mod live;
pub mod openapi;
mod passthrough;
pub mod policy;
pub mod prefix;
pub mod protojson;
pub mod proxy;
pub mod ratelimit;
mod reply;
mod rest;
pub mod router;
pub mod transcode;
pub mod upstream;
pub mod web;

/// An aHash state seeded at random for this process (the token cache and the rate limit key
/// their maps with it: keyed, so nobody picks colliding keys, and far cheaper than SipHash).
pub(crate) fn seeded_ahash() -> ahash::RandomState {
    let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
    let (c, d) = uuid::Uuid::new_v4().as_u64_pair();
    ahash::RandomState::with_seeds(a, b, c, d)
}

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

use shopverse_kit::{CancellationToken, Clock};

pub use config::GatewayConfig;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway routes: {0}")]
    Router(#[from] router::RouterError),
    #[error("gateway: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("gateway: no `users` upstream is configured; tokens cannot be verified")]
    NoUsers,
    #[error("gateway: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway: tls: {0}")]
    Tls(String),
    #[error("gateway: redis_url: {0}")]
    Redis(String),
    #[error("gateway: did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
}

/// The OpenAPI document of the REST surface (served at `/openapi.json`).
pub fn openapi_json() -> Result<Vec<u8>, GatewayError> {
    let router = router::Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET)?;
    Ok(serde_json::to_vec_pretty(&openapi::document(&router)).unwrap_or_default())
}

/// Pingora's shutdown, driven by our tokens: `shutdown` stops, `upgrade` hands the listening
/// sockets to a new process first.
struct TokenWatch {
    shutdown: CancellationToken,
    upgrade: CancellationToken,
}

#[async_trait]
impl ShutdownSignalWatch for TokenWatch {
    async fn recv(&self) -> ShutdownSignal {
        tokio::select! {
            _ = self.shutdown.cancelled() => ShutdownSignal::GracefulTerminate,
            _ = self.upgrade.cancelled() => ShutdownSignal::GracefulUpgrade,
        }
    }
}

/// Pingora's graceful binary upgrade: the old process, told to (`trigger`), sends its listening
/// sockets over a Unix socket to a new process started with `take_over`; no connection is
/// refused in between.
#[derive(Clone)]
pub struct Upgrade {
    pub sock: std::path::PathBuf,
    /// This process takes the sockets of a running one.
    pub take_over: bool,
    /// Cancelled when this process should hand its sockets over and leave.
    pub trigger: CancellationToken,
}

/// Where the edge cache is, once open: empty when it is off, and for as long as another
/// process holds its files (the gateway this one upgraded), after which it is filled.
pub type CacheSlot = arc_swap::ArcSwapOption<shopverse_edge_cache::EdgeCache>;

/// How often a gateway whose cache another process holds tries to open it.
const CACHE_RETRY: Duration = Duration::from_millis(250);

/// A running gateway.
pub struct Running {
    pub addr: SocketAddr,
    /// The edge cache (for the admin listener's purge endpoint).
    pub cache: Arc<CacheSlot>,
    /// The HTTPS listener, when configured.
    pub tls_addr: Option<SocketAddr>,
    live: Arc<arc_swap::ArcSwap<live::Live>>,
    thread: std::thread::JoinHandle<()>,
}

/// Swaps the policies of a running gateway (see [`Reloader::reload`]).
#[derive(Clone)]
pub struct Reloader {
    live: Arc<arc_swap::ArcSwap<live::Live>>,
}

impl Running {
    pub fn reloader(&self) -> Reloader {
        Reloader {
            live: self.live.clone(),
        }
    }
}

impl Reloader {
    /// Swaps in new policies (rate limits, CORS, size limits, pass-through routes, trusted
    /// proxies, token claims) for the next requests; open connections carry on. Listeners,
    /// upstreams and TLS stay as they started: those need a restart (or a graceful upgrade).
    pub fn reload(&self, new: GatewayConfig) -> Vec<&'static str> {
        let current = self.live.load_full();
        let mut ignored = Vec::new();
        if new.listen != current.listen && new.listen.port() != 0 {
            ignored.push("listen");
        }
        if new.upstreams != current.upstreams {
            ignored.push("upstreams");
        }
        if new.threads != current.threads {
            ignored.push("threads");
        }
        let mut merged = new;
        merged.listen = current.listen;
        merged.upstreams = current.upstreams.clone();
        merged.threads = current.threads;
        merged.tls = current.tls.clone();
        self.live.store(Arc::new(live::Live::new(merged)));
        ignored
    }
}

impl Running {
    /// Waits for Pingora to finish (after the shutdown token was cancelled).
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// Resolves port 0 to a free port: Pingora binds by address, so the port has to be known
/// before it binds. (The port is free when probed; another process could take it in between.)
fn concrete(addr: SocketAddr) -> Result<SocketAddr, GatewayError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr)
        .map_err(|source| GatewayError::Listen { addr, source })?;
    l.local_addr()
        .map_err(|source| GatewayError::Listen { addr, source })
}

/// How a gateway is started: its configuration, and what it takes from the process around
/// it, each with a default (a fresh metrics registry, the system clock, a shutdown token of
/// its own, no binary upgrade, no event bus, no in-process services).
///
/// ```ignore
/// let running = shopverse_gateway::Builder::new(config)
///     .registry(&registry)
///     .shutdown(token)
///     .events(bus)
///     .start()
///     .await?;
/// ```
pub struct Builder {
    config: GatewayConfig,
    registry: prometheus::Registry,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    upgrade: Option<Upgrade>,
    events: Option<Arc<dyn shopverse_events::EventBus>>,
    local: shopverse_rpc::LocalServices,
}

impl Builder {
    pub fn new(config: GatewayConfig) -> Builder {
        Builder {
            config,
            registry: prometheus::Registry::new(),
            clock: Arc::new(shopverse_kit::SystemClock),
            shutdown: CancellationToken::new(),
            upgrade: None,
            events: None,
            local: shopverse_rpc::LocalServices::default(),
        }
    }

    /// Where the gateway's metrics are registered (served on the process's admin port).
    pub fn registry(mut self, registry: &prometheus::Registry) -> Builder {
        self.registry = registry.clone();
        self
    }

    /// The clock of token expiry, rate limits and the cache (tests drive one).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Builder {
        self.clock = clock;
        self
    }

    /// Cancelled when the gateway should stop.
    pub fn shutdown(mut self, shutdown: CancellationToken) -> Builder {
        self.shutdown = shutdown;
        self
    }

    /// Take over (or hand over) the listening sockets of another process.
    pub fn upgrade(mut self, upgrade: Upgrade) -> Builder {
        self.upgrade = Some(upgrade);
        self
    }

    /// Follow catalog changes on this bus to purge the edge cache.
    pub fn events(mut self, bus: Arc<dyn shopverse_events::EventBus>) -> Builder {
        self.events = Some(bus);
        self
    }

    /// The services this process runs itself, which the gateway calls in-process.
    pub fn local(mut self, local: &shopverse_rpc::LocalServices) -> Builder {
        self.local = local.clone();
        self
    }

    /// Starts the gateway; returns once it accepts connections.
    pub async fn start(self) -> Result<Running, GatewayError> {
        start(self).await
    }
}

/// The admin listener's cache purge: `POST /cache/purge?key=K`, `?tag=T` or `?all=true`.
pub fn purge_handler(slot: Arc<CacheSlot>) -> shopverse_kit::metrics::AdminHandler {
    Arc::new(move |method, path, query| {
        if path != "/cache/purge" {
            return None;
        }
        let cache = slot.load_full()?;
        if method != http::Method::POST {
            return Some((
                405,
                r#"{"code":"UNIMPLEMENTED","message":"use POST","details":[]}"#.to_owned(),
            ));
        }
        let params: Vec<(String, String)> = query
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), router::percent_decode(v)))
            .collect();
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let purged = match (get("key"), get("tag"), get("all")) {
            (Some(k), _, _) => cache.purge_key(k),
            (_, Some(t), _) => cache.purge_tag(t),
            (_, _, Some("true")) => cache.purge_all(),
            _ => {
                return Some((400, r#"{"code":"INVALID_ARGUMENT","message":"give key, tag or all=true","details":[]}"#.to_owned()));
            }
        };
        Some(match purged {
            Ok(n) => (200, format!(r#"{{"purged":{n}}}"#)),
            Err(e) => (
                500,
                serde_json::json!({"code": "INTERNAL", "message": e.to_string(), "details": []})
                    .to_string(),
            ),
        })
    })
}

/// Opens the edge cache.
type OpenCache = Arc<
    dyn Fn() -> Result<Arc<shopverse_edge_cache::EdgeCache>, shopverse_edge_cache::CacheError>
        + Send
        + Sync,
>;

/// Opens the edge cache `config` names.
fn open_cache(config: &GatewayConfig, registry: &prometheus::Registry) -> OpenCache {
    let dir = std::path::PathBuf::from(&config.cache.dir);
    let settings = shopverse_edge_cache::CacheConfig {
        max_disk_bytes: config.cache.max_disk_bytes,
        max_memory_bytes: config.cache.max_memory_bytes,
    };
    let registry = registry.clone();
    Arc::new(move || shopverse_edge_cache::EdgeCache::open(&dir, settings, &registry).map(Arc::new))
}

/// Tries `open` every [`CACHE_RETRY`] until it works (the process holding the cache has left)
/// or the gateway stops; then serves from it and follows catalog events.
async fn open_when_released(
    open: OpenCache,
    slot: Arc<CacheSlot>,
    events: Option<Arc<dyn shopverse_events::EventBus>>,
    shutdown: CancellationToken,
) {
    let waited = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CACHE_RETRY) => {}
        }
        // sled's open reads its files: off the runtime's threads.
        let attempt = tokio::task::spawn_blocking({
            let open = open.clone();
            move || open()
        })
        .await;
        if let Ok(Ok(c)) = attempt {
            tracing::info!(
                waited_ms = waited.elapsed().as_millis() as u64,
                "the edge cache was released and is open again"
            );
            slot.store(Some(c.clone()));
            if let Some(bus) = events {
                invalidate_from_events(bus, c, shutdown).await;
            }
            return;
        }
    }
}

/// Purges cached catalog pages as product events arrive, so an edit shows at the edge at once.
async fn invalidate_from_events(
    bus: Arc<dyn shopverse_events::EventBus>,
    cache: Arc<shopverse_edge_cache::EdgeCache>,
    shutdown: CancellationToken,
) {
    let topics = [shopverse_events::envelope::TOPIC_CATALOG.to_owned()];
    let mut sub = match bus.subscribe("gateway-edge-cache", &topics).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the edge cache cannot follow catalog events; entries expire by TTL only");
            return;
        }
    };
    loop {
        let records = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sub.poll(256, Duration::from_secs(1)) => r,
        };
        let Ok(records) = records else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        // The last record of each partition, committed once per batch: a commit per record
        // was a write to the event log per stock change, under load several per order. A
        // crash before the commit only purges those entries again.
        let mut last: Vec<shopverse_events::Record> = Vec::new();
        for r in records {
            if let Ok(env) = shopverse_events::envelope::decode_envelope(&r.payload)
                && env.r#type.starts_with("product.")
            {
                let _ = cache.purge_tag(&format!("product:{}", env.subject));
                let _ = cache.purge_tag("catalog");
            }
            shopverse_events::consumer::keep_last(&mut last, r);
        }
        if !last.is_empty() {
            let _ = sub.commit_all(&last).await;
        }
    }
}

/// What [`Builder::start`] does.
async fn start(b: Builder) -> Result<Running, GatewayError> {
    let Builder {
        config,
        registry,
        clock,
        shutdown,
        upgrade,
        events,
        local,
    } = b;
    let (registry, local) = (&registry, &local);
    if upgrade.as_ref().is_some_and(|u| u.take_over) && config.listen.port() == 0 {
        return Err(GatewayError::Tls(
            "an upgrade takes over a fixed port; gateway.listen has port 0".into(),
        ));
    }
    let router = router::Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET)?;
    let upstreams = upstream::Upstreams::new(
        &config.upstreams,
        Duration::from_millis(config.request_timeout_ms),
        local,
    )?;
    let users = upstreams.channel("users").ok_or(GatewayError::NoUsers)?;
    upstreams.check_until(Duration::from_secs(config.health_check_secs), &shutdown);
    let verifier = Arc::new(auth::Verifier::new(users, &config, clock.clone()).counted(registry));
    tokio::spawn(verifier.clone().refresh_loop(
        Duration::from_secs(config.jwks_refresh_secs),
        shutdown.clone(),
    ));
    let addr = concrete(config.listen)?;
    let threads = config.threads;
    let tls = match config.tls.listen {
        Some(l) => {
            for f in [&config.tls.cert_path, &config.tls.key_path] {
                std::fs::metadata(f).map_err(|e| GatewayError::Tls(format!("{f}: {e}")))?;
            }
            let mut settings = pingora::listeners::tls::TlsSettings::intermediate(
                &config.tls.cert_path,
                &config.tls.key_path,
            )
            .map_err(|e| GatewayError::Tls(e.to_string()))?;
            settings.enable_h2();
            Some((concrete(l)?, settings))
        }
        None => None,
    };
    let tls_addr = tls.as_ref().map(|(a, _)| *a);
    let openapi =
        bytes::Bytes::from(serde_json::to_vec(&openapi::document(&router)).unwrap_or_default());
    let metrics = gateway::Metrics::new(registry);
    let cache: Arc<CacheSlot> = Arc::default();
    if config.cache.enabled && !config.cache.dir.is_empty() {
        let open = open_cache(&config, registry);
        match open() {
            Ok(c) => {
                cache.store(Some(c.clone()));
                if let Some(bus) = events.clone() {
                    tokio::spawn(invalidate_from_events(bus, c, shutdown.clone()));
                }
            }
            // Another process holds it (during a binary upgrade, the old gateway): serve
            // uncached until it lets go, then open it.
            Err(e) => {
                tracing::warn!(error = %e, dir = %config.cache.dir, "the edge cache is held by another process; serving uncached until it is released");
                tokio::spawn(open_when_released(
                    open,
                    cache.clone(),
                    events.clone(),
                    shutdown.clone(),
                ));
            }
        }
    }
    let feed = config
        .live
        .enabled
        .then(|| feed::Feed::new(config.live.clone(), shutdown.clone()));
    if let (Some(bus), Some(feed)) = (events.clone(), feed.clone()) {
        tokio::spawn(feed::follow(feed, bus, shutdown.clone()));
    }
    let cache_handle = cache.clone();
    let gateway_clock = clock.clone();
    let mut limiter = ratelimit::Limiter::new(clock);
    if !config.redis_url.is_empty() {
        limiter = limiter
            .shared(
                &config.redis_url,
                &config.redis_prefix,
                Duration::from_millis(config.redis_timeout_ms),
                metrics.rate_limit_fallbacks.clone(),
            )
            .map_err(|e| GatewayError::Redis(e.to_string()))?;
        if let Err(e) = limiter.warm_up().await {
            tracing::warn!(error = %e, "Redis is not answering; rate limits are per gateway until it does");
        }
    }
    let live = Arc::new(arc_swap::ArcSwap::from_pointee(live::Live::new(
        config.clone(),
    )));
    let gateway = gateway::Gateway {
        router,
        upstreams,
        verifier,
        limiter,
        metrics,
        openapi,
        cache,
        inflight: Default::default(),
        request_ids: gateway::RequestIds::new(),
        access_log: config.access_log,
        feed,
        bus: events,
        web: config.web.then(web::Web::new),
        registry: registry.clone(),
        clock: gateway_clock,
        config: live.clone(),
    };
    let watch = TokenWatch {
        shutdown,
        upgrade: upgrade
            .as_ref()
            .map(|u| u.trigger.clone())
            .unwrap_or_default(),
    };
    let opt = pingora::server::configuration::Opt {
        upgrade: upgrade.as_ref().is_some_and(|u| u.take_over),
        ..Default::default()
    };
    let upgrade_sock = upgrade.as_ref().map(|u| u.sock.display().to_string());
    let thread = std::thread::Builder::new()
        .name("gateway".into())
        .spawn(move || {
            let mut conf = ServerConf {
                threads,
                // One single-threaded runtime per thread (connections stay on the thread that
                // accepted them): no work-stealing queues, wake-ups or cross-thread atomics on
                // the request path. Measured in bench/README.md.
                work_stealing: false,
                grace_period_seconds: Some(0),
                graceful_shutdown_timeout_seconds: Some(2),
                ..ServerConf::default()
            };
            if let Some(sock) = upgrade_sock {
                conf.upgrade_sock = sock;
                // Connections already open get this long to finish on the old process.
                conf.grace_period_seconds = Some(1);
                conf.graceful_shutdown_timeout_seconds = Some(5);
            }
            let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
            server.bootstrap();
            let gateway = Arc::new(gateway);
            let mut proxy =
                pingora::proxy::http_proxy(&server.configuration, proxy::Shared(gateway.clone()));
            // gRPC clients speak HTTP/2 in cleartext (h2c); HTTP/1.1 clients are unaffected.
            let mut opts = pingora::apps::HttpServerOptions::default();
            opts.h2c = true;
            proxy.server_options = Some(opts);
            // Pass-through requests are served by the front; the rest by Pingora's proxy.
            let mut service = pingora::services::listening::Service::new(
                "ShopVerse gateway".to_owned(),
                h1::Front::new(gateway, proxy),
            );
            service.add_tcp(&addr.to_string());
            if let Some((tls_addr, settings)) = tls {
                service.add_tls_with_settings(&tls_addr.to_string(), None, settings);
            }
            server.add_service(service);
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            });
        })
        .map_err(|source| GatewayError::Listen { addr, source })?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(Running {
                addr,
                cache: cache_handle,
                tls_addr,
                live,
                thread,
            });
        }
        if thread.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(GatewayError::NotListening(addr))
}
