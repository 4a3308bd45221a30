//! OpenAI-compatible routes: chat and text completions (plain or streamed as server-sent events),
//! the model list, and llama.cpp-style `/tokenize` / `/detokenize`.
//!
//! A generation request is validated and tokenized off the async threads, submitted to the engine
//! (a full queue is an immediate 429), then either collected into one JSON answer or streamed.
//! The streamed body owns the engine's event receiver and nothing else holds it: when the client
//! goes away, hyper drops the body, the receiver goes with it, and the engine drops the sequence
//! before its next step.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rand::distributions::Alphanumeric;
use rand::Rng;

use super::dto::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ListObject, ModelCard, ModelList,
    ModelObject, TokenizeRequest, TokenizeResponse,
};
use super::auth::{Caller, Scope};
use super::error::{ApiError, ApiJson};
use super::sse::{self, Flavor, Meta, Tracker};
use super::validate::{self, ValidGeneration};
use super::SharedState;
use crate::engine::{Event, SubmitError};

/// Seconds a client is told to wait after a 429.
pub const QUEUE_FULL_RETRY_AFTER_SECS: u64 = 1;

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        // A wildcard, so ids with a slash (`org/name`) work too.
        .route("/v1/models/{*id}", get(get_model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/answers/{id}/replay", post(replay))
}

/// Replay an answer.
///
/// Regenerates a stored answer from its audit record (the same request, with the seed it was
/// sampled with, through validation, grounding, guard and engine) and says whether the text is
/// identical, and whether the model, index and policy are still the ones it was made with. Nothing
/// is stored. Agent route: needs an agent key.
#[utoipa::path(
    post,
    path = "/v1/answers/{id}/replay",
    tag = "conversations",
    operation_id = "replayAnswer",
    params(("id" = String, Path, description = "The answer id (`helpline.answer_id` of the chat answer)")),
    security(("api_key" = [])),
    responses(
        (status = 200, description = "`{answer_id, identical, original, replayed, same_model, same_index, same_policy}`", body = Object),
        (status = 400, description = "The recorded request no longer fits or compiles (`context_length_exceeded`, `invalid_grammar`, ...)", body = ErrorResponse),
        (status = 401, description = super::conversations::NO_AGENT_KEY, body = ErrorResponse),
        (status = 403, description = super::conversations::AGENT_ROUTES_OFF, body = ErrorResponse),
        (status = 404, description = "No such answer, or it has no audit record (`not_found`); or the recorded `model` is not the one served (`model_not_found`)", body = ErrorResponse),
        (status = 422, description = "The recorded request fails today's validation (`param` names the field)", body = ErrorResponse),
        (status = 429, description = "The queue is full (`queue_full`); retry after `Retry-After` seconds", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Generation failed, the audit record's request does not parse, or the store failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`), no search index is open (`no_index`), no policy pack is loaded (`no_policy`), or the store is down (`store_unavailable`)", body = ErrorResponse),
    )
)]
pub async fn replay(State(state): State<SharedState>, Path(id): Path<String>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    use serde_json::json;
    let turn = state.store()?.get_turn(&id).await.map_err(ApiError::store)?;
    let audit = turn.audit.clone().ok_or_else(|| ApiError::not_found("not_found", format!("answer `{id}` has no audit record to replay")))?;
    // An action turn is never re-run: a write must not happen twice, and a read's answer is the
    // backend's of that moment. The report says what was (or would be) called.
    if let Some(action) = audit.get("action").filter(|a| a.is_object()) {
        return Ok(axum::Json(json!({
            "answer_id": id,
            "identical": null,
            "original": turn.content,
            "replayed": null,
            "action": {
                "name": action["name"],
                "effect": action["effect"],
                "stage": action["stage"],
                "would_call": action["call"]["request"],
                "executed_then": action["call"]["executed"].as_bool().unwrap_or(false),
                "executed_now": false,
            },
            "note": "an action turn is not re-run by replay: nothing was called; `would_call` is the request it made (secrets redacted)",
        })));
    }
    // The customer's message is kept once, as its own turn; the record names it.
    let mut request = audit["request"].clone();
    if let Some(serde_json::Value::Array(messages)) = request.get_mut("messages") {
        for m in messages.iter_mut() {
            if let Some(turn_id) = m.as_object_mut().and_then(|o| o.remove("content_in_turn")) {
                let q = state.store()?.get_turn(turn_id.as_str().unwrap_or_default()).await.map_err(ApiError::store)?;
                m["content"] = json!(q.content);
            }
        }
    }
    let mut req: ChatCompletionRequest = serde_json::from_value(request)
        .map_err(|e| ApiError::internal(format!("the audit record's request does not parse: {e}")))?;
    req.stream = Some(false);
    if let Some(h) = req.helpline.as_mut() {
        h.conversation_id = None;
        h.customer = None;
    }
    let st = state.clone();
    // Replay runs as the operator's system: the recorded request is replayed as it was accepted.
    let mut chat = blocking(move || validate::chat(&req, &st.config, st.loaded()?, &Caller { key: Some(Scope::Agent) })).await?;
    // Nothing is stored: the replayed answer is only compared.
    chat.turn.conversation = None;
    chat.turn.dry_run_actions = true;
    let deps = state.turn_deps()?;
    let replayed = crate::turn::run(&deps, chat.turn).await?.collect().await?.text;
    let index = state.knowledge().ok().map(|k| k.version());
    let policy = state.policy().ok().map(|p| p.pack.version.clone());
    let id_ = &deps.identity;
    Ok(axum::Json(json!({
        "answer_id": id,
        "identical": replayed == turn.content,
        "original": turn.content,
        "replayed": replayed,
        "same_model": audit["model"]["sha256"] == json!(id_.model_sha256)
            && audit["tokenizer_sha256"] == json!(id_.tokenizer_sha256)
            && audit["template_sha256"] == json!(id_.template_sha256),
        "same_index": audit["index_version"].is_null() || audit["index_version"] == json!(index),
        "same_policy": audit["policy_version"] == json!(policy),
    })))
}

