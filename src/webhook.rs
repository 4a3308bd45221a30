//! Signed webhook delivery with retries and a dead-letter record.
//!
//! When a conversation is handed off to a human, Helpline POSTs a JSON
//! summary to a URL the operator configured (usually their ticketing
//! system). That receiver is outside our control and will sometimes be down,
//! slow or overloaded, so a delivery is never fire-and-forget:
//!
//! 1. [`Webhook::enqueue`] writes the delivery to a [`DeliveryLog`] *before*
//!    it returns, so a crash right afterwards cannot lose it.
//! 2. A background task sends it, retrying transient failures (connection
//!    errors, timeouts, 5xx, 408, 429) with capped, jittered exponential
//!    backoff, and saves every state change through the log.
//! 3. A delivery that the receiver rejects outright (other 4xx), or that
//!    still fails after `max_attempts`, is marked [`DeliveryStatus::Dead`]
//!    with a human-readable `last_error`. That row is the dead-letter record
//!    an operator inspects (and can re-queue by setting it back to Pending).
//! 4. On [`Webhook::start`] the sender reloads whatever is still Pending, so
//!    deliveries survive restarts.
//!
//! # What the receiver sees
//!
//! Every attempt is a `POST` with `Content-Type: application/json` and these
//! headers:
//!
//! | header | meaning |
//! | --- | --- |
//! | `X-Helpline-Event` | the event name given to `enqueue` |
//! | `X-Helpline-Delivery` | the delivery id; identical on every retry |
//! | `X-Helpline-Timestamp` | unix seconds when this attempt was signed |
//! | `X-Helpline-Signature` | `sha256=<hex HMAC-SHA256 of "{timestamp}.{body}">` |
//! | `User-Agent` | `helpline-webhook/1` |
//!
//! Receivers should check the signature with [`verify`] (or its equivalent in
//! their language) and reject stale timestamps to defeat replays.
//!
//! # At-least-once, so receivers must de-duplicate
//!
//! Delivery is at-least-once, never exactly-once: a response lost on the way
//! back, a crash between sending and saving, or a failed save all lead to the
//! same delivery being sent again. In addition, several Helpline replicas may
//! share one log; each replica resumes *all* Pending rows on start, so it may
//! re-send a delivery another replica is still retrying. No cross-replica
//! locking is attempted. Receivers must therefore treat
//! `X-Helpline-Delivery` as an idempotency key.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HOST, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A boxed, `Send` future, so [`DeliveryLog`] can be used as a trait object
/// without pulling in the `async-trait` crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Header carrying the event name.
pub const HEADER_EVENT: &str = "x-helpline-event";
/// Header carrying the delivery id (the receiver's de-duplication key).
pub const HEADER_DELIVERY: &str = "x-helpline-delivery";
/// Header carrying the unix-seconds timestamp that was signed.
pub const HEADER_TIMESTAMP: &str = "x-helpline-timestamp";
/// Header carrying `sha256=<hex>`.
pub const HEADER_SIGNATURE: &str = "x-helpline-signature";
/// `User-Agent` sent with every attempt; versioned so receivers can tell
/// signature schemes apart if it ever changes.
pub const USER_AGENT_VALUE: &str = "helpline-webhook/1";

/// Shortest accepted secret. HMAC with a short key is guessable offline from
/// any captured request, so short secrets are refused rather than warned about.
pub const MIN_SECRET_LEN: usize = 16;

/// How many Pending deliveries are reloaded on start. A bound keeps a badly
/// backed-up log from exhausting memory; anything beyond it stays Pending and
/// is picked up by a later start once the backlog drains.
pub const RESUME_LIMIT: usize = 10_000;

/// Longest event name accepted, to keep the header a sane size.
const MAX_EVENT_LEN: usize = 128;

/// How often a terminal state (Delivered/Dead) is re-saved when the log keeps
/// failing. A terminal state has no "next state change" to piggyback on, so it
/// gets a few dedicated tries before the failure is only logged.
const FINAL_SAVE_TRIES: u32 = 5;

