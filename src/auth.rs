//! Authentication and authorization of data-plane requests.
//!
//! Three stages, each a small function: [`extract`] finds the credential in the
//! configured headers, [`Authenticator::verify`] checks its format and checksum
//! (no I/O), then finds it through the cache and applies the status rules, and
//! [`authorize`] checks the route's scopes and the key's access level. The
//! result is a [`Principal`]: the verified key.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method, header};

use crate::cache::{CachedKey, KeyCache, Lookup};
use crate::config::{CredentialHeader, RouteConfig};
use crate::error::GatewayError;
use crate::keys::{self, Clock, Refusal, TokenHash};

/// A verified key: who is calling.
pub type Principal = Arc<CachedKey>;

/// A credential found in a request: the token text and the header it came in.
#[derive(Clone, Copy)]
pub struct Credential<'a> {
    pub token: &'a str,
    pub header: &'a HeaderName,
}

impl std::fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}: …redacted)", self.header)
    }
}

/// Finds the one credential in `headers`, looking at `sources` in order.
///
/// `Authorization` counts only with the `Bearer` scheme (case-insensitive);
/// other schemes are left for the upstream. The same header repeated, or two
/// different credentials in two headers, is `invalid_key`; the same credential
/// in two headers is accepted. A key in the query string is never looked at.
pub fn extract<'a>(
    headers: &'a HeaderMap,
    sources: &'a [CredentialHeader],
) -> Result<Credential<'a>, GatewayError> {
    let mut found: Option<Credential<'a>> = None;
    for source in sources {
        let name = match source {
            CredentialHeader::Authorization => &header::AUTHORIZATION,
            CredentialHeader::Raw(name) => name,
        };
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else { continue };
        let Ok(text) = value.to_str() else {
            return Err(GatewayError::InvalidKey);
        };
        let token = match source {
            CredentialHeader::Authorization => match bearer(text) {
                Some(t) => t,
                // Another scheme first and a Bearer value after it is the
                // header repeated, too (the Bearer value must not be left
                // unread, nor forwarded).
                None if values.any(is_bearer) => return Err(GatewayError::InvalidKey),
                None => continue,
            },
            CredentialHeader::Raw(_) => text.trim(),
        };
        if values.next().is_some() {
            return Err(GatewayError::InvalidKey);
        }
        match found {
            Some(prev) if prev.token != token => return Err(GatewayError::InvalidKey),
            Some(_) => {}
            None => {
                found = Some(Credential {
                    token,
                    header: name,
                })
            }
        }
    }
    found.ok_or(GatewayError::MissingKey)
}

