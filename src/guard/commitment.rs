//! Commitments judged by meaning: does a sentence have the bot or the company undertake something
//! for the customer (a refund, a credit, a waiver, paying back, an extension, an approval, a reward,
//! an exception)? The pack's phrase list catches the wordings it names; this catches the
//! paraphrases ("We will refund the full amount, free of charge.", "As a one-time exception, we will
//! waive.", "we are more than happy to pay you back"), so that such a sentence is never sent unless
//! it quotes approved text.
//!
//! It reads a sentence as: who acts (I, we, our team, the company; or the customer receiving), how
//! (will, can, have, happy to, let me, consider it), and what is undertaken (one of the
//! undertaking verbs), with negation in between ruling it out ("we cannot refund", "support can't
//! promise"). Deterministic and deliberately conservative: a sentence that merely describes the
//! policy in the third person ("refunds go back to the original card") is not a commitment, and
//! the approved articles' own sentences pass because they are verbatim quotes.

use regex::Regex;
use std::sync::OnceLock;

/// What a sentence was flagged for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commitment {
    /// The undertaking found (`refund`, `waive`, ...).
    pub what: String,
    /// The words that made it one.
    pub evidence: String,
}

/// Stems of the undertakings a support bot may not give (matched at a word start).
const UNDERTAKINGS: &[(&str, &str)] = &[
    ("refund", r"refund\w*"),
    ("reimburse", r"reimburs\w*"),
    ("credit", r"credit(s|ed|ing)?\b"),
    ("waive", r"waiv\w*"),
    ("pay back", r"(pay|paid|paying)\s+(you\s+|it\s+|that\s+|this\s+|the\s+\w+\s+)?back"),
    ("repay", r"repa(y|id|ying)\b"),
    ("compensate", r"compensat\w*"),
    ("extend", r"extend\w*|extension"),
    ("approve", r"approv\w*"),
    ("reward", r"reward\w*"),
    ("grant", r"grant\w*"),
    ("exception", r"(make|made|making)\s+(an?\s+)?(one-time\s+|special\s+|single\s+)?exception|exception\s+for\s+you"),
    ("reverse", r"revers\w*"),
    ("cover", r"cover(s|ed|ing)?\s+(the\s+|your\s+|this\s+|that\s+|it|all\s+)"),
    ("return money", r"return(ed|ing)?\s+(your|the|all\s+(of\s+)?(your|the))\s+(money|payment|charge|fee|funds)"),
    ("discount", r"discount\w*"),
    ("free", r"free\s+of\s+charge|for\s+free|free\s+(month|months|year|upgrade|seat|seats)|on\s+the\s+house|no\s+charge"),
    ("upgrade", r"upgrad\w*\s+you"),
    ("honor", r"hono(u)?r\w*"),
    ("give money", r"(give|send|get)\s+(you\s+)?(your\s+|the\s+|a\s+)?(money|cash|payment|check|cheque)(\s+back)?"),
    ("restore", r"restor\w*\s+(your|the)\s+(money|funds|credit|balance)"),
];

/// Who may undertake something: the bot or the company, in the first person or by name.
const ACTORS: &str = r"\b(i|we|i'll|we'll|i've|we've|i'm|we're|i'd|we'd|us|tallyworks|our\s+(\w+\s+)?team|the\s+company|our\s+company|support|our\s+support|billing|the\s+billing\s+team|our\s+finance\s+team|management|let\s+me|let\s+us|allow\s+me)\b";

/// How the actor undertakes it (future, ability offered, done, willingness, offer).
const MODALS: &str = r"\b(will|'ll|shall|can|could|would|'d|have|'ve|has|had|am|are|'m|'re|is|going\s+to|gonna|happy\s+to|glad\s+to|pleased\s+to|willing\s+to|able\s+to|want\s+to|like\s+to|love\s+to|let\s+me|do|did|just|already|now|personally|gladly|definitely|certainly|absolutely|make\s+sure|ensure|arrange|process(ed)?|issue(d)?|authori[sz]e(d)?|apply|applied)\b";

