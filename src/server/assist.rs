//! Agent assist: reply drafts, case summaries and knowledge-base drafts, for support agents (the
//! agent key scope guards every route here).
//!
//! The default model is small, so these routes are useful by construction: the structure of each
//! result (outline, summary, article) is built by code from the stored turns and the retrieved
//! approved passages, and the model only adds a short paragraph to a reply draft, decoded greedily
//! under the policy pack's answer grammar. A paragraph the passages do not support is left out.
//!
//! - `POST /v1/assist/draft`: a reply the agent can edit and send, with citations and an outline.
//! - `POST /v1/assist/summarize`: a case summary (`docs/schemas/case-summary.schema.json`) and a
//!   readable rendering of it.
//! - `POST /v1/assist/kb-draft`: an article draft (`status: draft`, never indexed) written from an
//!   agent's answer to `<docs_dir>/drafts/<id>.md`.
//! - `GET /v1/kb/drafts`, `POST /v1/kb/{id}/approve`: the review queue, and approval (the article
//!   moves to `<docs_dir>/<product_area>/<id>.md` as `approved` and the index is rebuilt).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::conversations::{sentiment, AGENT_ROUTES_OFF, NO_AGENT_KEY, STORE_DOWN};
use super::dto::ErrorResponse;
use super::error::{ApiError, ApiJson};
use crate::turn::{passage_out, passage_url};
use super::{AppState, SharedState};
use crate::guard::escalation::{phrase_regex, Turn as TriggerTurn};
use crate::guard::policy::compile_pattern;
use crate::guard::ActivePolicy;
use crate::prompt::CitationFilter;
use crate::retrieval::{Filters, Passage};
use crate::sampler::SamplingParams;
use crate::store::{Conversation, ConversationStatus, Role, Turn, TurnState};
use crate::tokenizer::ChatMessage;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/assist/draft", post(draft))
        .route("/v1/assist/summarize", post(summarize))
        .route("/v1/assist/kb-draft", post(kb_draft))
        .route("/v1/kb/drafts", get(list_drafts))
        .route("/v1/kb/{id}/approve", post(approve))
}

/// Longest pasted ticket, in characters.
pub const MAX_TICKET_CHARS: usize = 8000;
/// Longest agent note, in characters.
pub const MAX_NOTE_CHARS: usize = 2000;
/// The folder under the docs directory that holds article drafts.
pub const DRAFTS_DIR: &str = "drafts";
/// `$id` of the case summary's JSON Schema (`docs/schemas/case-summary.schema.json`).
pub const CASE_SUMMARY_SCHEMA_ID: &str = "helpline/case-summary";
/// The case summary's JSON Schema, as shipped.
pub const CASE_SUMMARY_SCHEMA: &str = include_str!("../../docs/schemas/case-summary.schema.json");

// ---------------------------------------------------------------------------------------------
// The case: a stored conversation or a pasted ticket
// ---------------------------------------------------------------------------------------------

/// Body of the reply draft route: exactly one of `conversation_id` and `ticket`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = AssistDraftRequest)]
pub struct DraftIn {
    /// A stored conversation: 1 to 64 characters of `A-Z a-z 0-9 _ . : -`.
    conversation_id: Option<String>,
    /// Pasted ticket text: 1 to 8000 characters, not all blank.
    #[schema(max_length = 8000)]
    ticket: Option<String>,
    /// The agent's note for the reply: up to 2000 characters (blank: none).
    #[schema(max_length = 2000)]
    note: Option<String>,
}

/// Body of the case summary route: exactly one of `conversation_id` and `ticket`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = AssistSummarizeRequest)]
pub struct SummarizeIn {
    /// A stored conversation: 1 to 64 characters of `A-Z a-z 0-9 _ . : -`.
    conversation_id: Option<String>,
    /// Pasted ticket text: 1 to 8000 characters, not all blank.
    #[schema(max_length = 8000)]
    ticket: Option<String>,
}

/// Body of the knowledge-base draft route.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = KbDraftRequest)]
pub struct KbDraftIn {
    /// The stored conversation whose latest agent answer becomes the article.
    #[schema(value_type = String, required = true)]
    conversation_id: Option<String>,
}

enum Source {
    Conversation(String),
    Ticket(String),
}

/// One message of a case, whoever wrote it.
#[derive(Debug, Clone)]
struct Msg {
    role: Role,
    text: String,
    /// What the server recorded about a bot answer (citations, guard, grounding).
    detail: Value,
    state: TurnState,
    finish_reason: Option<String>,
    turn_id: Option<String>,
    created_ms: i64,
}

impl Msg {
    fn of(t: &Turn) -> Msg {
        Msg {
            role: t.role,
            text: t.content.clone(),
            detail: t.detail.clone().unwrap_or(Value::Null),
            state: t.state,
            finish_reason: t.finish_reason.clone(),
            turn_id: Some(t.id.clone()),
            created_ms: t.created_ms,
        }
    }

