//! The edge cache of public catalog answers, on the REST path.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use pingora::prelude::Session;
use tonic::Code;
use tonic::metadata::MetadataMap;

use shopverse_edge_cache::Freshness;

use crate::gateway::Gateway;
use crate::reply::{Reply, etag_matches, http_status};
use crate::router::Access;
use crate::transcode::route_json;
use crate::upstream::Upstreams;

/// A service call, kept whole so a background refresh can repeat it.
#[derive(Clone)]
pub(super) struct UpstreamCall {
    pub(super) service: String,
    pub(super) path: String,
    pub(super) body: Bytes,
    pub(super) md: MetadataMap,
    pub(super) output: prost_reflect::MessageDescriptor,
    pub(super) json: Option<std::sync::Arc<crate::protojson::JsonWriter>>,
    pub(super) tags: Vec<String>,
}

/// The client asked for a response from the service, not from a cache.
pub(super) fn wants_fresh(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache") || v.contains("no-store"))
}

/// Tags an entry is purged by: a product's id, or `catalog` for lists.
pub(super) fn cache_tags(rpc: &str, bindings: &[(String, String)]) -> Vec<String> {
    match rpc {
        "GetProduct" => bindings
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| format!("product:{v}"))
            .collect(),
        _ => vec!["catalog".to_owned()],
    }
}

