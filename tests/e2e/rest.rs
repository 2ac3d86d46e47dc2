//! REST through the gateway: the routes, their RPCs, the OpenAPI document, gRPC clients, CORS,
//! TLS, and the answers for a service that is down or a client that is slow.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::gateway::*;
use crate::common::*;

/// `method path` as `auth`, with `body`.
fn call(gw: SocketAddr, method: &str, path: &str, auth: &str, body: &[u8]) -> HttpResponse {
    http(gw, method, path, &[("authorization", auth)], body)
}

#[test]
fn catalog_routes_take_path_variables_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let r = http(gw, "GET", "/v1/categories", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.json()["categories"].as_array().unwrap().len() >= 5);
    let path = "/v1/products?page_size=3&sort=PRODUCT_SORT_PRICE_ASC";
    let r = http(gw, "GET", path, &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let products = r.json()["products"].as_array().unwrap().clone();
    assert_eq!(products.len(), 3);
    let price = products[0]["price"]["amountMinor"].as_str().unwrap();
    assert!(price.parse::<i64>().unwrap() > 0);
    let id = products[0]["id"].as_str().unwrap();
    let r = http(gw, "GET", &format!("/v1/products/{id}"), &[], b"");
    assert_eq!((r.status, r.json()["id"].as_str()), (200, Some(id)));
    let sku = products[0]["sku"].as_str().unwrap();
    let r = http(gw, "GET", &format!("/v1/skus/{sku}"), &[], b"");
    assert_eq!(r.json()["id"].as_str(), Some(id));
    let r = http(gw, "GET", &format!("/v1/products/{id}/stock"), &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("x-request-id").is_some());
    let r = http(gw, "GET", "/v1/products/does-not-exist", &[], b"");
    let answer = (r.status, r.json()["code"].as_str().map(str::to_owned));
    assert_eq!(answer, (404, Some("NOT_FOUND".to_owned())));
    let r = http(
        gw,
        "GET",
        "/v1/products",
        &[("x-request-id", "trace-me-123")],
        b"",
    );
    assert_eq!(r.header("x-request-id"), Some("trace-me-123"));
    app.stop();
}

