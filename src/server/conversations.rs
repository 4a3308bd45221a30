//! Conversations: the store opened at start-up, the agent routes that read and manage it
//! (list, one conversation, JSON Lines export, retention purge, a customer's deletion), the
//! handoff (summary, status, webhook), agent replies and resolution, and feedback.
//!
//! Chat turns are written by the chat handler (`openai.rs`); this module owns everything after.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::dto::ErrorResponse;
use super::error::{ApiError, ApiJson};
use super::{AppState, SharedState};
use crate::store::{
    self, Conversation, ConversationFilter, ConversationStatus, Feedback, Role, Store, StoreOptions, Synchronous, Turn, TurnState,
};
use crate::webhook::{self, BoxFuture, DeliveryLog, Webhook, WebhookConfig};

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/conversations", get(list))
        .route("/v1/conversations/export", get(export))
        .route("/v1/conversations/purge", post(purge))
        .route("/v1/conversations/{id}", get(one))
        .route("/v1/conversations/{id}/handoff", post(customer_handoff))
        .route("/v1/conversations/{id}/takeover", post(takeover))
        .route("/v1/conversations/{id}/messages", post(agent_message))
        .route("/v1/conversations/{id}/resolve", post(resolve))
        .route("/v1/conversations/{id}/feedback", post(conversation_feedback))
        .route("/v1/answers/{id}/feedback", post(answer_feedback))
        .route("/v1/customers/{id}", delete(delete_customer))
        .route("/v1/deliveries", get(deliveries))
        .route("/v1/answers/{id}/audit", get(audit))
}

// Response descriptions the OpenAPI annotations of the agent routes share (here, in `assist.rs`
// and in `openai.rs`).
pub(super) const NO_AGENT_KEY: &str =
    "No agent key was sent (`invalid_api_key`): agent routes need an agent key, and a customer API key is refused";
pub(super) const AGENT_ROUTES_OFF: &str = "No agent key is configured, so agent routes are off (`agent_routes_disabled`)";
pub(super) const STORE_DOWN: &str = "The conversation store is not open or cannot be reached (`store_unavailable`)";
pub(super) const STORE_FAILED: &str = "The conversation store failed (`internal_error`)";
const CONVERSATION_SHAPE: &str = "The conversation: `{id, customer: {id, account_id, plan, locale, attributes}, \
status: open|handed_off|resolved, created_ms, updated_ms, turns, handoff: {reason, summary, by, at_ms}|null, \
feedback: {helpful, resolved, comment, at_ms}|null}`";
const PURGE_SHAPE: &str = "What was deleted: `{conversations, turns}` (counts)";

/// The audit record of an answer.
///
/// The record of a bot answer: model, tokenizer and template hashes, index and policy versions,
/// passages with scores, sampling and seed, guard outcome, prompt size and the request as received.
/// Agent route: needs an agent key.
#[utoipa::path(
    get,
    path = "/v1/answers/{id}/audit",
    tag = "conversations",
    operation_id = "getAnswerAudit",
    params(("id" = String, Path, description = "The answer id (`helpline.answer_id` of the chat answer)")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The audit record, with `answer_id`, `conversation_id` and the answer's `state` added", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such answer, or the turn has no audit record because it is not a bot answer (`not_found`)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn audit(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let turn = state.store()?.get_turn(&id).await.map_err(ApiError::store)?;
    let mut audit = turn.audit.ok_or_else(|| ApiError::not_found("not_found", format!("answer `{id}` has no audit record (it is not a bot answer)")))?;
    if let Value::Object(a) = &mut audit {
        a.insert("answer_id".into(), json!(turn.id));
        a.insert("conversation_id".into(), json!(turn.conversation_id));
        a.insert("state".into(), json!(turn.state));
    }
    Ok(Json(audit))
}

// ---------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------

/// Opens the store the config names (PostgreSQL by URL, else SQLite in `data_dir`), interrupts
/// answers a crash left pending, starts the handoff webhook (resuming its pending deliveries)
/// and the retention task. The server does not serve chat without a store.
pub async fn open(state: &SharedState) -> Result<(), String> {
    open_with(state, &state.config.conversations).await
}

