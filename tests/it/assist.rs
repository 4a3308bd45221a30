//! Agent assist on a real socket, with the real default model, the real index over docs-corpus and
//! the shipped policy pack: reply drafts (grounded, guarded, deterministic, honest when the docs
//! do not cover the question), case summaries checked against the shipped schema, knowledge-base
//! drafts that stay out of the index until approved (on a copy of docs-corpus), and the agent key
//! scope on every route.

use std::path::Path;

use helpline::config::ServeConfig;
use helpline::server::AppState;
use helpline::store::{Customer, Role, TurnState};
use regex::Regex;
use serde_json::{json, Value};

use crate::server_support::{serve_state, start_server, start_unloaded_server, HttpResponse, TestServer, AGENT_KEY};
use crate::support;

fn ok(resp: &HttpResponse) -> Value {
    assert_eq!(resp.status, 200, "{}", resp.text());
    resp.json()
}

/// A 422 naming one of `fields`.
fn refused(resp: &HttpResponse, fields: &[&str]) -> Value {
    assert_eq!(resp.status, 422, "{}", resp.text());
    let body = resp.json();
    let param = body["error"]["param"].as_str().unwrap_or_default().to_string();
    assert!(fields.contains(&param.as_str()), "param {param:?} is not one of {fields:?}: {body}");
    body
}

/// A handful of the pack's forbidden commitments, matched independently of the server.
fn forbidden() -> Regex {
    Regex::new(
        r"(?i)\b(I(\s+will|'ll|\s+have|'ve)\s+refund|we\s+guarantee|I\s+promise|I\s+can\s+waive|legally\s+binding|100\s*%\s*uptime|I('ll|\s+will)\s+make\s+an\s+exception|your\s+refund\s+(has\s+been|is)\s+approved)",
    )
    .unwrap()
}

/// Writes a conversation straight into the server's store: (role, text, detail of a bot answer).
async fn stored(server: &TestServer, id: &str, turns: &[(Role, &str, Value)]) {
    let store = server.state.store().unwrap();
    let customer = Customer { id: Some("cust-1".into()), plan: Some("pro".into()), ..Default::default() };
    store.ensure_conversation(Some(id), &customer).await.unwrap();
    for (role, text, detail) in turns {
        if *role == Role::Bot {
            let t = store.append_turn(id, Role::Bot, "", TurnState::Pending).await.unwrap();
            let finish = detail["finish_reason"].as_str().unwrap_or("stop").to_string();
            store.complete_turn(&t.id, text, TurnState::Complete, Some(&finish), Some(detail.clone()), None).await.unwrap();
        } else {
            store.append_turn(id, *role, text, TurnState::Complete).await.unwrap();
        }
    }
}

fn answered(doc_id: &str, title: &str) -> Value {
    json!({"citations": [{"doc_id": doc_id, "title": title}], "guard": {"action": "none"}, "grounding": {"status": "grounded"}})
}

