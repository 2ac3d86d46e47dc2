//! Calls to the services: one balanced gRPC channel per service, requests and responses as
//! already-encoded protobuf bytes (the transcoder does the encoding).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
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

/// One channel per service, balanced over its endpoints.
#[derive(Clone)]
pub struct Upstreams {
    channels: HashMap<String, Channel>,
    /// `host:port` of each endpoint, for gRPC pass-through.
    addresses: HashMap<String, Vec<String>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    timeout: Duration,
}

impl Upstreams {
    /// Channels connect lazily: a service that is down makes its calls fail (503), not start-up.
    pub fn new(
        config: &std::collections::BTreeMap<String, Vec<String>>,
        timeout: Duration,
    ) -> Result<Upstreams, UpstreamError> {
        let mut channels = HashMap::new();
        let mut addresses = HashMap::new();
        for (service, urls) in config {
            addresses.insert(
                service.clone(),
                urls.iter()
                    .map(|u| {
                        u.trim_start_matches("http://")
                            .trim_start_matches("https://")
                            .trim_end_matches('/')
                            .to_owned()
                    })
                    .collect(),
            );
            let mut endpoints = Vec::new();
            for url in urls {
                let e = Endpoint::from_shared(url.clone())
                    .map_err(|source| UpstreamError {
                        service: service.clone(),
                        url: url.clone(),
                        source,
                    })?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30));
                endpoints.push(e);
            }
            let channel = if endpoints.len() == 1 {
                endpoints.remove(0).connect_lazy()
            } else {
                Channel::balance_list(endpoints.into_iter())
            };
            channels.insert(service.clone(), channel);
        }
        Ok(Upstreams {
            channels,
            addresses,
            next: Default::default(),
            timeout,
        })
    }

    /// One endpoint of `service`, round robin.
    pub fn pick_address(&self, service: &str) -> Option<String> {
        let list = self.addresses.get(service)?;
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        list.get(i % list.len().max(1)).cloned()
    }

    pub fn channel(&self, service: &str) -> Option<Channel> {
        self.channels.get(service).cloned()
    }

    /// One unary call of `path` on `service` with an encoded request.
    pub async fn unary(
        &self,
        service: &str,
        path: &str,
        body: Bytes,
        metadata: MetadataMap,
    ) -> Result<Bytes, Status> {
        let channel = self.channel(service).ok_or_else(|| {
            Status::unavailable(format!(
                "no upstream is configured for the {service} service"
            ))
        })?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| {
            Status::unavailable(format!("the {service} service is unavailable: {e}"))
        })?;
        let mut req = tonic::Request::from_parts(metadata, tonic::Extensions::default(), body);
        req.set_timeout(self.timeout);
        let path =
            http::uri::PathAndQuery::try_from(path).map_err(|e| Status::internal(e.to_string()))?;
        let resp = grpc.unary(req, path, RawCodec).await?;
        Ok(resp.into_inner())
    }
}
