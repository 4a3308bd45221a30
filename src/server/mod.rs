//! The HTTP server: OpenAI-compatible API over the engine, with the operational surface around it.
//!
//! `router(state)` builds the whole app (so tests can drive it on a real socket or in-process);
//! `listen::serve` runs it with header timeouts, size caps and graceful shutdown.

pub mod actions;
pub mod agent_page;
pub mod assist;
pub mod auth;
pub mod conversations;
pub mod knowledge;
pub mod dto;
pub mod error;
pub mod identity;
pub mod listen;
pub mod metrics;
pub mod middleware;
pub mod openai;
pub mod openapi;
pub mod policy;
pub mod ops;
pub mod sse;
pub mod validate;
pub mod web;

use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::Router;

use crate::config::ServeConfig;
use crate::guard::ActivePolicy;
use crate::retrieval::KnowledgeBase;
pub use error::{ApiError, ApiJson};
pub use metrics::Metrics;

pub use crate::engine::Loaded;

pub struct AppState {
    pub config: ServeConfig,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    loaded: OnceLock<Arc<Loaded>>,
    /// The search index, once one is open. Replaced only by the reload route (a reader inside it
    /// also follows commits made by `helpline index`).
    knowledge: RwLock<Option<KnowledgeBase>>,
    /// Serializes index rebuilds started through the API.
    pub reindexing: tokio::sync::Mutex<()>,
    /// One policy reload at a time (others get 409).
    pub reloading_policy: tokio::sync::Mutex<()>,
    /// The policy pack in force; replaced whole on reload, never half-applied.
    policy: RwLock<Option<Arc<ActivePolicy>>>,
    /// Where conversations are kept; chat refuses turns it cannot store.
    store: OnceLock<crate::store::Store>,
    /// Sends handoff summaries to the operator's system, when configured.
    webhook: OnceLock<crate::webhook::Webhook>,
    /// sha256 of the model file and of the tokenizer's vocabulary (for audit records), computed on first use.
    fingerprints: OnceLock<Fingerprints>,
    /// The sentence-embedding model (indexing, retrieval, evidence selection).
    embedder: OnceLock<Arc<crate::embed::Embedder>>,
    /// The operator's declared actions, when an actions file is configured; replaced whole on reload.
    actions: RwLock<Option<Arc<crate::turn::act::Runtime>>>,
    /// Requests being prepared before the engine's queue (validation, grammar compiles, templates,
    /// tokenizing): `max_preparing` at once, more are answered 429.
    preparing: Arc<tokio::sync::Semaphore>,
}

