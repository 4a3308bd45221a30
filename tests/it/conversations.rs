//! Conversations on a real socket with the real default model: every chat turn stored (SQLite and
//! PostgreSQL), the agent routes (list, get, export, purge, a customer's deletion), handoff with
//! its schema-valid summary and the signed webhook (delivered, retried, dead-lettered), feedback,
//! the key scopes, audit records and replay identity, and a client that goes away mid-answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpline::config::ServeConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::server_support::{start_server, TestServer, AGENT_KEY};
use crate::support;

fn config() -> ServeConfig {
    // Customers may choose the answer mode here (audit and replay of each mode).
    ServeConfig { default_max_tokens: 48, access: helpline::config::AccessConfig { customer_answer_mode: true, ..Default::default() }, ..Default::default() }
}

fn turn(question: &str, conversation: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 40,
        "helpline": {"conversation_id": conversation, "customer": {"id": "cust-1", "plan": "pro", "locale": "en", "attributes": {"seats": 12}}},
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn ok(resp: &crate::server_support::HttpResponse) -> Value {
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

async fn conversation(server: &TestServer, id: &str) -> Value {
    ok(&server.agent_get(&format!("/v1/conversations/{id}")).await)
}

/// A small checker of the JSON Schema subset the shipped schemas use (type, required, properties,
/// additionalProperties: false, items, enum, minimum, minLength): read from the schema file, so it
/// checks the producer against the published contract, not against itself.
pub fn assert_valid(value: &Value, schema: &Value, at: &str) {
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        });
        assert!(fits, "{at}: {value} is not of type {t}");
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        assert!(e.contains(value), "{at}: {value} is not one of {e:?}");
    }
    if let (Some(min), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), value.as_f64()) {
        assert!(n >= min, "{at}: {n} < {min}");
    }
    if let (Some(min), Some(s)) = (schema.get("minLength").and_then(Value::as_u64), value.as_str()) {
        assert!(s.chars().count() as u64 >= min, "{at}: shorter than {min}");
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            assert!(obj.contains_key(r.as_str().unwrap()), "{at}: missing {r}");
        }
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => assert_valid(v, s, &format!("{at}.{k}")),
                None => assert!(schema.get("additionalProperties") != Some(&Value::Bool(false)), "{at}: unexpected key {k}"),
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            assert_valid(v, items, &format!("{at}[{i}]"));
        }
    }
}

fn handoff_schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(support::root().join("docs/schemas/handoff-summary.schema.json")).unwrap()).unwrap()
}