#[test]
fn accounts_register_sign_in_and_edit_their_profile() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let register = |body: &[u8]| http(gw, "POST", "/v1/auth/register", &[], body);
    let r = register(
        br#"{"email":"gw@example.com","password":"gateway password","displayName":"Gee"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = register(br#"{"email":"gw@example.com","password":"gateway password"}"#);
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (409, Some("ALREADY_EXISTS"))
    );
    let r = register(br#"{"email":"nope","password":"gateway password"}"#);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["details"][0]["field"], "email");
    let auth = bearer(&login(gw, "gw@example.com", "gateway password"));
    let r = call(gw, "GET", "/v1/me", &auth, b"");
    assert_eq!(
        (r.status, r.json()["displayName"].as_str()),
        (200, Some("Gee"))
    );
    let r = call(gw, "PATCH", "/v1/me", &auth, br#"{"displayName":"G. W."}"#);
    assert_eq!(
        (r.status, r.json()["displayName"].as_str()),
        (200, Some("G. W."))
    );
    app.stop();
}

#[test]
fn a_cart_checks_out_and_its_order_is_its_owners_alone() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let r = http(gw, "GET", "/v1/products?page_size=1", &[], b"");
    let id = r.json()["products"][0]["id"].as_str().unwrap().to_owned();
    let (_, auth) = customer(gw, "gw@example.com");
    let line = format!(r#"{{"productId":"{id}","quantity":2}}"#);
    let r = call(gw, "POST", "/v1/cart/items", &auth, line.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["lines"][0]["quantity"], 2);
    let r = call(
        gw,
        "PUT",
        &format!("/v1/cart/items/{id}"),
        &auth,
        br#"{"quantity":1}"#,
    );
    assert_eq!(r.json()["lines"][0]["quantity"], 1);
    let checkout = br#"{"idempotencyKey":"gateway-order-1","paymentMethodToken":"pm_card_ok","shippingAddress":{"line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}"#;
    let r = call(gw, "POST", "/v1/checkout", &auth, checkout);
    assert_eq!(r.status, 200, "{}", r.body);
    let order = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(r.json()["status"], "ORDER_STATUS_PENDING_PAYMENT");
    let path = format!("/v1/orders/{order}");
    until("the order is confirmed", Duration::from_secs(20), || {
        call(gw, "GET", &path, &auth, b"").json()["status"] == "ORDER_STATUS_CONFIRMED"
    });
    let r = call(gw, "GET", &format!("{path}/payment"), &auth, b"");
    assert_eq!(r.json()["status"], "PAYMENT_STATUS_SUCCEEDED");
    let (_, other) = customer(gw, "other@example.com");
    assert_eq!(call(gw, "GET", &path, &other, b"").status, 404);
    app.stop();
}

#[test]
fn routing_errors_are_405_404_403_and_401() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let (_, auth) = customer(gw, "gw@example.com");
    let r = http(gw, "PUT", "/v1/categories", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    assert_eq!(http(gw, "GET", "/v1/nothing/here", &[], b"").status, 404);
    assert_eq!(call(gw, "GET", "/v1/admin/users", &auth, b"").status, 403);
    let r = http(gw, "GET", "/v1/me", &[], b"");
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
    app.stop();
}

#[test]
fn bad_input_is_a_4xx_with_the_json_error_never_a_5xx() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &[]);
    let gw = app.addrs["gateway"];
    let (_, auth) = customer(gw, "gw@example.com");
    for (body, field) in [
        (
            &br#"{"productId": "p", "quantity": "lots"}"#[..],
            Some("quantity"),
        ),
        (br#"{"productId": "p", "bogus": true}"#, None),
        (br#"{"productId": "#, None),
        (b"[1, 2, 3]", None),
    ] {
        let r = call(gw, "POST", "/v1/cart/items", &auth, body);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["code"], "INVALID_ARGUMENT");
        if let Some(f) = field {
            assert_eq!(r.json()["details"][0]["field"], f);
        }
    }
    let big = vec![b'x'; 2 << 20];
    assert_eq!(call(gw, "POST", "/v1/cart/items", &auth, &big).status, 413);
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("x-junk-{i}"), "y".repeat(100)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = http(gw, "GET", "/v1/categories", &many, b"");
    assert_eq!(r.status, 431, "too many headers");
    assert_eq!(r.json()["code"], "INVALID_ARGUMENT");
    let r = http(gw, "GET", "/v1/products?page_size=many", &[], b"");
    let answer = (
        r.status,
        r.json()["details"][0]["field"].as_str().map(str::to_owned),
    );
    assert_eq!(answer, (400, Some("page_size".to_owned())));
    app.stop();
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
            // The event stream is no RPC (and never ends): `live.rs` tests it.
            if op["responses"]["200"]["content"]["text/event-stream"].is_object() {
                continue;
            }
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
    succeeds(
        std::process::Command::new(python())
            .args(["-c", "import json, sys; from openapi_spec_validator import validate; validate(json.load(open(sys.argv[1]))); print('valid')"])
            .arg(&doc),
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

/// A self-signed P-256 certificate for localhost and 127.0.0.1, made by openssl in `dir`:
/// (certificate, key).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
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
    (cert, key)
}

/// curl's `<http version> <status>` for `url`, trusting `cert`, with `extra` options.
fn curl_version_and_status(cert: &std::path::Path, url: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "--cacert",
        ])
        .arg(cert)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_tls_1_2_and_1_3_and_http2_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (listen, cert_path, key_path) = (
        free.to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let env = [
        ("SHOPVERSE_GATEWAY__TLS__LISTEN", listen.as_str()),
        ("SHOPVERSE_GATEWAY__TLS__CERT_PATH", cert_path.as_str()),
        ("SHOPVERSE_GATEWAY__TLS__KEY_PATH", key_path.as_str()),
    ];
    let gw = LoneGateway::start(dir.path(), "tls", &env);
    let url = format!("https://127.0.0.1:{}/v1/categories", free.port());
    let curl = |extra: &[&str]| curl_version_and_status(&cert, &url, extra);
    // The products service is not running: a 503 with the JSON error, over TLS.
    assert_eq!(curl(&["--http2"]), "2 503", "HTTP/2 negotiated by ALPN");
    assert_eq!(curl(&["--http1.1"]), "1.1 503");
    let tls12 = curl(&["--http2", "--tlsv1.2", "--tls-max", "1.2"]);
    assert_eq!(tls12, "2 503", "TLS 1.2");
    assert_eq!(curl(&["--http2", "--tlsv1.3"]), "2 503", "TLS 1.3");
    gw.stop();
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

/// One answer off a kept-alive connection, as sent: the head's lines (the values of `date`,
/// and of `x-request-id` and `ratelimit` when `mask_ids`, replaced by `*`) and the body. A
/// `Connection: keep-alive` line is left out: Pingora's server adds it to every HTTP/1.1
/// answer it keeps alive, the front (its relays and cache hits too) sends only what HTTP/1.1
/// does not imply (RFC 9112 9.3: persistence is the default).
fn raw_exchange(
    conn: &mut std::io::BufReader<std::net::TcpStream>,
    request: &str,
    mask_ids: bool,
) -> (Vec<String>, String) {
    use std::io::{BufRead, Read, Write};
    conn.get_mut().write_all(request.as_bytes()).expect("write");
    let mut head = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).expect("head line");
        assert!(line.ends_with("\r\n"), "a head line ends in CRLF: {line:?}");
        let line = line.trim_end_matches("\r\n").to_owned();
        if line.is_empty() {
            break;
        }
        if line.eq_ignore_ascii_case("connection: keep-alive") {
            continue;
        }
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name == "content-length" {
            length = line[15..].trim().parse().expect("length");
        }
        let masked =
            name == "date" || (mask_ids && (name == "x-request-id" || name == "ratelimit"));
        head.push(if masked { format!("{name}: *") } else { line });
    }
    let mut body = vec![
        0;
        if request.starts_with("HEAD ") {
            0
        } else {
            length
        }
    ];
    conn.read_exact(&mut body).expect("body");
    (head, String::from_utf8(body).expect("utf-8 body"))
}

