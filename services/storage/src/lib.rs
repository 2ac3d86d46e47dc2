//! Storage: one `sqlx` pool per service, on SQLite (the appliance default) or PostgreSQL.
//!
//! Both run the same migrations and the same queries: SQL sticks to what both dialects share
//! (`$1` placeholders, `ON CONFLICT`, `BIGINT` epoch milliseconds for time, `TEXT` ids), and the
//! one type spelled differently, binary data, is written `{{BLOB}}` in migrations and filled in
//! per dialect. A migration line that opens with `-- sqlite: ` or `-- postgres: ` is run on
//! that dialect only (and stays a comment on the other). Writes that read before they write open with [`Db::begin_write`], which on SQLite
//! takes the write lock up front (`BEGIN IMMEDIATE`): a deferred transaction that read first
//! cannot upgrade once another connection has committed, even with a busy timeout.
//!
//! SQLite has one writer at a time. Left to itself, a connection that finds the file locked
//! sleeps in its busy handler (1, 2, 5, ... 100 ms) and tries again: under load the writers
//! spent their time asleep while the core idled. So on SQLite the writers of one file queue
//! in the process instead, on an async lock ([`Db::begin_write`], [`Db::write_conn`]), and
//! each goes as soon as the one before it commits.
//!
//! The lock guards the file's one writer connection, kept out of the pool. A pooled
//! connection costs two extra round trips to SQLite's thread per use (a ping when it is taken,
//! another when it goes back); under the writer turn, where every writer of the file waits on
//! the holder, the taking one was paid while the others queued.
//!
//! On SQLite the services' connections (the writer, the readers, the pool) run statements on
//! the calling task's thread (`inline`): `sqlx`'s SQLite driver hands each statement
//! to a thread of its own, and on the checkout path those hand-offs were half the CPU time.
//! Migrations and the background checkpoint stay on `sqlx`'s driver, off the runtime.

#![forbid(unsafe_code)]

mod inline;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::pool::PoolConnection;
use sqlx::{
    Any, AnyConnection, AnyPool, AssertSqlSafe, Connection, Executor, Row, SqlSafeStr, Transaction,
};

/// Installs the `Any` drivers: PostgreSQL, `sqlx`'s SQLite (threaded: migrations, the
/// background checkpoint, other processes' `sqlite:` URLs) and the inline SQLite the services'
/// own connections use (`inline`). Call before any `Any` connection; idempotent.
pub fn install_drivers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only if drivers were installed before, and they are only installed here.
        let _ = sqlx::any::install_drivers(&[
            sqlx::postgres::any::DRIVER,
            sqlx::sqlite::any::DRIVER,
            inline::DRIVER,
        ]);
    });
}

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
    #[error(
        "in-memory SQLite is not supported: each connection would be its own database; use a file"
    )]
    InMemory,
    #[error("migrating {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// One versioned migration: `(version, description, sql)`.
pub type MigrationSpec = (i64, &'static str, &'static str);

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
    url: String,
    /// SQLite: the file's writer, shared by every `Db` of this process on that file.
    writer: Option<Arc<tokio::sync::Mutex<Writer>>>,
    /// SQLite: this `Db`'s reader connections.
    readers: Option<Arc<Readers>>,
    /// Whose database it is (`orders`), for the spans of its transactions.
    service: &'static str,
    /// SQLite: the database file.
    file: Option<PathBuf>,
}

/// SQLite reader connections, kept out of the pool for the same reason as the writer: the
/// pool pings each connection it takes back, a round trip to its thread per read.
struct Readers {
    idle: Mutex<Vec<AnyConnection>>,
    permits: Arc<tokio::sync::Semaphore>,
}

/// A connection to read on: on SQLite one of the `Db`'s readers (opened on first need, up
/// to the pool size less the writer), on PostgreSQL a pooled connection. It derefs to the
/// connection and goes back when dropped.
pub struct ReadConn(ReadInner);

enum ReadInner {
    Own {
        /// `None` only while being returned.
        conn: Option<AnyConnection>,
        readers: Arc<Readers>,
        _permit: tokio::sync::OwnedSemaphorePermit,
    },
    Pooled(PoolConnection<Any>),
}

