//! The distributed deployment, black box: every service its own `shopverse serve` process, each
//! on its own PostgreSQL database, with Kafka between them. The saga runs across them while
//! replicas are killed and the broker goes away, and the reconciliation computed from the
//! databases alone must hold exactly as it does on the appliance.
//!
//! The broker is the one `SHOPVERSE_KAFKA_BROKERS` names (scripts/test starts one); each test
//! works in a Kafka namespace of its own. The broker-outage test starts a broker of its own
//! (`SHOPVERSE_TANSU_BIN`, which scripts/test provides), since it stops it.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shopverse_events::EventBus;
use shopverse_events::bus::OutRecord;
use shopverse_events::envelope::TOPIC_ORDERS;
use shopverse_events::kafka::{KafkaBus, KafkaConfig};
use shopverse_kit::testing::PgTestDb;
use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;

use crate::common::saga::{
    Checkouts, Dbs, Outcome, five_products, jobs, placed, reconcile, run_job, settle, stock_of,
};
use crate::common::*;

/// The two deployments of this file would share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn brokers() -> String {
    std::env::var("SHOPVERSE_KAFKA_BROKERS").expect(
        "SHOPVERSE_KAFKA_BROKERS must name the Kafka broker for these tests (scripts/test starts one)",
    )
}

/// A tansu broker of this test's own: its storage is a SQLite file in a folder, so it can be
/// stopped and started again on the same port with its topics, records and offsets.
struct OwnBroker {
    bin: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnBroker {
    fn start(dir: &Path) -> OwnBroker {
        let bin = std::env::var("SHOPVERSE_TANSU_BIN").expect(
            "SHOPVERSE_TANSU_BIN must name the tansu broker binary (scripts/test builds and sets it)",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = OwnBroker {
            bin,
            port,
            dir: dir.to_owned(),
            child: None,
        };
        b.up();
        b
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn up(&mut self) {
        let url = format!("tcp://{}", self.addr());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))
            .unwrap();
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            // tansu opens a sqlite:// path relative to its working directory.
            .args(["--storage-engine", "sqlite:///tansu.db"])
            .current_dir(&self.dir)
            .arg("--silent")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "tansu did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the broker at once (SIGKILL: connections drop, nothing answers).
    fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.down();
    }
}

const SERVICES: [&str; 5] = [
    "products",
    "orders",
    "payments",
    "notifications",
    "delivery",
];

/// The services' databases and the settings every process of one deployment shares.
struct Cluster {
    dir: tempfile::TempDir,
    dbs: HashMap<&'static str, PgTestDb>,
    simulator: PgTestDb,
    env: Vec<(String, String)>,
    namespace: String,
    brokers: String,
    started: usize,
}

impl Cluster {
    async fn new(brokers: &str) -> Cluster {
        let mut dbs = HashMap::new();
        for s in SERVICES {
            dbs.insert(
                s,
                PgTestDb::create()
                    .await
                    .expect("PostgreSQL at 127.0.0.1:5432 (see README)"),
            );
        }
        let simulator = PgTestDb::create().await.expect("PostgreSQL");
        let namespace = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut env: Vec<(String, String)> = vec![
            ("SHOPVERSE_EVENTS__BACKEND".into(), "kafka".into()),
            ("SHOPVERSE_EVENTS__PARTITIONS".into(), "4".into()),
            ("SHOPVERSE_EVENTS__KAFKA__BROKERS".into(), brokers.into()),
            (
                "SHOPVERSE_EVENTS__KAFKA__NAMESPACE".into(),
                namespace.clone(),
            ),
            (
                "SHOPVERSE_EVENTS__KAFKA__SESSION_TIMEOUT_MS".into(),
                "6000".into(),
            ),
            (
                "SHOPVERSE_SERVICES__PAYMENTS__SIMULATOR_DATABASE".into(),
                simulator.url.clone(),
            ),
        ];
        for (s, db) in &dbs {
            env.push((
                format!("SHOPVERSE_SERVICES__{}__DATABASE", s.to_uppercase()),
                db.url.clone(),
            ));
        }
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            dbs,
            simulator,
            env,
            namespace,
            brokers: brokers.into(),
            started: 0,
        }
    }