/// Create a chat completion.
///
/// Renders the conversation with the model's chat template and generates the assistant's answer.
/// With `stream: true` the answer arrives as `text/event-stream` chunks (`chat.completion.chunk`),
/// ending with `data: [DONE]`; keep-alive comments are sent while the prompt is processed.
/// The prompt is never truncated: one that does not fit is refused with `context_length_exceeded`.
/// When the prompt leaves less room than `max_tokens`, generation stops when the context is full
/// and the answer ends with `finish_reason: "length"`.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    operation_id = "createChatCompletion",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The answer: JSON, or server-sent events of `ChatCompletionChunk` ending with `data: [DONE]` when `stream` is true",
            content(
                (super::dto::ChatCompletion = "application/json"),
                (super::dto::ChatCompletionChunk = "text/event-stream")
            )),
        (status = 400, description = "Malformed JSON; the prompt does not fit (`context_length_exceeded`); or the `response_format` / `helpline.grammar` constraint does not compile or is over a limit (`invalid_grammar`, `grammar_too_large`, `grammar_too_deep`, `grammar_too_slow`, `grammar_conflicts_with_policy`; `param` names the field)", body = ErrorResponse),
        (status = 404, description = "`model` names another model (`model_not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "A field is missing, of the wrong type or out of range (`param` names it)", body = ErrorResponse),
        (status = 429, description = "The queue is full (`queue_full`); retry after `Retry-After` seconds", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn chat_completions(
    State(state): State<SharedState>,
    caller: Option<Extension<Caller>>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    state.loaded()?;
    let st = state.clone();
    let caller = caller.map(|c| c.0).unwrap_or_default();
    // Who the customer is: a verified token, the operator's key, or anonymous (where allowed).
    let identity = super::identity::of_request(&state.config.access, &headers, &caller)?;
    let permit = state.preparing()?;
    let chat = blocking(move || {
        let _permit = permit;
        let mut chat = validate::chat(&req, &st.config, st.loaded()?, &caller)?;
        if let Some(conv) = chat.turn.conversation.as_mut() {
            conv.customer = identity.customer(std::mem::take(&mut conv.customer))?;
            conv.claim = identity.claim();
        }
        // Audit records name the model by its hash: computed once, here on a blocking thread.
        st.fingerprints()?;
        Ok(chat)
    })
    .await?;
    let deps = state.turn_deps()?;
    let answer = crate::turn::run(&deps, chat.turn).await?;
    let meta = Meta {
        id: new_id(Flavor::Chat.id_prefix()),
        created: unix_now(),
        model: state.config.model_id.clone(),
        system_fingerprint: sse::system_fingerprint(),
        flavor: Flavor::Chat,
        prompt_tokens: answer.prompt_tokens,
        include_usage: chat.include_usage,
    };
    let ids = (answer.conversation_id.clone(), answer.answer_id.clone());
    let mut resp = if chat.stream {
        let mut r = sse::chat_stream(answer, meta, state.config.keep_alive);
        // Ask reverse proxies not to buffer the stream.
        r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    } else {
        let finished = answer.collect().await?;
        let mut r = meta.chat_whole(finished);
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    };
    with_ids(&mut resp, &ids);
    Ok(resp)
}

fn with_ids(resp: &mut Response, (conversation, answer): &(Option<String>, Option<String>)) {
    if let Some(v) = conversation.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
        resp.headers_mut().insert("x-helpline-conversation-id", v);
    }
    if let Some(v) = answer.as_deref().and_then(|a| HeaderValue::from_str(a).ok()) {
        resp.headers_mut().insert("x-helpline-answer-id", v);
    }
}

/// Create a text completion.
///
/// Continues `prompt` (text, or token ids used as given) without a chat template. Same sampling
/// fields, limits and streaming as chat completions; streamed events are `text_completion` objects.
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    operation_id = "createCompletion",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion: JSON, or server-sent events of `TextCompletion` ending with `data: [DONE]` when `stream` is true",
            content(
                (super::dto::TextCompletion = "application/json"),
                (super::dto::TextCompletion = "text/event-stream")
            )),
        (status = 400, description = "Malformed JSON; the prompt does not fit (`context_length_exceeded`); or the `response_format` / `helpline.grammar` constraint does not compile or is over a limit (`invalid_grammar`, `grammar_too_large`, `grammar_too_deep`, `grammar_too_slow`, `grammar_conflicts_with_policy`; `param` names the field)", body = ErrorResponse),
        (status = 404, description = "`model` names another model (`model_not_found`)", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "A field is missing, of the wrong type or out of range (`param` names it)", body = ErrorResponse),
        (status = 429, description = "The queue is full (`queue_full`); retry after `Retry-After` seconds", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "Generation failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
pub async fn completions(State(state): State<SharedState>, ApiJson(req): ApiJson<CompletionRequest>) -> Result<Response, ApiError> {
    state.loaded()?;
    let st = state.clone();
    let permit = state.preparing()?;
    let valid = blocking(move || {
        let _permit = permit;
        validate::completion(&req, &st.config, st.loaded()?)
    })
    .await?;
    generate_text(state, valid).await
}

/// List models: the one model this server serves.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    operation_id = "listModels",
    responses(
        (status = 200, description = "The served model", body = ModelList),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse),
    )
)]
pub async fn list_models(State(state): State<SharedState>) -> Result<Json<ModelList>, ApiError> {
    let card = model_card(&state)?;
    Ok(Json(ModelList { object: ListObject::List, data: vec![card] }))
}

