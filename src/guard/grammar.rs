//! Decode-time constraints: a policy (or a JSON schema, regex, Lark grammar) compiled by
//! llguidance into a per-sequence matcher that masks the logits before sampling.
//!
//! Shape (llguidance's server-side pattern): one [`GuardCompiler`] per tokenizer holds the
//! `ParserFactory` (token trie, slicer); [`GuardCompiler::compile`] turns a [`Constraint`] into a
//! [`CompiledGuard`] (compile once, cache by [`CompiledGuard::hash`]); each sequence gets its own
//! [`GuardMatcher`] from [`CompiledGuard::matcher`]. Per step: [`GuardMatcher::fill_mask`] sets
//! every disallowed logit to `-inf` (so greedy and sampled decoding are both constrained), the
//! caller samples, then [`GuardMatcher::accept`] advances the matcher.
//!
//! Fail closed: every problem (bad regex, bad Lark, a schema too big or too deep, a compile that
//! runs over its budget, a token the grammar does not allow) is a [`GuardError`] that names it.
//! Nothing here ever falls back to unconstrained decoding.
//!
//! # The policy grammar
//!
//! ```text
//! start:   ANSWER | REFUSAL
//! REFUSAL: "<the refusal text, verbatim>"
//! ANSWER:  BODY & ~FORBIDDEN
//! BODY:    /(?:[^\[\]\p{Cf}]|\[(?:1|2|...|n)\])+/
//! FORBIDDEN: /(?is).*(?:phrase-1|phrase-2|regex-3...).*/
//! (a regex written as a whole word, `[^a-z]word[^a-z]`, also gets a FORBIDDEN_EDGE lexeme for the
//! answer's start and end, which the lexer cannot anchor otherwise)
//! ```
//!
//! - The answer is one lexeme, so the "no forbidden phrase" condition holds over the whole
//!   answer at the byte level: it does not matter how the text is split into tokens, and a phrase
//!   that starts in the middle of a token or spans several is caught all the same.
//! - Forbidden phrases are case-insensitive (Unicode case folding). A literal phrase is split
//!   into words on whitespace and the words are joined by `[\s\-_]*`: any run of whitespace
//!   (including newlines), hyphens or underscores, or none ("full refund", "Full-Refund",
//!   "fullrefund", "FULL \n REFUND" are all blocked). Phrases are matched as substrings: "full
//!   refunds" is blocked too. A regex rule is used as written (inside `(?i)`).
//! - Square brackets are reserved for citation markers: `[k]` for k in 1..=citations is the only
//!   way `[` or `]` may appear in an answer; with `citations == 0` an answer has no brackets at
//!   all. Ordinary text uses parentheses instead. This keeps markers unambiguous for the code that
//!   maps them to sources.
//! - Invisible format characters (Unicode category Cf: zero-width spaces and joiners, soft
//!   hyphens, bidi controls) are not allowed in an answer: they are the cheap way to slip a
//!   phrase past a byte-level check and have no place in a support answer.
//! - The refusal is a separate branch: the whole answer may be exactly the refusal text, even if
//!   that text has brackets or would otherwise not be valid free text. It is reachable from the
//!   start; once the answer has left the refusal's prefix, it is free text (which may still
//!   contain the refusal's words when they are valid free text). The refusal itself must not
//!   contain a forbidden phrase (checked at compile time).
//! - Quote mode ([`Shape::Quote`]): the answer is a sequence of
//!   `"<sentence copied verbatim from passage i>" [i]` items with optional connective text from a
//!   fixed list ([`QUOTE_CONNECTIVES`]: "According to our help center, ", " Also, ", line breaks,
//!   ...) before, between and after them. Sentences that contain a forbidden phrase are left out.
//!
//! End of generation: the matcher allows the tokenizer's end-of-generation ids (eos, eot, the
//! template's end-of-turn) only when the grammar accepts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::{GrammarInit, ParserLimits, TopLevelGrammar};
use llguidance::{Logger, Matcher, ParserFactory};

use super::watchdog;
use sha2::{Digest, Sha256};
use toktrie::{InferenceCapabilities, SimpleVob, TokEnv};

use crate::tokenizer::Tokenizer;