/// Everything that can go wrong in this module.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A [`WebhookConfig`] field is out of bounds; `field` names it so the
    /// operator knows which setting to fix.
    #[error("invalid webhook config: `{field}` {reason}")]
    Config {
        /// The offending field, e.g. `"secret"`.
        field: &'static str,
        /// What the bound is and what was given.
        reason: String,
    },
    /// The event name cannot be sent as a header value.
    #[error(
        "invalid webhook event name: must be 1-{MAX_EVENT_LEN} visible ASCII characters without spaces"
    )]
    InvalidEvent,
    /// The [`DeliveryLog`] refused a save; for `enqueue` this means the
    /// delivery was *not* recorded and will not be sent.
    #[error("webhook delivery log error: {0}")]
    Log(String),
    /// [`Webhook::start`] was called outside a tokio runtime.
    #[error("the webhook sender must be started from within a tokio runtime")]
    NoRuntime,
    /// The timestamp header is not an integer number of seconds.
    #[error("webhook timestamp header is not a unix-seconds integer")]
    BadTimestamp,
    /// The signature is well-formed and correct but the timestamp is too far
    /// from now: either a replayed request or badly skewed clocks.
    #[error(
        "webhook timestamp is {skew_secs}s away from now, outside the {tolerance_secs}s tolerance (replayed request or clock skew)"
    )]
    StaleTimestamp {
        /// Absolute distance between the timestamp and now, in seconds.
        skew_secs: u64,
        /// The tolerance that was exceeded, in seconds.
        tolerance_secs: u64,
    },
    /// The signature header is malformed or does not match.
    #[error("webhook signature rejected: {0}")]
    BadSignature(&'static str),
}

/// Settings for the webhook sender, normally read from the operator's config.
#[derive(Clone)]
pub struct WebhookConfig {
    /// Receiver URL. Only `http://` is supported for now; see
    /// [`WebhookConfig::validate`] for why and what to do about https.
    pub url: String,
    /// Shared HMAC secret, at least [`MIN_SECRET_LEN`] bytes.
    pub secret: String,
    /// Total attempts (first try included) before a delivery is Dead; ≥ 1.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per attempt after that.
    pub initial_backoff: Duration,
    /// Upper bound on any single delay, including a receiver's Retry-After.
    pub max_backoff: Duration,
    /// Limit for one attempt: connect, send and receive the response head.
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    /// Hand-written so the secret never reaches logs, and so the URL's query
    /// string (ticketing systems often put an API token there) is hidden too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match self.url.split_once('?') {
            Some((base, _)) => format!("{base}?<redacted>"),
            None => self.url.clone(),
        };
        f.debug_struct("WebhookConfig")
            .field("url", &url)
            .field("secret", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks every field against its bound, so a bad config fails at start-up
    /// instead of as a stream of dead deliveries later.
    ///
    /// `https://` URLs are refused: this module speaks plain HTTP only, and
    /// silently downgrading would leak handoff summaries. Until TLS is added,
    /// run a TLS-terminating proxy on the same host and point `url` at it.
    pub fn validate(&self) -> Result<(), WebhookError> {
        parse_url(&self.url)?;
        if self.secret.len() < MIN_SECRET_LEN {
            return Err(config_err(
                "secret",
                format!(
                    "must be at least {MIN_SECRET_LEN} bytes (got {})",
                    self.secret.len()
                ),
            ));
        }
        if self.max_attempts < 1 {
            return Err(config_err("max_attempts", "must be at least 1 (got 0)"));
        }
        if self.initial_backoff.is_zero() {
            return Err(config_err("initial_backoff", "must be greater than 0"));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(config_err(
                "max_backoff",
                format!(
                    "must be at least initial_backoff ({:?}), got {:?}",
                    self.initial_backoff, self.max_backoff
                ),
            ));
        }
        if self.timeout.is_zero() {
            return Err(config_err("timeout", "must be greater than 0"));
        }
        Ok(())
    }
}