/// [`open`] with these settings instead of the state's own.
pub async fn open_with(state: &AppState, c: &crate::config::ConversationsConfig) -> Result<(), String> {
    let target = match &c.database_url {
        Some(url) => url.clone(),
        None => c.data_dir.display().to_string(),
    };
    let sync = if c.store_sync == "normal" { Synchronous::Normal } else { Synchronous::Full };
    // Recovery runs below, so its count can be reported.
    let opts = StoreOptions { synchronous: sync, recover_on_open: false, instance: c.instance_id.clone(), ..StoreOptions::default() };
    let store = Store::open(&target, opts).await.map_err(|e| format!("cannot open the conversation store: {e}"))?;
    let interrupted = store.recover().await.map_err(|e| format!("cannot recover the conversation store: {e}"))?;
    if interrupted > 0 {
        eprintln!("helpline: {interrupted} answer(s) cut off by the last shutdown are marked interrupted");
    }
    eprintln!("helpline: conversations stored in {} ({})", redact(&target), store.backend());
    state.set_store(store.clone());
    if let (Some(url), Some(secret)) = (&c.webhook_url, &c.webhook_secret) {
        let cfg = WebhookConfig {
            url: url.clone(),
            secret: secret.clone(),
            max_attempts: c.webhook_max_attempts,
            initial_backoff: c.webhook_initial_backoff,
            max_backoff: c.webhook_max_backoff,
            timeout: c.webhook_timeout,
        };
        let hook = Webhook::start(cfg, Arc::new(StoreLog(store.clone()))).map_err(|e| format!("cannot start the handoff webhook: {e}"))?;
        state.set_webhook(hook);
    }
    if c.retention_days > 0 {
        let days = c.retention_days;
        let docs = state.config.grounding.docs_dir.clone();
        tokio::spawn(async move {
            loop {
                let cutoff = store::now_ms() - (days as i64) * 86_400_000;
                match store.purge_older_than(cutoff).await {
                    Ok(r) if r.conversations > 0 => {
                        let drafts = super::assist::purge_orphan_drafts(&docs, &store).await;
                        if let Err(e) = &drafts {
                            tracing::error!(error = %e, "removing the purged conversations' KB drafts failed");
                        }
                        tracing::info!(conversations = r.conversations, turns = r.turns, drafts = drafts.unwrap_or(0), days, "retention purge")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "retention purge failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
    }
    Ok(())
}

/// A database URL without its password.
fn redact(target: &str) -> String {
    match (target.find("://"), target.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &target[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}@{}", &target[..scheme + 3], user, &target[at + 1..])
        }
        _ => target.to_string(),
    }
}

/// The webhook's deliveries live in the conversation store (so they survive restarts and replicas
/// see one outbox).
struct StoreLog(Store);

fn convert<A: Serialize, B: serde::de::DeserializeOwned>(a: &A) -> Result<B, String> {
    serde_json::to_value(a).and_then(serde_json::from_value).map_err(|e| e.to_string())
}

impl DeliveryLog for StoreLog {
    fn save(&self, d: &webhook::Delivery) -> BoxFuture<'_, Result<(), String>> {
        let d: Result<store::Delivery, String> = convert(d);
        Box::pin(async move { self.0.save_delivery(&d?).await.map_err(|e| e.to_string()) })
    }

    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<webhook::Delivery>, String>> {
        Box::pin(async move {
            let rows = self.0.pending_deliveries(limit.min(u32::MAX as usize) as u32).await.map_err(|e| e.to_string())?;
            rows.iter().map(convert).collect()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

/// Query of the list and export routes (documented inline in their OpenAPI annotations).
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// `open`, `handed_off` or `resolved`.
    pub status: Option<String>,
    pub customer_id: Option<String>,
    pub updated_after_ms: Option<i64>,
    pub updated_before_ms: Option<i64>,
    /// 1 to 500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// A query string that does not parse is a 422 in the error table (not axum's plain text).
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::invalid_field("query", format!("the query string is not valid: {}", e.body_text())))
}

fn filter(q: &ListQuery) -> Result<ConversationFilter, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some("open") => Some(ConversationStatus::Open),
        Some("handed_off") => Some(ConversationStatus::HandedOff),
        Some("resolved") => Some(ConversationStatus::Resolved),
        Some(other) => {
            return Err(ApiError::invalid_field("status", format!("`status` must be `open`, `handed_off` or `resolved` (got {other:?})")))
        }
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid_field("limit", format!("`limit` must be in [1, 500] (got {limit})")));
    }
    // Checked here, before anything is read: an export's status is sent with its first line.
    if let Some(cursor) = &q.cursor {
        crate::store::check_cursor(cursor).map_err(ApiError::store)?;
    }
    Ok(ConversationFilter {
        status,
        customer_id: q.customer_id.clone(),
        updated_after_ms: q.updated_after_ms,
        updated_before_ms: q.updated_before_ms,
        limit,
        cursor: q.cursor.clone(),
    })
}

/// A page of conversations.
#[derive(Serialize, ToSchema)]
#[schema(as = ConversationList)]
pub struct ListOut {
    /// Always `list`.
    #[schema(value_type = String, example = "list")]
    object: &'static str,
    /// Conversations without their turns, newest-updated first; each is `{id, customer: {id, account_id,
    /// plan, locale, attributes}, status, created_ms, updated_ms, turns, handoff, feedback}`.
    #[schema(value_type = Vec<Object>)]
    data: Vec<Conversation>,
    /// Pass as `cursor` to get the next page; null on the last page.
    next_cursor: Option<String>,
}

/// List conversations.
///
/// Newest-updated first, in keyset pages: pass `next_cursor` back as `cursor` for the next page.
/// Agent route: needs an agent key.
#[utoipa::path(
    get,
    path = "/v1/conversations",
    tag = "conversations",
    operation_id = "listConversations",
    params(
        ("status" = Option<String>, Query, description = "Only conversations in this status: `open`, `handed_off` or `resolved`"),
        ("customer_id" = Option<String>, Query, description = "Only this customer's conversations"),
        ("updated_after_ms" = Option<i64>, Query, description = "Only those updated at or after this time (ms since the Unix epoch, inclusive)"),
        ("updated_before_ms" = Option<i64>, Query, description = "Only those updated before this time (ms since the Unix epoch, exclusive)"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500 (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page; absent: start at the newest"),
    ),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "One page of conversations", body = ListOut),
        (status = 400, description = "`cursor` is not one this store returned (`invalid_value`)", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 422, description = "A query parameter is of the wrong type (`param` is `query`), or `status` or `limit` is out of range (`param` names it)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn list(State(state): State<SharedState>, q: Result<Query<ListQuery>, QueryRejection>) -> Result<Json<ListOut>, ApiError> {
    let q = query(q)?;
    let page = state.store()?.list_conversations(&filter(&q)?).await.map_err(ApiError::store)?;
    Ok(Json(ListOut { object: "list", data: page.items, next_cursor: page.next_cursor }))
}

/// A conversation with all its turns.
#[derive(Serialize, ToSchema)]
#[schema(as = ConversationWithTurns)]
pub struct ConversationOut {
    /// `{id, customer: {id, account_id, plan, locale, attributes}, status: open|handed_off|resolved,
    /// created_ms, updated_ms, turns, handoff: {reason, summary, by, at_ms}|null, feedback|null}`.
    #[schema(value_type = Object)]
    pub conversation: Conversation,
    /// In order; each is `{id, conversation_id, seq, role: customer|bot|agent, content,
    /// state: complete|pending|interrupted|disconnected|failed, created_ms, completed_ms, finish_reason,
    /// detail, audit, feedback}`.
    #[schema(value_type = Vec<Object>)]
    pub turns: Vec<Turn>,
}

/// Get a conversation and its turns.
///
/// The conversation and every turn, in order. Agent route: needs an agent key.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "conversations",
    operation_id = "getConversation",
    params(("id" = String, Path, description = "The conversation id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The conversation and its turns", body = ConversationOut),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn one(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<ConversationOut>, ApiError> {
    let (conversation, turns) = state.store()?.get_conversation(&id).await.map_err(ApiError::store)?;
    Ok(Json(ConversationOut { conversation, turns }))
}

/// Export conversations as JSON Lines.
///
/// One `{conversation, turns}` object per line (`application/x-ndjson`), selected as the list
/// selects them and streamed page by page (the whole store is never held in memory). A `cursor`
/// the store did not return is refused before anything is sent; a store failure part-way cuts
/// the stream off (the status is already 200). Agent route: needs an agent key.
#[utoipa::path(
    get,
    path = "/v1/conversations/export",
    tag = "conversations",
    operation_id = "exportConversations",
    params(
        ("status" = Option<String>, Query, description = "Only conversations in this status: `open`, `handed_off` or `resolved`"),
        ("customer_id" = Option<String>, Query, description = "Only this customer's conversations"),
        ("updated_after_ms" = Option<i64>, Query, description = "Only those updated at or after this time (ms since the Unix epoch, inclusive)"),
        ("updated_before_ms" = Option<i64>, Query, description = "Only those updated before this time (ms since the Unix epoch, exclusive)"),
        ("limit" = Option<u32>, Query, description = "Conversations read per page, 1 to 500 (default 200); the export goes on to the last page"),
        ("cursor" = Option<String>, Query, description = "Start after this `next_cursor` of a listing"),
    ),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "JSON Lines: one `{conversation, turns}` object per line, the shape of `GET /v1/conversations/{id}`",
            body = String, content_type = "application/x-ndjson"),
        (status = 400, description = "`cursor` is not one this store returned (`invalid_value`)", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 422, description = "A query parameter is of the wrong type (`param` is `query`), or `status` or `limit` is out of range (`param` names it)", body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn export(State(state): State<SharedState>, q: Result<Query<ListQuery>, QueryRejection>) -> Result<Response, ApiError> {
    let q = query(q)?;
    let mut f = filter(&q)?;
    if q.limit.is_none() {
        f.limit = 200;
    }
    let lines = state.store()?.export(f).map(|line| match line {
        Ok(mut l) => {
            l.push('\n');
            Ok::<_, std::io::Error>(l)
        }
        Err(e) => {
            tracing::error!(error = %e, "export failed part-way");
            Err(std::io::Error::other(e.to_string()))
        }
    });
    let mut resp = Body::from_stream(lines).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

// ---------------------------------------------------------------------------------------------
// Retention and privacy
// ---------------------------------------------------------------------------------------------

/// Body of the purge route.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = PurgeRequest)]
pub struct PurgeIn {
    /// Delete conversations not updated for this many days (0 to 36500; 0 deletes every conversation).
    #[schema(value_type = i64, required = true, minimum = 0, maximum = 36500)]
    older_than_days: Option<i64>,
}

/// Purge old conversations.
///
/// Retention on demand: deletes the conversations untouched for `older_than_days`, with their turns
/// and webhook deliveries, and finished deliveries as old. Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/conversations/purge",
    tag = "conversations",
    operation_id = "purgeConversations",
    request_body = PurgeIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = PURGE_SHAPE, body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`older_than_days` is missing or out of range", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn purge(State(state): State<SharedState>, ApiJson(body): ApiJson<PurgeIn>) -> Result<Json<store::PurgeReport>, ApiError> {
    let days = body.older_than_days.ok_or_else(|| ApiError::invalid_field("older_than_days", "`older_than_days` is required"))?;
    if !(0..=36_500).contains(&days) {
        return Err(ApiError::invalid_field("older_than_days", format!("`older_than_days` must be in [0, 36500] (got {days})")));
    }
    let cutoff = store::now_ms() - days * 86_400_000;
    let store = state.store()?;
    let mut report = store.purge_older_than(cutoff).await.map_err(ApiError::store)?;
    report.drafts = super::assist::purge_orphan_drafts(&state.config.grounding.docs_dir, store).await.map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// Delete everything stored about a customer.
///
/// For privacy requests: every conversation and turn of the customer, and the webhook deliveries
/// that name them. Agent route: needs an agent key.
#[utoipa::path(
    delete,
    path = "/v1/customers/{id}",
    tag = "conversations",
    operation_id = "deleteCustomer",
    params(("id" = String, Path, description = "The customer id (`helpline.customer.id` of the chat requests)")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = PURGE_SHAPE, body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn delete_customer(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<store::PurgeReport>, ApiError> {
    let store = state.store()?;
    let mut report = store.delete_customer(&id).await.map_err(ApiError::store)?;
    report.drafts = super::assist::purge_orphan_drafts(&state.config.grounding.docs_dir, store).await.map_err(ApiError::internal)?;
    Ok(Json(report))
}

/// Query of the deliveries route (documented inline in its OpenAPI annotation).
#[derive(Debug, Deserialize)]
pub struct DeliveriesQuery {
    status: Option<String>,
    limit: Option<u32>,
}

/// List the webhook outbox.
///
/// The handoff webhook's deliveries, dead letters included, with their attempts and last error.
#[utoipa::path(
    get,
    path = "/v1/deliveries",
    tag = "conversations",
    operation_id = "listDeliveries",
    params(
        ("status" = Option<String>, Query, description = "Only deliveries in this status: `pending`, `delivered` or `dead`"),
        ("limit" = Option<u32>, Query, description = "At most this many, 1 to 500 (default 100)"),
    ),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{object: \"list\", data: [{id, event, payload, status: pending|delivered|dead, attempts, \
next_attempt_ms, last_error, created_ms, updated_ms}]}`", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 422, description = "A query parameter is of the wrong type (`param` is `query`), or `status` is not one of the three", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn deliveries(State(state): State<SharedState>, q: Result<Query<DeliveriesQuery>, QueryRejection>) -> Result<Json<Value>, ApiError> {
    let q = query(q)?;
    let status = match q.status.as_deref() {
        None => None,
        Some("pending") => Some(store::DeliveryStatus::Pending),
        Some("delivered") => Some(store::DeliveryStatus::Delivered),
        Some("dead") => Some(store::DeliveryStatus::Dead),
        Some(other) => return Err(ApiError::invalid_field("status", format!("`status` must be `pending`, `delivered` or `dead` (got {other:?})"))),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid_field("limit", format!("`limit` must be in [1, 500] (got {limit})")));
    }
    let rows = state.store()?.deliveries(status, limit).await.map_err(ApiError::store)?;
    Ok(Json(json!({"object": "list", "data": rows})))
}

// ---------------------------------------------------------------------------------------------
// Handoff
// ---------------------------------------------------------------------------------------------

pub use crate::turn::handoff::{handoff_summary, sentiment};

/// Marks the conversation handed off with its summary and sends the summary to the webhook (the
/// delivery is recorded before this returns; sending happens in the background).
pub async fn hand_off(state: &AppState, conversation_id: &str, reason: &str, by: &str) -> Result<(Conversation, Value), ApiError> {
    let store = state.store()?;
    crate::turn::handoff::hand_off(store, state.webhook(), state.metrics.as_ref(), conversation_id, reason, by).await.map_err(ApiError::store)
}

/// Optional body of the handoff and takeover routes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = HandoffRequest)]
pub struct HandoffIn {
    /// A reason code (snake_case); default `customer_request` / `agent_takeover`. From a customer,
    /// one of `customer_request`, `not_helpful`, `complaint`, `billing`, `technical`, `account`.
    #[schema(pattern = "^[a-z0-9_]{1,64}$")]
    reason: Option<String>,
    /// Anonymous chat: the customer id the conversation was started with (`helpline.customer.id`).
    /// Verified customers send their token instead.
    #[schema(max_length = 128)]
    customer_id: Option<String>,
}

/// The reasons a customer may give for asking for a person (a fixed set, so metrics stay bounded).
pub const CUSTOMER_HANDOFF_REASONS: &[&str] = &["customer_request", "not_helpful", "complaint", "billing", "technical", "account"];

/// What a customer learns from asking for a person: that it happened, and the pack's message.
#[derive(Serialize, ToSchema)]
#[schema(as = CustomerHandoffResponse)]
pub struct CustomerHandoffOut {
    conversation_id: String,
    /// `handed_off`.
    status: &'static str,
    /// The policy pack's handoff message, to show the customer.
    message: String,
    /// `false` when the conversation was already with a person (nothing was sent again).
    handed_off_now: bool,
}

/// A conversation just handed off, with its handoff summary.
#[derive(Serialize, ToSchema)]
#[schema(as = HandoffResponse)]
pub struct HandoffOut {
    /// The conversation, now `handed_off`: `{id, customer, status, created_ms, updated_ms, turns,
    /// handoff: {reason, summary, by, at_ms}, feedback}`.
    #[schema(value_type = Object)]
    conversation: Conversation,
    /// The handoff summary, valid against `docs/schemas/handoff-summary.schema.json`.
    #[schema(value_type = Object)]
    summary: Value,
}

/// A JSON body that may be left out entirely.
fn optional_json<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("the body is not valid JSON of the right shape: {e}")))
}

fn reason_code(given: Option<String>, default: &str) -> Result<String, ApiError> {
    let r = given.unwrap_or_else(|| default.to_string());
    let ok = (1..=64).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(ApiError::invalid_field("reason", "`reason` must be 1 to 64 characters of a-z 0-9 _"));
    }
    Ok(r)
}

/// Hand a conversation to a person (the customer asks).
///
/// "Talk to a human": the conversation becomes `handed_off` with a handoff summary built from its
/// turns, and the summary goes to the handoff webhook when one is configured. Only the
/// conversation's own customer may ask (its customer token, or for anonymous chat the customer id
/// it was started with); the reply says only that it happened. Asking again sends nothing again;
/// a resolved conversation is not reopened. The body may be left out.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/handoff",
    tag = "conversations",
    operation_id = "handOffConversation",
    params(("id" = String, Path, description = "The conversation id")),
    request_body(content = Option<HandoffIn>, description = "Optional; default reason `customer_request`", content_type = "application/json"),
    responses(
        (status = 200, description = "Handed off (or already with a person)", body = CustomerHandoffOut),
        (status = 400, description = "The body is not valid JSON of the right shape", body = ErrorResponse),
        (status = 401, description = "A customer token that does not verify, or none where one is required", body = ErrorResponse),
        (status = 404, description = "No such conversation of this customer's (`not_found`)", body = ErrorResponse),
        (status = 409, description = "The conversation is resolved (`conversation_resolved`)", body = ErrorResponse),
        (status = 422, description = "`reason` not one of the customer reasons", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn customer_handoff(
    State(state): State<SharedState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<CustomerHandoffOut>, ApiError> {
    let body = optional_json::<HandoffIn>(&body)?;
    let caller = caller.map(|c| c.0).unwrap_or_default();
    let identity = super::identity::of_request(&state.config.access, &headers, &caller)?;
    let reason = reason_code(body.reason, "customer_request")?;
    if identity != super::identity::Identity::Operator && !CUSTOMER_HANDOFF_REASONS.contains(&reason.as_str()) {
        return Err(ApiError::invalid_field("reason", format!("`reason` must be one of {}", CUSTOMER_HANDOFF_REASONS.join(", "))));
    }
    let conv = own_conversation(&state, &identity, body.customer_id, &id).await?;
    let message = state.policy().map(|p| p.pack.messages.handoff.clone()).unwrap_or_default();
    match conv.status {
        // Asking again sends nothing again.
        store::ConversationStatus::HandedOff => {
            return Ok(Json(CustomerHandoffOut { conversation_id: id, status: "handed_off", message, handed_off_now: false }));
        }
        store::ConversationStatus::Resolved => {
            return Err(ApiError::conflict(
                "conversation_resolved",
                "this conversation is resolved and is not reopened; start a new conversation to ask for a person",
            ));
        }
        store::ConversationStatus::Open => {}
    }
    hand_off(&state, &id, &reason, "customer").await?;
    Ok(Json(CustomerHandoffOut { conversation_id: id, status: "handed_off", message, handed_off_now: true }))
}

/// The conversation `id` if this caller may act on it as its customer: an operator key, the
/// verified customer it belongs to, or (anonymous chat) the id it was started with. Any other
/// caller gets "not found".
async fn own_conversation(state: &AppState, identity: &super::identity::Identity, asserted: Option<String>, id: &str) -> Result<Conversation, ApiError> {
    let conv = state.store()?.conversation_head(id).await.map_err(ApiError::store)?;
    let customer = identity.customer(store::Customer { id: asserted, ..store::Customer::default() })?;
    if !identity.claim().may_use(&customer, &conv.customer) {
        return Err(ApiError::store(store::StoreError::not_found("conversation", id)));
    }
    Ok(conv)
}

/// Take a conversation over (an agent).
///
/// As the customer's handoff, requested by an agent: the conversation becomes `handed_off` with a
/// handoff summary, sent to the webhook when one is configured. The body may be left out. Agent
/// route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/takeover",
    tag = "conversations",
    operation_id = "takeOverConversation",
    params(("id" = String, Path, description = "The conversation id")),
    request_body(content = Option<HandoffIn>, description = "Optional; default reason `agent_takeover`", content_type = "application/json"),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Handed off", body = HandoffOut),
        (status = 400, description = "The body is not valid JSON of the right shape", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 422, description = "`reason` is not 1 to 64 characters of a-z 0-9 _", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn takeover(State(state): State<SharedState>, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<HandoffOut>, ApiError> {
    let reason = reason_code(optional_json::<HandoffIn>(&body)?.reason, "agent_takeover")?;
    let (conversation, summary) = hand_off(&state, &id, &reason, "agent").await?;
    Ok(Json(HandoffOut { conversation, summary }))
}

/// Body of the agent message route.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = AgentMessageRequest)]
pub struct MessageIn {
    /// The reply: 1 to 8000 characters, not all blank.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 8000)]
    content: Option<String>,
}

/// Longest agent reply, in characters.
pub const MAX_AGENT_MESSAGE_CHARS: usize = 8000;

/// Post an agent's reply.
///
/// Stored as an `agent` turn of the conversation. Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "conversations",
    operation_id = "postAgentMessage",
    params(("id" = String, Path, description = "The conversation id")),
    request_body = MessageIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The stored turn: `{id, conversation_id, seq, role: \"agent\", content, state: \"complete\", \
created_ms, completed_ms, finish_reason, detail, audit, feedback}`", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`content` is missing, blank or over 8000 characters", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn agent_message(State(state): State<SharedState>, Path(id): Path<String>, ApiJson(body): ApiJson<MessageIn>) -> Result<Json<Turn>, ApiError> {
    let content = body.content.unwrap_or_default();
    let n = content.chars().count();
    if content.trim().is_empty() || n > MAX_AGENT_MESSAGE_CHARS {
        return Err(ApiError::invalid_field("content", format!("`content` must have 1 to {MAX_AGENT_MESSAGE_CHARS} characters, not all blank (got {n})")));
    }
    let turn = state.store()?.append_turn(&id, Role::Agent, &content, TurnState::Complete).await.map_err(ApiError::store)?;
    Ok(Json(turn))
}

/// Resolve a conversation.
///
/// The case is closed: the conversation becomes `resolved` (its handoff record, if any, stays).
/// Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/resolve",
    tag = "conversations",
    operation_id = "resolveConversation",
    params(("id" = String, Path, description = "The conversation id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = CONVERSATION_SHAPE, body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn resolve(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Conversation>, ApiError> {
    let conv = state.store()?.set_status(&id, ConversationStatus::Resolved).await.map_err(ApiError::store)?;
    state.metrics.resolution();
    Ok(Json(conv))
}

// ---------------------------------------------------------------------------------------------
// Feedback
// ---------------------------------------------------------------------------------------------

/// Body of the feedback routes: at least one of `helpful`, `resolved` and `comment`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = FeedbackRequest)]
pub struct FeedbackIn {
    helpful: Option<bool>,
    resolved: Option<bool>,
    /// At most 2000 characters.
    #[schema(max_length = 2000)]
    comment: Option<String>,
    /// Answer feedback only: the conversation the answer belongs to (checked).
    conversation_id: Option<String>,
    /// Anonymous chat: the customer id the conversation was started with. Verified customers send
    /// their token instead.
    #[schema(max_length = 128)]
    customer_id: Option<String>,
}

fn feedback(body: &FeedbackIn) -> Result<Feedback, ApiError> {
    if body.helpful.is_none() && body.resolved.is_none() && body.comment.is_none() {
        return Err(ApiError::invalid_field("helpful", "give at least one of `helpful`, `resolved` and `comment`"));
    }
    if let Some(c) = &body.comment {
        if c.chars().count() > 2000 {
            return Err(ApiError::invalid_field("comment", "`comment` must have at most 2000 characters"));
        }
    }
    Ok(Feedback { helpful: body.helpful, resolved: body.resolved, comment: body.comment.clone(), at_ms: store::now_ms() })
}

/// Give feedback on a conversation.
///
/// The customer's verdict on the whole conversation (a later one replaces it). A customer API key
/// may call this route.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/feedback",
    tag = "conversations",
    operation_id = "conversationFeedback",
    params(("id" = String, Path, description = "The conversation id")),
    request_body = FeedbackIn,
    responses(
        (status = 200, description = "`{conversation_id, feedback: {helpful, resolved, comment, at_ms}}`", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "None of `helpful`, `resolved` and `comment` given, a field of the wrong type, or `comment` over 2000 characters", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn conversation_feedback(
    State(state): State<SharedState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<FeedbackIn>,
) -> Result<Json<Value>, ApiError> {
    let fb = feedback(&body)?;
    let caller = caller.map(|c| c.0).unwrap_or_default();
    let identity = super::identity::of_request(&state.config.access, &headers, &caller)?;
    own_conversation(&state, &identity, body.customer_id.clone(), &id).await?;
    state.store()?.record_feedback(None, &id, fb.clone()).await.map_err(ApiError::store)?;
    state.metrics.feedback("conversation", &fb);
    Ok(Json(json!({"conversation_id": id, "feedback": fb})))
}

/// Give feedback on an answer.
///
/// The customer's verdict on one bot or agent answer. `conversation_id`, when given, must be the
/// answer's conversation. A customer API key may call this route.
#[utoipa::path(
    post,
    path = "/v1/answers/{id}/feedback",
    tag = "conversations",
    operation_id = "answerFeedback",
    params(("id" = String, Path, description = "The answer id (`helpline.answer_id` of the chat answer)")),
    request_body = FeedbackIn,
    responses(
        (status = 200, description = "`{answer_id, conversation_id, feedback: {helpful, resolved, comment, at_ms}}`", body = Object),
        (status = 400, description = "Malformed JSON, or the id is the customer's own message (`invalid_value`, `param` is `turn_id`)", body = ErrorResponse),
        (status = 404, description = "No such answer (`not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "None of `helpful`, `resolved` and `comment` given, a field of the wrong type, `comment` over 2000 characters, or `conversation_id` is not the answer's", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn answer_feedback(
    State(state): State<SharedState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<FeedbackIn>,
) -> Result<Json<Value>, ApiError> {
    let fb = feedback(&body)?;
    let caller = caller.map(|c| c.0).unwrap_or_default();
    let identity = super::identity::of_request(&state.config.access, &headers, &caller)?;
    let store = state.store()?;
    let turn = store.get_turn(&id).await.map_err(ApiError::store)?;
    // Someone else's answer is "not found" like one that does not exist.
    own_conversation(&state, &identity, body.customer_id.clone(), &turn.conversation_id)
        .await
        .map_err(|e| if e.status == axum::http::StatusCode::NOT_FOUND { ApiError::store(store::StoreError::not_found("turn", &id)) } else { e })?;
    if let Some(c) = &body.conversation_id {
        if c != &turn.conversation_id {
            return Err(ApiError::invalid_field("conversation_id", "the answer is not part of this conversation"));
        }
    }
    store.record_feedback(Some(&id), &turn.conversation_id, fb.clone()).await.map_err(ApiError::store)?;
    state.metrics.feedback("answer", &fb);
    Ok(Json(json!({"answer_id": id, "conversation_id": turn.conversation_id, "feedback": fb})))
}
