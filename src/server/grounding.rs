//! Grounding one chat turn: retrieve passages for the customer's latest message (with their
//! earlier messages for follow-ups), refuse without calling the model when nothing is relevant
//! enough, otherwise assemble the budgeted prompt. After generation, the citation markers the
//! model wrote become `helpline.citations`.

use std::time::Instant;

use super::dto::{
    BudgetOut, CitedBy, Dropped, FinishReason, GroundingInfo, GroundingStatus, GuardAction, GuardInfo, HandoffInfo, PassageOut, StructureInfo,
};
use super::error::ApiError;
use super::validate::{self, ValidChat, ValidGeneration};
use super::AppState;
use crate::guard::escalation::Turn;
use crate::engine::JobGuard;
use crate::guard::ActivePolicy;
use crate::prompt::{self, Budget, CitationFilter};
use crate::retrieval::{self, Passage, RetrievalError};

/// Earlier customer messages searched along with the latest one (for follow-ups).
pub const EARLIER_TURNS: usize = 2;

/// What to do with a chat turn.
pub enum ChatPlan {
    /// Run the model.
    Generate { valid: ValidGeneration, grounding: GroundingCtx },
    /// Answer with a fixed text (a refusal or a handoff); the model is not called.
    /// `finish` is `content_filter` when the policy pack refused (the text then also goes in `refusal`).
    Refuse { text: String, grounding: GroundingCtx, stream: bool, include_usage: bool, finish: FinishReason },
}

/// What travels with an answer to its final chunk.
#[derive(Debug, Clone)]
pub struct GroundingCtx {
    pub info: GroundingInfo,
    pub handoff: Option<HandoffInfo>,
    /// The passages given to the model (their text is needed to measure the answer's support).
    pub given: Vec<Passage>,
    /// What the policy pack did on this turn.
    pub guard: Option<GuardInfo>,
    /// The grammar's refusal branch, when the answer was generated under the pack: an answer that is
    /// exactly this text is reported as a policy refusal.
    pub refusal_text: Option<String>,
    /// The client asked for a structured output: the text is theirs to parse, so citation markers
    /// are neither filtered nor appended, and a refusal or handoff goes in `refusal` only.
    pub structured: bool,
}

/// The end of a grounded answer: the report, the citations, and text to append to the answer
/// (attribution markers) before the final chunk.
#[derive(Debug, Clone)]
pub struct Closing {
    pub info: GroundingInfo,
    pub citations: Option<Vec<PassageOut>>,
    pub suffix: String,
    pub guard: Option<GuardInfo>,
    /// The model took the grammar's refusal branch: the answer ends with `content_filter`.
    pub refused: bool,
}

impl GroundingCtx {
    fn off() -> Self {
        GroundingCtx {
            info: GroundingInfo {
                status: GroundingStatus::Off,
                query: None,
                index_version: None,
                passages: Vec::new(),
                dropped: Dropped::default(),
                budget: BudgetOut::default(),
                invalid_citations: 0,
                retrieval_ms: 0.0,
                support: None,
            },
            handoff: None,
            given: Vec::new(),
            guard: None,
            refusal_text: None,
            structured: false,
        }
    }

    /// A filter for the streamed text when the answer is grounded (markers are checked against the
    /// passages given); none otherwise.
    pub fn citation_filter(&self) -> Option<CitationFilter> {
        (self.info.status == GroundingStatus::Grounded && !self.structured).then(|| CitationFilter::new(self.info.passages.len()))
    }

