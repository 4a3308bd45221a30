//! A DEMO account backend for the fictional Tallyworks, so that Helpline's shipped actions
//! (`docs-corpus/actions.toml`) have something real to call: an HTTP service with its own SQLite
//! file, seeded with demo accounts. It is not part of Helpline and not for production.
//!
//!     TALLYWORKS_BACKEND_TOKEN=demo-token-0123456789 \
//!       cargo run --release --example tallyworks-backend -- --port 8091 --db data/tallyworks-demo.db
//!
//! Routes (all need `Authorization: Bearer $TALLYWORKS_BACKEND_TOKEN`):
//! - `POST /v1/accounts/{id}/password-reset` -> `{sent_to, valid_minutes}` (5 per hour per account)
//! - `GET /v1/accounts/{id}/lockout` -> `{locked, lifts_at, summary}`
//! - `GET /v1/accounts/{id}/subscription` -> `{plan, seats, seats_used, next_invoice: {amount, date}}`
//! - `GET /v1/accounts/{id}/invoices` -> `{invoices: [{number, date, amount, status, url}]}`
//! - `POST /v1/accounts/{id}/billing-email` `{email}` -> `{billing_email}`
//! - `GET /v1/calls` -> every call it served, for tests (`{calls: [{method, path, body}]}`)
//!
//! Demo accounts: `acct-1001` (Ann Lee, Business, locked for 15 minutes at start), `acct-1002`
//! (Ben Ortiz, Starter). For failure tests: `acct-slow` answers after 30 s, `acct-broken` with a
//! 500; any other id is a 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};

struct App {
    db: SqlitePool,
    token: String,
}

type Shared = Arc<App>;

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn err(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| t == app.token)
}

/// Records the call and checks the token and the account; `Err` is the answer to give.
async fn enter(app: &App, headers: &HeaderMap, method: &str, path: &str, body: Option<&Value>, id: &str) -> Result<(), Response> {
    let _ = sqlx::query("INSERT INTO calls (method, path, body, at) VALUES (?, ?, ?, ?)")
        .bind(method)
        .bind(path)
        .bind(body.map(|b| b.to_string()))
        .bind(now_secs())
        .execute(&app.db)
        .await;
    if !authorized(app, headers) {
        return Err(err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
    }
    match id {
        "acct-slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err(err(StatusCode::GATEWAY_TIMEOUT, "slow demo account"))
        }
        "acct-broken" => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "the demo backend failed on purpose")),
        _ => {
            let found = sqlx::query("SELECT 1 FROM accounts WHERE id = ?").bind(id).fetch_optional(&app.db).await.map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?;
            if found.is_none() {
                return Err(err(StatusCode::NOT_FOUND, "no such account"));
            }
            Ok(())
        }
    }
}

fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
        None => "***".into(),
    }
}

async fn password_reset(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = enter(&app, &headers, "POST", &format!("/v1/accounts/{id}/password-reset"), None, &id).await {
        return r;
    }
    let hour_ago = now_secs() - 3600;
    let recent: i64 = sqlx::query("SELECT COUNT(*) FROM resets WHERE account_id = ? AND at > ?").bind(&id).bind(hour_ago).fetch_one(&app.db).await.map(|r| r.get(0)).unwrap_or(0);
    if recent >= 5 {
        return err(StatusCode::TOO_MANY_REQUESTS, "at most 5 reset links per hour");
    }
    let _ = sqlx::query("INSERT INTO resets (account_id, at) VALUES (?, ?)").bind(&id).bind(now_secs()).execute(&app.db).await;
    let email: String = sqlx::query("SELECT email FROM accounts WHERE id = ?").bind(&id).fetch_one(&app.db).await.map(|r| r.get(0)).unwrap_or_default();
    Json(json!({"sent_to": mask(&email), "valid_minutes": 60})).into_response()
}

async fn lockout(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = enter(&app, &headers, "GET", &format!("/v1/accounts/{id}/lockout"), None, &id).await {
        return r;
    }
    let until: i64 = sqlx::query("SELECT locked_until FROM accounts WHERE id = ?").bind(&id).fetch_one(&app.db).await.map(|r| r.get(0)).unwrap_or(0);
    let left = until - now_secs();
    if left > 0 {
        let minutes = (left + 59) / 60;
        Json(json!({"locked": true, "lifts_at": until, "summary": format!("Your sign-in is locked after too many failed attempts. The lock lifts by itself in about {minutes} minutes, or at once when you complete a password reset.")})).into_response()
    } else {
        Json(json!({"locked": false, "lifts_at": null, "summary": "Your sign-in is not locked. If you cannot sign in, check the email address and Caps Lock, or reset your password."})).into_response()
    }
}

async fn subscription(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = enter(&app, &headers, "GET", &format!("/v1/accounts/{id}/subscription"), None, &id).await {
        return r;
    }
    match sqlx::query("SELECT plan, seats, seats_used, next_amount, next_date FROM accounts WHERE id = ?").bind(&id).fetch_one(&app.db).await {
        Ok(r) => Json(json!({
            "plan": r.get::<String, _>(0),
            "seats": r.get::<i64, _>(1),
            "seats_used": r.get::<i64, _>(2),
            "next_invoice": {"amount": r.get::<String, _>(3), "date": r.get::<String, _>(4)},
        }))
        .into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn invoices(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = enter(&app, &headers, "GET", &format!("/v1/accounts/{id}/invoices"), None, &id).await {
        return r;
    }
    let rows = sqlx::query("SELECT number, date, amount, status FROM invoices WHERE account_id = ? ORDER BY date DESC").bind(&id).fetch_all(&app.db).await.unwrap_or_default();
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let number: String = r.get(0);
            json!({"number": number, "date": r.get::<String, _>(1), "amount": r.get::<String, _>(2), "status": r.get::<String, _>(3),
                   "url": format!("https://billing.tallyworks.example/invoices/{number}")})
        })
        .collect();
    Json(json!({"invoices": list})).into_response()
}