impl Drop for ReadConn {
    fn drop(&mut self) {
        if let ReadInner::Own { conn, readers, .. } = &mut self.0
            && let Some(c) = conn.take()
        {
            readers
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(c);
        }
    }
}

impl std::ops::Deref for ReadConn {
    type Target = AnyConnection;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            ReadInner::Own { conn: Some(c), .. } => c,
            ReadInner::Own { conn: None, .. } => {
                unreachable!("a ReadConn is not used once dropped")
            }
            ReadInner::Pooled(c) => c,
        }
    }
}

impl std::ops::DerefMut for ReadConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.0 {
            ReadInner::Own { conn: Some(c), .. } => c,
            ReadInner::Own { conn: None, .. } => {
                unreachable!("a ReadConn is not used once dropped")
            }
            ReadInner::Pooled(c) => c,
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("kind", &self.kind)
            .field("url", &self.display_url())
            .finish_non_exhaustive()
    }
}

/// A SQLite file's writer connection; its mutex is the file's writer turn.
struct Writer {
    conn: AnyConnection,
    /// A transaction was begun and not ended (its [`WriteTx`] was dropped mid-way, or its
    /// commit failed): the next holder rolls it back before anything else.
    in_tx: bool,
}

impl Writer {
    async fn settle(&mut self) {
        if self.in_tx {
            // An error ("no transaction is active": the BEGIN never ran) leaves nothing open.
            let _ = self.conn.execute("ROLLBACK").await;
            self.in_tx = false;
        }
    }
}

/// How long a writer waits for its turn, or a reader for a connection: SQLite's busy
/// timeout, as before the queue. Longer is the same `PoolTimedOut` a busy pool gives.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(wait: impl std::future::Future<Output = T>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(WAIT, wait)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)
}

type Writers = HashMap<String, std::sync::Weak<tokio::sync::Mutex<Writer>>>;

/// The writer of one SQLite file (by its canonical path and, on Unix, its inode: a file
/// deleted and made again is another file): the live one if another `Db` of this process has
/// it, else `conn`, which becomes it.
fn file_writer(file: &str, conn: AnyConnection) -> (Arc<tokio::sync::Mutex<Writer>>, bool) {
    static WRITERS: OnceLock<Mutex<Writers>> = OnceLock::new();
    let path = std::fs::canonicalize(file)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| file.to_owned());
    #[cfg(unix)]
    let path = match std::fs::metadata(file) {
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            format!("{path}#{}:{}", m.dev(), m.ino())
        }
        Err(_) => path,
    };
    let mut writers = WRITERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    writers.retain(|_, w| w.strong_count() > 0);
    if let Some(live) = writers.get(&path).and_then(std::sync::Weak::upgrade) {
        return (live, false);
    }
    let w = Arc::new(tokio::sync::Mutex::new(Writer { conn, in_tx: false }));
    writers.insert(path, Arc::downgrade(&w));
    (w, true)
}

/// How often a SQLite file's WAL is checkpointed in the background.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Quiet checkpoints in a row (the WAL grew by at most [`QUIET_FRAMES`] since the one before)
/// after which a WAL larger than [`WAL_IDLE_BYTES`] is truncated to nothing.
const IDLE_CHECKPOINTS: u32 = 4;
/// WAL frames a checkpoint interval may add and still count as quiet: the readiness probe's
/// write once a second is quiet.
const QUIET_FRAMES: i64 = 16;
/// The WAL size an idle file is truncated from.
const WAL_IDLE_BYTES: u64 = 1 << 20;

/// The WAL size SQLite cuts the file back to whenever it starts the log over: a bound for an
/// unusual burst. It sits well above what the WAL reaches between two checkpoints under load,
/// so a busy file reuses its WAL in place instead of cutting and regrowing it at every restart;
/// an idle file's WAL is emptied by the idle truncation above.
const WAL_KEEP_BYTES: u64 = 64 << 20;

