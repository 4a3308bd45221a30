//! Grounded chat on a real socket with the real default model and the real index of
//! `docs-corpus/`: retrieval, the budgeted prompt, citations, the refusal that never calls the
//! model, follow-ups, `/v1/retrieve`, and re-indexing a running server.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use helpline::config::ServeConfig;
use serde_json::{json, Value};

use crate::server_support::{start_grounded_server, start_server, start_unloaded_server, HttpResponse};
use crate::support;

const NOT_APPROVED: &[&str] =
    &["refund-policy-2024", "uptime-sla-draft-100", "api-rate-limits-v1", "support-fee-waivers-draft", "cancellation-data-deletion-2023", "sso-all-plans-draft"];

fn config() -> ServeConfig {
    // Customers may choose the answer mode here (the tests compare the modes).
    ServeConfig { default_max_tokens: 96, access: helpline::config::AccessConfig { customer_answer_mode: true, ..Default::default() }, ..Default::default() }
}

fn ask(question: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": question}], "temperature": 0});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn error_of(resp: &HttpResponse, status: u16, param: Option<&str>) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    let body = resp.json();
    if let Some(p) = param {
        assert_eq!(body["error"]["param"], p, "{body}");
    }
    body
}

/// Every `[n]` / `[n, m]` marker in `text`.
fn markers(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find('[') {
        rest = &rest[i + 1..];
        if let Some(end) = rest.find(']') {
            let inner = &rest[..end];
            if !inner.is_empty() && inner.split(',').all(|p| p.trim().chars().all(|c| c.is_ascii_digit()) && !p.trim().is_empty()) {
                out.extend(inner.split(',').map(|p| p.trim().parse::<usize>().unwrap()));
            }
        }
    }
    out
}

