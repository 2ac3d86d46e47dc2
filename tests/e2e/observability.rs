//! What an SRE sees of a running appliance: per-call gRPC metrics on both sides of a link,
//! the process's own metrics, and an exposition Prometheus's own linter accepts.

use crate::common::*;

/// The value of the series `name{labels}` exactly (labels in the exposition's order), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Calls a method nobody serves on the gRPC server at `addr`: answered `Unimplemented`.
async fn call_a_method_nobody_serves(addr: std::net::SocketAddr) {
    let mut raw = tonic::client::Grpc::new(channel(addr).await);
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/no.Such/Method");
    let req = tonic::Request::new(bytes::Bytes::new());
    let junk = raw
        .unary(req, path, shopverse_gateway::upstream::RawCodec)
        .await;
    assert_eq!(junk.unwrap_err().code(), tonic::Code::Unimplemented);
}

/// One checkout through the gateway, a read of an order that does not exist, and a call of a
/// method nobody serves: each is counted under go-grpc-prometheus's names and labels, the
/// server side in orders, the client side on orders' link to products.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_counted_on_both_sides_by_code() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let (_, token) = customer(gw, "mo@example.com");
    let auth = [("authorization", token.as_str())];
    let products = http(gw, "GET", "/v1/products?pageSize=1", &[], b"").json();
    let p = products["products"][0]["id"].as_str().unwrap();
    let add = format!(r#"{{"productId":"{p}","quantity":1}}"#);
    let added = http(gw, "POST", "/v1/cart/items", &auth, add.as_bytes());
    assert_eq!(added.status, 200, "{}", added.body);
    let metrics = || http(app.admin, "GET", "/metrics", &[], b"").body;
    let orders = "grpc_service=\"shopverse.orders.v1.OrdersService\",grpc_type=\"unary\"";
    let series = [
        format!("grpc_server_handled_total{{grpc_code=\"OK\",grpc_method=\"Checkout\",{orders}}}"),
        format!("grpc_server_handling_seconds_count{{grpc_method=\"Checkout\",{orders}}}"),
        format!("grpc_server_handled_total{{grpc_code=\"NotFound\",grpc_method=\"GetOrder\",{orders}}}"),
        "grpc_server_handled_total{grpc_code=\"Unimplemented\",grpc_method=\"unknown\",grpc_service=\"unknown\",grpc_type=\"unary\"}".to_owned(),
    ];
    let before = metrics();

    let checkout = r#"{"idempotencyKey":"metrics-1","paymentMethodToken":"pm_card_ok",
        "shippingAddress":{"recipient":"M","line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}"#;
    let r = http(gw, "POST", "/v1/checkout", &auth, checkout.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    let missing = http(gw, "GET", "/v1/orders/no-such-order", &auth, b"");
    assert_eq!(missing.status, 404, "{}", missing.body);
    call_a_method_nobody_serves(app.addrs["orders"]).await;

    let after = metrics();
    let count = |text: &str, s: &str| sample(text, s).unwrap_or(0.0);
    for s in &series {
        assert_eq!(count(&after, s) - count(&before, s), 1.0, "{s}\n{after}");
    }
    let unbounded = after.contains("no.Such");
    assert!(!unbounded, "a path nobody serves is not a label value");
    let reserved = "grpc_client_handled_total{grpc_code=\"OK\",grpc_method=\"ReserveStock\",grpc_service=\"shopverse.products.v1.ProductsService\",grpc_type=\"unary\"}";
    assert!(
        count(&after, reserved) > count(&before, reserved),
        "{after}"
    );
    let rss = sample(&after, "process_resident_memory_bytes");
    assert!(rss.is_some_and(|b| b > 0.0), "{after}");
    let own = after.contains("\nshopverse_outbox_published_total");
    assert!(own, "ShopVerse's own metrics keep their prefix");
    app.stop();
}

/// `promtool check metrics` on the whole exposition of an appliance that has served traffic:
/// Prometheus's own linter finds nothing (names, suffixes, units, help texts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_passes_promtool() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    customer(gw, "lint@example.com");
    assert_eq!(
        http(gw, "GET", "/v1/products?pageSize=2", &[], b"").status,
        200
    );
    let text = http(app.admin, "GET", "/metrics", &[], b"").body;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
    app.stop();
}
