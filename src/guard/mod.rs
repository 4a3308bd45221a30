//! Guardrails: the policy pack an operator edits (`policy`), the escalation triggers read from the
//! customer's message (`escalation`), and decode-time constraints (`env`, `grammar`: llguidance on
//! the project's own tokenizer, applied to the logits before sampling).
//!
//! Knows the tokenizer; nothing of the engine or the server.

pub mod env;
pub mod escalation;
pub mod grammar;
pub mod policy;

use std::path::Path;

use policy::{PolicyError, PolicyPack};

/// A validated pack with its message-side rules compiled: what a server swaps in whole.
pub struct ActivePolicy {
    pub pack: PolicyPack,
    pub triggers: escalation::Triggers,
    /// The pack's answer grammar by number of citable passages, compiled on first use. Matchers of
    /// one compiled grammar share its lexer caches, so after the first answers a mask costs a
    /// fraction of a cold one.
    grammars: std::sync::Mutex<std::collections::HashMap<usize, grammar::CompiledGuard>>,
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

    /// The pack's grammar for an answer that may cite `citations` passages: no forbidden commitment
    /// in any casing or token split, markers only for the passages given, and the refusal as a
    /// branch the model may take instead of answering.
    pub fn answer_grammar(&self, compiler: &grammar::GuardCompiler, citations: usize) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let mut cache = self.grammars.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = cache.get(&citations) {
            return Ok(g.clone());
        }
        let spec = grammar::PolicyGrammar { forbidden: self.forbidden(), citations, refusal: self.pack.messages.refusal.clone(), quote_sources: None };
        let compiled = compiler.compile(&grammar::Constraint::Policy(spec))?;
        cache.insert(citations, compiled.clone());
        Ok(compiled)
    }

    /// The pack's grammar in quote mode: the answer's sentences are copied verbatim from `passages`
    /// (each followed by its marker), with short connective text between them, so the model cannot
    /// state what the passages do not say. Compiled per answer (the passages differ every time).
    pub fn quote_grammar(&self, compiler: &grammar::GuardCompiler, passages: Vec<String>) -> Result<grammar::CompiledGuard, grammar::GuardError> {
        let citations = passages.len();
        let spec =
            grammar::PolicyGrammar { forbidden: self.forbidden(), citations, refusal: self.pack.messages.refusal.clone(), quote_sources: Some(passages) };
        compiler.compile(&grammar::Constraint::Policy(spec))
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
