//! Helpers for tests: a fresh PostgreSQL database per test run.
//!
//! The server is the one the machine runs (`127.0.0.1:5432`, user `postgres`, trust auth), or
//! the one `SHOPVERSE_TEST_POSTGRES` names. Databases are called `sv_test_<epoch>_<random>`;
//! ones left by a crashed run more than an hour ago are dropped on the next run.

use sqlx::{AssertSqlSafe, Connection};

use crate::clock::{Clock, SystemClock};

pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("SHOPVERSE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned())
}

fn with_db(url: &str, db: &str) -> String {
    match url.rfind('/') {
        Some(i) if i > "postgres://".len() => format!("{}/{db}", &url[..i]),
        _ => format!("{url}/{db}"),
    }
}

/// A database created for one test; drop it with [`PgTestDb::drop_db`].
#[derive(Debug)]
pub struct PgTestDb {
    pub url: String,
    name: String,
}

impl PgTestDb {
    pub async fn create() -> Result<PgTestDb, sqlx::Error> {
        shopverse_storage::install_drivers();
        let admin = admin_url();
        let mut conn = sqlx::AnyConnection::connect(&admin).await?;
        let now = SystemClock.now_secs();
        let name = format!(
            "sv_test_{now}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let old: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'sv\\_test\\_%'",
        )
        .fetch_all(&mut conn)
        .await?;
        for db in old {
            let created = db
                .split('_')
                .nth(2)
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(now);
            if now - created > 3600 {
                let _ = sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            }
        }
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(PgTestDb {
            url: with_db(&admin, &name),
            name,
        })
    }

    /// Refuses (`false`) or allows new connections to the database; refusing also ends every
    /// open one, as a database going away would.
    pub async fn allow_connections(&self, allow: bool) -> Result<(), sqlx::Error> {
        let mut conn = sqlx::AnyConnection::connect(&admin_url()).await?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        if !allow {
            sqlx::query(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            )
            .bind(&self.name)
            .fetch_one(&mut conn)
            .await?;
        }
        conn.close().await
    }

    pub async fn drop_db(self) -> Result<(), sqlx::Error> {
        let mut conn = sqlx::AnyConnection::connect(&admin_url()).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        conn.close().await
    }
}

/// Connects a gRPC channel to `addr`, retrying briefly while the server comes up.
pub async fn channel(
    addr: std::net::SocketAddr,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    match last {
        Some(e) => Err(e),
        None => endpoint.connect().await,
    }
}

/// Adds a verified identity to a request, as the gateway would.
pub use crate::identity::request_as as as_user;

/// A server a test started on `127.0.0.1:0`.
pub struct Spawned<E> {
    pub addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

/// Binds `127.0.0.1:0` and runs `serve(listener, shutdown)` in a task.
pub async fn spawn<E, F, Fut>(serve: F) -> std::io::Result<Spawned<E>>
where
    F: FnOnce(tokio::net::TcpListener, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(serve(listener, stop.clone()));
    Ok(Spawned { addr, stop, task })
}

impl<E: std::fmt::Debug> Spawned<E> {
    /// Stops the server and checks it exits cleanly within ten seconds.
    pub async fn stop(self) {
        self.stop.cancel();
        #[allow(clippy::expect_used)]
        tokio::time::timeout(std::time::Duration::from_secs(10), self.task)
            .await
            .expect("the server stops within ten seconds")
            .expect("the server task did not panic")
            .expect("the server exited cleanly");
    }
}
