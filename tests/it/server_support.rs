//! Test servers on real sockets, and a small HTTP/1.1 client for them (plain `TcpStream`, so
//! tests see exactly what goes over the wire: status, headers, chunked bodies, SSE events).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use helpline::config::ServeConfig;
use helpline::engine::{Engine, EngineConfig, ModelBundle};
use helpline::server::{router, AppState, Loaded, SharedState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::support;

/// Longest a test waits for any one HTTP exchange before failing (instead of hanging).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(600);

/// The agent key every test server accepts (unless its config names its own).
pub const AGENT_KEY: &str = "agent-key-for-tests-0123456789";

/// The admin key every test server accepts (index and policy reload, metrics, raw completions,
/// tokenize).
pub const ADMIN_KEY: &str = "admin-key-for-tests-9876543210";

/// A server on `127.0.0.1:<free port>`, running in a task of the test's runtime. Dropping it stops
/// accepting connections (the task is aborted); [`TestServer::shutdown`] stops it gracefully.
pub struct TestServer {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    pub state: SharedState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The SQLite conversation store's directory (when the test did not give one).
    _data: Option<std::sync::Arc<tempfile::TempDir>>,
}

/// The default model (SmolLM2) behind the whole router, with an engine sized by `cfg`
/// (`queue_capacity`, `max_concurrent`).
pub async fn start_server(cfg: ServeConfig) -> TestServer {
    let loaded = default_model(&cfg);
    let state = AppState::new(grounded_config(cfg));
    state.set_loaded(loaded);
    state.set_knowledge(support::knowledge().1.clone());
    serve_state(state).await
}

/// Same as [`start_server`]: the default model and the real knowledge base (docs-corpus indexed
/// on disk), with grounding as `cfg` says (on by default).
pub async fn start_grounded_server(cfg: ServeConfig) -> TestServer {
    start_server(cfg).await
}

/// [`start_server`] without the test agent key: agent routes are off unless `cfg` names a key.
pub async fn start_server_without_agents(cfg: ServeConfig) -> TestServer {
    let loaded = default_model(&cfg);
    let mut cfg = grounded_config(cfg);
    cfg.conversations.agent_key_hashes.retain(|h| *h != helpline::server::auth::digest(AGENT_KEY));
    let state = AppState::new(cfg);
    state.set_loaded(loaded);
    state.set_knowledge(support::knowledge().1.clone());
    serve_state(state).await
}

/// Points the config's docs and index directories at the shared test index, so routes that
/// read them (reload) see the same base the state holds.
fn grounded_config(mut cfg: ServeConfig) -> ServeConfig {
    if cfg.conversations.agent_key_hashes.is_empty() {
        cfg.conversations.agent_key_hashes.push(helpline::server::auth::digest(AGENT_KEY));
    }
    if cfg.access.admin_key_hashes.is_empty() {
        cfg.access.admin_key_hashes.push(helpline::server::auth::digest(ADMIN_KEY));
    }
    let defaults = helpline::config::GroundingConfig::default();
    if cfg.grounding.index_dir == defaults.index_dir {
        cfg.grounding.index_dir = support::knowledge().0.path().to_path_buf();
    }
    if cfg.grounding.docs_dir == defaults.docs_dir {
        cfg.grounding.docs_dir = support::root().join("docs-corpus");
    }
    cfg
}

/// The whole router with no model loaded (as while the server is still loading it).
pub async fn start_unloaded_server(cfg: ServeConfig) -> TestServer {
    serve_state(AppState::new(grounded_config(cfg))).await
}

/// `helpline::server::router(state)` on a fresh socket.
pub async fn serve_state(state: SharedState) -> TestServer {
    let app = router(state.clone());
    serve_app(app, state).await
}

/// Any app on a fresh socket, served by the production listener (header timeouts, size caps,
/// graceful shutdown) with the state's config.
pub async fn serve_app(app: Router, state: SharedState) -> TestServer {
    // Chat is guarded by the shipped policy pack, as `helpline serve` loads it at start-up.
    if state.policy().is_err() {
        state.set_policy(support::policy());
    }
    state.set_embedder(support::embedder());
    // Every chat turn is stored: a SQLite store in a fresh directory unless the config names one
    // (a test that points `data_dir` or `database_url` somewhere keeps it).
    let mut data = None;
    if state.store().is_err() {
        let mut conv = state.config.conversations.clone();
        let defaults = helpline::config::ConversationsConfig::default();
        if conv.data_dir == defaults.data_dir && conv.database_url.is_none() {
            let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
            conv.data_dir = dir.path().to_path_buf();
            data = Some(dir);
        }
        helpline::server::conversations::open_with(&state, &conv).await.expect("open the conversation store");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let cfg = state.config.clone();
    let task = tokio::spawn(async move {
        helpline::server::listen::serve(listener, app, &cfg, async {
            let _ = rx.await;
        })
        .await
        .expect("test server failed");
    });
    TestServer { addr, base_url: format!("http://{addr}"), state, shutdown: Some(tx), task: Some(task), _data: data }
}

/// The default model with its own engine (weights shared with the other tests in this binary).
pub fn default_model(cfg: &ServeConfig) -> Loaded {
    let shared = support::smollm2_bundle();
    let bundle = ModelBundle {
        path: support::smollm2_path(),
        model: shared.model.clone(),
        tokenizer: shared.tokenizer.clone(),
        template: shared.template.clone(),
    };
    let engine_cfg = EngineConfig { queue_capacity: cfg.queue_capacity, max_active: cfg.max_concurrent, ..Default::default() };
    let engine = Engine::start(&bundle.model, bundle.tokenizer.clone(), engine_cfg).expect("engine starts");
    Loaded { bundle, engine, guard: support::guard_compiler() }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// The server's engine (panics when the server has no model).
    pub fn engine(&self) -> &Engine {
        &self.state.loaded().expect("the test server has a model").engine
    }

    /// One request on a fresh connection (`Connection: close`); the whole response.
    /// `Host`, `Content-Length` and `Connection` are added.
    pub async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let fut = async {
            let mut conn = self.send(method, path, headers, body).await;
            let head = conn.read_head().await;
            let mut body = Vec::new();
            while let Some(bytes) = conn.next_body_bytes().await {
                body.extend_from_slice(&bytes);
            }
            HttpResponse { status: head.status, headers: head.headers, body }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, fut).await.unwrap_or_else(|_| panic!("{method} {path}: no complete answer in time"))
    }

    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], b"").await
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> HttpResponse {
        self.request("POST", path, &[("content-type", "application/json")], body.to_string().as_bytes()).await
    }

    /// GET with the agent key.
    pub async fn agent_get(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {AGENT_KEY}");
        self.request("GET", path, &[("authorization", &auth)], b"").await
    }

    /// POST JSON with the agent key.
    pub async fn agent_post_json(&self, path: &str, body: &serde_json::Value) -> HttpResponse {
        let auth = format!("Bearer {AGENT_KEY}");
        self.request("POST", path, &[("content-type", "application/json"), ("authorization", &auth)], body.to_string().as_bytes()).await
    }

    /// DELETE with the agent key.
    pub async fn agent_delete(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {AGENT_KEY}");
        self.request("DELETE", path, &[("authorization", &auth)], b"").await
    }

    /// GET with the admin key.
    pub async fn admin_get(&self, path: &str) -> HttpResponse {
        let auth = format!("Bearer {ADMIN_KEY}");
        self.request("GET", path, &[("authorization", &auth)], b"").await
    }

    /// POST JSON with the admin key.
    pub async fn admin_post_json(&self, path: &str, body: &serde_json::Value) -> HttpResponse {
        let auth = format!("Bearer {ADMIN_KEY}");
        self.request("POST", path, &[("content-type", "application/json"), ("authorization", &auth)], body.to_string().as_bytes()).await
    }

    /// Opens a streaming request with the agent key (the fields customers may not use).
    pub async fn agent_stream(&self, path: &str, body: &serde_json::Value) -> SseStream {
        let auth = format!("Bearer {AGENT_KEY}");
        self.stream_with(path, body, &[("authorization", &auth)]).await
    }

    /// Opens a streaming request with the admin key.
    pub async fn admin_stream(&self, path: &str, body: &serde_json::Value) -> SseStream {
        let auth = format!("Bearer {ADMIN_KEY}");
        self.stream_with(path, body, &[("authorization", &auth)]).await
    }

    /// Opens a streaming request and returns once the response head has arrived.
    pub async fn stream(&self, path: &str, body: &serde_json::Value) -> SseStream {
        self.stream_with(path, body, &[]).await
    }

    /// Opens a streaming request with extra headers.
    pub async fn stream_with(&self, path: &str, body: &serde_json::Value, extra: &[(&str, &str)]) -> SseStream {
        let fut = async {
            let mut headers = vec![("content-type", "application/json"), ("accept", "text/event-stream")];
            headers.extend_from_slice(extra);
            let mut conn = self.send("POST", path, &headers, body.to_string().as_bytes()).await;
            let head = conn.read_head().await;
            SseStream { status: head.status, headers: head.headers, conn, text: String::new() }
        };
        tokio::time::timeout(CLIENT_TIMEOUT, fut).await.expect("stream: no response head in time")
    }

    /// Writes `bytes` as they are and reads until the server closes the connection.
    pub async fn send_raw(&self, bytes: &[u8]) -> Vec<u8> {
        let fut = async {
            let mut s = TcpStream::connect(self.addr).await.expect("connect");
            s.write_all(bytes).await.expect("write");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            out
        };
        tokio::time::timeout(CLIENT_TIMEOUT, fut).await.expect("raw request: connection not closed in time")
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Conn {
        let mut s = TcpStream::connect(self.addr).await.expect("connect to the test server");
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n", self.addr);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        s.write_all(&bytes).await.expect("send the request");
        Conn { stream: s, buf: Vec::new(), body: BodyState::Unknown }
    }

    /// Stops accepting connections, waits for open ones to finish, and ends the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Decoded (de-chunked) body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

/// One item of an event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum SseItem {
    /// The `data:` lines of one event, joined with newlines.
    Data(String),
    /// A comment line (`:` ...), e.g. a keep-alive.
    Comment(String),
}