/// What identifies the model an answer came from (audit records, replay).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fingerprints {
    pub model_sha256: String,
    /// sha256 over every token's bytes, in id order.
    pub tokenizer_sha256: String,
    /// sha256 of the chat template's source.
    pub template_sha256: String,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Arc<Self> {
        Arc::new(AppState {
            metrics: Arc::new(Metrics::default()),
            started: Instant::now(),
            loaded: OnceLock::new(),
            knowledge: RwLock::new(None),
            reindexing: tokio::sync::Mutex::new(()),
            reloading_policy: tokio::sync::Mutex::new(()),
            policy: RwLock::new(None),
            store: OnceLock::new(),
            webhook: OnceLock::new(),
            fingerprints: OnceLock::new(),
            embedder: OnceLock::new(),
            actions: RwLock::new(None),
            preparing: Arc::new(tokio::sync::Semaphore::new(config.max_preparing)),
            config,
        })
    }

    /// A place among the requests being prepared, or 429 with `Retry-After` when all are taken.
    pub fn preparing(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.preparing.clone().try_acquire_owned().map_err(|_| {
            ApiError::too_many_requests(
                1,
                format!("{} requests are being prepared already (`max_preparing`); retry after the Retry-After seconds", self.config.max_preparing),
            )
        })
    }

    /// Makes the sentence-embedding model available (once).
    pub fn set_embedder(&self, embedder: Arc<crate::embed::Embedder>) {
        let _ = self.embedder.set(embedder);
    }

    /// The sentence-embedding model, or 503 while it is not loaded.
    pub fn embedder(&self) -> Result<Arc<crate::embed::Embedder>, ApiError> {
        self.embedder.get().cloned().ok_or_else(|| ApiError::not_ready("the sentence-embedding model is not loaded"))
    }

    /// Makes the conversation store available (once).
    pub fn set_store(&self, store: crate::store::Store) {
        let _ = self.store.set(store);
    }

    /// The conversation store, or 503 when none is open.
    pub fn store(&self) -> Result<&crate::store::Store, ApiError> {
        self.store.get().ok_or_else(|| ApiError::unavailable("store_unavailable", "the conversation store is not open; the turn was not taken"))
    }

    pub fn set_webhook(&self, webhook: crate::webhook::Webhook) {
        let _ = self.webhook.set(webhook);
    }

    pub fn webhook(&self) -> Option<&crate::webhook::Webhook> {
        self.webhook.get()
    }

    /// The served model's fingerprints; computed once, on first use (blocking: reads the model file).
    pub fn fingerprints(&self) -> Result<Fingerprints, ApiError> {
        use sha2::Digest;
        if let Some(f) = self.fingerprints.get() {
            return Ok(f.clone());
        }
        let loaded = self.loaded()?;
        let mut file = std::fs::File::open(&loaded.bundle.path).map_err(ApiError::internal)?;
        let mut hasher = sha2::Sha256::default();
        std::io::copy(&mut file, &mut hasher).map_err(ApiError::internal)?;
        let model_sha256 = format!("{:x}", hasher.finalize());
        let tok = &loaded.bundle.tokenizer;
        let mut h = sha2::Sha256::default();
        for id in 0..tok.vocab_size() as u32 {
            let bytes = tok.token_bytes(id);
            h.update((bytes.len() as u32).to_le_bytes());
            h.update(bytes);
        }
        let f = Fingerprints {
            model_sha256,
            tokenizer_sha256: format!("{:x}", h.finalize()),
            template_sha256: loaded.bundle.template.sha256().to_string(),
        };
        Ok(self.fingerprints.get_or_init(|| f).clone())
    }

    /// Makes the model available to handlers; `/ready` turns 200 after this.
    pub fn set_loaded(&self, loaded: Loaded) {
        let _ = self.loaded.set(Arc::new(loaded));
    }

    /// The model and engine, or 503 while they are still loading.
    pub fn loaded(&self) -> Result<&Loaded, ApiError> {
        self.loaded.get().map(|l| l.as_ref()).ok_or_else(|| ApiError::not_ready("the model is still loading"))
    }

    /// What a chat turn depends on, from the state in force now (the policy and index of this
    /// moment; a reload afterwards does not change a turn in flight).
    pub fn turn_deps(&self) -> Result<crate::turn::Deps, ApiError> {
        let model = self.loaded.get().cloned().ok_or_else(|| ApiError::not_ready("the model is still loading"))?;
        let fp = self.fingerprints()?;
        let g = &self.config.grounding;
        let identity = crate::turn::Identity {
            model_id: self.config.model_id.clone(),
            model_file: model.bundle.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            model_sha256: fp.model_sha256,
            tokenizer_sha256: fp.tokenizer_sha256,
            template_sha256: fp.template_sha256,
            embedder_sha256: self.embedder.get().map(|e| e.fingerprint().to_string()),
        };
        let settings = crate::turn::Settings {
            passages: g.passages,
            min_relevance: g.min_relevance,
            passage_tokens: g.passage_tokens,
            history_tokens: g.history_tokens,
            refusal_message: g.refusal_message.clone(),
            handoff_message: g.handoff_message.clone(),
            max_prompt_tokens: self.config.max_prompt_tokens,
        };
        Ok(crate::turn::Deps {
            policy: self.policy()?,
            knowledge: self.knowledge.read().unwrap_or_else(|e| e.into_inner()).clone(),
            model,
            store: self.store.get().cloned(),
            webhook: self.webhook.get().cloned(),
            settings: Arc::new(settings),
            observer: self.metrics.clone(),
            identity: Arc::new(identity),
            actions: self.actions.read().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }

    /// Puts declared actions in force (replacing the previous ones whole).
    pub fn set_actions(&self, actions: Option<crate::turn::act::Runtime>) {
        *self.actions.write().unwrap_or_else(|e| e.into_inner()) = actions.map(Arc::new);
    }

    /// The declared actions in force, if any.
    pub fn actions(&self) -> Option<Arc<crate::turn::act::Runtime>> {
        self.actions.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads, validates and readies the configured actions file (none configured: no actions).
    pub fn load_actions(&self) -> Result<Option<crate::turn::act::Runtime>, String> {
        let Some(path) = &self.config.grounding.actions_file else { return Ok(None) };
        let actions = crate::actions::Actions::load(path).map_err(|e| e.to_string())?;
        let embedder = self.embedder().map_err(|e| e.message)?;
        crate::turn::act::Runtime::new(actions, path.display().to_string(), &embedder).map(Some)
    }

    /// Makes a knowledge base available (or replaces it).
    pub fn set_knowledge(&self, kb: KnowledgeBase) {
        *self.knowledge.write().unwrap_or_else(|e| e.into_inner()) = Some(kb);
    }

    /// The knowledge base, or 503 when no index is open (grounding then fails closed).
    pub fn knowledge(&self) -> Result<KnowledgeBase, ApiError> {
        self.knowledge.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| {
            ApiError::unavailable(
                "no_index",
                format!(
                    "no search index is open, so answers cannot be grounded; build one with `helpline index --docs {} --index {}` \
                     or POST /v1/index/reload",
                    self.config.grounding.docs_dir.display(),
                    self.config.grounding.index_dir.display()
                ),
            )
        })
    }

    /// Puts a validated policy pack in force (replacing the previous one whole).
    pub fn set_policy(&self, policy: ActivePolicy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(policy));
    }

    /// The policy pack in force, or 503 when none loaded (guarded chat fails closed).
    pub fn policy(&self) -> Result<Arc<ActivePolicy>, ApiError> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| {
            ApiError::unavailable("no_policy", "no policy pack is loaded, so answers cannot be guarded; fix the pack and POST /v1/policy/reload")
        })
    }

    pub fn has_knowledge(&self) -> bool {
        self.knowledge.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.get().is_some()
    }
}

pub type SharedState = Arc<AppState>;

/// The whole application: API routes, operational routes, then the cross-cutting layers
/// (request ids and logging, metrics, auth, CORS, body limit) and the JSON 404/405 fallbacks.
pub fn router(state: SharedState) -> Router {
    let app = Router::new()
        .merge(openai::routes())
        .merge(knowledge::routes())
        .merge(policy::routes())
        .merge(conversations::routes())
        .merge(actions::routes())
        .merge(assist::routes())
        .merge(ops::routes())
        .merge(openapi::routes())
        .merge(web::routes())
        .merge(agent_page::routes());
    middleware::apply(app, state.clone()).with_state(state)
}
