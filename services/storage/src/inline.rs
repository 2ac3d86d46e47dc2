//! SQLite run on the calling task's thread: a `sqlx` `Any` driver (URL scheme
//! `sqlite-inline:`) on `rusqlite`.
//!
//! `sqlx`'s own SQLite driver runs each connection on a thread of its own and hands it every
//! statement over a channel: two context switches and a wake-up per statement, where SQLite
//! itself takes 20-35 µs. On the appliance's checkout path that hand-off was half of the
//! process's CPU time (`bench/README.md`, "Checkout: profile"). Here a statement runs where
//! it is awaited, inside the poll, and its rows are ready when the future first polls.
//!
//! The services' code is unchanged: it holds an `AnyConnection` and uses `sqlx::query` as on
//! PostgreSQL. What differs:
//! - A statement blocks the runtime's thread while SQLite runs it. The writers of a file queue
//!   in the process ([`crate`]), readers never wait in WAL mode, and the long jobs (the
//!   background checkpoint, migrations) stay on `sqlx`'s threaded driver, so the wait is
//!   SQLite's own work. A write that meets another process's write lock waits in SQLite's
//!   busy handler on this thread, up to the busy timeout.
//! - No migrations through this driver: [`crate::Db::migrate`] uses `sqlx`'s.
//!
//! Values map as `sqlx`'s SQLite driver maps them for `Any`: integers are `BIGINT`, reals
//! `DOUBLE`, text and blobs as such; parameters are `$N` (or `?N`) by number, else by position.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use rusqlite::OpenFlags;
use rusqlite::types::{ToSqlOutput, ValueRef};
use sqlx::error::{DatabaseError, ErrorKind};
use sqlx::{Database, Either, Error, SqlStr, Transaction};
use sqlx_core::any::{
    AnyArguments, AnyColumn, AnyConnectOptions, AnyConnectionBackend, AnyQueryResult, AnyRow,
    AnyStatement, AnyTypeInfo, AnyTypeInfoKind, AnyValue, AnyValueKind,
};
use sqlx_core::ext::ustr::UStr;

/// The URL scheme of this driver.
pub const SCHEME: &str = "sqlite-inline";

/// Statements kept prepared per connection.
const STATEMENT_CACHE: usize = 256;

/// The driver, for `sqlx::any::install_drivers`.
pub const DRIVER: sqlx_core::any::driver::AnyDriver =
    sqlx_core::any::driver::AnyDriver::without_migrate::<InlineSqlite>();

/// The driver's `sqlx` database type. Only its connection is ever made: every row and value
/// goes out as `Any`'s, so the database's own row, value and statement types are empty.
#[derive(Debug)]
pub struct InlineSqlite;

impl Database for InlineSqlite {
    type Connection = InlineConnection;
    type TransactionManager = InlineTransactions;
    type Row = Never;
    type QueryResult = NoResult;
    type Column = Never;
    type TypeInfo = NoType;
    type Value = Never;
    type ValueRef<'r> = NeverRef<'r>;
    type Arguments = NoArguments;
    type ArgumentBuffer = ();
    type Statement = Never;
    const NAME: &'static str = "SQLite";
    const URL_SCHEMES: &'static [&'static str] = &[SCHEME];
}

/// A type with no values, for the database's row, column, value and statement.
#[derive(Debug, Clone, Copy)]
pub enum Never {}

/// [`Never`] as a borrowed value.
pub struct NeverRef<'r>(Never, std::marker::PhantomData<&'r ()>);

/// The database's type information: never asked for, as no value of its own exists.
#[derive(Debug, Clone, PartialEq)]
pub struct NoType;

impl std::fmt::Display for NoType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SQLite (inline)")
    }
}

impl sqlx::TypeInfo for NoType {
    fn is_null(&self) -> bool {
        false
    }
    fn name(&self) -> &str {
        "SQLite (inline)"
    }
}

#[derive(Debug, Default)]
pub struct NoResult;

impl Extend<NoResult> for NoResult {
    fn extend<T: IntoIterator<Item = NoResult>>(&mut self, _: T) {}
}

/// Arguments bound through the database type itself (never: they come as `Any`'s).
#[derive(Debug, Default)]
pub struct NoArguments;

impl sqlx::Arguments for NoArguments {
    type Database = InlineSqlite;
    fn reserve(&mut self, _: usize, _: usize) {}
    fn add<'t, T>(&mut self, _: T) -> Result<(), sqlx::error::BoxDynError>
    where
        T: sqlx::Encode<'t, InlineSqlite> + sqlx::Type<InlineSqlite>,
    {
        Err("the inline SQLite driver binds through `Any` only".into())
    }
    fn len(&self) -> usize {
        0
    }
}

