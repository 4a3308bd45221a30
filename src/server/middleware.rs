//! Cross-cutting layers, outermost first:
//! 1. request id + structured log line + per-route metrics (and 413s turned into the error shape);
//! 2. CORS (only when origins are configured: exact allow-list, no credentials);
//! 3. the Host allow-list and the CSRF check (see [`same_site`]);
//! 4. scopes and keys (see `auth`);
//! 5. body limits (Content-Length checked up front, streamed bodies cut at the limit).
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
        .layer(from_fn_with_state(state.clone(), read_body))
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(cfg.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), auth::require_key))
        .layer(from_fn_with_state(state.clone(), same_site));
    let app = match cors_layer(&cfg.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(from_fn_with_state(state.clone(), observe))
}

/// The header a page's script may send instead of a JSON body to show a request is its own (no
/// other site can send a custom header without the server's CORS consent).
pub const REQUEST_HEADER: &str = "x-helpline-request";

/// DNS rebinding and CSRF.
///
/// - The `Host` header must name this server: an IP address, `localhost`, or a configured
///   `allowed_host` (a rebinding page presents its own name). Otherwise 403 `host_not_allowed`.
/// - A state-changing request (any method but GET, HEAD and OPTIONS) must be one another site's
///   page cannot send without the server's CORS consent: `Content-Type: application/json`, an
///   `Authorization` header, or `X-Helpline-Request`. Otherwise 403 `csrf_check_failed` (no
///   content type) or 415 (another content type).
pub async fn same_site(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if let Some(host) = req.headers().get(header::HOST) {
        let name = host.to_str().ok().map(host_name);
        let allowed = name.as_deref().is_some_and(|n| host_allowed(n, &state.config.allowed_hosts));
        if !allowed {
            let shown: String = host.to_str().unwrap_or("(not ASCII)").chars().take(100).collect();
            return ApiError::forbidden(
                "host_not_allowed",
                format!("the Host header {shown:?} is not a name of this server; add it with `--allowed-host` (setting `allowed_host`)"),
            )
            .into_response();
        }
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let h = req.headers();
        let vouched = h.contains_key(header::AUTHORIZATION) || h.contains_key(REQUEST_HEADER) || h.contains_key("x-requested-with");
        if !vouched {
            match h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
                Some(ct) if is_json_type(ct) => {}
                Some(_) => return ApiError::unsupported_media_type().into_response(),
                None => {
                    return ApiError::forbidden(
                        "csrf_check_failed",
                        "a state-changing request needs `Content-Type: application/json` (a JSON body, `{}` will do), an `Authorization` header, or `X-Helpline-Request: 1`",
                    )
                    .into_response()
                }
            }
        }
    }
    next.run(req).await
}

/// Reads a request's body whole before the route runs, within `body_read_timeout` (408 naming
/// the bound otherwise) and `max_body_bytes` (413): a client trickling a body cannot hold a
/// connection and a handler for longer than that.
pub async fn read_body(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let has_body = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if !has_body {
        return next.run(req).await;
    }
    let cfg = &state.config;
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(cfg.body_read_timeout, axum::body::to_bytes(body, cfg.max_body_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_large {
                ApiError::payload_too_large(cfg.max_body_bytes).into_response()
            } else {
                ApiError::malformed(format!("the request body could not be read: {e}")).into_response()
            };
        }
        Err(_) => {
            let mut e = ApiError::bad_request(
                "request_timeout",
                format!("the request body did not arrive within {} s (`body_read_timeout_secs`)", cfg.body_read_timeout.as_secs()),
            );
            e.status = StatusCode::REQUEST_TIMEOUT;
            return e.into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn is_json_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The host of a `Host` header value, lower case, without the port or a trailing dot.
fn host_name(value: &str) -> String {
    let v = value.trim();
    let name = if let Some(rest) = v.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        match v.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// IP literals and `localhost` always; names only when configured (or `*`).
fn host_allowed(name: &str, allowed: &[String]) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
        || allowed.iter().any(|a| a == "*" || a == name)
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
