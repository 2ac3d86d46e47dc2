//! What an SRE sees of a running appliance: per-call gRPC metrics on both sides of a link,
//! the process's own metrics, and an exposition Prometheus's own linter accepts.

use crate::common::*;

/// The value of the series `name{labels}` exactly (labels in the exposition's order), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// [`buy_with`] a card that pays.
fn buy(gw: std::net::SocketAddr, headers: &[(&str, &str)], nth: usize, key: &str) -> HttpResponse {
    buy_with(gw, headers, nth, key, "pm_card_ok")
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

/// An OTLP collector in the test: every span it is sent, with the `service.name` of its
/// resource.
pub(crate) mod collector {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

    /// One received span: its service, name, trace id, span id and parent span id (hex), and
    /// its attributes (each value as text).
    #[derive(Debug, Clone)]
    pub struct Got {
        pub service: String,
        pub name: String,
        pub trace: String,
        pub id: String,
        pub parent: String,
        pub attrs: std::collections::BTreeMap<String, String>,
    }

    impl Got {
        pub fn attr(&self, key: &str) -> Option<&str> {
            self.attrs.get(key).map(String::as_str)
        }
    }

    fn text(v: Option<&Value>) -> String {
        match v {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(i)) => i.to_string(),
            Some(Value::BoolValue(b)) => b.to_string(),
            Some(Value::DoubleValue(d)) => d.to_string(),
            other => format!("{other:?}"),
        }
    }

    #[derive(Clone, Default)]
    pub struct Collector(pub Arc<Mutex<Vec<Got>>>);

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut got = self.0.lock().unwrap();
            for rs in req.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                    let attrs = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                            (kv.key.clone(), text(v))
                        })
                        .collect();
                    got.push(Got {
                        service: service.clone(),
                        name: span.name,
                        trace: hex(&span.trace_id),
                        id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        attrs,
                    });
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    impl Collector {
        /// The spans of `trace` once `done` holds of them (`secs` at most).
        async fn until(&self, trace: &str, secs: u64, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            loop {
                let spans: Vec<Got> = self
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.trace == trace)
                    .cloned()
                    .collect();
                if done(&spans) {
                    return spans;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the trace so far: {spans:#?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }

        /// The spans of `trace`, once each of the `wanted` services has sent some and the
        /// three consumers of `order.confirmed` have (60 s at most).
        pub async fn trace(&self, trace: &str, wanted: &[&str]) -> Vec<Got> {
            let spans = self
                .until(trace, 60, |spans| {
                    let services = wanted.iter().all(|w| spans.iter().any(|s| s.service == *w));
                    let confirmed = spans.iter().filter(|s| s.name == "order.confirmed process");
                    services && confirmed.count() >= 3
                })
                .await;
            let lines: Vec<String> = spans
                .iter()
                .map(|s| format!("{}: {}", s.service, s.name))
                .collect();
            eprintln!("{} spans in the trace:\n{}", spans.len(), lines.join("\n"));
            spans
        }

        /// The spans of `trace` once `n` have come (30 s at most).
        pub async fn spans(&self, trace: &str, n: usize) -> Vec<Got> {
            self.until(trace, 30, |spans| spans.len() >= n).await
        }
    }

    /// Every span's parent is a span of the trace, or the client's span.
    pub fn all_linked(spans: &[Got], client_span: &str) {
        let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
        for s in spans {
            let linked = s.parent == client_span || ids.contains(s.parent.as_str());
            assert!(
                linked,
                "a span whose parent is not in the trace: {s:?}\n{spans:#?}"
            );
        }
    }

    /// Starts one on a port of its own.
    pub async fn start() -> (SocketAddr, Collector) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, collector)
    }
}