fn config_err(field: &'static str, reason: impl Into<String>) -> WebhookError {
    WebhookError::Config {
        field,
        reason: reason.into(),
    }
}

/// Where deliveries are persisted. The server implements this on its
/// database; it must be durable for the retry guarantees to mean anything.
pub trait DeliveryLog: Send + Sync + 'static {
    /// Inserts or replaces the row with `d.id` (upsert). Called on enqueue
    /// and after every attempt.
    fn save(&self, d: &Delivery) -> BoxFuture<'_, Result<(), String>>;
    /// Returns up to `limit` deliveries whose status is Pending, preferably
    /// ordered by `next_attempt_ms` so the most overdue are resumed first.
    fn pending(&self, limit: usize) -> BoxFuture<'_, Result<Vec<Delivery>, String>>;
}

/// Lifecycle of a delivery. Only `Pending` rows are picked up by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Not yet accepted by the receiver; will be (re)tried at `next_attempt_ms`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up on; `last_error` says why. This is the dead-letter record.
    Dead,
}

/// One webhook delivery, exactly as stored in the [`DeliveryLog`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Unique id, also sent as `X-Helpline-Delivery`.
    pub id: String,
    /// Event name, sent as `X-Helpline-Event`.
    pub event: String,
    /// The JSON body.
    pub payload: serde_json::Value,
    /// Where the delivery is in its lifecycle.
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Unix milliseconds when the next attempt is due (meaningful while Pending).
    pub next_attempt_ms: i64,
    /// Why the latest attempt failed; `None` once delivered.
    pub last_error: Option<String>,
    /// Unix milliseconds when the delivery was enqueued.
    pub created_ms: i64,
    /// Unix milliseconds of the latest state change.
    pub updated_ms: i64,
}

/// Counters for `/metrics`. Monotonic since `start`, except `in_flight`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WebhookStats {
    /// Deliveries the receiver accepted.
    pub delivered: u64,
    /// Failed attempts that were scheduled for another try.
    pub retried: u64,
    /// Deliveries given up on (rejected or out of attempts).
    pub dead: u64,
    /// Deliveries the sender currently owns (waiting for their next attempt
    /// or being sent).
    pub in_flight: u64,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    in_flight: AtomicU64,
}

/// The parsed receiver address, computed once at start.
#[derive(Debug, Clone)]
struct Target {
    /// Host for `connect`, without IPv6 brackets.
    host: String,
    port: u16,
    /// `host[:port]` as written, for the `Host` header.
    authority: String,
    /// Origin-form request target (path and query).
    path: String,
}

