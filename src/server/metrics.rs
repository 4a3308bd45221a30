//! Prometheus metrics: atomic counters and fixed-bucket histograms, plus two small mutex-guarded
//! maps for the labelled counters. Rendered in the Prometheus text exposition format (0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The most distinct handoff reasons `/metrics` labels (the rest are `other`).
pub const MAX_REASON_LABELS: usize = 32;

use crate::engine::EngineStats;

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Upper bounds (seconds) of the inter-token latency buckets.
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Upper bounds (seconds) of the retrieval latency buckets.
const RETRIEVAL_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
/// Upper bounds (seconds) of the conversation-store write buckets.
const STORE_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug)]
pub struct Metrics {
    /// (route template, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    rejections: Mutex<BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
    /// Chat answers by grounding status (`grounded`, `no_relevant_docs`, `off`).
    grounding: Mutex<BTreeMap<&'static str, u64>>,
    retrieval: Histogram,
    invalid_citations: AtomicU64,
    index_reloads: Mutex<BTreeMap<&'static str, u64>>,
    /// (policy rule id, action) -> times it fired.
    guard_rules: Mutex<BTreeMap<(String, &'static str), u64>>,
    policy_reloads: Mutex<BTreeMap<&'static str, u64>>,
    /// Handoffs started by this process, by reason code.
    handoffs: Mutex<BTreeMap<String, u64>>,
    resolutions: AtomicU64,
    /// (kind `answer`/`conversation`, value `helpful`/`not_helpful`/`resolved`/`unresolved`) -> count.
    feedback: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Time the chat handler spent writing a turn to the store (the latency storing adds).
    store_writes: Histogram,
    /// Time embedding a question took.
    embeddings: Histogram,
    /// Generated sentences by what the sentence check did (`kept`, `replaced`, `dropped`).
    sentences: Mutex<BTreeMap<&'static str, u64>>,
    /// Chat answers by how they were made (`assembled`, `generative`, `quote`, `model`, `fixed`).
    answer_modes: Mutex<BTreeMap<&'static str, u64>>,
    /// Action backend calls by (action, outcome), their latency, and confirmations by event.
    action_calls: Mutex<BTreeMap<(String, String), u64>>,
    action_latency: Mutex<BTreeMap<String, (f64, u64)>>,
    action_seconds: Histogram,
    confirmations: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            rejections: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            grounding: Mutex::new(BTreeMap::new()),
            retrieval: Histogram::new(RETRIEVAL_BUCKETS),
            invalid_citations: AtomicU64::new(0),
            index_reloads: Mutex::new(BTreeMap::new()),
            guard_rules: Mutex::new(BTreeMap::new()),
            policy_reloads: Mutex::new(BTreeMap::new()),
            handoffs: Mutex::new(BTreeMap::new()),
            resolutions: AtomicU64::new(0),
            feedback: Mutex::new(BTreeMap::new()),
            store_writes: Histogram::new(STORE_BUCKETS),
            embeddings: Histogram::new(RETRIEVAL_BUCKETS),
            sentences: Mutex::new(BTreeMap::new()),
            answer_modes: Mutex::new(BTreeMap::new()),
            action_calls: Mutex::new(BTreeMap::new()),
            action_latency: Mutex::new(BTreeMap::new()),
            action_seconds: Histogram::new(STORE_BUCKETS),
            confirmations: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// One finished request. `route` is the matched route template (e.g. `/v1/chat/completions`),
    /// never the raw path, so the label set stays small. (The middleware calls this for every request.)
    pub fn record_request(&self, route: &str, status: u16) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((route.to_string(), status)).or_insert(0) += 1;
    }

    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_generated_tokens(&self, n: u64) {
        self.generated_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Time to first token, seconds.
    pub fn observe_ttft(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    /// Inter-token latency, seconds.
    pub fn observe_itl(&self, secs: f64) {
        self.itl.observe(secs);
    }

    /// A request refused before generation (e.g. `queue_full`); one counter per reason.
    pub fn rejection(&self, reason: &'static str) {
        let mut map = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(reason).or_insert(0) += 1;
    }

    /// One chat answer and how it was grounded.
    pub fn grounding(&self, status: &'static str) {
        let mut map = self.grounding.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(status).or_insert(0) += 1;
    }

    /// Time one retrieval took, seconds.
    pub fn observe_retrieval(&self, secs: f64) {
        self.retrieval.observe(secs);
    }

    /// Citation markers removed from answers because they named no given passage.
    pub fn add_invalid_citations(&self, n: u64) {
        self.invalid_citations.fetch_add(n, Ordering::Relaxed);
    }

    /// One index reload (`ok` or `failed`).
    pub fn index_reload(&self, outcome: &'static str) {
        let mut map = self.index_reloads.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(outcome).or_insert(0) += 1;
    }

    /// A policy rule fired on a chat turn (`action`: `handoff` or `refusal`).
    pub fn guard_rule(&self, rule: &str, action: &'static str) {
        let mut map = self.guard_rules.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((rule.to_string(), action)).or_insert(0) += 1;
    }

    /// One policy reload (`ok` or `failed`).
    pub fn policy_reload(&self, outcome: &'static str) {
        let mut map = self.policy_reloads.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(outcome).or_insert(0) += 1;
    }

    /// Counts a handoff by reason. Reasons are labels, so their number is bounded: past
    /// [`MAX_REASON_LABELS`] distinct ones, new reasons count as `other`.
    pub fn handoff(&self, reason: &str) {
        let mut map = self.handoffs.lock().unwrap_or_else(|e| e.into_inner());
        let label = if map.contains_key(reason) || map.len() < MAX_REASON_LABELS { reason } else { "other" };
        *map.entry(label.to_string()).or_insert(0) += 1;
    }

    pub fn resolution(&self) {
        self.resolutions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn feedback(&self, kind: &'static str, fb: &crate::store::Feedback) {
        let mut map = self.feedback.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = fb.helpful {
            *map.entry((kind, if h { "helpful" } else { "not_helpful" })).or_insert(0) += 1;
        }
        if let Some(r) = fb.resolved {
            *map.entry((kind, if r { "resolved" } else { "unresolved" })).or_insert(0) += 1;
        }
    }

    pub fn observe_store_write(&self, secs: f64) {
        self.store_writes.observe(secs);
    }

    /// Counts and rates over the whole conversation store (every replica's turns, when shared),
    /// read at scrape time; and the handoff webhook's counters.
    pub fn render_store(&self, out: &mut String, c: &crate::store::Counts, webhook: Option<crate::webhook::WebhookStats>) {
        use crate::store::Role;
        header(out, "helpline_conversations", "gauge", "Stored conversations, by status.");
        for (status, n) in [("open", c.conversations.open), ("handed_off", c.conversations.handed_off), ("resolved", c.conversations.resolved)] {
            let _ = writeln!(out, "helpline_conversations{{status=\"{status}\"}} {n}");
        }
        header(out, "helpline_stored_answers", "gauge", "Stored bot answers, by outcome (stop, length, content_filter, refused, handoff, client_disconnected, error, interrupted).");
        let mut by: BTreeMap<String, i64> = BTreeMap::new();
        for t in c.turns.iter().filter(|t| t.role == Role::Bot) {
            let key = t.finish_reason.clone().unwrap_or_else(|| format!("{:?}", t.state).to_lowercase());
            *by.entry(key).or_insert(0) += t.count;
        }
        for (outcome, n) in &by {
            let _ = writeln!(out, "helpline_stored_answers{{outcome=\"{}\"}} {n}", escape_label(outcome));
        }
        let answers = c.answers().max(0) as f64;
        let refusals = (by.get("refused").copied().unwrap_or(0) + by.get("content_filter").copied().unwrap_or(0)) as f64;
        let total = c.conversations.total.max(0) as f64;
        let rate = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
        header(out, "helpline_refusal_rate", "gauge", "Share of stored answers that were refusals (no relevant docs, or the policy).");
        let _ = writeln!(out, "helpline_refusal_rate {}", rate(refusals, answers));
        header(out, "helpline_handoff_rate", "gauge", "Share of stored conversations handed to a person.");
        let _ = writeln!(out, "helpline_handoff_rate {}", rate(c.conversations.handed_off as f64, total));
        header(out, "helpline_resolution_rate", "gauge", "Share of stored conversations marked resolved.");
        let _ = writeln!(out, "helpline_resolution_rate {}", rate(c.conversations.resolved as f64, total));
        let fb = &c.answer_feedback;
        header(out, "helpline_helpful_rate", "gauge", "Share of answer feedback that said helpful.");
        let _ = writeln!(out, "helpline_helpful_rate {}", rate(fb.helpful as f64, (fb.helpful + fb.not_helpful) as f64));
        header(out, "helpline_webhook_deliveries", "gauge", "Handoff webhook deliveries in the store, by status.");
        for (status, n) in [("pending", c.deliveries.pending), ("delivered", c.deliveries.delivered), ("dead", c.deliveries.dead)] {
            let _ = writeln!(out, "helpline_webhook_deliveries{{status=\"{status}\"}} {n}");
        }
        if let Some(w) = webhook {
            counter(out, "helpline_webhook_retries_total", "Webhook attempts that failed and were retried (this process).", w.retried);
        }
    }

    /// The exposition text; `engine` is `None` until the model has loaded (`helpline_ready` 0).
    pub fn render(&self, engine: Option<&EngineStats>) -> String {
        self.render_with(engine, engine.is_some())
    }

    /// Like [`render`](Self::render), with readiness decided by the caller (e.g. loaded but the engine stopped).
    pub fn render_with(&self, engine: Option<&EngineStats>, ready: bool) -> String {
        let mut out = String::with_capacity(4096);
        gauge(&mut out, "helpline_up", "Whether the server process is up.", 1);
        gauge(&mut out, "helpline_ready", "Whether the model is loaded and the engine accepts work.", ready as u64);

        header(&mut out, "helpline_requests_total", "counter", "HTTP requests answered, by route template and status.");
        {
            let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((route, status), n) in map.iter() {
                let _ = writeln!(out, "helpline_requests_total{{route=\"{}\",status=\"{status}\"}} {n}", escape_label(route));
            }
        }

        counter(&mut out, "helpline_prompt_tokens_total", "Prompt tokens of requests admitted to generation.", self.prompt_tokens.load(Ordering::Relaxed));
        counter(&mut out, "helpline_generated_tokens_total", "Tokens generated for clients.", self.generated_tokens.load(Ordering::Relaxed));
        self.ttft.render(&mut out, "helpline_time_to_first_token_seconds", "Time from admission to the first generated token.");
        self.itl.render(&mut out, "helpline_inter_token_latency_seconds", "Time between consecutive generated tokens of one request.");

        let load = |f: fn(&EngineStats) -> u64| engine.map(f).unwrap_or(0);
        gauge(&mut out, "helpline_queue_depth", "Requests waiting for a decoding slot.", load(|s| s.queued.load(Ordering::Relaxed) as u64));
        gauge(&mut out, "helpline_active_sequences", "Sequences being decoded.", load(|s| s.active.load(Ordering::Relaxed) as u64));

        header(&mut out, "helpline_rejections_total", "counter", "Requests refused before generation, by reason.");
        {
            let map = self.rejections.lock().unwrap_or_else(|e| e.into_inner());
            for (reason, n) in map.iter() {
                let _ = writeln!(out, "helpline_rejections_total{{reason=\"{}\"}} {n}", escape_label(reason));
            }
        }
        counter(&mut out, "helpline_cancelled_total", "Generations stopped because the client went away.", load(|s| s.cancelled_total.load(Ordering::Relaxed)));
        labelled(&mut out, "helpline_chat_answers_total", "Chat answers by grounding status.", "grounding", &self.grounding);
        self.retrieval.render(&mut out, "helpline_retrieval_seconds", "Time to retrieve passages for one chat turn or /v1/retrieve call.");
        counter(&mut out, "helpline_invalid_citations_total", "Citation markers removed because they named no passage given to the model.", self.invalid_citations.load(Ordering::Relaxed));
        labelled(&mut out, "helpline_index_reloads_total", "Index rebuilds through the reload route, by outcome.", "outcome", &self.index_reloads);
        header(&mut out, "helpline_guard_rules_total", "counter", "Policy rules that fired on chat turns, by rule id and action.");
        {
            let map = self.guard_rules.lock().unwrap_or_else(|e| e.into_inner());
            for ((rule, action), n) in map.iter() {
                let _ = writeln!(out, "helpline_guard_rules_total{{rule=\"{}\",action=\"{action}\"}} {n}", escape_label(rule));
            }
        }
        labelled(&mut out, "helpline_policy_reloads_total", "Policy pack reloads, by outcome.", "outcome", &self.policy_reloads);
        counter(&mut out, "helpline_guard_masks_total", "Token masks computed for guarded generations.", load(|s| s.masks_total.load(Ordering::Relaxed)));
        header(&mut out, "helpline_guard_mask_seconds_total", "counter", "Time spent computing token masks.");
        let _ = writeln!(out, "helpline_guard_mask_seconds_total {}", load(|s| s.mask_nanos_total.load(Ordering::Relaxed)) as f64 / 1e9);
        header(&mut out, "helpline_guard_mask_seconds_max", "gauge", "Longest single token mask computation.");
        let _ = writeln!(out, "helpline_guard_mask_seconds_max {}", load(|s| s.mask_nanos_max.load(Ordering::Relaxed)) as f64 / 1e9);
        counter(&mut out, "helpline_completed_total", "Generations that ran to their end.", load(|s| s.completed_total.load(Ordering::Relaxed)));
        header(&mut out, "helpline_handoffs_total", "counter", "Conversations handed to a person by this process, by reason code.");
        {
            let map = self.handoffs.lock().unwrap_or_else(|e| e.into_inner());
            for (reason, n) in map.iter() {
                let _ = writeln!(out, "helpline_handoffs_total{{reason=\"{}\"}} {n}", escape_label(reason));
            }
        }
        counter(&mut out, "helpline_resolutions_total", "Conversations marked resolved through this process.", self.resolutions.load(Ordering::Relaxed));
        header(&mut out, "helpline_feedback_total", "counter", "Customer feedback received, by kind and value.");
        {
            let map = self.feedback.lock().unwrap_or_else(|e| e.into_inner());
            for ((kind, value), n) in map.iter() {
                let _ = writeln!(out, "helpline_feedback_total{{kind=\"{kind}\",value=\"{value}\"}} {n}");
            }
        }
        self.store_writes.render(&mut out, "helpline_store_write_seconds", "Time a chat turn spent writing to the conversation store.");
        self.embeddings.render(&mut out, "helpline_embedding_seconds", "Time to embed one question (sentence-embedding model).");
        labelled(&mut out, "helpline_checked_sentences_total", "Generated sentences by what the sentence check did (kept, replaced, dropped).", "outcome", &self.sentences);
        labelled(&mut out, "helpline_answer_modes_total", "Chat answers by how they were made (assembled, generative, quote, model, fixed, action).", "mode", &self.answer_modes);
        header(&mut out, "helpline_action_calls_total", "counter", "Declared actions' backend calls, by action and outcome (ok, timeout, not_found, http_500, rate_limited...).");
        {
            let map = self.action_calls.lock().unwrap_or_else(|e| e.into_inner());
            for ((action, outcome), n) in map.iter() {
                let _ = writeln!(out, "helpline_action_calls_total{{action=\"{}\",outcome=\"{}\"}} {n}", escape_label(action), escape_label(outcome));
            }
        }
        header(&mut out, "helpline_action_call_seconds_sum", "counter", "Total time of action backend calls, by action (with _count: the mean latency).");
        {
            let map = self.action_latency.lock().unwrap_or_else(|e| e.into_inner());
            for (action, (sum, _)) in map.iter() {
                let _ = writeln!(out, "helpline_action_call_seconds_sum{{action=\"{}\"}} {sum}", escape_label(action));
            }
            header(&mut out, "helpline_action_call_seconds_count", "counter", "Action backend calls timed, by action.");
            for (action, (_, n)) in map.iter() {
                let _ = writeln!(out, "helpline_action_call_seconds_count{{action=\"{}\"}} {n}", escape_label(action));
            }
        }
        self.action_seconds.render(&mut out, "helpline_action_seconds", "Latency of action backend calls, retries included.");
        labelled(&mut out, "helpline_action_confirmations_total", "Write confirmations: asked, given, declined, lapsed.", "event", &self.confirmations);
        out
    }
}

/// The chat turn reports here.
impl crate::turn::Observer for Metrics {
    fn grounding(&self, status: &'static str) {
        Metrics::grounding(self, status);
    }
    fn retrieval(&self, secs: f64) {
        self.observe_retrieval(secs);
    }
    fn embedding(&self, secs: f64) {
        self.embeddings.observe(secs);
    }
    fn guard_rule(&self, rule: &str, action: &'static str) {
        Metrics::guard_rule(self, rule, action);
    }
    fn handoff(&self, reason: &str) {
        Metrics::handoff(self, reason);
    }
    fn prompt_tokens(&self, n: u64) {
        self.add_prompt_tokens(n);
    }
    fn token(&self, first: bool, secs: f64) {
        if first {
            self.observe_ttft(secs);
        } else {
            self.observe_itl(secs);
        }
        self.add_generated_tokens(1);
    }
    fn invalid_citations(&self, n: u64) {
        self.add_invalid_citations(n);
    }
    fn store_write(&self, secs: f64) {
        self.observe_store_write(secs);
    }
    fn rejection(&self, reason: &'static str) {
        Metrics::rejection(self, reason);
    }
    fn sentence(&self, outcome: &'static str) {
        let mut map = self.sentences.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(outcome).or_insert(0) += 1;
    }
    fn answer_mode(&self, mode: &'static str) {
        let mut map = self.answer_modes.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(mode).or_insert(0) += 1;
    }
    fn action_call(&self, action: &str, outcome: &str, secs: f64) {
        *self.action_calls.lock().unwrap_or_else(|e| e.into_inner()).entry((action.to_string(), outcome.to_string())).or_insert(0) += 1;
        if outcome != "rate_limited" {
            let mut l = self.action_latency.lock().unwrap_or_else(|e| e.into_inner());
            let e = l.entry(action.to_string()).or_insert((0.0, 0));
            e.0 += secs;
            e.1 += 1;
            self.action_seconds.observe(secs);
        }
    }
    fn action_confirmation(&self, event: &'static str) {
        *self.confirmations.lock().unwrap_or_else(|e| e.into_inner()).entry(event).or_insert(0) += 1;
    }
}

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, then the +Inf bucket (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    /// f64 bits of the sum of observations.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum: AtomicU64::new(0f64.to_bits()) }
    }

    fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let v = v.max(0.0);
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(seen) => cur = seen,
            }
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, "histogram", help);
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum {}", f64::from_bits(self.sum.load(Ordering::Relaxed)));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn labelled(out: &mut String, name: &str, help: &str, label: &str, map: &Mutex<BTreeMap<&'static str, u64>>) {
    header(out, name, "counter", help);
    let map = map.lock().unwrap_or_else(|e| e.into_inner());
    for (value, n) in map.iter() {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape_label(value));
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {v}");
}