/// Every chat turn lands in the store before its answer is acknowledged: the customer's message,
/// the answer as the client got it, what the server reported, and the audit record.
async fn chat_turns_are_stored(server: &TestServer) {
    let id = format!("conv-{}", rand::random::<u32>());
    let resp = server.post_json("/v1/chat/completions", &turn("How do I reset my password?", &id, json!({}))).await;
    let body = ok(&resp);
    assert_eq!(resp.header("x-helpline-conversation-id"), Some(id.as_str()));
    let answer_id = body["helpline"]["answer_id"].as_str().unwrap().to_string();
    assert_eq!(resp.header("x-helpline-answer-id"), Some(answer_id.as_str()));
    assert_eq!(body["helpline"]["conversation_id"], id.as_str());
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();

    let c = conversation(server, &id).await;
    assert_eq!(c["conversation"]["customer"]["id"], "cust-1");
    assert_eq!(c["conversation"]["customer"]["attributes"]["seats"], 12);
    let turns = c["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{c}");
    assert_eq!((turns[0]["role"].as_str(), turns[0]["content"].as_str()), (Some("customer"), Some("How do I reset my password?")));
    assert_eq!(turns[1]["role"], "bot");
    assert_eq!(turns[1]["id"], answer_id.as_str());
    assert_eq!(turns[1]["state"], "complete");
    assert_eq!(turns[1]["content"], content, "the stored answer is the one the client got");
    assert_eq!(turns[1]["finish_reason"], body["choices"][0]["finish_reason"]);
    assert_eq!(turns[1]["detail"]["citations"], body["helpline"]["citations"]);
    assert_eq!(turns[1]["detail"]["guard"]["policy_version"], body["helpline"]["guard"]["policy_version"]);
    assert!(turns[1]["audit"]["model"]["sha256"].as_str().is_some_and(|h| h.len() == 64));

    // Streamed into the same conversation: turns 3 and 4, and the stored answer is the streamed text.
    let mut streamed = turn("And how long is the reset link valid?", &id, json!({"stream": true}));
    streamed["messages"] = json!([
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "And how long is the reset link valid?"}
    ]);
    let data = server.stream("/v1/chat/completions", &streamed).await.collect_data().await;
    let mut text = String::new();
    let mut last = Value::Null;
    for d in &data[..data.len() - 1] {
        let chunk: Value = serde_json::from_str(d).unwrap();
        text.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        if !chunk["choices"][0]["finish_reason"].is_null() {
            last = chunk;
        }
    }
    let c = conversation(server, &id).await;
    let turns = c["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 4);
    assert_eq!(turns[3]["seq"], 4);
    assert_eq!(turns[3]["id"], last["helpline"]["answer_id"]);
    assert_eq!(turns[3]["content"].as_str().unwrap(), text);

    // Listed (newest first), exported as JSON Lines.
    let list = ok(&server.agent_get("/v1/conversations?customer_id=cust-1&limit=10").await);
    assert!(list["data"].as_array().unwrap().iter().any(|c| c["id"] == id.as_str()), "{list}");
    let export = server.agent_get("/v1/conversations/export?customer_id=cust-1").await;
    assert_eq!(export.status, 200);
    assert_eq!(export.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = export.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mine = lines.iter().find(|l| l["conversation"]["id"] == id.as_str()).expect("exported");
    assert_eq!(mine["turns"].as_array().unwrap().len(), 4);

    // A customer's deletion leaves nothing of theirs.
    let del = ok(&server.agent_delete("/v1/customers/cust-1").await);
    assert!(del["conversations"].as_i64().unwrap() >= 1, "{del}");
    assert_eq!(server.agent_get(&format!("/v1/conversations/{id}")).await.status, 404);
    let export = server.agent_get("/v1/conversations/export?customer_id=cust-1").await;
    assert!(export.text().trim().is_empty(), "{}", export.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_turns_are_stored_in_sqlite() {
    let server = start_server(config()).await;
    chat_turns_are_stored(&server).await;
    server.shutdown().await;
}

/// A fresh schema in the test PostgreSQL (`HELPLINE_TEST_POSTGRES_URL`, started by the test
/// command); fails under CI when there is none.
async fn postgres_url(test: &str) -> Option<String> {
    use sqlx::Connection;
    let Ok(base) = std::env::var("HELPLINE_TEST_POSTGRES_URL") else {
        assert!(std::env::var_os("CI").is_none(), "HELPLINE_TEST_POSTGRES_URL is not set: run `export HELPLINE_TEST_POSTGRES_URL=$(scripts/postgres.sh | tail -n1)`");
        eprintln!("skipped: set HELPLINE_TEST_POSTGRES_URL to run {test} on PostgreSQL (scripts/postgres.sh starts one)");
        return None;
    };
    let schema = format!("it_{test}_{}", rand::random::<u32>());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_turns_are_stored_in_postgres() {
    let Some(url) = postgres_url("chat_turns").await else { return };
    let mut cfg = config();
    cfg.conversations.database_url = Some(url);
    let server = start_server(cfg).await;
    assert_eq!(server.state.store().unwrap().backend(), "postgres");
    chat_turns_are_stored(&server).await;
    server.shutdown().await;
}

/// A loopback webhook receiver: answers each request with the next status of `script` (the last
/// one repeats) and records what it got.
/// One request the receiver got: its headers (names lower-cased) and body.
type Received = (Vec<(String, String)>, Vec<u8>);

struct Receiver {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receiver(script: Vec<u16>) -> Receiver {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, len) = loop {
                let k = s.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break (None, 0);
                }
                buf.extend_from_slice(&chunk[..k]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                    let len = head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())).unwrap_or(0);
                    break (Some(i + 4), len);
                }
            };
            let Some(start) = head_end else { continue };
            while buf.len() < start + len {
                let k = s.read(&mut chunk).await.unwrap_or(0);
                if k == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..k]);
            }
            let head = String::from_utf8_lossy(&buf[..start]).to_string();
            let headers = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string())))
                .collect();
            seen.lock().unwrap().push((headers, buf[start..start + len].to_vec()));
            let status = script.get(n).or(script.last()).copied().unwrap_or(200);
            n += 1;
            let _ = s.write_all(format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).await;
        }
    });
    Receiver { addr, got }
}

