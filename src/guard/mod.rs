//! Guardrails: the policy pack an operator edits (`policy`), the escalation triggers read from the
//! customer's message (`escalation`), and decode-time constraints (`env`, `grammar`: llguidance on
//! the project's own tokenizer, applied to the logits before sampling).
//!
//! Knows the tokenizer; nothing of the engine or the server.

pub mod bounds;
pub mod commitment;
pub mod env;
pub mod escalation;
pub mod grammar;
pub mod policy;
pub mod watchdog;

use std::path::Path;

use policy::{PolicyError, PolicyPack};

/// A validated pack with its message-side rules compiled: what a server swaps in whole.
pub struct ActivePolicy {
    pub pack: PolicyPack,
    pub triggers: escalation::Triggers,
    /// The pack's answer grammar by number of citable passages, compiled on first use. Matchers of
    /// one compiled grammar share its lexer caches, so after the first answers a mask costs a
    /// fraction of a cold one.
    grammars: std::sync::Mutex<std::collections::HashMap<GrammarKey, grammar::CompiledGuard>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum GrammarKey {
    /// The answer grammar for this many citable passages.
    Answer(usize),
    /// The forbidden-phrase filter run beside a structured output; `true` for JSON text.
    Filter(bool),
    /// The bounds rules alone (their own lexer: in one lexeme with the phrases, the number
    /// patterns made llguidance's derivative lexer run out of fuel); `true` for JSON text.
    Bounds(bool),
}

/// A policy's constraint for one answer: the matcher (one or more grammars enforced together)
/// and a hash naming exactly which grammars those are.
pub struct Guarded {
    pub matcher: grammar::GuardMatcher,
    /// sha256 (hex) over the grammars' own hashes, in order.
    pub hash: String,
}

impl Guarded {
    fn of(parts: &[&grammar::CompiledGuard]) -> Guarded {
        use sha2::Digest;
        let mut matcher = parts[0].matcher();
        let mut h = sha2::Sha256::new();
        h.update(parts[0].hash());
        for p in &parts[1..] {
            matcher = matcher.and(p.matcher());
            h.update(p.hash());
        }
        let hash = if parts.len() == 1 { parts[0].hash().to_string() } else { format!("{:x}", h.finalize()) };
        Guarded { matcher, hash }
    }
}

/// The pack's own grammars are the operator's trusted config: compiled under the compiler's size
/// and depth limits but without the per-request time budget (meant for clients' grammars), which a
/// busy machine could otherwise overrun and turn into a failed answer. llguidance's fuel still
/// bounds the work.
fn compile_pack(compiler: &grammar::GuardCompiler, spec: grammar::PolicyGrammar) -> Result<grammar::CompiledGuard, grammar::GuardError> {
    let limits = grammar::GuardLimits { compile_budget: std::time::Duration::from_secs(120), ..compiler.limits().clone() };
    compiler.compile_within(&grammar::Constraint::Policy(spec), &limits)
}

impl ActivePolicy {
    pub fn load(path: &Path) -> Result<ActivePolicy, PolicyError> {
        let pack = PolicyPack::load(path)?;
        let triggers = escalation::Triggers::new(&pack).map_err(|mut e| {
            e.source_name = Some(path.display().to_string());
            e
        })?;
        Ok(ActivePolicy { pack, triggers, grammars: Default::default() })
    }

    /// Everything the pack enforces on a free-text answer that may cite `citations` passages: the
    /// answer grammar and the bounds.
    pub fn answer_guard(&self, compiler: &grammar::GuardCompiler, citations: usize) -> Result<Guarded, grammar::GuardError> {
        let answer = self.answer_grammar(compiler, citations)?;
        Ok(match self.bounds_grammar(compiler, false)? {
            Some(b) => Guarded::of(&[&answer, &b]),
            None => Guarded::of(&[&answer]),
        })
    }

    /// Quote mode: the quote grammar alone (its sentences are the docs' own, so bounds hold).
    pub fn quote_guard(&self, compiler: &grammar::GuardCompiler, passages: Vec<String>) -> Result<Guarded, grammar::GuardError> {
        Ok(Guarded::of(&[&self.quote_grammar(compiler, passages)?]))
    }

    /// A client's structured output under the pack: their grammar, the forbidden phrases and the
    /// bounds, all enforced per token.
    pub fn structured_guard(
        &self,
        compiler: &grammar::GuardCompiler,
        client: &grammar::CompiledGuard,
        json: bool,
    ) -> Result<Guarded, grammar::GuardError> {
        let filter = self.filter_grammar(compiler, json)?;
        Ok(match self.bounds_grammar(compiler, json)? {
            Some(b) => Guarded::of(&[client, &filter, &b]),
            None => Guarded::of(&[client, &filter]),
        })
    }

