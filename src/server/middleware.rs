//! Cross-cutting layers, outermost first:
//! 1. request id + structured log line + per-route metrics (and 413s turned into the error shape);
//! 2. CORS (only when origins are configured: exact allow-list, no credentials);
//! 3. API-key auth (every route but `GET /health` when keys are configured);
//! 4. body limits (Content-Length checked up front, streamed bodies cut at the limit).
//!
//! Then the routes, with JSON 404 / 405 fallbacks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tracing::Instrument;

use super::{auth, ApiError, SharedState};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id of the current request (also in the `x-request-id` request header handlers see).
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Route label of requests no route matched (keeps the metric's label set bounded).
pub const UNMATCHED_ROUTE: &str = "unmatched";

pub fn apply(app: Router<SharedState>, state: SharedState) -> Router<SharedState> {
    let cfg = &state.config;
    let app = app
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(cfg.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), auth::require_key));
    let app = match cors_layer(&cfg.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(from_fn_with_state(state.clone(), observe))
}

/// The CORS layer for an allow-list of exact origins; `None` (CORS off) when the list is empty.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    let values: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    if values.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(values))
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([REQUEST_ID])
            .max_age(Duration::from_secs(600)),
    )
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    let path = uri.path();
    let shown: String = path.chars().take(200).collect();
    ApiError::not_found("route_not_found", format!("no route for {method} {shown}"))
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// An incoming `x-request-id` worth keeping: 1 to 128 characters of `A-Z a-z 0-9 - _ . :`.
pub fn sane_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| s.to_string())
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Request id, log line, metrics; a plain-text 413 from a body limit becomes the error shape.
async fn observe(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let id = req.headers().get(REQUEST_ID).and_then(sane_request_id).unwrap_or_else(new_request_id);
    let id_value = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    req.headers_mut().insert(REQUEST_ID, id_value.clone());
    req.extensions_mut().insert(RequestId(id.clone()));

    let matched = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let route = matched.clone().unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let method = req.method().clone();
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_default();
    // The raw path is user input: only for unmatched routes, escaped and cut.
    let path = matched.is_none().then(|| req.uri().path().chars().take(120).collect::<String>());
    let span = tracing::info_span!("request", id = %id, method = %method, route = %route);

    let mut resp = next.run(req).instrument(span.clone()).await;

    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json(&resp) {
        resp = ApiError::payload_too_large(state.config.max_body_bytes).into_response();
    }
    resp.headers_mut().insert(REQUEST_ID, id_value);
    let status = resp.status().as_u16();
    state.metrics.record_request(&route, status);
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 && status != 503 {
            tracing::warn!(status, latency_ms, peer = %peer, path = ?path, "request answered");
        } else {
            tracing::info!(status, latency_ms, peer = %peer, path = ?path, "request answered");
        }
    });
    resp
}

fn is_json(resp: &Response) -> bool {
    resp.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}