/// Retrieve a model by its id (or its file name).
#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "openai",
    operation_id = "retrieveModel",
    params(("id" = String, Path, description = "The model id")),
    responses(
        (status = 200, description = "The model", body = ModelCard),
        (status = 404, description = "No such model (`model_not_found`)", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse),
    )
)]
pub async fn get_model(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    let loaded = state.loaded()?;
    if !validate::model_matches(&id, &state.config, &loaded.bundle) {
        // The id is in the path, not a body field.
        return Err(ApiError { param: None, ..validate::model_not_found(&id, &state.config) });
    }
    Ok(Json(model_card(&state)?))
}

/// Tokenize text with the model's tokenizer.
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "helpline",
    operation_id = "tokenize",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Token ids", body = TokenizeResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`content` is missing or not a string", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse),
    )
)]
pub async fn tokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.loaded()?;
    let Some(content) = req.content else {
        return Err(ApiError::invalid_field("content", "`content` is required"));
    };
    let st = state.clone();
    let tokens = blocking(move || {
        let tok = &st.loaded()?.bundle.tokenizer;
        let mut ids: Vec<u32> = Vec::new();
        if req.add_special.unwrap_or(false) && tok.add_bos() {
            ids.extend(tok.bos_id());
        }
        ids.extend(tok.encode(&content, req.parse_special.unwrap_or(false)).map_err(ApiError::internal)?);
        Ok(ids)
    })
    .await?;
    Ok(Json(TokenizeResponse { tokens }))
}