/// REST reads are answered on the HTTP/1 front; every other request goes Pingora's way. Both
/// must answer alike, byte for byte but for the date, the request id and the rate limit's
/// count: the same request sent with an `Origin` the gateway does not allow (which the front
/// leaves to Pingora, and which adds no header there) is the comparison. Cases beyond the
/// happy path: the service's 404, a bad query (400), no token and a forged one (401), a role
/// short (403), HEAD, a cached route read signed in (BYPASS), the client's request id kept.
#[test]
fn rest_reads_on_the_front_answer_as_pingoras_path_does() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let (_, auth) = customer(gw, "front@example.com");
    let products = http(gw, "GET", "/v1/products?page_size=1", &[], b"").json();
    let id = products["products"][0]["id"].as_str().unwrap().to_owned();
    let connect = || {
        let s = std::net::TcpStream::connect(gw).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        std::io::BufReader::new(s)
    };
    let (mut front, mut pingora) = (connect(), connect());
    let admin = app.addrs["admin"];
    let served_before = metric(admin, "shopverse_gateway_front_rest_calls_total");
    let forged = format!("{}x", auth);
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("GET", format!("/v1/products/{id}"), Some(&auth)),
        ("GET", "/v1/products/does-not-exist".into(), Some(&auth)),
        ("GET", "/v1/products?page_size=lots".into(), Some(&auth)),
        (
            "GET",
            "/v1/products?page_size=2&sort=PRODUCT_SORT_PRICE_ASC".into(),
            Some(&auth),
        ),
        ("GET", "/v1/cart".into(), Some(&auth)),
        ("HEAD", "/v1/cart".into(), Some(&auth)),
        ("GET", "/v1/cart".into(), None),
        ("GET", "/v1/cart".into(), Some(&forged)),
        ("GET", "/v1/admin/users".into(), Some(&auth)),
        ("GET", "/v1/me".into(), Some(&auth)),
        ("GET", format!("/v1/products/{id}/stock"), Some(&auth)),
    ];
    for (method, path, authorization) in &cases {
        let auth_line = authorization
            .map(|a| format!("authorization: {a}\r\n"))
            .unwrap_or_default();
        let request = |origin: &str| {
            format!("{method} {path} HTTP/1.1\r\nhost: shop.example\r\n{auth_line}{origin}\r\n")
        };
        let a = raw_exchange(&mut front, &request(""), true);
        let b = raw_exchange(
            &mut pingora,
            &request("origin: https://elsewhere.example\r\n"),
            true,
        );
        assert_eq!(a, b, "{method} {path}: the front and Pingora's path differ");
        assert!(
            a.0[0].starts_with("HTTP/1.1 "),
            "{method} {path}: {:?}",
            a.0
        );
    }
    // The client's request id comes back, on both paths.
    let request = format!(
        "GET /v1/cart HTTP/1.1\r\nhost: shop.example\r\nauthorization: {auth}\r\nx-request-id: mine-42\r\n\r\n"
    );
    let (head, _) = raw_exchange(&mut front, &request, false);
    assert!(
        head.contains(&"x-request-id: mine-42".to_owned()),
        "{head:?}"
    );
    // The front served these: its requests counted under their routes, and a signed-in read
    // of a cached route bypassed the shared cache.
    let (head, _) = raw_exchange(
        &mut front,
        &format!("GET /v1/products/{id} HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\n\r\n"),
        true,
    );
    assert!(head.contains(&"x-cache: BYPASS".to_owned()), "{head:?}");
    let served = metric(admin, "shopverse_gateway_front_rest_calls_total") - served_before;
    assert_eq!(
        served,
        cases.len() as u64 + 2,
        "REST reads the front answered"
    );
    app.stop();
}
