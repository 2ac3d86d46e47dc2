//! What each subcommand does. Everything here is wiring and output: the work is in the crates
//! and in the library's [`Appliance`].

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use shopverse::appliance::existing_bus;
use shopverse::config::AppConfig;
use shopverse::{Appliance, Running, demo, services};
use shopverse_kit::{Clock, SystemClock};

/// Where `up` puts each listener: per component, or any port on one address.
#[derive(Default)]
pub struct Listen {
    pub services: Vec<(&'static str, Option<SocketAddr>)>,
    pub admin: Option<SocketAddr>,
    pub gateway: Option<SocketAddr>,
    pub any_ports_on: Option<IpAddr>,
}

/// `shopverse up`: every service and the gateway in this process.
pub async fn up(cfg: AppConfig, demo: bool, listen: Listen) -> anyhow::Result<()> {
    if demo {
        std::fs::create_dir_all(&cfg.data.dir)
            .with_context(|| format!("creating data dir {}", cfg.data.dir.display()))?;
        if demo::catalog_is_empty(&cfg).await? {
            seed(cfg.clone()).await?;
        } else {
            println!("demo: the catalog is not empty; nothing seeded");
        }
    }
    let mut app = Appliance::new(cfg.clone());
    if let Some(ip) = listen.any_ports_on {
        app = app.any_ports(ip);
    }
    for (name, addr) in listen.services {
        if let Some(addr) = addr {
            app = app.listen(name, addr);
        }
    }
    if let Some(a) = listen.admin {
        app = app.admin(a);
    }
    if let Some(g) = listen.gateway {
        app = app.gateway(Some(g));
    }
    run(cfg, app, "appliance", demo).await
}

/// `shopverse serve <service>`: one service in this process.
pub async fn serve(
    cfg: AppConfig,
    service: &str,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let unit = services::named(service).with_context(|| format!("no service {service}"))?;
    let mut app = Appliance::one(cfg.clone(), unit);
    if let Some(l) = listen {
        app = app.listen(service, l);
    }
    if let Some(a) = admin {
        app = app.admin(a);
    }
    run(cfg, app, &format!("{service} service"), false).await
}

/// Starts `app`, places the demo orders if asked, prints the table and the ready line, tells
/// systemd, and runs until a signal or a failure.
async fn run(cfg: AppConfig, app: Appliance, title: &str, demo_orders: bool) -> anyhow::Result<()> {
    let shutdown = shopverse_kit::shutdown::on_signals();
    let running = app.shutdown(shutdown.clone()).start().await?;
    if demo_orders
        && let (Some(u), Some(p), Some(o)) = (
            running.service("users"),
            running.service("products"),
            running.service("orders"),
        )
    {
        match demo::place_orders(u, p, o).await {
            Ok(line) => println!("{line}"),
            Err(e) => tracing::warn!(error = %e, "placing the demo orders failed"),
        }
    }
    if let Some(reloader) = running.reloader() {
        reload_on_sighup(
            cfg.source.clone(),
            reloader,
            shutdown.clone(),
            running.registry(),
        );
    }
    print_table(title, &cfg, &running);
    shopverse_kit::systemd::ready(shutdown, &running.ready_line());
    Ok(running.wait().await?)
}

fn print_table(title: &str, cfg: &AppConfig, running: &Running) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ShopVerse {} — {title}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "  data dir   {}", cfg.data.dir.display());
    let _ = writeln!(out, "  {:<14} {:<22} detail", "component", "address");
    for (name, addr, detail) in running.rows() {
        let _ = writeln!(out, "  {name:<14} {addr:<22} {detail}");
    }
    let _ = writeln!(out, "ready: {}", running.ready_line());
    let _ = out.flush();
}

/// On SIGHUP, reads the configuration again and swaps the gateway's policies; a bad file is
/// reported and the running policies stay. Each reload is counted in
/// `shopverse_config_reloads_total{outcome="applied"|"refused"}`.
fn reload_on_sighup(
    source: Option<PathBuf>,
    reloader: shopverse_gateway::Reloader,
    shutdown: shopverse_kit::CancellationToken,
    registry: &prometheus::Registry,
) {
    let reloads = shopverse_kit::metrics::int_counter_vec(
        registry,
        "shopverse_config_reloads_total",
        "Configuration reloads on SIGHUP, by outcome (applied, refused)",
        &[],
        &["outcome"],
    );
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            match AppConfig::load(source.as_deref()) {
                Ok(cfg) => {
                    let ignored = reloader.reload(cfg.gateway);
                    reloads.with_label_values(&["applied"]).inc();
                    tracing::info!(
                        ?ignored,
                        "SIGHUP: gateway policies reloaded (listed keys need a restart)"
                    );
                }
                Err(e) => {
                    reloads.with_label_values(&["refused"]).inc();
                    tracing::error!(error = %e, "SIGHUP: configuration not reloaded; keeping the running one")
                }
            }
        }
    });
}

