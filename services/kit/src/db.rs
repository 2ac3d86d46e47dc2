//! Storage: one `sqlx` pool per service, on SQLite (the appliance default) or PostgreSQL.
//!
//! Both run the same migrations and the same queries: SQL sticks to what both dialects share
//! (`$1` placeholders, `ON CONFLICT`, `BIGINT` epoch milliseconds for time, `TEXT` ids), and the
//! one type spelled differently, binary data, is written `{{BLOB}}` in migrations and filled in
//! per dialect. Writes that read before they write open with [`Db::begin_write`], which on SQLite
//! takes the write lock up front (`BEGIN IMMEDIATE`): a deferred transaction that read first
//! cannot upgrade once another connection has committed, even with a busy timeout.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, AssertSqlSafe, Executor, SqlSafeStr, Transaction};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL `{0}` is neither sqlite: nor postgres:")]
    UnknownScheme(String),
    #[error("creating the folder for {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// One versioned migration: `(version, description, sql)`.
pub type MigrationSpec = (i64, &'static str, &'static str);

#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
    url: String,
}

impl Db {
    /// Connects, creating the SQLite file (and its folder) when missing.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        install_default_drivers();
        let (kind, url) = if let Some(path) = url
            .strip_prefix("sqlite://")
            .or(url.strip_prefix("sqlite:"))
        {
            let (file, query) = path.split_once('?').unwrap_or((path, ""));
            if let Some(parent) = Path::new(file)
                .parent()
                .filter(|p| file != ":memory:" && !p.as_os_str().is_empty())
            {
                std::fs::create_dir_all(parent).map_err(|source| DbError::CreateDir {
                    path: file.to_owned(),
                    source,
                })?;
            }
            let query = if query.is_empty() {
                "mode=rwc".to_owned()
            } else {
                query.to_owned()
            };
            (DbKind::Sqlite, format!("sqlite://{file}?{query}"))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (DbKind::Postgres, url.to_owned())
        } else {
            return Err(DbError::UnknownScheme(redact(url)));
        };
        let mut opts = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10));
        if kind == DbKind::Sqlite {
            opts = opts.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL: readers never block the writer; NORMAL is durable across process
                    // crashes in WAL mode (an OS crash may lose the last commits, not corrupt).
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            });
        }
        let pool = opts
            .connect(&url)
            .await
            .map_err(|source| DbError::Connect {
                url: redact(&url),
                source,
            })?;
        Ok(Db { pool, kind, url })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// The URL with any password removed, for logs.
    pub fn display_url(&self) -> String {
        redact(&self.url)
    }

    /// Applies every migration of `sets` (a service's own and the event outbox's, say) in
    /// version order; already applied ones are checked, not rerun.
    pub async fn migrate(&self, sets: &[&[MigrationSpec]]) -> Result<(), DbError> {
        let blob = match self.kind {
            DbKind::Sqlite => "BLOB",
            DbKind::Postgres => "BYTEA",
        };
        let mut all: Vec<&MigrationSpec> = sets.iter().flat_map(|s| s.iter()).collect();
        all.sort_by_key(|m| m.0);
        let list = all
            .into_iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    AssertSqlSafe(sql.replace("{{BLOB}}", blob)).into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(list)
            .run(&self.pool)
            .await
            .map_err(|source| DbError::Migrate {
                url: self.display_url(),
                source,
            })
    }

    /// A transaction that will write. See the module docs for why SQLite needs this.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            DbKind::Postgres => self.pool.begin().await,
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// True for a unique-constraint violation (SQLite and PostgreSQL alike).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

/// True when the database refused for contention and a retry may succeed.
pub fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => matches!(
            d.code().as_deref(),
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY_SNAPSHOT; PG serialization failure, deadlock
            Some("5" | "6" | "517" | "40001" | "40P01")
        ),
        _ => false,
    }
}

/// Removes the password from a database URL.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[tokio::test]
    async fn sqlite_migrates_once_and_stores_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/sub/t.db", dir.path().display());
        let m: &[MigrationSpec] = &[(
            1,
            "init",
            "CREATE TABLE t (id TEXT PRIMARY KEY, b {{BLOB}} NOT NULL);",
        )];
        let db = Db::connect(&url, 2).await.expect("connect");
        db.migrate(&[m]).await.expect("migrate");
        db.migrate(&[m]).await.expect("migrate again is a no-op");
        let mut tx = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (id, b) VALUES ($1, $2)")
            .bind("a")
            .bind(vec![0u8, 1, 2])
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
        let err = sqlx::query("INSERT INTO t (id, b) VALUES ($1, $2)")
            .bind("a")
            .bind(vec![1u8])
            .execute(db.pool())
            .await
            .expect_err("duplicate");
        assert!(is_unique_violation(&err));
        let b: Vec<u8> = sqlx::query_scalar("SELECT b FROM t WHERE id = $1")
            .bind("a")
            .fetch_one(db.pool())
            .await
            .expect("select");
        assert_eq!(b, vec![0, 1, 2]);
    }
}
