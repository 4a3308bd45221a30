//! `bench serve` against a small fake OpenAI-compatible server written here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpline::bench_serve::{self, percentile, ChunkedDecoder, Report, ServeBenchConfig, SseEvent, SseParser};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::helpline_bin;

// ------------------------------------------------------------------------------------------------
// Fake server

#[derive(Clone)]
struct Fake {
    /// Content chunks per response.
    chunks: usize,
    spacing: Duration,
    /// `Some(k)`: every k-th chat request (1-based counter divisible by k) gets a 500.
    fail_every: Option<usize>,
    /// Send a usage chunk with `completion_tokens = 2 * chunks`.
    usage: bool,
    /// Answer with `Connection: close` and a close-delimited body instead of chunked encoding.
    close_delimited: bool,
}

impl Default for Fake {
    fn default() -> Self {
        Fake { chunks: 6, spacing: Duration::from_millis(5), fail_every: None, usage: true, close_delimited: false }
    }
}

#[derive(Default)]
struct Stats {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    chat_requests: AtomicUsize,
    connections: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
}

const PROMPT_TOKENS: u64 = 11;
const MODEL_ID: &str = "fake-model-1";

impl Fake {
    /// Starts the server on its own thread and runtime; it lives until the test process ends.
    fn start(self) -> (SocketAddr, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let st = stats.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let fake = Arc::new(self);
                loop {
                    let (sock, _) = listener.accept().await.unwrap();
                    st.connections.fetch_add(1, Ordering::SeqCst);
                    let (fake, st) = (fake.clone(), st.clone());
                    tokio::spawn(async move {
                        let _ = fake.serve_conn(sock, &st).await;
                    });
                }
            });
        });
        (rx.recv().unwrap(), stats)
    }

    async fn serve_conn(&self, mut sock: TcpStream, st: &Stats) -> std::io::Result<()> {
        sock.set_nodelay(true)?;
        let mut buf = Vec::new();
        loop {
            // Request head.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut tmp = [0u8; 4096];
                let n = sock.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut tmp = [0u8; 4096];
                let n = sock.read(&mut tmp).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
            buf.drain(..head_end + len);

            if head.starts_with("GET /v1/models ") {
                let body = json!({"object": "list", "data": [{"id": MODEL_ID, "object": "model"}]}).to_string();
                let resp = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                sock.write_all(resp.as_bytes()).await?;
                continue;
            }
            assert!(head.starts_with("POST /v1/chat/completions "), "unexpected request: {head}");
            st.bodies.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
            let n = st.chat_requests.fetch_add(1, Ordering::SeqCst) + 1;
            let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            st.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let result = if self.fail_every.is_some_and(|k| n.is_multiple_of(k)) {
                tokio::time::sleep(self.spacing).await;
                let body = r#"{"error":{"message":"boom","type":"server_error"}}"#;
                let resp = format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                sock.write_all(resp.as_bytes()).await
            } else {
                self.stream(&mut sock).await
            };
            st.in_flight.fetch_sub(1, Ordering::SeqCst);
            result?;
            if self.close_delimited {
                return Ok(());
            }
        }
    }

    async fn stream(&self, sock: &mut TcpStream) -> std::io::Result<()> {
        let head = if self.close_delimited {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
        } else {
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        };
        sock.write_all(head.as_bytes()).await?;
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "c1", "object": "chat.completion.chunk", "model": MODEL_ID, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
        };
        // A role-only chunk: no text, so not a token.
        self.send(sock, format!("data: {}\n\n", chunk(json!({"role": "assistant", "content": ""}), Value::Null)).as_bytes()).await?;
        for k in 0..self.chunks {
            tokio::time::sleep(self.spacing).await;
            let event = chunk(json!({"content": format!("tok{k} ")}), Value::Null);
            match k {
                // One event split over two writes (and two chunks), the halves 1 ms apart.
                1 => {
                    let text = format!("data: {event}\n\n");
                    let (a, b) = text.as_bytes().split_at(text.len() / 2);
                    self.send(sock, a).await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    self.send(sock, b).await?;
                }
                // CRLF line endings, and a keep-alive comment before the event.
                2 => self.send(sock, format!(": keep-alive\r\n\r\ndata: {event}\r\n\r\n").as_bytes()).await?,
                _ => self.send(sock, format!("data: {event}\n\n").as_bytes()).await?,
            }
        }
        self.send(sock, format!("data: {}\n\n", chunk(json!({}), json!("stop"))).as_bytes()).await?;
        self.send(sock, b": keep-alive\n\n").await?;
        if self.usage {
            let n = self.chunks as u64 * 2;
            let usage = json!({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n, "total_tokens": PROMPT_TOKENS + n}});
            self.send(sock, format!("data: {usage}\n\n").as_bytes()).await?;
        }
        self.send(sock, b"data: [DONE]\n\n").await?;
        if !self.close_delimited {
            sock.write_all(b"0\r\n\r\n").await?;
        }
        Ok(())
    }

    async fn send(&self, sock: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
        if self.close_delimited {
            sock.write_all(bytes).await
        } else {
            // A chunk extension now and then, which the client must ignore.
            sock.write_all(format!("{:x};ext=1\r\n", bytes.len()).as_bytes()).await?;
            sock.write_all(bytes).await?;
            sock.write_all(b"\r\n").await
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(f)
}

fn config(addr: SocketAddr, concurrency: usize, requests: usize) -> ServeBenchConfig {
    let mut cfg = ServeBenchConfig::new(format!("http://{addr}"));
    cfg.concurrency = concurrency;
    cfg.requests = requests;
    cfg.max_tokens = 16;
    cfg.model = Some("m".into());
    cfg.timeout = Duration::from_secs(20);
    cfg
}

fn assert_ordered(report: &Report) {
    for (p50, p99) in [(report.ttft_ms_p50, report.ttft_ms_p99), (report.itl_ms_p50, report.itl_ms_p99), (report.latency_ms_p50, report.latency_ms_p99)] {
        let (p50, p99) = (p50.unwrap(), p99.unwrap());
        assert!(p50 > 0.0 && p50 <= p99, "p50 {p50} p99 {p99}");
    }
}

// ------------------------------------------------------------------------------------------------
// Pure parts

#[test]
fn percentile_interpolates_between_ranks() {
    assert_eq!(percentile(&[], 50.0), None);
    assert_eq!(percentile(&[7.0], 0.0), Some(7.0));
    assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    let v = [1.0, 2.0, 3.0, 4.0];
    assert_eq!(percentile(&v, 0.0), Some(1.0));
    assert_eq!(percentile(&v, 50.0), Some(2.5));
    assert_eq!(percentile(&v, 100.0), Some(4.0));
    assert!((percentile(&v, 99.0).unwrap() - 3.97).abs() < 1e-9);
    // Out-of-range p is clamped; NaN gives nothing.
    assert_eq!(percentile(&v, 150.0), Some(4.0));
    assert_eq!(percentile(&v, -5.0), Some(1.0));
    assert_eq!(percentile(&v, f64::NAN), None);
    let many: Vec<f64> = (1..=100).map(f64::from).collect();
    assert!((percentile(&many, 50.0).unwrap() - 50.5).abs() < 1e-9);
    assert!((percentile(&many, 99.0).unwrap() - 99.01).abs() < 1e-9);
    let mut last = f64::MIN;
    for p in 0..=100 {
        let x = percentile(&many, p as f64).unwrap();
        assert!(x >= last);
        last = x;
    }
}

#[test]
fn chunked_decoder_handles_any_split_extensions_and_trailers() {
    let wire = b"5;name=v\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
    // Whole, then one byte at a time.
    let mut dec = ChunkedDecoder::new();
    let mut out = Vec::new();
    let used = dec.decode(wire, &mut out).unwrap();
    assert_eq!(out, b"hello, world");
    assert!(dec.is_done());
    assert_eq!(&wire[used..], b"NEXT", "bytes after the body are left alone");

    let mut dec = ChunkedDecoder::new();
    let mut out = Vec::new();
    let mut used = 0;
    for i in 0..wire.len() {
        if dec.is_done() {
            break;
        }
        used += dec.decode(&wire[i..i + 1], &mut out).unwrap();
    }
    assert_eq!(out, b"hello, world");
    assert_eq!(used, wire.len() - 4);

    // Bare LF line endings are tolerated; a bad size is an error.
    let mut out = Vec::new();
    let mut dec = ChunkedDecoder::new();
    dec.decode(b"3\nabc\n0\n\n", &mut out).unwrap();
    assert!(dec.is_done() && out == b"abc");
    assert!(ChunkedDecoder::new().decode(b"zz\r\n", &mut Vec::new()).is_err());
    assert!(ChunkedDecoder::new().decode(b"2\r\nabc\r\n", &mut Vec::new()).is_err());
}

#[test]
fn sse_parser_handles_comments_line_endings_and_splits() {
    let mut p = SseParser::new();
    let mut ev = Vec::new();
    let stream = ": keep-alive\n\ndata: {\"a\":1}\n\nevent: x\r\ndata:{\"b\":2}\r\n\r\ndata: {\"c\":\rdata: 3}\r\rdata: [DONE]\n\n";
    // Fed in 3-byte pieces so that lines and CRLF pairs are split.
    for piece in stream.as_bytes().chunks(3) {
        p.feed(piece, &mut ev).unwrap();
    }
    p.finish(&mut ev);
    assert_eq!(ev, vec![SseEvent::Json(json!({"a": 1})), SseEvent::Json(json!({"b": 2})), SseEvent::Json(json!({"c": 3})), SseEvent::Done]);

    // One event per line without blank lines: dispatched as each line completes.
    let mut p = SseParser::new();
    let mut ev = Vec::new();
    p.feed(b"data: {\"x\":1}\n", &mut ev).unwrap();
    assert_eq!(ev, vec![SseEvent::Json(json!({"x": 1}))]);
    p.feed(b"data: {\"x\":2}\ndata: [DONE]", &mut ev).unwrap();
    assert_eq!(ev.len(), 2);
    p.finish(&mut ev);
    assert_eq!(ev.last(), Some(&SseEvent::Done));

    // Garbage is reported, not dropped.
    let mut p = SseParser::new();
    let mut ev = Vec::new();
    p.feed(b"data: not json\n\n", &mut ev).unwrap();
    assert_eq!(ev, vec![SseEvent::Invalid("not json".into())]);
}

#[test]
fn urls_are_checked() {
    let ep = bench_serve::parse_url("http://127.0.0.1:8080").unwrap();
    assert_eq!((ep.host.as_str(), ep.port, ep.chat_path.as_str(), ep.models_path.as_str()), ("127.0.0.1", 8080, "/v1/chat/completions", "/v1/models"));
    let ep = bench_serve::parse_url("HTTP://example.com/v1/").unwrap();
    assert_eq!((ep.port, ep.chat_path.as_str(), ep.host_header.as_str()), (80, "/v1/chat/completions", "example.com:80"));
    let ep = bench_serve::parse_url("http://[::1]:9000/api").unwrap();
    assert_eq!((ep.host.as_str(), ep.host_header.as_str(), ep.chat_path.as_str()), ("::1", "[::1]:9000", "/api/v1/chat/completions"));
    let ep = bench_serve::parse_url("http://h:1/x/v1/chat/completions").unwrap();
    assert_eq!((ep.chat_path.as_str(), ep.models_path.as_str()), ("/x/v1/chat/completions", "/x/v1/models"));

    let err = |u: &str| format!("{:#}", bench_serve::parse_url(u).unwrap_err());
    assert!(err("https://api.example.com").contains("https URLs are not supported"));
    assert!(err("127.0.0.1:8080").contains("expected http://"));
    assert!(err("ftp://x").contains("unsupported scheme"));
    assert!(err("http://:80").contains("no host"));
    assert!(err("http://h:99999").contains("not a valid port"));
    assert!(err("http://h:0").contains("not a valid port"));
    assert!(err("http://h/x?y=1").contains("query"));
    assert!(err("http://bad host").contains("whitespace"));
}

#[test]
fn bad_arguments_are_errors() {
    let cfg = ServeBenchConfig::new("http://127.0.0.1:9");
    let err = |cfg: ServeBenchConfig| format!("{:#}", block_on(bench_serve::run(cfg)).unwrap_err());
    assert!(err(ServeBenchConfig { concurrency: 0, ..cfg.clone() }).contains("--concurrency must be at least 1"));
    assert!(err(ServeBenchConfig { requests: 0, ..cfg.clone() }).contains("--requests"));
    assert!(err(ServeBenchConfig { max_tokens: 0, ..cfg.clone() }).contains("--max-tokens"));
    assert!(err(ServeBenchConfig { temperature: -1.0, ..cfg.clone() }).contains("--temperature"));
    assert!(err(ServeBenchConfig { url: "https://127.0.0.1:9".into(), ..cfg.clone() }).contains("https"));
    assert!(err(ServeBenchConfig { url: "not a url".into(), ..cfg }).contains("invalid URL"));
}

// ------------------------------------------------------------------------------------------------
// Against the fake server

#[test]
fn measures_a_streaming_server_at_the_requested_concurrency() {
    let fake = Fake::default();
    let (addr, stats) = fake.clone().start();
    let mut cfg = config(addr, 4, 12);
    cfg.prompts = vec!["first".into(), "second".into()];
    cfg.api_key = Some("k".into());
    let report = block_on(bench_serve::run(cfg)).unwrap();

    assert_eq!((report.requests, report.ok, report.failed), (12, 12, 0), "{:?}", report.errors);
    assert!(!report.timed_out);
    assert_eq!(stats.chat_requests.load(Ordering::SeqCst), 12);
    assert_eq!(stats.max_in_flight.load(Ordering::SeqCst), 4, "four requests in flight at once");
    // Keep-alive: one connection per worker.
    assert_eq!(stats.connections.load(Ordering::SeqCst), 4);

    // usage.completion_tokens wins over the chunk count.
    for r in &report.records {
        assert_eq!(r.content_chunks, fake.chunks);
        assert_eq!(r.completion_tokens(), 2 * fake.chunks as u64);
        assert_eq!(r.itl.len(), fake.chunks - 1);
        assert_eq!(r.prompt_tokens, Some(PROMPT_TOKENS));
        assert!(r.ttft.unwrap() >= fake.spacing && r.ttft.unwrap() <= r.latency);
    }
    assert_eq!(report.mean_completion_tokens, Some(2.0 * fake.chunks as f64));
    assert_eq!(report.mean_prompt_tokens, Some(PROMPT_TOKENS as f64));
    assert_eq!(report.total_completion_tokens, 12 * 2 * fake.chunks as u64);

    // ITL is about the server's spacing (5 ms; loose bounds for a busy machine).
    let itl = report.itl_ms_p50.unwrap();
    assert!((4.0..60.0).contains(&itl), "ITL p50 {itl} ms");
    assert!(report.ttft_ms_p50.unwrap() >= 4.0);
    assert_ordered(&report);

    let expected_total = report.total_completion_tokens as f64 / report.wall_seconds;
    assert!((report.output_tokens_per_second_total - expected_total).abs() < 1e-6);
    assert!((report.requests_per_second - 12.0 / report.wall_seconds).abs() < 1e-6);
    // Per stream: 12 tokens over ~5 gaps of >= 5 ms, so at most ~480 tok/s.
    let per_stream = report.output_tokens_per_second_per_stream.unwrap();
    assert!(per_stream > 10.0 && per_stream < 600.0, "{per_stream}");

    // What was sent.
    let bodies = stats.bodies.lock().unwrap();
    for b in bodies.iter() {
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["temperature"], 0.0);
        assert_eq!(b["messages"][0]["role"], "user");
    }
    let firsts = bodies.iter().filter(|b| b["messages"][0]["content"] == "first").count();
    assert_eq!(firsts, 6, "prompts are used in turn");

    // The JSON form has every field.
    let v: Value = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    for key in [
        "concurrency",
        "requests",
        "ok",
        "failed",
        "requests_per_second",
        "ttft_ms_p50",
        "ttft_ms_p99",
        "itl_ms_p50",
        "itl_ms_p99",
        "output_tokens_per_second_per_stream",
        "output_tokens_per_second_total",
        "mean_completion_tokens",
        "wall_seconds",
    ] {
        assert!(v[key].is_number(), "{key}: {v}");
    }
    assert_eq!(v["concurrency"], 4);
    let table = report.render_table();
    assert!(table.contains("| requests ok / failed | 12 / 0 |"), "{table}");
}

