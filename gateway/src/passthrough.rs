//! Pass-through and gRPC requests on Pingora's path: the gateway's own request headers, the
//! direct HTTP/1 relay, and gRPC's refusals.

use http::StatusCode;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::Session;
use tonic::Code;

use crate::gateway::Gateway;
use crate::h1::{forward, pool};
use crate::proxy::{Ctx, Label};
use crate::reply::Reply;
use crate::router::Access;

impl Gateway {
    /// A plain pass-through request, proxied here rather than by Pingora's proxy loop
    /// (see [`forward`]); a failure before the response started is answered as JSON.
    pub(crate) async fn forward_direct(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some((target, _)) = &ctx.passthrough else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::InternalError,
                "no upstream for this request",
            ));
        };
        let reply = match target.resolve().await {
            Err(e) => Reply::upstream_address(&e),
            Ok(addr) => {
                let limits = self.config.load().relay_limits;
                let extra = ctx
                    .rate
                    .take()
                    .map_or_else(Vec::new, |r| Vec::from(r.pairs()));
                let prepare = |req: &mut RequestHeader| gateway_headers(req, ctx);
                match forward::forward(session, addr, limits, prepare, extra).await {
                    Ok(()) => return Ok(()),
                    Err(pool::Failure::Midway(e) | pool::Failure::Client(e)) => return Err(e),
                    Err(e) => Reply::for_failure(e, ctx.route.as_str()),
                }
            }
        };
        self.write(session, ctx, reply).await
    }

    /// The route's access rule and the rate limits, for a plain HTTP pass-through request.
    pub(crate) async fn admit_passthrough(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        access: Access,
    ) -> Result<(), Reply> {
        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let path = session.req_header().uri.path();
        let admitted = self
            .admit(path, access, authorization, self.client_ip(session))
            .await?;
        ctx.identity = admitted.identity;
        ctx.rate = admitted.rate;
        Ok(())
    }

    /// Lets a gRPC call through to its service if its method is public or the caller's token
    /// carries the role, within the rate limits; `Err` is the gRPC status to answer with.
    pub(crate) async fn grpc_gate(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        path: &str,
    ) -> Result<(), (Code, String)> {
        let (service, access) = self
            .router
            .grpc_method(path)
            .ok_or_else(|| (Code::Unimplemented, format!("unknown method {path}")))?;
        let access = access.ok_or((
            Code::PermissionDenied,
            "internal methods are not reachable through the gateway".to_owned(),
        ))?;
        ctx.route = Label::Owned(format!("grpc:{path}"));
        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let admitted = self
            .admit(path, access, authorization, self.client_ip(session))
            .await
            .map_err(Reply::into_grpc)?;
        let upstream = self.upstreams.pick_address(&service).ok_or_else(|| {
            (
                Code::Unavailable,
                format!("no upstream is configured for the {service} service"),
            )
        })?;
        ctx.identity = admitted.identity;
        ctx.rate = admitted.rate;
        ctx.passthrough = Some((upstream, true));
        Ok(())
    }

    /// A trailers-only gRPC response carrying `code`.
    pub(crate) async fn write_grpc_error(
        &self,
        session: &mut Session,
        code: Code,
        message: &str,
    ) -> pingora::Result<()> {
        let mut resp = ResponseHeader::build(StatusCode::OK, Some(4))?;
        resp.insert_header("content-type", "application/grpc")?;
        resp.insert_header("grpc-status", (code as i32).to_string())?;
        let msg: String = message
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
            .collect();
        resp.insert_header("grpc-message", msg)?;
        session.write_response_header(Box::new(resp), true).await
    }
}

/// Identity headers a client sent never reach an upstream: the verified caller's do, and the
/// request id.
pub(crate) fn gateway_headers(upstream: &mut RequestHeader, ctx: &Ctx) -> pingora::Result<()> {
    // Parsed header names: a `&str` would be parsed again on every request.
    static USER: http::HeaderName =
        http::HeaderName::from_static(shopverse_kit::identity::USER_HEADER);
    static ROLES: http::HeaderName =
        http::HeaderName::from_static(shopverse_kit::identity::ROLES_HEADER);
    static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
    // The identity headers a client sent, in any spelling ([`crate::policy::is_identity`]):
    // one pass to see whether there is any, since removing costs even when absent.
    let claimed = |k: &http::HeaderName| crate::policy::is_identity(k.as_str().as_bytes());
    if upstream.headers.keys().any(claimed) {
        let names: Vec<http::HeaderName> = upstream
            .headers
            .keys()
            .filter(|k| claimed(k))
            .cloned()
            .collect();
        for name in names {
            upstream.remove_header(&name);
        }
    }
    upstream.insert_header(&REQUEST_ID, ctx.request_id.as_str())?;
    // The upstream's span is a child of the gateway's.
    if let Some(parent) = shopverse_kit::trace::traceparent_of(&ctx.span) {
        upstream.insert_header("traceparent", parent)?;
    }
    if let Some(id) = &ctx.identity {
        upstream.insert_header(&USER, id.user_id.as_str())?;
        let roles: Vec<&str> = id.roles.iter().map(|r| r.as_str()).collect();
        upstream.insert_header(&ROLES, roles.join(","))?;
    }
    Ok(())
}
