//! The authorization matrix through the gateway: every REST route, called by nobody, by
//! customer A (who owns an order, its payment and shipment, a cart and notifications), by
//! customer B and by an administrator, each answer checked against the table below: 401 without
//! a token, 403 for a missing role, 404 for another customer's resource. After each refusal
//! every table of every service's database is read again and must be unchanged.
//!
//! Callers allowed through are sent requests that cannot change anything (a body the service
//! refuses, or a read), so the table also shows they got past the gateway's access rule.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;

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

/// The `Authorization` value of a signed-in `email`.
fn bearer(gw: SocketAddr, email: &str, password: &str) -> String {
    format!("Bearer {}", login(gw, email, password))
}

/// Registers and signs in `email`: its id and `Authorization` value.
fn customer(gw: SocketAddr, email: &str) -> (String, String) {
    let id = register(gw, email, "a long password");
    (id, bearer(gw, email, "a long password"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_by_every_caller() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, err) = cli(
        d,
        &["admin", "create", "--email", "root@example.com"],
        &[("SHOPVERSE_ADMIN_PASSWORD", "root password 123")],
    );
    assert!(ok, "{err}");
    let app = Appliance::start(d, &["--demo"]);
    let gw = app.addrs["gateway"];
    let admin = bearer(gw, "root@example.com", "root password 123");
    let (a_id, a) = customer(gw, "a@example.com");
    let (_, b) = customer(gw, "b@example.com");

    // A's world: a paid order with its shipment, and an item still in the cart.
    let products = http(gw, "GET", "/v1/products?pageSize=2", &[], b"").json();
    let p = products["products"][0]["id"].as_str().unwrap().to_owned();
    let sku = products["products"][0]["sku"].as_str().unwrap().to_owned();
    let p2 = products["products"][1]["id"].as_str().unwrap().to_owned();
    let as_a = [("authorization", a.as_str())];
    let add = format!(r#"{{"productId":"{p}","quantity":1}}"#);
    assert_eq!(
        http(gw, "POST", "/v1/cart/items", &as_a, add.as_bytes()).status,
        200
    );
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
    let add2 = format!(r#"{{"productId":"{p2}","quantity":2}}"#);
    assert_eq!(
        http(gw, "POST", "/v1/cart/items", &as_a, add2.as_bytes()).status,
        200
    );
    // Nothing in flight any more: the outboxes drained, the notices written.
    let settled = {
        let files = common::saga::Urls::sqlite_files(d);
        common::saga::connect(&common::saga::Urls::of(&files)).await
    };
    common::saga::settle(&settled, Duration::from_secs(30)).await;
    settled.close().await;

    use Caller::*;
    // (method, path, body, [anonymous, A, B, admin]); 0: not sent (it would change something
    // the caller may change; the allowed case is shown by a refused body elsewhere).
    let rows: Vec<(&str, String, &str, [u16; 4])> = vec![
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
    ];
    let mut before = snapshot(d);
    let mut wrong = Vec::new();
    for (method, path, body, want) in &rows {
        for (caller, want) in CALLERS.iter().zip(want) {
            if *want == 0 {
                continue;
            }
            let token = match caller {
                Anonymous => None,
                A => Some(a.as_str()),
                B => Some(b.as_str()),
                Admin => Some(admin.as_str()),
            };
            let headers: Vec<(&str, &str)> =
                token.map(|t| ("authorization", t)).into_iter().collect();
            let r = http(gw, method, path, &headers, body.as_bytes());
            if r.status != *want {
                wrong.push(format!(
                    "{method} {path} as {caller:?}: {} (want {want}) {}",
                    r.status, r.body
                ));
            }
            let after = snapshot(d);
            if r.status >= 400 && after != before {
                wrong.push(format!(
                    "{method} {path} as {caller:?} was refused ({}) but changed the data",
                    r.status
                ));
            }
            before = after;
            // B sees none of A's things in its own lists.
            if matches!(caller, B) && r.status == 200 && r.body.contains(&o) {
                wrong.push(format!("{method} {path} shows B A's order"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the matrix does not hold:\n{}",
        wrong.join("\n")
    );

    // What the table could not send: the administrator does ship and deliver A's order, and A
    // is still a customer only.
    let as_admin = [("authorization", admin.as_str())];
    let unshipped = snapshot(d);
    for step in ["ship", "deliver"] {
        let r = http(
            gw,
            "POST",
            &format!("/v1/orders/{o}/shipment:{step}"),
            &as_admin,
            b"{}",
        );
        assert_eq!(r.status, 200, "{step}: {}", r.body);
    }
    // The snapshot sees a change when there is one (else the checks above prove nothing).
    assert_ne!(snapshot(d), unshipped);
    let me = http(gw, "GET", "/v1/me", &as_a, b"").json();
    assert_eq!(me["roles"], serde_json::json!(["customer"]), "{me}");

    // The cache purge is on the admin listener only, and that listens on loopback.
    assert!(app.admin.ip().is_loopback(), "{}", app.admin);
    assert_eq!(
        http(gw, "POST", "/cache/purge?all=true", &as_admin, b"").status,
        404
    );
    assert_eq!(
        http(app.admin, "POST", "/cache/purge?all=true", &[], b"").status,
        200
    );

    // X-Forwarded-For from a peer that is not a trusted proxy changes nothing: the rate limit
    // keeps counting against the peer's own address.
    let remaining = |xff: &str| {
        let r = http(
            gw,
            "POST",
            "/v1/auth/login",
            &[("x-forwarded-for", xff)],
            b"{}",
        );
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
