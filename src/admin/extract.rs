//! Strict request parsing for the admin API: JSON bodies, query strings, key
//! ids in paths, and opaque cursors.
//!
//! Bodies are read into a JSON object and taken apart field by field
//! ([`Fields`]) rather than deserialized in one go, so that every problem names
//! the field it concerns: an unknown field, a wrong type, a missing value. Query
//! strings get the same treatment ([`QueryParams`]). Every rejection is an
//! [`AdminError`], so it renders as problem+json.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header;
use http::request::Parts;
use serde_json::{Map, Value};

use crate::error::AdminError;
use crate::keys::KeyId;

/// Largest request body accepted (a bulk call of 1000 ids fits easily).
pub const MAX_BODY: usize = 1024 * 1024;

/// A JSON object request body. An empty body counts as `{}`, so calls whose
/// fields are all optional (revoke, rotate, ...) work without one.
#[derive(Debug, Default)]
pub struct JsonBody(pub Fields);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = AdminError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, AdminError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_content_type);
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|e| {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                if too_large {
                    AdminError::PayloadTooLarge { limit: MAX_BODY }
                } else {
                    AdminError::BadRequest("the request body could not be read".into())
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody::default());
        }
        if !is_json {
            return Err(AdminError::UnsupportedMediaType);
        }
        Fields::parse(&bytes).map(JsonBody)
    }
}

/// `application/json`, or any `+json` type, with optional parameters.
fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The fields of a JSON object body, taken one at a time.
#[derive(Debug, Default)]
pub struct Fields(Map<String, Value>);

impl Fields {
    /// Parses `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Fields, AdminError> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(AdminError::invalid("body", "must be a JSON object")),
            Err(e) => Err(AdminError::invalid(
                "body",
                format!(
                    "is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )),
        }
    }

    /// Wraps an already parsed object (a nested one such as a bulk filter).
    pub fn from_map(map: Map<String, Value>) -> Fields {
        Fields(map)
    }

    /// Fails naming the first field (in name order) not in `allowed`, with
    /// `prefix` (such as `"filter."`) in front of its name.
    pub fn reject_unknown(&self, prefix: &str, allowed: &[&str]) -> Result<(), AdminError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(AdminError::invalid(format!("{prefix}{k}"), "unknown field")),
            None => Ok(()),
        }
    }

    /// The first of `names` present in the body.
    pub fn first_present<'a>(&self, names: &[&'a str]) -> Option<&'a str> {
        names.iter().copied().find(|n| self.0.contains_key(*n))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// Removes a field; `None` if absent (a JSON `null` is returned as such).
    pub fn take(&mut self, name: &str) -> Option<Value> {
        self.0.remove(name)
    }

    /// A string field; `null` is a type error.
    pub fn string(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(AdminError::invalid(name, "must be a string")),
        }
    }

    /// A string field where `null` means absent.
    pub fn nullable_string(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        match self.take(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(AdminError::invalid(name, "must be a string or null")),
        }
    }

    /// A boolean field.
    pub fn boolean(&mut self, name: &str) -> Result<Option<bool>, AdminError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(AdminError::invalid(name, "must be true or false")),
        }
    }

    /// A required string field.
    pub fn required_string(&mut self, name: &str) -> Result<String, AdminError> {
        self.string(name)?
            .ok_or_else(|| AdminError::invalid(name, "is required"))
    }
}

