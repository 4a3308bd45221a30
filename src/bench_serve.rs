//! `helpline bench serve`: a load generator for any OpenAI-compatible endpoint.
//!
//! C workers share one queue of N requests (after W unmeasured warm-up requests). Each request is a streaming
//! `POST {url}/v1/chat/completions`; the response is read with a small HTTP/1.1 client written here (plain
//! TCP, keep-alive per worker, chunked / content-length / close-delimited bodies) and an SSE parser, so the
//! arrival time of every content chunk is seen as the bytes come off the socket.
//!
//! Per request: time to first content chunk (TTFT), the gaps between content chunks (ITL), total latency,
//! and output tokens (`usage.completion_tokens` when the server reports it, else the number of content chunks).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The prompt used when neither `--prompt` nor `--prompts-file` is given.
pub const DEFAULT_PROMPT: &str = "Write a short story about a lighthouse keeper who finds a message in a bottle.";

/// Longest response head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Longest SSE line or chunk-size line accepted.
const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// How much of an error body is kept for the failure summary.
const ERROR_SNIPPET_CHARS: usize = 160;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// Base URL of the server, e.g. http://127.0.0.1:8080 (plain http only; a trailing /v1 is accepted).
    #[arg(long)]
    pub url: String,
    /// Concurrent streams (workers), each with its own keep-alive connection.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub concurrency: usize,
    /// Measured requests in total (shared by all workers).
    #[arg(short = 'n', long, default_value_t = 32)]
    pub requests: usize,
    /// `max_tokens` sent with every request.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// The user message sent with every request.
    #[arg(long, conflicts_with = "prompts_file")]
    pub prompt: Option<String>,
    /// A file with one prompt per line (blank lines skipped); requests cycle through them.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Model name sent in each request (default: the first id from GET /v1/models). Named apart
    /// from the global `--model`, which is a GGUF file for the local commands.
    #[arg(long = "model-name", id = "model_name")]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Sampling temperature sent with every request.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Unmeasured warm-up requests run before the measured ones.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Limit for the whole run (warm-up included); requests still running then count as failed.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Send `helpline.grounding` with every request (Helpline servers only): `true` answers from the
    /// docs (retrieval in the measured time), `false` plain chat. Not sent when absent.
    #[arg(long, value_name = "BOOL")]
    pub grounding: Option<bool>,
    /// Send `helpline.answer_mode` (`assembled`, `generative` or `quote`; Helpline servers only).
    #[arg(long)]
    pub answer_mode: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl ServeBenchArgs {
    /// The run configuration these arguments describe (reads `--prompts-file`).
    pub fn to_config(&self) -> Result<ServeBenchConfig> {
        let prompts = match (&self.prompt, &self.prompts_file) {
            (Some(_), Some(_)) => bail!("--prompt and --prompts-file cannot be used together"),
            (Some(p), None) => vec![p.clone()],
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading --prompts-file {}", path.display()))?;
                let prompts: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
                if prompts.is_empty() {
                    bail!("--prompts-file {} has no non-blank lines", path.display());
                }
                prompts
            }
            (None, None) => vec![DEFAULT_PROMPT.to_owned()],
        };
        let model = self.model.clone();
        Ok(ServeBenchConfig {
            url: self.url.clone(),
            concurrency: self.concurrency,
            requests: self.requests,
            max_tokens: self.max_tokens,
            prompts,
            model,
            api_key: self.api_key.clone(),
            temperature: self.temperature,
            warmup: self.warmup,
            timeout: Duration::from_secs(self.timeout_secs),
            grounding: self.grounding,
            answer_mode: self.answer_mode.clone(),
        })
    }
}

/// What [`run`] does.
#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    /// Base URL, `http://host[:port][/prefix]`.
    pub url: String,
    pub concurrency: usize,
    /// Measured requests.
    pub requests: usize,
    pub max_tokens: u32,
    /// Request `i` sends `prompts[i % len]`.
    pub prompts: Vec<String>,
    /// `None`: ask GET /v1/models and use the first id.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub temperature: f32,
    /// Unmeasured requests before the measured ones.
    pub warmup: usize,
    /// Limit for the whole run.
    pub timeout: Duration,
    /// `helpline.grounding` sent with each request; `None` sends nothing (any OpenAI server).
    pub grounding: Option<bool>,
    /// `helpline.answer_mode` sent with each request.
    pub answer_mode: Option<String>,
}

