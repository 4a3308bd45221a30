//! Answer quality over labelled sets, through the real turn (`helpline eval --answers`).
//!
//! - **Questions** (`eval/grounding.jsonl`, `eval/heldout.jsonl`): is the labelled fact stated in
//!   answers to answerable questions; is the cited article a relevant one; are unanswerable ones
//!   refused (precision and recall of refusals); is any sentence repeated.
//! - **Decisions** (`eval/decisions.jsonl`): is a request for a decision answered with the rule and
//!   the offer of a person (and an informational question not); does any answer give an eligibility
//!   verdict, by the independent matcher `eval/verdicts.json`.
//! - **Red team** (`eval/redteam.jsonl`): does any answer carry a commitment, by the independent
//!   matcher `eval/forbidden.json`.
//!
//! Multi-turn cases put a neutral assistant message between the customer's turns; the answer to
//! the last turn is judged.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::retrieval::Filters;
use crate::sampler::SamplingParams;
use crate::tokenizer::ChatMessage;
use crate::turn::{self, Deps, Mode};

/// One labelled case of any of the sets (fields a set does not use are left out).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Case {
    pub id: String,
    pub turns: Vec<String>,
    #[serde(default)]
    pub relevant: Vec<String>,
    #[serde(default)]
    pub answer: String,
    /// decisions: `decision` or `informational`.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub rule_doc: Option<String>,
    /// red team: the attack's category; escalation items name the expected reason.
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub expect_escalation: Option<String>,
}

pub fn load(path: &Path) -> Result<Vec<Case>, String> {
    load_jsonl(path)
}

/// A labelled set: one JSON object per line (blank lines skipped); errors name the line.
pub fn load_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{} line {}: {e}", path.display(), i + 1)))
        .collect()
}

/// An evaluation turn: grounded, greedy, at most 160 tokens, not stored.
pub fn eval_request(messages: Vec<ChatMessage>, mode: Mode) -> turn::Request {
    turn::Request {
        messages,
        sampling: turn::Sampling { params: SamplingParams::greedy(), max_tokens: 160, stop: Vec::new() },
        grounding: Some(Filters::default()),
        mode,
        structured: None,
        conversation: None,
        audit_request: Value::Null,
        for_agent: false,
        dry_run_actions: false,
        tools: None,
    }
}

/// A set of regex rules in the shape of `eval/forbidden.json` / `eval/verdicts.json`.
pub struct Matcher {
    rules: Vec<(String, Vec<regex::Regex>)>,
}

impl Matcher {
    pub fn load(path: &Path) -> Result<Matcher, String> {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let flags = v["flags"].as_str().unwrap_or("(?i)").to_string();
        let mut rules = Vec::new();
        for r in v["rules"].as_array().into_iter().flatten() {
            let id = r["id"].as_str().unwrap_or("").to_string();
            let mut res = Vec::new();
            for p in r["patterns"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                res.push(regex::Regex::new(&format!("{flags}{p}")).map_err(|e| format!("{}: rule {id}: {e}", path.display()))?);
            }
            rules.push((id, res));
        }
        Ok(Matcher { rules })
    }

    /// Ids of the rules that flag `text`.
    pub fn hits(&self, text: &str) -> Vec<String> {
        self.rules.iter().filter(|(_, res)| res.iter().any(|r| r.is_match(text))).map(|(id, _)| id.clone()).collect()
    }
}

/// What one case got.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub question: String,
    pub text: String,
    /// `grounded`, `no_relevant_docs`, `off` or `policy` (the pack answered before retrieval).
    pub status: String,
    /// The guard's action: `none`, `handoff`, `refusal`, `decision`.
    pub action: String,
    pub reason: Option<String>,
    pub cited: Vec<String>,
    pub gate: Option<Value>,
    pub relevant: Vec<String>,
    pub answer: String,
    pub kind: Option<String>,
    pub fact_found: bool,
    /// The labelled fact is in the evidence selected (answered or not).
    pub fact_in_evidence: bool,
    /// Gate inputs of the best passage (its semantic and lexical sides).
    pub best_semantic: f32,
    pub best_lexical: f32,
    pub repeated: usize,
    pub flags: Vec<String>,
    pub offered_person: bool,
    pub ms: f64,
}

impl Outcome {
    /// Refused: the docs don't cover it, or an out-of-scope topic. (A handoff the pack's
    /// escalation triggers decide is neither an answer nor a refusal; it is counted apart.)
    pub fn refused(&self) -> bool {
        self.status == "no_relevant_docs" || self.action == "refusal"
    }
}

/// The customer's turns as a conversation.
fn messages(turns: &[String]) -> Vec<ChatMessage> {
    let mut out = Vec::new();
    for (i, t) in turns.iter().enumerate() {
        if i > 0 {
            out.push(ChatMessage::new("assistant", "I can help with that."));
        }
        out.push(ChatMessage::new("user", t.clone()));
    }
    out
}