/// A client's order, followed: the client sends its own `traceparent`, and every span the
/// order causes (the gateway's, the services' gRPC calls, their database transactions and
/// outbox inserts, each consumer's handling of the events down to the shipment and the
/// notices) is exported in that one trace, each under its
/// own service's name and each a child of a span of the trace (the gateway's of the client's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_every_service() {
    let (at, collector) = collector::start().await;
    let telemetry = shopverse_kit::telemetry::TelemetryConfig {
        otlp_endpoint: format!("http://{at}"),
        ..Default::default()
    };
    shopverse_kit::telemetry::init(&telemetry, Some("info"));
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let (user, token) = customer(gw, "tracy@example.com");
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{client_span}-01");
    let headers = [
        ("authorization", token.as_str()),
        ("traceparent", traceparent.as_str()),
    ];
    let r = buy(gw, &headers, 0, "traced-0001");
    assert_eq!(r.status, 200, "{}", r.body);

    let wanted = [
        "gateway",
        "orders",
        "products",
        "payments",
        "delivery",
        "notifications",
    ];
    let spans = collector.trace(trace, &wanted).await;
    let root = spans.iter().find(|s| s.service == "gateway").unwrap();
    assert_eq!(
        root.parent, client_span,
        "the gateway continues the client's trace: {root:?}"
    );
    collector::all_linked(&spans, client_span);
    for (service, name) in [
        ("orders", "OrdersService/Checkout"),
        ("orders", "db.transaction"),
        ("orders", "outbox.insert"),
        ("products", "ProductsService/ReserveStock"),
        ("payments", "order.placed process"),
        ("payments", "outbox.insert"),
        ("orders", "payment.succeeded process"),
        ("delivery", "order.confirmed process"),
        ("notifications", "order.confirmed process"),
    ] {
        let found = spans.iter().any(|s| s.service == service && s.name == name);
        assert!(found, "no {name} span of {service}: {spans:#?}");
    }
    // What the gateway decided, and who called, on the spans (never the token).
    for (key, value) in [
        ("http.route", "/v1/checkout"),
        ("http.response.status_code", "200"),
        ("shopverse.consumer", "customer"),
        ("enduser.id", user.as_str()),
    ] {
        assert_eq!(root.attr(key), Some(value), "{key} of {root:#?}");
    }
    assert!(root.attr("shopverse.rate_limit").is_some(), "{root:#?}");
    let call = spans
        .iter()
        .find(|s| s.name == "OrdersService/Checkout")
        .unwrap();
    assert_eq!(call.attr("enduser.id"), Some(user.as_str()), "{call:#?}");
    assert_eq!(call.attr("rpc.grpc.status_code"), Some("0"), "{call:#?}");
    let leaked = spans
        .iter()
        .flat_map(|s| s.attrs.values())
        .any(|v| token.contains(v.as_str()) && v.len() > 20);
    assert!(!leaked, "the token is on a span: {spans:#?}");
    app.stop();
}

