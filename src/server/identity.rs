//! Who the customer of a request is.
//!
//! The company's site signs a short-lived customer token (a JWT: HS256 with a shared secret, or
//! EdDSA / RS256 with a key pair) and the page or backend sends it as `X-Helpline-Customer-Token`.
//! The server verifies it and takes the customer's id (`sub`) and details from its claims; the
//! conversation is then bound to that customer. Without a token, a customer is taken as the request
//! asserts it, and only where the operator allows anonymous chat: such a conversation is never the
//! same as a verified customer's, and it is continued only under the id it started with.

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::auth::Caller;
use super::ApiError;
use crate::config::AccessConfig;
use crate::store::Customer;

/// The request header that carries the customer token.
pub const TOKEN_HEADER: &str = "x-helpline-customer-token";

/// The longest a customer token may live (`exp` after `iat`, or after now when there is no `iat`):
/// tokens are meant to be minted per page view, not kept.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// How a conversation may be reached by this request.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    /// An agent or admin key: the operator's own systems, any conversation.
    Operator,
    /// A customer token the server verified.
    Verified(Customer),
    /// No token, anonymous chat allowed: the customer as the request asserts it.
    Anonymous,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    account_id: Option<String>,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

/// The verification key the config names: the algorithm and its key.
fn key(access: &AccessConfig) -> Result<Option<(Algorithm, DecodingKey)>, String> {
    if let Some(secret) = &access.customer_token_secret {
        return Ok(Some((Algorithm::HS256, DecodingKey::from_secret(secret.as_bytes()))));
    }
    let Some(pem) = &access.customer_token_public_key_pem else { return Ok(None) };
    if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        return Ok(Some((Algorithm::EdDSA, k)));
    }
    match DecodingKey::from_rsa_pem(pem) {
        Ok(k) => Ok(Some((Algorithm::RS256, k))),
        Err(e) => Err(format!("not an Ed25519 or RSA public key in PEM form ({e})")),
    }
}

/// Checks that the configured key can be used (at start-up, so a bad key stops the server).
pub fn check_config(access: &AccessConfig) -> Result<(), String> {
    key(access).map(|_| ())
}

fn token_error(message: impl Into<String>) -> ApiError {
    let mut e = ApiError::unauthorized();
    e.code = "invalid_customer_token";
    e.message = message.into();
    e.param = Some(TOKEN_HEADER.to_string());
    e
}

