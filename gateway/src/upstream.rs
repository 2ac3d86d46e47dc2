//! Calls to the services: one [`Pool`] of endpoints per service (health checks, ejection, round
//! robin: the same pool the services use to reach each other) and retries of idempotent calls;
//! requests and responses are already-encoded protobuf bytes (the transcoder encodes).

pub use shopverse_rpc::Target;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use shopverse_kit::CancellationToken;
use shopverse_rpc::{Link, LocalServices, Pool, PoolError};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
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

/// The upstream pools: per service, its endpoints with health, round robin over the healthy
/// ones. A connection failure ejects an endpoint until its next passing health check
/// (`grpc.health.v1`, every few seconds); idempotent calls (HTTP GET) are retried once on
/// another endpoint when the first attempt failed before any response.
#[derive(Clone)]
pub struct Upstreams {
    pools: Arc<HashMap<String, Arc<Pool>>>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream {service}: {source}")]
pub struct UpstreamError {
    service: String,
    #[source]
    source: PoolError,
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
            let pool =
                Pool::new(urls, "", Some(timeout), local).map_err(|source| UpstreamError {
                    service: service.clone(),
                    source,
                })?;
            pools.insert(service.clone(), Arc::new(pool));
        }
        Ok(Upstreams {
            pools: Arc::new(pools),
            timeout,
        })
    }

    /// One endpoint of `service` for a gRPC pass-through call, round robin over healthy ones.
    pub fn pick_address(&self, service: &str) -> Option<Target> {
        Some(self.pools.get(service)?.first()?.target().clone())
    }

    /// A link to `service` for the gateway's own calls, balanced over its healthy endpoints.
    pub fn channel(&self, service: &str) -> Option<Link> {
        Some(Link::pooled(self.pools.get(service)?.clone()))
    }

    /// Each service with how many of its replicas are in rotation, of how many.
    pub fn health(&self) -> Vec<(String, usize, usize)> {
        let mut all: Vec<(String, usize, usize)> = self
            .pools
            .iter()
            .map(|(name, pool)| {
                let (healthy, total) = pool.health();
                (name.clone(), healthy, total)
            })
            .collect();
        all.sort();
        all
    }

    /// Health-checks every pool every `every` until `shutdown`.
    pub fn check_until(&self, every: Duration, shutdown: &CancellationToken) {
        for pool in self.pools.values() {
            tokio::spawn(pool.clone().check_until(every, shutdown.clone()));
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
            let mut grpc = tonic::client::Grpc::new(member.link().clone());
            if let Err(e) = grpc.ready().await {
                member.eject();
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
                    member.eject();
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
}
