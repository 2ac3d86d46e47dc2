//! One checkout, the appliance dying at a named point of the saga, a restart, and then the
//! strict reconciliation: the provider holds exactly one capture of the order's total.
//!
//! The points are compiled into test builds only (`shopverse_kit::crash`, on debug
//! assertions) and chosen with `SHOPVERSE_CRASH_AT`; the process exits there on the spot, as
//! SIGKILL would end it, with status 137. After the restart, the client whose call was cut
//! short retries its checkout with the same idempotency key, as a client that got no answer
//! does (and with a new key if that one was given up meanwhile).

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::path::Path;
use std::time::Duration;

use crate::common::saga::*;
use crate::common::*;
use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;

const ENV: [(&str, &str); 2] = [
    ("SHOPVERSE_SERVICES__ORDERS__CHECKOUT_ABANDON_SECS", "2"),
    ("SHOPVERSE_SERVICES__ORDERS__SWEEP_INTERVAL_MS", "100"),
];

async fn dbs(dir: &Path) -> Dbs {
    let files = Urls::sqlite_files(dir);
    connect(&Urls::of(&files)).await
}

/// One checkout: placed, refused, or `Interrupted` when the process under it died.
async fn checkout(app: &Appliance, job: &Job, add: bool) -> Outcome {
    let mut orders = OrdersServiceClient::new(channel(app.addrs["orders"]).await);
    run_job(&mut orders, job, add).await
}

async fn crash_at(point: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The demo catalog (and the demo customer's three orders) first, without the crash point.
    let app = Appliance::binary(d, &["--demo"], &ENV);
    let products = five_products(app.products).await;
    // Settled, so the crash point below is met by this test's checkout, not a demo order's.
    let settled = dbs(d).await;
    settle(&settled, Duration::from_secs(60)).await;
    settled.close().await;
    app.stop();
    let mut env = ENV.to_vec();
    env.push(("SHOPVERSE_CRASH_AT", point));
    let app = Appliance::binary(d, &[], &env);
    let mut job = jobs(1, &products[..1], "crash").remove(0);
    job.token = "pm_card_ok";
    let first = checkout(&app, &job, true).await;
    let status = app.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(shopverse_kit::crash::EXIT_STATUS),
        "{point}: the process did not end at its crash point ({status}); first call: {first:?}"
    );

    let app = Appliance::binary(d, &[], &ENV);
    let mut told = Vec::new();
    let mut out = first;
    for attempt in 0..3 {
        match &out {
            Outcome::Placed(id) => {
                told.push(id.clone());
                break;
            }
            Outcome::Refused => panic!("{point}: the checkout was refused"),
            Outcome::Interrupted if attempt > 0 => {
                // The first attempt was given up by the sweeper: a new key, as the client
                // was told to.
                job.key = format!("{}-again-{attempt}", job.key);
            }
            Outcome::Interrupted => {}
        }
        out = checkout(&app, &job, false).await;
    }
    if let Outcome::Placed(id) = &out
        && !told.contains(id)
    {
        told.push(id.clone());
    }
    assert_eq!(
        told.len(),
        1,
        "{point}: no order placed after the restart: {out:?}"
    );

    let dbs = dbs(d).await;
    settle_and_reconcile(&dbs, d, &products, &told).await;
    let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
        .bind(&told[0])
        .fetch_one(&dbs.orders)
        .await
        .unwrap();
    assert_eq!(status, "CONFIRMED", "{point}");
    let captures: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM simulator_operations \
         WHERE kind = 'charge' AND outcome = 'captured' AND idempotency_key = $1",
    )
    .bind(format!("charge:{}", told[0]))
    .fetch_one(&dbs.provider)
    .await
    .unwrap();
    assert_eq!(captures, 1, "{point}: the provider captured once");
    dbs.close().await;
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_stock_is_reserved() {
    crash_at("orders.after_reserve").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_order_row_before_its_commit() {
    crash_at("orders.before_order_commit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_provider_charge_before_the_payment_commit() {
    crash_at("payments.after_charge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_inbox_insert_before_its_effects() {
    crash_at("consumer.after_inbox@payments").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_relay_after_publishing_before_marking() {
    crash_at("relay.after_publish@orders").await;
}