impl sqlx::Row for Never {
    type Database = InlineSqlite;
    fn columns(&self) -> &[Never] {
        match *self {}
    }
    fn try_get_raw<I>(&self, _: I) -> Result<NeverRef<'_>, Error>
    where
        I: sqlx::ColumnIndex<Self>,
    {
        match *self {}
    }
}

impl sqlx::Column for Never {
    type Database = InlineSqlite;
    fn ordinal(&self) -> usize {
        match *self {}
    }
    fn name(&self) -> &str {
        match *self {}
    }
    fn type_info(&self) -> &NoType {
        match *self {}
    }
}

impl sqlx::Value for Never {
    type Database = InlineSqlite;
    fn as_ref(&self) -> NeverRef<'_> {
        match *self {}
    }
    fn type_info(&self) -> Cow<'_, NoType> {
        match *self {}
    }
    fn is_null(&self) -> bool {
        match *self {}
    }
}

impl<'r> sqlx::ValueRef<'r> for NeverRef<'r> {
    type Database = InlineSqlite;
    fn to_owned(&self) -> Never {
        match self.0 {}
    }
    fn type_info(&self) -> Cow<'_, NoType> {
        match self.0 {}
    }
    fn is_null(&self) -> bool {
        match self.0 {}
    }
}

impl sqlx::Statement for Never {
    type Database = InlineSqlite;
    fn into_sql(self) -> SqlStr {
        match self {}
    }
    fn sql(&self) -> &SqlStr {
        match *self {}
    }
    fn parameters(&self) -> Option<Either<&[NoType], usize>> {
        match *self {}
    }
    fn columns(&self) -> &[Never] {
        match *self {}
    }
    fn query(&self) -> sqlx::query::Query<'_, InlineSqlite, NoArguments> {
        match *self {}
    }
    fn query_with<A>(&self, _: A) -> sqlx::query::Query<'_, InlineSqlite, A>
    where
        A: sqlx::IntoArguments<InlineSqlite>,
    {
        match *self {}
    }
    fn query_as<O>(&self) -> sqlx::query::QueryAs<'_, InlineSqlite, O, NoArguments>
    where
        O: for<'r> sqlx::FromRow<'r, Never>,
    {
        match *self {}
    }
    fn query_as_with<'s, O, A>(&'s self, _: A) -> sqlx::query::QueryAs<'s, InlineSqlite, O, A>
    where
        O: for<'r> sqlx::FromRow<'r, Never>,
        A: sqlx::IntoArguments<InlineSqlite>,
    {
        match *self {}
    }
    fn query_scalar<O>(&self) -> sqlx::query::QueryScalar<'_, InlineSqlite, O, NoArguments>
    where
        (O,): for<'r> sqlx::FromRow<'r, Never>,
    {
        match *self {}
    }
    fn query_scalar_with<'s, O, A>(
        &'s self,
        _: A,
    ) -> sqlx::query::QueryScalar<'s, InlineSqlite, O, A>
    where
        (O,): for<'r> sqlx::FromRow<'r, Never>,
        A: sqlx::IntoArguments<InlineSqlite>,
    {
        match *self {}
    }
}

/// Where to open: the file and whether read-only (`?mode=ro`) or creating (`?mode=rwc`).
#[derive(Debug, Clone)]
pub struct InlineOptions {
    file: String,
    flags: OpenFlags,
}

impl FromStr for InlineOptions {
    type Err = Error;
    fn from_str(url: &str) -> Result<Self, Error> {
        let rest = url
            .strip_prefix("sqlite-inline://")
            .or_else(|| url.strip_prefix("sqlite-inline:"))
            .ok_or_else(|| Error::Configuration(format!("not a {SCHEME}: URL").into()))?;
        let (file, query) = rest.split_once('?').unwrap_or((rest, ""));
        let base = OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let mut flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("mode", "ro")) => flags = base | OpenFlags::SQLITE_OPEN_READ_ONLY,
                Some(("mode", "rw")) => flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE,
                Some(("mode", "rwc")) => {
                    flags = base | OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
                }
                _ => {
                    return Err(Error::Configuration(
                        format!("{SCHEME}: takes only mode=ro|rw|rwc, not `{pair}`").into(),
                    ));
                }
            }
        }
        if file.is_empty() {
            return Err(Error::Configuration(
                format!("{SCHEME}: needs a file").into(),
            ));
        }
        Ok(InlineOptions {
            file: file.to_owned(),
            flags,
        })
    }
}

impl<'a> TryFrom<&'a AnyConnectOptions> for InlineOptions {
    type Error = Error;
    fn try_from(opts: &'a AnyConnectOptions) -> Result<Self, Error> {
        opts.database_url.as_str().parse()
    }
}

impl sqlx::ConnectOptions for InlineOptions {
    type Connection = InlineConnection;

