//! The users service: accounts, sign-in, tokens and the keys that sign them.
//!
//! # Layout
//! - [`config`]: the `services.users` section.
//! - [`validate`]: input rules (email, password, names, addresses).
//! - [`keys`]: Ed25519 signing keys on disk, rotation, the published key set.
//! - [`repo`]: the database (SQLite or PostgreSQL, same SQL).
//! - [`service`]: the gRPC service (`shopverse.users.v1.UsersService`).
//!
//! [`run`] wires them up on a listener; the `shopverse` binary calls it for `up` and `serve users`.

#![forbid(unsafe_code)]

pub mod config;
pub mod keys;
pub mod repo;
pub mod service;
pub mod validate;

use std::path::Path;

use tokio::net::TcpListener;
use tonic::service::Routes;

use shopverse_events::Platform;
use shopverse_events::outbox::Relay;
use shopverse_kit::CancellationToken;
use shopverse_kit::db::{Db, MigrationSpec};

pub use config::UsersConfig;
pub use service::Users;

pub const SERVICE_NAME: &str = "shopverse.users.v1.UsersService";

pub const MIGRATIONS: &[MigrationSpec] =
    &[(1, "users", include_str!("../migrations/0001_users.sql"))];

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("users database: {0}")]
    Db(#[from] shopverse_kit::db::DbError),
    #[error("users signing keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error("users gRPC server: {0}")]
    Serve(#[from] shopverse_kit::server::ServeError),
}

/// Connects to the users database and applies its migrations (and the outbox's).
pub async fn open_db(config: &UsersConfig, data_dir: &Path) -> Result<Db, RunError> {
    Ok(shopverse_events::open_service_db(&config.database_url(data_dir), MIGRATIONS).await?)
}

/// Runs the users service on `listener` until `shutdown`: the gRPC server and the outbox relay.
pub async fn run(
    listener: TcpListener,
    config: UsersConfig,
    data_dir: &Path,
    platform: Platform,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let db = open_db(&config, data_dir).await?;
    let keys = keys::KeyStore::open_or_init(&config.keys_dir(data_dir), platform.clock.now_ms())?;
    let relay = Relay::new(
        db.clone(),
        platform.bus.clone(),
        "users",
        &platform.registry,
    );
    let users = Users::new(db.clone(), keys, config, &platform, relay.waker());
    let routes = Routes::new(users.into_server());
    shopverse_events::run_service(
        listener,
        shopverse_events::ServiceParts {
            routes,
            names: &[SERVICE_NAME],
            db,
            relay,
            background: Vec::new(),
        },
        &platform,
        shutdown,
    )
    .await
    .map_err(Into::into)
}