fn parse_url(url: &str) -> Result<Target, WebhookError> {
    let lower = url.trim().to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(config_err(
            "url",
            "uses https://, but TLS is not supported yet; run a local TLS-terminating \
             proxy (for example on http://127.0.0.1:<port>/) that forwards to the https \
             endpoint, and point `url` at it",
        ));
    }
    if !lower.starts_with("http://") {
        return Err(config_err("url", "must start with http://"));
    }
    let uri: Uri = url
        .trim()
        .parse()
        .map_err(|e| config_err("url", format!("is not a valid URL: {e}")))?;
    let authority = uri
        .authority()
        .ok_or_else(|| config_err("url", "has no host"))?;
    if authority.as_str().contains('@') {
        // Basic-auth credentials over plain HTTP would be sent in clear text;
        // the HMAC signature is the authentication mechanism here.
        return Err(config_err(
            "url",
            "must not contain credentials (user:password@); receivers authenticate \
             requests with the X-Helpline-Signature header",
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(config_err("url", "has no host"));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(Target {
        host,
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_string(),
        path,
    })
}

/// Signs a webhook body: `sha256=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`.
///
/// The timestamp is inside the MAC so an attacker cannot replay an old body
/// with a fresh timestamp; the receiver then only has to bound the timestamp's
/// age (see [`verify`]).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac_for(secret, timestamp, body).finalize().into_bytes();
    format!("sha256={}", hex_encode(&tag))
}

/// Checks a received webhook: the signature must match and the timestamp
/// must be within `tolerance` of `now_ms` (either direction, to allow some
/// clock skew between sender and receiver).
///
/// The comparison is constant-time (`hmac`'s `verify_slice`), so response
/// timing leaks nothing about the expected signature. The signature is
/// checked before freshness, so `StaleTimestamp` is only ever reported for an
/// authentic request, which makes clock-skew problems easy to tell apart from
/// forgeries.
pub fn verify(
    secret: &[u8],
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_ms: i64,
    tolerance: Duration,
) -> Result<(), WebhookError> {
    let timestamp: i64 = timestamp_header
        .trim()
        .parse()
        .map_err(|_| WebhookError::BadTimestamp)?;
    let hex = signature_header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(WebhookError::BadSignature("expected `sha256=<hex>`"))?;
    let expected = hex_decode(hex).ok_or(WebhookError::BadSignature("not valid hex"))?;
    mac_for(secret, timestamp, body)
        .verify_slice(&expected)
        .map_err(|_| WebhookError::BadSignature("does not match"))?;
    let skew_ms = now_ms.saturating_sub(timestamp.saturating_mul(1000));
    if u128::from(skew_ms.unsigned_abs()) > tolerance.as_millis() {
        return Err(WebhookError::StaleTimestamp {
            skew_secs: skew_ms.unsigned_abs() / 1000,
            tolerance_secs: tolerance.as_secs(),
        });
    }
    Ok(())
}

fn mac_for(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC is defined for keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// Handle to the background sender. Cheap to clone; all clones share one
/// sender. Dropping every clone without calling [`Webhook::shutdown`] also
/// stops the sender (pending deliveries stay Pending in the log).
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Unbounded so `enqueue` never waits on the sender; every message is
    /// already durable in the log, so memory is the only cost.
    tx: mpsc::UnboundedSender<Delivery>,
    /// `true` once shutdown was requested. Dropping it also stops the sender.
    stop: watch::Sender<bool>,
    dispatcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the sender tasks need; deliberately not `Inner`, so the tasks do not
/// keep the channel sender alive and the sender can notice when every
/// `Webhook` handle is gone.
struct Shared {
    cfg: WebhookConfig,
    target: Target,
    log: Arc<dyn DeliveryLog>,
    counters: Counters,
}

impl Webhook {
    /// Validates `cfg` and starts the background sender on the current tokio
    /// runtime.
    ///
    /// The sender first loads up to [`RESUME_LIMIT`] Pending deliveries from
    /// `log` and resumes them on their saved schedule, so nothing is lost
    /// across restarts. If several replicas share `log`, each one resumes
    /// every Pending row, so a delivery another replica is still retrying can
    /// be sent twice; receivers de-duplicate by `X-Helpline-Delivery`.
    pub fn start(cfg: WebhookConfig, log: Arc<dyn DeliveryLog>) -> Result<Webhook, WebhookError> {
        cfg.validate()?;
        let target = parse_url(&cfg.url)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| WebhookError::NoRuntime)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            target,
            log,
            counters: Counters::default(),
        });
        let dispatcher = runtime.spawn(dispatch(shared.clone(), rx, stop_rx));
        Ok(Webhook {
            inner: Arc::new(Inner {
                shared,
                tx,
                stop,
                dispatcher: Mutex::new(Some(dispatcher)),
            }),
        })
    }

    /// Records a new Pending delivery and hands it to the sender; returns its id.
    ///
    /// The save happens before this returns, so an `Ok` id is durable. If the
    /// save fails the error is returned and nothing will be sent: the caller
    /// must know the handoff notification was not recorded. The receiver is
    /// never awaited here.
    ///
    /// After [`Webhook::shutdown`] the delivery is still saved (and `Ok` is
    /// returned) but not sent until the next start.
    pub async fn enqueue(
        &self,
        event: &str,
        payload: serde_json::Value,
    ) -> Result<String, WebhookError> {
        if event.is_empty()
            || event.len() > MAX_EVENT_LEN
            || !event.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(WebhookError::InvalidEvent);
        }
        let now = now_ms();
        let delivery = Delivery {
            id: new_delivery_id(),
            event: event.to_string(),
            payload,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_ms: now,
            last_error: None,
            created_ms: now,
            updated_ms: now,
        };
        self.inner
            .shared
            .log
            .save(&delivery)
            .await
            .map_err(WebhookError::Log)?;
        let id = delivery.id.clone();
        if *self.inner.stop.borrow() || self.inner.tx.send(delivery).is_err() {
            tracing::info!(
                delivery_id = %id,
                "webhook sender is stopped; delivery saved as pending for the next start"
            );
        }
        Ok(id)
    }

    /// Stops the sender and waits for it to finish.
    ///
    /// Waiting deliveries stop at once; an attempt in progress is abandoned
    /// (the receiver may still have got it, which de-duplication covers).
    /// Everything not yet Delivered or Dead stays Pending in the log with its
    /// saved schedule, for the next [`Webhook::start`]. Calling it again is a
    /// no-op.
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let handle = self
            .inner
            .dispatcher
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                tracing::error!("webhook sender task failed: {e}");
            }
        }
    }

    /// A snapshot of the sender's counters.
    pub fn stats(&self) -> WebhookStats {
        let c = &self.inner.shared.counters;
        WebhookStats {
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// Owns one task per delivery, so deliveries due at the same time proceed in
/// parallel while each one's attempts stay strictly sequential.
async fn dispatch(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tasks = DeliveryTasks {
        shared: shared.clone(),
        stop: stop.clone(),
        set: JoinSet::new(),
        active_ids: HashSet::new(),
        task_ids: HashMap::new(),
    };

    let resumed = tokio::select! {
        r = shared.log.pending(RESUME_LIMIT) => r,
        _ = stopped(&mut stop) => return,
    };
    match resumed {
        Ok(list) => {
            if list.len() >= RESUME_LIMIT {
                tracing::warn!(
                    limit = RESUME_LIMIT,
                    "webhook backlog exceeds the resume limit; the rest stays pending for a later start"
                );
            }
            if !list.is_empty() {
                tracing::info!(count = list.len(), "resuming pending webhook deliveries");
            }
            for d in list {
                tasks.spawn(d);
            }
        }
        Err(e) => tracing::error!(
            "could not load pending webhook deliveries; they stay pending for the next start: {e}"
        ),
    }

    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(d) => tasks.spawn(d),
                // Every `Webhook` handle is gone; the dropped stop sender
                // makes the delivery tasks wind down too.
                None => break,
            },
            Some(res) = tasks.set.join_next_with_id() => tasks.finished(res),
            _ = stopped(&mut stop) => break,
        }
    }
    while let Some(res) = tasks.set.join_next_with_id().await {
        tasks.finished(res);
    }
}