const SECRET: &str = "webhook-secret-for-tests-0123";

fn webhook_config(url: String) -> ServeConfig {
    let mut cfg = config();
    cfg.conversations.webhook_url = Some(url);
    cfg.conversations.webhook_secret = Some(SECRET.into());
    cfg.conversations.webhook_max_attempts = 3;
    cfg.conversations.webhook_initial_backoff = Duration::from_millis(30);
    cfg.conversations.webhook_max_backoff = Duration::from_millis(100);
    cfg.conversations.webhook_timeout = Duration::from_secs(2);
    cfg
}

async fn wait_until<T>(limit: Duration, what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An escalation trigger hands the conversation over: a schema-valid summary in the answer, on the
/// conversation and (signed) at the webhook after a retry; later turns get the handoff text
/// without the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_hands_over_with_a_summary_and_a_signed_webhook() {
    escalation(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_hands_over_with_a_summary_and_a_signed_webhook_on_postgres() {
    let Some(url) = postgres_url("escalation").await else { return };
    escalation(Some(url)).await;
}

async fn escalation(database_url: Option<String>) {
    let rx = receiver(vec![500, 200]).await;
    let mut cfg = webhook_config(format!("http://{}/hooks/helpline", rx.addr));
    cfg.conversations.database_url = database_url;
    let server = start_server(cfg).await;
    let id = "conv-handoff-1";
    ok(&server.post_json("/v1/chat/completions", &turn("How do I reset my password?", id, json!({}))).await);
    let resp = ok(&server
        .post_json("/v1/chat/completions", &turn("This is ridiculous, I want to talk to a human right now.", id, json!({})))
        .await);
    let handoff = &resp["helpline"]["handoff"];
    assert_eq!(handoff["reason"], "human_request", "{resp}");
    let summary = &handoff["summary"];
    assert_valid(summary, &handoff_schema(), "summary");
    assert_eq!(summary["conversation_id"], id);
    assert_eq!(summary["issue"], "How do I reset my password?");
    assert_eq!(summary["sentiment"]["label"], "negative", "{summary}");
    assert_eq!(summary["tried"][0]["outcome"], "answered", "{summary}");

    let c = conversation(&server, id).await;
    assert_eq!(c["conversation"]["status"], "handed_off");
    assert_eq!(c["conversation"]["handoff"]["summary"], *summary);

    // The webhook: first answer 500, then 200; the same delivery id and body both times, signed.
    let got = wait_until(Duration::from_secs(20), "two webhook attempts", async || {
        let g = rx.got.lock().unwrap().clone();
        (g.len() >= 2).then_some(g)
    })
    .await;
    let header = |h: &Vec<(String, String)>, k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(header(&got[0].0, "x-helpline-delivery"), header(&got[1].0, "x-helpline-delivery"));
    assert_eq!(got[0].1, got[1].1);
    let (headers, body) = &got[1];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    helpline::webhook::verify(SECRET.as_bytes(), &header(headers, "x-helpline-timestamp"), &header(headers, "x-helpline-signature"), body, now, Duration::from_secs(300))
        .expect("the signature verifies");
    let payload: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["summary"], *summary);
    assert!(helpline::webhook::verify(b"another-secret-0123456789", &header(headers, "x-helpline-timestamp"), &header(headers, "x-helpline-signature"), body, now, Duration::from_secs(300)).is_err());
    let delivered = wait_until(Duration::from_secs(10), "delivered", async || {
        let d = ok(&server.agent_get("/v1/deliveries?status=delivered").await);
        (!d["data"].as_array().unwrap().is_empty()).then_some(d)
    })
    .await;
    assert_eq!(delivered["data"][0]["attempts"], 2, "{delivered}");

    // Handed off: the bot does not answer any more; the model is not called.
    let before = server.engine().stats().completed_total.load(std::sync::atomic::Ordering::Relaxed);
    let resp = ok(&server.post_json("/v1/chat/completions", &turn("Hello? Anyone there?", id, json!({}))).await);
    assert_eq!(resp["helpline"]["handoff"]["reason"], "handed_off");
    assert_eq!(resp["usage"]["completion_tokens"], 0);
    assert_eq!(server.engine().stats().completed_total.load(std::sync::atomic::Ordering::Relaxed), before);
    assert_eq!(conversation(&server, id).await["turns"].as_array().unwrap().len(), 6, "the customer's message is still stored");
    server.shutdown().await;
}

/// A receiver that is down: retried with backoff, then dead-lettered and listed as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_that_is_down_gets_a_dead_letter() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server = start_server(webhook_config(format!("http://127.0.0.1:{port}/down"))).await;
    let id = "conv-dead-letter";
    ok(&server.post_json("/v1/chat/completions", &turn("How do I export my data?", id, json!({}))).await);
    // The customer asks for a person through the customer-scope route (the chat page's button).
    // Anonymous chat: the customer names the id the conversation was started with.
    let h = ok(&server.post_json(&format!("/v1/conversations/{id}/handoff"), &json!({"customer_id": "cust-1"})).await);
    assert_eq!((h["status"].as_str(), h["handed_off_now"].as_bool()), (Some("handed_off"), Some(true)), "{h}");
    assert!(h.get("summary").is_none() && h.get("conversation").is_none(), "a customer learns only that it happened: {h}");
    let summary = conversation(&server, id).await["conversation"]["handoff"]["summary"].clone();
    assert_eq!(summary["requested_by"], "customer");
    assert_valid(&summary, &handoff_schema(), "summary");
    let dead = wait_until(Duration::from_secs(20), "a dead letter", async || {
        let d = ok(&server.agent_get("/v1/deliveries?status=dead").await);
        (!d["data"].as_array().unwrap().is_empty()).then_some(d)
    })
    .await;
    let d = &dead["data"][0];
    assert_eq!(d["attempts"], 3, "{d}");
    assert!(d["last_error"].as_str().unwrap().contains("3 attempts"), "{d}");
    assert_eq!(d["payload"]["conversation_id"], id);
    let metrics = server.admin_get("/metrics").await.text();
    assert!(metrics.contains("helpline_webhook_deliveries{status=\"dead\"} 1"), "{metrics}");
    server.shutdown().await;
}

