//! The agent console (`GET /agent`): served self-contained under the chat page's CSP; in a real
//! headless Chromium against the real router, model and conversation store (queue, a conversation
//! with its citations and guard outcomes, agent replies, keyboard use, a refused key); and its
//! assist buttons against stand-ins for the assist and KB routes (drafts, summaries, KB drafts and
//! their approval, failures with retry).
//!
//! Conversations are seeded through the store and the customer's handoff route, so these tests do
//! not depend on how chat writes turns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use helpline::config::ServeConfig;
use helpline::server::{agent_page, conversations, web, AppState};
use helpline::retrieval::build_index;
use helpline::store::{Customer, Role, Store, TurnState};
use serde_json::{json, Value};

use crate::server_support::{serve_app, start_server, start_unloaded_server, HttpResponse, TestServer, AGENT_KEY};
use crate::support;
use crate::webdriver::{self, ChromeDriver, Session, ENTER, TAB};

/// One browser at a time in this module (each is a few hundred MB and a core's worth of start-up).
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONV: &str = "conv-test-1";
const OPEN_CONV: &str = "conv-open-2";
const CITATION_URL: &str = "/kb/refund-policy#refund-policy-1";
const FIRST_MESSAGE: &str = "I was charged twice this month. This is unacceptable <b>fix it</b> <img src=x onerror=alert(1)>";