    /// How a bot answer ended (the handoff summary's names, from the stored outcome code and what
    /// the server reported); `agent_reply` for agents.
    fn outcome(&self) -> &'static str {
        let finish = self.finish_reason.as_deref();
        match (self.role, self.detail["guard"]["action"].as_str(), self.detail["grounding"]["status"].as_str()) {
            (Role::Agent, _, _) => "agent_reply",
            (Role::Customer, _, _) => "customer",
            _ if self.state != TurnState::Complete || self.text.trim().is_empty() => "not_finished",
            (_, Some("handoff"), _) => "handoff",
            _ if finish == Some("handoff") => "handoff",
            (_, Some("refusal"), _) => "policy_refusal",
            _ if finish == Some("content_filter") => "policy_refusal",
            (_, _, Some("no_relevant_docs")) => "not_in_docs",
            _ if finish == Some("refused") => "not_in_docs",
            _ if finish == Some("length") => "cut_short",
            _ => "answered",
        }
    }

    /// The articles a bot answer cited: (doc id, title).
    fn cited(&self) -> Vec<(String, String)> {
        self.detail["citations"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| Some((c["doc_id"].as_str()?.to_string(), c["title"].as_str().unwrap_or("").to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Case {
    /// `None` for a pasted ticket.
    conversation: Option<Conversation>,
    msgs: Vec<Msg>,
}

impl Case {
    fn customer_texts(&self) -> Vec<&str> {
        self.msgs.iter().filter(|m| m.role == Role::Customer).map(|m| m.text.as_str()).collect()
    }

    fn field(&self) -> &'static str {
        if self.conversation.is_some() {
            "conversation_id"
        } else {
            "ticket"
        }
    }
}

/// A conversation id as chat accepts it: 1 to 64 characters of `A-Z a-z 0-9 _ . : -`.
fn check_conversation_id(id: &str) -> Result<(), ApiError> {
    if crate::store::is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::invalid_field("conversation_id", "`conversation_id` must be 1 to 64 characters of A-Z a-z 0-9 _ . : -"))
    }
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), ApiError> {
    let n = text.chars().count();
    if text.trim().is_empty() || n > max {
        return Err(ApiError::invalid_field(field, format!("`{field}` must have 1 to {max} characters, not all blank (got {n})")));
    }
    Ok(())
}

/// Exactly one of `conversation_id` and `ticket`.
fn source(conversation_id: Option<String>, ticket: Option<String>) -> Result<Source, ApiError> {
    match (conversation_id, ticket) {
        (Some(_), Some(_)) => Err(ApiError::invalid_field("ticket", "give either `conversation_id` or `ticket`, not both")),
        (None, None) => Err(ApiError::invalid_field(
            "conversation_id",
            "one of `conversation_id` (a stored conversation) or `ticket` (pasted ticket text) is required",
        )),
        (Some(id), None) => {
            check_conversation_id(&id)?;
            Ok(Source::Conversation(id))
        }
        (None, Some(t)) => {
            check_text("ticket", &t, MAX_TICKET_CHARS)?;
            Ok(Source::Ticket(t))
        }
    }
}

async fn load_case(state: &AppState, source: Source) -> Result<Case, ApiError> {
    match source {
        Source::Conversation(id) => {
            let (conv, turns) = state.store()?.get_conversation(&id).await.map_err(ApiError::store)?;
            Ok(Case { conversation: Some(conv), msgs: turns.iter().map(Msg::of).collect() })
        }
        Source::Ticket(text) => Ok(Case {
            conversation: None,
            msgs: vec![Msg {
                role: Role::Customer,
                text,
                detail: Value::Null,
                state: TurnState::Complete,
                finish_reason: None,
                turn_id: None,
                created_ms: 0,
            }],
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Text helpers
// ---------------------------------------------------------------------------------------------

/// At most `max` characters of `text` (whitespace runs folded), cut at a word with `…`.
fn excerpt(text: &str, max: usize) -> String {
    let t = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.chars().count() <= max {
        return t;
    }
    let cut: String = t.chars().take(max.saturating_sub(1)).collect();
    let cut = match cut.rfind(' ') {
        Some(i) if i > max / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{}…", cut.trim_end_matches([' ', ',', ';', ':']))
}


/// Whether a customer's sentence asks something.
fn is_question(sentence: &str) -> bool {
    const OPENERS: &[&str] = &[
        "how", "what", "why", "when", "where", "who", "which", "can", "could", "is", "are", "do", "does", "did", "will", "would",
        "should", "may", "am", "have", "has",
    ];
    let s = sentence.trim();
    let first = s.split(|c: char| !c.is_alphanumeric()).find(|w| !w.is_empty()).unwrap_or("").to_lowercase();
    s.ends_with('?') || OPENERS.contains(&first.as_str())
}

/// The questions a customer message asks (the whole message when it asks none explicitly but
/// reads as a request).
fn questions_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim();
        while !rest.is_empty() {
            let end = rest
                .char_indices()
                .find(|&(i, c)| matches!(c, '.' | '!' | '?') && (i + 1 == rest.len() || rest[i + 1..].starts_with(' ')))
                .map(|(i, c)| i + c.len_utf8())
                .unwrap_or(rest.len());
            let s = rest[..end].trim();
            if s.chars().filter(|c| c.is_alphabetic()).count() >= 6 && is_question(s) {
                out.push(s.to_string());
            }
            rest = rest[end..].trim_start();
        }
    }
    out
}

/// The policy pack's forbidden phrases and patterns, as the escalation matcher compiles phrases
/// (any casing, any spacing, whole words at the ends): an independent check of code-built text.
struct PhraseCheck {
    rules: Vec<(String, Regex)>,
}

impl PhraseCheck {
    fn new(policy: &ActivePolicy) -> PhraseCheck {
        let mut rules = Vec::new();
        for r in &policy.pack.forbidden {
            let phrases = r.phrases.iter().map(|p| phrase_regex(p));
            for (i, pattern) in phrases.chain(r.patterns.iter().cloned()).enumerate() {
                // The pack was validated when it loaded, so every pattern compiles.
                if let Ok(re) = compile_pattern(&format!("{} {i}", r.id), &pattern) {
                    rules.push((r.id.clone(), re));
                }
            }
        }
        PhraseCheck { rules }
    }

    /// Ids of the rules `text` trips (each once, in pack order).
    fn hits(&self, text: &str) -> Vec<String> {
        // Patterns such as `[^a-z]wave[^a-z]` need a character on each side.
        let padded = format!(" {text} ");
        let mut out: Vec<String> = Vec::new();
        for (id, re) in &self.rules {
            if re.is_match(&padded) && !out.contains(id) {
                out.push(id.clone());
            }
        }
        out
    }
}

/// Today's date (UTC), `YYYY-MM-DD`.
fn today() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// The proleptic Gregorian date `days` after 1970-01-01, `YYYY-MM-DD`.
fn civil_date(days: i64) -> String {
    let (y, m, d) = crate::tokenizer::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

// ---------------------------------------------------------------------------------------------
// History summary (shared by the draft)
// ---------------------------------------------------------------------------------------------

fn history_summary(case: &Case, policy: &ActivePolicy, state: &AppState) -> Value {
    let customer = case.customer_texts();
    let mut docs: BTreeMap<String, String> = BTreeMap::new();
    for m in case.msgs.iter().filter(|m| m.role == Role::Bot) {
        for (id, title) in m.cited() {
            docs.entry(id).or_insert(title);
        }
    }
    let escalation = escalation(case, policy, state).map(|(rule, reason)| json!({"rule": rule, "reason": reason}));
    json!({
        "customer_messages": customer.len(),
        "bot_answers": case.msgs.iter().filter(|m| m.role == Role::Bot).count(),
        "agent_replies": case.msgs.iter().filter(|m| m.role == Role::Agent).count(),
        "issue": excerpt(customer.first().copied().unwrap_or(""), 300),
        "last_customer_message": excerpt(customer.last().copied().unwrap_or(""), 300),
        "docs_already_cited": docs.into_iter().map(|(id, title)| json!({"doc_id": id, "title": title})).collect::<Vec<_>>(),
        "sentiment": sentiment(&customer),
        "status": case.conversation.as_ref().map(|c| c.status),
        "escalation": escalation,
    })
}

/// The policy's escalation trigger the customer's messages fire, as chat would decide it on the
/// latest one: (rule, reason).
fn escalation(case: &Case, policy: &ActivePolicy, state: &AppState) -> Option<(String, String)> {
    let last_customer = case.msgs.iter().rposition(|m| m.role == Role::Customer)?;
    let turns: Vec<TriggerTurn<'_>> = case.msgs[..=last_customer]
        .iter()
        .map(|m| TriggerTurn { from_customer: m.role == Role::Customer, text: &m.text })
        .collect();
    let pack = &policy.pack;
    let refusals = [pack.messages.refusal.trim(), state.config.grounding.refusal_message.trim()];
    let is_refusal = |t: &str| refusals.contains(&t.trim()) || pack.out_of_scope.iter().any(|r| r.reply.trim() == t.trim());
    policy.triggers.escalation(&turns, &is_refusal).map(|f| (f.rule, f.reason))
}

// ---------------------------------------------------------------------------------------------
// POST /v1/assist/draft
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct CitationOut {
    index: usize,
    doc_id: String,
    title: String,
    section: String,
    url: String,
    snippet: String,
}

/// What the turn gave a draft.
struct DraftPlan {
    query: String,
    index_version: Option<String>,
    /// The passages the draft cites, numbered as its markers.
    given: Vec<Passage>,
    /// The quoted evidence, per passage number.
    quotes: BTreeMap<usize, Vec<String>>,
    /// Why nothing was quoted: `no_relevant_docs`.
    refused: Option<&'static str>,
    /// An out-of-scope topic the latest message is about: (rule, the pack's reply).
    out_of_scope: Option<(String, String)>,
    /// A decision the customer asks for: (rule, reason).
    decision: Option<(String, String)>,
    gate: Option<crate::turn::report::GateOut>,
}
/// Draft a reply for an agent.
///
/// A reply the agent can edit and send, for a stored conversation or a pasted ticket: greeting, a
/// short model paragraph kept only when the retrieved passages support it, the passages' own words
/// with `[n]` markers, and closing; with citations, an outline, a history summary, and the guard and
/// grounding reports. See `docs/assist.md`. Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/assist/draft",
    tag = "assist",
    operation_id = "assistDraft",
    request_body = DraftIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{object: \"assist.draft\", draft, citations: [{index, doc_id, title, section, url, snippet}], \
history_summary, outline: [string], guard: {policy_version, grammar_hash, constrained_by, checked_phrases, dropped, out_of_scope}, \
generation: {used, verdict, finish_reason, tokens, support, min_support, invalid_citations}, \
grounding: {status: grounded|no_relevant_docs, reason, query, index_version, min_relevance, passages}}`", body = Object),
        (status = 400, description = "Malformed JSON, or the draft's prompt does not fit the model's context (`context_length_exceeded`)", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "Not exactly one of `conversation_id` and `ticket`, a field out of range, or a conversation without a customer message (`param` names the field)", body = ErrorResponse),
        (status = 429, description = "The queue is full (`queue_full`); retry after `Retry-After` seconds", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Generation failed, the policy grammar does not compile, or the store failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`), no search index is open (`no_index`), no policy pack is loaded (`no_policy`), or the store is down (`store_unavailable`)", body = ErrorResponse),
    )
)]
pub async fn draft(State(state): State<SharedState>, ApiJson(req): ApiJson<DraftIn>) -> Result<Json<Value>, ApiError> {
    let source = source(req.conversation_id, req.ticket)?;
    let note = match req.note {
        Some(n) if n.trim().is_empty() => None,
        Some(n) => {
            check_text("note", &n, MAX_NOTE_CHARS)?;
            Some(n)
        }
        None => None,
    };
    let policy = state.policy()?;
    let case = load_case(&state, source).await?;
    if case.customer_texts().is_empty() {
        return Err(ApiError::invalid_field(case.field(), "the conversation has no customer message to reply to"));
    }
    let history = history_summary(&case, &policy, &state);
    // The same turn as chat (retrieval, evidence, the gate, assembled quotes), for the agent:
    // nothing is stored, and no escalation or handoff is decided (the agent is the person).
    let mut deps = state.turn_deps()?;
    deps.store = None;
    let latest = case.msgs.iter().rposition(|m| m.role == Role::Customer).expect("checked above");
    let messages: Vec<ChatMessage> = case.msgs[..=latest]
        .iter()
        .filter(|m| !m.text.trim().is_empty() && m.state == TurnState::Complete)
        .map(|m| ChatMessage::new(if m.role == Role::Customer { "user" } else { "assistant" }, m.text.clone()))
        .collect();
    let main = draft_turn(&deps, messages).await?;
    let noted = match &note {
        Some(n) => Some(draft_turn(&deps, vec![ChatMessage::new("user", n.clone())]).await?),
        None => None,
    };
    let plan = draft_plan(&main, noted.as_ref(), &case.msgs[latest].text, note.as_deref());

    let closing = policy.pack.messages.closing.trim();
    // The turn's own closing (the offer of more help or of a person) is the agent's to word.
    let body = |f: &crate::turn::Finished| {
        let t = f.text.trim().strip_suffix(closing).unwrap_or(f.text.trim()).trim().to_string();
        match t.rsplit_once("\n\n") {
            Some((head, last)) if crate::turn::precheck::offers_person(last) => head.trim().to_string(),
            _ => t,
        }
    };
    let check = PhraseCheck::new(&policy);
    let negative = history["sentiment"]["label"] == "negative";
    let mut dropped: Vec<Value> = Vec::new();
    let mut draft = String::from("Hello,\n\nThank you for getting in touch.");
    if negative {
        draft.push_str(" I'm sorry for the trouble this has caused.");
    }
    draft.push_str("\n\n");
    let grounded = |f: &crate::turn::Finished| f.info.citations.as_ref().is_some_and(|c| !c.is_empty());
    if let Some((_, reply)) = &plan.out_of_scope {
        draft.push_str(reply.trim());
        draft.push_str("\n\n");
    } else if !grounded(&main) {
        draft.push_str(
            "Our help center does not cover this question, so I am passing it to the team that can answer it, \
             and you will hear back from us here.\n\n",
        );
    } else {
        let text = body(&main);
        let hits = check.hits(&text);
        if hits.is_empty() {
            draft.push_str(&text);
            draft.push_str("\n\n");
        } else {
            dropped.push(json!({"part": "quotes", "rules": hits}));
        }
    }
    if let Some(n) = noted.as_ref().filter(|n| grounded(n)) {
        // The note's quotes follow, their markers numbered after the issue's.
        let offset = main.info.citations.as_ref().map_or(0, |c| c.len());
        let text = renumber(&body(n), offset);
        let hits = check.hits(&text);
        if hits.is_empty() {
            draft.push_str(&text);
            draft.push_str("\n\n");
        } else {
            dropped.push(json!({"part": "note_quotes", "rules": hits}));
        }
    }
    draft.push_str("Let me know if there is anything else I can help with.");

    // Citations: the markers the finished draft holds, each naming a passage.
    let mut filter = CitationFilter::new(plan.given.len());
    filter.push(&draft);
    filter.finish();
    let citations: Vec<CitationOut> = filter
        .cited()
        .iter()
        .filter_map(|&n| {
            let p = plan.given.get(n - 1)?;
            Some(CitationOut {
                index: n,
                doc_id: p.doc_id.clone(),
                title: p.title.clone(),
                section: p.section.clone(),
                url: passage_url(p),
                snippet: p.snippet.clone(),
            })
        })
        .collect();
    let outline = outline(&case, &history, &plan, &citations, note.as_deref());
    let status = if plan.given.is_empty() { "no_relevant_docs" } else { "grounded" };
    let passages: Vec<_> = plan.given.iter().enumerate().map(|(i, p)| passage_out(p, Some(i + 1), false)).collect();
    Ok(Json(json!({
        "object": "assist.draft",
        "draft": draft,
        "citations": citations,
        "history_summary": history,
        "outline": outline,
        "guard": {
            "policy_version": policy.pack.version,
            "grammar_hash": Value::Null,
            "constrained_by": Vec::<String>::new(),
            "checked_phrases": true,
            "dropped": dropped,
            "out_of_scope": plan.out_of_scope.as_ref().map(|(rule, _)| rule),
            "decision": plan.decision.as_ref().map(|(rule, reason)| json!({"rule": rule, "reason": reason})),
        },
        "generation": {"used": false, "mode": "assembled"},
        "grounding": {
            "status": status,
            "reason": plan.refused,
            "query": plan.query,
            "index_version": plan.index_version,
            "min_relevance": state.config.grounding.min_relevance,
            "gate": plan.gate,
            "passages": passages,
        },
    })))
}

/// One turn of a draft: assembled, not stored, for an agent.
async fn draft_turn(deps: &crate::turn::Deps, messages: Vec<ChatMessage>) -> Result<crate::turn::Finished, ApiError> {
    let req = crate::turn::Request {
        messages,
        sampling: crate::turn::Sampling { params: SamplingParams::greedy(), max_tokens: 1, stop: Vec::new() },
        grounding: Some(Filters::default()),
        mode: crate::turn::Mode::Assembled,
        structured: None,
        conversation: None,
        audit_request: Value::Null,
        for_agent: true,
        dry_run_actions: false,
        tools: None,
    };
    Ok(crate::turn::run(deps, req).await?.collect().await?)
}

/// What the draft's turns found: the passages (the note's numbered after the issue's) and the
/// quoted evidence of each.
fn draft_plan(main: &crate::turn::Finished, noted: Option<&crate::turn::Finished>, latest: &str, note: Option<&str>) -> DraftPlan {
    let mut given = Vec::new();
    let mut quotes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut gate = None;
    let mut index_version = None;
    for f in std::iter::once(main).chain(noted) {
        let offset = given.len();
        let Some(g) = &f.info.grounding else { continue };
        if gate.is_none() {
            gate = g.gate.clone();
        }
        index_version = index_version.or_else(|| g.index_version.clone());
        if f.info.citations.as_ref().is_none_or(|c| c.is_empty()) {
            continue;
        }
        for p in &g.passages {
            given.push(Passage {
                chunk_id: p.chunk_id.clone(),
                doc_id: p.doc_id.clone(),
                title: p.title.clone(),
                section: p.section.clone(),
                source: String::new(),
                product_area: String::new(),
                locale: String::new(),
                updated: String::new(),
                text: String::new(),
                snippet: p.snippet.clone(),
                score: p.score,
                relevance: p.relevance,
                lexical: p.lexical,
                semantic: p.semantic,
            });
        }
        for e in &g.evidence {
            quotes.entry(e.cited_as + offset).or_default().push(e.text.clone());
        }
    }
    let rule = |f: &crate::turn::Finished, action: crate::turn::report::GuardAction| {
        f.info.guard.as_ref().filter(|g| g.action == action).map(|g| (g.rules.first().cloned().unwrap_or_default(), g.reason.clone().unwrap_or_default()))
    };
    let out_of_scope = rule(main, crate::turn::report::GuardAction::Refusal).filter(|_| main.reason == crate::turn::report::FinishReason::ContentFilter).map(|(r, _)| (r, main.text.clone()));
    let decision = rule(main, crate::turn::report::GuardAction::Decision);
    let mut query = latest.to_string();
    if let Some(n) = note {
        query.push_str(" // note: ");
        query.push_str(n);
    }
    DraftPlan {
        query,
        index_version,
        refused: given.is_empty().then_some("no_relevant_docs"),
        given,
        quotes,
        out_of_scope,
        decision,
        gate,
    }
}

/// Adds `offset` to every citation marker's numbers.
fn renumber(text: &str, offset: usize) -> String {
    let re = Regex::new(r"\[(\d+(?:,\s*\d+)*)\]").expect("a valid pattern");
    re.replace_all(text, |c: &regex::Captures| {
        let nums: Vec<String> = c[1].split(',').filter_map(|n| n.trim().parse::<usize>().ok()).map(|n| (n + offset).to_string()).collect();
        format!("[{}]", nums.join(", "))
    })
    .into_owned()
}

/// The reply's outline, built from the case and the passages: greet and acknowledge, what the docs
/// say (one line per cited passage), next steps, further help.
fn outline(case: &Case, history: &Value, plan: &DraftPlan, citations: &[CitationOut], note: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let issue = history["last_customer_message"].as_str().unwrap_or("");
    let mut greet = format!("Greet the customer and acknowledge the issue: \"{}\"", excerpt(issue, 140));
    if history["sentiment"]["label"] == "negative" {
        let cues: Vec<&str> = history["sentiment"]["cues"].as_array().map(|c| c.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        greet.push_str(&format!(" (they sound frustrated: {}); apologise for the trouble", cues.join(", ")));
    }
    out.push(greet);
    if let Some(e) = history["escalation"].as_object() {
        out.push(format!(
            "Policy trigger `{}` ({}): follow the escalation process and make no commitment in writing",
            e["rule"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        ));
    }
    if let Some((rule, _)) = &plan.out_of_scope {
        out.push(format!("Out of scope (`{rule}`): the help center gives no advice on this; the draft says so"));
    }
    if let Some((rule, _)) = &plan.decision {
        out.push(format!("Decision (`{rule}`): the customer asks for a decision on their own case; the rule is quoted, the decision is yours (or the owning team's)"));
    }
    if citations.is_empty() {
        out.push("The help center does not cover this question: do not improvise a policy answer".into());
        out.push("Escalate: pass the case to the team that owns this area (or a lead), and tell the customer who will follow up".into());
    } else {
        for c in citations {
            let place = if c.section.is_empty() { c.title.clone() } else { format!("{} › {}", c.title, c.section) };
            let said = plan.quotes.get(&c.index).map(|q| q.join(" ")).unwrap_or_else(|| c.snippet.clone());
            out.push(format!("What the docs say — {place} [{}]: {}", c.index, excerpt(&said, 160)));
        }
        let cited_before: Vec<&str> = history["docs_already_cited"]
            .as_array()
            .map(|d| d.iter().filter(|d| citations.iter().any(|c| Some(c.doc_id.as_str()) == d["doc_id"].as_str())).filter_map(|d| d["title"].as_str()).collect())
            .unwrap_or_default();
        if !cited_before.is_empty() {
            out.push(format!("The bot already pointed to {}: explain what still applies rather than repeat it", cited_before.join(", ")));
        }
    }
    if let Some(conv) = &case.conversation {
        if conv.status == ConversationStatus::HandedOff {
            let reason = conv.handoff.as_ref().map(|h| h.reason.as_str()).unwrap_or("handoff");
            out.push(format!("The bot handed this conversation to a person ({reason}): the customer is waiting for you"));
        }
    }
    match note {
        Some(n) => out.push(format!("Next steps (your note): {}", excerpt(n, 200))),
        None if citations.is_empty() => out.push("Next steps: say who will answer and when the customer will hear back".into()),
        None => out.push("Next steps: tell the customer what to do next, or what you will do and when".into()),
    }
    out.push("Offer further help and invite the customer to reply".into());
    out
}

// ---------------------------------------------------------------------------------------------
// POST /v1/assist/summarize
// ---------------------------------------------------------------------------------------------

/// A case summary; its JSON Schema is `docs/schemas/case-summary.schema.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaseSummary {
    pub issue: String,
    pub steps: Vec<String>,
    pub outcome: String,
    pub open_questions: Vec<String>,
}

/// Bounds of the schema, kept here so the summary always satisfies it.
const ISSUE_CHARS: usize = 500;
const STEP_CHARS: usize = 300;
const MAX_STEPS: usize = 40;
const OUTCOME_CHARS: usize = 400;
const QUESTION_CHARS: usize = 300;
const MAX_OPEN_QUESTIONS: usize = 10;

/// Summarize a case.
///
/// What happened in a stored conversation or a pasted ticket, built by code from the turns (nothing
/// is generated): the issue, the steps taken, the outcome and the open questions, as JSON valid
/// against `docs/schemas/case-summary.schema.json` and as text. Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/assist/summarize",
    tag = "assist",
    operation_id = "assistSummarize",
    request_body = SummarizeIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{object: \"assist.summary\", schema_id: \"helpline/case-summary\", text, summary: CaseSummary}`", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "Not exactly one of `conversation_id` and `ticket`, or a field out of range (`param` names it)", body = ErrorResponse),
        (status = 500, description = "The store failed", body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn summarize(State(state): State<SharedState>, ApiJson(req): ApiJson<SummarizeIn>) -> Result<Json<Value>, ApiError> {
    let source = source(req.conversation_id, req.ticket)?;
    let case = load_case(&state, source).await?;
    let summary = case_summary(&case);
    let text = render_summary(&summary);
    Ok(Json(json!({
        "object": "assist.summary",
        "schema_id": CASE_SUMMARY_SCHEMA_ID,
        "text": text,
        "summary": summary,
    })))
}

/// What happened in a case, from its stored turns alone.
fn case_summary(case: &Case) -> CaseSummary {
    let customer = case.customer_texts();
    let issue = match customer.first() {
        Some(first) => excerpt(first, ISSUE_CHARS),
        None => "(no customer message yet)".to_string(),
    };

    // Steps: each bot or agent answer condensed, and the handoff where it happened.
    // (time, rank, text): at the same millisecond a handoff sorts after the bot's answer that led
    // to it and before an agent's reply.
    let mut steps: Vec<(i64, u8, String)> = Vec::new();
    for m in case.msgs.iter().filter(|m| m.role != Role::Customer) {
        let titles: Vec<String> = m.cited().into_iter().map(|(id, title)| if title.is_empty() { id } else { title }).collect();
        let step = match m.outcome() {
            "agent_reply" => format!("Agent replied: {}", excerpt(&m.text, 220)),
            "handoff" => "Bot handed the conversation to a person".to_string(),
            "policy_refusal" => "Bot declined under the policy pack (out of scope or a commitment it may not make)".to_string(),
            "not_in_docs" => "Bot found nothing in the help center and offered a person".to_string(),
            "not_finished" => format!("Bot answer did not finish ({})", m.state.as_str()),
            outcome => {
                let from = if titles.is_empty() { String::new() } else { format!(" from {}", titles.join(", ")) };
                let cut = if outcome == "cut_short" { " (cut short)" } else { "" };
                format!("Bot answered{from}{cut}: {}", excerpt(&m.text, 180))
            }
        };
        let rank = if m.role == Role::Agent { 2 } else { 0 };
        steps.push((m.created_ms, rank, excerpt(&step, STEP_CHARS)));
    }
    if let Some(h) = case.conversation.as_ref().and_then(|c| c.handoff.as_ref()) {
        steps.push((h.at_ms, 1, excerpt(&format!("Handed off to a person (reason: {}, requested by {})", h.reason, h.by), STEP_CHARS)));
    }
    steps.sort_by_key(|(at, rank, _)| (*at, *rank));
    let mut steps: Vec<String> = steps.into_iter().map(|(_, _, s)| s).collect();
    if steps.len() > MAX_STEPS {
        let skipped = steps.len() - (MAX_STEPS - 1);
        let tail = steps.split_off(steps.len() - (MAX_STEPS / 2));
        steps.truncate(MAX_STEPS / 2 - 1);
        steps.push(format!("({skipped} more steps)"));
        steps.extend(tail);
    }

    CaseSummary { issue, steps, outcome: outcome(case), open_questions: open_questions(case) }
}

/// Where the case stands: status, handoff, and what the customer said about it.
fn outcome(case: &Case) -> String {
    let Some(conv) = &case.conversation else {
        return "Not answered yet: only the ticket text was given".to_string();
    };
    let agent_after_handoff =
        conv.handoff.as_ref().is_some_and(|h| case.msgs.iter().any(|m| m.role == Role::Agent && m.created_ms >= h.at_ms));
    let mut text = match conv.status {
        ConversationStatus::Resolved => "Resolved".to_string(),
        ConversationStatus::HandedOff => {
            let reason = conv.handoff.as_ref().map(|h| h.reason.as_str()).unwrap_or("unknown");
            if agent_after_handoff {
                format!("Handed off to a person ({reason}); an agent has replied")
            } else {
                format!("Handed off to a person ({reason}); waiting for an agent")
            }
        }
        ConversationStatus::Open => match case.msgs.last().map(|m| m.role) {
            None => "Open: no messages yet".to_string(),
            Some(Role::Customer) => "Open: the customer's latest message has no answer yet".to_string(),
            Some(Role::Agent) => "Open: an agent replied; the customer has not confirmed it is resolved".to_string(),
            Some(Role::Bot) => "Open: the bot answered; the customer has not confirmed it is resolved".to_string(),
        },
    };
    if let Some(f) = &conv.feedback {
        match f.resolved {
            Some(true) => text.push_str("; the customer said it is resolved"),
            Some(false) => text.push_str("; the customer said it is not resolved"),
            None => {}
        }
        match f.helpful {
            Some(true) => text.push_str("; they found the help useful"),
            Some(false) => text.push_str("; they did not find the help useful"),
            None => {}
        }
        if let Some(c) = f.comment.as_deref().filter(|c| !c.trim().is_empty()) {
            text.push_str(&format!(" (\"{}\")", excerpt(c, 120)));
        }
    }
    excerpt(&text, OUTCOME_CHARS)
}

/// Customer questions no answer completed: each customer message's questions count as answered
/// when an agent replied, or the bot answered in full from the docs, before the next customer message.
fn open_questions(case: &Case) -> Vec<String> {
    let mut open = Vec::new();
    for (i, m) in case.msgs.iter().enumerate().filter(|(_, m)| m.role == Role::Customer) {
        let answered = case.msgs[i + 1..]
            .iter()
            .take_while(|n| n.role != Role::Customer)
            .any(|n| matches!(n.outcome(), "agent_reply" | "answered"));
        if answered {
            continue;
        }
        for q in questions_in(&m.text) {
            let q = excerpt(&q, QUESTION_CHARS);
            if !open.contains(&q) {
                open.push(q);
            }
        }
    }
    // The latest questions matter most when there are many.
    let skip = open.len().saturating_sub(MAX_OPEN_QUESTIONS);
    open.split_off(skip)
}

fn render_summary(s: &CaseSummary) -> String {
    let mut text = format!("Issue: {}\n", s.issue);
    if s.steps.is_empty() {
        text.push_str("Steps: none yet\n");
    } else {
        text.push_str("Steps:\n");
        for (i, step) in s.steps.iter().enumerate() {
            text.push_str(&format!("{}. {step}\n", i + 1));
        }
    }
    text.push_str(&format!("Outcome: {}\n", s.outcome));
    if s.open_questions.is_empty() {
        text.push_str("Open questions: none");
    } else {
        text.push_str("Open questions:\n");
        text.push_str(&s.open_questions.iter().map(|q| format!("- {q}")).collect::<Vec<_>>().join("\n"));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Knowledge-base drafts
// ---------------------------------------------------------------------------------------------

/// Longest article id we generate or accept.
const MAX_ID_LEN: usize = 80;

/// An article id: kebab-case (lowercase letters, digits, single hyphens), as the indexer requires.
/// Anything else (dots, slashes, encoded traversal) is refused before a path is built from it.
fn check_article_id(id: &str) -> Result<(), ApiError> {
    if id.len() <= MAX_ID_LEN && crate::retrieval::is_kebab_case(id) {
        Ok(())
    } else {
        Err(ApiError::invalid_field("id", format!("`id` must be kebab-case (a-z, 0-9 and single hyphens), at most {MAX_ID_LEN} characters")))
    }
}

/// A product area usable as a folder name.
fn is_area(area: &str) -> bool {
    (1..=64).contains(&area.len()) && area.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The `key: value` lines of a front matter block (values unquoted), and the body after it.
fn front_matter(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.split_inclusive('\n');
    if lines.next()?.trim_end() != "---" {
        return None;
    }
    let mut consumed = text.find('\n')? + 1;
    let mut pairs = Vec::new();
    for raw in lines {
        consumed += raw.len();
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim_end() == "---" {
            return Some((pairs, &text[consumed..]));
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            pairs.push((k.trim().to_ascii_lowercase(), v.to_string()));
        }
    }
    None
}

fn fm_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// `text` with the front matter's `key: value` lines replaced (or added before the closing line).
fn set_front_matter(text: &str, updates: &[(&str, &str)]) -> Option<String> {
    let (_, body) = front_matter(text)?;
    let head = &text[..text.len() - body.len()];
    let mut lines: Vec<String> = head.lines().map(str::to_string).collect();
    let close = lines.len() - 1;
    let mut pending: Vec<(&str, &str)> = updates.to_vec();
    for line in &mut lines[1..close] {
        let key = line.split_once(':').map(|(k, _)| k.trim().to_ascii_lowercase());
        if let Some(pos) = pending.iter().position(|(k, _)| Some(k.to_string()) == key) {
            let (k, v) = pending.remove(pos);
            *line = format!("{k}: {v}");
        }
    }
    let extra: Vec<String> = pending.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    lines.splice(close..close, extra);
    Some(format!("{}\n{body}", lines.join("\n")))
}

/// A kebab-case id from a question's words: `how-do-i-export-invoices`-style, at most eight words.
fn slug(text: &str) -> String {
    const FILLER: &[&str] = &["a", "an", "the", "i", "my", "me", "we", "our", "you", "your", "hi", "hello", "please", "is", "it", "to", "do", "can"];
    let words: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .filter(|w| !FILLER.contains(&w.as_str()))
        .take(8)
        .collect();
    let mut id = String::new();
    for w in words {
        if id.len() + w.len() + 1 > 60 {
            break;
        }
        if !id.is_empty() {
            id.push('-');
        }
        id.push_str(&w);
    }
    if id.is_empty() {
        "answer-from-support".to_string()
    } else {
        id
    }
}

/// A front-matter value on one line, without the characters that would end or comment it.
fn one_line(text: &str, max: usize) -> String {
    let t: String = text.chars().map(|c| if c == '"' { '\'' } else if c.is_control() { ' ' } else { c }).collect();
    excerpt(&t, max)
}

/// Whether any file under `dir` (recursively, hidden entries skipped) is named `<id>.<ext>`.
fn file_named(dir: &Path, id: &str, depth: usize) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = e.path();
        if path.is_dir() {
            if depth > 0 && file_named(&path, id, depth - 1) {
                return true;
            }
        } else if name.rsplit_once('.').is_some_and(|(stem, _)| stem == id) {
            return true;
        }
    }
    false
}

/// The question and the agent's answer a KB draft is written from: the latest agent reply that
/// follows a customer message, with the customer messages since the previous agent reply (their
/// questions when they ask any).
fn question_and_answer(case: &Case) -> Option<(String, &Msg)> {
    let (at, answer) = case
        .msgs
        .iter()
        .enumerate()
        .rev()
        .find(|(i, m)| m.role == Role::Agent && !m.text.trim().is_empty() && case.msgs[..*i].iter().any(|p| p.role == Role::Customer))?;
    let start = case.msgs[..at].iter().rposition(|m| m.role == Role::Agent).map_or(0, |i| i + 1);
    let mut asked: Vec<&str> = case.msgs[start..at].iter().filter(|m| m.role == Role::Customer).map(|m| m.text.as_str()).collect();
    if asked.is_empty() {
        // The agent answered a follow-up to an earlier reply: the latest customer message before it.
        asked = case.msgs[..at].iter().rev().filter(|m| m.role == Role::Customer).map(|m| m.text.as_str()).take(1).collect();
    }
    let questions: Vec<&str> = asked.iter().copied().filter(|t| !questions_in(t).is_empty()).collect();
    let chosen = if questions.is_empty() { asked } else { questions };
    Some((chosen.iter().map(|t| t.trim()).collect::<Vec<_>>().join("\n\n"), answer))
}

/// Draft a knowledge-base article from an agent's answer.
///
/// The conversation's latest agent answer to a customer question is written as an article draft
/// (`status: draft`, never indexed) to `<docs_dir>/drafts/<id>.md`; drafting the same answer again
/// rewrites its draft. `policy_warnings` lists the policy rules the answer trips. Agent route: needs
/// an agent key.
#[utoipa::path(
    post,
    path = "/v1/assist/kb-draft",
    tag = "assist",
    operation_id = "assistKbDraft",
    request_body = KbDraftIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{id, path, status: \"draft\", title, product_area, conversation_id, policy_warnings, markdown}`", body = Object),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 409, description = "Every id for the draft is taken (`draft_id_taken`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`conversation_id` is missing or malformed, or the conversation has no agent answer to a customer question", body = ErrorResponse),
        (status = 500, description = "The store or the server failed", body = ErrorResponse),
        (status = 503, description = "No policy pack is loaded (`no_policy`), the docs directory cannot be written (`docs_unwritable`), or the store is down (`store_unavailable`)", body = ErrorResponse),
    )
)]
pub async fn kb_draft(State(state): State<SharedState>, ApiJson(req): ApiJson<KbDraftIn>) -> Result<Json<Value>, ApiError> {
    let id = req.conversation_id.ok_or_else(|| ApiError::invalid_field("conversation_id", "`conversation_id` is required"))?;
    check_conversation_id(&id)?;
    let case = load_case(&state, Source::Conversation(id.clone())).await?;
    let Some((question, answer)) = question_and_answer(&case) else {
        return Err(ApiError::invalid_field(
            "conversation_id",
            format!("conversation `{id}` has no agent reply to a customer question; a knowledge-base draft is written from an agent's answer"),
        ));
    };
    let answer = answer.clone();
    let policy = state.policy()?;
    let warnings = PhraseCheck::new(&policy).hits(&answer.text);
    let conv = case.conversation.clone().expect("a stored conversation");
    let st = state.clone();
    let written = tokio::task::spawn_blocking(move || write_kb_draft(&st, &conv, &question, &answer))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(json!({
        "id": written.id,
        "path": written.path,
        "status": "draft",
        "title": written.title,
        "product_area": written.area,
        "conversation_id": id,
        "policy_warnings": warnings,
        "markdown": written.markdown,
    })))
}

struct WrittenDraft {
    id: String,
    path: String,
    title: String,
    area: String,
    markdown: String,
}

fn write_kb_draft(state: &AppState, conv: &Conversation, question: &str, answer: &Msg) -> Result<WrittenDraft, ApiError> {
    let docs = &state.config.grounding.docs_dir;
    let first_question = questions_in(question).into_iter().next().unwrap_or_else(|| question.to_string());
    let title = one_line(&first_question, 100);
    // The area of the best-matching approved article, when an index is open.
    let kb = state.knowledge().ok();
    let area = kb
        .as_ref()
        .and_then(|kb| kb.search(question, 1, &Filters::default()).ok())
        .and_then(|found| found.into_iter().next())
        .map(|p| p.product_area)
        .filter(|a| is_area(a))
        .unwrap_or_else(|| "general".to_string());
    let locale = conv
        .customer
        .locale
        .as_deref()
        .map(str::to_ascii_lowercase)
        .filter(|l| (2..=16).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
        .unwrap_or_else(|| "en".to_string());
    let turn = answer.turn_id.clone().unwrap_or_default();
    let dir = docs.join(DRAFTS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::unavailable("docs_unwritable", format!("cannot create {}: {e}", dir.display())))?;

    let base = slug(&first_question);
    for n in 1..100 {
        let id = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        let path = dir.join(format!("{id}.md"));
        // The same agent reply drafted again: rewrite its draft instead of making a copy.
        let ours = std::fs::read_to_string(&path).ok().and_then(|t| {
            let (pairs, _) = front_matter(&t)?;
            Some(fm_get(&pairs, "status") == Some("draft") && fm_get(&pairs, "source_turn") == Some(turn.as_str()) && !turn.is_empty())
        });
        let taken = match ours {
            Some(true) => false,
            Some(false) => true,
            None => file_named(docs, &id, 4) || kb.as_ref().is_some_and(|kb| kb.document(&id).ok().flatten().is_some()),
        };
        if taken {
            continue;
        }
        let markdown = format!(
            "---\nid: {id}\ntitle: \"{title}\"\nstatus: draft\nupdated: {date}\nproduct_area: {area}\nlocale: {locale}\n\
             source_conversation: {conv_id}\nsource_turn: {turn}\n---\n\n## Question\n\n{question}\n\n## Answer\n\n{answer}\n\n\
             ## Source\n\nSource: conversation {conv_id}, answered by a support agent. Review before approving.\n",
            date = today(),
            conv_id = conv.id,
            question = question.trim(),
            answer = answer.text.trim(),
        );
        let unwritable = |e: std::io::Error| ApiError::unavailable("docs_unwritable", format!("cannot write {}: {e}", path.display()));
        match write_atomically(&path, markdown.as_bytes(), ours == Some(true)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(unwritable(e)),
        }
        return Ok(WrittenDraft { id: id.clone(), path: format!("{DRAFTS_DIR}/{id}.md"), title, area, markdown });
    }
    Err(ApiError::conflict("draft_id_taken", format!("the ids `{base}` to `{base}-99` are all taken; approve or remove some drafts")))
}

#[derive(Debug, Clone, Serialize)]
struct DraftEntry {
    id: String,
    title: String,
    status: String,
    updated: String,
    product_area: String,
    path: String,
    source_conversation: Option<String>,
}

/// List knowledge-base drafts.
///
/// The drafts awaiting review (files in `<docs_dir>/drafts/` with `status: draft`), newest
/// `updated` first. Agent route: needs an agent key.
#[utoipa::path(
    get,
    path = "/v1/kb/drafts",
    tag = "assist",
    operation_id = "listKbDrafts",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{object: \"list\", data: [{id, title, status, updated, product_area, path, source_conversation}]}`", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 500, description = "The server failed", body = ErrorResponse),
    )
)]
pub async fn list_drafts(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let dir = state.config.grounding.docs_dir.join(DRAFTS_DIR);
    let entries = tokio::task::spawn_blocking(move || drafts_in(&dir)).await.map_err(ApiError::internal)?;
    Ok(Json(json!({"object": "list", "data": entries})))
}

fn drafts_in(dir: &Path) -> Vec<DraftEntry> {
    let Ok(files) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<DraftEntry> = files
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".md")?.to_string();
            if name.starts_with('.') || check_article_id(&stem).is_err() {
                return None;
            }
            let text = std::fs::read_to_string(e.path()).ok()?;
            let (pairs, _) = front_matter(&text)?;
            let field = |k: &str| fm_get(&pairs, k).unwrap_or("").to_string();
            (field("status") == "draft").then(|| DraftEntry {
                id: field("id"),
                title: field("title"),
                status: field("status"),
                updated: field("updated"),
                product_area: field("product_area"),
                path: format!("{DRAFTS_DIR}/{name}"),
                source_conversation: fm_get(&pairs, "source_conversation").map(str::to_string),
            })
        })
        .collect();
    out.sort_by(|a, b| b.updated.cmp(&a.updated).then(a.id.cmp(&b.id)));
    out
}

