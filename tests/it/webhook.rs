//! End-to-end tests for `webhook`: a real sender talking to a tiny scripted
//! HTTP/1.1 receiver on 127.0.0.1, with an in-memory `DeliveryLog`.
//!
//! The receiver is hand-rolled on a raw `TcpListener` rather than a web
//! framework so each test can script exact misbehaviour (status codes,
//! `Retry-After`, hanging without answering) and record the raw body bytes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use helpline::webhook::{
    sign, verify, BoxFuture, Delivery, DeliveryLog, DeliveryStatus, Webhook, WebhookConfig,
    WebhookError, WebhookStats,
};

const SECRET: &str = "test-secret-0123456789";

// ---------------------------------------------------------------- log

/// In-memory log that also keeps every saved version, so tests can inspect
/// intermediate states, and can be told to fail saves.
#[derive(Default)]
struct MemLog {
    rows: Mutex<HashMap<String, Delivery>>,
    history: Mutex<Vec<Delivery>>,
    fail_saves: AtomicBool,
    failed_saves: AtomicUsize,
}

impl DeliveryLog for MemLog {
    fn save(&self, d: &Delivery) -> BoxFuture<'_, Result<(), String>> {
        let d = d.clone();
        Box::pin(async move {
            if self.fail_saves.load(Ordering::SeqCst) {
                self.failed_saves.fetch_add(1, Ordering::SeqCst);
                return Err("simulated database outage".to_string());
            }
            self.history.lock().unwrap().push(d.clone());
            self.rows.lock().unwrap().insert(d.id.clone(), d);
            Ok(())
        })
    }

    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Delivery>, String>> {
        Box::pin(async move {
            let mut rows: Vec<Delivery> = self
                .rows
                .lock()
                .unwrap()
                .values()
                .filter(|d| d.status == DeliveryStatus::Pending)
                .cloned()
                .collect();
            rows.sort_by_key(|d| d.next_attempt_ms);
            rows.truncate(limit);
            Ok(rows)
        })
    }
}

impl MemLog {
    fn get(&self, id: &str) -> Option<Delivery> {
        self.rows.lock().unwrap().get(id).cloned()
    }

    fn history_of(&self, id: &str) -> Vec<Delivery> {
        let history = self.history.lock().unwrap();
        history.iter().filter(|d| d.id == id).cloned().collect()
    }

    /// Polls until the stored delivery satisfies `done`, or panics after 10 s.
    async fn wait_until(&self, id: &str, done: impl Fn(&Delivery) -> bool) -> Delivery {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(d) = self.get(id) {
                if done(&d) {
                    return d;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on delivery {id}: {:?}",
                self.get(id)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_final(&self, id: &str) -> Delivery {
        self.wait_until(id, |d| d.status != DeliveryStatus::Pending)
            .await
    }
}

// ---------------------------------------------------------------- receiver

/// What the receiver does with the n-th connection (one per attempt).
#[derive(Clone)]
enum Reply {
    Status(u16, Vec<(&'static str, &'static str)>),
    /// Reads the request, then never answers.
    Hang,
}

fn ok() -> Reply {
    Reply::Status(200, vec![])
}

fn status(code: u16) -> Reply {
    Reply::Status(code, vec![])
}

#[derive(Debug)]
struct Received {
    method: String,
    path: String,
    /// Lower-cased names.
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name}: {:?}", self.headers))
    }
}

struct Receiver {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Received>,
}

impl Receiver {
    async fn start(script: Vec<Reply>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Receiver::on(listener, script)
    }

    /// Serves `script[n]` to the n-th connection and `200` once it runs out.
    fn on(listener: TcpListener, script: Vec<Reply>) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let reply = script.get(n).cloned().unwrap_or_else(ok);
                n += 1;
                tokio::spawn(serve(stream, reply, tx.clone()));
            }
        });
        Receiver { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/helpline?source=test", self.addr)
    }

    async fn next(&mut self) -> Received {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("no request within 10 s")
            .expect("receiver stopped")
    }
}