    /// The grounding report and citations once the answer is complete. `answer` is the text sent
    /// so far (markers already filtered); `filter` the citation filter it went through.
    ///
    /// Citations are the passages the model's own markers name. When it wrote none (small models
    /// often do not), the answer is attributed to the given passages that hold most of its content
    /// words ([`prompt::attribute`]): their markers are appended to the answer and the citations say
    /// `cited_by: "attribution"`. An answer no passage supports gets no citation, and
    /// `grounding.support` shows how little of it the passages hold.
    pub fn close(&self, filter: Option<&CitationFilter>, answer: &str) -> Closing {
        let mut info = self.info.clone();
        if self.structured {
            // The client's format: nothing is appended; citations by attribution only.
            let citations = (self.info.status == GroundingStatus::Grounded).then(|| {
                let (overall, each) = prompt::support(answer, &self.given);
                info.support = Some(overall);
                self.cite(&prompt::attribute(&each), CitedBy::Attribution)
            });
            let citations = citations.or_else(|| (self.info.status == GroundingStatus::NoRelevantDocs).then(Vec::new));
            return Closing { info, citations, suffix: String::new(), guard: self.guard.clone(), refused: false };
        }
        let refused = self.refusal_text.as_deref().is_some_and(|r| !answer.trim().is_empty() && r.trim() == answer.trim());
        if refused {
            let guard = self.guard.clone().map(|g| GuardInfo {
                action: GuardAction::Refusal,
                reason: Some("policy_refusal".into()),
                rules: vec!["refusal-branch".into()],
                ..g
            });
            return Closing { info, citations: Some(Vec::new()), suffix: String::new(), guard, refused };
        }
        let Some(f) = filter.filter(|_| self.info.status == GroundingStatus::Grounded) else {
            let citations = matches!(self.info.status, GroundingStatus::Grounded | GroundingStatus::NoRelevantDocs).then(Vec::new);
            return Closing { info, citations, suffix: String::new(), guard: self.guard.clone(), refused };
        };
        info.invalid_citations = f.invalid();
        let (overall, each) = prompt::support(answer, &self.given);
        info.support = Some(overall);
        let (numbers, by, suffix) = if f.cited().is_empty() {
            let attributed = prompt::attribute(&each);
            let suffix: String = attributed.iter().map(|n| format!(" [{n}]")).collect();
            (attributed, CitedBy::Attribution, suffix)
        } else {
            (f.cited().to_vec(), CitedBy::Model, String::new())
        };
        let citations = self.cite(&numbers, by);
        Closing { info, citations: Some(citations), suffix, guard: self.guard.clone(), refused }
    }

    /// The given passages with these markers.
    fn cite(&self, numbers: &[usize], by: CitedBy) -> Vec<PassageOut> {
        numbers
            .iter()
            .filter_map(|n| self.info.passages.get(n - 1).cloned())
            .map(|mut p| {
                p.cited_by = Some(by);
                p
            })
            .collect()
    }

    pub fn status_label(&self) -> &'static str {
        match self.info.status {
            GroundingStatus::Grounded => "grounded",
            GroundingStatus::NoRelevantDocs => "no_relevant_docs",
            GroundingStatus::Off => "off",
            GroundingStatus::Skipped => "skipped",
        }
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
        url: passage_url(p),
        text: with_text.then(|| p.text.clone()),
        cited_by: None,
    }
}

pub fn retrieval_error(e: RetrievalError) -> ApiError {
    match e {
        RetrievalError::NoIndex { .. } => ApiError::unavailable("no_index", e.to_string()),
        other => ApiError::internal(other),
    }
}

/// Decides a chat turn (runs on a blocking thread: retrieval and tokenizing are CPU work).
pub fn plan(state: &AppState, chat: ValidChat) -> Result<ChatPlan, ApiError> {
    let policy = state.policy()?;
    let structured = chat.structured.clone();
    if let Some(mut answer) = policy_answer(state, &policy, &chat) {
        if let ChatPlan::Refuse { grounding, .. } = &mut answer {
            grounding.structured = structured.is_some();
        }
        return Ok(answer);
    }
    let quote = chat.quote;
    let mut plan = plan_grounded(state, chat)?;
    let mut info = GuardInfo {
        policy_version: policy.pack.version.clone(),
        action: GuardAction::None,
        rules: Vec::new(),
        reason: None,
        grammar_hash: None,
        constrained_by: Vec::new(),
        quote_mode: false,
        structure: None,
    };
    match &mut plan {
        ChatPlan::Generate { valid, grounding } if structured.is_some() => {
            let s = structured.as_ref().expect("checked by the guard");
            let loaded = state.loaded()?;
            // The client's constraint, the pack's forbidden phrases and its bounds, all enforced per token.
            let guarded = policy
                .structured_guard(&loaded.guard, &s.guard, s.json)
                .map_err(|e| ApiError::internal(format!("the policy grammar does not compile: {e}")))?;
            let mut matcher = guarded.matcher;
            if matcher.mask().map_or(true, |m| m.is_zero()) {
                return Err(ApiError::bad_request(
                    "grammar_conflicts_with_policy",
                    "the requested output format and the policy pack together allow no output; change the format",
                ));
            }
            grounding.structured = true;
            grounding.refusal_text = Some(policy.pack.messages.refusal.clone());
            info.grammar_hash = Some(guarded.hash);
            info.constrained_by = policy.decode_rules();
            info.constrained_by.push(s.kind.to_string());
            info.structure = Some(StructureInfo { kind: s.kind.to_string(), hash: s.guard.hash().to_string() });
            valid.job.guard = Some(JobGuard(Box::new(matcher)));
            grounding.guard = Some(info);
        }
        ChatPlan::Generate { valid, grounding } => {
            let loaded = state.loaded()?;
            let quoting = quote && grounding.info.status == GroundingStatus::Grounded;
            let compiled = if quoting {
                let passages = grounding.given.iter().map(|p| p.text.clone()).collect();
                policy.quote_guard(&loaded.guard, passages)
            } else {
                policy.answer_guard(&loaded.guard, grounding.info.passages.len())
            };
            // Fail closed: a grammar that does not compile is a 500, never an unconstrained answer.
            let guard = compiled.map_err(|e| ApiError::internal(format!("the policy grammar does not compile: {e}")))?;
            info.quote_mode = quoting;
            grounding.refusal_text = Some(policy.pack.messages.refusal.clone());
            info.grammar_hash = Some(guard.hash);
            info.constrained_by = policy.decode_rules();
            info.constrained_by.push("citations".into());
            if quoting {
                // Sentences are the docs' own and connectives fixed: bounds hold by construction.
                info.constrained_by.retain(|r| !policy.pack.bounds.iter().any(|b| &b.id == r));
                info.constrained_by.push("quote".into());
            }
            valid.job.guard = Some(JobGuard(Box::new(guard.matcher)));
            grounding.guard = Some(info);
        }
        ChatPlan::Refuse { grounding, .. } => {
            grounding.guard = Some(info);
            grounding.structured = structured.is_some();
        }
    }
    Ok(plan)
}

