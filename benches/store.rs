//! Store throughput and latency, plain timing (no harness).
//!
//! For 1, 8 and 32 concurrent conversations it measures:
//! * write throughput: each task repeats the server's per-message pattern
//!   (customer turn, pending bot turn, completion) for a fixed time; turns/s
//!   counts both turns of each exchange;
//! * the latency the store adds to one answer (append pending + complete),
//!   p50 and p99;
//! * read throughput: `get_conversation` on 20-turn conversations.
//!
//! SQLite runs with `synchronous = full` (the default) and `normal`;
//! PostgreSQL runs when `HELPLINE_TEST_POSTGRES_URL` is set (see
//! `scripts/postgres.sh`), in a schema of its own that is dropped afterwards.
//! `BENCH_SECONDS` sets the write window per row (default 1.5; reads get
//! two thirds of it).

use std::time::{Duration, Instant};

use sqlx::Connection;
use helpline::store::{new_id, Customer, Role, Store, StoreOptions, Synchronous, TurnState};

const CONCURRENCY: [usize; 3] = [1, 8, 32];

struct Row {
    backend: String,
    concurrency: usize,
    write_turns_per_s: f64,
    reads_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn conversations(store: &Store, n: usize, turns_each: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let c = store
            .ensure_conversation(None, &Customer::default())
            .await
            .unwrap();
        for i in 0..turns_each {
            let role = if i % 2 == 0 {
                Role::Customer
            } else {
                Role::Bot
            };
            store
                .append_turn(
                    &c.id,
                    role,
                    "a typical message of some length",
                    TurnState::Complete,
                )
                .await
                .unwrap();
        }
        ids.push(c.id);
    }
    ids
}

async fn measure(label: &str, store: &Store, concurrency: usize, window: Duration) -> Row {
    // Writes.
    let ids = conversations(store, concurrency, 0).await;
    let start = Instant::now();
    let deadline = start + window;
    let mut tasks = Vec::new();
    for id in ids {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut turns = 0u64;
            while Instant::now() < deadline {
                store
                    .append_turn(
                        &id,
                        Role::Customer,
                        "How do I reset my password?",
                        TurnState::Complete,
                    )
                    .await
                    .unwrap();
                let t = Instant::now();
                let pending = store
                    .append_turn(&id, Role::Bot, "", TurnState::Pending)
                    .await
                    .unwrap();
                store
                    .complete_turn(
                        &pending.id,
                        "Open Settings, then Security, then Reset password.",
                        TurnState::Complete,
                        Some("stop"),
                        Some(serde_json::json!({"citations": [3], "guard": "pass"})),
                        Some(serde_json::json!({"model_sha256": "00", "seed": 1})),
                    )
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
                turns += 2;
            }
            (turns, latencies)
        }));
    }
    let mut turns = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        let (n, l) = t.await.unwrap();
        turns += n;
        latencies.extend(l);
    }
    let write_elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i].as_secs_f64() * 1000.0
    };

    // Reads.
    let ids = conversations(store, concurrency, 20).await;
    let start = Instant::now();
    let deadline = start + window * 2 / 3;
    let mut tasks = Vec::new();
    for id in ids {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while Instant::now() < deadline {
                let (_, turns) = store.get_conversation(&id).await.unwrap();
                assert_eq!(turns.len(), 20);
                reads += 1;
            }
            reads
        }));
    }
    let mut reads = 0;
    for t in tasks {
        reads += t.await.unwrap();
    }
    let read_elapsed = start.elapsed().as_secs_f64();

    Row {
        backend: label.to_owned(),
        concurrency,
        write_turns_per_s: turns as f64 / write_elapsed,
        reads_per_s: reads as f64 / read_elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

async fn run() {
    let window = Duration::from_secs_f64(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.5),
    );
    let mut rows = Vec::new();
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let label = format!(
            "sqlite ({})",
            if sync == Synchronous::Full {
                "full"
            } else {
                "normal"
            }
        );
        for &c in &CONCURRENCY {
            let dir = tempfile::tempdir().unwrap();
            let opts = StoreOptions {
                synchronous: sync,
                ..StoreOptions::default()
            };
            let store = Store::open(dir.path().to_str().unwrap(), opts)
                .await
                .unwrap();
            rows.push(measure(&label, &store, c, window).await);
            store.close().await;
        }
    }
    match std::env::var("HELPLINE_TEST_POSTGRES_URL") {
        Ok(base) => {
            for &c in &CONCURRENCY {
                let schema = format!("bench_{}", &new_id("")[..8]);
                let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let sep = if base.contains('?') { '&' } else { '?' };
                let target = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                let opts = StoreOptions {
                    max_connections: 32,
                    ..StoreOptions::default()
                };
                let store = Store::open(&target, opts).await.unwrap();
                rows.push(measure("postgres", &store, c, window).await);
                store.close().await;
                sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
            }
        }
        Err(_) => {
            println!("postgres: skipped (set HELPLINE_TEST_POSTGRES_URL, see scripts/postgres.sh)")
        }
    }

    println!(
        "\n{:<16} {:>5} {:>14} {:>12} {:>14} {:>14}",
        "backend", "conc", "write turns/s", "reads/s", "answer p50 ms", "answer p99 ms"
    );
    for r in rows {
        println!(
            "{:<16} {:>5} {:>14.0} {:>12.0} {:>14.2} {:>14.2}",
            r.backend, r.concurrency, r.write_turns_per_s, r.reads_per_s, r.p50_ms, r.p99_ms
        );
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
