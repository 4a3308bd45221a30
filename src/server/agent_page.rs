//! The agent console (`GET /agent`): filled in below.

use axum::Router;

use super::SharedState;

pub fn routes() -> Router<SharedState> {
    Router::new()
}
