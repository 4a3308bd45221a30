//! Actions in the turn: the customer asks the bot to do something the operator declared
//! (`actions.toml`), and the bot does it for the verified customer's own account.
//!
//! In order:
//! 1. a pending question of the previous answer is settled first: a confirmation the customer
//!    answers yes or no, or a missing argument the message now gives;
//! 2. otherwise the message's intent: the declared triggers ([`crate::actions::intent`]), then the
//!    model's choice under a grammar over the close candidates and `none`;
//! 3. identity arguments from the verified token, never from the message or the model; the rest
//!    from the conversation (values it states, chosen by the model under a grammar when several
//!    fit), asked for when missing;
//! 4. a write asks its confirmation question and runs only on a yes;
//! 5. the backend call (timeout, retries for reads only, a rate limit per customer and action);
//! 6. the result through the operator's template; a failure hands the conversation to a person
//!    with the reason.
//!
//! Every step is reported in the answer's `helpline.action` and kept in the audit record, with
//! the request as sent minus its secrets. Replays run with `dry_run`: nothing is called, and the
//! report says what would have been.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{json, Map, Value};

use super::report::{ActionCall, ActionInfo};
use super::{Deps, Request, TurnError};
use crate::actions::intent::{self, Detected, NotAsked, Reply};
use crate::actions::{Action, Actions, Claim, Effect};
use crate::engine::{Event, Job, JobGuard};
use crate::guard::grammar::Constraint;
use crate::sampler::SamplingParams;
use crate::store::{Customer, Role, Store, Turn};
use crate::tokenizer::ChatMessage;

/// How long a question the bot asked (a confirmation, a missing argument) stays open.
pub const PENDING_FOR: Duration = Duration::from_secs(15 * 60);
/// The most bytes of a backend's answer read.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Said to a customer who is not signed in, for an action that needs them to be.
pub const SIGN_IN_TEXT: &str = "I can do that once you are signed in: please sign in to your account and ask me again.";
/// Said when the message is about someone else's account.
pub const OTHER_ACCOUNT_TEXT: &str = "I can only look up or change the account you are signed in with, not anyone else's. The account holder can ask us themselves.";
/// Said when a write is declined.
pub const DECLINED_TEXT: &str = "All right, I haven't changed anything.";
/// Said over the rate limit.
pub const RATE_LIMITED_TEXT: &str = "You have asked for this several times in the last hour, so to keep your account safe I can't do it again right now.";

/// The declared actions, loaded and ready: their examples embedded, the per-customer counts.
pub struct Runtime {
    pub actions: Actions,
    /// Where they were read from (reported by the status route).
    pub source: String,
    matcher: intent::Matcher,
    /// Calls per (customer, action) in the last hour.
    calls: Mutex<HashMap<(String, String), VecDeque<Instant>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("source", &self.source).field("actions", &self.actions.actions.len()).finish()
    }
}

impl Runtime {
    /// Readies `actions`: every backend must be plain `http://` (TLS is not spoken yet: put a
    /// local TLS-terminating proxy in front), and the examples are embedded with `embedder`.
    pub fn new(actions: Actions, source: String, embedder: &crate::embed::Embedder) -> Result<Runtime, String> {
        for a in &actions.actions {
            let probe = a.url.render(|_| Some("x".into())).unwrap_or_default();
            if !probe.starts_with("http://") {
                return Err(format!(
                    "invalid actions file {source}: action \"{}\": url: only http:// backends are supported; run a local TLS-terminating proxy and point base_url at it",
                    a.name
                ));
            }
        }
        let matcher = intent::Matcher::new(&actions, |texts| embedder.embed(texts)).map_err(|e| format!("cannot embed the actions' examples: {e}"))?;
        Ok(Runtime { actions, source, matcher, calls: Mutex::new(HashMap::new()) })
    }

