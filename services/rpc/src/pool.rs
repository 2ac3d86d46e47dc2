//! The one way a caller reaches a service's replicas: a [`Pool`] of endpoints
//! (`http://a:50052,http://b:50052`), round robin over the ones whose gRPC health check says
//! SERVING. A replica that fails a check or a call is taken out until it passes a check again;
//! with none healthy, calls still go out (a pool never refuses on stale health alone). An endpoint
//! this process serves itself is called in-process ([`crate::link`]).
//!
//! An endpoint written `dns:///host:port` (gRPC's name syntax) stands for every address the
//! name resolves to, looked up again every [`RESOLVE_EVERY`]: behind a Kubernetes headless
//! Service that is every ready pod, so calls spread over all of them and follow scaling and
//! restarts. (`http://host:port` is one endpoint whose one connection stays with whichever
//! address it first reached.)
//!
//! Services use a pool through [`Link::pooled`] as the transport of their tonic clients; the
//! gateway uses [`Pool::first`] and [`Pool::order`] directly, to pass bytes through and to retry
//! idempotent calls on another replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;

use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::link::{Link, LocalServices};

/// How often a service's pool checks each replica's health.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a replica has to answer its health check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a `dns:///` endpoint's name is looked up again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// The scheme of an endpoint that stands for every address its name resolves to.
pub const DNS_SCHEME: &str = "dns:///";

/// Looks a `host:port` up: every address it has now.
pub type Resolver =
    Arc<dyn Fn(String) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The system's resolver, without blocking a runtime thread.
pub fn system_resolver() -> Resolver {
    Arc::new(|name| Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) }))
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no endpoint given")]
    Empty,
    #[error("`{url}` is not a valid endpoint: {reason}")]
    Invalid { url: String, reason: String },
}

/// Whether `service` on `link` answers SERVING to a gRPC health check (`grpc.health.v1`)
/// within `timeout`; an empty `service` asks about the server as a whole.
pub async fn is_serving(link: impl Into<Link>, service: &str, timeout: Duration) -> bool {
    let mut client = HealthClient::new(link.into());
    let check = client.check(HealthCheckRequest {
        service: service.to_owned(),
    });
    matches!(
        tokio::time::timeout(timeout, check).await,
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving
    )
}

/// The URLs of a comma-separated list, checked.
pub fn parse_list(urls: &str) -> Result<Vec<String>, PoolError> {
    let list: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        return Err(PoolError::Empty);
    }
    for u in &list {
        match u.strip_prefix(DNS_SCHEME) {
            Some(name) => {
                endpoint(&format!("http://{name}"), None)?;
                if !name
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                {
                    return Err(PoolError::Invalid {
                        url: u.clone(),
                        reason: "a dns:/// endpoint names host:port".into(),
                    });
                }
            }
            None => {
                endpoint(u, None)?;
            }
        }
    }
    Ok(list)
}

/// A lazy channel's endpoint for `url`; `timeout` bounds each call when given.
fn endpoint(url: &str, timeout: Option<Duration>) -> Result<Endpoint, PoolError> {
    let invalid = |reason: String| PoolError::Invalid {
        url: url.to_owned(),
        reason,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(invalid(
            "must be an http:// or https:// URL, or dns:///host:port".into(),
        ));
    }
    let e = Endpoint::from_shared(url.to_owned())
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(match timeout {
        Some(t) => e.timeout(t),
        None => e,
    })
}

/// Where an endpoint listens, for a caller that opens its own connection (the gateway's gRPC
/// pass-through): an address known at configuration time, or a host name resolved
/// (asynchronously) when the request is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(std::net::SocketAddr),
    Name(Arc<str>),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Name(n) => f.write_str(n),
        }
    }
}

impl Target {
    /// `host:port` as configured: parsed once here when it is an IP address.
    pub fn new(host_port: &str) -> Target {
        match host_port.parse() {
            Ok(a) => Target::Addr(a),
            Err(_) => Target::Name(host_port.into()),
        }
    }