/// Checks the grounding report of a grounded answer and returns the doc ids given to the model.
fn check_grounded(helpline: &Value, content: &str) -> Vec<String> {
    let g = &helpline["grounding"];
    assert_eq!(g["status"], "grounded", "{helpline}");
    let passages = g["passages"].as_array().unwrap();
    assert!(!passages.is_empty());
    for (i, p) in passages.iter().enumerate() {
        assert_eq!(p["index"], i + 1, "{p}");
        let doc = p["doc_id"].as_str().unwrap();
        assert!(!NOT_APPROVED.contains(&doc), "{doc} is not approved");
        assert!(p["url"].as_str().unwrap().starts_with(&format!("/kb/{doc}#{doc}-")), "{p}");
    }
    assert!(g["budget"]["passage_tokens_used"].as_u64().unwrap() <= g["budget"]["passage_tokens"].as_u64().unwrap());
    // Every marker in the text names a given passage, and every citation is one of them.
    for n in markers(content) {
        assert!(n >= 1 && n <= passages.len(), "marker [{n}] with {} passages: {content}", passages.len());
    }
    let cited = helpline["citations"].as_array().expect("citations present when grounded");
    for c in cited {
        let given = &passages[c["index"].as_u64().unwrap() as usize - 1];
        let mut plain = c.clone();
        let by = plain.as_object_mut().unwrap().remove("cited_by");
        assert!(by == Some(json!("model")) || by == Some(json!("attribution")) || by == Some(json!("evidence")), "{c}");
        assert_eq!(given, &plain, "a citation is a passage that was given");
        let n = c["index"].as_u64().unwrap() as usize;
        assert!(markers(content).contains(&n), "cited [{n}] appears in the text: {content}");
    }
    passages.iter().map(|p| p["doc_id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_covered_question_is_answered_from_the_docs_with_valid_citations() {
    let server = start_grounded_server(config()).await;
    let resp = server.post_json("/v1/chat/completions", &ask("How do I reset my password?", json!({}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!content.trim().is_empty());
    let docs = check_grounded(&body["helpline"], content);
    assert!(docs.iter().any(|d| d == "password-reset"), "{docs:?}");
    assert!(body["helpline"]["handoff"].is_null());
    // Assembled by default: the article's steps quoted, no model run.
    assert_eq!(body["helpline"]["grounding"]["mode"], "assembled");
    assert!(content.contains("Send reset link") && content.contains("60 minutes"), "{content}");
    assert_eq!(body["usage"]["prompt_tokens"], 0, "no model ran");
    // The generative mode gives the evidence to the model, checked sentence by sentence.
    let resp = server.post_json("/v1/chat/completions", &ask("How do I reset my password?", json!({"helpline": {"answer_mode": "generative"}}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = resp.json();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    let docs = check_grounded(&body["helpline"], content);
    assert!(docs.iter().any(|d| d == "password-reset"), "{docs:?}");
    assert_eq!(body["helpline"]["grounding"]["mode"], "generative");
    assert!(body["helpline"]["grounding"]["checks"].is_object(), "{}", body["helpline"]);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 100, "the evidence is in the prompt");
}

#[tokio::test]
async fn a_streamed_grounded_answer_ends_with_citations_in_the_final_chunk() {
    let server = start_grounded_server(config()).await;
    let body = ask("Can I get a refund on my annual plan?", json!({"stream": true, "stream_options": {"include_usage": true}}));
    let stream = server.stream("/v1/chat/completions", &body).await;
    assert_eq!(stream.status, 200);
    let data = stream.collect_data().await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let finish = chunks.iter().find(|c| !c["choices"][0]["finish_reason"].is_null()).expect("a final chunk");
    let docs = check_grounded(&finish["helpline"], &text);
    assert!(docs.iter().any(|d| d == "refund-policy"), "{docs:?}");
    assert!(chunks.last().unwrap()["usage"].is_object());
    assert!(chunks.len() > 3, "an assembled answer streams in pieces like any other: {}", chunks.len());
}

#[tokio::test]
async fn an_uncovered_question_is_refused_without_calling_the_model() {
    let server = start_grounded_server(config()).await;
    let stats = server.engine().stats().clone();
    let before = (stats.completed_total.load(Ordering::SeqCst), stats.prompt_tokens_total.load(Ordering::SeqCst));
    for stream in [false, true] {
        let body = ask("What is the capital of Mongolia?", json!({"stream": stream}));
        let (content, helpline, finish_reason) = if stream {
            let data = server.stream("/v1/chat/completions", &body).await.collect_data().await;
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
            let fin = chunks.iter().find(|c| !c["choices"][0]["finish_reason"].is_null()).unwrap().clone();
            (text, fin["helpline"].clone(), fin["choices"][0]["finish_reason"].clone())
        } else {
            let resp = server.post_json("/v1/chat/completions", &body).await;
            assert_eq!(resp.status, 200, "{}", resp.text());
            let b = resp.json();
            assert_eq!(b["usage"]["completion_tokens"], 0);
            (b["choices"][0]["message"]["content"].as_str().unwrap().to_string(), b["helpline"].clone(), b["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(content, server.state.config.grounding.refusal_message);
        assert_eq!(finish_reason, "stop");
        assert_eq!(helpline["grounding"]["status"], "no_relevant_docs", "{helpline}");
        assert_eq!(helpline["grounding"]["passages"], json!([]));
        assert_eq!(helpline["citations"], json!([]));
        assert_eq!(helpline["handoff"]["offered"], true);
        assert_eq!(helpline["handoff"]["reason"], "no_relevant_docs");
        assert_eq!(helpline["handoff"]["message"], server.state.config.grounding.handoff_message.as_str());
    }
    let after = (stats.completed_total.load(Ordering::SeqCst), stats.prompt_tokens_total.load(Ordering::SeqCst));
    assert_eq!(before, after, "the engine ran nothing");
    let metrics = server.admin_get("/metrics").await.text();
    assert!(metrics.contains("helpline_chat_answers_total{grounding=\"no_relevant_docs\"} 2"), "{metrics}");
}

#[tokio::test]
async fn a_follow_up_retrieves_the_topic_of_earlier_turns() {
    let server = start_grounded_server(config()).await;
    let body = json!({
        "temperature": 0,
        "max_tokens": 8,
        "messages": [
            {"role": "user", "content": "I want my money back for the annual plan I bought last week."},
            {"role": "assistant", "content": "You can cancel within 30 days of the annual charge for a pro-rated refund [1]."},
            {"role": "user", "content": "and how long does that take?"}
        ]
    });
    let resp = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let b = resp.json();
    let docs = check_grounded(&b["helpline"], b["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(docs.iter().any(|d| d == "refund-policy"), "{docs:?}");
    let query = b["helpline"]["grounding"]["query"].as_str().unwrap();
    assert!(query.contains("annual plan") && query.ends_with("and how long does that take?"), "{query}");

    // A change of topic to something the docs do not cover is not lifted over the gate by the
    // earlier turns.
    let body = json!({
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "How do I reset my password?"},
            {"role": "assistant", "content": "Select Forgot password? on the sign-in page [1]."},
            {"role": "user", "content": "What is the capital of Mongolia?"}
        ]
    });
    let b = server.post_json("/v1/chat/completions", &body).await.json();
    assert_eq!(b["helpline"]["grounding"]["status"], "no_relevant_docs", "{b}");
}

#[tokio::test]
async fn grounding_can_be_turned_off_per_request_and_by_the_operator() {
    let server = start_grounded_server(config()).await;
    let resp = server.agent_post_json("/v1/chat/completions", &ask("Hi!", json!({"max_tokens": 16, "helpline": {"grounding": false}}))).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let b = resp.json();
    assert_eq!(b["helpline"]["grounding"]["status"], "off");
    assert!(b["helpline"]["citations"].is_null());
    assert_eq!(b["choices"][0]["message"]["content"], "Hello! How can I assist you today?", "the plain model answer");
    assert_eq!(b["helpline"]["grounding"]["mode"], "model");

    let mut off = config();
    off.grounding.enabled = false;
    let server = start_server(off).await;
    let resp = server.post_json("/v1/chat/completions", &ask("What is the capital of Mongolia?", json!({"max_tokens": 4}))).await;
    assert_eq!(resp.json()["helpline"]["grounding"]["status"], "off");
    // ...and a request may still turn it on.
    let resp = server.post_json("/v1/chat/completions", &ask("What is the capital of Mongolia?", json!({"helpline": {"grounding": true}}))).await;
    assert_eq!(resp.json()["helpline"]["grounding"]["status"], "no_relevant_docs");
}

#[tokio::test]
async fn what_does_not_fit_the_budget_is_dropped_and_reported() {
    let mut cfg = config();
    cfg.grounding.passage_tokens = 300;
    cfg.grounding.history_tokens = 40;
    cfg.grounding.passages = 6;
    let server = start_grounded_server(cfg).await;
    let long_turn = "I have a question about my account and my invoices and the plan we are on. ".repeat(4);
    // The budget is the generative mode's: the evidence and history go into the model's prompt.
    let body = json!({
        "temperature": 0,
        "max_tokens": 4,
        "helpline": {"answer_mode": "generative"},
        "messages": [
            {"role": "user", "content": long_turn},
            {"role": "assistant", "content": "Sure, what would you like to know?"},
            {"role": "user", "content": "How do refunds work for annual plans and what are the limits?"}
        ]
    });
    let resp = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let g = resp.json()["helpline"]["grounding"].clone();
    assert_eq!(g["status"], "grounded", "{g}");
    let used = g["budget"]["passage_tokens_used"].as_u64().unwrap();
    assert!(used > 0 && used <= 300, "{g}");
    let given = g["passages"].as_array().unwrap().len();
    let dropped = g["dropped"]["passages"].as_array().unwrap().len();
    assert!(given >= 1 && given + dropped >= 1, "{g}");
    assert_eq!(g["dropped"]["history_messages"], 1, "the long first turn is dropped, the short reply kept: {g}");
    assert!(g["budget"]["history_tokens_used"].as_u64().unwrap() <= 40);
}

#[tokio::test]
async fn grounded_requests_are_validated_at_the_boundary() {
    let server = start_grounded_server(config()).await;
    let cases = [
        (ask("refund?", json!({"helpline": {"filters": {"product_area": ["Billing!"]}}})), "helpline.filters.product_area"),
        (ask("refund?", json!({"helpline": {"filters": {"locale": ""}}})), "helpline.filters.locale"),
        (ask("refund?", json!({"helpline": {"grounding": false, "filters": {"locale": "en"}}})), "helpline.filters"),
        (json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]}), "messages"),
    ];
    for (body, param) in cases {
        let resp = server.agent_post_json("/v1/chat/completions", &body).await;
        error_of(&resp, 422, Some(param));
    }
    let resp = server.admin_post_json("/v1/completions", &json!({"prompt": "Refunds", "helpline": {"grounding": true}})).await;
    error_of(&resp, 422, Some("helpline.grounding"));
    // Filters narrow retrieval: billing only.
    let resp = server
        .post_json("/v1/chat/completions", &ask("How do I reset my password?", json!({"max_tokens": 4, "helpline": {"filters": {"product_area": ["billing"]}}})))
        .await;
    let g = resp.json()["helpline"]["grounding"].clone();
    for p in g["passages"].as_array().unwrap() {
        let kb = &support::knowledge().1;
        let passage = kb.passage(p["chunk_id"].as_str().unwrap()).unwrap().unwrap();
        assert_eq!(passage.product_area, "billing");
    }
}

#[tokio::test]
async fn retrieve_returns_ranked_approved_passages_and_validates_its_input() {
    let server = start_grounded_server(config()).await;
    let resp = server.post_json("/v1/retrieve", &json!({"query": "refund within 60 days no questions asked", "k": 10})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let b = resp.json();
    assert_eq!(b["object"], "list");
    assert!(b["relevant"].as_bool().unwrap());
    assert_eq!(b["index_version"], support::knowledge().1.version());
    let data = b["data"].as_array().unwrap();
    assert!(!data.is_empty() && data.len() <= 10);
    // Ranked by BM25 and sentence-embedding similarity fused, so not by BM25 score alone.
    for p in data {
        assert!(!NOT_APPROVED.contains(&p["doc_id"].as_str().unwrap()), "{p}");
        for field in ["chunk_id", "title", "snippet", "text", "url"] {
            assert!(p[field].as_str().is_some_and(|s| !s.is_empty()), "{field}: {p}");
        }
    }
    assert!(data.iter().take(3).any(|p| p["doc_id"] == "refund-policy"), "{b}");

    let resp = server.post_json("/v1/retrieve", &json!({"query": "What is the capital of Mongolia?"})).await;
    assert!(!resp.json()["relevant"].as_bool().unwrap());

    for (body, param) in [
        (json!({}), "query"),
        (json!({"query": "   "}), "query"),
        (json!({"query": "x".repeat(2001)}), "query"),
        (json!({"query": "refund", "k": 0}), "k"),
        (json!({"query": "refund", "k": 51}), "k"),
        (json!({"query": "refund", "filters": {"doc_id": ["Bad Id"]}}), "helpline.filters.doc_id"),
    ] {
        error_of(&server.post_json("/v1/retrieve", &body).await, 422, Some(param));
    }
    // Query syntax is never interpreted.
    let resp = server.post_json("/v1/retrieve", &json!({"query": "title:( AND OR \"refund"})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test]
async fn without_an_index_grounded_chat_fails_closed() {
    let server = start_unloaded_server(config()).await;
    server.state.set_loaded(crate::server_support::default_model(&server.state.config));
    let resp = server.post_json("/v1/chat/completions", &ask("How do I reset my password?", json!({}))).await;
    let b = error_of(&resp, 503, None);
    assert_eq!(b["error"]["code"], "no_index");
    assert_eq!(server.get("/ready").await.status, 503);
    assert_eq!(server.post_json("/v1/retrieve", &json!({"query": "refund"})).await.status, 503);
    // Ungrounded chat still works.
    let resp = server.agent_post_json("/v1/chat/completions", &ask("Hi!", json!({"max_tokens": 4, "helpline": {"grounding": false}}))).await;
    assert_eq!(resp.status, 200);
}

/// Copies `docs-corpus/` into a fresh directory tests may edit.
fn copy_corpus(to: &std::path::Path) {
    fn walk(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &target);
            } else {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }
    walk(&support::root().join("docs-corpus"), to);
}

#[tokio::test]
async fn reload_reindexes_a_running_server_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    let index = dir.path().join("index");
    copy_corpus(&docs);
    let mut cfg = config();
    cfg.grounding.docs_dir = docs.clone();
    cfg.grounding.index_dir = index.clone();
    let server = start_unloaded_server(cfg).await;
    server.state.set_loaded(crate::server_support::default_model(&server.state.config));

    // First reload builds the index from nothing and opens it.
    let resp = server.admin_post_json("/v1/index/reload", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let first = resp.json();
    assert_eq!(first["changed"], true);
    let v1 = first["index"]["index_version"].as_str().unwrap().to_string();
    assert!(first["index"]["documents"].as_u64().unwrap() >= 50);

    let question = json!({"query": "What does the zorblax gadget cost?"});
    assert!(!server.post_json("/v1/retrieve", &question).await.json()["relevant"].as_bool().unwrap());

    // A new approved article and a broken one.
    std::fs::write(
        docs.join("plans/zorblax-gadget.md"),
        "---\nid: zorblax-gadget\ntitle: The zorblax gadget\nstatus: approved\nupdated: 2026-03-01\nproduct_area: plans\n---\n\n\
         ## Price\n\nThe zorblax gadget costs 12 dollars a month on every plan and ships with a zorblax cable.\n",
    )
    .unwrap();
    std::fs::write(docs.join("plans/broken.md"), "---\nid: broken\ntitle: Broken\n").unwrap();
    let resp = server.admin_post_json("/v1/index/reload", &json!({})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let second = resp.json();
    assert_eq!(second["changed"], true);
    assert_ne!(second["index"]["index_version"], v1.as_str());
    let files = second["report"]["files"].as_array().unwrap();
    let status_of = |path: &str| files.iter().find(|f| f["path"] == path).map(|f| f["status"].clone());
    assert_eq!(status_of("plans/zorblax-gadget.md"), Some(json!("indexed")));
    assert_eq!(status_of("plans/broken.md"), Some(json!("skipped")));
    assert_eq!(status_of("billing/refund-policy.md"), Some(json!("unchanged")));

    let found = server.post_json("/v1/retrieve", &question).await.json();
    assert!(found["relevant"].as_bool().unwrap(), "{found}");
    assert_eq!(found["data"][0]["doc_id"], "zorblax-gadget");

    // Nothing changed: same version.
    let third = server.admin_post_json("/v1/index/reload", &json!({})).await.json();
    assert_eq!(third["changed"], false);
    assert_eq!(third["index"]["index_version"], second["index"]["index_version"]);
    let metrics = server.admin_get("/metrics").await.text();
    assert!(metrics.contains("helpline_index_reloads_total{outcome=\"ok\"} 3"), "{metrics}");
    let status = server.admin_get("/v1/index").await.json();
    assert_eq!(status["index_version"], second["index"]["index_version"]);
}

#[tokio::test]
async fn draft_and_retired_articles_never_reach_retrieval_or_answers() {
    let server = start_grounded_server(config()).await;
    let probes = [
        "60 days no questions asked refund",
        "100% uptime guarantee",
        "1000 requests per hour API limit",
        "support can waive fees",
        "data is deleted when I cancel",
        "SSO on every plan",
    ];
    let mut seen = HashSet::new();
    for q in probes {
        let b = server.post_json("/v1/retrieve", &json!({"query": q, "k": 50})).await.json();
        for p in b["data"].as_array().unwrap() {
            seen.insert(p["doc_id"].as_str().unwrap().to_string());
        }
    }
    for bad in NOT_APPROVED {
        assert!(!seen.contains(*bad), "{bad} was retrieved");
    }
    assert_eq!(server.get("/kb/refund-policy-2024").await.status, 404);
}

/// One labelled question of `eval/grounding.jsonl`.
#[derive(serde::Deserialize)]
struct EvalCase {
    id: String,
    turns: Vec<String>,
    relevant: Vec<String>,
    answer: String,
}

/// Grounded answers over the labelled question set, end to end on the real model: every citation
/// marker names a passage given to the model, every citation is such a passage, unanswerable
/// questions are refused, and cited passages come from the right articles.
///
/// Runs every fourth question (42) to keep the suite short; `HELPLINE_EVAL_ALL=1` runs all 168
/// (the figures in docs/grounding.md come from that run). Prints the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounded_answers_over_the_eval_set_cite_only_given_passages() {
    let text = std::fs::read_to_string(support::root().join("eval/grounding.jsonl")).unwrap();
    let all: Vec<EvalCase> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let every = if std::env::var("HELPLINE_EVAL_ALL").is_ok_and(|v| v == "1") { 1 } else { 4 };
    let cases: Vec<&EvalCase> = all.iter().step_by(every).collect();
    let server = start_grounded_server(ServeConfig { max_concurrent: 4, ..config() }).await;

    let bodies: Vec<Value> = cases
        .iter()
        .map(|case| {
            let mut messages = Vec::new();
            for (t, turn) in case.turns.iter().enumerate() {
                if t > 0 {
                    messages.push(json!({"role": "assistant", "content": "I can help with that."}));
                }
                messages.push(json!({"role": "user", "content": turn}));
            }
            json!({"messages": messages, "temperature": 0, "max_tokens": 40})
        })
        .collect();
    // As many in flight as the engine decodes together (more would only wait in its queue).
    use futures_util::StreamExt;
    let responses: Vec<HttpResponse> =
        futures_util::stream::iter(bodies.iter().map(|b| server.post_json("/v1/chat/completions", b))).buffered(4).collect().await;
    let mut answers = Vec::new();
    for (case, resp) in cases.iter().zip(responses) {
        assert_eq!(resp.status, 200, "{}: {}", case.id, resp.text());
        answers.push(resp.json());
    }

    let (mut answerable, mut unanswerable, mut refused_ok, mut refused_wrong, mut answered_unanswerable) = (0, 0, 0, 0, 0);
    let (mut grounded, mut with_citation, mut citations, mut citations_relevant, mut fact_found, mut invalid_markers) = (0, 0, 0, 0, 0, 0);
    for (case, body) in cases.iter().zip(answers.iter()) {
        let h = &body["helpline"];
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        // A turn the policy pack answered (a handoff or an out-of-scope refusal) has no grounding.
        let status = h["grounding"]["status"].as_str().unwrap_or("policy");
        let is_answerable = !case.relevant.is_empty();
        if is_answerable { answerable += 1 } else { unanswerable += 1 }
        if status == "no_relevant_docs" || status == "policy" {
            if is_answerable { refused_wrong += 1 } else { refused_ok += 1 }
            continue;
        }
        if !is_answerable {
            answered_unanswerable += 1;
        }
        assert_eq!(status, "grounded", "{}", case.id);
        grounded += 1;
        let given = h["grounding"]["passages"].as_array().unwrap();
        // Validity: every marker names a given passage; every citation is a given passage.
        for n in markers(content) {
            if n == 0 || n > given.len() {
                invalid_markers += 1;
            }
        }
        let cited = h["citations"].as_array().unwrap();
        for c in cited {
            let g = &given[c["index"].as_u64().unwrap() as usize - 1];
            assert_eq!(g["chunk_id"], c["chunk_id"], "{}", case.id);
            citations += 1;
            if case.relevant.iter().any(|r| c["doc_id"] == r.as_str()) {
                citations_relevant += 1;
            }
        }
        if !cited.is_empty() {
            with_citation += 1;
        }
        if is_answerable && !case.answer.is_empty() && content.to_lowercase().contains(&case.answer.to_lowercase()) {
            fact_found += 1;
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let refusal_precision = share(refused_ok, refused_ok + refused_wrong);
    let refusal_recall = share(refused_ok, unanswerable);
    let citation_precision = share(citations_relevant, citations);
    eprintln!(
        "grounded-answer eval over {} questions ({answerable} answerable, {unanswerable} not): \
         refusal precision {refusal_precision:.3} recall {refusal_recall:.3}; answered {grounded}, with a citation {with_citation} ({:.3}); \
         citations {citations}, from a relevant article {citations_relevant} ({citation_precision:.3}); invalid markers {invalid_markers}; \
         unanswerable answered {answered_unanswerable}; expected fact in the answer {fact_found}/{answerable} ({:.3})",
        cases.len(),
        share(with_citation, grounded),
        share(fact_found, answerable),
    );
    assert_eq!(invalid_markers, 0, "citation validity is 100% by construction");
    // Thresholds a little under the measured figures of this subset (0.75 / 0.5 / 0.55 / 0.64).
    assert!(refusal_precision >= 0.6 && refusal_recall >= 0.33, "refusal precision {refusal_precision}, recall {refusal_recall}");
    assert!(share(with_citation, grounded) >= 0.45, "about half the grounded answers cite a passage: {}", share(with_citation, grounded));
    assert!(citation_precision >= 0.5, "citations point at relevant articles: {citation_precision}");
}
