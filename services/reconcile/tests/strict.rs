//! The reconciliation fails where an auditor would: each test builds a small settled world
//! that reconciles (one confirmed order, one cancelled and refunded), breaks one thing in it
//! the way a bug or a crash could, and expects the check to name it.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::collections::HashMap;

use shopverse_reconcile::{Dbs, Urls, check};

/// The settled world: `o1` confirmed (1,000 EUR captured), `o2` cancelled (500 EUR captured,
/// then refunded), both placed by a checkout and announced.
async fn world(dir: &std::path::Path) -> Dbs {
    let files = Urls::sqlite_files(dir);
    for (url, own) in [
        (&files[0], shopverse_orders::MIGRATIONS),
        (&files[1], shopverse_products::MIGRATIONS),
        (&files[2], shopverse_payments::MIGRATIONS),
        (&files[3], shopverse_notifications::MIGRATIONS),
    ] {
        shopverse_runtime::open_db_at(url, own)
            .await
            .unwrap()
            .close()
            .await;
    }
    let sim = shopverse_storage::Db::connect(&files[4], 1).await.unwrap();
    sim.migrate(&[shopverse_payments::provider::MIGRATIONS])
        .await
        .unwrap();
    sim.close().await;
    let d = Dbs::open(&Urls::of(&files), 1).await.unwrap();
    for (id, status, total) in [("o1", "CONFIRMED", 1_000), ("o2", "CANCELLED", 500)] {
        sql(
            &d.orders,
            &format!(
                "INSERT INTO orders VALUES ('{id}', 'u', '{status}', 'EUR', {total}, 0, {total}, \
                 '{{}}', 'pm_card_ok', 1, {refunded}, '', 0, 0, 0)",
                refunded = i32::from(status == "CANCELLED")
            ),
        )
        .await;
        sql(
            &d.orders,
            &format!(
                "INSERT INTO checkouts VALUES ('u', 'key-{id}', 'h', '{id}', 'PLACED', '[]', NULL, 0, 0)"
            ),
        )
        .await;
        let state = if status == "CONFIRMED" {
            "COMMITTED"
        } else {
            "RELEASED"
        };
        sql(
            &d.products,
            &format!("INSERT INTO reservations VALUES ('{id}', '{state}', 0, 0)"),
        )
        .await;
        sql(
            &d.notifications,
            &format!(
                "INSERT INTO inbox_items VALUES ('n-{id}', 'u', 'e-{id}', 'order.placed', 's', 'b', 0)"
            ),
        )
        .await;
        ledger(
            &d,
            &format!("charge:{id}"),
            "charge",
            total,
            "captured",
            "",
            &format!("cap-{id}"),
        )
        .await;
        sql(
            &d.payments,
            &format!(
                "INSERT INTO transactions VALUES ('t-{id}', '{id}', 'CAPTURE', {total}, 'EUR', 'cap-{id}', 0)"
            ),
        )
        .await;
    }
    ledger(
        &d,
        "refund:o2",
        "refund",
        500,
        "refunded",
        "charge:o2",
        "ref-o2",
    )
    .await;
    sql(
        &d.payments,
        "INSERT INTO transactions VALUES ('t-r2', 'o2', 'REFUND', 500, 'EUR', 'ref-o2', 0)",
    )
    .await;
    d
}

async fn sql(pool: &sqlx::AnyPool, statement: &str) {
    // Test fixtures written here, not input.
    sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn ledger(
    d: &Dbs,
    key: &str,
    kind: &str,
    amount: i64,
    outcome: &str,
    refers_to: &str,
    reference: &str,
) {
    sql(
        &d.provider,
        &format!(
            "INSERT INTO simulator_operations (idempotency_key, kind, amount_minor, currency, outcome, \
             reference, reason, attempts, created_at, refers_to) \
             VALUES ('{key}', '{kind}', {amount}, 'EUR', '{outcome}', '{reference}', '', 1, 0, '{refers_to}')"
        ),
    )
    .await;
}

/// The violations after `breaking` the world, with `told` as what clients were told.
async fn violations<F>(told: &[&str], breaking: F) -> Vec<String>
where
    F: AsyncFnOnce(&Dbs),
{
    let dir = tempfile::tempdir().unwrap();
    let d = world(dir.path()).await;
    breaking(&d).await;
    let told: Vec<String> = told.iter().map(|s| (*s).to_owned()).collect();
    let report = check(&d, &HashMap::new(), &told).await.unwrap();
    d.close().await;
    report.violations
}

fn names(violations: &[String], needle: &str) -> bool {
    violations.iter().any(|v| v.contains(needle))
}

#[tokio::test]
async fn the_settled_world_reconciles() {
    let v = violations(&["o1", "o2"], async |_| {}).await;
    assert!(v.is_empty(), "{v:?}");
}

#[tokio::test]
async fn a_second_charge_under_another_key_is_found() {
    let v = violations(&[], async |d| {
        ledger(
            d,
            "charge-o1-again",
            "charge",
            1_000,
            "captured",
            "",
            "cap-x",
        )
        .await;
    })
    .await;
    assert!(names(&v, "never uses"), "{v:?}");
    let v = violations(&[], async |d| {
        ledger(
            d,
            "charge:o1:retry",
            "charge",
            1_000,
            "captured",
            "",
            "cap-y",
        )
        .await;
    })
    .await;
    assert!(names(&v, "does not exist"), "{v:?}");
}

#[tokio::test]
async fn a_refund_of_the_wrong_amount_is_found() {
    let v = violations(&[], async |d| {
        sql(
            &d.provider,
            "UPDATE simulator_operations SET amount_minor = 400 WHERE idempotency_key = 'refund:o2'",
        )
        .await;
    })
    .await;
    assert!(names(&v, "does not return its capture"), "{v:?}");
    assert!(names(&v, "the provider holds 100"), "{v:?}");
}

#[tokio::test]
async fn a_confirmed_order_the_provider_never_charged_is_found() {
    let v = violations(&[], async |d| {
        sql(
            &d.provider,
            "DELETE FROM simulator_operations WHERE idempotency_key = 'charge:o1'",
        )
        .await;
    })
    .await;
    assert!(
        names(
            &v,
            "order o1: CONFIRMED with total 1000 EUR, but the provider holds 0"
        ),
        "{v:?}"
    );
    assert!(names(&v, "the payments service recorded"), "{v:?}");
}

#[tokio::test]
async fn an_order_a_client_was_told_of_must_exist_and_settle() {
    let v = violations(&["o1", "o-ghost"], async |_| {}).await;
    assert_eq!(v, ["order o-ghost, as a client was told, does not exist"]);
    let v = violations(&["o1"], async |d| {
        sql(
            &d.orders,
            "UPDATE orders SET status = 'PENDING_PAYMENT' WHERE id = 'o1'",
        )
        .await;
    })
    .await;
    assert!(
        names(&v, "order o1, as a client was told, is PENDING_PAYMENT"),
        "{v:?}"
    );
}

#[tokio::test]
async fn an_order_no_checkout_placed_is_found() {
    let v = violations(&[], async |d| {
        sql(&d.orders, "DELETE FROM checkouts WHERE order_id = 'o1'").await;
    })
    .await;
    assert_eq!(v, ["order o1: no checkout placed it (checkout None)"]);
}
