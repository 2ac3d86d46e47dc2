//! The edge cache seen from a client: hits, revalidation, one fetch for many misses, restarts,
//! stale answers while products is down, and edits seen within a second.

use crate::common::gateway::*;
use crate::common::*;

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