async fn serve(mut stream: TcpStream, reply: Reply, tx: mpsc::UnboundedSender<Received>) {
    let at = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_string();
    let path = request_line.next().unwrap().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = tx.send(Received {
        method,
        path,
        headers,
        body,
        at,
    });
    match reply {
        Reply::Hang => {
            // Hold the socket open without answering; the test ends first.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Reply::Status(code, extra) => {
            let mut response =
                format!("HTTP/1.1 {code} Scripted\r\ncontent-length: 0\r\nconnection: close\r\n");
            for (k, v) in extra {
                response.push_str(&format!("{k}: {v}\r\n"));
            }
            response.push_str("\r\n");
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
    }
}

/// A port with nothing listening: bind, note the address, drop the listener.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------- helpers

fn config(url: String) -> WebhookConfig {
    WebhookConfig {
        url,
        secret: SECRET.to_string(),
        max_attempts: 4,
        initial_backoff: Duration::from_millis(30),
        max_backoff: Duration::from_millis(200),
        timeout: Duration::from_secs(2),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn summary() -> serde_json::Value {
    json!({
        "conversation_id": "conv-123",
        "customer": {"name": "Ada", "email": "ada@example.test"},
        "summary": "Customer wants a refund; bot could not verify the order.",
        "messages": 7
    })
}

/// `in_flight` drops just after the final save, so poll for it.
async fn wait_in_flight(hook: &Webhook, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.stats().in_flight != n {
        assert!(Instant::now() < deadline, "{:?}", hook.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn start(cfg: WebhookConfig, log: &Arc<MemLog>) -> Webhook {
    Webhook::start(cfg, log.clone() as Arc<dyn DeliveryLog>).unwrap()
}

// ---------------------------------------------------------------- delivery

#[tokio::test]
async fn delivered_first_try_with_verifiable_signature_and_exact_headers() {
    let mut rx = Receiver::start(vec![ok()]).await;
    let log = Arc::new(MemLog::default());
    let hook = start(config(rx.url()), &log);

    let payload = summary();
    let before = now_ms();
    let id = hook
        .enqueue("handoff.created", payload.clone())
        .await
        .unwrap();
    // Durable before enqueue returned.
    assert_eq!(log.history_of(&id)[0].status, DeliveryStatus::Pending);

    let req = rx.next().await;
    let done = log.wait_final(&id).await;
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.last_error, None);
    assert_eq!(done.event, "handoff.created");
    assert_eq!(done.payload, payload);

    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/hooks/helpline?source=test");
    assert_eq!(req.header("host"), rx.addr.to_string());
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.header("user-agent"), "helpline-webhook/1");
    assert_eq!(req.header("x-helpline-event"), "handoff.created");
    assert_eq!(req.header("x-helpline-delivery"), id);
    assert_eq!(req.header("content-length"), req.body.len().to_string());
    let ts: i64 = req.header("x-helpline-timestamp").parse().unwrap();
    assert!(ts >= before / 1000 - 1 && ts <= now_ms() / 1000 + 1);
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body, payload);
    verify(
        SECRET.as_bytes(),
        req.header("x-helpline-timestamp"),
        req.header("x-helpline-signature"),
        &req.body,
        now_ms(),
        Duration::from_secs(300),
    )
    .unwrap();

    let stats = hook.stats();
    assert_eq!(
        stats,
        WebhookStats {
            delivered: 1,
            retried: 0,
            dead: 0,
            in_flight: stats.in_flight
        }
    );
    hook.shutdown().await;
    assert_eq!(hook.stats().in_flight, 0);
}

#[tokio::test]
async fn server_errors_are_retried_with_same_id_and_body() {
    let mut rx = Receiver::start(vec![status(500), status(500), ok()]).await;
    let log = Arc::new(MemLog::default());
    let hook = start(config(rx.url()), &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let reqs = [rx.next().await, rx.next().await, rx.next().await];
    let done = log.wait_final(&id).await;
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.attempts, 3);
    assert_eq!(done.last_error, None);
    for r in &reqs {
        assert_eq!(r.header("x-helpline-delivery"), id);
        assert_eq!(r.body, reqs[0].body, "body bytes must not change");
        verify(
            SECRET.as_bytes(),
            r.header("x-helpline-timestamp"),
            r.header("x-helpline-signature"),
            &r.body,
            now_ms(),
            Duration::from_secs(300),
        )
        .unwrap();
    }
    // Backoff: ~30 ms then ~60 ms, each within -20% jitter.
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(24));
    assert!(reqs[2].at - reqs[1].at >= Duration::from_millis(48));

    // Every state change went through the log: enqueue + 3 attempts.
    let history = log.history_of(&id);
    let attempts: Vec<u32> = history.iter().map(|d| d.attempts).collect();
    assert_eq!(attempts, [0, 1, 2, 3]);
    assert!(history[1].last_error.as_deref().unwrap().contains("500"));
    assert!(history[2].next_attempt_ms > history[1].next_attempt_ms);

    wait_in_flight(&hook, 0).await;
    assert_eq!(
        hook.stats(),
        WebhookStats {
            delivered: 1,
            retried: 2,
            dead: 0,
            in_flight: 0
        }
    );
    hook.shutdown().await;
}

#[tokio::test]
async fn unreachable_receiver_goes_dead_after_max_attempts() {
    let addr = dead_addr().await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(format!("http://{addr}/hook"));
    cfg.max_attempts = 3;
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let dead = log.wait_final(&id).await;
    assert_eq!(dead.status, DeliveryStatus::Dead);
    assert_eq!(dead.attempts, 3);
    let err = dead.last_error.unwrap();
    assert!(err.contains("3 attempts"), "{err}");
    assert!(err.contains("connection"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert_eq!(log.pending(10).await.unwrap(), vec![]);
    let stats = hook.stats();
    assert_eq!((stats.dead, stats.retried, stats.delivered), (1, 2, 0));
    hook.shutdown().await;
}

#[tokio::test]
async fn client_error_is_dead_after_one_attempt() {
    let mut rx = Receiver::start(vec![status(400)]).await;
    let log = Arc::new(MemLog::default());
    let hook = start(config(rx.url()), &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    rx.next().await;
    let dead = log.wait_final(&id).await;
    assert_eq!(dead.status, DeliveryStatus::Dead);
    assert_eq!(dead.attempts, 1);
    assert!(dead.last_error.unwrap().contains("400"));
    // No second attempt arrives.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(rx.requests.try_recv().is_err());
    assert_eq!(hook.stats().dead, 1);
    hook.shutdown().await;
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let mut rx = Receiver::start(vec![Reply::Status(429, vec![("retry-after", "1")]), ok()]).await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.max_backoff = Duration::from_secs(5);
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let first = rx.next().await;
    let second = rx.next().await;
    // Normal backoff would be ~30 ms; the receiver asked for 1 s.
    assert!(second.at - first.at >= Duration::from_secs(1));
    assert_eq!(log.wait_final(&id).await.status, DeliveryStatus::Delivered);
    hook.shutdown().await;
}

#[tokio::test]
async fn retry_after_is_capped_at_max_backoff() {
    let mut rx = Receiver::start(vec![
        Reply::Status(503, vec![("retry-after", "3600")]),
        ok(),
    ])
    .await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.max_backoff = Duration::from_millis(300);
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let first = rx.next().await;
    let second = rx.next().await;
    let gap = second.at - first.at;
    assert!(gap >= Duration::from_millis(300), "{gap:?}");
    assert!(gap < Duration::from_secs(5), "{gap:?}");
    assert_eq!(log.wait_final(&id).await.status, DeliveryStatus::Delivered);
    hook.shutdown().await;
}

#[tokio::test]
async fn hanging_receiver_times_out_then_retries() {
    let mut rx = Receiver::start(vec![Reply::Hang, ok()]).await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.timeout = Duration::from_millis(200);
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let first = rx.next().await;
    let second = rx.next().await;
    assert!(second.at - first.at >= Duration::from_millis(200));
    let done = log.wait_final(&id).await;
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert_eq!(done.attempts, 2);
    let after_first = &log.history_of(&id)[1];
    assert_eq!(after_first.attempts, 1);
    assert!(after_first
        .last_error
        .as_deref()
        .unwrap()
        .contains("timed out"));
    hook.shutdown().await;
}

#[tokio::test]
async fn deliveries_do_not_wait_on_each_other() {
    // The first delivery's receiver hangs; the second must still go through.
    let mut rx = Receiver::start(vec![Reply::Hang, ok()]).await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.timeout = Duration::from_secs(5);
    let hook = start(cfg, &log);

    let slow = hook.enqueue("handoff.created", summary()).await.unwrap();
    rx.next().await;
    let fast = hook.enqueue("handoff.created", summary()).await.unwrap();
    let started = Instant::now();
    let done = log.wait_final(&fast).await;
    assert_eq!(done.status, DeliveryStatus::Delivered);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(log.get(&slow).unwrap().status, DeliveryStatus::Pending);
    wait_in_flight(&hook, 1).await;
    hook.shutdown().await;
    // Shutdown abandoned the hanging attempt; the delivery waits for a restart.
    let slow = log.get(&slow).unwrap();
    assert_eq!((slow.status, slow.attempts), (DeliveryStatus::Pending, 0));
}

#[tokio::test]
async fn restart_resumes_pending_deliveries() {
    let addr = dead_addr().await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(format!("http://{addr}/hook"));
    // Long enough that no retry happens before shutdown.
    cfg.initial_backoff = Duration::from_millis(1500);
    cfg.max_backoff = Duration::from_secs(2);

    let hook = start(cfg.clone(), &log);
    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    let failed = log.wait_until(&id, |d| d.attempts == 1).await;
    hook.shutdown().await;
    assert_eq!(failed.status, DeliveryStatus::Pending);
    assert!(failed.last_error.as_deref().unwrap().contains("connection"));
    // Enqueue after shutdown still records the delivery for the next start.
    let late = hook
        .enqueue("handoff.updated", json!({"n": 2}))
        .await
        .unwrap();
    assert_eq!(log.get(&late).unwrap().status, DeliveryStatus::Pending);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(log.get(&id).unwrap().attempts, 1, "sender kept running");

    // The receiver comes up on the same port; a new process starts.
    let listener = TcpListener::bind(addr).await.unwrap();
    let mut rx = Receiver::on(listener, vec![]);
    let hook = start(cfg, &log);
    let mut seen = [rx.next().await, rx.next().await];
    seen.sort_by_key(|r| r.header("x-helpline-event").to_string());
    assert_eq!(seen[0].header("x-helpline-delivery"), id);
    assert_eq!(seen[1].header("x-helpline-delivery"), late);

    let done = log.wait_final(&id).await;
    assert_eq!((done.status, done.attempts), (DeliveryStatus::Delivered, 2));
    // The saved schedule was honoured, not reset by the restart.
    assert!(done.updated_ms >= failed.next_attempt_ms);
    let late = log.wait_final(&late).await;
    assert_eq!((late.status, late.attempts), (DeliveryStatus::Delivered, 1));
    hook.shutdown().await;
}

// ---------------------------------------------------------------- log failures

#[tokio::test]
async fn enqueue_reports_a_failed_initial_save() {
    let mut rx = Receiver::start(vec![]).await;
    let log = Arc::new(MemLog::default());
    let hook = start(config(rx.url()), &log);
    log.fail_saves.store(true, Ordering::SeqCst);

    let err = hook
        .enqueue("handoff.created", summary())
        .await
        .unwrap_err();
    assert!(
        matches!(err, WebhookError::Log(ref m) if m.contains("outage")),
        "{err}"
    );
    // Not recorded, so not sent either.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(rx.requests.try_recv().is_err());
    hook.shutdown().await;
}

#[tokio::test]
async fn failed_state_saves_are_caught_up_later() {
    let mut rx = Receiver::start(vec![status(500), status(500), ok()]).await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.initial_backoff = Duration::from_millis(100);
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    log.fail_saves.store(true, Ordering::SeqCst);
    rx.next().await;
    rx.next().await;
    // Saves after attempts 1 and 2 failed; the sender kept going regardless.
    log.fail_saves.store(false, Ordering::SeqCst);
    rx.next().await;
    let done = log.wait_final(&id).await;
    assert_eq!((done.status, done.attempts), (DeliveryStatus::Delivered, 3));
    assert!(log.failed_saves.load(Ordering::SeqCst) >= 1);
    hook.shutdown().await;
}

#[tokio::test]
async fn final_state_save_is_retried() {
    let mut rx = Receiver::start(vec![Reply::Hang]).await;
    let log = Arc::new(MemLog::default());
    let mut cfg = config(rx.url());
    cfg.timeout = Duration::from_millis(300);
    cfg.max_attempts = 1;
    let hook = start(cfg, &log);

    let id = hook.enqueue("handoff.created", summary()).await.unwrap();
    rx.next().await;
    // The Dead state's first save fails; the log recovers shortly after.
    log.fail_saves.store(true, Ordering::SeqCst);
    let wait = Instant::now();
    while log.failed_saves.load(Ordering::SeqCst) == 0 {
        assert!(wait.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    log.fail_saves.store(false, Ordering::SeqCst);
    let dead = log.wait_final(&id).await;
    assert_eq!(dead.status, DeliveryStatus::Dead);
    assert!(dead.last_error.unwrap().contains("1 attempts"));
    hook.shutdown().await;
}

// ---------------------------------------------------------------- signing

fn independent_hmac(secret: &[u8], message: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    mac.update(message);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[test]
fn sign_matches_an_independent_hmac() {
    let body = br#"{"conversation_id":"conv-1"}"#;
    assert_eq!(
        sign(b"another-secret-value", 1_712_345_678, body),
        independent_hmac(
            b"another-secret-value",
            b"1712345678.{\"conversation_id\":\"conv-1\"}"
        )
    );
    assert_eq!(sign(b"k", 0, b""), independent_hmac(b"k", b"0."));
}

#[test]
fn verify_accepts_good_and_rejects_forgeries_and_replays() {
    let secret = SECRET.as_bytes();
    let body = br#"{"a":1}"#;
    let now = 1_700_000_000_000i64;
    let ts = now / 1000;
    let sig = sign(secret, ts, body);
    let tol = Duration::from_secs(300);
    let ts_str = ts.to_string();

    verify(secret, &ts_str, &sig, body, now, tol).unwrap();
    // Small skew either way is fine.
    verify(secret, &ts_str, &sig, body, now + 299_000, tol).unwrap();
    verify(secret, &ts_str, &sig, body, now - 299_000, tol).unwrap();

    let wrong_secret = verify(b"wrong-secret-0123456", &ts_str, &sig, body, now, tol);
    assert!(matches!(wrong_secret, Err(WebhookError::BadSignature(_))));
    let tampered = verify(secret, &ts_str, &sig, br#"{"a":2}"#, now, tol);
    assert!(matches!(tampered, Err(WebhookError::BadSignature(_))));
    // Moving the timestamp forward to dodge the replay check breaks the MAC.
    let shifted = verify(
        secret,
        &(ts + 600).to_string(),
        &sig,
        body,
        now + 600_000,
        tol,
    );
    assert!(matches!(shifted, Err(WebhookError::BadSignature(_))));
    let stale = verify(secret, &ts_str, &sig, body, now + 301_000, tol);
    assert!(
        matches!(
            stale,
            Err(WebhookError::StaleTimestamp {
                skew_secs: 301,
                tolerance_secs: 300
            })
        ),
        "{stale:?}"
    );
    let future = verify(secret, &ts_str, &sig, body, now - 301_000, tol);
    assert!(matches!(future, Err(WebhookError::StaleTimestamp { .. })));

    let no_prefix = verify(secret, &ts_str, &sig[7..], body, now, tol);
    assert!(matches!(no_prefix, Err(WebhookError::BadSignature(_))));
    let truncated = verify(secret, &ts_str, &sig[..sig.len() - 2], body, now, tol);
    assert!(matches!(truncated, Err(WebhookError::BadSignature(_))));
    let not_hex = verify(secret, &ts_str, "sha256=zz", body, now, tol);
    assert!(matches!(not_hex, Err(WebhookError::BadSignature(_))));
    let bad_ts = verify(secret, "yesterday", &sig, body, now, tol);
    assert!(matches!(bad_ts, Err(WebhookError::BadTimestamp)));
}

// ---------------------------------------------------------------- config

#[test]
fn config_validation_names_the_field() {
    let good = config("http://127.0.0.1:8080/hook".to_string());
    good.validate().unwrap();

    let field_of = |cfg: WebhookConfig| match cfg.validate() {
        Err(e @ WebhookError::Config { field, .. }) => (field, e.to_string()),
        other => panic!("expected a config error, got {other:?}"),
    };

    let (field, msg) = field_of(WebhookConfig {
        url: "https://tickets.example.test/hook".into(),
        ..good.clone()
    });
    assert_eq!(field, "url");
    assert!(msg.contains("TLS is not supported"), "{msg}");
    assert!(msg.contains("proxy"), "{msg}");

    for url in ["ftp://h/x", "tickets.example.test", "http://", ""] {
        let (field, _) = field_of(WebhookConfig {
            url: url.into(),
            ..good.clone()
        });
        assert_eq!(field, "url", "{url}");
    }

    let (field, msg) = field_of(WebhookConfig {
        secret: "short".into(),
        ..good.clone()
    });
    assert_eq!(field, "secret");
    assert!(msg.contains("`secret`") && msg.contains("16"), "{msg}");
    assert!(!msg.contains("short"), "must not echo the secret: {msg}");

    let (field, msg) = field_of(WebhookConfig {
        max_attempts: 0,
        ..good.clone()
    });
    assert_eq!(field, "max_attempts");
    assert!(msg.contains("at least 1"), "{msg}");

    let (field, _) = field_of(WebhookConfig {
        initial_backoff: Duration::ZERO,
        ..good.clone()
    });
    assert_eq!(field, "initial_backoff");

    let (field, msg) = field_of(WebhookConfig {
        max_backoff: Duration::from_millis(1),
        ..good.clone()
    });
    assert_eq!(field, "max_backoff");
    assert!(msg.contains("initial_backoff"), "{msg}");

    let (field, _) = field_of(WebhookConfig {
        timeout: Duration::ZERO,
        ..good.clone()
    });
    assert_eq!(field, "timeout");
}

#[tokio::test]
async fn start_rejects_invalid_config_and_bad_events() {
    let log: Arc<dyn DeliveryLog> = Arc::new(MemLog::default());
    let mut cfg = config("http://127.0.0.1:9/hook".to_string());
    cfg.secret = "x".into();
    assert!(matches!(
        Webhook::start(cfg, log.clone()),
        Err(WebhookError::Config {
            field: "secret",
            ..
        })
    ));

    let hook = Webhook::start(config("http://127.0.0.1:9/hook".to_string()), log).unwrap();
    for event in ["", "has space", "new\nline"] {
        assert!(matches!(
            hook.enqueue(event, json!({})).await,
            Err(WebhookError::InvalidEvent)
        ));
    }
    hook.shutdown().await;
    hook.shutdown().await; // idempotent
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let log: Arc<dyn DeliveryLog> = Arc::new(MemLog::default());
    let result = Webhook::start(config("http://127.0.0.1:9/hook".to_string()), log);
    assert!(matches!(result, Err(WebhookError::NoRuntime)));
}
