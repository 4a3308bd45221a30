//! The policy pack over HTTP: `GET /v1/policy` (the pack in force) and `POST /v1/policy/reload`
//! (read the pack file again; an invalid pack is refused with the rule named, and the pack in force
//! stays as it was).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::dto::ErrorResponse;
use super::error::ApiError;
use super::SharedState;
use crate::guard::ActivePolicy;

pub fn routes() -> Router<SharedState> {
    Router::new().route("/v1/policy", get(policy_status)).route("/v1/policy/reload", post(reload))
}

/// The policy pack in force.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyStatus {
    pub version: String,
    pub name: String,
    pub file: String,
    /// Rule ids by kind.
    pub forbidden: Vec<String>,
    pub bounds: Vec<String>,
    pub out_of_scope: Vec<String>,
    pub escalation: Vec<String>,
    /// Refusals or complaints in a row that hand the conversation over (absent: never).
    pub repeated_failure_after: Option<u32>,
}

fn status_of(p: &ActivePolicy, state: &SharedState) -> PolicyStatus {
    let ids = |v: Vec<&str>| v.into_iter().map(str::to_string).collect();
    let pack = &p.pack;
    PolicyStatus {
        version: pack.version.clone(),
        name: pack.name.clone(),
        file: state.config.grounding.policy_file.display().to_string(),
        forbidden: ids(pack.forbidden.iter().map(|r| r.id.as_str()).collect()),
        bounds: ids(pack.bounds.iter().map(|r| r.id.as_str()).collect()),
        out_of_scope: ids(pack.out_of_scope.iter().map(|r| r.id.as_str()).collect()),
        escalation: ids(pack.escalation.iter().map(|r| r.id.as_str()).collect()),
        repeated_failure_after: pack.repeated_failure.as_ref().map(|f| f.after),
    }
}

/// Describe the policy pack in force.
#[utoipa::path(
    get,
    path = "/v1/policy",
    tag = "helpline",
    operation_id = "policyStatus",
    responses(
        (status = 200, description = "The pack in force", body = PolicyStatus),
        (status = 503, description = "No pack is loaded (`no_policy`)", body = ErrorResponse),
    )
)]
pub async fn policy_status(State(state): State<SharedState>) -> Result<Json<PolicyStatus>, ApiError> {
    let p = state.policy()?;
    Ok(Json(status_of(&p, &state)))
}

/// Reload the policy pack from its file.
///
/// The whole pack is validated first; an invalid one is refused (400 `invalid_policy`, the message
/// names the rule and what to change) and the pack in force stays. A valid one replaces it whole:
/// turns already being answered finish under the pack they started with.
#[utoipa::path(
    post,
    path = "/v1/policy/reload",
    tag = "helpline",
    operation_id = "reloadPolicy",
    responses(
        (status = 200, description = "The new pack is in force", body = PolicyStatus),
        (status = 400, description = "The pack is invalid (`invalid_policy`) or the actions file is (`invalid_actions`, naming the action and field); the previous ones stay", body = ErrorResponse),
    )
)]
pub async fn reload(State(state): State<SharedState>) -> Result<Json<PolicyStatus>, ApiError> {
    // One at a time: each reload compiles the pack's grammars (CPU for seconds).
    let Ok(_one) = state.reloading_policy.try_lock() else {
        return Err(ApiError::conflict("reload_in_progress", "a policy reload is already running; retry when it has finished"));
    };
    let st = state.clone();
    let loaded = tokio::task::spawn_blocking(move || -> Result<(Option<ActivePolicy>, Option<crate::turn::act::Runtime>), (&'static str, String)> {
        // The actions file is read with the pack: an invalid one is refused, naming the action and field.
        let actions = st.load_actions().map_err(|e| ("invalid_actions", e))?;
        let p = ActivePolicy::load(&st.config.grounding.policy_file).map_err(|e| ("invalid_policy", e.to_string()))?;
        // The same pack as in force: nothing to compile, and the warm grammar caches stay.
        if st.policy().is_ok_and(|cur| cur.pack == p.pack) {
            return Ok((None, actions));
        }
        // Every article a decision rule quotes is in the index.
        crate::turn::check_decision_articles(&p, st.knowledge().ok().as_ref()).map_err(|e| ("invalid_policy", e))?;
        // The new pack's grammars compile before it is put in force (never a half-working pack).
        if let Ok(l) = st.loaded() {
            p.precompile(&l.guard, st.config.grounding.passages).map_err(|e| ("invalid_policy", format!("the pack's grammar does not compile: {e}")))?;
        }
        Ok((Some(p), actions))
    })
    .await
    .map_err(ApiError::internal)?;
    match loaded {
        Ok((None, actions)) => {
            state.set_actions(actions);
            state.metrics.policy_reload("unchanged");
            let cur = state.policy()?;
            Ok(Json(status_of(&cur, &state)))
        }
        Ok((Some(p), actions)) => {
            state.set_actions(actions);
            state.metrics.policy_reload("ok");
            let status = status_of(&p, &state);
            state.set_policy(p);
            Ok(Json(status))
        }
        Err((code, e)) => {
            state.metrics.policy_reload("failed");
            Err(ApiError::bad_request(code, e))
        }
    }
}
