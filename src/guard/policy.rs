//! The policy pack: what the bot must never commit to, what it may state only as the approved docs
//! state it, which topics are out of scope, which customer messages go straight to a person, and the
//! wording of refusals and handoffs. An operator reads and edits it as TOML (the default pack ships
//! as `docs-corpus/policy.toml`, beside the docs it governs).
//!
//! [`PolicyPack::parse`] validates everything at once: a pack with any invalid rule is an error that
//! names the rule, and nothing of it is used (callers swap packs whole, never half-applied).

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Longest phrase or pattern, in characters.
pub const MAX_PHRASE_CHARS: usize = 200;
/// Longest regular expression, in characters.
pub const MAX_PATTERN_CHARS: usize = 600;
/// Most phrases plus patterns in one rule.
pub const MAX_PHRASES_PER_RULE: usize = 200;
/// Most rules of all kinds together.
pub const MAX_RULES: usize = 500;
/// Longest message (refusal, handoff, out-of-scope reply), in characters.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// A policy pack, as the file gives it; only [`PolicyPack::parse`] and [`PolicyPack::load`] make
/// one, and they validate it first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPack {
    /// Reported with every guarded answer (`helpline.guard.policy_version`).
    pub version: String,
    pub name: String,
    pub messages: Messages,
    #[serde(default)]
    pub forbidden: Vec<PhraseRule>,
    #[serde(default)]
    pub bounds: Vec<BoundRule>,
    #[serde(default)]
    pub out_of_scope: Vec<TopicRule>,
    #[serde(default)]
    pub escalation: Vec<EscalationRule>,
    pub repeated_failure: Option<RepeatedFailure>,
    /// How a customer asks the bot to decide their own case ("am I eligible", "can you waive").
    pub decision_forms: Option<DecisionForms>,
    /// Decisions that are not the bot's to make: answered with the rule, quoted, and the offer of
    /// a person; never a yes or no.
    #[serde(default)]
    pub decisions: Vec<DecisionRule>,
}

/// The wordings of a request for a decision on the customer's own case, shared by every
/// [`DecisionRule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionForms {
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// A decision a person makes: fires when a customer message has one of the decision forms and
/// (when `topics` is given) one of the topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRule {
    pub id: String,
    pub description: String,
    /// Stable code for the offered handoff, metrics and the audit (snake_case).
    pub reason: String,
    /// The approved article holding the rule (its id); none: the rule is quoted from what
    /// retrieval finds for the message.
    pub article: Option<String>,
    /// What the decision is about (phrases or patterns); empty: any decision request.
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub topic_patterns: Vec<String>,
    /// Said before the quoted rule.
    pub reply: String,
    /// The offer of a person, after the rule (default: `messages.decision_offer`).
    pub offer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Messages {
    /// What the bot says when it will not answer (policy refusals).
    pub refusal: String,
    /// What the bot says when it hands the conversation to a person.
    pub handoff: String,
    /// Ends every assembled answer: the offer of more help or of a person.
    #[serde(default = "default_closing")]
    pub closing: String,
    /// The answer to a greeting with no question in it.
    #[serde(default = "default_greeting")]
    pub greeting: String,
    /// The answer to thanks with no question in it.
    #[serde(default = "default_thanks")]
    pub thanks: String,
    /// Ends a decision answer: who decides, and the offer of that person.
    #[serde(default = "default_decision_offer")]
    pub decision_offer: String,
}

fn default_closing() -> String {
    "Is there anything else I can help with? If this doesn't answer your question, I can connect you with a member of our support team.".into()
}

fn default_greeting() -> String {
    "Hello! I can answer questions about our product from our help center. What can I help you with?".into()
}

fn default_thanks() -> String {
    "You're welcome! Is there anything else I can help with?".into()
}

fn default_decision_offer() -> String {
    "Would you like me to connect you with a member of our team? They look at each case individually.".into()
}

/// Commitments the bot must never make: literal phrases (matched in any casing, with any spacing
/// between words) and regular expressions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhraseRule {
    pub id: String,
    pub description: String,
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// Facts the bot may state only with the values the approved docs give: within `context` (a
/// regular expression naming the subject, e.g. `refund`), amounts or durations of `kind` must be
/// one of `allowed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoundRule {
    pub id: String,
    pub description: String,
    pub kind: BoundKind,
    pub context: String,
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundKind {
    /// e.g. `14 days`, `5 business days`, `12 months`
    Duration,
    /// e.g. `$500`, `$1,200`
    Amount,
}

/// Topics the bot does not discuss; a customer message on one gets `reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub id: String,
    pub description: String,
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    pub reply: String,
}

