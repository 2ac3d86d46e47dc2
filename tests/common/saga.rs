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
use sqlx::Row;
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

/// The saga's databases.
pub struct Dbs {
    pub orders: sqlx::AnyPool,
    pub products: sqlx::AnyPool,
    pub payments: sqlx::AnyPool,
    pub notifications: sqlx::AnyPool,
}

impl Dbs {
    pub async fn connect(orders: &str, products: &str, payments: &str, notifications: &str) -> Dbs {
        sqlx::any::install_default_drivers();
        let c = |u: &str| {
            let u = u.to_owned();
            async move {
                sqlx::pool::PoolOptions::<sqlx::Any>::new()
                    .max_connections(2)
                    .connect(&u)
                    .await
                    .expect("connect to a service database")
            }
        };
        Dbs {
            orders: c(orders).await,
            products: c(products).await,
            payments: c(payments).await,
            notifications: c(notifications).await,
        }
    }

    pub async fn close(self) {
        self.orders.close().await;
        self.products.close().await;
        self.payments.close().await;
        self.notifications.close().await;
    }
}

pub async fn scalar(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

/// What is still in flight: orders waiting for payment, checkouts mid-way, unpublished outbox
/// rows, held stock.
pub async fn in_flight(dbs: &Dbs) -> i64 {
    scalar(
        &dbs.orders,
        "SELECT COUNT(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
    )
    .await
        + scalar(
            &dbs.orders,
            "SELECT COUNT(*) FROM checkouts WHERE state IN ('RESERVING', 'ABANDONING')",
        )
        .await
        + scalar(
            &dbs.orders,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await
        + scalar(
            &dbs.payments,
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
        )
        .await
        + scalar(
            &dbs.products,
            "SELECT COUNT(*) FROM reservations WHERE state = 'HELD'",
        )
        .await
        // Orders whose order.placed notice has not arrived yet.
        + (scalar(&dbs.orders, "SELECT COUNT(*) FROM orders").await
            - scalar(
                &dbs.notifications,
                "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.placed'",
            )
            .await)
            .max(0)
}

/// Waits until nothing is in flight.
pub async fn settle(dbs: &Dbs, within: Duration) {
    let t0 = Instant::now();
    loop {
        let pending = in_flight(dbs).await;
        if pending == 0 {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "{pending} things still in flight after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// The reconciliation, from the databases alone; returns the number of confirmed orders.
/// 1. Each order's reservation and payments match its fate; abandoned and refused checkouts
///    hold nothing.
/// 2. Stock: what left each product is exactly what committed reservations hold, and that is
///    what confirmed orders bought; nothing stays reserved; no unit is lost or made up.
/// 3. No notification twice for one event, and one `order.placed` notice per order.
pub async fn reconcile(dbs: &Dbs, initial: &HashMap<String, i64>) -> usize {
    let rows =
        sqlx::query("SELECT o.id, o.status, o.paid, o.refunded, o.total_minor FROM orders o")
            .fetch_all(&dbs.orders)
            .await
            .expect("orders");
    let mut confirmed = 0;
    for r in &rows {
        let id: String = r.try_get("id").expect("id");
        let status: String = r.try_get("status").expect("status");
        let paid = r.try_get::<i64, _>("paid").expect("paid") != 0;
        let refunded = r.try_get::<i64, _>("refunded").expect("refunded") != 0;
        let total: i64 = r.try_get("total_minor").expect("total");
        let reservation: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(&dbs.products)
                .await
                .expect("reservation");
        let captures: Vec<i64> = sqlx::query_scalar(
            "SELECT amount_minor FROM transactions WHERE order_id = $1 AND kind = 'CAPTURE'",
        )
        .bind(&id)
        .fetch_all(&dbs.payments)
        .await
        .expect("captures");
        let refunds: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM transactions WHERE order_id = $1 AND kind = 'REFUND'",
        )
        .bind(&id)
        .fetch_one(&dbs.payments)
        .await
        .expect("refunds");
        match status.as_str() {
            "CONFIRMED" => {
                confirmed += 1;
                assert_eq!(reservation.as_deref(), Some("COMMITTED"), "order {id}");
                assert_eq!(
                    captures,
                    vec![total],
                    "order {id}: exactly one capture of the total"
                );
                assert_eq!(refunds, 0, "order {id}");
            }
            "CANCELLED" => {
                assert_eq!(reservation.as_deref(), Some("RELEASED"), "order {id}");
                assert!(captures.len() <= 1, "order {id}");
                assert_eq!(
                    refunds,
                    captures.len() as i64,
                    "order {id}: every capture refunded once"
                );
                assert_eq!(paid, !captures.is_empty(), "order {id}");
                assert_eq!(refunded, refunds == 1, "order {id}");
            }
            other => panic!("order {id} ended {other}"),
        }
    }
    let abandoned: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM checkouts WHERE state IN ('ABANDONED', 'FAILED')")
            .fetch_all(&dbs.orders)
            .await
            .expect("checkouts");
    for id in &abandoned {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(id)
                .fetch_optional(&dbs.products)
                .await
                .expect("reservation");
        assert!(
            matches!(state.as_deref(), None | Some("RELEASED")),
            "checkout {id} left stock {state:?}"
        );
    }

    for (p, initial) in initial {
        let r = sqlx::query("SELECT available, reserved FROM stock WHERE product_id = $1")
            .bind(p)
            .fetch_one(&dbs.products)
            .await
            .expect("stock");
        let available: i64 = r.try_get("available").expect("available");
        let reserved: i64 = r.try_get("reserved").expect("reserved");
        let committed: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM reservation_lines l JOIN reservations r ON r.order_id = l.order_id \
             WHERE l.product_id = $1 AND r.state = 'COMMITTED'",
        )
        .bind(p)
        .fetch_one(&dbs.products)
        .await
        .expect("committed");
        let sold: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(SUM(l.quantity), 0) AS BIGINT) FROM order_lines l JOIN orders o ON o.id = l.order_id \
             WHERE l.product_id = $1 AND o.status = 'CONFIRMED'",
        )
        .bind(p)
        .fetch_one(&dbs.orders)
        .await
        .expect("sold");
        assert_eq!(reserved, 0, "product {p}");
        assert_eq!(
            committed, sold,
            "product {p}: committed stock equals confirmed order lines"
        );
        assert_eq!(
            available + committed,
            *initial,
            "product {p}: no unit lost or made up"
        );
    }

    let dupes = scalar(
        &dbs.notifications,
        "SELECT COUNT(*) FROM (SELECT event_id FROM inbox_items GROUP BY event_id HAVING COUNT(*) > 1) d",
    )
    .await;
    assert_eq!(dupes, 0, "a notification twice for one event");
    let placed_notes = scalar(
        &dbs.notifications,
        "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.placed'",
    )
    .await;
    assert_eq!(
        placed_notes,
        rows.len() as i64,
        "one order.placed notice per order"
    );
    confirmed
}