/// `shopverse gateway`: the gateway alone, in front of the configured upstreams.
pub async fn gateway(
    cfg: AppConfig,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    take_over: bool,
) -> anyhow::Result<()> {
    let shutdown = shopverse_kit::shutdown::on_signals();
    let registry = shopverse_kit::metrics::new_registry();
    let mut gcfg = cfg.gateway.clone();
    if let Some(l) = listen {
        gcfg.listen = l;
    }
    if gcfg.cache.dir.is_empty() {
        gcfg.cache.dir = cfg.data.dir.join("edge-cache").display().to_string();
    }
    // SIGQUIT: hand the listening sockets to a process started with --upgrade, then leave.
    let handover = shopverse_kit::CancellationToken::new();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut quit = signal(SignalKind::quit())?;
        let h = handover.clone();
        tokio::spawn(async move {
            if quit.recv().await.is_some() {
                tracing::info!("SIGQUIT: handing the listening sockets to the new process");
                h.cancel();
            }
        });
    }
    std::fs::create_dir_all(&cfg.data.dir)
        .with_context(|| format!("creating data dir {}", cfg.data.dir.display()))?;
    let upgrade = shopverse_gateway::Upgrade {
        sock: cfg.data.dir.join("gateway-upgrade.sock"),
        take_over,
        trigger: handover.clone(),
    };
    let admin_wanted = admin.unwrap_or(cfg.admin.listen);
    // Taking over: the old process holds the admin port until it leaves; wait for it.
    let bind = |a: SocketAddr| async move {
        tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("admin: cannot listen on {a}"))
    };
    let mut admin_listener = bind(admin_wanted).await;
    for _ in 0..100 {
        if admin_listener.is_ok() || !take_over {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        admin_listener = bind(admin_wanted).await;
    }
    let admin = admin_listener?;
    let admin_addr = admin.local_addr()?;
    // The bus feeds the edge cache's purges and the live event stream: Kafka (connected
    // lazily), or the embedded log of an appliance on this box when it exists.
    let bus = match cfg.events.backend {
        shopverse::config::EventsBackend::Kafka => {
            Some(shopverse::appliance::open_bus(&cfg, &registry).await?)
        }
        shopverse::config::EventsBackend::Embedded => existing_bus(&cfg).await.ok(),
    };
    if bus.is_none() {
        tracing::warn!(
            "no event bus: the edge cache expires by TTL only and the event stream stays quiet"
        );
    }
    let mut builder = shopverse_gateway::Builder::new(gcfg)
        .registry(&registry)
        .shutdown(shutdown.clone())
        .upgrade(upgrade);
    if let Some(bus) = bus {
        builder = builder.events(bus);
    }
    let running = builder.start().await?;
    reload_on_sighup(
        cfg.source.clone(),
        running.reloader(),
        shutdown.clone(),
        &registry,
    );
    let ready: shopverse_kit::metrics::ReadyCheck = Arc::new(|| Ok(()));
    let purge = Some(shopverse_gateway::purge_handler(running.cache.clone()));
    let admin_task = tokio::spawn(shopverse_kit::metrics::serve_admin(
        admin,
        registry,
        ready,
        vec![(
            "/openapi.json".to_owned(),
            "application/json".to_owned(),
            shopverse_gateway::openapi_json()?.into(),
        )],
        purge,
        shutdown.clone(),
    ));
    println!("ShopVerse {} — gateway", env!("CARGO_PKG_VERSION"));
    let tls = running
        .tls_addr
        .map(|t| format!(" gateway-tls={t}"))
        .unwrap_or_default();
    println!("ready: gateway={}{tls} admin={admin_addr}", running.addr);
    shopverse_kit::systemd::ready(shutdown.clone(), &format!("gateway={}", running.addr));
    running.join().await;
    // Pingora is done (stopped, or handed over): stop the rest too.
    shutdown.cancel();
    let _ = admin_task.await;
    Ok(())
}