impl ServeBenchConfig {
    /// Defaults matching the CLI's: concurrency 1, 32 requests, 128 tokens, the default prompt, 600 s.
    pub fn new(url: impl Into<String>) -> Self {
        ServeBenchConfig {
            url: url.into(),
            concurrency: 1,
            requests: 32,
            max_tokens: 128,
            prompts: vec![DEFAULT_PROMPT.to_owned()],
            model: None,
            api_key: None,
            temperature: 0.0,
            warmup: 0,
            timeout: Duration::from_secs(600),
            grounding: None,
            answer_mode: None,
        }
    }

    fn validate(&self) -> Result<Endpoint> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1");
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            bail!("--temperature must be a finite number >= 0, got {}", self.temperature);
        }
        if self.prompts.is_empty() {
            bail!("no prompts given");
        }
        if self.timeout.is_zero() {
            bail!("--timeout-secs must be at least 1");
        }
        parse_url(&self.url)
    }
}

/// One measured (or warm-up) request.
#[derive(Debug, Clone, Default)]
pub struct RequestRecord {
    /// HTTP status, when a response head arrived.
    pub status: Option<u16>,
    /// Why the request failed; `None` when it succeeded.
    pub error: Option<String>,
    /// Request start to the first content chunk.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<Duration>,
    /// Request start to `data: [DONE]` (or to the failure).
    pub latency: Duration,
    /// Chunks that carried generated text.
    pub content_chunks: usize,
    /// `usage.completion_tokens` from the stream, when sent.
    pub usage_completion_tokens: Option<u64>,
    /// `usage.prompt_tokens` from the stream, when sent.
    pub prompt_tokens: Option<u64>,
}

impl RequestRecord {
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// Output tokens: the server's `usage.completion_tokens`, else the number of content chunks.
    pub fn completion_tokens(&self) -> u64 {
        self.usage_completion_tokens.unwrap_or(self.content_chunks as u64)
    }

    fn failed(reason: impl Into<String>, latency: Duration) -> Self {
        RequestRecord { error: Some(reason.into()), latency, ..Default::default() }
    }
}

/// The result of a run. Latencies in milliseconds; `None` (JSON `null`) where there was nothing to measure.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub concurrency: usize,
    /// Measured requests; always `ok + failed`.
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub warmup: usize,
    pub max_tokens: u32,
    /// The measured phase, from its start until its last request ended.
    pub wall_seconds: f64,
    /// Successful requests per second of wall time.
    pub requests_per_second: f64,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
    pub ttft_ms_mean: Option<f64>,
    /// Over all gaps of all successful requests.
    pub itl_ms_p50: Option<f64>,
    pub itl_ms_p99: Option<f64>,
    pub itl_ms_mean: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    /// Mean over successful requests of tokens / (latency - ttft).
    pub output_tokens_per_second_per_stream: Option<f64>,
    /// Output tokens of all successful requests / wall time.
    pub output_tokens_per_second_total: f64,
    /// Over successful requests that reported `usage.prompt_tokens`.
    pub mean_prompt_tokens: Option<f64>,
    pub mean_completion_tokens: Option<f64>,
    pub total_completion_tokens: u64,
    /// The overall timeout ended the run.
    pub timed_out: bool,
    /// Failure reason -> count.
    pub errors: BTreeMap<String, usize>,
    /// Measured requests in queue order.
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

