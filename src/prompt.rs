//! Grounded prompt assembly: system instructions, numbered passages and the conversation, fitted
//! to an explicit token budget. Whatever does not fit is dropped deliberately and listed in the
//! result (never silently); the caller reports it.
//!
//! Also the citation side of grounding: [`CitationFilter`] rewrites the streamed answer so that a
//! marker `[n]` survives only when passage `n` was actually given to the model.

use crate::retrieval::Passage;
use crate::tokenizer::ChatMessage;

/// What the model is told about its job when answering from passages. The passages follow it,
/// numbered; the model cites them as `[n]`.
///
/// Kept short on purpose: measured on the default 135M model, a one-paragraph instruction keeps
/// its answers on the passages' facts, while longer rule lists made it drift into generic advice.
pub const GROUNDED_INSTRUCTIONS: &str = "You are a customer support assistant. Answer the customer using only \
these help center articles, briefly, and cite the article you used like [1]. If they do not answer the question, \
say so and offer to connect the customer with a person.";

/// Token allowances of the two parts of the prompt that can grow without bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Tokens all passages together may take.
    pub passage_tokens: usize,
    /// Tokens the earlier turns together may take (the latest user message always goes in whole).
    pub history_tokens: usize,
}

/// A passage that did not go into the prompt, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedPassage {
    pub chunk_id: String,
    pub tokens: usize,
}

/// The assembled conversation and an account of what went into it.
#[derive(Debug, Clone)]
pub struct GroundedPrompt {
    /// Ready for the chat template: instructions + passages, the kept history, the latest message.
    pub messages: Vec<ChatMessage>,
    /// The passages given to the model, in prompt order: passage `i` is cited as `[i + 1]`.
    pub given: Vec<Passage>,
    /// Retrieved passages left out because the passage budget was spent.
    pub dropped_passages: Vec<DroppedPassage>,
    /// Earlier messages left out (the oldest ones) because the history budget was spent.
    pub dropped_history: usize,
    pub passage_tokens: usize,
    pub history_tokens: usize,
}

/// Renders one passage as the model sees it.
pub fn format_passage(number: usize, p: &Passage) -> String {
    let heading = if p.section.is_empty() { p.title.clone() } else { format!("{} > {}", p.title, p.section) };
    format!("[{number}] {heading}\n{}", p.text.trim())
}

/// Builds the grounded conversation.
///
/// `passages` come ranked best first; each is kept if it still fits the passage budget, so a long
/// low-ranked passage is dropped while a short one after it may still go in. `history` holds the
/// earlier messages (oldest first, any client system messages included); the newest are kept while
/// they fit the history budget, and once one does not fit, it and everything older is dropped, so the
/// kept history is always a contiguous recent stretch. `count` gives a text's token count.
pub fn build(
    passages: &[Passage],
    history: &[ChatMessage],
    latest: &ChatMessage,
    budget: Budget,
    count: &dyn Fn(&str) -> usize,
) -> GroundedPrompt {
    let mut given = Vec::new();
    let mut dropped_passages = Vec::new();
    let mut passage_tokens = 0;
    for p in passages {
        let tokens = count(&format_passage(given.len() + 1, p)) + 1;
        if passage_tokens + tokens <= budget.passage_tokens {
            passage_tokens += tokens;
            given.push(p.clone());
        } else {
            dropped_passages.push(DroppedPassage { chunk_id: p.chunk_id.clone(), tokens });
        }
    }

    // Client system messages are kept apart from the conversation budget only when they fit too:
    // every earlier message, whatever its role, competes for the same allowance.
    let mut history_tokens = 0;
    let mut keep_from = history.len();
    for (i, m) in history.iter().enumerate().rev() {
        let tokens = count(&m.content) + 4;
        if history_tokens + tokens > budget.history_tokens {
            break;
        }
        history_tokens += tokens;
        keep_from = i;
    }

    let mut system = String::from(GROUNDED_INSTRUCTIONS);
    system.push_str("\n\nHelp center articles:\n");
    for (i, p) in given.iter().enumerate() {
        system.push('\n');
        system.push_str(&format_passage(i + 1, p));
        system.push('\n');
    }
    let mut messages = vec![ChatMessage::new("system", system)];
    messages.extend(history[keep_from..].iter().cloned());
    messages.push(latest.clone());
    GroundedPrompt { messages, given, dropped_passages, dropped_history: keep_from, passage_tokens, history_tokens }
}

/// Words that carry no content for attribution.
const STOP_WORDS: &[&str] = &[
    "the", "and", "for", "you", "your", "are", "can", "with", "that", "this", "from", "have", "has", "not", "but", "all",
    "any", "our", "will", "its", "was", "were", "been", "into", "then", "than", "they", "them", "their", "there", "what",
    "when", "which", "who", "how", "also", "only", "may", "each", "per", "one", "more", "use", "get", "yes",
];

fn content_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 3 || w.chars().all(|c| c.is_ascii_digit()) && !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .collect()
}

