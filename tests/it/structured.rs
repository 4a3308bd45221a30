//! Structured outputs over the API on a real socket with the real default model: `response_format`
//! (`json_object`, `json_schema`) and `helpline.grammar` (regex, Lark) on chat and text
//! completions; the policy pack still enforced inside them; refusals and handoffs of a structured
//! request (`content: null`, text in `refusal`); and every way a constraint is refused (400 naming
//! the field and the bound, 422 for shapes).

use helpline::config::ServeConfig;
use serde_json::{json, Value};

use crate::server_support::{start_server, HttpResponse, TestServer};

fn config(grounding: bool) -> ServeConfig {
    let mut cfg = ServeConfig { default_max_tokens: 96, ..Default::default() };
    cfg.grounding.enabled = grounding;
    cfg
}

fn chat(question: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 120});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn ok(resp: &HttpResponse) -> Value {
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

fn error(resp: &HttpResponse, status: u16, code: &str, param: &str) -> String {
    assert_eq!(resp.status, status, "{}", resp.text());
    let body = resp.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["param"], param, "{body}");
    body["error"]["message"].as_str().unwrap().to_string()
}

/// A schema small enough that the 135M model finishes it within the token budget.
fn ticket_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["billing", "login", "bug", "other"]},
            "summary": {"type": "string", "maxLength": 60},
            "urgent": {"type": "boolean"}
        },
        "required": ["category", "summary", "urgent"],
        "additionalProperties": false
    })
}

/// What an independent validator of [`ticket_schema`] checks.
fn assert_ticket(v: &Value) {
    let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    assert_eq!(obj.len(), 3, "{v}");
    assert!(["billing", "login", "bug", "other"].contains(&obj["category"].as_str().unwrap()), "{v}");
    assert!(obj["summary"].as_str().unwrap().chars().count() <= 60, "{v}");
    assert!(obj["urgent"].is_boolean(), "{v}");
}

fn json_schema(schema: Value) -> Value {
    json!({"response_format": {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema, "strict": true}}})
}