/// The `p`-th percentile (0..=100) of `sorted` (ascending), interpolating linearly between the two nearest
/// ranks; `None` for an empty slice or a non-finite `p`.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !p.is_finite() {
        return None;
    }
    let rank = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = (rank.ceil() as usize).min(sorted.len() - 1);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Report {
    /// Aggregates measured records (pure; `wall` is the measured phase's duration).
    #[allow(clippy::too_many_arguments)]
    pub fn from_records(cfg_url: &str, model: &str, concurrency: usize, warmup: usize, max_tokens: u32, records: Vec<RequestRecord>, wall: Duration, timed_out: bool) -> Report {
        let good: Vec<&RequestRecord> = records.iter().filter(|r| r.is_ok()).collect();
        let ttft = sorted(good.iter().filter_map(|r| r.ttft.map(ms)).collect());
        let itl = sorted(good.iter().flat_map(|r| r.itl.iter().copied().map(ms)).collect());
        let latency = sorted(good.iter().map(|r| ms(r.latency)).collect());
        let per_stream: Vec<f64> = good
            .iter()
            .filter_map(|r| {
                let decode = r.latency.checked_sub(r.ttft?)?.as_secs_f64();
                (decode > 0.0).then(|| r.completion_tokens() as f64 / decode)
            })
            .collect();
        let prompt: Vec<f64> = good.iter().filter_map(|r| r.prompt_tokens.map(|t| t as f64)).collect();
        let completion: Vec<f64> = good.iter().map(|r| r.completion_tokens() as f64).collect();
        let total_completion_tokens: u64 = good.iter().map(|r| r.completion_tokens()).sum();
        let mut errors = BTreeMap::new();
        for r in &records {
            if let Some(e) = &r.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let wall_seconds = wall.as_secs_f64();
        let per_wall = |x: f64| if wall_seconds > 0.0 { x / wall_seconds } else { 0.0 };
        Report {
            url: cfg_url.to_owned(),
            model: model.to_owned(),
            concurrency,
            requests: records.len(),
            ok: good.len(),
            failed: records.len() - good.len(),
            warmup,
            max_tokens,
            wall_seconds,
            requests_per_second: per_wall(good.len() as f64),
            ttft_ms_p50: percentile(&ttft, 50.0),
            ttft_ms_p99: percentile(&ttft, 99.0),
            ttft_ms_mean: mean(&ttft),
            itl_ms_p50: percentile(&itl, 50.0),
            itl_ms_p99: percentile(&itl, 99.0),
            itl_ms_mean: mean(&itl),
            latency_ms_p50: percentile(&latency, 50.0),
            latency_ms_p99: percentile(&latency, 99.0),
            output_tokens_per_second_per_stream: mean(&per_stream),
            output_tokens_per_second_total: per_wall(total_completion_tokens as f64),
            mean_prompt_tokens: mean(&prompt),
            mean_completion_tokens: mean(&completion),
            total_completion_tokens,
            timed_out,
            errors,
            records,
        }
    }

    /// The human-readable summary (a Markdown table, then the failure reasons).
    pub fn render_table(&self) -> String {
        fn f(v: Option<f64>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
        }
        let mut s = String::new();
        let _ = writeln!(s, "bench serve: {} model={} concurrency={} max_tokens={} warmup={}", self.url, self.model, self.concurrency, self.max_tokens, self.warmup);
        let _ = writeln!(s, "| metric | value |");
        let _ = writeln!(s, "| --- | ---: |");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row("requests ok / failed", format!("{} / {}", self.ok, self.failed));
        row("wall time (s)", format!("{:.2}", self.wall_seconds));
        row("requests/s", format!("{:.2}", self.requests_per_second));
        row("TTFT p50 / p99 (ms)", format!("{} / {}", f(self.ttft_ms_p50), f(self.ttft_ms_p99)));
        row("ITL p50 / p99 (ms)", format!("{} / {}", f(self.itl_ms_p50), f(self.itl_ms_p99)));
        row("latency p50 / p99 (ms)", format!("{} / {}", f(self.latency_ms_p50), f(self.latency_ms_p99)));
        row("output tok/s per stream", f(self.output_tokens_per_second_per_stream));
        row("output tok/s total", format!("{:.2}", self.output_tokens_per_second_total));
        row("mean prompt / completion tokens", format!("{} / {}", f(self.mean_prompt_tokens), f(self.mean_completion_tokens)));
        if self.timed_out {
            let _ = writeln!(s, "the overall timeout ended the run");
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "failures:");
            for (reason, n) in &self.errors {
                let _ = writeln!(s, "  {n} x {reason}");
            }
        }
        s
    }
}

/// `helpline bench serve`: runs the benchmark and prints the report. Exit status 1 when any measured request failed.
pub fn run_cli(args: &ServeBenchArgs) -> Result<ExitCode> {
    let cfg = args.to_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let report = rt.block_on(run(cfg))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render_table());
    }
    if report.failed > 0 {
        eprintln!("bench serve: {} of {} requests failed", report.failed, report.requests);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the benchmark described by `cfg`. Argument errors and a failed model lookup are errors; failed
/// requests are counted in the report.
pub async fn run(cfg: ServeBenchConfig) -> Result<Report> {
    let endpoint = cfg.validate()?;
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => discover_model(&endpoint, cfg.api_key.as_deref(), deadline).await?,
    };
    let shared = Arc::new(Shared {
        endpoint,
        model: model.clone(),
        api_key: cfg.api_key.clone(),
        max_tokens: cfg.max_tokens,
        // Through the shortest decimal form so that 0.7 is sent as 0.7, not 0.699999988079071.
        temperature: cfg.temperature.to_string().parse::<f64>().unwrap_or(cfg.temperature as f64),
        prompts: cfg.prompts.clone(),
        deadline,
        timeout: cfg.timeout,
        grounding: cfg.grounding,
        answer_mode: cfg.answer_mode.clone(),
    });
    let mut slots: Vec<Option<Conn>> = (0..cfg.concurrency).map(|_| None).collect();
    let mut timed_out = false;
    if cfg.warmup > 0 {
        let workers = cfg.concurrency.min(cfg.warmup);
        let phase = run_phase(&shared, cfg.warmup, slots.drain(..workers).collect()).await;
        timed_out |= phase.timed_out;
        slots.splice(0..0, phase.slots);
    }
    let phase = run_phase(&shared, cfg.requests, slots).await;
    timed_out |= phase.timed_out;
    Ok(Report::from_records(&cfg.url, &model, cfg.concurrency, cfg.warmup, cfg.max_tokens, phase.records, phase.wall, timed_out))
}

