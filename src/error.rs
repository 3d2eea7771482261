//! Errors of the data plane and the admin API, and the single place where each
//! becomes an `application/problem+json` response (RFC 9457).
//!
//! Each plane has one enum; [`GatewayError::to_problem`] and
//! [`AdminError::to_problem`] are exhaustive matches without a catch-all arm,
//! so a new variant cannot ship without a status and a `code`. Messages never
//! contain a presented key or admin token: variants carry no secret.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// Why the data plane refused or failed a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches this request")]
    NoRoute,
    #[error("no API key was presented")]
    MissingKey,
    #[error("the API key is not valid")]
    InvalidKey,
    #[error("the API key has expired")]
    KeyExpired,
    #[error("the API key has been revoked")]
    KeyRevoked,
    #[error("the API key was replaced by a rotation and its grace period has ended")]
    KeyRotated,
    #[error("the API key is suspended")]
    KeySuspended,
    #[error("API keys are switched off on this gateway")]
    ApiKeysDisabled,
    #[error("the API key lacks the scope {missing:?} that this route requires")]
    InsufficientScope { missing: String },
    #[error("a read-only key may only use GET, HEAD and OPTIONS")]
    ReadOnlyKey,
    #[error("the rate limit for this key is exceeded")]
    RateLimited { retry_after_secs: u64 },
    #[error("too many failed authentication attempts from this address")]
    TooManyFailures { retry_after_secs: u64 },
    #[error("the request body exceeds this route's limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    #[error("the key could not be verified because the key store is unreachable")]
    StoreUnavailable,
    #[error("the upstream service could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream service did not answer in time")]
    UpstreamTimeout,
    #[error("the request path is not allowed")]
    BadPath,
    #[error("the request URI is too long")]
    UriTooLong,
    #[error(
        "the request head has more than {max_fields} header fields or more than {max_bytes} bytes"
    )]
    HeadersTooLarge { max_fields: usize, max_bytes: usize },
    #[error("the request is malformed: {0}")]
    BadRequest(&'static str),
}

