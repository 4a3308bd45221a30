//! Escalation triggers and out-of-scope topics, read from the customer's messages with the pack's
//! phrases and patterns. The decision is made here, deterministically, before any model runs:
//! the model is never asked whether a legal threat is a legal threat.

use regex::Regex;

use super::policy::{compile_pattern, DecisionRule, PolicyError, PolicyPack};

/// A rule that fired on a customer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The rule's id in the pack.
    pub rule: String,
    /// The reason code (escalations) or the rule id (out-of-scope topics).
    pub reason: String,
}

struct Rule {
    id: String,
    reason: String,
    matchers: Vec<Regex>,
}

impl Rule {
    fn matches(&self, text: &str) -> bool {
        self.matchers.iter().any(|m| m.is_match(text))
    }
}

/// The pack's message-side rules, compiled once per pack.
pub struct Triggers {
    escalation: Vec<Rule>,
    out_of_scope: Vec<(Rule, String)>,
    repeated: Option<(u32, Rule)>,
    decision_forms: Option<Rule>,
    decisions: Vec<(Rule, DecisionRule)>,
}

/// A decision rule that fired on a customer message.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionFired {
    pub fired: Fired,
    pub rule: DecisionRule,
}

/// One message of the conversation, as the triggers see it.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    pub from_customer: bool,
    pub text: &'a str,
}

impl Triggers {
    pub fn new(pack: &PolicyPack) -> Result<Triggers, PolicyError> {
        let rule = |kind: &str, id: &str, reason: &str, phrases: &[String], patterns: &[String]| -> Result<Rule, PolicyError> {
            let at = format!("{kind} rule \"{id}\"");
            let mut matchers = Vec::new();
            for (i, p) in phrases.iter().enumerate() {
                matchers.push(compile_pattern(&format!("{at}: phrase {}", i + 1), &phrase_regex(p))?);
            }
            for (i, p) in patterns.iter().enumerate() {
                matchers.push(compile_pattern(&format!("{at}: pattern {}", i + 1), p)?);
            }
            Ok(Rule { id: id.to_string(), reason: reason.to_string(), matchers })
        };
        let escalation = pack
            .escalation
            .iter()
            .map(|r| rule("escalation", &r.id, &r.reason, &r.phrases, &r.patterns))
            .collect::<Result<_, _>>()?;
        let out_of_scope = pack
            .out_of_scope
            .iter()
            .map(|r| Ok((rule("out_of_scope", &r.id, &r.id, &r.phrases, &r.patterns)?, r.reply.clone())))
            .collect::<Result<_, PolicyError>>()?;
        let repeated = match &pack.repeated_failure {
            Some(f) => Some((f.after, rule("repeated_failure", "repeated-failure", &f.reason, &f.phrases, &[])?)),
            None => None,
        };
        let decision_forms = match &pack.decision_forms {
            Some(f) => Some(rule("decision_forms", "decision-forms", "decision", &f.phrases, &f.patterns)?),
            None => None,
        };
        let decisions = pack
            .decisions
            .iter()
            .map(|r| Ok((rule("decisions", &r.id, &r.reason, &r.topics, &r.topic_patterns)?, r.clone())))
            .collect::<Result<_, PolicyError>>()?;
        Ok(Triggers { escalation, out_of_scope, repeated, decision_forms, decisions })
    }

    /// The first decision rule (in pack order) a customer message fires: it asks for a decision on
    /// the customer's own case (a decision form) about the rule's topic (any topic when it names none).
    pub fn decision(&self, text: &str) -> Option<DecisionFired> {
        let forms = self.decision_forms.as_ref()?;
        if !forms.matches(text) {
            return None;
        }
        self.decisions
            .iter()
            .find(|(r, _)| r.matchers.is_empty() || r.matches(text))
            .map(|(r, d)| DecisionFired { fired: Fired { rule: r.id.clone(), reason: r.reason.clone() }, rule: d.clone() })
    }

