//! The users service: accounts, sign-in, tokens and the keys that sign them.
//!
//! # Layout
//! - [`config`]: the `services.users` section.
//! - [`validate`]: input rules (email, password, names, addresses).
//! - [`keys`]: Ed25519 signing keys on disk, rotation, the published key set.
//! - [`repo`]: the database (SQLite or PostgreSQL, same SQL).
//! - [`service`]: the gRPC service (`shopverse.users.v1.UsersService`).
//!
//! [`UsersService`] is the service as the runtime runs it.

#![forbid(unsafe_code)]

pub mod config;
pub mod keys;
pub mod repo;
pub mod service;
pub mod validate;

use tonic::service::Routes;

use shopverse_kit::db::MigrationSpec;
use shopverse_runtime::{Context, RunError, Service};

pub use config::UsersConfig;
pub use service::Users;

pub const SERVICE_NAME: &str = "shopverse.users.v1.UsersService";

pub const MIGRATIONS: &[MigrationSpec] =
    &[(1, "users", include_str!("../migrations/0001_users.sql"))];

/// The users service, as [`shopverse_runtime::serve`] runs it: the gRPC server and the relay.
pub struct UsersService;

impl Service for UsersService {
    const NAME: &'static str = "users";
    const GRPC_NAME: &'static str = SERVICE_NAME;
    const MIGRATIONS: &'static [MigrationSpec] = MIGRATIONS;
    type Config = UsersConfig;

    async fn build(cx: &mut Context<UsersConfig>) -> Result<Routes, RunError> {
        let keys = keys::KeyStore::open_or_init(
            &cx.config.keys_dir(&cx.data_dir),
            cx.platform.clock.now_ms(),
        )
        .map_err(|e| RunError::new("signing keys", e))?;
        let users = Users::new(
            cx.db.clone(),
            keys,
            cx.config.clone(),
            &cx.platform,
            cx.relay_waker(),
        );
        Ok(Routes::new(users.into_server()))
    }
}