    /// Each action's similarity to `message`, best first (for evaluation and diagnosis).
    pub fn similarities(&self, embedder: &crate::embed::Embedder, message: &str) -> Result<Vec<(String, f32)>, String> {
        let v = embedder.embed_one(message).map_err(|e| e.to_string())?;
        Ok(self.matcher.scores(&v).into_iter().map(|(i, s)| (self.actions.actions[i].name.clone(), s)).collect())
    }

    /// Counts a call against the customer's hourly limit; false when over it.
    fn admit(&self, customer: &str, action: &Action) -> bool {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let q = calls.entry((customer.to_string(), action.name.clone())).or_default();
        let hour = Duration::from_secs(3600);
        while q.front().is_some_and(|t| t.elapsed() > hour) {
            q.pop_front();
        }
        if q.len() as u32 >= action.rate_limit_per_hour {
            return false;
        }
        q.push_back(Instant::now());
        true
    }
}

/// A question the previous answer asked, still open.
#[derive(Debug, Clone)]
pub struct Pending {
    pub action: String,
    /// `confirmation_asked` or `arguments_asked`.
    pub stage: String,
    pub arguments: Map<String, Value>,
}

/// The open question of a stored conversation, if its last answer asked one (within
/// [`PENDING_FOR`]).
pub async fn pending(store: &Store, conversation_id: &str) -> Result<Option<Pending>, TurnError> {
    let (_, turns) = store.get_conversation(conversation_id).await?;
    Ok(pending_of(&turns))
}

fn pending_of(turns: &[Turn]) -> Option<Pending> {
    let last = turns.iter().rev().find(|t| t.role == Role::Bot)?;
    let age = crate::store::now_ms() - last.created_ms;
    if age < 0 || age as u128 > PENDING_FOR.as_millis() {
        return None;
    }
    let a = last.detail.as_ref()?.get("action")?;
    let stage = a.get("stage")?.as_str()?;
    if stage != "confirmation_asked" && stage != "arguments_asked" {
        return None;
    }
    Some(Pending { action: a.get("name")?.as_str()?.to_string(), stage: stage.to_string(), arguments: a.get("arguments")?.as_object()?.clone() })
}

/// What the action part of a turn decided.
pub enum Decided {
    /// Say this (a question, a refusal, a declined write); `action` is the report.
    Say { text: String, action: ActionInfo },
    /// Call the backend with these arguments.
    Call { action: usize, arguments: Map<String, Value>, info: ActionInfo },
}

fn info(a: &Action, stage: &str, detected_by: &str, score: Option<f32>, arguments: &Map<String, Value>) -> ActionInfo {
    ActionInfo {
        name: a.name.clone(),
        effect: match a.effect {
            Effect::Read => "read".into(),
            Effect::Write => "write".into(),
        },
        stage: stage.into(),
        detected_by: detected_by.into(),
        score,
        arguments: Value::Object(arguments.clone()),
        missing: Vec::new(),
        reason: None,
        call: None,
    }
}

fn claim_value(claim: &Claim, c: &Customer) -> Option<Value> {
    let s = match claim {
        Claim::Sub => c.id.clone(),
        Claim::AccountId => c.account_id.clone(),
        Claim::Plan => c.plan.clone(),
        Claim::Locale => c.locale.clone(),
        Claim::Attribute(k) => return c.attributes.get(k).cloned(),
    };
    s.map(Value::String)
}

/// The customer an action acts for: the verified one (or, for an agent, the conversation's).
fn acting_for(req: &Request) -> Option<&Customer> {
    req.conversation.as_ref().map(|c| &c.customer).filter(|c| c.verified)
}

