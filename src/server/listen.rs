//! Serving the router on a socket: our own accept loop over hyper's HTTP/1 connection builder, so
//! that slow or oversized request heads are cut off (axum::serve arms no header timeout), and a
//! graceful shutdown that stops accepting, lets in-flight requests finish within a grace period,
//! then returns.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::{AppState, Loaded, SharedState};
use crate::config::{self, ServeArgs, ServeConfig};
use crate::engine::{Engine, EngineConfig, ModelBundle};
use crate::model::fetch::{self, HubConfig};
use crate::guard::grammar::GuardCompiler;
use crate::guard::ActivePolicy;
use crate::retrieval::{build_index, IndexOptions, KnowledgeBase};

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting (the listener is
/// closed, so new connections are refused), lets open connections finish their in-flight request
/// for up to `cfg.shutdown_grace`, cuts the rest, and returns.
///
/// Each connection: HTTP/1.1 with keep-alive; the request head must arrive within
/// `cfg.header_read_timeout` (also while a kept-alive connection idles) and fit in
/// `cfg.max_header_bytes`, else the connection is closed (431 for an oversized head). A write
/// that stalls for `cfg.write_timeout` (a reader that stopped reading) closes the connection.
///
/// At most `cfg.max_connections` connections are open at once (more get a 503 with
/// `Retry-After` and are closed), and `cfg.max_connections_per_ip` from one address (more get a
/// 429), so slow clients cannot use up the file descriptors.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_header_size(cfg.max_header_bytes)
        .max_buf_size((cfg.max_header_bytes + 8192).max(64 << 10))
        .keep_alive(true);

    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    let counts = Arc::new(Mutex::new(ConnCounts::default()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let slot = match ConnSlot::take(&counts, peer.ip(), cfg.max_connections, cfg.max_connections_per_ip) {
                        Ok(slot) => slot,
                        Err(refusal) => {
                            // Answered and closed at once, off the accept loop.
                            conns.spawn(refuse(stream, refusal));
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let stream = WriteTimeout::new(stream, cfg.write_timeout);
                    let svc = app.clone().map_request(move |mut req: hyper::Request<Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        req
                    });
                    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                    let conn = graceful.watch(conn);
                    conns.spawn(async move {
                        let _slot = slot;
                        if let Err(e) = conn.await {
                            tracing::debug!(peer = %peer, error = %e, "connection closed with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = &mut shutdown => break,
        }
    }
    drop(listener);

    let open = graceful.count();
    tracing::info!(open, grace_s = cfg.shutdown_grace.as_secs_f64(), "stopped accepting; draining connections");
    if tokio::time::timeout(cfg.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(cut = conns.len(), "shutdown grace period over; closing the remaining connections");
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}

/// Open connections, overall and per client address.
#[derive(Default)]
struct ConnCounts {
    total: usize,
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

/// Why a connection was refused.
enum Refusal {
    Overall(usize),
    PerIp(usize),
}

/// One open connection, counted until dropped.
struct ConnSlot {
    counts: Arc<Mutex<ConnCounts>>,
    ip: std::net::IpAddr,
}

impl ConnSlot {
    fn take(counts: &Arc<Mutex<ConnCounts>>, ip: std::net::IpAddr, max: usize, per_ip: usize) -> Result<ConnSlot, Refusal> {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= max {
            return Err(Refusal::Overall(max));
        }
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if mine >= per_ip {
            return Err(Refusal::PerIp(per_ip));
        }
        c.total += 1;
        c.per_ip.insert(ip, mine + 1);
        Ok(ConnSlot { counts: counts.clone(), ip })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over a cap in the error table's shape and closes it (within a second:
/// a client that does not read is dropped).
async fn refuse(mut stream: tokio::net::TcpStream, why: Refusal) {
    use tokio::io::AsyncWriteExt;
    let (status, code, message) = match why {
        Refusal::Overall(n) => ("503 Service Unavailable", "too_many_connections", format!("the server has its limit of {n} open connections; retry shortly")),
        Refusal::PerIp(n) => ("429 Too Many Requests", "too_many_connections", format!("this address has the limit of {n} open connections; close some or retry shortly")),
    };
    let kind = if status.starts_with("503") { "server_error" } else { "rate_limit_error" };
    let body = serde_json::json!({"error": {"message": message, "type": kind, "code": code, "param": null}}).to_string();
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A socket whose writes may not stall longer than a limit: a client that stops reading (a
/// stream it no longer consumes) is cut instead of holding the connection and its answer.
pub struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        WriteTimeout { inner, limit, stalled: None }
    }

    fn on_pending(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let limit = self.limit;
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("a write to the client stalled for {limit:?}"),
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<S> {
    fn poll_read(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<S> {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => {
                this.stalled = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => this.on_pending(cx).map(|r| r.map(|()| 0)),
        }
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            std::task::Poll::Ready(r) => {
                this.stalled = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => this.on_pending(cx),
        }
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            std::task::Poll::Ready(r) => {
                this.stalled = None;
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => this.on_pending(cx).map(|r| r.map(|()| 0)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// `helpline serve`: resolve the config, bind, load the model in the background, serve until
/// SIGTERM/SIGINT, drain, and exit 0.
pub fn run_cli(model: Option<String>, threads: usize, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(model, threads, args)?;
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 4);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("helpline-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (outcome, state) = rt.block_on(run(cfg))?;
    rt.shutdown_timeout(Duration::from_secs(1));
    // The engine goes last: it finishes or cancels what is left and joins its thread.
    drop(state);
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn run(mut cfg: ServeConfig) -> anyhow::Result<(anyhow::Result<()>, SharedState)> {
    let addr = SocketAddr::new(cfg.host, cfg.port);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let bound = listener.local_addr().with_context(|| format!("cannot listen on {addr}"))?;
    cfg.port = bound.port();

    // Handlers for SIGTERM/SIGINT exist before anyone learns where we listen.
    let mut signals = Signals::new().context("cannot install signal handlers")?;

    if !cfg.host.is_loopback() && cfg.api_key_hashes.is_empty() {
        eprintln!(
            "warning: listening on {} without API keys: anyone who can reach this address can use the server \
             (set --api-key or --api-keys-file)",
            cfg.host
        );
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "Helpline listening on http://{bound} (model: {})", cfg.model_id)?;
        out.flush()?;
    }

    let state = AppState::new(cfg.clone());
    // Conversations are stored before anything is answered: no store, no server.
    super::conversations::open(&state).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let app = super::router(state.clone());

    let (load_tx, load_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    {
        let state = state.clone();
        std::thread::Builder::new()
            .name("helpline-load".into())
            .spawn(move || {
                let _ = load_tx.send(load_model(&state));
            })
            .context("cannot start the model loading thread")?;
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let failure = Arc::new(Mutex::new(None::<String>));
    let watcher = {
        let failure = failure.clone();
        tokio::spawn(async move {
            let failed = tokio::select! {
                _ = signals.recv() => None,
                Ok(Err(msg)) = load_rx => Some(msg),
            };
            let was_signal = failed.is_none();
            *failure.lock().unwrap_or_else(|e| e.into_inner()) = failed;
            let _ = stop_tx.send(());
            if was_signal {
                eprintln!("helpline: shutting down; finishing in-flight requests (signal again to stop at once)");
                signals.recv().await;
                eprintln!("helpline: second signal; exiting now");
                std::process::exit(1);
            }
        })
    };

    serve(listener, app, &cfg, async {
        let _ = stop_rx.await;
    })
    .await
    .context("the server failed")?;
    watcher.abort();

    let outcome = match failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(msg) => Err(anyhow::anyhow!("{msg}")),
        None => Ok(()),
    };
    Ok((outcome, state))
}

/// Resolves, loads and starts the model, then makes it available to the handlers.
fn load_model(state: &AppState) -> Result<(), String> {
    let cfg = &state.config;
    let policy = ActivePolicy::load(&cfg.grounding.policy_file).map_err(|e| format!("{e}; fix the pack or point --policy-file at a valid one"))?;
    eprintln!("helpline: policy pack {} ({}) in force", policy.pack.version, cfg.grounding.policy_file.display());
    state.set_policy(policy);
    if state.embedder().is_err() {
        let embedder = fetch::load_embedder(&mut |msg| eprintln!("{msg}")).map_err(|e| format!("cannot load the sentence-embedding model: {e}"))?;
        state.set_embedder(Arc::new(embedder));
    }
    open_knowledge(state)?;
    let actions = state.load_actions().map_err(|e| format!("{e}; fix the file, or leave out `actions_file` to serve without actions"))?;
    if let Some(a) = &actions {
        eprintln!("helpline: {} actions from {} in force", a.actions.actions.len(), a.source);
    }
    state.set_actions(actions);
    if let Ok(policy) = state.policy() {
        crate::turn::check_decision_articles(&policy, state.knowledge().ok().as_ref()).map_err(|e| format!("{e}; fix the pack or the docs"))?;
    }
    let start = Instant::now();
    let path = fetch::resolve_model_arg(cfg.model.as_deref(), &HubConfig::from_env(), &mut |msg| eprintln!("{msg}"))
        .map_err(|e| format!("cannot find the model: {e}"))?;
    let device = device().map_err(|e| format!("cannot open the compute device: {e}"))?;
    let bundle = ModelBundle::load(&path, &device).map_err(|e| format!("cannot load model {}: {e}", path.display()))?;
    let engine = Engine::start(
        &bundle.model,
        bundle.tokenizer.clone(),
        EngineConfig { queue_capacity: cfg.queue_capacity, max_active: cfg.max_concurrent, prefill_chunk: 256 },
    )
    .map_err(|e| format!("cannot start the engine: {e}"))?;
    let guard = GuardCompiler::new(&bundle.tokenizer).map_err(|e| format!("cannot prepare output constraints for the model's tokenizer: {e}"))?;
    // Every grammar the pack needs, compiled before the first customer arrives.
    let t = Instant::now();
    if let Ok(policy) = state.policy() {
        policy
            .precompile(&guard, cfg.grounding.passages)
            .map_err(|e| format!("the policy pack's grammar does not compile: {e}"))?;
        eprintln!("helpline: policy grammars compiled in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    state.set_loaded(Loaded { bundle, engine, guard: Arc::new(guard) });
    eprintln!("helpline: model {} ready in {:.1} s", path.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// Brings the index up to date with the docs (when `auto_index` is on) and opens it. With grounding
/// on, a failure here stops the start-up: a server that cannot ground answers must not pretend to.
fn open_knowledge(state: &AppState) -> Result<(), String> {
    let g = &state.config.grounding;
    let result = (|| {
        let embedder = state.embedder().map_err(|e| e.message)?;
        if g.auto_index {
            let report = build_index(&IndexOptions { docs_dir: g.docs_dir.clone(), index_dir: g.index_dir.clone(), embedder: embedder.clone() })
                .map_err(|e| format!("cannot index {}: {e}", g.docs_dir.display()))?;
            eprintln!("helpline: index {}: {}", g.index_dir.display(), report.to_string().trim_end());
        }
        KnowledgeBase::open(&g.index_dir, embedder).map_err(|e| format!("cannot open the search index: {e}"))
    })();
    match result {
        Ok(kb) => {
            eprintln!("helpline: knowledge base ready ({} articles, {} passages, version {})", kb.num_documents(), kb.num_chunks(), kb.version());
            state.set_knowledge(kb);
            Ok(())
        }
        Err(msg) if g.enabled => Err(format!("{msg} (grounding is on; fix the docs or index, or start with --grounding false)")),
        Err(msg) => {
            eprintln!("helpline: warning: {msg}; grounding is off, so chat answers are not grounded");
            Ok(())
        }
    }
}

#[cfg(feature = "cuda")]
fn device() -> candle_core::Result<candle_core::Device> {
    candle_core::Device::cuda_if_available(0)
}

#[cfg(not(feature = "cuda"))]
fn device() -> candle_core::Result<candle_core::Device> {
    Ok(candle_core::Device::Cpu)
}

/// SIGTERM and SIGINT (Ctrl-C), registered up front.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        {
            Ok(Signals {})
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

