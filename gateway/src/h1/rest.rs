//! REST reads answered on the front: a GET or HEAD of a REST route, with no body, transcoded
//! and sent to its service here rather than on a Pingora session built for the one request.
//!
//! The front takes the request only where Pingora's `request_filter` would have called
//! [`Gateway::rest`](crate::gateway::Gateway) and answered it the same way: the same
//! [policy](crate::policy) (already applied to the head), the same [`Gateway::own`] decision,
//! the same route, admission, transcoding, call and reply, written with the same headers.
//! What it leaves to Pingora: requests with a body, an `Origin` (CORS), a gRPC content type, no
//! route (404, 405, the OpenAPI document), and anonymous reads of cached routes that are not a
//! fresh hit (the cache's miss, revalidation and storing live on that path).

use std::net::IpAddr;
use std::time::Instant;

use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::server::ShutdownWatch;
use tracing::Instrument;

use super::head::facts;
use super::write::write_reply;
use super::{Buffers, Front, Step};
use crate::policy;
use crate::proxy::Own;

impl Front {
    /// A bodyless request that no pass-through prefix took: a fresh edge-cache hit or a REST
    /// read answered here, anything else handed to Pingora's path.
    pub(super) async fn rest(
        &self,
        io: &mut L4Stream,
        (method, target, head_len, start): (&str, &policy::Target<'_>, usize, Instant),
        headers: &[httparse::Header<'_>],
        peer: Option<IpAddr>,
        shutdown: &ShutdownWatch,
        bufs: &mut Buffers,
    ) -> Step {
        let verb = match method {
            "GET" => http::Method::GET,
            "HEAD" => http::Method::HEAD,
            _ => return Step::HandOff,
        };
        let Ok(facts) = facts(headers, &policy::Framing::default()) else {
            return Step::HandOff;
        };
        let path = &*target.path;
        if facts.origin || !matches!(self.gateway.own(path), Own::Api) || grpc(headers) {
            return Step::HandOff;
        }
        let Ok(m) = self.gateway.router.find(&verb, path) else {
            return Step::HandOff;
        };
        let request = Request {
            method,
            target,
            head_len,
            start,
            facts: &facts,
            peer,
            keep_alive: !facts.close && !*shutdown.borrow(),
        };
        if self.gateway.cacheable(&verb, m.route) {
            if facts.authorization.is_none() {
                // The shared cache's: a fresh hit here, anything else on Pingora's path.
                return self.cache_hit(io, &request, &m, bufs).await;
            }
            // A signed-in caller may see more than the public: never from the shared cache.
            return self.call(io, &request, &m, Some("BYPASS"), bufs).await;
        }
        self.call(io, &request, &m, None, bufs).await
    }

    /// Admits, transcodes and calls the route's service, and writes its answer.
    async fn call(
        &self,
        io: &mut L4Stream,
        r: &Request<'_, '_>,
        m: &crate::router::Matched<'_>,
        cache: Option<&'static str>,
        bufs: &mut Buffers,
    ) -> Step {
        let gateway = &self.gateway;
        gateway.metrics.front_rest_calls.inc();
        let path = &*r.target.path;
        let request_id = match r.facts.request_id {
            Some(id) => id.to_owned(),
            None => gateway.request_ids.next(),
        };
        let ip = gateway.client_ip_of(r.peer, r.facts.forwarded_for);
        let span = super::server_span(r.method, path, r.facts.traceparent);
        let seen = super::seen(&request_id, ip, path, r.facts, r.head_len, &span);
        let (reply, identity, rated, cache) = async {
            let admitted = match gateway
                .admit(path, m.route.access, r.facts.authorization, ip)
                .await
            {
                Ok(a) => a,
                Err(refused) => return (refused, None, false, None),
            };
            let identity = admitted.identity.as_deref();
            let prepared = gateway.prepare(
                m,
                r.target.query,
                b"",
                identity,
                &request_id,
                r.facts.traceparent,
            );
            // A request that cannot be transcoded is refused before the cache is asked.
            let (mut reply, cache) = match prepared {
                Ok((body, md)) => (gateway.call(m.route, body, md).await, cache),
                Err(bad) => (bad, None),
            };
            if let Some(outcome) = cache {
                reply.headers.push(("x-cache", outcome.to_owned()));
            }
            reply
                .headers
                .extend(admitted.rate.iter().flat_map(|r| r.pairs()));
            (reply, admitted.identity, admitted.rate.is_some(), cache)
        }
        .instrument(span.clone())
        .await;
        let status = reply.status;
        let head_only = r.method == "HEAD";
        let keep_alive = r.keep_alive && !reply.closes();
        let body_len = reply.body.len() as u64;
        let written =
            write_reply(io, reply, &request_id, keep_alive, head_only, &mut bufs.out).await;
        let access = crate::gateway::Access {
            bytes_out: (!head_only).then_some(body_len),
            cache,
            identity: identity.as_deref(),
            rated,
            ..seen
        };
        gateway.record(
            &m.route.template,
            r.method,
            status.as_str(),
            r.start,
            access,
        );
        Step::Done {
            consumed: r.head_len,
            keep_alive: keep_alive && written.is_ok(),
            carry: None,
        }
    }
}

/// One bodyless request as the front read it.
pub(super) struct Request<'a, 'h> {
    pub(super) method: &'a str,
    pub(super) target: &'a policy::Target<'a>,
    pub(super) head_len: usize,
    pub(super) start: Instant,
    pub(super) facts: &'a super::head::Facts<'h>,
    pub(super) peer: Option<IpAddr>,
    pub(super) keep_alive: bool,
}

/// Whether the request says it is gRPC (`Content-Type: application/grpc...`): Pingora's.
fn grpc(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type")
            && h.value
                .get(..16)
                .is_some_and(|v| v.eq_ignore_ascii_case(b"application/grpc"))
    })
}