/// Agent routes need an agent key; a customer key is refused; with no agent key configured the
/// routes are off. Feedback and rates reach /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_feedback_and_rates() {
    scopes_feedback(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_feedback_and_rates_on_postgres() {
    let Some(url) = postgres_url("feedback").await else { return };
    scopes_feedback(Some(url)).await;
}

async fn scopes_feedback(database_url: Option<String>) {
    let mut cfg = config();
    cfg.conversations.database_url = database_url;
    cfg.api_key_hashes = vec![helpline::server::auth::digest("customer-key-0123456789")];
    let server = start_server(cfg).await;
    let customer = [("authorization", "Bearer customer-key-0123456789"), ("content-type", "application/json")];
    let body = turn("How do I reset my password?", "conv-scope", json!({})).to_string();
    let resp = server.request("POST", "/v1/chat/completions", &customer, body.as_bytes()).await;
    let answer = ok(&resp)["helpline"]["answer_id"].as_str().unwrap().to_string();
    assert_eq!(server.request("GET", "/v1/conversations", &customer, b"").await.status, 401, "a customer key is not an agent key");
    assert_eq!(server.request("GET", "/v1/deliveries", &customer, b"").await.status, 401, "the webhook outbox is agents' too");
    let bad = server.agent_get("/v1/conversations?limit=many").await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json()["error"]["param"], "query");
    assert_eq!(server.get("/v1/conversations").await.status, 401);
    assert_eq!(server.agent_get("/v1/conversations").await.status, 200);
    // The agent key works on customer routes too.
    assert_eq!(server.agent_post_json("/v1/chat/completions", &turn("Hi", "conv-scope-2", json!({"max_tokens": 4}))).await.status, 200);

    // Feedback: on the answer (customer scope) and on the conversation.
    let fb = json!({"helpful": true, "resolved": true, "comment": "clear", "customer_id": "cust-1"}).to_string();
    let r = server.request("POST", &format!("/v1/answers/{answer}/feedback"), &customer, fb.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.request("POST", "/v1/conversations/conv-scope/feedback", &customer, json!({"resolved": true, "customer_id": "cust-1"}).to_string().as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let bad = server.request("POST", &format!("/v1/answers/{answer}/feedback"), &customer, b"{}").await;
    assert_eq!(bad.status, 422);
    let c = conversation(&server, "conv-scope").await;
    assert_eq!(c["turns"][1]["feedback"]["helpful"], true);
    assert_eq!(c["conversation"]["feedback"]["resolved"], true);
    let metrics = server.admin_get("/metrics").await.text();
    for needle in ["helpline_helpful_rate 1", "helpline_feedback_total{kind=\"answer\",value=\"helpful\"} 1", "helpline_conversations{status=\"open\"}", "helpline_store_write_seconds_count"] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }
    server.shutdown().await;

    let mut cfg = config();
    cfg.conversations.agent_key_hashes = vec![];
    let server = crate::server_support::start_server_without_agents(cfg).await;
    let r = server.agent_get("/v1/conversations").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "agent_routes_disabled");
    server.shutdown().await;
}