/// The dispatcher's bookkeeping of running delivery tasks.
struct DeliveryTasks {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    set: JoinSet<()>,
    /// A delivery can arrive twice (enqueued while the resume query was
    /// running, or listed twice by the log); one task per id keeps "never two
    /// attempts in flight" true.
    active_ids: HashSet<String>,
    /// Maps tasks back to delivery ids, including tasks that panicked.
    task_ids: HashMap<tokio::task::Id, String>,
}

impl DeliveryTasks {
    fn spawn(&mut self, d: Delivery) {
        if d.status != DeliveryStatus::Pending || !self.active_ids.insert(d.id.clone()) {
            return;
        }
        self.shared
            .counters
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        let id = d.id.clone();
        let handle = self
            .set
            .spawn(drive(self.shared.clone(), d, self.stop.clone()));
        self.task_ids.insert(handle.id(), id);
    }

    fn finished(&mut self, res: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let task_id = match res {
            Ok((task_id, ())) => task_id,
            Err(e) => {
                tracing::error!("webhook delivery task failed: {e}");
                e.id()
            }
        };
        if let Some(id) = self.task_ids.remove(&task_id) {
            self.active_ids.remove(&id);
        }
        self.shared
            .counters
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once shutdown is requested or the `Webhook` handles are gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What one attempt came to.
#[derive(Debug, PartialEq)]
enum Outcome {
    Delivered,
    /// Transient failure; `retry_after` is the receiver's hint, if any.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Permanent failure; retrying would get the same answer.
    Reject(String),
}

/// Runs one delivery to completion (Delivered or Dead) or until shutdown.
async fn drive(shared: Arc<Shared>, mut d: Delivery, mut stop: watch::Receiver<bool>) {
    // Serialised once so every retry sends byte-identical bodies. After a
    // restart the payload is re-serialised from the stored `Value`, which is
    // deterministic for the same stored value.
    let body = match serde_json::to_vec(&d.payload) {
        Ok(b) => Bytes::from(b),
        Err(e) => {
            d.status = DeliveryStatus::Dead;
            d.last_error = Some(format!("payload could not be serialised: {e}"));
            d.updated_ms = now_ms();
            shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            save_final(&shared, &d, &mut stop).await;
            return;
        }
    };
    let mut due = instant_at(d.next_attempt_ms);
    // Set when the latest state could not be saved; the next save (which
    // always writes the whole row) then catches the log up.
    let mut unsaved = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stopped(&mut stop) => break,
        }
        let outcome = tokio::select! {
            o = attempt(&shared, &d, body.clone()) => o,
            _ = stopped(&mut stop) => break,
        };
        let now = now_ms();
        d.attempts += 1;
        d.updated_ms = now;
        let max = shared.cfg.max_attempts;
        match outcome {
            Outcome::Delivered => {
                d.status = DeliveryStatus::Delivered;
                d.last_error = None;
                shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(delivery_id = %d.id, attempts = d.attempts, "webhook delivered");
            }
            Outcome::Reject(error) => {
                d.status = DeliveryStatus::Dead;
                tracing::warn!(delivery_id = %d.id, attempts = d.attempts, "webhook dead: {error}");
                d.last_error = Some(error);
                shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Retry { error, .. } if d.attempts >= max => {
                d.status = DeliveryStatus::Dead;
                let error = format!(
                    "gave up after {} attempts; last failure: {error}",
                    d.attempts
                );
                tracing::warn!(delivery_id = %d.id, "webhook dead: {error}");
                d.last_error = Some(error);
                shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Retry { error, retry_after } => {
                let delay = retry_delay(&shared.cfg, d.attempts, retry_after, jitter_factor());
                d.next_attempt_ms = now.saturating_add(delay.as_millis() as i64);
                due = Instant::now() + delay;
                tracing::debug!(
                    delivery_id = %d.id,
                    attempts = d.attempts,
                    delay_ms = delay.as_millis() as u64,
                    "webhook attempt failed, will retry: {error}"
                );
                d.last_error = Some(error);
                shared.counters.retried.fetch_add(1, Ordering::Relaxed);
            }
        }
        if d.status != DeliveryStatus::Pending {
            save_final(&shared, &d, &mut stop).await;
            return;
        }
        unsaved = !save(&shared, &d).await;
    }
    if unsaved {
        // One last chance so the next start resumes from the newest state.
        save(&shared, &d).await;
    }
}

/// Saves `d`, logging (not propagating) a failure: the sender must keep
/// going, and the next save rewrites the whole row anyway.
async fn save(shared: &Shared, d: &Delivery) -> bool {
    match shared.log.save(d).await {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                delivery_id = %d.id,
                status = ?d.status,
                attempts = d.attempts,
                "could not save webhook delivery state; retrying on the next state change: {e}"
            );
            false
        }
    }
}

