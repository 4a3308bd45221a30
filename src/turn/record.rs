//! Recording one chat turn: the customer's message and a pending answer are committed before
//! anything is generated; the answer is completed (with what the turn reported about it and its
//! audit record) before the final event goes out. An answer whose reader went away is stored as far
//! as it got, as `disconnected`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::{Identity, Observer};
use crate::store::{self, Conversation, ConversationStatus, Customer, Role, Store, StoreError, TurnState};

/// Which conversation a chat turn belongs to, and who the customer is.
#[derive(Debug, Clone, Default)]
pub struct ConversationRef {
    pub id: Option<String>,
    pub customer: Customer,
    /// How the caller may reach a stored conversation.
    pub claim: Claim,
    /// The most turns the conversation may hold (this turn adds two); none: no bound.
    pub max_turns: Option<i64>,
}

/// Who is asking to continue a conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Claim {
    /// The operator's own systems (agent or admin keys, replay, assist): any conversation, the
    /// customer's details merged in.
    #[default]
    Operator,
    /// A customer verified by a signed token: only conversations started by that same verified
    /// customer; the token's details win.
    Verified,
    /// A customer as the request asserts it (anonymous chat): only conversations started without a
    /// token under the same asserted id (or none); the details stay as they were first given.
    Anonymous,
}

impl Claim {
    /// Whether this caller, asserting `customer`, may continue a conversation stored with `stored`.
    pub fn may_use(self, customer: &Customer, stored: &Customer) -> bool {
        match self {
            Claim::Operator => true,
            Claim::Verified => stored.verified && stored.id == customer.id,
            Claim::Anonymous => !stored.verified && stored.id == customer.id,
        }
    }
}

/// The stored answer of one chat turn, until it is completed.
pub struct Recorder {
    store: Store,
    observer: Arc<dyn Observer>,
    pub conversation: Conversation,
    pub answer_id: String,
    /// The customer's message of this turn as stored: its turn id and text.
    question: (String, String),
    /// The text sent so far (what a disconnected answer is stored with).
    partial: String,
    audit: Value,
    done: bool,
}