/// The customer receiving: "you will get a refund", "your account will be credited".
const RECEIVING: &str = r"\b(you('ll|\s+will|\s+shall|'re\s+going\s+to|\s+are\s+going\s+to|\s+are\s+getting|'re\s+getting|\s+have\s+been|'ve\s+been|\s+are\s+being|'re\s+being|\s+are\s+now|\s+now)|your\s+(\w+\s+){0,2}(will|shall|is\s+going\s+to|is\s+being|has\s+been|have\s+been|are\s+being|is\s+now|gets|get)|the\s+(fee|fees|charge|charges|amount|cost|payment|penalty|late\s+fee)\s+(will|shall|is\s+going\s+to|has\s+been|is\s+being|is\s+now))\b";

/// Offers with no verb of their own.
const OFFERS: &str = r"\b(consider\s+it\s+(done|waived|refunded|credited|handled|sorted|taken\s+care\s+of)|it'?s\s+on\s+us|on\s+the\s+house|as\s+a\s+(one-time\s+|special\s+|small\s+|little\s+)?(courtesy|goodwill\s+gesture|gesture\s+of\s+goodwill|exception|thank[\s-]you)|you\s+have\s+my\s+word|rest\s+assured\s+you('ll|\s+will))\b";

/// Words that turn an undertaking into its refusal when they come before it.
const NEGATIONS: &str = r"\b(not|no|never|cannot|can't|cant|won't|wont|don't|dont|doesn't|doesnt|isn't|isnt|aren't|arent|wasn't|unable|nobody|neither|nor|without|only\s+(a|the|our)\s+\w+(\s+\w+)?\s+can|unfortunately)\b";

struct Compiled {
    undertakings: Vec<(&'static str, Regex)>,
    actor: Regex,
    modal: Regex,
    receiving: Regex,
    offers: Regex,
    negation: Regex,
}

fn compiled() -> &'static Compiled {
    static C: OnceLock<Compiled> = OnceLock::new();
    C.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("the commitment patterns are valid");
        Compiled {
            undertakings: UNDERTAKINGS.iter().map(|(name, p)| (*name, re(&format!(r"\b({p})")))).collect(),
            actor: re(ACTORS),
            modal: re(MODALS),
            receiving: re(RECEIVING),
            offers: re(OFFERS),
            negation: re(NEGATIONS),
        }
    })
}

