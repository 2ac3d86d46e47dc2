//! The configuration a gateway serves with: the `[gateway]` section as it was read, and what
//! is compiled from it once, when it is loaded (the pass-through route index with each route's
//! metrics label and parsed upstream, each rate-limit policy's header texts, the head and relay
//! limits). A reload compiles a new
//! `Live` and swaps it in whole, so a request never sees an index of one configuration with
//! the routes of another.

use std::sync::Arc;

use crate::config::GatewayConfig;
use crate::prefix::PrefixIndex;
use crate::router::Access;
use crate::upstream::Target;

/// What a rate-limit policy's headers are made of, the same on every answer.
#[derive(Debug)]
pub struct RateTexts {
    /// The `RateLimit-Policy` value: `"name";q=requests;w=per_secs`, the rate a client can
    /// keep up (the burst above it is what `RateLimit`'s `r=` shows while it lasts).
    pub policy: String,
    /// The quoted name, how a `RateLimit` value begins.
    pub name: String,
    /// Both header lines up to the remaining count, as the front writes them:
    /// `ratelimit-policy: <policy>\r\nratelimit: "name";r=`.
    pub head: String,
}

/// A pass-through route, compiled.
pub struct PassRoute {
    /// The metrics label, `passthrough:<prefix>`, shared by every request on the route.
    pub label: Arc<str>,
    /// Where requests go.
    pub target: Target,
    pub access: Access,
}

pub struct Live {
    pub config: GatewayConfig,
    /// The framing and size limits every request head is held to.
    pub head_limits: crate::policy::HeadLimits,
    /// The time and body limits of a relayed pass-through request.
    pub(crate) relay_limits: crate::h1::pool::Limits,
    passthrough: PrefixIndex,
    routes: Vec<PassRoute>,
    /// Per policy of `config.rate_limits`, in order: the texts its headers are made of.
    rate_texts: Vec<Arc<RateTexts>>,
}

impl Live {
    pub fn new(config: GatewayConfig) -> Live {
        let passthrough = PrefixIndex::new(config.passthrough.iter().map(|p| p.prefix.as_str()));
        let routes = config
            .passthrough
            .iter()
            .map(|p| PassRoute {
                label: format!("passthrough:{}", p.prefix).into(),
                target: Target::new(&p.upstream),
                access: p.access,
            })
            .collect();
        let rate_texts = config
            .rate_limits
            .iter()
            .map(|p| {
                let policy = format!("\"{}\";q={};w={}", p.name, p.requests, p.per_secs);
                let head = format!("ratelimit-policy: {policy}\r\nratelimit: \"{}\";r=", p.name);
                Arc::new(RateTexts {
                    name: format!("\"{}\"", p.name),
                    policy,
                    head,
                })
            })
            .collect();
        let head_limits = crate::policy::HeadLimits {
            max_headers: config.max_headers,
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
        };
        let relay_limits = crate::h1::pool::Limits {
            upstream: std::time::Duration::from_millis(config.request_timeout_ms),
            client_body: std::time::Duration::from_millis(config.client_body_timeout_ms),
            max_body: config.max_body_bytes,
        };
        Live {
            head_limits,
            relay_limits,
            config,
            passthrough,
            routes,
            rate_texts,
        }
    }

    /// The pass-through route of `path`: the first listed prefix it starts with.
    pub fn passthrough_for(&self, path: &str) -> Option<&PassRoute> {
        self.passthrough
            .first_match(path)
            .and_then(|i| self.routes.get(i))
    }

    /// The texts of `config.rate_limits[i]`'s headers.
    pub fn rate_texts(&self, i: usize) -> Option<&Arc<RateTexts>> {
        self.rate_texts.get(i)
    }
}

impl std::ops::Deref for Live {
    type Target = GatewayConfig;

    fn deref(&self) -> &GatewayConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Passthrough;

    #[test]
    fn routes_and_policy_headers_are_compiled_from_the_config() {
        let config = GatewayConfig {
            passthrough: vec![
                Passthrough {
                    prefix: "/static/".into(),
                    upstream: "127.0.0.1:9000".into(),
                    access: Access::Public,
                },
                Passthrough {
                    prefix: "/static/admin/".into(),
                    upstream: "127.0.0.1:9001".into(),
                    access: Access::Admin,
                },
            ],
            ..Default::default()
        };
        let live = Live::new(config);
        let r = live.passthrough_for("/static/admin/x").map(|r| &*r.label);
        // The first listed prefix wins, as the configuration documents.
        assert_eq!(r, Some("passthrough:/static/"));
        assert!(live.passthrough_for("/v1/products").is_none());
        let texts = live
            .rate_texts(0)
            .map(|t| (t.policy.as_str(), t.name.as_str(), t.head.as_str()));
        assert_eq!(
            texts,
            Some((
                "\"login\";q=10;w=60",
                "\"login\"",
                "ratelimit-policy: \"login\";q=10;w=60\r\nratelimit: \"login\";r="
            ))
        );
        assert!(live.rate_texts(9).is_none());
    }
}