impl GatewayError {
    /// The machine-readable `code` of DESIGN.md section 4.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute => "no_route",
            GatewayError::MissingKey => "missing_key",
            GatewayError::InvalidKey => "invalid_key",
            GatewayError::KeyExpired => "key_expired",
            GatewayError::KeyRevoked | GatewayError::KeyRotated => "key_revoked",
            GatewayError::KeySuspended => "key_suspended",
            GatewayError::ApiKeysDisabled => "api_keys_disabled",
            GatewayError::InsufficientScope { .. } => "insufficient_scope",
            GatewayError::ReadOnlyKey => "read_only_key",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::TooManyFailures { .. } => "too_many_failures",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::StoreUnavailable => "store_unavailable",
            GatewayError::UpstreamUnavailable => "upstream_unavailable",
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::BadPath => "bad_path",
            GatewayError::UriTooLong => "uri_too_long",
            GatewayError::HeadersTooLarge { .. } => "headers_too_large",
            GatewayError::BadRequest(_) => "bad_request",
        }
    }

    /// Whether this is an authentication failure (counted per client IP).
    pub fn is_auth_failure(&self) -> bool {
        matches!(
            self,
            GatewayError::InvalidKey
                | GatewayError::KeyExpired
                | GatewayError::KeyRevoked
                | GatewayError::KeyRotated
                | GatewayError::KeySuspended
        )
    }

    /// The one mapping from error to response.
    pub fn to_problem(&self, request_id: &str) -> Response<Bytes> {
        const INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";
        let (status, title, www_auth, retry_after): (
            StatusCode,
            &str,
            Option<String>,
            Option<u64>,
        ) = match self {
            GatewayError::NoRoute => (StatusCode::NOT_FOUND, "No route", None, None),
            GatewayError::MissingKey => (
                StatusCode::UNAUTHORIZED,
                "Missing API key",
                Some("Bearer realm=\"keygate\"".into()),
                None,
            ),
            GatewayError::InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "Invalid API key",
                Some(INVALID_TOKEN.into()),
                None,
            ),
            GatewayError::KeyExpired => (
                StatusCode::UNAUTHORIZED,
                "API key expired",
                Some(INVALID_TOKEN.into()),
                None,
            ),
            GatewayError::KeyRevoked | GatewayError::KeyRotated => (
                StatusCode::UNAUTHORIZED,
                "API key revoked",
                Some(INVALID_TOKEN.into()),
                None,
            ),
            GatewayError::KeySuspended => (
                StatusCode::UNAUTHORIZED,
                "API key suspended",
                Some(INVALID_TOKEN.into()),
                None,
            ),
            GatewayError::ApiKeysDisabled => {
                (StatusCode::FORBIDDEN, "API keys disabled", None, None)
            }
            GatewayError::InsufficientScope { missing } => (
                StatusCode::FORBIDDEN,
                "Insufficient scope",
                Some(format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{missing}\""
                )),
                None,
            ),
            GatewayError::ReadOnlyKey => (StatusCode::FORBIDDEN, "Read-only key", None, None),
            GatewayError::RateLimited { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit exceeded",
                None,
                Some(*retry_after_secs),
            ),
            GatewayError::TooManyFailures { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "Too many failed attempts",
                None,
                Some(*retry_after_secs),
            ),
            GatewayError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload too large",
                None,
                None,
            ),
            GatewayError::StoreUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Key store unavailable",
                None,
                None,
            ),
            GatewayError::UpstreamUnavailable => {
                (StatusCode::BAD_GATEWAY, "Upstream unavailable", None, None)
            }
            GatewayError::UpstreamTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "Upstream timeout", None, None)
            }
            GatewayError::BadPath => (StatusCode::BAD_REQUEST, "Bad path", None, None),
            GatewayError::UriTooLong => (StatusCode::URI_TOO_LONG, "URI too long", None, None),
            GatewayError::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request header fields too large",
                None,
                None,
            ),
            GatewayError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request", None, None),
        };
        let mut resp = problem(status, title, self.code(), &self.to_string(), request_id);
        let headers = resp.headers_mut();
        if let Some(v) = www_auth.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(header::WWW_AUTHENTICATE, v);
        }
        if let Some(secs) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// Why the admin API refused or failed a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("a valid admin token is required (Authorization: Bearer <admin token>)")]
    InvalidAdminToken,
    #[error("{0}")]
    ForbiddenRole(String),
    #[error("no key with id {0:?}")]
    KeyNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{field}: {problem}")]
    InvalidField { field: String, problem: String },
    #[error("{0} cannot be changed after creation; create a new key instead")]
    ImmutableField(String),
    #[error("{0}")]
    ExpiryTooLong(String),
    #[error("owner {owner:?} already has the maximum of {limit} keys")]
    OwnerKeyLimit { owner: String, limit: u32 },
    #[error("the key is already revoked")]
    AlreadyRevoked,
    #[error("the key is revoked; revocation is permanent")]
    KeyRevoked,
    #[error("the key was changed by another request at the same time; try again")]
    Conflict,
    #[error("the key store is unavailable")]
    StoreUnavailable,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{0}")]
    BadRequest(String),
    #[error("internal error")]
    Internal,
}

