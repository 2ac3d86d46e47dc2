//! The REST path: a JSON call answered by the gateway itself, in the steps a request takes, in
//! order: [route](Gateway::route), [admit](Gateway::admit), the [edge cache](cache),
//! [transcode](Gateway::transcode) to protobuf, and [call](Gateway::call) the service (its
//! answer transcoded back to JSON).

mod cache;
pub mod console;
pub mod session;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use pingora::prelude::Session;
use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataMap;

use shopverse_edge_cache::Freshness;
use shopverse_kit::Identity;

use crate::gateway::Gateway;
use crate::proxy::{Ctx, Label};
use crate::reply::{Reply, code_name, http_status};
use crate::router::{MatchError, Matched, Route};
use crate::transcode::{request_message, route_json};

impl Gateway {
    /// Answers a REST call: route, admit, then the cache or the service.
    pub(crate) async fn rest(&self, session: &mut Session, ctx: &mut Ctx) -> Reply {
        let method = session.req_header().method.clone();
        let uri = session.req_header().uri.clone();
        let path = uri.path();
        let m = match self.route(session, ctx, &method, path) {
            Ok(m) => m,
            Err(reply) => return reply,
        };
        ctx.route = Label::Shared(m.route.template.clone());
        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let ip = self.client_ip(session);
        let admitted = match self.admit(path, m.route.access, authorization, ip).await {
            Ok(a) => a,
            Err(reply) => return reply,
        };
        ctx.identity = admitted.identity.clone();
        let mut reply = self
            .answer(session, ctx, &m, &uri, admitted.identity.as_deref())
            .await;
        reply
            .headers
            .extend(admitted.rate.iter().flat_map(|r| r.pairs()));
        reply
    }