    fn from_url(url: &url::Url) -> Result<Self, Error> {
        url.as_str().parse()
    }

    async fn connect(&self) -> Result<InlineConnection, Error> {
        InlineConnection::open(self)
    }

    fn log_statements(self, _: log::LevelFilter) -> Self {
        self
    }

    fn log_slow_statements(self, _: log::LevelFilter, _: std::time::Duration) -> Self {
        self
    }
}

/// One SQLite connection, used on the thread that awaits it.
pub struct InlineConnection {
    conn: rusqlite::Connection,
    /// Open transactions: 1 for a transaction, more for savepoints inside it.
    depth: usize,
    /// Per persistent statement, by its text as the caller wrote it: the text as prepared and
    /// its columns' names, so a statement run again is neither rewritten nor has its column
    /// names read and allocated again. FxHash: the keys are the services' own statements.
    shapes: rustc_hash::FxHashMap<Box<str>, Arc<Shape>>,
}

/// What a persistent statement's runs share: its text as prepared (`$N` written `?N`), and its
/// columns' names with the name-to-index map its rows carry. A statement's columns change only
/// with the schema, and the schema changes in migrations, which run on `sqlx`'s own driver
/// before these connections serve; a column count that differs all the same is noticed and the
/// shape read again.
struct Shape {
    sql: Box<str>,
    names: Vec<UStr>,
    column_names: Arc<sqlx_core::HashMap<UStr, usize>>,
}

impl Shape {
    /// The shape of `stmt`, prepared from `sql`, as it is now.
    fn of(stmt: &rusqlite::Statement<'_>, sql: &str) -> Shape {
        let names: Vec<UStr> = (0..stmt.column_count())
            .map(|i| UStr::new(stmt.column_name(i).unwrap_or("")))
            .collect();
        let column_names = Arc::new(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
        );
        Shape {
            sql: sql.into(),
            names,
            column_names,
        }
    }
}

impl std::fmt::Debug for InlineConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineConnection")
            .field("path", &self.conn.path())
            .field("depth", &self.depth)
            .finish()
    }
}

impl InlineConnection {
    fn open(opts: &InlineOptions) -> Result<Self, Error> {
        let conn = rusqlite::Connection::open_with_flags(&opts.file, opts.flags)
            .map_err(|e| Error::Configuration(format!("opening {}: {e}", opts.file).into()))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(InlineConnection {
            conn,
            depth: 0,
            shapes: Default::default(),
        })
    }

    /// Runs `sql` with `args`, up to `limit` rows: the rows and the rows it changed.
    fn run(
        &mut self,
        sql: &str,
        persistent: bool,
        args: Option<AnyArguments>,
        limit: Option<usize>,
    ) -> Result<(Vec<AnyRow>, u64), Error> {
        let started =
            tracing::enabled!(target: "sqlx::query", tracing::Level::DEBUG).then(Instant::now);
        let out = self.run_inner(sql, persistent, args, limit);
        if let Some(t) = started {
            let (rows, changed) = match &out {
                Ok((r, c)) => (r.len(), *c),
                Err(_) => (0, 0),
            };
            tracing::debug!(
                target: "sqlx::query",
                summary = %summary(sql),
                db.statement = sql,
                rows_affected = changed,
                rows_returned = rows,
                elapsed_secs = t.elapsed().as_secs_f64(),
            );
        }
        out
    }