/// The stored conversation a turn belongs to (created when new).
///
/// A customer naming a conversation that is not theirs (another customer's, a verified one from an
/// anonymous request, or an anonymous one under another or no id) gets "not found": neither its
/// existence nor its details leak, and nothing is appended or overwritten.
pub async fn open(store: &Store, conv: &ConversationRef) -> Result<Conversation, StoreError> {
    if let (Some(id), true) = (&conv.id, conv.claim != Claim::Operator) {
        match store.conversation_head(id).await {
            Ok(existing) => {
                if !conv.claim.may_use(&conv.customer, &existing.customer) {
                    return Err(StoreError::not_found("conversation", id));
                }
                if conv.claim == Claim::Anonymous {
                    return Ok(existing);
                }
            }
            Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    store.ensure_conversation(conv.id.as_deref(), &conv.customer).await
}

impl Recorder {
    /// Commits the customer's message and a pending answer (both durable when this returns).
    pub async fn begin(store: &Store, observer: Arc<dyn Observer>, conversation: Conversation, message: &str) -> Result<Recorder, StoreError> {
        let started = Instant::now();
        let question = store.append_turn(&conversation.id, Role::Customer, message, TurnState::Complete).await?;
        let answer = store.append_turn(&conversation.id, Role::Bot, "", TurnState::Pending).await?;
        observer.store_write(started.elapsed().as_secs_f64());
        Ok(Recorder {
            store: store.clone(),
            observer,
            conversation,
            answer_id: answer.id,
            question: (question.id, message.to_string()),
            partial: String::new(),
            audit: Value::Null,
            done: false,
        })
    }

    /// Whether a person already has this conversation (the bot then does not answer).
    pub fn handed_off(&self) -> bool {
        self.conversation.status == ConversationStatus::HandedOff
    }

    /// Keeps the audit record for the answer. The customer's message is already stored as its own
    /// turn, so the record's copy of the request names that turn instead of holding the text again
    /// (`content_in_turn`; replay reads it back).
    pub fn set_audit(&mut self, mut audit: Value) {
        if let Some(Value::Array(messages)) = audit.get_mut("request").and_then(|r| r.get_mut("messages")) {
            if let Some(last) = messages.iter_mut().rev().find(|m| m["role"] == "user") {
                if last["content"].as_str() == Some(self.question.1.as_str()) {
                    last["content"] = Value::Null;
                    last["content_in_turn"] = json!(self.question.0);
                }
            }
        }
        self.audit = audit;
    }

    /// Text sent to the reader.
    pub fn push(&mut self, text: &str) {
        self.partial.push_str(text);
    }

    /// Completes the answer: its text, Helpline's outcome code (`stop`, `length`, `content_filter`,
    /// `refused`, `handoff`, `decision`), what the turn reported (`detail`) and the audit record.
    pub async fn finish(&mut self, content: &str, outcome: &str, detail: Value) -> Result<(), StoreError> {
        let started = Instant::now();
        if let Value::Object(a) = &mut self.audit {
            a.insert("outcome".into(), json!({"finish_reason": outcome, "guard": detail.get("guard"), "completed_ms": store::now_ms()}));
        }
        let audit = (!self.audit.is_null()).then(|| self.audit.clone());
        self.store.complete_turn(&self.answer_id, content, TurnState::Complete, Some(outcome), Some(detail), audit).await?;
        self.done = true;
        self.observer.store_write(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The answer failed after it started: stored as `failed` with what was sent.
    pub async fn fail(&mut self, why: &str) {
        self.done = true;
        let detail = json!({"error": why});
        if let Err(e) = self.store.complete_turn(&self.answer_id, &self.partial, TurnState::Failed, Some("error"), Some(detail), None).await {
            tracing::error!(error = %e, answer = %self.answer_id, "cannot record a failed answer");
        }
    }
}

impl Drop for Recorder {
    /// The reader went away (or the turn was dropped) before the answer was stored: keep what was
    /// sent, as `disconnected`.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let store = self.store.clone();
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

/// What an audit record says about how an answer was sampled (absent for answers no model wrote).
#[derive(Debug, Clone)]
pub struct Sampled {
    pub params: crate::sampler::SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub prompt: Vec<u32>,
}

/// The audit record of an answer: everything needed to tell where it came from and to regenerate
/// it (`request` is the request as received, with the seed that was used).
#[allow(clippy::too_many_arguments)]
pub fn audit(
    identity: &Identity,
    mut request: Value,
    sampled: Option<&Sampled>,
    index_version: Option<&str>,
    policy_version: &str,
    grounding: &super::report::GroundingInfo,
    guard: Option<&super::report::GuardInfo>,
    status_label: &str,
) -> Value {
    let sampling = sampled.map(|v| {
        let p = &v.params;
        json!({
            "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p, "seed": p.seed,
            "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "max_tokens": v.max_tokens, "stop": v.stop,
        })
    });
    if let (Some(v), Value::Object(r)) = (sampled, &mut request) {
        // Replay uses the very seed this answer was sampled with.
        r.insert("seed".into(), json!(v.params.seed));
    }
    let prompt_sha256 = sampled.map(|v| {
        use sha2::Digest;
        let mut h = sha2::Sha256::default();
        for id in &v.prompt {
            h.update(id.to_le_bytes());
        }
        format!("{:x}", h.finalize())
    });
    json!({
        "created_ms": store::now_ms(),
        "model": {
            "id": identity.model_id,
            "file": identity.model_file,
            "sha256": identity.model_sha256,
        },
        "tokenizer_sha256": identity.tokenizer_sha256,
        "template_sha256": identity.template_sha256,
        "embedder_sha256": identity.embedder_sha256,
        "index_version": index_version,
        "policy_version": policy_version,
        "grounding": {
            "status": status_label,
            "mode": grounding.mode,
            "query": grounding.query,
            "passages": grounding.passages,
            "evidence": grounding.evidence,
            "gate": grounding.gate,
            "dropped": grounding.dropped,
        },
        "guard": guard,
        "sampling": sampling,
        "prompt_tokens": sampled.map(|v| v.prompt.len()),
        "prompt_sha256": prompt_sha256,
        "request": request,
        "engine": "helpline",
        "version": env!("CARGO_PKG_VERSION"),
    })
}
