//! The records the store keeps, as the rest of Helpline sees them.
//!
//! These types are the store's whole vocabulary: handlers serialise them
//! straight into API responses and export lines, so their serde shape is part
//! of the public contract (enum values are `snake_case` strings, timestamps
//! are milliseconds since the Unix epoch).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::StoreError;

/// Who a conversation belongs to, as far as the caller told us.
///
/// Every field is optional because anonymous widget visitors have none of
/// them; a later message may add what was missing (see
/// [`Store::ensure_conversation`](super::Store::ensure_conversation)).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Customer {
    /// The customer's id in the caller's system; it decides ownership.
    pub id: Option<String>,
    pub account_id: Option<String>,
    pub plan: Option<String>,
    pub locale: Option<String>,
    /// Free-form facts the caller wants kept with the conversation.
    #[serde(default)]
    pub attributes: Map<String, Value>,
    /// The id (and details) came from a customer token the server verified, not from the request.
    /// Set when the conversation is created; kept for its whole life.
    #[serde(default)]
    pub verified: bool,
}

/// Where a conversation stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ConversationStatus {
    Open,
    HandedOff,
    Resolved,
}

/// A conversation, without its turns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub customer: Customer,
    pub status: ConversationStatus,
    pub created_ms: i64,
    /// Moves on every change to the conversation or any of its turns, so a
    /// poller filtering on it sees every change.
    pub updated_ms: i64,
    /// Number of turns, which is also the `seq` of the latest one.
    pub turns: i64,
    pub handoff: Option<Handoff>,
    pub feedback: Option<Feedback>,
}

/// Why and how a conversation was passed to a human.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Handoff {
    pub reason: String,
    /// The summary handed to the agent (free-form JSON produced by the server).
    pub summary: Value,
    /// What triggered it: `policy`, `customer`, `repeated_failure`, `agent`...
    pub by: String,
    pub at_ms: i64,
}

/// Who wrote a turn.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Customer,
    Bot,
    Agent,
}

/// The life cycle of a turn.
///
/// Customer and agent messages are normally written `Complete`. A bot answer
/// is written `Pending` before its first token and finalised by
/// [`Store::complete_turn`](super::Store::complete_turn); one still pending
/// when its writer died becomes `Interrupted` through
/// [`Store::recover`](super::Store::recover).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TurnState {
    Complete,
    Pending,
    Interrupted,
    /// The client went away before the answer was finished.
    Disconnected,
    Failed,
}

/// One message of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Turn {
    pub id: String,
    pub conversation_id: String,
    /// Position in the conversation: 1, 2, 3... without gaps.
    pub seq: i64,
    pub role: Role,
    pub content: String,
    pub state: TurnState,
    pub created_ms: i64,
    pub completed_ms: Option<i64>,
    pub finish_reason: Option<String>,
    /// Everything the server reports about an answer (citations, guard
    /// outcome, grounding, timings, usage) as one JSON object.
    pub detail: Option<Value>,
    /// The audit record of a bot answer (model sha256, template hash, index
    /// version, policy version, passages, sampling, seed...).
    pub audit: Option<Value>,
    pub feedback: Option<Feedback>,
}

/// A customer's verdict on one answer or on a whole conversation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Feedback {
    pub helpful: Option<bool>,
    pub resolved: Option<bool>,
    pub comment: Option<String>,
    pub at_ms: i64,
}

/// A webhook waiting in (or done with) the outbox.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Delivery {
    pub id: String,
    pub event: String,
    /// The body to post. If it names a conversation (`conversation_id` or
    /// `conversation.id`) or a customer (`customer_id`, `customer.id` or
    /// `conversation.customer.id`), the delivery is deleted together with
    /// that conversation or customer, so retention and privacy deletions
    /// reach the outbox too.
    pub payload: Value,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl Delivery {
    /// A new pending delivery with a fresh `dlv_` id, due now.
    pub fn new(event: impl Into<String>, payload: Value) -> Delivery {
        let now = super::now_ms();
        Delivery {
            id: super::new_id("dlv_"),
            event: event.into(),
            payload,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_ms: now,
            last_error: None,
            created_ms: now,
            updated_ms: now,
        }
    }
}

/// Where a webhook delivery stands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    /// Gave up after too many attempts; kept for inspection.
    Dead,
}