async fn content_of_stream(server: &TestServer, body: &Value) -> (String, Value) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let data = server.agent_stream("/v1/chat/completions", &body).await.collect_data().await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut last = Value::Null;
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if !chunk["choices"][0]["finish_reason"].is_null() {
            last = chunk;
        }
    }
    (text, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_answers_validate_streamed_or_not_and_the_pack_still_applies() {
    let server = start_server(config(false)).await;
    let body = chat("Classify this ticket: I was charged twice for my invoice this month.", json_schema(ticket_schema()));
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &body).await);
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{resp}");
    let content = choice["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?} does not parse: {e}"));
    assert_ticket(&parsed);
    let guard = &resp["helpline"]["guard"];
    assert_eq!(guard["structure"]["kind"], "json_schema", "{resp}");
    assert_eq!(guard["structure"]["hash"].as_str().unwrap().len(), 64);
    let rules: Vec<&str> = guard["constrained_by"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(rules.contains(&"promise-refund") && rules.contains(&"refund-windows") && rules.contains(&"json_schema"), "{rules:?}");

    // Streamed: the same greedy answer, chunk by chunk.
    let (streamed, last) = content_of_stream(&server, &body).await;
    assert_eq!(streamed, content);
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["helpline"]["guard"]["structure"]["kind"], "json_schema");

    // Any JSON object.
    let body = chat("Reply with a JSON object that has a key \"greeting\".", json!({"response_format": {"type": "json_object"}}));
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &body).await);
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    if resp["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
        assert!(v.is_object(), "{v}");
    } else {
        // Out of tokens: still a prefix of an object.
        assert_eq!(resp["choices"][0]["finish_reason"], "length");
        assert!(content.trim_start().starts_with('{'), "{content:?}");
    }

    // A schema whose only value is a forbidden commitment: the pack wins at the token where the
    // phrase would complete; the answer ends with content_filter, the text is never sent whole.
    let forced = json!({"type": "object", "properties": {"reply": {"type": "string", "enum": ["Good news: I will refund you today."]}},
                        "required": ["reply"], "additionalProperties": false});
    let body = chat("Write the reply to the customer.", json_schema(forced));
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &body).await);
    let choice = &resp["choices"][0];
    assert_eq!(choice["finish_reason"], "content_filter", "{resp}");
    assert!(choice["message"]["content"].is_null(), "a broken JSON answer is never returned as content: {resp}");
    let refusal = choice["message"]["refusal"].as_str().unwrap();
    assert!(refusal.contains("can't make promises"), "{refusal}");
    let (streamed, last) = content_of_stream(&server, &body).await;
    assert!(!streamed.to_lowercase().contains("i will refund"), "{streamed:?}");
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_and_lark_grammars_shape_chat_and_text_completions() {
    let server = start_server(config(false)).await;
    let rx = r"(Yes|No), because [a-z ,]{3,60}\.";
    let body = chat("Is the sky blue? Answer yes or no and say why.", json!({"helpline": {"grammar": {"regex": rx}}}));
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &body).await);
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
    assert!(regex::Regex::new(&format!("^(?:{rx})$")).unwrap().is_match(content), "{content:?}");
    assert_eq!(resp["helpline"]["guard"]["structure"]["kind"], "regex");

    let lark = "start: \"Ticket \" NUM \" is \" STATUS \".\"\nNUM: /[0-9]{3}/\nSTATUS: \"open\" | \"closed\" | \"waiting\"\n";
    let body = chat("What is the status of ticket 123?", json!({"helpline": {"grammar": {"lark": lark}}}));
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &body).await);
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(regex::Regex::new(r"^Ticket [0-9]{3} is (open|closed|waiting)\.$").unwrap().is_match(content), "{content:?}");

    // Text completions take both forms too (without the policy pack: they are developer tools).
    let resp = ok(&server
        .admin_post_json("/v1/completions", &json!({"prompt": "The order number is", "temperature": 0, "max_tokens": 12, "helpline": {"grammar": {"regex": " [0-9]{4,6}"}}}))
        .await);
    let text = resp["choices"][0]["text"].as_str().unwrap();
    assert!(regex::Regex::new("^ [0-9]{4,6}$").unwrap().is_match(text), "{text:?}");
    let resp = ok(&server
        .admin_post_json(
            "/v1/completions",
            &json!({"prompt": "Customer record as JSON:", "temperature": 0, "max_tokens": 60,
                    "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99999}}, "required": ["id"], "additionalProperties": false}}}}),
        )
        .await);
    let text = resp["choices"][0]["text"].as_str().unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(v["id"].as_i64().is_some_and(|id| (0..=99999).contains(&id)) && v.as_object().unwrap().len() == 1, "{v}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounded_structured_answers_and_their_refusals_keep_content_parseable() {
    let server = start_server(config(true)).await;
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 200}}, "required": ["answer"], "additionalProperties": false});

    // Grounded: the passages are in the prompt; nothing is appended to the JSON (no " [1]").
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &chat("How do I reset my password?", json_schema(schema.clone()))).await);
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
    assert!(v["answer"].is_string(), "{v}");
    assert_eq!(resp["helpline"]["grounding"]["status"], "grounded", "{resp}");
    for c in resp["helpline"]["citations"].as_array().unwrap() {
        assert_eq!(c["cited_by"], "attribution", "{c}");
    }

    // Nothing relevant: the refusal goes in `refusal`; `content` is null (it could not parse).
    let resp = ok(&server.agent_post_json("/v1/chat/completions", &chat("What is the capital of Mongolia?", json_schema(schema.clone()))).await);
    let msg = &resp["choices"][0]["message"];
    assert!(msg["content"].is_null(), "{resp}");
    assert_eq!(msg["refusal"], ServeConfig::default().grounding.refusal_message.as_str());
    assert_eq!(resp["helpline"]["grounding"]["status"], "no_relevant_docs");

    // An escalation trigger: the handoff text, in `refusal`, with the handoff report.
    let resp = ok(&server
        .agent_post_json("/v1/chat/completions", &chat("I want to talk to a human right now.", json!({"response_format": {"type": "json_object"}})))
        .await);
    let msg = &resp["choices"][0]["message"];
    assert!(msg["content"].is_null(), "{resp}");
    assert!(msg["refusal"].as_str().unwrap().contains("support team"), "{resp}");
    assert_eq!(resp["helpline"]["handoff"]["offered"], true, "{resp}");

    // The same, streamed: a refusal delta and no content delta.
    let mut body = chat("What is the capital of Mongolia?", json!({"response_format": {"type": "json_object"}}));
    body["stream"] = json!(true);
    let data = server.agent_stream("/v1/chat/completions", &body).await.collect_data().await;
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("").is_empty()), "{data:?}");
    assert!(chunks.iter().any(|c| c["choices"][0]["delta"]["refusal"].is_string()), "{data:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_that_cannot_be_enforced_are_refused_before_generation() {
    let mut cfg = config(false);
    cfg.grammar.max_bytes = 4096;
    let server = start_server(cfg).await;
    let post = |body: Value| {
        let server = &server;
        async move { server.agent_post_json("/v1/chat/completions", &body).await }
    };

    let m = error(&post(chat("x", json!({"helpline": {"grammar": {"regex": "(unclosed"}}}))).await, 400, "invalid_grammar", "helpline.grammar.regex");
    assert!(m.contains("regex"), "{m}");
    let m = error(&post(chat("x", json!({"helpline": {"grammar": {"lark": "start: undefined_rule"}}}))).await, 400, "invalid_grammar", "helpline.grammar.lark");
    assert!(m.contains("Lark"), "{m}");
    let bad_schema = json!({"type": "object", "properties": {"a": {"type": "strng"}}});
    error(&post(chat("x", json_schema(bad_schema))).await, 400, "invalid_grammar", "response_format.json_schema.schema");

    // Too deep: 40 nested objects against the default 32.
    let mut deep = json!({"type": "string"});
    for _ in 0..40 {
        deep = json!({"type": "object", "properties": {"a": deep}});
    }
    let m = error(&post(chat("x", json_schema(deep))).await, 400, "grammar_too_deep", "response_format.json_schema.schema");
    assert!(m.contains("at most 32") && m.contains("max_grammar_depth"), "{m}");

    // Too large: over this server's 4096 bytes.
    let big: Vec<String> = (0..600).map(|i| format!("value-{i}")).collect();
    let m = error(&post(chat("x", json_schema(json!({"type": "string", "enum": big})))).await, 400, "grammar_too_large", "response_format.json_schema.schema");
    assert!(m.contains("4096") && m.contains("max_grammar_bytes"), "{m}");

    // Shapes are 422s naming the field.
    let shape = |resp: HttpResponse, param: &str| {
        assert_eq!(resp.status, 422, "{}", resp.text());
        assert_eq!(resp.json()["error"]["param"], param);
    };
    shape(post(chat("x", json!({"response_format": {"type": "xml"}}))).await, "response_format.type");
    shape(post(chat("x", json!({"response_format": {"type": "json_schema"}}))).await, "response_format.json_schema");
    shape(post(chat("x", json!({"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}}))).await, "response_format.json_schema.schema");
    shape(post(chat("x", json!({"helpline": {"grammar": {}}}))).await, "helpline.grammar");
    shape(post(chat("x", json!({"helpline": {"grammar": {"regex": "a", "lark": "start: \"a\""}}}))).await, "helpline.grammar");
    shape(post(chat("x", json!({"response_format": {"type": "json_object"}, "helpline": {"grammar": {"regex": "a"}}}))).await, "helpline.grammar");
    // `text` is the default and constrains nothing.
    assert_eq!(post(chat("Hi", json!({"response_format": {"type": "text"}, "max_tokens": 4}))).await.status, 200);
    server.shutdown().await;

    // Too slow: a budget of 1 ms cannot compile a 3000-word alternation.
    let mut cfg = config(false);
    cfg.grammar.compile_budget = std::time::Duration::from_millis(1);
    let server = start_server(cfg).await;
    let words: Vec<String> = (0..3000).map(|i| format!("word{i}x")).collect();
    let rx = format!("(?:{})( (?:{}))*", words.join("|"), words.join("|"));
    let resp = server.agent_post_json("/v1/chat/completions", &chat("x", json!({"helpline": {"grammar": {"regex": rx}}}))).await;
    let m = error(&resp, 400, "grammar_too_slow", "helpline.grammar.regex");
    assert!(m.contains("1 ms") && m.contains("grammar_compile_ms"), "{m}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quote_mode_and_structured_outputs_do_not_mix() {
    let server = start_server(config(true)).await;
    let resp = server
        .agent_post_json("/v1/chat/completions", &chat("How do I reset my password?", json!({"response_format": {"type": "json_object"}, "helpline": {"quote": true}})))
        .await;
    assert_eq!(resp.status, 422, "{}", resp.text());
    assert_eq!(resp.json()["error"]["param"], "helpline.quote");
    server.shutdown().await;
}
