//! The conversation store: conversations, their turns, feedback, handoffs
//! and the webhook outbox, in SQLite (embedded default) or PostgreSQL
//! (several replicas sharing one database).
//!
//! # Guarantees the server builds on
//!
//! * **Durable acknowledgements.** A write returns only after its transaction
//!   committed. With SQLite's default `synchronous = full` that includes the
//!   fsync of the WAL, so an acknowledged turn survives a crash or power loss;
//!   `normal` keeps it across a process crash but may lose the last commits
//!   on power loss, in exchange for fewer fsyncs.
//! * **Gapless turn numbers across processes.** `append_turn` increments the
//!   conversation's turn counter and inserts the turn in one transaction; the
//!   counter update takes the row lock (PostgreSQL) or the database write lock
//!   (SQLite), so concurrent writers, in this process or in other replicas,
//!   queue up and each gets the next `seq`. A unique `(conversation_id, seq)`
//!   constraint backs this up.
//! * **No in-process invariants.** Nothing is cached between calls; every
//!   check happens inside the database transaction that depends on it, so any
//!   number of processes may share the database.
//! * **Crash recovery that respects other replicas.** A pending answer is
//!   stamped with the writing instance's name. [`Store::recover`] (run by
//!   `open`) interrupts pending answers of this instance's previous life and
//!   any pending answer older than [`StoreOptions::pending_timeout`], never a
//!   fresh answer that another live replica is still generating.
//!
//! One SQL code path serves both engines: see `backend.rs` for how.

mod backend;
mod error;
mod model;
mod schema;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use backend::{bind_all, dispatch, Arg, Backend, Dialect, RowGet};

pub use error::StoreError;
pub use model::{
    Conversation, ConversationCounts, ConversationFilter, ConversationStatus, Counts, Customer,
    Delivery, DeliveryCounts, DeliveryStatus, ExportRecord, Feedback, FeedbackCounts, Handoff,
    Page, PurgeReport, Role, Turn, TurnCount, TurnState,
};
pub use schema::SCHEMA_VERSION;

/// File name of the SQLite database inside a data directory.
pub const SQLITE_FILE: &str = "helpline.db";

/// Largest page or batch a caller may ask for.
pub const MAX_LIMIT: u32 = 500;

/// Longest feedback comment accepted, in characters.
pub const MAX_COMMENT_CHARS: usize = 4000;

/// Conversations deleted per statement by retention and privacy deletions,
/// so that a large purge never holds the SQLite write lock (or many
/// PostgreSQL row locks) for long.
const DELETE_BATCH: usize = 500;

/// SQLite's `synchronous` setting for the embedded backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync on every commit: acknowledged writes survive power loss.
    #[default]
    Full,
    /// fsync at checkpoints only: acknowledged writes survive a process
    /// crash but the last ones may be lost on power loss.
    Normal,
}

impl FromStr for Synchronous {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(Synchronous::Full),
            "normal" => Ok(Synchronous::Normal),
            other => Err(StoreError::invalid(
                "synchronous",
                format!("`{other}` is not supported; use `full` (default) or `normal`"),
            )),
        }
    }
}

/// How to open a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// SQLite durability level (ignored for PostgreSQL).
    pub synchronous: Synchronous,
    /// How long a SQLite writer waits for another process holding the lock.
    pub busy_timeout: Duration,
    /// Reader connections (SQLite; writes always use one connection) or
    /// pool size (PostgreSQL).
    pub max_connections: u32,
    /// How long an operation waits for a free connection before failing
    /// with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// A stable name for this server instance (e.g. the pod or host name).
    /// Pending answers are stamped with it, and on open only this instance's
    /// leftovers are interrupted at once. Defaults to `local` for SQLite,
    /// which has one server per file, and to a random name for PostgreSQL,
    /// where replicas share the database; set it on replicas so a restarted
    /// one cleans up after itself without waiting for `pending_timeout`.
    pub instance: Option<String>,
    /// Pending answers older than this are considered abandoned, whoever
    /// wrote them.
    pub pending_timeout: Duration,
    /// Run [`Store::recover`] from `open` (turn off for admin tools that
    /// open a live server's database).
    pub recover_on_open: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            instance: None,
            pending_timeout: Duration::from_secs(600),
            recover_on_open: true,
        }
    }
}

/// Handle to the conversation store; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    kind: &'static str,
    instance: String,
    pending_timeout_ms: i64,
}

impl fmt::Debug for Store {
    // Deliberately no connection details: they may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.kind)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

/// Where `Store::open` was told to keep data.
enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

fn parse_target(target: &str) -> Result<Target, StoreError> {
    const ACCEPTED: &str = "use a data directory path, sqlite://<file>, or a \
                            postgres:// / postgresql:// URL";
    let t = target.trim();
    if t.is_empty() {
        return Err(StoreError::invalid(
            "target",
            format!("no storage location given; {ACCEPTED}"),
        ));
    }
    let scheme = t.split_once("://").filter(|(s, _)| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if let Some((scheme, rest)) = scheme {
        return match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => Ok(Target::Postgres(t.to_owned())),
            "sqlite" if rest.is_empty() => Err(StoreError::invalid(
                "target",
                "sqlite:// needs a file path, e.g. sqlite:///var/lib/helpline/helpline.db",
            )),
            "sqlite" => Ok(Target::Sqlite(PathBuf::from(rest))),
            other => Err(StoreError::invalid(
                "target",
                format!("unsupported scheme `{other}://`; {ACCEPTED}"),
            )),
        };
    }
    let dir = PathBuf::from(t);
    if dir.is_file() {
        return Err(StoreError::invalid(
            "target",
            format!(
                "{} is a file, not a directory; give the directory to keep {SQLITE_FILE} in, \
                 or sqlite://{} to use that file",
                dir.display(),
                dir.display()
            ),
        ));
    }
    Ok(Target::Sqlite(dir.join(SQLITE_FILE)))
}

/// Checks a caller-supplied id: short, and made of characters that are safe
/// in URLs, file names and log lines without escaping.
/// The rule for ids a caller may choose (conversation ids, instance names): 1 to 64 characters of
/// `A-Z a-z 0-9 _ . : -`. The server checks request fields and settings with it too.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.chars().count())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

fn validate_id(field: &'static str, id: &str) -> Result<(), StoreError> {
    let len = id.chars().count();
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            field,
            format!(
                "must be 1 to 64 characters from A-Z a-z 0-9 _ . : - (got {len} characters{}); \
                 omit it to get a generated id",
                if len == 0 || id.chars().all(|c| c.is_ascii_graphic()) {
                    ""
                } else {
                    ", some not allowed"
                }
            ),
        ))
    }
}