    /// The `host:port` of an `http://` or `https://` URL.
    fn of_url(url: &str) -> Target {
        Target::new(
            url.trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/'),
        )
    }

    /// The socket address to connect to; a name is looked up without blocking the thread.
    pub async fn resolve(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Target::Addr(a) => Ok(*a),
            Target::Name(n) => tokio::net::lookup_host(&**n).await?.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("{n}: no address"))
            }),
        }
    }
}

/// One replica of a service.
pub struct Member {
    url: String,
    target: Target,
    link: Link,
    /// Cleared by a failed health check or a failed call; set by a passing health check.
    healthy: AtomicBool,
}

impl Member {
    /// Whether it stands for an address a `dns:///` name resolved to.
    fn discovered(&self) -> bool {
        self.url.contains('#')
    }

    fn resolved_from(&self, name: &str) -> bool {
        self.url.rsplit_once('#').is_some_and(|(_, n)| n == name)
    }

    /// Where it listens.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// How to call it: in-process when this process serves it, else a lazy channel.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Takes it out of rotation until it passes a health check: a call to it failed before
    /// any answer.
    pub fn eject(&self) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(upstream = %self.url, "replica failed a call; out of the pool");
        }
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The replicas of one service with their health, round robin over the healthy ones.
pub struct Pool {
    /// The gRPC service name its health check asks about; empty asks about the server.
    health_service: String,
    /// The configured endpoints' members, then those of `dns:///` names as last resolved.
    members: ArcSwap<Vec<Arc<Member>>>,
    next: AtomicUsize,
    /// `host:port` of each `dns:///` endpoint.
    names: Vec<String>,
    /// How members of resolved addresses are made.
    timeout: Option<Duration>,
    local: LocalServices,
    resolver: Resolver,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.members.load().iter().map(|m| (&m.url, m.is_healthy())))
            .finish()
    }
}

impl Member {
    fn new(
        url: &str,
        timeout: Option<Duration>,
        local: &LocalServices,
    ) -> Result<Member, PoolError> {
        let local_link = local.link(url, timeout.unwrap_or(Duration::from_secs(30)));
        let link = match local_link {
            Some(l) => l,
            None => endpoint(url, timeout)?.connect_lazy().into(),
        };
        Ok(Member {
            url: url.to_owned(),
            target: Target::of_url(url),
            link,
            healthy: AtomicBool::new(true),
        })
    }
}

impl Pool {
    /// A pool of `urls`, every replica in until its first check. Channels connect lazily: a
    /// replica that is down makes calls fail, not start-up. An endpoint `local` serves is
    /// called in-process and is still checked and ejected like any other. `timeout` bounds each
    /// call when given.
    pub fn new(
        urls: &[String],
        health_service: &str,
        timeout: Option<Duration>,
        local: &LocalServices,
    ) -> Result<Pool, PoolError> {
        if urls.is_empty() {
            return Err(PoolError::Empty);
        }
        let mut members = Vec::new();
        let mut names = Vec::new();
        for url in urls {
            match url.strip_prefix(DNS_SCHEME) {
                Some(name) => names.push(name.to_owned()),
                None => members.push(Arc::new(Member::new(url, timeout, local)?)),
            }
        }
        Ok(Pool {
            health_service: health_service.to_owned(),
            members: ArcSwap::from_pointee(members),
            next: AtomicUsize::new(0),
            names,
            timeout,
            local: local.clone(),
            resolver: system_resolver(),
        })
    }

    /// Looks `dns:///` names up with `resolver` instead of the system's.
    pub fn with_resolver(mut self, resolver: Resolver) -> Pool {
        self.resolver = resolver;
        self
    }

    /// Whether members come and go with what names resolve to.
    pub fn discovers(&self) -> bool {
        !self.names.is_empty()
    }

    /// How many members are in rotation, of how many.
    pub fn health(&self) -> (usize, usize) {
        let members = self.members.load();
        let healthy = members.iter().filter(|m| m.is_healthy()).count();
        (healthy, members.len())
    }

