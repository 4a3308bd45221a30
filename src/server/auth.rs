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

/// Routes anyone may call without a key: the liveness probe, the customer chat page and the agent
/// console (their scripts then call the API with a key), and the approved articles.
pub fn is_public(method: &Method, path: &str) -> bool {
    // The chat page and the articles it links to are what a customer's browser loads before it
    // can hold a key; they serve only the approved help-center content.
    (method == Method::GET || method == Method::HEAD)
        && (path == "/health" || path == "/" || path == "/agent" || path.starts_with("/assets/") || path.starts_with("/kb/"))
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
    ["/v1/conversations", "/v1/customers/", "/v1/assist/", "/v1/kb/", "/v1/answers/", "/v1/deliveries"]
        .iter()
        .any(|p| path == p.trim_end_matches('/') || path.starts_with(p))
}

/// Middleware: agent routes need an agent key (and are refused when none is configured); the rest
/// need an API key or an agent key when API keys are configured. Errors are the error table's.
pub async fn require_key(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method(), req.uri().path());
    if is_public(method, path) {
        return next.run(req).await;
    }
    let agents = &state.config.conversations.agent_key_hashes;
    let agent = !agents.is_empty() && is_authorized(req.headers(), agents);
    if is_agent_route(method, path) {
        if agents.is_empty() {
            return ApiError::forbidden(
                "agent_routes_disabled",
                "agent routes are off: configure an agent key (`--agent-api-key` or `agent_api_keys_file`)",
            )
            .into_response();
        }
        if agent {
            return next.run(req).await;
        }
        return ApiError::unauthorized().into_response();
    }
    let hashes = &state.config.api_key_hashes;
    if hashes.is_empty() || agent || is_authorized(req.headers(), hashes) {
        return next.run(req).await;
    }
    ApiError::unauthorized().into_response()
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
    }
}
