//! Cross-cutting layers. (Skeleton: the operational helper fills in request ids, logging, metrics, auth, CORS, limits.)

use axum::Router;

use super::SharedState;

pub fn apply(app: Router<SharedState>, _state: SharedState) -> Router<SharedState> {
    app
}
