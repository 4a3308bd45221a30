//! The sentence check of generated answers: each sentence the model writes is held back until it
//! is complete, then checked before anything of it is sent.
//!
//! - Never repeated: a sentence already sent is dropped.
//! - Never a commitment ([`crate::guard::commitment`]) unless it quotes approved text verbatim.
//! - Grounded answers: every number, duration and amount, every capitalized name (plan names, UI
//!   labels) and every quoted label in it must occur in the evidence it cites (all the evidence
//!   given, when it cites none), and enough of its content words must be in that evidence.
//!
//! A sentence that fails is replaced by the evidence unit it paraphrased (the given unit sharing the
//! most content words with it, with its marker), or dropped when none is close enough.

use std::collections::HashSet;

use super::report::SentenceChecks;
use crate::retrieval::evidence::normalize_quote;

/// Least share of a sentence's content words the evidence must hold.
pub const MIN_SUPPORT: f32 = 0.6;
/// Least share of a failed sentence's content words a unit must hold to replace it.
pub const MIN_PARAPHRASE: f32 = 0.3;

/// One evidence unit the model was given, with the passage number it is cited by.
#[derive(Debug, Clone)]
pub struct GivenUnit {
    pub text: String,
    /// How the unit is shown when it replaces a sentence (list items with their marker).
    pub display: String,
    pub passage: usize,
    /// The article title and section, whose words and names count as evidence too.
    pub context: String,
}

/// What the check needs to know about the answer.
pub struct Checker {
    /// Grounded: the evidence given; none for an ungrounded answer (only repetition and
    /// commitments are checked then).
    given: Option<Vec<GivenUnit>>,
    /// Whether a sentence is an approved unit's text (a commitment that quotes is allowed).
    is_verbatim: Box<dyn Fn(&str) -> bool + Send>,
    /// Texts always allowed as they are (the pack's own messages).
    allowed: HashSet<String>,
    sent: HashSet<String>,
    used_units: HashSet<usize>,
    held: String,
    pub report: SentenceChecks,
}

impl Checker {
    pub fn new(given: Option<Vec<GivenUnit>>, is_verbatim: Box<dyn Fn(&str) -> bool + Send>, allowed: &[String]) -> Checker {
        Checker {
            given,
            is_verbatim,
            allowed: allowed.iter().map(|a| normalize_quote(a)).collect(),
            sent: HashSet::new(),
            used_units: HashSet::new(),
            held: String::new(),
            report: SentenceChecks::default(),
        }
    }

