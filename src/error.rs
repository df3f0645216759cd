//! One error type for everything a call or a control request can fail with, and the one
//! place that turns it into an HTTP status, the Dispatch error body `{"code","message"}`
//! and the `X-Dispatch-Error` header that lets a caller tell a platform error from a
//! function's own 5xx.

use std::time::Duration;

use http::{HeaderValue, StatusCode};

use crate::body::RespBody;

/// What went wrong. Each variant maps to exactly one status (see [`Error::status`]); the
/// message names the thing that failed, so it can be shown to a user as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    /// No credentials, or wrong ones. `challenge` becomes the `WWW-Authenticate` header
    /// (RFC 6750: `Bearer realm="dispatch"`, with `error="invalid_token"` for a wrong one).
    #[error("{message}")]
    Unauthorized {
        message: String,
        challenge: &'static str,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unprocessable(String),
    /// An https-only API called over plain HTTP (426, as Kong answers).
    #[error("{0}")]
    UpgradeRequired(String),
    /// The function's concurrency limit and its wait queue are both full, or the wait
    /// ran out. `retry_after` becomes the `Retry-After` header.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after: Duration,
    },
    /// An API's rate limit for this caller is spent (429 with `Retry-After`).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    NotImplemented(String),
    /// The upstream refused, reset or closed the connection, or answered garbage.
    #[error("function \"{function}\": upstream {endpoint} failed: {cause}")]
    Upstream {
        function: String,
        endpoint: String,
        cause: String,
    },
    /// The function's deadline passed before its upstream answered.
    #[error("function \"{function}\": deadline exceeded after {after_ms} ms (upstream {endpoint})")]
    Timeout {
        function: String,
        endpoint: String,
        after_ms: u64,
    },
    #[error("store: {0}")]
    Store(String),
    /// The queue's broker is out of reach (or did not confirm): nothing was accepted, and
    /// the caller may try again after `retry_after`.
    #[error("queue: {message}")]
    QueueUnavailable {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            Error::TooManyRequests { .. } | Error::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Error::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::QueueUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short, stable name for the `X-Dispatch-Error` header and for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad-request",
            Error::Unauthorized { .. } => "unauthorized",
            Error::NotFound(_) => "not-found",
            Error::MethodNotAllowed(_) => "method-not-allowed",
            Error::Conflict(_) => "conflict",
            Error::PayloadTooLarge(_) => "payload-too-large",
            Error::UnsupportedMediaType(_) => "unsupported-media-type",
            Error::Unprocessable(_) => "unprocessable",
            Error::UpgradeRequired(_) => "https-required",
            Error::TooManyRequests { .. } => "concurrency-limit",
            Error::RateLimited { .. } => "rate-limit",
            Error::NotImplemented(_) => "not-implemented",
            Error::Upstream { .. } => "upstream-unavailable",
            Error::Timeout { .. } => "upstream-timeout",
            Error::Store(_) => "store-unavailable",
            Error::QueueUnavailable { .. } => "queue-unavailable",
            Error::Internal(_) => "internal",
        }
    }

    /// The HTTP response a caller sees: status, `X-Dispatch-Error`, `Retry-After` and
    /// `WWW-Authenticate` where they apply, and the Dispatch error body.
    pub fn into_response(self) -> http::Response<RespBody> {
        let status = self.status();
        let body = serde_json::json!({ "code": status.as_u16(), "message": self.to_string() });
        let mut resp = crate::body::json_response(status, &body);
        let headers = resp.headers_mut();
        headers.insert("x-dispatch-error", HeaderValue::from_static(self.kind()));
        if let Error::TooManyRequests { retry_after, .. }
        | Error::RateLimited { retry_after, .. }
        | Error::QueueUnavailable { retry_after, .. } = &self
        {
            // Rounded up: a client that waits as told is let in.
            let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Error::UpgradeRequired(_) = &self {
            headers.insert(
                http::header::UPGRADE,
                HeaderValue::from_static("TLS/1.2, HTTP/1.1"),
            );
            headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("Upgrade"),
            );
        }
        if let Error::Unauthorized { challenge, .. } = &self {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        resp
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `e` and its sources, joined: hyper's own message alone ("connection error") hides the cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_requests_carries_retry_after_and_kind() {
        let resp = Error::TooManyRequests {
            message: "function \"f\" is at its limit".into(),
            retry_after: Duration::from_millis(200),
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()["x-dispatch-error"], "concurrency-limit");
    }

    #[test]
    fn upstream_error_names_function_and_endpoint() {
        let e = Error::Upstream {
            function: "hello".into(),
            endpoint: "http://127.0.0.1:9".into(),
            cause: "connection refused".into(),
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        let msg = e.to_string();
        assert!(
            msg.contains("\"hello\"") && msg.contains("127.0.0.1:9"),
            "{msg}"
        );
    }
}
