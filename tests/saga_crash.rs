//! Crash safety of the whole saga: `shopverse up` is killed with SIGKILL in the middle of 200
//! checkouts and restarted on the same data. Afterwards every order must have reached a
//! consistent state, and a reconciliation computed straight from each service's database must
//! hold exactly: stock movements match orders, every confirmed order has one capture, every
//! cancelled paid order one refund, and no notification exists twice for one event.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shopverse_kit::Role;
use shopverse_kit::testing::as_user;
use shopverse_proto::common::v1::Address;
use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;
use shopverse_proto::orders::v1::{AddCartItemRequest, CheckoutRequest};
use shopverse_proto::products::v1::ListProductsRequest;
use shopverse_proto::products::v1::products_service_client::ProductsServiceClient;
use sqlx::Row;
use tonic::Code;

mod common;
use common::*;

const CHECKOUTS: usize = 200;
const KILL_AFTER: usize = 70;

#[derive(Debug, Clone)]
enum Outcome {
    Placed(String),
    Refused,
    /// The process died under it; retried after the restart (or deliberately left).
    Interrupted,
}

#[derive(Debug, Clone)]
struct Job {
    user: String,
    product: String,
    qty: i32,
    token: &'static str,
    key: String,
}

fn jobs(products: &[String]) -> Vec<Job> {
    (0..CHECKOUTS)
        .map(|i| Job {
            user: format!("crash-user-{}", i % 25),
            product: products[i % products.len()].clone(),
            qty: 1 + (i % 3) as i32,
            token: match i % 10 {
                0 => "pm_card_declined",
                1 | 2 => "pm_card_flaky",
                _ => "pm_card_ok",
            },
            key: format!("crash-{i}-{}", uuid::Uuid::new_v4()),
        })
        .collect()
}