    /// Feeds generated text; returns what may be sent now (whole checked sentences).
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        let mut out = String::new();
        while let Some(end) = sentence_end(&self.held) {
            let sentence: String = self.held.drain(..end).collect();
            out.push_str(&self.check(&sentence));
        }
        out
    }

    /// The end of the answer: checks what is left.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.held);
        if rest.trim().is_empty() {
            return rest;
        }
        self.check(&rest)
    }

    /// One complete sentence (with the whitespace after it): the text to send in its place.
    fn check(&mut self, raw: &str) -> String {
        let body = raw.trim();
        if body.is_empty() {
            return raw.to_string();
        }
        let trailing = &raw[raw.trim_end().len()..];
        let leading = &raw[..raw.len() - raw.trim_start().len()];
        // A list marker does not make a sentence new ("3. Click Save." after "2. Click Save.").
        let key = normalize_quote(strip_list_marker(body));
        if key.is_empty() {
            return raw.to_string();
        }
        if self.allowed.contains(&key) {
            self.sent.insert(key);
            self.report.kept += 1;
            return raw.to_string();
        }
        if !self.sent.insert(key.clone()) {
            self.fail("repeated");
            self.report.dropped += 1;
            return String::new();
        }
        let verbatim = (self.is_verbatim)(body);
        let failure = if crate::guard::commitment::detect(body).is_some() && !verbatim {
            Some("commitment")
        } else if let Some(given) = &self.given {
            if verbatim {
                None
            } else {
                grounded_failure(body, given)
            }
        } else {
            None
        };
        let Some(why) = failure else {
            self.report.kept += 1;
            return raw.to_string();
        };
        self.fail(why);
        match self.paraphrased(body) {
            Some(i) => {
                let u = self.given.as_ref().map(|g| g[i].clone()).expect("a replacement comes from the given units");
                self.used_units.insert(i);
                self.report.replaced += 1;
                let text = format!("{leading}{} [{}]{trailing}", u.display, u.passage);
                self.sent.insert(normalize_quote(&u.text));
                text
            }
            None => {
                self.report.dropped += 1;
                String::new()
            }
        }
    }

    fn fail(&mut self, why: &str) {
        self.report.failures.push(why.to_string());
    }

    /// The given unit a failed sentence paraphrased: most of its content words in common.
    fn paraphrased(&self, sentence: &str) -> Option<usize> {
        let given = self.given.as_ref()?;
        let words: HashSet<String> = content_words(&strip_markers(sentence)).into_iter().collect();
        if words.is_empty() {
            return None;
        }
        let mut best: Option<(usize, f32)> = None;
        for (i, u) in given.iter().enumerate() {
            if self.used_units.contains(&i) || self.sent.contains(&normalize_quote(&u.text)) {
                continue;
            }
            let unit: HashSet<String> = content_words(&u.text).into_iter().collect();
            let share = words.iter().filter(|w| unit.contains(*w)).count() as f32 / words.len() as f32;
            if share >= MIN_PARAPHRASE && best.is_none_or(|(_, s)| share > s) {
                best = Some((i, share));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// Why a grounded sentence fails, if it does. The sentence must rest on one evidence unit (with its
/// article title and section): the cited unit that shares most of its content words. Every number,
/// capitalized name and quoted label of the sentence must be in that unit, and enough of its content
/// words: facts taken from two places ("Starter" from one sentence, "99.9%" from another) do not
/// make a supported sentence.
fn grounded_failure(sentence: &str, given: &[GivenUnit]) -> Option<&'static str> {
    let cited = cited_numbers(sentence);
    let pool: Vec<&GivenUnit> = if cited.is_empty() { given.iter().collect() } else { given.iter().filter(|u| cited.contains(&u.passage)).collect() };
    let pool: Vec<&GivenUnit> = if pool.is_empty() { given.iter().collect() } else { pool };
    let plain = strip_markers(sentence);
    let words = content_words(&plain);
    let share_in = |u: &GivenUnit| -> f32 {
        if words.is_empty() {
            return 1.0;
        }
        let have: HashSet<String> = content_words(&format!("{}\n{}", u.context, u.text)).into_iter().collect();
        words.iter().filter(|w| have.contains(*w)).count() as f32 / words.len() as f32
    };
    let Some(best) = pool.iter().copied().max_by(|a, b| share_in(a).total_cmp(&share_in(b))) else { return Some("low_support") };
    let text = format!("{}\n{}", best.context, best.text);
    let numbers_in_unit: HashSet<String> = numbers(&text).into_iter().collect();
    if numbers(&plain).iter().any(|n| !numbers_in_unit.contains(n)) {
        return Some("unsupported_number");
    }
    for name in names(&plain) {
        if !text.contains(&name) {
            return Some("unsupported_name");
        }
    }
    if share_in(best) < MIN_SUPPORT {
        return Some("low_support");
    }
    None
}

/// Where the first complete sentence of `held` ends (after its closing punctuation, markers and the
/// whitespace that follows), if one is complete; a line break also ends one (list items).
pub fn sentence_end(held: &str) -> Option<usize> {
    let b = held.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            let mut j = i + 1;
            while j < b.len() && b[j] == b'\n' {
                j += 1;
            }
            return Some(j);
        }
        if matches!(c, b'.' | b'!' | b'?') {
            // `1.` at the start of a line is a list marker, not a sentence end.
            let line_start = held[..i].rfind('\n').map(|p| p + 1).unwrap_or(0);
            let before = held[line_start..i].trim_start();
            if c == b'.' && !before.is_empty() && before.bytes().all(|x| x.is_ascii_digit()) {
                i += 1;
                continue;
            }
            // Skip closing quotes/brackets and a citation marker such as ` [1]` after the stop.
            let mut j = i + 1;
            while j < b.len() && matches!(b[j], b'"' | b'\'' | b')') {
                j += 1;
            }
            let rest = &held[j..];
            let after_marker = rest.trim_start_matches(' ');
            if after_marker.starts_with('[') {
                match after_marker.find(']') {
                    Some(close) if after_marker[1..close].chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') => {
                        j += rest.len() - after_marker.len() + close + 1;
                    }
                    Some(_) => {}
                    None => return None, // the marker may still be arriving
                }
            }
            if j >= b.len() {
                return None; // wait for what follows: a decimal point, or the end
            }
            if b[j] == b'\n' {
                // The line break belongs to the sentence it ends.
                let mut k = j;
                while k < b.len() && b[k] == b'\n' {
                    k += 1;
                }
                return Some(k);
            }
            if b[j] == b' ' {
                let mut k = j;
                while k < b.len() && b[k] == b' ' {
                    k += 1;
                }
                if k >= b.len() {
                    return None;
                }
                // `5.5` or `e.g. x` are not ends: the next word must start like a sentence.
                let next = held[k..].chars().next().unwrap_or(' ');
                if next.is_uppercase() || next.is_ascii_digit() || next == '\n' || next == '[' || next == '"' || next == '-' || next == '*' {
                    return Some(k);
                }
            }
            i = j.max(i + 1);
            continue;
        }
        i += 1;
    }
    None
}

