//! `shopverse-checkout`: scenario 5 of the benchmarks, the checkout mix through the gateway,
//! driven by goose, and the reconciliation check after it.
//!
//! - `run`: signs in an administrator, gives every product `--stock` units, registers and signs
//!   in one shopper per goose user (before the timed run, and timed on its own: sign-up hashes
//!   passwords on purpose slowly, and is not part of the mix), then runs goose users that each
//!   take one shopper's token and browse (weight 7: the catalog list or one product), add to the
//!   cart (2) or check out (1: with an item added first if the cart is empty). Writes one JSON
//!   report, with the ids of the orders the checkouts were told were placed.
//! - `reconcile`: once nothing is in flight, checks the databases of the appliance against each
//!   other, against the payment provider's ledger and against those told ids (the saga's
//!   reconciliation, `shopverse_reconcile`): every told order exists and settled, the provider
//!   holds exactly each order's total if confirmed and nothing if cancelled, no unit of stock is
//!   lost or made up, one `order.placed` notice per order. Writes one JSON report and fails when
//!   the check does not hold.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use goose::config::GooseConfiguration;
use goose::goose::GooseResponse;
use goose::prelude::*;
use shopverse_reconcile::Dbs;

#[derive(Parser)]
#[command(
    name = "shopverse-checkout",
    about = "The checkout mix (goose) and the reconciliation"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Run {
        /// The gateway, `http://host:port`.
        #[arg(long)]
        host: String,
        /// An administrator's email and password (to set the stock).
        #[arg(long)]
        admin_email: String,
        #[arg(long, env = "SHOPVERSE_ADMIN_PASSWORD")]
        admin_password: String,
        /// Units of stock every product gets before the run.
        #[arg(long, default_value_t = 1_000_000)]
        stock: i64,
        /// Concurrent goose users.
        #[arg(long, default_value_t = 64)]
        users: usize,
        /// Seconds of load, after every user has started.
        #[arg(long, default_value_t = 30)]
        seconds: usize,
        /// The appliance's data directory: after the stock is set, each product's baseline (its
        /// stock plus what earlier orders already committed) goes into the report for
        /// `reconcile`.
        #[arg(long)]
        data_dir: PathBuf,
        /// Where the JSON report goes.
        #[arg(long)]
        report: PathBuf,
        /// `key=value` copied into the report; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// How checkouts pay, by the simulator's payment methods in percent: `ok` succeeds,
        /// `flaky` fails transiently twice then succeeds, `declined` is refused.
        #[arg(long, default_value = "ok=100", value_parser = parse_mix)]
        payment_mix: PaymentMix,
    },
    Reconcile {
        /// The appliance's data directory (its SQLite databases).
        #[arg(long)]
        data_dir: PathBuf,
        /// The report of `run`, with each product's baseline.
        #[arg(long)]
        baseline_from: PathBuf,
        /// How long to wait for what is in flight to settle.
        #[arg(long, default_value_t = 120)]
        within_secs: u64,
        #[arg(long)]
        report: PathBuf,
    },
}

/// Payment methods and their share of checkouts, in percent (summing to 100).
#[derive(Clone, Debug)]
struct PaymentMix(Vec<(&'static str, u32)>);

impl std::fmt::Display for PaymentMix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(token, pct)| format!("{}={pct}", token.trim_start_matches("pm_card_")))
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl PaymentMix {
    /// The payment method of checkout number `n`: spread evenly, each share exact per 100.
    fn pick(&self, n: u64) -> &'static str {
        // 37 is coprime with 100: n -> 37n mod 100 visits every slot once per 100 checkouts.
        let mut slot = u32::try_from((n % 100) * 37 % 100).unwrap_or(0);
        for (token, pct) in &self.0 {
            if slot < *pct {
                return token;
            }
            slot -= pct;
        }
        "pm_card_ok"
    }
}