/// A streaming response being read; dropping it closes the connection.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    conn: Conn,
    /// Decoded body text not yet split into events.
    text: String,
}

impl SseStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The next event or comment; `None` when the body ends.
    pub async fn next(&mut self) -> Option<SseItem> {
        tokio::time::timeout(CLIENT_TIMEOUT, self.next_inner()).await.expect("stream: no event in time")
    }

    async fn next_inner(&mut self) -> Option<SseItem> {
        loop {
            if let Some(item) = self.take_item() {
                return Some(item);
            }
            let bytes = self.conn.next_body_bytes().await?;
            self.text.push_str(&String::from_utf8_lossy(&bytes));
        }
    }

    /// Splits one item off the front of `text` when a complete one is there.
    fn take_item(&mut self) -> Option<SseItem> {
        loop {
            let text = self.text.trim_start_matches(['\r', '\n']);
            let skipped = self.text.len() - text.len();
            self.text.drain(..skipped);
            if self.text.starts_with(':') {
                let end = self.text.find('\n')?;
                let line: String = self.text.drain(..=end).collect();
                return Some(SseItem::Comment(line[1..].trim().to_string()));
            }
            let end = self.text.find("\n\n")?;
            let block: String = self.text.drain(..end + 2).collect();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if !data.is_empty() {
                return Some(SseItem::Data(data.join("\n")));
            }
        }
    }

    /// The next `data:` payload, skipping comments.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            match self.next().await? {
                SseItem::Data(d) => return Some(d),
                SseItem::Comment(_) => {}
            }
        }
    }

    /// Every remaining item until the body ends.
    pub async fn collect_items(mut self) -> Vec<SseItem> {
        let mut out = Vec::new();
        while let Some(item) = self.next().await {
            out.push(item);
        }
        out
    }

    /// Every remaining `data:` payload until the body ends.
    pub async fn collect_data(self) -> Vec<String> {
        self.collect_items()
            .await
            .into_iter()
            .filter_map(|i| match i {
                SseItem::Data(d) => Some(d),
                SseItem::Comment(_) => None,
            })
            .collect()
    }
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

