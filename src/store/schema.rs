//! Schema migrations.
//!
//! Each migration is a list of statements valid on both SQLite and
//! PostgreSQL (only `TEXT` and `BIGINT` columns; JSON is kept as text so the
//! Rust side reads the same types from both). Applied versions are recorded in
//! `schema_version`. Migrating holds the database's write lock (SQLite) or a
//! transaction-scoped advisory lock keyed on the schema (PostgreSQL), so
//! several processes opening the same database at once apply each migration
//! exactly once, and a crash mid-migration rolls the whole step back.

use super::backend::{Backend, Dialect, RowGet};
use super::{now_ms, StoreError};

/// Migrations in order; the version of `MIGRATIONS[i]` is `i + 1`.
const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        customer_id TEXT,
        account_id TEXT,
        plan TEXT,
        locale TEXT,
        attributes TEXT NOT NULL,
        status TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        turns BIGINT NOT NULL,
        handoff TEXT,
        fb_helpful BIGINT,
        fb_resolved BIGINT,
        fb_comment TEXT,
        fb_at_ms BIGINT
    )",
    "CREATE INDEX conversations_updated ON conversations (updated_ms, id)",
    "CREATE INDEX conversations_status ON conversations (status, updated_ms, id)",
    "CREATE INDEX conversations_customer ON conversations (customer_id, updated_ms, id)",
    "CREATE TABLE turns (
        id TEXT PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        state TEXT NOT NULL,
        owner TEXT,
        created_ms BIGINT NOT NULL,
        completed_ms BIGINT,
        finish_reason TEXT,
        detail TEXT,
        audit TEXT,
        fb_helpful BIGINT,
        fb_resolved BIGINT,
        fb_comment TEXT,
        fb_at_ms BIGINT,
        UNIQUE (conversation_id, seq)
    )",
    // recover() only ever looks for pending turns, a tiny fraction.
    "CREATE INDEX turns_pending ON turns (owner, created_ms) WHERE state = 'pending'",
    // Lets counts() answer from the index alone.
    "CREATE INDEX turns_tally ON turns (role, state, finish_reason)",
    "CREATE INDEX turns_feedback ON turns (fb_helpful, fb_resolved) WHERE fb_at_ms IS NOT NULL",
    "CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_attempt_ms BIGINT NOT NULL,
        last_error TEXT,
        created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL,
        conversation_id TEXT REFERENCES conversations (id) ON DELETE CASCADE,
        customer_id TEXT
    )",
    "CREATE INDEX deliveries_due ON deliveries (status, next_attempt_ms)",
    "CREATE INDEX deliveries_conversation ON deliveries (conversation_id)",
    "CREATE INDEX deliveries_customer ON deliveries (customer_id)",
],
// 2: whether the conversation's customer was verified by a signed customer token (such a
// conversation is only ever continued by the same verified customer).
&["ALTER TABLE conversations ADD COLUMN customer_verified BIGINT NOT NULL DEFAULT 0"]];

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT PRIMARY KEY,
    applied_ms BIGINT NOT NULL
)";

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The backend-independent part of [`migrate`], expanded per transaction type.
macro_rules! apply {
    ($tx:ident) => {{
        sqlx::query(VERSION_TABLE).execute(&mut *$tx).await?;
        let row = sqlx::query("SELECT MAX(version) AS v FROM schema_version")
            .fetch_one(&mut *$tx)
            .await?;
        let current = row.opt_int("v")?.unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "the database has schema version {current} but this Helpline build only \
                 knows up to {SCHEMA_VERSION}; upgrade Helpline (or point it at another \
                 database)"
            )));
        }
        for (i, steps) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            for step in *steps {
                sqlx::query(step).execute(&mut *$tx).await?;
            }
            sqlx::query("INSERT INTO schema_version (version, applied_ms) VALUES ($1, $2)")
                .bind(i as i64 + 1)
                .bind(now_ms())
                .execute(&mut *$tx)
                .await?;
        }
        $tx.commit().await?;
        Ok(())
    }};
}

/// Brings the database up to [`SCHEMA_VERSION`]; a no-op when it already is.
pub(crate) async fn migrate(backend: &Backend) -> Result<(), StoreError> {
    match backend {
        Backend::Sqlite { writer, .. } => {
            let mut tx = writer.begin_write().await?;
            apply!(tx)
        }
        Backend::Postgres { pool } => {
            let mut tx = pool.begin_write().await?;
            // Serialises concurrent migrators of this schema only, so tests
            // that each use their own schema do not wait for each other.
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext('helpline.schema.' || current_schema()))",
            )
            .execute(&mut *tx)
            .await?;
            apply!(tx)
        }
    }
}