/// Verifies a customer token against the configured key and claims: signature, algorithm, `exp`
/// (with 30 s of leeway), its lifetime, `iss` and `aud` when configured, and the claims' bounds.
pub fn verify(access: &AccessConfig, token: &str, now_secs: u64) -> Result<Customer, ApiError> {
    let Some((alg, key)) = key(access).map_err(|m| ApiError::unavailable("customer_tokens_misconfigured", m))? else {
        return Err(token_error("this server does not accept customer tokens (no `customer_token_secret` or `customer_token_public_key`)"));
    };
    if token.len() > 8192 {
        return Err(token_error(format!("the customer token is {} bytes; at most 8192 are accepted", token.len())));
    }
    let mut v = Validation::new(alg);
    v.leeway = 30;
    // `iss` and `aud` are checked only when present unless required: a configured issuer or
    // audience must be in the token.
    let mut required = vec!["exp", "sub"];
    if access.customer_token_issuer.is_some() {
        required.push("iss");
    }
    if access.customer_token_audience.is_some() {
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    match &access.customer_token_issuer {
        Some(iss) => v.set_issuer(&[iss]),
        None => v.iss = None,
    }
    match &access.customer_token_audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| token_error(format!("the customer token was not accepted: {e}")))?;
    let c = data.claims;
    let from = c.iat.unwrap_or(now_secs).min(now_secs);
    if c.exp.saturating_sub(from) > MAX_TOKEN_LIFETIME_SECS {
        return Err(token_error(format!(
            "the customer token lives {} s; at most {MAX_TOKEN_LIFETIME_SECS} s are accepted (mint one per page view)",
            c.exp.saturating_sub(from)
        )));
    }
    let text = |name: &str, v: Option<String>| -> Result<Option<String>, ApiError> {
        match v {
            Some(s) if s.trim().is_empty() || s.chars().count() > 128 => Err(token_error(format!("the token's `{name}` claim must have 1 to 128 characters"))),
            other => Ok(other),
        }
    };
    let sub = text("sub", Some(c.sub))?.unwrap_or_default();
    let attributes = c.attributes.unwrap_or_default();
    let size = serde_json::to_string(&attributes).map(|t| t.len()).unwrap_or(usize::MAX);
    if attributes.len() > 32 || size > 4096 {
        return Err(token_error("the token's `attributes` claim must have at most 32 keys and 4096 bytes as JSON"));
    }
    Ok(Customer {
        id: Some(sub),
        account_id: text("account_id", c.account_id)?,
        plan: text("plan", c.plan)?,
        locale: text("locale", c.locale)?,
        attributes,
        verified: true,
    })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The identity of a customer-facing request: the operator's keys, a verified token, or anonymous
/// (refused with 401 `customer_token_required` where the operator does not allow it).
pub fn of_request(access: &AccessConfig, headers: &HeaderMap, caller: &Caller) -> Result<Identity, ApiError> {
    let token = headers.get(TOKEN_HEADER).map(|v| v.to_str().map(str::trim));
    match token {
        Some(Ok(t)) if !t.is_empty() => return Ok(Identity::Verified(verify(access, t, now_secs())?)),
        Some(_) => return Err(token_error(format!("`{TOKEN_HEADER}` must be a JWT in ASCII"))),
        None => {}
    }
    if caller.is_trusted() {
        return Ok(Identity::Operator);
    }
    if !access.anonymous_chat {
        let mut e = token_error(format!("this server needs a verified customer: send the token your site signed as `{TOKEN_HEADER}`"));
        e.code = "customer_token_required";
        return Err(e);
    }
    Ok(Identity::Anonymous)
}

impl Identity {
    /// The turn's claim on a conversation.
    pub fn claim(&self) -> crate::turn::Claim {
        match self {
            Identity::Operator => crate::turn::Claim::Operator,
            Identity::Verified(_) => crate::turn::Claim::Verified,
            Identity::Anonymous => crate::turn::Claim::Anonymous,
        }
    }

    /// The customer a request is about: the token's (a `helpline.customer.id` that differs is
    /// refused), or the request's as asserted (never marked verified).
    pub fn customer(&self, asserted: crate::store::Customer) -> Result<crate::store::Customer, ApiError> {
        match self {
            Identity::Verified(c) => {
                if asserted.id.is_some() && asserted.id != c.id {
                    let mut e = ApiError::forbidden("customer_mismatch", "`helpline.customer.id` is not the customer of the customer token");
                    e.param = Some("helpline.customer.id".into());
                    return Err(e);
                }
                Ok(c.clone())
            }
            _ => Ok(crate::store::Customer { verified: false, ..asserted }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn access() -> AccessConfig {
        AccessConfig { customer_token_secret: Some("s".repeat(32)), ..AccessConfig::default() }
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[test]
    fn tokens_are_verified() {
        let now = now_secs();
        let a = access();
        let good = token(serde_json::json!({"sub": "cust-1", "exp": now + 600, "iat": now, "plan": "pro"}), &"s".repeat(32));
        let c = verify(&a, &good, now).unwrap();
        assert_eq!((c.id.as_deref(), c.plan.as_deref(), c.verified), (Some("cust-1"), Some("pro"), true));
        // Wrong key, expired, too long-lived, no sub.
        assert!(verify(&a, &token(serde_json::json!({"sub": "x", "exp": now + 600}), &"t".repeat(32)), now).is_err());
        assert!(verify(&a, &token(serde_json::json!({"sub": "x", "exp": now - 600}), &"s".repeat(32)), now).is_err());
        assert!(verify(&a, &token(serde_json::json!({"sub": "x", "exp": now + 90_000, "iat": now}), &"s".repeat(32)), now).is_err());
        assert!(verify(&a, &token(serde_json::json!({"exp": now + 600}), &"s".repeat(32)), now).is_err());
        // Issuer and audience, when configured.
        let strict = AccessConfig { customer_token_issuer: Some("https://shop".into()), customer_token_audience: Some("helpline".into()), ..access() };
        assert!(verify(&strict, &good, now).is_err());
        let ok = token(serde_json::json!({"sub": "x", "exp": now + 60, "iss": "https://shop", "aud": "helpline"}), &"s".repeat(32));
        assert!(verify(&strict, &ok, now).is_ok());
        // `alg: none` is never accepted.
        // {"alg":"none","typ":"JWT"} . {"sub":"x","exp":1800000060} . (no signature)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjoxODAwMDAwMDYwfQ.";
        assert!(verify(&a, none, now).is_err());
    }

    #[test]
    fn conversations_are_only_the_owners() {
        use crate::turn::Claim;
        let verified = Customer { id: Some("a".into()), verified: true, ..Customer::default() };
        let anon = Customer { id: Some("a".into()), ..Customer::default() };
        let nobody = Customer::default();
        assert!(Claim::Verified.may_use(&verified, &verified));
        assert!(!Claim::Verified.may_use(&verified, &anon), "a verified customer does not continue an anonymous one's conversation");
        assert!(!Claim::Anonymous.may_use(&anon, &verified), "nor the other way round");
        assert!(Claim::Anonymous.may_use(&anon, &anon));
        assert!(!Claim::Anonymous.may_use(&nobody, &anon), "leaving the id out is not the same customer");
        assert!(Claim::Operator.may_use(&nobody, &verified));
    }
}