    /// Members to try, healthy ones first, starting round robin. With none healthy, all of
    /// them; none at all while a `dns:///` name has not resolved yet.
    pub fn order(&self) -> Vec<Arc<Member>> {
        let members = self.members.load();
        let n = members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|i| members[(start + i) % n].clone());
        let (mut healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|m| m.is_healthy());
        healthy.extend(sick);
        healthy
    }

    /// The first member [`Pool::order`] would give, without building the order: the next
    /// healthy member round robin, else the next one; none while a `dns:///` name has not
    /// resolved yet. No allocation: it is on every request.
    pub fn first(&self) -> Option<Arc<Member>> {
        let members = self.members.load();
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| members[i].is_healthy())
            .unwrap_or(start % n);
        Some(members[i].clone())
    }

    /// Looks every `dns:///` name up again and makes the members what they resolve to now
    /// (besides the configured endpoints): a member whose address is still there is kept, with
    /// its connection and health; a new address joins healthy; a gone one leaves. A name that
    /// does not resolve keeps its members (a resolver hiccup must not empty the pool).
    /// Returns the number of members.
    pub async fn resolve(&self) -> usize {
        if self.names.is_empty() {
            return self.members.load().len();
        }
        let current = self.members.load_full();
        let mut next: Vec<Arc<Member>> = current
            .iter()
            .filter(|m| !m.discovered())
            .cloned()
            .collect();
        for name in &self.names {
            let port = name.rsplit_once(':').map_or("", |(_, p)| p);
            let addrs = match (self.resolver)(name.clone()).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) | Err(_) => {
                    tracing::warn!(upstream = %name, "the name did not resolve; keeping its last addresses");
                    next.extend(
                        current
                            .iter()
                            .filter(|m| m.discovered() && m.resolved_from(name))
                            .cloned(),
                    );
                    continue;
                }
            };
            for addr in addrs {
                let url = format!("http://{addr}#{name}");
                if next.iter().any(|m| m.url == url) {
                    continue;
                }
                let member = match current.iter().find(|m| m.url == url) {
                    Some(m) => m.clone(),
                    None => match Member::new(&format!("http://{addr}"), self.timeout, &self.local)
                    {
                        Ok(mut m) => {
                            tracing::info!(upstream = %name, %addr, port, "a replica joined the pool");
                            m.url = url;
                            Arc::new(m)
                        }
                        Err(_) => continue,
                    },
                };
                next.push(member);
            }
        }
        for gone in current
            .iter()
            .filter(|m| m.discovered() && !next.iter().any(|n| n.url == m.url))
        {
            tracing::info!(upstream = %gone.url, "a replica left the pool");
        }
        let n = next.len();
        self.members.store(Arc::new(next));
        n
    }

    /// Checks every member's health once; returns how many are healthy.
    pub async fn check(&self) -> usize {
        let mut healthy = 0;
        let members = self.members.load_full();
        for m in members.iter() {
            let ok = is_serving(m.link.clone(), &self.health_service, PROBE_TIMEOUT).await;
            let was = m.healthy.swap(ok, Ordering::Relaxed);
            match (was, ok) {
                (false, true) => {
                    tracing::info!(upstream = %m.url, "replica healthy again; back in the pool");
                }
                (true, false) => {
                    tracing::warn!(upstream = %m.url, "replica failed its health check; out of the pool");
                }
                _ => {}
            }
            healthy += usize::from(ok);
        }
        healthy
    }

    /// Checks health every `every` until `shutdown`, and looks `dns:///` names up again every
    /// [`RESOLVE_EVERY`]. A fixed pool of one is not checked: with nothing to fall back on,
    /// its health changes nothing.
    pub async fn check_until(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        if !self.discovers() && self.members.load().len() < 2 {
            return;
        }
        let mut resolved: Option<tokio::time::Instant> = None;
        loop {
            if self.discovers() && resolved.is_none_or(|t| t.elapsed() >= RESOLVE_EVERY) {
                resolved = Some(tokio::time::Instant::now());
                self.resolve().await;
            }
            if self.members.load().len() > 1 {
                self.check().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every.min(RESOLVE_EVERY)) => {}
            }
        }
    }
}

