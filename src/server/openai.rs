//! OpenAI-compatible routes. (Skeleton: the API helper fills these in.)

use axum::Router;

use super::SharedState;

pub fn routes() -> Router<SharedState> {
    Router::new()
}