struct Shared {
    endpoint: Endpoint,
    model: String,
    api_key: Option<String>,
    max_tokens: u32,
    temperature: f64,
    prompts: Vec<String>,
    deadline: Instant,
    timeout: Duration,
    grounding: Option<bool>,
    answer_mode: Option<String>,
}

impl Shared {
    fn timeout_reason(&self) -> String {
        format!("overall timeout ({} s) reached", self.timeout.as_secs())
    }

    fn request(&self, prompt: &str) -> Vec<u8> {
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [{ "role": "user", "content": prompt }],
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        if let Some(g) = self.grounding {
            body["helpline"]["grounding"] = serde_json::json!(g);
        }
        if let Some(m) = &self.answer_mode {
            body["helpline"]["answer_mode"] = serde_json::json!(m);
        }
        let body = body.to_string();
        let ep = &self.endpoint;
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: helpline-bench\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\n",
            ep.chat_path,
            ep.host_header,
            body.len()
        );
        if let Some(key) = &self.api_key {
            let _ = write!(head, "Authorization: Bearer {key}\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

struct Phase {
    records: Vec<RequestRecord>,
    wall: Duration,
    timed_out: bool,
    slots: Vec<Option<Conn>>,
}

/// Runs `n` requests with one worker per slot; each worker keeps its connection in its slot.
async fn run_phase(shared: &Arc<Shared>, n: usize, slots: Vec<Option<Conn>>) -> Phase {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let handles: Vec<_> = slots
        .into_iter()
        .map(|mut slot| {
            let shared = shared.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut done = Vec::new();
                let mut timed_out = false;
                loop {
                    if Instant::now() >= shared.deadline {
                        timed_out = true;
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let prompt = &shared.prompts[i % shared.prompts.len()];
                    let t0 = Instant::now();
                    let deadline = tokio::time::Instant::from_std(shared.deadline);
                    let record = match tokio::time::timeout_at(deadline, one_request(&shared, &mut slot, prompt)).await {
                        Ok(r) => r,
                        Err(_) => {
                            timed_out = true;
                            slot = None;
                            RequestRecord::failed(shared.timeout_reason(), t0.elapsed())
                        }
                    };
                    done.push((i, record));
                }
                (done, slot, timed_out)
            })
        })
        .collect();
    let mut indexed = Vec::with_capacity(n);
    let mut slots = Vec::with_capacity(handles.len());
    let mut timed_out = false;
    for h in handles {
        match h.await {
            Ok((done, slot, t)) => {
                indexed.extend(done);
                slots.push(slot);
                timed_out |= t;
            }
            Err(e) => {
                // A worker cannot panic by design; should one, its connection is lost and its requests re-queued as failures below.
                slots.push(None);
                tracing::error!("bench worker failed: {e}");
            }
        }
    }
    let wall = start.elapsed();
    let mut records: Vec<Option<RequestRecord>> = (0..n).map(|_| None).collect();
    for (i, r) in indexed {
        records[i] = Some(r);
    }
    let never = if timed_out { format!("not started: {}", shared.timeout_reason()) } else { "not started: worker failed".to_owned() };
    let records = records.into_iter().map(|r| r.unwrap_or_else(|| RequestRecord::failed(never.clone(), Duration::ZERO))).collect();
    Phase { records, wall, timed_out, slots }
}

// ---------------------------------------------------------------------------------------------------------
// URL

/// Where requests go, from a base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header value.
    pub host_header: String,
    /// Path of the chat-completions endpoint, e.g. `/v1/chat/completions`.
    pub chat_path: String,
    /// Path of the model list, e.g. `/v1/models`.
    pub models_path: String,
}

/// Parses `http://host[:port][/prefix]`. A prefix ending in `/v1` or `/v1/chat/completions` is used as is.
pub fn parse_url(url: &str) -> Result<Endpoint> {
    let url = url.trim();
    let scheme_end = url.find("://").with_context(|| format!("invalid URL `{url}`: expected http://HOST[:PORT]"))?;
    let scheme = url[..scheme_end].to_ascii_lowercase();
    match scheme.as_str() {
        "http" => {}
        "https" => bail!("https URLs are not supported by `bench serve` (plain HTTP/1.1 only): use http://, e.g. through a local TLS-terminating proxy"),
        other => bail!("invalid URL `{url}`: unsupported scheme `{other}`, expected http://"),
    }
    let rest = &url[scheme_end + 3..];
    if rest.contains(['?', '#']) {
        bail!("invalid URL `{url}`: query strings and fragments are not supported");
    }
    if rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("invalid URL `{url}`: contains whitespace or control characters");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        bail!("invalid URL `{url}`: user information is not supported (use --api-key)");
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let close = after.find(']').with_context(|| format!("invalid URL `{url}`: unclosed `[` in the host"))?;
        let host = &after[..close];
        host.parse::<std::net::Ipv6Addr>().with_context(|| format!("invalid URL `{url}`: `{host}` is not an IPv6 address"))?;
        let port = match &after[close + 1..] {
            "" => None,
            p => Some(p.strip_prefix(':').with_context(|| format!("invalid URL `{url}`: unexpected `{p}` after the host"))?),
        };
        (host, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("invalid URL `{url}`: no host");
    }
    if !authority.starts_with('[') && !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
        bail!("invalid URL `{url}`: `{host}` is not a valid host name");
    }
    let port = match port {
        None => 80,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => bail!("invalid URL `{url}`: `{p}` is not a valid port"),
        },
    };
    let host_header = if authority.starts_with('[') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let base = path.trim_end_matches('/');
    let (chat_path, models_path) = if let Some(prefix) = base.strip_suffix("/chat/completions") {
        (base.to_owned(), format!("{prefix}/models"))
    } else if base.ends_with("/v1") {
        (format!("{base}/chat/completions"), format!("{base}/models"))
    } else {
        (format!("{base}/v1/chat/completions"), format!("{base}/v1/models"))
    };
    Ok(Endpoint { host: host.to_owned(), port, host_header, chat_path, models_path })
}

