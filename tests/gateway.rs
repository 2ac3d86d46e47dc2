//! The gateway from outside: a plain HTTP/1.1 client against `shopverse up`, checking that REST
//! routes answer as their RPCs would, that forged or broken tokens are refused, that spoofed
//! identity headers do nothing, that limits hold, and that bad input is a 4xx with the JSON
//! error, never a 5xx.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

mod common;
use common::*;

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Signs `claims` with the users service's active key, read from its keys folder.
fn sign_with_real_key(data: &std::path::Path, claims: &serde_json::Value) -> String {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("keys/keys.json")).unwrap()).unwrap();
    let kid = manifest["keys"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|k| k["retired_at_ms"].is_null())
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    let der = std::fs::read(data.join(format!("keys/{kid}.key"))).unwrap();
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid);
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_through_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];

    // Public catalog routes, with path variables and query parameters.
    let r = http(gw, "GET", "/v1/categories", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.json()["categories"].as_array().unwrap().len() >= 5);
    let r = http(
        gw,
        "GET",
        "/v1/products?page_size=3&sort=PRODUCT_SORT_PRICE_ASC",
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let products = r.json()["products"].as_array().unwrap().clone();
    assert_eq!(products.len(), 3);
    let cheapest = &products[0];
    assert!(
        cheapest["price"]["amountMinor"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 0
    );
    let id = cheapest["id"].as_str().unwrap();
    let r = http(gw, "GET", &format!("/v1/products/{id}"), &[], b"");
    assert_eq!((r.status, r.json()["id"].as_str()), (200, Some(id)));
    let sku = cheapest["sku"].as_str().unwrap();
    assert_eq!(
        http(gw, "GET", &format!("/v1/skus/{sku}"), &[], b"").json()["id"].as_str(),
        Some(id)
    );
    let r = http(gw, "GET", &format!("/v1/products/{id}/stock"), &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some());
    let r = http(gw, "GET", "/v1/products/does-not-exist", &[], b"");
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let r = http(
        gw,
        "GET",
        "/v1/products",
        &[("x-request-id", "trace-me-123")],
        b"",
    );
    assert_eq!(r.header("x-request-id"), Some("trace-me-123"));

    // Accounts: register, login, profile; errors map to HTTP statuses with the JSON shape.
    let r = http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"gw@example.com","password":"gateway password","displayName":"Gee"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"gw@example.com","password":"gateway password"}"#,
    );
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (409, Some("ALREADY_EXISTS"))
    );
    let r = http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"nope","password":"gateway password"}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["details"][0]["field"], "email");
    let token = login(gw, "gw@example.com", "gateway password");
    let auth = bearer(&token);
    let r = http(gw, "GET", "/v1/me", &[("authorization", &auth)], b"");
    assert_eq!(
        (r.status, r.json()["displayName"].as_str()),
        (200, Some("Gee"))
    );
    let r = http(
        gw,
        "PATCH",
        "/v1/me",
        &[("authorization", &auth)],
        br#"{"displayName":"G. W."}"#,
    );
    assert_eq!(
        (r.status, r.json()["displayName"].as_str()),
        (200, Some("G. W."))
    );

    // Cart and checkout through REST, then the order is readable by its owner only.
    let r = http(
        gw,
        "POST",
        "/v1/cart/items",
        &[("authorization", &auth)],
        format!(r#"{{"productId":"{id}","quantity":2}}"#).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["lines"][0]["quantity"], 2);
    let r = http(
        gw,
        "PUT",
        &format!("/v1/cart/items/{id}"),
        &[("authorization", &auth)],
        br#"{"quantity":1}"#,
    );
    assert_eq!(r.json()["lines"][0]["quantity"], 1);
    let checkout = br#"{"idempotencyKey":"gateway-order-1","paymentMethodToken":"pm_card_ok","shippingAddress":{"line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}"#;
    let r = http(
        gw,
        "POST",
        "/v1/checkout",
        &[("authorization", &auth)],
        checkout,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let order = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["status"], "ORDER_STATUS_PENDING_PAYMENT");
    let t0 = std::time::Instant::now();
    loop {
        let r = http(
            gw,
            "GET",
            &format!("/v1/orders/{order}"),
            &[("authorization", &auth)],
            b"",
        );
        if r.json()["status"] == "ORDER_STATUS_CONFIRMED" {
            break;
        }
        assert!(t0.elapsed().as_secs() < 20, "{}", r.body);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = http(
        gw,
        "GET",
        &format!("/v1/orders/{order}/payment"),
        &[("authorization", &auth)],
        b"",
    );
    assert_eq!(r.json()["status"], "PAYMENT_STATUS_SUCCEEDED");
    http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"other@example.com","password":"another password"}"#,
    );
    let other = bearer(&login(gw, "other@example.com", "another password"));
    assert_eq!(
        http(
            gw,
            "GET",
            &format!("/v1/orders/{order}"),
            &[("authorization", &other)],
            b""
        )
        .status,
        404
    );

    // Routing errors.
    let r = http(gw, "PUT", "/v1/categories", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    assert_eq!(http(gw, "GET", "/v1/nothing/here", &[], b"").status, 404);
    assert_eq!(
        http(
            gw,
            "GET",
            "/v1/admin/users",
            &[("authorization", &auth)],
            b""
        )
        .status,
        403
    );
    let r = http(gw, "GET", "/v1/me", &[], b"");
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));

    // Bad input is a 4xx with the JSON error, never a 5xx.
    for (body, field) in [
        (
            &br#"{"productId": "p", "quantity": "lots"}"#[..],
            Some("quantity"),
        ),
        (br#"{"productId": "p", "bogus": true}"#, None),
        (br#"{"productId": "#, None),
        (b"[1, 2, 3]", None),
    ] {
        let r = http(
            gw,
            "POST",
            "/v1/cart/items",
            &[("authorization", &auth)],
            body,
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["code"], "INVALID_ARGUMENT");
        if let Some(f) = field {
            assert_eq!(r.json()["details"][0]["field"], f);
        }
    }
    let big = vec![b'x'; 2 << 20];
    let r = http(
        gw,
        "POST",
        "/v1/cart/items",
        &[("authorization", &auth)],
        &big,
    );
    assert_eq!(r.status, 413);
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("x-junk-{i}"), "y".repeat(100)))
        .collect();
    let many_refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = http(gw, "GET", "/v1/categories", &many_refs, b"");
    assert_eq!(r.status, 431, "too many headers");
    assert_eq!(r.json()["code"], "INVALID_ARGUMENT");
    let r = http(gw, "GET", "/v1/products?page_size=many", &[], b"");
    assert_eq!(
        (r.status, r.json()["details"][0]["field"].as_str()),
        (400, Some("page_size"))
    );
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_and_spoofed_identity_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[("SHOPVERSE_GATEWAY__JWKS_REFETCH_MIN_SECS", "1")],
    );
    let gw = app.addrs["gateway"];
    http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"eve@example.com","password":"eves password"}"#,
    );
    let good = login(gw, "eve@example.com", "eves password");
    let me = |t: &str| http(gw, "GET", "/v1/me", &[("authorization", &bearer(t))], b"").status;
    assert_eq!(me(&good), 200);
    let sub = {
        let claims = good.split('.').nth(1).unwrap();
        serde_json::from_slice::<serde_json::Value>(&URL_SAFE_NO_PAD.decode(claims).unwrap())
            .unwrap()["sub"]
            .clone()
    };
    let claims = |over: serde_json::Value| {
        let mut c = serde_json::json!({"iss": "shopverse", "aud": "shopverse-api", "sub": sub, "roles": ["customer", "admin"], "iat": now(), "nbf": now(), "exp": now() + 600});
        for (k, v) in over.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let data = dir.path();
    // Signed by the real key, with bad claims.
    assert_eq!(
        me(&sign_with_real_key(data, &claims(serde_json::json!({})))),
        200,
        "control: a well-formed token passes"
    );
    for (name, over) in [
        ("expired", serde_json::json!({"exp": now() - 3600})),
        ("not yet valid", serde_json::json!({"nbf": now() + 3600})),
        ("wrong audience", serde_json::json!({"aud": "someone-else"})),
        ("wrong issuer", serde_json::json!({"iss": "evil"})),
    ] {
        assert_eq!(me(&sign_with_real_key(data, &claims(over))), 401, "{name}");
    }
    let parts: Vec<&str> = good.split('.').collect();
    // alg: none.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let admin_claims = URL_SAFE_NO_PAD.encode(claims(serde_json::json!({})).to_string());
    assert_eq!(
        me(&format!("{none_header}.{admin_claims}.")),
        401,
        "alg none"
    );
    // HS256 keyed with the public key.
    let jwks = http(gw, "GET", "/.well-known/jwks.json", &[], b"").json();
    let x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = jwks["keys"][0]["kid"].as_str().map(str::to_owned);
    let hs256 = jsonwebtoken::encode(
        &hs,
        &claims(serde_json::json!({})),
        &EncodingKey::from_secret(&x).unwrap(),
    )
    .unwrap();
    assert_eq!(me(&hs256), 401, "HS256 with the public key");
    // Unknown kid, tampered payload, truncated, garbage.
    let mut unknown = Header::new(Algorithm::EdDSA);
    unknown.kid = Some("sv-not-a-key".into());
    let stranger_der = {
        let mut d = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        d.extend_from_slice(&[7u8; 32]);
        d
    };
    let foreign = jsonwebtoken::encode(
        &unknown,
        &claims(serde_json::json!({})),
        &EncodingKey::from_ed_der(&stranger_der),
    )
    .unwrap();
    assert_eq!(me(&foreign), 401, "unknown kid");
    assert_eq!(
        me(&format!("{}.{}.{}", parts[0], admin_claims, parts[2])),
        401,
        "tampered payload"
    );
    assert_eq!(me(&good[..good.len() - 10]), 401, "truncated");
    assert_eq!(me("garbage"), 401, "garbage");
    let r = http(
        gw,
        "GET",
        "/v1/me",
        &[("authorization", "Basic Zm9vOmJhcg==")],
        b"",
    );
    assert_eq!(r.status, 401);

    // Spoofed identity headers are ignored: without a token they do not sign anyone in, with
    // one they do not change who it is.
    let r = http(
        gw,
        "GET",
        "/v1/admin/users",
        &[
            ("x-shopverse-user", "admin"),
            ("x-shopverse-roles", "admin"),
        ],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = http(
        gw,
        "GET",
        "/v1/admin/users",
        &[
            ("authorization", &bearer(&good)),
            ("x-shopverse-roles", "admin"),
        ],
        b"",
    );
    assert_eq!(r.status, 403);
    let r = http(
        gw,
        "GET",
        "/v1/me",
        &[
            ("authorization", &bearer(&good)),
            ("x-shopverse-user", "someone-else"),
        ],
        b"",
    );
    assert_eq!(r.json()["email"], "eve@example.com");

    // Rotation: a token from the new key passes without restarting the gateway.
    let (ok, _, err) = cli(data, &["keys", "rotate"], &[]);
    assert!(ok, "{err}");
    // The unknown-kid probe above just refetched; refetches are rate-limited to one a second here.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let fresh = login(gw, "eve@example.com", "eves password");
    assert_eq!(me(&fresh), 200, "new kid accepted");
    assert_eq!(me(&good), 200, "old tokens stay valid until they expire");

    // The login policy: 10 per minute per IP, then 429 with Retry-After and RateLimit headers.
    let mut last = None;
    for _ in 0..12 {
        last = Some(http(
            gw,
            "POST",
            "/v1/auth/login",
            &[],
            br#"{"email":"eve@example.com","password":"wrong password"}"#,
        ));
    }
    let r = last.unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert!(
        r.header("ratelimit-policy").unwrap().contains("q=10;w=60"),
        "{:?}",
        r.headers
    );
    assert!(r.header("ratelimit").is_some());

    // Auth failures are counted by reason.
    let metrics = http(app.admin, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("shopverse_gateway_auth_failures_total{reason=\"expired\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shopverse_gateway_rate_limited_total{policy=\"login\"}"),
        "{metrics}"
    );
    app.stop();
}

/// A `shopverse gateway` process alone, in front of services that are not running.
struct LoneGateway {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl LoneGateway {
    fn start(dir: &std::path::Path, name: &str, env: &[(&str, &str)]) -> LoneGateway {
        Self::start_with(dir, name, env, "")
    }

    fn start_with_args(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> LoneGateway {
        Self::start_full(dir, name, env, "", args, None)
    }

    /// `extra` is appended to the configuration file.
    fn start_with(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        extra: &str,
    ) -> LoneGateway {
        Self::start_full(dir, name, env, extra, &[], None)
    }

    /// `users`: where the users service answers (none: nowhere).
    fn start_full(
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
        extra: &str,
        args: &[&str],
        users: Option<SocketAddr>,
    ) -> LoneGateway {
        // Port 1: nothing listens there, and no test's port-0 server can be given it (a port
        // bound and released here could be, and then "down" answered).
        let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let users = users.unwrap_or(dead);
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!("[gateway]\nlisten = \"127.0.0.1:0\"\n[gateway.upstreams]\nusers = [\"http://{users}\"]\nproducts = [\"http://{dead}\"]\n{extra}"),
        )
        .unwrap();
        #[allow(clippy::zombie_processes)] // `stop` and `Drop` reap it
        let mut child = std::process::Command::new(BIN)
            .args(["gateway", "--config"])
            .arg(&cfg)
            .args(["--admin-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let (addr, admin) = loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "no ready line");
            if let Some(rest) = line.trim().strip_prefix("ready: gateway=") {
                let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                let admin = rest.rsplit("admin=").next().unwrap().parse().unwrap();
                break (addr, admin);
            }
        };
        LoneGateway { child, addr, admin }
    }

    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}");
    }
}

impl Drop for LoneGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_is_down_is_a_503() {
    let dir = tempfile::tempdir().unwrap();
    let gw = LoneGateway::start(dir.path(), "gw", &[]);
    let r = http(gw.addr, "GET", "/v1/categories", &[], b"");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAVAILABLE");
    assert_eq!(r.json()["message"], "the products service is unavailable");
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_admit_what_one_would() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("shopverse-test:{}:", uuid::Uuid::new_v4());
    let redis =
        std::env::var("SHOPVERSE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let env = [
        ("SHOPVERSE_GATEWAY__REDIS_URL", redis.as_str()),
        ("SHOPVERSE_GATEWAY__REDIS_PREFIX", prefix.as_str()),
    ];
    let a = LoneGateway::start(dir.path(), "a", &env);
    let b = LoneGateway::start(dir.path(), "b", &env);
    // The login policy admits 10 a minute per IP; 6 attempts at each gateway.
    let mut limited = 0;
    for i in 0..12 {
        let gw = if i % 2 == 0 { a.addr } else { b.addr };
        let r = http(
            gw,
            "POST",
            "/v1/auth/login",
            &[],
            br#"{"email":"x@example.com","password":"whatever pw"}"#,
        );
        match r.status {
            429 => limited += 1,
            503 => {} // admitted, and the users service is not running
            s => panic!("{s}: {}", r.body),
        }
    }
    assert_eq!(limited, 2, "together they admitted exactly 10");
    a.stop();
    b.stop();
}

/// A plain HTTP upstream that answers every request with `reply` and records what it was sent.
fn recording_upstream(
    reply: &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = vec![0u8; 16 << 10];
            let n = s.read(&mut buf).unwrap_or(0);
            seen2
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = s.write_all(reply);
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_reach_a_plain_http_upstream_without_spoofed_identity() {
    let (up_addr, seen) = recording_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    );
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!("[{{prefix = \"/static/\", upstream = \"{up_addr}\"}}]");
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough)],
    );
    let r = http(
        app.addrs["gateway"],
        "GET",
        "/static/logo.txt",
        &[
            ("x-shopverse-user", "admin"),
            ("x-shopverse-roles", "admin"),
        ],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (200, "hello"));
    let req = seen.lock().unwrap().pop().unwrap().to_lowercase();
    assert!(req.starts_with("get /static/logo.txt"), "{req}");
    assert!(
        !req.contains("x-shopverse-user"),
        "spoofed identity reached the upstream: {req}"
    );
    assert!(!req.contains("x-shopverse-roles"), "{req}");
    assert!(req.contains("x-request-id"), "{req}");
    app.stop();
}