/// Browser steps on a blocking thread (the server keeps running); their panics fail the test.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("browser steps did not finish: {e}"),
    }
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().map(Result::unwrap) {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Seeds a handed-off conversation (a cited answer, then a guard handoff) and an open one.
async fn seed(server: &TestServer) {
    let store: &Store = server.state.store().expect("the test server has a store");
    let customer = Customer {
        id: Some("cust-42".into()),
        account_id: Some("acct-7".into()),
        plan: Some("pro".into()),
        locale: Some("en".into()),
        attributes: serde_json::Map::from_iter([("region".to_string(), json!("eu"))]),
        verified: false,
    };
    store.ensure_conversation(Some(CONV), &customer).await.unwrap();
    store.append_turn(CONV, Role::Customer, FIRST_MESSAGE, TurnState::Complete).await.unwrap();
    let answer = store.append_turn(CONV, Role::Bot, "", TurnState::Pending).await.unwrap();
    let cited = json!({
        "citations": [{"index": 1, "chunk_id": "refund-policy#1", "doc_id": "refund-policy", "title": "Refund policy",
                       "section": "Duplicate charges", "url": CITATION_URL, "snippet": "Duplicate charges are refunded."}],
        "guard": {"policy_version": "test-1", "action": "none", "rules": [], "grammar_hash": "ab12",
                  "constrained_by": ["no_refund_promises", "citations"]},
        "grounding": {"status": "grounded", "passages": [{"doc_id": "refund-policy"}]},
    });
    store
        .complete_turn(&answer.id, "Duplicate charges are refunded in full [1].", TurnState::Complete, Some("stop"), Some(cited), None)
        .await
        .unwrap();
    store.append_turn(CONV, Role::Customer, "I want to talk to a person now", TurnState::Complete).await.unwrap();
    let handoff = store.append_turn(CONV, Role::Bot, "", TurnState::Pending).await.unwrap();
    let guarded = json!({"guard": {"policy_version": "test-1", "action": "handoff", "rules": ["human_request"], "reason": "human_request"}});
    store
        .complete_turn(&handoff.id, "I'll pass you to a person.", TurnState::Complete, Some("stop"), Some(guarded), None)
        .await
        .unwrap();
    // The customer's "Talk to a human" (customer scope: no agent key).
    let resp = server.post_json(&format!("/v1/conversations/{CONV}/handoff"), &json!({"reason": "customer_request", "customer_id": "cust-42"})).await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    let other = Customer { id: Some("cust-99".into()), ..Default::default() };
    store.ensure_conversation(Some(OPEN_CONV), &other).await.unwrap();
    store.append_turn(OPEN_CONV, Role::Customer, "How do I export invoices?", TurnState::Complete).await.unwrap();
}

/// Everything the tests read off the page, in one round trip.
const PROBE: &str = r#"
const q = (s) => document.querySelector(s);
const all = (s) => [...document.querySelectorAll(s)];
const shown = (s) => { const e = q(s); return e && !e.hidden ? e.textContent : null; };
return {
  status: q('#status').textContent,
  error: q('#error').hidden ? null : q('#error-text').textContent,
  retry: !q('#error').hidden && !q('#error-retry').hidden,
  keyState: q('#key-state').textContent,
  key: sessionStorage.getItem('helpline.agentKey'),
  queue: all('[data-testid="queue-item"]').map((b) => ({
    id: b.dataset.id,
    reason: b.querySelector('[data-testid="queue-reason"]').textContent,
    customer: b.querySelector('[data-testid="queue-customer"]').textContent,
    sentiment: (b.querySelector('[data-testid="queue-sentiment"]') || {}).textContent || null,
    current: b.getAttribute('aria-current') === 'true',
    text: b.textContent,
  })),
  open: !q('#conversation').hidden,
  title: q('#conv-title').textContent,
  convStatus: (q('[data-testid="conv-status"]') || {}).textContent || null,
  convCustomer: (q('[data-testid="conv-customer"]') || {}).textContent || null,
  turns: all('[data-testid="turn"]').map((t) => ({
    role: t.dataset.role,
    state: t.dataset.state,
    text: t.querySelector('[data-testid="turn-text"]').textContent,
    citations: [...t.querySelectorAll('a[data-testid="turn-citation"]')].map((a) => a.getAttribute('href')),
    guard: (t.querySelector('[data-testid="guard"]') || {}).textContent || null,
    guardAction: (t.querySelector('[data-testid="guard"]') || { dataset: {} }).dataset.action || null,
  })),
  markupInTurns: all('[data-testid="turn-text"] *').length,
  handoff: shown('#handoff'),
  handoffReason: (q('[data-testid="handoff-reason"]') || {}).textContent || null,
  handoffSentiment: (q('[data-testid="handoff-sentiment"]') || {}).textContent || null,
  reply: q('#reply').value,
  restore: !q('#restore').hidden,
  draftExtra: shown('#draft-extra'),
  draftCitations: all('[data-testid="draft-citation"]').map((a) => a.getAttribute('href')),
  markupInDraft: all('#draft-extra .text *, [data-testid="draft-outline"] li *').length,
  summary: shown('#summary'),
  kb: shown('#kb-result'),
  kbMarkdown: (q('[data-testid="kb-markdown"]') || {}).textContent || null,
  drafts: all('[data-testid="kb-draft-item"]').map((li) => li.dataset.id),
  draftsEmpty: shown('#drafts-empty'),
};"#;

fn probe(s: &Session) -> Value {
    s.execute(PROBE, json!([]))
}

/// Polls the page until `ok` holds, failing with the last state seen.
fn wait_page(s: &Session, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_page_for(s, Duration::from_secs(20), what, ok)
}

fn wait_page_for(s: &Session, limit: Duration, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let page = probe(s);
        if ok(&page) {
            return page;
        }
        assert!(std::time::Instant::now() < deadline, "waited {limit:?} for {what}; the page shows {page:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn testid(s: &Session, el: &webdriver::Element) -> String {
    s.attribute(el, "data-testid").or_else(|| s.attribute(el, "id")).unwrap_or_else(|| s.property(el, "tagName").to_string())
}

/// Console errors since the last call, except the resource loads a test made fail on purpose.
fn console_errors(s: &Session, expected_statuses: &[u16]) -> Vec<Value> {
    s.console()
        .into_iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter(|e| {
            let m = e["message"].as_str().unwrap_or_default();
            !expected_statuses.iter().any(|st| m.contains("Failed to load resource") && m.contains(&format!("status of {st}")))
        })
        .collect()
}

fn click(s: &Session, testid: &str) {
    s.click(&s.get(&format!("[data-testid=\"{testid}\"]")));
}

fn open_from_queue(s: &Session, id: &str) {
    let item = s.get(&format!("[data-testid=\"queue-item\"][data-id=\"{id}\"]"));
    s.click(&item);
}

fn enter_key(s: &Session, key: &str) {
    let field = s.get("[data-testid=\"agent-key\"]");
    s.send_keys(&field, &format!("{key}{ENTER}"));
}

fn assert_served_under_csp(resp: &HttpResponse) {
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(resp.header("content-security-policy"), Some(web::CONTENT_SECURITY_POLICY), "the chat page's CSP");
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(resp.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(resp.header("x-frame-options"), Some("DENY"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_console_is_served_self_contained_under_the_csp() {
    let server = start_unloaded_server(ServeConfig::default()).await;

    // No key needed for the page and its assets; the API behind it needs the agent key.
    let page = server.get("/agent").await;
    assert_served_under_csp(&page);
    let html = page.text();
    assert!(!html.contains("http://") && !html.contains("https://"), "the page refers to another site:\n{html}");
    assert!(!html.contains("<script>") && !html.contains("style=\"") && !html.contains("<style"), "inline script or style: {html}");
    for needle in [
        "<main",
        "<label for=\"agent-key\"",
        "type=\"password\"",
        "role=\"status\"",
        "aria-live=\"polite\"",
        "role=\"alert\"",
        "data-testid=\"queue\"",
        "data-testid=\"queue-filter\"",
        "data-testid=\"draft\"",
        "data-testid=\"send\"",
        "data-testid=\"summarize\"",
        "data-testid=\"kb-draft\"",
        "data-testid=\"takeover\"",
        "data-testid=\"resolve\"",
        "data-testid=\"kb-drafts\"",
    ] {
        assert!(html.contains(needle), "the page lacks {needle}");
    }

    // Exactly one script and one stylesheet, each named with a content hash.
    let mut assets = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            let url = &rest[..rest.find('"').unwrap()];
            if url.starts_with("/assets/") {
                assets.push(url.to_string());
            }
        }
    }
    assets.sort();
    assert_eq!(assets.len(), 2, "{assets:?}");
    for (url, path, content_type) in
        [(&assets[0], agent_page::CSS_PATH, "text/css; charset=utf-8"), (&assets[1], agent_page::JS_PATH, "text/javascript; charset=utf-8")]
    {
        let (bare, version) = url.split_once("?v=").unwrap_or_else(|| panic!("{url} carries no version"));
        assert_eq!(bare, path);
        assert!(version.len() == 12 && version.bytes().all(|b| b.is_ascii_hexdigit()), "{url}");
        let resp = server.get(url).await;
        assert_eq!(resp.status, 200, "{url}");
        assert_eq!(resp.header("content-type"), Some(content_type), "{url}");
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"), "{url}");
        assert_eq!(resp.header("cache-control"), Some("public, max-age=31536000, immutable"), "{url}");
        assert_eq!(server.get(bare).await.header("cache-control"), Some("no-cache"), "{bare}");
        assert_eq!(server.get(&format!("{bare}?v=000000000000")).await.header("cache-control"), Some("no-cache"), "a stale version");
        let text = resp.text();
        assert!(text.len() > 1000, "{url} looks empty");
        assert!(!text.contains("http://") && !text.contains("https://"), "{url} refers to another site");
        if path == agent_page::JS_PATH {
            assert!(!text.contains("innerHTML") && !text.contains("insertAdjacentHTML"), "server text must only become text nodes");
            assert!(text.contains("sessionStorage") && !text.contains("localStorage"), "the key lives in the tab only");
        }
    }
    // A distinct hash from the chat page's, so neither page's cache outlives the other's change.
    let chat = server.get("/").await.text();
    assert!(!chat.contains(&assets[1]) && !chat.contains(&assets[0]));

    assert_eq!(server.get("/v1/conversations?status=handed_off").await.status, 401, "the queue needs the agent key");
    assert_eq!(server.agent_get("/v1/conversations?status=handed_off").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_answers_a_handed_off_conversation_in_a_browser() {
    webdriver::require_browser();
    let _one = BROWSER.lock().await;
    // Approving a KB draft writes into the docs directory: a copy, indexed on its own.
    let tmp = tempfile::tempdir().unwrap();
    let (docs, index) = (tmp.path().join("docs"), tmp.path().join("index"));
    copy_tree(&support::root().join("docs-corpus"), &docs);
    build_index(&support::index_options(&docs.clone(), &index.clone())).expect("the copy indexes");
    let mut cfg = ServeConfig::default();
    cfg.grounding.docs_dir = docs.clone();
    cfg.grounding.index_dir = index.clone();
    let server = start_server(cfg).await;
    server.state.set_knowledge(support::open_kb(&index).unwrap());
    seed(&server).await;
    let base = server.base_url.clone();

    let (driver, s) = blocking(move || {
        let driver = ChromeDriver::start();
        let s = driver.session();
        s.goto(&format!("{base}/agent"));

        // Without a key: the page and its styles load, nothing is fetched, the console is clean.
        let page = wait_page(&s, "the page to start", |p| p["status"].as_str().is_some_and(|t| t.contains("agent key")));
        assert_eq!(page["queue"], json!([]), "{page:#}");
        assert_eq!(page["open"], false);
        assert_eq!(s.css(&s.get("header.site-header"), "background-color"), "rgba(11, 93, 107, 1)", "agent.css applies under the CSP");
        assert_eq!(console_errors(&s, &[]), Vec::<Value>::new());

        // The key: the handed-off queue, with reason, customer, sentiment and age.
        enter_key(&s, AGENT_KEY);
        let page = wait_page(&s, "the handoff queue", |p| p["queue"].as_array().is_some_and(|q| !q.is_empty()));
        assert_eq!(page["key"], AGENT_KEY, "kept in sessionStorage");
        assert!(page["keyState"].as_str().unwrap().contains("Key set"), "{page:#}");
        let queue = page["queue"].as_array().unwrap();
        assert_eq!(queue.len(), 1, "only the handed-off conversation: {page:#}");
        let item = &queue[0];
        assert_eq!(item["id"], CONV);
        assert_eq!(item["reason"], "customer_request");
        assert_eq!(item["customer"], "cust-42 · account acct-7 · pro · en");
        assert_eq!(item["sentiment"], "negative", "from the handoff summary: {item}");
        assert!(item["text"].as_str().unwrap().contains("just now"), "{item}");

        // The filter: open conversations, then back to the handoff queue.
        s.execute("const f = document.getElementById('queue-filter'); f.value = 'open'; f.dispatchEvent(new Event('change'));", json!([]));
        wait_page(&s, "the open conversations", |p| p["queue"].as_array().is_some_and(|q| q.len() == 1 && q[0]["id"] == OPEN_CONV));
        s.execute("const f = document.getElementById('queue-filter'); f.value = ''; f.dispatchEvent(new Event('change'));", json!([]));
        wait_page(&s, "all conversations", |p| p["queue"].as_array().is_some_and(|q| q.len() == 2));
        s.execute("const f = document.getElementById('queue-filter'); f.value = 'handed_off'; f.dispatchEvent(new Event('change'));", json!([]));
        wait_page(&s, "the handoff queue again", |p| p["queue"].as_array().is_some_and(|q| q.len() == 1 && q[0]["id"] == CONV));

        // The conversation: every turn, the citation link, the guard outcomes, the handoff summary.
        open_from_queue(&s, CONV);
        let page = wait_page(&s, "the conversation", |p| p["open"] == true && p["turns"].as_array().is_some_and(|t| t.len() == 4));
        assert_eq!(page["title"], format!("Conversation {CONV}"));
        assert_eq!(page["convStatus"], "Handed off");
        assert_eq!(page["queue"][0]["current"], true, "the open conversation is marked in the queue");
        let turns = page["turns"].as_array().unwrap();
        let roles: Vec<&str> = turns.iter().map(|t| t["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["customer", "bot", "customer", "bot"]);
        assert_eq!(turns[0]["text"], FIRST_MESSAGE, "customer text shown as typed");
        assert_eq!(page["markupInTurns"], 0, "stored text never becomes markup");
        assert_eq!(turns[1]["citations"], json!([CITATION_URL]));
        assert_eq!(turns[1]["guardAction"], "none");
        assert!(turns[1]["guard"].as_str().unwrap().contains("no_refund_promises, citations"), "{}", turns[1]);
        assert_eq!(turns[3]["guardAction"], "handoff");
        let guard = turns[3]["guard"].as_str().unwrap();
        assert!(guard.contains("rules fired: human_request") && guard.contains("reason: human_request"), "{guard}");
        assert_eq!(page["handoffReason"], "customer_request");
        assert_eq!(page["handoffSentiment"], "negative");
        let handoff = page["handoff"].as_str().unwrap();
        assert!(handoff.contains("I was charged twice"), "the issue: {handoff}");
        assert!(handoff.contains("Refund policy"), "docs cited: {handoff}");
        assert!(handoff.contains("answered") && handoff.contains("handoff"), "what was tried: {handoff}");
        let link = s.get("a[data-testid=\"turn-citation\"]");
        assert_eq!(s.attribute(&link, "rel").as_deref(), Some("noopener"));
        assert_eq!(console_errors(&s, &[]), Vec::<Value>::new());

        // Send: the reply becomes an agent turn and the box empties.
        let reply = s.get("[data-testid=\"reply\"]");
        s.send_keys(&reply, "Hi, I'm Sam from billing. I have refunded the duplicate charge.");
        click(&s, "send");
        let page = wait_page(&s, "the agent turn", |p| p["turns"].as_array().is_some_and(|t| t.len() == 5));
        assert_eq!(page["turns"][4]["role"], "agent");
        assert_eq!(page["turns"][4]["text"], "Hi, I'm Sam from billing. I have refunded the duplicate charge.");
        assert_eq!(page["reply"], "");
        assert!(page["status"].as_str().unwrap().contains("Reply sent"), "{page:#}");
        (driver, s)
    })
    .await;

    let stored = server.agent_get(&format!("/v1/conversations/{CONV}")).await.json();
    let last = &stored["turns"][4];
    assert_eq!(last["role"], "agent", "{stored:#}");
    assert_eq!(last["content"], "Hi, I'm Sam from billing. I have refunded the duplicate charge.");
    assert_eq!(last["state"], "complete");

    let (driver, s, draft_id) = blocking(move || {
        // Draft reply: the assist route's draft lands in the editable box, nothing else is touched.
        click(&s, "draft");
        let page = wait_page_for(&s, Duration::from_secs(120), "a reply draft", |p| {
            !p["reply"].as_str().unwrap_or_default().is_empty() || !p["error"].is_null()
        });
        assert!(page["error"].is_null(), "{page:#}");
        assert!(page["draftExtra"].is_string(), "the draft's outline, sources and checks are shown: {page:#}");
        assert_eq!(page["turns"].as_array().unwrap().len(), 5, "a draft is not sent");
        assert_eq!(testid(&s, &s.active_element()), "reply", "the draft is ready to edit");
        s.execute("document.getElementById('reply').value = ''", json!([]));

        // KB draft from the agent's answer, listed under KB drafts; Approve publishes it.
        click(&s, "kb-draft");
        let page = wait_page_for(&s, Duration::from_secs(60), "the KB draft", |p| {
            (!p["kb"].is_null() && p["drafts"].as_array().is_some_and(|d| d.len() == 1)) || !p["error"].is_null()
        });
        assert!(page["error"].is_null(), "{page:#}");
        let markdown = page["kbMarkdown"].as_str().unwrap();
        assert!(markdown.contains("status: draft") && markdown.contains("I have refunded the duplicate charge"), "{markdown}");
        let draft_id = page["drafts"][0].as_str().unwrap().to_string();
        click(&s, "approve");
        let page = wait_page_for(&s, Duration::from_secs(120), "the approval", |p| {
            (p["drafts"] == json!([]) && p["status"].as_str().is_some_and(|t| t.contains("Approved"))) || !p["error"].is_null()
        });
        assert!(page["error"].is_null(), "{page:#}");
        assert!(page["status"].as_str().unwrap().contains("searchable now"), "{page:#}");
        assert_eq!(testid(&s, &s.active_element()), "drafts-refresh", "focus stays in the drafts panel");
        (driver, s, draft_id)
    })
    .await;
    let drafts = server.agent_get("/v1/kb/drafts").await.json();
    assert!(drafts["data"].as_array().unwrap().iter().all(|d| d["id"] != draft_id.as_str()), "{drafts:#}");
    assert_eq!(server.get(&format!("/kb/{draft_id}")).await.status, 200, "the approved article is served");
    assert!(!docs.join(format!("drafts/{draft_id}.md")).exists());

    blocking(move || {
        let _driver = driver;
        // Keyboard only, from the top: the key field, the queue item, the buttons, each with a ring.
        // (Focus put on the first element by script, so the walk starts at the top of the page.)
        s.execute("document.querySelector('.skip-link').focus()", json!([]));
        let mut order = Vec::new();
        for _ in 0..60 {
            s.press(TAB);
            let el = s.active_element();
            let id = testid(&s, &el);
            let outline = s.css(&el, "outline-style");
            assert_eq!(outline, "solid", "focus is visible on {id}");
            order.push(id.clone());
            if id == "send" {
                break;
            }
        }
        let at = |name: &str| order.iter().position(|o| o == name).unwrap_or_else(|| panic!("Tab never reached {name}: {order:?}"));
        assert!(at("agent-key") < at("queue-item"), "{order:?}");
        assert!(at("queue-item") < at("takeover"), "{order:?}");
        for name in ["queue-filter", "queue-refresh", "summarize", "kb-draft", "resolve", "draft", "reply", "send"] {
            at(name);
        }
        // Enter on a focused queue item opens it, with focus moved to the conversation.
        s.execute("document.querySelector('[data-testid=\"queue-item\"]').focus()", json!([]));
        s.press(ENTER);
        s.wait_for(Duration::from_secs(10), "focus on the conversation", |s| (testid(s, &s.active_element()) == "conversation").then_some(()));

        assert_eq!(console_errors(&s, &[]), Vec::<Value>::new());

        // A wrong key: said so, the key dropped, focus in the key field.
        click(&s, "forget-key");
        let page = wait_page(&s, "the key forgotten", |p| p["key"].is_null() && p["open"] == false);
        assert_eq!(page["queue"], json!([]), "nothing fetched with the key stays on screen");
        enter_key(&s, "not-the-agent-key-0123456789");
        let page = wait_page(&s, "the key error", |p| !p["error"].is_null());
        let error = page["error"].as_str().unwrap();
        assert!(error.contains("Enter a valid agent key") && error.contains("not accepted"), "{error}");
        assert!(page["key"].is_null(), "a refused key is not kept");
        assert_eq!(testid(&s, &s.active_element()), "agent-key");
        assert_eq!(page["queue"], json!([]));
        assert_eq!(console_errors(&s, &[401]), Vec::<Value>::new());
    })
    .await;
}

// ---- the assist buttons against stand-ins for the assist and KB routes

#[derive(Clone, Default)]
struct Assist {
    /// Bodies of the draft requests.
    draft_bodies: Arc<Mutex<Vec<Value>>>,
    /// The next draft request fails with a 503 (then this clears).
    fail_next_draft: Arc<AtomicBool>,
    /// KB drafts waiting for approval.
    kb: Arc<Mutex<Vec<Value>>>,
}

fn unavailable() -> Response {
    let body = json!({"error": {"message": "the model is busy", "type": "server_error", "code": "overloaded", "param": null}});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn stand_in_draft(State(a): State<Assist>, Json(body): Json<Value>) -> Response {
    a.draft_bodies.lock().unwrap().push(body.clone());
    if a.fail_next_draft.swap(false, Ordering::SeqCst) {
        return unavailable();
    }
    Json(json!({
        "draft": "Hello <b>there</b>, your duplicate charge is refunded [1].",
        "citations": [
            {"index": 1, "doc_id": "refund-policy", "title": "Refund policy", "section": "Duplicate charges", "url": CITATION_URL},
            {"index": 2, "doc_id": "x", "title": "Not a link", "url": "javascript:alert(1)"}
        ],
        "history_summary": "The customer was charged twice <i>and</i> asked for a person.",
        "outline": ["Apologise for the <em>double</em> charge", "Confirm the refund"],
        "guard": {"policy_version": "test-1", "action": "none", "rules": []},
        "grounding": {"status": "grounded", "passages": [{}]}
    }))
    .into_response()
}

async fn stand_in_summary(Json(body): Json<Value>) -> Response {
    assert_eq!(body["conversation_id"], CONV);
    Json(json!({
        "text": "Charged twice; asked for a person.",
        "summary": {"issue": "Duplicate charge", "steps": ["Bot cited the refund policy", "Handed off"], "outcome": "Refunded",
                    "open_questions": ["Was the card charged a third time?"]}
    }))
    .into_response()
}

async fn stand_in_kb_draft(State(a): State<Assist>, Json(body): Json<Value>) -> Response {
    assert_eq!(body["conversation_id"], CONV);
    let draft = json!({"id": "kb-double-charge", "path": "drafts/double-charge.md", "status": "draft", "title": "Double charges",
                       "markdown": "# Double charges\n\n<script>alert(1)</script> Refunds take 5 days."});
    a.kb.lock().unwrap().push(draft.clone());
    Json(draft).into_response()
}

async fn stand_in_kb_list(State(a): State<Assist>) -> Response {
    Json(json!({"object": "list", "data": a.kb.lock().unwrap().clone()})).into_response()
}

async fn stand_in_approve(State(a): State<Assist>, Path(id): Path<String>) -> Response {
    a.kb.lock().unwrap().retain(|d| d["id"] != id.as_str());
    let index = json!({"index": {"index_version": "v7", "documents": 31, "passages": 120}, "changed": true});
    Json(json!({"id": id, "status": "approved", "path": "billing/kb-double-charge.md", "searchable": true, "index": index})).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assist_buttons_and_failures_in_a_browser() {
    webdriver::require_browser();
    let _one = BROWSER.lock().await;
    // The console and the real conversation routes (no auth layer: any key passes), with the
    // assist and KB routes played by stand-ins; no model.
    let state = AppState::new(ServeConfig::default());
    let assist = Assist::default();
    let stand_ins = Router::new()
        .route("/v1/assist/draft", post(stand_in_draft))
        .route("/v1/assist/summarize", post(stand_in_summary))
        .route("/v1/assist/kb-draft", post(stand_in_kb_draft))
        .route("/v1/kb/drafts", get(stand_in_kb_list))
        .route("/v1/kb/{id}/approve", post(stand_in_approve))
        .with_state(assist.clone());
    let app = Router::new()
        .merge(agent_page::routes())
        .merge(conversations::routes())
        .merge(helpline::server::actions::routes())
        .with_state(state.clone())
        .merge(stand_ins);
    let server = serve_app(app, state).await;
    seed(&server).await;
    let base = server.base_url.clone();

    blocking(move || {
        let driver = ChromeDriver::start();
        let s = driver.session();
        s.goto(&format!("{base}/agent"));
        enter_key(&s, "any-key-will-do-here-0123");
        let page = wait_page(&s, "the queue", |p| p["queue"].as_array().is_some_and(|q| q.len() == 1));
        assert_eq!(page["draftsEmpty"], "No drafts waiting for approval.");
        open_from_queue(&s, CONV);
        wait_page(&s, "the conversation", |p| p["turns"].as_array().is_some_and(|t| t.len() == 4));

        // A failed draft: the error with Try again, and the agent's own words untouched.
        let reply = s.get("[data-testid=\"reply\"]");
        s.send_keys(&reply, "My own words");
        s.send_keys(&s.get("[data-testid=\"draft-note\"]"), "mention the 5 days");
        assist.fail_next_draft.store(true, Ordering::SeqCst);
        click(&s, "draft");
        let page = wait_page(&s, "the draft failure", |p| !p["error"].is_null());
        let error = page["error"].as_str().unwrap();
        assert!(error.contains("503") && error.contains("the model is busy"), "{error}");
        assert_eq!(page["retry"], true);
        assert_eq!(page["reply"], "My own words", "nothing typed is lost");

        // Try again: the draft in the editable box, its outline and sources; the agent's text kept aside.
        click(&s, "retry");
        let page = wait_page(&s, "the draft", |p| p["reply"].as_str().is_some_and(|r| r.starts_with("Hello")));
        assert!(page["error"].is_null(), "the error clears: {page:#}");
        assert_eq!(page["reply"], "Hello <b>there</b>, your duplicate charge is refunded [1].");
        assert_eq!(page["restore"], true);
        let extra = page["draftExtra"].as_str().unwrap();
        assert!(extra.contains("Apologise for the <em>double</em> charge") && extra.contains("Confirm the refund"), "{extra}");
        assert!(extra.contains("charged twice <i>and</i>"), "{extra}");
        assert_eq!(page["markupInDraft"], 0);
        assert_eq!(page["draftCitations"], json!([CITATION_URL, null]), "a javascript: URL is not a link");
        click(&s, "restore");
        let page = wait_page(&s, "the agent's own text", |p| p["reply"] == "My own words");
        assert_eq!(page["restore"], false);

        // A reply the server refuses (too long) stays in the box, with the server's reason.
        s.execute("document.getElementById('reply').value = 'x'.repeat(8001)", json!([]));
        click(&s, "send");
        let page = wait_page(&s, "the refusal", |p| !p["error"].is_null());
        let error = page["error"].as_str().unwrap();
        assert!(error.contains("422") && error.contains("8000 characters"), "{error}");
        assert_eq!(page["reply"].as_str().unwrap().len(), 8001);
        s.execute("document.getElementById('reply').value = ''", json!([]));
        s.send_keys(&reply, "Refunded; it shows within 5 days.");
        s.send_keys(&reply, "\u{E009}\u{E007}\u{E000}"); // Ctrl+Enter sends
        let page = wait_page(&s, "the agent turn", |p| p["turns"].as_array().is_some_and(|t| t.len() == 5));
        assert_eq!(page["turns"][4]["role"], "agent");
        assert_eq!(page["reply"], "");

        click(&s, "summarize");
        let page = wait_page(&s, "the summary", |p| !p["summary"].is_null());
        let summary = page["summary"].as_str().unwrap();
        for part in ["Charged twice; asked for a person.", "Duplicate charge", "Bot cited the refund policy", "Refunded", "third time"] {
            assert!(summary.contains(part), "{part} in {summary}");
        }

        // KB draft: shown as text, listed for approval; Approve takes it off the list.
        click(&s, "kb-draft");
        let page = wait_page(&s, "the KB draft", |p| !p["kb"].is_null() && p["drafts"].as_array().is_some_and(|d| d.len() == 1));
        assert_eq!(page["kbMarkdown"], "# Double charges\n\n<script>alert(1)</script> Refunds take 5 days.");
        assert!(page["kb"].as_str().unwrap().contains("drafts/double-charge.md"), "{page:#}");
        assert_eq!(page["drafts"], json!(["kb-double-charge"]));
        click(&s, "approve");
        let page = wait_page(&s, "the approval", |p| p["drafts"] == json!([]) && p["status"].as_str().is_some_and(|t| t.contains("Approved")));
        let status = page["status"].as_str().unwrap();
        for part in ["Approved Double charges", "billing/kb-double-charge.md", "searchable now", "Index version v7, 31 articles"] {
            assert!(status.contains(part), "{part} in {status}");
        }

        // Resolve: the conversation leaves the handoff queue. Take over: an open one joins it.
        click(&s, "resolve");
        let page = wait_page(&s, "the resolution", |p| p["convStatus"] == "Resolved" && p["queue"] == json!([]));
        assert!(page["error"].is_null(), "{page:#}");
        s.execute("const f = document.getElementById('queue-filter'); f.value = 'open'; f.dispatchEvent(new Event('change'));", json!([]));
        wait_page(&s, "the open conversation", |p| p["queue"].as_array().is_some_and(|q| q.len() == 1 && q[0]["id"] == OPEN_CONV));
        open_from_queue(&s, OPEN_CONV);
        let page = wait_page(&s, "the other conversation", |p| p["title"] == format!("Conversation {OPEN_CONV}"));
        assert_eq!(page["reply"], "", "the reply box belongs to its conversation");
        assert!(page["summary"].is_null() && page["kb"].is_null(), "assist results of another conversation are cleared");
        click(&s, "takeover");
        let page = wait_page(&s, "the takeover", |p| p["convStatus"] == "Handed off");
        assert_eq!(page["handoffReason"], "agent_takeover");
        assert_eq!(console_errors(&s, &[503, 422]), Vec::<Value>::new());
    })
    .await;

    let bodies = assist.draft_bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[0], json!({"conversation_id": CONV, "note": "mention the 5 days"}));
    assert_eq!(bodies[1], bodies[0], "Try again sends the same request");
}
