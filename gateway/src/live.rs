//! The configuration a gateway serves with: the `[gateway]` section as it was read, and what
//! is compiled from it once, when it is loaded (the pass-through route index with each route's
//! metrics label and parsed upstream, each rate-limit policy's header). A reload compiles a new
//! `Live` and swaps it in whole, so a request never sees an index of one configuration with
//! the routes of another.

use std::sync::Arc;

use crate::config::GatewayConfig;
use crate::prefix::PrefixIndex;
use crate::router::Access;
use crate::upstream::Target;

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
    passthrough: PrefixIndex,
    routes: Vec<PassRoute>,
    /// `RateLimit-Policy` per policy of `config.rate_limits`, in order.
    policy_headers: Vec<String>,
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
        let policy_headers = config
            .rate_limits
            .iter()
            .map(|p| format!("\"{}\";q={};w={}", p.name, p.burst, p.per_secs))
            .collect();
        Live {
            config,
            passthrough,
            routes,
            policy_headers,
        }
    }

    /// The pass-through route of `path`: the first listed prefix it starts with.
    pub fn passthrough_for(&self, path: &str) -> Option<&PassRoute> {
        self.passthrough
            .first_match(path)
            .and_then(|i| self.routes.get(i))
    }

    /// The `RateLimit-Policy` value of `config.rate_limits[i]`: `"name";q=burst;w=per_secs`.
    pub fn policy_header(&self, i: usize) -> &str {
        self.policy_headers.get(i).map_or("", String::as_str)
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
        assert_eq!(live.policy_header(0), "\"login\";q=10;w=60");
        assert_eq!(live.policy_header(9), "");
    }
}