    fn env_with<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.extend_from_slice(extra);
        env
    }

    /// Starts one process of `service`, with a data directory of its own.
    fn serve(&mut self, service: &str, extra: &[(&str, &str)]) -> Appliance {
        self.started += 1;
        let data = self.dir.path().join(format!("{service}-{}", self.started));
        std::fs::create_dir_all(&data).unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "serve".into(),
            service.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data.into(),
        ];
        Appliance::spawn(&args, &self.env_with(extra))
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli(self.dir.path(), args, &self.env_with(&[]))
    }

    async fn dbs(&self) -> Dbs {
        crate::common::saga::connect(&crate::common::saga::Urls {
            orders: &self.dbs["orders"].url,
            products: &self.dbs["products"].url,
            payments: &self.dbs["payments"].url,
            notifications: &self.dbs["notifications"].url,
            provider: &self.simulator.url,
        })
        .await
    }

    fn bus(&self) -> KafkaBus {
        KafkaBus::new(
            KafkaConfig {
                brokers: self.brokers.clone(),
                namespace: self.namespace.clone(),
                session_timeout_ms: 6_000,
                ..Default::default()
            },
            4,
            &prometheus::Registry::new(),
        )
        .unwrap()
    }

    async fn drop_dbs(self) {
        for (_, db) in self.dbs {
            db.drop_db().await.unwrap();
        }
        self.simulator.drop_db().await.unwrap();
    }
}

fn addr(p: &Appliance, service: &str) -> std::net::SocketAddr {
    p.addrs[service]
}

/// Five products of the seeded catalog, with their starting stock (no checkout has run yet).
async fn pick_products(
    c: &Cluster,
    at: std::net::SocketAddr,
) -> (Vec<String>, HashMap<String, i64>) {
    let products = five_products(at).await;
    let dbs = c.dbs().await;
    let initial = stock_of(&dbs.products, &products).await;
    dbs.close().await;
    (products, initial)
}

/// Waits until the group session of a member killed at `killed` has expired (6 s, and a
/// margin). tansu gives a member that joins before a dead member's session expired no
/// partitions, and does not rebalance again once it does expire; Kafka does. A restarted
/// consumer is started after that point.
async fn session_expired(killed: Instant) {
    tokio::time::sleep_until((killed + Duration::from_secs(8)).into()).await;
}

