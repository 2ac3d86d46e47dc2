//! What the operations console reads and does beyond the services' own routes, for admins:
//!
//! - `GET /v1/admin/system`: each service's replicas in rotation, the gateway's counts and
//!   latency buckets per service since it started (the console takes rates and p99 from the
//!   difference of two reads), and each event consumer's lag when the consumers run in this
//!   process.
//! - `GET /v1/admin/dlq`, `POST /v1/admin/dlq:replay` `{"eventId"}`: parked events, and
//!   replaying one (or, without an id, every one not yet replayed).
//! - `GET /v1/admin/cache`, `POST /v1/admin/cache:purge` `{"key"|"tag"|"all": true}`: the edge
//!   cache's size and counts, and purging it.

use http::{Method, StatusCode};
use pingora::prelude::Session;
use serde_json::json;
use tonic::Code;

use crate::gateway::Gateway;
use crate::proxy::{Ctx, Label};
use crate::reply::Reply;

const SYSTEM: &str = "/v1/admin/system";
const DLQ: &str = "/v1/admin/dlq";
const DLQ_REPLAY: &str = "/v1/admin/dlq:replay";
const CACHE: &str = "/v1/admin/cache";
const CACHE_PURGE: &str = "/v1/admin/cache:purge";

/// Whether `path` is one of these routes.
pub fn is_console(path: &str) -> bool {
    matches!(path, SYSTEM | DLQ | DLQ_REPLAY | CACHE | CACHE_PURGE)
}

fn refused(status: StatusCode, code: Code, message: &str) -> Reply {
    Reply::error(status, code, message, json!([]))
}

fn ok(body: serde_json::Value) -> Reply {
    Reply::json(StatusCode::OK, body.to_string().into_bytes())
}

impl Gateway {
    pub(crate) async fn console_call(&self, session: &mut Session, ctx: &mut Ctx) -> Reply {
        let path = session.req_header().uri.path().to_owned();
        let label = match path.as_str() {
            SYSTEM => SYSTEM,
            DLQ => DLQ,
            DLQ_REPLAY => DLQ_REPLAY,
            CACHE => CACHE,
            _ => CACHE_PURGE,
        };
        ctx.route = Label::Fixed(label);
        let want = if matches!(label, DLQ_REPLAY | CACHE_PURGE) {
            Method::POST
        } else {
            Method::GET
        };
        if session.req_header().method != want {
            return refused(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                &format!("use {want}"),
            )
            .with("allow", want.as_str());
        }
        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let ip = self.client_ip(session);
        let admitted = self
            .admit(
                &path,
                crate::router::Access::Admin,
                authorization.as_deref(),
                ip,
            )
            .await;
        let admitted = match admitted {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        ctx.identity = admitted.identity.clone();
        let body = if want == Method::POST {
            match self.read_body(session).await {
                Ok(b) if b.is_empty() => json!({}),
                Ok(b) => match serde_json::from_slice::<serde_json::Value>(&b) {
                    Ok(v) if v.is_object() => v,
                    _ => {
                        let message = "the body must be a JSON object";
                        return refused(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
                    }
                },
                Err(reply) => return reply,
            }
        } else {
            json!({})
        };
        let mut reply = match label {
            SYSTEM => ok(self.system()),
            DLQ | DLQ_REPLAY => self.dead_letters(label == DLQ_REPLAY, &body).await,
            _ => self.cache_console(label == CACHE_PURGE, &body),
        };
        reply
            .headers
            .extend(admitted.rate.iter().flat_map(|r| r.pairs()));
        reply
    }

    /// Replicas in rotation per service, and the gateway's calls and latency buckets per
    /// service (from its request metrics, by the service each route calls).
    fn system(&self) -> serde_json::Value {
        use prometheus::core::Collector;
        let mut per_service: std::collections::BTreeMap<String, (u64, Vec<(f64, u64)>)> =
            Default::default();
        for family in self.metrics.latency.collect() {
            for m in family.get_metric() {
                let route = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "route")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                let service = self.router.service_of_template(&route).unwrap_or("gateway");
                let h = m.get_histogram();
                let entry = per_service.entry(service.to_owned()).or_default();
                entry.0 += h.get_sample_count();
                let buckets = h.get_bucket();
                if entry.1.is_empty() {
                    entry.1 = buckets
                        .iter()
                        .map(|b| (b.upper_bound(), b.cumulative_count()))
                        .collect();
                } else {
                    for (acc, b) in entry.1.iter_mut().zip(buckets) {
                        acc.1 += b.cumulative_count();
                    }
                }
            }
        }
        let services: Vec<serde_json::Value> = self
            .upstreams
            .health()
            .into_iter()
            .map(|(name, healthy, total)| {
                let (count, buckets) = per_service.remove(&name).unwrap_or_default();
                json!({"name": name, "healthy": healthy, "replicas": total, "ready": healthy > 0,
                       "requests": count, "buckets": buckets})
            })
            .collect();
        let (count, buckets) = per_service.remove("gateway").unwrap_or_default();
        json!({
            "services": services,
            "gateway": {"requests": count, "buckets": buckets},
            "bus": self.bus.as_ref().map(|b| b.describe()),
            "cache": self.cache.load().is_some(),
            "streams": self.feed.as_ref().map(|f| f.open()),
            "consumerLag": self.consumer_lag(),
        })
    }

    /// Each event consumer's lag (records waiting in its partitions), when the consumers run
    /// in this process and so report into its registry; empty otherwise.
    fn consumer_lag(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut lag = serde_json::Map::new();
        for family in self.registry.gather() {
            if family.name() != "shopverse_events_consumer_lag" {
                continue;
            }
            for m in family.get_metric() {
                let consumer = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "consumer")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                lag.insert(consumer, json!(m.get_gauge().get_value() as i64));
            }
        }
        lag
    }