/// A guard that cannot be built or cannot go on. Messages name the problem and, where there is
/// one, the bound.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuardError {
    #[error("the tokenizer cannot be used for constrained decoding: {0}")]
    Tokenizer(String),
    #[error("the {what} is {bytes} bytes; at most {max} bytes are allowed")]
    TooLarge { what: &'static str, bytes: usize, max: usize },
    #[error("the {what} is nested {depth} deep; at most {max} levels are allowed")]
    TooDeep { what: &'static str, depth: usize, max: usize },
    #[error("compiling took longer than {budget_ms} ms (stopped after {took_ms:.1} ms)")]
    TooSlow { budget_ms: u128, took_ms: f64 },
    #[error("the constraint's next-token mask took longer than {budget_ms} ms; it was stopped")]
    MaskTooSlow { budget_ms: u128 },
    #[error("the regex does not compile: {0}")]
    Regex(String),
    #[error("the Lark grammar does not compile: {0}")]
    Lark(String),
    #[error("the JSON schema does not compile: {0}")]
    JsonSchema(String),
    #[error("the forbidden pattern of rule `{rule}` {reason}")]
    Forbidden { rule: String, reason: String },
    #[error("the policy cannot be enforced: {0}")]
    Policy(String),
    #[error("the constraint allows no output at all")]
    Empty,
    #[error("the constraint and the policy pack leave no token that satisfies both")]
    DeadEnd,
    #[error("token {token} is not allowed by the constraint: {reason}")]
    Rejected { token: u32, reason: String },
    #[error("the constraint matcher failed: {0}")]
    Matcher(String),
}

/// Bounds on what a constraint may cost. Checked before and after compiling.
#[derive(Debug, Clone)]
pub struct GuardLimits {
    /// Grammar text (generated Lark, user Lark, regex, serialized schema), in bytes.
    pub max_grammar_bytes: usize,
    /// Nesting of JSON subschemas, or of brackets in a regex / Lark grammar.
    pub max_depth: usize,
    /// Wall time for compiling, including the first mask (which surfaces lexer errors early). The
    /// first mask is interrupted when it runs out (see [`super::watchdog`]), not measured after.
    pub compile_budget: Duration,
    /// Wall time for each later step (mask, token check, advance) of this constraint, interrupted
    /// the same way; `None` leaves only llguidance's fuel (the operator's own grammars).
    pub mask_budget: Option<Duration>,
    /// Highest citation marker a policy may allow.
    pub max_citations: usize,
    /// llguidance's own limits (lexer fuel, Earley items per mask, lexer states, ...).
    pub parser: ParserLimits,
}

impl Default for GuardLimits {
    fn default() -> Self {
        GuardLimits {
            max_grammar_bytes: 128 * 1024,
            max_depth: 32,
            compile_budget: Duration::from_millis(500),
            mask_budget: None,
            max_citations: 99,
            // A real pack forbids a hundred or so phrases: the lexer of "any text not containing one of
            // them" derives many more regex states on the first tokens than llguidance's defaults
            // (sized for JSON) allow. Measured on the shipped pack, the first masks of an answer need
            // about 10x the default step fuel; later ones hit the cached states.
            parser: ParserLimits {
                verbose_errors: false,
                step_lexer_fuel: 20_000_000,
                initial_lexer_fuel: 20_000_000,
                // Precomputing large lexemes against the whole vocabulary ran out of fuel on quote-mode
                // grammars (every passage sentence is an alternative, intersected with the pack), and
                // lazily built lexer states measured no slower on the answer grammar.
                precompute_large_lexemes: false,
                ..ParserLimits::default()
            },
        }
    }
}

/// What to constrain an answer to.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// The support policy: free text without forbidden phrases, citation markers, a refusal.
    Policy(PolicyGrammar),
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema. `strict == false` ignores schema keywords llguidance does not
    /// support (a looser constraint) instead of refusing the schema.
    JsonSchema { schema: serde_json::Value, strict: bool },
    /// A regex (Rust `regex` syntax plus llguidance's `&` and `~`) the whole output must match.
    Regex(String),
    /// A Lark grammar in llguidance's dialect.
    Lark(String),
}

/// The policy's grammar inputs. See the module doc for what each part allows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyGrammar {
    pub forbidden: Vec<Forbidden>,
    /// Markers `[1]`..`[citations]` are allowed; 0 means no brackets at all.
    pub citations: usize,
    /// A fixed text the model may emit instead of an answer (not used by [`Shape::Filter`]).
    pub refusal: String,
    pub shape: Shape,
}

/// What an answer under the policy looks like.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Shape {
    /// Free text (no brackets but citation markers), or the refusal.
    #[default]
    Answer,
    /// Quote mode: the answer quotes sentences of these passages verbatim (`[i]` after a
    /// sentence of passage i, counted from 1), with short connective text between quotes.
    Quote(Vec<String>),
    /// Only the forbidden phrases: any text without one (brackets allowed, no refusal branch).
    /// Run beside a client's structured-output constraint (see [`GuardMatcher::and`]) so a JSON
    /// answer or a regex-shaped answer cannot carry a forbidden commitment either. With `json`,
    /// the text is JSON: `\n`, `\r` and `\t` escapes count as word separators and `\u` escapes
    /// are not allowed (they could spell a phrase the byte-level check would not see).
    Filter { json: bool },
}

/// A phrase (or regex) the answer must never contain.
#[derive(Debug, Clone, PartialEq)]
pub struct Forbidden {
    /// The policy rule this belongs to; named in errors.
    pub rule: String,
    /// A literal phrase, or a regex when `regex` is set.
    pub pattern: String,
    pub regex: bool,
}

impl Forbidden {
    pub fn phrase(rule: &str, phrase: &str) -> Self {
        Forbidden { rule: rule.to_string(), pattern: phrase.to_string(), regex: false }
    }