// ---------------------------------------------------------------------------------------------------------
// HTTP/1.1 client

struct Conn {
    stream: TcpStream,
    /// Received bytes not yet consumed.
    buf: Vec<u8>,
}

impl Conn {
    async fn connect(ep: &Endpoint) -> Result<Conn, String> {
        let stream = TcpStream::connect((ep.host.as_str(), ep.port)).await.map_err(|e| format!("connect to {}: {e}", ep.host_header))?;
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: Vec::with_capacity(16 * 1024) })
    }

    /// Appends what the socket has to `buf`; 0 at end of stream.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let len = self.buf.len();
        self.buf.resize(len + 16 * 1024, 0);
        let n = self.stream.read(&mut self.buf[len..]).await;
        self.buf.truncate(len + *n.as_ref().unwrap_or(&0));
        n
    }
}

#[derive(Debug)]
enum Framing {
    Chunked(ChunkedDecoder),
    Length(u64),
    UntilClose,
}

struct Head {
    status: u16,
    framing: Framing,
    /// The server will (or may) close the connection after this response.
    close: bool,
}

/// A failure before the response head; `retry` when it may be a stale keep-alive connection.
struct HeadError {
    msg: String,
    retry: bool,
}

async fn send_and_read_head(conn: &mut Conn, request: &[u8]) -> Result<Head, HeadError> {
    if let Err(e) = conn.stream.write_all(request).await {
        return Err(HeadError { msg: format!("sending the request: {e}"), retry: true });
    }
    let mut received_any = false;
    loop {
        // Stray line breaks between responses are tolerated.
        let skip = conn.buf.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        conn.buf.drain(..skip);
        if let Some((head_len, consumed)) = find_head_end(&conn.buf) {
            let head = parse_head(&conn.buf[..head_len]).map_err(|msg| HeadError { msg, retry: false })?;
            conn.buf.drain(..consumed);
            match head {
                Some(h) => return Ok(h),
                None => continue, // 1xx interim response
            }
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Err(HeadError { msg: "response head too large".into(), retry: false });
        }
        match conn.read_more().await {
            Ok(0) => return Err(HeadError { msg: "connection closed before a response".into(), retry: !received_any }),
            Ok(_) => received_any = true,
            Err(e) => return Err(HeadError { msg: format!("reading the response: {e}"), retry: !received_any }),
        }
    }
}