    fn run_inner(
        &mut self,
        sql: &str,
        persistent: bool,
        args: Option<AnyArguments>,
        limit: Option<usize>,
    ) -> Result<(Vec<AnyRow>, u64), Error> {
        let known = if persistent {
            self.shapes.get(sql).cloned()
        } else {
            None
        };
        let text = match &known {
            Some(shape) => Cow::Borrowed(&*shape.sql),
            None => numbered(sql),
        };
        let prepared = if persistent {
            self.conn.prepare_cached(&text).map(Prepared::Cached)
        } else {
            self.conn.prepare(&text).map(Prepared::Once)
        };
        let mut stmt = match prepared {
            Ok(s) => s,
            // Several statements (a script) take no arguments and return no rows.
            Err(rusqlite::Error::MultipleStatement) if args_len(&args) == 0 => {
                self.conn.execute_batch(&text).map_err(map_error)?;
                return Ok((Vec::new(), self.conn.changes()));
            }
            Err(e) => return Err(map_error(e)),
        };
        let stmt = stmt.get();
        bind(stmt, args)?;
        let count = stmt.column_count();
        // Checked again against the first row's statement (`checked`).
        let mut shape = match &known {
            Some(shape) if shape.names.len() == count => shape.clone(),
            _ => Arc::new(Shape::of(stmt, &text)),
        };
        let mut checked = false;
        let readonly = stmt.readonly();
        let mut out = Vec::new();
        let mut rows = stmt.raw_query();
        // A statement that writes is stepped to its end whatever `limit` says: in autocommit
        // mode its change commits on the step that finishes it, and only that step reports a
        // commit that fails (a full disk, a deferred constraint). Left unfinished, the
        // statement is reset on drop, which rolls the change back and drops the error: the
        // caller would be told of a write that did not happen.
        while let Some(row) = rows.next().map_err(map_error)? {
            if limit.is_some_and(|l| out.len() >= l) {
                continue;
            }
            // SQLite prepares a statement again on its first step after the schema changed, and
            // a `*` may then stand for other columns: the shape is read again from the row's
            // statement, as it now is.
            if !checked && row.as_ref().column_count() != shape.names.len() {
                shape = Arc::new(Shape::of(row.as_ref(), &text));
            }
            checked = true;
            let count = shape.names.len();
            let column_names = shape.column_names.clone();
            let mut columns = Vec::with_capacity(count);
            let mut values = Vec::with_capacity(count);
            for (i, name) in shape.names.iter().enumerate() {
                let kind = match row.get_ref(i).map_err(map_error)? {
                    ValueRef::Null => AnyValueKind::Null(AnyTypeInfoKind::Null),
                    ValueRef::Integer(v) => AnyValueKind::BigInt(v),
                    ValueRef::Real(v) => AnyValueKind::Double(v),
                    ValueRef::Text(t) => AnyValueKind::Text(Arc::new(
                        String::from_utf8(t.to_vec()).map_err(|e| Error::ColumnDecode {
                            index: name.to_string(),
                            source: Box::new(e),
                        })?,
                    )),
                    ValueRef::Blob(b) => AnyValueKind::Blob(Arc::new(b.to_vec())),
                };
                columns.push(AnyColumn {
                    ordinal: i,
                    name: name.clone(),
                    type_info: AnyTypeInfo {
                        kind: type_kind(&kind),
                    },
                });
                values.push(AnyValue { kind });
            }
            out.push(AnyRow {
                column_names,
                columns,
                values,
            });
            if readonly && limit.is_some_and(|l| out.len() >= l) {
                break;
            }
        }
        drop(rows);
        if persistent && !self.shapes.get(sql).is_some_and(|s| Arc::ptr_eq(s, &shape)) {
            if self.shapes.len() >= STATEMENT_CACHE {
                self.shapes.clear();
            }
            self.shapes.insert(sql.into(), shape);
        }
        let changed = if readonly { 0 } else { self.conn.changes() };
        Ok((out, changed))
    }

    fn exec(&mut self, sql: &str) -> Result<(), Error> {
        self.run(sql, false, None, None).map(|_| ())
    }

    fn begin_now(&mut self, statement: Option<SqlStr>) -> Result<(), Error> {
        match (self.depth, statement) {
            (0, Some(s)) => self.exec(s.as_str())?,
            (0, None) => self.exec("BEGIN")?,
            (_, Some(_)) => return Err(Error::InvalidSavePointStatement),
            (d, None) => self.exec(&format!("SAVEPOINT _sqlx_savepoint_{d}"))?,
        }
        self.depth += 1;
        Ok(())
    }

    fn commit_now(&mut self) -> Result<(), Error> {
        match self.depth {
            0 => return Ok(()),
            1 => self.exec("COMMIT")?,
            d => self.exec(&format!("RELEASE SAVEPOINT _sqlx_savepoint_{}", d - 1))?,
        }
        self.depth -= 1;
        Ok(())
    }

    fn rollback_now(&mut self) -> Result<(), Error> {
        let r = match self.depth {
            0 => return Ok(()),
            1 => self.exec("ROLLBACK"),
            d => self.exec(&format!("ROLLBACK TO SAVEPOINT _sqlx_savepoint_{}", d - 1)),
        };
        // A failed ROLLBACK leaves nothing to roll back to: SQLite ended it or never began it.
        self.depth -= 1;
        r
    }
}

/// A prepared statement, kept in the connection's cache or for this run only.
enum Prepared<'c> {
    Cached(rusqlite::CachedStatement<'c>),
    Once(rusqlite::Statement<'c>),
}

impl<'c> Prepared<'c> {
    fn get(&mut self) -> &mut rusqlite::Statement<'c> {
        match self {
            Prepared::Cached(s) => s,
            Prepared::Once(s) => s,
        }
    }
}

fn args_len(args: &Option<AnyArguments>) -> usize {
    args.as_ref().map_or(0, |a| a.values.0.len())
}

