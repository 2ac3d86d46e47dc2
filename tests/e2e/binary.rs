//! Black-box tests of the `shopverse` binary: start it as an operator would, in a temporary data
//! directory on free ports, and talk to it only through its public interfaces (gRPC, HTTP, CLI).

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use shopverse_proto::products::v1::{ListCategoriesRequest, ListProductsRequest};
use shopverse_proto::users::v1::users_service_client::UsersServiceClient;
use shopverse_proto::users::v1::{GetJwksRequest, LoginRequest, RegisterRequest};

use crate::common::*;

/// Whether the binary printed a line that `matches` up to its ready line.
fn printed(app: &Appliance, matches: impl Fn(&str) -> bool) -> bool {
    app.stdout.iter().any(|l| matches(l))
}

/// Health and reflection, as grpcurl would use them.
async fn health_and_reflection(app: &Appliance) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let mut health = HealthClient::new(channel(app.users).await);
    let service = "shopverse.users.v1.UsersService".to_owned();
    let status = health.check(HealthCheckRequest { service }).await;
    assert_eq!(
        status.expect("health").into_inner().status(),
        ServingStatus::Serving
    );
    let services = list_services_by_reflection(app.products).await;
    for name in [
        "shopverse.products.v1.ProductsService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|s| s == name), "{name}: {services:?}");
    }
}

fn newcomer() -> LoginRequest {
    LoginRequest {
        email: "newcomer@example.com".into(),
        password: "a long enough password".into(),
    }
}

