//! Agent assist: reply drafts, case summaries and knowledge-base drafts (filled in below).

use axum::Router;

use super::SharedState;

pub fn routes() -> Router<SharedState> {
    Router::new()
}
