//! Handing a conversation to a person: the handoff summary an agent reads (built from the stored
//! turns alone: nothing is invented), the conversation marked handed off, and the summary sent to
//! the operator's webhook.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Observer;
use crate::store::{self, Conversation, Handoff, Role, Store, StoreError, Turn, TurnState};
use crate::webhook::Webhook;

/// Words that show how the customer feels; counted over their messages.
const NEGATIVE: &[&str] = &[
    "angry", "furious", "unacceptable", "terrible", "awful", "worst", "ridiculous", "frustrated", "frustrating", "annoyed", "disappointed",
    "useless", "scam", "lawyer", "sue", "chargeback", "again", "still", "broken", "never", "wrong", "complaint", "upset", "waste",
];
const POSITIVE: &[&str] = &["thanks", "thank", "great", "perfect", "helpful", "appreciate", "awesome", "excellent", "resolved", "works"];

/// The customer's mood from their own words: `negative`, `neutral` or `positive`, with the cue
/// words found (so an agent can see why).
pub fn sentiment(messages: &[&str]) -> Value {
    let (mut neg, mut pos) = (BTreeMap::new(), BTreeMap::new());
    for m in messages {
        for w in m.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            let w = w.to_lowercase();
            if NEGATIVE.contains(&w.as_str()) {
                *neg.entry(w).or_insert(0u32) += 1;
            } else if POSITIVE.contains(&w.as_str()) {
                *pos.entry(w).or_insert(0u32) += 1;
            }
        }
        // Shouting counts as negative.
        let letters: Vec<char> = m.chars().filter(|c| c.is_alphabetic()).collect();
        if letters.len() >= 12 && letters.iter().all(|c| c.is_uppercase()) {
            *neg.entry("(all capitals)".to_string()).or_insert(0) += 1;
        }
    }
    let (n, p): (u32, u32) = (neg.values().sum(), pos.values().sum());
    let label = if n > p {
        "negative"
    } else if p > n {
        "positive"
    } else {
        "neutral"
    };
    let cues: Vec<&String> = neg.keys().chain(pos.keys()).collect();
    json!({"label": label, "negative_cues": n, "positive_cues": p, "cues": cues})
}

fn excerpt(text: &str, max: usize) -> String {
    let t = text.trim();
    if t.chars().count() <= max {
        return t.to_string();
    }
    let cut: String = t.chars().take(max).collect();
    format!("{}…", cut.trim_end())
}

/// The handoff summary (its JSON schema is `docs/schemas/handoff-summary.schema.json`): what the
/// customer wants, what the bot tried, which articles it cited, how the customer feels, and why
/// the conversation went to a person. Built from the stored turns alone: nothing is invented.
pub fn handoff_summary(conv: &Conversation, turns: &[Turn], reason: &str, by: &str) -> Value {
    let customer_msgs: Vec<&str> = turns.iter().filter(|t| t.role == Role::Customer).map(|t| t.content.as_str()).collect();
    let mut docs: BTreeMap<String, String> = BTreeMap::new();
    let tried: Vec<Value> = turns
        .iter()
        .filter(|t| t.role != Role::Customer)
        .map(|t| {
            let detail = t.detail.clone().unwrap_or(Value::Null);
            let cited: Vec<String> = detail["citations"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .filter_map(|c| {
                            let id = c["doc_id"].as_str()?.to_string();
                            docs.insert(id.clone(), c["title"].as_str().unwrap_or("").to_string());
                            Some(id)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let outcome = match (t.role, detail["guard"]["action"].as_str(), detail["grounding"]["status"].as_str()) {
                (Role::Agent, _, _) => "agent_reply",
                (_, Some("handoff"), _) => "handoff",
                (_, Some("refusal"), _) => "policy_refusal",
                (_, _, Some("no_relevant_docs")) => "not_in_docs",
                _ if t.state != TurnState::Complete => "not_finished",
                _ => "answered",
            };
            json!({
                "turn_id": t.id,
                "by": if t.role == Role::Agent { "agent" } else { "bot" },
                "outcome": outcome,
                "answer": excerpt(&t.content, 280),
                "cited": cited,
            })
        })
        .collect();
    json!({
        "conversation_id": conv.id,
        "reason": reason,
        "requested_by": by,
        "customer": {
            "id": conv.customer.id,
            "account_id": conv.customer.account_id,
            "plan": conv.customer.plan,
            "locale": conv.customer.locale,
        },
        "issue": excerpt(customer_msgs.first().copied().unwrap_or(""), 500),
        "latest_message": excerpt(customer_msgs.last().copied().unwrap_or(""), 500),
        "customer_messages": customer_msgs.len(),
        "tried": tried,
        "docs_cited": docs.into_iter().map(|(id, title)| json!({"doc_id": id, "title": title})).collect::<Vec<_>>(),
        "sentiment": sentiment(&customer_msgs),
        "created_ms": store::now_ms(),
    })
}

/// Marks the conversation handed off with its summary and sends the summary to the webhook (the
/// delivery is recorded before this returns; sending happens in the background).
pub async fn hand_off(
    store: &Store,
    webhook: Option<&Webhook>,
    observer: &dyn Observer,
    conversation_id: &str,
    reason: &str,
    by: &str,
) -> Result<(Conversation, Value), StoreError> {
    let (conv, turns) = store.get_conversation(conversation_id).await?;
    let summary = handoff_summary(&conv, &turns, reason, by);
    let handoff = Handoff { reason: reason.to_string(), summary: summary.clone(), by: by.to_string(), at_ms: store::now_ms() };
    let conv = store.set_handoff(conversation_id, handoff).await?;
    observer.handoff(reason);
    if let Some(hook) = webhook {
        let payload = json!({"event": "handoff", "conversation_id": conv.id, "customer_id": conv.customer.id, "summary": summary});
        if let Err(e) = hook.enqueue("handoff", payload).await {
            // The conversation is handed off either way; the agent queue shows it.
            tracing::error!(error = %e, conversation = %conv.id, "the handoff webhook delivery could not be recorded");
        }
    }
    Ok((conv, summary))
}