/// Settles the open question or reads the message's intent. `None`: no action in this turn (the
/// turn goes on as a question for the documentation).
pub fn decide(deps: &Deps, rt: &Runtime, req: &Request, pending: Option<Pending>) -> Result<Option<Decided>, TurnError> {
    let latest = req.latest_customer();
    if let Some(p) = pending {
        if let Some(d) = settle(deps, rt, req, latest, p)? {
            return Ok(Some(d));
        }
    }
    let own_account = acting_for(req).and_then(|c| c.account_id.clone());
    let cues = intent::cues(latest, own_account.as_deref());
    let embedder = deps.knowledge.as_ref().map(|k| k.embedder().clone());
    let Some(embedder) = embedder else { return Ok(None) };
    let v = embedder.embed_one(latest).map_err(|e| TurnError::Internal(format!("cannot embed the message: {e}")))?;
    let scores = rt.matcher.scores(&v);
    let takes_email: Vec<bool> = rt.actions.actions.iter().map(takes_email).collect();
    let writes: Vec<bool> = rt.actions.actions.iter().map(|a| a.effect == Effect::Write).collect();
    let (index, score, by) = match intent::detect(&cues, &scores, &takes_email, &writes) {
        Detected::No(NotAsked::OtherAccount) => {
            // Close to an action, about someone else: say so rather than answer as if it were a question.
            let a = &rt.actions.actions[scores[0].0];
            let mut i = info(a, "refused", "examples", Some(scores[0].1), &Map::new());
            i.reason = Some(NotAsked::OtherAccount.as_str().into());
            return Ok(Some(Decided::Say { text: OTHER_ACCOUNT_TEXT.into(), action: i }));
        }
        Detected::No(_) => return Ok(None),
        Detected::Action(i, s) => (i, s, "examples"),
        Detected::Unsure(candidates) => match choose(deps, rt, latest, &candidates)? {
            Some(i) => (i, candidates.iter().find(|c| c.0 == i).map(|c| c.1).unwrap_or(0.0), "model"),
            None => return Ok(None),
        },
    };
    start(deps, rt, req, index, Map::new(), by, Some(score)).map(Some)
}

/// The action takes an address the customer gives (`format = "email"`, or an argument named so):
/// an address in the message is then its value, not someone else's account.
fn takes_email(a: &Action) -> bool {
    a.filled_arguments().any(|x| x.schema.get("format").and_then(Value::as_str) == Some("email") || x.name.contains("email"))
}

/// The previous answer's question, answered (or not: `None` lets the message be read afresh).
fn settle(deps: &Deps, rt: &Runtime, req: &Request, latest: &str, p: Pending) -> Result<Option<Decided>, TurnError> {
    let Some(index) = rt.actions.actions.iter().position(|a| a.name == p.action) else { return Ok(None) };
    let a = &rt.actions.actions[index];
    match p.stage.as_str() {
        "confirmation_asked" => match intent::reply(latest) {
            Some(Reply::Yes) => {
                deps.observer.action_confirmation("given");
                // The arguments are the ones the question showed, identity re-read from the token.
                let mut args = p.arguments;
                let Some(customer) = acting_for(req) else { return Ok(Some(sign_in(a))) };
                set_identity(a, Some(customer), &mut args);
                let i = info(a, "confirmed", "confirmation", None, &args);
                Ok(Some(Decided::Call { action: index, arguments: args, info: i }))
            }
            Some(Reply::No) => {
                deps.observer.action_confirmation("declined");
                Ok(Some(Decided::Say { text: DECLINED_TEXT.into(), action: info(a, "declined", "confirmation", None, &p.arguments) }))
            }
            None => {
                deps.observer.action_confirmation("lapsed");
                Ok(None)
            }
        },
        "arguments_asked" => {
            // The message gives what was missing, or it is something else.
            let mut args = p.arguments;
            let found = fill(deps, a, latest, &[latest], &mut args)?;
            if found == 0 {
                return Ok(None);
            }
            start(deps, rt, req, index, args, "arguments", None).map(Some)
        }
        _ => Ok(None),
    }
}

/// Puts the identity arguments from the verified customer's claims: whatever else put a value
/// there (the message, a stored question) is dropped, and a claim the token lacks stays missing.
fn set_identity(a: &Action, customer: Option<&Customer>, args: &mut Map<String, Value>) {
    for arg in &a.arguments {
        if let Some(claim) = &arg.from_customer {
            args.remove(&arg.name);
            if let Some(v) = customer.and_then(|c| claim_value(claim, c)) {
                args.insert(arg.name.clone(), v);
            }
        }
    }
}

