//! The gateway's configuration (`[gateway]`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use shopverse_kit::config::Invalid;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Client-facing HTTP listener.
    pub listen: SocketAddr,
    /// Worker threads of the proxy.
    pub threads: usize,
    /// gRPC endpoints per service (`users`, `products`, ...); several endpoints are balanced.
    /// `shopverse up` fills these with the services it runs.
    pub upstreams: BTreeMap<String, Vec<String>>,
    /// Expected `iss` and `aud` of access tokens.
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// How often the key set is fetched from the users service.
    pub jwks_refresh_secs: u64,
    /// A token with an unknown `kid` refetches the key set, at most this often.
    pub jwks_refetch_min_secs: u64,
    /// Largest accepted request body (413 beyond).
    pub max_body_bytes: usize,
    /// Most request headers, and their total size, accepted (431 beyond).
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Per-call deadline to a service, sent as `grpc-timeout` (504 beyond).
    pub request_timeout_ms: u64,
    /// How long a client may take to send its request body (408 beyond).
    pub client_body_timeout_ms: u64,
    /// How long a client may take to send a request head, from its first byte (408 beyond,
    /// and the connection closes: a head trickled in a byte at a time cannot hold it).
    pub client_header_timeout_ms: u64,
    /// How often each upstream endpoint's gRPC health is checked.
    pub health_check_secs: u64,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Redis shared by several gateways for rate limits (`redis://host:6379`); empty: limits
    /// are per gateway.
    pub redis_url: String,
    /// Prefix of the rate-limit keys in Redis.
    pub redis_prefix: String,
    /// How long a rate-limit decision waits for Redis before it is taken locally.
    pub redis_timeout_ms: u64,
    /// Rate-limit policies, first match wins; a policy with no `paths` matches everything.
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Path prefixes proxied as they are to a plain HTTP upstream.
    pub passthrough: Vec<Passthrough>,
    /// Cross-origin requests from browsers.
    pub cors: CorsConfig,
    /// An HTTPS listener (TLS 1.2 and 1.3 with rustls, HTTP/2 by ALPN, so gRPC over TLS too).
    pub tls: TlsConfig,
    /// The edge cache of public catalog responses.
    pub cache: EdgeCacheConfig,
    /// One line per request at `info` under the target `shopverse::access` (JSON fields under
    /// `telemetry.log_format = "json"`).
    pub access_log: bool,
    /// The live event stream (`GET /v1/events/stream`).
    pub live: LiveConfig,
    /// Serve the storefront and the operations console at `/` ([`crate::web`]).
    pub web: bool,
}

/// The live event stream's bounds ([`crate::feed`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// Serve the stream (it follows the event bus when the gateway has one).
    pub enabled: bool,
    /// Events kept for clients that reconnect with `Last-Event-ID`, and how far a client may
    /// fall behind before it is cut off.
    pub buffer: usize,
    /// A comment line this often on a quiet stream, so proxies and clients keep it open.
    pub heartbeat_secs: u64,
    /// Streams open at once; one more is answered 503.
    pub max_clients: usize,
    /// A write to a client that takes longer than this ends its stream.
    pub write_timeout_secs: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            enabled: true,
            buffer: 4096,
            heartbeat_secs: 15,
            max_clients: 256,
            write_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeCacheConfig {
    pub enabled: bool,
    /// Where entries persist; empty: `<data.dir>/edge-cache`.
    pub dir: String,
    pub max_disk_bytes: u64,
    pub max_memory_bytes: u64,
    /// The RPCs (by method name) whose public GET responses are cached.
    pub rpcs: Vec<String>,
    /// Fresh for this long...
    pub ttl_secs: u64,
    /// ...then served stale while refreshed in the background for this long...
    pub stale_while_revalidate_secs: u64,
    /// ...and served stale when the service fails for this long.
    pub stale_if_error_secs: u64,
}