/// The query string as name/value pairs, taken one at a time.
#[derive(Debug, Default)]
pub struct QueryParams(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, AdminError> {
        let query = parts.uri.query().unwrap_or("");
        Ok(QueryParams(
            url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl QueryParams {
    /// Takes the parameter `name`; given twice or with an empty value
    /// (`?status=`) is an error: leave a parameter out to leave it unset (a
    /// silently ignored `?status=` would widen a listing, and the OpenAPI
    /// document says every value has at least one character).
    pub fn take(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        let mut found = None;
        let mut rest = Vec::with_capacity(self.0.len());
        for (k, v) in self.0.drain(..) {
            if k != name {
                rest.push((k, v));
            } else if found.is_some() {
                return Err(AdminError::invalid(name, "is given more than once"));
            } else {
                found = Some(v);
            }
        }
        self.0 = rest;
        match found {
            Some(v) if v.is_empty() => Err(AdminError::invalid(
                name,
                "is empty; give a value or leave the parameter out",
            )),
            found => Ok(found),
        }
    }

    /// Takes `limit`: 1 to `max`, `default` when absent.
    pub fn limit(&mut self, default: usize, max: usize) -> Result<usize, AdminError> {
        match self.take("limit")? {
            None => Ok(default),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(AdminError::invalid(
                    "limit",
                    format!("must be an integer from 1 to {max}"),
                )),
            },
        }
    }

    /// Fails naming the first parameter nobody took.
    pub fn finish(self) -> Result<(), AdminError> {
        match self.0.into_iter().next() {
            Some((k, _)) => Err(AdminError::invalid(k, "unknown query parameter")),
            None => Ok(()),
        }
    }
}

/// The `{id}` of a key route. A malformed id answers 404 `key_not_found`, the
/// same as an id that does not exist.
#[derive(Debug, Clone)]
pub struct KeyPath(pub KeyId);

impl<S: Send + Sync> FromRequestParts<S> for KeyPath {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AdminError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| AdminError::KeyNotFound(String::new()))?;
        KeyId::parse(&raw)
            .map(KeyPath)
            .ok_or(AdminError::KeyNotFound(raw))
    }
}

/// Encodes a position in a listing as an opaque cursor.
pub fn encode_cursor(last_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(last_id)
}

/// Decodes a cursor made by [`encode_cursor`], checking it with `valid`.
pub fn decode_cursor(cursor: &str, valid: impl Fn(&str) -> bool) -> Result<String, AdminError> {
    let bad = || AdminError::invalid("cursor", "is not a cursor returned by this API");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    if valid(&s) { Ok(s) } else { Err(bad()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("Application/JSON; charset=utf-8"));
        assert!(is_json_content_type("application/merge-patch+json"));
        assert!(!is_json_content_type("text/plain"));
        assert!(!is_json_content_type("application/x-www-form-urlencoded"));
    }

    #[test]
    fn fields_name_what_is_wrong() {
        let mut f = Fields::parse(br#"{"name": 5, "extra": 1}"#).unwrap();
        let e = f.reject_unknown("", &["name"]).unwrap_err();
        assert_eq!(e, AdminError::invalid("extra", "unknown field"));
        assert_eq!(
            f.string("name").unwrap_err(),
            AdminError::invalid("name", "must be a string")
        );
        assert!(
            matches!(Fields::parse(b"[1]"), Err(AdminError::InvalidField { field, .. }) if field == "body")
        );
        assert!(
            matches!(Fields::parse(b"{nope"), Err(AdminError::InvalidField { field, .. }) if field == "body")
        );
    }

    #[test]
    fn query_params_refuse_repeats_and_leftovers() {
        let mut q = QueryParams(vec![("a".into(), "1".into()), ("a".into(), "2".into())]);
        assert!(q.take("a").is_err());
        let mut q = QueryParams(vec![("limit".into(), "0".into())]);
        assert!(q.limit(50, 1000).is_err());
        let mut q = QueryParams(vec![("status".into(), "".into())]);
        assert_eq!(
            q.take("status").unwrap_err(),
            AdminError::invalid(
                "status",
                "is empty; give a value or leave the parameter out"
            )
        );
        let mut q = QueryParams(vec![
            ("limit".into(), "1000".into()),
            ("x".into(), "".into()),
        ]);
        assert_eq!(q.limit(50, 1000).unwrap(), 1000);
        assert_eq!(
            q.finish().unwrap_err(),
            AdminError::invalid("x", "unknown query parameter")
        );
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let id = KeyId::generate();
        let c = encode_cursor(id.text().as_str());
        assert_eq!(
            decode_cursor(&c, |s| KeyId::parse(s).is_some()).unwrap(),
            id.text().as_str()
        );
        assert!(decode_cursor("!!", |_| true).is_err());
        assert!(decode_cursor(&encode_cursor("nope"), |s| KeyId::parse(s).is_some()).is_err());
    }
}
