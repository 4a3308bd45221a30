//! `[[bounds]]` rules compiled to forbidden patterns: within a sentence that mentions the rule's
//! context (e.g. `refund`), a duration or an amount may only take one of the values the approved
//! docs state. Anything else (another number, a number spelled out in words, another unit) becomes
//! part of the pack's FORBIDDEN lexeme, so the model cannot write "a refund within 60 days" when
//! the docs say 14 or 30.
//!
//! What counts as the same sentence: the text between the context and the value holds no `.`,
//! `!`, `?` or line break. Both orders are covered ("refund within 60 days", "a 60-day refund").
//! Numbers are compared as written digit strings: an amount is allowed with or without its
//! thousands separators (`$1,200`, `$1200`), with cents after a point (`$500.00`), and followed by
//! a comma used as punctuation. Spelled-out numbers ("sixty days") are never allowed in such a
//! sentence: the docs state their values in digits, and a grammar cannot tell "fourteen" from
//! "forty" for free.

use std::collections::BTreeMap;

use super::grammar::{Forbidden, NUMBER_END};
use super::policy::{BoundKind, BoundRule};

/// The rest of the sentence: any text without a sentence end.
const SAME_SENTENCE: &str = r"[^.!?\n]*";

/// Duration units: how each is written, by its canonical name. `business day` before `day`.
const UNITS: &[(&str, &str)] = &[
    ("business day", r"(?:business|working)[\s\-]*days?"),
    ("day", r"(?:calendar[\s\-]*)?days?"),
    ("hour", r"hours?"),
    ("week", r"weeks?"),
    ("month", r"months?"),
    ("year", r"years?"),
];

/// Spelled-out numbers; never an allowed value.
const NUMBER_WORDS: &str = "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|\
                            seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred";

/// How an amount is introduced or followed.
const CURRENCY_BEFORE: &str = r"(?:\$|us\$|usd)\s*";
const CURRENCY_AFTER: &str = r"\s*(?:dollars|usd)";

/// The forbidden patterns of one bound rule (already validated by the policy loader).
pub fn forbidden(rule: &BoundRule) -> Vec<Forbidden> {
    let ctx = format!("(?:{})", rule.context);
    let values: Vec<String> = match rule.kind {
        BoundKind::Duration => {
            // Allowed numbers per unit; a unit the rule never lists allows no number at all.
            let mut allowed: BTreeMap<&str, Vec<String>> = UNITS.iter().map(|(name, _)| (*name, Vec::new())).collect();
            for v in &rule.allowed {
                let mut parts = v.split_whitespace();
                let number = parts.next().unwrap_or_default().to_string();
                let unit = parts.collect::<Vec<_>>().join(" ");
                if let Some(name) = unit_of(&unit) {
                    allowed.entry(name).or_default().push(number);
                }
            }
            UNITS
                .iter()
                .map(|(name, written)| {
                    let numbers = except(&allowed[name], false);
                    format!(r"[^0-9](?:{numbers}|{NUMBER_WORDS})[\s\-]*{written}")
                })
                .collect()
        }
        BoundKind::Amount => {
            let mut forms = Vec::new();
            for v in &rule.allowed {
                let digits: String = v.trim().trim_start_matches('$').split('.').next().unwrap_or_default().to_string();
                let plain: String = digits.chars().filter(|c| *c != ',').collect();
                for form in [plain.clone(), thousands(&plain), digits] {
                    forms.push(format!("{form},"));
                    forms.push(form);
                }
            }
            forms.sort();
            forms.dedup();
            let numbers = except(&forms, true);
            vec![format!("{CURRENCY_BEFORE}(?:{numbers}){NUMBER_END}"), format!("[^0-9](?:{numbers}){CURRENCY_AFTER}")]
        }
    };
    let mut out = Vec::new();
    for value in values {
        // The value after the context, then before it. The grammar adds the variants for a value
        // at the very start or end of the answer (the leading `[^0-9]` and trailing NUMBER_END
        // need a character there).
        out.push(Forbidden::regex(&rule.id, &format!("{ctx}{SAME_SENTENCE}{value}")));
        out.push(Forbidden::regex(&rule.id, &format!("{value}{SAME_SENTENCE}{ctx}")));
    }
    out
}

fn unit_of(written: &str) -> Option<&'static str> {
    UNITS.iter().find_map(|(name, rx)| {
        let whole = regex::Regex::new(&format!("(?i)^{rx}$")).ok()?;
        whole.is_match(written).then_some(*name)
    })
}

