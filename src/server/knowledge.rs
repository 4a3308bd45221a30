//! The knowledge base over HTTP: `POST /v1/retrieve` (what the bot would see for a question),
//! `GET /v1/index` (what is indexed) and `POST /v1/index/reload` (re-index the docs directory and
//! switch to the new index without a restart).

use std::time::Instant;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::dto::{ErrorResponse, ListObject, RetrieveRequest, RetrieveResponse};
use super::error::{ApiError, ApiJson};
use crate::turn::passage_out;
use super::SharedState;
use crate::retrieval::{self, build_index, IndexOptions, KnowledgeBase, RetrievalError};

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/retrieve", post(retrieve))
        .route("/v1/index", get(index_status))
        .route("/v1/index/reload", post(reload))
}

/// Retrieve passages from the approved documentation.
///
/// Ranked passages for `query` (best first), the same search a chat turn runs, with the relevance
/// verdict chat would act on. Draft and retired articles are never returned.
#[utoipa::path(
    post,
    path = "/v1/retrieve",
    tag = "helpline",
    operation_id = "retrieve",
    request_body = RetrieveRequest,
    responses(
        (status = 200, description = "Ranked passages", body = RetrieveResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`query`, `k` or a filter is missing or out of range (`param` names it)", body = ErrorResponse),
        (status = 503, description = "No search index is open (`no_index`)", body = ErrorResponse),
    )
)]
pub async fn retrieve(State(state): State<SharedState>, ApiJson(req): ApiJson<RetrieveRequest>) -> Result<Json<RetrieveResponse>, ApiError> {
    let (query, k, filters) = super::validate::retrieve(&req)?;
    let kb = state.knowledge()?;
    let st = state.clone();
    let min = state.config.grounding.min_relevance;
    let q = query.clone();
    let (passages, version, relevant) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let started = Instant::now();
        let found = kb.retrieve(&q, &[], retrieval::EARLIER_TURN_WEIGHT, k.max(crate::turn::evidence::RETRIEVE_K), &filters).map_err(retrieval_error)?;
        st.metrics.observe_retrieval(started.elapsed().as_secs_f64());
        // The chat turn's gate: would the bot answer this?
        let (_, gate) = crate::turn::judge(&kb, &found, &q, min)?;
        let mut passages = found.passages;
        passages.truncate(k);
        Ok((passages, kb.version(), gate.answered))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(RetrieveResponse {
        object: ListObject::List,
        query,
        index_version: version,
        relevant,
        min_relevance: min,
        data: passages.iter().map(|p| passage_out(p, None, true)).collect(),
    }))
}

/// What the open index holds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct IndexStatus {
    pub index_version: String,
    /// Approved articles searchable.
    pub documents: usize,
    /// Approved passages (chunks) searchable.
    pub passages: usize,
    pub docs_dir: String,
}

/// Describe the open index.
#[utoipa::path(
    get,
    path = "/v1/index",
    tag = "helpline",
    operation_id = "indexStatus",
    responses(
        (status = 200, description = "The open index", body = IndexStatus),
        (status = 503, description = "No search index is open (`no_index`)", body = ErrorResponse),
    )
)]
pub async fn index_status(State(state): State<SharedState>) -> Result<Json<IndexStatus>, ApiError> {
    let kb = state.knowledge()?;
    Ok(Json(status_of(&kb, &state)))
}

fn status_of(kb: &KnowledgeBase, state: &SharedState) -> IndexStatus {
    IndexStatus {
        index_version: kb.version(),
        documents: kb.num_documents(),
        passages: kb.num_chunks(),
        docs_dir: state.config.grounding.docs_dir.display().to_string(),
    }
}

/// The outcome of a re-index.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReloadResponse {
    /// The index now served.
    pub index: IndexStatus,
    /// Whether the served content changed.
    pub changed: bool,
    /// Per-file outcome: `indexed`, `unchanged`, `removed`, `excluded` (draft/retired) or `skipped` with its reason.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
}

/// Re-index the docs directory and switch to the result.
///
/// Indexes the server's docs directory incrementally (changed files only) in one atomic commit,
/// then switches searches to it: no restart, and no request ever sees a half-built index. Files
/// that cannot be read are listed under `report` with the reason; the rest are indexed. Rebuilds
/// are serialized; one running elsewhere (`helpline index`) gives 409.
#[utoipa::path(
    post,
    path = "/v1/index/reload",
    tag = "helpline",
    operation_id = "reloadIndex",
    responses(
        (status = 200, description = "Re-indexed and switched", body = ReloadResponse),
        (status = 409, description = "Another process is writing the index (`index_locked`)", body = ErrorResponse),
        (status = 500, description = "Indexing failed; the previous index is still served", body = ErrorResponse),
    )
)]
pub async fn reload(State(state): State<SharedState>) -> Result<Json<ReloadResponse>, ApiError> {
    reindex(&state).await.map(Json)
}

/// Re-indexes the docs directory and switches searches to the result: what `POST /v1/index/reload`
/// does, also called after a knowledge-base draft is approved. Rebuilds are serialized.
pub async fn reindex(state: &SharedState) -> Result<ReloadResponse, ApiError> {
    let _one_at_a_time = state.reindexing.lock().await;
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<ReloadResponse, ApiError> {
        let g = &st.config.grounding;
        let embedder = st.embedder()?;
        let before = st.knowledge().ok().map(|kb| kb.version());
        let report = build_index(&IndexOptions { docs_dir: g.docs_dir.clone(), index_dir: g.index_dir.clone(), embedder: embedder.clone() }).map_err(|e| match e {
            RetrievalError::Locked { .. } => ApiError::conflict("index_locked", e.to_string()),
            RetrievalError::DocsDir { .. } => ApiError::unavailable("docs_unreadable", e.to_string()),
            other => ApiError::internal(other),
        })?;
        let kb = match st.knowledge() {
            Ok(kb) => {
                kb.reload().map_err(ApiError::internal)?;
                kb
            }
            Err(_) => KnowledgeBase::open(&g.index_dir, embedder.clone()).map_err(retrieval_error)?,
        };
        st.set_knowledge(kb.clone());
        if let Ok(policy) = st.policy() {
            if let Err(e) = crate::turn::check_decision_articles(&policy, Some(&kb)) {
                // The decision then quotes what retrieval finds; the pack should be fixed.
                tracing::warn!("{e}");
            }
        }
        let status = status_of(&kb, &st);
        let changed = before.as_deref() != Some(status.index_version.as_str());
        let report = serde_json::to_value(&report).map_err(ApiError::internal)?;
        Ok(ReloadResponse { index: status, changed, report })
    })
    .await
    .map_err(ApiError::internal)?;
    state.metrics.index_reload(if result.is_ok() { "ok" } else { "failed" });
    result
}

pub fn retrieval_error(e: RetrievalError) -> ApiError {
    match e {
        RetrievalError::NoIndex { .. } => ApiError::unavailable("no_index", e.to_string()),
        other => ApiError::internal(other),
    }
}
