//! Admission, the same for every path (REST, gRPC, pass-through on either HTTP/1 path, cache
//! hits on the front): the caller's address, the route's access rule against the caller's
//! token, then the first rate-limit policy that covers the path. The path is the normalised
//! one ([`crate::policy::target`]) the route was found by.

use std::net::IpAddr;
use std::sync::Arc;

use http::StatusCode;
use tonic::Code;

use shopverse_kit::{Identity, Role};

use crate::auth::AuthError;
use crate::config::LimitBy;
use crate::gateway::Gateway;
use crate::live::RateTexts;
use crate::reply::{Reply, decimal};
use crate::router::Access;

/// An admitted request: its verified caller, if it sent a token, and what the rate limit's
/// headers say on the answer (none when no policy covers the path).
pub(crate) struct Admitted {
    pub identity: Option<Arc<Identity>>,
    pub rate: Option<RateHeaders>,
}

/// `RateLimit-Policy` and `RateLimit` (the IETF draft's spelling) for one decision: the
/// policy's shared texts and the decision's numbers. An answer the front writes itself takes
/// them as bytes ([`RateHeaders::write`]), building no string; the others take
/// [`RateHeaders::pairs`].
#[derive(Clone, Debug)]
pub(crate) struct RateHeaders {
    texts: Arc<RateTexts>,
    remaining: u32,
    reset_secs: u64,
}

impl RateHeaders {
    /// The two header lines, `name: value\r\n` each.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        let mut digits = [0; 20];
        out.extend_from_slice(self.texts.head.as_bytes());
        out.extend_from_slice(decimal(u64::from(self.remaining), &mut digits));
        out.extend_from_slice(b";t=");
        out.extend_from_slice(decimal(self.reset_secs, &mut digits));
        out.extend_from_slice(b"\r\n");
    }

    /// The two headers as names and values.
    pub(crate) fn pairs(&self) -> [(&'static str, String); 2] {
        let mut now = String::with_capacity(self.texts.name.len() + 24);
        now.push_str(&self.texts.name);
        now.push_str(";r=");
        push_decimal(&mut now, u64::from(self.remaining));
        now.push_str(";t=");
        push_decimal(&mut now, self.reset_secs);
        [
            ("ratelimit-policy", self.texts.policy.clone()),
            ("ratelimit", now),
        ]
    }
}

impl Gateway {
    /// Admits a request to a route with this `access` rule, from a caller with this
    /// `Authorization` header and address ([`Self::client_ip_of`]); `Err` is the refusal (401,
    /// 403, 429) in the one error shape.
    pub(crate) async fn admit(
        &self,
        path: &str,
        access: Access,
        authorization: Option<&str>,
        ip: Option<IpAddr>,
    ) -> Result<Admitted, Reply> {
        let identity = self.authorize(authorization, access).await?;
        let rate = self.rate_limit(path, identity.as_deref(), ip).await?;
        Ok(Admitted { identity, rate })
    }

    /// The caller's address: the peer's, or the right-most `X-Forwarded-For` entry when the
    /// peer is a trusted proxy.
    pub(crate) fn client_ip_of(&self, peer: Option<IpAddr>, xff: Option<&str>) -> Option<IpAddr> {
        if let Some(p) = peer
            && let Some(xff) = xff
            && self.config.load().trusted_proxies.contains(&p)
            && let Some(first) = xff
                .split(',')
                .next_back()
                .and_then(|s| s.trim().parse().ok())
        {
            // The right-most address is the one our trusted proxy saw.
            return Some(first);
        }
        peer
    }

    /// The caller of a request with this `Authorization` header, if `access` lets it in.
    pub(crate) async fn authorize(
        &self,
        header: Option<&str>,
        access: Access,
    ) -> Result<Option<Arc<Identity>>, Reply> {
        let token = match header {
            Some(h) if h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer ") => Some(h[7..].trim()),
            Some(_) => return Err(self.unauthorized(AuthError::Malformed)),
            None => None,
        };
        let identity = match token {
            Some(t) => Some(
                self.verifier
                    .verify(t)
                    .await
                    .map_err(|e| self.unauthorized(e))?,
            ),
            None => None,
        };
        match (access, &identity) {
            (Access::Public, _) => Ok(identity),
            (_, None) => Err(self.unauthorized(AuthError::Missing)),
            (Access::Customer, Some(id)) if id.has(Role::Customer) => Ok(identity),
            (Access::Admin, Some(id)) if id.has(Role::Admin) => Ok(identity),
            (_, Some(_)) => {
                self.metrics
                    .auth_failures
                    .with_label_values(&["role"])
                    .inc();
                Err(Reply::error(
                    StatusCode::FORBIDDEN,
                    Code::PermissionDenied,
                    "your account lacks the role this call needs",
                    serde_json::json!([]),
                ))
            }
        }
    }

