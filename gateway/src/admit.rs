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
use crate::ratelimit::Decision;
use crate::reply::{Reply, decimal};
use crate::router::Access;

/// An admitted request: its verified caller, if it sent a token, and the rate limit's headers
/// for the answer.
pub(crate) struct Admitted {
    pub identity: Option<Arc<Identity>>,
    pub rate_headers: Vec<(&'static str, String)>,
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
        let rate_headers = self.rate_limit(path, identity.as_deref(), ip).await?;
        Ok(Admitted {
            identity,
            rate_headers,
        })
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
    ) -> Result<Vec<(&'static str, String)>, Reply> {
        let config = self.config.load();
        let Some((i, policy)) = config.rate_limits.iter().enumerate().find(|(_, p)| {
            p.paths.is_empty() || p.paths.iter().any(|pre| path.starts_with(pre.as_str()))
        }) else {
            return Ok(Vec::new());
        };
        let consumer = consumer_key(&policy.by, identity, ip);
        let d = self.limiter.check(i, policy, &consumer).await;
        let headers = rate_headers(policy, config.policy_header(i), &d);
        if d.allowed {
            return Ok(Vec::from(headers));
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
        reply.headers.extend(headers);
        Err(reply)
    }
}

/// `RateLimit-Policy` (`policy_header`) and `RateLimit` for a decision of `policy`. Built by hand: on an admitted
/// request this runs every time, and `format!` cost more than the decision itself.
fn rate_headers(
    policy: &crate::config::RateLimitPolicy,
    policy_header: &str,
    d: &Decision,
) -> [(&'static str, String); 2] {
    let mut now = String::with_capacity(policy.name.len() + 24);
    now.push('"');
    now.push_str(&policy.name);
    now.push_str("\";r=");
    push_decimal(&mut now, u64::from(d.remaining));
    now.push_str(";t=");
    push_decimal(&mut now, d.reset_secs);
    [
        ("ratelimit-policy", policy_header.to_owned()),
        ("ratelimit", now),
    ]
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
    for &d in decimal(n, &mut [0; 20]) {
        s.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::{IpAddr, LimitBy, consumer_key, rate_headers};

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
        for (remaining, reset) in [(0u32, 0u64), (7, 10), (99, 1234567890123)] {
            let d = crate::ratelimit::Decision {
                allowed: true,
                limit: 100,
                remaining,
                reset_secs: reset,
                retry_after_secs: 0,
            };
            let [p, r] = rate_headers(&policy, live.policy_header(0), &d);
            assert_eq!(p, ("ratelimit-policy", "\"default\";q=100;w=1".to_owned()));
            assert_eq!(
                r,
                ("ratelimit", format!("\"default\";r={remaining};t={reset}"))
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