async fn run_job(
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
                line1: "1 Crash Lane".into(),
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

/// Runs jobs from `next` with 6 workers until they are done or the process dies.
async fn drive(
    app_orders: std::net::SocketAddr,
    jobs: Arc<Vec<Job>>,
    next: Arc<AtomicUsize>,
    results: Arc<Mutex<HashMap<usize, Outcome>>>,
    stop_at: usize,
) {
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (jobs, next, results) = (jobs.clone(), next.clone(), results.clone());
        let ch = channel(app_orders).await;
        workers.push(tokio::spawn(async move {
            let mut orders = OrdersServiceClient::new(ch);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= stop_at.min(jobs.len()) {
                    return;
                }
                let out = run_job(&mut orders, &jobs[i], true).await;
                let died = matches!(out, Outcome::Interrupted);
                results.lock().unwrap().insert(i, out);
                if died {
                    return;
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

async fn db(dir: &Path, name: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(&format!("sqlite://{}/{name}.db", dir.display()))
        .await
        .unwrap()
}

async fn scalar(pool: &sqlx::AnyPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_checkouts_then_everything_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOPVERSE_SERVICES__ORDERS__CHECKOUT_ABANDON_SECS", "2"),
        ("SHOPVERSE_SERVICES__ORDERS__SWEEP_INTERVAL_MS", "100"),
    ];
    let app = Appliance::start_with_env(dir.path(), &["--demo"], &env);
    // Five products with little stock, so some checkouts are refused for stock too.
    let mut catalog = ProductsServiceClient::new(channel(app.products).await);
    let listed = catalog
        .list_products(ListProductsRequest {
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let products: Vec<String> = listed.products.iter().map(|p| p.id.clone()).collect();
    let jobs = Arc::new(jobs(&products));
    let results = Arc::new(Mutex::new(HashMap::new()));
    let next = Arc::new(AtomicUsize::new(0));

    // Phase 1: checkouts until KILL_AFTER have been handed out, then SIGKILL mid-flight.
    let driver = tokio::spawn(drive(
        app.addrs["orders"],
        jobs.clone(),
        next.clone(),
        results.clone(),
        CHECKOUTS,
    ));
    let t0 = Instant::now();
    while next.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(t0.elapsed() < Duration::from_secs(60), "checkouts too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.kill9();
    driver.await.unwrap();
    let handed_out = next.load(Ordering::SeqCst).min(CHECKOUTS);

    // Phase 2: restart on the same data. Clients retry half the interrupted checkouts with the
    // same idempotency key (the other half never come back), then the rest run.
    let app = Appliance::start_with_env(dir.path(), &["--demo"], &env);
    let mut orders = OrdersServiceClient::new(channel(app.addrs["orders"]).await);
    let interrupted: Vec<usize> = {
        let r = results.lock().unwrap();
        (0..handed_out)
            .filter(|i| !matches!(r.get(i), Some(Outcome::Placed(_) | Outcome::Refused)))
            .collect()
    };
    for (n, i) in interrupted.iter().enumerate() {
        if n % 2 == 0 {
            let out = run_job(&mut orders, &jobs[*i], false).await;
            results.lock().unwrap().insert(*i, out);
        }
    }
    next.store(handed_out, Ordering::SeqCst);
    drive(
        app.addrs["orders"],
        jobs.clone(),
        next.clone(),
        results.clone(),
        CHECKOUTS,
    )
    .await;
    let placed: Vec<String> = results
        .lock()
        .unwrap()
        .values()
        .filter_map(|o| {
            if let Outcome::Placed(id) = o {
                Some(id.clone())
            } else {
                None
            }
        })
        .collect();
    assert!(placed.len() > 50, "only {} orders placed", placed.len());
    assert!(
        !interrupted.is_empty(),
        "the kill interrupted nothing; the test proved nothing"
    );

    // Let the saga settle: no order waiting for payment, no checkout in flight, outboxes empty.
    let (orders_db, products_db, payments_db, notifications_db) = (
        db(dir.path(), "orders").await,
        db(dir.path(), "products").await,
        db(dir.path(), "payments").await,
        db(dir.path(), "notifications").await,
    );
    let t0 = Instant::now();
    loop {
        let pending = scalar(
            &orders_db,
            "SELECT COUNT(*) FROM orders WHERE status = 'PENDING_PAYMENT'",
        )
        .await
            + scalar(
                &orders_db,
                "SELECT COUNT(*) FROM checkouts WHERE state IN ('RESERVING', 'ABANDONING')",
            )
            .await
            + scalar(
                &orders_db,
                "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
            )
            .await
            + scalar(
                &payments_db,
                "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL",
            )
            .await
            + scalar(
                &products_db,
                "SELECT COUNT(*) FROM reservations WHERE state = 'HELD'",
            )
            .await;
        if pending == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "{pending} things still in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Reconciliation, from the databases alone.
    // 1. Each order's reservation matches its fate; abandoned and refused checkouts hold nothing.
    let rows =
        sqlx::query("SELECT o.id, o.status, o.paid, o.refunded, o.total_minor FROM orders o")
            .fetch_all(&orders_db)
            .await
            .unwrap();
    let mut confirmed = 0;
    for r in &rows {
        let id: String = r.try_get("id").unwrap();
        let status: String = r.try_get("status").unwrap();
        let paid = r.try_get::<i64, _>("paid").unwrap() != 0;
        let refunded = r.try_get::<i64, _>("refunded").unwrap() != 0;
        let total: i64 = r.try_get("total_minor").unwrap();
        let reservation: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(&products_db)
                .await
                .unwrap();
        let captures: Vec<i64> = sqlx::query_scalar(
            "SELECT amount_minor FROM transactions WHERE order_id = $1 AND kind = 'CAPTURE'",
        )
        .bind(&id)
        .fetch_all(&payments_db)
        .await
        .unwrap();
        let refunds: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM transactions WHERE order_id = $1 AND kind = 'REFUND'",
        )
        .bind(&id)
        .fetch_one(&payments_db)
        .await
        .unwrap();
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
    assert!(confirmed > 30, "{confirmed} confirmed");
    let abandoned: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM checkouts WHERE state IN ('ABANDONED', 'FAILED')")
            .fetch_all(&orders_db)
            .await
            .unwrap();
    for id in &abandoned {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM reservations WHERE order_id = $1")
                .bind(id)
                .fetch_optional(&products_db)
                .await
                .unwrap();
        assert!(
            matches!(state.as_deref(), None | Some("RELEASED")),
            "checkout {id} left stock {state:?}"
        );
    }

    // 2. Stock: what left each product is exactly what committed reservations hold; nothing is
    // reserved; the seed's starting stock is recovered from the first stock.changed event.
    for p in &products {
        let (available, reserved): (i64, i64) = {
            let r = sqlx::query("SELECT available, reserved FROM stock WHERE product_id = $1")
                .bind(p)
                .fetch_one(&products_db)
                .await
                .unwrap();
            (
                r.try_get("available").unwrap(),
                r.try_get("reserved").unwrap(),
            )
        };
        let committed: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(l.quantity), 0) FROM reservation_lines l JOIN reservations r ON r.order_id = l.order_id \
             WHERE l.product_id = $1 AND r.state = 'COMMITTED'",
        )
        .bind(p)
        .fetch_one(&products_db)
        .await
        .unwrap();
        let sold: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(l.quantity), 0) FROM order_lines l JOIN orders o ON o.id = l.order_id \
             WHERE l.product_id = $1 AND o.status = 'CONFIRMED'",
        )
        .bind(p)
        .fetch_one(&orders_db)
        .await
        .unwrap();
        let initial = seeded_stock(dir.path(), p).await;
        assert_eq!(reserved, 0, "product {p}");
        assert_eq!(
            committed, sold,
            "product {p}: committed stock equals confirmed order lines"
        );
        assert_eq!(
            available + committed,
            initial,
            "product {p}: no unit lost or made up"
        );
    }

    // 3. No notification twice for one event (in-app channel; email and SMS are off here).
    let dupes = scalar(
        &notifications_db,
        "SELECT COUNT(*) FROM (SELECT event_id FROM inbox_items GROUP BY event_id HAVING COUNT(*) > 1) d",
    )
    .await;
    assert_eq!(dupes, 0);
    let placed_notes = scalar(
        &notifications_db,
        "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.placed'",
    )
    .await;
    assert_eq!(
        placed_notes,
        rows.len() as i64,
        "one order.placed notice per order"
    );
    app.stop();
}

/// The stock a product was created with: its first `stock.changed` event, read from the
/// event log.
async fn seeded_stock(dir: &Path, product: &str) -> i64 {
    use prost::Message;
    let log = db(dir, "events").await;
    let rows = sqlx::query("SELECT payload FROM records WHERE topic = 'shopverse.catalog' AND record_key = $1 ORDER BY offs")
        .bind(product)
        .fetch_all(&log)
        .await
        .unwrap();
    for r in rows {
        let env = shopverse_proto::events::v1::Envelope::decode(
            r.try_get::<Vec<u8>, _>("payload").unwrap().as_slice(),
        )
        .unwrap();
        if env.r#type == "stock.changed" {
            let s = shopverse_proto::products::v1::StockChanged::decode(env.payload.as_slice())
                .unwrap();
            if s.reason == "set" {
                return s.stock.unwrap().available;
            }
        }
    }
    panic!("no initial stock event for {product}")
}