#[test]
fn many_concurrent_streams() {
    let (addr, stats) = Fake { chunks: 3, spacing: Duration::from_millis(10), ..Fake::default() }.start();
    let report = block_on(bench_serve::run(config(addr, 32, 96))).unwrap();
    assert_eq!((report.ok, report.failed), (96, 0), "{:?}", report.errors);
    assert_eq!(stats.max_in_flight.load(Ordering::SeqCst), 32);
    assert_eq!(stats.connections.load(Ordering::SeqCst), 32);
    assert_eq!(report.total_completion_tokens, 96 * 6);
    assert_ordered(&report);
}

#[test]
fn failed_requests_are_counted_with_their_reason() {
    let (addr, stats) = Fake { fail_every: Some(3), ..Fake::default() }.start();
    let report = block_on(bench_serve::run(config(addr, 3, 9))).unwrap();
    assert_eq!((report.requests, report.ok, report.failed), (9, 6, 3));
    assert_eq!(stats.chat_requests.load(Ordering::SeqCst), 9);
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors.get("HTTP 500: boom"), Some(&3));
    let statuses: Vec<_> = report.records.iter().filter(|r| !r.is_ok()).map(|r| r.status).collect();
    assert_eq!(statuses, vec![Some(500); 3]);
    // Means are over the successful requests only.
    assert_eq!(report.mean_completion_tokens, Some(12.0));
    assert_ordered(&report);
}