fn sign_in(a: &Action) -> Decided {
    let mut i = info(a, "refused", "examples", None, &Map::new());
    i.reason = Some("not_verified".into());
    Decided::Say { text: SIGN_IN_TEXT.into(), action: i }
}

/// Starts `index` for the customer: identity from the token, the rest from the conversation;
/// asks for what is missing, confirms a write, or calls.
fn start(deps: &Deps, rt: &Runtime, req: &Request, index: usize, mut args: Map<String, Value>, by: &str, score: Option<f32>) -> Result<Decided, TurnError> {
    let a = &rt.actions.actions[index];
    let customer = acting_for(req);
    if a.needs_verified_customer() && customer.is_none() {
        return Ok(sign_in(a));
    }
    set_identity(a, customer, &mut args);
    let users: Vec<&str> = req.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    let recent = &users[users.len().saturating_sub(3)..];
    fill(deps, a, req.latest_customer(), recent, &mut args)?;
    let missing = match a.check_arguments(&args) {
        Ok(m) => m,
        Err(e) => {
            // A value the conversation gave that does not fit: asked for again, with why.
            let bad: Vec<String> = a.filled_arguments().filter(|x| e.contains(&format!("`{}`", x.name))).map(|x| x.name.clone()).collect();
            for b in &bad {
                args.remove(b);
            }
            a.check_arguments(&args).map_err(TurnError::Internal)?
        }
    };
    if missing.iter().any(|m| a.arguments.iter().any(|x| &x.name == m && x.from_customer.is_some())) {
        // The token lacks a claim the action needs: nothing the customer can type fixes that.
        let mut i = info(a, "refused", by, score, &args);
        i.reason = Some("token_lacks_claim".into());
        i.missing = missing;
        return Ok(Decided::Say { text: SIGN_IN_TEXT.into(), action: i });
    }
    if !missing.is_empty() {
        let wanted: Vec<String> = missing
            .iter()
            .filter_map(|m| a.arguments.iter().find(|x| &x.name == m))
            .map(|x| if x.description.is_empty() { x.name.replace('_', " ") } else { lower_first(&x.description) })
            .collect();
        let mut i = info(a, "arguments_asked", by, score, &args);
        i.missing = missing;
        let text = format!("I can do that. Please tell me {}.", join_and(&wanted));
        return Ok(Decided::Say { text, action: i });
    }
    if a.effect == Effect::Write {
        let question = a
            .confirm
            .as_ref()
            .map(|t| t.render(|f| args.get(f).map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))))
            .transpose()
            .map_err(TurnError::Internal)?
            .unwrap_or_default();
        if let Some(rule) = deps.policy.forbidden_hit(&question) {
            // An argument made the question say what the pack forbids: not asked, not run.
            deps.observer.guard_rule(&rule, "refusal");
            let mut i = info(a, "refused", by, score, &args);
            i.reason = Some(format!("policy:{rule}"));
            return Ok(Decided::Say { text: deps.policy.pack.messages.refusal.clone(), action: i });
        }
        deps.observer.action_confirmation("asked");
        return Ok(Decided::Say { text: format!("{question} (yes / no)"), action: info(a, "confirmation_asked", by, score, &args) });
    }
    let i = info(a, "called", by, score, &args);
    Ok(Decided::Call { action: index, arguments: args, info: i })
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Fills the model-filled arguments still missing from what the conversation says: values of the
/// argument's kind found in `latest` first, then in `recent`. One candidate is taken; several are
/// the model's choice, under a grammar that allows only them. Returns how many were filled.
fn fill(deps: &Deps, a: &Action, latest: &str, recent: &[&str], args: &mut Map<String, Value>) -> Result<usize, TurnError> {
    let mut filled = 0;
    for arg in a.filled_arguments() {
        if args.contains_key(&arg.name) {
            continue;
        }
        let mut candidates = candidates_in(arg, latest);
        if candidates.is_empty() {
            for m in recent.iter().rev() {
                candidates = candidates_in(arg, m);
                if !candidates.is_empty() {
                    break;
                }
            }
        }
        let value = match candidates.len() {
            0 if free_text(arg) => match extract(deps, a, arg, latest, recent)? {
                Some(v) => v,
                None => continue,
            },
            0 => continue,
            1 => candidates.remove(0),
            _ => match pick(deps, a, arg, latest, &candidates)? {
                Some(v) => v,
                None => continue,
            },
        };
        args.insert(arg.name.clone(), value);
        filled += 1;
    }
    Ok(filled)
}