/// Approve a knowledge-base draft.
///
/// The draft becomes an approved article in its product area's folder
/// (`<docs_dir>/<product_area>/<id>.md`, `status: approved`, `updated` today) and the index is
/// rebuilt and switched as `POST /v1/index/reload` does, so retrieval finds it without a restart.
/// Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/kb/{id}/approve",
    tag = "assist",
    operation_id = "approveKbDraft",
    params(("id" = String, Path, description = "The draft's id: kebab-case, at most 80 characters")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{id, status: \"approved\", path, searchable, index}`; `index` is the report of `POST /v1/index/reload` (`ReloadResponse`)", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such draft (`draft_not_found`)", body = ErrorResponse),
        (status = 409, description = "The file is not a draft or its front matter is unsound (`not_a_draft`, `draft_invalid`), the id is already approved (`id_taken`), or another process is writing the index (`index_locked`)", body = ErrorResponse),
        (status = 422, description = "`id` is not kebab-case", body = ErrorResponse),
        (status = 500, description = "Indexing or the server failed (an approved file stays in place for the next reload)", body = ErrorResponse),
        (status = 503, description = "The docs directory cannot be read or written (`docs_unreadable`, `docs_unwritable`), or the new index cannot be opened (`no_index`)", body = ErrorResponse),
    )
)]
pub async fn approve(State(state): State<SharedState>, UrlPath(id): UrlPath<String>) -> Result<Json<Value>, ApiError> {
    check_article_id(&id)?;
    let st = state.clone();
    let doc_id = id.clone();
    let path = tokio::task::spawn_blocking(move || publish(&st, &doc_id)).await.map_err(ApiError::internal)??;
    let index = super::knowledge::reindex(&state).await?;
    let searchable = state.knowledge().ok().and_then(|kb| kb.document(&id).ok().flatten()).is_some();
    Ok(Json(json!({"id": id, "status": "approved", "path": path, "searchable": searchable, "index": index})))
}

