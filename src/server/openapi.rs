//! The OpenAPI document, generated from the handlers and wire types. `helpline openapi` prints it;
//! `docs/openapi.json` is the committed copy (a test keeps the two equal); `GET /openapi.json`
//! serves it.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::actions;
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
Routes are in four scopes, each with its own keys: public (`/health`, `/ready`, this document, the chat page \
and `/kb/*`), customer (chat, models, retrieval, a customer's own handoff and feedback; a customer key \
`--api-key` when one is configured), agent (conversations, customers' data, audit, replay, agent assist and \
knowledge-base drafts; an agent key) and admin (index and policy, metrics, raw completions, tokenize; an admin \
key). Keys are sent as `Authorization: Bearer <key>`; a route whose scope has no key configured answers 403 \
`agent_routes_disabled` / `admin_routes_disabled`. Every route may answer 403 `host_not_allowed` (the `Host` \
header is not an allowed name), 429 or 503 `too_many_connections` (with `Retry-After`); a route with a body may \
answer 403 `csrf_check_failed` (no JSON content type, `Authorization` or `X-Helpline-Request` header), 408 \
`request_timeout`, 413 and 415.",
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
        actions::list,
        actions::taken,
        actions::run,
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
    modifiers(&BearerAuth, &CommonResponses),
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

/// Adds, to every operation, the answers that the layers in front of the handlers can give (see
/// the document's description): the Host check and the connection caps everywhere, the key
/// checks on keyed routes, and the CSRF check, body timeout and size and content type on routes
/// that change state. A status an operation already declares keeps its own description.
struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        const PUBLIC: [&str; 3] = ["/health", "/ready", "/openapi.json"];
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorResponse"))).build())
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let keyed = !PUBLIC.contains(&path.as_str());
            let ops = [
                (&mut item.get, false),
                (&mut item.head, false),
                (&mut item.post, true),
                (&mut item.put, true),
                (&mut item.patch, true),
                (&mut item.delete, true),
            ];
            for (op, changes_state) in ops {
                let Some(op) = op.as_mut() else { continue };
                let mut add = |status: &str, description: &str| {
                    op.responses.responses.entry(status.to_string()).or_insert_with(|| error(description).into());
                };
                if changes_state {
                    add("403", "The `Host` header is not an allowed name (`host_not_allowed`), or the request has no JSON content type, `Authorization` or `X-Helpline-Request` header (`csrf_check_failed`)");
                }
                add("403", "The `Host` header is not an allowed name (`host_not_allowed`)");
                add("429", "Too many connections from this address (`too_many_connections`, with `Retry-After`)");
                add("503", "The server has its limit of open connections (`too_many_connections`, with `Retry-After`)");
                if keyed {
                    add("401", "A key of this route's scope is required (`invalid_api_key`)");
                }
                if changes_state {
                    add("408", "The request body did not arrive in time (`request_timeout`)");
                    add("413", "The request body is over `max_body_bytes` (`payload_too_large`)");
                    add("415", "The body is not `application/json`");
                }
            }
        }
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