fn validate_customer(customer: &Customer) -> Result<(), StoreError> {
    if customer.id.as_deref() == Some("") {
        return Err(StoreError::invalid(
            "customer.id",
            "must not be empty; leave it out for anonymous customers",
        ));
    }
    Ok(())
}

fn check_limit(field: &'static str, limit: u32) -> Result<i64, StoreError> {
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(i64::from(limit))
    } else {
        Err(StoreError::invalid(
            field,
            format!("must be between 1 and {MAX_LIMIT} (got {limit})"),
        ))
    }
}

/// Milliseconds since the Unix epoch, the store's only time unit.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `prefix` followed by 24 random lowercase hex characters (96 bits), enough
/// that independently running replicas never collide.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

fn to_json_text<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Backend(format!("cannot serialise to JSON: {e}")))
}

fn from_json_text<T: serde::de::DeserializeOwned>(
    text: &str,
    column: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(format!("corrupt JSON in column {column}: {e}")))
}

fn lock_row<D: Dialect>(_pool: &D) -> &'static str {
    D::LOCK_ROW
}

/// Column lists, as macros so they can be `concat!`ed into static SQL.
macro_rules! conversation_cols {
    () => {
        "id, customer_id, account_id, plan, locale, attributes, status, created_ms, \
         updated_ms, turns, handoff, fb_helpful, fb_resolved, fb_comment, fb_at_ms, \
         customer_verified"
    };
}
macro_rules! turn_cols {
    () => {
        "id, conversation_id, seq, role, content, state, created_ms, completed_ms, \
         finish_reason, detail, audit, fb_helpful, fb_resolved, fb_comment, fb_at_ms"
    };
}
macro_rules! delivery_cols {
    () => {
        "id, event, payload, status, attempts, next_attempt_ms, last_error, created_ms, \
         updated_ms"
    };
}

fn feedback_from_row(r: &impl RowGet) -> Result<Option<Feedback>, StoreError> {
    let Some(at_ms) = r.opt_int("fb_at_ms")? else {
        return Ok(None);
    };
    Ok(Some(Feedback {
        helpful: r.opt_int("fb_helpful")?.map(|v| v != 0),
        resolved: r.opt_int("fb_resolved")?.map(|v| v != 0),
        comment: r.opt_text("fb_comment")?,
        at_ms,
    }))
}

fn conversation_from_row(r: &impl RowGet) -> Result<Conversation, StoreError> {
    Ok(Conversation {
        id: r.text("id")?,
        customer: Customer {
            id: r.opt_text("customer_id")?,
            account_id: r.opt_text("account_id")?,
            plan: r.opt_text("plan")?,
            locale: r.opt_text("locale")?,
            attributes: from_json_text(&r.text("attributes")?, "conversations.attributes")?,
            verified: r.int("customer_verified")? != 0,
        },
        status: ConversationStatus::from_db(&r.text("status")?)?,
        created_ms: r.int("created_ms")?,
        updated_ms: r.int("updated_ms")?,
        turns: r.int("turns")?,
        handoff: r
            .opt_text("handoff")?
            .map(|t| from_json_text(&t, "conversations.handoff"))
            .transpose()?,
        feedback: feedback_from_row(r)?,
    })
}

fn turn_from_row(r: &impl RowGet) -> Result<Turn, StoreError> {
    Ok(Turn {
        id: r.text("id")?,
        conversation_id: r.text("conversation_id")?,
        seq: r.int("seq")?,
        role: Role::from_db(&r.text("role")?)?,
        content: r.text("content")?,
        state: TurnState::from_db(&r.text("state")?)?,
        created_ms: r.int("created_ms")?,
        completed_ms: r.opt_int("completed_ms")?,
        finish_reason: r.opt_text("finish_reason")?,
        detail: r
            .opt_text("detail")?
            .map(|t| from_json_text(&t, "turns.detail"))
            .transpose()?,
        audit: r
            .opt_text("audit")?
            .map(|t| from_json_text(&t, "turns.audit"))
            .transpose()?,
        feedback: feedback_from_row(r)?,
    })
}

fn delivery_from_row(r: &impl RowGet) -> Result<Delivery, StoreError> {
    Ok(Delivery {
        id: r.text("id")?,
        event: r.text("event")?,
        payload: from_json_text(&r.text("payload")?, "deliveries.payload")?,
        status: DeliveryStatus::from_db(&r.text("status")?)?,
        attempts: u32::try_from(r.int("attempts")?).unwrap_or(u32::MAX),
        next_attempt_ms: r.int("next_attempt_ms")?,
        last_error: r.opt_text("last_error")?,
        created_ms: r.int("created_ms")?,
        updated_ms: r.int("updated_ms")?,
    })
}

