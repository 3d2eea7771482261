//! Admin authentication and roles.
//!
//! A caller presents `Authorization: Bearer <admin token>`. The token is hashed
//! with SHA-256 and compared in constant time against every configured token's
//! hash, read from the live config on each request so a reload takes effect at
//! once. Anything shaped like an API key is refused outright: API keys are never
//! admin credentials. The token itself is never stored, logged or echoed; only
//! its configured `name` (the caller's identity) travels further.
//!
//! Roles:
//! - `admin`: everything.
//! - `developer`: creates keys owned by itself and manages only those. Another
//!   owner's key answers 404 `key_not_found`, exactly as a key that does not
//!   exist, so a developer cannot learn which key ids exist outside its own
//!   (a 403 would confirm that the id is real).
//! - `auditor`: reads everything; any other method is 403 `forbidden_role`.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderMap, Method, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AdminState;
use crate::config::{AdminRole, AdminToken};
use crate::error::AdminError;
use crate::keys::{self, KeyRecord};

/// An authenticated admin caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's configured name: the actor of events, a developer's owner.
    pub name: String,
    pub role: AdminRole,
}

impl Caller {
    /// Whether this caller may see and manage `rec` (developers: own keys only).
    pub fn sees(&self, rec: &KeyRecord) -> bool {
        self.sees_owner(&rec.owner)
    }

    /// Whether this caller may see keys of `owner`.
    pub fn sees_owner(&self, owner: &str) -> bool {
        match self.role {
            AdminRole::Admin | AdminRole::Auditor => true,
            AdminRole::Developer => owner == self.name,
        }
    }

    /// The owner a listing must be restricted to, if any.
    pub fn owner_scope(&self) -> Option<&str> {
        match self.role {
            AdminRole::Developer => Some(&self.name),
            AdminRole::Admin | AdminRole::Auditor => None,
        }
    }

    /// Fails unless the caller is an admin.
    pub fn require_admin(&self, what: &str) -> Result<(), AdminError> {
        match self.role {
            AdminRole::Admin => Ok(()),
            AdminRole::Developer | AdminRole::Auditor => Err(AdminError::ForbiddenRole(format!(
                "{what} needs the admin role; this token has the {} role",
                self.role.as_str()
            ))),
        }
    }
}

impl FromRequestParts<Arc<AdminState>> for Caller {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, AdminError> {
        let config = state.config.load();
        let caller = authenticate(&parts.headers, &config.admin.tokens, &config.keys.prefix)
            .ok_or(AdminError::InvalidAdminToken)?;
        check_method(&caller, &parts.method)?;
        Ok(caller)
    }
}

/// Finds the configured token matching the request's bearer token.
pub fn authenticate(
    headers: &HeaderMap,
    tokens: &[AdminToken],
    key_prefix: &str,
) -> Option<Caller> {
    let presented = bearer(headers)?;
    if keys::check_format(key_prefix, presented).is_ok() {
        return None;
    }
    let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    // Compare against every token, not stopping at a match, so the time taken
    // does not depend on where (or whether) the token is configured.
    let mut found = None;
    for t in tokens {
        let hit: bool = t.sha256.ct_eq(&hash).into();
        if hit && found.is_none() {
            found = Some(t);
        }
    }
    found.map(|t| Caller {
        name: t.name.clone(),
        role: t.role,
    })
}

/// The token of a single `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Auditors may only read.
fn check_method(caller: &Caller, method: &Method) -> Result<(), AdminError> {
    let read = matches!(*method, Method::GET | Method::HEAD);
    match caller.role {
        AdminRole::Auditor if !read => Err(AdminError::ForbiddenRole(
            "the auditor role may only read (GET)".into(),
        )),
        AdminRole::Admin | AdminRole::Developer | AdminRole::Auditor => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn tokens() -> Vec<AdminToken> {
        let t = |name: &str, role, secret: &str| AdminToken {
            name: name.into(),
            role,
            sha256: Sha256::digest(secret.as_bytes()).into(),
        };
        vec![
            t("ops", AdminRole::Admin, "s3cret-ops"),
            t("dev", AdminRole::Developer, "s3cret-dev"),
        ]
    }

    fn headers(auth: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for a in auth {
            h.append(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn bearer_tokens_match_by_hash() {
        let c = authenticate(&headers(&["Bearer s3cret-dev"]), &tokens(), "kg_").unwrap();
        assert_eq!(
            c,
            Caller {
                name: "dev".into(),
                role: AdminRole::Developer
            }
        );
        assert!(authenticate(&headers(&["bearer s3cret-ops"]), &tokens(), "kg_").is_some());
        for bad in [
            &["Bearer nope"][..],
            &["Basic s3cret-ops"],
            &["s3cret-ops"],
            &[],
            &["Bearer "],
        ] {
            assert!(
                authenticate(&headers(bad), &tokens(), "kg_").is_none(),
                "{bad:?}"
            );
        }
        let twice = headers(&["Bearer s3cret-ops", "Bearer s3cret-ops"]);
        assert!(authenticate(&twice, &tokens(), "kg_").is_none());
    }

    #[test]
    fn api_keys_are_never_admin_tokens() {
        let key = keys::Token::generate("kg_");
        let mut ts = tokens();
        ts[0].sha256 = key.hash().0;
        let h = headers(&[&format!("Bearer {}", key.expose())]);
        assert!(authenticate(&h, &ts, "kg_").is_none());
    }

    #[test]
    fn auditors_only_read() {
        let a = Caller {
            name: "audit".into(),
            role: AdminRole::Auditor,
        };
        assert!(check_method(&a, &Method::GET).is_ok());
        assert!(check_method(&a, &Method::POST).is_err());
        assert!(check_method(&a, &Method::DELETE).is_err());
        let d = Caller {
            name: "dev".into(),
            role: AdminRole::Developer,
        };
        assert!(check_method(&d, &Method::POST).is_ok());
        assert!(d.require_admin("x").is_err());
    }
}