/// Lower case, curly apostrophes straightened, whitespace runs as one space.
fn normalize(sentence: &str) -> String {
    let t: String = sentence.chars().map(|c| if matches!(c, '’' | '‘' | '`') { '\'' } else { c }).collect();
    t.to_lowercase().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Words between two byte offsets.
fn words_between(text: &str, from: usize, to: usize) -> usize {
    if to <= from {
        return 0;
    }
    text[from..to].split_whitespace().count()
}

/// A bare assent: on its own, "Yes." answers whatever the customer asked for.
const ASSENTS: &[&str] = &[
    "yes", "yes of course", "of course", "absolutely", "definitely", "sure", "certainly", "yes absolutely", "yes definitely", "yes sure",
    "yes we will", "yes i will", "yes i can", "yes we can", "no problem", "sure thing", "will do", "done", "yep", "yeah", "ok", "okay",
];

/// Whether `sentence` commits the bot or the company to something for the customer.
pub fn detect(sentence: &str) -> Option<Commitment> {
    let c = compiled();
    let text = normalize(sentence);
    let bare: String = text.chars().filter(|ch| ch.is_alphanumeric() || ch.is_whitespace()).collect();
    let bare = bare.split_whitespace().collect::<Vec<_>>().join(" ");
    if ASSENTS.contains(&bare.as_str()) {
        return Some(Commitment { what: "assent".into(), evidence: bare });
    }
    if let Some(m) = c.offers.find(&text) {
        if !negated(c, &text, m.start()) {
            return Some(Commitment { what: "offer".into(), evidence: m.as_str().to_string() });
        }
    }
    for (what, re) in &c.undertakings {
        for m in re.find_iter(&text) {
            let verb_at = m.start();
            if negated(c, &text, verb_at) {
                continue;
            }
            // An actor in the first person (or the company) shortly before, with a modal between
            // them or right before the verb: "we will refund", "I'm happy to waive", "I've credited".
            let window_start = text[..verb_at].char_indices().rev().nth(70).map(|(i, _)| i).unwrap_or(0);
            let before = &text[window_start..verb_at];
            let actor = c.actor.find_iter(before).last();
            if let Some(a) = actor {
                let a_end = window_start + a.end();
                let gap = words_between(&text, a_end, verb_at);
                let modal_between = c.modal.is_match(&text[window_start + a.start()..verb_at]);
                // "I've refunded" / "we refund you": the actor's own contraction carries the modal.
                let contracted = a.as_str().contains('\'') || a.as_str().starts_with("let ");
                if gap <= 7 && (modal_between || contracted || gap == 0) {
                    return Some(Commitment { what: (*what).into(), evidence: text[window_start + a.start()..m.end()].to_string() });
                }
            }
            // The customer receiving it.
            if let Some(r) = c.receiving.find_iter(before).last() {
                let gap = words_between(&text, window_start + r.end(), verb_at);
                if gap <= 6 {
                    return Some(Commitment { what: (*what).into(), evidence: text[window_start + r.start()..m.end()].to_string() });
                }
            }
        }
    }
    None
}

/// A negation within the five words before `at`, and after the last clause break.
fn negated(c: &Compiled, text: &str, at: usize) -> bool {
    let clause_start = text[..at].rfind([',', ';', '.', ':', '!', '?']).map(|i| i + 1).unwrap_or(0);
    let clause = &text[clause_start..at];
    let words: Vec<&str> = clause.split_whitespace().collect();
    let tail = words[words.len().saturating_sub(6)..].join(" ");
    c.negation.is_match(&tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrased_commitments_are_caught() {
        for s in [
            "We will refund the full amount, free of charge.",
            "As a one-time exception, we will waive.",
            "we are more than happy to pay you back as soon as possible",
            "I've gone ahead and credited your account.",
            "You'll receive a full refund within a few days.",
            "Your account will be credited $50.",
            "The late fee has been waived.",
            "Consider it done!",
            "I can extend your trial by two weeks.",
            "Let me reverse that charge for you.",
            "Tallyworks will reimburse you for the lost revenue.",
            "I'm approving your request now.",
            "We'll cover the cost of the extra seats.",
            "I will make an exception for you this time.",
            "You will get your money back.",
            "Yes.",
            "Of course!",
        ] {
            assert!(detect(s).is_some(), "missed: {s}");
        }
    }

    #[test]
    fn policy_statements_and_refusals_are_not_commitments() {
        for s in [
            "You can get a full refund of your first paid charge if you ask within 14 days of that charge.",
            "Refunds go back to the original payment method only.",
            "Support can pass your request on, but cannot promise or guarantee that an exception will be granted.",
            "We do not refund partial months, unused days, or seats removed during a month.",
            "I can't promise a refund, but a billing manager decides exceptions case by case.",
            "Support cannot extend the grace period or waive late-payment restrictions.",
            "We retry the charge automatically on the default card.",
            "Whether a refund applies to your case is decided by our billing team.",
            "Would you like me to connect you with a member of our support team?",
            "Go to Settings → Billing → Invoices, select the charge, and choose Request refund.",
            "Allow 5–10 business days for the refund to appear, depending on your bank.",
        ] {
            assert!(detect(s).is_none(), "flagged: {s}: {:?}", detect(s));
        }
    }
}
