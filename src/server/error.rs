//! The one error table: every failure leaves the server as `{"error": {"message", "type", "code", "param"}}`
//! with the status that fits. Handlers return `ApiError`; nothing else builds error bodies.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable class, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// Stable machine-readable code, e.g. `invalid_value`, `queue_full`.
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    code: &'a str,
    param: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, code, message: message.into(), param: None, retry_after: None }
    }

    /// 400: the body is not valid JSON (or not JSON of the right shape).
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "malformed_request", message)
    }

    /// 400: a request that is well-formed but cannot be served as asked (e.g. prompt over the context).
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
    }

    /// 422: a field is missing, of the wrong type, or out of range; the message names the field and the bound.
    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", "invalid_value", message);
        e.param = Some(field.to_string());
        e
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "a valid API key is required: send `Authorization: Bearer <key>`",
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", code, message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", "this route does not accept that method")
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("the request body is larger than the server's limit of {limit} bytes"),
        )
    }

    /// 413: one part of the request is over its bound (a message, the message count); `param`
    /// names it and the message says the bound.
    pub fn too_large(code: &'static str, field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", code, message);
        e.param = Some(field.to_string());
        e
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )
    }

    pub fn too_many_requests(retry_after: u64, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "queue_full", message);
        e.retry_after = Some(retry_after);
        e
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "not_ready", message);
        e.retry_after = Some(1);
        e
    }

    /// 500: the detail goes to the log (with the request id), never to the client.
    /// 503 for a part of the service that is missing (not a matter of waiting), e.g. no search index.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", code, message)
    }

    /// 409: the request conflicts with work in progress (e.g. the index is being rebuilt elsewhere).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", code, message)
    }

    /// 403: the key is valid but not for this route (customer keys on agent routes).
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", code, message)
    }

    /// The conversation store's errors: 404, 409, 400 naming the field, 503 when it is down.
    pub fn store(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::NotFound { .. } => Self::not_found("not_found", e.to_string()),
            StoreError::Conflict(_) => Self::conflict("conflict", e.to_string()),
            StoreError::Invalid { field, .. } => {
                let mut err = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_value", e.to_string());
                err.param = Some(field.to_string());
                err
            }
            StoreError::Unavailable(_) => {
                let mut err = Self::unavailable("store_unavailable", format!("{e}; the turn was not taken, retry later"));
                err.retry_after = Some(2);
                err
            }
            StoreError::Backend(_) => Self::internal(e),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(detail = %detail, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", "the server failed to handle this request")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Detail { message: &self.message, kind: self.kind, code: self.code, param: self.param.as_deref() },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `axum::Json` whose rejections use the error table: 415 without a JSON content type, 413 over the
/// body limit, 400 for malformed JSON, 422 for a field of the wrong type (naming the field).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::unsupported_media_type(),
                JsonRejection::JsonSyntaxError(e) => ApiError::malformed(format!("the body is not valid JSON: {}", e.body_text())),
                JsonRejection::JsonDataError(e) => {
                    let text = e.body_text();
                    let field = text.split(':').nth(1).map(str::trim).filter(|f| !f.is_empty()).unwrap_or("body").to_string();
                    ApiError::invalid_field(&field, text)
                }
                JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    ApiError::payload_too_large(0).with_message(e.body_text())
                }
                other => ApiError::malformed(other.body_text()),
            }),
        }
    }
}

impl ApiError {
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }
}

/// A turn's domain error, in the one error table.
impl From<crate::turn::TurnError> for ApiError {
    fn from(e: crate::turn::TurnError) -> Self {
        use crate::turn::TurnError as T;
        match e {
            T::Invalid { field, message } => ApiError::invalid_field(&field, message),
            T::BadRequest { code, message, param } => {
                let mut err = ApiError::bad_request(code, message);
                err.param = param;
                err
            }
            T::QueueFull { capacity } => ApiError::too_many_requests(
                super::openai::QUEUE_FULL_RETRY_AFTER_SECS,
                format!("the server is busy: {capacity} requests are already waiting; retry later"),
            ),
            T::Unavailable { code: "not_ready", message } => ApiError::not_ready(message),
            T::Unavailable { code, message } => ApiError::unavailable(code, message),
            T::Store(s) => ApiError::store(s),
            T::Internal(m) => ApiError::internal(m),
        }
    }
}