/// The HTTP/1 front's own answers are spans of the client's trace too: a pass-through request
/// (whose upstream gets the gateway span's context, so its own span is that span's child) and
/// an edge-cache hit, each with its route and outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fronts_relays_and_cache_hits_are_spans_of_the_clients_trace() {
    let (at, collector) = collector::start().await;
    let telemetry = shopverse_kit::telemetry::TelemetryConfig {
        otlp_endpoint: format!("http://{at}"),
        ..Default::default()
    };
    shopverse_kit::telemetry::init(&telemetry, Some("warn"));
    let (up_addr, seen) = crate::common::gateway::recording_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    );
    let dir = tempfile::tempdir().unwrap();
    let passthrough = format!("[{{prefix = \"/static/\", upstream = \"{up_addr}\"}}]");
    let app = Appliance::start_with_env(
        dir.path(),
        &["--demo"],
        &[("SHOPVERSE_GATEWAY__PASSTHROUGH", &passthrough)],
    );
    let gw = app.addrs["gateway"];

    let (trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let traceparent = format!("00-{trace}-{client_span}-01");
    let r = http(
        gw,
        "GET",
        "/static/a.txt",
        &[("traceparent", &traceparent)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let relayed = seen.lock().unwrap().pop().unwrap().to_lowercase();
    let sent: Vec<&str> = relayed
        .lines()
        .filter_map(|l| l.strip_prefix("traceparent: "))
        .collect();
    assert_eq!(sent.len(), 1, "one traceparent upstream: {relayed}");
    let parts: Vec<&str> = sent[0].trim().split('-').collect();
    assert_eq!((parts[0], parts[1]), ("00", trace), "{relayed}");
    assert_ne!(
        parts[2], client_span,
        "the upstream's parent is the gateway's span"
    );
    let spans = collector.spans(trace, 1).await;
    let relay = &spans[0];
    assert_eq!(
        (
            relay.service.as_str(),
            relay.parent.as_str(),
            relay.id.as_str()
        ),
        ("gateway", client_span, parts[2]),
        "{relay:#?}"
    );
    assert_eq!(relay.attr("http.route"), Some("passthrough:/static/"));
    assert_eq!(
        relay.attr("server.address"),
        Some(up_addr.to_string().as_str())
    );

    // The same list twice: the second is a fresh hit, answered on the front.
    let (trace, client_span) = ("5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{client_span}-01");
    for _ in 0..2 {
        let r = http(
            gw,
            "GET",
            "/v1/categories",
            &[("traceparent", &traceparent)],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let spans = collector.spans(trace, 2).await;
    let gateway: Vec<&collector::Got> = spans.iter().filter(|s| s.service == "gateway").collect();
    let hit = gateway
        .iter()
        .find(|s| s.attr("shopverse.cache") == Some("HIT"));
    let hit = hit.unwrap_or_else(|| panic!("no cache hit span: {spans:#?}"));
    assert_eq!(hit.parent, client_span, "{hit:#?}");
    assert_eq!(hit.attr("http.route"), Some("/v1/categories"), "{hit:#?}");
    assert_eq!(
        hit.attr("shopverse.consumer"),
        Some("anonymous"),
        "{hit:#?}"
    );
    app.stop();
}

/// The alerting rules load, and their unit tests pass (`promtool test rules`).
#[test]
fn the_alerting_rules_pass_promtool_and_their_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package; scripts/test installs it)");
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "promtool {args:?}: {said}");
    }
}

