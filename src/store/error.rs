//! Store errors, shaped so that a handler can pick an HTTP status without
//! looking at database details.

/// Everything that can go wrong in the store.
///
/// The variants follow what the caller should do about it rather than where
/// the error came from: fix the request (`Invalid`), ask for something else
/// (`NotFound`, `Conflict`), retry later (`Unavailable`), or report a bug or
/// a damaged database (`Backend`). Messages never contain connection
/// passwords.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store failure: {0}")]
    Backend(String),
}

impl StoreError {
    /// The HTTP status a server should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            StoreError::NotFound { .. } => 404,
            StoreError::Conflict(_) => 409,
            StoreError::Invalid { .. } => 400,
            StoreError::Unavailable(_) => 503,
            StoreError::Backend(_) => 500,
        }
    }

    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> StoreError {
        StoreError::Invalid {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(what: &'static str, id: impl Into<String>) -> StoreError {
        StoreError::NotFound {
            what,
            id: id.into(),
        }
    }
}

/// Sorts driver errors into "try again later" and "something is wrong".
///
/// Busy/locked SQLite files, full disks, lost connections, exhausted pools and
/// PostgreSQL's operator/resource/serialization errors are transient from the
/// caller's point of view, so they become `Unavailable` (HTTP 503, retry).
/// Constraint violations that reach this point mean two writers raced on the
/// same key, hence `Conflict`.
impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> StoreError {
        use sqlx::Error as E;
        match err {
            E::PoolTimedOut => StoreError::Unavailable(
                "timed out waiting for a database connection; the database is slow or \
                 overloaded (raise max_connections or acquire_timeout if this persists)"
                    .into(),
            ),
            E::PoolClosed => StoreError::Unavailable("the store is shutting down".into()),
            E::Io(e) => StoreError::Unavailable(format!("database connection failed: {e}")),
            E::Tls(e) => StoreError::Unavailable(format!("database TLS failure: {e}")),
            E::WorkerCrashed => {
                StoreError::Unavailable("the SQLite worker thread stopped unexpectedly".into())
            }
            E::Protocol(p) => StoreError::Unavailable(format!("database protocol error: {p}")),
            E::Database(db) => classify_database_error(db.as_ref()),
            other => StoreError::Backend(other.to_string()),
        }
    }
}

fn classify_database_error(db: &dyn sqlx::error::DatabaseError) -> StoreError {
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let message = db.message().to_owned();
    // SQLite reports numeric (extended) result codes; the low byte is the
    // primary code. PostgreSQL reports five-character SQLSTATEs.
    // PostgreSQL's SQLSTATEs are often all digits too (23505, 55000), so the driver decides.
    let postgres = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some();
    if let (false, Ok(n)) = (postgres, code.parse::<i32>()) {
        return match n & 0xff {
            5 | 6 => StoreError::Unavailable(format!(
                "the SQLite database is locked by another writer ({message}); retry, or raise \
                 busy_timeout"
            )),
            13 => StoreError::Unavailable(format!("the disk is full ({message})")),
            10 | 14 => StoreError::Unavailable(format!("SQLite I/O error: {message}")),
            19 => StoreError::Conflict(message),
            _ => StoreError::Backend(format!("SQLite error {n}: {message}")),
        };
    }
    // 55000 with a new connection: the database is not accepting connections (`ALLOW_CONNECTIONS
    // false`, a maintenance window); 3D000: it is not there; class 28: the login is refused. All
    // are the store being unreachable, not the request being wrong.
    if matches!(code.as_str(), "55000" | "3D000") || code.starts_with("28") {
        return StoreError::Unavailable(format!("PostgreSQL cannot be reached ({code}: {message}); retry"));
    }
    match code.get(..2) {
        Some("08") | Some("53") | Some("57") | Some("40") => {
            StoreError::Unavailable(format!("PostgreSQL error {code}: {message}; retry"))
        }
        Some("23") => StoreError::Conflict(message),
        _ => StoreError::Backend(format!("PostgreSQL error {code}: {message}")),
    }
}