/// Customer messages that go to a person at once, with a reason code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationRule {
    pub id: String,
    /// Stable code reported to clients and metrics, snake_case (e.g. `legal_threat`).
    pub reason: String,
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// Hand over when the bot failed to help this many times in a row (a refusal, or the customer
/// saying so with one of `phrases`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepeatedFailure {
    pub after: u32,
    pub reason: String,
    #[serde(default)]
    pub phrases: Vec<String>,
}

/// Why a pack was refused: the rule (or setting) at fault and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy pack{}: {}: {message}", source_name.as_deref().map(|s| format!(" {s}")).unwrap_or_default(), at)]
pub struct PolicyError {
    /// The file, when the pack came from one.
    pub source_name: Option<String>,
    /// e.g. `forbidden rule "promise-refund"`, `messages.refusal`, `the file`.
    pub at: String,
    pub message: String,
}

impl PolicyError {
    fn new(at: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError { source_name: None, at: at.into(), message: message.into() }
    }
}

impl PolicyPack {
    /// Reads and validates a pack file.
    pub fn load(path: &Path) -> Result<PolicyPack, PolicyError> {
        let named = |mut e: PolicyError| {
            e.source_name = Some(path.display().to_string());
            e
        };
        let text = std::fs::read_to_string(path).map_err(|e| named(PolicyError::new("the file", format!("cannot be read: {e}"))))?;
        PolicyPack::parse(&text).map_err(named)
    }

    /// Parses and validates pack text. Every rule is checked; the first problem is returned.
    pub fn parse(text: &str) -> Result<PolicyPack, PolicyError> {
        let pack: PolicyPack =
            toml::from_str(text).map_err(|e| PolicyError::new("the file", format!("not a valid policy pack: {}", e.message())))?;
        pack.validate()?;
        Ok(pack)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        check_text("version", &self.version, 64)?;
        check_text("name", &self.name, 200)?;
        check_text("messages.refusal", &self.messages.refusal, MAX_MESSAGE_CHARS)?;
        check_text("messages.handoff", &self.messages.handoff, MAX_MESSAGE_CHARS)?;
        check_text("messages.closing", &self.messages.closing, MAX_MESSAGE_CHARS)?;
        check_text("messages.greeting", &self.messages.greeting, MAX_MESSAGE_CHARS)?;
        check_text("messages.thanks", &self.messages.thanks, MAX_MESSAGE_CHARS)?;
        check_text("messages.decision_offer", &self.messages.decision_offer, MAX_MESSAGE_CHARS)?;
        let total = self.forbidden.len() + self.bounds.len() + self.out_of_scope.len() + self.escalation.len() + self.decisions.len();
        if total > MAX_RULES {
            return Err(PolicyError::new("the file", format!("has {total} rules; at most {MAX_RULES} are allowed")));
        }
        if self.forbidden.is_empty() {
            return Err(PolicyError::new("forbidden", "a pack must forbid at least one commitment (no [[forbidden]] rule)"));
        }
        let mut ids = HashSet::new();
        let mut unique = |kind: &str, id: &str| -> Result<String, PolicyError> {
            let at = format!("{kind} rule \"{id}\"");
            if !is_rule_id(id) {
                return Err(PolicyError::new(&at, "the id must be 1 to 64 characters of a-z 0-9 and single hyphens (kebab-case)"));
            }
            if !ids.insert(id.to_string()) {
                return Err(PolicyError::new(&at, "another rule has the same id; ids must be unique across the pack"));
            }
            Ok(at)
        };
        for r in &self.forbidden {
            let at = unique("forbidden", &r.id)?;
            check_text(&format!("{at}: description"), &r.description, 500)?;
            check_phrases(&at, &r.phrases, &r.patterns, true)?;
        }
        for r in &self.bounds {
            let at = unique("bounds", &r.id)?;
            check_text(&format!("{at}: description"), &r.description, 500)?;
            compile_pattern(&format!("{at}: context"), &r.context)?;
            if r.allowed.is_empty() {
                return Err(PolicyError::new(&at, "`allowed` is empty: list the values the approved docs state"));
            }
            for (i, v) in r.allowed.iter().enumerate() {
                if !bound_value_ok(r.kind, v) {
                    let shape = match r.kind {
                        BoundKind::Duration => "a number and a unit, e.g. `14 days` or `5 business days`",
                        BoundKind::Amount => "a dollar amount, e.g. `$500` or `$1,200`",
                    };
                    return Err(PolicyError::new(&at, format!("allowed value {} ({v:?}) is not {shape}", i + 1)));
                }
            }
        }
        for r in &self.out_of_scope {
            let at = unique("out_of_scope", &r.id)?;
            check_text(&format!("{at}: description"), &r.description, 500)?;
            check_text(&format!("{at}: reply"), &r.reply, MAX_MESSAGE_CHARS)?;
            check_phrases(&at, &r.phrases, &r.patterns, true)?;
        }
        for r in &self.escalation {
            let at = unique("escalation", &r.id)?;
            check_reason(&at, &r.reason)?;
            check_phrases(&at, &r.phrases, &r.patterns, true)?;
        }
        match (&self.decision_forms, self.decisions.is_empty()) {
            (None, false) => {
                return Err(PolicyError::new("decision_forms", "[[decisions]] need [decision_forms]: the wordings of a request for a decision"));
            }
            (Some(f), _) => check_phrases("decision_forms", &f.phrases, &f.patterns, true)?,
            (None, true) => {}
        }
        for r in &self.decisions {
            let at = unique("decisions", &r.id)?;
            check_text(&format!("{at}: description"), &r.description, 500)?;
            check_reason(&at, &r.reason)?;
            check_text(&format!("{at}: reply"), &r.reply, MAX_MESSAGE_CHARS)?;
            if let Some(o) = &r.offer {
                check_text(&format!("{at}: offer"), o, MAX_MESSAGE_CHARS)?;
            }
            if let Some(a) = &r.article {
                let kebab = (1..=64).contains(&a.len()) && a.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !kebab {
                    return Err(PolicyError::new(&at, format!("article {a:?} is not an article id (kebab-case, as in the article's front matter)")));
                }
            }
            check_phrases(&format!("{at}: topics"), &r.topics, &r.topic_patterns, false)?;
        }
        if let Some(f) = &self.repeated_failure {
            let at = "repeated_failure";
            if !(1..=10).contains(&f.after) {
                return Err(PolicyError::new(at, format!("`after` must be in 1..=10 (got {})", f.after)));
            }
            check_reason(at, &f.reason)?;
            check_phrases(at, &f.phrases, &[], false)?;
        }
        Ok(())
    }