#[test]
fn connection_errors_fail_requests_without_aborting() {
    // A port that was just free.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let report = block_on(bench_serve::run(config(addr, 2, 5))).unwrap();
    assert_eq!((report.ok, report.failed), (0, 5));
    let (reason, n) = report.errors.iter().next().unwrap();
    assert!(reason.starts_with("connect to 127.0.0.1:"), "{reason}");
    assert_eq!(*n, 5);
    assert_eq!(report.ttft_ms_p50, None);
    assert_eq!(report.mean_completion_tokens, None);
    assert!(report.render_table().contains("5 x connect to"));
}

#[test]
fn without_usage_tokens_are_content_chunks_and_close_delimited_bodies_work() {
    let fake = Fake { usage: false, close_delimited: true, chunks: 4, ..Fake::default() };
    let (addr, stats) = fake.start();
    let report = block_on(bench_serve::run(config(addr, 2, 4))).unwrap();
    assert_eq!((report.ok, report.failed), (4, 0), "{:?}", report.errors);
    assert_eq!(report.mean_completion_tokens, Some(4.0));
    assert_eq!(report.mean_prompt_tokens, None);
    assert!(report.records.iter().all(|r| r.usage_completion_tokens.is_none()));
    // Connection: close means a new connection per request.
    assert_eq!(stats.connections.load(Ordering::SeqCst), 4);
}

