//! One chat turn, in order. [`run`] reads top to bottom:
//!
//! validated request -> conversation state (a handed-off conversation is decided first) -> policy
//! pre-checks (escalation, out of scope, accepted offers, decisions, small talk) -> retrieval ->
//! evidence -> the relevance gate -> composition (an assembled answer, or a prompt and guard for the
//! model) -> record the turn -> decode -> post-process (citations, the sentence check) -> finish
//! the record -> the final event.
//!
//! Chat completions, agent reply drafts, `helpline ask` and `helpline chat` all go through here.
//! The turn takes its dependencies explicitly ([`Deps`]) and returns a domain error ([`TurnError`])
//! that the server maps into its one error table. It knows the layers below it (policy, retrieval,
//! engine, store), never HTTP.

pub mod act;
pub mod check;
pub mod compose;
pub mod evidence;
pub mod handoff;
pub mod precheck;
pub mod record;
pub mod report;
pub mod tools;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, Stream};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Event, Job, JobGuard, Loaded, SubmitError, Timings};
use crate::guard::grammar::CompiledGuard;
use crate::guard::ActivePolicy;
use crate::prompt::{self, Budget, CitationFilter};
use crate::retrieval::{evidence::UnitKind, Filters, KnowledgeBase, Passage, RetrievalError};
use crate::sampler::SamplingParams;
use crate::store::{Conversation, ConversationStatus, Store, StoreError};
use crate::tokenizer::{ChatMessage, TokenizerError};
use crate::webhook::Webhook;

use check::{Checker, GivenUnit};
use evidence::Selection;
use precheck::PreCheck;
pub use record::{Claim, ConversationRef};
use record::{Recorder, Sampled};
use report::{
    BudgetOut, CitedBy, Dropped, EvidenceOut, FinishReason, GateOut, GroundingInfo, GroundingStatus, GuardAction, GuardInfo, HandoffInfo,
    HelplineInfo, PassageOut, StructureInfo, TimingsOut, Usage,
};

// ---------------------------------------------------------------------------------------------
// What a turn depends on
// ---------------------------------------------------------------------------------------------

/// Counters the turn reports to (the server's metrics; nothing for the CLI).
pub trait Observer: Send + Sync {
    fn grounding(&self, _status: &'static str) {}
    fn retrieval(&self, _secs: f64) {}
    fn embedding(&self, _secs: f64) {}
    fn guard_rule(&self, _rule: &str, _action: &'static str) {}
    fn handoff(&self, _reason: &str) {}
    fn prompt_tokens(&self, _n: u64) {}
    /// A generated token: `first` for the answer's first (its time since submission is the TTFT),
    /// else the gap since the previous one.
    fn token(&self, _first: bool, _secs: f64) {}
    fn invalid_citations(&self, _n: u64) {}
    fn store_write(&self, _secs: f64) {}
    fn rejection(&self, _reason: &'static str) {}
    /// One generated sentence checked: `kept`, `replaced` or `dropped`.
    fn sentence(&self, _outcome: &'static str) {}
    /// How an answer was made: `assembled`, `generative`, `quote`, `model`, `fixed`.
    fn answer_mode(&self, _mode: &'static str) {}
    /// An action's backend call: `outcome` is `ok`, `timeout`, `not_found`, `http_500`,
    /// `rate_limited`...
    fn action_call(&self, _action: &str, _outcome: &str, _secs: f64) {}
    /// A write's confirmation: `asked`, `given`, `declined` or `lapsed`.
    fn action_confirmation(&self, _event: &'static str) {}
}

/// Reports nowhere.
pub struct NoObserver;
impl Observer for NoObserver {}

/// What identifies the models an answer came from (audit records, replay).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Identity {
    pub model_id: String,
    pub model_file: Option<String>,
    pub model_sha256: String,
    pub tokenizer_sha256: String,
    pub template_sha256: String,
    pub embedder_sha256: Option<String>,
}

/// The operator's settings a turn follows.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Passages retrieved per turn.
    pub passages: usize,
    /// The relevance gate's threshold on its score.
    pub min_relevance: f32,
    /// Generative mode: tokens the evidence and the earlier turns may take in the prompt.
    pub passage_tokens: usize,
    pub history_tokens: usize,
    /// What the bot says when the documentation does not cover the question.
    pub refusal_message: String,
    /// How a customer reaches a person (reported with refusals).
    pub handoff_message: String,
    /// Most prompt tokens accepted (besides the model's context).
    pub max_prompt_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        let g = crate::config::GroundingConfig::default();
        Settings {
            passages: g.passages,
            min_relevance: g.min_relevance,
            passage_tokens: g.passage_tokens,
            history_tokens: g.history_tokens,
            refusal_message: g.refusal_message,
            handoff_message: g.handoff_message,
            max_prompt_tokens: 8192,
        }
    }
}

/// Everything one turn needs, cheap to clone (the heavy parts are shared).
#[derive(Clone)]
pub struct Deps {
    pub policy: Arc<ActivePolicy>,
    /// The approved documentation; none: grounded turns fail with `no_index`.
    pub knowledge: Option<KnowledgeBase>,
    pub model: Arc<Loaded>,
    /// Where turns are recorded; none: nothing is stored (the CLI).
    pub store: Option<Store>,
    pub webhook: Option<Webhook>,
    pub settings: Arc<Settings>,
    pub observer: Arc<dyn Observer>,
    pub identity: Arc<Identity>,
    /// The operator's declared actions; none: the bot only answers.
    pub actions: Option<Arc<act::Runtime>>,
}

// ---------------------------------------------------------------------------------------------
// The request
// ---------------------------------------------------------------------------------------------

/// How a grounded answer is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Quotes of the evidence between fixed connectives; the model is not asked to state facts.
    Assembled,
    /// The model's wording, each sentence checked against the evidence before it is sent.
    Generative,
    /// The model copying evidence sentences under a grammar.
    Quote,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Assembled => "assembled",
            Mode::Generative => "generative",
            Mode::Quote => "quote",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "assembled" => Some(Mode::Assembled),
            "generative" => Some(Mode::Generative),
            "quote" => Some(Mode::Quote),
            _ => None,
        }
    }
}

/// Sampling of a model answer, already checked.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// A client's structured-output constraint, compiled.
#[derive(Debug, Clone)]
pub struct Structured {
    /// `json_object`, `json_schema`, `regex` or `lark`.
    pub kind: &'static str,
    /// The output is JSON (the policy filter then reads JSON escapes).
    pub json: bool,
    pub guard: CompiledGuard,
}

/// A validated chat turn.
#[derive(Debug, Clone)]
pub struct Request {
    /// The conversation as the client sent it, ending with the customer's message (or, with
    /// grounding off, any role).
    pub messages: Vec<ChatMessage>,
    pub sampling: Sampling,
    /// `Some(filters)`: grounded in the documentation.
    pub grounding: Option<Filters>,
    pub mode: Mode,
    pub structured: Option<Structured>,
    /// Where the turn is stored; none: not stored.
    pub conversation: Option<ConversationRef>,
    /// The request as received, for the audit record (and replay).
    pub audit_request: Value,
    /// Drafted for a support agent: no escalation, handoff or small-talk pre-check (the agent is
    /// the person); out-of-scope topics and decisions still apply.
    pub for_agent: bool,
    /// Replay: an action is reported as it would be called, never called.
    pub dry_run_actions: bool,
    /// OpenAI tool calling (ungrounded chat): the functions, `tool_choice` and whether calls may
    /// be parallel. When active, `structured` holds the grammar that forces the calls.
    pub tools: Option<Arc<tools::ToolSpec>>,
}