/// Moves `drafts/<id>.md` to `<product_area>/<id>.md` with `status: approved` and today's date.
/// Returns the new path relative to the docs directory.
fn publish(state: &AppState, id: &str) -> Result<String, ApiError> {
    let docs: &PathBuf = &state.config.grounding.docs_dir;
    let from = docs.join(DRAFTS_DIR).join(format!("{id}.md"));
    let text = match std::fs::read_to_string(&from) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found("draft_not_found", format!("there is no draft `{id}` (looked for {DRAFTS_DIR}/{id}.md)")))
        }
        Err(e) => return Err(ApiError::internal(format!("reading {}: {e}", from.display()))),
    };
    let Some((pairs, _)) = front_matter(&text) else {
        return Err(ApiError::conflict("draft_invalid", format!("{DRAFTS_DIR}/{id}.md has no front matter block; fix it before approving")));
    };
    match fm_get(&pairs, "status") {
        Some("draft") => {}
        other => {
            return Err(ApiError::conflict("not_a_draft", format!("{DRAFTS_DIR}/{id}.md has status {:?}, not `draft`", other.unwrap_or(""))))
        }
    }
    if fm_get(&pairs, "id") != Some(id) {
        return Err(ApiError::conflict("draft_invalid", format!("{DRAFTS_DIR}/{id}.md says `id: {}`; it must equal the file name", fm_get(&pairs, "id").unwrap_or(""))));
    }
    let area = fm_get(&pairs, "product_area").unwrap_or("");
    if !is_area(area) {
        return Err(ApiError::conflict("draft_invalid", format!("{DRAFTS_DIR}/{id}.md: `product_area` must be 1 to 64 characters of a-z 0-9 - _ (got {area:?})")));
    }
    if fm_get(&pairs, "title").is_none_or(|t| t.trim().is_empty()) {
        return Err(ApiError::conflict("draft_invalid", format!("{DRAFTS_DIR}/{id}.md has no title")));
    }
    if let Ok(kb) = state.knowledge() {
        if kb.document(id).ok().flatten().is_some() {
            return Err(ApiError::conflict("id_taken", format!("an approved article with id `{id}` is already indexed; rename the draft")));
        }
    }
    let date = today();
    let approved = set_front_matter(&text, &[("status", "approved"), ("updated", &date)]).expect("front matter checked above");
    let rel = format!("{area}/{id}.md");
    let dir = docs.join(area);
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::unavailable("docs_unwritable", format!("cannot create {}: {e}", dir.display())))?;
    let to = dir.join(format!("{id}.md"));
    match write_atomically(&to, approved.as_bytes(), false) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ApiError::conflict("id_taken", format!("{rel} already exists; rename the draft or remove that file")))
        }
        Err(e) => return Err(ApiError::unavailable("docs_unwritable", format!("cannot write {}: {e}", to.display()))),
    }
    // The draft goes once its approved copy is safely written.
    std::fs::remove_file(&from)
        .and_then(|_| sync_dir(from.parent().unwrap_or(docs)))
        .map_err(|e| ApiError::internal(format!("approved {rel} but could not remove {}: {e}", from.display())))?;
    Ok(rel)
}

