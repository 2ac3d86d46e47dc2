//! The one way a caller reaches a service's replicas: a [`Pool`] of endpoints
//! (`http://a:50052,http://b:50052`), round robin over the ones whose gRPC health check says
//! SERVING. A replica that fails a check or a call is taken out until it passes a check again;
//! with none healthy, calls still go out (a pool never refuses on stale health alone). An endpoint
//! this process serves itself is called in-process ([`crate::link`]).
//!
//! Services use a pool through [`Link::pooled`] as the transport of their tonic clients; the
//! gateway uses [`Pool::first`] and [`Pool::order`] directly, to pass bytes through and to retry
//! idempotent calls on another replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

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
        endpoint(u, None)?;
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
        return Err(invalid("must be an http:// or https:// URL".into()));
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
    members: Vec<Member>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.members.iter().map(|m| (&m.url, m.is_healthy())))
            .finish()
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
        let members = urls
            .iter()
            .map(|url| {
                let local_link = local.link(url, timeout.unwrap_or(Duration::from_secs(30)));
                let link = match local_link {
                    Some(l) => l,
                    None => endpoint(url, timeout)?.connect_lazy().into(),
                };
                Ok(Member {
                    url: url.clone(),
                    target: Target::of_url(url),
                    link,
                    healthy: AtomicBool::new(true),
                })
            })
            .collect::<Result<Vec<_>, PoolError>>()?;
        Ok(Pool {
            health_service: health_service.to_owned(),
            members,
            next: AtomicUsize::new(0),
        })
    }

    /// How many members are in rotation, of how many.
    pub fn health(&self) -> (usize, usize) {
        let healthy = self.members.iter().filter(|m| m.is_healthy()).count();
        (healthy, self.members.len())
    }

    /// Members to try, healthy ones first, starting round robin. With none healthy, all of
    /// them.
    pub fn order(&self) -> Vec<&Member> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|i| &self.members[(start + i) % n]);
        let (mut healthy, sick): (Vec<&Member>, Vec<&Member>) =
            rotated.partition(|m| m.is_healthy());
        healthy.extend(sick);
        healthy
    }

    /// The first member [`Pool::order`] would give, without building the order: the next
    /// healthy member round robin, else the next one. No allocation: it is on every request.
    pub fn first(&self) -> &Member {
        &self.members[self.first_index()]
    }

    pub(crate) fn first_index(&self) -> usize {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.members[i].is_healthy())
            .unwrap_or(start % n)
    }

    pub(crate) fn member(&self, i: usize) -> &Member {
        &self.members[i]
    }

    /// Checks every member's health once; returns how many are healthy.
    pub async fn check(&self) -> usize {
        let mut healthy = 0;
        for m in &self.members {
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

    /// Checks health every `every` until `shutdown`. A pool of one is not checked: with
    /// nothing to fall back on, its health changes nothing.
    pub async fn check_until(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        if self.members.len() < 2 {
            return;
        }
        loop {
            self.check().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
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
    if let [one] = pool.members.as_slice() {
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
        pool.members[1].eject();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let start = pool.next.load(Ordering::Relaxed);
            let picked = pool.first().target().clone();
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
        for m in &pool.members {
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
        assert!(pool.members.iter().all(|m| !m.is_healthy()));
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
        assert!(!pool.members[0].is_healthy(), "and ejects it");
        for _ in 0..4 {
            assert!(is_serving(link.clone(), "x.Y", Duration::from_secs(2)).await);
        }
        assert_eq!(pool.check().await, 1, "a check agrees: one of two serves");
    }
}