impl Default for EdgeCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: String::new(),
            max_disk_bytes: 256 << 20,
            max_memory_bytes: 32 << 20,
            rpcs: [
                "ListProducts",
                "GetProduct",
                "GetProductBySku",
                "ListCategories",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
            ttl_secs: 60,
            stale_while_revalidate_secs: 30,
            stale_if_error_secs: 86_400,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Empty: no HTTPS listener.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and private key.
    pub cert_path: String,
    pub key_path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed to call the API from a browser (`https://shop.example`), or `*`;
    /// empty: no cross-origin access.
    pub allowed_origins: Vec<String>,
    /// Request headers a browser may send.
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age_secs: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_headers: vec![
                "authorization".into(),
                "content-type".into(),
                "x-request-id".into(),
                "traceparent".into(),
            ],
            max_age_secs: 600,
        }
    }
}

impl CorsConfig {
    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
    pub fn allow(&self, origin: &str) -> Option<String> {
        if self.allowed_origins.iter().any(|o| o == "*") {
            Some("*".into())
        } else if self
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
        {
            Some(origin.to_owned())
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitBy {
    /// The client's IP address.
    Ip,
    /// The signed-in user, else the client's IP address.
    User,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitPolicy {
    pub name: String,
    /// Path prefixes this policy covers; empty: all paths.
    #[serde(default)]
    pub paths: Vec<String>,
    /// `requests` per `per_secs` on average...
    pub requests: u32,
    pub per_secs: u32,
    /// ...with bursts of up to this many.
    pub burst: u32,
    pub by: LimitBy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Passthrough {
    pub prefix: String,
    /// `host:port` of the HTTP upstream.
    pub upstream: String,
    /// Who may call it: `public` (the default), `customer` or `admin`. A token sent to a public
    /// route is verified all the same, and the caller's identity is forwarded.
    #[serde(default)]
    pub access: crate::router::Access,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let svc = |port: u16| vec![format!("http://127.0.0.1:{port}")];
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 2,
            upstreams: BTreeMap::from([
                ("users".to_owned(), svc(50051)),
                ("products".to_owned(), svc(50052)),
                ("orders".to_owned(), svc(50053)),
                ("payments".to_owned(), svc(50054)),
                ("notifications".to_owned(), svc(50055)),
                ("delivery".to_owned(), svc(50056)),
            ]),
            issuer: "shopverse".into(),
            audience: "shopverse-api".into(),
            leeway_secs: 30,
            jwks_refresh_secs: 300,
            jwks_refetch_min_secs: 10,
            max_body_bytes: 1 << 20,
            max_headers: 100,
            max_header_bytes: 16 << 10,
            request_timeout_ms: 10_000,
            health_check_secs: 5,
            client_body_timeout_ms: 10_000,
            client_header_timeout_ms: 10_000,
            trusted_proxies: Vec::new(),
            redis_url: String::new(),
            redis_prefix: "shopverse:ratelimit:".into(),
            redis_timeout_ms: 25,
            access_log: true,
            live: LiveConfig::default(),
            web: true,
            rate_limits: vec![
                RateLimitPolicy {
                    name: "login".into(),
                    paths: vec!["/v1/auth/".into()],
                    requests: 10,
                    per_secs: 60,
                    burst: 10,
                    by: LimitBy::Ip,
                },
                RateLimitPolicy {
                    name: "default".into(),
                    paths: Vec::new(),
                    requests: 50,
                    per_secs: 1,
                    burst: 100,
                    by: LimitBy::User,
                },
            ],
            passthrough: Vec::new(),
            cors: CorsConfig::default(),
            tls: TlsConfig::default(),
            cache: EdgeCacheConfig::default(),
        }
    }
}

impl GatewayConfig {
    pub fn validate(&self, prefix: &str) -> Result<(), Invalid> {
        let key = |k: &str| format!("{prefix}.{k}");
        if !(1..=64).contains(&self.threads) {
            return Err(Invalid::new(key("threads"), "must be between 1 and 64"));
        }
        let live = &self.live;
        for (name, value, range) in [
            ("live.buffer", live.buffer, 16..=1_000_000),
            ("live.heartbeat_secs", live.heartbeat_secs as usize, 1..=300),
            ("live.max_clients", live.max_clients, 1..=100_000),
            (
                "live.write_timeout_secs",
                live.write_timeout_secs as usize,
                1..=300,
            ),
        ] {
            if !range.contains(&value) {
                let (lo, hi) = (range.start(), range.end());
                return Err(Invalid::new(
                    key(name),
                    format!("must be between {lo} and {hi}"),
                ));
            }
        }
        for (name, urls) in &self.upstreams {
            if urls.is_empty() {
                return Err(Invalid::new(
                    key(&format!("upstreams.{name}")),
                    "needs at least one endpoint",
                ));
            }
            if let Err(e) = shopverse_rpc::pool::parse_list(&urls.join(",")) {
                return Err(Invalid::new(
                    key(&format!("upstreams.{name}")),
                    e.to_string(),
                ));
            }
        }
        if !(1024..=256 << 20).contains(&self.max_body_bytes) {
            return Err(Invalid::new(
                key("max_body_bytes"),
                "must be between 1 KiB and 256 MiB",
            ));
        }
        if !(8..=10_000).contains(&self.max_headers)
            || !(1024..=1 << 20).contains(&self.max_header_bytes)
        {
            return Err(Invalid::new(
                key("max_headers"),
                "max_headers must be 8 to 10000 and max_header_bytes 1 KiB to 1 MiB",
            ));
        }
        if !(10..=600_000).contains(&self.client_body_timeout_ms) {
            return Err(Invalid::new(
                key("client_body_timeout_ms"),
                "must be between 10 and 600000",
            ));
        }
        if !(10..=600_000).contains(&self.client_header_timeout_ms) {
            return Err(Invalid::new(
                key("client_header_timeout_ms"),
                "must be between 10 and 600000",
            ));
        }
        if !(1..=3600).contains(&self.health_check_secs) {
            return Err(Invalid::new(
                key("health_check_secs"),
                "must be between 1 and 3600",
            ));
        }
        if !(10..=600_000).contains(&self.request_timeout_ms) {
            return Err(Invalid::new(
                key("request_timeout_ms"),
                "must be between 10 and 600000",
            ));
        }
        for (i, p) in self.rate_limits.iter().enumerate() {
            if p.requests == 0 || p.per_secs == 0 || p.burst == 0 {
                return Err(Invalid::new(
                    key(&format!("rate_limits[{i}]")),
                    "requests, per_secs and burst must be positive",
                ));
            }
        }
        if !self.redis_url.is_empty()
            && !self.redis_url.starts_with("redis://")
            && !self.redis_url.starts_with("rediss://")
        {
            return Err(Invalid::new(
                key("redis_url"),
                "must be empty or a redis:// URL",
            ));
        }
        if self.tls.listen.is_some()
            && (self.tls.cert_path.is_empty() || self.tls.key_path.is_empty())
        {
            return Err(Invalid::new(
                key("tls"),
                "a TLS listener needs cert_path and key_path",
            ));
        }
        if !(1..=10_000).contains(&self.redis_timeout_ms) {
            return Err(Invalid::new(
                key("redis_timeout_ms"),
                "must be between 1 and 10000",
            ));
        }
        for (i, p) in self.passthrough.iter().enumerate() {
            if !p.prefix.starts_with('/') {
                return Err(Invalid::new(
                    key(&format!("passthrough[{i}].prefix")),
                    "must start with /",
                ));
            }
            if p.upstream.parse::<SocketAddr>().is_err() {
                return Err(Invalid::new(
                    key(&format!("passthrough[{i}].upstream")),
                    "must be host:port (an IP address)",
                ));
            }
        }
        Ok(())
    }
}