    fn unauthorized(&self, e: AuthError) -> Reply {
        self.metrics
            .auth_failures
            .with_label_values(&[e.reason()])
            .inc();
        let www = match e {
            AuthError::Missing => "Bearer realm=\"shopverse\"".to_owned(),
            _ => format!(
                "Bearer realm=\"shopverse\", error=\"invalid_token\", error_description=\"{e}\""
            ),
        };
        Reply::error(
            StatusCode::UNAUTHORIZED,
            Code::Unauthenticated,
            &e.to_string(),
            serde_json::json!([]),
        )
        .with("www-authenticate", www)
    }

    /// The first rate-limit policy covering `path`, spent by this caller: its headers, or 429.
    async fn rate_limit(
        &self,
        path: &str,
        identity: Option<&Identity>,
        ip: Option<IpAddr>,
    ) -> Result<Option<RateHeaders>, Reply> {
        let config = self.config.load();
        let Some((i, policy)) = config.rate_limits.iter().enumerate().find(|(_, p)| {
            p.paths.is_empty() || p.paths.iter().any(|pre| path.starts_with(pre.as_str()))
        }) else {
            return Ok(None);
        };
        let consumer = consumer_key(&policy.by, identity, ip);
        let d = self.limiter.check(i, policy, &consumer).await;
        let Some(texts) = config.rate_texts(i) else {
            return Ok(None);
        };
        let headers = RateHeaders {
            texts: texts.clone(),
            remaining: d.remaining,
            reset_secs: d.reset_secs,
        };
        if d.allowed {
            return Ok(Some(headers));
        }
        self.metrics
            .rate_limited
            .with_label_values(&[&policy.name])
            .inc();
        let mut reply = Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            Code::ResourceExhausted,
            &format!(
                "rate limit `{}` exceeded; retry in {} s",
                policy.name, d.retry_after_secs
            ),
            serde_json::json!([]),
        )
        .with("retry-after", d.retry_after_secs.to_string());
        reply.headers.extend(headers.pairs());
        Err(reply)
    }
}

/// Whose budget a request spends. Its `Display`, `user:<id>` or `ip:<address>`, is the key in
/// the shared (Redis) limit; the in-process limit only hashes it, so a decision builds no string
/// (building one was a quarter of the limit's cost).
#[derive(Debug, Hash)]
enum Consumer<'a> {
    User(&'a str),
    Ip(IpAddr),
    Unknown,
}

impl std::fmt::Display for Consumer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Consumer::User(id) => write!(f, "user:{id}"),
            Consumer::Ip(ip) => write!(f, "ip:{ip}"),
            Consumer::Unknown => f.write_str("ip:unknown"),
        }
    }
}

fn consumer_key<'a>(
    by: &LimitBy,
    identity: Option<&'a Identity>,
    ip: Option<IpAddr>,
) -> Consumer<'a> {
    match (by, identity, ip) {
        (LimitBy::User, Some(id), _) => Consumer::User(&id.user_id),
        (_, _, Some(ip)) => Consumer::Ip(ip),
        (_, _, None) => Consumer::Unknown,
    }
}

fn push_decimal(s: &mut String, n: u64) {
    // The digits are ASCII: one validated copy rather than a `char` push per digit.
    s.push_str(std::str::from_utf8(decimal(n, &mut [0; 20])).unwrap_or("0"));
}

#[cfg(test)]
mod tests {
    use super::{IpAddr, LimitBy, RateHeaders, consumer_key};

    #[test]
    fn rate_headers_read_as_the_ietf_draft_spells_them() {
        let policy = crate::config::RateLimitPolicy {
            name: "default".into(),
            paths: vec![],
            requests: 50,
            per_secs: 1,
            burst: 100,
            by: crate::config::LimitBy::User,
        };
        let live = crate::live::Live::new(crate::config::GatewayConfig {
            rate_limits: vec![policy.clone()],
            ..Default::default()
        });
        let texts = live.rate_texts(0).unwrap().clone();
        for (remaining, reset) in [(0u32, 0u64), (7, 10), (99, 1234567890123)] {
            let h = RateHeaders {
                texts: texts.clone(),
                remaining,
                reset_secs: reset,
            };
            let [p, r] = h.pairs();
            // The quota is the sustained rate (50/s), not the burst (100): a client that paces
            // itself by it is never refused.
            assert_eq!(p, ("ratelimit-policy", "\"default\";q=50;w=1".to_owned()));
            assert_eq!(
                r,
                ("ratelimit", format!("\"default\";r={remaining};t={reset}"))
            );
            // The bytes the front writes say the same.
            let mut out = Vec::new();
            h.write(&mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("ratelimit-policy: {}\r\nratelimit: {}\r\n", p.1, r.1)
            );
        }
    }

    #[test]
    fn consumer_keys_read_as_format_would_write_them() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        for v4 in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(10, 20, 255, 9),
        ] {
            let ip = IpAddr::V4(v4);
            assert_eq!(
                consumer_key(&LimitBy::Ip, None, Some(ip)).to_string(),
                format!("ip:{ip}")
            );
        }
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            consumer_key(&LimitBy::Ip, None, Some(v6)).to_string(),
            "ip:::1"
        );
        assert_eq!(
            consumer_key(&LimitBy::User, None, None).to_string(),
            "ip:unknown"
        );
    }
}
