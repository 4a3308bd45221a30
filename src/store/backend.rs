//! Connection pools and the little that differs between SQLite and PostgreSQL.
//!
//! All SQL in the store is written once: both engines accept `$n`
//! placeholders, `RETURNING`, `ON CONFLICT`, partial indexes and row-value
//! comparisons, and the schema only uses `TEXT` and `BIGINT`. What remains
//! different is how a write transaction starts and how a row is locked, which
//! the [`Dialect`] trait covers, and the concrete pool/row types, which the
//! [`dispatch!`] macro covers by expanding an operation's body once per
//! backend.

use std::future::Future;
use std::path::Path;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Transaction;

use super::{StoreError, StoreOptions, Synchronous};

/// The pools behind a [`Store`](super::Store).
pub(crate) enum Backend {
    /// SQLite allows one writer at a time per file. Funnelling this process's
    /// writes through a single connection turns lock contention into a FIFO
    /// queue in the pool (instead of SQLite's sleep-and-retry busy handler),
    /// while readers use their own connections and, thanks to WAL, never
    /// wait for the writer. Other processes on the same file still
    /// coordinate through `busy_timeout`.
    Sqlite {
        writer: SqlitePool,
        reader: SqlitePool,
    },
    Postgres {
        pool: PgPool,
    },
}

/// Runs `$body` with `$pool` bound to the pool that fits the operation:
/// `write` for anything that modifies data, `read` for queries. The body is
/// compiled once per backend, so it may use driver-specific types through
/// inference while the SQL text stays shared.
macro_rules! dispatch {
    ($store:expr, write |$pool:ident| $body:expr) => {
        match &$store.inner.backend {
            $crate::store::backend::Backend::Sqlite { writer: $pool, .. } => $body,
            $crate::store::backend::Backend::Postgres { pool: $pool } => $body,
        }
    };
    ($store:expr, read |$pool:ident| $body:expr) => {
        match &$store.inner.backend {
            $crate::store::backend::Backend::Sqlite { reader: $pool, .. } => $body,
            $crate::store::backend::Backend::Postgres { pool: $pool } => $body,
        }
    };
}
pub(crate) use dispatch;

/// Transaction flavours and row locking, per backend.
pub(crate) trait Dialect {
    type Db: sqlx::Database;

    /// Appended to a `SELECT` that reads a row it is about to rewrite, so
    /// that concurrent writers (other replicas included) queue up behind it.
    /// SQLite needs nothing: a write transaction already excludes all other
    /// writers of the file.
    const LOCK_ROW: &'static str;

    /// A transaction that will write. On SQLite it takes the write lock up
    /// front (`BEGIN IMMEDIATE`): a deferred transaction that read first and
    /// then tried to write could fail with `SQLITE_BUSY` without waiting if
    /// another process committed in between.
    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send;

    /// A read-only transaction whose statements all see one snapshot, so a
    /// conversation and its turns are read consistently.
    fn begin_snapshot(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send;
}

impl Dialect for SqlitePool {
    type Db = sqlx::Sqlite;
    const LOCK_ROW: &'static str = "";

    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send {
        self.begin_with("BEGIN IMMEDIATE")
    }

    fn begin_snapshot(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send {
        // A deferred transaction pins its WAL snapshot at the first read.
        self.begin_with("BEGIN")
    }
}

impl Dialect for PgPool {
    type Db = sqlx::Postgres;
    const LOCK_ROW: &'static str = " FOR UPDATE";

    fn begin_write(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send {
        self.begin_with("BEGIN")
    }

    fn begin_snapshot(
        &self,
    ) -> impl Future<Output = Result<Transaction<'static, Self::Db>, sqlx::Error>> + Send {
        self.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    }
}

/// Typed column access shared by both row types, so that row-to-struct
/// conversions are written once.
pub(crate) trait RowGet {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
}

macro_rules! impl_row_get {
    ($row:ty) => {
        impl RowGet for $row {
            fn text(&self, col: &str) -> Result<String, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                Ok(sqlx::Row::try_get(self, col)?)
            }
        }
    };
}
impl_row_get!(SqliteRow);
impl_row_get!(PgRow);

/// A value to bind into dynamically assembled SQL (filters, `IN` lists).
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// Binds `args` in order onto `$query`, for either backend.
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for arg in $args {
            q = match arg {
                $crate::store::backend::Arg::Text(s) => q.bind(s.clone()),
                $crate::store::backend::Arg::Int(i) => q.bind(*i),
            };
        }
        q
    }};
}
pub(crate) use bind_all;

/// Opens the SQLite file at `path`, creating it (and its directory) if needed.
pub(crate) async fn open_sqlite(path: &Path, opts: &StoreOptions) -> Result<Backend, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::invalid(
                "target",
                format!(
                    "cannot create the data directory {}: {e}; choose a writable location",
                    dir.display()
                ),
            )
        })?;
    }
    let connect = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match opts.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(opts.busy_timeout)
        .foreign_keys(true);
    let cannot_open = |e: sqlx::Error| match StoreError::from(e) {
        StoreError::Backend(m) => StoreError::Unavailable(format!(
            "cannot open the SQLite database {}: {m}",
            path.display()
        )),
        other => other,
    };
    // The writer is opened first: it creates the file and switches it to WAL
    // before any reader looks at it.
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(opts.acquire_timeout)
        .test_before_acquire(false)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(connect.clone())
        .await
        .map_err(cannot_open)?;
    let reader = SqlitePoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .acquire_timeout(opts.acquire_timeout)
        .test_before_acquire(false)
        .connect_with(connect)
        .await
        .map_err(cannot_open)?;
    Ok(Backend::Sqlite { writer, reader })
}

/// Connects to the PostgreSQL database named by `url`.
pub(crate) async fn open_postgres(url: &str, opts: &StoreOptions) -> Result<Backend, StoreError> {
    let connect = PgConnectOptions::from_str(url)
        .map_err(|e| {
            StoreError::invalid(
                "target",
                format!(
                    "not a usable PostgreSQL URL ({e}); expected \
                     postgres://user:password@host:port/database"
                ),
            )
        })?
        .application_name("helpline");
    let (host, port) = (connect.get_host().to_owned(), connect.get_port());
    let pool = PgPoolOptions::new()
        .max_connections(opts.max_connections.max(1))
        .acquire_timeout(opts.acquire_timeout)
        .connect_with(connect)
        .await
        .map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot connect to PostgreSQL at {host}:{port}: {e}; check that the server is \
                 running and that the URL's host, port, user, password and database are right"
            ))
        })?;
    Ok(Backend::Postgres { pool })
}
