//! `shopverse`: the one command-line entry point. It parses arguments, loads the configuration,
//! starts telemetry and calls into the service libraries; the work itself lives in the crates.

#![forbid(unsafe_code)]

mod backup;
mod commands;

use shopverse::config;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shopverse",
    version,
    about = "ShopVerse: an e-commerce backend (users, products, events) you can run as one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone, Default)]
struct Common {
    /// Configuration file (TOML; see configs/). Without one, built-in defaults apply.
    /// `SHOPVERSE_<SECTION>__<KEY>` environment variables override either.
    #[arg(long, short = 'c', env = "SHOPVERSE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (databases, event log, keys); overrides `data.dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in one process (the appliance), printing where each listens.
    Up(Box<UpArgs>),
    /// Run one service.
    Serve(ServeArgs),
    /// Run the API gateway alone, in front of the upstreams in its configuration.
    Gateway {
        #[command(flatten)]
        common: Common,
        /// HTTP listen address; overrides `gateway.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Admin HTTP address (/metrics, /healthz, /readyz).
        #[arg(long)]
        admin_addr: Option<SocketAddr>,
        /// Take over the listening sockets of a running gateway (then send it SIGQUIT): a
        /// binary upgrade that refuses no connection.
        #[arg(long)]
        upgrade: bool,
    },
    /// Add the demo catalog (idempotent: only what is missing is added); with --orders, also a
    /// demo customer with a few orders, placed through the running services.
    Seed(SeedArgs),
    /// Manage the token signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage administrators.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Validate configuration files; prints each file's verdict and fails if any is bad.
    CheckConfig {
        /// The files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Take a consistent backup of every database and the signing keys, while ShopVerse runs.
    Backup {
        #[command(flatten)]
        common: Common,
        /// A new (or empty) folder for the backup.
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a backup into the data directory (ShopVerse must be stopped).
    Restore {
        #[command(flatten)]
        common: Common,
        /// The backup folder.
        #[arg(long)]
        from: PathBuf,
    },
    /// Inspect the event bus.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    common: Common,
    /// Seed the demo catalog if the catalog is empty.
    #[arg(long)]
    demo: bool,
    /// Users service gRPC address (port 0: any free port).
    #[arg(long)]
    users_addr: Option<SocketAddr>,
    /// Products service gRPC address.
    #[arg(long)]
    products_addr: Option<SocketAddr>,
    /// Orders service gRPC address.
    #[arg(long)]
    orders_addr: Option<SocketAddr>,
    /// Payments service gRPC address.
    #[arg(long)]
    payments_addr: Option<SocketAddr>,
    /// Notifications service gRPC address.
    #[arg(long)]
    notifications_addr: Option<SocketAddr>,
    /// Delivery service gRPC address.
    #[arg(long)]
    delivery_addr: Option<SocketAddr>,
    /// The gateway's HTTP address (clients talk to this).
    #[arg(long)]
    gateway_addr: Option<SocketAddr>,
    /// Every listener on this host, each on a free port (e.g. 127.0.0.1).
    #[arg(long, conflicts_with_all = ["users_addr", "products_addr", "orders_addr", "payments_addr", "notifications_addr", "delivery_addr", "admin_addr", "gateway_addr"])]
    any_ports_on: Option<std::net::IpAddr>,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: Common,
    /// Which service.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(shopverse::services::names()))]
    service: String,
    /// gRPC listen address; overrides the configured one.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long)]
    admin_addr: Option<SocketAddr>,
}

#[derive(Args)]
struct SeedArgs {
    #[command(flatten)]
    common: Common,
    /// Also place demo orders through the running system (its services at their configured
    /// addresses, or the ones given below).
    #[arg(long)]
    orders: bool,
    #[arg(long, requires = "orders")]
    users_addr: Option<SocketAddr>,
    #[arg(long, requires = "orders")]
    products_addr: Option<SocketAddr>,
    #[arg(long, requires = "orders")]
    orders_addr: Option<SocketAddr>,
    /// Instead of the demo catalog, make sure a synthetic catalog of N products exists (32
    /// categories; run again with a larger N to add more). For measuring at scale.
    #[arg(long, value_name = "N", conflicts_with = "orders")]
    products: Option<u64>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a new signing key and retire the current one. Tokens it signed stay valid until they
    /// expire; a running users service picks the new key up on its own.
    Rotate(Common),
    /// Print the signing keys as a Kubernetes Secret (`kubectl apply -f -`), making the first
    /// key if there is none: every users replica then signs with the same keys, and a
    /// restarted pod keeps issued tokens valid. After a rotation, apply it again.
    Manifest {
        #[command(flatten)]
        common: Common,
        /// The Secret's namespace.
        #[arg(long, default_value = "shopverse")]
        namespace: String,
        /// The Secret's name (the users Deployment mounts `shopverse-signing-keys`).
        #[arg(long, default_value = "shopverse-signing-keys")]
        name: String,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an administrator, or give an existing account the admin role.
    Create {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        email: String,
        /// Read the password from the first line of standard input.
        #[arg(long, conflicts_with = "password_env")]
        password_stdin: bool,
        /// Read the password from this environment variable.
        #[arg(long, default_value = "SHOPVERSE_ADMIN_PASSWORD")]
        password_env: String,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Dead-lettered events.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Where an order's saga spent its time: each event about it, when it was raised and
    /// published, and when each consumer handled it.
    Trace {
        #[command(flatten)]
        common: Common,
        /// The order's id.
        order_id: String,
        /// One JSON object per event instead of the timeline.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List parked events with the reason each was parked.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this topic (e.g. shopverse.orders).
        #[arg(long)]
        topic: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send parked events back to their topic: all not yet replayed, or one by event id.
    Replay {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        topic: Option<String>,
        /// Replay just this event (even if it was replayed before).
        #[arg(long)]
        event: Option<String>,
    },
}

/// mimalloc: see the workspace manifest and bench/README.md for the measurement behind it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // The log lines first, then the error that ends the process.
    shopverse_kit::telemetry::flush();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use commands::*;
    match cli.command {
        Command::Up(a) => {
            let cfg = load(&a.common)?;
            let listen = Listen {
                services: vec![
                    ("users", a.users_addr),
                    ("products", a.products_addr),
                    ("orders", a.orders_addr),
                    ("payments", a.payments_addr),
                    ("notifications", a.notifications_addr),
                    ("delivery", a.delivery_addr),
                ],
                admin: a.admin_addr,
                gateway: a.gateway_addr,
                any_ports_on: a.any_ports_on,
            };
            up(cfg, a.demo, listen).await?;
        }
        Command::Serve(a) => {
            let cfg = load(&a.common)?;
            serve(cfg, &a.service, a.listen, a.admin_addr).await?;
        }
        Command::Gateway {
            common,
            listen,
            admin_addr,
            upgrade,
        } => gateway(load(&common)?, listen, admin_addr, upgrade).await?,
        Command::Seed(a) => {
            let cfg = load(&a.common)?;
            let addrs = (
                a.users_addr.unwrap_or(cfg.services.users.listen),
                a.products_addr.unwrap_or(cfg.services.products.listen),
                a.orders_addr.unwrap_or(cfg.services.orders.listen),
            );
            if let Some(n) = a.products {
                seed_products(cfg, n).await?;
            } else {
                seed(cfg).await?;
            }
            if a.orders {
                println!(
                    "{}",
                    shopverse::demo::place_orders(addrs.0, addrs.1, addrs.2).await?
                );
            }
        }
        Command::Keys {
            command: KeysCommand::Rotate(c),
        } => keys_rotate(load(&c)?)?,
        Command::Keys {
            command:
                KeysCommand::Manifest {
                    common,
                    namespace,
                    name,
                },
        } => keys_manifest(load(&common)?, &namespace, &name)?,
        Command::Admin {
            command:
                AdminCommand::Create {
                    common,
                    email,
                    password_stdin,
                    password_env,
                },
        } => admin_create(load(&common)?, &email, password_stdin, &password_env).await?,
        Command::CheckConfig { files } => return Ok(check_config(&files)),
        Command::Backup { common, to } => {
            let cfg = load(&common)?;
            println!(
                "backing up {} into {}",
                cfg.data.dir.display(),
                to.display()
            );
            let m = backup::backup(&cfg, &to).await?;
            println!(
                "backup complete: {} files, manifest.json written",
                m.files.len()
            );
        }
        Command::Restore { common, from } => {
            let cfg = load(&common)?;
            let n = backup::restore(&cfg, &from).await?;
            println!("restored {n} files into {}", cfg.data.dir.display());
        }
        Command::Events {
            command:
                EventsCommand::Trace {
                    common,
                    order_id,
                    json,
                },
        } => events_trace(load(&common)?, &order_id, json).await?,
        Command::Events {
            command: EventsCommand::Dlq { command },
        } => match command {
            DlqCommand::List {
                common,
                topic,
                json,
            } => dlq_list(load(&common)?, topic.as_deref(), json).await?,
            DlqCommand::Replay {
                common,
                topic,
                event,
            } => dlq_replay(load(&common)?, topic.as_deref(), event.as_deref()).await?,
        },
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Loads and validates the configuration, applies `--data-dir`, starts telemetry.
fn load(common: &Common) -> anyhow::Result<config::AppConfig> {
    let mut cfg = config::AppConfig::load(common.config.as_deref())?;
    if let Some(d) = &common.data_dir {
        cfg.data.dir = d.clone();
    }
    let filter = std::env::var("RUST_LOG").ok();
    shopverse_kit::telemetry::init(&cfg.telemetry, filter.as_deref());
    Ok(cfg)
}