#[test]
fn warmup_requests_are_not_measured_and_the_model_is_discovered() {
    let (addr, stats) = Fake { chunks: 3, ..Fake::default() }.start();
    let mut cfg = config(addr, 2, 3);
    cfg.warmup = 4;
    cfg.model = None;
    cfg.temperature = 0.7;
    let report = block_on(bench_serve::run(cfg)).unwrap();
    assert_eq!((report.requests, report.ok), (3, 3));
    assert_eq!(stats.chat_requests.load(Ordering::SeqCst), 7);
    assert_eq!(report.model, MODEL_ID);
    // The measured phase reuses the warm connections.
    assert_eq!(stats.connections.load(Ordering::SeqCst), 3, "one for GET /v1/models, two workers");
    let bodies = stats.bodies.lock().unwrap();
    assert!(bodies.iter().all(|b| b["model"] == MODEL_ID && b["temperature"] == 0.7));
}

#[test]
fn the_overall_timeout_ends_the_run() {
    let (addr, _stats) = Fake { chunks: 200, spacing: Duration::from_millis(20), ..Fake::default() }.start();
    let mut cfg = config(addr, 2, 6);
    cfg.timeout = Duration::from_secs(1);
    let t = Instant::now();
    let report = block_on(bench_serve::run(cfg)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(report.timed_out);
    assert_eq!((report.requests, report.ok, report.failed), (6, 0, 6));
    assert_eq!(report.errors.get("overall timeout (1 s) reached"), Some(&2));
    assert_eq!(report.errors.get("not started: overall timeout (1 s) reached"), Some(&4));
}

// ------------------------------------------------------------------------------------------------
// The binary

#[test]
fn the_binary_prints_one_json_object() {
    let (addr, stats) = Fake { chunks: 3, ..Fake::default() }.start();
    let url = format!("http://{addr}");
    // HELPLINE_MODEL (a GGUF path for the other commands) must not become the model name here.
    let out = helpline_bin()
        .env("HELPLINE_MODEL", "/models/some.gguf")
        .args(["bench", "serve", "--url", &url, "--json", "-c", "2", "-n", "4", "--max-tokens", "8", "--warmup", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    for key in ["concurrency", "requests", "ok", "failed", "requests_per_second", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "output_tokens_per_second_per_stream", "output_tokens_per_second_total", "mean_completion_tokens", "wall_seconds"] {
        assert!(v[key].is_number(), "{key}: {v}");
    }
    assert_eq!((v["concurrency"].as_u64(), v["requests"].as_u64(), v["ok"].as_u64(), v["failed"].as_u64()), (Some(2), Some(4), Some(4), Some(0)));
    assert_eq!(v["mean_completion_tokens"], 6.0);
    assert_eq!(v["model"], MODEL_ID);
    assert!(stats.bodies.lock().unwrap().iter().all(|b| b["model"] == MODEL_ID && b["max_tokens"] == 8));

    // An explicit --model-name is sent as given; the table is the default output.
    let out = helpline_bin().args(["bench", "serve", "--url", &url, "--model-name", "chosen", "-n", "1", "--prompt", "hi"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("| requests ok / failed | 1 / 0 |"));
    let last = stats.bodies.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last["model"].as_str(), last["messages"][0]["content"].as_str()), (Some("chosen"), Some("hi")));
}

#[test]
fn the_binary_rejects_bad_arguments_and_reports_failures() {
    let run = |args: &[&str]| {
        let out = helpline_bin().args(["bench", "serve"]).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run(&["--url", "http://127.0.0.1:1", "--concurrency", "0"]);
    assert!(!ok && err.contains("--concurrency must be at least 1"), "{err}");
    let (ok, err) = run(&["--url", "https://127.0.0.1:1"]);
    assert!(!ok && err.contains("https URLs are not supported"), "{err}");
    let (ok, err) = run(&["--url", "http://127.0.0.1:1", "--prompt", "a", "--prompts-file", "x"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");

    let (addr, _) = Fake { fail_every: Some(2), chunks: 2, ..Fake::default() }.start();
    let out = helpline_bin().args(["bench", "serve", "--url", &format!("http://{addr}"), "--model-name", "m", "-n", "2", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "any failed request makes the exit status 1");
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!((v["ok"].as_u64(), v["failed"].as_u64()), (Some(1), Some(1)));
    assert_eq!(v["errors"]["HTTP 500: boom"], 1);
}
