//! The OpenAI-compatible API on a real socket with the real default model: answers, streaming,
//! limits, every error status the API module produces, back-pressure and cancellation.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use helpline::config::ServeConfig;
use helpline::engine::{collect, Job};
use helpline::sampler::SamplingParams;
use helpline::tokenizer::ChatMessage;
use serde_json::{json, Value};

use crate::server_support::{start_server, start_unloaded_server, HttpResponse, SseItem, TestServer};
use crate::support;

const HI_ANSWER: &str = "Hello! How can I assist you today?";

/// These tests cover the OpenAI dialect itself (shapes, limits, streaming, exact outputs against
/// the engine), so answers are not grounded here; `grounding.rs` covers grounded chat.
fn config() -> ServeConfig {
    let mut cfg = ServeConfig { default_max_tokens: 48, ..Default::default() };
    cfg.grounding.enabled = false;
    cfg
}

/// A one-message chat request with `extra` fields merged in.
fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().expect("extra is an object") {
        body[k] = v.clone();
    }
    body
}

fn hi_prompt() -> Vec<u32> {
    support::smollm2_bundle().chat_prompt(&[ChatMessage::new("user", "Hi!")]).unwrap()
}

/// Runs `job` on the server's engine directly (no HTTP): the reference the API must match.
async fn direct(server: &TestServer, job: Job) -> (String, Vec<u32>) {
    let state = server.state.clone();
    tokio::task::spawn_blocking(move || {
        let rx = state.loaded().unwrap().engine.submit(job).unwrap();
        let (text, ids, _, _) = collect(rx).unwrap();
        (text, ids)
    })
    .await
    .unwrap()
}