/// WAL pages after which a commit checkpoints by itself (SQLite's default is 1,000): only a
/// safety net while [`checkpoint_in_background`] keeps up.
const AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// Copies a SQLite file's WAL back into the database every [`CHECKPOINT_EVERY`], on a
/// connection of its own, until every `Db` of the file is dropped or `pool` is closed.
///
/// SQLite otherwise checkpoints inside the commit that crosses 1,000 WAL pages, which then
/// copies pages and syncs the file twice while holding the file's writer turn: under load
/// those commits took 1-50 ms and held up every writer of the file. A `PASSIVE` checkpoint
/// takes no writer lock, so commits go on meanwhile. Durability is unchanged: a commit is
/// durable in the WAL either way.
///
/// Once the file has been quiet for [`IDLE_CHECKPOINTS`] checkpoints, a WAL grown past
/// [`WAL_IDLE_BYTES`] (by a burst) is emptied by a `TRUNCATE` checkpoint. Under load,
/// `journal_size_limit` ([`WAL_KEEP_BYTES`]) bounds it whenever SQLite starts the log over.
async fn checkpoint_in_background(
    mut conn: AnyConnection,
    writer: std::sync::Weak<tokio::sync::Mutex<Writer>>,
    pool: AnyPool,
    wal: PathBuf,
) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last_frames, mut quiet) = (0i64, 0u32);
    loop {
        tick.tick().await;
        if pool.is_closed() || writer.strong_count() == 0 {
            break;
        }
        // (busy, frames in the WAL, frames checkpointed)
        let frames = match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&mut conn)
            .await
        {
            Ok(row) => row.try_get::<i64, _>(1).unwrap_or(0),
            Err(e) => {
                tracing::debug!(error = %e, "background checkpoint failed; the next one retries");
                continue;
            }
        };
        // Fewer frames than before: the log was started over.
        let added = if frames >= last_frames {
            frames - last_frames
        } else {
            frames
        };
        last_frames = frames;
        quiet = if added <= QUIET_FRAMES { quiet + 1 } else { 0 };
        let big = std::fs::metadata(&wal).is_ok_and(|m| m.len() > WAL_IDLE_BYTES);
        if quiet >= IDLE_CHECKPOINTS && big {
            match conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await {
                Ok(_) => last_frames = 0,
                Err(e) => tracing::debug!(error = %e, "truncating an idle WAL failed"),
            }
            quiet = 0;
        }
    }
    let _ = sqlx::Connection::close(conn).await;
}

/// The bytes on disk of the SQLite database `file` and of its WAL (0 for a missing one).
pub fn sqlite_file_bytes(file: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    (size(file), size(&wal_of(file)))
}

/// The WAL file of the SQLite database `file`.
fn wal_of(file: &Path) -> PathBuf {
    let mut wal = file.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// A connection to write on: on SQLite the file's writer, held (with its turn) until this is
/// dropped; on PostgreSQL a pooled connection. It derefs to the connection.
pub struct WriteConn(ConnInner);

enum ConnInner {
    Turn(OwnedMutexGuard<Writer>),
    Pooled(PoolConnection<Any>),
}

impl std::ops::Deref for WriteConn {
    type Target = AnyConnection;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            ConnInner::Turn(w) => &w.conn,
            ConnInner::Pooled(c) => c,
        }
    }
}

impl std::ops::DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.0 {
            ConnInner::Turn(w) => &mut w.conn,
            ConnInner::Pooled(c) => c,
        }
    }
}

/// A write transaction; on SQLite it holds the file's writer turn until it ends. It derefs to
/// the connection, as a `sqlx` transaction does (`&mut *tx` is the executor). Dropped without
/// a commit, it rolls back.
pub struct WriteTx(
    TxInner,
    // Held, not read: the transaction's span ends when it does.
    #[allow(dead_code)] tracing::Span,
);

enum TxInner {
    /// `None` once ended.
    Turn(Option<OwnedMutexGuard<Writer>>),
    Pooled(Transaction<'static, Any>),
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.end(true).await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.end(false).await
    }

    /// On SQLite, a failed COMMIT or ROLLBACK leaves `in_tx` set: the next holder rolls back.
    async fn end(mut self, commit: bool) -> Result<(), sqlx::Error> {
        match std::mem::replace(&mut self.0, TxInner::Turn(None)) {
            TxInner::Turn(Some(mut w)) => {
                w.conn
                    .execute(if commit { "COMMIT" } else { "ROLLBACK" })
                    .await?;
                w.in_tx = false;
                Ok(())
            }
            TxInner::Turn(None) => Ok(()),
            TxInner::Pooled(tx) if commit => tx.commit().await,
            TxInner::Pooled(tx) => tx.rollback().await,
        }
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if let TxInner::Turn(slot) = &mut self.0
            && let Some(mut w) = slot.take()
            && w.in_tx
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // Roll back now, still holding the turn (without a runtime, the next holder does).
            rt.spawn(async move { w.settle().await });
        }
    }
}

