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
}

impl ActivePolicy {
    pub fn load(path: &Path) -> Result<ActivePolicy, PolicyError> {
        let pack = PolicyPack::load(path)?;
        let triggers = escalation::Triggers::new(&pack).map_err(|mut e| {
            e.source_name = Some(path.display().to_string());
            e
        })?;
        Ok(ActivePolicy { pack, triggers })
    }
}