/// `(head length, bytes up to and including the blank line)` once `buf` holds a whole head.
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut line_start = 0;
    for (i, &b) in buf.iter().enumerate() {
        if b == b'\n' {
            let line = &buf[line_start..i];
            if line_start > 0 && (line.is_empty() || line == b"\r") {
                return Some((line_start, i + 1));
            }
            line_start = i + 1;
        }
    }
    None
}

/// `None` for a 1xx interim response.
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let status = match (version.starts_with("HTTP/1."), status) {
        (true, Some(s)) if (100..600).contains(&s) => s,
        _ => return Err(format!("malformed status line `{}`", snippet(status_line))),
    };
    let mut chunked = false;
    let mut length = None;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { return Err(format!("malformed header line `{}`", snippet(line))) };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "transfer-encoding" => chunked = value.rsplit(',').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked")),
            "content-length" => length = Some(value.parse::<u64>().map_err(|_| format!("bad Content-Length `{}`", snippet(value)))?),
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") && version == "HTTP/1.0" {
                        close = false;
                    }
                }
            }
            _ => {}
        }
    }
    if (100..200).contains(&status) && status != 101 {
        return Ok(None);
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(ChunkedDecoder::new())
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some(Head { status, framing, close }))
}

enum Piece {
    /// `out` holds body bytes that arrived at this instant.
    Data(Instant),
    /// The body is complete.
    End,
}

/// Moves the next body bytes into `out` (cleared first), reading from the socket when none are buffered.
async fn next_piece(conn: &mut Conn, framing: &mut Framing, out: &mut Vec<u8>) -> Result<Piece, String> {
    out.clear();
    loop {
        let complete = match framing {
            Framing::Chunked(dec) => {
                let used = dec.decode(&conn.buf, out)?;
                conn.buf.drain(..used);
                dec.is_done()
            }
            Framing::Length(left) => {
                let take = (*left).min(conn.buf.len() as u64) as usize;
                out.extend(conn.buf.drain(..take));
                *left -= take as u64;
                *left == 0
            }
            Framing::UntilClose => {
                out.append(&mut conn.buf);
                false
            }
        };
        if !out.is_empty() {
            return Ok(Piece::Data(Instant::now()));
        }
        if complete {
            return Ok(Piece::End);
        }
        match conn.read_more().await {
            Ok(0) if matches!(framing, Framing::UntilClose) => return Ok(Piece::End),
            Ok(0) => return Err("connection closed in the middle of the response body".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading the response body: {e}")),
        }
    }
}

/// Incremental decoder for `Transfer-Encoding: chunked`.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailer,
    Done,
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the final (zero-size) chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes as much of `input` as it can, appending body bytes to `out`, and returns the number of input
    /// bytes consumed: all of them, unless the body ends inside `input` (what follows belongs to the next response).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = left.min((input.len() - i) as u64) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.state = if left == take as u64 { ChunkState::DataEnd } else { ChunkState::Data(left - take as u64) };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => match input[i..].iter().position(|&b| b == b'\n') {
                    Some(j) => {
                        self.line.extend_from_slice(&input[i..i + j]);
                        i += j + 1;
                        let line = std::mem::take(&mut self.line);
                        self.on_line(line.strip_suffix(b"\r").unwrap_or(&line))?;
                    }
                    None => {
                        self.line.extend_from_slice(&input[i..]);
                        i = input.len();
                        if self.line.len() > 64 * 1024 {
                            return Err("chunked encoding: line too long".into());
                        }
                    }
                },
            }
        }
        Ok(i)
    }

    fn on_line(&mut self, line: &[u8]) -> Result<(), String> {
        match self.state {
            ChunkState::Size => {
                let text = String::from_utf8_lossy(line);
                let size = text.split(';').next().unwrap_or_default().trim();
                if size.is_empty() || size.len() > 16 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("chunked encoding: bad chunk size `{}`", snippet(&text)));
                }
                let n = u64::from_str_radix(size, 16).map_err(|_| format!("chunked encoding: bad chunk size `{}`", snippet(&text)))?;
                self.state = if n == 0 { ChunkState::Trailer } else { ChunkState::Data(n) };
            }
            ChunkState::DataEnd => {
                if !line.is_empty() {
                    return Err("chunked encoding: chunk data longer than its size".into());
                }
                self.state = ChunkState::Size;
            }
            ChunkState::Trailer => {
                if line.is_empty() {
                    self.state = ChunkState::Done;
                }
            }
            ChunkState::Data(_) | ChunkState::Done => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Server-sent events