impl std::ops::Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &Self::Target {
        match &self.0 {
            TxInner::Turn(Some(w)) => &w.conn,
            TxInner::Turn(None) => unreachable!("a WriteTx is not used after it ends"),
            TxInner::Pooled(tx) => tx,
        }
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match &mut self.0 {
            TxInner::Turn(Some(w)) => &mut w.conn,
            TxInner::Turn(None) => unreachable!("a WriteTx is not used after it ends"),
            TxInner::Pooled(tx) => tx,
        }
    }
}

/// A migration's SQL for `kind`: `{{BLOB}}` spelled in the dialect, and the lines meant for
/// this dialect alone (`-- sqlite: `, `-- postgres: `) uncommented.
fn dialect_sql(sql: &str, kind: DbKind) -> String {
    let (blob, mine) = match kind {
        DbKind::Sqlite => ("BLOB", "-- sqlite: "),
        DbKind::Postgres => ("BYTEA", "-- postgres: "),
    };
    sql.lines()
        .map(|line| line.strip_prefix(mine).unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{{BLOB}}", blob)
}

impl Db {
    /// Connects, creating the SQLite file (and its folder) when missing.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        install_drivers();
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
        if file.as_deref() == Some(":memory:") {
            return Err(DbError::InMemory);
        }
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
                    conn.execute(AssertSqlSafe(format!(
                        "PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES}"
                    )))
                    .await?;
                    conn.execute(AssertSqlSafe(format!(
                        "PRAGMA journal_size_limit = {WAL_KEEP_BYTES}"
                    )))
                    .await?;
                    Ok(())
                })
            });
        } else {
            opts = opts.after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Short queries with a LIMIT: a parallel plan's worker start-up (7 ms for
                    // a 10 ms page of products filtered by attribute) costs more than it saves.
                    conn.execute("SET max_parallel_workers_per_gather = 0")
                        .await?;
                    Ok(())
                })
            });
        }
        // SQLite: the services' connections run statements on the caller's thread; `url`
        // (the threaded driver's) stays for migrations and the background checkpoint.
        let pool_url = match &file {
            Some(_) => url.replacen("sqlite://", "sqlite-inline://", 1),
            None => url.clone(),
        };
        let pool = opts
            .connect(&pool_url)
            .await
            .map_err(|source| DbError::Connect {
                url: redact(&url),
                source,
            })?;
        // A connection out of the pool, for a task that keeps it.
        let own_connection = || async {
            pool.acquire()
                .await
                .map(PoolConnection::detach)
                .map_err(|source| DbError::Connect {
                    url: redact(&url),
                    source,
                })
        };
        let writer = match &file {
            Some(f) => {
                let (writer, new) = file_writer(f, own_connection().await?);
                if new {
                    let checkpointer =
                        AnyConnection::connect(&url)
                            .await
                            .map_err(|source| DbError::Connect {
                                url: redact(&url),
                                source,
                            })?;
                    tokio::spawn(checkpoint_in_background(
                        checkpointer,
                        Arc::downgrade(&writer),
                        pool.clone(),
                        wal_of(Path::new(f)),
                    ));
                }
                Some(writer)
            }
            None => None,
        };
        let readers = file.as_ref().map(|_| {
            Arc::new(Readers {
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(
                    max_connections.saturating_sub(1).max(1) as usize,
                )),
            })
        });
        Ok(Db {
            pool,
            kind,
            url,
            writer,
            readers,
            service: "",
            file: file.map(PathBuf::from),
        })
    }

    /// The same database, its transactions' spans attributed to `service`.
    pub fn for_service(mut self, service: &'static str) -> Db {
        self.service = service;
        self
    }

    /// The span of a write transaction: from its start to its end, a child of the span that
    /// began it (a request's, a consumer's).
    fn transaction_span(&self) -> tracing::Span {
        let system = match self.kind {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgresql",
        };
        tracing::info_span!(
            "db.transaction",
            otel.kind = "client",
            db.system.name = system,
            service.name = self.service,
        )
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
        let mut all: Vec<&MigrationSpec> = sets.iter().flat_map(|s| s.iter()).collect();
        all.sort_by_key(|m| m.0);
        let list = all
            .into_iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    AssertSqlSafe(dialect_sql(sql, self.kind)).into_sql_str(),
                    false,
                )
            })
            .collect();
        let migrator = Migrator::with_migrations(list);
        let failed = |source| DbError::Migrate {
            url: self.display_url(),
            source,
        };
        if self.writer.is_none() {
            return migrator.run(&self.pool).await.map_err(failed);
        }
        // SQLite: on the threaded driver (the inline one runs no migrations), holding the
        // file's writer turn so that no writer of this process goes meanwhile.
        let _turn = self.turn().await.map_err(|e| failed(e.into()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    Ok(())
                })
            })
            .connect(&self.url)
            .await
            .map_err(|e| failed(e.into()))?;
        let out = migrator.run(&pool).await.map_err(failed);
        pool.close().await;
        out
    }

    /// A transaction that will write. See the module docs for why SQLite needs this.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let Some(mut w) = self.turn().await? else {
            let span = self.transaction_span();
            return Ok(WriteTx(TxInner::Pooled(self.pool.begin().await?), span));
        };
        w.in_tx = true;
        if let Err(e) = w.conn.execute("BEGIN IMMEDIATE").await {
            w.in_tx = false;
            return Err(e);
        }
        Ok(WriteTx(TxInner::Turn(Some(w)), self.transaction_span()))
    }

    /// A connection for a write outside [`Db::begin_write`] (a single statement): on SQLite
    /// the file's writer, holding its turn until dropped, so drop it as soon as the write is
    /// done.
    pub async fn write_conn(&self) -> Result<WriteConn, sqlx::Error> {
        match self.turn().await? {
            Some(w) => Ok(WriteConn(ConnInner::Turn(w))),
            None => Ok(WriteConn(ConnInner::Pooled(self.pool.acquire().await?))),
        }
    }

    /// A connection for reads (see [`ReadConn`]), waiting as a pool does for one to come free.
    pub async fn read(&self) -> Result<ReadConn, sqlx::Error> {
        let Some(readers) = &self.readers else {
            return Ok(ReadConn(ReadInner::Pooled(self.pool.acquire().await?)));
        };
        let permit = within(readers.permits.clone().acquire_owned())
            .await?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let idle = readers
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let conn = match idle {
            Some(c) => c,
            None => self.pool.acquire().await?.detach(),
        };
        Ok(ReadConn(ReadInner::Own {
            conn: Some(conn),
            readers: readers.clone(),
            _permit: permit,
        }))
    }

    /// SQLite: the file's writer, its turn taken and any transaction left open rolled back.
    async fn turn(&self) -> Result<Option<OwnedMutexGuard<Writer>>, sqlx::Error> {
        let Some(q) = &self.writer else {
            return Ok(None);
        };
        // The writer may be another `Db`'s too, so it stays open; this one is done writing.
        if self.pool.is_closed() {
            return Err(sqlx::Error::PoolClosed);
        }
        let mut w = within(q.clone().lock_owned()).await?;
        w.settle().await;
        Ok(Some(w))
    }

    /// The database file and its WAL, in bytes (SQLite; `None` on PostgreSQL).
    pub fn file_bytes(&self) -> Option<(u64, u64)> {
        self.file.as_deref().map(sqlite_file_bytes)
    }

    /// SQLite: copies the WAL into the database and truncates it (on the file's writer, in its
    /// turn). Nothing on PostgreSQL.
    pub async fn truncate_wal(&self) {
        if self.writer.is_some()
            && !self.pool.is_closed()
            && let Ok(Some(mut w)) = self.turn().await
            && let Err(e) = w.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").await
        {
            tracing::debug!(error = %e, "a truncating checkpoint failed");
        }
    }

    /// Closes the connections. On SQLite the WAL is first copied into the database and
    /// truncated, so a stopped service leaves its data in one file.
    pub async fn close(&self) {
        self.truncate_wal().await;
        if let Some(r) = &self.readers {
            r.permits.close();
            let idle = std::mem::take(
                &mut *r
                    .idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for c in idle {
                let _ = sqlx::Connection::close(c).await;
            }
        }
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

/// Whether `e` says the storage itself is out of service (SQLite: the disk is full, an I/O
/// error, the file cannot be opened; PostgreSQL: the connection failed or was cut, the server
/// is shutting down or refuses connections, its disk is full), rather than that this request
/// was wrong. Such a failure is the caller's to retry later: 503, not 500.
pub fn is_outage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // PostgreSQL's SQLSTATEs are five characters; SQLite's extended codes are numbers
            // below 10,000 whose low byte is the primary code.
            Some(c) if c.len() == 5 => {
                c.starts_with("08")
                    || c.starts_with("57P")
                    || matches!(c, "53100" | "53300" | "55000")
            }
            Some(c) => c
                .parse::<u32>()
                // SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN
                .is_ok_and(|n| matches!(n & 0xff, 10 | 13 | 14)),
            None => false,
        },
        _ => false,
    }
}