/// Saves a terminal state, retrying a few times with backoff because there is
/// no later state change that would carry it.
async fn save_final(shared: &Shared, d: &Delivery, stop: &mut watch::Receiver<bool>) {
    for i in 0..FINAL_SAVE_TRIES {
        if save(shared, d).await {
            return;
        }
        if i + 1 == FINAL_SAVE_TRIES || *stop.borrow() {
            break;
        }
        let delay = retry_delay(&shared.cfg, i + 1, None, 1.0);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(stop) => {}
        }
    }
    tracing::error!(
        delivery_id = %d.id,
        status = ?d.status,
        "gave up saving the final webhook delivery state; the log still holds an older \
         Pending state, so it may be sent again after a restart"
    );
}

/// One HTTP attempt, bounded by the per-attempt timeout.
async fn attempt(shared: &Shared, d: &Delivery, body: Bytes) -> Outcome {
    let timeout = shared.cfg.timeout;
    let request = match build_request(shared, d, body) {
        Ok(r) => r,
        // Only a malformed stored id/event gets here; it would fail forever.
        Err(e) => return Outcome::Reject(format!("could not build the request: {e}")),
    };
    match tokio::time::timeout(timeout, send(&shared.target, request)).await {
        Err(_) => Outcome::Retry {
            error: format!(
                "timed out after {}ms waiting for the receiver",
                timeout.as_millis()
            ),
            retry_after: None,
        },
        Ok(Err(error)) => Outcome::Retry {
            error,
            retry_after: None,
        },
        Ok(Ok((status, retry_after))) => classify(status, retry_after),
    }
}