fn parse_mix(s: &str) -> Result<PaymentMix, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (name, pct) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected method=percent"))?;
        let token = match name.trim() {
            "ok" => "pm_card_ok",
            "flaky" => "pm_card_flaky",
            "declined" => "pm_card_declined",
            other => {
                return Err(format!(
                    "unknown payment method `{other}` (ok, flaky, declined)"
                ));
            }
        };
        let pct: u32 = pct
            .trim()
            .parse()
            .map_err(|_| format!("`{pct}`: a whole percent"))?;
        out.push((token, pct));
    }
    let total: u32 = out.iter().map(|(_, p)| p).sum();
    if total != 100 {
        return Err(format!("the shares add up to {total}, not 100"));
    }
    Ok(PaymentMix(out))
}

/// How checkouts pay (`--payment-mix`).
static MIX: OnceLock<PaymentMix> = OnceLock::new();
/// Checkouts made so far, for the payment mix.
static CHECKOUTS: AtomicU64 = AtomicU64::new(0);

/// Product ids of the catalog, shared by every user.
static PRODUCTS: OnceLock<Vec<String>> = OnceLock::new();
static NEXT: AtomicU64 = AtomicU64::new(0);
/// A run id, so repeated runs on one appliance make new customers and new idempotency keys.
static RUN: OnceLock<u64> = OnceLock::new();
/// The shoppers' bearer tokens, one per goose user.
static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
/// The ids of the orders checkouts were told were placed.
static TOLD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

#[derive(Clone)]
struct Shopper {
    auth: String,
    cart_items: u32,
    n: u64,
}

fn pick(n: u64) -> &'static str {
    let products = PRODUCTS.get().map(Vec::as_slice).unwrap_or_default();
    if products.is_empty() {
        return "";
    }
    &products[(n as usize * 7919) % products.len()]
}

/// Takes the next signed-in shopper's token (see [`sign_up`]).
async fn sign_in(user: &mut GooseUser) -> TransactionResult {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tokens = TOKENS.get().map(Vec::as_slice).unwrap_or_default();
    let token = tokens
        .get(usize::try_from(n).unwrap_or(usize::MAX) % tokens.len().max(1))
        .cloned()
        .unwrap_or_default();
    user.set_session_data(Shopper {
        auth: format!("Bearer {token}"),
        cart_items: 0,
        n: n * 1_000_003,
    });
    Ok(())
}

async fn browse(user: &mut GooseUser) -> TransactionResult {
    let n = next(user);
    if n.is_multiple_of(2) {
        let req = GooseRequest::builder()
            .path("/v1/products?pageSize=20")
            .name("browse: list")
            .build();
        user.request(req).await?;
    } else {
        let path = format!("/v1/products/{}", pick(n));
        let req = GooseRequest::builder()
            .path(path.as_str())
            .name("browse: product")
            .build();
        user.request(req).await?;
    }
    Ok(())
}

fn next(user: &mut GooseUser) -> u64 {
    match user.get_session_data_mut::<Shopper>() {
        Some(s) => {
            s.n += 1;
            s.n
        }
        None => 0,
    }
}

/// POSTs `body` as JSON with the shopper's token, recorded under `name`.
async fn post_signed_in(
    user: &mut GooseUser,
    path: &str,
    name: &str,
    body: &serde_json::Value,
) -> Result<GooseResponse, Box<TransactionError>> {
    let auth = user
        .get_session_data::<Shopper>()
        .map(|s| s.auth.clone())
        .unwrap_or_default();
    let rb = user
        .get_request_builder(&GooseMethod::Post, path)?
        .header("authorization", auth)
        .json(body);
    let req = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path(path)
        .name(name)
        .set_request_builder(rb)
        .build();
    user.request(req).await
}

async fn add_to_cart(user: &mut GooseUser) -> TransactionResult {
    let n = next(user);
    let body = serde_json::json!({"productId": pick(n), "quantity": 1});
    let r = post_signed_in(user, "/v1/cart/items", "cart: add", &body).await?;
    if r.response.as_ref().is_ok_and(|r| r.status().is_success())
        && let Some(s) = user.get_session_data_mut::<Shopper>()
    {
        s.cart_items += 1;
    }
    Ok(())
}

