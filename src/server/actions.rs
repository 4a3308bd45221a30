//! Declared actions for agents: what the bot may do (`GET /v1/actions`), what it did in a
//! conversation (`GET /v1/conversations/{id}/actions`), and running one for the conversation's
//! verified customer (`POST /v1/conversations/{id}/actions/{name}`). The identity arguments come
//! from the customer the conversation was verified as, never from the agent's request; a write
//! runs only with `confirm: true` (the agent is the person confirming it). Each run is stored as
//! an agent turn with the action's report, so the conversation and its audit show it.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::conversations::{AGENT_ROUTES_OFF, NO_AGENT_KEY, STORE_DOWN, STORE_FAILED};
use super::dto::ErrorResponse;
use super::error::{ApiError, ApiJson};
use super::SharedState;
use crate::actions::Effect;
use crate::store::{Role, TurnState};

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/actions", get(list))
        .route("/v1/conversations/{id}/actions", get(taken))
        .route("/v1/conversations/{id}/actions/{name}", post(run))
}

fn runtime(state: &SharedState) -> Result<std::sync::Arc<crate::turn::act::Runtime>, ApiError> {
    state.actions().ok_or_else(|| ApiError::not_found("no_actions", "no actions are declared on this server (`actions_file`)"))
}

/// The declared actions.
#[utoipa::path(
    get,
    path = "/v1/actions",
    tag = "conversations",
    operation_id = "listActions",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{source, actions: [{name, description, effect, public, arguments}]}`: `arguments` are those an agent gives (the identity ones come from the customer's token); none declared: `{source: null, actions: []}`", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
    )
)]
pub async fn list(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let Some(rt) = state.actions() else {
        return Ok(Json(json!({"source": null, "actions": []})));
    };
    let actions: Vec<Value> = rt
        .actions
        .actions
        .iter()
        .map(|a| {
            let args: Map<String, Value> = a.filled_arguments().map(|x| (x.name.clone(), x.schema.clone())).collect();
            json!({
                "name": a.name, "description": a.description,
                "effect": if a.effect == Effect::Write { "write" } else { "read" },
                "public": a.public, "arguments": args,
            })
        })
        .collect();
    Ok(Json(json!({"source": rt.source, "actions": actions})))
}

/// The actions taken in a conversation, in order.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}/actions",
    tag = "conversations",
    operation_id = "conversationActions",
    params(("id" = String, Path, description = "The conversation id")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{conversation_id, actions: [{turn_id, seq, by, at_ms, action}]}`: every turn that asked about, confirmed, ran or refused an action, `by` the bot or an agent; `action` is its report (arguments, stage, the call minus secrets)", body = Object),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation (`not_found`)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = STORE_DOWN, body = ErrorResponse),
    )
)]
pub async fn taken(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let (_, turns) = state.store()?.get_conversation(&id).await.map_err(ApiError::store)?;
    let actions: Vec<Value> = turns
        .iter()
        .filter_map(|t| {
            let a = t.detail.as_ref()?.get("action")?.clone();
            let by = if t.role == Role::Agent { "agent" } else { "bot" };
            Some(json!({"turn_id": t.id, "seq": t.seq, "by": by, "at_ms": t.created_ms, "action": a}))
        })
        .collect();
    Ok(Json(json!({"conversation_id": id, "actions": actions})))
}

/// Body of a run: the arguments an agent gives, and the confirmation of a write.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunIn {
    /// The action's arguments other than identity (those come from the customer's token).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub arguments: Map<String, Value>,
    /// Must be `true` to run a write.
    #[serde(default)]
    pub confirm: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunOut {
    /// The result as the operator's template shows it (also stored as the agent turn's text).
    pub text: String,
    #[schema(value_type = Object)]
    pub action: crate::turn::report::ActionInfo,
    pub turn_id: String,
}

/// Run an action for the conversation's customer.
///
/// The customer must have been verified when the conversation started; the identity arguments
/// come from that customer. The result is stored as an agent turn and counted in the metrics.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/actions/{name}",
    tag = "conversations",
    operation_id = "runAction",
    params(("id" = String, Path, description = "The conversation id"), ("name" = String, Path, description = "The action's name")),
    request_body = RunIn,
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Ran: `{text, action, turn_id}`; a backend failure is reported in `action` (stage `failed`, `reason`), not as an error", body = RunOut),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 401, description = NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such conversation or action, or none are declared (`not_found`, `no_actions`)", body = ErrorResponse),
        (status = 409, description = "The conversation's customer is not verified (`customer_not_verified`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "An argument is unknown, an identity argument, missing or does not fit its schema, or a write lacks `confirm: true` (`param` names it)", body = ErrorResponse),
        (status = 500, description = STORE_FAILED, body = ErrorResponse),
        (status = 503, description = "The store is down (`store_unavailable`) or no policy pack is loaded (`no_policy`)", body = ErrorResponse),
    )
)]
pub async fn run(State(state): State<SharedState>, Path((id, name)): Path<(String, String)>, ApiJson(body): ApiJson<RunIn>) -> Result<Json<RunOut>, ApiError> {
    let rt = runtime(&state)?;
    let store = state.store()?;
    let index = rt.actions.actions.iter().position(|a| a.name == name).ok_or_else(|| ApiError::not_found("not_found", format!("no action `{name}` is declared")))?;
    let a = &rt.actions.actions[index];
    let conv = store.conversation_head(&id).await.map_err(ApiError::store)?;
    if a.needs_verified_customer() && !conv.customer.verified {
        return Err(ApiError::conflict("customer_not_verified", format!("conversation `{id}`'s customer was not verified by a token; `{name}` acts only for a verified customer")));
    }
    let mut args = Map::new();
    for (k, v) in &body.arguments {
        match a.arguments.iter().find(|x| &x.name == k) {
            None => return Err(ApiError::invalid_field(&format!("arguments.{k}"), format!("`{k}` is not an argument of `{name}`"))),
            Some(x) if x.from_customer.is_some() => {
                return Err(ApiError::invalid_field(&format!("arguments.{k}"), format!("`{k}` comes from the customer's token, not from the request")))
            }
            Some(_) => {
                args.insert(k.clone(), v.clone());
            }
        }
    }
    let identity = crate::turn::act::identity_arguments(a, &conv.customer).map_err(|m| ApiError::conflict("customer_not_verified", m))?;
    args.extend(identity);
    let missing = a.check_arguments(&args).map_err(|m| ApiError::invalid_field("arguments", m))?;
    if let Some(m) = missing.first() {
        return Err(ApiError::invalid_field(&format!("arguments.{m}"), format!("`{m}` is required by `{name}`")));
    }
    if a.effect == Effect::Write && !body.confirm {
        return Err(ApiError::invalid_field("confirm", format!("`{name}` is a write: send `confirm: true` to run it")));
    }
    let info = crate::turn::act::report_for(a, "called", "agent", &args);
    let customer = conv.customer.id.clone().unwrap_or_default();
    let policy = state.policy()?;
    let (text, info, _) = crate::turn::act::run(state.metrics.as_ref(), &policy, &rt, &customer, false, index, args, info).await?;
    // Stored as the agent's turn: the conversation shows what was done for the customer.
    let turn = store.append_turn(&id, Role::Agent, "", TurnState::Pending).await.map_err(ApiError::store)?;
    let detail = json!({"action": info});
    store.complete_turn(&turn.id, &text, TurnState::Complete, Some("action"), Some(detail.clone()), Some(detail)).await.map_err(ApiError::store)?;
    Ok(Json(RunOut { text, action: info, turn_id: turn.id }))
}