/// The audit record names the model, tokenizer, template, index, policy, passages and sampling;
/// replay regenerates the answer identically for greedy and for seeded sampling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_and_identical_replay() {
    audit_and_replay(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_and_identical_replay_on_postgres() {
    let Some(url) = postgres_url("audit").await else { return };
    let mut cfg = config();
    cfg.conversations.database_url = Some(url);
    audit_and_replay(cfg).await;
}

async fn audit_and_replay(cfg: ServeConfig) {
    let server = start_server(cfg).await;
    let model_sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(std::fs::read(support::smollm2_path()).unwrap()))
    };
    for (name, extra) in [
        ("assembled", json!({})),
        ("greedy", json!({"generative": true})),
        ("seeded", json!({"temperature": 0.9, "seed": 1234, "top_p": 0.95, "generative": true})),
    ] {
        let id = format!("conv-audit-{name}");
        let mut extra = extra;
        let generative = extra.as_object_mut().unwrap().remove("generative").is_some();
        let mut body = turn("How long do refunds take to arrive?", &id, extra);
        if generative {
            body["helpline"]["answer_mode"] = json!("generative");
        }
        let body = ok(&server.post_json("/v1/chat/completions", &body).await);
        let answer = body["helpline"]["answer_id"].as_str().unwrap();
        let audit = ok(&server.agent_get(&format!("/v1/answers/{answer}/audit")).await);
        assert_eq!(audit["model"]["sha256"], model_sha.as_str(), "{name}");
        for key in ["tokenizer_sha256", "template_sha256", "embedder_sha256", "index_version", "policy_version"] {
            assert!(audit[key].as_str().is_some_and(|v| !v.is_empty()), "{name}: {key} in {audit}");
        }
        assert_eq!(audit["index_version"], body["helpline"]["grounding"]["index_version"]);
        assert!(!audit["grounding"]["passages"].as_array().unwrap().is_empty());
        assert!(!audit["grounding"]["evidence"].as_array().unwrap().is_empty(), "the quoted or given evidence is recorded");
        assert!(audit["grounding"]["gate"]["score"].is_number());
        assert!(audit["grounding"]["passages"][0]["score"].is_number());
        if generative {
            assert!(audit["prompt_sha256"].as_str().is_some_and(|v| v.len() == 64), "{audit}");
            assert!(audit["sampling"]["seed"].is_u64());
        } else {
            // No model ran: nothing was sampled.
            assert_eq!(audit["grounding"]["mode"], "assembled");
            assert!(audit["sampling"].is_null() && audit["prompt_sha256"].is_null(), "{audit}");
        }
        assert_eq!(audit["outcome"]["finish_reason"], body["choices"][0]["finish_reason"]);
        assert_eq!(audit["outcome"]["guard"]["grammar_hash"], body["helpline"]["guard"]["grammar_hash"]);
        let replay = ok(&server.agent_post_json(&format!("/v1/answers/{answer}/replay"), &json!({})).await);
        assert_eq!(replay["identical"], true, "{name}: {replay}");
        assert_eq!(replay["replayed"], body["choices"][0]["message"]["content"]);
        assert_eq!(replay["same_model"], true);
        assert_eq!(replay["same_index"], true);
        assert_eq!(replay["same_policy"], true);
        // Replay does not add turns.
        assert_eq!(conversation(&server, &id).await["turns"].as_array().unwrap().len(), 2, "{name}");
    }
    assert_eq!(server.agent_get("/v1/answers/turn_nope/audit").await.status, 404);
    server.shutdown().await;
}

