//! Checkouts driven from outside, and the reconciliation of the saga's outcome computed from
//! each service's database alone: shared by the crash test (SQLite, one process) and the
//! distributed tests (PostgreSQL and Kafka, one process per service).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shopverse_kit::Role;
use shopverse_kit::testing::as_user;
use shopverse_proto::common::v1::Address;
use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;
use shopverse_proto::orders::v1::{AddCartItemRequest, CheckoutRequest};
use tonic::Code;

use super::channel;

#[derive(Debug, Clone)]
pub enum Outcome {
    Placed(String),
    Refused,
    /// The call failed under it (a process died); retried later, or deliberately left.
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub user: String,
    pub product: String,
    pub qty: i32,
    pub token: &'static str,
    pub key: String,
}

/// The first five products of the catalog at `products` (the services' products address).
pub async fn five_products(products: SocketAddr) -> Vec<String> {
    use shopverse_proto::products::v1::ListProductsRequest;
    use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
    let listed = ProductsServiceClient::new(channel(products).await)
        .list_products(ListProductsRequest {
            page_size: 5,
            ..Default::default()
        })
        .await
        .expect("list products")
        .into_inner();
    let ids: Vec<String> = listed.products.into_iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), 5, "the seeded catalog has five products");
    ids
}

/// `n` checkouts over `products` by 25 customers: 10% declined cards, 20% flaky ones.
pub fn jobs(n: usize, products: &[String], tag: &str) -> Vec<Job> {
    (0..n)
        .map(|i| Job {
            user: format!("{tag}-user-{}", i % 25),
            product: products[i % products.len()].clone(),
            qty: 1 + (i % 3) as i32,
            token: match i % 10 {
                0 => "pm_card_declined",
                1 | 2 => "pm_card_flaky",
                _ => "pm_card_ok",
            },
            key: format!("{tag}-{i}-{}", uuid::Uuid::new_v4()),
        })
        .collect()
}

pub async fn run_job(
    orders: &mut OrdersServiceClient<tonic::transport::Channel>,
    job: &Job,
    add: bool,
) -> Outcome {
    let who = |m| as_user(m, &job.user, &[Role::Customer]);
    if add
        && let Err(e) = orders
            .add_cart_item(who(AddCartItemRequest {
                product_id: job.product.clone(),
                quantity: job.qty,
            }))
            .await
    {
        return if e.code() == Code::InvalidArgument {
            Outcome::Refused
        } else {
            Outcome::Interrupted
        };
    }
    let req = as_user(
        CheckoutRequest {
            shipping_address: Some(Address {
                line1: "1 Saga Lane".into(),
                city: "Berlin".into(),
                postal_code: "10115".into(),
                country: "DE".into(),
                ..Default::default()
            }),
            payment_method_token: job.token.into(),
            idempotency_key: job.key.clone(),
        },
        &job.user,
        &[Role::Customer],
    );
    match orders.checkout(req).await {
        Ok(o) => Outcome::Placed(o.into_inner().id),
        Err(e) if e.code() == Code::FailedPrecondition => Outcome::Refused,
        Err(_) => Outcome::Interrupted,
    }
}

