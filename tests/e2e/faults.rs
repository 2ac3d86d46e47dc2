//! Storage that stops taking writes under a running appliance: the data directory on a small
//! tmpfs that fills up, and a PostgreSQL database that refuses connections for 10 s. Clients
//! get 503, never 500 and never an order that does not exist; `/readyz` names the failing
//! service; once storage is back the appliance recovers by itself and the strict reconciliation
//! holds.
//!
//! The test mounts its own tmpfs (as root, which the CI machine is); a machine where it cannot
//! fails the test rather than skipping it.

#![allow(clippy::unwrap_used)] // a test that unwraps an error it expects is the test

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::saga::*;
use crate::common::*;

/// A tmpfs of `mb` megabytes mounted on a fresh folder; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mb: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the filesystem of `dir` until a write fails; the filler file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in [1 << 20, 4096, 512] {
        let buf = vec![0u8; chunk];
        while f.write_all(&buf).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

fn readyz(admin: SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz")
}

/// Adds one unit of `product` to the cart and checks out; the two statuses and the order id.
fn buy(gw: SocketAddr, token: &str, product: &str, key: &str) -> (u16, u16, Option<String>) {
    let auth = [("authorization", token)];
    let add = format!(r#"{{"productId":"{product}","quantity":1}}"#);
    let added = http(gw, "POST", "/v1/cart/items", &auth, add.as_bytes()).status;
    let r = checkout(gw, token, key);
    let id = (r.status == 200).then(|| r.json()["id"].as_str().unwrap().to_owned());
    (added, r.status, id)
}

/// Checks the cart out with idempotency key `key`.
fn checkout(gw: SocketAddr, token: &str, key: &str) -> HttpResponse {
    let body = format!(
        r#"{{"idempotencyKey":"{key}","paymentMethodToken":"pm_card_ok",
            "shippingAddress":{{"recipient":"F","line1":"1 Main St","city":"Berlin","postalCode":"10115","country":"DE"}}}}"#
    );
    http(
        gw,
        "POST",
        "/v1/checkout",
        &[("authorization", token)],
        body.as_bytes(),
    )
}