impl AdminError {
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidAdminToken => "invalid_admin_token",
            AdminError::ForbiddenRole(_) => "forbidden_role",
            AdminError::KeyNotFound(_) => "key_not_found",
            AdminError::NotFound(_) => "not_found",
            AdminError::InvalidField { .. } => "invalid_field",
            AdminError::ImmutableField(_) => "immutable_field",
            AdminError::ExpiryTooLong(_) => "expiry_too_long",
            AdminError::OwnerKeyLimit { .. } => "owner_key_limit",
            AdminError::AlreadyRevoked => "already_revoked",
            AdminError::KeyRevoked => "key_revoked",
            AdminError::Conflict => "conflict",
            AdminError::StoreUnavailable => "store_unavailable",
            AdminError::MethodNotAllowed => "method_not_allowed",
            AdminError::PayloadTooLarge { .. } => "payload_too_large",
            AdminError::UnsupportedMediaType => "unsupported_media_type",
            AdminError::BadRequest(_) => "bad_request",
            AdminError::Internal => "internal_error",
        }
    }

    /// Shorthand for a 422 `invalid_field`.
    pub fn invalid(field: impl Into<String>, problem: impl Into<String>) -> AdminError {
        AdminError::InvalidField {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The one mapping from admin error to response.
    pub fn to_problem(&self, request_id: &str) -> Response<Bytes> {
        let (status, title) = match self {
            AdminError::InvalidAdminToken => (StatusCode::UNAUTHORIZED, "Invalid admin token"),
            AdminError::ForbiddenRole(_) => (StatusCode::FORBIDDEN, "Forbidden for this role"),
            AdminError::KeyNotFound(_) => (StatusCode::NOT_FOUND, "Key not found"),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "Not found"),
            AdminError::InvalidField { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid field"),
            AdminError::ImmutableField(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Immutable field"),
            AdminError::ExpiryTooLong(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Expiry too long"),
            AdminError::OwnerKeyLimit { .. } => (StatusCode::CONFLICT, "Owner key limit reached"),
            AdminError::AlreadyRevoked => (StatusCode::CONFLICT, "Already revoked"),
            AdminError::KeyRevoked => (StatusCode::CONFLICT, "Key revoked"),
            AdminError::Conflict => (StatusCode::CONFLICT, "Concurrent change"),
            AdminError::StoreUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "Store unavailable"),
            AdminError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
            AdminError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "Payload too large")
            }
            AdminError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type")
            }
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad request"),
            AdminError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Internal error"),
        };
        let mut resp = problem(status, title, self.code(), &self.to_string(), request_id);
        if matches!(self, AdminError::InvalidAdminToken) {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
            );
        }
        resp
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    request_id: &'a str,
}

/// Builds an `application/problem+json` response.
fn problem(
    status: StatusCode,
    title: &str,
    code: &str,
    detail: &str,
    request_id: &str,
) -> Response<Bytes> {
    let body = Problem {
        kind: "about:blank",
        title,
        status: status.as_u16(),
        code,
        detail,
        request_id,
    };
    // Serializing a struct of strings and an integer cannot fail.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(Bytes::from(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(resp: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(resp.body()).unwrap()
    }

    #[test]
    fn problem_has_the_promised_fields() {
        let r = GatewayError::MissingKey.to_problem("req-1");
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"keygate\""
        );
        let b = body(&r);
        assert_eq!(b["status"], 401);
        assert_eq!(b["code"], "missing_key");
        assert_eq!(b["request_id"], "req-1");
        assert!(b["title"].is_string() && b["detail"].is_string());
    }

    #[test]
    fn auth_failures_carry_invalid_token() {
        for e in [
            GatewayError::InvalidKey,
            GatewayError::KeyExpired,
            GatewayError::KeyRevoked,
            GatewayError::KeyRotated,
            GatewayError::KeySuspended,
        ] {
            let r = e.to_problem("x");
            assert_eq!(r.status(), 401, "{e:?}");
            assert_eq!(
                r.headers()[header::WWW_AUTHENTICATE],
                "Bearer error=\"invalid_token\""
            );
        }
        let rotated = body(&GatewayError::KeyRotated.to_problem("x"));
        assert_eq!(rotated["code"], "key_revoked");
        assert!(rotated["detail"].as_str().unwrap().contains("rotation"));
    }

    #[test]
    fn scope_and_retry_after_headers() {
        let r = GatewayError::InsufficientScope {
            missing: "orders".into(),
        }
        .to_problem("x");
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers()[header::WWW_AUTHENTICATE],
            "Bearer error=\"insufficient_scope\", scope=\"orders\""
        );
        let r = GatewayError::RateLimited {
            retry_after_secs: 0,
        }
        .to_problem("x");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn admin_errors_map_to_their_codes() {
        let r = AdminError::invalid("name", "is required").to_problem("x");
        assert_eq!(r.status(), 422);
        let b = body(&r);
        assert_eq!(b["code"], "invalid_field");
        assert!(b["detail"].as_str().unwrap().starts_with("name"));
        assert_eq!(
            AdminError::OwnerKeyLimit {
                owner: "a".into(),
                limit: 1
            }
            .to_problem("x")
            .status(),
            409
        );
        assert_eq!(AdminError::InvalidAdminToken.to_problem("x").status(), 401);
    }
}
