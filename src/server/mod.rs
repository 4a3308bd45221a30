//! The HTTP server: OpenAI-compatible API over the engine, with the operational surface around it.
//!
//! `router(state)` builds the whole app (so tests can drive it on a real socket or in-process);
//! `listen::serve` runs it with header timeouts, size caps and graceful shutdown.

pub mod auth;
pub mod dto;
pub mod error;
pub mod listen;
pub mod metrics;
pub mod middleware;
pub mod openai;
pub mod openapi;
pub mod ops;
pub mod sse;
pub mod validate;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;

use crate::config::ServeConfig;
use crate::engine::{Engine, ModelBundle};
pub use error::{ApiError, ApiJson};
pub use metrics::Metrics;

/// What exists once the model has loaded.
pub struct Loaded {
    pub bundle: ModelBundle,
    pub engine: Engine,
}

pub struct AppState {
    pub config: ServeConfig,
    pub metrics: Metrics,
    pub started: Instant,
    loaded: OnceLock<Loaded>,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Arc<Self> {
        Arc::new(AppState { config, metrics: Metrics::default(), started: Instant::now(), loaded: OnceLock::new() })
    }

    /// Makes the model available to handlers; `/ready` turns 200 after this.
    pub fn set_loaded(&self, loaded: Loaded) {
        let _ = self.loaded.set(loaded);
    }

    /// The model and engine, or 503 while they are still loading.
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().ok_or_else(|| ApiError::not_ready("the model is still loading"))
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get().is_some()
    }
}

pub type SharedState = Arc<AppState>;

/// The whole application: API routes, operational routes, then the cross-cutting layers
/// (request ids and logging, metrics, auth, CORS, body limit) and the JSON 404/405 fallbacks.
pub fn router(state: SharedState) -> Router {
    let app = Router::new().merge(openai::routes()).merge(ops::routes()).merge(openapi::routes());
    middleware::apply(app, state.clone()).with_state(state)
}
