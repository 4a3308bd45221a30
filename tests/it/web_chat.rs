//! The customer chat page: served self-contained under a strict CSP; the article view citations
//! link to; and the page itself in a real headless Chromium: against scripted streams (every error
//! class, hostile model text), against the real router without a model (API key, 503, network
//! loss), and end to end against the real model and the real docs-corpus index.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt;
use helpline::config::ServeConfig;
use helpline::server::{auth, web, AppState};
use serde_json::{json, Value};

use crate::server_support::{serve_app, serve_state, start_grounded_server, start_unloaded_server, HttpResponse, TestServer};
use crate::support;
use crate::webdriver::{self, ChromeDriver, Session, ENTER, TAB};

const REQUIRED_CSP: [&str; 6] =
    ["default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "img-src 'self' data:", "frame-ancestors 'none'"];

/// One browser at a time: each is a few hundred MB and a core's worth of start-up. (A tokio
/// mutex: the guard is held across awaits, and every test has its own runtime.)
pub static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs browser steps on a blocking thread (the test server keeps running meanwhile); a failed
/// assertion in them fails the test with its own message.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("browser steps did not finish: {e}"),
    }
}

fn assert_html_page(resp: &HttpResponse, status: u16) {
    assert_eq!(resp.status, status, "{}", resp.text());
    assert_eq!(resp.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = resp.header("content-security-policy").expect("a Content-Security-Policy");
    for directive in REQUIRED_CSP {
        assert!(csp.split(';').any(|d| d.trim() == directive), "CSP lacks {directive:?}: {csp}");
    }
    assert_eq!(resp.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(resp.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(resp.header("cache-control"), Some("no-cache"));
}

/// The `/assets/...` URLs the page's `src` and `href` attributes name.
fn asset_urls(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            let url = &rest[..rest.find('"').unwrap()];
            if url.starts_with("/assets/") {
                out.push(url.to_string());
            }
        }
    }
    out
}

/// The real router with the real knowledge base and no model (article pages need no model).
async fn knowledge_server(cfg: ServeConfig) -> TestServer {
    let state = AppState::new(cfg);
    state.set_knowledge(support::knowledge().1.clone());
    serve_state(state).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_page_is_self_contained_and_locked_down() {
    let mut cfg = ServeConfig::default();
    cfg.grounding.handoff_message = "Call <script>alert('x')</script> & ask for \"Sam\" {{js_url}}".into();
    let server = start_unloaded_server(cfg).await;

    let page = server.get("/").await;
    assert_html_page(&page, 200);
    let html = page.text();
    assert!(html.contains("Call &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; ask for &quot;Sam&quot; {{js_url}}"), "{html}");
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://"), "the page refers to another site:\n{html}");
    for needle in [
        "<main",
        "role=\"log\"",
        "aria-live=\"polite\"",
        "<label for=\"message\"",
        "<textarea id=\"message\"",
        "data-testid=\"message-input\"",
        "data-testid=\"send\"",
        "data-testid=\"talk-to-human\"",
        "data-testid=\"handoff-panel\"",
    ] {
        assert!(html.contains(needle), "the page lacks {needle}");
    }
    assert!(!html.contains("<script>") && !html.contains("style=\""), "inline script or style would be blocked by the CSP");

    let assets = asset_urls(&html);
    assert_eq!(assets.len(), 2, "one script and one stylesheet: {assets:?}");
    for url in &assets {
        let resp = server.get(url).await;
        assert_eq!(resp.status, 200, "{url}");
        let expected = if url.contains(".js") { "text/javascript; charset=utf-8" } else { "text/css; charset=utf-8" };
        assert_eq!(resp.header("content-type"), Some(expected), "{url}");
        assert_eq!(resp.header("x-content-type-options"), Some("nosniff"), "{url}");
        // Versioned URLs are immutable; the same path without the current version is revalidated.
        assert_eq!(resp.header("cache-control"), Some("public, max-age=31536000, immutable"), "{url}");
        let bare = url.split('?').next().unwrap();
        assert_eq!(server.get(bare).await.header("cache-control"), Some("no-cache"), "{bare}");
        let text = resp.text();
        assert!(text.len() > 500, "{url} looks empty");
        assert!(!text.contains("http://") && !text.contains("https://"), "{url} refers to another site");
    }
    let js = server.get(&assets.iter().find(|u| u.contains(".js")).unwrap().clone()).await.text();
    assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML"), "model text must only ever become text nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn article_pages_show_approved_documents_only() {
    let server = knowledge_server(ServeConfig::default()).await;

    let page = server.get("/kb/refund-policy").await;
    assert_html_page(&page, 200);
    let html = page.text();
    assert!(html.contains("<h1>Refund policy</h1>"), "{html}");
    assert!(html.contains("<time datetime=\"2026-02-01\">2026-02-01</time>"), "{html}");
    assert!(html.contains("<section class=\"chunk\" id=\"refund-policy-0\">"), "{html}");
    assert!(html.contains("<h2>Annual plans</h2>"), "{html}");
    assert!(html.contains("pro-rated refund"), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://"), "{html}");
    // Every section id is one a citation can name: `{doc_id}-{n}` with n counting chunks from 0.
    let ids: Vec<&str> =
        html.match_indices("id=\"refund-policy-").map(|(i, _)| &html[i + 4..][..html[i + 4..].find('"').unwrap()]).collect();
    let expected: Vec<String> = (0..ids.len()).map(|n| format!("refund-policy-{n}")).collect();
    assert_eq!(ids, expected);

    for gone in ["refund-policy-2024", "support-fee-waivers-draft", "no-such", "..%2F..%2Fetc%2Fpasswd"] {
        let resp = server.get(&format!("/kb/{gone}")).await;
        assert_html_page(&resp, 404);
        assert!(resp.text().contains("We could not find that article"), "{gone}: {}", resp.text());
        assert!(!resp.text().contains("We want you to love Tallyworks"), "retired text leaked for {gone}");
    }

    // No index open: a 503 page, without the operator's paths in it.
    let bare = start_unloaded_server(ServeConfig::default()).await;
    let resp = bare.get("/kb/refund-policy").await;
    assert_html_page(&resp, 503);
    assert!(!resp.text().contains("docs-corpus") && !resp.text().contains("helpline index"), "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_without_an_api_key_but_the_api_needs_one() {
    let cfg = ServeConfig { api_key_hashes: vec![auth::digest("web-page-key-0123456789")], ..Default::default() };
    let server = knowledge_server(cfg).await;
    let html = server.get("/").await;
    assert_html_page(&html, 200);
    for url in asset_urls(&html.text()) {
        assert_eq!(server.get(&url).await.status, 200, "{url}");
    }
    assert_html_page(&server.get("/kb/refund-policy").await, 200);
    let chat = server.post_json("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(chat.status, 401);
}

// ---- the page in a browser

/// What the page shows of assistant answer number `index` (0 = the first answer) and around it.
const ANSWER_PROBE: &str = r#"
const m = document.querySelectorAll('[data-testid="assistant-message"]')[arguments[0]];
if (!m) return null;
const one = (sel) => { const e = m.querySelector(sel); return e ? e.textContent : null; };
return {
  state: m.dataset.state || '',
  grounding: m.dataset.grounding || '',
  refusalStyled: m.classList.contains('refusal'),
  text: m.querySelector('.text').textContent,
  htmlElementsInText: m.querySelector('.text').querySelectorAll(':not(.cite)').length,
  markers: [...m.querySelectorAll('.text a.cite')].map((a) => a.getAttribute('href')),
  citations: [...m.querySelectorAll('[data-testid="citation"]')].map((a) => a.getAttribute('href')),
  citationRels: [...m.querySelectorAll('a[data-testid="citation"]')].map((a) => a.rel),
  sources: one('.sources'),
  refusal: one('[data-testid="refusal"]'),
  error: one('[data-testid="error"]'),
  busy: one('[data-testid="busy"]'),
  note: one('.note'),
  retry: !!m.querySelector('[data-testid="retry"]'),
  sendDisabled: document.getElementById('send').disabled,
  stopShown: !document.getElementById('stop').hidden,
  typingShown: !document.getElementById('typing').hidden,
  input: document.getElementById('message').value,
};"#;

fn answer(s: &Session, index: usize) -> Option<Value> {
    let v = s.execute(ANSWER_PROBE, json!([index]));
    (!v.is_null()).then_some(v)
}

/// What was seen while answer `index` was in progress, and how it ended.
pub struct Observed {
    pub last: Value,
    /// Streaming with some text already shown (tokens arrive incrementally).
    #[allow(dead_code)]
    saw_partial: bool,
    /// The busy/starting-up note shown while waiting out a Retry-After.
    busy_note: Option<String>,
}

/// Polls answer `index` until it settles (`done`, `error` or `stopped`), checking the controls
/// while it streams.
pub fn wait_settled(s: &Session, index: usize, limit: Duration) -> Observed {
    let mut saw_partial = false;
    let mut busy_note = None;
    let last = s.wait_for(limit, &format!("answer {index} to finish"), |s| {
        let a = answer(s, index)?;
        match a["state"].as_str().unwrap_or_default() {
            "streaming" | "waiting" => {
                assert_eq!(a["sendDisabled"], true, "Send is disabled while answering: {a}");
                assert_eq!(a["stopShown"], true, "Stop is offered while answering: {a}");
                if a["state"] == "streaming" {
                    assert_eq!(a["typingShown"], true, "the typing indicator shows while streaming: {a}");
                    saw_partial |= !a["text"].as_str().unwrap_or_default().is_empty();
                }
                if let Some(b) = a["busy"].as_str() {
                    busy_note = Some(b.to_string());
                }
                None
            }
            _ => Some(a),
        }
    });
    Observed { last, saw_partial, busy_note }
}

fn answers(s: &Session) -> usize {
    s.find_all("[data-testid=\"assistant-message\"]").len()
}

fn testid_or_tag(s: &Session, el: &webdriver::Element) -> String {
    s.attribute(el, "data-testid").or_else(|| s.attribute(el, "id")).unwrap_or_else(|| s.property(el, "tagName").to_string())
}

/// Console errors (CSP violations, script errors, failed loads) since the last call.
pub fn console_errors(s: &Session) -> Vec<Value> {
    s.console().into_iter().filter(|e| e["level"] == "SEVERE").collect()
}

/// A stand-in for `/v1/chat/completions` that answers from a script, and records request bodies.
#[derive(Clone, Default)]
struct Scripted {
    replies: Arc<Mutex<VecDeque<Reply>>>,
    bodies: Arc<Mutex<Vec<Value>>>,
}

enum Reply {
    /// An error in the error table's shape, with headers.
    Error(StatusCode, Vec<(&'static str, &'static str)>, &'static str),
    /// An event stream sent in pieces of `piece` bytes, `gap` apart (cutting lines, JSON and
    /// UTF-8 sequences in the middle).
    Stream { text: String, piece: usize, gap: Duration },
}

async fn scripted_chat(State(script): State<Scripted>, body: Bytes) -> Response {
    script.bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    let next = script.replies.lock().unwrap().pop_front();
    match next {
        Some(Reply::Error(status, headers, message)) => {
            let body = json!({"error": {"message": message, "type": "server_error", "code": "scripted", "param": null}});
            let mut resp = (status, axum::Json(body)).into_response();
            for (k, v) in headers {
                resp.headers_mut().insert(k, v.parse().unwrap());
            }
            resp
        }
        Some(Reply::Stream { text, piece, gap }) => {
            let pieces: Vec<Bytes> = text.into_bytes().chunks(piece).map(Bytes::copy_from_slice).collect();
            let body = futures_util::stream::iter(pieces).then(move |p| async move {
                tokio::time::sleep(gap).await;
                Ok::<_, Infallible>(p)
            });
            ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
        }
        None => (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response(),
    }
}

fn sse(events: &[Value]) -> String {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

fn content(text: &str) -> Value {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
}

fn opening() -> Value {
    json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_survives_scripted_streams_in_a_browser() {
    webdriver::require_browser();
    let _one = BROWSER.lock().await;
    let state = AppState::new(ServeConfig::default());
    let script = Scripted::default();
    let answer_text = "Use <b>Settings</b> → Security [1] and [2], not [9]. <img src=x onerror=alert(1)>";
    let finish = json!({
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "helpline": {
            "timings": {},
            "grounding": {"status": "grounded", "passages": []},
            "citations": [
                {"index": 1, "chunk_id": "password-reset#1", "doc_id": "password-reset", "title": "Reset your Tallyworks password",
                 "section": "Reset it yourself", "snippet": "…", "score": 7.0, "url": "/kb/password-reset#password-reset-1"},
                {"index": 2, "chunk_id": "x#0", "doc_id": "x", "title": "Not a link", "section": "", "snippet": "", "score": 1.0,
                 "url": "javascript:alert(1)"}
            ]
        }
    });
    let mut first = sse(&[opening()]);
    first.push_str(": keep-alive\n\n");
    for piece in ["Use <b>Sett", "ings</b> → Security [1]", " and [2], not [9]. <img src=x onerror=alert(1)>"] {
        first.push_str(&sse(&[content(piece)]));
    }
    first.push_str(&sse(&[finish]));
    first.push_str("data: [DONE]\n\n");
    let mut broken = sse(&[opening(), content("Partial answer")]);
    broken.push_str(&sse(&[json!({"error": {"message": "the server failed to finish this answer", "type": "server_error",
        "code": "internal_error", "param": null}})]));
    let mut slow = sse(&[opening(), content("On mobile")]);
    slow.push_str(&": keep-alive\n\n".repeat(100));
    script.replies.lock().unwrap().extend([
        Reply::Error(StatusCode::TOO_MANY_REQUESTS, vec![("retry-after", "1")], "the queue is full"),
        Reply::Stream { text: first, piece: 23, gap: Duration::from_millis(15) },
        Reply::Stream { text: broken, piece: 40, gap: Duration::from_millis(15) },
        Reply::Stream { text: slow, piece: 64, gap: Duration::from_millis(300) },
    ]);
    let app = Router::new()
        .merge(web::routes())
        .with_state(state.clone())
        .merge(Router::new().route("/v1/chat/completions", post(scripted_chat)).with_state(script.clone()));
    let server = serve_app(app, state).await;
    let base = server.base_url.clone();

    let answer_text = answer_text.to_string();
    blocking(move || {
        let driver = ChromeDriver::start();
        let s = driver.session();
        s.goto(&format!("{base}/"));
        let input = s.get("[data-testid=\"message-input\"]");

        // Shift+Enter is a new line, not a send.
        s.send_keys(&input, "line one\u{E008}\u{E007}\u{E000}line two");
        assert_eq!(s.property(&input, "value"), "line one\nline two");
        assert_eq!(s.find_all("[data-testid=\"user-message\"]").len(), 0, "Shift+Enter must not send");
        s.execute("document.getElementById('message').value = ''", json!([]));

        // 429: "busy" while waiting out Retry-After, one automatic retry, then the streamed answer.
        s.send_keys(&input, &format!("How do I change my password?{ENTER}"));
        let seen = wait_settled(&s, 0, Duration::from_secs(30));
        let a = &seen.last;
        assert!(seen.busy_note.as_deref().is_some_and(|b| b.contains("busy")), "a busy note while waiting: {:?}", seen.busy_note);
        assert_eq!(a["state"], "done", "{a}");
        assert_eq!(a["text"], answer_text.as_str(), "model text is shown as typed, markup and all");
        assert_eq!(a["htmlElementsInText"], 0, "model text never becomes markup: {a}");
        assert_eq!(a["markers"], json!(["/kb/password-reset#password-reset-1"]), "only [1] links to a source: {a}");
        assert_eq!(a["citations"], json!(["/kb/password-reset#password-reset-1", null]), "a javascript: URL is not linked: {a}");
        assert_eq!(a["citationRels"], json!(["noopener"]));
        assert!(a["sources"].as_str().unwrap().contains("Reset your Tallyworks password › Reset it yourself"), "{a}");
        assert_eq!(a["input"], "", "the box is empty once the question went out");
        assert_eq!(a["sendDisabled"], false);
        assert_eq!(a["stopShown"], false);

        // A failure event mid-stream: said so in the conversation, partial text and the question kept.
        s.send_keys(&input, &format!("And on mobile?{ENTER}"));
        let a = wait_settled(&s, 1, Duration::from_secs(30)).last;
        assert_eq!(a["state"], "error", "{a}");
        let error = a["error"].as_str().unwrap();
        assert!(error.contains("interrupted") && error.contains("the server failed to finish this answer"), "{error}");
        assert_eq!(a["text"], "Partial answer");
        assert_eq!(a["retry"], true, "a Try again button: {a}");
        assert_eq!(a["input"], "And on mobile?", "nothing typed is lost");

        // Sent again with Enter; Stop ends a slow answer and keeps what arrived.
        s.send_keys(&input, ENTER);
        s.wait_for(Duration::from_secs(20), "the slow answer to start", |s| {
            answer(s, 2).filter(|a| a["text"] == "On mobile" && a["stopShown"] == true)
        });
        s.click(&s.get("[data-testid=\"stop\"]"));
        let a = wait_settled(&s, 2, Duration::from_secs(10)).last;
        assert_eq!(a["state"], "stopped", "{a}");
        assert_eq!(a["text"], "On mobile");
        assert_eq!(a["sendDisabled"], false);
        assert_eq!(testid_or_tag(&s, &s.active_element()), "message-input", "focus returns to the box after Stop");
    })
    .await;

    // The whole conversation goes with every question, as plain `messages`, streamed.
    let bodies = script.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 4, "{bodies:?}");
    let q1 = json!({"role": "user", "content": "How do I change my password?"});
    let q2 = json!({"role": "user", "content": "And on mobile?"});
    let a1 = json!({"role": "assistant", "content": "Use <b>Settings</b> → Security [1] and [2], not [9]. <img src=x onerror=alert(1)>"});
    assert_eq!(bodies[0], json!({"messages": [q1], "stream": true, "temperature": 0, "frequency_penalty": 0.5}));
    assert_eq!(bodies[1], bodies[0], "the automatic retry sends the same request");
    assert_eq!(bodies[2], json!({"messages": [q1, a1, q2], "stream": true, "temperature": 0, "frequency_penalty": 0.5}));
    assert_eq!(bodies[3], bodies[2], "a failed turn is not part of the history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_key_waits_for_the_model_and_reports_lost_connections() {
    webdriver::require_browser();
    let _one = BROWSER.lock().await;
    const KEY: &str = "web-chat-browser-key-0123456789";
    let cfg = ServeConfig { api_key_hashes: vec![auth::digest(KEY)], ..Default::default() };
    // No model: with the key, the API answers 503 (still loading) with Retry-After.
    let server = start_unloaded_server(cfg).await;
    let base = server.base_url.clone();

    let (driver, s) = blocking(move || {
        let driver = ChromeDriver::start();
        let s = driver.session();
        s.goto(&format!("{base}/"));
        let input = s.get("[data-testid=\"message-input\"]");
        let question = "Where are my invoices?";

        // 401: the server's message, a key field with focus, the question kept.
        s.send_keys(&input, &format!("{question}{ENTER}"));
        let a = wait_settled(&s, 0, Duration::from_secs(20)).last;
        assert_eq!(a["state"], "error", "{a}");
        assert!(a["error"].as_str().unwrap().contains("API key"), "{a}");
        assert_eq!(a["input"], question);
        let key_field = s.get("[data-testid=\"api-key\"]");
        assert!(s.displayed(&key_field), "the key form is shown");
        assert_eq!(s.active_element(), key_field, "focus moves to the key field");

        // The key is kept for the tab and the question goes again: 503, one wait, then a clear error.
        s.send_keys(&key_field, &format!("{KEY}{ENTER}"));
        let seen = wait_settled(&s, 0, Duration::from_secs(20));
        let a = &seen.last;
        assert!(seen.busy_note.as_deref().is_some_and(|b| b.contains("starting up")), "{:?} / {a}", seen.busy_note);
        assert_eq!(a["state"], "error", "{a}");
        assert!(a["error"].as_str().unwrap().contains("starting up"), "{a}");
        assert_eq!(a["retry"], true);
        assert_eq!(a["input"], question, "nothing typed is lost");
        assert!(!s.displayed(&key_field), "the key form is gone once a key is set");
        assert_eq!(s.execute("return sessionStorage.getItem('helpline.apiKey')", json!([])), KEY);
        (driver, s)
    })
    .await;

    server.shutdown().await;

    blocking(move || {
        let _driver = driver;
        s.click(&s.get("[data-testid=\"retry\"]"));
        let a = wait_settled(&s, 0, Duration::from_secs(20)).last;
        assert_eq!(a["state"], "error", "{a}");
        assert!(a["error"].as_str().unwrap().contains("Could not reach the support server"), "{a}");
        assert_eq!(a["input"], "Where are my invoices?");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_gets_a_cited_answer_and_a_way_to_a_human() {
    webdriver::require_browser();
    let _one = BROWSER.lock().await;
    let cfg = ServeConfig { default_max_tokens: 128, ..Default::default() };
    let handoff = cfg.grounding.handoff_message.clone();
    let server = start_grounded_server(cfg).await;
    let base = server.base_url.clone();

    blocking(move || {
        let driver = ChromeDriver::start();
        let s = driver.session();
        s.goto(&format!("{base}/"));

        // The stylesheet applied under the CSP (the brand colour is only in chat.css).
        assert_eq!(s.css(&s.get("header.site-header"), "background-color"), "rgba(11, 93, 107, 1)");
        let mut errors = console_errors(&s);

        // Keyboard only: Tab from the top reaches the message box, then Send, with a visible ring.
        let mut order = Vec::new();
        for _ in 0..12 {
            s.press(TAB);
            let id = testid_or_tag(&s, &s.active_element());
            order.push(id.clone());
            if id == "send" {
                break;
            }
        }
        let at = |name: &str| order.iter().position(|o| o == name);
        assert!(at("message-input").is_some() && at("message-input") < at("send"), "Tab order: {order:?}");
        assert_eq!(s.css(&s.active_element(), "outline-style"), "solid", "focus is visible on Send");

        // A question the docs answer: streamed, cited, each source a link into the article view.
        let input = s.get("[data-testid=\"message-input\"]");
        s.send_keys(&input, &format!("How do I reset my password?{ENTER}"));
        let seen = wait_settled(&s, 0, Duration::from_secs(90));
        let a = &seen.last;
        assert_eq!(a["state"], "done", "{a}");
        let text = a["text"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{a}");
        // An assembled answer arrives in pieces within milliseconds, so the page may never be
        // seen half-written; it must end with the article's steps.
        assert!(text.contains("Send reset link"), "the article's steps are quoted: {a}");
        assert_eq!(a["grounding"], "grounded", "{a}");
        assert_eq!(a["refusalStyled"], false, "{a}");
        let citations: Vec<&str> = a["citations"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(!citations.is_empty(), "at least one cited source: {a}");
        assert!(citations.iter().all(|c| c.starts_with("/kb/") || c.contains("/kb/")), "{citations:?}");

        // The cited passage, highlighted in its article.
        let href = citations[0];
        let url = if href.starts_with('/') { format!("{base}{href}") } else { href.to_string() };
        s.goto(&url);
        let target = s.execute(
            "const t = document.querySelector(':target'); \
             return t && {id: t.id, text: t.textContent.trim(), bg: getComputedStyle(t).backgroundColor, h1: document.querySelector('h1').textContent};",
            json!([]),
        );
        let fragment = href.split_once('#').map(|(_, f)| f).expect("citation URLs name a passage");
        assert_eq!(target["id"], fragment, "{target}");
        assert!(!target["text"].as_str().unwrap().is_empty(), "{target}");
        assert!(!target["h1"].as_str().unwrap().is_empty(), "{target}");
        assert_eq!(target["bg"], "rgb(255, 248, 214)", "the target passage is highlighted: {target}");
        errors.extend(console_errors(&s));

        // Back in the chat, in a new conversation (earlier turns also steer retrieval): a question
        // the docs do not cover is refused, with the way to a person.
        s.back();
        let input = s.wait_for(Duration::from_secs(10), "the chat page again", |s| s.find("[data-testid=\"message-input\"]"));
        s.click(&s.get("[data-testid=\"new-chat\"]"));
        assert_eq!(answers(&s), 0, "New chat clears the conversation");
        s.send_keys(&input, &format!("What is the capital of Mongolia?{ENTER}"));
        let a = wait_settled(&s, 0, Duration::from_secs(90)).last;
        assert_eq!(a["state"], "done", "{a}");
        assert_eq!(a["grounding"], "no_relevant_docs", "{a}");
        assert_eq!(a["refusalStyled"], true, "{a}");
        let refusal = a["refusal"].as_str().expect("a refusal note");
        assert!(refusal.contains(&handoff), "the refusal shows the handoff path: {refusal}");

        // A second question stays in the same conversation on the server.
        s.send_keys(&input, &format!("How do I reset my password?{ENTER}"));
        let a = wait_settled(&s, 1, Duration::from_secs(90)).last;
        assert_eq!(a["state"], "done", "{a}");

        // "Talk to a human" shows the configured handoff message, takes focus there, and hands
        // the conversation to a person through the handoff route.
        let panel = s.get("[data-testid=\"handoff-panel\"]");
        assert!(!s.displayed(&panel));
        s.click(&s.get("[data-testid=\"talk-to-human\"]"));
        assert!(s.displayed(&panel));
        assert!(s.text(&panel).contains(&handoff), "{}", s.text(&panel));
        assert_eq!(s.active_element(), panel);
        s.wait_for(Duration::from_secs(30), "the handoff to be confirmed", |s| {
            let st = s.execute("return document.querySelector('[data-testid=\"handoff-panel\"]').dataset.state || null;", json!([]));
            st.as_str().map(str::to_string)
        });
        let state = s.execute("return document.querySelector('[data-testid=\"handoff-panel\"]').dataset.state;", json!([]));
        assert_eq!(state, "handed_off", "{}", s.text(&panel));

        // The console is really read: a probe error shows up, and nothing else does.
        s.execute("console.error('console-probe')", json!([]));
        errors.extend(console_errors(&s));
        let probe = errors.iter().position(|e| e["message"].as_str().is_some_and(|m| m.contains("console-probe")));
        errors.remove(probe.expect("the console probe was logged"));
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    })
    .await;

    // The refused question and the follow-up are one conversation, now with a person; the
    // handoff summary holds both of the customer's messages.
    let list = server.agent_get("/v1/conversations?status=handed_off").await.json();
    let handed: Vec<&Value> = list["data"].as_array().unwrap().iter().collect();
    assert_eq!(handed.len(), 1, "{list}");
    assert_eq!(handed[0]["turns"], 4, "two questions and two answers in one conversation: {list}");
    assert_eq!(handed[0]["handoff"]["summary"]["customer_messages"], 2, "{list}");
    assert_eq!(handed[0]["handoff"]["by"], "customer", "{list}");
}