/// How much of `answer` the passages support: for each passage, the share of the answer's content
/// words (lower-cased, stop words dropped) that occur in it; and overall, the share occurring in any
/// of them. A measure of lexical support, not of truth: it tells an answer built from the passages'
/// wording from one that is not.
pub fn support(answer: &str, passages: &[Passage]) -> (f32, Vec<f32>) {
    let words = content_words(answer);
    if words.is_empty() {
        return (0.0, vec![0.0; passages.len()]);
    }
    let sets: Vec<std::collections::HashSet<String>> =
        passages.iter().map(|p| content_words(&format!("{} {} {}", p.title, p.section, p.text)).into_iter().collect()).collect();
    let share = |hit: &dyn Fn(&String) -> bool| words.iter().filter(|w| hit(w)).count() as f32 / words.len() as f32;
    let each = sets.iter().map(|set| share(&|w| set.contains(w))).collect();
    let overall = share(&|w| sets.iter().any(|set| set.contains(w)));
    (overall, each)
}

/// Least share of an answer's content words a passage must hold to be attributed as its source.
pub const MIN_ATTRIBUTION: f32 = 0.35;
/// Most passages attributed to one answer.
pub const MAX_ATTRIBUTED: usize = 2;

/// How far below the best passage's share another passage may be and still be attributed.
pub const ATTRIBUTION_MARGIN: f32 = 0.1;

/// Passage numbers (1-based) to attribute an answer to when the model cited none itself: passages
/// holding at least [`MIN_ATTRIBUTION`] of its content words and within [`ATTRIBUTION_MARGIN`] of
/// the best one, in retrieval rank order (near-ties go to the better-ranked passage, which measured
/// more often relevant), at most [`MAX_ATTRIBUTED`].
pub fn attribute(per_passage: &[f32]) -> Vec<usize> {
    let best = per_passage.iter().copied().fold(0.0f32, f32::max);
    per_passage
        .iter()
        .enumerate()
        .filter(|(_, &s)| s >= MIN_ATTRIBUTION && s >= best - ATTRIBUTION_MARGIN)
        .take(MAX_ATTRIBUTED)
        .map(|(i, _)| i + 1)
        .collect()
}

/// Rewrites streamed answer text so that citation markers name only passages that were given.
///
/// A marker is `[n]` or a list `[n, m]`. A marker whose numbers all name given passages passes as is;
/// one naming any passage that was not given is removed from the text and counted in
/// [`CitationFilter::invalid`]. Text that could still become a marker (`[`, `[1`, `[1,`) is held back
/// until it is decided, so an invalid marker is never streamed.
#[derive(Debug, Clone)]
pub struct CitationFilter {
    given: usize,
    held: String,
    cited: Vec<usize>,
    invalid: usize,
}

/// Longest a pending marker may grow before it is treated as plain text.
const MAX_MARKER_LEN: usize = 16;

impl CitationFilter {
    /// `given`: how many passages the model saw (markers 1..=given are valid).
    pub fn new(given: usize) -> Self {
        CitationFilter { given, held: String::new(), cited: Vec::new(), invalid: 0 }
    }

