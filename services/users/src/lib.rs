//! The users service: accounts, sign-in, tokens and the keys that sign them.
//!
//! # Layout
//! Dependencies run `grpc` → `app` → `store`/`domain`/`keys`:
//! - [`config`]: the `services.users` section.
//! - [`domain`]: input rules (email, password, names, addresses).
//! - [`keys`]: Ed25519 signing keys on disk, rotation, the published key set.
//! - [`store`]: all SQL (SQLite or PostgreSQL, same statements).
//! - [`app`]: the use cases: register, sign in, refresh, profiles, roles.
//! - [`grpc`]: `shopverse.users.v1.UsersService`, mapping only.
//!
//! [`UsersService`] is the service as the runtime runs it.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod keys;
pub mod store;

use tonic::service::Routes;

use shopverse_runtime::{Context, RunError, Service};
use shopverse_storage::MigrationSpec;

pub use app::Users;
pub use config::UsersConfig;

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
