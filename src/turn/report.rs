//! What a turn reports about its answer: grounding, citations, the policy's part, the handoff
//! offer, timings and usage. The HTTP layer sends these under `helpline` (they derive the OpenAPI
//! schema), the store keeps them with the answer, and the CLI prints them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::{FinishReason as EngineFinishReason, Timings as EngineTimings};

/// A retrieved passage (a chunk of an approved article).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PassageOut {
    /// The number the model cites it by (`[1]`), for passages given to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub chunk_id: String,
    pub doc_id: String,
    pub title: String,
    /// Heading path inside the article.
    pub section: String,
    pub snippet: String,
    /// BM25 score (higher is better; comparable only within one query).
    pub score: f32,
    /// The relevance gate's measure for this passage, in [0, 1]: its lexical side (BM25 evidence
    /// damped by how much of the question it covers) and its semantic side (the best cosine
    /// similarity between the question and one of its sentences), combined.
    pub relevance: f32,
    #[serde(default)]
    pub lexical: f32,
    #[serde(default)]
    pub semantic: f32,
    /// Where the passage can be read: `/kb/{doc_id}#{doc_id}-{n}`.
    pub url: String,
    /// The passage's whole text (in `/v1/retrieve` answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// In `citations` only: who put the marker in the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cited_by: Option<CitedBy>,
}

/// Who cited a passage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CitedBy {
    /// The model wrote the marker.
    Model,
    /// The model wrote none; the server attributed the answer to the passage holding most of its
    /// content words and appended the marker.
    Attribution,
    /// An assembled answer quotes the passage's evidence verbatim, with its marker.
    Evidence,
}

/// How an answer was grounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroundingStatus {
    /// Answered from the passages in `passages`.
    Grounded,
    /// Nothing in the documentation was relevant enough: the bot said so without calling the model.
    NoRelevantDocs,
    /// Grounding was turned off for this request (or by the operator).
    Off,
    /// The policy pack answered the turn (a handoff or an out-of-scope refusal) before retrieval.
    Skipped,
}

/// What retrieval found and what went into the prompt (under `helpline.grounding`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroundingInfo {
    pub status: GroundingStatus,
    /// The text searched (the latest message, plus earlier ones for follow-ups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_version: Option<String>,
    /// Passages given to the model, numbered as it cites them.
    pub passages: Vec<PassageOut>,
    /// What was left out of the prompt to respect the budget.
    pub dropped: Dropped,
    pub budget: BudgetOut,
    /// Citation markers the model wrote that named no given passage; they were removed from the text.
    pub invalid_citations: usize,
    /// Time spent retrieving.
    pub retrieval_ms: f64,
    /// Grounded answers: the share of the answer's content words found in the given passages, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support: Option<f32>,
    /// How the answer was made: `assembled` (quotes of the evidence with fixed connectives; no
    /// model), `generative` (the model's wording, every sentence checked against the evidence before
    /// it is sent), `quote` (the model copying sentences under a grammar) or `model` (grounding off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The evidence units quoted or given to the model, in answer order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<EvidenceOut>,
    /// The relevance gate's inputs and verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateOut>,
    /// Generated answers: what the sentence check did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<SentenceChecks>,
    /// Time spent embedding the question.
    #[serde(default)]
    pub embed_ms: f64,
}

/// One evidence unit (a sentence, list item or table row of an approved article).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvidenceOut {
    pub chunk_id: String,
    /// `sentence`, `item` or `row`.
    pub kind: String,
    pub text: String,
    /// The passage number (`[n]`) it is cited by.
    pub cited_as: usize,
}

/// The relevance gate: whether the documentation answers the question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GateOut {
    /// The best passage's relevance (lexical and semantic combined), the best evidence block's
    /// coverage of the question's terms and its similarity to the question, and the score they make.
    pub relevance: f32,
    pub coverage: f32,
    pub similarity: f32,
    /// Share of the question's words the documentation never uses.
    pub unknown: f32,
    /// Over all the evidence selected: coverage of the question's terms weighting rare ones most,
    /// and the best similarity of one unit's own text to the question.
    pub focus: f32,
    pub plain_similarity: f32,
    /// The best coverage of the question's terms by a whole quoted article.
    pub doc_coverage: f32,
    pub score: f32,
    pub threshold: f32,
    pub answered: bool,
}

/// What the sentence check did to a generated answer: each sentence is held back until it is
/// checked; one that fails is replaced by the evidence it paraphrased, or dropped; it is never sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SentenceChecks {
    pub kept: usize,
    pub replaced: usize,
    pub dropped: usize,
    /// Why sentences failed, one entry per failed sentence (e.g. `unsupported_number`,
    /// `commitment`, `repeated`, `low_support`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Dropped {
    /// Retrieved passages (chunk ids) that did not fit the passage budget.
    pub passages: Vec<String>,
    /// Earlier messages (the oldest) that did not fit the history budget.
    pub history_messages: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BudgetOut {
    pub passage_tokens: usize,
    pub passage_tokens_used: usize,
    pub history_tokens: usize,
    pub history_tokens_used: usize,
}