/// Values of `arg`'s kind that `text` states: email addresses, numbers, enum members.
fn candidates_in(arg: &crate::actions::Argument, text: &str) -> Vec<Value> {
    use crate::actions::ArgKind;
    if let Some(choices) = arg.schema.get("enum").and_then(Value::as_array) {
        let lower = text.to_lowercase();
        return choices.iter().filter(|c| c.as_str().is_some_and(|s| lower.contains(&s.to_lowercase()))).cloned().collect();
    }
    match (arg.kind, arg.schema.get("format").and_then(Value::as_str)) {
        (ArgKind::String, Some("email")) => intent::emails(text).into_iter().map(Value::String).collect(),
        (ArgKind::Integer, _) => {
            static NUMBER: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
            let re = NUMBER.get_or_init(|| regex::Regex::new(r"\b\d{1,9}\b").expect("a valid pattern"));
            re.find_iter(text).filter_map(|m| m.as_str().parse::<i64>().ok()).map(Value::from).collect()
        }
        // Free text is never taken from a message without a declared shape.
        _ => Vec::new(),
    }
}

/// A string argument with no declared shape (no format, enum or pattern): the model fills it.
fn free_text(arg: &crate::actions::Argument) -> bool {
    arg.kind == crate::actions::ArgKind::String && ["format", "enum", "pattern"].iter().all(|k| arg.schema.get(*k).is_none())
}

/// The model fills a free-text argument from the conversation, under the argument's own schema
/// (a JSON string of its bounds); the value is kept only if the customer wrote it (the model
/// copies, it never invents an argument).
fn extract(deps: &Deps, a: &Action, arg: &crate::actions::Argument, latest: &str, recent: &[&str]) -> Result<Option<Value>, TurnError> {
    let what = if arg.description.is_empty() { arg.name.replace('_', " ") } else { arg.description.clone() };
    let system = format!("The customer asks: {}. Copy {what} from the customer's message, word for word, as a JSON string.", a.description);
    let messages = [ChatMessage { role: "system".into(), content: system }, ChatMessage { role: "user".into(), content: latest.into() }];
    let mut schema = arg.schema.clone();
    if let Value::Object(m) = &mut schema {
        m.insert("x-guidance".into(), json!({"whitespace_flexible": false, "lenient": true}));
        m.entry("maxLength").or_insert(json!(200));
    }
    let answer = constrained(deps, &messages, format!("start: %json {schema}"), 96)?;
    let Ok(Value::String(v)) = serde_json::from_str::<Value>(answer.trim()) else { return Ok(None) };
    let said = recent.iter().chain(std::iter::once(&latest)).any(|m| m.to_lowercase().contains(&v.trim().to_lowercase()));
    Ok((!v.trim().is_empty() && said).then(|| Value::String(v.trim().to_string())))
}

