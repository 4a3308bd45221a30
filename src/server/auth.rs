//! API-key authentication. Keys are held only as sha256 digests; a presented key is hashed and
//! compared against every accepted digest in constant time, so neither the comparison nor the
//! position of a match leaks through timing.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::{ApiError, SharedState};

/// The sha256 digest of an API key (what the config stores and `printf %s KEY | sha256sum` prints).
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched case-insensitively).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// Whether `headers` carry one of the accepted keys. Always true when no keys are configured.
pub fn is_authorized(headers: &HeaderMap, accepted: &[[u8; 32]]) -> bool {
    if accepted.is_empty() {
        return true;
    }
    let Some(token) = bearer_token(headers) else { return false };
    let presented = digest(token);
    // Every digest is compared, whatever matched before.
    let mut found = Choice::from(0u8);
    for d in accepted {
        found |= presented.ct_eq(d);
    }
    found.into()
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// No key: the chat page, the approved articles, health.
    Public,
    /// Chat, the model list, retrieval, a customer's own handoff and feedback.
    Customer,
    /// Support agents: conversations, customers' data, assist, KB drafts, audit, the outbox.
    Agent,
    /// Operators: index and policy reload, metrics, raw completions, tokenize.
    Admin,
}

/// What the request's key proved (put in the request's extensions by [`require_key`]); the
/// default is no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caller {
    /// The scope of the key presented; `None`: no key (or customer routes open without one).
    pub key: Option<Scope>,
}

impl Caller {
    /// An agent or an admin: the operator's own systems, trusted with every request field.
    pub fn is_trusted(&self) -> bool {
        matches!(self.key, Some(Scope::Agent | Scope::Admin))
    }
}

/// The scope a route belongs to.
pub fn route_scope(method: &Method, path: &str) -> Scope {
    let get = method == Method::GET || method == Method::HEAD;
    // The chat page and the articles it links to are what a customer's browser loads before it
    // can hold a key; they serve only the approved help-center content. The API's description and
    // the readiness probe say nothing private.
    if get
        && (path == "/health"
            || path == "/ready"
            || path == "/"
            || path == "/agent"
            || path == "/openapi.json"
            || path.starts_with("/assets/")
            || path.starts_with("/demo/sign-in/")
            || path.starts_with("/kb/"))
    {
        return Scope::Public;
    }
    let admin = ["/metrics", "/v1/index", "/v1/policy", "/v1/completions", "/tokenize", "/detokenize"];
    if admin.iter().any(|p| path == *p || path.starts_with(&format!("{p}/"))) {
        return Scope::Admin;
    }
    if is_agent_route(method, path) {
        return Scope::Agent;
    }
    Scope::Customer
}

/// Whether `method path` is public (no key needed).
pub fn is_public(method: &Method, path: &str) -> bool {
    route_scope(method, path) == Scope::Public
}

/// Routes for support agents (their own key scope): conversations, customers' data, agent assist,
/// KB drafts, audit and replay, the webhook outbox. A customer may still hand its own conversation over and leave
/// feedback (those two routes are in the customer scope).
pub fn is_agent_route(method: &Method, path: &str) -> bool {
    let customer_side = *method == Method::POST
        && ((path.starts_with("/v1/conversations/") && (path.ends_with("/handoff") || path.ends_with("/feedback")))
            || (path.starts_with("/v1/answers/") && path.ends_with("/feedback")));
    if customer_side {
        return false;
    }
    ["/v1/conversations", "/v1/customers/", "/v1/assist/", "/v1/kb/", "/v1/answers/", "/v1/deliveries", "/v1/actions"]
        .iter()
        .any(|p| path == p.trim_end_matches('/') || path.starts_with(p))
}

/// The scope of the key a request presents, if any.
fn key_scope(headers: &HeaderMap, state: &super::AppState) -> Option<Scope> {
    let access = &state.config.access;
    if !access.admin_key_hashes.is_empty() && is_authorized(headers, &access.admin_key_hashes) {
        return Some(Scope::Admin);
    }
    let agents = &state.config.conversations.agent_key_hashes;
    if !agents.is_empty() && is_authorized(headers, agents) {
        return Some(Scope::Agent);
    }
    let customers = &state.config.api_key_hashes;
    if !customers.is_empty() && is_authorized(headers, customers) {
        return Some(Scope::Customer);
    }
    None
}

