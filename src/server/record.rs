//! Recording one chat turn: the customer's message and a pending answer are committed before
//! generation starts; the answer is completed (with what the server reported about it and its
//! audit record) before the final event goes out. An answer whose client went away is stored as
//! far as it got, as `disconnected`.

use std::time::Instant;

use serde_json::{json, Value};

use super::error::ApiError;
use super::grounding::GroundingCtx;
use super::validate::ValidGeneration;
use super::SharedState;
use crate::store::{self, Conversation, ConversationStatus, Customer, Role, TurnState};

/// Which conversation a chat turn belongs to, and who the customer is.
#[derive(Debug, Clone, Default)]
pub struct ConversationRef {
    pub id: Option<String>,
    pub customer: Customer,
}

/// The stored answer of one chat turn, until it is completed.
pub struct Recorder {
    state: SharedState,
    pub conversation: Conversation,
    pub answer_id: String,
    /// The text sent so far (what a disconnected answer is stored with).
    partial: String,
    audit: Value,
    done: bool,
}

impl Recorder {
    /// Commits the customer's message and a pending answer (both durable when this returns).
    pub async fn begin(state: &SharedState, conv: &ConversationRef, message: &str) -> Result<Recorder, ApiError> {
        let started = Instant::now();
        let store = state.store()?;
        let c = store.ensure_conversation(conv.id.as_deref(), &conv.customer).await.map_err(ApiError::store)?;
        store.append_turn(&c.id, Role::Customer, message, TurnState::Complete).await.map_err(ApiError::store)?;
        let answer = store.append_turn(&c.id, Role::Bot, "", TurnState::Pending).await.map_err(ApiError::store)?;
        state.metrics.observe_store_write(started.elapsed().as_secs_f64());
        Ok(Recorder { state: state.clone(), conversation: c, answer_id: answer.id, partial: String::new(), audit: Value::Null, done: false })
    }

    /// Whether a person already has this conversation (the bot then does not answer).
    pub fn handed_off(&self) -> bool {
        self.conversation.status == ConversationStatus::HandedOff
    }

    pub fn set_audit(&mut self, audit: Value) {
        self.audit = audit;
    }

    /// Text streamed to the client.
    pub fn push(&mut self, text: &str) {
        self.partial.push_str(text);
    }

    /// Completes the answer: its text, Helpline's outcome code (`stop`, `length`, `content_filter`,
    /// `refused`, `handoff`), what the server reported (`detail`) and the audit record.
    pub async fn finish(&mut self, content: &str, outcome: &str, detail: Value) -> Result<(), ApiError> {
        let started = Instant::now();
        if let Value::Object(a) = &mut self.audit {
            a.insert("outcome".into(), json!({"finish_reason": outcome, "guard": detail.get("guard"), "completed_ms": store::now_ms()}));
        }
        let audit = (!self.audit.is_null()).then(|| self.audit.clone());
        let store = self.state.store()?;
        store
            .complete_turn(&self.answer_id, content, TurnState::Complete, Some(outcome), Some(detail), audit)
            .await
            .map_err(ApiError::store)?;
        self.done = true;
        self.state.metrics.observe_store_write(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The answer failed after it started: stored as `failed` with what was sent.
    pub async fn fail(&mut self, why: &str) {
        self.done = true;
        if let Ok(store) = self.state.store() {
            let detail = json!({"error": why});
            if let Err(e) = store.complete_turn(&self.answer_id, &self.partial, TurnState::Failed, Some("error"), Some(detail), None).await {
                tracing::error!(error = %e, answer = %self.answer_id, "cannot record a failed answer");
            }
        }
    }
}

impl Drop for Recorder {
    /// The client went away (or the handler was dropped) before the answer was stored: keep what
    /// was sent, as `disconnected`.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Ok(store) = self.state.store().cloned() else { return };
        let (id, text) = (self.answer_id.clone(), std::mem::take(&mut self.partial));
        let audit = (!self.audit.is_null()).then(|| self.audit.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let detail = json!({"finish_reason": "client_disconnected"});
                if let Err(e) = store.complete_turn(&id, &text, TurnState::Disconnected, Some("client_disconnected"), Some(detail), audit).await {
                    tracing::error!(error = %e, answer = %id, "cannot record a disconnected answer");
                }
            });
        }
    }
}

/// The audit record of a generated answer: everything needed to tell where it came from and to
/// regenerate it (`request` is the chat request as received, with the seed that was used).
pub fn audit(state: &SharedState, mut request: Value, valid: Option<&ValidGeneration>, grounding: &GroundingCtx) -> Result<Value, ApiError> {
    let fp = state.fingerprints()?;
    let loaded = state.loaded()?;
    let policy_version = state.policy().ok().map(|p| p.pack.version.clone());
    let sampling = valid.map(|v| {
        let p = &v.job.params;
        json!({
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p, "seed": p.seed,
            "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "max_tokens": v.job.max_tokens, "stop": v.job.stop,
        })
    });
    if let (Some(v), Value::Object(r)) = (valid, &mut request) {
        // Replay uses the very seed this answer was sampled with.
        r.insert("seed".into(), json!(v.job.params.seed));
    }
    let prompt_sha256 = valid.map(|v| {
        use sha2::Digest;
        let mut h = sha2::Sha256::default();
        for id in &v.job.prompt {
            h.update(id.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    });
    Ok(json!({
        "created_ms": store::now_ms(),
        "model": {
            "id": state.config.model_id,
            "file": loaded.bundle.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": fp.model_sha256,
        },
        "tokenizer_sha256": fp.tokenizer_sha256,
        "template_sha256": fp.template_sha256,
        "index_version": grounding.info.index_version,
        "policy_version": policy_version,
        "grounding": {
            "status": grounding.status_label(),
            "query": grounding.info.query,
            "passages": grounding.info.passages,
            "dropped": grounding.info.dropped,
        },
        "guard": grounding.guard,
        "sampling": sampling,
        "prompt_tokens": valid.map(|v| v.job.prompt.len()),
        "prompt_sha256": prompt_sha256,
        "request": request,
        "engine": "helpline",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}