async fn checkout(user: &mut GooseUser) -> TransactionResult {
    if user
        .get_session_data::<Shopper>()
        .is_some_and(|s| s.cart_items == 0)
    {
        add_to_cart(user).await?;
    }
    let n = next(user);
    let run = RUN.get().copied().unwrap_or(0);
    let body = serde_json::json!({
        "idempotencyKey": format!("bench-{run}-{n}"),
        "paymentMethodToken": MIX.get().map_or("pm_card_ok", |m| m.pick(CHECKOUTS.fetch_add(1, Ordering::Relaxed))),
        "shippingAddress": {"recipient": "Bench Shopper", "line1": "1 Main St", "city": "Berlin",
                            "postalCode": "10115", "country": "DE"},
    });
    let r = post_signed_in(user, "/v1/checkout", "checkout", &body).await?;
    // What the client was told: the reconciliation checks each of these orders exists and
    // settled.
    if let Ok(resp) = r.response
        && resp.status().is_success()
        && let Ok(order) = resp.json::<serde_json::Value>().await
        && let Some(id) = order["id"].as_str()
        && let Ok(mut told) = TOLD.lock()
    {
        told.push(id.to_owned());
    }
    if let Some(s) = user.get_session_data_mut::<Shopper>() {
        s.cart_items = 0;
    }
    Ok(())
}

