//! The policy's pre-checks of a turn, decided from the pack and the conversation alone (no
//! retrieval, no model): escalations to a person, out-of-scope topics, decisions that are a
//! person's to make, a customer accepting the offer of a person, and small talk.

use crate::guard::escalation::{DecisionFired, Fired, Turn};
use crate::guard::ActivePolicy;
use crate::tokenizer::ChatMessage;

/// What the pack says about a turn before anything else runs.
#[derive(Debug, Clone, PartialEq)]
pub enum PreCheck {
    /// An escalation trigger fired (or the customer accepted the offer of a person): hand over.
    Handoff(Fired),
    /// An out-of-scope topic: its reply.
    OutOfScope(Fired, String),
    /// The customer asks the bot to decide their own case.
    Decision(DecisionFired),
    /// A greeting or thanks with no question in it: the pack's reply.
    SmallTalk(String),
}

/// Words of a message that is only a greeting or thanks.
const GREETINGS: &[&str] = &["hi", "hello", "hey", "hiya", "howdy", "morning", "afternoon", "evening", "good", "there", "yo", "greetings"];
const THANKS: &[&str] = &["thanks", "thank", "you", "thx", "ty", "cheers", "great", "perfect", "awesome", "ok", "okay", "that", "helps", "helped", "so", "much", "a", "lot", "very", "got", "it", "brilliant", "nice", "cool", "all", "good", "sorted", "solved", "works", "now"];
/// Replies that accept an offer of a person.
const ACCEPT: &[&str] = &[
    "yes", "yes please", "yeah", "yep", "sure", "ok", "okay", "please", "please do", "go ahead", "yes, please", "do it", "connect me",
    "yes connect me", "that would be great", "sounds good", "yes i would", "i would", "i'd like that", "yes i'd like that",
];

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// Runs every pre-check on the turn's customer messages. `messages` are the conversation's
/// (oldest first); `refusals` tell the bot's refusals (for the repeated-failure trigger).
///
/// The turn's customer messages are the run of `user` messages at the end of the conversation,
/// once any trailing assistant messages are set aside: a client cannot skip a check by ending with
/// an assistant message, nor by sending two customer messages and a harmless last one. Escalation,
/// out of scope and decisions run on every one of them; accepting an offer of a person and small
/// talk are read from the latest alone.
pub fn precheck(policy: &ActivePolicy, messages: &[ChatMessage], refusals: &[&str]) -> Option<PreCheck> {
    let mut turns: Vec<Turn<'_>> = messages
        .iter()
        .filter(|m| m.role == "user" || m.role == "assistant")
        .map(|m| Turn { from_customer: m.role == "user", text: &m.content })
        .collect();
    while turns.last().is_some_and(|t| !t.from_customer) {
        turns.pop();
    }
    let latest = *turns.last()?;
    let first_new = turns.iter().rposition(|t| !t.from_customer).map_or(0, |i| i + 1);
    let new: Vec<&str> = turns[first_new..].iter().map(|t| t.text).collect();
    let pack = &policy.pack;
    let is_refusal = |t: &str| refusals.iter().any(|r| r.trim() == t.trim()) || pack.out_of_scope.iter().any(|r| r.reply.trim() == t.trim());
    // Escalation reads the conversation up to each new customer message (a trigger in any of
    // them fires, not only in the last).
    for end in first_new + 1..=turns.len() {
        if let Some(fired) = policy.triggers.escalation(&turns[..end], &is_refusal) {
            return Some(PreCheck::Handoff(fired));
        }
    }
    for text in &new {
        if let Some((fired, reply)) = policy.triggers.out_of_scope(text) {
            return Some(PreCheck::OutOfScope(fired, reply.to_string()));
        }
    }
    let previous_bot = turns.iter().rev().skip(1).find(|t| !t.from_customer).map(|t| t.text);
    if accepts_offer(latest.text) && previous_bot.is_some_and(offers_person) {
        return Some(PreCheck::Handoff(Fired { rule: "accepted-offer".into(), reason: "customer_request".into() }));
    }
    for text in &new {
        if let Some(d) = policy.triggers.decision(text) {
            return Some(PreCheck::Decision(d));
        }
    }
    let w = words(latest.text);
    if new.len() == 1 && !w.is_empty() && w.len() <= 6 && !latest.text.contains('?') {
        if w.iter().all(|x| GREETINGS.contains(&x.as_str())) {
            return Some(PreCheck::SmallTalk(pack.messages.greeting.clone()));
        }
        if w.iter().any(|x| matches!(x.as_str(), "thanks" | "thank" | "thx" | "ty" | "cheers")) && w.iter().all(|x| THANKS.contains(&x.as_str())) {
            return Some(PreCheck::SmallTalk(pack.messages.thanks.clone()));
        }
    }
    None
}

/// A short reply that accepts an offer ("yes please", "sure, go ahead").
pub fn accepts_offer(text: &str) -> bool {
    let t: String = text.to_lowercase().chars().filter(|c| c.is_alphanumeric() || c.is_whitespace() || *c == '\'').collect();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    ACCEPT.contains(&t.as_str()) || (t.split(' ').count() <= 5 && ACCEPT.iter().any(|a| t.starts_with(&format!("{a} "))) && !text.contains('?'))
}

/// Whether a bot answer asks if the customer wants a person ("Would you like me to connect you
/// with …?"): the decision, refusal and handoff offers do; the closing's "I can connect you with a
/// member of our support team." is not a question, so "ok" after it is not a request for one.
pub fn offers_person(text: &str) -> bool {
    let lower = text.to_lowercase();
    lower.match_indices("connect you with").any(|(at, _)| {
        let rest = &lower[at..];
        let end = rest.find(['.', '?', '!', '\n']).map(|i| &rest[i..i + 1]);
        end == Some("?")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceptances_are_short_yeses() {
        for t in ["yes please", "Yes, please!", "sure", "ok go ahead", "Please do."] {
            assert!(accepts_offer(t), "{t}");
        }
        for t in ["yes but how do I reset my password?", "no thanks", "what is the refund window"] {
            assert!(!accepts_offer(t), "{t}");
        }
        assert!(offers_person("Would you like me to connect you with our billing team?"));
        assert!(!offers_person("Is there anything else? If not, I can connect you with a member of our support team."));
    }
}
