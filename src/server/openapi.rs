//! The OpenAPI document, generated from the handlers and wire types. `helpline openapi` prints it;
//! `docs/openapi.json` is the committed copy (a test keeps the two equal); `GET /openapi.json`
//! serves it.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::assist;
use super::conversations;
use super::dto;
use super::knowledge;
use super::policy;
use super::openai;
use super::SharedState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Helpline",
        description = "Self-hosted support assistant: an OpenAI-compatible API over a local GGUF model. \
Errors are always `{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`. Helpline's additions to OpenAI's \
shapes live under a `helpline` key. Chat answers are grounded in the approved documentation by default: \
`helpline.grounding` reports the passages given to the model and `helpline.citations` the ones the answer cites. \
When the server has API keys configured, every route but `GET /health` and the customer chat page (`/`, \
`/assets/*`, `/kb/*`) needs `Authorization: Bearer <key>`. Agent routes (conversations, customers' data, audit, \
replay, agent assist and knowledge-base drafts) need an agent key (`--agent-api-key`, `agent_api_keys_file`), sent the \
same way: a customer API key is refused there, and without a configured agent key they answer 403 \
`agent_routes_disabled`. An agent key also works on every other route.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        openai::chat_completions,
        openai::completions,
        openai::list_models,
        openai::get_model,
        openai::tokenize,
        openai::detokenize,
        knowledge::retrieve,
        knowledge::index_status,
        knowledge::reload,
        policy::policy_status,
        policy::reload,
        conversations::list,
        conversations::export,
        conversations::purge,
        conversations::one,
        conversations::customer_handoff,
        conversations::takeover,
        conversations::agent_message,
        conversations::resolve,
        conversations::conversation_feedback,
        conversations::answer_feedback,
        conversations::delete_customer,
        conversations::deliveries,
        conversations::audit,
        openai::replay,
        assist::draft,
        assist::summarize,
        assist::kb_draft,
        assist::list_drafts,
        assist::approve,
        health,
        ready,
        metrics,
        openapi_json,
    ),
    components(schemas(
        dto::ChatCompletion,
        dto::ChatCompletionChunk,
        dto::TextCompletion,
        dto::ErrorResponse,
        assist::CaseSummary,
    )),
    modifiers(&BearerAuth),
    security((), ("api_key" = [])),
    tags(
        (name = "openai", description = "OpenAI-compatible API"),
        (name = "helpline", description = "Helpline extensions"),
        (name = "conversations", description = "Stored conversations: listing, export, retention, handoff, agent replies, feedback, audit and replay"),
        (name = "assist", description = "Agent assist: reply drafts, case summaries and knowledge-base drafts (agent key)"),
        (name = "ops", description = "Operations: liveness, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "One of the server's API keys (only when keys are configured), or an agent key; agent routes need an agent key",
                    ))
                    .build(),
            ),
        );
    }
}

/// Liveness: the process is up and serving HTTP (the model may still be loading).
#[utoipa::path(get, path = "/health", tag = "ops", operation_id = "health", responses((status = 200, description = "The server is alive")))]
#[allow(dead_code)]
fn health() {}

/// Readiness: the model is loaded and requests can be served.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    operation_id = "ready",
    responses(
        (status = 200, description = "The model is loaded"),
        (status = 503, description = "The model is still loading", body = dto::ErrorResponse),
    )
)]
#[allow(dead_code)]
fn ready() {}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    operation_id = "metrics",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain; version=0.0.4"))
)]
#[allow(dead_code)]
fn metrics() {}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    let mut resp = spec_json().into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub fn routes() -> Router<SharedState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// The OpenAPI document object.
pub fn spec() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty-printed JSON (no trailing newline).
pub fn spec_json() -> String {
    spec().to_pretty_json().expect("the OpenAPI document serializes")
}