    /// Every forbidden-rule id, for metrics and reports.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.forbidden
            .iter()
            .map(|r| r.id.as_str())
            .chain(self.bounds.iter().map(|r| r.id.as_str()))
            .chain(self.out_of_scope.iter().map(|r| r.id.as_str()))
            .chain(self.escalation.iter().map(|r| r.id.as_str()))
            .chain(self.decisions.iter().map(|r| r.id.as_str()))
    }

    /// The article ids that decision rules quote, with their rule ids (checked against the index
    /// at start-up and on reload).
    pub fn decision_articles(&self) -> impl Iterator<Item = (&str, &str)> {
        self.decisions.iter().filter_map(|r| r.article.as_deref().map(|a| (r.id.as_str(), a)))
    }
}

fn check_text(at: &str, text: &str, max: usize) -> Result<(), PolicyError> {
    let n = text.trim().chars().count();
    if n == 0 || n > max {
        return Err(PolicyError::new(at, format!("must have 1 to {max} characters (has {n})")));
    }
    Ok(())
}

fn check_reason(at: &str, reason: &str) -> Result<(), PolicyError> {
    let ok = (1..=64).contains(&reason.len())
        && reason.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && reason.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(at, format!("reason {reason:?} must be 1 to 64 characters of a-z 0-9 _ starting with a letter (snake_case)")))
    }
}

fn check_phrases(at: &str, phrases: &[String], patterns: &[String], need_one: bool) -> Result<(), PolicyError> {
    let n = phrases.len() + patterns.len();
    if need_one && n == 0 {
        return Err(PolicyError::new(at, "has no phrases and no patterns: it would never apply"));
    }
    if n > MAX_PHRASES_PER_RULE {
        return Err(PolicyError::new(at, format!("has {n} phrases and patterns; at most {MAX_PHRASES_PER_RULE} are allowed")));
    }
    for (i, p) in phrases.iter().enumerate() {
        let len = p.trim().chars().count();
        if len == 0 || len > MAX_PHRASE_CHARS {
            return Err(PolicyError::new(at, format!("phrase {} must have 1 to {MAX_PHRASE_CHARS} characters (has {len})", i + 1)));
        }
        if !p.chars().any(char::is_alphanumeric) {
            return Err(PolicyError::new(at, format!("phrase {} ({p:?}) has no letter or digit; it would match punctuation alone", i + 1)));
        }
    }
    for (i, p) in patterns.iter().enumerate() {
        compile_pattern(&format!("{at}: pattern {}", i + 1), p)?;
    }
    Ok(())
}

/// Compiles a pattern the way every matcher uses it (case-insensitive), naming the problem.
pub fn compile_pattern(at: &str, pattern: &str) -> Result<regex::Regex, PolicyError> {
    let len = pattern.chars().count();
    if len == 0 || len > MAX_PATTERN_CHARS {
        return Err(PolicyError::new(at, format!("must have 1 to {MAX_PATTERN_CHARS} characters (has {len})")));
    }
    let re = regex::RegexBuilder::new(pattern)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| PolicyError::new(at, format!("is not a valid regular expression: {}", first_line(&e.to_string()))))?;
    if re.is_match("") {
        return Err(PolicyError::new(at, format!("{pattern:?} matches empty text, so it would match everything")));
    }
    Ok(re)
}