/// Writes one row, to prove the storage takes writes now (a full disk still serves reads):
/// what `/readyz` asks of each service's database. The row lives in `readyz_probe`.
pub async fn probe_write(db: &Db, now_ms: i64) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS readyz_probe (id BIGINT PRIMARY KEY, at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO readyz_probe (id, at) VALUES (1, $1) \
         ON CONFLICT (id) DO UPDATE SET at = excluded.at",
    )
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
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
    fn dialect_lines_run_on_their_dialect_only() {
        let sql = "CREATE TABLE t (b {{BLOB}});\n-- sqlite: CREATE INDEX i ON t (b);\n-- postgres: ALTER TABLE t ADD COLUMN s BIGSERIAL;";
        assert_eq!(
            dialect_sql(sql, DbKind::Sqlite),
            "CREATE TABLE t (b BLOB);\nCREATE INDEX i ON t (b);\n-- postgres: ALTER TABLE t ADD COLUMN s BIGSERIAL;"
        );
        assert_eq!(
            dialect_sql(sql, DbKind::Postgres),
            "CREATE TABLE t (b BYTEA);\n-- sqlite: CREATE INDEX i ON t (b);\nALTER TABLE t ADD COLUMN s BIGSERIAL;"
        );
    }

    /// A two-connection `Db` on `url` with the table `t (id)`.
    async fn with_t(url: &str) -> Db {
        let m: &[MigrationSpec] = &[(1, "init", "CREATE TABLE t (id BIGINT PRIMARY KEY);")];
        let db = Db::connect(url, 2).await.expect("connect");
        db.migrate(&[m]).await.expect("migrate");
        db
    }

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

    /// Many writers on a two-connection pool, in transactions and as single statements, from
    /// two `Db`s on one file, all land: they share the file's writer and queue for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_writers_queue_without_starving_the_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/w.db", dir.path().display());
        let db = with_t(&url).await;
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
                    let mut conn = db.write_conn().await?;
                    sqlx::query("INSERT INTO t (id) VALUES ($1)")
                        .bind(i)
                        .execute(&mut *conn)
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

    /// A SQLite database at `file` with a table `b (id, v BLOB)`.
    async fn with_blobs(file: &Path) -> Db {
        let db = Db::connect(&format!("sqlite://{}", file.display()), 2)
            .await
            .expect("connect");
        let m: &[MigrationSpec] = &[(1, "init", "CREATE TABLE b (id BIGINT PRIMARY KEY, v BLOB);")];
        db.migrate(&[m]).await.expect("migrate");
        db
    }

    /// Commits leave their pages in the WAL (far below the commit-time checkpoint's
    /// threshold); the background checkpoint copies them into the database file.
    #[tokio::test]
    async fn sqlite_wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.db");
        let db = with_blobs(&file).await;
        let size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        let before = size();
        for i in 0..100i64 {
            let mut tx = db.begin_write().await.expect("begin");
            sqlx::query("INSERT INTO b (id, v) VALUES ($1, $2)")
                .bind(i)
                .bind(vec![7u8; 8192])
                .execute(&mut *tx)
                .await
                .expect("insert");
            tx.commit().await.expect("commit");
        }
        // 100 rows of 8 KiB: some 300 pages, all in the WAL until a checkpoint.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while size() < before + 800 * 1024 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never checkpointed: {} bytes, {before} before",
                size()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        db.close().await;
    }

    /// A burst leaves a WAL of several megabytes; once the file is quiet the WAL is emptied,
    /// and a closed database leaves none behind.
    #[tokio::test]
    async fn an_idle_or_closed_sqlite_file_keeps_no_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("w.db");
        let db = with_blobs(&file).await;
        let burst = |from: i64| {
            let db = db.clone();
            async move {
                // One transaction of 4 MiB: its pages are in the WAL at once.
                let mut tx = db.begin_write().await.expect("begin");
                for i in from..from + 512 {
                    sqlx::query("INSERT INTO b (id, v) VALUES ($1, $2)")
                        .bind(i)
                        .bind(vec![7u8; 8192])
                        .execute(&mut *tx)
                        .await
                        .expect("insert");
                }
                tx.commit().await.expect("commit");
            }
        };
        burst(0).await;
        let wal = || sqlite_file_bytes(&file).1;
        assert!(wal() > 2 << 20, "the burst is in the WAL: {} bytes", wal());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while wal() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the WAL of an idle file stayed at {} bytes",
                wal()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        burst(10_000).await;
        assert!(wal() > 2 << 20);
        assert_eq!(db.file_bytes().map(|b| b.1), Some(wal()));
        db.close().await;
        assert_eq!(wal(), 0, "closing truncates the WAL");
        let n: i64 = {
            let db = Db::connect(&format!("sqlite://{}", file.display()), 1)
                .await
                .expect("reopen");
            let n = sqlx::query_scalar("SELECT COUNT(*) FROM b")
                .fetch_one(&mut *db.read().await.expect("reader"))
                .await
                .expect("count");
            db.close().await;
            n
        };
        assert_eq!(n, 1024, "nothing was lost");
    }

    /// A write transaction dropped before its commit (an error, a cancelled request) is rolled
    /// back and leaves the writer usable; a committed one is seen by the readers.
    #[tokio::test]
    async fn sqlite_dropped_write_rolls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/r.db", dir.path().display());
        let db = with_t(&url).await;
        let count = |db: Db| async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM t")
                .fetch_one(&mut *db.read().await.expect("reader"))
                .await
                .expect("count")
        };
        {
            let mut tx = db.begin_write().await.expect("begin");
            sqlx::query("INSERT INTO t (id) VALUES (1)")
                .execute(&mut *tx)
                .await
                .expect("insert");
        }
        let mut tx = db.begin_write().await.expect("begin after a dropped one");
        sqlx::query("INSERT INTO t (id) VALUES (2)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        assert_eq!(count(db.clone()).await, 0, "uncommitted rows are not seen");
        tx.commit().await.expect("commit");
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t")
            .fetch_all(&mut *db.read().await.expect("reader"))
            .await
            .expect("ids");
        assert_eq!(ids, vec![2], "the dropped transaction's row is gone");
        let mut tx = db.begin_write().await.expect("begin");
        sqlx::query("INSERT INTO t (id) VALUES (3)")
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.rollback().await.expect("rollback");
        let mut conn = db.write_conn().await.expect("writer");
        sqlx::query("INSERT INTO t (id) VALUES (4)")
            .execute(&mut *conn)
            .await
            .expect("insert");
        drop(conn);
        assert_eq!(count(db.clone()).await, 2);
        assert!(matches!(
            Db::connect("sqlite::memory:", 1).await,
            Err(DbError::InMemory)
        ));
        db.close().await;
        assert!(matches!(
            db.write_conn().await,
            Err(sqlx::Error::PoolClosed)
        ));
        assert!(matches!(
            db.begin_write().await,
            Err(sqlx::Error::PoolClosed)
        ));
        assert!(matches!(db.read().await, Err(sqlx::Error::PoolClosed)));
    }

    /// A file deleted and made again while a `Db` on the old one lives is another file: a new
    /// `Db` on it writes there, not through the old file's writer.
    #[tokio::test]
    async fn sqlite_file_made_again_gets_its_own_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("again.db");
        let url = format!("sqlite://{}", file.display());
        let old = with_t(&url).await;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        let new = with_t(&url).await;
        sqlx::query("INSERT INTO t (id) VALUES (7)")
            .execute(&mut *new.write_conn().await.expect("writer"))
            .await
            .expect("insert");
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t")
            .fetch_all(&mut *new.read().await.expect("reader"))
            .await
            .expect("ids");
        assert_eq!(ids, vec![7]);
        drop(old);
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