fn strip_list_marker(s: &str) -> &str {
    let t = s.trim_start();
    if let Some(rest) = t.strip_prefix("- ").or_else(|| t.strip_prefix("* ")) {
        return rest;
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && digits <= 3 {
        if let Some(rest) = t[digits..].strip_prefix(". ").or_else(|| t[digits..].strip_prefix(") ")) {
            return rest;
        }
    }
    t
}

fn cited_numbers(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        if let Some(close) = after.find(']') {
            for n in after[..close].split(',') {
                if let Ok(v) = n.trim().parse::<usize>() {
                    out.push(v);
                }
            }
            rest = &after[close..];
        } else {
            break;
        }
    }
    out
}

fn strip_markers(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close) if after[..close].chars().all(|c| c.is_ascii_digit() || c == ',' || c == ' ') => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Numbers as written, normalized: `$1,200.00` -> `1200`, `99.9%` -> `99.9`, `5–10` -> `5`, `10`.
pub fn numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let mut j = i;
            let mut s = String::new();
            while j < chars.len() && (chars[j].is_ascii_digit() || ((chars[j] == ',' || chars[j] == '.') && j + 1 < chars.len() && chars[j + 1].is_ascii_digit())) {
                if chars[j] != ',' {
                    s.push(chars[j]);
                }
                j += 1;
            }
            let s = s.strip_suffix(".00").map(str::to_string).unwrap_or(s);
            out.push(s);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Capitalized words that are not the first word of the sentence (names: plans, UI labels,
/// products), and quoted labels.
fn names(sentence: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = sentence.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        let clean: String = w.trim_matches(|c: char| !c.is_alphanumeric()).to_string();
        if i == 0 || clean.len() < 2 || clean == "I" {
            continue;
        }
        let prev_ends = words[i - 1].ends_with(['.', ':', '!', '?']);
        if !prev_ends && clean.chars().next().is_some_and(char::is_uppercase) && clean.chars().skip(1).any(char::is_lowercase) {
            out.push(clean);
        }
    }
    for q in ['"', '“'] {
        let close = if q == '"' { '"' } else { '”' };
        let mut rest = sentence;
        while let Some(a) = rest.find(q) {
            let after = &rest[a + q.len_utf8()..];
            match after.find(close) {
                Some(b) if b > 0 && b < 60 => {
                    out.push(after[..b].trim().to_string());
                    rest = &after[b + close.len_utf8()..];
                }
                _ => break,
            }
        }
    }
    out
}