enum BodyState {
    Unknown,
    /// Bytes left of a `Content-Length` body.
    Length(usize),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Bytes left of the current chunk, then its CRLF.
    ChunkData(usize),
    ChunkCrlf,
    UntilClose,
    Done,
}

/// One client connection: the response head, then the body as it arrives (de-chunked).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    body: BodyState,
}

impl Conn {
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn read_head(&mut self) -> Head {
        let end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            assert!(self.fill().await, "the connection closed before a response head: {:?}", String::from_utf8_lossy(&self.buf));
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status =
            status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> =
            lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
        self.body = if header(&headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            BodyState::ChunkSize
        } else if let Some(n) = header(&headers, "content-length").and_then(|v| v.parse().ok()) {
            BodyState::Length(n)
        } else if status == 204 || status == 304 {
            BodyState::Done
        } else {
            BodyState::UntilClose
        };
        Head { status, headers }
    }

    /// The next piece of the decoded body; `None` at its end.
    async fn next_body_bytes(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.body {
                BodyState::Unknown | BodyState::Done => return None,
                BodyState::Length(0) => {
                    self.body = BodyState::Done;
                    return None;
                }
                BodyState::Length(n) if !self.buf.is_empty() => {
                    let take = n.min(self.buf.len());
                    self.body = BodyState::Length(n - take);
                    return Some(self.buf.drain(..take).collect());
                }
                BodyState::UntilClose if !self.buf.is_empty() => return Some(std::mem::take(&mut self.buf)),
                BodyState::ChunkSize => {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                        self.buf.drain(..i + 2);
                        let size_hex = line.split(';').next().unwrap_or_default().trim();
                        let size = usize::from_str_radix(size_hex, 16).unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
                        self.body = if size == 0 { BodyState::Done } else { BodyState::ChunkData(size) };
                        continue;
                    }
                }
                BodyState::ChunkData(n) if !self.buf.is_empty() => {
                    let take = n.min(self.buf.len());
                    self.body = if take == n { BodyState::ChunkCrlf } else { BodyState::ChunkData(n - take) };
                    return Some(self.buf.drain(..take).collect());
                }
                BodyState::ChunkCrlf if self.buf.len() >= 2 => {
                    assert_eq!(&self.buf[..2], b"\r\n", "chunk not followed by CRLF");
                    self.buf.drain(..2);
                    self.body = BodyState::ChunkSize;
                    continue;
                }
                _ => {}
            }
            if !self.fill().await {
                // Closed (the normal end of an until-close body; a cut-short one ends here too).
                self.body = BodyState::Done;
                return None;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