/// A real Prometheus, answering a query (`curl --data-urlencode`, so the query is encoded as
/// any client would) with its `data.result`.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` every second, with the shipped alerting rules.
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/observability/alerts.yml");
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{}]\nscrape_configs:\n  - job_name: shopverse\n    static_configs: [{{targets: ['{target}']}}]\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian's prometheus package; scripts/test installs it)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// `GET /api/v1/<what>` with the form `args`; the whole answer.
    fn api(&self, what: &str, args: &[(&str, &str)]) -> serde_json::Value {
        let mut curl = std::process::Command::new("curl");
        curl.args(["-s", "-G", &format!("http://{}/api/v1/{what}", self.addr)]);
        for (k, v) in args {
            curl.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = curl.output().expect("curl");
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// The value of a query whose answer is one number (0 when it has none yet).
    fn number(&self, query: &str) -> f64 {
        let r = self.api("query", &[("query", query)]);
        r["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prometheus scrapes the appliance through a short checkout run: the gRPC and saga series are
/// there, every query of the shipped Grafana dashboard is valid PromQL Prometheus answers, and
/// the alerting rules load healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_series_the_dashboard_and_alerts_use() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let prometheus = Prometheus::start(app.admin);
    let gw = app.addrs["gateway"];
    let (_, token) = customer(gw, "prom@example.com");
    let auth = [("authorization", token.as_str())];
    let products = http(gw, "GET", "/v1/products?pageSize=3", &[], b"").json();
    for (i, p) in products["products"].as_array().unwrap().iter().enumerate() {
        let add = format!(
            r#"{{"productId":"{}","quantity":1}}"#,
            p["id"].as_str().unwrap()
        );
        assert_eq!(
            http(gw, "POST", "/v1/cart/items", &auth, add.as_bytes()).status,
            200
        );
        let checkout = format!(
            r#"{{"idempotencyKey":"prom-{i:04}","paymentMethodToken":"pm_card_ok","shippingAddress":{{"recipient":"P","line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}}}"#
        );
        let r = http(gw, "POST", "/v1/checkout", &auth, checkout.as_bytes());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let checkouts = "sum(grpc_server_handled_total{grpc_method=\"Checkout\",grpc_code=\"OK\"})";
    let confirmed = "sum(shopverse_saga_payment_seconds_count{outcome=\"confirmed\"})";
    until(
        "Prometheus has the checkouts and their confirmations",
        std::time::Duration::from_secs(60),
        || prometheus.number(checkouts) >= 3.0 && prometheus.number(confirmed) >= 3.0,
    );
    let client = "sum(grpc_client_handled_total{grpc_method=\"ReserveStock\"})";
    assert!(prometheus.number(client) >= 3.0);

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/observability/grafana/dashboards/shopverse.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let queries: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(queries.len() >= 15, "{queries:?}");
    for q in queries {
        let r = prometheus.api("query", &[("query", q)]);
        assert_eq!(r["status"], "success", "{q}: {r}");
    }
    let rules = prometheus.api("rules", &[]);
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(loaded.len(), 8, "{rules}");
    assert!(loaded.iter().all(|r| r["health"] == "ok"), "{rules}");
    app.stop();
}

/// `shopverse events trace ORDER --json` until the shipment's event has been handled: each
/// event's type with the consumers that handled it.
fn chain_down_to_the_shipment(dir: &std::path::Path, order: &str) -> Vec<(String, Vec<String>)> {
    let mut chain = Vec::new();
    until(
        "the chain down to the shipment, handled",
        std::time::Duration::from_secs(30),
        || {
            let (ok, out, _) = cli(dir, &["events", "trace", order, "--json"], &[]);
            chain = out
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .map(|h| {
                    let by = h["handled"].as_array().unwrap().iter();
                    let by = by.map(|c| c[0].as_str().unwrap().to_owned()).collect();
                    (h["event_type"].as_str().unwrap().to_owned(), by)
                })
                .collect();
            ok && chain
                .iter()
                .any(|(t, by): &(String, Vec<String>)| t == "shipment.scheduled" && !by.is_empty())
        },
    );
    chain
}

/// `shopverse events trace ORDER_ID` on a running appliance: the order's events in the order
/// they were raised, each handled by the consumers the saga has, with times from the first;
/// the same as JSON lines; an order with no events is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_trace_prints_an_orders_chain_with_its_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(dir.path(), &["--demo"]);
    let gw = app.addrs["gateway"];
    let (_, token) = customer(gw, "chain@example.com");
    let r = buy(gw, &[("authorization", token.as_str())], 0, "chain-0001");
    assert_eq!(r.status, 200, "{}", r.body);
    let order = r.json()["id"].as_str().unwrap().to_owned();
    let chain = chain_down_to_the_shipment(dir.path(), &order);
    let types: Vec<&str> = chain.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types[..3],
        ["order.placed", "payment.succeeded", "order.confirmed"],
        "{chain:?}"
    );
    for (event, consumer) in [
        ("order.placed", "payments"),
        ("payment.succeeded", "orders"),
        ("order.confirmed", "delivery"),
    ] {
        let handled = chain
            .iter()
            .any(|(t, by)| t == event && by.iter().any(|c| c == consumer));
        assert!(handled, "{event} not handled by {consumer}: {chain:?}");
    }

    let (ok, out, err) = cli(dir.path(), &["events", "trace", &order], &[]);
    assert!(ok, "{err}");
    eprintln!("{out}");
    assert!(out.starts_with(&format!("order {order}: ")), "{out}");
    assert!(
        out.contains("order.placed") && out.contains("handled by ") && out.contains("payments +"),
        "{out}"
    );
    let (ok, _, err) = cli(dir.path(), &["events", "trace", "no-such-order"], &[]);
    assert!(
        !ok && err.contains("no event about order no-such-order"),
        "{err}"
    );
    app.stop();
}