/// Signs `email` in; the bearer token.
async fn sign_in_token(
    http: &reqwest::Client,
    host: &str,
    email: &str,
    password: &str,
) -> Result<String> {
    let login: serde_json::Value = http
        .post(format!("{host}/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("signing {email} in"))?
        .json()
        .await?;
    login["accessToken"]
        .as_str()
        .map(str::to_owned)
        .context("no accessToken in the sign-in answer")
}

/// Signs the administrator in, lists the catalog and sets every product's stock.
async fn prepare(host: &str, email: &str, password: &str, stock: i64) -> Result<Vec<String>> {
    let http = reqwest::Client::new();
    let token = sign_in_token(&http, host, email, password).await?;
    let token = token.as_str();
    let mut ids = Vec::new();
    let mut page = String::new();
    loop {
        let list: serde_json::Value = http
            .get(format!("{host}/v1/products?pageSize=100&pageToken={page}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        for p in list["products"].as_array().into_iter().flatten() {
            if let Some(id) = p["id"].as_str() {
                ids.push(id.to_owned());
            }
        }
        match list["nextPageToken"].as_str() {
            Some(t) if !t.is_empty() => page = t.to_owned(),
            _ => break,
        }
    }
    if ids.is_empty() {
        bail!("the catalog is empty: start the appliance with --demo");
    }
    for id in &ids {
        http.put(format!("{host}/v1/products/{id}/stock"))
            .bearer_auth(token)
            .json(&serde_json::json!({"available": stock}))
            .send()
            .await?
            .error_for_status()
            .with_context(|| format!("setting the stock of {id}"))?;
    }
    Ok(ids)
}

/// Registers and signs in `n` shoppers, 4 at a time; their tokens, and how long it took.
async fn sign_up(host: &str, run: u64, n: usize) -> Result<(Vec<String>, Duration)> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut tokens = Vec::with_capacity(n);
    let mut done = 0;
    while done < n {
        let batch: Vec<_> = (done..n.min(done + 4))
            .map(|i| {
                let http = http.clone();
                let host = host.to_owned();
                async move {
                    let email = format!("shopper-{run}-{i}@bench.example");
                    let password = "bench-password-123";
                    http.post(format!("{host}/v1/auth/register"))
                        .json(&serde_json::json!({"email": email, "password": password, "displayName": "Shopper"}))
                        .send()
                        .await?
                        .error_for_status()
                        .with_context(|| format!("registering {email}"))?;
                    sign_in_token(&http, &host, &email, password).await
                }
            })
            .collect();
        for t in futures::future::join_all(batch).await {
            tokens.push(t?);
        }
        done = tokens.len();
    }
    Ok((tokens, started.elapsed()))
}

struct RunArgs {
    host: String,
    admin: (String, String),
    stock: i64,
    users: usize,
    seconds: usize,
    data_dir: PathBuf,
    report: PathBuf,
    tags: Vec<String>,
    payment_mix: PaymentMix,
}

/// The appliance's databases, read-only.
async fn open_dbs(data_dir: &std::path::Path) -> Result<Dbs> {
    let url = |name: &str| {
        format!(
            "sqlite://{}?mode=ro",
            data_dir.join(format!("{name}.db")).display()
        )
    };
    let urls = [
        url("orders"),
        url("products"),
        url("payments"),
        url("notifications"),
        url("payment-simulator"),
    ];
    Dbs::open(&shopverse_reconcile::Urls::of(&urls), 1)
        .await
        .with_context(|| format!("opening the databases in {}", data_dir.display()))
}

async fn run(a: RunArgs) -> Result<()> {
    let RunArgs {
        host,
        admin,
        stock,
        users,
        seconds,
        data_dir,
        report,
        tags,
        payment_mix,
    } = a;
    let mix_text = payment_mix.to_string();
    let _ = MIX.set(payment_mix);
    let ids = prepare(&host, &admin.0, &admin.1, stock).await?;
    // What every product must add up to afterwards: its stock now plus what was committed
    // before (the demo orders), since available + committed stays constant.
    let dbs = open_dbs(&data_dir).await?;
    let mut baseline = serde_json::Map::new();
    for id in &ids {
        baseline.insert(
            id.clone(),
            (stock + shopverse_reconcile::committed(&dbs.products, id).await?).into(),
        );
    }
    eprintln!(
        "{} products, {stock} units each; {users} users for {seconds} s",
        ids.len()
    );
    let _ = PRODUCTS.set(ids);
    let _ = RUN.set(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    let (tokens, sign_up_time) = sign_up(&host, RUN.get().copied().unwrap_or(0), users).await?;
    eprintln!(
        "{users} shoppers signed up and in, in {:.1} s (not part of the timed run)",
        sign_up_time.as_secs_f64()
    );
    let _ = TOKENS.set(tokens);
    let config = GooseConfiguration::parse_args_default(&[
        "--host".to_owned(),
        host,
        "--users".into(),
        users.to_string(),
        "--increase-rate".into(),
        users.to_string(),
        "--run-time".into(),
        format!("{seconds}s"),
        "--quiet".into(),
        "--no-error-summary".into(),
        "--running-metrics".into(),
        "10".into(),
    ])
    .context("goose's configuration")?;
    let started = Instant::now();
    let metrics = GooseAttack::initialize_with_config(config)?
        .register_scenario(
            scenario!("Shopper")
                .register_transaction(transaction!(sign_in).set_on_start())
                .register_transaction(transaction!(browse).set_weight(7)?)
                .register_transaction(transaction!(add_to_cart).set_weight(2)?)
                .register_transaction(transaction!(checkout).set_weight(1)?),
        )
        .execute()
        .await?;
    let secs = (metrics.duration as f64).max(1.0);
    let mut requests = 0usize;
    let mut errors = 0usize;
    let mut by = serde_json::Map::new();
    for (name, m) in &metrics.requests {
        requests += m.success_count + m.fail_count;
        errors += m.fail_count;
        by.insert(
            name.clone(),
            serde_json::json!({
                "ok": m.success_count, "failed": m.fail_count,
                "p50_ms": m.raw_data.percentile_us(0.5) as f64 / 1e3,
                "p99_ms": m.raw_data.percentile_us(0.99) as f64 / 1e3,
                "statuses": m.status_code_counts,
            }),
        );
    }
    let co = metrics
        .requests
        .iter()
        .find(|(k, _)| k.contains("checkout"))
        .map(|(_, m)| m);
    let orders = co.map(|m| m.success_count).unwrap_or(0);
    let mut out = serde_json::json!({
        "users": users,
        "sign_up_seconds": sign_up_time.as_secs_f64(),
        "seconds": secs,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "requests": requests,
        "requests_per_second": requests as f64 / secs,
        "errors": errors,
        "error_rate": if requests > 0 { errors as f64 / requests as f64 } else { 0.0 },
        "orders": orders,
        "orders_per_second": orders as f64 / secs,
        "checkout_p50_ms": co.map(|m| m.raw_data.percentile_us(0.5) as f64 / 1e3).unwrap_or(0.0),
        "checkout_p99_ms": co.map(|m| m.raw_data.percentile_us(0.99) as f64 / 1e3).unwrap_or(0.0),
        "payment_mix": mix_text,
        "by_request": by,
        "baseline": baseline,
        "told": TOLD.lock().map(|t| t.clone()).unwrap_or_default(),
    });
    for tag in &tags {
        let (k, v) = tag
            .split_once('=')
            .with_context(|| format!("--tag `{tag}`: expected key=value"))?;
        out[k] = serde_json::Value::String(v.to_owned());
    }
    std::fs::write(&report, serde_json::to_vec_pretty(&out)?)?;
    eprintln!(
        "{requests} requests ({:.0}/s), {errors} errors, {orders} orders ({:.1}/s)",
        requests as f64 / secs,
        orders as f64 / secs
    );
    Ok(())
}

async fn reconcile(
    data_dir: PathBuf,
    baseline_from: PathBuf,
    within: Duration,
    report: PathBuf,
) -> Result<bool> {
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&baseline_from)
            .with_context(|| format!("reading {}", baseline_from.display()))?,
    )?;
    let baseline: HashMap<String, i64> = run["baseline"]
        .as_object()
        .with_context(|| {
            format!(
                "{}: no baseline (a report of `run`?)",
                baseline_from.display()
            )
        })?
        .iter()
        .map(|(k, v)| {
            v.as_i64()
                .map(|n| (k.clone(), n))
                .with_context(|| format!("baseline of {k}: {v} is not a whole number"))
        })
        .collect::<Result<_>>()?;
    let d = open_dbs(&data_dir).await?;
    let t0 = Instant::now();
    let pending = shopverse_reconcile::settle(&d, within).await?;
    // How long the saga ran on after the load stopped: the backlog the run left behind.
    let settle_seconds = t0.elapsed().as_secs_f64();
    let told: Vec<String> = run["told"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut found = shopverse_reconcile::check(&d, &baseline, &told).await?;
    let mut bad = std::mem::take(&mut found.violations);
    if pending > 0 {
        bad.insert(
            0,
            format!("{pending} things still in flight after {within:?}"),
        );
    }
    let ok = bad.is_empty();
    let summary = format!(
        "{} orders ({} confirmed, {} cancelled), {} products checked, settled in {:.1} s; {} violations",
        found.orders,
        found.confirmed,
        found.cancelled,
        found.products,
        settle_seconds,
        bad.len()
    );
    eprintln!("reconciliation: {summary}");
    for v in bad.iter().take(20) {
        eprintln!("  {v}");
    }
    let counts = serde_json::json!({"orders": found.orders, "confirmed": found.confirmed,
        "cancelled": found.cancelled, "abandoned_checkouts": found.abandoned_checkouts,
        "products": found.products, "told": told.len(),
        "provider_captures": found.captures, "provider_refunds": found.refunds});
    let out = serde_json::json!({"ok": ok, "summary": summary, "counts": counts,
                                 "settle_seconds": settle_seconds,
                                 "violations": bad.iter().take(100).collect::<Vec<_>>()});
    std::fs::write(&report, serde_json::to_vec_pretty(&out)?)?;
    Ok(ok)
}

fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Run {
                host,
                admin_email,
                admin_password,
                stock,
                users,
                seconds,
                data_dir,
                report,
                tags,
                payment_mix,
            } => {
                run(RunArgs {
                    host,
                    admin: (admin_email, admin_password),
                    stock,
                    users,
                    seconds,
                    data_dir,
                    report,
                    tags,
                    payment_mix,
                })
                .await?;
                Ok(std::process::ExitCode::SUCCESS)
            }
            Cmd::Reconcile {
                data_dir,
                baseline_from,
                within_secs,
                report,
            } => {
                let ok = reconcile(
                    data_dir,
                    baseline_from,
                    Duration::from_secs(within_secs),
                    report,
                )
                .await?;
                Ok(if ok {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                })
            }
        }
    })
}