/// A newcomer registers and logs in; the token verifies against the published JWKS with a JWT
/// library of its own.
async fn newcomer_signs_up(app: &Appliance) {
    let mut users = UsersServiceClient::new(channel(app.users).await);
    let LoginRequest { email, password } = newcomer();
    let display_name = "Newcomer".to_owned();
    let registered = users
        .register(RegisterRequest {
            email,
            password,
            display_name,
        })
        .await;
    let user = registered
        .expect("register")
        .into_inner()
        .user
        .expect("user");
    let tokens = users.login(newcomer()).await.expect("login").into_inner();
    let jwks = users
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    let set: JwkSet = serde_json::from_value(serde_json::json!({
        "keys": jwks.keys.iter().map(|k| serde_json::json!({
            "kty": k.kty, "crv": k.crv, "x": k.x, "kid": k.kid, "alg": k.alg, "use": k.r#use
        })).collect::<Vec<_>>()
    }))
    .expect("jwks json");
    let header = jsonwebtoken::decode_header(&tokens.access_token).expect("header");
    let kid = header.kid.expect("kid");
    let key = DecodingKey::from_jwk(set.find(&kid).expect("published kid")).expect("key");
    let mut v = Validation::new(Algorithm::EdDSA);
    v.set_audience(&["shopverse-api"]);
    v.set_issuer(&["shopverse"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&tokens.access_token, &key, &v);
    assert_eq!(
        claims.expect("verifies").claims["sub"],
        serde_json::json!(user.id)
    );
}

/// The seeded catalog: at least 50 products in at least 5 categories.
async fn the_seeded_catalog(app: &Appliance) {
    let mut products = ProductsServiceClient::new(channel(app.products).await);
    let cats = products.list_categories(ListCategoriesRequest {}).await;
    assert!(cats.expect("categories").into_inner().categories.len() >= 5);
    let mut req = ListProductsRequest {
        page_size: 25,
        ..Default::default()
    };
    let mut all = Vec::new();
    loop {
        let page = products
            .list_products(req.clone())
            .await
            .expect("list")
            .into_inner();
        all.extend(page.products);
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert!(all.len() >= 50, "{} products", all.len());
    let categories: std::collections::HashSet<&str> =
        all.iter().map(|p| p.category_id.as_str()).collect();
    assert!(categories.len() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_demo_register_login_and_browse_over_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Appliance::binary(dir.path(), &["--demo"], &[]);
    let demo = |l: &str| {
        l.contains("demo: customer demo@shopverse.example") && l.ends_with("has 3 orders")
    };
    assert!(printed(&app, demo), "{:#?}", app.stdout);
    assert!(
        printed(&app, |l| l.contains("60 products added")),
        "{:#?}",
        app.stdout
    );
    let table = printed(&app, |l| l.trim_start().starts_with("users "));
    assert!(table, "a table of what runs where");
    health_and_reflection(&app).await;
    newcomer_signs_up(&app).await;
    the_seeded_catalog(&app).await;

    // The admin listener.
    assert_eq!(http_get(app.admin, "/readyz").0, 200);
    let (code, metrics) = http_get(app.admin, "/metrics");
    assert_eq!(code, 200);
    for series in [
        "shopverse_outbox_published_total",
        "shopverse_users_logins_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
    app.stop();

    // Restarted on the same data: the account and the catalog are still there, nothing re-seeded.
    let app = Appliance::binary(dir.path(), &["--demo"], &[]);
    let once = printed(&app, |l| l.ends_with("has 3 orders"));
    assert!(once, "demo orders are not placed twice: {:#?}", app.stdout);
    assert!(
        printed(&app, |l| l.contains("nothing seeded")),
        "{:#?}",
        app.stdout
    );
    let mut users = UsersServiceClient::new(channel(app.users).await);
    users.login(newcomer()).await.expect("login after restart");
    app.stop();
}

async fn list_services_by_reflection(addr: SocketAddr) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream
        .message()
        .await
        .expect("message")
        .expect("a response");
    match resp.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_create_keys_rotate_and_dlq_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = cli(
        dir.path(),
        &["admin", "create", "--email", "root@example.com"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("SHOPVERSE_ADMIN_PASSWORD"), "{err}");
    let (ok, out, err) = cli(
        dir.path(),
        &["admin", "create", "--email", "Root@Example.com"],
        &[("SHOPVERSE_ADMIN_PASSWORD", "root password 123")],
    );
    assert!(ok, "{err}");
    assert!(out.contains("created admin root@example.com"), "{out}");

    let app = Appliance::start(dir.path(), &[]);
    let mut users = UsersServiceClient::new(channel(app.users).await);
    let login = || LoginRequest {
        email: "root@example.com".into(),
        password: "root password 123".into(),
    };
    let t1 = users
        .login(login())
        .await
        .expect("admin login")
        .into_inner();
    let roles = |token: &str| {
        let claims = token.split('.').nth(1).expect("claims");
        use base64::Engine;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .expect("b64");
        serde_json::from_slice::<serde_json::Value>(&json).expect("json")["roles"].clone()
    };
    assert_eq!(
        roles(&t1.access_token),
        serde_json::json!(["customer", "admin"])
    );

    // Rotating while it runs: new logins use the new key, both keys are published.
    let (ok, out, err) = cli(dir.path(), &["keys", "rotate"], &[]);
    assert!(ok, "{err}");
    let new_kid = out.split_whitespace().nth(3).expect("kid").to_owned();
    let t2 = users.login(login()).await.expect("login").into_inner();
    assert_eq!(
        jsonwebtoken::decode_header(&t2.access_token)
            .expect("header")
            .kid,
        Some(new_kid)
    );
    let jwks = users
        .get_jwks(GetJwksRequest {})
        .await
        .expect("jwks")
        .into_inner();
    assert_eq!(jwks.keys.len(), 2);

    let (ok, out, err) = cli(dir.path(), &["events", "dlq", "list"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("no dead-lettered events"), "{out}");
    let (ok, _, err) = cli(
        dir.path(),
        &["events", "dlq", "replay", "--event", "nope"],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("no dead-lettered event with id nope"), "{err}");
    app.stop();
}

/// Every `.toml` under `configs/`, sorted.
fn shipped_configs() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.join("configs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)
            .expect("configs/")
            .filter_map(Result::ok)
        {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "toml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

/// `shopverse check-config` on `file` holding `text`: whether it passed, and what it printed.
fn check_config(file: &Path, text: &str) -> (bool, String) {
    std::fs::write(file, text).expect("write");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(file)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_shipped_config_is_valid() {
    let files = shipped_configs();
    assert!(files.len() >= 3, "{files:?}");
    let out = Command::new(BIN)
        .arg("check-config")
        .args(&files)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A bad value is named with its file, key and the rule it breaks; a backend that does not
/// exist is named with the ones that do; a bad config stops `up` with the same clear message,
/// and no panic.
#[test]
fn bad_configs_are_named_by_file_key_and_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    for (text, said) in [
        (
            "[services.users]\naccess_ttl_secs = 5\n",
            "bad.toml: key `services.users.access_ttl_secs`: must be between 60 and 86400 seconds",
        ),
        (
            "[events]\nbackend = \"nats\"\n",
            "key `events.backend`: unknown variant `nats`, expected `embedded` or `kafka`",
        ),
        (
            "[services.users]\nlisten = \"nowhere\"\n",
            "key `services.users.listen`: invalid socket address",
        ),
    ] {
        let (ok, stdout) = check_config(&bad, text);
        assert!(!ok && stdout.contains(said), "{said}: {stdout}");
    }
    let out = Command::new(BIN)
        .args(["up", "--config"])
        .arg(&bad)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let named = stderr.starts_with("error: ") && stderr.contains("services.users.listen");
    assert!(named, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_service_alone() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    #[allow(clippy::zombie_processes)] // killed and reaped below
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "products",
            "--listen",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut table = String::new();
    let products: SocketAddr = loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "no ready line: {table}"
        );
        table.push_str(&line);
        if let Some(rest) = line.trim().strip_prefix("ready: products=") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    assert!(table.contains("products service"), "{table}");
    assert!(
        !table.contains("users"),
        "only the one service runs: {table}"
    );
    let mut c = ProductsServiceClient::new(channel(products).await);
    let cats = c
        .list_categories(ListCategoriesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        cats.categories.is_empty(),
        "a fresh data dir has no catalog"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_places_demo_orders_through_the_running_services() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let (u, p, o) = (
        app.users.to_string(),
        app.products.to_string(),
        app.addrs["orders"].to_string(),
    );
    let args = [
        "seed",
        "--orders",
        "--users-addr",
        &u,
        "--products-addr",
        &p,
        "--orders-addr",
        &o,
    ];
    let (ok, out, err) = cli(dir.path(), &args, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("60 products added"), "{out}");
    assert!(out.contains("has 3 orders"), "{out}");
    let (ok, out, _) = cli(dir.path(), &args, &[]);
    assert!(
        ok && out.contains("has 3 orders") && out.contains("0 products added"),
        "idempotent: {out}"
    );
    app.stop();
    let (ok, _, err) = cli(dir.path(), &args, &[]);
    assert!(!ok && err.contains("are the services running"), "{err}");
}
