//! Operational routes: /health, /ready, /metrics, /openapi.json. (Skeleton.)

use axum::Router;

use super::SharedState;

pub fn routes() -> Router<SharedState> {
    Router::new()
}
