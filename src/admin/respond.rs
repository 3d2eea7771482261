//! Request ids and error rendering for the admin listener.
//!
//! Handlers and extractors fail with [`AdminError`]; its `IntoResponse` renders
//! a provisional problem and stashes the error in the response extensions. The
//! [`request_context`] middleware, which wraps every admin route, then renders
//! the problem again with the request's id ([`AdminError::to_problem`] stays
//! the single mapping to a status and `code`). The same middleware turns any
//! other plain-text error (axum's own 404 and 405, a body-limit rejection from a
//! route merged in by the server) into problem+json, so no admin response is
//! ever a bare text error.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use tracing::Instrument as _;

use crate::error::AdminError;

/// The `X-Request-Id` header.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The id of the request being served, kept from the client or generated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    /// Keeps `X-Request-Id` from the client when it is 1 to 128 visible ASCII
    /// characters; otherwise generates a ULID.
    pub fn from_headers(headers: &HeaderMap) -> RequestId {
        let kept = headers
            .get(&X_REQUEST_ID)
            .map(HeaderValue::as_bytes)
            .filter(|b| is_sane(b))
            .and_then(|b| std::str::from_utf8(b).ok());
        match kept {
            Some(s) => RequestId(s.into()),
            None => RequestId(ulid::Ulid::new().to_string().into()),
        }
    }
}

fn is_sane(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.iter().all(|b| b.is_ascii_graphic())
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        // Rendered without an id in case a caller forgot the middleware; the
        // middleware re-renders it from the stashed error.
        let mut resp = problem_response(self.to_problem(""));
        resp.extensions_mut().insert(self);
        resp
    }
}

fn problem_response(resp: http::Response<Bytes>) -> Response {
    resp.map(Body::from)
}

/// Middleware for every admin route: assigns the request id, renders errors as
/// problem+json carrying it, and echoes it in `X-Request-Id`.
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let id = RequestId::from_headers(req.headers());
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(id.clone());
    let span = tracing::info_span!("admin_request", request_id = %id.0, %method, path = %path);
    let resp = next.run(req).instrument(span).await;
    let mut resp = render_errors(resp, &id, &method, &path);
    // The id is visible ASCII (checked above) or a ULID, so this always succeeds.
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

fn render_errors(mut resp: Response, id: &RequestId, method: &Method, path: &str) -> Response {
    let err = match resp.extensions_mut().remove::<AdminError>() {
        Some(err) => err,
        None if is_bare_error(&resp) => bare_error(resp.status(), method, path),
        None => return resp,
    };
    let allow = resp.headers().get(header::ALLOW).cloned();
    let mut out = problem_response(err.to_problem(&id.0));
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

/// An error response that is not already JSON: axum's default 404 and 405, or a
/// plain-text rejection.
fn is_bare_error(resp: &Response) -> bool {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return false;
    }
    match resp.headers().get(header::CONTENT_TYPE) {
        None => true,
        Some(ct) => ct.as_bytes().starts_with(b"text/plain"),
    }
}

fn bare_error(status: StatusCode, method: &Method, path: &str) -> AdminError {
    match status {
        StatusCode::NOT_FOUND => AdminError::NotFound(format!("no endpoint {method} {path}")),
        StatusCode::METHOD_NOT_ALLOWED => AdminError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => AdminError::PayloadTooLarge {
            limit: super::extract::MAX_BODY,
        },
        StatusCode::UNSUPPORTED_MEDIA_TYPE => AdminError::UnsupportedMediaType,
        s if s.is_client_error() => {
            AdminError::BadRequest(s.canonical_reason().unwrap_or("bad request").to_owned())
        }
        _ => AdminError::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(value: &[u8]) -> RequestId {
        let mut h = HeaderMap::new();
        h.insert(
            X_REQUEST_ID.clone(),
            HeaderValue::from_bytes(value).unwrap(),
        );
        RequestId::from_headers(&h)
    }

    #[test]
    fn sane_client_ids_are_kept_others_replaced() {
        assert_eq!(&*id_of(b"abc-123").0, "abc-123");
        let long = "x".repeat(128);
        assert_eq!(&*id_of(long.as_bytes()).0, long.as_str());
        for bad in [
            &b"has space"[..],
            "x".repeat(129).as_bytes(),
            b"\xc3\xa9t\xc3\xa9",
            b"",
        ] {
            let id = id_of(bad);
            assert_eq!(id.0.len(), 26, "{bad:?}");
            assert!(ulid::Ulid::from_string(&id.0).is_ok());
        }
        assert_eq!(RequestId::from_headers(&HeaderMap::new()).0.len(), 26);
    }
}