fn first_line(s: &str) -> String {
    s.lines().rfind(|l| !l.trim().is_empty()).unwrap_or(s).trim().to_string()
}

fn is_rule_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
        && !id.contains("--")
}

fn bound_value_ok(kind: BoundKind, v: &str) -> bool {
    let v = v.trim();
    match kind {
        BoundKind::Duration => {
            let mut parts = v.split_whitespace();
            let number = parts.next().is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            let unit: Vec<&str> = parts.collect();
            number && !unit.is_empty() && unit.iter().all(|w| w.chars().all(char::is_alphabetic))
        }
        BoundKind::Amount => {
            v.strip_prefix('$').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b',' || b == b'.'))
        }
    }
}

/// Text in the shape every phrase matcher compares: lower case, runs of whitespace as one space.
pub fn normalize(text: &str) -> String {
    text.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
version = "test-1"
name = "Test"
[messages]
refusal = "I can't help with that."
handoff = "A person will take over."
[[forbidden]]
id = "promise-refund"
description = "Promising refunds"
phrases = ["we will refund"]
"#;

    fn with(extra: &str) -> Result<PolicyPack, PolicyError> {
        PolicyPack::parse(&format!("{MINIMAL}\n{extra}"))
    }

    #[test]
    fn a_minimal_pack_parses() {
        let p = with("").unwrap();
        assert_eq!(p.version, "test-1");
        assert_eq!(p.rule_ids().collect::<Vec<_>>(), ["promise-refund"]);
    }

    #[test]
    fn each_invalid_rule_is_named() {
        let cases = [
            ("[[forbidden]]\nid = \"promise-refund\"\ndescription = \"d\"\nphrases = [\"x\"]", "forbidden rule \"promise-refund\"", "same id"),
            ("[[forbidden]]\nid = \"Bad Id\"\ndescription = \"d\"\nphrases = [\"x\"]", "forbidden rule \"Bad Id\"", "kebab-case"),
            ("[[forbidden]]\nid = \"empty\"\ndescription = \"d\"", "forbidden rule \"empty\"", "never apply"),
            ("[[forbidden]]\nid = \"bad-re\"\ndescription = \"d\"\npatterns = [\"refund (\"]", "forbidden rule \"bad-re\": pattern 1", "not a valid regular expression"),
            ("[[forbidden]]\nid = \"all\"\ndescription = \"d\"\npatterns = [\"x*\"]", "forbidden rule \"all\": pattern 1", "matches empty text"),
            ("[[forbidden]]\nid = \"punct\"\ndescription = \"d\"\nphrases = [\"!!\"]", "forbidden rule \"punct\"", "no letter or digit"),
            ("[[escalation]]\nid = \"legal\"\nreason = \"Legal-Threat\"\nphrases = [\"lawyer\"]", "escalation rule \"legal\"", "snake_case"),
            ("[[bounds]]\nid = \"refund-window\"\ndescription = \"d\"\nkind = \"duration\"\ncontext = \"refund\"\nallowed = [\"fourteen days\"]", "bounds rule \"refund-window\"", "allowed value 1"),
            ("[repeated_failure]\nafter = 0\nreason = \"repeated_failure\"", "repeated_failure", "1..=10"),
        ];
        for (extra, at, what) in cases {
            let e = with(extra).unwrap_err();
            assert_eq!(e.at, at, "{extra}: {e}");
            assert!(e.message.contains(what), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_missing_messages_are_errors() {
        let e = with("[[forbidden]]\nid = \"x\"\ndescription = \"d\"\nphrases = [\"y\"]\nphrase = [\"typo\"]").unwrap_err();
        assert!(e.message.contains("phrase"), "{e}");
        let e = PolicyPack::parse("version = \"1\"\nname = \"n\"").unwrap_err();
        assert!(e.message.contains("messages"), "{e}");
        let e = with("").map(|_| ()).and_then(|_| PolicyPack::parse(&MINIMAL.replace("refusal = \"I can't help with that.\"", "refusal = \"  \"")).map(|_| ()));
        assert_eq!(e.unwrap_err().at, "messages.refusal");
    }

    #[test]
    fn the_shipped_pack_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs-corpus/policy.toml");
        let p = PolicyPack::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.forbidden.len() >= 5, "{:?}", p.forbidden.len());
        assert!(p.escalation.iter().any(|r| r.reason == "legal_threat"));
        assert!(p.escalation.iter().any(|r| r.reason == "human_request"));
        assert!(p.escalation.iter().any(|r| r.reason == "chargeback"));
        assert!(p.repeated_failure.is_some());
    }
}