/// `shopverse seed`: the demo catalog.
pub async fn seed(cfg: AppConfig) -> anyhow::Result<()> {
    println!(
        "seeding the demo catalog into {} ...",
        demo::catalog_url(&cfg)
    );
    let report = demo::seed(&cfg).await?;
    println!(
        "demo catalog: {} categories and {} products added ({} products in the demo set; existing ones kept)",
        report.categories_created, report.products_created, report.products_total
    );
    Ok(())
}

/// `shopverse seed --products N`: the synthetic catalog, with progress on stderr (a bar on a
/// terminal, a line every 5 s otherwise).
pub async fn seed_products(cfg: AppConfig, total: u64) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if total > 99_999_999 {
        bail!("--products: at most 99999999");
    }
    println!(
        "seeding a synthetic catalog of {total} products into {} ...",
        demo::catalog_url(&cfg)
    );
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = std::time::Instant::now();
    let report = demo::seed_products(&cfg, total, |done, to_do| {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let left = if rate > 0.0 {
            (to_do - done) as f64 / rate
        } else {
            0.0
        };
        let pct = (done * 100).checked_div(to_do).unwrap_or(100);
        let line = format!(
            "{done}/{to_do} products ({pct}%), {rate:.0}/s, {:.0} s left",
            left
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let filled = (pct as usize * 30 / 100).min(30);
            let _ = write!(
                err,
                "\r[{}{}] {line}\x1b[K",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
            let _ = err.flush();
        } else if done == to_do || last_line.elapsed().as_secs() >= 5 {
            let _ = writeln!(err, "{line}");
            last_line = std::time::Instant::now();
        }
    })
    .await?;
    if tty {
        eprintln!();
    }
    println!(
        "synthetic catalog: {} products added to {} there were, in {:.1} s",
        report.created,
        report.existing,
        started.elapsed().as_secs_f64()
    );
    if report.created > 0 {
        println!(
            "no catalog events were sent: a running gateway's cached lists catch up within gateway.cache.ttl_secs, or at once with POST /cache/purge?tag=catalog on its admin port"
        );
    }
    Ok(())
}

pub fn keys_rotate(cfg: AppConfig) -> anyhow::Result<()> {
    let dir = cfg.services.users.keys_dir(&cfg.data.dir);
    let kid = shopverse_users::keys::rotate(&dir, SystemClock.now_ms())?;
    println!("new signing key {kid} in {}", dir.display());
    println!(
        "the previous key stays in the JWKS for {} s so tokens it signed keep working; a running users service switches on its own",
        cfg.services.users.access_ttl_secs + shopverse_users::keys::LEEWAY_SECS
    );
    Ok(())
}

/// Prints the signing keys as a Kubernetes Secret named `name` in `namespace`: the manifest
/// and every key file it lists, as the users service reads them from its keys folder.
pub fn keys_manifest(cfg: AppConfig, namespace: &str, name: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    let dir = cfg.services.users.keys_dir(&cfg.data.dir);
    shopverse_users::keys::KeyStore::open_or_init(&dir, SystemClock.now_ms())?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if file == "keys.json" || file.ends_with(".key") {
            let bytes = std::fs::read(entry.path())
                .with_context(|| format!("reading {}", entry.path().display()))?;
            files.push((file, bytes));
        }
    }
    files.sort();
    let mut out = format!(
        "# The users service's signing keys (shopverse keys manifest). Private: apply it, do not\n\
         # commit it.\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         \x20 labels: {{app.kubernetes.io/part-of: shopverse}}\ntype: Opaque\ndata:\n"
    );
    for (file, bytes) in &files {
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        out.push_str(&format!("  {file}: {b64}\n"));
    }
    print!("{out}");
    eprintln!(
        "{} keys from {}; apply with `kubectl apply -f -`, and again after `shopverse keys rotate`",
        files.len().saturating_sub(1),
        dir.display()
    );
    Ok(())
}

pub async fn admin_create(
    cfg: AppConfig,
    email: &str,
    password_stdin: bool,
    password_env: &str,
) -> anyhow::Result<()> {
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        std::env::var(password_env).with_context(|| {
            format!("no password: set {password_env} or pass --password-stdin (it is never taken as an argument)")
        })?
    };
    let db = shopverse_runtime::open_db::<shopverse_users::UsersService>(
        &cfg.services.users,
        &cfg.data.dir,
    )
    .await?;
    let result = shopverse_users::app::create_admin(&db, &SystemClock, email, &password).await;
    db.close().await;
    match result {
        Ok((user, true)) => println!("created admin {} ({})", user.email, user.id),
        Ok((user, false)) => println!(
            "{} ({}) already existed; it now has the admin role (password unchanged)",
            user.email, user.id
        ),
        Err(e) => bail!("{e}"),
    }
    Ok(())
}