fn build_request(
    shared: &Shared,
    d: &Delivery,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    // Fresh per attempt: a retry hours later must not look like a replay.
    let timestamp = now_ms().div_euclid(1000);
    let signature = sign(shared.cfg.secret.as_bytes(), timestamp, &body);
    Request::builder()
        .method(Method::POST)
        .uri(shared.target.path.as_str())
        .header(HOST, shared.target.authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(HEADER_EVENT, d.event.as_str())
        .header(HEADER_DELIVERY, d.id.as_str())
        .header(HEADER_TIMESTAMP, timestamp.to_string())
        .header(HEADER_SIGNATURE, signature)
        .body(Full::new(body))
}

/// Sends the request on a fresh connection and returns the response status
/// and any `Retry-After` seconds. A connection per attempt avoids the stale
/// pooled-connection failures that would otherwise show up as spurious
/// retries; webhook volume is far too low for the handshake cost to matter.
async fn send(
    target: &Target,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Option<Duration>), String> {
    let to = crate::httpc::Target { host: target.host.clone(), port: target.port, authority: target.authority.clone() };
    // The receiver's answer body is not used; a small one is read so the exchange completes.
    let (status, headers, _) = crate::httpc::exchange(&to, request, 1 << 20).await?;
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    Ok((status, retry_after))
}

/// Only the delay-seconds form; the HTTP-date form is rare for webhooks and
/// falls back to normal backoff.
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn classify(status: StatusCode, retry_after: Option<Duration>) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let transient = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    if transient {
        let honour_hint =
            status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
        Outcome::Retry {
            error: format!("receiver answered HTTP {status}"),
            retry_after: retry_after.filter(|_| honour_hint),
        }
    } else {
        // 3xx and other 4xx: the same request would get the same answer.
        Outcome::Reject(format!(
            "receiver rejected the delivery with HTTP {status}; not retried"
        ))
    }
}

/// Delay before the attempt after `attempts` failures:
/// `min(max_backoff, initial_backoff * 2^(attempts-1))` scaled by `jitter`,
/// never above `max_backoff`. A receiver's `Retry-After` raises the delay to
/// at least that much (still capped, so a hostile or buggy receiver cannot
/// park deliveries for days).
fn retry_delay(
    cfg: &WebhookConfig,
    attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exp = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .and_then(|factor| cfg.initial_backoff.checked_mul(factor))
        .unwrap_or(cfg.max_backoff)
        .min(cfg.max_backoff);
    let backoff = exp.mul_f64(jitter).min(cfg.max_backoff);
    match retry_after {
        Some(hint) => hint.max(backoff).min(cfg.max_backoff),
        None => backoff,
    }
}

/// ±20%, so deliveries that failed together (receiver outage) do not all
/// retry in the same instant and knock it over again.
fn jitter_factor() -> f64 {
    rand::thread_rng().gen_range(0.8..=1.2)
}