impl Request {
    fn latest_customer(&self) -> &str {
        self.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.as_str()).unwrap_or("")
    }
}

// ---------------------------------------------------------------------------------------------
// The answer
// ---------------------------------------------------------------------------------------------

/// One turn's answer, as it streams.
pub struct Answer {
    pub conversation_id: Option<String>,
    pub answer_id: Option<String>,
    pub prompt_tokens: usize,
    /// The answer is a fixed text (assembled, a refusal, a handoff), not the model's.
    pub fixed: bool,
    pub events: Pin<Box<dyn Stream<Item = TurnEvent> + Send>>,
}

#[derive(Debug, Clone)]
pub enum TurnEvent {
    /// Text of the answer, to be sent now (already checked).
    Text(String),
    /// The answer is complete and stored.
    Done(Box<Finished>),
    /// It could not be finished (generation failed, or it could not be stored): what was sent is
    /// not a complete answer.
    Failed(String),
}

/// The end of an answer.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The whole answer as sent.
    pub text: String,
    pub reason: FinishReason,
    pub info: HelplineInfo,
    pub usage: Usage,
    /// OpenAI's `refusal`: the policy's refusal text.
    pub refusal: Option<String>,
    /// A structured output the bot did not give: `content` is null (so that, when present, it parses).
    pub content_null: bool,
    /// Tool calls the model made (then `reason` is `tool_calls` and `content` is null).
    pub tool_calls: Vec<tools::ToolCall>,
}