/// Combines what is stored with what the caller now says about the customer.
///
/// Newly given fields win, attributes are merged key by key, and nothing is
/// ever cleared: a client that omits a field is not asking to forget it. A
/// different customer id is refused, so one customer cannot read or write
/// another's conversation by guessing its id.
fn merge_customer(
    conversation_id: &str,
    stored: &Customer,
    given: &Customer,
) -> Result<Customer, StoreError> {
    if let (Some(owner), Some(caller)) = (&stored.id, &given.id) {
        if owner != caller {
            return Err(StoreError::Conflict(format!(
                "conversation `{conversation_id}` belongs to another customer; start a new \
                 conversation (send no id) or continue one of this customer's own"
            )));
        }
    }
    let mut merged = stored.clone();
    let pick = |old: &mut Option<String>, new: &Option<String>| {
        if new.is_some() {
            old.clone_from(new);
        }
    };
    pick(&mut merged.id, &given.id);
    pick(&mut merged.account_id, &given.account_id);
    pick(&mut merged.plan, &given.plan);
    pick(&mut merged.locale, &given.locale);
    for (k, v) in &given.attributes {
        merged.attributes.insert(k.clone(), v.clone());
    }
    Ok(merged)
}

/// Opaque page cursor: hex of `updated_ms:id` of the last row returned.
fn encode_cursor(updated_ms: i64, id: &str) -> String {
    format!("{updated_ms}:{id}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that `cursor` is one this store hands out (`next_cursor`), without reading anything.
pub fn check_cursor(cursor: &str) -> Result<(), StoreError> {
    decode_cursor(cursor).map(|_| ())
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), StoreError> {
    let bad = || {
        StoreError::invalid(
            "cursor",
            "not a cursor returned by this store; pass a page's next_cursor unchanged, or \
             none to start from the newest conversation",
        )
    };
    if !cursor.len().is_multiple_of(2) || cursor.len() > 400 {
        return Err(bad());
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(cursor.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ms, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_owned()))
}

/// Builds the keyset-paginated conversation query for `filter`, fetching
/// one row more than the page size to learn whether another page follows.
fn conversation_page_query(filter: &ConversationFilter) -> Result<(String, Vec<Arg>), StoreError> {
    let limit = check_limit("limit", filter.limit)?;
    let mut sql = String::from(concat!(
        "SELECT ",
        conversation_cols!(),
        " FROM conversations WHERE 1 = 1"
    ));
    let mut args = Vec::new();
    let mut clause = |sql: &mut String, text: &str, values: Vec<Arg>| {
        let mut text = text.to_owned();
        for value in values {
            args.push(value);
            text = text.replacen('?', &format!("${}", args.len()), 1);
        }
        sql.push_str(" AND ");
        sql.push_str(&text);
    };
    if let Some(status) = filter.status {
        clause(
            &mut sql,
            "status = ?",
            vec![Arg::Text(status.as_str().into())],
        );
    }
    if let Some(customer) = &filter.customer_id {
        clause(
            &mut sql,
            "customer_id = ?",
            vec![Arg::Text(customer.clone())],
        );
    }
    if let Some(after) = filter.updated_after_ms {
        clause(&mut sql, "updated_ms >= ?", vec![Arg::Int(after)]);
    }
    if let Some(before) = filter.updated_before_ms {
        clause(&mut sql, "updated_ms < ?", vec![Arg::Int(before)]);
    }
    if let Some(cursor) = &filter.cursor {
        let (ms, id) = decode_cursor(cursor)?;
        clause(
            &mut sql,
            "(updated_ms, id) < (?, ?)",
            vec![Arg::Int(ms), Arg::Text(id)],
        );
    }
    args.push(Arg::Int(limit + 1));
    sql.push_str(&format!(
        " ORDER BY updated_ms DESC, id DESC LIMIT ${}",
        args.len()
    ));
    Ok((sql, args))
}

/// Cuts the extra row off a fetched page and derives the next cursor.
fn into_page(mut items: Vec<Conversation>, limit: u32) -> Page {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = if more {
        items.last().map(|c| encode_cursor(c.updated_ms, &c.id))
    } else {
        None
    };
    Page { items, next_cursor }
}

/// Placeholders `$first, $first+1, ...` for an `IN` list of `n` values.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds which conversation and customer a webhook payload is about, so the
/// delivery can be deleted along with them.
fn payload_links(payload: &Value) -> (Option<String>, Option<String>) {
    let text = |pointer: &str| payload.pointer(pointer).and_then(Value::as_str);
    let conversation = text("/conversation_id").or_else(|| text("/conversation/id"));
    let customer = text("/customer_id")
        .or_else(|| text("/customer/id"))
        .or_else(|| text("/conversation/customer/id"));
    (conversation.map(str::to_owned), customer.map(str::to_owned))
}

fn tally_feedback(rows: &[(Option<i64>, Option<i64>, i64)]) -> FeedbackCounts {
    let mut t = FeedbackCounts::default();
    for &(helpful, resolved, n) in rows {
        t.total += n;
        match helpful {
            Some(0) => t.not_helpful += n,
            Some(_) => t.helpful += n,
            None => {}
        }
        match resolved {
            Some(0) => t.unresolved += n,
            Some(_) => t.resolved += n,
            None => {}
        }
    }
    t
}

impl Store {
    /// Opens (creating if needed) the store at `target`: a data directory
    /// (SQLite file `helpline.db` inside it), `sqlite://<file>`, or a
    /// `postgres://` / `postgresql://` URL. Applies pending schema
    /// migrations and, unless disabled, [`recover`](Store::recover)s answers
    /// left pending by a crash. Safe to call from several processes at once.
    pub async fn open(target: &str, opts: StoreOptions) -> Result<Store, StoreError> {
        if let Some(instance) = &opts.instance {
            validate_id("instance", instance)?;
        }
        let (backend, kind) = match parse_target(target)? {
            Target::Sqlite(path) => (backend::open_sqlite(&path, &opts).await?, "sqlite"),
            Target::Postgres(url) => (backend::open_postgres(&url, &opts).await?, "postgres"),
        };
        schema::migrate(&backend).await?;
        let instance = match (&opts.instance, kind) {
            (Some(name), _) => name.clone(),
            (None, "sqlite") => "local".to_owned(),
            (None, _) => new_id("replica_"),
        };
        let store = Store {
            inner: Arc::new(Inner {
                backend,
                kind,
                instance,
                pending_timeout_ms: i64::try_from(opts.pending_timeout.as_millis())
                    .unwrap_or(i64::MAX),
            }),
        };
        if opts.recover_on_open {
            store.recover().await?;
        }
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        self.inner.kind
    }

    /// The name pending answers written through this handle are stamped with.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Closes all connections, waiting for running operations. Clones of
    /// this handle fail with `Unavailable` afterwards.
    pub async fn close(&self) {
        match &self.inner.backend {
            Backend::Sqlite { writer, reader } => {
                reader.close().await;
                writer.close().await;
            }
            Backend::Postgres { pool } => pool.close().await,
        }
    }

    /// Returns the conversation `id` (creating it if it does not exist), or
    /// a new conversation when `id` is `None`.
    ///
    /// For an existing conversation the customer details are merged in (new
    /// values win, attributes merge per key); a conversation already owned
    /// by a different customer id is a [`StoreError::Conflict`].
    pub async fn ensure_conversation(
        &self,
        id: Option<&str>,
        customer: &Customer,
    ) -> Result<Conversation, StoreError> {
        validate_customer(customer)?;
        let id = match id {
            Some(id) => {
                validate_id("conversation_id", id)?;
                id.to_owned()
            }
            None => new_id("conv_"),
        };
        let now = now_ms();
        let attributes = to_json_text(&customer.attributes)?;
        dispatch!(
            self,
            write | pool | {
                let mut tx = pool.begin_write().await?;
                let inserted = sqlx::query(
                    "INSERT INTO conversations (id, customer_id, account_id, plan, locale, \
                 attributes, status, created_ms, updated_ms, turns, customer_verified) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'open', $7, $7, 0, $8) \
                 ON CONFLICT (id) DO NOTHING",
                )
                .bind(&id)
                .bind(&customer.id)
                .bind(&customer.account_id)
                .bind(&customer.plan)
                .bind(&customer.locale)
                .bind(&attributes)
                .bind(now)
                .bind(customer.verified as i64)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if inserted {
                    tx.commit().await?;
                    return Ok(Conversation {
                        id,
                        customer: customer.clone(),
                        status: ConversationStatus::Open,
                        created_ms: now,
                        updated_ms: now,
                        turns: 0,
                        handoff: None,
                        feedback: None,
                    });
                }
                let sql = format!(
                    concat!(
                        "SELECT ",
                        conversation_cols!(),
                        " FROM conversations WHERE id = $1{}"
                    ),
                    lock_row(pool)
                );
                let row = sqlx::query(&sql).bind(&id).fetch_one(&mut *tx).await?;
                let mut conversation = conversation_from_row(&row)?;
                let merged = merge_customer(&id, &conversation.customer, customer)?;
                if merged != conversation.customer {
                    sqlx::query(
                        "UPDATE conversations SET customer_id = $1, account_id = $2, plan = $3, \
                     locale = $4, attributes = $5, updated_ms = $6 WHERE id = $7",
                    )
                    .bind(&merged.id)
                    .bind(&merged.account_id)
                    .bind(&merged.plan)
                    .bind(&merged.locale)
                    .bind(to_json_text(&merged.attributes)?)
                    .bind(now)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                    conversation.customer = merged;
                    conversation.updated_ms = now;
                }
                tx.commit().await?;
                Ok(conversation)
            }
        )
    }

    /// Appends a turn at the end of a conversation and returns it once it is
    /// committed.
    ///
    /// The server calls this for the customer's message before generation
    /// starts and for the bot's answer (as [`TurnState::Pending`]) before the
    /// first token, so that a crash never loses what was acknowledged.
    pub async fn append_turn(
        &self,
        conversation_id: &str,
        role: Role,
        content: &str,
        state: TurnState,
    ) -> Result<Turn, StoreError> {
        let now = now_ms();
        let id = new_id("turn_");
        let pending = state == TurnState::Pending;
        let owner = pending.then_some(self.inner.instance.as_str());
        let completed_ms = (!pending).then_some(now);
        dispatch!(
            self,
            write | pool | {
                let mut tx = pool.begin_write().await?;
                // Updating the counter first takes the conversation's row lock,
                // which orders concurrent appenders from every process.
                let row = sqlx::query(
                    "UPDATE conversations SET turns = turns + 1, updated_ms = $1 \
                 WHERE id = $2 RETURNING turns",
                )
                .bind(now)
                .bind(conversation_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::not_found("conversation", conversation_id))?;
                let seq = row.int("turns")?;
                sqlx::query(
                    "INSERT INTO turns (id, conversation_id, seq, role, content, state, owner, \
                 created_ms, completed_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&id)
                .bind(conversation_id)
                .bind(seq)
                .bind(role.as_str())
                .bind(content)
                .bind(state.as_str())
                .bind(owner)
                .bind(now)
                .bind(completed_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Turn {
                    id,
                    conversation_id: conversation_id.to_owned(),
                    seq,
                    role,
                    content: content.to_owned(),
                    state,
                    created_ms: now,
                    completed_ms,
                    finish_reason: None,
                    detail: None,
                    audit: None,
                    feedback: None,
                })
            }
        )
    }

    /// Finalises a pending answer with its full text and final state.
    ///
    /// Only a `Pending` turn can be completed: completing one twice, or one
    /// that recovery already marked `Interrupted`, is a
    /// [`StoreError::Conflict`], so a late writer cannot overwrite history.
    pub async fn complete_turn(
        &self,
        turn_id: &str,
        content: &str,
        state: TurnState,
        finish_reason: Option<&str>,
        detail: Option<Value>,
        audit: Option<Value>,
    ) -> Result<Turn, StoreError> {
        if state == TurnState::Pending {
            return Err(StoreError::invalid(
                "state",
                "a completed turn needs a final state: complete, disconnected, failed or \
                 interrupted",
            ));
        }
        let now = now_ms();
        let detail = detail.as_ref().map(to_json_text).transpose()?;
        let audit = audit.as_ref().map(to_json_text).transpose()?;
        dispatch!(
            self,
            write | pool | {
                let mut tx = pool.begin_write().await?;
                // Conversation first, turn second: the same lock order as every
                // other writer, so PostgreSQL replicas cannot deadlock.
                sqlx::query(
                    "UPDATE conversations SET updated_ms = $1 \
                 WHERE id = (SELECT conversation_id FROM turns WHERE id = $2)",
                )
                .bind(now)
                .bind(turn_id)
                .execute(&mut *tx)
                .await?;
                let row = sqlx::query(concat!(
                    "UPDATE turns SET content = $1, state = $2, finish_reason = $3, detail = $4, \
                 audit = $5, completed_ms = $6, owner = NULL \
                 WHERE id = $7 AND state = 'pending' RETURNING ",
                    turn_cols!()
                ))
                .bind(content)
                .bind(state.as_str())
                .bind(finish_reason)
                .bind(&detail)
                .bind(&audit)
                .bind(now)
                .bind(turn_id)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    let current = sqlx::query("SELECT state FROM turns WHERE id = $1")
                        .bind(turn_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    return Err(match current {
                        None => StoreError::not_found("turn", turn_id),
                        Some(r) => StoreError::Conflict(format!(
                            "turn `{turn_id}` is already {}; only pending answers can be completed",
                            r.text("state")?
                        )),
                    });
                };
                let turn = turn_from_row(&row)?;
                tx.commit().await?;
                Ok(turn)
            }
        )
    }

    /// A conversation without its turns.
    pub async fn conversation_head(&self, id: &str) -> Result<Conversation, StoreError> {
        dispatch!(
            self,
            read | pool | {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    conversation_cols!(),
                    " FROM conversations WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| StoreError::not_found("conversation", id))?;
                conversation_from_row(&row)
            }
        )
    }

    /// A conversation and all its turns in `seq` order, read from one
    /// consistent snapshot.
    pub async fn get_conversation(
        &self,
        id: &str,
    ) -> Result<(Conversation, Vec<Turn>), StoreError> {
        dispatch!(
            self,
            read | pool | {
                let mut tx = pool.begin_snapshot().await?;
                let row = sqlx::query(concat!(
                    "SELECT ",
                    conversation_cols!(),
                    " FROM conversations WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| StoreError::not_found("conversation", id))?;
                let conversation = conversation_from_row(&row)?;
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    turn_cols!(),
                    " FROM turns WHERE conversation_id = $1 ORDER BY seq"
                ))
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                let turns = rows.iter().map(turn_from_row).collect::<Result<_, _>>()?;
                Ok((conversation, turns))
            }
        )
    }

    /// One turn by id.
    pub async fn get_turn(&self, id: &str) -> Result<Turn, StoreError> {
        dispatch!(
            self,
            read | pool | {
                let row = sqlx::query(concat!(
                    "SELECT ",
                    turn_cols!(),
                    " FROM turns WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| StoreError::not_found("turn", id))?;
                turn_from_row(&row)
            }
        )
    }

    /// A page of conversations matching `filter`, newest-updated first.
    ///
    /// Pagination is by key (`updated_ms`, `id`) rather than offset, so pages
    /// stay cheap however deep they go and rows never repeat or vanish
    /// because of inserts at the top. A conversation updated while a client
    /// pages moves to the top and is not seen again in that walk.
    pub async fn list_conversations(
        &self,
        filter: &ConversationFilter,
    ) -> Result<Page, StoreError> {
        let (sql, args) = conversation_page_query(filter)?;
        let items = dispatch!(
            self,
            read | pool | {
                let rows = bind_all!(sqlx::query(&sql), &args).fetch_all(pool).await?;
                rows.iter()
                    .map(conversation_from_row)
                    .collect::<Result<Vec<_>, _>>()?
            }
        );
        Ok(into_page(items, filter.limit))
    }

    /// One page of an export: JSON Lines (`{"conversation": ..., "turns":
    /// [...]}`) for the conversations [`list_conversations`] would return,
    /// plus the cursor of the next page. Each page is read from one
    /// snapshot with two queries, whatever the number of conversations.
    ///
    /// [`list_conversations`]: Store::list_conversations
    pub async fn export_page(
        &self,
        filter: &ConversationFilter,
    ) -> Result<(Vec<String>, Option<String>), StoreError> {
        let (sql, args) = conversation_page_query(filter)?;
        let (conversations, turn_rows) = dispatch!(
            self,
            read | pool | {
                let mut tx = pool.begin_snapshot().await?;
                let rows = bind_all!(sqlx::query(&sql), &args)
                    .fetch_all(&mut *tx)
                    .await?;
                let conversations = rows
                    .iter()
                    .map(conversation_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let ids: Vec<Arg> = conversations
                    .iter()
                    .take(filter.limit as usize)
                    .map(|c| Arg::Text(c.id.clone()))
                    .collect();
                let mut turns = Vec::new();
                if !ids.is_empty() {
                    let turn_sql = format!(
                        concat!(
                        "SELECT ",
                        turn_cols!(),
                        " FROM turns WHERE conversation_id IN ({}) ORDER BY conversation_id, seq"
                    ),
                        placeholders(1, ids.len())
                    );
                    let rows = bind_all!(sqlx::query(&turn_sql), &ids)
                        .fetch_all(&mut *tx)
                        .await?;
                    turns = rows.iter().map(turn_from_row).collect::<Result<_, _>>()?;
                }
                tx.commit().await?;
                (conversations, turns)
            }
        );
        let page = into_page(conversations, filter.limit);
        let mut by_conversation: HashMap<String, Vec<Turn>> = HashMap::new();
        for turn in turn_rows {
            by_conversation
                .entry(turn.conversation_id.clone())
                .or_default()
                .push(turn);
        }
        let lines = page
            .items
            .into_iter()
            .map(|conversation| {
                let turns = by_conversation.remove(&conversation.id).unwrap_or_default();
                to_json_text(&ExportRecord {
                    conversation,
                    turns,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((lines, page.next_cursor))
    }

    /// Every conversation matching `filter` as JSON Lines, newest-updated
    /// first, fetched lazily `filter.limit` conversations at a time so an
    /// export of the whole database never sits in memory. Stops after the
    /// first error.
    pub fn export(
        &self,
        filter: ConversationFilter,
    ) -> impl Stream<Item = Result<String, StoreError>> + Send + 'static {
        struct State {
            store: Store,
            filter: ConversationFilter,
            buffered: VecDeque<String>,
            done: bool,
        }
        let state = State {
            store: self.clone(),
            filter,
            buffered: VecDeque::new(),
            done: false,
        };
        futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(line) = st.buffered.pop_front() {
                    return Some((Ok(line), st));
                }
                if st.done {
                    return None;
                }
                match st.store.export_page(&st.filter).await {
                    Ok((lines, next)) => {
                        st.buffered.extend(lines);
                        st.done = next.is_none();
                        st.filter.cursor = next;
                    }
                    Err(e) => {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                }
            }
        })
    }

    /// Records a handoff to a human and sets the status to `handed_off`.
    pub async fn set_handoff(
        &self,
        conversation_id: &str,
        handoff: Handoff,
    ) -> Result<Conversation, StoreError> {
        let handoff = to_json_text(&handoff)?;
        let now = now_ms();
        dispatch!(
            self,
            write | pool | {
                let row = sqlx::query(concat!(
                "UPDATE conversations SET status = 'handed_off', handoff = $1, updated_ms = $2 \
                 WHERE id = $3 RETURNING ",
                conversation_cols!()
            ))
                .bind(&handoff)
                .bind(now)
                .bind(conversation_id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| StoreError::not_found("conversation", conversation_id))?;
                conversation_from_row(&row)
            }
        )
    }

    /// Changes a conversation's status (the handoff record, if any, is kept
    /// as history).
    pub async fn set_status(
        &self,
        conversation_id: &str,
        status: ConversationStatus,
    ) -> Result<Conversation, StoreError> {
        let now = now_ms();
        dispatch!(
            self,
            write | pool | {
                let row = sqlx::query(concat!(
                "UPDATE conversations SET status = $1, updated_ms = $2 WHERE id = $3 RETURNING ",
                conversation_cols!()
            ))
                .bind(status.as_str())
                .bind(now)
                .bind(conversation_id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| StoreError::not_found("conversation", conversation_id))?;
                conversation_from_row(&row)
            }
        )
    }

    /// Stores feedback on one answer (`turn_id`, which must be a bot or
    /// agent turn of `conversation_id`) or on the whole conversation
    /// (`turn_id = None`). Later feedback replaces earlier feedback.
    pub async fn record_feedback(
        &self,
        turn_id: Option<&str>,
        conversation_id: &str,
        feedback: Feedback,
    ) -> Result<(), StoreError> {
        if let Some(comment) = &feedback.comment {
            let n = comment.chars().count();
            if n > MAX_COMMENT_CHARS {
                return Err(StoreError::invalid(
                    "comment",
                    format!("is {n} characters long; shorten it to {MAX_COMMENT_CHARS} or fewer"),
                ));
            }
        }
        let now = now_ms();
        let helpful = feedback.helpful.map(i64::from);
        let resolved = feedback.resolved.map(i64::from);
        dispatch!(
            self,
            write | pool | {
                let mut tx = pool.begin_write().await?;
                let sql = if turn_id.is_some() {
                    "UPDATE conversations SET updated_ms = $1 WHERE id = $2"
                } else {
                    "UPDATE conversations SET updated_ms = $1, fb_helpful = $3, fb_resolved = $4, \
                 fb_comment = $5, fb_at_ms = $6 WHERE id = $2"
                };
                let mut query = sqlx::query(sql).bind(now).bind(conversation_id);
                if turn_id.is_none() {
                    query = query
                        .bind(helpful)
                        .bind(resolved)
                        .bind(&feedback.comment)
                        .bind(feedback.at_ms);
                }
                if query.execute(&mut *tx).await?.rows_affected() == 0 {
                    return Err(StoreError::not_found("conversation", conversation_id));
                }
                if let Some(turn_id) = turn_id {
                    let row = sqlx::query(
                        "SELECT role FROM turns WHERE id = $1 AND conversation_id = $2",
                    )
                    .bind(turn_id)
                    .bind(conversation_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| StoreError::not_found("turn", turn_id))?;
                    if Role::from_db(&row.text("role")?)? == Role::Customer {
                        return Err(StoreError::invalid(
                            "turn_id",
                            format!(
                            "`{turn_id}` is the customer's own message; give feedback on a bot \
                             or agent answer, or on the conversation (no turn id)"
                        ),
                        ));
                    }
                    sqlx::query(
                        "UPDATE turns SET fb_helpful = $1, fb_resolved = $2, fb_comment = $3, \
                     fb_at_ms = $4 WHERE id = $5",
                    )
                    .bind(helpful)
                    .bind(resolved)
                    .bind(&feedback.comment)
                    .bind(feedback.at_ms)
                    .bind(turn_id)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        )
    }

    /// Deletes one batch of conversations matching `condition` (with `$1`
    /// bound to `arg`), their turns and linked deliveries; returns
    /// (conversations, turns) deleted.
    ///
    /// The condition is repeated outside the sub-select so that PostgreSQL
    /// re-checks it on rows that changed while the statement waited for
    /// their lock: a conversation that became active again is kept.
    async fn delete_batch(&self, condition: &str, arg: Arg) -> Result<(u64, u64), StoreError> {
        let sql = format!(
            "DELETE FROM conversations WHERE {condition} AND id IN \
             (SELECT id FROM conversations WHERE {condition} LIMIT {DELETE_BATCH}) \
             RETURNING turns"
        );
        let args = [arg];
        dispatch!(
            self,
            write | pool | {
                let rows = bind_all!(sqlx::query(&sql), &args).fetch_all(pool).await?;
                let mut turns = 0u64;
                for row in &rows {
                    turns += u64::try_from(row.int("turns")?).unwrap_or(0);
                }
                Ok((rows.len() as u64, turns))
            }
        )
    }

    async fn delete_where(&self, condition: &str, arg: Arg) -> Result<PurgeReport, StoreError> {
        let mut report = PurgeReport::default();
        loop {
            let (conversations, turns) = self.delete_batch(condition, arg.clone()).await?;
            report.conversations += conversations;
            report.turns += turns;
            if conversations < DELETE_BATCH as u64 {
                return Ok(report);
            }
        }
    }

    /// Retention: deletes conversations last updated before `cutoff_ms`,
    /// with their turns and webhook deliveries, plus finished deliveries
    /// last touched before the cutoff. Works in batches, so it can run
    /// while the server is serving.
    pub async fn purge_older_than(&self, cutoff_ms: i64) -> Result<PurgeReport, StoreError> {
        let report = self
            .delete_where("updated_ms < $1", Arg::Int(cutoff_ms))
            .await?;
        dispatch!(
            self,
            write | pool | {
                sqlx::query("DELETE FROM deliveries WHERE status <> 'pending' AND updated_ms < $1")
                    .bind(cutoff_ms)
                    .execute(pool)
                    .await?;
            }
        );
        Ok(report)
    }

    /// Privacy request: deletes every conversation, turn and webhook
    /// delivery of `customer_id`. Afterwards no operation returns any of it.
    pub async fn delete_customer(&self, customer_id: &str) -> Result<PurgeReport, StoreError> {
        if customer_id.is_empty() {
            return Err(StoreError::invalid(
                "customer_id",
                "must not be empty; anonymous conversations have no customer to delete",
            ));
        }
        let report = self
            .delete_where("customer_id = $1", Arg::Text(customer_id.to_owned()))
            .await?;
        dispatch!(
            self,
            write | pool | {
                sqlx::query("DELETE FROM deliveries WHERE customer_id = $1")
                    .bind(customer_id)
                    .execute(pool)
                    .await?;
            }
        );
        Ok(report)
    }

    /// Inserts a delivery, or replaces the stored one with the same id (the
    /// webhook worker saves after each attempt). `created_ms` of an existing
    /// delivery is kept.
    pub async fn save_delivery(&self, delivery: &Delivery) -> Result<(), StoreError> {
        validate_id("delivery.id", &delivery.id)?;
        if delivery.event.trim().is_empty() {
            return Err(StoreError::invalid(
                "delivery.event",
                "must name the event, e.g. `conversation.handed_off`",
            ));
        }
        let payload = to_json_text(&delivery.payload)?;
        let (conversation_id, customer_id) = payload_links(&delivery.payload);
        dispatch!(
            self,
            write | pool | {
                // The conversation link is only kept if the conversation exists,
                // which keeps the foreign key (and its cascade) valid.
                sqlx::query(
                "INSERT INTO deliveries (id, event, payload, status, attempts, next_attempt_ms, \
                 last_error, created_ms, updated_ms, conversation_id, customer_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                 (SELECT id FROM conversations WHERE id = $10), $11) \
                 ON CONFLICT (id) DO UPDATE SET event = excluded.event, \
                 payload = excluded.payload, status = excluded.status, \
                 attempts = excluded.attempts, next_attempt_ms = excluded.next_attempt_ms, \
                 last_error = excluded.last_error, updated_ms = excluded.updated_ms, \
                 conversation_id = excluded.conversation_id, customer_id = excluded.customer_id",
            )
            .bind(&delivery.id)
            .bind(&delivery.event)
            .bind(&payload)
            .bind(delivery.status.as_str())
            .bind(i64::from(delivery.attempts))
            .bind(delivery.next_attempt_ms)
            .bind(&delivery.last_error)
            .bind(delivery.created_ms)
            .bind(delivery.updated_ms)
            .bind(&conversation_id)
            .bind(&customer_id)
            .execute(pool)
            .await?;
            }
        );
        Ok(())
    }

    /// Pending deliveries, soonest `next_attempt_ms` first (the worker skips
    /// those not yet due).
    pub async fn pending_deliveries(&self, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let limit = check_limit("limit", limit)?;
        dispatch!(
            self,
            read | pool | {
                let rows = sqlx::query(concat!(
                "SELECT ",
                delivery_cols!(),
                " FROM deliveries WHERE status = 'pending' ORDER BY next_attempt_ms, id LIMIT $1"
            ))
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter().map(delivery_from_row).collect()
            }
        )
    }

    /// Deliveries, optionally of one status, newest first (for inspection).
    pub async fn deliveries(
        &self,
        status: Option<DeliveryStatus>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let limit = check_limit("limit", limit)?;
        let status = status.map(DeliveryStatus::as_str);
        dispatch!(
            self,
            read | pool | {
                let rows = sqlx::query(concat!(
                    "SELECT ",
                    delivery_cols!(),
                    " FROM deliveries WHERE ($1 IS NULL OR status = $1) \
                 ORDER BY created_ms DESC, id DESC LIMIT $2"
                ))
                .bind(status)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter().map(delivery_from_row).collect()
            }
        )
    }

    /// Totals for `/metrics`: a handful of grouped `COUNT` queries, the
    /// turn and feedback ones answered from covering indexes.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        let mut counts = Counts::default();
        dispatch!(
            self,
            read | pool | {
                let mut tx = pool.begin_snapshot().await?;
                for row in
                    sqlx::query("SELECT status, COUNT(*) AS n FROM conversations GROUP BY status")
                        .fetch_all(&mut *tx)
                        .await?
                {
                    let n = row.int("n")?;
                    let c = &mut counts.conversations;
                    c.total += n;
                    match ConversationStatus::from_db(&row.text("status")?)? {
                        ConversationStatus::Open => c.open += n,
                        ConversationStatus::HandedOff => c.handed_off += n,
                        ConversationStatus::Resolved => c.resolved += n,
                    }
                }
                for row in sqlx::query(
                    "SELECT role, state, finish_reason, COUNT(*) AS n FROM turns \
                 GROUP BY role, state, finish_reason ORDER BY role, state, finish_reason",
                )
                .fetch_all(&mut *tx)
                .await?
                {
                    counts.turns.push(TurnCount {
                        role: Role::from_db(&row.text("role")?)?,
                        state: TurnState::from_db(&row.text("state")?)?,
                        finish_reason: row.opt_text("finish_reason")?,
                        count: row.int("n")?,
                    });
                }
                for (table, target) in [
                    ("turns", &mut counts.answer_feedback),
                    ("conversations", &mut counts.conversation_feedback),
                ] {
                    let sql = format!(
                        "SELECT fb_helpful, fb_resolved, COUNT(*) AS n FROM {table} \
                     WHERE fb_at_ms IS NOT NULL GROUP BY fb_helpful, fb_resolved"
                    );
                    let mut rows = Vec::new();
                    for row in sqlx::query(&sql).fetch_all(&mut *tx).await? {
                        rows.push((
                            row.opt_int("fb_helpful")?,
                            row.opt_int("fb_resolved")?,
                            row.int("n")?,
                        ));
                    }
                    *target = tally_feedback(&rows);
                }
                for row in
                    sqlx::query("SELECT status, COUNT(*) AS n FROM deliveries GROUP BY status")
                        .fetch_all(&mut *tx)
                        .await?
                {
                    let n = row.int("n")?;
                    let d = &mut counts.deliveries;
                    match DeliveryStatus::from_db(&row.text("status")?)? {
                        DeliveryStatus::Pending => d.pending += n,
                        DeliveryStatus::Delivered => d.delivered += n,
                        DeliveryStatus::Dead => d.dead += n,
                    }
                }
                tx.commit().await?;
            }
        );
        Ok(counts)
    }

    /// Marks as `Interrupted` the answers left `Pending` by a crash: those
    /// stamped with this instance's name (its previous life) and those older
    /// than `pending_timeout` (from replicas that never came back). Returns
    /// how many. Runs from [`open`](Store::open); a server may also call it
    /// periodically to sweep up after vanished replicas.
    pub async fn recover(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        let stale_before = now.saturating_sub(self.inner.pending_timeout_ms);
        let instance = self.inner.instance.as_str();
        dispatch!(
            self,
            write | pool | {
                let mut tx = pool.begin_write().await?;
                sqlx::query(
                    "UPDATE conversations SET updated_ms = $1 WHERE id IN \
                 (SELECT conversation_id FROM turns \
                  WHERE state = 'pending' AND (owner = $2 OR created_ms < $3))",
                )
                .bind(now)
                .bind(instance)
                .bind(stale_before)
                .execute(&mut *tx)
                .await?;
                let n = sqlx::query(
                    "UPDATE turns SET state = 'interrupted', completed_ms = $1, owner = NULL \
                 WHERE state = 'pending' AND (owner = $2 OR created_ms < $3)",
                )
                .bind(now)
                .bind(instance)
                .bind(stale_before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                Ok(n)
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_ids_with_separators() {
        let c = encode_cursor(1_700_000_000_123, "a:b.c-d");
        assert_eq!(
            decode_cursor(&c).unwrap(),
            (1_700_000_000_123, "a:b.c-d".into())
        );
        assert!(matches!(
            decode_cursor("zz"),
            Err(StoreError::Invalid {
                field: "cursor",
                ..
            })
        ));
    }

    #[test]
    fn targets_are_classified() {
        assert!(matches!(
            parse_target("postgresql://u@h/db"),
            Ok(Target::Postgres(_))
        ));
        assert!(
            matches!(parse_target("sqlite:///tmp/x.db"), Ok(Target::Sqlite(p)) if p == std::path::Path::new("/tmp/x.db"))
        );
        let err = parse_target("mysql://h/db").err().unwrap().to_string();
        assert!(
            err.contains("mysql://") && err.contains("postgres://"),
            "{err}"
        );
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("conversation_id", "abc_DEF-1.2:3").is_ok());
        assert!(validate_id("conversation_id", "").is_err());
        assert!(validate_id("conversation_id", &"a".repeat(65)).is_err());
        assert!(validate_id("conversation_id", "a b").is_err());
        let id = new_id("conv_");
        assert_eq!(id.len(), 29);
        assert!(validate_id("conversation_id", &id).is_ok());
    }

    #[test]
    fn merge_keeps_old_fields_and_refuses_other_owner() {
        let mut stored = Customer {
            id: Some("c1".into()),
            plan: Some("free".into()),
            ..Customer::default()
        };
        stored.attributes.insert("a".into(), 1.into());
        let mut given = Customer {
            locale: Some("de".into()),
            ..Customer::default()
        };
        given.attributes.insert("b".into(), 2.into());
        let merged = merge_customer("x", &stored, &given).unwrap();
        assert_eq!(merged.plan.as_deref(), Some("free"));
        assert_eq!(merged.locale.as_deref(), Some("de"));
        assert_eq!(merged.attributes.len(), 2);
        given.id = Some("c2".into());
        assert!(matches!(
            merge_customer("x", &stored, &given),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn payload_links_find_ids() {
        let p = serde_json::json!({"conversation": {"id": "c", "customer": {"id": "u"}}});
        assert_eq!(payload_links(&p), (Some("c".into()), Some("u".into())));
    }
}
