//! The edge cache seen from a client: hits, revalidation, one fetch for many misses, restarts,
//! stale answers while products is down, and edits seen within a second.

use std::time::Duration;

use crate::common::gateway::*;
use crate::common::*;

/// The demo appliance without per-IP limits (tests send 100 requests at once), its edge cache
/// settled after the seed and purged.
fn settled_and_empty(dir: &std::path::Path) -> Appliance {
    let limits =
        r#"[{name = "default", requests = 100000, per_secs = 1, burst = 100000, by = "ip"}]"#;
    let app = Appliance::start_with_env(
        dir,
        &["--demo"],
        &[("SHOPVERSE_GATEWAY__RATE_LIMITS", limits)],
    );
    let gw = app.addrs["gateway"];
    // The demo catalog's product events purge catalog entries as the gateway consumes them.
    // Wait until an entry outlives a poll interval of that consumer, then start from empty.
    until(
        "the seed's catalog events settle",
        Duration::from_secs(30),
        || {
            http(gw, "GET", "/v1/categories", &[], b"");
            std::thread::sleep(Duration::from_millis(1500));
            http(gw, "GET", "/v1/categories", &[], b"").header("x-cache") == Some("HIT")
        },
    );
    let r = http(app.admin, "POST", "/cache/purge?all=true", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    app
}

/// A miss then a hit with the same body and headers (the front writes a hit's head itself);
/// revalidation by ETag; `no-cache` goes to the service; signed-in routes are never cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_answers_as_the_miss_did_and_revalidates() {
    let dir = tempfile::tempdir().unwrap();
    let app = settled_and_empty(dir.path());
    let gw = app.addrs["gateway"];
    let categories = |headers: &[(&str, &str)]| http(gw, "GET", "/v1/categories", headers, b"");
    let (first, second) = (categories(&[]), categories(&[]));
    assert_eq!((first.status, first.header("x-cache")), (200, Some("MISS")));
    assert_eq!(
        (second.status, second.header("x-cache")),
        (200, Some("HIT"))
    );
    assert_eq!(first.body, second.body);
    let names = |r: &HttpResponse| {
        let mut n: Vec<String> = r.headers.iter().map(|(k, _)| k.to_lowercase()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&first), names(&second), "{:?}", second.headers);
    for name in ["content-type", "content-length", "etag", "ratelimit-policy"] {
        assert_eq!(first.header(name), second.header(name), "{name}");
    }
    let public = |r: &HttpResponse| {
        r.header("cache-control")
            .is_some_and(|v| v.starts_with("public, max-age="))
    };
    assert!(public(&second), "{:?}", second.headers);
    let etag = second.header("etag").unwrap().to_owned();
    let r = categories(&[("if-none-match", &etag)]);
    assert_eq!((r.status, r.body.as_str()), (304, ""));
    assert!(public(&r), "{:?}", r.headers);
    let r = categories(&[("cache-control", "no-cache")]);
    assert_eq!(
        r.header("x-cache"),
        Some("MISS"),
        "no-cache goes to the service"
    );
    assert_eq!(http(gw, "GET", "/v1/me", &[], b"").header("x-cache"), None);
    app.stop();
}

