//! Operational routes: `GET /health` (liveness, public), `GET /ready` (model loaded and engine
//! running) and `GET /metrics` (Prometheus text).


use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, Loaded, SharedState};

pub fn routes() -> Router<SharedState> {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).route("/metrics", get(metrics))
}

/// Whether the engine thread still runs (it has not stopped or panicked).
pub fn engine_running(loaded: &Loaded) -> bool {
    loaded.engine.is_running()
}

async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<SharedState>) -> Result<impl IntoResponse, ApiError> {
    let loaded = state.loaded()?;
    if !engine_running(loaded) {
        return Err(ApiError::not_ready("the generation engine has stopped"));
    }
    if state.config.grounding.enabled && !state.has_knowledge() {
        return Err(ApiError::not_ready("the search index is not open, so answers cannot be grounded"));
    }
    Ok(Json(json!({"status": "ready", "model": state.config.model_id})))
}

async fn metrics(State(state): State<SharedState>) -> impl IntoResponse {
    let loaded = state.loaded().ok();
    let stats = loaded.map(|l| &**l.engine.stats());
    let ready = loaded.is_some_and(engine_running);
    let mut body = state.metrics.render_with(stats, ready);
    if let Ok(store) = state.store() {
        match store.counts().await {
            Ok(c) => state.metrics.render_store(&mut body, &c, state.webhook().map(|w| w.stats())),
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the conversation store's counts"),
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}