/// An offer to hand the conversation to a person.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HandoffInfo {
    pub offered: bool,
    /// Why: `no_relevant_docs`.
    pub reason: String,
    /// How to reach a person.
    pub message: String,
    /// When the conversation was handed to a person: the handoff summary the agent receives
    /// (schema: `docs/schemas/handoff-summary.schema.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub summary: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End of the answer or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// The policy pack made the bot refuse (an out-of-scope topic); the text is also in `refusal`.
    ContentFilter,
    /// The model called tools (`message.tool_calls`).
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

impl From<EngineFinishReason> for FinishReason {
    fn from(r: EngineFinishReason) -> Self {
        match r {
            EngineFinishReason::Stop => FinishReason::Stop,
            EngineFinishReason::Length => FinishReason::Length,
            EngineFinishReason::ContentFilter => FinishReason::ContentFilter,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// Engine timings of one request (Helpline extension).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TimingsOut {
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    pub prompt_ms: f64,
    pub generation_ms: f64,
    /// From the request's admission to a decoding slot to its first token.
    pub time_to_first_token_ms: f64,
}

impl From<&EngineTimings> for TimingsOut {
    fn from(t: &EngineTimings) -> Self {
        TimingsOut {
            prompt_tokens_per_second: t.prompt_tokens_per_second,
            generation_tokens_per_second: t.generation_tokens_per_second,
            prompt_ms: t.prompt_ms,
            generation_ms: t.generation_ms,
            time_to_first_token_ms: t.time_to_first_token_ms,
        }
    }
}

/// Helpline's additions to a response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HelplineInfo {
    pub timings: TimingsOut,
    /// Chat answers: how the answer was grounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grounding: Option<GroundingInfo>,
    /// Grounded answers: the passages the answer's markers cite, in order of first citation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<Vec<PassageOut>>,
    /// Present when the bot offers a person instead of an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<HandoffInfo>,
    /// Chat answers: the policy pack's part in this answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardInfo>,
    /// Present when the turn was about a declared action: what was asked, decided and called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionInfo>,
    /// Chat answers: the stored conversation this turn belongs to (send it back as
    /// `helpline.conversation_id` to continue it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// Chat answers: this answer's id (for feedback, audit and replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_id: Option<String>,
}

/// What the policy pack did to an answer (under `helpline.guard`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GuardInfo {
    /// The `version` of the policy pack in force.
    pub policy_version: String,
    /// What the policy did: `handoff` (an escalation trigger fired), `refusal` (an out-of-scope
    /// topic, or the model took the grammar's refusal branch), or `none` (the answer went ahead).
    pub action: GuardAction,
    /// Rules that fired on this turn, by id.
    pub rules: Vec<String>,
    /// The reason code of the escalation or refusal (e.g. `legal_threat`, `human_request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the answer was generated under the pack's grammar: its sha256, and the rules it enforced
    /// while decoding (forbidden commitments; citation markers limited to the passages given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constrained_by: Vec<String>,
    /// Whether the answer was generated in quote mode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quote_mode: bool,
    /// The client's structured-output constraint the answer was generated under (together with
    /// the pack's forbidden phrases, whose grammar `grammar_hash` names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure: Option<StructureInfo>,
}

/// A structured-output constraint (`response_format` or `helpline.grammar`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StructureInfo {
    /// `json_object`, `json_schema`, `regex` or `lark`.
    pub kind: String,
    /// sha256 of the grammar llguidance compiled for it.
    pub hash: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    None,
    Handoff,
    Refusal,
    /// The customer asked the bot to decide their case: the rule was quoted and a person offered.
    Decision,
}

impl GuardAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::None => "none",
            GuardAction::Handoff => "handoff",
            GuardAction::Refusal => "refusal",
            GuardAction::Decision => "decision",
        }
    }
}


/// A declared action in a turn (under `helpline.action`; kept in the audit record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionInfo {
    /// The action's name in the actions file.
    pub name: String,
    /// `read` or `write`.
    pub effect: String,
    /// Where it stands: `arguments_asked`, `confirmation_asked`, `declined`, `refused`, `done`,
    /// `failed`, or `would_call` (a replay: nothing was called).
    pub stage: String,
    /// How it was chosen: `examples` (the declared triggers), `model` (the model's choice under a
    /// grammar), `confirmation` (a yes to the question asked), `arguments` (the missing value
    /// given), `agent` (run by an agent).
    pub detected_by: String,
    /// The similarity of the message to the action's closest example.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// The arguments: identity from the verified token, the rest from the conversation.
    #[schema(value_type = Object)]
    pub arguments: serde_json::Value,
    /// Arguments still to be given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
    /// Why it was refused or failed: `not_verified`, `other_account`, `rate_limited`, `timeout`,
    /// `not_found`, `http_500`...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<ActionCall>,
}

/// The backend call of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionCall {
    /// Method, URL, headers (secrets shown as `[redacted]`) and body, as sent.
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    /// The backend's HTTP status (none: no answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: f64,
    pub attempts: u32,
    /// `ok`, `timeout`, `unreachable`, `not_found`, `http_<status>`, `bad_answer`, `rate_limited`,
    /// `not_run` (replay).
    pub outcome: String,
    /// The request reached the backend.
    pub executed: bool,
}