/// Runs jobs from `next` with 6 workers until `stop_at` have been handed out, each worker
/// waiting `pace` between its jobs; a worker whose call was interrupted stops.
pub async fn drive(
    orders: SocketAddr,
    jobs: Arc<Vec<Job>>,
    next: Arc<AtomicUsize>,
    results: Arc<Mutex<HashMap<usize, Outcome>>>,
    stop_at: usize,
    pace: Duration,
) {
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (jobs, next, results) = (jobs.clone(), next.clone(), results.clone());
        let ch = channel(orders).await;
        workers.push(tokio::spawn(async move {
            let mut orders = OrdersServiceClient::new(ch);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= stop_at.min(jobs.len()) {
                    return;
                }
                let out = run_job(&mut orders, &jobs[i], true).await;
                let died = matches!(out, Outcome::Interrupted);
                results.lock().expect("results").insert(i, out);
                if died {
                    return;
                }
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
}

/// Checkouts running in the background through [`drive`].
pub struct Checkouts {
    pub jobs: Arc<Vec<Job>>,
    pub next: Arc<AtomicUsize>,
    pub results: Arc<Mutex<HashMap<usize, Outcome>>>,
    pub driver: tokio::task::JoinHandle<()>,
}

impl Checkouts {
    /// Starts every job of `jobs` against the orders service at `orders`.
    pub fn start(orders: SocketAddr, jobs: Vec<Job>, pace: Duration) -> Checkouts {
        let n = jobs.len();
        let jobs = Arc::new(jobs);
        let next = Arc::new(AtomicUsize::new(0));
        let results = Arc::new(Mutex::new(HashMap::new()));
        let driver = tokio::spawn(drive(
            orders,
            jobs.clone(),
            next.clone(),
            results.clone(),
            n,
            pace,
        ));
        Checkouts {
            jobs,
            next,
            results,
            driver,
        }
    }

    /// Waits until `n` jobs have been handed out, failing the test after `within`.
    pub async fn wait_handed_out(&self, n: usize, within: Duration) {
        let t0 = Instant::now();
        while self.next.load(Ordering::SeqCst) < n {
            assert!(t0.elapsed() < within, "checkouts too slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the driver to finish.
    pub async fn finish(&mut self) {
        (&mut self.driver).await.expect("checkout driver");
    }
}

pub fn placed(results: &Mutex<HashMap<usize, Outcome>>) -> Vec<String> {
    results
        .lock()
        .expect("results")
        .values()
        .filter_map(|o| match o {
            Outcome::Placed(id) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

pub use shopverse_reconcile::{Dbs, Urls};

/// The saga's databases and the provider's ledger, two connections each.
pub async fn connect(urls: &Urls<'_>) -> Dbs {
    Dbs::open(urls, 2)
        .await
        .expect("connect to the service databases")
}

pub async fn scalar(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    shopverse_reconcile::scalar(pool, sql).await.expect(sql)
}

/// Waits until nothing is in flight.
pub async fn settle(dbs: &Dbs, within: Duration) {
    let pending = shopverse_reconcile::settle(dbs, within)
        .await
        .expect("counting what is in flight");
    assert_eq!(
        pending, 0,
        "{pending} things still in flight after {within:?}"
    );
}

/// The stock of each product now (before any checkout: the starting stock).
pub async fn stock_of(products_db: &sqlx::AnyPool, products: &[String]) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for p in products {
        let available: i64 =
            sqlx::query_scalar("SELECT available FROM stock WHERE product_id = $1")
                .bind(p)
                .fetch_one(products_db)
                .await
                .expect("stock row");
        out.insert(p.clone(), available);
    }
    out
}

/// The reconciliation (see `shopverse_reconcile`), from the databases, the provider's ledger
/// and `told` (the orders clients were told were placed): fails the test with every violation
/// found; returns the number of confirmed orders.
pub async fn reconcile(dbs: &Dbs, initial: &HashMap<String, i64>, told: &[String]) -> usize {
    let report = shopverse_reconcile::check(dbs, initial, told)
        .await
        .expect("reading the service databases");
    assert!(
        report.violations.is_empty(),
        "the reconciliation does not hold ({} orders, {} products):\n{}",
        report.orders,
        report.products,
        report.violations.join("\n")
    );
    assert_eq!(report.products, initial.len(), "every product checked");
    report.confirmed
}

/// The stock a product was created with: its first `stock.changed` event, read from the
/// embedded event log at `events_url`.
/// Once nothing is in flight, the strict reconciliation of an appliance whose data directory is
/// `dir` (its products' starting stock read from its event log), with `told` the orders its
/// clients were told were placed.
pub async fn settle_and_reconcile(
    dbs: &Dbs,
    dir: &std::path::Path,
    products: &[String],
    told: &[String],
) -> usize {
    settle(dbs, Duration::from_secs(90)).await;
    let events = format!("sqlite://{}/events.db", dir.display());
    let mut initial = HashMap::new();
    for p in products {
        initial.insert(p.clone(), seeded_stock(&events, p).await);
    }
    reconcile(dbs, &initial, told).await
}

pub async fn seeded_stock(events_url: &str, product: &str) -> i64 {
    use prost::Message;
    use sqlx::Row;
    shopverse_storage::install_drivers();
    let log = sqlx::AnyPool::connect(events_url)
        .await
        .expect("the event log");
    let rows = sqlx::query("SELECT payload FROM records WHERE topic = 'shopverse.catalog' AND record_key = $1 ORDER BY offs")
        .bind(product)
        .fetch_all(&log)
        .await
        .expect("the seeded stock event");
    for r in rows {
        let env = shopverse_proto::events::v1::Envelope::decode(
            r.try_get::<Vec<u8>, _>("payload")
                .expect("the seeded stock event")
                .as_slice(),
        )
        .expect("the seeded stock event");
        if env.r#type == "stock.changed" {
            let s = shopverse_proto::products::v1::StockChanged::decode(env.payload.as_slice())
                .expect("the seeded stock event");
            if s.reason == "set" {
                return s.stock.expect("the seeded stock event").available;
            }
        }
    }
    panic!("no initial stock event for {product}")
}