/// A label value as the exposition format wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.record_request("/v1/models", 200);
        m.record_request("/v1/models", 200);
        m.record_request("/v1/models", 401);
        m.add_prompt_tokens(12);
        m.add_generated_tokens(5);
        m.observe_ttft(0.2);
        m.observe_ttft(100.0);
        m.observe_itl(0.003);
        m.rejection("queue_full");
        let text = m.render(None);
        assert!(text.contains("helpline_requests_total{route=\"/v1/models\",status=\"200\"} 2\n"), "{text}");
        assert!(text.contains("helpline_requests_total{route=\"/v1/models\",status=\"401\"} 1\n"));
        assert!(text.contains("helpline_prompt_tokens_total 12\n"));
        assert!(text.contains("helpline_generated_tokens_total 5\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_bucket{le=\"0.1\"} 0\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_bucket{le=\"60\"} 1\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_count 2\n"));
        assert!(text.contains("helpline_time_to_first_token_seconds_sum 100.2\n"));
        assert!(text.contains("helpline_inter_token_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("helpline_rejections_total{reason=\"queue_full\"} 1\n"));
        assert!(text.contains("helpline_ready 0\n"));
        assert!(text.contains("helpline_up 1\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = Metrics::default();
        m.record_request("/x\"y", 404);
        assert!(m.render(None).contains("route=\"/x\\\"y\""));
    }

    #[test]
    fn engine_gauges() {
        let s = EngineStats::default();
        s.queued.store(3, Ordering::Relaxed);
        s.active.store(2, Ordering::Relaxed);
        s.cancelled_total.store(7, Ordering::Relaxed);
        let text = Metrics::default().render(Some(&s));
        assert!(text.contains("helpline_queue_depth 3\n"));
        assert!(text.contains("helpline_active_sequences 2\n"));
        assert!(text.contains("helpline_cancelled_total 7\n"));
        assert!(text.contains("helpline_ready 1\n"));
    }
}