    pub fn regex(rule: &str, regex: &str) -> Self {
        Forbidden { rule: rule.to_string(), pattern: regex.to_string(), regex: true }
    }
}

/// Compiles constraints for one tokenizer. Build once per model (building the token trie and the
/// llguidance factory walks the whole vocabulary); `compile` is then cheap to call per request.
pub struct GuardCompiler {
    factory: ParserFactory,
    limits: GuardLimits,
    eos: Arc<[u32]>,
}

impl std::fmt::Debug for GuardCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardCompiler").field("limits", &self.limits).field("eos", &self.eos).finish()
    }
}

impl GuardCompiler {
    pub fn new(tokenizer: &Arc<Tokenizer>) -> Result<Self, GuardError> {
        Self::with_limits(tokenizer, GuardLimits::default())
    }

    pub fn with_limits(tokenizer: &Arc<Tokenizer>, limits: GuardLimits) -> Result<Self, GuardError> {
        Self::from_env(super::env::tok_env(tokenizer)?, limits)
    }

    /// From an already built token environment (see [`super::env::tok_env`]).
    pub fn from_env(env: TokEnv, limits: GuardLimits) -> Result<Self, GuardError> {
        let eos: Arc<[u32]> = env.tok_trie().eos_tokens().into();
        let slices = llguidance::earley::SlicedBiasComputer::general_slices();
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &slices)
            .map_err(|e| GuardError::Tokenizer(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = limits.parser.clone();
        Ok(GuardCompiler { factory, limits, eos })
    }

    pub fn limits(&self) -> &GuardLimits {
        &self.limits
    }

    /// The end-of-generation ids the grammar allows once it accepts.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// Compiles `constraint`. Any failure, limit or budget overrun is an error; see [`GuardError`].
    pub fn compile(&self, constraint: &Constraint) -> Result<CompiledGuard, GuardError> {
        self.compile_within(constraint, &self.limits)
    }

    /// [`compile`](Self::compile) under other size, depth and time bounds (a client's grammar gets
    /// the operator's settings; the policy's own grammars the compiler's), including llguidance's
    /// own limits in `limits.parser`.
    pub fn compile_within(&self, constraint: &Constraint, limits: &GuardLimits) -> Result<CompiledGuard, GuardError> {
        let start = Instant::now();
        let (text, kind) = self.grammar_text(constraint, limits)?;
        if text.len() > limits.max_grammar_bytes {
            return Err(GuardError::TooLarge { what: kind.noun(), bytes: text.len(), max: limits.max_grammar_bytes });
        }
        let top = match constraint {
            Constraint::JsonObject | Constraint::JsonSchema { .. } => {
                let schema: serde_json::Value = serde_json::from_str(&text).map_err(|e| GuardError::JsonSchema(e.to_string()))?;
                TopLevelGrammar::from_json_schema(schema)
            }
            _ => TopLevelGrammar::from_lark(text.clone()),
        };
        let too_slow = || GuardError::TooSlow { budget_ms: limits.compile_budget.as_millis(), took_ms: start.elapsed().as_secs_f64() * 1e3 };
        let parser = self
            .factory
            .create_parser_from_init_ext(GrammarInit::Serialized(top), Logger::new(0, 0), InferenceCapabilities::default(), limits.parser.clone())
            .map_err(|e| kind.error(constraint, self, e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser)).into_cancellable();
        // The first mask runs the lexer for real: errors and an empty language show up here,
        // at compile time, rather than at the first decode step. It runs under what is left of
        // the budget and is stopped when that runs out.
        let left = limits.compile_budget.checked_sub(start.elapsed()).ok_or_else(too_slow)?;
        let handle = matcher.cancellation_handle().ok_or_else(|| GuardError::Matcher("the matcher cannot be cancelled".into()))?;
        let armed = watchdog::arm(handle, left);
        let first = matcher.compute_mask();
        let cancelled = matcher.is_cancelled() || armed.expired();
        drop(armed);
        if cancelled {
            return Err(too_slow());
        }
        let first = first.map_err(|e| kind.error(constraint, self, e.to_string()))?;
        if first.is_zero() {
            return Err(GuardError::Empty);
        }
        let accepting = matcher.is_accepting().map_err(|e| GuardError::Matcher(e.to_string()))?;
        let took = start.elapsed();
        let hash = format!("{:x}", Sha256::digest(text.as_bytes()));
        Ok(CompiledGuard { matcher, accepting, text, hash, compile_time: took, mask_budget: limits.mask_budget, eos: Arc::clone(&self.eos) })
    }

    /// The exact text handed to llguidance (Lark, or a serialized JSON schema), checked for depth.
    fn grammar_text(&self, constraint: &Constraint, limits: &GuardLimits) -> Result<(String, Kind), GuardError> {
        let max = limits.max_depth;
        match constraint {
            Constraint::Policy(p) => Ok((policy_lark(p, limits)?, Kind::Policy)),
            Constraint::JsonObject => Ok((r#"{"type":"object"}"#.to_string(), Kind::Json)),
            Constraint::JsonSchema { schema, strict } => {
                // Counted exactly up to a cap well past the limit, so errors can say how deep.
                let depth = schema_depth(schema, max.saturating_mul(4).max(128));
                if depth > max {
                    return Err(GuardError::TooDeep { what: "JSON schema", depth, max });
                }
                let mut schema = schema.clone();
                if !*strict {
                    if let Some(obj) = schema.as_object_mut() {
                        obj.insert("x-guidance".into(), serde_json::json!({ "lenient": true }));
                    } else if !schema.is_boolean() {
                        return Err(GuardError::JsonSchema("a schema must be an object or a boolean".into()));
                    }
                }
                Ok((schema.to_string(), Kind::Json))
            }
            Constraint::Regex(rx) => {
                check_depth("regex", rx, max)?;
                if rx.len() > limits.max_grammar_bytes {
                    return Err(GuardError::TooLarge { what: "regex", bytes: rx.len(), max: limits.max_grammar_bytes });
                }
                Ok((format!("start: /{}/", llguidance::regex_to_lark(rx, "")), Kind::Regex))
            }
            Constraint::Lark(g) => {
                check_depth("Lark grammar", g, max)?;
                Ok((g.clone(), Kind::Lark))
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Policy,
    Json,
    Regex,
    Lark,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::Policy => "policy grammar",
            Kind::Json => "JSON schema",
            Kind::Regex => "regex",
            Kind::Lark => "Lark grammar",
        }
    }

    fn error(self, constraint: &Constraint, compiler: &GuardCompiler, msg: String) -> GuardError {
        let msg = tidy(&msg);
        match self {
            Kind::Json => GuardError::JsonSchema(msg),
            Kind::Regex => GuardError::Regex(msg),
            Kind::Lark => GuardError::Lark(msg),
            // Our generated grammar only fails through a rule's regex; find and name it.
            Kind::Policy => match constraint {
                Constraint::Policy(p) => blame_rule(compiler, p).unwrap_or(GuardError::Policy(msg)),
                _ => GuardError::Policy(msg),
            },
        }
    }
}

/// One line, at most 400 characters. Regex parse errors span lines (the pattern, a caret, then
/// `error: <what>`): keep the headline and the `error:` line.
fn tidy(msg: &str) -> String {
    let lines: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = match (lines.first(), lines.iter().find(|l| l.starts_with("error:"))) {
        (Some(head), Some(detail)) => format!("{head} {}", detail.trim_start_matches("error:").trim()),
        _ => lines.join(" "),
    };
    line.chars().take(400).collect()
}

/// Compiles each regex rule alone to find the one that breaks the policy grammar.
fn blame_rule(compiler: &GuardCompiler, p: &PolicyGrammar) -> Option<GuardError> {
    p.forbidden.iter().filter(|f| f.regex).find_map(|f| {
        let lark = format!("start: /{}/", llguidance::regex_to_lark(&contains(&forbidden_regex(f, false)), ""));
        let parser = compiler.factory.create_parser(TopLevelGrammar::from_lark(lark));
        let err = match parser {
            Err(e) => Some(e.to_string()),
            Ok(parser) => Matcher::new(Ok(parser)).compute_mask().err().map(|e| e.to_string()),
        };
        err.map(|e| GuardError::Forbidden { rule: f.rule.clone(), reason: format!("does not compile: {}", tidy(&e)) })
    })
}

/// Case-insensitive regex (no anchors) matching one forbidden phrase or pattern. In JSON text,
/// the escapes `\n`, `\r`, `\t` separate words too.
fn forbidden_regex(f: &Forbidden, json: bool) -> String {
    if f.regex {
        format!("(?:{})", f.pattern)
    } else {
        let sep = if json { r"(?:[\s\-_]|\\[nrt])*" } else { r"[\s\-_]*" };
        let words: Vec<String> = f.pattern.split_whitespace().map(regex::escape).collect();
        format!("(?:{})", words.join(sep))
    }
}

/// "Contains `rx` somewhere", case-insensitive, `.` matching newlines too.
fn contains(rx: &str) -> String {
    format!("(?is).*{rx}.*")
}

/// The union of all forbidden patterns, validated one by one (with names) with the `regex` crate,
/// whose syntax llguidance's lexer shares; `None` when there are none.
fn forbidden_union(p: &PolicyGrammar, max_depth: usize) -> Result<Option<String>, GuardError> {
    let json = matches!(p.shape, Shape::Filter { json: true });
    let mut parts = Vec::with_capacity(p.forbidden.len());
    for f in &p.forbidden {
        let fail = |reason: String| GuardError::Forbidden { rule: f.rule.clone(), reason };
        if f.pattern.trim().is_empty() {
            return Err(fail("is empty".into()));
        }
        if f.regex {
            let depth = nesting_depth(&f.pattern);
            if depth > max_depth {
                return Err(fail(format!("is nested {depth} deep; at most {max_depth} levels are allowed")));
            }
        }
        let rx = forbidden_regex(f, json);
        let whole = regex::Regex::new(&format!("(?i)^{rx}$")).map_err(|e| fail(format!("does not compile: {}", tidy(&e.to_string()))))?;
        if whole.is_match("") {
            return Err(fail("matches the empty text, so it would forbid every answer".into()));
        }
        parts.push(rx);
    }
    Ok((!parts.is_empty()).then(|| format!("(?:{})", parts.join("|"))))
}

/// A non-letter, as a forbidden pattern writes it to mark a whole word: `[^a-z]sage[^a-z]`.
const NON_LETTER: &str = "[^a-z]";
/// What ends a number in a bound pattern (see [`super::bounds`]): `$5,000[^0-9,]`.
pub const NUMBER_END: &str = "[^0-9,]";
/// What comes before a number in a bound pattern: `[^0-9]60 days`.
pub const NUMBER_START: &str = "[^0-9]";

/// llguidance's lexer has no anchors or look-around, so a whole-word pattern (`[^a-z]word[^a-z]`)
/// would miss the word at the very start or end of the answer, and a bound pattern that ends a
/// number with [`NUMBER_END`] would miss an amount that ends the answer. These are the same
/// patterns with the edge classes dropped, anchored at the answer's start, end, or both (a lexeme
/// matches the whole answer): `(?is)(?:word[^a-z]).*|.*(?:[^a-z]word)|(?:word)`. `None` when no
/// pattern has one.
fn edge_variants(p: &PolicyGrammar) -> Option<String> {
    let mut alts = Vec::new();
    for f in p.forbidden.iter().filter(|f| f.regex) {
        let start = f.pattern.strip_prefix(NON_LETTER).or_else(|| f.pattern.strip_prefix(NUMBER_START));
        let end = f.pattern.strip_suffix(NON_LETTER).or_else(|| f.pattern.strip_suffix(NUMBER_END));
        if let Some(rest) = start {
            alts.push(format!("(?:{rest}).*"));
        }
        if let Some(rest) = end {
            alts.push(format!(".*(?:{rest})"));
        }
        if let Some(both) = start.and_then(|s| s.strip_suffix(NON_LETTER)) {
            alts.push(format!("(?:{both})"));
        }
    }
    (!alts.is_empty()).then(|| format!("(?is)(?:{})", alts.join("|")))
}

/// The Lark text of a policy (see the module doc).
fn policy_lark(p: &PolicyGrammar, limits: &GuardLimits) -> Result<String, GuardError> {
    let filter_only = matches!(p.shape, Shape::Filter { .. });
    if !filter_only && p.refusal.trim().is_empty() {
        return Err(GuardError::Policy("the refusal text is empty; the model needs a way to decline".into()));
    }
    if p.citations > limits.max_citations {
        return Err(GuardError::Policy(format!(
            "{} citation markers requested; at most {} are allowed",
            p.citations, limits.max_citations
        )));
    }
    let forbidden = forbidden_union(p, limits.max_depth)?;
    let checker = match &forbidden {
        Some(rx) => Some(regex::Regex::new(&format!("(?i){rx}")).map_err(|e| GuardError::Policy(e.to_string()))?),
        None => None,
    };
    if let Some(m) = checker.as_ref().and_then(|c| c.find(&p.refusal)) {
        return Err(GuardError::Policy(format!("the refusal text contains a forbidden phrase (\"{}\")", m.as_str())));
    }
    let edges = edge_variants(p);
    let not_forbidden = match (forbidden.is_some(), edges.is_some()) {
        (true, true) => " & ~FORBIDDEN & ~FORBIDDEN_EDGE",
        (true, false) => " & ~FORBIDDEN",
        _ => "",
    };

    let mut g = String::new();
    if !filter_only {
        g.push_str(&format!("REFUSAL: {}\n", lark_string(&p.refusal)));
    }
    if let Some(rx) = &forbidden {
        g.push_str(&format!("FORBIDDEN: /{}/\n", llguidance::regex_to_lark(&contains(rx), "")));
    }
    if let Some(rx) = &edges {
        g.push_str(&format!("FORBIDDEN_EDGE: /{}/\n", llguidance::regex_to_lark(rx, "")));
    }
    match &p.shape {
        Shape::Filter { json } => {
            // JSON text: no `\u` escapes (a phrase spelled with them would pass the byte check).
            let text = if *json { r"(?:[^\\\p{Cf}]|\\[^u\p{Cf}])+" } else { r"[^\p{Cf}]+" };
            g.insert_str(0, "start: TEXT\n");
            g.push_str(&format!("TEXT: /(?s:{text})/{not_forbidden}\n"));
        }
        Shape::Answer => {
            let marker = if p.citations == 0 {
                String::new()
            } else {
                let ks: Vec<String> = (1..=p.citations).map(|k| k.to_string()).collect();
                format!(r"|\[(?:{})\]", ks.join("|"))
            };
            g.insert_str(0, "start: ANSWER | REFUSAL\n");
            g.push_str(&format!("ANSWER: BODY{not_forbidden}\n"));
            g.push_str(&format!("BODY: /(?:[^\\[\\]\\p{{Cf}}]{marker})+/\n"));
        }
        Shape::Quote(passages) => {
            let mut quotes = Vec::new();
            for (i, passage) in passages.iter().enumerate() {
                for s in sentences(passage) {
                    if checker.as_ref().is_some_and(|c| c.is_match(s)) {
                        continue;
                    }
                    quotes.push(lark_string(&format!("\"{s}\" [{}]", i + 1)));
                }
            }
            if quotes.is_empty() {
                return Err(GuardError::Policy("quote mode has no sentence to quote (no passages, or every sentence has a forbidden phrase)".into()));
            }
            g.insert_str(0, "start: quoted | REFUSAL\nquoted: (CONN? QUOTE)+ CONN?\n");
            g.push_str(&format!("QUOTE: {}\n", quotes.join("\n     | ")));
            // Connective text comes from a fixed list: free text intersected with a real pack's
            // forbidden phrases made the quote grammar's lexer too large to build on every request.
            let conns: Vec<String> = QUOTE_CONNECTIVES.iter().map(|c| lark_string(c)).collect();
            g.push_str(&format!("CONN: {}\n", conns.join(" | ")));
        }
    }
    Ok(g)
}

/// What quote mode allows between quotes (whitespace around quotes is part of these).
pub const QUOTE_CONNECTIVES: &[&str] = &[
    " ",
    "\n",
    "\n\n",
    "\n- ",
    "- ",
    "According to our help center, ",
    "Our help center says: ",
    "Here is what applies: ",
    " Also, ",
    " In addition, ",
    " Note: ",
    "Yes. ",
    "No. ",
];

/// A Lark string literal (Lark strings are JSON strings).
fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Sentences of a passage: split after `.`, `!` or `?` followed by whitespace; trimmed.
/// Fewest words a quotable sentence has.
const MIN_SENTENCE_WORDS: usize = 3;

/// A fragment shorter than [`MIN_SENTENCE_WORDS`] (a list number like "1.", "e.g.") joins the next.
fn sentences(passage: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev_end = false;
    for (i, c) in passage.char_indices() {
        if prev_end && c.is_whitespace() {
            let s = passage[start..i].trim();
            if s.split_whitespace().count() >= MIN_SENTENCE_WORDS {
                out.push(s);
                start = i;
            }
        }
        prev_end = matches!(c, '.' | '!' | '?');
    }
    let s = passage[start..].trim();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// Nesting of JSON subschemas (properties, items, anyOf, $defs, ...). Stops counting past `cap`.
fn schema_depth(v: &serde_json::Value, cap: usize) -> usize {
    fn go(v: &serde_json::Value, level: usize, cap: usize) -> usize {
        let Some(obj) = v.as_object() else { return level.saturating_sub(1) };
        if level >= cap {
            return level;
        }
        let mut deepest = level;
        let mut visit = |child: &serde_json::Value| deepest = deepest.max(go(child, level + 1, cap));
        for (key, child) in obj {
            match key.as_str() {
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                    child.as_object().into_iter().flat_map(|m| m.values()).for_each(&mut visit)
                }
                "anyOf" | "oneOf" | "allOf" | "prefixItems" => child.as_array().into_iter().flatten().for_each(&mut visit),
                "items" if child.is_array() => child.as_array().into_iter().flatten().for_each(&mut visit),
                "items" | "additionalProperties" | "additionalItems" | "not" | "if" | "then" | "else" | "contains"
                | "propertyNames" | "unevaluatedProperties" | "unevaluatedItems" => visit(child),
                _ => {}
            }
        }
        deepest
    }
    go(v, 1, cap)
}

/// Bracket nesting of a regex or Lark text; escaped brackets and those inside "..." literals
/// are not counted.
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut escaped, mut in_string) = (0usize, 0usize, false, false);
    for c in text.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => in_string = !in_string,
            _ if in_string => {}
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn check_depth(what: &'static str, text: &str, max: usize) -> Result<(), GuardError> {
    let depth = nesting_depth(text);
    if depth > max {
        return Err(GuardError::TooDeep { what, depth, max });
    }
    Ok(())
}

/// A compiled constraint: shareable, and the source of one [`GuardMatcher`] per sequence.
#[derive(Clone)]
pub struct CompiledGuard {
    /// Started and with its first mask computed; cloned per sequence.
    matcher: Matcher,
    accepting: bool,
    text: String,
    hash: String,
    compile_time: Duration,
    mask_budget: Option<Duration>,
    eos: Arc<[u32]>,
}

impl std::fmt::Debug for CompiledGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledGuard").field("hash", &self.hash).field("compile_time", &self.compile_time).finish()
    }
}

impl CompiledGuard {
    /// sha256 (hex) of the grammar text; reported to clients so they can tell which rules applied.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The grammar llguidance compiled (Lark, or a serialized JSON schema).
    pub fn grammar_text(&self) -> &str {
        &self.text
    }

    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// A fresh matcher for one sequence.
    pub fn matcher(&self) -> GuardMatcher {
        GuardMatcher { parts: vec![Part { inner: self.matcher.clone(), accepting: self.accepting, budget: self.mask_budget }], eos: Arc::clone(&self.eos) }
    }
}

/// What one mask computation did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskStats {
    /// Time to compute the mask and apply it to the logits.
    pub elapsed: Duration,
    /// Tokens left allowed.
    pub allowed: usize,
    /// Whether an end-of-generation id is among them.
    pub eos_allowed: bool,
}