impl Answer {
    /// Runs the answer to its end; the text and the final report.
    pub async fn collect(mut self) -> Result<Finished, TurnError> {
        use futures_util::StreamExt;
        while let Some(ev) = self.events.next().await {
            match ev {
                TurnEvent::Text(_) => {}
                TurnEvent::Done(f) => return Ok(*f),
                TurnEvent::Failed(e) => return Err(TurnError::Internal(e)),
            }
        }
        Err(TurnError::Internal("the answer ended before it finished".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// A field of the request does not fit (422).
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// The request cannot be served as asked (400), e.g. `context_length_exceeded`.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String, param: Option<String> },
    /// The engine's queue is full (429).
    #[error("the server is busy: {capacity} requests are already waiting; retry later")]
    QueueFull { capacity: usize },
    /// Something the turn needs is not there (503): `no_index`, `not_ready`.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<RetrievalError> for TurnError {
    fn from(e: RetrievalError) -> Self {
        match e {
            RetrievalError::NoIndex { .. } => TurnError::Unavailable { code: "no_index", message: e.to_string() },
            other => TurnError::Internal(other.to_string()),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> TurnError {
    TurnError::Internal(e.to_string())
}

// ---------------------------------------------------------------------------------------------
// The turn
// ---------------------------------------------------------------------------------------------

/// Checks that every article a decision rule quotes is an approved article of the index: a pack
/// that names a missing one is refused with the rule named (at start-up and on reloads).
pub fn check_decision_articles(policy: &ActivePolicy, knowledge: Option<&KnowledgeBase>) -> Result<(), String> {
    let Some(kb) = knowledge else { return Ok(()) };
    let table = kb.evidence().map_err(|e| e.to_string())?;
    for (rule, article) in policy.pack.decision_articles() {
        if table.of_doc(article).is_empty() {
            return Err(format!(
                "invalid policy pack: decisions rule \"{rule}\": article `{article}` is not an approved article of the index; \
                 name an approved article's id, or leave `article` out to quote what retrieval finds"
            ));
        }
    }
    Ok(())
}

/// Answers one chat turn.
pub async fn run(deps: &Deps, req: Request) -> Result<Answer, TurnError> {
    // Conversation state first: a conversation a person has taken is not the bot's to answer.
    let conversation = match (&deps.store, &req.conversation) {
        (Some(store), Some(c)) => Some(record::open(store, c).await?),
        _ => None,
    };
    if let (Some(conv), Some(max)) = (&conversation, req.conversation.as_ref().and_then(|c| c.max_turns)) {
        // A turn adds the customer's message and the answer.
        if conv.turns + 2 > max {
            return Err(TurnError::Invalid {
                field: "helpline.conversation_id".into(),
                message: format!(
                    "conversation `{}` has {} turns; a conversation holds at most {max} (`max_conversation_turns`): start a new one",
                    conv.id, conv.turns
                ),
            });
        }
    }
    if conversation.as_ref().is_some_and(|c| c.status == ConversationStatus::HandedOff) {
        let plan = handed_off(deps);
        return answer_fixed(deps, &req, conversation, plan).await;
    }
    // A question the previous answer asked (a confirmation, a missing value) is settled first.
    let pending = match (&deps.actions, &deps.store, &conversation) {
        (Some(_), Some(store), Some(conv)) if conv.turns > 0 && !req.for_agent => act::pending(store, &conv.id).await?,
        _ => None,
    };
    // Pre-checks, retrieval, evidence, the gate and composition are CPU work (embeddings,
    // tokenizing, templates): off the async threads.
    let d = deps.clone();
    let (plan, req) = tokio::task::spawn_blocking(move || {
        let plan = plan(&d, &req, pending);
        (plan, req)
    })
    .await
    .map_err(internal)?;
    match plan? {
        Plan::Fixed(f) => answer_fixed(deps, &req, conversation, f).await,
        Plan::Generate(g) => answer_generated(deps, &req, conversation, *g).await,
        Plan::Act(c) => {
            let rt = deps.actions.clone().ok_or_else(|| internal("the actions were unloaded during the turn"))?;
            let (text, info, hand_off) = act::call(deps, &rt, &req, c.index, c.arguments, c.info).await?;
            answer_fixed(deps, &req, conversation, action_fixed(deps, text, info, hand_off)).await
        }
    }
}

/// A decided turn, before it is recorded and sent.
enum Plan {
    Fixed(Fixed),
    Generate(Box<Generate>),
    Act(Box<ActCall>),
}

/// An answer no model writes: assembled quotes, a refusal, a handoff, a decision, small talk.
struct Fixed {
    text: String,
    finish: FinishReason,
    grounding: GroundingInfo,
    citations: Option<Vec<PassageOut>>,
    handoff: Option<HandoffInfo>,
    guard: GuardInfo,
    /// Hand the conversation to a person, for this reason.
    hand_off: Option<String>,
    /// Helpline's outcome code in the store: `stop`, `refused`, `handoff`, `decision`, `content_filter`.
    outcome: &'static str,
    index_version: Option<String>,
    mode: &'static str,
    /// A turn about a declared action: its report.
    action: Option<report::ActionInfo>,
}

/// A declared action to call before the answer is made (the call is async, the plan is not).
struct ActCall {
    index: usize,
    arguments: serde_json::Map<String, Value>,
    info: report::ActionInfo,
}

/// An answer the model writes.
struct Generate {
    job: Job,
    grounding: GroundingInfo,
    guard: GuardInfo,
    /// The passages the model was given (numbered as it cites them).
    given: Vec<Passage>,
    /// Grounded generative answers: the evidence units each sentence is checked against.
    units: Option<Vec<GivenUnit>>,
    /// Structured outputs are the client's to parse: no markers, no sentence rewriting; checked whole.
    structured: Option<StructureInfo>,
    refusal_text: String,
    index_version: Option<String>,
    knowledge: Option<KnowledgeBase>,
    mode: &'static str,
}

fn guard_info(policy: &ActivePolicy, action: GuardAction, rules: Vec<String>, reason: Option<String>) -> GuardInfo {
    GuardInfo {
        policy_version: policy.pack.version.clone(),
        action,
        rules,
        reason,
        grammar_hash: None,
        constrained_by: Vec::new(),
        quote_mode: false,
        structure: None,
    }
}

fn grounding_info(status: GroundingStatus) -> GroundingInfo {
    GroundingInfo {
        status,
        query: None,
        index_version: None,
        passages: Vec::new(),
        dropped: Dropped::default(),
        budget: BudgetOut::default(),
        invalid_citations: 0,
        retrieval_ms: 0.0,
        support: None,
        mode: None,
        evidence: Vec::new(),
        gate: None,
        checks: None,
        embed_ms: 0.0,
    }
}

fn handed_off(deps: &Deps) -> Fixed {
    let policy = &deps.policy;
    let text = policy.pack.messages.handoff.clone();
    Fixed {
        handoff: Some(HandoffInfo { offered: true, reason: "handed_off".into(), message: text.clone(), summary: None }),
        guard: guard_info(policy, GuardAction::Handoff, Vec::new(), Some("handed_off".into())),
        text,
        finish: FinishReason::Stop,
        grounding: grounding_info(GroundingStatus::Skipped),
        citations: None,
        hand_off: None,
        outcome: "handoff",
        index_version: None,
        mode: "fixed",
        action: None,
    }
}

/// Where a passage can be read: the article view, scrolled to the chunk.
pub fn passage_url(p: &Passage) -> String {
    let n = p.chunk_id.rsplit('#').next().unwrap_or("0");
    format!("/kb/{}#{}-{}", p.doc_id, p.doc_id, n)
}

pub fn passage_out(p: &Passage, index: Option<usize>, with_text: bool) -> PassageOut {
    PassageOut {
        index,
        chunk_id: p.chunk_id.clone(),
        doc_id: p.doc_id.clone(),
        title: p.title.clone(),
        section: p.section.clone(),
        snippet: p.snippet.clone(),
        score: p.score,
        relevance: p.relevance,
        lexical: p.lexical,
        semantic: p.semantic,
        url: passage_url(p),
        text: with_text.then(|| p.text.clone()),
        cited_by: None,
    }
}

/// The relevance gate's score, in [0, 1]: the best passage's relevance (BM25 and dense), how much of
/// the question the quoted articles cover, and how close the best evidence unit is to the question,
/// read in context and on its own. Weights and threshold were chosen on `eval/grounding.jsonl` for
/// the refusal precision the product needs (see docs/grounding.md).
pub fn gate_score(relevance: f32, doc_coverage: f32, similarity: f32, plain_similarity: f32) -> f32 {
    let s = GATE_WEIGHTS[0] * relevance + GATE_WEIGHTS[1] * doc_coverage + GATE_WEIGHTS[2] * similarity + GATE_WEIGHTS[3] * plain_similarity;
    (s / GATE_WEIGHTS.iter().sum::<f32>()).clamp(0.0, 1.0)
}

/// Weights of relevance, article coverage, in-context similarity and own-text similarity.
pub const GATE_WEIGHTS: [f32; 4] = [0.5, 0.5, 1.0, 0.5];
/// The default threshold on [`gate_score`] (the operator's `min_relevance`).
pub const GATE_THRESHOLD: f32 = 0.36;

/// The answer of a turn about a declared action: a question, a refusal, or the result as the
/// operator's template shows it; `hand_off`: the call failed and a person takes over.
fn action_fixed(deps: &Deps, text: String, info: report::ActionInfo, hand_off: Option<String>) -> Fixed {
    let policy = &deps.policy;
    let handoff = hand_off.as_ref().map(|r| HandoffInfo { offered: true, reason: r.clone(), message: policy.pack.messages.handoff.clone(), summary: None });
    let action = if hand_off.is_some() { GuardAction::Handoff } else { GuardAction::None };
    Fixed {
        guard: guard_info(policy, action, Vec::new(), hand_off.clone()),
        text,
        finish: FinishReason::Stop,
        grounding: grounding_info(GroundingStatus::Skipped),
        citations: None,
        handoff,
        outcome: if hand_off.is_some() { "handoff" } else { "action" },
        hand_off,
        index_version: None,
        mode: "action",
        action: Some(info),
    }
}

/// The action part of a turn, when actions are declared and the turn is a customer's grounded
/// chat: `None` when the message asks for none.
fn action_plan(deps: &Deps, req: &Request, pending: Option<act::Pending>) -> Result<Option<Plan>, TurnError> {
    let Some(rt) = &deps.actions else { return Ok(None) };
    if req.for_agent || req.grounding.is_none() || req.structured.is_some() {
        return Ok(None);
    }
    Ok(act::decide(deps, rt, req, pending)?.map(|d| match d {
        act::Decided::Say { text, action } => Plan::Fixed(action_fixed(deps, text, action, None)),
        act::Decided::Call { action, arguments, info } => Plan::Act(Box::new(ActCall { index: action, arguments, info })),
    }))
}

/// Decides the turn (runs on a blocking thread).
fn plan(deps: &Deps, req: &Request, pending: Option<act::Pending>) -> Result<Plan, TurnError> {
    let policy = &deps.policy;
    let settings = &deps.settings;
    let refusals = [policy.pack.messages.refusal.as_str(), settings.refusal_message.as_str()];
    // The policy's pre-checks, before retrieval or the model.
    let checked = precheck::precheck(policy, &req.messages, &refusals)
        .filter(|c| !(req.for_agent && matches!(c, PreCheck::Handoff(_) | PreCheck::SmallTalk(_))))
        // With grounding off the model answers as it is (small talk included).
        .filter(|c| req.grounding.is_some() || !matches!(c, PreCheck::SmallTalk(_)));
    // An escalation or an out-of-scope topic comes before any action; an action before small
    // talk and decisions ("yes" answers a confirmation, it is not small talk).
    if !matches!(checked, Some(PreCheck::Handoff(_)) | Some(PreCheck::OutOfScope(..))) {
        if let Some(p) = action_plan(deps, req, pending)? {
            return Ok(p);
        }
    }
    match checked {
        Some(PreCheck::Handoff(fired)) => {
            deps.observer.guard_rule(&fired.rule, "handoff");
            let text = policy.pack.messages.handoff.clone();
            return Ok(Plan::Fixed(Fixed {
                handoff: Some(HandoffInfo { offered: true, reason: fired.reason.clone(), message: text.clone(), summary: None }),
                guard: guard_info(policy, GuardAction::Handoff, vec![fired.rule], Some(fired.reason.clone())),
                text,
                finish: FinishReason::Stop,
                grounding: grounding_info(GroundingStatus::Skipped),
                citations: None,
                hand_off: Some(fired.reason),
                outcome: "handoff",
                index_version: None,
                mode: "fixed",
                action: None,
            }));
        }
        Some(PreCheck::OutOfScope(fired, reply)) => {
            deps.observer.guard_rule(&fired.rule, "refusal");
            return Ok(Plan::Fixed(Fixed {
                guard: guard_info(policy, GuardAction::Refusal, vec![fired.rule], Some(fired.reason)),
                text: reply,
                finish: FinishReason::ContentFilter,
                grounding: grounding_info(GroundingStatus::Skipped),
                citations: None,
                handoff: None,
                hand_off: None,
                outcome: "content_filter",
                index_version: None,
                mode: "fixed",
                action: None,
            }));
        }
        Some(PreCheck::SmallTalk(reply)) => {
            return Ok(Plan::Fixed(Fixed {
                guard: guard_info(policy, GuardAction::None, Vec::new(), None),
                text: reply,
                finish: FinishReason::Stop,
                grounding: grounding_info(GroundingStatus::Skipped),
                citations: None,
                handoff: None,
                hand_off: None,
                outcome: "stop",
                index_version: None,
                mode: "fixed",
                action: None,
            }));
        }
        Some(PreCheck::Decision(d)) => return decision(deps, req, d),
        None => {}
    }

    let Some(filters) = &req.grounding else {
        return ungrounded(deps, req);
    };
    let kb = deps.knowledge.clone().ok_or_else(|| TurnError::Unavailable {
        code: "no_index",
        message: "no search index is open, so answers cannot be grounded; build one with `helpline index`".into(),
    })?;

    // Retrieval: the latest customer message, with earlier ones for follow-ups.
    let (latest, history) = split_latest(&req.messages)?;
    let earlier: Vec<&str> = history.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    let earlier = &earlier[earlier.len().saturating_sub(EARLIER_TURNS)..];
    let started = Instant::now();
    let k = settings.passages.max(evidence::RETRIEVE_K);
    let retrieval = kb.retrieve(&latest.content, earlier, crate::retrieval::EARLIER_TURN_WEIGHT, k, filters)?;
    let retrieval_secs = started.elapsed().as_secs_f64();
    deps.observer.retrieval(retrieval_secs);
    deps.observer.embedding(retrieval.embed_ms / 1e3);

    let mut query = earlier.join(" / ");
    if !query.is_empty() {
        query.push_str(" / ");
    }
    query.push_str(&latest.content);
    let mut info = grounding_info(GroundingStatus::Grounded);
    info.query = Some(query);
    info.index_version = Some(kb.version());
    info.retrieval_ms = retrieval_secs * 1e3;
    info.embed_ms = retrieval.embed_ms;
    info.budget = BudgetOut { passage_tokens: settings.passage_tokens, history_tokens: settings.history_tokens, ..BudgetOut::default() };

    // Evidence: the sentences, items and rows that answer the question; the gate on it.
    let (selection, gate) = judge(&kb, &retrieval, &latest.content, settings.min_relevance)?;
    let answered = gate.answered;
    info.gate = Some(gate);
    if !answered {
        return Ok(Plan::Fixed(refuse(deps, info, req.structured.is_some(), "no_relevant_docs")));
    }
    info.mode = Some(if req.structured.is_some() { "generative" } else { req.mode.as_str() }.to_string());
    info.evidence = evidence_out(&retrieval.evidence, &selection);
    info.passages = selection.passages.iter().enumerate().map(|(i, p)| passage_out(p, Some(i + 1), false)).collect();

    match (req.mode, &req.structured) {
        (Mode::Assembled, None) => {
            deps.observer.grounding("grounded");
            let text = compose::assemble(&retrieval.evidence, &selection, None, &policy.pack.messages.closing);
            let citations = selection.passages.iter().enumerate().map(|(i, p)| cited(p, i + 1)).collect();
            Ok(Plan::Fixed(Fixed {
                text,
                finish: FinishReason::Stop,
                grounding: info,
                citations: Some(citations),
                handoff: None,
                guard: guard_info(policy, GuardAction::None, Vec::new(), None),
                hand_off: None,
                outcome: "stop",
                index_version: Some(kb.version()),
                mode: "assembled",
                action: None,
            }))
        }
        _ => generated(deps, req, &kb, &retrieval.evidence, &selection, info, history, latest),
    }
}

/// Evidence selection and the relevance gate for a retrieval: what would be quoted, and whether
/// the documentation answers the question (`threshold`: the operator's `min_relevance`). Chat,
/// `/v1/retrieve` and `helpline search` decide the same way.
pub fn judge(kb: &KnowledgeBase, retrieval: &crate::retrieval::Retrieval, question: &str, threshold: f32) -> Result<(Selection, GateOut), TurnError> {
    let selection = evidence::select(kb, retrieval, question, None)?;
    let relevance = retrieval.passages.iter().map(|p| p.relevance).fold(0.0f32, f32::max);
    let score = gate_score(relevance, selection.doc_coverage, selection.similarity, selection.plain_similarity);
    let gate = GateOut {
        relevance,
        coverage: selection.coverage,
        similarity: selection.similarity,
        unknown: retrieval.unknown,
        focus: selection.focus,
        plain_similarity: selection.plain_similarity,
        doc_coverage: selection.doc_coverage,
        score,
        threshold,
        answered: !selection.is_empty() && score >= threshold,
    };
    Ok((selection, gate))
}

/// Earlier customer messages searched along with the latest one (for follow-ups).
pub const EARLIER_TURNS: usize = 2;

fn split_latest(messages: &[ChatMessage]) -> Result<(&ChatMessage, &[ChatMessage]), TurnError> {
    match messages.split_last() {
        Some((latest, history)) if latest.role == "user" => Ok((latest, history)),
        _ => Err(TurnError::Invalid {
            field: "messages".into(),
            message: "with grounding on, the last message must be the customer's (role `user`)".into(),
        }),
    }
}

fn cited(p: &Passage, n: usize) -> PassageOut {
    let mut out = passage_out(p, Some(n), false);
    out.cited_by = Some(CitedBy::Evidence);
    out
}

fn evidence_out(table: &crate::retrieval::evidence::EvidenceTable, sel: &Selection) -> Vec<EvidenceOut> {
    let mut out = Vec::new();
    for (bi, b) in sel.blocks.iter().enumerate() {
        for &j in &b.units {
            let u = &table.units[j];
            let n = sel.passages.iter().position(|p| p.chunk_id == u.chunk_id).map(|i| i + 1).or_else(|| sel.cites[bi].first().copied()).unwrap_or(1);
            let kind = match u.kind {
                UnitKind::Sentence => "sentence",
                UnitKind::Item { .. } => "item",
                UnitKind::Row => "row",
            };
            out.push(EvidenceOut { chunk_id: u.chunk_id.clone(), kind: kind.into(), text: u.text.clone(), cited_as: n });
        }
    }
    out
}

/// Nothing relevant enough: the honest "the docs don't cover this", with the offer of a person.
fn refuse(deps: &Deps, mut info: GroundingInfo, structured: bool, reason: &str) -> Fixed {
    deps.observer.grounding("no_relevant_docs");
    info.status = GroundingStatus::NoRelevantDocs;
    // What came closest stays in the report without numbers: nothing is cited.
    let s = &deps.settings;
    Fixed {
        text: s.refusal_message.clone(),
        finish: FinishReason::Stop,
        index_version: info.index_version.clone(),
        grounding: info,
        citations: Some(Vec::new()),
        handoff: Some(HandoffInfo { offered: true, reason: reason.into(), message: s.handoff_message.clone(), summary: None }),
        guard: guard_info(&deps.policy, GuardAction::None, Vec::new(), None),
        hand_off: None,
        outcome: if structured { "refused" } else { "refused" },
        mode: "fixed",
        action: None,
    }
}

/// A decision that is a person's to make: the pack's reply, the rule quoted from its article (or
/// from what retrieval finds), and the offer of a person. Never a yes or no.
fn decision(deps: &Deps, req: &Request, d: crate::guard::escalation::DecisionFired) -> Result<Plan, TurnError> {
    let policy = &deps.policy;
    deps.observer.guard_rule(&d.fired.rule, "decision");
    let offer = d.rule.offer.clone().unwrap_or_else(|| policy.pack.messages.decision_offer.clone());
    let guard = guard_info(policy, GuardAction::Decision, vec![d.fired.rule.clone()], Some(d.fired.reason.clone()));
    let handoff = Some(HandoffInfo { offered: true, reason: d.fired.reason.clone(), message: offer.clone(), summary: None });
    let mut info = grounding_info(GroundingStatus::Skipped);
    // Without evidence to quote, the reply's closing "This is what … says:" has nothing to introduce.
    let reply = d.rule.reply.trim();
    let bare = match reply.rfind(". ") {
        Some(at) if reply.ends_with(':') => &reply[..at + 1],
        _ => reply.trim_end_matches(':'),
    };
    let mut text = format!("{bare}\n\n{offer}");
    let mut citations = None;
    let mut index_version = None;
    let mut mode = "fixed";
    if let (Some(kb), Some(filters)) = (&deps.knowledge, &req.grounding) {
        let (latest, history) = split_latest(&req.messages)?;
        let earlier: Vec<&str> = history.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
        let earlier = &earlier[earlier.len().saturating_sub(EARLIER_TURNS)..];
        let started = Instant::now();
        // The rule's own article when the pack names one (and the index has it), else retrieval.
        let article = d.rule.article.as_deref().filter(|a| kb.evidence().map(|e| !e.of_doc(a).is_empty()).unwrap_or(false));
        let retrieval = kb.retrieve(&latest.content, earlier, crate::retrieval::EARLIER_TURN_WEIGHT, deps.settings.passages.max(evidence::RETRIEVE_K), filters)?;
        deps.observer.retrieval(started.elapsed().as_secs_f64());
        let selection = evidence::select(kb, &retrieval, &latest.content, article)?;
        info = grounding_info(GroundingStatus::Grounded);
        info.query = Some(latest.content.clone());
        info.index_version = Some(kb.version());
        info.retrieval_ms = started.elapsed().as_secs_f64() * 1e3;
        info.embed_ms = retrieval.embed_ms;
        if !selection.is_empty() {
            info.mode = Some("assembled".into());
            info.evidence = evidence_out(&retrieval.evidence, &selection);
            info.passages = selection.passages.iter().enumerate().map(|(i, p)| passage_out(p, Some(i + 1), false)).collect();
            text = compose::assemble(&retrieval.evidence, &selection, Some(&d.rule.reply), &offer);
            citations = Some(selection.passages.iter().enumerate().map(|(i, p)| cited(p, i + 1)).collect());
            mode = "assembled";
        } else {
            citations = Some(Vec::new());
        }
        index_version = Some(kb.version());
    }
    Ok(Plan::Fixed(Fixed {
        text,
        finish: FinishReason::Stop,
        grounding: info,
        citations,
        handoff,
        guard,
        hand_off: None,
        outcome: "decision",
        index_version,
        mode,
        action: None,
    }))
}

/// Grounding off: the model on the conversation as sent, under the pack's grammar, every sentence
/// checked for repetition and commitments.
fn ungrounded(deps: &Deps, req: &Request) -> Result<Plan, TurnError> {
    deps.observer.grounding("off");
    let policy = &deps.policy;
    let mut job = match req.tools.as_ref().filter(|t| t.active()) {
        // The functions and the call format, ahead of the client's own system text.
        Some(t) => {
            let mut messages = req.messages.clone();
            match messages.first_mut().filter(|m| m.role == "system") {
                Some(first) => first.content = format!("{}\n{}", t.system_text(), first.content),
                None => messages.insert(0, ChatMessage { role: "system".into(), content: t.system_text() }),
            }
            job_for(deps, &messages, &req.sampling)?
        }
        None => job_for(deps, &req.messages, &req.sampling)?,
    };
    let mut guard = guard_info(policy, GuardAction::None, Vec::new(), None);
    let structured = attach_guard(deps, req, &mut job, &mut guard, 0, None)?;
    let mut info = grounding_info(GroundingStatus::Off);
    info.mode = Some("model".into());
    Ok(Plan::Generate(Box::new(Generate {
        job,
        grounding: info,
        guard,
        given: Vec::new(),
        units: None,
        structured,
        refusal_text: policy.pack.messages.refusal.clone(),
        index_version: None,
        knowledge: deps.knowledge.clone(),
        mode: "model",
    })))
}

/// The generative and quote modes (and structured outputs): the evidence becomes the model's
/// passages.
#[allow(clippy::too_many_arguments)]
fn generated(
    deps: &Deps,
    req: &Request,
    kb: &KnowledgeBase,
    table: &crate::retrieval::evidence::EvidenceTable,
    selection: &Selection,
    mut info: GroundingInfo,
    history: &[ChatMessage],
    latest: &ChatMessage,
) -> Result<Plan, TurnError> {
    deps.observer.grounding("grounded");
    let s = &deps.settings;
    let passages = compose::evidence_passages(table, selection);
    let tok = &deps.model.bundle.tokenizer;
    let count = |text: &str| tok.encode(text, false).map(|ids| ids.len()).unwrap_or(text.len());
    let built = prompt::build(&passages, history, latest, Budget { passage_tokens: s.passage_tokens, history_tokens: s.history_tokens }, &count);
    if built.given.is_empty() {
        info.dropped.passages = built.dropped_passages.iter().map(|d| d.chunk_id.clone()).collect();
        return Ok(Plan::Fixed(refuse(deps, info, req.structured.is_some(), "passages_over_budget")));
    }
    info.passages = built.given.iter().enumerate().map(|(i, p)| passage_out(p, Some(i + 1), false)).collect();
    info.dropped = Dropped { passages: built.dropped_passages.iter().map(|d| d.chunk_id.clone()).collect(), history_messages: built.dropped_history };
    info.budget.passage_tokens_used = built.passage_tokens;
    info.budget.history_tokens_used = built.history_tokens;
    let mut job = job_for(deps, &built.messages, &req.sampling)?;
    let mut guard = guard_info(&deps.policy, GuardAction::None, Vec::new(), None);
    let quote = (req.mode == Mode::Quote && req.structured.is_none()).then(|| built.given.iter().map(|p| p.text.clone()).collect::<Vec<_>>());
    let structured = attach_guard(deps, req, &mut job, &mut guard, built.given.len(), quote)?;
    // Each sentence is checked against the units of the passages the model was given.
    let units: Vec<GivenUnit> = selection
        .blocks
        .iter()
        .flat_map(|b| b.units.iter().copied())
        .filter_map(|j| {
            let u = &table.units[j];
            let n = built.given.iter().position(|p| p.chunk_id == u.chunk_id)? + 1;
            Some(GivenUnit { text: u.text.clone(), display: u.display(), passage: n, context: format!("{}\n{}", u.title, u.section) })
        })
        .collect();
    let mode = if structured.is_some() { "generative" } else { req.mode.as_str() };
    Ok(Plan::Generate(Box::new(Generate {
        job,
        grounding: info,
        guard,
        given: built.given,
        units: (req.mode == Mode::Generative).then_some(units),
        structured,
        refusal_text: deps.policy.pack.messages.refusal.clone(),
        index_version: Some(kb.version()),
        knowledge: Some(kb.clone()),
        mode,
    })))
}

/// The engine job for a conversation: rendered with the model's template, fitted to the context
/// (never truncated: too long is a 400 naming both counts).
fn job_for(deps: &Deps, messages: &[ChatMessage], sampling: &Sampling) -> Result<Job, TurnError> {
    let prompt = deps.model.bundle.chat_prompt(messages).map_err(|e| match e {
        TokenizerError::TemplateRender(m) | TokenizerError::TemplateLimit(m) => {
            TurnError::Invalid { field: "messages".into(), message: format!("the model's chat template rejected the conversation: {m}") }
        }
        other => internal(other),
    })?;
    let max_positions = deps.model.engine.max_positions();
    let max_tokens = fit_context(prompt.len(), sampling.max_tokens, deps.settings.max_prompt_tokens, max_positions)?;
    Ok(Job { prompt, params: sampling.params.clone(), max_tokens, stop: sampling.stop.clone(), skip_special: true, guard: None })
}

/// The prompt is never truncated: over the limit is `context_length_exceeded` stating both counts.
/// Returns `max_tokens` clamped to the room the prompt leaves.
pub fn fit_context(prompt_tokens: usize, max_tokens: usize, max_prompt_tokens: usize, max_positions: usize) -> Result<usize, TurnError> {
    let model_fit = max_positions.saturating_sub(1);
    let fit = max_prompt_tokens.min(model_fit);
    if prompt_tokens > fit {
        let why = if max_prompt_tokens < model_fit {
            format!("the server accepts at most {fit} prompt tokens")
        } else {
            format!("the model's context holds {max_positions} tokens and at least one must remain for the answer, so at most {fit} fit")
        };
        return Err(TurnError::BadRequest {
            code: "context_length_exceeded",
            message: format!("the prompt has {prompt_tokens} tokens, but {why}; shorten the messages or the prompt"),
            param: None,
        });
    }
    Ok(max_tokens.min(max_positions - prompt_tokens))
}

/// Puts the pack's constraint on the job: the client's structured output with the forbidden
/// phrases and bounds; quote mode's grammar; or the answer grammar for `citations` passages.
fn attach_guard(
    deps: &Deps,
    req: &Request,
    job: &mut Job,
    info: &mut GuardInfo,
    citations: usize,
    quote: Option<Vec<String>>,
) -> Result<Option<StructureInfo>, TurnError> {
    let policy = &deps.policy;
    let compiler = &deps.model.guard;
    // Fail closed: a grammar that does not compile is an error, never an unconstrained answer.
    let grammar_err = |e: crate::guard::grammar::GuardError| TurnError::Internal(format!("the policy grammar does not compile: {e}"));
    info.constrained_by = policy.decode_rules();
    if let Some(s) = &req.structured {
        let guarded = policy.structured_guard(compiler, &s.guard, s.json).map_err(grammar_err)?;
        let mut matcher = guarded.matcher;
        if matcher.mask().map_or(true, |m| m.is_zero()) {
            return Err(TurnError::BadRequest {
                code: "grammar_conflicts_with_policy",
                message: "the requested output format and the policy pack together allow no output; change the format".into(),
                param: None,
            });
        }
        info.grammar_hash = Some(guarded.hash);
        info.constrained_by.push(s.kind.to_string());
        let structure = StructureInfo { kind: s.kind.to_string(), hash: s.guard.hash().to_string() };
        info.structure = Some(structure.clone());
        job.guard = Some(JobGuard(Box::new(matcher)));
        return Ok(Some(structure));
    }
    let guard = match quote {
        Some(passages) => {
            info.quote_mode = true;
            // Sentences are the docs' own and connectives fixed: bounds hold by construction.
            info.constrained_by.retain(|r| !policy.pack.bounds.iter().any(|b| &b.id == r));
            info.constrained_by.push("quote".into());
            policy.quote_guard(compiler, passages).map_err(grammar_err)?
        }
        None => policy.answer_guard(compiler, citations).map_err(grammar_err)?,
    };
    if citations > 0 {
        info.constrained_by.push("citations".into());
    }
    info.grammar_hash = Some(guard.hash);
    job.guard = Some(JobGuard(Box::new(guard.matcher)));
    Ok(None)
}

/// The report of a finished answer, and what the store keeps about it.
fn helpline_info(
    grounding: GroundingInfo,
    citations: Option<Vec<PassageOut>>,
    handoff: Option<HandoffInfo>,
    guard: GuardInfo,
    timings: &Timings,
    rec: Option<&Recorder>,
) -> HelplineInfo {
    HelplineInfo {
        timings: TimingsOut::from(timings),
        grounding: (grounding.status != GroundingStatus::Skipped).then_some(grounding),
        citations,
        handoff,
        guard: Some(guard),
        action: None,
        conversation_id: rec.map(|r| r.conversation.id.clone()),
        answer_id: rec.map(|r| r.answer_id.clone()),
    }
}

/// What the store keeps about an answer: the `helpline` report, the finish reason and usage.
pub fn detail(info: &HelplineInfo, reason: FinishReason, usage: Usage) -> Value {
    // Through text, so f32 scores keep the short form the reader saw (to_value widens them).
    let mut v: Value = serde_json::to_string(info).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        m.insert("finish_reason".into(), serde_json::json!(reason.as_str()));
        m.insert("usage".into(), serde_json::to_value(usage).unwrap_or_default());
    }
    v
}

/// Records and sends an answer no model writes.
async fn answer_fixed(deps: &Deps, req: &Request, conversation: Option<Conversation>, mut f: Fixed) -> Result<Answer, TurnError> {
    deps.observer.answer_mode(f.mode);
    let mut rec = match (&deps.store, conversation) {
        (Some(store), Some(c)) => Some(Recorder::begin(store, deps.observer.clone(), c, req.latest_customer()).await?),
        _ => None,
    };
    // Usage counts the model's work: none for a fixed answer.
    let usage = Usage::new(0, 0);
    let structured = req.structured.is_some();
    let refused = f.finish == FinishReason::ContentFilter || f.outcome == "refused" || f.outcome == "handoff";
    let (refusal, content_null) = if structured && (refused || f.outcome == "decision") {
        (Some(f.text.clone()), true)
    } else if f.finish == FinishReason::ContentFilter {
        (Some(f.text.clone()), false)
    } else {
        (None, false)
    };
    if let Some(r) = rec.as_mut() {
        let status = status_label(f.grounding.status);
        let mut audit = record::audit(&deps.identity, req.audit_request.clone(), None, f.index_version.as_deref(), &deps.policy.pack.version, &f.grounding, Some(&f.guard), status);
        if let (Some(a), Value::Object(m)) = (&f.action, &mut audit) {
            m.insert("action".into(), act::audit_of(a));
        }
        r.set_audit(audit);
        let mut info = helpline_info(f.grounding.clone(), f.citations.clone(), f.handoff.clone(), f.guard.clone(), &Timings::default(), Some(r));
        info.action = f.action.clone();
        r.finish(&f.text, f.outcome, detail(&info, f.finish, usage)).await?;
    }
    if let (Some(reason), Some(store), Some(r)) = (&f.hand_off, &deps.store, rec.as_ref()) {
        // The conversation goes to a person: the summary, the status, the webhook.
        let (_, summary) = handoff::hand_off(store, deps.webhook.as_ref(), deps.observer.as_ref(), &r.conversation.id, reason, "policy").await?;
        if let Some(h) = f.handoff.as_mut() {
            h.summary = Some(summary);
        }
    }
    let mut info = helpline_info(f.grounding, f.citations, f.handoff, f.guard, &Timings::default(), rec.as_ref());
    info.action = f.action;
    let finished = Finished { text: f.text.clone(), reason: f.finish, info, usage, refusal, content_null, tool_calls: Vec::new() };
    let mut events: Vec<TurnEvent> = if content_null { Vec::new() } else { compose::pieces(&f.text).into_iter().map(TurnEvent::Text).collect() };
    events.push(TurnEvent::Done(Box::new(finished)));
    Ok(Answer {
        conversation_id: rec.as_ref().map(|r| r.conversation.id.clone()),
        answer_id: rec.as_ref().map(|r| r.answer_id.clone()),
        prompt_tokens: 0,
        fixed: true,
        events: Box::pin(stream::iter(events)),
    })
}

fn status_label(s: GroundingStatus) -> &'static str {
    match s {
        GroundingStatus::Grounded => "grounded",
        GroundingStatus::NoRelevantDocs => "no_relevant_docs",
        GroundingStatus::Off => "off",
        GroundingStatus::Skipped => "skipped",
    }
}

/// Records the turn, submits the job, and streams the model's checked answer.
async fn answer_generated(deps: &Deps, req: &Request, conversation: Option<Conversation>, g: Generate) -> Result<Answer, TurnError> {
    deps.observer.answer_mode(g.mode);
    let mut rec = match (&deps.store, conversation) {
        (Some(store), Some(c)) => Some(Recorder::begin(store, deps.observer.clone(), c, req.latest_customer()).await?),
        _ => None,
    };
    let sampled = Sampled { params: g.job.params.clone(), max_tokens: g.job.max_tokens, stop: g.job.stop.clone(), prompt: g.job.prompt.clone() };
    if let Some(r) = rec.as_mut() {
        let status = status_label(g.grounding.status);
        r.set_audit(record::audit(&deps.identity, req.audit_request.clone(), Some(&sampled), g.index_version.as_deref(), &deps.policy.pack.version, &g.grounding, Some(&g.guard), status));
    }
    let prompt_tokens = g.job.prompt.len();
    let submitted = Instant::now();
    let rx = match deps.model.engine.submit(g.job) {
        Ok(rx) => rx,
        Err(e) => {
            if let Some(r) = rec.as_mut() {
                r.fail("not submitted").await;
            }
            return Err(submit_error(deps, e));
        }
    };
    deps.observer.prompt_tokens(prompt_tokens as u64);
    let grounded = g.grounding.status == GroundingStatus::Grounded;
    let citations = (grounded && g.structured.is_none()).then(|| CitationFilter::new(g.given.len()));
    let checker = g.structured.is_none().then(|| {
        let kb = g.knowledge.clone();
        let is_verbatim: Box<dyn Fn(&str) -> bool + Send> = Box::new(move |s: &str| kb.as_ref().and_then(|k| k.evidence().ok()).is_some_and(|e| e.is_verbatim(s)));
        let allowed = [deps.policy.pack.messages.refusal.clone(), deps.policy.pack.messages.closing.clone()];
        Checker::new(g.units.clone(), is_verbatim, &allowed)
    });
    let state = Streaming {
        rx: Some(rx),
        observer: deps.observer.clone(),
        submitted,
        last: None,
        tokens: 0,
        citations,
        checker,
        sent: String::new(),
        raw: String::new(),
        pending: VecDeque::new(),
        recorder: rec,
        prompt_tokens,
        grounding: Some(g.grounding),
        guard: Some(g.guard),
        given: g.given,
        structured: g.structured,
        refusal_text: g.refusal_text,
        tools: req.tools.clone().filter(|t| t.active()),
        call_prefix: format!("{:x}", crate::store::now_ms()),
    };
    let conversation_id = state.recorder.as_ref().map(|r| r.conversation.id.clone());
    let answer_id = state.recorder.as_ref().map(|r| r.answer_id.clone());
    Ok(Answer { conversation_id, answer_id, prompt_tokens, fixed: false, events: Box::pin(streaming(state)) })
}

fn submit_error(deps: &Deps, e: SubmitError) -> TurnError {
    match e {
        SubmitError::QueueFull { capacity } => {
            deps.observer.rejection("queue_full");
            TurnError::QueueFull { capacity }
        }
        SubmitError::PromptTooLong { prompt_tokens, max } => TurnError::BadRequest {
            code: "context_length_exceeded",
            message: format!("the prompt has {prompt_tokens} tokens, but the model's context holds {max} and one must remain for the answer"),
            param: None,
        },
        SubmitError::EmptyPrompt => TurnError::Invalid { field: "messages".into(), message: "the prompt is empty".into() },
        SubmitError::BadParams(p) => TurnError::Invalid { field: p.field.to_string(), message: p.to_string() },
        SubmitError::Stopped => TurnError::Unavailable { code: "not_ready", message: "the server is shutting down".into() },
    }
}

/// A model answer in flight.
struct Streaming {
    /// `None` once the answer is complete: the receiver is dropped as soon as it is not needed.
    rx: Option<UnboundedReceiver<Event>>,
    observer: Arc<dyn Observer>,
    submitted: Instant,
    last: Option<Instant>,
    tokens: usize,
    /// Grounded answers: removes markers that name no given passage before they are sent.
    citations: Option<CitationFilter>,
    /// Text answers: the sentence check (structured outputs are checked whole at the end).
    checker: Option<Checker>,
    /// The text sent so far.
    sent: String,
    /// Structured outputs: everything generated, held until it is checked.
    raw: String,
    pending: VecDeque<TurnEvent>,
    recorder: Option<Recorder>,
    prompt_tokens: usize,
    grounding: Option<GroundingInfo>,
    guard: Option<GuardInfo>,
    given: Vec<Passage>,
    structured: Option<StructureInfo>,
    refusal_text: String,
    /// Tool calling: the answer's calls are parsed from the raw text at the end.
    tools: Option<Arc<tools::ToolSpec>>,
    /// Ids of calls when the answer is not stored.
    call_prefix: String,
}

impl Streaming {
    fn on_token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.observer.token(true, (now - self.submitted).as_secs_f64()),
            Some(prev) => self.observer.token(false, (now - prev).as_secs_f64()),
        }
        self.last = Some(now);
        self.tokens += 1;
    }

    /// Text from the engine through the citation filter and the sentence check.
    fn process(&mut self, text: &str, last: bool) -> String {
        if self.structured.is_some() {
            self.raw.push_str(text);
            return String::new();
        }
        let mut t = match self.citations.as_mut() {
            Some(f) => {
                let mut t = f.push(text);
                if last {
                    t.push_str(&f.finish());
                }
                t
            }
            None => text.to_string(),
        };
        if let Some(c) = self.checker.as_mut() {
            let mut out = c.push(&t);
            if last {
                out.push_str(&c.finish());
            }
            t = out;
        }
        t
    }

    fn send(&mut self, text: String) {
        if text.is_empty() {
            return;
        }
        self.sent.push_str(&text);
        if let Some(r) = self.recorder.as_mut() {
            r.push(&text);
        }
        self.pending.push_back(TurnEvent::Text(text));
    }

    /// The answer's end: citations, the report, the record.
    async fn close(&mut self, reason: crate::engine::FinishReason, timings: Timings) {
        let mut reason: FinishReason = reason.into();
        let mut grounding = self.grounding.take().unwrap_or_else(|| grounding_info(GroundingStatus::Off));
        let mut guard = self.guard.take().unwrap_or_else(|| GuardInfo {
            policy_version: String::new(),
            action: GuardAction::None,
            rules: Vec::new(),
            reason: None,
            grammar_hash: None,
            constrained_by: Vec::new(),
            quote_mode: false,
            structure: None,
        });
        let mut refusal = None;
        let mut content_null = false;
        let mut citations = None;
        let mut tool_calls = Vec::new();
        if self.structured.is_some() {
            // Structured: the client's text, checked whole; a commitment in any of its strings
            // ends it as a refusal instead.
            let raw = std::mem::take(&mut self.raw);
            let committed = json_sentences(&raw).iter().any(|s| crate::guard::commitment::detect(s).is_some());
            if committed || reason == FinishReason::ContentFilter {
                reason = FinishReason::ContentFilter;
                refusal = Some(self.refusal_text.clone());
                content_null = true;
                if committed {
                    guard.action = GuardAction::Refusal;
                    guard.reason = Some("commitment".into());
                    guard.rules.push("commitment-by-meaning".into());
                }
            } else if let Some(calls) = self.tools.as_ref().map(|t| t.parse(&raw, self.recorder.as_ref().map(|r| r.answer_id.as_str()).unwrap_or(&self.call_prefix))).filter(|c| !c.is_empty()) {
                // Calls, not content: stored as the model wrote them, sent as `tool_calls`.
                reason = FinishReason::ToolCalls;
                content_null = true;
                self.sent = raw.clone();
                if let Some(r) = self.recorder.as_mut() {
                    r.push(&raw);
                }
                tool_calls = calls;
            } else {
                self.send(raw);
            }
            if grounding.status == GroundingStatus::Grounded {
                let (overall, each) = prompt::support(&self.sent, &self.given);
                grounding.support = Some(overall);
                citations = Some(prompt::attribute(&each).iter().filter_map(|&n| self.cite(n, CitedBy::Attribution)).collect());
            } else if grounding.status == GroundingStatus::NoRelevantDocs {
                citations = Some(Vec::new());
            }
        } else {
            if let Some(c) = &self.checker {
                let r = &c.report;
                for (outcome, n) in [("kept", r.kept), ("replaced", r.replaced), ("dropped", r.dropped)] {
                    for _ in 0..n {
                        self.observer.sentence(outcome);
                    }
                }
                grounding.checks = Some(r.clone());
            }
            let is_refusal = !self.sent.trim().is_empty() && self.sent.trim() == self.refusal_text.trim();
            if is_refusal {
                // The model took the policy grammar's refusal branch.
                reason = FinishReason::ContentFilter;
                refusal = Some(self.sent.clone());
                guard.action = GuardAction::Refusal;
                guard.reason = Some("policy_refusal".into());
                guard.rules = vec!["refusal-branch".into()];
                citations = Some(Vec::new());
            } else if self.sent.trim().is_empty() && self.checker.as_ref().is_some_and(|c| c.report.dropped > 0) {
                // Every sentence failed its check: nothing unsupported was sent; say so honestly.
                let text = self.refusal_text.clone();
                self.send(text.clone());
                reason = FinishReason::ContentFilter;
                refusal = Some(text);
                guard.action = GuardAction::Refusal;
                guard.reason = Some("unsupported_answer".into());
                citations = Some(Vec::new());
            } else if grounding.status == GroundingStatus::Grounded {
                let f = self.citations.as_ref();
                grounding.invalid_citations = f.map_or(0, |f| f.invalid());
                self.observer.invalid_citations(grounding.invalid_citations as u64);
                let (overall, each) = prompt::support(&self.sent, &self.given);
                grounding.support = Some(overall);
                let from_model = f.map(|f| f.cited().to_vec()).unwrap_or_default();
                let (numbers, by) = if from_model.is_empty() {
                    let attributed = prompt::attribute(&each);
                    let suffix: String = attributed.iter().map(|n| format!(" [{n}]")).collect();
                    self.send(suffix);
                    (attributed, CitedBy::Attribution)
                } else {
                    (from_model, CitedBy::Model)
                };
                citations = Some(numbers.iter().filter_map(|&n| self.cite(n, by)).collect());
            } else if grounding.status == GroundingStatus::NoRelevantDocs {
                citations = Some(Vec::new());
            }
        }
        let info = helpline_info(grounding, citations, None, guard, &timings, self.recorder.as_ref());
        let usage = Usage::new(self.prompt_tokens, self.tokens);
        if let Some(r) = self.recorder.as_mut() {
            // The answer is stored before the reader is told it is complete.
            if let Err(e) = r.finish(&self.sent, reason.as_str(), detail(&info, reason, usage)).await {
                tracing::error!(error = %e, "cannot store the finished answer");
                r.fail("the answer could not be stored").await;
                self.pending.push_back(TurnEvent::Failed("the answer could not be stored".into()));
                return;
            }
        }
        let finished = Finished { text: self.sent.clone(), reason, info, usage, refusal, content_null, tool_calls };
        self.pending.push_back(TurnEvent::Done(Box::new(finished)));
    }

    fn cite(&self, n: usize, by: CitedBy) -> Option<PassageOut> {
        let p = self.given.get(n.checked_sub(1)?)?;
        let mut out = passage_out(p, Some(n), false);
        out.cited_by = Some(by);
        Some(out)
    }
}

/// The string values of a JSON text (or the text itself), split into sentences.
fn json_sentences(raw: &str) -> Vec<String> {
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(m) => m.values().for_each(|x| strings(x, out)),
            _ => {}
        }
    }
    let mut texts = Vec::new();
    match serde_json::from_str::<Value>(raw) {
        Ok(v) => strings(&v, &mut texts),
        Err(_) => texts.push(raw.to_string()),
    }
    texts.iter().flat_map(|t| crate::retrieval::evidence::sentences(t)).collect()
}

fn streaming(state: Streaming) -> impl Stream<Item = TurnEvent> + Send + 'static {
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((ev, s));
            }
            let rx = s.rx.as_mut()?;
            match rx.recv().await {
                Some(Event::Token { text, .. }) => {
                    s.on_token();
                    let out = s.process(&text, false);
                    s.send(out);
                }
                Some(Event::Done { reason, text, timings }) => {
                    s.rx = None;
                    let out = s.process(&text, true);
                    s.send(out);
                    s.close(reason, timings).await;
                }
                Some(Event::Error(e)) => {
                    tracing::error!(detail = %e, "generation failed mid-answer");
                    s.rx = None;
                    if let Some(r) = s.recorder.as_mut() {
                        r.fail("generation failed").await;
                    }
                    s.pending.push_back(TurnEvent::Failed(format!("generation failed: {e}")));
                }
                None => {
                    tracing::error!("the engine dropped a request before it finished");
                    s.rx = None;
                    if let Some(r) = s.recorder.as_mut() {
                        r.fail("the engine dropped the request").await;
                    }
                    s.pending.push_back(TurnEvent::Failed("the engine dropped the request before it finished".into()));
                }
            }
        }
    })
}