/// `1200` -> `1,200`.
fn thousands(plain: &str) -> String {
    let mut out = String::new();
    for (i, c) in plain.chars().enumerate() {
        if i > 0 && (plain.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A regex for every number written as a digit followed by digits (and commas, with `commas`)
/// that is not one of `allowed`: the complement of a finite set, built from its trie.
pub fn except(allowed: &[String], commas: bool) -> String {
    #[derive(Default)]
    struct Node {
        end: bool,
        children: BTreeMap<char, Node>,
    }
    let mut root = Node::default();
    for s in allowed {
        let mut n = &mut root;
        for c in s.chars() {
            n = n.children.entry(c).or_default();
        }
        n.end = true;
    }
    let any = if commas { "[0-9,]" } else { "[0-9]" };
    let later: Vec<char> = if commas { "0123456789,".chars().collect() } else { "0123456789".chars().collect() };
    let first: Vec<char> = "0123456789".chars().collect();

    /// Continuations of the prefix at `n` that are not allowed numbers (may include the empty one).
    fn go(n: &Node, alphabet: &[char], later: &[char], any: &str, root: bool) -> (Vec<String>, bool) {
        let mut alts = Vec::new();
        let others: Vec<char> = alphabet.iter().copied().filter(|c| !n.children.contains_key(c)).collect();
        if !others.is_empty() {
            let class: String = others.iter().collect();
            alts.push(format!("[{class}]{any}*"));
        }
        for (c, child) in &n.children {
            let (sub, empty) = go(child, later, later, any, false);
            let c = regex::escape(&c.to_string());
            match (sub.is_empty(), empty) {
                (true, true) => alts.push(c),
                (true, false) => {}
                (false, true) => alts.push(format!("{c}(?:{})?", sub.join("|"))),
                (false, false) => alts.push(format!("{c}(?:{})", sub.join("|"))),
            }
        }
        (alts, !root && !n.end)
    }
    let (alts, _) = go(&root, &first, &later, any, true);
    format!("(?:{})", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(rx: &str) -> regex::Regex {
        regex::Regex::new(&format!("^{rx}$")).unwrap()
    }

    #[test]
    fn except_is_the_complement_of_the_allowed_numbers() {
        let allowed: Vec<String> = ["14", "30", "5"].iter().map(|s| s.to_string()).collect();
        let rx = whole(&except(&allowed, false));
        for ok in ["14", "30", "5"] {
            assert!(!rx.is_match(ok), "{ok} is allowed");
        }
        for bad in ["1", "4", "3", "0", "15", "140", "31", "300", "50", "6", "60", "99", "1000", "145"] {
            assert!(rx.is_match(bad), "{bad} is not allowed");
        }
        let amounts: Vec<String> = ["500", "500,", "1,200", "1200"].iter().map(|s| s.to_string()).collect();
        let rx = whole(&except(&amounts, true));
        for ok in ["500", "500,", "1,200", "1200"] {
            assert!(!rx.is_match(ok), "{ok} is allowed");
        }
        for bad in ["5000", "50", "1,2000", "1,20", "12,00", "5,000", "600", "1,200,000"] {
            assert!(rx.is_match(bad), "{bad} is not allowed");
        }
    }

    #[test]
    fn bound_patterns_catch_other_values_in_the_same_sentence_only() {
        let rule = BoundRule {
            id: "refund-windows".into(),
            description: "d".into(),
            kind: BoundKind::Duration,
            context: "refund".into(),
            allowed: vec!["14 days".into(), "30 days".into(), "5 business days".into()],
        };
        let pats: Vec<regex::Regex> =
            forbidden(&rule).iter().map(|f| regex::Regex::new(&format!("(?is){}", f.pattern)).unwrap()).collect();
        let hit = |t: &str| pats.iter().any(|p| p.is_match(t));
        for bad in [
            "You can get a refund within 60 days of payment.",
            "Refunds are possible for 2 weeks",
            "A 45-day refund window applies.",
            "refunds take 3 business days",
            "a refund within sixty days",
            "refund within 114 days",
        ] {
            assert!(hit(bad), "{bad:?} should be blocked");
        }
        for ok in [
            "You can get a refund within 14 days of payment.",
            "Annual plans: a refund within 30 days.",
            "Refunds arrive in about 5 business days.",
            "Our refund policy is in the article. Exports are kept for 60 days.",
            "Invoices are kept for 7 years",
        ] {
            assert!(!hit(ok), "{ok:?} should pass");
        }

        let rule = BoundRule {
            id: "refund-amounts".into(),
            description: "d".into(),
            kind: BoundKind::Amount,
            context: "refund".into(),
            allowed: vec!["$500".into(), "$1,200".into()],
        };
        let pats: Vec<regex::Regex> =
            forbidden(&rule).iter().map(|f| regex::Regex::new(&format!("(?is){}", f.pattern)).unwrap()).collect();
        let hit = |t: &str| pats.iter().any(|p| p.is_match(t));
        for bad in ["Refunds over $5,000 need approval.", "refunds of $900 are fine", "a $50 refund", "refund of 700 dollars!"] {
            assert!(hit(bad), "{bad:?} should be blocked");
        }
        for ok in ["Refunds over $500 need approval.", "refunds up to $1,200, then", "refunds of $1200.", "a $500.00 refund"] {
            assert!(!hit(ok), "{ok:?} should pass");
        }
    }
}