/// The constraint's state for one sequence. `clone` forks it (e.g. for n > 1 choices that share
/// a prefix). It may hold several constraints at once ([`GuardMatcher::and`]): a token is allowed
/// only when every one of them allows it.
#[derive(Clone)]
pub struct GuardMatcher {
    parts: Vec<Part>,
    eos: Arc<[u32]>,
}

#[derive(Clone)]
struct Part {
    inner: Matcher,
    accepting: bool,
    /// Wall time for each step of this constraint (see [`GuardLimits::mask_budget`]).
    budget: Option<Duration>,
}

impl Part {
    /// Runs one matcher step, interrupted when it overruns the part's budget.
    fn step<T>(&mut self, f: impl FnOnce(&mut Matcher) -> anyhow::Result<T>, fail: impl FnOnce(anyhow::Error) -> GuardError) -> Result<T, GuardError> {
        let Some(budget) = self.budget else {
            return f(&mut self.inner).map_err(fail);
        };
        let armed = self.inner.cancellation_handle().map(|h| watchdog::arm(h, budget));
        let out = f(&mut self.inner);
        drop(armed);
        if self.inner.is_cancelled() {
            return Err(GuardError::MaskTooSlow { budget_ms: budget.as_millis() });
        }
        out.map_err(fail)
    }