    async fn dead_letters(&self, replay: bool, body: &serde_json::Value) -> Reply {
        let Some(bus) = self.bus.clone() else {
            let message = "this gateway has no event bus";
            return refused(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, message);
        };
        let result = if replay {
            let id = body.get("eventId").and_then(|v| v.as_str());
            shopverse_events::dlq::replay(bus.as_ref(), None, id).await
        } else {
            shopverse_events::dlq::list(bus.as_ref(), None).await
        };
        match result {
            Ok(letters) if replay => ok(json!({"replayed": letters})),
            Ok(letters) => ok(json!({"deadLetters": letters})),
            Err(e) => refused(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::Unavailable,
                &format!("the event bus: {e}"),
            ),
        }
    }

    fn cache_console(&self, purge: bool, body: &serde_json::Value) -> Reply {
        let cache = self.cache.load();
        let Some(cache) = cache.as_ref() else {
            let message = "the edge cache is off (or still held by the process this one upgraded)";
            return refused(StatusCode::NOT_FOUND, Code::NotFound, message);
        };
        if !purge {
            let (hits, misses, evictions) = cache.counts();
            return ok(json!({
                "entries": cache.len(), "memoryBytes": cache.memory_bytes(),
                "diskBytes": cache.disk_bytes(), "hits": hits, "misses": misses,
                "evictions": evictions,
            }));
        }
        let text = |k: &str| body.get(k).and_then(|v| v.as_str());
        let purged = match (text("key"), text("tag"), body.get("all")) {
            (Some(k), _, _) => cache.purge_key(k),
            (_, Some(t), _) => cache.purge_tag(t),
            (_, _, Some(serde_json::Value::Bool(true))) => cache.purge_all(),
            _ => {
                let message = "give key, tag or all: true";
                return refused(StatusCode::BAD_REQUEST, Code::InvalidArgument, message);
            }
        };
        match purged {
            Ok(n) => ok(json!({"purged": n})),
            Err(e) => refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Internal,
                &e.to_string(),
            ),
        }
    }
}