    /// Feeds streamed text; returns the text that may be emitted now.
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        let mut out = String::new();
        loop {
            let Some(start) = self.held.find('[') else {
                out.push_str(&std::mem::take(&mut self.held));
                return out;
            };
            out.push_str(&self.held[..start]);
            self.held.drain(..start);
            match self.classify() {
                Marker::Pending => return out,
                Marker::Plain => {
                    out.push('[');
                    self.held.drain(..1);
                }
                Marker::Complete { len, numbers } => {
                    let marker: String = self.held.drain(..len).collect();
                    if numbers.iter().all(|&n| n >= 1 && n <= self.given) {
                        for n in numbers {
                            if !self.cited.contains(&n) {
                                self.cited.push(n);
                            }
                        }
                        out.push_str(&marker);
                    } else {
                        self.invalid += 1;
                        // Drop the space before a removed marker so no double space is left.
                        if out.ends_with(' ') && self.held.starts_with([' ', '.', ',', '!', '?', ';', ':']) {
                            out.pop();
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: releases held text (an unfinished marker is plain text).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Passage numbers cited by valid markers, in order of first appearance.
    pub fn cited(&self) -> &[usize] {
        &self.cited
    }

    /// Markers removed because they named a passage the model was not given.
    pub fn invalid(&self) -> usize {
        self.invalid
    }

    /// Looks at `held`, which starts with `[`.
    fn classify(&self) -> Marker {
        let bytes = self.held.as_bytes();
        let mut numbers = Vec::new();
        let mut i = 1;
        loop {
            let digits_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == bytes.len() {
                return if i <= MAX_MARKER_LEN { Marker::Pending } else { Marker::Plain };
            }
            if i == digits_start || i - digits_start > 3 {
                return Marker::Plain;
            }
            numbers.push(self.held[digits_start..i].parse::<usize>().unwrap_or(0));
            match bytes[i] {
                b']' => return Marker::Complete { len: i + 1, numbers },
                b',' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] == b' ' {
                        i += 1;
                    }
                    if i == bytes.len() {
                        return if i <= MAX_MARKER_LEN { Marker::Pending } else { Marker::Plain };
                    }
                }
                _ => return Marker::Plain,
            }
        }
    }
}

enum Marker {
    Pending,
    Plain,
    Complete { len: usize, numbers: Vec<usize> },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passage(id: &str, words: usize) -> Passage {
        Passage {
            chunk_id: format!("{id}#0"),
            doc_id: id.into(),
            title: id.into(),
            section: "S".into(),
            source: format!("{id}.md"),
            product_area: "billing".into(),
            locale: "en".into(),
            updated: "2026-01-01".into(),
            text: vec!["word"; words].join(" "),
            snippet: String::new(),
            score: 1.0,
            relevance: 1.0,
            lexical: 1.0,
            semantic: 1.0,
        }
    }

    fn words(text: &str) -> usize {
        text.split_whitespace().count()
    }

    fn filter_all(given: usize, pieces: &[&str]) -> (String, CitationFilter) {
        let mut f = CitationFilter::new(given);
        let mut out = String::new();
        for p in pieces {
            out.push_str(&f.push(p));
        }
        out.push_str(&f.finish());
        (out, f)
    }

    #[test]
    fn support_measures_the_answer_words_found_in_each_passage() {
        let mut a = passage("a", 0);
        a.text = "Refunds of annual plans are pro-rated within 30 days".into();
        let mut b = passage("b", 0);
        b.text = "Reset your password from the sign-in page".into();
        let (overall, each) = support("Annual plans get a pro-rated refund within 30 days.", &[a.clone(), b.clone()]);
        assert!(each[0] > 0.7 && each[1] < 0.2, "{each:?}");
        assert!(overall >= each[0]);
        assert_eq!(attribute(&each), vec![1]);
        let (overall, each) = support("The weather in Ulaanbaatar is cold.", &[a, b]);
        assert!(overall < 0.2, "{overall}");
        assert!(attribute(&each).is_empty());
    }

    #[test]
    fn passages_that_overflow_the_budget_are_dropped_and_listed() {
        let ps = [passage("a", 50), passage("b", 500), passage("c", 20)];
        let latest = ChatMessage::new("user", "q");
        let g = build(&ps, &[], &latest, Budget { passage_tokens: 100, history_tokens: 100 }, &words);
        let given: Vec<_> = g.given.iter().map(|p| p.doc_id.as_str()).collect();
        assert_eq!(given, ["a", "c"]);
        assert_eq!(g.dropped_passages.len(), 1);
        assert_eq!(g.dropped_passages[0].chunk_id, "b#0");
        assert!(g.passage_tokens <= 100);
        // Passage numbers in the prompt follow the kept order.
        assert!(g.messages[0].content.contains("[2] c > S"));
        assert!(!g.messages[0].content.contains("b > S"));
    }

    #[test]
    fn oldest_history_is_dropped_first_and_counted() {
        let history: Vec<_> = (0..6).map(|i| ChatMessage::new(if i % 2 == 0 { "user" } else { "assistant" }, format!("turn {i} {}", "x ".repeat(10)))).collect();
        let latest = ChatMessage::new("user", "latest question");
        let g = build(&[], &history, &latest, Budget { passage_tokens: 10, history_tokens: 40 }, &words);
        // Each turn is 12 words + 4 overhead = 16 tokens: two fit in 40.
        assert_eq!(g.dropped_history, 4);
        assert_eq!(g.messages.len(), 1 + 2 + 1);
        assert!(g.messages[1].content.starts_with("turn 4"));
        assert_eq!(g.messages.last().unwrap().content, "latest question");
    }

    #[test]
    fn valid_markers_pass_and_invalid_ones_are_removed() {
        let (out, f) = filter_all(2, &["Refunds take 5 days [1]. See also [3] and [2, 1]."]);
        assert_eq!(out, "Refunds take 5 days [1]. See also and [2, 1].");
        assert_eq!(f.cited(), [1, 2]);
        assert_eq!(f.invalid(), 1);
    }

    #[test]
    fn markers_split_across_pieces_are_held_until_decided() {
        let mut f = CitationFilter::new(1);
        assert_eq!(f.push("Yes ["), "Yes ");
        assert_eq!(f.push("1"), "");
        assert_eq!(f.push("] ok ["), "[1] ok ");
        assert_eq!(f.push("9]"), "");
        assert_eq!(f.push("."), ".");
        assert_eq!(f.finish(), "");
        assert_eq!(f.invalid(), 1);
    }

    #[test]
    fn brackets_that_are_not_markers_pass_through() {
        let (out, f) = filter_all(1, &["[note] array[0 ", "] and [x", "] [", "1234] [0]"]);
        // `[0]` names no passage (numbering starts at 1), so it is removed.
        assert_eq!(out, "[note] array[0 ] and [x] [1234] ");
        assert_eq!(f.cited(), [] as [usize; 0]);
        assert_eq!(f.invalid(), 1);
        let (out, _) = filter_all(1, &["trailing [1"]);
        assert_eq!(out, "trailing [1");
    }
}
