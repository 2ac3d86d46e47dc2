//! Fresh edge-cache hits, answered on the front.

use http::StatusCode;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::AsyncWriteExt;

use super::rest::Request;
use super::write::{push_date, push_decimal, push_header, write_reply};
use super::{Buffers, Front, Step};

impl Front {
    /// A fresh edge-cache hit, answered here: an anonymous GET or HEAD of a cached route that
    /// sent no `Origin`. Anything else, a miss included, is left to Pingora's path, before it
    /// counts against a rate limit.
    pub(super) async fn cache_hit(
        &self,
        io: &mut L4Stream,
        r: &Request<'_, '_>,
        m: &crate::router::Matched<'_>,
        bufs: &mut Buffers,
    ) -> Step {
        let cache = self.gateway.cache.load();
        let Some(cache) = cache.as_ref() else {
            return Step::HandOff;
        };
        let (method, head_len, start, facts) = (r.method, r.head_len, r.start, r.facts);
        if facts.no_cache {
            return Step::HandOff;
        }
        let (path, query) = (&*r.target.path, r.target.query.unwrap_or(""));
        let mut key = String::with_capacity(path.len() + 1 + query.len());
        key.push_str(path);
        key.push('?');
        key.push_str(query);
        let now_ms = self.gateway.clock.now_ms();
        let Ok(Some((entry, shopverse_edge_cache::Freshness::Fresh))) = cache.get(&key, now_ms)
        else {
            return Step::HandOff;
        };
        let request_id = match facts.request_id {
            Some(id) => id.to_owned(),
            None => self.gateway.request_ids.next(),
        };
        let ip = self.gateway.client_ip_of(r.peer, facts.forwarded_for);
        let keep_alive = r.keep_alive;
        let head_only = method == "HEAD";
        let span = super::server_span(method, path, facts.traceparent);
        // What the access log says of this request, whichever answer it gets.
        let seen = super::seen(&request_id, ip, path, facts, head_len, &span);
        let mut cache_outcome = Some("HIT");
        let mut rated = false;
        let reply = match self
            .gateway
            .admit(path, crate::router::Access::Public, None, ip)
            .await
        {
            Ok(admitted)
                if !crate::reply::etag_matches(
                    facts.if_none_match,
                    entry.etag.as_deref().unwrap_or(""),
                ) =>
            {
                // The common answer, written straight from the entry.
                let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK);
                let hit = Hit {
                    status,
                    entry: &entry,
                    max_age: entry.max_age_secs(now_ms),
                    request_id: &request_id,
                    rate: admitted.rate.as_ref(),
                    keep_alive,
                };
                let written = hit.write(io, head_only, &mut bufs.out).await;
                let access = crate::gateway::Access {
                    bytes_out: (!head_only).then_some(entry.body.len() as u64),
                    cache: Some("HIT"),
                    rated: admitted.rate.is_some(),
                    ..seen
                };
                self.gateway
                    .record(&m.route.template, method, status.as_str(), start, access);
                return Step::Done {
                    consumed: head_len,
                    keep_alive: keep_alive && written.is_ok(),
                    carry: None,
                };
            }
            Ok(admitted) => {
                rated = admitted.rate.is_some();
                let mut reply = self
                    .gateway
                    .reply_from_entry(facts.if_none_match, &entry, "HIT");
                reply
                    .headers
                    .extend(admitted.rate.iter().flat_map(|r| r.pairs()));
                reply
            }
            Err(refused) => {
                cache_outcome = None;
                refused
            }
        };
        let status = reply.status;
        let body_len = reply.body.len() as u64;
        let written =
            write_reply(io, reply, &request_id, keep_alive, head_only, &mut bufs.out).await;
        let access = crate::gateway::Access {
            bytes_out: (!head_only).then_some(body_len),
            cache: cache_outcome,
            rated,
            ..seen
        };
        self.gateway
            .record(&m.route.template, method, status.as_str(), start, access);
        Step::Done {
            consumed: head_len,
            keep_alive: keep_alive && written.is_ok(),
            carry: None,
        }
    }
}

/// A fresh edge-cache hit's answer: the head `Gateway::reply_from_entry` and [`write_reply`]
/// give (the same headers, in the same order), written without building a string per header.
pub(super) struct Hit<'a> {
    status: StatusCode,
    entry: &'a shopverse_edge_cache::Entry,
    max_age: u64,
    request_id: &'a str,
    rate: Option<&'a crate::admit::RateHeaders>,
    keep_alive: bool,
}

impl Hit<'_> {
    pub(super) async fn write(
        &self,
        io: &mut L4Stream,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(self.status.as_u16()));
        out.push(b' ');
        out.extend_from_slice(self.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
        push_decimal(out, self.entry.body.len() as u64);
        out.extend_from_slice(b"\r\n");
        push_header(out, "x-request-id", self.request_id);
        for (name, value) in crate::reply::SECURITY_HEADERS {
            push_header(out, name, value);
        }
        push_header(out, "x-cache", "HIT");
        push_header(out, "etag", self.entry.etag.as_deref().unwrap_or(""));
        out.extend_from_slice(b"cache-control: public, max-age=");
        push_decimal(out, self.max_age);
        out.extend_from_slice(b"\r\n");
        if let Some(r) = self.rate {
            r.write(out);
        }
        push_date(out);
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.entry.body);
        }
        io.write_all(out).await?;
        io.flush().await
    }
}