fn etag_of(body: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(body);
    format!(
        "\"{}\"",
        d.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

impl Gateway {
    /// Calls the service and turns its answer into a cache entry (`Err`: the reply to send).
    async fn fetch_entry(
        upstreams: &Upstreams,
        call: &UpstreamCall,
        config: &crate::config::EdgeCacheConfig,
        now: i64,
    ) -> Result<shopverse_edge_cache::Entry, tonic::Status> {
        let bytes = upstreams
            .unary(
                &call.service,
                &call.path,
                call.body.clone(),
                call.md.clone(),
                true,
            )
            .await?;
        let json = route_json(call.json.as_deref(), &call.output, &bytes)
            .map_err(tonic::Status::internal)?;
        let mut tags = call.tags.clone();
        if call.tags.is_empty()
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json)
            && let Some(id) = v["id"].as_str()
        {
            tags.push(format!("product:{id}"));
        }
        Ok(shopverse_edge_cache::Entry {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            etag: Some(etag_of(&json)),
            body: Bytes::from(json),
            stored_at_ms: now,
            ttl_ms: i64::try_from(config.ttl_secs * 1000).unwrap_or(i64::MAX),
            stale_while_revalidate_ms: i64::try_from(config.stale_while_revalidate_secs * 1000)
                .unwrap_or(i64::MAX),
            stale_if_error_ms: i64::try_from(config.stale_if_error_secs * 1000).unwrap_or(i64::MAX),
            tags,
        })
    }

    /// A reply from a cache entry: 304 when the client has it, else the body; `label` is the
    /// `x-cache` value.
    pub(super) fn reply_from_cache(
        &self,
        session: &Session,
        e: &shopverse_edge_cache::Entry,
        label: &'static str,
    ) -> Reply {
        let inm = session
            .req_header()
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok());
        self.reply_from_entry(inm, e, label)
    }

    /// [`Self::reply_from_cache`] for a request with this `If-None-Match`.
    pub(crate) fn reply_from_entry(
        &self,
        inm: Option<&str>,
        e: &shopverse_edge_cache::Entry,
        label: &'static str,
    ) -> Reply {
        let etag = e.etag.clone().unwrap_or_default();
        let max_age = e.max_age_secs(self.clock.now_ms());
        let mut reply = if etag_matches(inm, &etag) {
            Reply {
                status: StatusCode::NOT_MODIFIED,
                body: Bytes::new(),
                headers: Vec::new(),
                grpc: None,
            }
        } else {
            Reply {
                // The entry's bytes, shared rather than copied.
                body: e.body.clone(),
                ..Reply::json(
                    StatusCode::from_u16(e.status).unwrap_or(StatusCode::OK),
                    Vec::new(),
                )
            }
        };
        if label == "STALE" {
            self.metrics.cache_stale.inc();
        }
        reply.headers.push(("x-cache", label.to_owned()));
        reply.headers.push(("etag", etag));
        reply
            .headers
            .push(("cache-control", format!("public, max-age={max_age}")));
        reply
    }

    /// The edge cache: fresh entries are served, stale ones served while refreshed, misses
    /// fetched once however many ask at the same time, and a failing service answered from a
    /// stale entry while `stale_if_error` allows.
    pub(super) async fn cached(
        &self,
        cache: &Arc<shopverse_edge_cache::EdgeCache>,
        session: &Session,
        key: String,
        // What the caller found under `key` (None: nothing, or the client wants it fresh).
        looked_up: Option<(Arc<shopverse_edge_cache::Entry>, Freshness)>,
        call: UpstreamCall,
    ) -> Reply {
        // The live configuration, shared (not its cache section copied per request).
        let config = self.config.load_full();
        let no_cache = wants_fresh(session);
        let mut stale = None;
        if let Some((e, f)) = looked_up {
            match f {
                Freshness::Fresh => return self.reply_from_cache(session, &e, "HIT"),
                Freshness::Stale => {
                    // Serve now, refresh behind.
                    let (cache, upstreams, key, call, clock) = (
                        cache.clone(),
                        self.upstreams.clone(),
                        key.clone(),
                        call.clone(),
                        self.clock.clone(),
                    );
                    self.metrics
                        .upstream_calls
                        .with_label_values(&[&call.service])
                        .inc();
                    tokio::spawn(async move {
                        if let Ok(fresh) =
                            Self::fetch_entry(&upstreams, &call, &config.cache, clock.now_ms())
                                .await
                        {
                            let _ = cache.put(&key, &fresh);
                        }
                    });
                    return self.reply_from_cache(session, &e, "STALE");
                }
                Freshness::StaleIfError => stale = Some(e),
                Freshness::Expired => {}
            }
        }
        let lock = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Reply::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Internal,
                    "cache lock poisoned",
                    serde_json::json!([]),
                );
            };
            inflight.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock().await;
        // Someone else may have fetched it while we waited.
        if !no_cache && let Ok(Some((e, Freshness::Fresh))) = cache.get(&key, self.clock.now_ms()) {
            return self.reply_from_cache(session, &e, "HIT");
        }
        self.metrics
            .upstream_calls
            .with_label_values(&[&call.service])
            .inc();
        let fetched =
            Self::fetch_entry(&self.upstreams, &call, &config.cache, self.clock.now_ms()).await;
        // Stored before the lock is released: a request that takes the lock next (or a new
        // one, once the lock is gone) must find the entry, not fetch it again.
        if let Ok(entry) = &fetched
            && let Err(e) = cache.put(&key, entry)
        {
            tracing::warn!(error = %e, "storing in the edge cache failed");
        }
        drop(guard);
        if let Ok(mut inflight) = self.inflight.lock()
            && inflight
                .get(&key)
                .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            inflight.remove(&key);
        }
        match fetched {
            Ok(entry) => self.reply_from_cache(session, &entry, "MISS"),
            Err(status) => match stale {
                Some(e) => self.reply_from_cache(session, &e, "STALE"),
                None => {
                    let message = match status.code() {
                        Code::Unavailable => format!("the {} service is unavailable", call.service),
                        _ => status.message().to_owned(),
                    };
                    Reply::error(
                        http_status(status.code()),
                        status.code(),
                        &message,
                        serde_json::json!([]),
                    )
                    .with("x-cache", "MISS")
                }
            },
        }
    }

    /// Whether answers to `method` on `route` are kept in the edge cache.
    pub(crate) fn cacheable(&self, method: &Method, route: &crate::router::Route) -> bool {
        self.cache.load().is_some()
            && (*method == Method::GET || *method == Method::HEAD)
            && route.access == Access::Public
            && self
                .config
                .load()
                .cache
                .rpcs
                .iter()
                .any(|r| r == route.method.name())
    }
}