fn markers(text: &str) -> Vec<usize> {
    Regex::new(r"\[(\d+)\]").unwrap().captures_iter(text).map(|c| c[1].parse().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------
// Reply drafts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_from_a_stored_conversation_is_grounded_guarded_and_deterministic() {
    let server = start_server(ServeConfig::default()).await;
    // Two real chat turns: the conversation is stored by the chat route itself.
    let conv = "conv-assist-draft";
    let first = "How do I reset my password? The reset link in the email says it has expired.";
    let helpline = json!({"conversation_id": conv, "customer": {"id": "cust-1", "plan": "pro"}});
    let a1 = ok(&server
        .post_json("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": first}], "max_tokens": 24, "temperature": 0, "helpline": helpline}))
        .await);
    let answer1 = a1["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let second = "I tried again and it still does not work, this is so frustrating. What else can I do?";
    let messages = json!([{"role": "user", "content": first}, {"role": "assistant", "content": answer1}, {"role": "user", "content": second}]);
    ok(&server.post_json("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 24, "temperature": 0, "helpline": helpline})).await);

    let body = json!({"conversation_id": conv, "note": "Check whether they asked for more than 5 reset links in an hour."});
    let d = ok(&server.agent_post_json("/v1/assist/draft", &body).await);
    let draft = d["draft"].as_str().unwrap();
    assert!(!draft.trim().is_empty());

    // Grounded: the draft cites only passages it was given, and they were retrieved for this case.
    assert_eq!(d["grounding"]["status"], "grounded", "{d:#}");
    let passages = d["grounding"]["passages"].as_array().unwrap();
    let given: Vec<&Value> = passages.iter().filter(|p| p["index"].is_u64()).collect();
    assert!(!given.is_empty());
    assert!(given.iter().any(|p| p["doc_id"] == "password-reset"), "{passages:#?}");
    let citations = d["citations"].as_array().unwrap();
    assert!(!citations.is_empty(), "{d:#}");
    for c in citations {
        let n = c["index"].as_u64().unwrap();
        let p = given.iter().find(|p| p["index"].as_u64() == Some(n)).unwrap_or_else(|| panic!("citation {c} names no given passage"));
        assert_eq!(c["doc_id"], p["doc_id"]);
        assert_eq!(c["title"], p["title"]);
        assert!(c["url"].as_str().unwrap().starts_with(&format!("/kb/{}#", c["doc_id"].as_str().unwrap())));
    }
    for n in markers(draft) {
        assert!(citations.iter().any(|c| c["index"].as_u64() == Some(n as u64)), "marker [{n}] in the draft is not a citation:\n{draft}");
    }
    // Guarded: no forbidden commitment; the draft is the chat turn's assembled answer (quotes of
    // the approved articles), so no model wording needs a grammar.
    assert!(!forbidden().is_match(draft), "forbidden commitment in the draft:\n{draft}");
    let pack = support::policy().pack;
    assert_eq!(d["guard"]["policy_version"], pack.version.as_str());
    assert_eq!(d["guard"]["checked_phrases"], true);
    assert_eq!(d["generation"]["used"], false);
    assert_eq!(d["generation"]["mode"], "assembled");
    assert!(d["grounding"]["gate"]["answered"] == true, "{}", d["grounding"]);

    // The outline is built by code and names every cited article.
    let outline: Vec<&str> = d["outline"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(outline.len() >= 3, "{outline:#?}");
    for c in citations {
        let title = c["title"].as_str().unwrap();
        assert!(outline.iter().any(|l| l.contains(title)), "the outline does not mention {title:?}: {outline:#?}");
    }
    assert!(outline.iter().any(|l| l.contains("your note")), "{outline:#?}");
    assert!(outline[0].contains("frustrat"), "a frustrated customer is acknowledged: {outline:#?}");

    // What the agent needs to know about the history.
    let h = &d["history_summary"];
    assert_eq!(h["customer_messages"], 2);
    assert_eq!(h["bot_answers"], 2);
    assert_eq!(h["agent_replies"], 0);
    assert_eq!(h["issue"], first);
    assert_eq!(h["last_customer_message"], second);
    assert_eq!(h["sentiment"]["label"], "negative");
    assert!(h["docs_already_cited"].is_array());

    // Greedy decoding: the same case gives the same draft.
    let again = ok(&server.agent_post_json("/v1/assist/draft", &body).await);
    assert_eq!(again["draft"], d["draft"]);
    assert_eq!(again["citations"], d["citations"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_without_relevant_docs_says_so_and_escalates() {
    let server = start_server(ServeConfig::default()).await;
    let ticket = "Subject: recipe\n\nHi, what is the best way to bake sourdough bread at high altitude?";
    let d = ok(&server.agent_post_json("/v1/assist/draft", &json!({"ticket": ticket})).await);
    let draft = d["draft"].as_str().unwrap();
    assert_eq!(d["grounding"]["status"], "no_relevant_docs", "{d:#}");
    assert!(draft.contains("help center does not cover"), "{draft}");
    assert!(markers(draft).is_empty(), "{draft}");
    assert!(d["citations"].as_array().unwrap().is_empty());
    // No ungrounded text: the model was not asked.
    assert_eq!(d["generation"]["used"], false);
    assert!(d["guard"]["grammar_hash"].is_null());
    let outline: Vec<&str> = d["outline"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(outline.iter().any(|l| l.starts_with("Escalate")), "{outline:#?}");
    assert_eq!(d["history_summary"]["customer_messages"], 1);
    assert!(d["history_summary"]["status"].is_null());

    // A pasted ticket the docs do cover is grounded, and quotes them without a forbidden promise.
    let ticket = "I was charged for my monthly plan 3 days ago and I want a refund of that first charge. Will you refund me?";
    let d = ok(&server.agent_post_json("/v1/assist/draft", &json!({"ticket": ticket})).await);
    let draft = d["draft"].as_str().unwrap();
    assert_eq!(d["grounding"]["status"], "grounded", "{d:#}");
    assert!(d["citations"].as_array().unwrap().iter().any(|c| c["doc_id"] == "refund-policy"), "{d:#}");
    assert!(!forbidden().is_match(draft), "{draft}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_and_summary_check_their_input() {
    let server = start_server(ServeConfig::default()).await;
    stored(&server, "conv-input", &[(Role::Customer, "How do I export my data?", Value::Null)]).await;
    for route in ["/v1/assist/draft", "/v1/assist/summarize"] {
        let both = refused(&server.agent_post_json(route, &json!({"conversation_id": "conv-input", "ticket": "text"})).await, &["conversation_id", "ticket"]);
        assert!(both["error"]["message"].as_str().unwrap().contains("not both"), "{both}");
        refused(&server.agent_post_json(route, &json!({})).await, &["conversation_id"]);
        refused(&server.agent_post_json(route, &json!({"ticket": "   "})).await, &["ticket"]);
        refused(&server.agent_post_json(route, &json!({"ticket": "x".repeat(8001)})).await, &["ticket"]);
        refused(&server.agent_post_json(route, &json!({"conversation_id": "../etc/passwd"})).await, &["conversation_id"]);
        refused(&server.agent_post_json(route, &json!({"conversation_id": 7})).await, &["conversation_id"]);
        let missing = server.agent_post_json(route, &json!({"conversation_id": "conv-nobody-has"})).await;
        assert_eq!(missing.status, 404, "{}", missing.text());
    }
    refused(&server.agent_post_json("/v1/assist/draft", &json!({"conversation_id": "conv-input", "note": "n".repeat(2001)})).await, &["note"]);
    // A conversation with no customer message has nothing to reply to.
    server.state.store().unwrap().ensure_conversation(Some("conv-empty"), &Customer::default()).await.unwrap();
    refused(&server.agent_post_json("/v1/assist/draft", &json!({"conversation_id": "conv-empty"})).await, &["conversation_id"]);
}

// ---------------------------------------------------------------------------------------------
// Case summaries
// ---------------------------------------------------------------------------------------------

/// Checks `value` against the JSON Schema keywords the shipped schema uses (type, required,
/// properties, additionalProperties: false, items, minLength/maxLength, maxItems, enum). Returns
/// every violation with where it is.
fn schema_errors(value: &Value, schema: &Value, at: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(t) = schema["type"].as_str() {
        let fits = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            other => panic!("the checker does not know type {other}"),
        };
        if !fits {
            errors.push(format!("{at}: expected {t}, got {value}"));
            return errors;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            errors.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let Some(s) = value.as_str() {
        let n = s.chars().count() as u64;
        if schema["minLength"].as_u64().is_some_and(|min| n < min) || schema["maxLength"].as_u64().is_some_and(|max| n > max) {
            errors.push(format!("{at}: length {n} outside the schema's bounds"));
        }
    }
    if let Some(items) = value.as_array() {
        if schema["maxItems"].as_u64().is_some_and(|max| items.len() as u64 > max) {
            errors.push(format!("{at}: {} items, more than maxItems", items.len()));
        }
        for (i, item) in items.iter().enumerate() {
            errors.extend(schema_errors(item, &schema["items"], &format!("{at}[{i}]")));
        }
    }
    if let Some(obj) = value.as_object() {
        for key in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(key) {
                errors.push(format!("{at}: missing required `{key}`"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => errors.extend(schema_errors(v, s, &format!("{at}.{k}"))),
                None if schema["additionalProperties"] == false => errors.push(format!("{at}: `{k}` is not allowed")),
                None => {}
            }
        }
    }
    errors
}

fn case_summary_schema() -> Value {
    let text = std::fs::read_to_string(support::root().join("docs/schemas/case-summary.schema.json")).expect("the schema ships");
    serde_json::from_str(&text).expect("the schema is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_of_a_conversation_follows_the_shipped_schema() {
    let schema = case_summary_schema();
    // The checker itself catches what it should.
    let bad = json!({"issue": "", "steps": [1], "outcome": "x".repeat(401), "extra": true});
    assert_eq!(schema_errors(&bad, &schema, "$").len(), 5, "{:?}", schema_errors(&bad, &schema, "$"));

    let server = start_server(ServeConfig::default()).await;
    let conv = "conv-assist-summary";
    let first = "How do I reset my password?";
    stored(
        &server,
        conv,
        &[
            (Role::Customer, first, Value::Null),
            (Role::Bot, "Use Forgot password? on the sign-in page; the link is valid for 60 minutes. [1]", answered("password-reset", "Reset your Tallyworks password")),
            (Role::Customer, "Thanks. Can I pay by bank transfer? And where is your office?", Value::Null),
            (
                Role::Bot,
                "I'm sorry, I can't answer that from our help center documentation.",
                json!({"grounding": {"status": "no_relevant_docs"}, "guard": {"action": "none"}, "finish_reason": "refused"}),
            ),
            (Role::Customer, "I want to talk to a human", Value::Null),
        ],
    )
    .await;
    let takeover = server.agent_post_json(&format!("/v1/conversations/{conv}/takeover"), &json!({})).await;
    assert_eq!(takeover.status, 200, "{}", takeover.text());
    ok(&server.agent_post_json(&format!("/v1/conversations/{conv}/messages"), &json!({"content": "Hi, I'm Sam from support. Let me check the payment options for you."})).await);

    let s = ok(&server.agent_post_json("/v1/assist/summarize", &json!({"conversation_id": conv})).await);
    let summary = &s["summary"];
    let errors = schema_errors(summary, &schema, "summary");
    assert!(errors.is_empty(), "{errors:#?}\n{summary:#}");
    assert_eq!(s["schema_id"], schema["$id"]);
    assert_eq!(summary["issue"], first);
    let steps: Vec<&str> = summary["steps"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(steps.len(), 4, "two bot answers, the handoff, the agent's reply: {steps:#?}");
    assert!(steps[0].starts_with("Bot answered from Reset your Tallyworks password"), "{steps:#?}");
    assert!(steps[1].contains("found nothing in the help center"), "{steps:#?}");
    assert!(steps[2].starts_with("Handed off to a person (reason: agent_takeover"), "{steps:#?}");
    assert!(steps[3].starts_with("Agent replied: Hi, I'm Sam"), "{steps:#?}");
    let outcome = summary["outcome"].as_str().unwrap();
    assert!(outcome.starts_with("Handed off") && outcome.contains("an agent has replied"), "{outcome}");
    // The password question was answered; the two that met a refusal were not.
    let open: Vec<&str> = summary["open_questions"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(open, ["Can I pay by bank transfer?", "And where is your office?"]);
    // The text renders the same summary.
    let text = s["text"].as_str().unwrap();
    assert!(text.starts_with(&format!("Issue: {first}\n")), "{text}");
    for part in steps.iter().chain(open.iter()).chain([&outcome]) {
        assert!(text.contains(part), "{part:?} missing from the text:\n{text}");
    }

    // A pasted ticket: nothing done yet, its questions open.
    let s = ok(&server.agent_post_json("/v1/assist/summarize", &json!({"ticket": "My invoices do not send. Why do they bounce?"})).await);
    let errors = schema_errors(&s["summary"], &schema, "summary");
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(s["summary"]["steps"], json!([]));
    assert_eq!(s["summary"]["open_questions"], json!(["Why do they bounce?"]));
    assert!(s["summary"]["outcome"].as_str().unwrap().starts_with("Not answered yet"));
}

// ---------------------------------------------------------------------------------------------
// Knowledge-base drafts (on a copy of docs-corpus: the repository's docs are never written)
// ---------------------------------------------------------------------------------------------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A server whose docs directory is a fresh copy of docs-corpus, indexed into its own directory
/// (no model: the knowledge-base routes do not generate).
async fn server_on_a_docs_copy() -> (TestServer, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    let index = tmp.path().join("index");
    copy_dir(&support::root().join("docs-corpus"), &docs);
    let opts = support::index_options(&docs.clone(), &index.clone());
    helpline::retrieval::build_index(&opts).expect("the copy indexes");
    let mut cfg = ServeConfig::default();
    cfg.grounding.docs_dir = docs;
    cfg.grounding.index_dir = index.clone();
    cfg.conversations.agent_key_hashes.push(helpline::server::auth::digest(AGENT_KEY));
    cfg.access.admin_key_hashes.push(helpline::server::auth::digest(crate::server_support::ADMIN_KEY));
    let state = AppState::new(cfg);
    state.set_knowledge(support::open_kb(&index).unwrap());
    (serve_state(state).await, tmp)
}

async fn retrieve(server: &TestServer, query: &str) -> Value {
    // Customer scope: no agent key.
    ok(&server.post_json("/v1/retrieve", &json!({"query": query, "k": 5})).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kb_draft_is_kept_out_of_the_index_until_approved() {
    let (server, tmp) = server_on_a_docs_copy().await;
    let docs = tmp.path().join("docs");
    let question = "How do I reconcile my Zanzibar ledger with the bank feed?";
    let answer = "Open Settings, then Ledgers, pick the Zanzibar ledger and select Reconcile now. Reconciliation takes about ten minutes.";

    // No agent answer yet: refused, naming the conversation.
    stored(&server, "conv-kb", &[(Role::Customer, question, Value::Null), (Role::Bot, "I'm sorry, I can't answer that.", json!({"grounding": {"status": "no_relevant_docs"}}))]).await;
    let no = refused(&server.agent_post_json("/v1/assist/kb-draft", &json!({"conversation_id": "conv-kb"})).await, &["conversation_id"]);
    assert!(no["error"]["message"].as_str().unwrap().contains("agent"), "{no}");
    refused(&server.agent_post_json("/v1/assist/kb-draft", &json!({})).await, &["conversation_id"]);
    assert_eq!(server.agent_post_json("/v1/assist/kb-draft", &json!({"conversation_id": "conv-none"})).await.status, 404);

    ok(&server.agent_post_json("/v1/conversations/conv-kb/messages", &json!({"content": answer})).await);
    let k = ok(&server.agent_post_json("/v1/assist/kb-draft", &json!({"conversation_id": "conv-kb"})).await);
    let id = k["id"].as_str().unwrap().to_string();
    assert_eq!(k["status"], "draft");
    assert_eq!(k["path"], format!("drafts/{id}.md"));
    assert!(id.contains("zanzibar") && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{id}");
    let file = std::fs::read_to_string(docs.join(format!("drafts/{id}.md"))).unwrap();
    assert_eq!(file, k["markdown"].as_str().unwrap());
    for line in [format!("id: {id}"), "status: draft".into(), "## Question".into(), "## Answer".into(), "Source: conversation conv-kb".into()] {
        assert!(file.contains(&line), "{line:?} missing:\n{file}");
    }
    assert!(file.contains(question) && file.contains(answer), "{file}");
    // Drafting the same reply again rewrites the same draft.
    let again = ok(&server.agent_post_json("/v1/assist/kb-draft", &json!({"conversation_id": "conv-kb"})).await);
    assert_eq!(again["id"], id.as_str());

    let drafts = ok(&server.agent_get("/v1/kb/drafts").await);
    let listed: Vec<&Value> = drafts["data"].as_array().unwrap().iter().filter(|d| d["id"] == id.as_str()).collect();
    assert_eq!(listed.len(), 1, "{drafts:#}");
    assert_eq!(listed[0]["status"], "draft");
    assert_eq!(listed[0]["source_conversation"], "conv-kb");

    // A re-index does not pick the draft up.
    let reload = ok(&server.admin_post_json("/v1/index/reload", &json!({})).await);
    assert!(reload["report"]["files"].as_array().unwrap().iter().any(|f| f["path"] == format!("drafts/{id}.md") && f["status"] == "excluded"), "{reload:#}");
    let before = retrieve(&server, "reconcile Zanzibar ledger").await;
    assert!(before["data"].as_array().unwrap().iter().all(|p| p["doc_id"] != id.as_str()), "{before:#}");

    // Approval publishes it (dated today) and re-indexes without a restart.
    let draft_path = docs.join(format!("drafts/{id}.md"));
    let dated = std::fs::read_to_string(&draft_path).unwrap();
    let today = Regex::new(r"\nupdated: (\d{4}-\d{2}-\d{2})\n").unwrap().captures(&dated).unwrap()[1].to_string();
    std::fs::write(&draft_path, dated.replace(&format!("updated: {today}"), "updated: 2020-01-01")).unwrap();
    let a = ok(&server.agent_post_json(&format!("/v1/kb/{id}/approve"), &json!({})).await);
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["status"], "approved");
    assert_eq!(a["searchable"], true);
    assert_eq!(a["index"]["changed"], true);
    let path = a["path"].as_str().unwrap();
    let published = std::fs::read_to_string(docs.join(path)).unwrap();
    assert!(published.contains("\nstatus: approved\n") && !published.contains("status: draft"), "{published}");
    assert!(published.contains(&format!("\nupdated: {today}\n")), "{published}");
    assert!(!docs.join(format!("drafts/{id}.md")).exists(), "the draft is gone once approved");
    let after = retrieve(&server, "reconcile Zanzibar ledger").await;
    assert_eq!(after["data"][0]["doc_id"], id.as_str(), "{after:#}");
    assert_eq!(after["relevant"], true);
    let drafts = ok(&server.agent_get("/v1/kb/drafts").await);
    assert!(drafts["data"].as_array().unwrap().iter().all(|d| d["id"] != id.as_str()));
    // Approving twice: there is no draft any more.
    assert_eq!(server.agent_post_json(&format!("/v1/kb/{id}/approve"), &json!({})).await.status, 404);
    // The repository's docs were never touched.
    assert!(!support::root().join("docs-corpus/drafts").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_refuses_ids_that_could_leave_the_drafts_folder() {
    let (server, tmp) = server_on_a_docs_copy().await;
    let docs = tmp.path().join("docs");
    // A draft-shaped file outside the drafts folder, which a traversal would reach.
    let outside = "---\nid: secret\ntitle: Secret\nstatus: draft\nupdated: 2026-01-01\nproduct_area: billing\n---\n\n## A\n\nsecret\n";
    std::fs::write(docs.join("secret.md"), outside).unwrap();
    for id in ["..%2Fsecret", "%2e%2e%2fsecret", "drafts%2F..%2F..%2Fsecret", "Secret", "secret.md", "a--b", "-a"] {
        refused(&server.agent_post_json(&format!("/v1/kb/{id}/approve"), &json!({})).await, &["id"]);
    }
    // Raw dot segments do not reach the handler either.
    let raw = server.agent_post_json("/v1/kb/../secret/approve", &json!({})).await;
    assert!(raw.status == 404 || raw.status == 422, "{} {}", raw.status, raw.text());
    assert_eq!(std::fs::read_to_string(docs.join("secret.md")).unwrap(), outside);
    let unknown = server.agent_post_json("/v1/kb/no-such-draft/approve", &json!({})).await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert_eq!(unknown.json()["error"]["code"], "draft_not_found");
}

// ---------------------------------------------------------------------------------------------
// The agent key scope
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_assist_routes_need_the_agent_key() {
    let customer_key = "customer-key-for-assist-0123456789";
    let cfg = ServeConfig { api_key_hashes: vec![helpline::server::auth::digest(customer_key)], ..Default::default() };
    let server = start_unloaded_server(cfg).await;
    let customer = format!("Bearer {customer_key}");
    let body = json!({"ticket": "How do I reset my password?"}).to_string();
    let routes = [
        ("POST", "/v1/assist/draft"),
        ("POST", "/v1/assist/summarize"),
        ("POST", "/v1/assist/kb-draft"),
        ("GET", "/v1/kb/drafts"),
        ("POST", "/v1/kb/some-draft/approve"),
    ];
    for (method, path) in routes {
        let body = if method == "GET" { &b""[..] } else { body.as_bytes() };
        let with_customer_key = server.request(method, path, &[("content-type", "application/json"), ("authorization", &customer)], body).await;
        assert_eq!(with_customer_key.status, 401, "{method} {path}: {}", with_customer_key.text());
        let without = server.request(method, path, &[("content-type", "application/json")], body).await;
        assert_eq!(without.status, 401, "{method} {path}");
    }
    // The agent key gets through (the drafts list needs neither model nor index).
    let listed = ok(&server.agent_get("/v1/kb/drafts").await);
    assert!(listed["data"].is_array());
}

/// A KB draft quotes the customer's question: deleting the customer (or retention purging the
/// conversation) removes the draft too, and the atomic writes leave no temporary file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kb_drafts_go_with_their_customer() {
    let (server, tmp) = server_on_a_docs_copy().await;
    let docs = tmp.path().join("docs");
    let question = "Why does my Quokka export stop at row 4096?";
    stored(&server, "conv-kb-purge", &[(Role::Customer, question, Value::Null), (Role::Bot, "I'm sorry, I can't answer that.", json!({"grounding": {"status": "no_relevant_docs"}}))]).await;
    ok(&server.agent_post_json("/v1/conversations/conv-kb-purge/messages", &json!({"content": "Exports are paged: select Next page to get the rest."})).await);
    let k = ok(&server.agent_post_json("/v1/assist/kb-draft", &json!({"conversation_id": "conv-kb-purge"})).await);
    let path = docs.join(k["path"].as_str().unwrap());
    assert!(std::fs::read_to_string(&path).unwrap().contains(question));
    let purged = ok(&server.agent_delete("/v1/customers/cust-1").await);
    assert_eq!(purged["conversations"], 1, "{purged}");
    assert_eq!(purged["drafts"], 1, "{purged}");
    assert!(!path.exists(), "the draft is gone with its customer");
    let left: Vec<String> = std::fs::read_dir(docs.join("drafts")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.ends_with(".tmp")), "{left:?}");
}