/// A client that goes away mid-answer: the answer is stored as far as it was sent, `disconnected`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_leaves_a_disconnected_answer() {
    let server = start_server(config()).await;
    let id = "conv-gone";
    let mut body = turn("Tell me everything about invoices and payment methods.", id, json!({"stream": true, "max_tokens": 400, "helpline": {"conversation_id": id, "grounding": false}}));
    body["messages"][0]["content"] = json!("Write a long story about a cat.");
    let mut s = server.agent_stream("/v1/chat/completions", &body).await;
    for _ in 0..4 {
        s.next_data().await.expect("a chunk");
    }
    drop(s);
    let turns = wait_until(Duration::from_secs(30), "the disconnected answer", async || {
        let c = conversation(&server, id).await;
        let t = c["turns"].as_array().unwrap().clone();
        (t.len() == 2 && t[1]["state"] == "disconnected").then_some(t)
    })
    .await;
    assert_eq!(turns[1]["finish_reason"], "client_disconnected");
    assert!(!turns[1]["content"].as_str().unwrap().is_empty(), "what was sent is kept");
    server.shutdown().await;
}

/// Purge by age and request validation of the conversation fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_field_validation() {
    purge_and_fields(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_field_validation_on_postgres() {
    let Some(url) = postgres_url("purge").await else { return };
    let mut cfg = config();
    cfg.conversations.database_url = Some(url);
    purge_and_fields(cfg).await;
}

async fn purge_and_fields(cfg: ServeConfig) {
    let server = start_server(cfg).await;
    ok(&server.post_json("/v1/chat/completions", &turn("Hi", "conv-purge", json!({"max_tokens": 4}))).await);
    let r = ok(&server.agent_post_json("/v1/conversations/purge", &json!({"older_than_days": 1})).await);
    assert_eq!(r["conversations"], 0, "a fresh conversation is kept");
    let r = ok(&server.agent_post_json("/v1/conversations/purge", &json!({"older_than_days": 0})).await);
    assert!(r["conversations"].as_i64().unwrap() >= 1);
    let bad = server.agent_post_json("/v1/conversations/purge", &json!({"older_than_days": -1})).await;
    assert_eq!(bad.status, 422);
    let bad = server.post_json("/v1/chat/completions", &turn("Hi", "has spaces", json!({}))).await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.json()["error"]["param"], "helpline.conversation_id");
    let mut body = turn("Hi", "conv-x", json!({}));
    body["helpline"]["customer"]["attributes"] = json!((0..40).map(|i| (format!("k{i}"), json!(i))).collect::<serde_json::Map<_, _>>());
    let bad = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.json()["error"]["param"], "helpline.customer.attributes");
    // Another customer's conversation id: "not found" (its existence does not leak), and nothing
    // is generated.
    let mut body = turn("Hi", "conv-purge-2", json!({"max_tokens": 4}));
    ok(&server.post_json("/v1/chat/completions", &body).await);
    body["helpline"]["customer"]["id"] = json!("someone-else");
    assert_eq!(server.post_json("/v1/chat/completions", &body).await.status, 404);
    // Query bounds are refused before anything is read or sent, naming the parameter (found by
    // schemathesis: an export with a bad cursor used to be cut off after its 200).
    for path in ["/v1/conversations?cursor=zz", "/v1/conversations/export?cursor=", "/v1/conversations/export?cursor=00"] {
        let bad = server.agent_get(path).await;
        assert_eq!((bad.status, bad.json()["error"]["param"].as_str()), (400, Some("cursor")), "{path}: {}", bad.text());
    }
    let bad = server.agent_get("/v1/deliveries?limit=1000").await;
    assert_eq!((bad.status, bad.json()["error"]["param"].as_str()), (422, Some("limit")), "{}", bad.text());
    assert_eq!(server.agent_get("/v1/deliveries?limit=2147483648").await.status, 422);
    assert_eq!(server.agent_get("/v1/deliveries?limit=500").await.status, 200);
    let _ = AGENT_KEY;
    server.shutdown().await;
}

