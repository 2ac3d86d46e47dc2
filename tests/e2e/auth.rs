//! Who may do what: forged and spoofed tokens refused, verification standing while users is
//! down, rate limits shared by two gateways, and the authorization matrix below.
//!
//! The authorization matrix through the gateway: every REST route, called by nobody, by
//! customer A (who owns an order, its payment and shipment, a cart and notifications), by
//! customer B and by an administrator, each answer checked against the table below: 401 without
//! a token, 403 for a missing role, 404 for another customer's resource. After each refusal
//! every table of every service's database is read again and must be unchanged.
//!
//! Callers allowed through are sent requests that cannot change anything (a body the service
//! refuses, or a read), so the table also shows they got past the gateway's access rule.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::common::gateway::*;
use crate::common::*;

/// Who calls.
#[derive(Clone, Copy, Debug)]
enum Caller {
    Anonymous,
    A,
    B,
    Admin,
}

const CALLERS: [Caller; 4] = [Caller::Anonymous, Caller::A, Caller::B, Caller::Admin];

/// Every table of every service database, as text: what a refusal must leave as it was.
/// The outboxes, inboxes, migration records and readiness probes are left out (the relays
/// stamp outbox rows as they publish, `/readyz`'s probe writes a row every second; nothing a
/// request does is only there).
fn snapshot(dir: &Path) -> String {
    let mut out = String::new();
    for db in [
        "users",
        "products",
        "orders",
        "payments",
        "delivery",
        "notifications",
        "payment-simulator",
    ] {
        let conn = rusqlite::Connection::open_with_flags(
            dir.join(format!("{db}.db")),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        tables.retain(|t| {
            !matches!(
                t.as_str(),
                "outbox" | "inbox" | "_sqlx_migrations" | "readyz_probe"
            )
        });
        for t in tables {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
            let n = stmt.column_count();
            let mut rows: Vec<String> = stmt
                .query_map([], |r| {
                    Ok((0..n)
                        .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect();
            rows.sort();
            out.push_str(&format!("{db}.{t}:\n{}\n", rows.join("\n")));
        }
    }
    out
}

/// An appliance with an administrator; customer A owns a paid order with its shipment, notices
/// and an item in the cart; customer B has nothing.
struct World {
    app: Appliance,
    dir: tempfile::TempDir,
    gw: SocketAddr,
    admin: String,
    a: String,
    a_id: String,
    b: String,
    /// Two products and the first one's SKU.
    p: String,
    p2: String,
    sku: String,
    /// A's order.
    o: String,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let (app, admin) = with_admin(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let (a_id, a) = customer(gw, "a@example.com");
    let (_, b) = customer(gw, "b@example.com");
    let products = http(gw, "GET", "/v1/products?pageSize=2", &[], b"").json();
    let id = |i: usize, f: &str| products["products"][i][f].as_str().unwrap().to_owned();
    let (p, sku, p2) = (id(0, "id"), id(0, "sku"), id(1, "id"));
    let as_a = [("authorization", a.as_str())];
    let add = |p: &str, n: u32| {
        let body = format!(r#"{{"productId":"{p}","quantity":{n}}}"#);
        assert_eq!(
            http(gw, "POST", "/v1/cart/items", &as_a, body.as_bytes()).status,
            200
        );
    };
    add(&p, 1);
    let checkout = r#"{"idempotencyKey":"authz-order-1","paymentMethodToken":"pm_card_ok",
        "shippingAddress":{"recipient":"A","line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}"#;
    let order = http(gw, "POST", "/v1/checkout", &as_a, checkout.as_bytes());
    assert_eq!(order.status, 200, "{}", order.body);
    let o = order.json()["id"].as_str().unwrap().to_owned();
    until(
        "A's order confirmed and its shipment made",
        Duration::from_secs(30),
        || http(gw, "GET", &format!("/v1/orders/{o}/shipment"), &as_a, b"").status == 200,
    );
    until("A's notices", Duration::from_secs(30), || {
        let n = http(gw, "GET", "/v1/notifications", &as_a, b"").json();
        n["notifications"].as_array().is_some_and(|n| n.len() >= 2)
    });
    add(&p2, 2);
    // Nothing in flight any more: the outboxes drained, the notices written.
    let files = crate::common::saga::Urls::sqlite_files(dir.path());
    let settled = crate::common::saga::connect(&crate::common::saga::Urls::of(&files)).await;
    crate::common::saga::settle(&settled, Duration::from_secs(30)).await;
    settled.close().await;
    World {
        app,
        dir,
        gw,
        admin,
        a,
        a_id,
        b,
        p,
        p2,
        sku,
        o,
    }
}

/// (method, path, body, [anonymous, A, B, admin]); 0: not sent (it would change something
/// the caller may change; the allowed case is shown by a refused body elsewhere).
fn routes(w: &World) -> Vec<(&'static str, String, &'static str, [u16; 4])> {
    let World {
        p,
        p2,
        sku,
        o,
        a_id,
        ..
    } = w;
    vec![
        ("GET", "/v1/categories".into(), "", [200, 200, 200, 200]),
        ("POST", "/v1/categories".into(), "{}", [401, 403, 403, 400]),
        ("GET", "/v1/products".into(), "", [200, 200, 200, 200]),
        ("GET", format!("/v1/products/{p}"), "", [200, 200, 200, 200]),
        ("GET", format!("/v1/skus/{sku}"), "", [200, 200, 200, 200]),
        ("POST", "/v1/products".into(), "{}", [401, 403, 403, 400]),
        (
            "PATCH",
            format!("/v1/products/{p}"),
            r#"{"name":""}"#,
            [401, 403, 403, 400],
        ),
        (
            "POST",
            format!("/v1/products/{p}:archive"),
            r#"{"expectedVersion":99}"#,
            [401, 403, 403, 400],
        ),
        (
            "GET",
            format!("/v1/products/{p}/stock"),
            "",
            [200, 200, 200, 200],
        ),
        (
            "PUT",
            format!("/v1/products/{p}/stock"),
            r#"{"available":-1}"#,
            [401, 403, 403, 400],
        ),
        ("GET", "/v1/me".into(), "", [401, 200, 200, 200]),
        (
            "PATCH",
            "/v1/me".into(),
            r#"{"displayName":""}"#,
            [401, 400, 400, 400],
        ),
        ("GET", "/v1/admin/users".into(), "", [401, 403, 403, 200]),
        (
            "PUT",
            format!("/v1/admin/users/{a_id}/roles"),
            r#"{"roles":["admin"]}"#,
            [401, 403, 403, 0],
        ),
        (
            "PUT",
            format!("/v1/admin/users/{a_id}/roles"),
            r#"{"roles":["king"]}"#,
            [401, 403, 403, 400],
        ),
        ("GET", "/v1/cart".into(), "", [401, 200, 200, 200]),
        (
            "POST",
            "/v1/cart/items".into(),
            r#"{"productId":"x","quantity":0}"#,
            [401, 400, 400, 400],
        ),
        (
            "PUT",
            format!("/v1/cart/items/{p2}"),
            r#"{"quantity":0}"#,
            [401, 400, 400, 400],
        ),
        ("DELETE", format!("/v1/cart/items/{p2}"), "", [401, 0, 0, 0]),
        ("DELETE", "/v1/cart".into(), "", [401, 0, 0, 0]),
        ("POST", "/v1/checkout".into(), "{}", [401, 400, 400, 400]),
        ("GET", "/v1/orders".into(), "", [401, 200, 200, 200]),
        ("GET", format!("/v1/orders/{o}"), "", [401, 200, 404, 200]),
        (
            "POST",
            format!("/v1/orders/{o}:cancel"),
            "{}",
            [401, 0, 404, 0],
        ),
        ("GET", "/v1/admin/orders".into(), "", [401, 403, 403, 200]),
        (
            "GET",
            format!("/v1/orders/{o}/payment"),
            "",
            [401, 200, 404, 200],
        ),
        (
            "GET",
            format!("/v1/orders/{o}/shipment"),
            "",
            [401, 200, 404, 200],
        ),
        (
            "POST",
            format!("/v1/orders/{o}/shipment:ship"),
            "{}",
            [401, 403, 403, 0],
        ),
        (
            "POST",
            format!("/v1/orders/{o}/shipment:deliver"),
            "{}",
            [401, 403, 403, 0],
        ),
        ("GET", "/v1/notifications".into(), "", [401, 200, 200, 200]),
        (
            "GET",
            "/.well-known/jwks.json".into(),
            "",
            [200, 200, 200, 200],
        ),
    ]
}

/// Every row sent by every caller it names: what differs from the table, a refusal that
/// changed the data, or B shown A's order.
fn misfits(w: &World) -> Vec<String> {
    let mut before = snapshot(w.dir.path());
    let mut wrong = Vec::new();
    for (method, path, body, want) in &routes(w) {
        for (caller, want) in CALLERS.iter().zip(want) {
            if *want == 0 {
                continue;
            }
            let token = match caller {
                Caller::Anonymous => None,
                Caller::A => Some(w.a.as_str()),
                Caller::B => Some(w.b.as_str()),
                Caller::Admin => Some(w.admin.as_str()),
            };
            let headers: Vec<(&str, &str)> =
                token.map(|t| ("authorization", t)).into_iter().collect();
            let r = http(w.gw, method, path, &headers, body.as_bytes());
            if r.status != *want {
                wrong.push(format!(
                    "{method} {path} as {caller:?}: {} (want {want}) {}",
                    r.status, r.body
                ));
            }
            let after = snapshot(w.dir.path());
            if r.status >= 400 && after != before {
                wrong.push(format!(
                    "{method} {path} as {caller:?} was refused ({}) but changed the data",
                    r.status
                ));
            }
            before = after;
            // B sees none of A's things in its own lists.
            if matches!(caller, Caller::B) && r.status == 200 && r.body.contains(&w.o) {
                wrong.push(format!("{method} {path} shows B A's order"));
            }
        }
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_by_every_caller() {
    let w = world().await;
    let wrong = misfits(&w);
    assert!(
        wrong.is_empty(),
        "the matrix does not hold:\n{}",
        wrong.join("\n")
    );

    // What the table could not send: the administrator does ship and deliver A's order, and A
    // is still a customer only.
    let as_admin = [("authorization", w.admin.as_str())];
    let unshipped = snapshot(w.dir.path());
    for step in ["ship", "deliver"] {
        let path = format!("/v1/orders/{}/shipment:{step}", w.o);
        let r = http(w.gw, "POST", &path, &as_admin, b"{}");
        assert_eq!(r.status, 200, "{step}: {}", r.body);
    }
    // The snapshot sees a change when there is one (else the checks above prove nothing).
    assert_ne!(snapshot(w.dir.path()), unshipped);
    let me = http(
        w.gw,
        "GET",
        "/v1/me",
        &[("authorization", w.a.as_str())],
        b"",
    )
    .json();
    assert_eq!(me["roles"], serde_json::json!(["customer"]), "{me}");
    w.app.stop();
}

/// The cache purge is on the admin listener only, and that listens on loopback: not even an
/// administrator's token purges through the gateway.
#[test]
fn the_cache_purge_is_on_the_loopback_admin_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let (app, admin) = with_admin(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    assert!(app.admin.ip().is_loopback(), "{}", app.admin);
    let as_admin = [("authorization", admin.as_str())];
    let through_gateway = http(gw, "POST", "/cache/purge?all=true", &as_admin, b"");
    assert_eq!(through_gateway.status, 404);
    let on_admin = http(app.admin, "POST", "/cache/purge?all=true", &[], b"");
    assert_eq!(on_admin.status, 200);
    app.stop();
}

/// X-Forwarded-For from a peer that is not a trusted proxy changes nothing: the rate limit
/// keeps counting against the peer's own address.
#[test]
fn x_forwarded_for_from_an_untrusted_peer_is_not_believed() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let remaining = |xff: &str| {
        let headers = [("x-forwarded-for", xff)];
        let r = http(gw, "POST", "/v1/auth/login", &headers, b"{}");
        let header = r.header("ratelimit").unwrap_or_default().to_owned();
        header
            .split(";r=")
            .nth(1)
            .and_then(|s| s.split(';').next())
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no ratelimit header: {header:?}"))
    };
    let first = remaining("203.0.113.7");
    assert_eq!(remaining("198.51.100.1"), first - 1);
    assert_eq!(remaining("192.0.2.44, 203.0.113.9"), first - 2);
    app.stop();
}

/// An appliance with customer Eve signed in: it, its data dir, the gateway, Eve's token and
/// her user id.
fn eve(env: &[(&str, &str)]) -> (Appliance, tempfile::TempDir, SocketAddr, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start_with_env(dir.path(), &[], env);
    let gw = app.addrs["gateway"];
    register(gw, "eve@example.com", "eves password");
    let good = login(gw, "eve@example.com", "eves password");
    let claims = URL_SAFE_NO_PAD
        .decode(good.split('.').nth(1).unwrap())
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
    let sub = claims["sub"].as_str().unwrap().to_owned();
    (app, dir, gw, good, sub)
}

/// Eve's claims with the administrator's role added and `over` laid on top.
fn claims(sub: &str, over: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({"iss": "shopverse", "aud": "shopverse-api", "sub": sub,
        "roles": ["customer", "admin"], "iat": now(), "nbf": now(), "exp": now() + 600});
    for (k, v) in over.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// `GET /v1/me` with token `t`: the status.
fn me(gw: SocketAddr, t: &str) -> u16 {
    http(gw, "GET", "/v1/me", &[("authorization", &bearer(t))], b"").status
}

#[test]
fn tokens_signed_by_the_real_key_with_bad_claims_are_401() {
    let (app, dir, gw, good, sub) = eve(&[]);
    assert_eq!(me(gw, &good), 200);
    let signed = |over| sign_with_real_key(dir.path(), &claims(&sub, over));
    assert_eq!(
        me(gw, &signed(serde_json::json!({}))),
        200,
        "control: a well-formed token"
    );
    for (name, over) in [
        ("expired", serde_json::json!({"exp": now() - 3600})),
        ("not yet valid", serde_json::json!({"nbf": now() + 3600})),
        ("wrong audience", serde_json::json!({"aud": "someone-else"})),
        ("wrong issuer", serde_json::json!({"iss": "evil"})),
    ] {
        assert_eq!(me(gw, &signed(over)), 401, "{name}");
    }
    let metrics = http(app.admin, "GET", "/metrics", &[], b"").body;
    let expired = "shopverse_gateway_auth_failures_total{reason=\"expired\"}";
    assert!(
        metrics.contains(expired),
        "failures counted by reason: {metrics}"
    );
    app.stop();
}

#[test]
fn forged_tokens_are_401() {
    let (app, _dir, gw, good, sub) = eve(&[]);
    let admin_claims = URL_SAFE_NO_PAD.encode(claims(&sub, serde_json::json!({})).to_string());
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    assert_eq!(
        me(gw, &format!("{none_header}.{admin_claims}.")),
        401,
        "alg none"
    );
    let jwks = http(gw, "GET", "/.well-known/jwks.json", &[], b"").json();
    let x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = jwks["keys"][0]["kid"].as_str().map(str::to_owned);
    let key = EncodingKey::from_secret(&x).unwrap();
    let hs256 = jsonwebtoken::encode(&hs, &claims(&sub, serde_json::json!({})), &key).unwrap();
    assert_eq!(me(gw, &hs256), 401, "HS256 keyed with the public key");
    let mut unknown = Header::new(Algorithm::EdDSA);
    unknown.kid = Some("sv-not-a-key".into());
    let mut stranger = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    stranger.extend_from_slice(&[7u8; 32]);
    let key = EncodingKey::from_ed_der(&stranger);
    let foreign = jsonwebtoken::encode(&unknown, &claims(&sub, serde_json::json!({})), &key);
    assert_eq!(me(gw, &foreign.unwrap()), 401, "unknown kid");
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], admin_claims, parts[2]);
    assert_eq!(me(gw, &tampered), 401, "tampered payload");
    assert_eq!(me(gw, &good[..good.len() - 10]), 401, "truncated");
    assert_eq!(me(gw, "garbage"), 401, "garbage");
    let basic = [("authorization", "Basic Zm9vOmJhcg==")];
    assert_eq!(http(gw, "GET", "/v1/me", &basic, b"").status, 401);
    app.stop();
}

#[test]
fn spoofed_identity_headers_change_nothing() {
    let (app, _dir, gw, good, _) = eve(&[]);
    // Without a token they sign no one in; with one they do not change who it is.
    let spoofed = [
        ("x-shopverse-user", "admin"),
        ("x-shopverse-roles", "admin"),
    ];
    assert_eq!(
        http(gw, "GET", "/v1/admin/users", &spoofed, b"").status,
        401
    );
    let auth = bearer(&good);
    let headers = [
        ("authorization", auth.as_str()),
        ("x-shopverse-roles", "admin"),
    ];
    assert_eq!(
        http(gw, "GET", "/v1/admin/users", &headers, b"").status,
        403
    );
    let headers = [
        ("authorization", auth.as_str()),
        ("x-shopverse-user", "someone-else"),
    ];
    let r = http(gw, "GET", "/v1/me", &headers, b"");
    assert_eq!(r.json()["email"], "eve@example.com");
    app.stop();
}

#[test]
fn a_rotated_key_is_taken_without_a_restart() {
    let (app, dir, gw, good, _) = eve(&[("SHOPVERSE_GATEWAY__JWKS_REFETCH_MIN_SECS", "1")]);
    assert_eq!(me(gw, &good), 200);
    let (ok, _, err) = cli(dir.path(), &["keys", "rotate"], &[]);
    assert!(ok, "{err}");
    // Refetches of the key set are rate-limited to one a second here.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let fresh = login(gw, "eve@example.com", "eves password");
    assert_eq!(me(gw, &fresh), 200, "new kid accepted");
    assert_eq!(
        me(gw, &good),
        200,
        "old tokens stay valid until they expire"
    );
    app.stop();
}

#[test]
fn sign_in_is_limited_to_10_a_minute_per_address() {
    let (app, _dir, gw, _, _) = eve(&[]);
    let wrong = br#"{"email":"eve@example.com","password":"wrong password"}"#;
    let mut r = http(gw, "POST", "/v1/auth/login", &[], wrong);
    for _ in 0..11 {
        r = http(gw, "POST", "/v1/auth/login", &[], wrong);
    }
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    let policy = r.header("ratelimit-policy").unwrap();
    assert!(policy.contains("q=10;w=60"), "{:?}", r.headers);
    assert!(r.header("ratelimit").is_some());
    let metrics = http(app.admin, "GET", "/metrics", &[], b"").body;
    let limited = "shopverse_gateway_rate_limited_total{policy=\"login\"}";
    assert!(metrics.contains(limited), "{metrics}");
    app.stop();
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

/// `shopverse serve users` on `listen` with its data in `dir`.
fn serve_users(dir: &Path, listen: &str) -> Appliance {
    let args = [
        "serve",
        "users",
        "--data-dir",
        &dir.display().to_string(),
        "--listen",
        listen,
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .map(str::to_owned);
    Appliance::spawn(&args, &[])
}

/// A signed token whose `kid` names no key users ever had.
fn token_of_unknown_kid() -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("sv-not-a-key".into());
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[9u8; 32]);
    let claims = serde_json::json!({"iss": "shopverse", "aud": "shopverse-api", "sub": "x",
        "roles": ["customer"], "iat": now(), "nbf": now(), "exp": now() + 600});
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ed_der(&der)).unwrap()
}

/// How many times the gateway fetched the key set, from its metrics (which must have the series:
/// a count read from nothing would make every bound on it hold).
fn jwks_fetches(gw: &LoneGateway) -> u64 {
    let text = http(gw.admin, "GET", "/metrics", &[], b"").body;
    let samples: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("shopverse_gateway_jwks_fetches_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .collect();
    assert!(!samples.is_empty(), "no key-set fetch series: {text}");
    samples.iter().sum()
}

/// The status of `GET /private/x` with `token`, sent by `n` clients at once.
fn burst(gw: SocketAddr, token: &str, n: usize) -> Vec<u16> {
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let auth = bearer(token);
            std::thread::spawn(move || {
                http(gw, "GET", "/private/x", &[("authorization", &auth)], b"").status
            })
        })
        .collect();
    clients.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A token for Una, once users answers logins (again).
fn una_logs_in(gw: SocketAddr) -> String {
    let body = br#"{"email":"una@example.com","password":"unas password"}"#;
    let mut token = None;
    until("users answers logins", Duration::from_secs(30), || {
        let r = http(gw, "POST", "/v1/auth/login", &[], body);
        token = (r.status == 200).then(|| r.json()["accessToken"].as_str().unwrap().to_owned());
        token.is_some()
    });
    token.unwrap()
}

/// A burst of tokens with an unknown `kid`: all refused at once, and the key set fetched once
/// at most for the lot.
fn unknown_kids_are_refused_with_one_fetch_at_most(gw: &LoneGateway) {
    std::thread::sleep(Duration::from_millis(1100)); // past the refetch interval
    let before = jwks_fetches(gw);
    let t0 = std::time::Instant::now();
    let statuses = burst(gw.addr, &token_of_unknown_kid(), 40);
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "40 unknown kids took {:?}",
        t0.elapsed()
    );
    let during = jwks_fetches(gw) - before;
    assert!(during <= 1, "{during} key-set fetches for one burst");
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
    let users = serve_users(d, "127.0.0.1:0");
    let users_addr = users.addrs["users"];
    let private = format!(
        "[[gateway.passthrough]]\nprefix = \"/private/\"\nupstream = \"{up_addr}\"\naccess = \"customer\"\n"
    );
    let refetch_after_1s = [("SHOPVERSE_GATEWAY__JWKS_REFETCH_MIN_SECS", "1")];
    let gw = LoneGateway::start_full(
        d,
        "lone",
        &refetch_after_1s,
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
    let (first, second) = (una_logs_in(gw.addr), una_logs_in(gw.addr));
    let private_get = |t: &str| burst(gw.addr, t, 1)[0];
    assert_eq!(private_get(&first), 200);

    users.kill9();
    assert_eq!(private_get(&first), 200, "a token seen before");
    assert_eq!(
        private_get(&second),
        200,
        "a token not seen before, by the last key set"
    );
    let verified = seen
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.contains("x-shopverse-user"));
    assert!(verified, "the upstream got the verified caller");

    unknown_kids_are_refused_with_one_fetch_at_most(&gw);

    // A key rotated while users is down; users comes back on its address: the new kid's tokens
    // pass, after one refetch.
    let (ok, _, err) = cli(d, &["keys", "rotate"], &[]);
    assert!(ok, "{err}");
    let users = serve_users(d, &users_addr.to_string());
    let fresh = una_logs_in(gw.addr);
    let kid = |t: &str| t.split('.').next().map(str::to_owned);
    assert_ne!(
        kid(&fresh),
        kid(&first),
        "the new token names the rotated key"
    );
    std::thread::sleep(Duration::from_millis(1100)); // past the refetch interval
    assert_eq!(private_get(&fresh), 200, "the rotated key was picked up");
    assert_eq!(private_get(&second), 200, "the old key's tokens still pass");
    users.stop();
    gw.stop();
}