pub fn check_config(files: &[PathBuf]) -> std::process::ExitCode {
    let mut bad = 0;
    for f in files {
        // Files are checked as written: environment overrides are not applied.
        match shopverse_kit::config::load::<AppConfig>(f, std::iter::empty()) {
            Ok(_) => println!("ok      {}", f.display()),
            Err(e) => {
                bad += 1;
                println!("invalid {e}");
            }
        }
    }
    if bad == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("{bad} of {} configuration files are invalid", files.len());
        std::process::ExitCode::FAILURE
    }
}

/// Prints the order's event chain as a timeline from its first event (or as JSON lines).
pub async fn events_trace(cfg: AppConfig, order_id: &str, json: bool) -> anyhow::Result<()> {
    let bus = existing_bus(&cfg).await?;
    let hops = shopverse::chain::of_order(&cfg, bus.as_ref(), order_id).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for h in &hops {
            writeln!(out, "{}", serde_json::to_string(h)?)?;
        }
        return Ok(());
    }
    let (Some(first), Some(last)) = (hops.first(), hops.last()) else {
        bail!(
            "no event about order {order_id} on the bus (is it an order id, and the data dir or --config the system's?)"
        );
    };
    let t0 = first.raised_ms;
    writeln!(
        out,
        "order {order_id}: {} events, {} to {} in {} ms",
        hops.len(),
        first.event_type,
        last.event_type,
        last.raised_ms - t0
    )?;
    for h in &hops {
        writeln!(
            out,
            "  +{:<7} {:<20} on {:<18} published +{} ms",
            format!("{} ms", h.raised_ms - t0),
            h.event_type,
            h.topic,
            h.published_ms - t0
        )?;
        let handled: Vec<String> = h
            .handled
            .iter()
            .map(|(who, at)| format!("{who} +{} ms", at - t0))
            .collect();
        let handled = match handled.is_empty() {
            true => "not handled yet".to_owned(),
            false => format!("handled by {}", handled.join(", ")),
        };
        writeln!(out, "  {:<9}{handled}", "")?;
    }
    if let Some(trace) = first.traceparent.get(3..35) {
        writeln!(
            out,
            "trace id {trace} (in a tracing backend, when [telemetry] otlp_endpoint is set)"
        )?;
    }
    Ok(())
}

pub async fn dlq_list(cfg: AppConfig, topic: Option<&str>, json: bool) -> anyhow::Result<()> {
    let bus = existing_bus(&cfg).await?;
    let parked = shopverse_events::dlq::list(bus.as_ref(), topic).await?;
    let mut out = std::io::stdout().lock();
    if json {
        for d in &parked {
            writeln!(out, "{}", serde_json::to_string(d)?)?;
        }
        return Ok(());
    }
    if parked.is_empty() {
        writeln!(out, "no dead-lettered events")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<22} {:<9} {:<38} {:<20} {:<14} {:<8} reason",
        "topic", "position", "event id", "type", "consumer", "status"
    )?;
    for d in &parked {
        writeln!(
            out,
            "{:<22} {:<9} {:<38} {:<20} {:<14} {:<8} {}",
            d.dlq_topic,
            format!("{}/{}", d.partition, d.offset),
            d.event_id,
            d.event_type,
            d.consumer,
            if d.replayed { "replayed" } else { "parked" },
            d.reason
        )?;
    }
    let waiting = parked.iter().filter(|d| !d.replayed).count();
    writeln!(out, "{} parked, {waiting} not yet replayed", parked.len())?;
    Ok(())
}

pub async fn dlq_replay(
    cfg: AppConfig,
    topic: Option<&str>,
    event: Option<&str>,
) -> anyhow::Result<()> {
    let bus = existing_bus(&cfg).await?;
    let replayed = shopverse_events::dlq::replay(bus.as_ref(), topic, event).await?;
    if let (Some(id), true) = (event, replayed.is_empty()) {
        bail!("no dead-lettered event with id {id}");
    }
    for d in &replayed {
        println!(
            "replayed {} ({}) to {}",
            d.event_id, d.event_type, d.original_topic
        );
    }
    println!("{} events replayed", replayed.len());
    Ok(())
}