/// A database of its own in the test PostgreSQL, for a test that takes it away: its URL and the
/// base URL (to run the admin statements from).
async fn postgres_database(test: &str) -> Option<(String, String)> {
    use sqlx::Connection;
    let Ok(base) = std::env::var("HELPLINE_TEST_POSTGRES_URL") else {
        assert!(std::env::var_os("CI").is_none(), "HELPLINE_TEST_POSTGRES_URL is not set");
        eprintln!("skipped: set HELPLINE_TEST_POSTGRES_URL to run {test} on PostgreSQL");
        return None;
    };
    let name = format!("it_{test}_{}", rand::random::<u32>());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let (head, query) = base.split_once('?').map_or((base.as_str(), None), |(h, q)| (h, Some(q)));
    let root = &head[..head.rfind('/').expect("a database URL with a path")];
    let url = match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    };
    Some((url, base))
}

/// The store goes away mid-stream (its database stops taking connections and every session of it
/// is ended): the stream ends with an error event, never `[DONE]`, and what was acknowledged
/// before (an earlier answered turn, and the question of this one) is still there once the
/// database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_fails_mid_stream_ends_it_with_an_error_and_keeps_what_was_acknowledged() {
    use sqlx::Connection;
    let Some((url, base)) = postgres_database("gone").await else { return };
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_string();
    let mut cfg = config();
    cfg.conversations.database_url = Some(url);
    let server = start_server(cfg).await;
    let id = "conv-store-gone";
    let first = server.agent_post_json("/v1/chat/completions", &turn("How do I reset my password?", id, json!({}))).await;
    assert_eq!(first.status, 200, "{}", first.text());

    // A forced long answer (the grammar needs 120 repetitions), so that the store can go away
    // while it streams.
    let mut body = turn("Say ab many times.", id, json!({"stream": true, "max_tokens": 600}));
    body["helpline"]["grounding"] = json!(false);
    body["helpline"]["grammar"] = json!({"regex": "(ab ){120}"});
    let mut s = server.agent_stream("/v1/chat/completions", &body).await;
    s.next_data().await.expect("a first chunk");
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false")).execute(&mut admin).await.unwrap();
    sqlx::query(&format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'")).execute(&mut admin).await.unwrap();
    let mut rest = Vec::new();
    while let Some(d) = s.next_data().await {
        rest.push(d);
    }
    assert!(!rest.contains(&"[DONE]".to_string()), "a stream whose answer was not stored does not end as complete");
    let last: Value = serde_json::from_str(rest.last().expect("events after the failure")).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{last}");

    // While the store is gone, a new turn is refused before anything runs (503, retry later).
    let refused = server.agent_post_json("/v1/chat/completions", &turn("How do I reset my password?", id, json!({}))).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.header("retry-after").is_some());

    sqlx::query(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true")).execute(&mut admin).await.unwrap();
    let c = wait_until(Duration::from_secs(60), "the store back", async || {
        let r = server.agent_get(&format!("/v1/conversations/{id}")).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    let turns = c["turns"].as_array().unwrap();
    assert!(turns.len() >= 3, "{c}");
    assert_eq!(turns[0]["role"], "customer");
    assert_eq!(turns[1]["state"], "complete", "the acknowledged answer is kept: {}", turns[1]);
    assert_eq!(turns[1]["content"].as_str(), first.json()["choices"][0]["message"]["content"].as_str());
    assert_eq!(turns[2]["content"], "Say ab many times.", "the question of the failed turn is kept");
    assert!(turns.get(3).is_none_or(|t| t["state"] != "complete"), "the answer that was not stored is not marked complete");
    admin.close().await.unwrap();
    server.shutdown().await;
}