/// Greedy, short, constrained decoding of one choice.
fn constrained(deps: &Deps, messages: &[ChatMessage], lark: String, max_tokens: usize) -> Result<String, TurnError> {
    let prompt = deps.model.bundle.chat_prompt(messages).map_err(|e| TurnError::Internal(e.to_string()))?;
    let compiled = deps.model.guard.compile(&Constraint::Lark(lark)).map_err(|e| TurnError::Internal(format!("the action grammar does not compile: {e}")))?;
    let params = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
    let job = Job { prompt, params, max_tokens, stop: Vec::new(), skip_special: true, guard: Some(JobGuard(Box::new(compiled.matcher()))) };
    let mut rx = deps.model.engine.submit(job).map_err(|e| TurnError::Internal(e.to_string()))?;
    let mut out = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token { text, .. } => out.push_str(&text),
            Event::Done { text, .. } => {
                out.push_str(&text);
                return Ok(out);
            }
            Event::Error(e) => return Err(TurnError::Internal(e)),
        }
    }
    Err(TurnError::Internal("the choice ended without an answer".into()))
}

fn lark_choice(options: &[String]) -> String {
    let alts: Vec<String> = options.iter().map(|o| serde_json::to_string(o).unwrap_or_default()).collect();
    format!("start: {}", alts.join(" | "))
}

/// The model's choice between the close candidate and `none`: worked examples (the candidate's
/// first declared example, and a question that is none), then the message, answered under a
/// grammar that allows only the candidate's name and `none`.
fn choose(deps: &Deps, rt: &Runtime, message: &str, candidates: &[(usize, f32)]) -> Result<Option<usize>, TurnError> {
    let mut listing = String::new();
    let mut options = Vec::new();
    let mut shots = Vec::new();
    for (i, _) in candidates {
        let a = &rt.actions.actions[*i];
        listing.push_str(&format!("- {}: {}\n", a.name, a.description));
        options.push(a.name.clone());
        if let Some(e) = a.examples.first() {
            shots.push((e.clone(), a.name.clone()));
        }
    }
    listing.push_str("- none: the customer asks how something works, or asks for something else\n");
    options.push("none".into());
    shots.push(("how does this work in general?".to_string(), "none".to_string()));
    let system = format!("You route customer messages. Answer with the one action the customer asks you to do for their own account, or none.\nActions:\n{listing}");
    let mut messages = vec![ChatMessage { role: "system".into(), content: system }];
    for (q, a) in shots {
        messages.push(ChatMessage { role: "user".into(), content: q });
        messages.push(ChatMessage { role: "assistant".into(), content: a });
    }
    messages.push(ChatMessage { role: "user".into(), content: message.into() });
    let answer = constrained(deps, &messages, lark_choice(&options), 16)?;
    Ok(candidates.iter().map(|(i, _)| *i).find(|i| rt.actions.actions[*i].name == answer.trim()))
}

/// The model's choice among values the conversation states for `arg`.
fn pick(deps: &Deps, a: &Action, arg: &crate::actions::Argument, message: &str, candidates: &[Value]) -> Result<Option<Value>, TurnError> {
    let shown: Vec<String> = candidates.iter().map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())).collect();
    let what = if arg.description.is_empty() { arg.name.replace('_', " ") } else { arg.description.clone() };
    let system = format!("The customer asks: {}. Answer with {what}, exactly as the customer wrote it.", a.description);
    let messages = [ChatMessage { role: "system".into(), content: system }, ChatMessage { role: "user".into(), content: message.into() }];
    let answer = constrained(deps, &messages, lark_choice(&shown), 64)?;
    Ok(shown.iter().position(|s| s == answer.trim()).map(|i| candidates[i].clone()))
}

/// The turn's call: for the verified customer, a dry run on replay.
pub async fn call(deps: &Deps, rt: &Runtime, req: &Request, index: usize, arguments: Map<String, Value>, info: ActionInfo) -> Result<(String, ActionInfo, Option<String>), TurnError> {
    let customer = acting_for(req).and_then(|c| c.id.clone()).unwrap_or_default();
    run(deps.observer.as_ref(), &deps.policy, rt, &customer, req.dry_run_actions, index, arguments, info).await
}

