//! Calls to the services: a pool of endpoints per service with health checks, ejection and
//! retries; requests and responses are already-encoded protobuf bytes (the transcoder encodes).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use shopverse_kit::{Link, LocalServices};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;
use tonic::{Status, metadata::MetadataMap};

/// Passes bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream {service}: endpoint `{url}`: {source}")]
pub struct UpstreamError {
    service: String,
    url: String,
    #[source]
    source: tonic::transport::Error,
}

/// Where a pass-through request goes: an address known at configuration time, or a host name
/// resolved (asynchronously) when the request is sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(std::net::SocketAddr),
    Name(Arc<str>),
}

impl Target {
    /// `host:port` as configured: parsed once here when it is an IP address.
    pub fn new(host_port: &str) -> Target {
        match host_port.parse() {
            Ok(a) => Target::Addr(a),
            Err(_) => Target::Name(host_port.into()),
        }
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

/// One endpoint of a service.
struct Member {
    /// `host:port`, for gRPC pass-through.
    address: Target,
    /// In-process when this process serves the endpoint itself, else a lazy channel.
    channel: Link,
    /// Cleared by a failed health check or a failed call; set by a passing health check.
    healthy: AtomicBool,
}

struct Pool {
    members: Vec<Member>,
    next: AtomicUsize,
}

impl Pool {
    /// Members to try, healthy ones first, starting round robin. With none healthy, all of
    /// them: a pool never refuses on stale health alone.
    fn order(&self) -> Vec<&Member> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..n).map(|i| &self.members[(start + i) % n]);
        let (mut healthy, sick): (Vec<&Member>, Vec<&Member>) =
            rotated.partition(|m| m.healthy.load(Ordering::Relaxed));
        healthy.extend(sick);
        healthy
    }

    /// The first member `order` would give, without building the order: the next healthy
    /// member round robin, else the next one. On every transcoded request, so no allocation.
    fn first(&self) -> Option<&Member> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &self.members[(start + i) % n])
            .find(|m| m.healthy.load(Ordering::Relaxed))
            .or(self.members.get(start % n))
    }
}

/// The upstream pools: per service, its endpoints with health, round robin over the healthy
/// ones. A connection failure ejects an endpoint until its next passing health check
/// (`grpc.health.v1`, every few seconds); idempotent calls (HTTP GET) are retried once on
/// another endpoint when the first attempt failed before any response.
#[derive(Clone)]
pub struct Upstreams {
    pools: Arc<HashMap<String, Pool>>,
    timeout: Duration,
}

/// The call never reached a service, or its connection failed before the answer: safe to
/// try elsewhere. tonic reports a connection that breaks under a call (a service stopping or
/// crashing) as `Unknown` with the transport error as its source, not as `Unavailable`.
fn unreachable(s: &Status) -> bool {
    if s.code() == tonic::Code::Unavailable {
        return true;
    }
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A lazy channel to `url`.
fn remote(service: &str, url: &str) -> Result<Link, UpstreamError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|source| UpstreamError {
            service: service.to_owned(),
            url: url.to_owned(),
            source,
        })?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy()
        .into())
}

impl Upstreams {
    /// Channels connect lazily: a service that is down makes its calls fail (503), not start-up.
    /// An endpoint that `local` serves (the appliance's own services) is called in-process; it
    /// is still checked and ejected like any other.
    pub fn new(
        config: &std::collections::BTreeMap<String, Vec<String>>,
        timeout: Duration,
        local: &LocalServices,
    ) -> Result<Upstreams, UpstreamError> {
        let mut pools = HashMap::new();
        for (service, urls) in config {
            let mut members = Vec::new();
            for url in urls {
                let channel = match local.link(url, timeout) {
                    Some(link) => link,
                    None => remote(service, url)?,
                };
                members.push(Member {
                    address: Target::new(
                        url.trim_start_matches("http://")
                            .trim_start_matches("https://")
                            .trim_end_matches('/'),
                    ),
                    channel,
                    healthy: AtomicBool::new(true),
                });
            }
            pools.insert(
                service.clone(),
                Pool {
                    members,
                    next: AtomicUsize::new(0),
                },
            );
        }
        Ok(Upstreams {
            pools: Arc::new(pools),
            timeout,
        })
    }