/// `sql` with each `$N` parameter written `?N`, outside quotes and comments. SQLite gives
/// `?N` the index N itself, so binding needs no lookup of the parameter's name (a linear scan
/// per parameter in SQLite: a 16,000-parameter insert spent 70 % of its time there).
fn numbered(sql: &str) -> Cow<'_, str> {
    let b = sql.as_bytes();
    if !b.contains(&b'$') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            // A string, a quoted name: to the closing quote (a doubled one stays inside).
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    i += 1;
                }
                i += 2;
            }
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                out.push_str(&sql[copied..i]);
                out.push('?');
                i += 1;
                copied = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    Cow::Owned(out)
}

/// Binds the statement's parameters by index: `$N` (written `?N` by [`numbered`]) and `?N`
/// to the N-th argument, any other to the argument at its position, as `sqlx`'s SQLite
/// driver does.
fn bind(stmt: &mut rusqlite::Statement<'_>, args: Option<AnyArguments>) -> Result<(), Error> {
    let values = args.map(|a| a.values.0).unwrap_or_default();
    let count = stmt.parameter_count();
    for i in 1..=count {
        let value = values.get(i - 1).ok_or_else(|| {
            Error::Protocol(format!(
                "the statement has parameter {i}, and {} arguments were bound",
                values.len()
            ))
        })?;
        let out = match value {
            AnyValueKind::Null(_) => ToSqlOutput::Borrowed(ValueRef::Null),
            AnyValueKind::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            AnyValueKind::SmallInt(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*v))),
            AnyValueKind::Integer(v) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*v))),
            AnyValueKind::BigInt(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            AnyValueKind::Real(v) => ToSqlOutput::Borrowed(ValueRef::Real(f64::from(*v))),
            AnyValueKind::Double(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            AnyValueKind::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            AnyValueKind::TextSlice(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            AnyValueKind::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            other => {
                return Err(Error::Protocol(format!(
                    "the inline SQLite driver cannot bind {other:?}"
                )));
            }
        };
        stmt.raw_bind_parameter(i, out).map_err(map_error)?;
    }
    Ok(())
}

fn type_kind(v: &AnyValueKind) -> AnyTypeInfoKind {
    match v {
        AnyValueKind::BigInt(_) => AnyTypeInfoKind::BigInt,
        AnyValueKind::Double(_) => AnyTypeInfoKind::Double,
        AnyValueKind::Text(_) => AnyTypeInfoKind::Text,
        AnyValueKind::Blob(_) => AnyTypeInfoKind::Blob,
        _ => AnyTypeInfoKind::Null,
    }
}

/// The statement's first words, for the log (as `sqlx` logs a summary).
fn summary(sql: &str) -> String {
    sql.split_whitespace().take(4).collect::<Vec<_>>().join(" ")
}

/// A SQLite error as `sqlx`'s SQLite driver reports it: its extended code, and the kind a
/// constraint violation is.
#[derive(Debug)]
struct InlineError {
    code: i32,
    message: String,
}

impl std::fmt::Display for InlineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for InlineError {}

impl DatabaseError for InlineError {
    fn message(&self) -> &str {
        &self.message
    }
    fn code(&self) -> Option<Cow<'_, str>> {
        Some(self.code.to_string().into())
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

fn map_error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::SqliteFailure(f, message) => Error::Database(Box::new(InlineError {
            code: f.extended_code,
            message: message.unwrap_or_else(|| f.to_string()),
        })),
        other => Error::AnyDriverError(Box::new(other)),
    }
}

impl sqlx::Connection for InlineConnection {
    type Database = InlineSqlite;
    type Options = InlineOptions;

    fn close(self) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        let r = self.conn.close().map_err(|(_, e)| map_error(e));
        async move { r }
    }

    fn close_hard(self) -> impl std::future::Future<Output = Result<(), Error>> + Send + 'static {
        drop(self);
        async { Ok(()) }
    }

    async fn ping(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn begin(
        &mut self,
    ) -> impl std::future::Future<Output = Result<Transaction<'_, InlineSqlite>, Error>> + Send + '_
    {
        Transaction::begin(self, None)
    }

    fn shrink_buffers(&mut self) {}

    async fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn should_flush(&self) -> bool {
        false
    }
}

/// Transactions and savepoints, run at once on the connection.
pub struct InlineTransactions;

impl sqlx_core::transaction::TransactionManager for InlineTransactions {
    type Database = InlineSqlite;

    fn begin(
        conn: &mut InlineConnection,
        statement: Option<SqlStr>,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + '_ {
        let r = conn.begin_now(statement);
        async move { r }
    }

    fn commit(
        conn: &mut InlineConnection,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + '_ {
        let r = conn.commit_now();
        async move { r }
    }

    fn rollback(
        conn: &mut InlineConnection,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + '_ {
        let r = conn.rollback_now();
        async move { r }
    }