/// The identity arguments of `action` from a verified customer's claims; `Err` names a claim the
/// customer lacks.
pub fn identity_arguments(action: &Action, customer: &Customer) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for arg in &action.arguments {
        if let Some(claim) = &arg.from_customer {
            let v = claim_value(claim, customer).ok_or_else(|| format!("the customer's token has no `{}` for the argument `{}`", claim.name(), arg.name))?;
            out.insert(arg.name.clone(), v);
        }
    }
    Ok(out)
}

/// A fresh report for running `action` with `arguments`.
pub fn report_for(action: &Action, stage: &str, detected_by: &str, arguments: &Map<String, Value>) -> ActionInfo {
    info(action, stage, detected_by, None, arguments)
}

/// Calls the backend for `action` with `arguments` (unless `dry_run`), counted against
/// `customer`'s rate limit: the text to show and the completed report, or also the reason to
/// hand off. The policy pack's forbidden phrases apply to the result text too (it is filled from
/// the backend's answer): a result that breaks one is not shown, and a person takes over.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    observer: &dyn super::Observer,
    policy: &crate::guard::ActivePolicy,
    rt: &Runtime,
    customer: &str,
    dry_run: bool,
    index: usize,
    arguments: Map<String, Value>,
    mut info: ActionInfo,
) -> Result<(String, ActionInfo, Option<String>), TurnError> {
    let a = &rt.actions.actions[index];
    let request = a.request(&arguments).map_err(TurnError::Internal)?;
    let mut report = ActionCall { request: request.redacted(), status: None, latency_ms: 0.0, attempts: 0, outcome: String::new(), executed: false };
    if dry_run {
        report.outcome = "not_run".into();
        info.stage = "would_call".into();
        info.call = Some(report);
        return Ok((format!("(replay: `{}` would be called; it was not run)", a.name), info, None));
    }
    if !rt.admit(customer, a) {
        report.outcome = "rate_limited".into();
        info.stage = "refused".into();
        info.reason = Some("rate_limited".into());
        info.call = Some(report);
        observer.action_call(&a.name, "rate_limited", 0.0);
        return Ok((RATE_LIMITED_TEXT.into(), info, None));
    }
    let started = Instant::now();
    let attempts = if a.effect == Effect::Read { 1 + a.retries } else { 1 };
    let mut outcome: Result<Value, (String, String)> = Err(("unreachable".into(), "our account system could not be reached".into()));
    for attempt in 1..=attempts {
        report.attempts = attempt;
        let sent = tokio::time::timeout(a.timeout, send(&request)).await;
        let (retry, result) = match sent {
            Err(_) => (true, Err(("timeout".to_string(), "our account system did not answer in time".to_string()))),
            Ok(Err(e)) => {
                tracing::warn!(action = %a.name, error = %e, "action backend unreachable");
                (true, Err(("unreachable".to_string(), "our account system could not be reached".to_string())))
            }
            Ok(Ok((status, body))) => {
                report.status = Some(status);
                match status {
                    200..=299 => match serde_json::from_slice::<Value>(&body) {
                        Ok(v) => (false, Ok(v)),
                        Err(_) => (false, Err(("bad_answer".to_string(), "our account system's answer could not be read".to_string()))),
                    },
                    404 => (false, Err(("not_found".to_string(), "our account system has no record of this for your account".to_string()))),
                    s if s >= 500 || s == 429 || s == 408 => (true, Err((format!("http_{s}"), "our account system had an error".to_string()))),
                    s => (false, Err((format!("http_{s}"), "our account system refused the request".to_string()))),
                }
            }
        };
        outcome = result;
        if outcome.is_ok() || !retry || attempt == attempts {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    report.latency_ms = secs * 1e3;
    // A write that reached the backend counts as run, whatever came back.
    report.executed = report.status.is_some();
    let rendered = outcome.and_then(|v| a.render_result(&v).map_err(|e| {
        tracing::warn!(action = %a.name, error = %e, "action result does not fit its template");
        ("bad_answer".to_string(), "our account system's answer could not be read".to_string())
    }));
    let handoff = &policy.pack.messages.handoff;
    if let Ok(text) = &rendered {
        if let Some(rule) = policy.forbidden_hit(text) {
            observer.action_call(&a.name, "blocked_by_policy", secs);
            observer.guard_rule(&rule, "handoff");
            report.outcome = "blocked_by_policy".into();
            info.stage = "failed".into();
            info.reason = Some(format!("policy:{rule}"));
            info.call = Some(report);
            let text = format!("That request went through, but I can't show its details here. {handoff}");
            return Ok((text, info, Some(format!("action_result_blocked:{}:{rule}", a.name))));
        }
    }
    match rendered {
        Ok(text) => {
            report.outcome = "ok".into();
            info.stage = "done".into();
            info.call = Some(report);
            observer.action_call(&a.name, "ok", secs);
            Ok((text, info, None))
        }
        Err((code, why)) => {
            observer.action_call(&a.name, &code, secs);
            report.outcome = code.clone();
            info.stage = "failed".into();
            info.reason = Some(code.clone());
            info.call = Some(report);
            let text = format!("I couldn't do that just now: {why}. {}", handoff);
            Ok((text, info, Some(format!("action_failed:{}:{code}", a.name))))
        }
    }
}

/// One HTTP exchange for an action request.
async fn send(r: &crate::actions::Request) -> Result<(u16, Bytes), String> {
    let uri: hyper::Uri = r.url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let authority = uri.authority().ok_or("no host")?.clone();
    let target = crate::httpc::Target { host: authority.host().trim_matches(['[', ']']).to_string(), port: authority.port_u16().unwrap_or(80), authority: authority.to_string() };
    let path = uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let mut b = hyper::Request::builder().method(r.method.as_str()).uri(path).header(hyper::header::HOST, authority.as_str()).header(hyper::header::USER_AGENT, "helpline-actions");
    for h in &r.headers {
        b = b.header(h.name.as_str(), h.value.as_str());
    }
    let body = match &r.body {
        Some(v) => {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(v).map_err(|e| e.to_string())?)
        }
        None => Bytes::new(),
    };
    let request = b.body(Full::new(body)).map_err(|e| e.to_string())?;
    let (status, _, body) = crate::httpc::exchange(&target, request, MAX_ANSWER_BYTES).await?;
    Ok((status.as_u16(), body))
}

/// The audit's view of an action: the report, the request minus secrets.
pub fn audit_of(info: &ActionInfo) -> Value {
    json!(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: Role, detail: Option<Value>, age_ms: i64) -> Turn {
        Turn {
            id: "t".into(),
            conversation_id: "c".into(),
            seq: 1,
            role,
            content: String::new(),
            state: crate::store::TurnState::Complete,
            created_ms: crate::store::now_ms() - age_ms,
            completed_ms: None,
            finish_reason: None,
            detail,
            audit: None,
            feedback: None,
        }
    }

    #[test]
    fn an_open_question_is_read_from_the_last_answer_and_lapses() {
        let asked = json!({"action": {"name": "change_billing_email", "stage": "confirmation_asked", "arguments": {"email": "a@b.example"}}});
        let p = pending_of(&[turn(Role::Customer, None, 0), turn(Role::Bot, Some(asked.clone()), 1000)]).expect("open");
        assert_eq!((p.action.as_str(), p.stage.as_str()), ("change_billing_email", "confirmation_asked"));
        assert!(pending_of(&[turn(Role::Bot, Some(asked.clone()), PENDING_FOR.as_millis() as i64 + 1000)]).is_none(), "lapsed");
        let done = json!({"action": {"name": "x", "stage": "done", "arguments": {}}});
        assert!(pending_of(&[turn(Role::Bot, Some(asked), 1000), turn(Role::Bot, Some(done), 10)]).is_none(), "answered");
    }

    #[test]
    fn lists_read_as_prose() {
        assert_eq!(join_and(&["a".into(), "b".into(), "c".into()]), "a, b and c");
        assert_eq!(lark_choice(&["none".into(), "x".into()]), "start: \"none\" | \"x\"");
    }
}