/// 100 concurrent misses on one key: one upstream call, one MISS, the rest served from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_fetch_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = settled_and_empty(dir.path());
    let gw = app.addrs["gateway"];
    let calls = || {
        let series = "shopverse_gateway_upstream_calls_total{service=\"products\"}";
        metric(app.admin, series)
    };
    let before = calls();
    let threads: Vec<_> = (0..100)
        .map(|_| std::thread::spawn(move || http(gw, "GET", "/v1/products?page_size=7", &[], b"")))
        .collect();
    let mut labels = std::collections::HashMap::new();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let label = r.header("x-cache").unwrap_or("none").to_owned();
        *labels.entry(label).or_insert(0) += 1;
    }
    let fetches = calls() - before;
    assert_eq!(
        fetches, 1,
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

/// The `x-cache` outcome of an anonymous `GET path`.
fn x_cache(gw: std::net::SocketAddr, path: &str) -> Option<String> {
    http(gw, "GET", path, &[], b"")
        .header("x-cache")
        .map(str::to_owned)
}

/// The path of the demo catalog's first product.
fn first_product(gw: std::net::SocketAddr) -> String {
    let list = http(gw, "GET", "/v1/products?page_size=1", &[], b"").json();
    format!(
        "/v1/products/{}",
        list["products"][0]["id"].as_str().unwrap()
    )
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
    let path = first_product(gw);
    assert_eq!(x_cache(gw, &path).as_deref(), Some("MISS"));
    let cached = http(gw, "GET", &path, &[], b"");
    assert_eq!(cached.header("x-cache"), Some("HIT"));
    let version = cached.json()["version"].as_str().unwrap().to_owned();

    // A signed-in view bypasses the shared cache.
    let admin = bearer(&login(gw, "root@example.com", "root password 123"));
    let as_admin = [("authorization", admin.as_str())];
    let private = http(gw, "GET", &path, &as_admin, b"");
    assert_eq!(private.header("x-cache"), Some("BYPASS"));

    // A search for a word no product has yet, cached empty.
    let search = "/v1/products?query=zeppelin&facets=true";
    assert_eq!(
        http(gw, "GET", search, &[], b"").json()["facets"]["total"],
        "0"
    );
    assert_eq!(x_cache(gw, search).as_deref(), Some("HIT"));

    // An admin edits the price and the name; the product.updated event purges the edge.
    let body = format!(
        r#"{{"expectedVersion": "{version}", "name": "Zeppelin Edition", "price": {{"amountMinor": "12345", "currency": "EUR"}}}}"#
    );
    let r = http(gw, "PATCH", &path, &as_admin, body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let t0 = std::time::Instant::now();
    loop {
        let r = http(gw, "GET", &path, &[], b"");
        if r.json()["price"]["amountMinor"] == "12345" {
            break;
        }
        let late = t0.elapsed() >= Duration::from_secs(1);
        assert!(!late, "still the old price after 1 s: {}", r.body);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Lists were purged too, searches among them: the new name is found within the second.
    assert_eq!(
        x_cache(gw, "/v1/products?page_size=1").as_deref(),
        Some("MISS")
    );
    loop {
        let r = http(gw, "GET", "/v1/products?query=zeppel", &[], b"").json();
        if r["products"][0]["name"] == "Zeppelin Edition" {
            break;
        }
        let late = t0.elapsed() >= Duration::from_secs(1);
        assert!(!late, "the search misses the new name after 1 s: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = http(gw, "GET", search, &[], b"").json();
    assert_eq!(
        (
            r["facets"]["total"].as_str(),
            r["products"][0]["name"].as_str()
        ),
        (Some("1"), Some("Zeppelin Edition"))
    );
    app.stop();
}

/// Purges on the admin listener: by tag, by key, everything; other methods and a purge of
/// nothing named are refused; the cache's metrics are on the same listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_purges_by_tag_key_or_everything() {
    let dir = tempfile::tempdir().unwrap();
    let app = settled_and_empty(dir.path());
    let (gw, admin) = (app.addrs["gateway"], app.admin);
    let path = first_product(gw);
    let purge = |query: &str| http(admin, "POST", &format!("/cache/purge?{query}"), &[], b"");
    x_cache(gw, &path);
    assert_eq!(x_cache(gw, &path).as_deref(), Some("HIT"));
    let id = path.trim_start_matches("/v1/products/");
    let r = purge(&format!("tag=product:{id}"));
    assert_eq!(
        (r.status, r.json()["purged"].as_u64()),
        (200, Some(1)),
        "{}",
        r.body
    );
    assert_eq!(x_cache(gw, &path).as_deref(), Some("MISS"));
    let r = purge(&format!("key={path}%3F"));
    assert_eq!(r.json()["purged"], 1, "{}", r.body);
    x_cache(gw, "/v1/categories");
    let r = purge("all=true");
    assert!(r.json()["purged"].as_u64().unwrap() >= 1, "{}", r.body);
    assert_eq!(x_cache(gw, "/v1/categories").as_deref(), Some("MISS"));
    assert_eq!(
        http(admin, "GET", "/cache/purge?all=true", &[], b"").status,
        405
    );
    assert_eq!(http(admin, "POST", "/cache/purge", &[], b"").status, 400);
    let metrics = http(admin, "GET", "/metrics", &[], b"").body;
    for series in [
        "shopverse_edge_cache_hits_total",
        "shopverse_edge_cache_purged_total",
    ] {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
    app.stop();
}