/// The policy pack's own answer to the turn, if it has one: a handoff when an escalation trigger
/// fires on the customer's messages, a refusal when the latest message is on an out-of-scope topic.
/// Decided from the pack alone; neither retrieval nor the model runs.
fn policy_answer(state: &AppState, policy: &ActivePolicy, chat: &ValidChat) -> Option<ChatPlan> {
    let pack = &policy.pack;
    let turns: Vec<Turn<'_>> = chat
        .messages
        .iter()
        .filter(|m| m.role == "user" || m.role == "assistant")
        .map(|m| Turn { from_customer: m.role == "user", text: &m.content })
        .collect();
    let latest = turns.last().filter(|t| t.from_customer)?;
    let refusals = [pack.messages.refusal.trim(), state.config.grounding.refusal_message.trim()];
    let is_refusal = |t: &str| refusals.contains(&t.trim()) || pack.out_of_scope.iter().any(|r| r.reply.trim() == t.trim());
    let (text, fired, action, finish) = if let Some(fired) = policy.triggers.escalation(&turns, &is_refusal) {
        (pack.messages.handoff.clone(), fired, GuardAction::Handoff, FinishReason::Stop)
    } else if let Some((fired, reply)) = policy.triggers.out_of_scope(latest.text) {
        (reply.to_string(), fired, GuardAction::Refusal, FinishReason::ContentFilter)
    } else {
        return None;
    };
    state.metrics.guard_rule(&fired.rule, action_label(action));
    let mut ctx = GroundingCtx::off();
    ctx.info.status = GroundingStatus::Skipped;
    if action == GuardAction::Handoff {
        ctx.handoff = Some(HandoffInfo { offered: true, reason: fired.reason.clone(), message: pack.messages.handoff.clone(), summary: None });
    }
    ctx.guard = Some(GuardInfo {
        policy_version: pack.version.clone(),
        action,
        rules: vec![fired.rule],
        reason: Some(fired.reason),
        grammar_hash: None,
        constrained_by: Vec::new(),
        quote_mode: false,
        structure: None,
    });
    Some(ChatPlan::Refuse { text, grounding: ctx, stream: chat.sampling.stream, include_usage: chat.sampling.include_usage, finish })
}

fn action_label(a: GuardAction) -> &'static str {
    match a {
        GuardAction::None => "none",
        GuardAction::Handoff => "handoff",
        GuardAction::Refusal => "refusal",
    }
}