/// Removes every header among `sources` that carries a credential, before
/// forwarding. Once [`extract`] succeeded, each such header holds the same
/// credential (it may come in several), so removing only the one that
/// [`extract`] returned would forward the key in the others. `Authorization`
/// with another scheme is not a credential and stays.
pub fn strip_credentials(headers: &mut HeaderMap, sources: &[CredentialHeader]) {
    for source in sources {
        match source {
            CredentialHeader::Authorization => {
                // Any value, not only the first: a Bearer value anywhere is
                // a credential.
                if headers.get_all(header::AUTHORIZATION).iter().any(is_bearer) {
                    headers.remove(header::AUTHORIZATION);
                }
            }
            CredentialHeader::Raw(name) => {
                headers.remove(name);
            }
        }
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Whether an `Authorization` value uses the Bearer scheme, as [`bearer`]
/// reads it but on the bytes: obs-text (bytes >= 0x80, which hyper accepts)
/// after the scheme must not turn a Bearer value into a forwardable one.
fn is_bearer(value: &http::HeaderValue) -> bool {
    let v = value.as_bytes().trim_ascii();
    v.iter()
        .position(|&b| b == b' ')
        .is_some_and(|i| v[..i].eq_ignore_ascii_case(b"bearer"))
}

/// Verifies credentials against the cache and store.
pub struct Authenticator {
    pub cache: Arc<KeyCache>,
    pub clock: Arc<dyn Clock>,
}

impl Authenticator {
    /// Checks `token`'s format and checksum (no I/O for garbage), then finds it
    /// and applies the status rules. Fails closed when the store is down.
    pub async fn verify(&self, prefix: &str, token: &str) -> Result<Principal, GatewayError> {
        keys::check_format(prefix, token).map_err(|_| GatewayError::InvalidKey)?;
        let hash = TokenHash::of(token);
        self.cache.sync().await;
        let key = match self.cache.get(&hash).await {
            Ok(Lookup::Found(k)) => k,
            Ok(Lookup::NotFound) => return Err(GatewayError::InvalidKey),
            Err(e) => {
                tracing::warn!(error = %e, "key store unreachable; refusing uncached key");
                return Err(GatewayError::StoreUnavailable);
            }
        };
        key.check(self.clock.now_nanos()).map_err(|r| match r {
            Refusal::Revoked => GatewayError::KeyRevoked,
            Refusal::Rotated => GatewayError::KeyRotated,
            Refusal::Suspended => GatewayError::KeySuspended,
            Refusal::Expired => GatewayError::KeyExpired,
        })?;
        Ok(key)
    }
}

/// Checks the route's scopes (all required) and the key's access level.
pub fn authorize(
    key: &CachedKey,
    route: &RouteConfig,
    method: &Method,
) -> Result<(), GatewayError> {
    if let Some(missing) = route.scopes.iter().find(|s| !key.has_scope(s)) {
        return Err(GatewayError::InsufficientScope {
            missing: missing.as_str().to_owned(),
        });
    }
    if !key.access().allows(method) {
        return Err(GatewayError::ReadOnlyKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<CredentialHeader> {
        vec![
            CredentialHeader::Authorization,
            CredentialHeader::Raw(HeaderName::from_static("x-api-key")),
        ]
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn token(h: &HeaderMap) -> Result<String, GatewayError> {
        let s = sources();
        extract(h, &s).map(|c| c.token.to_owned())
    }

    #[test]
    fn bearer_and_raw_headers() {
        assert_eq!(
            token(&headers(&[("authorization", "Bearer kg_a")])).unwrap(),
            "kg_a"
        );
        assert_eq!(
            token(&headers(&[("authorization", "bearer   kg_a ")])).unwrap(),
            "kg_a"
        );
        assert_eq!(token(&headers(&[("x-api-key", "kg_b")])).unwrap(), "kg_b");
    }

    #[test]
    fn other_schemes_are_not_credentials() {
        assert_eq!(
            token(&headers(&[("authorization", "Basic abc")])),
            Err(GatewayError::MissingKey)
        );
        assert_eq!(
            token(&headers(&[
                ("authorization", "Basic abc"),
                ("x-api-key", "kg_b")
            ]))
            .unwrap(),
            "kg_b"
        );
    }

    #[test]
    fn missing_conflicting_and_repeated() {
        assert_eq!(token(&HeaderMap::new()), Err(GatewayError::MissingKey));
        assert_eq!(
            token(&headers(&[
                ("authorization", "Bearer kg_a"),
                ("x-api-key", "kg_b")
            ])),
            Err(GatewayError::InvalidKey)
        );
        assert_eq!(
            token(&headers(&[
                ("authorization", "Bearer kg_a"),
                ("x-api-key", "kg_a")
            ]))
            .unwrap(),
            "kg_a"
        );
        assert_eq!(
            token(&headers(&[("x-api-key", "kg_a"), ("x-api-key", "kg_a")])),
            Err(GatewayError::InvalidKey)
        );
    }

    #[test]
    fn every_header_carrying_the_credential_is_stripped() {
        let mut h = headers(&[
            ("authorization", "Bearer kg_a"),
            ("x-api-key", "kg_a"),
            ("x-other", "1"),
        ]);
        strip_credentials(&mut h, &sources());
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-other"], "1");
        // Another Authorization scheme is not a credential: it stays.
        let mut h = headers(&[("authorization", "Basic abc"), ("x-api-key", "kg_a")]);
        strip_credentials(&mut h, &sources());
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["authorization"], "Basic abc");
    }

    /// Found by `cargo fuzz run headers`: only the first `Authorization`
    /// value was looked at, so `Basic ...` followed by `Bearer <key>` (and
    /// the key in `x-api-key`) was accepted, and the Bearer value, the key
    /// itself, was forwarded to the upstream.
    #[test]
    fn a_bearer_value_after_another_scheme_is_never_forwarded() {
        let h = headers(&[
            ("authorization", "Basic abc"),
            ("authorization", "Bearer kg_a"),
            ("x-api-key", "kg_a"),
        ]);
        assert_eq!(token(&h), Err(GatewayError::InvalidKey));
        let only_auth = [CredentialHeader::Authorization];
        assert_eq!(
            extract(&h, &only_auth).map(|c| c.token),
            Err(GatewayError::InvalidKey)
        );
        // Two values of another scheme are still no credential.
        let basic = headers(&[("authorization", "Basic a"), ("authorization", "Basic b")]);
        assert_eq!(token(&basic), Err(GatewayError::MissingKey));
        let mut h = h;
        strip_credentials(&mut h, &sources());
        assert!(h.is_empty(), "{h:?}");
        // The same with obs-text after the key, which `to_str` refuses.
        let mut h = headers(&[("authorization", "Basic abc"), ("x-api-key", "kg_a")]);
        let obs = http::HeaderValue::from_bytes(b"Bearer kg_a \xff").unwrap();
        h.append(header::AUTHORIZATION, obs);
        assert_eq!(token(&h), Err(GatewayError::InvalidKey));
        strip_credentials(&mut h, &sources());
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn credential_debug_is_redacted() {
        let h = headers(&[("x-api-key", "kg_secretsecret")]);
        let s = sources();
        let c = extract(&h, &s).unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }
}