/// Lower-cased words of three letters or more (and numbers), without common function words.
pub fn content_words(text: &str) -> Vec<String> {
    const STOP: &[&str] = &[
        "the", "and", "for", "you", "your", "are", "can", "with", "that", "this", "from", "have", "has", "not", "but", "all", "any",
        "our", "will", "its", "was", "were", "been", "into", "then", "than", "they", "them", "their", "there", "what", "when",
        "which", "who", "how", "also", "only", "may", "each", "per", "one", "more", "use", "get", "yes", "just", "here", "help",
        "center", "article", "says", "about", "would", "could", "should", "does", "did", "let", "know", "please", "sure",
    ];
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 3 || (!w.is_empty() && w.chars().all(|c| c.is_ascii_digit())))
        .map(str::to_lowercase)
        .filter(|w| !STOP.contains(&w.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given() -> Vec<GivenUnit> {
        vec![
            GivenUnit {
                text: "The link is valid for 60 minutes and can be used once.".into(),
                display: "3. The link is valid for 60 minutes and can be used once.".into(),
                passage: 1,
                context: "Reset your Tallyworks password Reset a forgotten password".into(),
            },
            GivenUnit { text: "Go to the sign-in page and select Forgot password?".into(), display: "1. Go to the sign-in page and select Forgot password?".into(), passage: 1, context: String::new() },
        ]
    }

    fn checker() -> Checker {
        Checker::new(Some(given()), Box::new(|s: &str| normalize_quote(s) == "the link is valid for 60 minutes and can be used once"), &[])
    }

    #[test]
    fn an_unsupported_number_is_replaced_by_the_evidence_it_paraphrased() {
        let mut c = checker();
        let mut out = c.push("The reset link stays valid for 24 hours [1]. ");
        out.push_str(&c.finish());
        assert_eq!(out, "3. The link is valid for 60 minutes and can be used once. [1] ");
        assert_eq!((c.report.kept, c.report.replaced, c.report.dropped), (0, 1, 0));
        assert_eq!(c.report.failures, ["unsupported_number"]);
    }

    #[test]
    fn supported_sentences_pass_and_repeats_are_dropped() {
        let mut c = checker();
        let mut out = c.push("The link is valid for 60 minutes [1]. The link is valid for 60 minutes [1]. ");
        out.push_str(&c.push("Open the sign-in page and select Forgot password? "));
        out.push_str(&c.finish());
        assert_eq!(out, "The link is valid for 60 minutes [1]. Open the sign-in page and select Forgot password? ");
        assert_eq!((c.report.kept, c.report.dropped), (2, 1));
    }

    #[test]
    fn commitments_and_unrelated_claims_never_pass() {
        let mut c = checker();
        let mut out = c.push("We will refund the full amount, free of charge. ");
        out.push_str(&c.push("Our Premium plan includes phone support. "));
        out.push_str(&c.finish());
        assert_eq!(out, "");
        assert_eq!(c.report.dropped, 2);
        assert_eq!(c.report.failures[0], "commitment");
    }

    #[test]
    fn a_repeated_list_item_is_dropped_whatever_its_number() {
        let mut c = Checker::new(None, Box::new(|_: &str| false), &[]);
        let mut out = c.push("1. Open Settings.\n2. Click on Save.\n3. Click on Save.\n4. Click on Save.\n");
        out.push_str(&c.finish());
        assert_eq!(out, "1. Open Settings.\n2. Click on Save.\n");
        assert_eq!(c.report.dropped, 2);
    }

    #[test]
    fn sentence_ends_wait_for_markers_and_decimals() {
        assert_eq!(sentence_end("It costs 5.5"), None);
        assert_eq!(sentence_end("Done. Next"), Some(6));
        assert_eq!(sentence_end("Done [1"), None);
        assert_eq!(sentence_end("Done. [1] Next"), Some(10));
        assert_eq!(sentence_end("1. First\n2. Second"), Some(9));
        assert_eq!(numbers("$1,200.00 and 99.9% or 5–10"), ["1200", "99.9", "5", "10"]);
    }
}