/// Turn token ids back into text (special tokens rendered as their text).
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "helpline",
    operation_id = "detokenize",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "Malformed JSON", body = ErrorResponse),
        (status = 415, description = "The body is not `application/json`", body = ErrorResponse),
        (status = 422, description = "`tokens` is missing or holds an id outside the vocabulary", body = ErrorResponse),
        (status = 503, description = "The model is still loading (`not_ready`)", body = ErrorResponse),
    )
)]
pub async fn detokenize(
    State(state): State<SharedState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let tok = &state.loaded()?.bundle.tokenizer;
    let Some(raw) = req.tokens else {
        return Err(ApiError::invalid_field("tokens", "`tokens` is required"));
    };
    let ids = validate::token_ids("tokens", &raw, tok.vocab_size())?;
    Ok(Json(DetokenizeResponse { content: tok.decode(&ids, false) }))
}

fn model_card(state: &SharedState) -> Result<ModelCard, ApiError> {
    let loaded = state.loaded()?;
    let created = std::fs::metadata(&loaded.bundle.path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or_else(|| unix_now().saturating_sub(state.started.elapsed().as_secs()));
    Ok(ModelCard { id: state.config.model_id.clone(), object: ModelObject::Model, created, owned_by: "helpline".into() })
}

/// Runs CPU-bound request work (template rendering, tokenizing long prompts) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let suffix: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
    format!("{prefix}{suffix}")
}

/// Runs a text completion: streamed, or collected into one JSON answer.
async fn generate_text(state: SharedState, valid: ValidGeneration) -> Result<Response, ApiError> {
    let loaded = state.loaded()?;
    let meta = Meta {
        id: new_id(Flavor::Text.id_prefix()),
        created: unix_now(),
        model: state.config.model_id.clone(),
        system_fingerprint: sse::system_fingerprint(),
        flavor: Flavor::Text,
        prompt_tokens: valid.job.prompt.len(),
        include_usage: valid.include_usage,
    };
    let submitted = Instant::now();
    let mut rx = loaded.engine.submit(valid.job).map_err(|e| submit_error(&state, e))?;
    state.metrics.add_prompt_tokens(meta.prompt_tokens as u64);
    let mut tracker = Tracker::new(state.clone(), submitted);
    if valid.stream {
        let mut resp = sse::text_stream(rx, meta, tracker, state.config.keep_alive);
        resp.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
        return Ok(resp);
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Token { text: t, .. }) => {
                tracker.on_token();
                text.push_str(&t);
            }
            Some(Event::Done { reason, text: t, timings }) => {
                text.push_str(&t);
                let mut resp = meta.text_whole(text, reason.into(), tracker.tokens(), &timings);
                resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return Ok(resp);
            }
            Some(Event::Error(e)) => return Err(ApiError::internal(format!("generation failed: {e}"))),
            None => return Err(ApiError::internal("the engine dropped the request before it finished")),
        }
    }
}

fn submit_error(state: &SharedState, e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { capacity } => {
            state.metrics.rejection("queue_full");
            ApiError::too_many_requests(
                QUEUE_FULL_RETRY_AFTER_SECS,
                format!("the server is busy: {capacity} requests are already waiting; retry later"),
            )
        }
        // Validation already checked these; kept exact in case the limits ever diverge.
        SubmitError::PromptTooLong { prompt_tokens, max } => ApiError::bad_request(
            "context_length_exceeded",
            format!("the prompt has {prompt_tokens} tokens, but the model's context holds {max} and one must remain for the answer"),
        ),
        SubmitError::EmptyPrompt => ApiError::invalid_field("prompt", "the prompt is empty"),
        SubmitError::BadParams(p) => ApiError::invalid_field(p.field, p.to_string()),
        SubmitError::Stopped => ApiError::not_ready("the server is shutting down"),
    }
}