/// What [`Store::list_conversations`](super::Store::list_conversations) and
/// [`Store::export`](super::Store::export) select.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConversationFilter {
    pub status: Option<ConversationStatus>,
    pub customer_id: Option<String>,
    /// Inclusive lower bound on `updated_ms`. Together with the exclusive
    /// `updated_before_ms` it makes half-open windows that tile without
    /// gaps, and a poller that passes the last `updated_ms` it saw gets
    /// repeats rather than misses.
    pub updated_after_ms: Option<i64>,
    /// Exclusive upper bound on `updated_ms`.
    pub updated_before_ms: Option<i64>,
    /// Page size, 1..=500 (for an export: conversations fetched per query).
    pub limit: u32,
    /// `next_cursor` of the previous page; `None` starts at the newest.
    pub cursor: Option<String>,
}

impl Default for ConversationFilter {
    fn default() -> Self {
        ConversationFilter {
            status: None,
            customer_id: None,
            updated_after_ms: None,
            updated_before_ms: None,
            limit: 50,
            cursor: None,
        }
    }
}

/// One page of conversations, newest-updated first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Page {
    pub items: Vec<Conversation>,
    /// Pass back as `cursor` for the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// One JSON Lines record of an export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportRecord {
    pub conversation: Conversation,
    pub turns: Vec<Turn>,
}

/// What a deletion removed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeReport {
    pub conversations: u64,
    pub turns: u64,
    /// Knowledge-base drafts made from the purged conversations, removed with them (the server
    /// fills this in; the store knows nothing of drafts).
    #[serde(default)]
    pub drafts: u64,
}

/// Totals for monitoring, computed with grouped `COUNT`s.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Counts {
    pub conversations: ConversationCounts,
    /// One entry per (role, state, finish_reason) present in the store.
    pub turns: Vec<TurnCount>,
    /// Feedback given on single answers.
    pub answer_feedback: FeedbackCounts,
    /// Feedback given on whole conversations.
    pub conversation_feedback: FeedbackCounts,
    pub deliveries: DeliveryCounts,
}

impl Counts {
    /// Turns written by `role`, in any state.
    pub fn turns_by_role(&self, role: Role) -> i64 {
        self.turns
            .iter()
            .filter(|t| t.role == role)
            .map(|t| t.count)
            .sum()
    }

    /// Turns of `role` in `state`.
    pub fn turns_in(&self, role: Role, state: TurnState) -> i64 {
        self.turns
            .iter()
            .filter(|t| t.role == role && t.state == state)
            .map(|t| t.count)
            .sum()
    }

    /// Bot answers, in any state.
    pub fn answers(&self) -> i64 {
        self.turns_by_role(Role::Bot)
    }

    /// Bot answers whose `finish_reason` is `reason` (e.g. `refused`).
    pub fn answers_finished_by(&self, reason: &str) -> i64 {
        self.turns
            .iter()
            .filter(|t| t.role == Role::Bot && t.finish_reason.as_deref() == Some(reason))
            .map(|t| t.count)
            .sum()
    }
}

/// Conversations by status.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConversationCounts {
    pub total: i64,
    pub open: i64,
    pub handed_off: i64,
    pub resolved: i64,
}

/// Turns sharing a role, state and finish reason.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TurnCount {
    pub role: Role,
    pub state: TurnState,
    pub finish_reason: Option<String>,
    pub count: i64,
}

/// Feedback tallies; one feedback can count as both helpful and resolved.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FeedbackCounts {
    pub total: i64,
    pub helpful: i64,
    pub not_helpful: i64,
    pub resolved: i64,
    pub unresolved: i64,
}

/// Outbox entries by status.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

/// The text form of the enums as stored in the database: the same strings as
/// their serde form, so the columns read naturally in `psql`/`sqlite3`.
macro_rules! db_text {
    ($ty:ident, $what:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The stored (and serialised) name.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }

            pub(crate) fn from_db(text: &str) -> Result<Self, StoreError> {
                match text {
                    $($text => Ok($ty::$variant),)+
                    other => Err(StoreError::Backend(format!(
                        "unknown {} `{}` in the database; was it written by a newer Helpline?",
                        $what, other
                    ))),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

db_text!(ConversationStatus, "conversation status", {
    Open => "open", HandedOff => "handed_off", Resolved => "resolved",
});
db_text!(Role, "role", { Customer => "customer", Bot => "bot", Agent => "agent" });
db_text!(TurnState, "turn state", {
    Complete => "complete", Pending => "pending", Interrupted => "interrupted",
    Disconnected => "disconnected", Failed => "failed",
});
db_text!(DeliveryStatus, "delivery status", {
    Pending => "pending", Delivered => "delivered", Dead => "dead",
});