async fn billing_email(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap, body: Option<Json<Value>>) -> Response {
    let body = body.map(|Json(b)| b).unwrap_or(Value::Null);
    if let Err(r) = enter(&app, &headers, "POST", &format!("/v1/accounts/{id}/billing-email"), Some(&body), &id).await {
        return r;
    }
    let Some(email) = body.get("email").and_then(Value::as_str).filter(|e| e.contains('@') && e.len() <= 254) else {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "`email` must be an email address");
    };
    if let Err(e) = sqlx::query("UPDATE accounts SET billing_email = ? WHERE id = ?").bind(email).bind(&id).execute(&app.db).await {
        return err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    Json(json!({"billing_email": email})).into_response()
}

async fn calls(State(app): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let rows = sqlx::query("SELECT method, path, body FROM calls ORDER BY id").fetch_all(&app.db).await.unwrap_or_default();
    let list: Vec<Value> = rows
        .iter()
        .map(|r| {
            let body: Option<String> = r.get(2);
            json!({"method": r.get::<String, _>(0), "path": r.get::<String, _>(1), "body": body.and_then(|b| serde_json::from_str::<Value>(&b).ok())})
        })
        .collect();
    Json(json!({"calls": list})).into_response()
}

async fn account(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    match sqlx::query("SELECT email, billing_email FROM accounts WHERE id = ?").bind(&id).fetch_optional(&app.db).await {
        Ok(Some(r)) => Json(json!({"id": id, "email": r.get::<String, _>(0), "billing_email": r.get::<String, _>(1)})).into_response(),
        Ok(None) => err(StatusCode::NOT_FOUND, "no such account"),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn open(path: &str) -> Result<SqlitePool, sqlx::Error> {
    if let Some(dir) = std::path::Path::new(path).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let opts = SqliteConnectOptions::new().filename(path).create_if_missing(true);
    let db = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
    for stmt in [
        "CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, billing_email TEXT NOT NULL, plan TEXT NOT NULL, seats INTEGER NOT NULL, seats_used INTEGER NOT NULL, next_amount TEXT NOT NULL, next_date TEXT NOT NULL, locked_until INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS invoices (number TEXT PRIMARY KEY, account_id TEXT NOT NULL, date TEXT NOT NULL, amount TEXT NOT NULL, status TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS resets (account_id TEXT NOT NULL, at INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY AUTOINCREMENT, method TEXT NOT NULL, path TEXT NOT NULL, body TEXT, at INTEGER NOT NULL)",
    ] {
        sqlx::query(stmt).execute(&db).await?;
    }
    let seeded: i64 = sqlx::query("SELECT COUNT(*) FROM accounts").fetch_one(&db).await?.get(0);
    if seeded == 0 {
        let lock = now_secs() + 15 * 60;
        sqlx::query("INSERT INTO accounts VALUES ('acct-1001', 'Ann Lee', 'ann.lee@acme.example', 'billing@acme.example', 'Business', 25, 19, '$475.00', '2027-01-01', ?), ('acct-1002', 'Ben Ortiz', 'ben@ortiz.example', 'ben@ortiz.example', 'Starter', 3, 1, '$29.00', '2026-12-15', 0)")
            .bind(lock)
            .execute(&db)
            .await?;
        sqlx::query("INSERT INTO invoices VALUES ('INV-2026-1101', 'acct-1001', '2026-11-01', '$475.00', 'paid'), ('INV-2026-1001', 'acct-1001', '2026-10-01', '$475.00', 'paid'), ('INV-2026-0901', 'acct-1001', '2026-09-01', '$450.00', 'paid'), ('INV-2026-1115', 'acct-1002', '2026-11-15', '$29.00', 'open')")
            .execute(&db)
            .await?;
    }
    Ok(db)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut port: u16 = 8091;
    let mut db_path = "data/tallyworks-demo.db".to_string();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).unwrap_or_else(|| fail("--port needs a port number (0 picks a free one)")),
            "--db" => db_path = args.next().unwrap_or_else(|| fail("--db needs a file path")),
            other => fail(&format!("unknown argument {other:?}; use --port PORT and --db FILE")),
        }
    }
    let token = std::env::var("TALLYWORKS_BACKEND_TOKEN").unwrap_or_default();
    if token.len() < 16 {
        fail("set TALLYWORKS_BACKEND_TOKEN to a token of at least 16 characters (the bot sends it as a bearer token)");
    }
    let db = open(&db_path).await.unwrap_or_else(|e| fail(&format!("cannot open {db_path}: {e}")));
    let app = Arc::new(App { db, token });
    let router = Router::new()
        .route("/v1/accounts/{id}/password-reset", post(password_reset))
        .route("/v1/accounts/{id}/lockout", get(lockout))
        .route("/v1/accounts/{id}/subscription", get(subscription))
        .route("/v1/accounts/{id}/invoices", get(invoices))
        .route("/v1/accounts/{id}/billing-email", post(billing_email))
        .route("/v1/accounts/{id}", get(account))
        .route("/v1/calls", get(calls))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap_or_else(|e| fail(&format!("cannot bind port {port}: {e}")));
    let addr = listener.local_addr().expect("a bound address");
    println!("tallyworks demo backend listening on http://{addr}");
    axum::serve(listener, router).await.unwrap_or_else(|e| fail(&e.to_string()));
}

fn fail(message: &str) -> ! {
    eprintln!("tallyworks-backend: {message}");
    std::process::exit(2);
}