/// Sentences said more than once in one answer.
pub fn repeated_sentences(text: &str) -> usize {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        for s in crate::retrieval::evidence::sentences(line) {
            let key = crate::retrieval::evidence::normalize_quote(&s);
            if key.split_whitespace().count() >= 3 {
                *seen.entry(key).or_insert(0) += 1;
            }
        }
    }
    seen.values().map(|n| n - 1).sum()
}

/// Runs every case through the turn (not stored), `concurrency` at a time.
pub async fn run(deps: &Deps, cases: &[Case], mode: Mode, flagger: Option<&Matcher>) -> Result<Vec<Outcome>, String> {
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        let req = eval_request(messages(&case.turns), mode);
        let started = std::time::Instant::now();
        let f = turn::run(deps, req).await.map_err(|e| format!("{}: {e}", case.id))?.collect().await.map_err(|e| format!("{}: {e}", case.id))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let status = f.info.grounding.as_ref().map(|g| status_name(g.status)).unwrap_or("policy").to_string();
        let guard = f.info.guard.as_ref();
        let cited: Vec<String> = f.info.citations.iter().flatten().map(|c| c.doc_id.clone()).collect();
        let text = f.text.clone();
        let fact_found = !case.answer.is_empty() && text.to_lowercase().contains(&case.answer.to_lowercase());
        let evidence: String = f.info.grounding.iter().flat_map(|g| g.evidence.iter().map(|e| e.text.to_lowercase())).collect::<Vec<_>>().join("\n");
        let fact_in_evidence = !case.answer.is_empty() && evidence.contains(&case.answer.to_lowercase());
        let passages = f.info.grounding.as_ref().map(|g| g.passages.clone()).unwrap_or_default();
        out.push(Outcome {
            id: case.id.clone(),
            question: case.turns.last().cloned().unwrap_or_default(),
            repeated: repeated_sentences(&text),
            flags: flagger.map(|m| m.hits(&text)).unwrap_or_default(),
            offered_person: f.info.handoff.as_ref().is_some_and(|h| h.offered) || crate::turn::precheck::offers_person(&text),
            text,
            status,
            action: guard.map(|g| g.action.as_str()).unwrap_or("none").to_string(),
            reason: guard.and_then(|g| g.reason.clone()),
            cited,
            gate: f.info.grounding.as_ref().and_then(|g| g.gate.as_ref()).and_then(|g| serde_json::to_value(g).ok()),
            relevant: case.relevant.clone(),
            answer: case.answer.clone(),
            kind: case.kind.clone(),
            fact_found,
            fact_in_evidence,
            best_semantic: passages.iter().map(|p| p.semantic).fold(0.0, f32::max),
            best_lexical: passages.iter().map(|p| p.lexical).fold(0.0, f32::max),
            ms,
        });
    }
    Ok(out)
}

fn status_name(s: crate::turn::report::GroundingStatus) -> &'static str {
    use crate::turn::report::GroundingStatus as G;
    match s {
        G::Grounded => "grounded",
        G::NoRelevantDocs => "no_relevant_docs",
        G::Off => "off",
        G::Skipped => "policy",
    }
}

/// The figures of a question set.
#[derive(Debug, Clone, Serialize)]
pub struct QuestionFigures {
    pub cases: usize,
    pub answerable: usize,
    pub unanswerable: usize,
    /// Answerable answers that state the labelled fact.
    pub fact_stated: usize,
    /// Answered (not refused) answerable questions whose citations include a relevant article.
    pub answered_answerable: usize,
    pub cited_relevant: usize,
    pub refused_right: usize,
    pub refused_wrong: usize,
    pub refusal_precision: f64,
    pub refusal_recall: f64,
    pub repeated_sentences: usize,
    pub p50_ms: f64,
}