    fn start_rollback(conn: &mut InlineConnection) {
        if let Err(e) = conn.rollback_now() {
            tracing::debug!(error = %e, "rolling back a dropped transaction");
        }
    }

    fn get_transaction_depth(conn: &InlineConnection) -> usize {
        conn.depth
    }
}

impl AnyConnectionBackend for InlineConnection {
    fn name(&self) -> &str {
        InlineSqlite::NAME
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, sqlx::Result<()>> {
        Box::pin(sqlx::Connection::close(*self))
    }

    fn close_hard(self: Box<Self>) -> BoxFuture<'static, sqlx::Result<()>> {
        Box::pin(sqlx::Connection::close_hard(*self))
    }

    fn ping(&mut self) -> BoxFuture<'_, sqlx::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn begin(&mut self, statement: Option<SqlStr>) -> BoxFuture<'_, sqlx::Result<()>> {
        let r = self.begin_now(statement);
        Box::pin(async move { r })
    }

    fn commit(&mut self) -> BoxFuture<'_, sqlx::Result<()>> {
        let r = self.commit_now();
        Box::pin(async move { r })
    }

    fn rollback(&mut self) -> BoxFuture<'_, sqlx::Result<()>> {
        let r = self.rollback_now();
        Box::pin(async move { r })
    }

    fn start_rollback(&mut self) {
        <InlineTransactions as sqlx_core::transaction::TransactionManager>::start_rollback(self)
    }

    fn get_transaction_depth(&self) -> usize {
        self.depth
    }

    fn shrink_buffers(&mut self) {}

    fn flush(&mut self) -> BoxFuture<'_, sqlx::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn should_flush(&self) -> bool {
        false
    }

    fn fetch_many(
        &mut self,
        query: SqlStr,
        persistent: bool,
        arguments: Option<AnyArguments>,
    ) -> BoxStream<'_, sqlx::Result<Either<AnyQueryResult, AnyRow>>> {
        let persistent = persistent && arguments.is_some();
        let items: Vec<sqlx::Result<Either<AnyQueryResult, AnyRow>>> =
            match self.run(query.as_str(), persistent, arguments, None) {
                Ok((rows, changed)) => rows
                    .into_iter()
                    .map(|r| Ok(Either::Right(r)))
                    .chain(std::iter::once(Ok(Either::Left(AnyQueryResult {
                        rows_affected: changed,
                        last_insert_id: None,
                    }))))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
        Box::pin(futures::stream::iter(items))
    }

    fn fetch_optional(
        &mut self,
        query: SqlStr,
        persistent: bool,
        arguments: Option<AnyArguments>,
    ) -> BoxFuture<'_, sqlx::Result<Option<AnyRow>>> {
        let persistent = persistent && arguments.is_some();
        let r = self
            .run(query.as_str(), persistent, arguments, Some(1))
            .map(|(rows, _)| rows.into_iter().next());
        Box::pin(async move { r })
    }

    fn prepare_with<'c, 'q: 'c>(
        &'c mut self,
        sql: SqlStr,
        _parameters: &[AnyTypeInfo],
    ) -> BoxFuture<'c, sqlx::Result<AnyStatement>> {
        let r = (|| {
            let stmt = self
                .conn
                .prepare_cached(&numbered(sql.as_str()))
                .map_err(map_error)?;
            let columns: Vec<AnyColumn> = (0..stmt.column_count())
                .map(|i| AnyColumn {
                    ordinal: i,
                    name: UStr::new(stmt.column_name(i).unwrap_or("")),
                    type_info: AnyTypeInfo {
                        kind: AnyTypeInfoKind::Null,
                    },
                })
                .collect();
            let column_names = Arc::new(
                columns
                    .iter()
                    .map(|c| (c.name.clone(), c.ordinal))
                    .collect(),
            );
            Ok(AnyStatement {
                parameters: Some(Either::Right(stmt.parameter_count())),
                sql,
                column_names,
                columns,
            })
        })();
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use sqlx::{AnyConnection, AssertSqlSafe, Connection, Executor, Row};

    use super::numbered;

    async fn open(dir: &tempfile::TempDir, mode: &str) -> AnyConnection {
        crate::install_drivers();
        let url = format!(
            "sqlite-inline://{}?mode={mode}",
            dir.path().join("t.db").display()
        );
        AnyConnection::connect(&url).await.expect("connect")
    }

    #[test]
    fn dollar_parameters_are_numbered_outside_quotes_and_comments() {
        assert_eq!(numbered("SELECT 1"), "SELECT 1");
        assert!(matches!(numbered("SELECT 1"), Cow::Borrowed(_)));
        assert_eq!(
            numbered("SELECT $1, '$2', \"$3\", $10 -- $4\n/* $5 */ + $6, 'it''s $7', $x"),
            "SELECT ?1, '$2', \"$3\", ?10 -- $4\n/* $5 */ + ?6, 'it''s $7', $x"
        );
        assert_eq!(numbered("'unterminated $1"), "'unterminated $1");
        assert_eq!(numbered("a = $"), "a = $");
    }

    #[tokio::test]
    async fn a_statement_of_thousands_of_parameters_binds_each_to_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = open(&dir, "rwc").await;
        c.execute("CREATE TABLE w (a BIGINT, b BIGINT)")
            .await
            .expect("table");
        let rows = 8_000;
        let sql = format!(
            "INSERT INTO w (a, b) VALUES {}",
            crate::placeholders(1, rows, 2)
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for i in 0..rows as i64 {
            q = q.bind(i).bind(-i);
        }
        let done = q.execute(&mut c).await.expect("16,000 parameters");
        assert_eq!(done.rows_affected(), rows as u64);
        let sum: i64 = sqlx::query_scalar("SELECT SUM(a + b) + COUNT(*) FROM w WHERE a = -b")
            .fetch_one(&mut c)
            .await
            .expect("sum");
        assert_eq!(
            sum, rows as i64,
            "every row's values bound to its own parameters"
        );
    }

    /// A statement run again reuses its shape (its text as prepared, its columns' names):
    /// every run's rows still carry the right names and values, and a statement whose columns
    /// changed under the same text (`SELECT *` after a column is added) is read afresh.
    #[tokio::test]
    async fn a_statement_run_again_keeps_its_columns_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = open(&dir, "rwc").await;
        c.execute("CREATE TABLE s (a TEXT, b BIGINT)")
            .await
            .expect("table");
        c.execute("INSERT INTO s VALUES ('x', 1), ('y', 2)")
            .await
            .expect("rows");
        for (key, n) in [("x", 1_i64), ("y", 2), ("x", 1)] {
            let row = sqlx::query("SELECT b, a FROM s WHERE a = $1")
                .bind(key)
                .fetch_one(&mut c)
                .await
                .expect("row");
            assert_eq!(row.try_get::<i64, _>("b").expect("b"), n);
            assert_eq!(row.try_get::<String, _>("a").expect("a"), key);
        }
        let all = "SELECT * FROM s WHERE a = $1";
        let row = sqlx::query(all)
            .bind("y")
            .fetch_one(&mut c)
            .await
            .expect("row");
        assert!(row.try_get::<i64, _>("z").is_err());
        c.execute("ALTER TABLE s ADD COLUMN z BIGINT NOT NULL DEFAULT 7")
            .await
            .expect("alter");
        let row = sqlx::query(all)
            .bind("y")
            .fetch_one(&mut c)
            .await
            .expect("row");
        assert_eq!(row.try_get::<i64, _>("z").expect("the new column"), 7);
        assert_eq!(row.try_get::<i64, _>("b").expect("b"), 2);
    }
    #[tokio::test]
    async fn binds_by_number_and_maps_values_as_sqlx_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = open(&dir, "rwc").await;
        c.execute(
            "CREATE TABLE t (id TEXT PRIMARY KEY, n BIGINT NOT NULL, r DOUBLE PRECISION, b BLOB, o TEXT); \
             CREATE INDEX t_n ON t (n);",
        )
        .await
        .expect("a script of two statements");
        // `$2` before `$1`, and `$1` twice: bound by number, not by position.
        let done = sqlx::query("INSERT INTO t (n, id, r, b, o) VALUES ($2, $1, $3, $4, $5), ($2 + 1, $1 || 'x', NULL, NULL, NULL)")
            .bind("a")
            .bind(41_i64)
            .bind(1.5_f64)
            .bind(vec![0_u8, 255])
            .bind(Option::<String>::None)
            .execute(&mut c)
            .await
            .expect("insert");
        assert_eq!(done.rows_affected(), 2);
        let row =
            sqlx::query("SELECT id, n, r, b, o, COUNT(*) OVER () AS total FROM t WHERE id = $1")
                .bind("a")
                .fetch_one(&mut c)
                .await
                .expect("row");
        assert_eq!(row.try_get::<String, _>("id").expect("id"), "a");
        assert_eq!(row.try_get::<i64, _>("n").expect("n"), 41);
        assert_eq!(row.try_get::<i32, _>(1).expect("n as i32"), 41);
        assert_eq!(row.try_get::<f64, _>("r").expect("r"), 1.5);
        assert_eq!(row.try_get::<Vec<u8>, _>("b").expect("b"), vec![0, 255]);
        assert_eq!(row.try_get::<Option<String>, _>("o").expect("o"), None);
        assert_eq!(row.try_get::<i64, _>("total").expect("total"), 1);
        assert!(
            row.try_get::<String, _>("n").is_err(),
            "an integer is not text"
        );
        assert!(row.try_get::<i64, _>("missing").is_err());
        // RETURNING more than one row; fetch_optional takes the first and the change is made.
        let ids: Vec<String> = sqlx::query_scalar("UPDATE t SET n = n + 10 RETURNING id")
            .fetch_all(&mut c)
            .await
            .expect("returning");
        assert_eq!(ids.len(), 2);
        let none: Option<i64> = sqlx::query_scalar("SELECT n FROM t WHERE id = $1")
            .bind("nobody")
            .fetch_optional(&mut c)
            .await
            .expect("no row");
        assert_eq!(none, None);
        let missing = sqlx::query("SELECT $1, $2")
            .bind(1_i64)
            .execute(&mut c)
            .await;
        assert!(missing.is_err(), "an unbound parameter is refused");
    }

    /// A write whose commit fails on its last step (here a deferred foreign key; in production
    /// a full disk) is an error even when the caller wants one row of its RETURNING, and the
    /// row is not there afterwards.
    #[tokio::test]
    async fn a_returning_write_whose_commit_fails_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = open(&dir, "rwc").await;
        c.execute("PRAGMA foreign_keys = ON").await.expect("pragma");
        c.execute("CREATE TABLE parent (id BIGINT PRIMARY KEY)")
            .await
            .expect("parent");
        c.execute(
            "CREATE TABLE child (id BIGINT PRIMARY KEY, \
             p BIGINT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .await
        .expect("child");
        let one: Result<Option<i64>, _> =
            sqlx::query_scalar("INSERT INTO child (id, p) VALUES (1, 99) RETURNING id")
                .fetch_optional(&mut c)
                .await;
        assert!(one.is_err(), "the failed commit is reported: {one:?}");
        let first: Result<i64, _> =
            sqlx::query_scalar("INSERT INTO child (id, p) VALUES (2, 99) RETURNING id")
                .fetch_one(&mut c)
                .await;
        assert!(first.is_err(), "fetch_one too: {first:?}");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM child")
            .fetch_one(&mut c)
            .await
            .expect("count");
        assert_eq!(n, 0, "nothing was written");
        c.execute("INSERT INTO parent (id) VALUES (99)")
            .await
            .expect("parent row");
        let ok: Option<i64> =
            sqlx::query_scalar("INSERT INTO child (id, p) VALUES (3, 99) RETURNING id")
                .fetch_optional(&mut c)
                .await
                .expect("a valid write");
        assert_eq!(ok, Some(3));
    }

    #[tokio::test]
    async fn reports_constraints_and_runs_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = open(&dir, "rwc").await;
        c.execute("CREATE TABLE t (id BIGINT PRIMARY KEY, v TEXT NOT NULL UNIQUE)")
            .await
            .expect("create");
        sqlx::query("INSERT INTO t VALUES (1, 'one')")
            .execute(&mut c)
            .await
            .expect("insert");
        let dup = sqlx::query("INSERT INTO t VALUES (2, 'one')")
            .execute(&mut c)
            .await;
        let err = dup.expect_err("a duplicate");
        assert!(crate::is_unique_violation(&err), "{err}");
        assert_eq!(
            err.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("2067")
        );
        let null = sqlx::query("INSERT INTO t VALUES (3, NULL)")
            .execute(&mut c)
            .await;
        assert!(
            null.expect_err("not null")
                .as_database_error()
                .is_some_and(|d| d.is_check_violation()
                    || d.kind() == sqlx::error::ErrorKind::NotNullViolation)
        );

        let mut tx = c.begin().await.expect("begin");
        sqlx::query("INSERT INTO t VALUES (4, 'four')")
            .execute(&mut *tx)
            .await
            .expect("in tx");
        {
            let mut sp = tx.begin().await.expect("savepoint");
            sqlx::query("INSERT INTO t VALUES (5, 'five')")
                .execute(&mut *sp)
                .await
                .expect("in savepoint");
            sp.rollback().await.expect("to savepoint");
        }
        tx.commit().await.expect("commit");
        {
            let mut tx = c.begin().await.expect("begin");
            sqlx::query("INSERT INTO t VALUES (6, 'six')")
                .execute(&mut *tx)
                .await
                .expect("in tx");
            // Dropped: rolled back.
        }
        let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id")
            .fetch_all(&mut c)
            .await
            .expect("ids");
        assert_eq!(ids, vec![1, 4]);
        drop(c);

        let mut ro = open(&dir, "ro").await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut ro)
            .await
            .expect("read-only read");
        assert_eq!(n, 2);
        assert!(
            sqlx::query("DELETE FROM t").execute(&mut ro).await.is_err(),
            "read-only"
        );
    }
}
