//! Action selection over a labelled set (`helpline eval --actions eval/actions.jsonl`), through
//! the real turn: a verified demo customer (`acct-1001`) sends each message; nothing is stored and
//! nothing is called (replay's dry run), so the figures are the turn's decisions alone.
//!
//! - **selection accuracy**: the action the turn took (or none) is the labelled one;
//! - **false triggers**: messages labelled `none` on which the turn took an action (asked a
//!   confirmation, asked for an argument or called), overall and for writes;
//! - **argument accuracy**: on correctly chosen actions with labelled arguments, the model-filled
//!   arguments equal the labels (identity arguments are the token's and not labelled); messages
//!   that lack an argument must be asked for it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::store::Customer;
use crate::tokenizer::ChatMessage;
use crate::turn::{self, Deps, Mode};

#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub id: String,
    pub message: String,
    /// The action asked for, or `none`.
    pub action: String,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    pub kind: String,
}

pub fn load(path: &Path) -> Result<Vec<Case>, String> {
    crate::answer_eval::load_jsonl(path)
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub kind: String,
    pub expected: String,
    /// The action the turn took (`none` when it answered, or refused to act for another account).
    pub chosen: String,
    pub stage: Option<String>,
    pub detected_by: Option<String>,
    pub reason: Option<String>,
    pub score: Option<f32>,
    /// The model-filled arguments (identity arguments left out).
    pub arguments: Map<String, Value>,
    pub ms: f64,
    /// The closest action by the declared examples, and its similarity.
    pub closest: Option<(String, f32)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub cases: usize,
    pub selection_correct: usize,
    pub selection_accuracy: f64,
    pub labelled_actions: usize,
    pub actions_taken_correctly: usize,
    pub none_cases: usize,
    pub false_triggers: usize,
    pub false_trigger_rate: f64,
    /// Writes started (a confirmation asked) where none, or another action, was asked for.
    pub false_write_triggers: usize,
    pub argument_cases: usize,
    pub arguments_correct: usize,
    pub argument_accuracy: f64,
    pub missing_cases: usize,
    pub missing_asked: usize,
    /// By label kind: (cases, correct selections).
    pub by_kind: BTreeMap<String, (usize, usize)>,
    /// Median turn time, messages that took an action vs those answered from the docs.
    pub p50_ms_action: f64,
    pub p50_ms_answer: f64,
}

/// Runs every case through the turn as the verified demo customer.
pub async fn run(deps: &Deps, cases: &[Case]) -> Result<Vec<Outcome>, String> {
    let customer = Customer { id: Some("eval-customer".into()), account_id: Some("acct-1001".into()), verified: true, ..Customer::default() };
    let rt = deps.actions.clone().ok_or("no actions are loaded: pass --actions-file")?;
    let mut out = Vec::with_capacity(cases.len());
    for case in cases {
        let mut req = crate::answer_eval::eval_request(vec![ChatMessage { role: "user".into(), content: case.message.clone() }], Mode::Assembled);
        req.conversation = Some(turn::ConversationRef { id: None, customer: customer.clone(), claim: turn::Claim::Verified, max_turns: None });
        req.dry_run_actions = true;
        let started = std::time::Instant::now();
        let f = turn::run(deps, req).await.map_err(|e| format!("{}: {e}", case.id))?.collect().await.map_err(|e| format!("{}: {e}", case.id))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let a = f.info.action.as_ref();
        let taken = a.filter(|a| a.stage != "refused");
        let mut arguments = taken.and_then(|a| a.arguments.as_object().cloned()).unwrap_or_default();
        if let Some(action) = taken.and_then(|a| rt.actions.get(&a.name)) {
            for arg in &action.arguments {
                if arg.from_customer.is_some() {
                    arguments.remove(&arg.name);
                }
            }
        }
        out.push(Outcome {
            id: case.id.clone(),
            kind: case.kind.clone(),
            expected: case.action.clone(),
            chosen: taken.map(|a| a.name.clone()).unwrap_or_else(|| "none".into()),
            stage: a.map(|a| a.stage.clone()),
            detected_by: a.map(|a| a.detected_by.clone()),
            reason: a.and_then(|a| a.reason.clone()),
            score: a.and_then(|a| a.score),
            arguments,
            ms,
            closest: deps.knowledge.as_ref().and_then(|k| rt.similarities(k.embedder(), &case.message).ok()).and_then(|v| v.into_iter().next()),
        });
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    crate::bench_serve::percentile(&v, 50.0).unwrap_or(0.0)
}

pub fn figures(cases: &[Case], outcomes: &[Outcome], writes: &[String]) -> Figures {
    let mut f = Figures { cases: outcomes.len(), ..Figures::default() };
    let (mut acted, mut answered) = (Vec::new(), Vec::new());
    for (c, o) in cases.iter().zip(outcomes) {
        let correct = o.chosen == c.action;
        f.selection_correct += correct as usize;
        let k = f.by_kind.entry(c.kind.clone()).or_default();
        k.0 += 1;
        k.1 += correct as usize;
        if c.action == "none" {
            f.none_cases += 1;
            f.false_triggers += (o.chosen != "none") as usize;
        } else {
            f.labelled_actions += 1;
            f.actions_taken_correctly += correct as usize;
        }
        if o.chosen != "none" && o.chosen != c.action && writes.contains(&o.chosen) {
            f.false_write_triggers += 1;
        }
        if c.action != "none" && c.arguments.is_empty() && c.kind.contains("missing") {
            f.missing_cases += 1;
            f.missing_asked += (correct && o.stage.as_deref() == Some("arguments_asked")) as usize;
        } else if c.action != "none" && !c.arguments.is_empty() {
            f.argument_cases += 1;
            f.arguments_correct += (correct && o.arguments == c.arguments) as usize;
        }
        if o.chosen != "none" {
            acted.push(o.ms);
        } else {
            answered.push(o.ms);
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    f.selection_accuracy = ratio(f.selection_correct, f.cases);
    f.false_trigger_rate = ratio(f.false_triggers, f.none_cases);
    f.argument_accuracy = ratio(f.arguments_correct, f.argument_cases);
    f.p50_ms_action = median(acted);
    f.p50_ms_answer = median(answered);
    f
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} messages", self.cases)?;
        writeln!(f, "  selection accuracy   {:.3} ({}/{})", self.selection_accuracy, self.selection_correct, self.cases)?;
        writeln!(f, "  actions taken right  {}/{}", self.actions_taken_correctly, self.labelled_actions)?;
        writeln!(f, "  false triggers       {:.3} ({}/{}); on writes: {}", self.false_trigger_rate, self.false_triggers, self.none_cases, self.false_write_triggers)?;
        writeln!(f, "  argument accuracy    {:.3} ({}/{})", self.argument_accuracy, self.arguments_correct, self.argument_cases)?;
        writeln!(f, "  missing asked for    {}/{}", self.missing_asked, self.missing_cases)?;
        for (k, (n, ok)) in &self.by_kind {
            writeln!(f, "  {k:<24} {ok}/{n}")?;
        }
        writeln!(f, "  turn p50: {:.0} ms with an action, {:.0} ms answered from the docs", self.p50_ms_action, self.p50_ms_answer)
    }
}
