//! Storage: one `sqlx` pool per service, on SQLite (the appliance default) or PostgreSQL.
//!
//! Both run the same migrations and the same queries: SQL sticks to what both dialects share
//! (`$1` placeholders, `ON CONFLICT`, `BIGINT` epoch milliseconds for time, `TEXT` ids), and the
//! one type spelled differently, binary data, is written `{{BLOB}}` in migrations and filled in
//! per dialect. Writes that read before they write open with [`Db::begin_write`], which on SQLite
//! takes the write lock up front (`BEGIN IMMEDIATE`): a deferred transaction that read first
//! cannot upgrade once another connection has committed, even with a busy timeout.
//!
//! SQLite has one writer at a time. Left to itself, a connection that finds the file locked
//! sleeps in its busy handler (1, 2, 5, ... 100 ms) and tries again: under load the writers
//! spent their time asleep while the core idled. So on SQLite the writers of one file queue
//! in the process instead, on an async lock ([`Db::begin_write`], [`Db::write_lock`]), and
//! each goes as soon as the one before it commits.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

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
    /// SQLite: the file's writer queue, shared by every `Db` of this process on that file.
    writers: Option<Arc<tokio::sync::Mutex<()>>>,
}

/// How long a writer waits for its turn: SQLite's busy timeout, as before the queue.
const WRITE_WAIT: Duration = Duration::from_secs(10);

/// The writer queue of one SQLite file (by its path as configured).
fn writer_queue(file: &str) -> Arc<tokio::sync::Mutex<()>> {
    static QUEUES: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let path = std::fs::canonicalize(file)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| file.to_owned());
    let mut queues = QUEUES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    queues.entry(path).or_default().clone()
}

/// A write transaction; on SQLite it holds the file's writer turn until it ends. It derefs to
/// the connection, as a `sqlx` transaction does (`&mut *tx` is the executor).
pub struct WriteTx {
    tx: Transaction<'static, Any>,
    _turn: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Db {
    /// Connects, creating the SQLite file (and its folder) when missing.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        install_default_drivers();
        let (kind, url, file) = if let Some(path) = url
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
            (
                DbKind::Sqlite,
                format!("sqlite://{file}?{query}"),
                Some(file.to_owned()),
            )
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (DbKind::Postgres, url.to_owned(), None)
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
        let writers = match (&file, kind) {
            (Some(f), DbKind::Sqlite) if f != ":memory:" => Some(writer_queue(f)),
            // Each in-memory database is its own.
            (_, DbKind::Sqlite) => Some(Arc::default()),
            _ => None,
        };
        Ok(Db {
            pool,
            kind,
            url,
            writers,
        })
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
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let turn = self.write_lock().await?;
        let tx = match self.kind {
            DbKind::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            DbKind::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _turn: turn })
    }

    /// On SQLite, this file's writer turn, for a write outside [`Db::begin_write`] (a single
    /// statement); hold it until the statement is done. `None` on PostgreSQL. Waiting longer
    /// than SQLite's busy timeout is the same `PoolTimedOut` a busy pool gives.
    ///
    /// Take it *before* a pooled connection, never while holding one: the pool is small, and
    /// tasks holding its connections while they wait for the turn would leave the turn's
    /// holder no connection to write on.
    pub async fn write_lock(&self) -> Result<Option<OwnedMutexGuard<()>>, sqlx::Error> {
        let Some(q) = &self.writers else {
            return Ok(None);
        };
        tokio::time::timeout(WRITE_WAIT, q.clone().lock_owned())
            .await
            .map(Some)
            .map_err(|_| sqlx::Error::PoolTimedOut)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `rows` groups of `cols` numbered placeholders, from `$first` on: `placeholders(2, 2, 2)` is
/// `($2, $3), ($4, $5)`, for a multi-row `VALUES` list or (one row) an `IN` list. The same in
/// both dialects.
pub fn placeholders(first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * (cols * 5 + 4));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + r * cols + c).to_string());
        }
        out.push(')');
    }
    out
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
    fn numbers_placeholders_by_row() {
        assert_eq!(placeholders(2, 2, 2), "($2, $3), ($4, $5)");
        assert_eq!(placeholders(1, 1, 3), "($1, $2, $3)");
        assert_eq!(placeholders(1, 0, 3), "");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    /// Many writers on a two-connection pool, in transactions and as single statements, all
    /// land: each waits for the file's writer turn before it takes a connection, so none of
    /// them holds a connection the turn's holder needs (that ordering ran the pool dry once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_writers_queue_without_starving_the_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/w.db", dir.path().display());
        let m: &[MigrationSpec] = &[(1, "init", "CREATE TABLE t (id BIGINT PRIMARY KEY);")];
        let db = Db::connect(&url, 2).await.expect("connect");
        db.migrate(&[m]).await.expect("migrate");
        // A second `Db` on the same file shares the queue.
        let other = Db::connect(&url, 2).await.expect("connect again");
        let mut tasks = Vec::new();
        for i in 0..60i64 {
            let db = if i % 3 == 0 {
                other.clone()
            } else {
                db.clone()
            };
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    let mut tx = db.begin_write().await?;
                    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
                        .fetch_one(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO t (id) VALUES ($1)")
                        .bind(i)
                        .execute(&mut *tx)
                        .await?;
                    tokio::task::yield_now().await;
                    tx.commit().await?;
                    Ok::<i64, sqlx::Error>(n)
                } else {
                    let _turn = db.write_lock().await?;
                    sqlx::query("INSERT INTO t (id) VALUES ($1)")
                        .bind(i)
                        .execute(db.pool())
                        .await?;
                    Ok(0)
                }
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("a writer failed");
        }
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(db.pool())
            .await
            .expect("count");
        assert_eq!(n, 60);
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