/// One dispatched SSE `data` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// A JSON payload.
    Json(Value),
    /// `data: [DONE]`.
    Done,
    /// A payload that is neither JSON nor `[DONE]`.
    Invalid(String),
}

/// Incremental SSE parser for `data:` payloads: lines end in LF, CRLF or CR; `:` lines are comments; other
/// fields are ignored. A payload is dispatched as soon as it is complete JSON (or `[DONE]`), without waiting
/// for the blank line, so servers that put one event per line also work; a payload split over several
/// `data:` lines is joined with `\n` as the spec says.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
    /// The previous byte was CR: a following LF belongs to it.
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds stream bytes, pushing every dispatched payload to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            match bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(j) => {
                    self.line.extend_from_slice(&bytes[..j]);
                    self.after_cr = bytes[j] == b'\r';
                    bytes = &bytes[j + 1..];
                    let line = std::mem::take(&mut self.line);
                    self.on_line(&line, out);
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
            if self.line.len() > MAX_LINE_BYTES {
                return Err("SSE line too long".into());
            }
        }
        Ok(())
    }

    /// End of stream: dispatches an unterminated last line and any pending payload.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.on_line(&line, out);
        }
        self.on_line(b"", out);
    }

    fn on_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                if !data.trim().is_empty() {
                    out.push(match serde_json::from_str(&data) {
                        Ok(v) => SseEvent::Json(v),
                        Err(_) => SseEvent::Invalid(data),
                    });
                }
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
            None => (line, &b""[..]),
        };
        if field != b"data" {
            return;
        }
        let value = String::from_utf8_lossy(value);
        let data = match self.data.take() {
            Some(mut prev) => {
                prev.push('\n');
                prev.push_str(&value);
                prev
            }
            None => value.into_owned(),
        };
        if data.trim() == "[DONE]" {
            out.push(SseEvent::Done);
        } else if let Ok(v) = serde_json::from_str::<Value>(&data) {
            out.push(SseEvent::Json(v));
        } else {
            self.data = Some(data);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// One request

async fn one_request(shared: &Shared, slot: &mut Option<Conn>, prompt: &str) -> RequestRecord {
    let start = Instant::now();
    let mut rec = RequestRecord::default();
    match stream_one(shared, slot, prompt, start, &mut rec).await {
        Ok(()) => {}
        Err(e) => {
            rec.error = Some(e);
            rec.latency = start.elapsed();
        }
    }
    rec
}

async fn stream_one(shared: &Shared, slot: &mut Option<Conn>, prompt: &str, start: Instant, rec: &mut RequestRecord) -> Result<(), String> {
    let request = shared.request(prompt);
    let ep = &shared.endpoint;
    // The connection goes back into the slot only after a cleanly finished response.
    let reused = slot.is_some();
    let mut conn = match slot.take() {
        Some(c) => c,
        None => Conn::connect(ep).await?,
    };
    let head = match send_and_read_head(&mut conn, &request).await {
        Ok(h) => h,
        Err(e) if reused && e.retry => {
            // The server had closed the idle keep-alive connection: once more on a fresh one.
            conn = Conn::connect(ep).await?;
            send_and_read_head(&mut conn, &request).await.map_err(|e| e.msg)?
        }
        Err(e) => return Err(e.msg),
    };
    rec.status = Some(head.status);
    let mut framing = head.framing;
    let mut piece = Vec::new();
    if !(200..300).contains(&head.status) {
        // Keep the start of the body as the reason.
        let mut body = Vec::new();
        let mut complete = false;
        while body.len() < 4096 {
            match next_piece(&mut conn, &mut framing, &mut piece).await {
                Ok(Piece::Data(_)) => body.extend_from_slice(&piece),
                Ok(Piece::End) => {
                    complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if complete && !head.close {
            *slot = Some(conn);
        }
        return Err(format!("HTTP {}: {}", head.status, error_summary(&body)));
    }

    let mut sse = SseParser::new();
    let mut events = Vec::new();
    let mut last_chunk: Option<Instant> = None;
    let mut finish_seen = false;
    let mut done_at = None;
    let mut ended = false;
    while done_at.is_none() && !ended {
        let at = match next_piece(&mut conn, &mut framing, &mut piece).await? {
            Piece::Data(at) => {
                sse.feed(&piece, &mut events)?;
                at
            }
            Piece::End => {
                sse.finish(&mut events);
                ended = true;
                Instant::now()
            }
        };
        for event in events.drain(..) {
            match event {
                SseEvent::Done => {
                    done_at = Some(at);
                    break;
                }
                SseEvent::Invalid(data) => return Err(format!("malformed SSE data: {}", snippet(&data))),
                SseEvent::Json(v) => {
                    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
                        let msg = err.get("message").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| err.to_string());
                        return Err(format!("error in stream: {}", snippet(&msg)));
                    }
                    if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
                        if let Some(n) = usage.get("completion_tokens").and_then(Value::as_u64) {
                            rec.usage_completion_tokens = Some(n);
                        }
                        if let Some(n) = usage.get("prompt_tokens").and_then(Value::as_u64) {
                            rec.prompt_tokens = Some(n);
                        }
                    }
                    let choices = v.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                    let has_text = choices.iter().any(|c| {
                        let nonempty = |x: Option<&Value>| x.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
                        let delta = c.get("delta");
                        nonempty(delta.and_then(|d| d.get("content"))) || nonempty(delta.and_then(|d| d.get("reasoning_content"))) || nonempty(c.get("text"))
                    });
                    finish_seen |= choices.iter().any(|c| c.get("finish_reason").is_some_and(|f| !f.is_null()));
                    if has_text {
                        match last_chunk {
                            None => rec.ttft = Some(at - start),
                            Some(prev) => rec.itl.push(at - prev),
                        }
                        last_chunk = Some(at);
                        rec.content_chunks += 1;
                    }
                }
            }
        }
    }
    match done_at {
        Some(at) => rec.latency = at - start,
        None if finish_seen => rec.latency = start.elapsed(),
        None => return Err("stream ended before `data: [DONE]`".into()),
    }
    // Read the rest of the body so the connection can carry the next request.
    if ended || matches!(framing, Framing::UntilClose) || head.close {
        return Ok(());
    }
    let drain = async {
        let mut extra = 0usize;
        loop {
            match next_piece(&mut conn, &mut framing, &mut piece).await {
                Ok(Piece::End) => return true,
                Ok(Piece::Data(_)) if extra < 1 << 20 => extra += piece.len(),
                _ => return false,
            }
        }
    };
    if let Ok(true) = tokio::time::timeout(Duration::from_secs(5), drain).await {
        *slot = Some(conn);
    }
    Ok(())
}

/// The `error.message` of a JSON error body, else the body's first characters.
fn error_summary(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let msg = serde_json::from_str::<Value>(text.trim())
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message").and_then(Value::as_str).or_else(|| e.as_str()).map(str::to_owned)
        })
        .unwrap_or_else(|| text.into_owned());
    let msg = snippet(&msg);
    if msg.is_empty() {
        "(empty body)".to_owned()
    } else {
        msg
    }
}