/// Retrieval, the relevance gate and the budgeted prompt (or the plain prompt when grounding is off).
fn plan_grounded(state: &AppState, chat: ValidChat) -> Result<ChatPlan, ApiError> {
    let loaded = state.loaded()?;
    let cfg = &state.config;
    let Some(filters) = chat.grounding else {
        let valid = validate::chat_generation(&chat.messages, chat.sampling, cfg, loaded)?;
        state.metrics.grounding("off");
        return Ok(ChatPlan::Generate { valid, grounding: GroundingCtx::off() });
    };
    let kb = state.knowledge()?;
    let g = &cfg.grounding;

    // Validation guarantees the last message is the customer's.
    let (latest, history) = chat.messages.split_last().ok_or_else(|| ApiError::invalid_field("messages", "`messages` is empty"))?;
    let earlier: Vec<&str> = history.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    let earlier = &earlier[earlier.len().saturating_sub(EARLIER_TURNS)..];

    let started = Instant::now();
    let passages = kb.search_turn(&latest.content, earlier, g.passages, &filters).map_err(retrieval_error)?;
    let retrieval_secs = started.elapsed().as_secs_f64();
    state.metrics.observe_retrieval(retrieval_secs);

    let mut query = earlier.join(" / ");
    if !query.is_empty() {
        query.push_str(" / ");
    }
    query.push_str(&latest.content);
    let mut info = GroundingInfo {
        status: GroundingStatus::Grounded,
        query: Some(query),
        index_version: Some(kb.version()),
        passages: Vec::new(),
        dropped: Dropped::default(),
        budget: BudgetOut { passage_tokens: g.passage_tokens, history_tokens: g.history_tokens, ..BudgetOut::default() },
        invalid_citations: 0,
        retrieval_ms: retrieval_secs * 1e3,
        support: None,
    };

    // The turn is refused without the model: nothing relevant, or nothing that fits the budget.
    let refuse = |mut info: GroundingInfo, reason: &str| {
        state.metrics.grounding("no_relevant_docs");
        info.status = GroundingStatus::NoRelevantDocs;
        let handoff = HandoffInfo { offered: true, reason: reason.into(), message: g.handoff_message.clone(), summary: None };
        ChatPlan::Refuse {
            text: g.refusal_message.clone(),
            grounding: GroundingCtx { info, handoff: Some(handoff), given: Vec::new(), guard: None, refusal_text: None, structured: false },
            stream: chat.sampling.stream,
            include_usage: chat.sampling.include_usage,
            finish: FinishReason::Stop,
        }
    };
    if !retrieval::is_relevant(&passages, g.min_relevance) {
        return Ok(refuse(info, "no_relevant_docs"));
    }

    let tok = &loaded.bundle.tokenizer;
    // A tokenizer failure would only make the count wrong; the real prompt is checked against the context below.
    let count = |text: &str| tok.encode(text, false).map(|ids| ids.len()).unwrap_or(text.len());
    let budget = Budget { passage_tokens: g.passage_tokens, history_tokens: g.history_tokens };
    let built = prompt::build(&passages, history, latest, budget, &count);
    if built.given.is_empty() {
        // Every relevant passage is longer than the whole passage budget: answering without them
        // would be ungrounded, so this is a refusal too, with its own reason.
        info.dropped.passages = built.dropped_passages.iter().map(|d| d.chunk_id.clone()).collect();
        return Ok(refuse(info, "passages_over_budget"));
    }
    info.passages = built.given.iter().enumerate().map(|(i, p)| passage_out(p, Some(i + 1), false)).collect();
    info.dropped = Dropped {
        passages: built.dropped_passages.iter().map(|d| d.chunk_id.clone()).collect(),
        history_messages: built.dropped_history,
    };
    info.budget.passage_tokens_used = built.passage_tokens;
    info.budget.history_tokens_used = built.history_tokens;
    let valid = validate::chat_generation(&built.messages, chat.sampling, cfg, loaded)?;
    state.metrics.grounding("grounded");
    Ok(ChatPlan::Generate { valid, grounding: GroundingCtx { info, handoff: None, given: built.given, guard: None, refusal_text: None, structured: false } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guarded(refusal: &str) -> GroundingCtx {
        let mut ctx = GroundingCtx::off();
        ctx.guard = Some(GuardInfo {
            policy_version: "v".into(),
            action: GuardAction::None,
            rules: Vec::new(),
            reason: None,
            grammar_hash: Some("h".into()),
            constrained_by: vec!["x".into()],
            quote_mode: false,
            structure: None,
        });
        ctx.refusal_text = Some(refusal.into());
        ctx
    }

    #[test]
    fn an_answer_that_is_the_refusal_branch_is_reported_as_a_policy_refusal() {
        let ctx = guarded("I can't help with that.");
        let c = ctx.close(None, " I can't help with that.\n");
        assert!(c.refused);
        let g = c.guard.unwrap();
        assert_eq!(g.action, GuardAction::Refusal);
        assert_eq!(g.reason.as_deref(), Some("policy_refusal"));
        let c = ctx.close(None, "Sure, here is how.");
        assert!(!c.refused);
        assert_eq!(c.guard.unwrap().action, GuardAction::None);
        assert!(!ctx.close(None, "").refused, "an empty answer is not a refusal");
    }
}