/// Writes `bytes` to `path` so that a reader (the indexer, a crash) sees the old state or the whole
/// new file, never part of it: a temporary file in the same directory (a name the indexer skips),
/// synced, then moved into place, then the directory synced. With `replace` false, an existing
/// `path` is left alone and the error is `AlreadyExists` (the move is a hard link, which never
/// overwrites).
pub fn write_atomically(path: &Path, bytes: &[u8], replace: bool) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        if replace {
            std::fs::rename(&tmp, path)
        } else {
            std::fs::hard_link(&tmp, path)
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    sync_dir(dir)
}

/// Makes a directory's entries (a new, renamed or removed file) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the KB drafts whose source conversation is no longer stored (deleted with its customer
/// or purged by retention): a draft holds the customer's question verbatim. Returns how many.
pub async fn purge_orphan_drafts(docs: &Path, store: &crate::store::Store) -> Result<u64, String> {
    let dir = docs.join(DRAFTS_DIR);
    let listed = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || -> Vec<(PathBuf, String)> {
            let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .filter_map(|p| {
                    let text = std::fs::read_to_string(&p).ok()?;
                    let (pairs, _) = front_matter(&text)?;
                    let conv = fm_get(&pairs, "source_conversation")?.to_string();
                    Some((p, conv))
                })
                .collect()
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let mut removed = 0;
    for (path, conv) in listed {
        match store.conversation_head(&conv).await {
            Err(crate::store::StoreError::NotFound { .. }) => {
                std::fs::remove_file(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
                removed += 1;
            }
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if removed > 0 {
        sync_dir(&dir).map_err(|e| e.to_string())?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(19_723), "2024-01-01");
        assert_eq!(civil_date(19_782), "2024-02-29");
        assert_eq!(civil_date(20_784), "2026-11-27");
    }

    #[test]
    fn front_matter_is_updated_in_place() {
        let text = "---\nid: a-b\ntitle: \"Q: how?\"\nstatus: draft\nupdated: 2020-01-01\nproduct_area: billing\n---\n\n## Question\n\nstatus: draft\n";
        let out = set_front_matter(text, &[("status", "approved"), ("updated", "2026-11-27")]).unwrap();
        assert!(out.starts_with("---\nid: a-b\ntitle: \"Q: how?\"\nstatus: approved\nupdated: 2026-11-27\nproduct_area: billing\n---\n"), "{out}");
        // The body is untouched, even where it looks like front matter.
        assert!(out.ends_with("\n## Question\n\nstatus: draft\n"), "{out}");
        let (pairs, _) = front_matter(&out).unwrap();
        assert_eq!(fm_get(&pairs, "title"), Some("Q: how?"));
        let added = set_front_matter("---\nid: x\n---\nbody", &[("status", "approved")]).unwrap();
        assert_eq!(added, "---\nid: x\nstatus: approved\n---\nbody");
        assert!(front_matter("no front matter").is_none());
        assert!(front_matter("---\nid: x\n").is_none());
    }

    #[test]
    fn ids_are_kebab_case_and_cannot_leave_the_folder() {
        assert!(check_article_id("export-invoices-2").is_ok());
        for bad in ["", "../etc", "a/b", "A-b", "a--b", "-a", "a-", "a.md", "a b", "..", &"a".repeat(81)] {
            assert!(check_article_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(slug("How do I export my invoices to a CSV file?"), "how-export-invoices-csv-file");
        assert_eq!(slug("¿¿??"), "answer-from-support");
        assert!(check_article_id(&slug(&"word ".repeat(50))).is_ok());
    }

    #[test]
    fn questions_are_found_in_customer_text() {
        let q = questions_in("Hi there. How do I reset my password? I tried twice.\nCan you also change my email");
        assert_eq!(q, ["How do I reset my password?", "Can you also change my email"]);
        assert!(questions_in("Thanks, that worked!").is_empty());
    }

    #[test]
    fn the_case_summary_schema_names_every_field() {
        let schema: Value = serde_json::from_str(CASE_SUMMARY_SCHEMA).unwrap();
        assert_eq!(schema["$id"], CASE_SUMMARY_SCHEMA_ID);
        let example = CaseSummary { issue: "x".into(), steps: vec![], outcome: "y".into(), open_questions: vec![] };
        let keys: Vec<String> = serde_json::to_value(example).unwrap().as_object().unwrap().keys().cloned().collect();
        let required: Vec<String> = schema["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
        let mut a = keys.clone();
        a.sort();
        let mut b = required;
        b.sort();
        assert_eq!(a, b);
        assert_eq!(schema["properties"]["issue"]["maxLength"], ISSUE_CHARS);
        assert_eq!(schema["properties"]["steps"]["maxItems"], MAX_STEPS);
        assert_eq!(schema["properties"]["steps"]["items"]["maxLength"], STEP_CHARS);
        assert_eq!(schema["properties"]["outcome"]["maxLength"], OUTCOME_CHARS);
        assert_eq!(schema["properties"]["open_questions"]["maxItems"], MAX_OPEN_QUESTIONS);
        assert_eq!(schema["properties"]["open_questions"]["items"]["maxLength"], QUESTION_CHARS);
    }
}