fn assert_error(resp: &HttpResponse, status: u16, code: &str, param: Option<&str>) -> Value {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    assert!(resp.header("content-type").is_some_and(|v| v.starts_with("application/json")), "{:?}", resp.headers);
    let body = resp.json();
    let err = &body["error"];
    assert_eq!(err["code"], code, "body: {body}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()), "body: {body}");
    assert!(err["type"].is_string(), "body: {body}");
    match param {
        Some(p) => assert_eq!(err["param"], p, "body: {body}"),
        None => assert!(err["param"].is_null(), "body: {body}"),
    }
    body
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap()
}

/// Parses every event of a finished stream: the JSON chunks, and whether `[DONE]` came last.
fn parse_chunks(data: &[String]) -> Vec<Value> {
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {data:?}");
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad chunk {d:?}: {e}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_greedy_answer_with_usage_and_timings() {
    let server = start_server(config()).await;
    let resp = server.post_json("/v1/chat/completions", &chat("Hi!", json!({"temperature": 0, "max_tokens": 32}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "smollm2-135m-instruct");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert!(body["system_fingerprint"].is_string());
    let choice = &body["choices"][0];
    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], HI_ANSWER);
    assert!(choice["message"]["refusal"].is_null() && choice["message"].get("refusal").is_some());
    assert!(choice["logprobs"].is_null() && choice.get("logprobs").is_some());
    assert_eq!(choice["finish_reason"], "stop");

    let (text, ids) =
        direct(&server, Job { prompt: hi_prompt(), params: SamplingParams::greedy(), max_tokens: 32, stop: vec![], skip_special: true, guard: None })
            .await;
    assert_eq!(text, HI_ANSWER);
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], hi_prompt().len());
    assert_eq!(usage["completion_tokens"], ids.len());
    assert_eq!(usage["total_tokens"], hi_prompt().len() + ids.len());

    let t = &body["helpline"]["timings"];
    for key in ["prompt_tokens_per_second", "generation_tokens_per_second", "prompt_ms", "generation_ms", "time_to_first_token_ms"] {
        assert!(t[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {t}");
    }
    assert_eq!(
        body.as_object()
            .unwrap()
            .keys()
            .filter(|k| !["id", "object", "created", "model", "choices", "usage", "system_fingerprint", "helpline"].contains(&k.as_str()))
            .count(),
        0,
        "{body}"
    );

    // Content as an array of text parts is the same conversation.
    let parts = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}], "temperature": 0, "max_tokens": 2});
    let body = server.post_json("/v1/chat/completions", &parts).await.json();
    assert_eq!(body["usage"]["prompt_tokens"], hi_prompt().len());
    assert!(HI_ANSWER.starts_with(body["choices"][0]["message"]["content"].as_str().unwrap()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_sends_role_then_content_then_finish_usage_and_done() {
    let server = start_server(config()).await;
    let body = chat("Hi!", json!({"temperature": 0, "max_tokens": 32, "stream": true, "stream_options": {"include_usage": true}}));
    let stream = server.stream("/v1/chat/completions", &body).await;
    assert_eq!(stream.status, 200);
    assert!(stream.header("content-type").is_some_and(|v| v.starts_with("text/event-stream")), "{:?}", stream.headers);
    let chunks = parse_chunks(&stream.collect_data().await);
    assert!(chunks.len() >= 4, "{chunks:?}");

    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["created"], chunks[0]["created"]);
        assert_eq!(c["model"], "smollm2-135m-instruct");
    }
    // Opening chunk: the role, empty content.
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert!(chunks[0]["choices"][0]["finish_reason"].is_null());

    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let (finish, content) = rest.split_last().unwrap();
    // The answer is sent a checked sentence at a time (never a sentence before it is checked).
    let streamed_chunks = content.len() - 1;
    assert!(streamed_chunks >= 2, "\"Hello!\" and the next sentence arrive apart: {content:?}");
    let text: String = content[1..]
        .iter()
        .map(|c| {
            let delta = &c["choices"][0]["delta"];
            assert!(delta.get("role").is_none(), "{c}");
            assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
            assert!(c["usage"].is_null() && c.get("usage").is_some(), "usage is null until the end with include_usage: {c}");
            let piece = delta["content"].as_str().unwrap();
            assert!(!piece.is_empty(), "empty content chunks are skipped");
            piece.to_string()
        })
        .collect();
    assert_eq!(text, HI_ANSWER);

    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(finish["helpline"]["timings"]["generation_tokens_per_second"].as_f64().unwrap() > 0.0);

    assert_eq!(usage_chunk["choices"], json!([]));
    let n = hi_prompt().len();
    let generated = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(generated >= streamed_chunks, "{usage_chunk}");
    assert_eq!(usage_chunk["usage"], json!({"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}));

    // Without include_usage: no usage chunk and no `usage` key at all.
    let body = chat("Hi!", json!({"temperature": 0, "max_tokens": 32, "stream": true}));
    let chunks = parse_chunks(&server.stream("/v1/chat/completions", &body).await.collect_data().await);
    assert!(chunks.iter().all(|c| c.get("usage").is_none() && c["choices"].as_array().unwrap().len() == 1), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_ends_with_length_and_stop_strings_cut_the_answer() {
    let server = start_server(config()).await;
    let resp = server.post_json("/v1/chat/completions", &chat("Hi!", json!({"temperature": 0, "max_tokens": 3}))).await;
    let body = resp.json();
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert!(HI_ANSWER.starts_with(body["choices"][0]["message"]["content"].as_str().unwrap()));

    // `max_completion_tokens` wins over `max_tokens`.
    let resp = server
        .post_json("/v1/chat/completions", &chat("Hi!", json!({"temperature": 0, "max_tokens": 30, "max_completion_tokens": 2})))
        .await;
    assert_eq!(resp.json()["usage"]["completion_tokens"], 2);

    let resp = server.post_json("/v1/chat/completions", &chat("Hi!", json!({"temperature": 0, "stop": ["zzz", "assist"]}))).await;
    let body = resp.json();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello! How can I ", "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    // Streamed, a stop string given as a plain string.
    let req = chat("Hi!", json!({"temperature": 0, "stop": " can", "stream": true}));
    let chunks = parse_chunks(&server.stream("/v1/chat/completions", &req).await.collect_data().await);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello! How");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_gives_the_same_answer_over_http() {
    let server = start_server(config()).await;
    let ask = |seed: u64| {
        let body = chat("Tell me about your plans and pricing.", json!({"temperature": 1, "seed": seed, "max_tokens": 10}));
        let server = &server;
        async move {
            server.post_json("/v1/chat/completions", &body).await.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        }
    };
    let a = ask(7).await;
    assert_eq!(a, ask(7).await);
    let others = [ask(8).await, ask(9).await];
    assert!(others.iter().any(|o| *o != a), "other seeds should sample something else: {a:?} {others:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_from_text_and_from_token_ids_agree() {
    let server = start_server(config()).await;
    let prompt = "The capital of France is";
    let resp = server.admin_post_json("/v1/completions", &json!({"prompt": prompt, "temperature": 0, "max_tokens": 6})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "smollm2-135m-instruct");
    let choice = &body["choices"][0];
    assert!(choice["logprobs"].is_null() && choice.get("logprobs").is_some());
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    let text = choice["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert_eq!(body["usage"]["completion_tokens"], 6);

    // The same prompt as ids (BOS as `text_prompt` adds it) gives the same continuation.
    let ids = support::smollm2_bundle().text_prompt(prompt).unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    let resp = server.admin_post_json("/v1/completions", &json!({"prompt": ids, "temperature": 0, "max_tokens": 6})).await;
    assert_eq!(resp.json()["choices"][0]["text"], text.as_str());

    // Streamed: text_completion chunks that add up to the same text, then [DONE].
    let stream = server
        .admin_stream(
            "/v1/completions",
            &json!({"prompt": prompt, "temperature": 0, "max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    let chunks = parse_chunks(&stream.collect_data().await);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"]));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(streamed, text);
    let (usage, rest) = chunks.split_last().unwrap();
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "length");
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert_eq!(usage["choices"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_and_found_by_id_or_file_name() {
    let server = start_server(config()).await;
    let body = server.get("/v1/models").await.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    let card = &body["data"][0];
    assert_eq!(card["id"], "smollm2-135m-instruct");
    assert_eq!(card["object"], "model");
    assert_eq!(card["owned_by"], "helpline");
    assert!(card["created"].as_u64().unwrap() > 0);

    for id in ["smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let resp = server.get(&format!("/v1/models/{id}")).await;
        assert_eq!(resp.status, 200, "{id}");
        assert_eq!(resp.json()["id"], "smollm2-135m-instruct");
    }
    assert_error(&server.get("/v1/models/gpt-4o").await, 404, "model_not_found", None);

    // `model` in a request: the served id and the file name are accepted, anything else is 404.
    let resp =
        server.post_json("/v1/chat/completions", &chat("Hi!", json!({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "max_tokens": 1}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = server.post_json("/v1/chat/completions", &chat("Hi!", json!({"model": "gpt-4o", "max_tokens": 1}))).await;
    let body = assert_error(&resp, 404, "model_not_found", Some("model"));
    assert!(message(&body).contains("gpt-4o") && message(&body).contains("smollm2-135m-instruct"), "{body}");
    let resp = server.admin_post_json("/v1/completions", &json!({"model": "gpt-4o", "prompt": "x"})).await;
    assert_error(&resp, 404, "model_not_found", Some("model"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip() {
    let server = start_server(config()).await;
    let tok = &support::smollm2_bundle().tokenizer;
    let content = "Hello <|im_start|> world";
    let special = tok.token_id("<|im_start|>").unwrap();

    let plain = server.admin_post_json("/tokenize", &json!({"content": content})).await.json()["tokens"].clone();
    let plain: Vec<u32> = serde_json::from_value(plain).unwrap();
    assert_eq!(plain, tok.encode(content, false).unwrap());
    assert!(!plain.contains(&special), "special text is plain text by default");

    let parsed = server.admin_post_json("/tokenize", &json!({"content": content, "parse_special": true})).await.json()["tokens"].clone();
    let parsed: Vec<u32> = serde_json::from_value(parsed).unwrap();
    assert!(parsed.contains(&special));
    assert!(parsed.len() < plain.len());

    // SmolLM2 does not ask for BOS, so add_special changes nothing here.
    assert!(!tok.add_bos());
    let with_special = server.admin_post_json("/tokenize", &json!({"content": content, "add_special": true})).await.json()["tokens"].clone();
    assert_eq!(serde_json::from_value::<Vec<u32>>(with_special).unwrap(), plain);

    for ids in [&plain, &parsed] {
        let resp = server.admin_post_json("/detokenize", &json!({"tokens": ids})).await;
        assert_eq!(resp.json(), json!({"content": content}));
    }

    let vocab = tok.vocab_size();
    let body = assert_error(&server.admin_post_json("/detokenize", &json!({"tokens": [1, vocab]})).await, 422, "invalid_value", Some("tokens"));
    assert!(message(&body).contains(&format!("got {vocab} at index 1")), "{body}");
    assert_error(&server.admin_post_json("/detokenize", &json!({"tokens": [-1]})).await, 422, "invalid_value", Some("tokens"));
    assert_error(&server.admin_post_json("/detokenize", &json!({})).await, 422, "invalid_value", Some("tokens"));
    assert_error(&server.admin_post_json("/tokenize", &json!({"text": "x"})).await, 422, "invalid_value", Some("content"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_the_error_table() {
    let server = start_server(config()).await;
    let path = "/v1/chat/completions";

    let resp = server.request("POST", path, &[("content-type", "application/json")], b"{\"messages\": [").await;
    assert_error(&resp, 400, "malformed_request", None);
    let resp = server.request("POST", path, &[("content-type", "text/plain")], chat("Hi!", json!({})).to_string().as_bytes()).await;
    assert_error(&resp, 415, "unsupported_media_type", None);

    // Out-of-range fields name the field and the bound.
    let cases: &[(Value, &str, &str)] = &[
        (json!({"temperature": 3}), "temperature", "`temperature` must be in [0, 2] (got 3)"),
        (json!({"top_p": 1.5}), "top_p", "`top_p` must be in (0, 1] (got 1.5)"),
        (json!({"top_p": 0}), "top_p", "`top_p` must be in (0, 1] (got 0)"),
        (json!({"presence_penalty": -2.5}), "presence_penalty", "`presence_penalty` must be in [-2, 2] (got -2.5)"),
        (json!({"frequency_penalty": 9}), "frequency_penalty", "`frequency_penalty` must be in [-2, 2] (got 9)"),
        (json!({"max_tokens": 0}), "max_tokens", "`max_tokens` must be in [1, 4096] (got 0)"),
        (json!({"max_completion_tokens": 5000}), "max_completion_tokens", "`max_completion_tokens` must be in [1, 4096] (got 5000)"),
        (json!({"n": 2}), "n", "only `n` = 1 is supported (got 2)"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop", "`stop` must hold at most 4 strings (got 5)"),
        (json!({"stop": ""}), "stop", "`stop` strings must not be empty"),
        (json!({"helpline": {"min_p": 2}}), "helpline.min_p", "`helpline.min_p` must be in [0, 1] (got 2)"),
        (json!({"helpline": {"repeat_penalty": 0}}), "helpline.repeat_penalty", "`helpline.repeat_penalty` must be in (0, 10] (got 0)"),
        (json!({"helpline": {"top_k": -1}}), "helpline.top_k", "`helpline.top_k` must be at least 0 (got -1)"),
    ];
    for (extra, param, msg) in cases {
        let body = assert_error(&server.post_json(path, &chat("Hi!", extra.clone())).await, 422, "invalid_value", Some(param));
        assert_eq!(message(&body), *msg, "for {extra}");
    }
    // A field of the wrong type is a 422 naming it.
    assert_error(&server.post_json(path, &chat("Hi!", json!({"temperature": "hot"}))).await, 422, "invalid_value", Some("temperature"));

    // Messages.
    let body = assert_error(&server.post_json(path, &json!({"messages": []})).await, 422, "invalid_value", Some("messages"));
    assert!(message(&body).contains("at least one message"));
    assert_error(&server.post_json(path, &json!({"model": "x"})).await, 404, "model_not_found", Some("model"));
    assert_error(&server.post_json(path, &json!({})).await, 422, "invalid_value", Some("messages"));
    assert_error(
        &server.post_json(path, &json!({"messages": [{"role": "function", "content": "x"}]})).await,
        422,
        "invalid_value",
        Some("messages[0].role"),
    );
    // A tool's result names the call it answers.
    assert_error(
        &server.post_json(path, &json!({"messages": [{"role": "tool", "content": "x"}]})).await,
        422,
        "invalid_value",
        Some("messages[0].tool_call_id"),
    );
    assert_error(
        &server
            .post_json(path, &json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
            .await,
        422,
        "invalid_value",
        Some("messages[0].content[0].type"),
    );
    assert_error(
        &server.post_json(path, &json!({"messages": [{"role": "user"}]})).await,
        422,
        "invalid_value",
        Some("messages[0].content"),
    );

    // Text completions.
    let c = "/v1/completions";
    assert_error(&server.admin_post_json(c, &json!({"prompt": "x", "echo": true})).await, 422, "invalid_value", Some("echo"));
    assert_error(&server.admin_post_json(c, &json!({"prompt": [1, 99999999]})).await, 422, "invalid_value", Some("prompt"));
    assert_error(&server.admin_post_json(c, &json!({"prompt": []})).await, 422, "invalid_value", Some("prompt"));
    assert_error(&server.admin_post_json(c, &json!({"prompt": "x", "top_p": 2})).await, 422, "invalid_value", Some("top_p"));
    assert_error(&server.admin_post_json(c, &json!({})).await, 422, "invalid_value", Some("prompt"));

    // Unknown fields are ignored; `user` and `n: 1` are accepted.
    let resp =
        server.post_json(path, &chat("Hi!", json!({"max_tokens": 1, "user": "u-1", "n": 1, "logit_bias": {}, "frobnicate": true}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_over_the_context_are_refused_with_both_counts() {
    // A message longer than the context (the per-message bound raised past it).
    let server = start_server(ServeConfig { max_message_chars: 100_000, ..config() }).await;
    let long = "hello ".repeat(9000);
    let tokens = support::smollm2_bundle().chat_prompt(&[ChatMessage::new("user", long.clone())]).unwrap().len();
    let fit = server.engine().max_positions() - 1;
    assert!(tokens > fit);
    let resp = server.post_json("/v1/chat/completions", &chat(&long, json!({"max_tokens": 1}))).await;
    let body = assert_error(&resp, 400, "context_length_exceeded", None);
    assert!(message(&body).contains(&format!("the prompt has {tokens} tokens")), "{body}");
    assert!(message(&body).contains(&format!("at most {fit} fit")), "{body}");
    assert_eq!(server.engine().stats().completed_total.load(Ordering::SeqCst), 0, "nothing reached the engine");

    // The server's own prompt limit.
    let small = start_server(ServeConfig { max_prompt_tokens: 20, ..config() }).await;
    let resp = small.admin_post_json("/v1/completions", &json!({"prompt": "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one"})).await;
    let body = assert_error(&resp, 400, "context_length_exceeded", None);
    assert!(message(&body).contains("at most 20 prompt tokens"), "{body}");

    // Room left in the context clamps `max_tokens` (the answer then ends with "length").
    let cfg = config();
    assert_eq!(helpline::server::validate::fit_context(8000, 500, &cfg, 8192).unwrap(), 192);
    assert_eq!(helpline::server::validate::fit_context(10, 500, &cfg, 8192).unwrap(), 500);
    assert!(helpline::server::validate::fit_context(8192, 1, &cfg, 8192).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_is_503_until_the_model_is_loaded() {
    let server = start_unloaded_server(config()).await;
    let checks = [
        server.post_json("/v1/chat/completions", &chat("Hi!", json!({}))).await,
        server.admin_post_json("/v1/completions", &json!({"prompt": "x"})).await,
        server.get("/v1/models").await,
        server.get("/v1/models/smollm2-135m-instruct").await,
        server.admin_post_json("/tokenize", &json!({"content": "x"})).await,
        server.admin_post_json("/detokenize", &json!({"tokens": [1]})).await,
    ];
    for resp in &checks {
        assert_error(resp, 503, "not_ready", None);
        assert_eq!(resp.header("retry-after"), Some("1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_refused_at_once_with_retry_after() {
    let server = start_server(ServeConfig { queue_capacity: 1, max_concurrent: 1, ..config() }).await;
    let body = chat("Write a long story about a dragon.", json!({"temperature": 0, "max_tokens": 32}));
    let requests = (0..5).map(|_| {
        let (server, body) = (&server, body.clone());
        async move {
            let start = Instant::now();
            let resp = server.post_json("/v1/chat/completions", &body).await;
            (resp, start.elapsed())
        }
    });
    let results = futures_util::future::join_all(requests).await;
    let rejected: Vec<_> = results.iter().filter(|(r, _)| r.status == 429).collect();
    let served: Vec<_> = results.iter().filter(|(r, _)| r.status == 200).collect();
    assert!(!rejected.is_empty(), "statuses: {:?}", results.iter().map(|(r, _)| r.status).collect::<Vec<_>>());
    assert!(!served.is_empty());
    assert_eq!(rejected.len() + served.len(), 5);
    let slowest_served = served.iter().map(|(_, t)| *t).max().unwrap();
    for (resp, took) in &rejected {
        assert_error(resp, 429, "queue_full", None);
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert!(*took < Duration::from_secs(2) && *took < slowest_served, "429 took {took:?} (slowest 200: {slowest_served:?})");
    }
    assert!(server.engine().stats().rejected_total.load(Ordering::SeqCst) as usize >= rejected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_generation() {
    let server = start_server(config()).await;
    let body = chat("Write a very long story about a dragon and a knight.", json!({"temperature": 0, "max_tokens": 400, "stream": true}));
    let mut stream = server.stream("/v1/chat/completions", &body).await;
    assert_eq!(stream.status, 200);
    for _ in 0..3 {
        let data = stream.next_data().await.expect("a chunk");
        assert_ne!(data, "[DONE]");
    }
    let stats = server.engine().stats().clone();
    assert_eq!(stats.active.load(Ordering::SeqCst), 1, "still generating");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.active.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "the engine kept generating after the client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.cancelled_total.load(Ordering::SeqCst), 1);
    assert_eq!(stats.completed_total.load(Ordering::SeqCst), 0);
    assert!(stats.generated_tokens_total.load(Ordering::SeqCst) < 400);

    // A non-streaming request whose client leaves is cancelled too.
    let body = chat("Write a very long story about a dragon and a knight.", json!({"temperature": 0, "max_tokens": 400}));
    let mut conn = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, req.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.active.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.active.load(Ordering::SeqCst) != 0 {
        assert!(Instant::now() < deadline, "the engine kept generating after the non-streaming client left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.cancelled_total.load(Ordering::SeqCst), 2);
    assert_eq!(stats.completed_total.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_comments_flow_while_the_prompt_is_processed() {
    let server = start_server(ServeConfig { keep_alive: Duration::from_millis(5), ..config() }).await;
    let long = "Please read this carefully. ".repeat(40);
    let body = chat(&long, json!({"temperature": 0, "max_tokens": 1, "stream": true}));
    let items = server.stream("/v1/chat/completions", &body).await.collect_items().await;
    let first_data = items.iter().position(|i| matches!(i, SseItem::Data(_))).unwrap();
    let second_data = first_data + 1 + items[first_data + 1..].iter().position(|i| matches!(i, SseItem::Data(_))).unwrap();
    let comments = items[first_data..second_data].iter().filter(|i| matches!(i, SseItem::Comment(_))).count();
    assert!(comments >= 1, "no keep-alive between the opening chunk and the first token: {items:?}");
    assert_eq!(items.last(), Some(&SseItem::Data("[DONE]".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_committed_and_served() {
    let spec = helpline::server::openapi::spec_json();
    let committed = std::fs::read_to_string(support::root().join("docs/openapi.json")).unwrap_or_default();
    assert!(
        spec.trim() == committed.trim(),
        "docs/openapi.json is out of date: run `cargo build --release && target/release/helpline openapi > docs/openapi.json`"
    );
    let doc: Value = serde_json::from_str(&spec).unwrap();
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing from the spec");
    }

    let server = start_unloaded_server(config()).await;
    let resp = server.get("/openapi.json").await;
    assert_eq!(resp.status, 200);
    assert!(resp.header("content-type").is_some_and(|v| v.starts_with("application/json")));
    assert_eq!(resp.json(), doc);
}