/// An agent or admin route: refused with 403 `code` when its scope has no key configured (`off`),
/// 401 unless the request's key is of the scope (`allowed`), else run.
async fn scoped(req: Request, next: Next, off: bool, allowed: bool, code: &'static str, message: &'static str) -> Response {
    if off {
        return ApiError::forbidden(code, message).into_response();
    }
    if allowed {
        return next.run(req).await;
    }
    ApiError::unauthorized().into_response()
}

/// Middleware: each route's scope needs its key. Admin and agent routes need their own keys (and
/// are refused when none is configured); customer routes need a customer, agent or admin key when
/// customer keys are configured, and are open otherwise. Errors are the error table's.
pub async fn require_key(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let scope = route_scope(req.method(), req.uri().path());
    let key = key_scope(req.headers(), &state);
    req.extensions_mut().insert(Caller { key });
    match scope {
        Scope::Public => next.run(req).await,
        Scope::Admin => {
            let off = state.config.access.admin_key_hashes.is_empty();
            scoped(req, next, off, key == Some(Scope::Admin), "admin_routes_disabled", "admin routes are off: configure an admin key (`--admin-api-key` or `admin_api_keys_file`)").await
        }
        Scope::Agent => {
            let off = state.config.conversations.agent_key_hashes.is_empty();
            scoped(req, next, off, key == Some(Scope::Agent), "agent_routes_disabled", "agent routes are off: configure an agent key (`--agent-api-key` or `agent_api_keys_file`)").await
        }
        Scope::Customer => {
            if state.config.api_key_hashes.is_empty() || key.is_some() {
                return next.run(req).await;
            }
            ApiError::unauthorized().into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn digest_matches_sha256sum() {
        // printf %s abc | sha256sum
        let hex: String = digest("abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn bearer_keys_are_checked() {
        let accepted = [digest("first-key-0123456789"), digest("second-key-0123456789")];
        assert!(is_authorized(&headers("Bearer second-key-0123456789"), &accepted));
        assert!(is_authorized(&headers("bearer first-key-0123456789"), &accepted));
        assert!(!is_authorized(&headers("Bearer third-key-0123456789"), &accepted));
        assert!(!is_authorized(&headers("Basic first-key-0123456789"), &accepted));
        assert!(!is_authorized(&headers("Bearer"), &accepted));
        assert!(!is_authorized(&HeaderMap::new(), &accepted));
        assert!(is_authorized(&HeaderMap::new(), &[]));
    }

    #[test]
    fn only_health_and_the_chat_page_are_public() {
        assert!(is_public(&Method::GET, "/health"));
        assert!(!is_public(&Method::POST, "/health"));
        assert!(!is_public(&Method::GET, "/metrics"));
        assert!(!is_public(&Method::GET, "/health/"));
        assert!(is_public(&Method::GET, "/"));
        assert!(is_public(&Method::GET, "/kb/refund-policy"));
        assert!(!is_public(&Method::POST, "/"));
        assert!(!is_public(&Method::GET, "/v1/retrieve"));
        assert!(!is_public(&Method::GET, "/v1/index"));
        assert_eq!(route_scope(&Method::GET, "/metrics"), Scope::Admin);
        assert_eq!(route_scope(&Method::POST, "/v1/index/reload"), Scope::Admin);
        assert_eq!(route_scope(&Method::POST, "/v1/policy/reload"), Scope::Admin);
        assert_eq!(route_scope(&Method::POST, "/v1/completions"), Scope::Admin);
        assert_eq!(route_scope(&Method::POST, "/tokenize"), Scope::Admin);
        assert_eq!(route_scope(&Method::POST, "/v1/chat/completions"), Scope::Customer);
        assert_eq!(route_scope(&Method::POST, "/v1/conversations/c1/handoff"), Scope::Customer);
        assert_eq!(route_scope(&Method::GET, "/v1/conversations/c1"), Scope::Agent);
        assert_eq!(route_scope(&Method::GET, "/v1/kb/drafts"), Scope::Agent);
    }
}
