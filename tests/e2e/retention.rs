//! An appliance left running for months, in compressed time: the event log keeps records for
//! seconds instead of days, checkouts come in waves, and between waves the log, the inboxes and
//! the outboxes are pruned. The event log must stop growing once the first windows have
//! passed, the inboxes and outboxes must hold only what is younger than the retention time, no record any consumer still had to read may go (no group loses a record), and the
//! saga must still reconcile exactly: every event handled once in effect.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::path::Path;
use std::time::Duration;

use crate::common::saga::{Checkouts, connect, jobs, placed, reconcile, settle, stock_of};
use crate::common::*;

const WAVES: usize = 5;
const PER_WAVE: usize = 100;
const STOCK: i64 = 5_000;

/// The event log's database file. (Its WAL comes and goes with the checkpoints, bounded by
/// `journal_size_limit`; the stop below must leave none.)
fn events_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("events.db")).map_or(0, |m| m.len())
}

/// The sum of a metric's samples on the admin port.
fn metric_sum(admin: std::net::SocketAddr, name: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn months_in_minutes_the_databases_stop_growing_and_the_saga_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        // 3.6 s: a pass every second.
        ("SHOPVERSE_EVENTS__RETENTION_HOURS", "0.001"),
        ("SHOPVERSE_EVENTS__RETENTION_BYTES", "65536"),
        // The hard cap stays far away: nothing unread may go.
        ("SHOPVERSE_EVENTS__RETENTION_MAX_BYTES", "1073741824"),
    ];
    let (app, admin) = with_admin(dir.path(), &env);
    let gw = app.addrs["gateway"];
    // Five products with plenty of stock, so every wave places orders.
    let listed = http(gw, "GET", "/v1/products?pageSize=5", &[], b"").json();
    let products: Vec<String> = listed["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(products.len(), 5);
    let files = crate::common::saga::Urls::sqlite_files(dir.path());
    let dbs = connect(&crate::common::saga::Urls::of(&files)).await;
    // The demo's three orders settle first, no unit held for one; then each product gets
    // plenty of stock, and what the demo sold counts in its starting stock.
    settle(&dbs, Duration::from_secs(90)).await;
    let t0 = std::time::Instant::now();
    loop {
        let held: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT) FROM stock")
                .fetch_one(&dbs.products)
                .await
                .unwrap();
        if held == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{held} units stay held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let auth = [("authorization", admin.as_str())];
    for p in &products {
        let body = format!(r#"{{"available":{STOCK}}}"#);
        let r = http(
            gw,
            "PUT",
            &format!("/v1/products/{p}/stock"),
            &auth,
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mut initial = std::collections::HashMap::new();
    for (p, available) in stock_of(&dbs.products, &products).await {
        assert_eq!(available, STOCK);
        let sold = shopverse_reconcile::committed(&dbs.products, &p)
            .await
            .unwrap();
        initial.insert(p, STOCK + sold);
    }

    // Rows the services keep for the event machinery alone (not the shop's own data, which
    // grows with every order, as it should).
    let machinery = || async {
        let mut n = 0;
        for name in SERVICE_NAMES {
            let db =
                sqlx::AnyPool::connect(&format!("sqlite://{}/{name}.db", dir.path().display()))
                    .await
                    .unwrap();
            for table in ["inbox", "outbox"] {
                let sql = format!("SELECT COUNT(*) FROM {table}");
                let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .fetch_one(&db)
                    .await
                    .unwrap();
                n += rows;
            }
            db.close().await;
        }
        n
    };
    let mut told = Vec::new();
    let (mut rows, mut log) = (Vec::new(), Vec::new());
    for wave in 0..WAVES {
        let mut run = Checkouts::start(
            app.addrs["orders"],
            jobs(PER_WAVE, &products, &format!("wave{wave}")),
            Duration::ZERO,
        );
        run.finish().await;
        let now = placed(&run.results);
        assert!(
            now.len() > PER_WAVE / 2,
            "wave {wave}: {} placed",
            now.len()
        );
        told.extend(now);
        settle(&dbs, Duration::from_secs(90)).await;
        // Three windows: the log, the inboxes and the outboxes have pruned what they may.
        tokio::time::sleep(Duration::from_secs(11)).await;
        rows.push(machinery().await);
        log.push(events_bytes(dir.path()));
        eprintln!(
            "wave {wave}: {} orders so far; inbox and outbox rows {}, event log {} KiB",
            told.len(),
            rows[wave],
            log[wave] / 1024
        );
    }
    // After the first windows the log's file stops growing (pruned pages are reused), and the
    // inboxes and outboxes hold only what is younger than the retention time: nothing, a few
    // seconds after a wave.
    assert!(
        log[WAVES - 1] <= log[1].max(log[2]) + log[1] / 5,
        "the event log kept growing: {log:?} bytes after each wave"
    );
    assert!(
        rows.iter().all(|n| *n < PER_WAVE as i64),
        "inbox and outbox rows after each wave: {rows:?}"
    );
    // What the log holds now: about the last record of each partition, not every wave's.
    let events = sqlx::AnyPool::connect(&format!("sqlite://{}/events.db", dir.path().display()))
        .await
        .unwrap();
    let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM records")
        .fetch_one(&events)
        .await
        .unwrap();
    let written = metric_sum(app.admin, "shopverse_events_records_pruned_total");
    assert!(
        written > (WAVES * PER_WAVE) as f64,
        "records pruned: {written}"
    );
    assert!(
        (held as f64) < written / 4.0,
        "{held} records held, {written} pruned"
    );
    assert!(metric_sum(app.admin, "shopverse_events_inbox_pruned_total") > 0.0);
    assert_eq!(
        metric_sum(app.admin, "shopverse_events_records_forced_out_total"),
        0.0,
        "nothing a group had not read was deleted"
    );
    assert_eq!(
        metric_sum(app.admin, "shopverse_events_records_skipped_total"),
        0.0
    );
    // Each event in effect once: the stock, the provider's ledger and the notifications agree
    // with what the clients were told.
    let confirmed = reconcile(&dbs, &initial, &told).await;
    assert!(confirmed > 0);
    dbs.close().await;
    events.close().await;
    app.stop();
    // Stopped, the appliance leaves no WAL behind: every database is whole in its file.
    for e in std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with("-wal") {
            // SQLite deletes an empty WAL as its last connection closes: gone counts as empty.
            let bytes = e.metadata().map_or(0, |m| m.len());
            assert_eq!(bytes, 0, "{name} after the stop");
        }
    }
}