/// Whitespace collapsed, cut to a short length.
fn snippet(s: &str) -> String {
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.chars().count() > ERROR_SNIPPET_CHARS {
        let cut: String = collapsed.chars().take(ERROR_SNIPPET_CHARS).collect();
        format!("{cut}…")
    } else {
        collapsed
    }
}

// ---------------------------------------------------------------------------------------------------------
// Model discovery

async fn discover_model(ep: &Endpoint, api_key: Option<&str>, deadline: Instant) -> Result<String> {
    let hint = "; pass --model-name NAME";
    let limit = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(30));
    let fetch = async {
        let mut conn = Conn::connect(ep).await?;
        let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: helpline-bench\r\nAccept: application/json\r\nConnection: close\r\n", ep.models_path, ep.host_header);
        if let Some(key) = api_key {
            let _ = write!(request, "Authorization: Bearer {key}\r\n");
        }
        request.push_str("\r\n");
        let head = send_and_read_head(&mut conn, request.as_bytes()).await.map_err(|e| e.msg)?;
        let mut framing = head.framing;
        let (mut body, mut piece) = (Vec::new(), Vec::new());
        while let Piece::Data(_) = next_piece(&mut conn, &mut framing, &mut piece).await? {
            body.extend_from_slice(&piece);
            if body.len() > 4 << 20 {
                return Err("model list too large".to_owned());
            }
        }
        if !(200..300).contains(&head.status) {
            return Err(format!("HTTP {}: {}", head.status, error_summary(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        v.get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| "no model id in `data`".to_owned())
    };
    match tokio::time::timeout(limit, fetch).await {
        Ok(Ok(id)) => Ok(id),
        Ok(Err(e)) => bail!("could not get the model name from GET {}: {e}{hint}", ep.models_path),
        Err(_) => bail!("could not get the model name from GET {}: timed out{hint}", ep.models_path),
    }
}