    /// The bounds rules as their own any-text grammar; `None` when the pack has none.
    pub fn bounds_grammar(&self, compiler: &grammar::GuardCompiler, json: bool) -> Result<Option<grammar::CompiledGuard>, grammar::GuardError> {
        if self.pack.bounds.is_empty() {
            return Ok(None);
        }
        let forbidden = self.pack.bounds.iter().flat_map(bounds::forbidden).collect();
        let spec = grammar::PolicyGrammar { forbidden, citations: 0, refusal: String::new(), shape: grammar::Shape::Filter { json } };
        self.cached(compiler, GrammarKey::Bounds(json), spec).map(Some)
    }

    /// The pack's grammar for an answer that may cite `citations` passages: no forbidden commitment
    /// in any casing or token split, markers only for the passages given, and the refusal as a
    /// branch the model may take instead of answering.
    pub fn answer_grammar(&self, compiler: &grammar::GuardCompiler, citations: usize) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let spec = grammar::PolicyGrammar { forbidden: self.forbidden(), citations, refusal: self.pack.messages.refusal.clone(), shape: grammar::Shape::Answer };
        self.cached(compiler, GrammarKey::Answer(citations), spec)
    }

    /// The pack's forbidden phrases (and bounds) alone, to run beside a client's structured-output
    /// constraint ([`grammar::GuardMatcher::and`]): a JSON or regex-shaped answer cannot carry a
    /// forbidden commitment either. `json`: the text is JSON (escapes are read as such).
    pub fn filter_grammar(&self, compiler: &grammar::GuardCompiler, json: bool) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let spec = grammar::PolicyGrammar { forbidden: self.forbidden(), citations: 0, refusal: String::new(), shape: grammar::Shape::Filter { json } };
        self.cached(compiler, GrammarKey::Filter(json), spec)
    }

    fn cached(&self, compiler: &grammar::GuardCompiler, key: GrammarKey, spec: grammar::PolicyGrammar) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let mut cache = self.grammars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = cache.get(&key) {
            return Ok(g.clone());
        }
        let compiled = compile_pack(compiler, spec)?;
        cache.insert(key, compiled.clone());
        Ok(compiled)
    }

    /// Compiles every grammar an answer may need (citation counts 0..=`max_citations`, the
    /// structured-output filters, the bounds), so no customer waits for a first compile.
    pub fn precompile(&self, compiler: &grammar::GuardCompiler, max_citations: usize) -> Result<(), grammar::GuardError> {
        for n in 0..=max_citations {
            self.answer_grammar(compiler, n)?;
        }
        for json in [false, true] {
            self.filter_grammar(compiler, json)?;
            self.bounds_grammar(compiler, json)?;
        }
        Ok(())
    }

    /// Ids of the rules a guarded answer is constrained by while decoding.
    /// The first forbidden-phrase rule `text` breaks, by id (a phrase as whole words, or a
    /// pattern). For text no model wrote (an action's confirmation or result, filled from the
    /// backend), checked before it is shown.
    pub fn forbidden_hit(&self, text: &str) -> Option<String> {
        // Lower case, punctuation as spaces, one space between words, padded to match whole words.
        let words = |t: &str| {
            let spaced: String = policy::normalize(t).chars().map(|c| if c.is_alphanumeric() || c == '\'' { c } else { ' ' }).collect();
            format!(" {} ", spaced.split_whitespace().collect::<Vec<_>>().join(" "))
        };
        let hay = words(text);
        for rule in &self.pack.forbidden {
            if rule.phrases.iter().map(|p| words(p)).any(|p| p.trim() != "" && hay.contains(&p)) {
                return Some(rule.id.clone());
            }
            if rule.patterns.iter().any(|p| policy::compile_pattern(&rule.id, p).is_ok_and(|re| re.is_match(text))) {
                return Some(rule.id.clone());
            }
        }
        None
    }

    pub fn decode_rules(&self) -> Vec<String> {
        self.pack.forbidden.iter().map(|r| r.id.clone()).chain(self.pack.bounds.iter().map(|r| r.id.clone())).collect()
    }

    /// The pack's grammar in quote mode: the answer's sentences are copied verbatim from `passages`
    /// (each followed by its marker), with short connective text between them, so the model cannot
    /// state what the passages do not say. Compiled per answer (the passages differ every time).
    pub fn quote_grammar(&self, compiler: &grammar::GuardCompiler, passages: Vec<String>) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let citations = passages.len();
        let spec =
            grammar::PolicyGrammar { forbidden: self.forbidden(), citations, refusal: self.pack.messages.refusal.clone(), shape: grammar::Shape::Quote(passages) };
        compile_pack(compiler, spec)
    }

    fn forbidden(&self) -> Vec<grammar::Forbidden> {
        self.pack
            .forbidden
            .iter()
            .flat_map(|r| {
                let phrases = r.phrases.iter().map(move |p| grammar::Forbidden::phrase(&r.id, p));
                let patterns = r.patterns.iter().map(move |p| grammar::Forbidden::regex(&r.id, p));
                phrases.chain(patterns)
            })
            .collect()
    }
}