fn new_delivery_id() -> String {
    format!("whd_{}", hex_encode(&rand::random::<[u8; 16]>()))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Converts a stored wall-clock due time into a monotonic deadline; overdue
/// deliveries become due now.
fn instant_at(due_ms: i64) -> Instant {
    let wait = due_ms.saturating_sub(now_ms()).max(0) as u64;
    Instant::now() + Duration::from_millis(wait)
}

/// Flattens an error and its sources; hyper's top-level messages alone
/// ("connection error") are too vague for a dead-letter record.

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WebhookConfig {
        WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "0123456789abcdef".into(),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn sign_matches_known_vector() {
        // Computed outside Rust (Python's hmac module) for this exact input.
        let sig = sign(
            b"0123456789abcdef-secret",
            1_700_000_000,
            br#"{"ticket":42}"#,
        );
        assert_eq!(
            sig,
            "sha256=c8cb98ff9bb32617dc2c888fc80dd2d68caa11110a89b146ad1b6108be73b748"
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex_encode(&bytes), "0001abff");
        assert_eq!(hex_decode("0001ABff").unwrap(), bytes);
        assert!(hex_decode("abc").is_none());
        assert!(hex_decode("zz").is_none());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = cfg();
        let ms = |n, hint| retry_delay(&c, n, hint, 1.0).as_millis();
        assert_eq!(ms(1, None), 100);
        assert_eq!(ms(2, None), 200);
        assert_eq!(ms(4, None), 800);
        assert_eq!(ms(5, None), 1000);
        assert_eq!(ms(40, None), 1000);
        assert_eq!(ms(u32::MAX, None), 1000);
        // Jitter stays within ±20% and never exceeds the cap.
        assert_eq!(retry_delay(&c, 1, None, 0.8).as_millis(), 80);
        assert_eq!(retry_delay(&c, 1, None, 1.2).as_millis(), 120);
        assert_eq!(retry_delay(&c, 5, None, 1.2).as_millis(), 1000);
        // Retry-After raises the delay but is capped.
        assert_eq!(ms(1, Some(Duration::from_millis(500))), 500);
        assert_eq!(ms(1, Some(Duration::from_secs(3600))), 1000);
        assert_eq!(ms(3, Some(Duration::ZERO)), 400);
        for _ in 0..100 {
            let j = jitter_factor();
            assert!((0.8..=1.2).contains(&j));
        }
    }

    #[test]
    fn statuses_are_classified() {
        let retry = |code: u16| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None),
                Outcome::Retry { .. }
            )
        };
        assert_eq!(classify(StatusCode::OK, None), Outcome::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Outcome::Delivered);
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(retry(code), "{code} should be retried");
        }
        for code in [301, 400, 401, 403, 404, 410, 422] {
            assert!(!retry(code), "{code} should not be retried");
        }
        let hint = Some(Duration::from_secs(2));
        let kept = |code| match classify(StatusCode::from_u16(code).unwrap(), hint) {
            Outcome::Retry { retry_after, .. } => retry_after,
            other => panic!("{other:?}"),
        };
        assert_eq!(kept(429), hint);
        assert_eq!(kept(503), hint);
        assert_eq!(kept(500), None);
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn urls_are_parsed() {
        let t = parse_url("http://example.test:8080/a/b?token=x").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            ("example.test", 8080, "example.test:8080", "/a/b?token=x")
        );
        let t = parse_url("http://[::1]/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert_eq!(parse_url("http://h").unwrap().path, "/");
        assert!(parse_url("http://user:pw@h/").is_err());
        assert!(parse_url("ftp://h/").is_err());
        assert!(parse_url("http:///nohost").is_err());
    }

    #[test]
    fn debug_hides_secret_and_query() {
        let mut c = cfg();
        c.url = "http://h/hook?api_key=topsecret".into();
        let shown = format!("{c:?}");
        assert!(!shown.contains("0123456789abcdef"));
        assert!(!shown.contains("topsecret"));
        assert!(shown.contains("http://h/hook?<redacted>"));
    }
}