/// A link to the service at `urls` (a comma-separated list) for its tonic clients. One URL: that
/// endpoint's link (in-process when `local` serves it). Several: a [`Pool`], health-checked
/// every [`CHECK_EVERY`] until `shutdown`.
pub fn balanced(
    urls: &str,
    service: &'static str,
    timeout: Duration,
    local: &LocalServices,
    shutdown: CancellationToken,
) -> Result<Link, PoolError> {
    let list = parse_list(urls)?;
    let pool = Arc::new(Pool::new(&list, service, Some(timeout), local)?);
    if !pool.discovers()
        && let [one] = pool.members.load().as_slice()
    {
        return Ok(one.link.clone());
    }
    tokio::spawn(pool.clone().check_until(CHECK_EVERY, shutdown));
    Ok(Link::pooled(pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(n: u8) -> Pool {
        let urls: Vec<String> = (1..=n).map(|i| format!("http://127.0.0.{i}:1")).collect();
        Pool::new(&urls, "", None, &LocalServices::default()).expect("pool")
    }

    /// A lazy channel needs a runtime to be made, hence `tokio::test`.
    #[tokio::test]
    async fn first_is_the_next_healthy_member_and_agrees_with_order() {
        let pool = pool_of(3);
        pool.members.load()[1].eject();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let start = pool.next.load(Ordering::Relaxed);
            let picked = pool.first().expect("a member").target().clone();
            pool.next.store(start, Ordering::Relaxed);
            let ordered = pool.order()[0].target().clone();
            assert_eq!(picked, ordered);
            assert_ne!(
                picked,
                Target::new("127.0.0.2:1"),
                "an ejected member is skipped"
            );
            seen.insert(picked);
        }
        assert_eq!(seen.len(), 2, "round robin over the healthy ones: {seen:?}");
        for m in pool.members.load().iter() {
            m.eject();
        }
        let _still_one_to_try = pool.first();
        assert_eq!(pool.order().len(), 3, "none healthy: all are tried");
    }

    #[test]
    fn bad_lists_are_refused_with_the_url() {
        assert!(matches!(parse_list(" , "), Err(PoolError::Empty)));
        let e = parse_list("http://a:1,ftp://b:2").expect_err("ftp");
        assert!(e.to_string().contains("ftp://b:2"), "{e}");
        assert_eq!(
            parse_list("http://a:1, http://b:2 ,").expect("two"),
            ["http://a:1", "http://b:2"]
        );
    }

    #[tokio::test]
    async fn a_check_takes_out_replicas_that_do_not_answer() {
        let pool = pool_of(2);
        assert_eq!(pool.check().await, 0, "nothing listens at port 1");
        assert!(pool.members.load().iter().all(|m| !m.is_healthy()));
    }

    /// Through a pooled link, a call that finds its replica gone ejects it, and the calls after
    /// it go to the replica that answers.
    #[tokio::test]
    async fn a_pooled_link_ejects_a_replica_that_fails_and_uses_the_other() {
        let local = LocalServices::default();
        let (gone, live): (std::net::SocketAddr, std::net::SocketAddr) = (
            "127.0.0.1:50901".parse().expect("addr"),
            "127.0.0.1:50902".parse().expect("addr"),
        );
        local.declare(gone);
        local.declare(live);
        local.stop(gone);
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("x.Y", tonic_health::ServingStatus::Serving)
            .await;
        local.serve(live, tonic::service::Routes::new(health));
        let urls = [format!("http://{gone}"), format!("http://{live}")];
        let pool =
            Arc::new(Pool::new(&urls, "x.Y", Some(Duration::from_secs(2)), &local).expect("pool"));
        let link = Link::pooled(pool.clone());
        let first = is_serving(link.clone(), "x.Y", Duration::from_secs(2)).await;
        assert!(!first, "the first call goes to the stopped replica");
        assert!(!pool.members.load()[0].is_healthy(), "and ejects it");
        for _ in 0..4 {
            assert!(is_serving(link.clone(), "x.Y", Duration::from_secs(2)).await);
        }
        assert_eq!(pool.check().await, 1, "a check agrees: one of two serves");
    }

    /// A `dns:///` name stands for every address it resolves to, looked up again: two
    /// replicas, then three (calls spread over all of them), then a resolver failure that
    /// keeps the last answer, then one replica gone.
    #[tokio::test]
    async fn a_dns_name_is_every_address_it_resolves_to_as_it_changes() {
        use std::sync::Mutex;
        let local = LocalServices::default();
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| format!("127.0.0.1:5091{i}").parse().expect("addr"))
            .collect();
        let hits: Vec<Arc<AtomicUsize>> = addrs.iter().map(|_| Arc::default()).collect();
        for (addr, hits) in addrs.iter().zip(&hits) {
            local.declare(*addr);
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("x.Y", tonic_health::ServingStatus::Serving)
                .await;
            let hits = hits.clone();
            let counted = Counted {
                inner: health,
                hits: hits.clone(),
            };
            local.serve(*addr, tonic::service::Routes::new(counted));
        }
        let answer: Arc<Mutex<std::io::Result<Vec<SocketAddr>>>> =
            Arc::new(Mutex::new(Ok(addrs[..2].to_vec())));
        let told = answer.clone();
        let resolver: Resolver = Arc::new(move |name| {
            assert_eq!(name, "orders.shop.svc:50053");
            let now = match &*told.lock().expect("lock") {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            Box::pin(async move { now })
        });
        let urls = parse_list("dns:///orders.shop.svc:50053").expect("a dns endpoint");
        let pool = Arc::new(
            Pool::new(&urls, "x.Y", Some(Duration::from_secs(2)), &local)
                .expect("pool")
                .with_resolver(resolver),
        );
        assert!(pool.first().is_none(), "nothing before the first lookup");
        let link = Link::pooled(pool.clone());
        let calls = |n: usize| {
            let link = link.clone();
            async move {
                for _ in 0..n {
                    assert!(is_serving(link.clone(), "x.Y", Duration::from_secs(2)).await);
                }
            }
        };
        let counts = || {
            hits.iter()
                .map(|h| h.swap(0, Ordering::SeqCst))
                .collect::<Vec<_>>()
        };

        assert_eq!(pool.resolve().await, 2);
        calls(10).await;
        assert_eq!(counts(), [5, 5, 0], "two replicas share the calls");

        *answer.lock().expect("lock") = Ok(addrs.clone());
        assert_eq!(pool.resolve().await, 3);
        calls(9).await;
        assert_eq!(counts(), [3, 3, 3], "a third replica joins");

        *answer.lock().expect("lock") = Err(std::io::ErrorKind::TimedOut.into());
        assert_eq!(pool.resolve().await, 3, "a failed lookup keeps the members");

        *answer.lock().expect("lock") = Ok(vec![addrs[0], addrs[2]]);
        assert_eq!(pool.resolve().await, 2);
        calls(4).await;
        assert_eq!(counts(), [2, 0, 2], "the replica that left gets nothing");
        assert!(parse_list("dns:///no-port").is_err());
    }

    /// Counts the calls that reach a service.
    #[derive(Clone)]
    struct Counted<S> {
        inner: S,
        hits: Arc<AtomicUsize>,
    }

    impl<S: tonic::server::NamedService> tonic::server::NamedService for Counted<S> {
        const NAME: &'static str = S::NAME;
    }

    impl<S, R> tower_service::Service<R> for Counted<S>
    where
        S: tower_service::Service<R>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.inner.poll_ready(cx)
        }
        fn call(&mut self, req: R) -> Self::Future {
            self.hits.fetch_add(1, Ordering::SeqCst);
            self.inner.call(req)
        }
    }
}