/// Rate limits high enough that every request of these tests reaches the services.
const LIMITS: (&str, &str) = (
    "SHOPVERSE_GATEWAY__RATE_LIMITS",
    r#"[{name = "default", requests = 100000, per_secs = 1, burst = 100000, by = "user"}]"#,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_and_the_appliance_recovers_by_itself() {
    let fs = Tmpfs::mount(96);
    let d = fs.path();
    let app = Appliance::start_with_env(d, &["--demo"], &[LIMITS]);
    let (gw, admin) = (app.addrs["gateway"], app.admin);
    let products = five_products(app.products).await;
    let (_, token) = customer(gw, "fay@example.com");
    let mut told = Vec::new();
    let (_, status, id) = buy(gw, &token, &products[0], "full-before");
    assert_eq!(status, 200);
    told.extend(id);
    until("ready", Duration::from_secs(30), || readyz(admin).0 == 200);

    // The disk fills. SQLite goes on writing into the space its files already hold (a WAL is
    // reused from its start) until a file must grow: checkouts go on until then, then get 503,
    // never another 5xx; /readyz names the services whose storage refuses writes.
    let filler = fill(d);
    let catalog = http(gw, "GET", "/v1/products?pageSize=60", &[], b"").json();
    let ids: Vec<String> = catalog["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    let mut statuses = Vec::new();
    // Checkouts answered 503: a client retries them with the same key once the shop is back.
    let mut unanswered = Vec::new();
    let t0 = Instant::now();
    let mut i = 0;
    while !statuses.iter().any(|(a, c)| *a == 503 || *c == 503) {
        assert!(
            t0.elapsed() < Duration::from_secs(120) && i < 2_000,
            "the full disk was never noticed after {i} checkouts: {:?}",
            &statuses[statuses.len().saturating_sub(5)..]
        );
        let key = format!("full-{i:04}");
        let (added, status, id) = buy(gw, &token, &ids[i % ids.len()], &key);
        if status == 503 {
            unanswered.push(key);
        }
        // An add the client was told of is in the cart: its checkout is never a 400 (the only
        // 400 left for a valid request is "the cart is empty").
        assert!(
            !(added == 200 && status == 400),
            "checkout {i}: an accepted add was not in the cart"
        );
        statuses.push((added, status));
        told.extend(id);
        i += 1;
    }
    for (i, product) in ids.iter().take(5).enumerate() {
        let key = format!("full-more-{i}");
        let (added, status, id) = buy(gw, &token, product, &key);
        if status == 503 {
            unanswered.push(key);
        }
        statuses.push((added, status));
        told.extend(id);
    }
    let odd: Vec<_> = statuses
        .iter()
        .filter(|(a, c)| [*a, *c].iter().any(|s| *s >= 500 && *s != 503))
        .collect();
    assert!(
        odd.is_empty(),
        "a 5xx other than 503 while the disk was full: {odd:?}"
    );
    until("not ready for storage", Duration::from_secs(30), || {
        let (status, body) = readyz(admin);
        status == 503 && body.contains("storage")
    });
    eprintln!(
        "full disk noticed after {i} checkouts; statuses {:?}; /readyz: {}",
        &statuses[statuses.len().saturating_sub(6)..],
        readyz(admin).1.trim()
    );
    let (status, _) = http_get(gw, &format!("/v1/products/{}", products[0]));
    assert_eq!(status, 200, "reads go on");

    // Space comes back: ready again by itself, and checkouts work.
    std::fs::remove_file(&filler).unwrap();
    until("ready again", Duration::from_secs(30), || {
        readyz(admin).0 == 200
    });
    // The retries resume what the full disk stopped: each is placed now (200), or finds its
    // lines already gone with an earlier retry's order (400, the cart is empty).
    for key in &unanswered {
        let r = checkout(gw, &token, key);
        assert!(
            r.status == 200 || r.status == 400,
            "retrying {key}: {} {}",
            r.status,
            r.body
        );
        if r.status == 200 {
            told.push(r.json()["id"].as_str().unwrap().to_owned());
        }
    }
    let mut after = Vec::new();
    for i in 0..3 {
        let (_, status, id) = buy(gw, &token, &products[2], &format!("full-after-{i}"));
        after.push(status);
        told.extend(id);
    }
    assert!(after.iter().all(|s| *s == 200), "after recovery: {after:?}");

    let files = Urls::sqlite_files(d);
    let dbs = connect(&Urls::of(&files)).await;
    settle_and_reconcile(&dbs, d, &products, &told).await;
    dbs.close().await;
    app.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_connections_is_503_and_the_appliance_recovers_by_itself() {
    let pg = shopverse_kit::testing::PgTestDb::create()
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = Appliance::start_with_env(
        d,
        &["--demo"],
        &[LIMITS, ("SHOPVERSE_SERVICES__ORDERS__DATABASE", &pg.url)],
    );
    let (gw, admin) = (app.addrs["gateway"], app.admin);
    let products = five_products(app.products).await;
    let (_, token) = customer(gw, "pia@example.com");
    let mut told = Vec::new();
    let (_, status, id) = buy(gw, &token, &products[0], "pg-before");
    assert_eq!(status, 200);
    told.extend(id);
    until("ready", Duration::from_secs(30), || readyz(admin).0 == 200);

    // The orders database refuses connections and its open ones are cut, for 10 s.
    pg.allow_connections(false).await.unwrap();
    let cut = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (added, status, id) = buy(gw, &token, &products[1], &format!("pg-during-{i}"));
        statuses.push((added, status));
        told.extend(id);
    }
    assert!(
        statuses.iter().all(|(a, c)| *a == 503 && *c == 503),
        "while orders' database refused connections: {statuses:?}"
    );
    until(
        "not ready for orders' storage",
        Duration::from_secs(10),
        || {
            let (status, body) = readyz(admin);
            status == 503 && body.contains("orders storage")
        },
    );
    let (status, _) = http_get(gw, &format!("/v1/products/{}", products[0]));
    assert_eq!(status, 200, "the other services go on");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    pg.allow_connections(true).await.unwrap();

    until("ready again", Duration::from_secs(30), || {
        readyz(admin).0 == 200
    });
    for i in 0..3 {
        let (_, status, id) = buy(gw, &token, &products[2], &format!("pg-after-{i}"));
        assert_eq!(status, 200, "after recovery");
        told.extend(id);
    }
    let files = Urls::sqlite_files(d);
    let mut urls = Urls::of(&files);
    urls.orders = &pg.url;
    let dbs = connect(&urls).await;
    settle_and_reconcile(&dbs, d, &products, &told).await;
    dbs.close().await;
    app.stop();
    pg.drop_db().await.unwrap();
}
