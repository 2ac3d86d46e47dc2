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

/// A signed-in customer buying through the gateway, keeping what the shop told them.
struct Shopper {
    gw: SocketAddr,
    token: String,
    /// The orders placed (answered 200).
    told: Vec<String>,
    /// The keys of checkouts answered 503: a client retries them once the shop is back.
    unanswered: Vec<String>,
    /// Each purchase's (add, checkout) statuses.
    statuses: Vec<(u16, u16)>,
}

impl Shopper {
    fn new(gw: SocketAddr, email: &str) -> Shopper {
        let (_, token) = customer(gw, email);
        Shopper {
            gw,
            token,
            told: Vec::new(),
            unanswered: Vec::new(),
            statuses: Vec::new(),
        }
    }

    /// One unit of `product`, checked out with `key`; the (add, checkout) statuses.
    fn buy(&mut self, product: &str, key: &str) -> (u16, u16) {
        let (added, status, id) = buy(self.gw, &self.token, product, key);
        if status == 503 {
            self.unanswered.push(key.to_owned());
        }
        self.statuses.push((added, status));
        self.told.extend(id);
        (added, status)
    }

    /// The checkouts answered 503, retried with their keys: each is placed now (200), or finds
    /// its lines already gone with an earlier retry's order (400, the cart is empty).
    fn retry_unanswered(&mut self) {
        for key in std::mem::take(&mut self.unanswered) {
            let r = checkout(self.gw, &self.token, &key);
            let resumed = r.status == 200 || r.status == 400;
            assert!(resumed, "retrying {key}: {} {}", r.status, r.body);
            if r.status == 200 {
                self.told.push(r.json()["id"].as_str().unwrap().to_owned());
            }
        }
    }

    /// The last `n` statuses.
    fn last(&self, n: usize) -> &[(u16, u16)] {
        &self.statuses[self.statuses.len().saturating_sub(n)..]
    }
}

/// Every product id of the demo catalog's first page of 60.
fn catalog_ids(gw: SocketAddr) -> Vec<String> {
    let catalog = http(gw, "GET", "/v1/products?pageSize=60", &[], b"").json();
    let products = catalog["products"].as_array().unwrap().iter();
    products
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Checkouts until one is refused with 503 (a full disk noticed), then five more; returns how
/// many ran before the first refusal. No 5xx but 503, and an add the client was told of is in
/// the cart: its checkout is never a 400 (the only 400 left for a valid request is "the cart
/// is empty").
fn checkouts_until_refused(shopper: &mut Shopper, ids: &[String]) -> usize {
    let t0 = Instant::now();
    let mut i = 0;
    while !shopper.statuses.iter().any(|(a, c)| *a == 503 || *c == 503) {
        let late = t0.elapsed() >= Duration::from_secs(120) || i >= 2_000;
        assert!(
            !late,
            "the full disk was never noticed after {i} checkouts: {:?}",
            shopper.last(5)
        );
        let (added, status) = shopper.buy(&ids[i % ids.len()], &format!("full-{i:04}"));
        assert!(
            !(added == 200 && status == 400),
            "checkout {i}: an accepted add was not in the cart"
        );
        i += 1;
    }
    for (j, product) in ids.iter().take(5).enumerate() {
        shopper.buy(product, &format!("full-more-{j}"));
    }
    let odd: Vec<_> = shopper
        .statuses
        .iter()
        .filter(|(a, c)| [*a, *c].iter().any(|s| *s >= 500 && *s != 503))
        .collect();
    assert!(
        odd.is_empty(),
        "a 5xx other than 503 while the disk was full: {odd:?}"
    );
    i
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_503_and_the_appliance_recovers_by_itself() {
    let fs = Tmpfs::mount(96);
    let d = fs.path();
    let app = Appliance::start_with_env(d, &["--demo"], &[LIMITS]);
    let (gw, admin) = (app.addrs["gateway"], app.admin);
    let products = five_products(app.products).await;
    let mut fay = Shopper::new(gw, "fay@example.com");
    assert_eq!(fay.buy(&products[0], "full-before").1, 200);
    until("ready", Duration::from_secs(30), || readyz(admin).0 == 200);

    // The disk fills. SQLite goes on writing into the space its files already hold (a WAL is
    // reused from its start) until a file must grow: checkouts go on until then, then get 503,
    // never another 5xx; /readyz names the services whose storage refuses writes.
    let filler = fill(d);
    let n = checkouts_until_refused(&mut fay, &catalog_ids(gw));
    until("not ready for storage", Duration::from_secs(30), || {
        let (status, body) = readyz(admin);
        status == 503 && body.contains("storage")
    });
    let (ready, why) = readyz(admin);
    eprintln!(
        "full disk noticed after {n} checkouts; statuses {:?}; /readyz: {ready} {}",
        fay.last(6),
        why.trim()
    );
    let (status, _) = http_get(gw, &format!("/v1/products/{}", products[0]));
    assert_eq!(status, 200, "reads go on");

    // Space comes back: ready again by itself, the retries resume what the full disk stopped,
    // and new checkouts work.
    std::fs::remove_file(&filler).unwrap();
    until("ready again", Duration::from_secs(30), || {
        readyz(admin).0 == 200
    });
    fay.retry_unanswered();
    for i in 0..3 {
        assert_eq!(
            fay.buy(&products[2], &format!("full-after-{i}")).1,
            200,
            "after recovery"
        );
    }
    let files = Urls::sqlite_files(d);
    let dbs = connect(&Urls::of(&files)).await;
    settle_and_reconcile(&dbs, d, &products, &fay.told).await;
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
    let orders_on_pg = ("SHOPVERSE_SERVICES__ORDERS__DATABASE", pg.url.as_str());
    let app = Appliance::start_with_env(d, &["--demo"], &[LIMITS, orders_on_pg]);
    let (gw, admin) = (app.addrs["gateway"], app.admin);
    let products = five_products(app.products).await;
    let mut pia = Shopper::new(gw, "pia@example.com");
    assert_eq!(pia.buy(&products[0], "pg-before").1, 200);
    until("ready", Duration::from_secs(30), || readyz(admin).0 == 200);

    // The orders database refuses connections and its open ones are cut, for 10 s.
    pg.allow_connections(false).await.unwrap();
    let cut = Instant::now();
    for i in 0..5 {
        pia.buy(&products[1], &format!("pg-during-{i}"));
    }
    let refused = pia.last(5).iter().all(|(a, c)| *a == 503 && *c == 503);
    assert!(
        refused,
        "while orders' database refused connections: {:?}",
        pia.last(5)
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
        assert_eq!(
            pia.buy(&products[2], &format!("pg-after-{i}")).1,
            200,
            "after recovery"
        );
    }
    let files = Urls::sqlite_files(d);
    let mut urls = Urls::of(&files);
    urls.orders = &pg.url;
    let dbs = connect(&urls).await;
    settle_and_reconcile(&dbs, d, &products, &pia.told).await;
    dbs.close().await;
    app.stop();
    pg.drop_db().await.unwrap();
}