/// Pass-through prefixes are not a way around the edge: a route may require a signed-in
/// customer, the caller's verified identity (never a spoofed one) reaches the upstream, and the
/// rate limits apply to it with the same 429 and headers as everywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_take_access_rules_and_rate_limits() {
    let (up_addr, seen) =
        recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    // `/private/...` matches both `/private/` and the later `/p`: the first listed must win.
    // (Pass-through prefixes come before the REST routes, so none may cover `/v1/`.)
    let passthrough = format!(
        "[{{prefix = \"/private/\", upstream = \"{up_addr}\", access = \"customer\"}}, \
          {{prefix = \"/static/\", upstream = \"{up_addr}\"}}, \
          {{prefix = \"/p\", upstream = \"{up_addr}\", access = \"admin\"}}]"
    );
    let limits = r#"[{name = "assets", paths = ["/static/"], requests = 1, per_secs = 60, burst = 2, by = "ip"}]"#;
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", limits),
        ],
    );
    let gw = app.addrs["gateway"];

    // Access: no token, a spoofed identity header, then a real customer.
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("x-shopverse-user", "admin")],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAUTHENTICATED", "{}", r.body);
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request reached the upstream"
    );
    http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"pt@example.com","password":"a long password"}"#,
    );
    let token = bearer(&login(gw, "pt@example.com", "a long password"));
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("authorization", &token), ("x-shopverse-user", "admin")],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let req = seen.lock().unwrap().pop().unwrap().to_lowercase();
    assert!(req.starts_with("get /private/report.txt"), "{req}");
    assert!(
        !req.contains("x-shopverse-user: admin"),
        "spoofed identity reached the upstream: {req}"
    );
    assert!(
        req.contains("x-shopverse-user: "),
        "the customer's identity is missing: {req}"
    );
    assert!(req.contains("x-shopverse-roles: customer"), "{req}");
    // `/p...` is for admins only; a customer is refused with 403.
    let r = http(gw, "GET", "/pub/x", &[("authorization", &token)], b"");
    assert_eq!(r.status, 403, "{}", r.body);

    // Rate limits: a burst of 2, then 429 with Retry-After; headers on the admitted ones too.
    for _ in 0..2 {
        let r = http(gw, "GET", "/static/logo.png", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            r.header("ratelimit-policy")
                .is_some_and(|v| v.starts_with("\"assets\"")),
            "{:?}",
            r.header("ratelimit-policy")
        );
    }
    let r = http(gw, "GET", "/static/logo.png", &[], b"");
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().unwrap() >= 1)
    );
    // Another route under no policy is not limited.
    let r = http(
        gw,
        "GET",
        "/private/report.txt",
        &[("authorization", &token)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    app.stop();
}

#[test]
fn the_openapi_document_is_valid_openapi_3_1() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let from_admin = http(app.admin, "GET", "/openapi.json", &[], b"");
    let from_gateway = http(app.addrs["gateway"], "GET", "/openapi.json", &[], b"");
    app.stop();
    assert_eq!(from_admin.status, 200);
    assert_eq!(from_admin.json(), from_gateway.json());
    let doc = dir.path().join("openapi.json");
    std::fs::write(&doc, &from_admin.body).unwrap();
    let python = std::env::var("SHOPVERSE_TEST_PYTHON")
        .expect("SHOPVERSE_TEST_PYTHON: scripts/test sets it up (see README)");
    let out = std::process::Command::new(python)
        .args(["-c", "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
        .arg(&doc)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        from_admin.json()["paths"]["/v1/checkout"]["post"]["x-shopverse-role"],
        "customer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_come_through_the_gateway_with_the_same_auth() {
    use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
    use shopverse_proto::products::v1::{ListProductsRequest, ReserveStockRequest};
    use shopverse_proto::users::v1::GetMeRequest;
    use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    // HTTP/2 in cleartext to the gateway's one port, as grpcurl -plaintext would.
    let ch = channel(gw).await;
    let mut products = ProductsServiceClient::new(ch.clone());
    let page = products
        .list_products(ListProductsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .expect("a public method passes")
        .into_inner();
    assert_eq!(page.products.len(), 2);
    let e = products
        .reserve_stock(ReserveStockRequest {
            order_id: "x".into(),
            lines: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "internal methods stay inside: {e:?}"
    );

    let mut users = UsersServiceClient::new(ch);
    let e = users.get_me(GetMeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // A spoofed identity without a token is not enough.
    let mut spoof = tonic::Request::new(GetMeRequest {});
    spoof
        .metadata_mut()
        .insert("x-shopverse-user", "someone".parse().unwrap());
    spoof
        .metadata_mut()
        .insert("x-shopverse-roles", "admin".parse().unwrap());
    assert_eq!(
        users.get_me(spoof).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    http(
        gw,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"grpc@example.com","password":"grpc password"}"#,
    );
    let token = login(gw, "grpc@example.com", "grpc password");
    let mut req = tonic::Request::new(GetMeRequest {});
    req.metadata_mut()
        .insert("authorization", bearer(&token).parse().unwrap());
    req.metadata_mut()
        .insert("x-shopverse-user", "someone-else".parse().unwrap());
    let me = users
        .get_me(req)
        .await
        .expect("a signed-in call passes")
        .into_inner();
    assert_eq!(
        me.email, "grpc@example.com",
        "the verified identity, not the spoofed one"
    );
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_for_configured_origins_only() {
    let dir = tempfile::tempdir().unwrap();
    let gw = LoneGateway::start(
        dir.path(),
        "cors",
        &[(
            "SHOPVERSE_GATEWAY__CORS__ALLOWED_ORIGINS",
            r#"["https://shop.example"]"#,
        )],
    );
    let pre = |origin: &str| {
        http(
            gw.addr,
            "OPTIONS",
            "/v1/products/p1",
            &[
                ("origin", origin),
                ("access-control-request-method", "PATCH"),
                ("access-control-request-headers", "authorization"),
            ],
            b"",
        )
    };
    let ok = pre("https://shop.example");
    assert_eq!(ok.status, 204, "{}", ok.body);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(
        ok.header("access-control-allow-methods"),
        Some("GET, PATCH")
    );
    assert!(
        ok.header("access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    assert_eq!(pre("https://evil.example").status, 403);
    // Actual requests carry the header for allowed origins only (even errors, so a browser
    // can read them).
    let r = http(
        gw.addr,
        "GET",
        "/v1/categories",
        &[("origin", "https://shop.example")],
        b"",
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    let r = http(
        gw.addr,
        "GET",
        "/v1/categories",
        &[("origin", "https://evil.example")],
        b"",
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_tls_1_2_and_1_3_and_http2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/test installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let env = [
        ("SHOPVERSE_GATEWAY__TLS__LISTEN", free.to_string()),
        (
            "SHOPVERSE_GATEWAY__TLS__CERT_PATH",
            cert.display().to_string(),
        ),
        (
            "SHOPVERSE_GATEWAY__TLS__KEY_PATH",
            key.display().to_string(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = LoneGateway::start(dir.path(), "tls", &env);
    let curl = |extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code}",
                "--cacert",
            ])
            .arg(&cert)
            .args(extra)
            .arg(format!("https://127.0.0.1:{}/v1/categories", free.port()))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The products service is not running: a 503 with the JSON error, over TLS.
    assert_eq!(curl(&["--http2"]), "2 503", "HTTP/2 negotiated by ALPN");
    assert_eq!(curl(&["--http1.1"]), "1.1 503");
    assert_eq!(
        curl(&["--http2", "--tlsv1.2", "--tls-max", "1.2"]),
        "2 503",
        "TLS 1.2"
    );
    assert_eq!(curl(&["--http2", "--tlsv1.3"]), "2 503", "TLS 1.3");
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_policies() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |burst: u32| {
        format!(
            "[[gateway.rate_limits]]\nname = \"login\"\npaths = [\"/v1/auth/\"]\nrequests = {burst}\nper_secs = 3600\nburst = {burst}\nby = \"ip\"\n"
        )
    };
    let gw = LoneGateway::start_with(dir.path(), "hup", &[], &policy(1000));
    let login = || {
        http(
            gw.addr,
            "POST",
            "/v1/auth/login",
            &[],
            br#"{"email":"a@b.co","password":"whatever pw"}"#,
        )
        .status
    };
    for _ in 0..5 {
        assert_eq!(login(), 503, "admitted (users is not running)");
    }
    // Tighten the policy in the file and send SIGHUP: no restart, the next requests see it.
    let cfg = dir.path().join("hup.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&policy(1000), &policy(1));
    std::fs::write(&cfg, text).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status();
    let t0 = std::time::Instant::now();
    loop {
        if login() == 429 {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 10,
            "the reloaded policy never applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A broken file is refused and the running policy stays.
    std::fs::write(&cfg, "[gateway\n").unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status();
    // A positive barrier: the gateway counts the refused reload; only then is the answer final.
    let t0 = std::time::Instant::now();
    while !http(gw.admin, "GET", "/metrics", &[], b"")
        .body
        .contains("shopverse_config_reloads_total{outcome=\"refused\"} 1")
    {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the broken file was never read"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(login(), 429);
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_in_a_pool_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    // Nothing listens on port 1, and no other test's server can be given it.
    let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let pool = format!(r#"["http://{dead}", "http://{}"]"#, app.products);
    let users = format!(r#"["http://{}"]"#, app.users);
    let gw = LoneGateway::start(
        dir.path(),
        "pool",
        &[
            ("SHOPVERSE_GATEWAY__UPSTREAMS__PRODUCTS", pool.as_str()),
            ("SHOPVERSE_GATEWAY__UPSTREAMS__USERS", users.as_str()),
        ],
    );
    // Reads are retried on the live endpoint at once, and the dead one is ejected.
    for _ in 0..20 {
        let r = http(gw.addr, "GET", "/v1/categories", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    gw.stop();
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_is_a_408() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let gw = LoneGateway::start(
        dir.path(),
        "slow",
        &[("SHOPVERSE_GATEWAY__CLIENT_BODY_TIMEOUT_MS", "300")],
    );
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // Promise 100 bytes, send 10, then stall.
    s.write_all(
        b"POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"email\":",
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("DEADLINE_EXCEEDED"), "{resp}");
    gw.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_upgrade_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listen = port.to_string();
    // No rate limit: the client's steady requests would otherwise use up the per-IP burst, and
    // the last check would get 429 rather than the new process's own 503.
    let env = [
        ("SHOPVERSE_GATEWAY__LISTEN", listen.as_str()),
        ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
    ];
    let old = LoneGateway::start(dir.path(), "old", &env);
    assert_eq!(old.addr, port);
    // Clients keep coming on new connections the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s2, addr) = (stop.clone(), old.addr);
    let client = std::thread::spawn(move || {
        let (mut answered, mut refused) = (0, Vec::<String>::new());
        while !s2.load(std::sync::atomic::Ordering::SeqCst) {
            let r = http(addr, "GET", "/v1/categories", &[], b"");
            // 503: the gateway answered (its services are not running); 429: its rate limit
            // answered. Anything else (no answer at all) counts as refused.
            if r.status == 503 || r.status == 429 {
                answered += 1
            } else {
                refused.push(format!("{} {}", r.status, r.body));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        (answered, refused)
    });
    // A client that connected to the old process and has not sent its request yet when that
    // process stops accepting is still answered. Pingora stops accepting 5 s after SIGQUIT and
    // ends the runtime a second (the configured grace) later; the request comes in between.
    let mut quiet = std::net::TcpStream::connect(old.addr).unwrap();
    quiet
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // The new binary takes the sockets over; the old one hands them over on SIGQUIT and leaves.
    let new = LoneGateway::start_with_args(dir.path(), "old", &env, &["--upgrade"]);
    let _ = std::process::Command::new("kill")
        .args(["-QUIT", &old.child.id().to_string()])
        .status();
    let late = std::thread::spawn(move || {
        use std::io::{Read, Write};
        std::thread::sleep(std::time::Duration::from_millis(5_500));
        let _ = quiet.write_all(b"GET /v1/categories HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut resp = String::new();
        let _ = quiet.read_to_string(&mut resp);
        resp
    });
    let mut old = old;
    let status = old.child.wait().unwrap();
    let late = late.join().unwrap();
    assert!(late.starts_with("HTTP/1.1 503"), "{late:?}");
    assert!(
        late.to_ascii_lowercase().contains("connection: close"),
        "{late:?}"
    );
    assert!(status.success(), "the old gateway exits cleanly: {status}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (answered, refused) = client.join().unwrap();
    assert!(answered > 10, "{answered}");
    assert!(
        refused.is_empty(),
        "refused during the upgrade: {refused:?}"
    );
    assert_eq!(
        http(new.addr, "GET", "/v1/categories", &[], b"").status,
        503,
        "the new process serves"
    );
    new.stop();
}

/// Every REST route of the OpenAPI document (the protos' `google.api.http` rules) answered by
/// its RPC: a JSON reply or a JSON error the service chose, never a routing miss or a 5xx.
#[test]
fn every_rest_route_reaches_its_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = cli(
        dir.path(),
        &["admin", "create", "--email", "root@example.com"],
        &[("SHOPVERSE_ADMIN_PASSWORD", "root password 123")],
    );
    assert!(ok, "{err}");
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let auth = bearer(&login(gw, "root@example.com", "root password 123"));
    let doc = http(gw, "GET", "/openapi.json", &[], b"").json();
    let mut calls = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            // Each `{variable}` becomes `x`; a custom verb (`{id}:archive`) stays.
            let mut concrete = String::new();
            let mut in_var = false;
            for c in path.chars() {
                match c {
                    '{' => {
                        in_var = true;
                        concrete.push('x');
                    }
                    '}' => in_var = false,
                    c if !in_var => concrete.push(c),
                    _ => {}
                }
            }
            let body: &[u8] = if op.get("requestBody").is_some() {
                b"{}"
            } else {
                b""
            };
            let r = http(
                gw,
                &method.to_uppercase(),
                &concrete,
                &[("authorization", &auth)],
                body,
            );
            calls += 1;
            assert!(
                r.status > 0 && r.status < 500,
                "{method} {path} ({concrete}): {} {}",
                r.status,
                r.body
            );
            let j = r.json();
            if r.status >= 400 {
                assert!(
                    j["code"].is_string() && j["message"].is_string(),
                    "{method} {path}: {}",
                    r.body
                );
                assert!(
                    !j["message"].as_str().unwrap().starts_with("no route for"),
                    "{method} {path} did not route: {}",
                    r.body
                );
                assert_ne!(r.status, 405, "{method} {path}");
            }
        }
    }
    assert!(calls >= 30, "{calls} routes");
    app.stop();
}

fn metric(admin: SocketAddr, needle: &str) -> u64 {
    let text = http(admin, "GET", "/metrics", &[], b"").body;
    text.lines()
        .find(|l| l.starts_with(needle))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cache_hits_revalidates_and_fetches_once() {
    let dir = tempfile::tempdir().unwrap();
    // 100 requests at once from one address: lift the default per-IP limit for this test.
    let limits =
        r#"[{name = "default", requests = 100000, per_secs = 1, burst = 100000, by = "ip"}]"#;
    let app = Appliance::start_with_env(
        dir.path(),
        &["--demo"],
        &[("SHOPVERSE_GATEWAY__RATE_LIMITS", limits)],
    );
    let gw = app.addrs["gateway"];
    // The demo catalog's product events purge catalog entries as the gateway consumes them.
    // Wait until an entry outlives a poll interval of that consumer, then start from empty.
    let t0 = std::time::Instant::now();
    loop {
        http(gw, "GET", "/v1/categories", &[], b"");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        if http(gw, "GET", "/v1/categories", &[], b"").header("x-cache") == Some("HIT") {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "the seed's catalog events never settled"
        );
    }
    let r = http(app.admin, "POST", "/cache/purge?all=true", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let first = http(gw, "GET", "/v1/categories", &[], b"");
    assert_eq!((first.status, first.header("x-cache")), (200, Some("MISS")));
    let second = http(gw, "GET", "/v1/categories", &[], b"");
    assert_eq!(
        (second.status, second.header("x-cache")),
        (200, Some("HIT"))
    );
    assert_eq!(first.body, second.body);
    // The front writes a hit's head itself: the same headers as the miss Pingora answered.
    let names = |r: &HttpResponse| {
        let mut n: Vec<String> = r.headers.iter().map(|(k, _)| k.to_lowercase()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&first), names(&second), "{:?}", second.headers);
    for name in ["content-type", "content-length", "etag", "ratelimit-policy"] {
        assert_eq!(first.header(name), second.header(name), "{name}");
    }
    assert!(
        second
            .header("cache-control")
            .is_some_and(|v| v.starts_with("public, max-age=")),
        "{:?}",
        second.headers
    );
    let etag = second.header("etag").unwrap().to_owned();
    let r = http(
        gw,
        "GET",
        "/v1/categories",
        &[("if-none-match", &etag)],
        b"",
    );
    assert_eq!((r.status, r.body.as_str()), (304, ""));
    assert!(
        r.header("cache-control")
            .unwrap()
            .starts_with("public, max-age=")
    );
    let r = http(
        gw,
        "GET",
        "/v1/categories",
        &[("cache-control", "no-cache")],
        b"",
    );
    assert_eq!(
        r.header("x-cache"),
        Some("MISS"),
        "no-cache goes to the service"
    );
    // Signed-in routes are never cached.
    assert_eq!(http(gw, "GET", "/v1/me", &[], b"").header("x-cache"), None);

    // 100 concurrent misses on one key: one upstream call.
    let calls = |app: &Appliance| {
        metric(
            app.admin,
            "shopverse_gateway_upstream_calls_total{service=\"products\"}",
        )
    };
    let before = calls(&app);
    let threads: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || http(gw, "GET", "/v1/products?page_size=7", &[], b"")))
        .collect();
    let mut labels = std::collections::HashMap::new();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        *labels
            .entry(r.header("x-cache").unwrap_or("none").to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        calls(&app) - before,
        1,
        "one fetch for 100 concurrent misses: {labels:?}"
    );
    assert_eq!(labels.get("MISS"), Some(&1), "{labels:?}");
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cache_survives_restarts_and_serves_stale_when_products_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let products = format!(r#"["http://{}"]"#, app.products);
    let users = format!(r#"["http://{}"]"#, app.users);
    let up = [
        ("SHOPVERSE_GATEWAY__UPSTREAMS__PRODUCTS", products.as_str()),
        ("SHOPVERSE_GATEWAY__UPSTREAMS__USERS", users.as_str()),
    ];

    // A gateway restarted on the same data: fresh entries are hits without touching the service.
    let keep = tempfile::tempdir().unwrap();
    let a = LoneGateway::start(keep.path(), "a", &up);
    assert_eq!(
        http(a.addr, "GET", "/v1/categories", &[], b"").header("x-cache"),
        Some("MISS")
    );
    a.stop();
    let a = LoneGateway::start(keep.path(), "a", &up);
    let r = http(a.addr, "GET", "/v1/categories", &[], b"");
    assert_eq!((r.status, r.header("x-cache")), (200, Some("HIT")));
    a.stop();

    // Short freshness; then the products service goes away.
    let short = tempfile::tempdir().unwrap();
    let mut env = up.to_vec();
    env.push(("SHOPVERSE_GATEWAY__CACHE__TTL_SECS", "1"));
    env.push(("SHOPVERSE_GATEWAY__CACHE__STALE_WHILE_REVALIDATE_SECS", "0"));
    let b = LoneGateway::start(short.path(), "b", &env);
    assert_eq!(
        http(b.addr, "GET", "/v1/categories", &[], b"").header("x-cache"),
        Some("MISS")
    );
    app.stop();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let r = http(b.addr, "GET", "/v1/categories", &[], b"");
    assert_eq!(
        (r.status, r.header("x-cache")),
        (200, Some("STALE")),
        "{}",
        r.body
    );
    assert!(r.json()["categories"].as_array().unwrap().len() >= 5);
    let r = http(b.addr, "GET", "/v1/products?page_size=3", &[], b"");
    assert_eq!(r.status, 503, "uncached pages get the JSON error");
    assert_eq!(r.json()["code"], "UNAVAILABLE");
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_is_seen_at_the_edge_within_a_second_and_private_views_bypass() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = cli(
        dir.path(),
        &["admin", "create", "--email", "root@example.com"],
        &[("SHOPVERSE_ADMIN_PASSWORD", "root password 123")],
    );
    assert!(ok, "{err}");
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let list = http(gw, "GET", "/v1/products?page_size=1", &[], b"").json();
    let id = list["products"][0]["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/products/{id}");
    assert_eq!(
        http(gw, "GET", &path, &[], b"").header("x-cache"),
        Some("MISS")
    );
    let cached = http(gw, "GET", &path, &[], b"");
    assert_eq!(cached.header("x-cache"), Some("HIT"));
    let version = cached.json()["version"].as_str().unwrap().to_owned();

    // A signed-in view bypasses the shared cache.
    let admin = bearer(&login(gw, "root@example.com", "root password 123"));
    assert_eq!(
        http(gw, "GET", &path, &[("authorization", &admin)], b"").header("x-cache"),
        Some("BYPASS")
    );

    // An admin edits the price; the product.updated event purges the edge.
    let body = format!(
        r#"{{"expectedVersion": "{version}", "price": {{"amountMinor": "12345", "currency": "EUR"}}}}"#
    );
    let r = http(
        gw,
        "PATCH",
        &path,
        &[("authorization", &admin)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let t0 = std::time::Instant::now();
    loop {
        let r = http(gw, "GET", &path, &[], b"");
        if r.json()["price"]["amountMinor"] == "12345" {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(1),
            "still the old price after 1 s: {}",
            r.body
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Lists were purged too.
    let r = http(gw, "GET", "/v1/products?page_size=1", &[], b"");
    assert_eq!(r.header("x-cache"), Some("MISS"));

    // Purges on the admin listener: by tag, by key, everything.
    assert_eq!(
        http(gw, "GET", &path, &[], b"").header("x-cache"),
        Some("HIT")
    );
    let r = http(
        app.admin,
        "POST",
        &format!("/cache/purge?tag=product:{id}"),
        &[],
        b"",
    );
    assert_eq!(
        (r.status, r.json()["purged"].as_u64()),
        (200, Some(1)),
        "{}",
        r.body
    );
    assert_eq!(
        http(gw, "GET", &path, &[], b"").header("x-cache"),
        Some("MISS")
    );
    let key = format!("{path}?");
    let r = http(
        app.admin,
        "POST",
        &format!("/cache/purge?key={}", key.replace('?', "%3F")),
        &[],
        b"",
    );
    assert_eq!(r.json()["purged"], 1, "{}", r.body);
    http(gw, "GET", "/v1/categories", &[], b"");
    let r = http(app.admin, "POST", "/cache/purge?all=true", &[], b"");
    assert!(r.json()["purged"].as_u64().unwrap() >= 1, "{}", r.body);
    assert_eq!(
        http(gw, "GET", "/v1/categories", &[], b"").header("x-cache"),
        Some("MISS")
    );
    assert_eq!(
        http(app.admin, "GET", "/cache/purge?all=true", &[], b"").status,
        405
    );
    assert_eq!(
        http(app.admin, "POST", "/cache/purge", &[], b"").status,
        400
    );
    let metrics = http(app.admin, "GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("shopverse_edge_cache_hits_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shopverse_edge_cache_purged_total"),
        "{metrics}"
    );
    app.stop();
}

/// A keep-alive HTTP/1.1 upstream: answers `GET /ka/chunked` with a chunked body, echoes the
/// body of `POST /ka/echo`, and closes its side after `GET /ka/bye` (as an upstream whose idle
/// timeout ran out would). Counts the connections it accepted.
fn keepalive_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = upstream.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(s) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line.to_lowercase());
                    }
                    let len = head
                        .iter()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let reply = if head[0].starts_with("head ") {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec()
                    } else if head[0].starts_with("get /ka/close") {
                        // An HTTP/1.0-style answer: the body ends when the connection does.
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nstream");
                        let _ = w.write_all(b"ed");
                        return;
                    } else if head[0].starts_with("get /ka/many") {
                        // More response headers than the front's first parse has room for.
                        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
                        for i in 0..100 {
                            v.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
                        }
                        v.extend_from_slice(b"content-length: 4\r\n\r\nmany");
                        v
                    } else if head[0].starts_with("get /ka/chunked") {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nkeep-alive: timeout=60\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n".to_vec()
                    } else if head[0].starts_with("post /ka/echo") {
                        let mut v =
                            format!("HTTP/1.1 201 Created\r\ncontent-length: {len}\r\n\r\n")
                                .into_bytes();
                        v.extend_from_slice(&body);
                        v
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nbye".to_vec()
                    };
                    if w.write_all(&reply).is_err() {
                        return;
                    }
                    if head[0].starts_with("get /ka/bye") {
                        return; // closes without saying so
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A chunked HTTP/1.1 body, decoded.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// The gateway keeps its connections to a pass-through upstream alive across requests,
/// streams chunked answers and request bodies, survives the upstream closing an idle
/// connection, and answers 502 in the JSON error shape when the upstream is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_reuses_upstream_connections_and_frames_bodies() {
    let (up_addr, accepted) = keepalive_upstream();
    // Nothing listens on port 1, and no other test's server can be given it.
    let gone_addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!(
        "[{{prefix = \"/ka/\", upstream = \"{up_addr}\"}}, {{prefix = \"/gone/\", upstream = \"{gone_addr}\"}}]"
    );
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
        ],
    );
    let gw = app.addrs["gateway"];
    for i in 0..10 {
        let r = http(gw, "GET", "/ka/chunked", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(dechunk(&r.body), "hello", "request {i}: {:?}", r.body);
        assert!(
            r.header("keep-alive").is_none(),
            "the upstream's hop-by-hop header leaked"
        );
        let payload = format!("order {i}");
        let r = http(gw, "POST", "/ka/echo", &[], payload.as_bytes());
        assert_eq!((r.status, r.body.as_str()), (201, payload.as_str()));
    }
    let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
    // One per gateway thread at most (each thread keeps its own idle connections).
    assert!(
        (1..=2).contains(&opened),
        "20 sequential requests opened {opened} upstream connections"
    );
    // The upstream closes after each of these; the next request must not fail on the dead
    // connection.
    for _ in 0..4 {
        let r = http(gw, "GET", "/ka/bye", &[], b"");
        assert_eq!((r.status, r.body.as_str()), (200, "bye"));
    }
    let r = http(gw, "GET", "/gone/x", &[], b"");
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["code"], "UNAVAILABLE", "{}", r.body);
    app.stop();
}

/// One response read off a kept-alive connection: status, lower-cased headers, body (chunked
/// bodies decoded).
fn read_response(
    r: &mut std::io::BufReader<std::net::TcpStream>,
    head_request: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if head_request {
    } else if get("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = get("content-length") {
        body.resize(n.parse().unwrap(), 0);
        r.read_exact(&mut body).unwrap();
    }
    (status, headers, body)
}

/// The HTTP/1 front serves many requests on one client connection (pipelined too), relays
/// each framing an upstream uses, and hands a request it does not serve (REST, here) to
/// Pingora's server mid-connection without losing a byte, getting the connection back after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_connection_carries_pass_through_and_rest_requests() {
    use std::io::{Read, Write};
    let (up_addr, _) = keepalive_upstream();
    // Takes connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming() {
            held.push(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!(
        "[{{prefix = \"/ka/\", upstream = \"{up_addr}\"}}, {{prefix = \"/silent/\", upstream = \"{silent_addr}\"}}]"
    );
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
            ("SHOPVERSE_GATEWAY__REQUEST_TIMEOUT_MS", "1500"),
            ("SHOPVERSE_GATEWAY__CLIENT_BODY_TIMEOUT_MS", "1500"),
        ],
    );
    let gw = app.addrs["gateway"];
    let s = std::net::TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let host = format!("Host: {gw}\r\n");

    for _ in 0..3 {
        write!(w, "GET /ka/chunked HTTP/1.1\r\n{host}\r\n").unwrap();
        let (status, headers, body) = read_response(&mut r, false);
        assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
        assert!(
            !headers.iter().any(|(k, _)| k == "keep-alive"),
            "{headers:?}"
        );
    }
    // Two requests in one write: answered in order.
    write!(
        w,
        "GET /ka/chunked HTTP/1.1\r\n{host}\r\nPOST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\nping"
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).2, b"hello");
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (201, &b"ping"[..]));
    // A body far larger than one read, sent after the head.
    let big: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    write!(
        w,
        "POST /ka/echo HTTP/1.1\r\n{host}content-length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    w.write_all(&big).unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 201);
    assert!(
        body == big,
        "the echoed body differs ({} bytes)",
        body.len()
    );
    // HEAD: a length, no body; the connection stays in step.
    write!(w, "HEAD /ka/x HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, _) = read_response(&mut r, true);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), "5".into())),
        "{headers:?}"
    );
    // A body delimited by the upstream closing reaches the client chunked.
    write!(w, "GET /ka/close HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, body) = read_response(&mut r, false);
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"streamed"[..]),
        "{headers:?}"
    );
    assert!(
        !headers.iter().any(|(k, _)| k == "connection"),
        "{headers:?}"
    );
    // An answer with a hundred headers.
    write!(w, "GET /ka/many HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, headers, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (200, &b"many"[..]));
    assert!(
        headers.contains(&("x-h99".into(), "99".into())),
        "{}",
        headers.len()
    );
    // An upstream that does not answer in time: 504 in the JSON error shape, and the client's
    // connection goes on.
    write!(w, "GET /silent/x HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["code"], "DEADLINE_EXCEEDED");
    write!(w, "GET /ka/chunked HTTP/1.1\r\n{host}\r\n").unwrap();
    assert_eq!(read_response(&mut r, false).2, b"hello");
    // A REST request is Pingora's server's to answer...
    write!(w, "GET /openapi.json HTTP/1.1\r\n{host}\r\n").unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    // ...and the connection comes back to the front after it: pipelined requests are answered
    // (Pingora's server would close after the first, having read past it).
    write!(
        w,
        "POST /ka/echo HTTP/1.1\r\n{host}content-length: 4\r\n\r\npongGET /ka/chunked HTTP/1.1\r\n{host}\r\n"
    )
    .unwrap();
    let (status, _, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (201, &b"pong"[..]));
    assert_eq!(read_response(&mut r, false).2, b"hello");

    // A head that stops half way: answered 408 and closed once the head timeout is up (well
    // before the socket's own 30 s read timeout).
    let mut slow = std::net::TcpStream::connect(gw).unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(slow, "GET /ka/chunked HTTP/1.1\r\n{host}").unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let ended = slow.read_to_end(&mut rest);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "a half-sent head held the connection for {:?} ({ended:?})",
        started.elapsed()
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408 "), "{rest}");
    assert!(rest.contains("connection: close"), "{rest}");

    // `Connection: close` is honoured: the answer says so, then the connection ends.
    let s = std::net::TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    write!(
        w,
        "GET /ka/chunked HTTP/1.1\r\n{host}connection: close\r\n\r\n"
    )
    .unwrap();
    let (status, headers, body) = read_response(&mut r, false);
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    assert!(
        headers.contains(&("connection".into(), "close".into())),
        "{headers:?}"
    );
    let mut rest = Vec::new();
    assert_eq!(r.read_to_end(&mut rest).unwrap(), 0, "{rest:?}");
    app.stop();
}

/// An idle upstream connection the upstream has closed is closed by the gateway too, without
/// waiting for the next request to that upstream (no connections left in CLOSE_WAIT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_the_upstream_closed_are_closed() {
    use std::io::{Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        // Done with the connection: our side closes, and we wait for the gateway's end.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(25)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let ended = s.read_to_end(&mut rest);
        let _ = tx.send((ended.is_ok(), started.elapsed()));
    });
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!("[{{prefix = \"/up/\", upstream = \"{up_addr}\"}}]");
    let app = Appliance::start_with_env(
        dir.path(),
        &[],
        &[
            ("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough),
            ("SHOPVERSE_GATEWAY__RATE_LIMITS", "[]"),
        ],
    );
    let r = http(app.addrs["gateway"], "GET", "/up/x", &[], b"");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    let (closed, after) = rx.recv_timeout(std::time::Duration::from_secs(40)).unwrap();
    assert!(
        closed,
        "the gateway kept the closed upstream connection open for {after:?}"
    );
    app.stop();
}

/// A standalone gateway in front of a `serve users` that goes away: tokens keep verifying with
/// the last good key set, a token with an unknown `kid` is refused at once and a burst of them
/// fetches the key set at most once, and a key rotated while users was down is picked up when
/// it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_service_down_leaves_verification_standing() {
    let (up_addr, seen) =
        recording_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let users_args = |listen: &str| {
        vec![
            "serve".to_owned(),
            "users".into(),
            "--data-dir".into(),
            d.display().to_string(),
            "--listen".into(),
            listen.into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
        ]
    };
    let users = Appliance::spawn(&users_args("127.0.0.1:0"), &[]);
    let users_addr = users.addrs["users"];
    let private = format!(
        "[[gateway.passthrough]]\nprefix = \"/private/\"\nupstream = \"{up_addr}\"\naccess = \"customer\"\n"
    );
    let gw = LoneGateway::start_full(
        d,
        "lone",
        &[("SHOPVERSE_GATEWAY__JWKS_REFETCH_MIN_SECS", "1")],
        &private,
        &[],
        Some(users_addr),
    );
    let r = http(
        gw.addr,
        "POST",
        "/v1/auth/register",
        &[],
        br#"{"email":"una@example.com","password":"unas password"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Two tokens; the second is first shown to the gateway after users has gone.
    let first = login(gw.addr, "una@example.com", "unas password");
    let second = login(gw.addr, "una@example.com", "unas password");
    let private_get = |t: &str| {
        http(
            gw.addr,
            "GET",
            "/private/x",
            &[("authorization", &bearer(t))],
            b"",
        )
        .status
    };
    assert_eq!(private_get(&first), 200);

    users.kill9();
    assert_eq!(private_get(&first), 200, "a token seen before");
    assert_eq!(
        private_get(&second),
        200,
        "a token not seen before, by the last key set"
    );
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|r| r.contains("x-shopverse-user")),
        "the upstream got the verified caller"
    );

    // Unknown kids while users is down: refused at once, one fetch at most for the burst.
    let stranger = {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some("sv-not-a-key".into());
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&[9u8; 32]);
        let claims = serde_json::json!({"iss": "shopverse", "aud": "shopverse-api", "sub": "x",
            "roles": ["customer"], "iat": now(), "nbf": now(), "exp": now() + 600});
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ed_der(&der)).unwrap()
    };
    let fetches = |gw: &LoneGateway| {
        let text = http(gw.admin, "GET", "/metrics", &[], b"").body;
        text.lines()
            .filter(|l| l.starts_with("gateway_jwks_fetches_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    std::thread::sleep(std::time::Duration::from_millis(1100)); // past the refetch interval
    let before = fetches(&gw);
    let t0 = std::time::Instant::now();
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let (addr, token) = (gw.addr, stranger.clone());
            std::thread::spawn(move || {
                http(
                    addr,
                    "GET",
                    "/private/x",
                    &[("authorization", &bearer(&token))],
                    b"",
                )
                .status
            })
        })
        .collect();
    let statuses: Vec<u16> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(5),
        "40 unknown-kid requests took {:?}",
        t0.elapsed()
    );
    let during = fetches(&gw) - before;
    assert!(during <= 1, "{during} key-set fetches for one burst");

    // A key rotated while users is down; users comes back on its address: the new kid's tokens
    // pass, after one refetch.
    let (ok, _, err) = cli(d, &["keys", "rotate"], &[]);
    assert!(ok, "{err}");
    let users = Appliance::spawn(&users_args(&users_addr.to_string()), &[]);
    let t0 = std::time::Instant::now();
    let fresh = loop {
        let r = http(
            gw.addr,
            "POST",
            "/v1/auth/login",
            &[],
            br#"{"email":"una@example.com","password":"unas password"}"#,
        );
        if r.status == 200 {
            break r.json()["accessToken"].as_str().unwrap().to_owned();
        }
        assert!(
            t0.elapsed().as_secs() < 30,
            "users never answered again: {}",
            r.body
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_ne!(
        fresh.split('.').next(),
        first.split('.').next(),
        "the new token names the rotated key"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100)); // past the refetch interval
    assert_eq!(private_get(&fresh), 200, "the rotated key was picked up");
    assert_eq!(private_get(&second), 200, "the old key's tokens still pass");
    users.stop();
    gw.stop();
}