    /// One endpoint of `service` for a gRPC pass-through call, round robin over healthy ones.
    pub fn pick_address(&self, service: &str) -> Option<Target> {
        self.pools.get(service)?.first().map(|m| m.address.clone())
    }

    /// A channel to `service` (its first healthy endpoint), for the gateway's own calls.
    pub fn channel(&self, service: &str) -> Option<Link> {
        self.pools.get(service)?.first().map(|m| m.channel.clone())
    }

    /// Checks every endpoint's gRPC health once; returns how many are healthy.
    pub async fn check_health(&self) -> usize {
        let mut healthy = 0;
        for pool in self.pools.values() {
            for m in &pool.members {
                let ok = shopverse_kit::upstream::is_serving(
                    m.channel.clone(),
                    "",
                    Duration::from_secs(1),
                )
                .await;
                m.healthy.store(ok, Ordering::Relaxed);
                healthy += usize::from(ok);
            }
        }
        healthy
    }

    /// Health-checks every `every` until `shutdown`.
    pub async fn health_loop(self, every: Duration, shutdown: shopverse_kit::CancellationToken) {
        loop {
            self.check_health().await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One unary call of `path` on `service` with an encoded request; `idempotent` calls are
    /// retried once on another endpoint if the first never reached a service.
    pub async fn unary(
        &self,
        service: &str,
        path: &str,
        body: Bytes,
        metadata: MetadataMap,
        idempotent: bool,
    ) -> Result<Bytes, Status> {
        let pool = self.pools.get(service).ok_or_else(|| {
            Status::unavailable(format!(
                "no upstream is configured for the {service} service"
            ))
        })?;
        let path =
            http::uri::PathAndQuery::try_from(path).map_err(|e| Status::internal(e.to_string()))?;
        let tries = if idempotent { 2 } else { 1 };
        let mut last = Status::unavailable(format!("the {service} service is unavailable"));
        for member in pool.order().into_iter().take(tries) {
            let mut grpc = tonic::client::Grpc::new(member.channel.clone());
            if let Err(e) = grpc.ready().await {
                member.healthy.store(false, Ordering::Relaxed);
                last = Status::unavailable(format!("the {service} service is unavailable: {e}"));
                continue;
            }
            let mut req = tonic::Request::from_parts(
                metadata.clone(),
                tonic::Extensions::default(),
                body.clone(),
            );
            req.set_timeout(self.timeout);
            match grpc.unary(req, path.clone(), RawCodec).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if unreachable(&s) => {
                    member.healthy.store(false, Ordering::Relaxed);
                    last = if s.code() == tonic::Code::Unavailable {
                        s
                    } else {
                        Status::unavailable(format!(
                            "the {service} service is unavailable: {}",
                            s.message()
                        ))
                    };
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes the connection and the HTTP/2 preface, then drops it: the call fails
    /// under way, as when a service is stopped or crashes mid-call. That is a service that is
    /// not there (503), not an error of the gateway's (500).
    #[tokio::test]
    async fn a_connection_dropped_mid_call_is_unavailable() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = sock.read(&mut buf).await;
                drop(sock);
            }
        });
        let config = [("svc".to_owned(), vec![format!("http://{addr}")])]
            .into_iter()
            .collect();
        let ups = Upstreams::new(&config, Duration::from_secs(2), &LocalServices::default())
            .expect("pools");
        let err = ups
            .unary("svc", "/x.Y/Z", Bytes::new(), MetadataMap::new(), true)
            .await
            .expect_err("nothing answers");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }

    #[tokio::test]
    async fn first_is_the_next_healthy_member_and_agrees_with_order() {
        let urls: Vec<String> = (1..=3).map(|i| format!("http://127.0.0.{i}:1")).collect();
        let config = [("svc".to_owned(), urls)].into_iter().collect();
        let ups = Upstreams::new(&config, Duration::from_secs(1), &LocalServices::default())
            .expect("pools");
        let pool = &ups.pools["svc"];
        pool.members[1].healthy.store(false, Ordering::Relaxed);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..6 {
            let start = pool.next.load(Ordering::Relaxed);
            let picked = pool.first().expect("a member").address.clone();
            pool.next.store(start, Ordering::Relaxed);
            let ordered = pool.order()[0].address.clone();
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
            m.healthy.store(false, Ordering::Relaxed);
        }
        assert!(pool.first().is_some(), "none healthy: still one to try");
    }
}
