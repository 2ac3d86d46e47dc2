//! Crash safety of the whole saga: `shopverse up` is killed with SIGKILL in the middle of 200
//! checkouts and restarted on the same data. Afterwards every order must have reached a
//! consistent state, and a reconciliation computed straight from each service's database must
//! hold exactly: stock movements match orders, every confirmed order has one capture, every
//! cancelled paid order one refund, and no notification exists twice for one event.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use shopverse_proto::orders::v1::orders_service_client::OrdersServiceClient;

use crate::common::saga::{
    Checkouts, Outcome, drive, five_products, jobs, placed, reconcile, run_job, seeded_stock,
    settle,
};
use crate::common::*;

const CHECKOUTS: usize = 200;
const KILL_AFTER: usize = 70;

fn sqlite(dir: &Path, name: &str) -> String {
    format!("sqlite://{}/{name}.db", dir.display())
}

/// The saga's databases of the appliance whose data directory is `dir`.
async fn saga_dbs(dir: &Path) -> crate::common::saga::Dbs {
    let files = crate::common::saga::Urls::sqlite_files(dir);
    crate::common::saga::connect(&crate::common::saga::Urls::of(&files)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_checkouts_then_everything_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SHOPVERSE_SERVICES__ORDERS__CHECKOUT_ABANDON_SECS", "2"),
        ("SHOPVERSE_SERVICES__ORDERS__SWEEP_INTERVAL_MS", "100"),
    ];
    let app = Appliance::binary(dir.path(), &["--demo"], &env);
    // Five products with little stock, so some checkouts are refused for stock too.
    let products = five_products(app.products).await;
    // Phase 1: checkouts until KILL_AFTER have been handed out, then SIGKILL mid-flight.
    let mut run = Checkouts::start(
        app.addrs["orders"],
        jobs(CHECKOUTS, &products, "crash"),
        Duration::ZERO,
    );
    run.wait_handed_out(KILL_AFTER, Duration::from_secs(60))
        .await;
    app.kill9();
    run.finish().await;
    let Checkouts {
        jobs,
        next,
        results,
        ..
    } = run;
    let handed_out = next.load(Ordering::SeqCst).min(CHECKOUTS);

    // Phase 2: restart on the same data. Clients retry half the interrupted checkouts with the
    // same idempotency key (the other half never come back), then the rest run.
    let app = Appliance::binary(dir.path(), &["--demo"], &env);
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
        Duration::ZERO,
    )
    .await;
    let placed = placed(&results);
    assert!(placed.len() > 50, "only {} orders placed", placed.len());
    assert!(
        !interrupted.is_empty(),
        "the kill interrupted nothing; the test proved nothing"
    );

    // Let the saga settle: no order waiting for payment, no checkout in flight, outboxes empty;
    // then the reconciliation, from the databases alone.
    let d = dir.path();
    let dbs = saga_dbs(d).await;
    settle(&dbs, Duration::from_secs(90)).await;
    let mut initial = HashMap::new();
    for p in &products {
        initial.insert(p.clone(), seeded_stock(&sqlite(d, "events"), p).await);
    }
    let confirmed = reconcile(&dbs, &initial, &placed).await;
    assert!(confirmed > 30, "{confirmed} confirmed");
    dbs.close().await;
    app.stop();
}

/// A backup taken while checkouts run (flaky and declined cards among them), restored into a new
/// data directory and started there: the saga settles, the reconciliation holds, and no order's
/// customer is told of one step twice (the snapshots are one cut, so nothing the log already
/// carries is raised again under a new id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_checkouts_restores_and_settles_once() {
    let live = tempfile::tempdir().unwrap();
    let backup = live.path().join("backup");
    let env = [
        ("SHOPVERSE_SERVICES__ORDERS__CHECKOUT_ABANDON_SECS", "2"),
        ("SHOPVERSE_SERVICES__ORDERS__SWEEP_INTERVAL_MS", "100"),
    ];
    let app = Appliance::binary(live.path(), &["--demo"], &env);
    let products = five_products(app.products).await;
    let total = 150;
    let mut run = Checkouts::start(
        app.addrs["orders"],
        jobs(total, &products, "backup"),
        Duration::from_millis(5),
    );
    run.wait_handed_out(40, Duration::from_secs(60)).await;
    let (ok, out, err) = cli(
        live.path(),
        &["backup", "--to", backup.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("one cut of"), "{out}");
    let at_backup_end = run.next.load(Ordering::SeqCst);
    run.finish().await;
    assert!(
        at_backup_end < total,
        "the checkouts were over before the backup ended: it was not taken under load"
    );
    app.stop();

    let restored = tempfile::tempdir().unwrap();
    let (ok, _, err) = cli(
        restored.path(),
        &["restore", "--from", backup.to_str().unwrap()],
        &[],
    );
    assert!(ok, "{err}");
    let app = Appliance::binary(restored.path(), &[], &env);
    let d = restored.path();
    let dbs = saga_dbs(d).await;
    settle(&dbs, Duration::from_secs(90)).await;
    let orders = crate::common::saga::scalar(&dbs.orders, "SELECT COUNT(*) FROM orders").await;
    assert!(orders > 20, "only {orders} orders in the backup");
    let mut initial = HashMap::new();
    for p in &products {
        initial.insert(p.clone(), seeded_stock(&sqlite(d, "events"), p).await);
    }
    // The restored copy holds the orders of the cut, not every order a client was told of
    // after it: no told list here.
    reconcile(&dbs, &initial, &[]).await;
    // What a customer reads: one notice per order and step, whatever its event id.
    let twice: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT event_type, subject, COUNT(*) FROM inbox_items WHERE event_type LIKE 'order.%' \
         GROUP BY user_id, event_type, subject HAVING COUNT(*) > 1",
    )
    .fetch_all(&dbs.notifications)
    .await
    .unwrap();
    assert!(twice.is_empty(), "notified twice: {twice:?}");
    let confirmed_notices = crate::common::saga::scalar(
        &dbs.notifications,
        "SELECT COUNT(*) FROM inbox_items WHERE event_type = 'order.confirmed'",
    )
    .await;
    let confirmed = crate::common::saga::scalar(
        &dbs.orders,
        "SELECT COUNT(*) FROM orders WHERE status = 'CONFIRMED'",
    )
    .await;
    assert_eq!(
        confirmed_notices, confirmed,
        "one confirmation per confirmed order"
    );
    dbs.close().await;
    app.stop();
}