/// Every confirmed order has exactly one shipment.
async fn shipments_match(c: &Cluster, dbs: &Dbs) {
    let delivery = sqlx::AnyPool::connect(&c.dbs["delivery"].url)
        .await
        .unwrap();
    let confirmed: Vec<String> =
        sqlx::query_scalar("SELECT id FROM orders WHERE status = 'CONFIRMED'")
            .fetch_all(&dbs.orders)
            .await
            .unwrap();
    // Delivery may still be catching up on its partitions: wait for it.
    let t0 = Instant::now();
    for id in &confirmed {
        loop {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM shipments WHERE order_id = $1")
                .bind(id)
                .fetch_one(&delivery)
                .await
                .unwrap();
            assert!(n <= 1, "order {id}: {n} shipments");
            if n == 1 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "order {id}: no shipment"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    delivery.close().await;
}

/// A poison event on the orders topic is parked by each consumer of the topic, listed by the
/// CLI with its reason, and replayed by it.
async fn poison_is_parked_listed_and_replayed(c: &Cluster) {
    c.bus()
        .publish(&[OutRecord {
            topic: TOPIC_ORDERS.into(),
            key: "poison".into(),
            headers: vec![("event-id".into(), "poison-1".into())],
            payload: vec![0xde, 0xad, 0xbe, 0xef],
        }])
        .await
        .unwrap();
    let t0 = Instant::now();
    let listed = loop {
        let (ok, out, err) = c.cli(&["events", "dlq", "list", "--json"]);
        assert!(ok, "dlq list: {err}");
        let parked: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // payments, delivery, notifications and products all read the orders topic.
        if parked.len() >= 4 {
            break parked;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "poison not parked: {parked:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        listed.iter().all(|d| d["reason"]
            .as_str()
            .unwrap()
            .contains("undecodable envelope")
            && d["replayed"] == false),
        "{listed:?}"
    );
    let (ok, out, err) = c.cli(&["events", "dlq", "replay", "--topic", TOPIC_ORDERS]);
    assert!(ok, "dlq replay: {out}{err}");
    assert!(
        out.contains(&format!("{} events replayed", listed.len())),
        "{out}"
    );
    let (_, out, _) = c.cli(&["events", "dlq", "list"]);
    assert!(out.contains("replayed"), "{out}");
}

/// One products replica went away: orders stops sending it calls once its health check fails.
/// (Stopped, not killed: tansu hands a killed member's partitions to the others only at the
/// next join or leave, not when its session expires; see the README.)
async fn checkouts_go_on_without_a_stopped_products_replica(
    orders_addr: std::net::SocketAddr,
    products: &[String],
) {
    tokio::time::sleep(shopverse_rpc::pool::CHECK_EVERY * 3).await;
    let mut client = OrdersServiceClient::new(channel(orders_addr).await);
    let more = crate::common::saga::jobs(10, products, "after-kill");
    for j in &more {
        let out = run_job(&mut client, j, true).await;
        assert!(
            !matches!(out, Outcome::Interrupted),
            "a checkout failed with a products replica down: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_across_processes_survives_killed_replicas() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut c = Cluster::new(&brokers()).await;
    let (ok, out, err) = c.cli(&["seed"]);
    assert!(ok, "seed: {out}{err}");

    let products_a = c.serve("products", &[]);
    let products_b = c.serve("products", &[]);
    let replicas = format!(
        "http://{},http://{}",
        addr(&products_a, "products"),
        addr(&products_b, "products")
    );
    let orders = c.serve(
        "orders",
        &[(
            "SHOPVERSE_SERVICES__ORDERS__PRODUCTS_URL",
            replicas.as_str(),
        )],
    );
    let payments_a = c.serve("payments", &[]);
    let payments_b = c.serve("payments", &[]);
    let notifications_a = c.serve("notifications", &[]);
    let notifications_b = c.serve("notifications", &[]);
    let delivery = c.serve("delivery", &[]);
    let (products, initial) = pick_products(&c, addr(&products_a, "products")).await;

    let orders_addr = addr(&orders, "orders");
    let mut run = Checkouts::start(
        orders_addr,
        jobs(120, &products, "dist"),
        Duration::from_millis(150),
    );
    // A payments replica dies mid-stream (SIGKILL). Kafka hands its partitions to the other
    // replica once its session expires; tansu only at the next join, which its restart below
    // is. Either way nothing it had not committed is lost, and nothing is applied twice.
    run.wait_handed_out(30, Duration::from_secs(120)).await;
    payments_a.kill9();
    let payments_killed = Instant::now();
    // The only delivery consumer dies mid-stream, and comes back a little later.
    run.wait_handed_out(50, Duration::from_secs(120)).await;
    delivery.kill9();
    let delivery_killed = Instant::now();
    // A notifications replica is stopped the polite way: it leaves the group at once.
    run.wait_handed_out(70, Duration::from_secs(120)).await;
    notifications_a.stop();
    run.wait_handed_out(90, Duration::from_secs(120)).await;
    session_expired(delivery_killed).await;
    let delivery = c.serve("delivery", &[]);
    run.finish().await;
    session_expired(payments_killed).await;
    let payments_a = c.serve("payments", &[]);

    products_b.stop();
    checkouts_go_on_without_a_stopped_products_replica(orders_addr, &products).await;

    let placed = placed(&run.results);
    assert!(placed.len() > 40, "only {} orders placed", placed.len());
    let dbs = c.dbs().await;
    settle(&dbs, Duration::from_secs(120)).await;
    let confirmed = reconcile(&dbs, &initial, &placed).await;
    assert!(confirmed > 20, "{confirmed} confirmed");
    shipments_match(&c, &dbs).await;
    dbs.close().await;

    poison_is_parked_listed_and_replayed(&c).await;

    for p in [
        products_a,
        orders,
        payments_a,
        payments_b,
        notifications_b,
        delivery,
    ] {
        p.stop();
    }
    c.drop_dbs().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_20s_mid_checkouts_then_everything_completes() {
    let _one_at_a_time = SERIAL.lock().await;
    let broker_dir = tempfile::tempdir().unwrap();
    let mut broker = OwnBroker::start(broker_dir.path());
    let mut c = Cluster::new(&broker.addr()).await;
    let (ok, out, err) = c.cli(&["seed"]);
    assert!(ok, "seed: {out}{err}");
    let products_svc = c.serve("products", &[]);
    let products_url = format!("http://{}", addr(&products_svc, "products"));
    let orders = c.serve(
        "orders",
        &[(
            "SHOPVERSE_SERVICES__ORDERS__PRODUCTS_URL",
            products_url.as_str(),
        )],
    );
    let others: Vec<Appliance> = ["payments", "notifications", "delivery"]
        .iter()
        .map(|s| c.serve(s, &[]))
        .collect();
    let (products, initial) = pick_products(&c, addr(&products_svc, "products")).await;

    // 200 checkouts at about 5 a second, so the outage falls in the middle of them.
    let orders_addr = addr(&orders, "orders");
    let mut run = Checkouts::start(
        orders_addr,
        jobs(200, &products, "outage"),
        Duration::from_millis(1200),
    );
    run.wait_handed_out(60, Duration::from_secs(120)).await;
    broker.down();
    let down_at = Instant::now();
    let placed_before = placed(&run.results).len();
    let dbs = c.dbs().await;
    let mut max_backlog = 0;
    while down_at.elapsed() < Duration::from_secs(20) {
        let backlog = crate::common::saga::scalar(
            &dbs.orders,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await;
        max_backlog = max_backlog.max(backlog);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let placed_during = placed(&run.results).len() - placed_before;
    broker.up();
    assert!(
        placed_during >= 20,
        "only {placed_during} checkouts were taken while the broker was down"
    );
    assert!(
        max_backlog > 0,
        "the orders outbox never grew while the broker was down"
    );
    run.finish().await;
    let all_placed = placed(&run.results);
    let interrupted = run
        .results
        .lock()
        .unwrap()
        .values()
        .filter(|o| matches!(o, Outcome::Interrupted))
        .count();
    assert_eq!(interrupted, 0, "checkouts failed while the broker was down");
    assert!(all_placed.len() > 120, "only {} placed", all_placed.len());

    settle(&dbs, Duration::from_secs(180)).await;
    let confirmed = reconcile(&dbs, &initial, &all_placed).await;
    assert!(confirmed > 60, "{confirmed} confirmed");
    shipments_match(&c, &dbs).await;
    dbs.close().await;
    products_svc.stop();
    orders.stop();
    for p in others {
        p.stop();
    }
    drop(broker);
    c.drop_dbs().await;
}

/// The trace of one order across processes: each service a `shopverse serve` process of its
/// own exporting to the test's OTLP collector, events between them over Kafka. A client's
/// checkout with its own `traceparent` is one trace through orders, products, payments,
/// delivery and notifications, every span's parent in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_processes_over_kafka() {
    use shopverse_proto::orders::v1::{AddCartItemRequest, CheckoutRequest};
    let _one_at_a_time = SERIAL.lock().await;
    let (at, collector) = crate::observability::collector::start().await;
    let mut c = Cluster::new(&brokers()).await;
    let (ok, out, err) = c.cli(&["seed"]);
    assert!(ok, "seed: {out}{err}");
    let endpoint = format!("http://{at}");
    let otlp = ("SHOPVERSE_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str());
    let products = c.serve("products", &[otlp]);
    let products_url = format!("http://{}", addr(&products, "products"));
    let to_products = (
        "SHOPVERSE_SERVICES__ORDERS__PRODUCTS_URL",
        products_url.as_str(),
    );
    let orders = c.serve("orders", &[otlp, to_products]);
    let rest: Vec<Appliance> = ["payments", "notifications", "delivery"]
        .iter()
        .map(|s| c.serve(s, &[otlp]))
        .collect();
    let (catalog, _) = pick_products(&c, addr(&products, "products")).await;

    let (trace, client_span) = ("5bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let buyer = [shopverse_kit::Role::Customer];
    let mut client = OrdersServiceClient::new(channel(addr(&orders, "orders")).await);
    let line = AddCartItemRequest {
        product_id: catalog[0].clone(),
        quantity: 1,
    };
    let line = shopverse_kit::testing::as_user(line, "tracy", &buyer);
    client.add_cart_item(line).await.unwrap();
    let checkout = CheckoutRequest {
        shipping_address: Some(shopverse_proto::common::v1::Address {
            recipient: "T".into(),
            line1: "1 Main St".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "DE".into(),
            ..Default::default()
        }),
        payment_method_token: "pm_card_ok".into(),
        idempotency_key: "traced-across-1".into(),
    };
    let mut checkout = shopverse_kit::testing::as_user(checkout, "tracy", &buyer);
    let tp = format!("00-{trace}-{client_span}-01");
    checkout
        .metadata_mut()
        .insert("traceparent", tp.parse().unwrap());
    client.checkout(checkout).await.unwrap();

    let wanted = [
        "orders",
        "products",
        "payments",
        "delivery",
        "notifications",
    ];
    let spans = collector.trace(trace, &wanted).await;
    let first = spans
        .iter()
        .find(|s| s.name == "OrdersService/Checkout")
        .unwrap();
    assert_eq!(
        first.parent, client_span,
        "orders continues the client's trace"
    );
    crate::observability::collector::all_linked(&spans, client_span);
    for p in [products, orders].into_iter().chain(rest) {
        p.stop();
    }
    c.drop_dbs().await;
}

/// `scripts/run --distributed`, as a newcomer runs it: one command starts PostgreSQL's
/// databases, every service as its own process (two replicas of orders and payments) and the
/// gateway, prints where each runs and a `ready:` line; an order placed through the gateway
/// goes through the whole saga across the processes; Ctrl-C stops everything it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_runs_in_one_command_and_stops_on_ctrl_c() {
    use std::io::BufRead;
    let _one = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut script = Command::new("bash")
        .arg(repo.join("scripts/run"))
        .args(["--distributed", "--gateway-port", "0"])
        .env("SHOPVERSE_BIN", BIN)
        .env("SHOPVERSE_CLUSTER_DIR", dir.path())
        .env("SHOPVERSE_CLUSTER_DB_PREFIX", &prefix)
        .env("SHOPVERSE_CLUSTER_NAMESPACE", &prefix)
        .env("SHOPVERSE_KAFKA_BROKERS", brokers())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(script.stdout.take().unwrap());
    let mut said = Vec::new();
    let ready = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the script ended before its ready line: {said:#?}"
        );
        if let Some(rest) = line.trim().strip_prefix("ready: ") {
            break rest.to_owned();
        }
        said.push(line);
    };
    let table = said.join("");
    for name in [
        "orders-1",
        "orders-2",
        "payments-1",
        "payments-2",
        "delivery-1",
    ] {
        assert!(table.contains(name), "{name} in the table: {table}");
    }
    let addr = |name: &str| -> std::net::SocketAddr {
        ready
            .split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let gw = addr("gateway");
    let (_, token) = customer(gw, "cluster@example.com");
    let auth = [("authorization", token.as_str())];
    let placed = buy_with(gw, &auth, 0, "cluster-order-1", "pm_card_ok");
    assert_eq!(placed.status, 200, "{}", placed.body);
    let id = placed.json()["id"].as_str().unwrap().to_owned();
    until(
        "the order is confirmed across the processes",
        Duration::from_secs(60),
        || {
            let r = http(gw, "GET", &format!("/v1/orders/{id}"), &auth, b"");
            r.json()["status"] == "ORDER_STATUS_CONFIRMED"
        },
    );

    let _ = Command::new("kill")
        .args(["-INT", &script.id().to_string()])
        .status();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = script.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Ctrl-C did not stop it"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(130), "Ctrl-C's exit status");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    for name in ["gateway", "users", "orders", "payments"] {
        assert!(
            std::net::TcpStream::connect(addr(name)).is_err(),
            "{name} still answers after Ctrl-C: {rest}"
        );
    }
    let pg = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await;
    if let Ok(pg) = pg {
        for db in SERVICE_NAMES.iter().chain(&["payment_simulator"]) {
            let drop = format!("DROP DATABASE IF EXISTS {prefix}_{db} WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pg).await;
        }
    }
}