    /// The first escalation rule (in pack order) the latest customer message fires, else a repeated
    /// failure: counting backwards over the conversation (`turns`, oldest first, ending with the
    /// latest customer message), the bot's refusals (`is_refusal`) and the customer's complaints
    /// (the rule's phrases) in the last `2 * after` messages, stopping at the first bot answer that
    /// was not a refusal and drew no complaint.
    pub fn escalation(&self, turns: &[Turn<'_>], is_refusal: &dyn Fn(&str) -> bool) -> Option<Fired> {
        let latest = turns.last().filter(|t| t.from_customer)?;
        if let Some(r) = self.escalation.iter().find(|r| r.matches(latest.text)) {
            return Some(Fired { rule: r.id.clone(), reason: r.reason.clone() });
        }
        let (after, rule) = self.repeated.as_ref()?;
        let window = (*after as usize * 2).max(1);
        let mut failures = 0u32;
        let mut complained = false;
        for t in turns.iter().rev().take(window) {
            if t.from_customer {
                complained = rule.matches(t.text);
                failures += complained as u32;
            } else if is_refusal(t.text) {
                failures += 1;
            } else if !complained {
                break;
            }
        }
        (failures >= *after).then(|| Fired { rule: rule.id.clone(), reason: rule.reason.clone() })
    }

    /// The first out-of-scope topic the latest customer message is about, with its reply.
    pub fn out_of_scope(&self, latest: &str) -> Option<(Fired, &str)> {
        self.out_of_scope
            .iter()
            .find(|(r, _)| r.matches(latest))
            .map(|(r, reply)| (Fired { rule: r.id.clone(), reason: r.reason.clone() }, reply.as_str()))
    }
}

/// A literal phrase as a pattern: its words in order, any whitespace between them, whole words at
/// the ends (when the phrase starts or ends with a letter or digit).
pub fn phrase_regex(phrase: &str) -> String {
    let words: Vec<String> = phrase.split_whitespace().map(regex::escape).collect();
    let body = words.join(r"\s+");
    let trimmed = phrase.trim();
    let start = if trimmed.starts_with(|c: char| c.is_alphanumeric()) { r"\b" } else { "" };
    let end = if trimmed.ends_with(|c: char| c.is_alphanumeric()) { r"\b" } else { "" };
    format!("{start}{body}{end}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack() -> PolicyPack {
        PolicyPack::parse(
            r#"
version = "t"
name = "t"
[messages]
refusal = "Sorry, I can't answer that."
handoff = "A person will take over."
[[forbidden]]
id = "x"
description = "d"
phrases = ["we will refund"]
[[out_of_scope]]
id = "legal-advice"
description = "d"
phrases = ["legal advice"]
reply = "I can't give legal advice."
[[escalation]]
id = "legal-threat"
reason = "legal_threat"
phrases = ["my lawyer", "sue you"]
patterns = ["\\babogad[oa]\\b"]
[[escalation]]
id = "human"
reason = "human_request"
phrases = ["real person"]
[repeated_failure]
after = 2
reason = "repeated_failure"
phrases = ["didn't help", "still not working"]
"#,
        )
        .unwrap()
    }

    fn customer(text: &str) -> Turn<'_> {
        Turn { from_customer: true, text }
    }

    fn bot(text: &str) -> Turn<'_> {
        Turn { from_customer: false, text }
    }

    #[test]
    fn phrases_match_in_any_casing_and_spacing_as_whole_words() {
        let t = Triggers::new(&pack()).unwrap();
        let never = |_: &str| false;
        for msg in ["I will SUE   you", "my Lawyer says", "Hablaré con mi abogado", "let me talk to a REAL\nperson"] {
            assert!(t.escalation(&[customer(msg)], &never).is_some(), "{msg}");
        }
        for msg in ["pseudo-lawyers", "I sued youtube once", "abogados"] {
            assert!(t.escalation(&[customer(msg)], &never).is_none(), "{msg}");
        }
        let fired = t.escalation(&[customer("my lawyer will call")], &never).unwrap();
        assert_eq!(fired, Fired { rule: "legal-threat".into(), reason: "legal_threat".into() });
    }

    #[test]
    fn repeated_failure_counts_refusals_and_complaints() {
        let t = Triggers::new(&pack()).unwrap();
        let refusal = |s: &str| s.starts_with("Sorry");
        let convo = [customer("q1"), bot("Sorry, I can't answer that."), customer("that didn't help")];
        assert_eq!(t.escalation(&convo, &refusal).unwrap().reason, "repeated_failure");
        let convo = [customer("q1"), bot("Here is how [1]."), customer("thanks, and another question")];
        assert!(t.escalation(&convo, &refusal).is_none());
        let convo = [customer("q1"), bot("Here is how [1]."), customer("still not working")];
        assert!(t.escalation(&convo, &refusal).is_none(), "one complaint is not repeated failure");
        let convo = [customer("q1"), bot("Here is how [1]."), customer("still not working"), bot("Try this [2]."), customer("didn't help")];
        assert_eq!(t.escalation(&convo, &refusal).unwrap().reason, "repeated_failure");
    }

    #[test]
    fn out_of_scope_topics_give_their_reply() {
        let t = Triggers::new(&pack()).unwrap();
        let (fired, reply) = t.out_of_scope("Can you give me legal advice on my contract?").unwrap();
        assert_eq!(fired.rule, "legal-advice");
        assert_eq!(reply, "I can't give legal advice.");
        assert!(t.out_of_scope("How do refunds work?").is_none());
    }

    #[test]
    fn the_shipped_pack_compiles() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs-corpus/policy.toml");
        let pack = PolicyPack::load(&path).unwrap();
        let t = Triggers::new(&pack).unwrap();
        let never = |_: &str| false;
        assert_eq!(t.escalation(&[customer("I'm going to file a chargeback with my bank")], &never).unwrap().reason, "chargeback");
        assert_eq!(t.escalation(&[customer("My attorney will be in touch.")], &never).unwrap().reason, "legal_threat");
        assert_eq!(t.escalation(&[customer("Can I talk to a human please?")], &never).unwrap().reason, "human_request");
        assert!(t.escalation(&[customer("How do I reset my password?")], &never).is_none());
    }
}