    /// The route of a call, or the answer when there is none to call: a CORS preflight, the
    /// OpenAPI document, 404, 405.
    fn route<'r>(
        &'r self,
        session: &Session,
        ctx: &mut Ctx,
        method: &Method,
        path: &str,
    ) -> Result<Matched<'r>, Reply> {
        if let Some(reply) = self.preflight(session, ctx, method, path) {
            return Err(reply);
        }
        if path == "/openapi.json" && (method == Method::GET || method == Method::HEAD) {
            ctx.route = Label::Fixed("/openapi.json");
            return Err(Reply::json(StatusCode::OK, self.openapi.to_vec()));
        }
        match self.router.find(method, path) {
            Ok(m) => Ok(m),
            Err(MatchError::NotFound) => {
                ctx.route = Label::Fixed("not_found");
                Err(Reply::error(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    &format!("no route for {path}"),
                    serde_json::json!([]),
                ))
            }
            Err(MatchError::MethodNotAllowed(allowed)) => {
                ctx.route = Label::Fixed("method_not_allowed");
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(Reply::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Code::Unimplemented,
                    &format!("{method} is not allowed on {path}"),
                    serde_json::json!([]),
                )
                .with("allow", allow))
            }
        }
    }

    /// An admitted call's answer: from the edge cache when the route is cached and the caller
    /// anonymous, else from the service.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        m: &Matched<'_>,
        uri: &Uri,
        identity: Option<&Identity>,
    ) -> Reply {
        let cacheable = self.cacheable(&session.req_header().method, m.route);
        // A signed-in caller may see more than the public (an admin sees archived products):
        // such responses are neither served from nor stored in the shared cache.
        let bypass = cacheable && identity.is_some();
        let cache_key =
            (cacheable && !bypass).then(|| format!("{}?{}", uri.path(), uri.query().unwrap_or("")));
        // A fresh hit is answered before the request is transcoded: an entry exists only for
        // a request (the same path and query) that was valid and answered before. The one
        // lookup of this request; `cached` goes on from it on a miss.
        let cache = self.cache.load_full();
        let looked_up = match (&cache, &cache_key) {
            (Some(cache), Some(key)) if !cache::wants_fresh(session) => {
                cache.get(key, self.clock.now_ms()).ok().flatten()
            }
            _ => None,
        };
        if let Some((e, Freshness::Fresh)) = &looked_up {
            return self.reply_from_cache(session, e, "HIT");
        }
        let (body, md) = match self.transcode(session, ctx, m, uri, identity).await {
            Ok(call) => call,
            Err(reply) => return reply,
        };
        if let Some(cache) = cache
            && let Some(key) = cache_key
        {
            let call = cache::UpstreamCall {
                service: m.route.service.clone(),
                path: m.route.grpc_path.clone(),
                body,
                md,
                output: m.route.method.output(),
                json: m.route.json.clone(),
                tags: cache::cache_tags(m.route.method.name(), &m.bindings),
            };
            return self.cached(&cache, session, key, looked_up, call).await;
        }
        let mut reply = self.call(m.route, body, md).await;
        if bypass {
            reply.headers.push(("x-cache", "BYPASS".to_owned()));
        }
        reply
    }

    /// The call as its service takes it, from a request on Pingora's session: its body read
    /// within the limits, then [`Self::prepare`].
    async fn transcode(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        m: &Matched<'_>,
        uri: &Uri,
        identity: Option<&Identity>,
    ) -> Result<(Bytes, MetadataMap), Reply> {
        let body = self.read_body(session).await?;
        let client_traceparent = session
            .req_header()
            .headers
            .get("traceparent")
            .and_then(|h| h.to_str().ok());
        self.prepare(
            m,
            uri.query(),
            &body,
            identity,
            &ctx.request_id,
            client_traceparent,
        )
    }

    /// The call as its service takes it: the protobuf message from the path's bindings, the
    /// query and the JSON body, and the metadata (the verified caller, the request id, the
    /// trace context). Both HTTP/1 paths build their calls here.
    pub(crate) fn prepare(
        &self,
        m: &Matched<'_>,
        query: Option<&str>,
        body: &[u8],
        identity: Option<&Identity>,
        request_id: &str,
        client_traceparent: Option<&str>,
    ) -> Result<(Bytes, MetadataMap), Reply> {
        let msg = request_message(m.route, &m.bindings, query, body).map_err(|e| {
            let details = match &e.field {
                Some(f) => serde_json::json!([{ "field": f }]),
                None => serde_json::json!([]),
            };
            Reply::error(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                &e.message,
                details,
            )
        })?;
        let mut md = MetadataMap::new();
        if let Some(id) = identity {
            id.write_to(&mut md);
        }
        if let Ok(v) = request_id.parse() {
            md.insert("x-request-id", v);
        }
        // The service's span is a child of this request's when spans are exported; else the
        // client's context travels as it came.
        let tp = shopverse_kit::trace::current_traceparent();
        if let Some(v) = tp
            .as_deref()
            .or(client_traceparent)
            .and_then(|tp| tp.parse().ok())
        {
            md.insert("traceparent", v);
        }
        Ok((msg.encode_to_vec().into(), md))
    }

    /// Calls the route's service; its reply as JSON, or its status in the one error shape.
    pub(crate) async fn call(&self, route: &Route, body: Bytes, md: MetadataMap) -> Reply {
        let service = &route.service;
        self.metrics
            .upstream_calls
            .with_label_values(&[service])
            .inc();
        let result = self
            .upstreams
            .unary(
                service,
                &route.grpc_path,
                body,
                md,
                route.http_method == Method::GET,
            )
            .await;
        match result {
            Ok(bytes) => match route_json(route.json.as_deref(), &route.method.output(), &bytes) {
                Ok(json) => Reply::json(StatusCode::OK, json),
                Err(e) => Reply::error(
                    StatusCode::BAD_GATEWAY,
                    Code::Internal,
                    &e,
                    serde_json::json!([]),
                ),
            },
            Err(status) => {
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown
                ) {
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[service, code_name(status.code())])
                        .inc();
                }
                let details = match status
                    .metadata()
                    .get("x-shopverse-field")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(f) => serde_json::json!([{ "field": f }]),
                    None => serde_json::json!([]),
                };
                let message = match status.code() {
                    Code::Unavailable => format!("the {service} service is unavailable"),
                    _ => status.message().to_owned(),
                };
                Reply::error(http_status(status.code()), status.code(), &message, details)
            }
        }
    }

    /// The request body, within the body limit (413) and the client body timeout (408).
    async fn read_body(&self, session: &mut Session) -> Result<Vec<u8>, Reply> {
        let too_big = || {
            Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::InvalidArgument,
                &format!(
                    "the request body is larger than {} bytes",
                    self.config.load().max_body_bytes
                ),
                serde_json::json!([]),
            )
        };
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.config.load().max_body_bytes) {
            return Err(too_big());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(0));
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.config.load().client_body_timeout_ms);
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, session.read_request_body()).await
            else {
                return Err(Reply::error(
                    StatusCode::REQUEST_TIMEOUT,
                    Code::DeadlineExceeded,
                    "the request body did not arrive in time",
                    serde_json::json!([]),
                )
                .with("connection", "close"));
            };
            match next {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.config.load().max_body_bytes {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(e) => {
                    return Err(Reply::error(
                        StatusCode::BAD_REQUEST,
                        Code::InvalidArgument,
                        &format!("reading the request body: {e}"),
                        serde_json::json!([]),
                    ));
                }
            }
        }
    }

    /// Notes the CORS origin of the request and answers a preflight (`OPTIONS` with
    /// `Access-Control-Request-Method`) itself.
    fn preflight(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        method: &Method,
        path: &str,
    ) -> Option<Reply> {
        let headers = &session.req_header().headers;
        let origin = headers.get("origin").and_then(|v| v.to_str().ok())?;
        ctx.cors = self.config.load().cors.allow(origin);
        if *method != Method::OPTIONS || !headers.contains_key("access-control-request-method") {
            return None;
        }
        ctx.route = Label::Fixed("preflight");
        let Some(allow_origin) = ctx.cors.clone() else {
            return Some(Reply::error(
                StatusCode::FORBIDDEN,
                Code::PermissionDenied,
                "this origin may not call the API",
                serde_json::json!([]),
            ));
        };
        let methods = match self.router.find(&Method::OPTIONS, path) {
            Err(MatchError::MethodNotAllowed(m)) => {
                m.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
            }
            _ => {
                return Some(Reply::error(
                    StatusCode::NOT_FOUND,
                    Code::NotFound,
                    &format!("no route for {path}"),
                    serde_json::json!([]),
                ));
            }
        };
        Some(Reply {
            status: StatusCode::NO_CONTENT,
            body: Bytes::new(),
            headers: vec![
                ("access-control-allow-origin", allow_origin),
                ("access-control-allow-methods", methods),
                (
                    "access-control-allow-headers",
                    self.config.load().cors.allowed_headers.join(", "),
                ),
                (
                    "access-control-max-age",
                    self.config.load().cors.max_age_secs.to_string(),
                ),
                ("vary", "origin".into()),
            ],
            grpc: None,
        })
    }
}
