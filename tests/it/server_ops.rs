//! The server's operational side over real sockets: config loading, auth, CORS, limits, fallbacks,
//! readiness, metrics, slow/oversized request heads, graceful shutdown of the real binary, and the
//! official `openai` Python client against it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpline::config::{self, ServeArgs, ServeConfig, Source};
use helpline::server::{self, auth, listen, AppState, SharedState};

use crate::support;

const KEY: &str = "ops-test-key-0123456789";
const FILE_KEY: &str = "ops-file-key-abcdefghij";

// ---------------------------------------------------------------------------------------------
// In-process server on 127.0.0.1:0

struct TestServer {
    addr: SocketAddr,
    state: SharedState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl TestServer {
    fn start(mut cfg: ServeConfig) -> TestServer {
        if cfg.access.admin_key_hashes.is_empty() {
            cfg.access.admin_key_hashes.push(helpline::server::auth::digest(crate::server_support::ADMIN_KEY));
        }
        cfg.shutdown_grace = cfg.shutdown_grace.min(Duration::from_secs(2));
        let state = AppState::new(cfg.clone());
        state.set_policy(crate::support::policy());
        let app = server::router(state.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Chat turns are stored: a SQLite store in a fresh directory, open before the first request.
        let data = tempfile::tempdir().unwrap();
        let mut conv = cfg.conversations.clone();
        conv.data_dir = data.path().to_path_buf();
        let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
        let store_state = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                server::conversations::open_with(&store_state, &conv).await.expect("open the conversation store");
                let _ = opened_tx.send(());
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                listen::serve(listener, app, &cfg, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        opened_rx.recv().expect("the store opened");
        TestServer { addr, state, stop: Some(tx), thread: Some(thread), _data: data }
    }

    fn start_loaded(cfg: ServeConfig) -> TestServer {
        let s = TestServer::start(cfg);
        load_model(&s.state);
        s
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The default model (weights shared across the tests of this binary) with its own engine, and
/// the real knowledge base (grounding is on by default).
fn load_model(state: &AppState) {
    state.set_loaded(crate::server_support::default_model(&state.config));
    state.set_knowledge(crate::support::knowledge().1.clone());
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client (one request per connection)

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The error table's shape: `{"error": {"message", "type", "code", "param"}}` with this status and code.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert!(self.header("content-type").unwrap_or("").starts_with("application/json"), "{self:?}");
        let v = self.json();
        let e = &v["error"];
        assert_eq!(e["code"], code, "{v}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some(), "{v}");
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// `/metrics` with the admin key.
fn metrics(addr: SocketAddr) -> Resp {
    get(addr, "/metrics", &[("Authorization", &bearer(crate::server_support::ADMIN_KEY))])
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    http(addr, "GET", path, headers, None)
}

fn parse_response(raw: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Resp { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A chat request answered by the model itself (grounding off): these tests are about serving.
fn chat_body(content: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Config

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load(args: &ServeArgs, env: &HashMap<String, String>) -> Result<ServeConfig, config::ConfigError> {
    config::load_with_env(None, 2, args, &|k| env.get(k).cloned())
}

fn write_file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn config_defaults_bind_loopback_without_auth_or_cors() {
    let cfg = load(&ServeArgs::default(), &HashMap::new()).unwrap();
    assert_eq!(cfg.host.to_string(), "127.0.0.1");
    assert_eq!(cfg.port, 8080);
    assert!(cfg.api_key_hashes.is_empty());
    assert!(cfg.cors_origins.is_empty());
    assert_eq!(cfg.model_id, "smollm2-135m-instruct");
    // Another address only when asked for.
    let cfg = load(&ServeArgs::default(), &env_of(&[("HELPLINE_HOST", "0.0.0.0")])).unwrap();
    assert_eq!(cfg.host.to_string(), "0.0.0.0");
}

#[test]
fn config_precedence_flag_env_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        &dir,
        "helpline.toml",
        "port = 7000\nmax_body_bytes = 4096\nqueue_capacity = 3\ncors_origin = [\"https://a.example\", \"http://localhost:3000\"]\n\
         header_read_timeout_secs = 4\nshutdown_grace_secs = 0\nmodel_id = \"support-bot\"\n",
    );
    let args = ServeArgs { config: Some(file.clone()), port: Some(7002), ..Default::default() };
    let env = env_of(&[("HELPLINE_PORT", "7001"), ("HELPLINE_MAX_BODY_BYTES", "8192")]);
    let cfg = load(&args, &env).unwrap();
    assert_eq!(cfg.port, 7002, "flag beats env and file");
    assert_eq!(cfg.max_body_bytes, 8192, "env beats file");
    assert_eq!(cfg.queue_capacity, 3, "file beats default");
    assert_eq!(cfg.cors_origins, vec!["https://a.example".to_string(), "http://localhost:3000".to_string()]);
    assert_eq!(cfg.header_read_timeout, Duration::from_secs(4));
    assert_eq!(cfg.shutdown_grace, Duration::ZERO);
    assert_eq!(cfg.model_id, "support-bot");
    assert_eq!(cfg.config_file.as_deref(), Some(file.as_path()));
    // The file may also come from the environment.
    let cfg = load(&ServeArgs::default(), &env_of(&[("HELPLINE_CONFIG", file.to_str().unwrap())])).unwrap();
    assert_eq!(cfg.port, 7000);
}

#[test]
fn config_keys_from_flag_env_and_file_are_stored_as_digests() {
    let dir = tempfile::tempdir().unwrap();
    // `sha256sum` output (digest, two spaces, "-") and comments are accepted.
    let keys = write_file(&dir, "keys", &format!("# support team\n\n{}  -\n", hex(&auth::digest(FILE_KEY))));
    let env = env_of(&[("HELPLINE_API_KEY", &format!("{KEY}, second-env-key-0123456789")), ("HELPLINE_API_KEYS_FILE", keys.to_str().unwrap())]);
    let cfg = load(&ServeArgs::default(), &env).unwrap();
    assert_eq!(cfg.api_key_hashes.len(), 3);
    for k in [KEY, "second-env-key-0123456789", FILE_KEY] {
        assert!(cfg.api_key_hashes.contains(&auth::digest(k)), "{k}");
    }
    let dbg = format!("{cfg:?}");
    assert!(!dbg.contains(KEY) && !dbg.contains(FILE_KEY), "keys are kept only as digests");

    // A flag replaces the environment's list.
    let args = ServeArgs { api_key: vec!["flag-key-0123456789".into()], ..Default::default() };
    let cfg = load(&args, &env_of(&[("HELPLINE_API_KEY", KEY)])).unwrap();
    assert_eq!(cfg.api_key_hashes, vec![auth::digest("flag-key-0123456789")]);

    // A bad digest line is named with its line number.
    let bad = write_file(&dir, "bad", "# ok\nnot-a-digest\n");
    let args = ServeArgs { api_keys_file: Some(bad), ..Default::default() };
    let e = load(&args, &HashMap::new()).unwrap_err();
    assert_eq!(e.setting, "api_keys_file");
    assert!(e.to_string().contains("line 2"), "{e}");
    // Short keys are refused.
    let e = load(&ServeArgs { api_key: vec!["short".into()], ..Default::default() }, &HashMap::new()).unwrap_err();
    assert_eq!((e.setting.as_str(), e.source.clone()), ("api_key", Some(Source::Flag)));
    assert!(e.to_string().contains("16"), "{e}");
}

#[test]
fn config_errors_name_the_setting_its_source_and_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let none = HashMap::new();
    let with_file = |text: &str| ServeArgs { config: Some(write_file(&dir, "c.toml", text)), ..Default::default() };

    let e = load(&ServeArgs::default(), &env_of(&[("HELPLINE_PORT", "70000")])).unwrap_err();
    assert_eq!((e.setting.as_str(), e.source.clone()), ("port", Some(Source::Env)));
    let msg = e.to_string();
    assert!(msg.contains("`port`") && msg.contains("HELPLINE_PORT") && msg.contains("0..=65535"), "{msg}");

    let e = load(&ServeArgs::default(), &env_of(&[("HELPLINE_PORT", "eighty")])).unwrap_err();
    assert!(e.to_string().contains("not a whole number"), "{e}");

    let e = load(&with_file("port = -1\n"), &none).unwrap_err();
    assert_eq!(e.setting, "port");
    assert!(matches!(e.source, Some(Source::File(_))));
    assert!(e.to_string().contains("-1") && e.to_string().contains("c.toml"), "{e}");

    let e = load(&with_file("max_body_bytes = -5\n"), &none).unwrap_err();
    assert_eq!(e.setting, "max_body_bytes");
    assert!(e.to_string().contains("1024..="), "{e}");

    let e = load(&ServeArgs { max_concurrent: Some(0), ..Default::default() }, &none).unwrap_err();
    assert_eq!((e.setting.as_str(), e.source.clone()), ("max_concurrent", Some(Source::Flag)));
    assert!(e.to_string().contains("--max-concurrent"), "{e}");

    let e = load(&ServeArgs { header_read_timeout_secs: Some(0), ..Default::default() }, &none).unwrap_err();
    assert_eq!(e.setting, "header_read_timeout_secs");

    let e = load(&with_file("port = 8080\nmax_bodybytes = 10\n"), &none).unwrap_err();
    assert_eq!(e.setting, "max_bodybytes");
    assert!(e.to_string().contains("unknown setting `max_bodybytes`"), "{e}");

    let e = load(&with_file("port = [\n"), &none).unwrap_err();
    assert_eq!(e.setting, "config");

    let e = load(&ServeArgs { cors_origin: vec!["*".into()], ..Default::default() }, &none).unwrap_err();
    assert_eq!((e.setting.as_str(), e.source.clone()), ("cors_origin", Some(Source::Flag)));
    assert!(e.to_string().contains("`*`"), "{e}");
    for bad in ["https://a.example/", "ftp://a.example", "https://a.example/path", "a.example", "https://a.example:0", "null"] {
        let e = load(&ServeArgs { cors_origin: vec![bad.into()], ..Default::default() }, &none).unwrap_err();
        assert_eq!(e.setting, "cors_origin", "{bad}");
    }

    let e = load(&ServeArgs { host: Some("example.com".into()), ..Default::default() }, &none).unwrap_err();
    assert_eq!(e.setting, "host");

    let e = load(&ServeArgs { default_max_tokens: Some(100), max_tokens_limit: Some(50), ..Default::default() }, &none)
        .unwrap_err();
    assert_eq!(e.setting, "default_max_tokens");
    assert!(e.to_string().contains("1..=50"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Auth, CORS, fallbacks, limits, request ids

#[test]
fn auth_guards_everything_but_health_and_cors_follows_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_file(&dir, "keys", &format!("{}\n", hex(&auth::digest(FILE_KEY))));
    let args = ServeArgs {
        api_key: vec![KEY.into()],
        api_keys_file: Some(keys),
        cors_origin: vec!["https://Support.Example.com".into()],
        ..Default::default()
    };
    let srv = TestServer::start_loaded(load(&args, &HashMap::new()).unwrap());
    let a = srv.addr;

    // /health is public even with auth on.
    let r = get(a, "/health", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), serde_json::json!({"status": "ok"}));

    // So is the readiness probe (it says nothing private).
    assert_eq!(get(a, "/ready", &[]).status, 200);

    for path in ["/v1/models", "/metrics", "/no-such-route"] {
        let r = get(a, path, &[]);
        r.assert_error(401, "invalid_api_key");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        get(a, path, &[("Authorization", &bearer("ops-test-key-0123456780"))]).assert_error(401, "invalid_api_key");
        get(a, path, &[("Authorization", &format!("Basic {KEY}"))]).assert_error(401, "invalid_api_key");
    }
    let wrong = http(a, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], Some(&chat_body("Hi!", 4, false)));
    wrong.assert_error(401, "invalid_api_key");

    for key in [KEY, FILE_KEY] {
        let auth_header = bearer(key);
        let r = get(a, "/v1/models", &[("Authorization", &auth_header)]);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["data"][0]["id"], "smollm2-135m-instruct");
        // A customer key is not an admin key.
        get(a, "/metrics", &[("Authorization", &auth_header)]).assert_error(401, "invalid_api_key");
        let r = metrics(a);
        assert_eq!(r.status, 200);
        assert!(r.body.contains("helpline_requests_total{route=\"/v1/models\",status=\"401\"}"), "{}", r.body);
    }
    let r = get(a, "/ready", &[("Authorization", &bearer(KEY))]);
    assert_eq!(r.status, 200);
    // With the key, unknown routes are 404.
    get(a, "/no-such-route", &[("Authorization", &bearer(KEY))]).assert_error(404, "route_not_found");

    // CORS: the configured origin (compared in lower case) is echoed, others get nothing.
    let ok_origin = "https://support.example.com";
    let r = get(a, "/health", &[("Origin", ok_origin)]);
    assert_eq!(r.header("access-control-allow-origin"), Some(ok_origin), "{r:?}");
    assert_eq!(r.header("access-control-allow-credentials"), None);
    let r = get(a, "/health", &[("Origin", "https://evil.example")]);
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
    // The 401 of a cross-origin call is readable by the page (so it can tell the user).
    let r = get(a, "/v1/models", &[("Origin", ok_origin)]);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("access-control-allow-origin"), Some(ok_origin));

    // Preflight needs no key.
    let preflight = |origin: &str| {
        http(
            a,
            "OPTIONS",
            "/v1/chat/completions",
            &[("Origin", origin), ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization,content-type")],
            None,
        )
    };
    let r = preflight(ok_origin);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(ok_origin));
    let methods = r.header("access-control-allow-methods").unwrap_or("").to_ascii_uppercase();
    assert!(methods.contains("POST") && methods.contains("GET"), "{methods}");
    let allowed = r.header("access-control-allow-headers").unwrap_or("").to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
    let r = preflight("https://evil.example");
    assert_eq!(r.header("access-control-allow-origin"), None, "{r:?}");
}

#[test]
fn defaults_no_cors_json_404_405_413_and_request_ids() {
    let cfg = ServeConfig { max_body_bytes: 1024, ..ServeConfig::default() };
    let srv = TestServer::start(cfg);
    let a = srv.addr;

    // No CORS headers at all by default, preflight included.
    let r = get(a, "/health", &[("Origin", "https://support.example.com")]);
    assert_eq!(r.status, 200);
    assert!(r.headers.iter().all(|(k, _)| !k.starts_with("access-control-")), "{r:?}");
    let r = http(a, "OPTIONS", "/v1/chat/completions", &[("Origin", "https://a.example"), ("Access-Control-Request-Method", "POST")], None);
    assert!(r.headers.iter().all(|(k, _)| !k.starts_with("access-control-")), "{r:?}");

    get(a, "/v2/nothing", &[]).assert_error(404, "route_not_found");
    // (With a JSON content type: a bare state-changing request is refused by the CSRF check first.)
    http(a, "DELETE", "/health", &[("Content-Type", "application/json")], None).assert_error(405, "method_not_allowed");
    get(a, "/v1/chat/completions", &[]).assert_error(405, "method_not_allowed");

    // Over the body limit: by Content-Length, and streamed (chunked) with no length.
    let big = format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(4000));
    let r = http(a, "POST", "/v1/chat/completions", &[("Content-Type", "application/json")], Some(&big));
    r.assert_error(413, "payload_too_large");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("1024"), "{r:?}");
    let mut s = TcpStream::connect(a).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = String::from(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for part in big.as_bytes().chunks(500) {
        req.push_str(&format!("{:x}\r\n{}\r\n", part.len(), std::str::from_utf8(part).unwrap()));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw).assert_error(413, "payload_too_large");

    // Request ids: a sane incoming one is echoed, anything else is replaced by a fresh one.
    let r = get(a, "/health", &[("X-Request-Id", "client-id_42.a:b")]);
    assert_eq!(r.header("x-request-id"), Some("client-id_42.a:b"));
    let r = get(a, "/health", &[("X-Request-Id", "bad id with spaces")]);
    let id = r.header("x-request-id").unwrap();
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let other = get(a, "/v2/nothing", &[]);
    assert_ne!(other.header("x-request-id"), Some(id));
    assert!(other.header("x-request-id").is_some());

    // Metrics label unknown routes by a fixed name, never the raw path.
    let m = metrics(a).body;
    assert!(m.contains("helpline_requests_total{route=\"unmatched\",status=\"404\"} 2"), "{m}");
    assert!(m.contains("helpline_requests_total{route=\"/health\",status=\"405\"} 1"), "{m}");
    assert!(m.contains("helpline_requests_total{route=\"/v1/chat/completions\",status=\"413\"} 2"), "{m}");
    assert!(!m.contains("/v2/nothing"), "{m}");
}

#[test]
fn ready_turns_200_after_load_and_metrics_count_a_chat() {
    // Plain chat, so both requests reach the engine (a grounded "Hi!" is refused without it).
    let mut cfg = ServeConfig::default();
    cfg.grounding.enabled = false;
    let srv = TestServer::start(cfg);
    let a = srv.addr;
    let r = get(a, "/ready", &[]);
    r.assert_error(503, "not_ready");
    assert_eq!(r.header("retry-after"), Some("1"));
    let m = metrics(a);
    assert_eq!(m.status, 200);
    assert_eq!(m.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(m.body.contains("helpline_ready 0\n") && m.body.contains("helpline_up 1\n"), "{}", m.body);
    // Health does not depend on the model.
    assert_eq!(get(a, "/health", &[]).status, 200);

    load_model(&srv.state);
    let r = get(a, "/ready", &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({"status": "ready", "model": "smollm2-135m-instruct"}));

    let json = [("Content-Type", "application/json")];
    let r = http(a, "POST", "/v1/chat/completions", &json, Some(&chat_body("Hi!", 16, false)));
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(a, "POST", "/v1/chat/completions", &json, Some(&chat_body("Hi!", 16, true)));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("data: [DONE]"), "{}", r.body);

    // The engine updates its gauges just after it sends an answer's last event.
    let stats = srv.state.loaded().unwrap().engine.stats();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.active.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = metrics(a).body;
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {name} in\n{m}"))
    };
    assert_eq!(value("helpline_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"), 2.0);
    assert_eq!(value("helpline_requests_total{route=\"/ready\",status=\"503\"}"), 1.0);
    assert_eq!(value("helpline_requests_total{route=\"/ready\",status=\"200\"}"), 1.0);
    assert_eq!(value("helpline_ready"), 1.0);
    assert!(value("helpline_prompt_tokens_total") >= 2.0 * 10.0);
    assert!(value("helpline_generated_tokens_total") >= 2.0 * 2.0);
    assert_eq!(value("helpline_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(value("helpline_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 2.0);
    assert!(value("helpline_time_to_first_token_seconds_sum") > 0.0);
    assert!(value("helpline_inter_token_latency_seconds_count") >= 2.0);
    assert_eq!(value("helpline_queue_depth"), 0.0);
    assert_eq!(value("helpline_active_sequences"), 0.0);
    assert!(m.contains("# TYPE helpline_time_to_first_token_seconds histogram"));
    assert!(m.contains("# TYPE helpline_rejections_total counter"));
    assert!(m.contains("# TYPE helpline_cancelled_total counter"));
}

// ---------------------------------------------------------------------------------------------
// Request heads: too slow, too large

#[test]
fn slow_header_client_is_disconnected() {
    let cfg = ServeConfig { header_read_timeout: Duration::from_secs(1), ..ServeConfig::default() };
    let srv = TestServer::start(cfg);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let start = Instant::now();
    let mut writer = s.try_clone().unwrap();
    let dribble = std::thread::spawn(move || {
        let head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for b in head.iter() {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 256];
    let closed = match s.read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!("unexpected answer to an incomplete head: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) => matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted),
    };
    let elapsed = start.elapsed();
    assert!(closed, "the connection was not closed");
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_millis(2500), "closed after {elapsed:?}");
    let _ = s.shutdown(std::net::Shutdown::Both);
    dribble.join().unwrap();
    // The server still serves others.
    assert_eq!(get(srv.addr, "/health", &[]).status, 200);
}

#[test]
fn oversize_header_block_is_rejected() {
    let cfg = ServeConfig { max_header_bytes: 4096, ..ServeConfig::default() };
    let srv = TestServer::start(cfg);
    // Just under the limit is fine.
    let r = get(srv.addr, "/health", &[("X-Fill", &"a".repeat(3000))]);
    assert_eq!(r.status, 200);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Fill: {}\r\n\r\n", "a".repeat(6000));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
}

// ---------------------------------------------------------------------------------------------
// The real binary

struct Bin {
    child: Child,
    addr: SocketAddr,
    listening_line: String,
    stderr: Arc<Mutex<String>>,
    /// Each server builds its own index of docs-corpus here (never in the repository's `index/`).
    _index: tempfile::TempDir,
    /// And stores its conversations here (never in the repository's `data/`).
    _data: Option<tempfile::TempDir>,
}

impl Bin {
    /// `helpline serve --port 0 ARGS` with ENV; returns once the listening line is printed.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Bin {
        let mut cmd = support::helpline_bin();
        for s in config::SETTINGS {
            cmd.env_remove(config::env_name(s));
        }
        let index = tempfile::tempdir().unwrap();
        cmd.env_remove("HELPLINE_CONFIG").env("HELPLINE_OFFLINE", "1").env("HELPLINE_INDEX_DIR", index.path());
        let data = if env.iter().any(|(k, _)| *k == "HELPLINE_DATA_DIR") || args.contains(&"--data-dir") {
            None
        } else {
            let d = tempfile::tempdir().unwrap();
            cmd.env("HELPLINE_DATA_DIR", d.path());
            Some(d)
        };
        cmd.args(["serve", "--port", "0"]).args(args).envs(env.iter().copied());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("helpline binary");
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().unwrap();
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.is_empty() {
            let status = child.wait().unwrap();
            std::thread::sleep(Duration::from_millis(100));
            panic!("helpline serve exited ({status}) before listening: {}", stderr.lock().unwrap());
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {}
        });
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("{line:?}"));
        let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
        Bin { child, addr, listening_line: line.trim().to_string(), stderr, _index: index, _data: data }
    }

    fn wait_ready(&self, headers: &[(&str, &str)]) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = get(self.addr, "/ready", headers);
            if r.status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "not ready in time: {r:?}\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn sigterm(&self) {
        let st = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill");
        assert!(st.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("helpline serve did not exit within {within:?}\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn binary_refuses_bad_config_and_a_taken_port() {
    let out = support::helpline_bin().args(["serve", "--cors-origin", "*"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cors_origin") && err.contains("--cors-origin"), "{err}");

    let out = support::helpline_bin().args(["serve"]).env("HELPLINE_MAX_BODY_BYTES", "0").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_bytes") && err.contains("HELPLINE_MAX_BODY_BYTES"), "{err}");

    // A model that cannot load: the server has already said where it listens, then exits non-zero.
    let mut bin = Bin::spawn(&["--model", "/nonexistent/helpline-test.gguf"], &[]);
    let status = bin.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    std::thread::sleep(Duration::from_millis(100));
    assert!(bin.stderr().contains("/nonexistent/helpline-test.gguf"), "{}", bin.stderr());

    // An invalid policy pack: named rule, non-zero exit, nothing served half-guarded.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("policy.toml");
    let shipped = std::fs::read_to_string(support::root().join("docs-corpus/policy.toml")).unwrap();
    std::fs::write(&bad, shipped.replacen("id = \"competitor\"", "id = \"Competitor Names\"", 1)).unwrap();
    let mut bin = Bin::spawn(&["--policy-file", bad.to_str().unwrap()], &[]);
    let status = bin.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    std::thread::sleep(Duration::from_millis(100));
    assert!(bin.stderr().contains("forbidden rule \"Competitor Names\"") && bin.stderr().contains("kebab-case"), "{}", bin.stderr());

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = support::helpline_bin().args(["serve", "--port", &port]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}

/// SIGTERM with a streamed answer in flight: the listener closes at once (new connections are
/// refused), the answer still runs to `[DONE]`, and the process exits 0.
#[test]
fn binary_drains_in_flight_stream_on_sigterm() {
    // A long plain answer is needed in flight (a grounded off-topic prompt would be refused at once).
    let mut bin = Bin::spawn(&["--shutdown-grace-secs", "120"], &[("HELPLINE_GROUNDING", "false")]);
    bin.wait_ready(&[]);

    let mut s = TcpStream::connect(bin.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = chat_body("Write a long essay about the history of the Roman Empire.", 24, true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let mut seen = String::new();
    // Wait for the first generated token (the role chunk comes first).
    while seen.matches("data: ").count() < 2 {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended early: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");

    bin.sigterm();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&bin.addr, Duration::from_millis(500)) {
            Err(_) => break,
            Ok(_) => {
                assert!(Instant::now() < deadline, "still accepting connections after SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Refusing new connections while still alive, draining the answer.
    let alive_while_refusing = bin.child.try_wait().unwrap().is_none();

    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        seen.push_str(&line);
    }
    assert!(seen.contains("data: [DONE]"), "the in-flight answer was cut: {seen}\n{}", bin.stderr());
    assert!(alive_while_refusing, "the server exited before the listener was seen closed");
    let status = bin.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", bin.stderr());
}

/// The official `openai` package against the real binary, authenticated with a key from the
/// environment. Fails (does not skip) when python3 or the package is missing.
#[test]
fn openai_python_client_against_binary() {
    // The client's compatibility is the point here, so the plain (ungrounded) answer is compared.
    let mut bin = Bin::spawn(&[], &[("HELPLINE_API_KEY", KEY), ("HELPLINE_GROUNDING", "false")]);
    assert!(bin.listening_line.starts_with("Helpline listening on http://127.0.0.1:"), "{}", bin.listening_line);
    assert!(bin.listening_line.ends_with("(model: smollm2-135m-instruct)"), "{}", bin.listening_line);
    let stdout = run_python_client(&mut bin, "tests/openai_client.py");
    assert!(stdout.contains("wrong key: refused") && stdout.trim_end().ends_with("ok"), "{stdout}");
}

/// Runs one of the `openai`-package scripts against `bin` (authenticated with `KEY`), asserts it
/// succeeded and the server then stops cleanly; returns the script's output.
fn run_python_client(bin: &mut Bin, script: &str) -> String {
    let auth_header = bearer(KEY);
    bin.wait_ready(&[("Authorization", &auth_header)]);
    let out = Command::new("python3")
        .arg(support::root().join(script))
        .arg(format!("http://{}/v1", bin.addr))
        .env("OPENAI_API_KEY", KEY)
        .output()
        .expect("python3 is required for this test (with `python3 -m pip install 'openai>=1.40'`)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed ({}):\n{stdout}\n{stderr}\nserver:\n{}", out.status, bin.stderr());
    eprintln!("{stdout}");
    bin.sigterm();
    assert_eq!(bin.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", bin.stderr());
    stdout
}

/// OpenAI tool calling with the official `openai` package against the real binary: every
/// `tool_choice`, streamed and not, calls that validate, and a client loop sending a tool's
/// result back (tests/openai_tools.py).
#[test]
fn openai_python_client_tool_calling_against_binary() {
    let mut bin = Bin::spawn(&[], &[("HELPLINE_API_KEY", KEY), ("HELPLINE_GROUNDING", "false")]);
    let stdout = run_python_client(&mut bin, "tests/openai_tools.py");
    assert!(stdout.contains("tool_choice honoured: 10/10") && stdout.trim_end().ends_with("ok"), "{stdout}");
}

/// The backend's credential and the customer's token never reach the server's logs, even at
/// debug level, through a confirmed write and a failing call.
#[test]
fn action_secrets_never_reach_the_logs() {
    let backend = crate::actions::backend();
    let secret = "a-customer-token-secret-for-the-log-test-0123";
    let actions = support::root().join("docs-corpus/actions.toml");
    let env = [
        ("HELPLINE_LOG", "debug"),
        ("HELPLINE_ACTIONS_FILE", actions.to_str().unwrap()),
        ("HELPLINE_CUSTOMER_TOKEN_SECRET", secret),
        ("TALLYWORKS_BACKEND_URL", backend.url.as_str()),
        ("TALLYWORKS_BACKEND_TOKEN", crate::actions::TOKEN),
    ];
    let mut bin = Bin::spawn(&[], &env);
    bin.wait_ready(&[]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = |account: &str| {
        let claims = serde_json::json!({"sub": format!("cust-{account}"), "account_id": account, "exp": now + 600});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let chat = |t: &str, conv: &str, text: &str| {
        let body = serde_json::json!({"messages": [{"role": "user", "content": text}], "helpline": {"conversation_id": conv}}).to_string();
        let r = http(bin.addr, "POST", "/v1/chat/completions", &[("Content-Type", "application/json"), ("X-Helpline-Customer-Token", t)], Some(&body));
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["helpline"]["action"].clone()
    };
    let ann = token("acct-1001");
    assert_eq!(chat(&ann, "conv-log", "please change my billing email to ap@acme.example")["stage"], "confirmation_asked");
    assert_eq!(chat(&ann, "conv-log", "yes")["stage"], "done");
    let broken = token("acct-broken");
    assert_eq!(chat(&broken, "conv-log-2", "is my account locked?")["stage"], "failed");
    bin.sigterm();
    assert_eq!(bin.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", bin.stderr());
    let logs = bin.stderr();
    assert!(logs.contains("DEBUG") || logs.contains("WARN"), "debug logging was on: {logs}");
    assert!(logs.contains("actions from"), "the actions were loaded: {logs}");
    for (what, s) in [("backend token", crate::actions::TOKEN), ("customer token", ann.as_str()), ("token secret", secret)] {
        assert!(!logs.contains(s), "the {what} appears in the logs");
    }
}

// ---------------------------------------------------------------------------------------------
// Crash safety

/// Opens a streamed chat on `addr` and reads until `chunks` content chunks arrived; returns the
/// open connection (still streaming) and the text so far.
fn open_stream(addr: SocketAddr, body: &serde_json::Value, chunks: usize) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        let contents: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
            .filter(|c| !c.is_empty())
            .collect();
        if contents.len() >= chunks {
            return (s, contents.concat());
        }
    }
}

/// SIGKILL in the middle of streamed answers: after a restart every acknowledged turn is there
/// (customer messages whose answer had started, answers the client got whole), the cut-off answers
/// are marked interrupted, the conversations go on, and SQLite's integrity check passes.
#[test]
fn acknowledged_turns_survive_sigkill_mid_stream() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_string();
    let key = "agent-key-crash-test-0123456789";
    let args = ["--data-dir", data_dir.as_str(), "--agent-api-key", key];
    // Plain answers (long ones are needed in flight); the server's setting, not a request field.
    let bin = Bin::spawn(&args, &[("HELPLINE_GROUNDING", "false")]);
    bin.wait_ready(&[]);
    let auth = format!("Bearer {key}");
    let agent = [("authorization", auth.as_str())];
    let chat = |conv: &str, question: &str, stream: bool, max_tokens: u32| {
        serde_json::json!({
            "messages": [{"role": "user", "content": question}],
            "temperature": 0, "max_tokens": max_tokens, "stream": stream,
            "helpline": {"conversation_id": conv, "customer": {"id": "crash-customer"}},
        })
    };
    // One answer the client received whole.
    let done = http(bin.addr, "POST", "/v1/chat/completions", &[("content-type", "application/json")], Some(&chat("conv-done", "Say hello.", false, 12).to_string()));
    assert_eq!(done.status, 200, "{}", done.body);
    let done_answer: serde_json::Value = serde_json::from_str(&done.body).unwrap();
    // Three answers in the middle of streaming.
    let mut open = Vec::new();
    for i in 0..3 {
        let conv = format!("conv-streaming-{i}");
        let (conn, sent) = open_stream(bin.addr, &chat(&conv, "Write a long story about a lighthouse keeper.", true, 400), 3);
        open.push((conv, conn, sent));
    }
    let mut bin = bin;
    bin.child.kill().unwrap(); // SIGKILL
    bin.child.wait().unwrap();

    let bin2 = Bin::spawn(&args, &[]);
    bin2.wait_ready(&[]);
    assert!(bin2.stderr().contains("marked interrupted"), "{}", bin2.stderr());
    let get_conv = |id: &str| -> serde_json::Value {
        let r = get(bin2.addr, &format!("/v1/conversations/{id}"), &agent);
        assert_eq!(r.status, 200, "{id}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    };
    let c = get_conv("conv-done");
    let turns = c["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[1]["state"], "complete");
    assert_eq!(turns[1]["content"], done_answer["choices"][0]["message"]["content"]);
    for (conv, _, sent) in &open {
        let c = get_conv(conv);
        let turns = c["turns"].as_array().unwrap();
        assert_eq!(turns.len(), 2, "{c}");
        assert_eq!(turns[0]["content"], "Write a long story about a lighthouse keeper.", "the customer's turn is intact");
        assert_eq!(turns[1]["state"], "interrupted", "{c}");
        assert!(!sent.is_empty());
    }
    // The conversations go on after the restart.
    let next = http(bin2.addr, "POST", "/v1/chat/completions", &[("content-type", "application/json")], Some(&chat("conv-streaming-0", "Hello again.", false, 8).to_string()));
    assert_eq!(next.status, 200, "{}", next.body);
    let c = get_conv("conv-streaming-0");
    assert_eq!(c["turns"].as_array().unwrap().len(), 4);
    assert_eq!(c["turns"][3]["seq"], 4);
    drop(bin2);
    // The database file is consistent.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let url = format!("sqlite://{}/helpline.db", data_dir);
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let row: (String,) = sqlx::query_as("PRAGMA integrity_check").fetch_one(&mut conn).await.unwrap();
        assert_eq!(row.0, "ok");
    });
}