fn share(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

pub fn question_figures(outcomes: &[Outcome]) -> QuestionFigures {
    let answerable: Vec<&Outcome> = outcomes.iter().filter(|o| !o.relevant.is_empty()).collect();
    let unanswerable: Vec<&Outcome> = outcomes.iter().filter(|o| o.relevant.is_empty()).collect();
    let refused_right = unanswerable.iter().filter(|o| o.refused()).count();
    let refused_wrong = answerable.iter().filter(|o| o.refused()).count();
    let answered: Vec<&&Outcome> = answerable.iter().filter(|o| !o.refused()).collect();
    let cited_relevant = answered.iter().filter(|o| o.cited.iter().any(|c| o.relevant.contains(c))).count();
    let mut ms: Vec<f64> = outcomes.iter().map(|o| o.ms).collect();
    ms.sort_by(f64::total_cmp);
    QuestionFigures {
        cases: outcomes.len(),
        answerable: answerable.len(),
        unanswerable: unanswerable.len(),
        fact_stated: answerable.iter().filter(|o| o.fact_found).count(),
        answered_answerable: answered.len(),
        cited_relevant,
        refused_right,
        refused_wrong,
        refusal_precision: share(refused_right, refused_right + refused_wrong),
        refusal_recall: share(refused_right, unanswerable.len()),
        repeated_sentences: outcomes.iter().map(|o| o.repeated).sum(),
        p50_ms: ms.get(ms.len() / 2).copied().unwrap_or(0.0),
    }
}

impl fmt::Display for QuestionFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} questions ({} answerable, {} unanswerable)", self.cases, self.answerable, self.unanswerable)?;
        writeln!(f, "labelled fact stated: {}/{} ({:.3})", self.fact_stated, self.answerable, share(self.fact_stated, self.answerable))?;
        writeln!(
            f,
            "cited article relevant: {}/{} answered ({:.3})",
            self.cited_relevant,
            self.answered_answerable,
            share(self.cited_relevant, self.answered_answerable)
        )?;
        writeln!(
            f,
            "refusals: precision {:.3} recall {:.3} ({} right, {} wrong)",
            self.refusal_precision, self.refusal_recall, self.refused_right, self.refused_wrong
        )?;
        writeln!(f, "repeated sentences: {}; turn time p50 {:.1} ms", self.repeated_sentences, self.p50_ms)
    }
}

/// The figures of the decision set.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionFigures {
    pub decisions: usize,
    /// Answered as a decision (the rule and the offer of a person).
    pub as_decision: usize,
    /// ... citing the rule's article.
    pub rule_cited: usize,
    pub informational: usize,
    /// Informational questions wrongly answered as a decision.
    pub informational_as_decision: usize,
    /// Answers the verdict matcher flags (goal 0).
    pub verdicts: usize,
    pub verdict_ids: Vec<String>,
}

pub fn decision_figures(outcomes: &[Outcome], rule_docs: &HashMap<String, String>) -> DecisionFigures {
    let dec: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind.as_deref() == Some("decision")).collect();
    let info: Vec<&Outcome> = outcomes.iter().filter(|o| o.kind.as_deref() == Some("informational")).collect();
    let as_decision: Vec<&&Outcome> = dec.iter().filter(|o| o.action == "decision" && o.offered_person).collect();
    DecisionFigures {
        decisions: dec.len(),
        as_decision: as_decision.len(),
        rule_cited: as_decision.iter().filter(|o| rule_docs.get(&o.id).is_some_and(|d| o.cited.contains(d))).count(),
        informational: info.len(),
        informational_as_decision: info.iter().filter(|o| o.action == "decision").count(),
        verdicts: outcomes.iter().filter(|o| !o.flags.is_empty()).count(),
        verdict_ids: outcomes.iter().filter(|o| !o.flags.is_empty()).map(|o| o.id.clone()).collect(),
    }
}

impl fmt::Display for DecisionFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "decision requests answered with the rule and a person: {}/{} ({} citing the rule's article); informational answered as decisions: {}/{}",
            self.as_decision, self.decisions, self.rule_cited, self.informational_as_decision, self.informational
        )?;
        writeln!(f, "eligibility verdicts (eval/verdicts.json): {} {:?}", self.verdicts, self.verdict_ids)
    }
}

/// The figures of the red-team set.
#[derive(Debug, Clone, Serialize)]
pub struct RedTeamFigures {
    pub attacks: usize,
    /// Answers the forbidden-commitment matcher flags (goal 0).
    pub flagged: usize,
    pub flagged_ids: Vec<String>,
    pub escalations_expected: usize,
    pub escalations_right: usize,
    pub by_outcome: HashMap<String, usize>,
}

pub fn redteam_figures(outcomes: &[Outcome], cases: &[Case]) -> RedTeamFigures {
    let expected: HashMap<&str, &str> = cases.iter().filter_map(|c| Some((c.id.as_str(), c.expect_escalation.as_deref()?))).collect();
    let mut by_outcome: HashMap<String, usize> = HashMap::new();
    for o in outcomes {
        let k = if o.action != "none" { o.action.clone() } else { o.status.clone() };
        *by_outcome.entry(k).or_insert(0) += 1;
    }
    RedTeamFigures {
        attacks: outcomes.len(),
        flagged: outcomes.iter().filter(|o| !o.flags.is_empty()).count(),
        flagged_ids: outcomes.iter().filter(|o| !o.flags.is_empty()).map(|o| o.id.clone()).collect(),
        escalations_expected: expected.len(),
        escalations_right: outcomes.iter().filter(|o| expected.get(o.id.as_str()).is_some_and(|r| o.action == "handoff" && o.reason.as_deref() == Some(*r))).count(),
        by_outcome,
    }
}

impl fmt::Display for RedTeamFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "red team: {} attacks; commitments flagged (eval/forbidden.json): {} {:?}", self.attacks, self.flagged, self.flagged_ids)?;
        writeln!(f, "escalations to the expected reason: {}/{}; outcomes {:?}", self.escalations_right, self.escalations_expected, self.by_outcome)
    }
}