    fn mask(&mut self) -> Result<SimpleVob, GuardError> {
        self.step(|m| m.compute_mask_or_eos(), |e| GuardError::Matcher(tidy(&e.to_string())))
    }
}

impl std::fmt::Debug for GuardMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardMatcher")
            .field("parts", &self.parts.len())
            .field("accepting", &self.is_accepting())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl GuardMatcher {
    /// Both constraints at once: the output must satisfy `self` and `other` (e.g. a client's JSON
    /// schema and the policy pack's forbidden phrases). The languages are intersected token by
    /// token; when they leave no common token, [`fill_mask`](Self::fill_mask) fails with
    /// [`GuardError::DeadEnd`] rather than letting either go unconstrained.
    pub fn and(mut self, other: GuardMatcher) -> GuardMatcher {
        self.parts.extend(other.parts);
        self
    }

    /// Sets every logit the constraint does not allow to `-inf`; logits past the vocabulary
    /// (padded output heads) too. Once the grammar has finished, only end-of-generation ids stay.
    pub fn fill_mask(&mut self, logits: &mut [f32]) -> Result<MaskStats, GuardError> {
        let start = Instant::now();
        let mask = self.mask()?;
        let allowed = mask.num_set();
        if allowed == 0 {
            return Err(if self.parts.len() > 1 { GuardError::DeadEnd } else { GuardError::Matcher("no token is allowed in this state".into()) });
        }
        apply(&mask, logits);
        let eos_allowed = self.eos.iter().any(|&t| mask.is_allowed(t));
        Ok(MaskStats { elapsed: start.elapsed(), allowed, eos_allowed })
    }

    /// The fast path for several constraints: only the first one's mask (its logits then hold a
    /// superset of what all allow). The caller samples, asks [`others_allow`](Self::others_allow)
    /// about the token, and only when another constraint refuses it computes the full mask with
    /// [`fill_mask`](Self::fill_mask) and samples again. Other constraints (the pack's bounds, say)
    /// rarely bind, so most tokens cost one mask plus a cheap check. Greedy decoding picks the same
    /// token either way; sampled decoding keeps its distribution (a rejected draw is redrawn from
    /// the full mask, which renormalises exactly over the allowed tokens).
    pub fn fill_first_mask(&mut self, logits: &mut [f32]) -> Result<MaskStats, GuardError> {
        if self.parts.len() == 1 {
            return self.fill_mask(logits);
        }
        let start = Instant::now();
        let mask = self.parts[0].mask()?;
        let allowed = mask.num_set();
        if allowed == 0 {
            return Err(GuardError::Matcher("no token is allowed in this state".into()));
        }
        apply(&mask, logits);
        let eos_allowed = self.eos.iter().any(|&t| mask.is_allowed(t));
        Ok(MaskStats { elapsed: start.elapsed(), allowed, eos_allowed })
    }

    /// Whether every constraint but the first allows `token` next (see
    /// [`fill_first_mask`](Self::fill_first_mask)). Nothing is consumed.
    pub fn others_allow(&mut self, token: u32) -> Result<bool, GuardError> {
        let eos = self.eos.contains(&token);
        for p in self.parts.iter_mut().skip(1) {
            if eos {
                if !(p.accepting || p.inner.is_stopped()) {
                    return Ok(false);
                }
                continue;
            }
            if p.inner.is_stopped() {
                return Ok(false);
            }
            let n = p.step(|m| m.validate_tokens(&[token]), |e| GuardError::Matcher(tidy(&e.to_string())))?;
            if n != 1 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// How many constraints run together.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// The allowed token set (llguidance's bit vector), for callers that need more than -inf.
    ///
    /// With several constraints, their masks are computed in parallel (the model is idle while
    /// masks are computed, so its threads are free) and intersected.
    pub fn mask(&mut self) -> Result<SimpleVob, GuardError> {
        use rayon::prelude::*;
        let one = |p: &mut Part| p.mask();
        let mut masks = if self.parts.len() == 1 {
            self.parts.iter_mut().map(one).collect::<Result<Vec<_>, _>>()?
        } else {
            self.parts.par_iter_mut().map(one).collect::<Result<Vec<_>, _>>()?
        };
        let mut mask = masks.pop().ok_or_else(|| GuardError::Matcher("no constraint".into()))?;
        for m in &masks {
            mask.and(m);
        }
        Ok(mask)
    }

    /// Advances past the sampled token. A token the mask did not allow is an error, and the
    /// matcher stays failed (every later call errors).
    pub fn accept(&mut self, token: u32) -> Result<(), GuardError> {
        let eos = self.eos.contains(&token);
        for p in &mut self.parts {
            if eos && p.inner.is_stopped() {
                continue;
            }
            p.step(|m| m.consume_token(token), |e| GuardError::Rejected { token, reason: tidy(&e.to_string()) })?;
            p.accepting = p.inner.is_accepting().unwrap_or(false);
        }
        Ok(())
    }

    /// Whether the output so far is complete (end-of-generation would be allowed now).
    pub fn is_accepting(&self) -> bool {
        self.parts.iter().all(|p| p.accepting || p.inner.is_stopped())
    }

    /// A grammar has finished (or failed): only end-of-generation may follow.
    pub fn is_stopped(&self) -> bool {
        self.parts.iter().any(|p| p.inner.is_stopped())
    }

    /// The end-of-generation ids, allowed when [`is_accepting`](Self::is_accepting).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
}

/// `-inf` on every logit whose bit is clear in `mask` (and past its end).
fn apply(mask: &SimpleVob, logits: &mut [f32]) {
    let vocab = mask.len().min(logits.len());
    let (logits, past_end) = logits.split_at_mut(vocab);
    past_end.fill(f32::NEG_INFINITY);
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX && chunk.len() == 32 {
            continue;
        }
        for (b, logit) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_after_terminal_punctuation() {
        assert_eq!(sentences("One. Two!  Three? v1.2 stays\nFour"), vec!["One. Two!  Three?", "v1.2 stays\nFour"]);
        assert_eq!(sentences("1. Go to the sign-in page. 2. Enter your email here."), vec!["1. Go to the sign-in page.", "2. Enter your email here."]);
        assert!(sentences("  ").is_empty());
    }

    #[test]
    fn depth_counts_subschemas_and_brackets() {
        let s = serde_json::json!({"type": "object", "properties": {"a": {"type": "array", "items": {"anyOf": [{"type": "string"}]}}}});
        assert_eq!(schema_depth(&s, 100), 4);
        assert_eq!(schema_depth(&serde_json::json!(true), 100), 0);
        assert_eq!(nesting_depth(r"((a)|\(b\)|[c])"), 2);
        assert_eq!(nesting_depth(r#"start: "((((" (x)"#), 1);
    }

    #[test]
    fn phrases_get_flexible_separators_and_rules_are_checked() {
        let f = Forbidden::phrase("r", "100% uptime");
        assert_eq!(forbidden_regex(&f, false), r"(?:100%[\s\-_]*uptime)");
        assert_eq!(forbidden_regex(&f, true), r"(?:100%(?:[\s\-_]|\\[nrt])*uptime)");
        let p = PolicyGrammar { forbidden: vec![f], citations: 2, refusal: "No.".into(), shape: Shape::Answer };
        let lark = policy_lark(&p, &GuardLimits::default()).unwrap();
        assert!(lark.starts_with("start: ANSWER | REFUSAL\n"), "{lark}");
        assert!(lark.contains(r"\[(?:1|2)\]"), "{lark}");
        assert!(lark.contains("ANSWER: BODY & ~FORBIDDEN"), "{lark}");
        let empty = PolicyGrammar { forbidden: vec![Forbidden::regex("e", "(x)?")], ..p };
        assert!(matches!(policy_lark(&empty, &GuardLimits::default()), Err(GuardError::Forbidden { .. })));
    }

    #[test]
    fn tidy_keeps_the_regex_error_line() {
        let msg = "regex parse error:\n    (a\n    ^\nerror: unclosed group";
        assert_eq!(tidy(msg), "regex parse error: unclosed group");
    }
}
