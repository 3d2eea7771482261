//! Validation of key request bodies: creation ([`NewKey`]) and edits
//! ([`KeyEdit`]). Pure functions of the parsed body, the caller, the key policy
//! and the time, so every rule is unit tested without a server.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::auth::Caller;
use super::extract::Fields;
use crate::config::{KeysConfig, parse_duration};
use crate::error::AdminError;
use crate::keys::{Access, KeyRecord, RateLimitSpec, Scope, Token};

/// Fields accepted by `POST /v1/keys`.
pub const CREATE_FIELDS: &[&str] = &[
    "name",
    "owner",
    "description",
    "scopes",
    "access",
    "expires_at",
    "expires_in",
    "rate_limit",
    "metadata",
];
/// Fields accepted by `PATCH /v1/keys/{id}`.
pub const EDIT_FIELDS: &[&str] = &["name", "description", "scopes", "rate_limit", "metadata"];
/// Fields fixed at creation: naming one in a PATCH is 422 `immutable_field`.
pub const IMMUTABLE_FIELDS: &[&str] = &["access", "expires_at", "expires_in"];

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
pub const MAX_SCOPES: usize = 100;
/// Largest serialized `metadata` object, in bytes.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// A validated creation request.
#[derive(Debug, Clone, PartialEq)]
pub struct NewKey {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub scopes: Vec<Scope>,
    pub access: Access,
    pub expires_at: Option<DateTime<Utc>>,
    pub rate_limit: Option<RateLimitSpec>,
    pub metadata: Map<String, Value>,
}

impl NewKey {
    /// Validates a creation body. `owner` defaults to the caller; a developer
    /// naming another owner is 403 `forbidden_role`.
    pub fn parse(
        mut f: Fields,
        caller: &Caller,
        policy: &KeysConfig,
        now: DateTime<Utc>,
    ) -> Result<NewKey, AdminError> {
        f.reject_unknown("", CREATE_FIELDS)?;
        let owner = match f.string("owner")? {
            None => caller.name.clone(),
            Some(owner) => {
                let owner = label("owner", owner)?;
                if !caller.sees_owner(&owner) {
                    return Err(AdminError::ForbiddenRole(
                        "a developer token creates keys owned by itself only".into(),
                    ));
                }
                owner
            }
        };
        let name = label("name", f.required_string("name")?)?;
        let description = description(f.take("description"))?;
        let scopes = f
            .take("scopes")
            .map(scopes)
            .transpose()?
            .unwrap_or_default();
        let access = access(f.take("access"))?;
        let expires_at = expiry(&mut f, policy, now)?;
        let rate_limit = f.take("rate_limit").map(rate_limit).transpose()?.flatten();
        let metadata = f
            .take("metadata")
            .map(metadata)
            .transpose()?
            .unwrap_or_default();
        Ok(NewKey {
            name,
            owner,
            description,
            scopes,
            access,
            expires_at,
            rate_limit,
            metadata,
        })
    }

    /// The record to store for this request with the secret `token`.
    pub fn into_record(
        self,
        token: &Token,
        prefix: &str,
        actor: &str,
        now: DateTime<Utc>,
    ) -> KeyRecord {
        let mut rec = KeyRecord::issue(token, prefix, &self.name, &self.owner, actor, now);
        rec.description = self.description;
        rec.scopes = self.scopes;
        rec.access = self.access;
        rec.rate_limit = self.rate_limit;
        rec.expires_at = self.expires_at;
        rec.metadata = self.metadata;
        rec
    }
}

/// A validated edit: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyEdit {
    pub name: Option<String>,
    pub description: Option<String>,
    pub scopes: Option<Vec<Scope>>,
    /// `Some(None)` removes the key's own limit.
    pub rate_limit: Option<Option<RateLimitSpec>>,
    pub metadata: Option<Map<String, Value>>,
}

impl KeyEdit {
    /// Validates a PATCH body: immutable fields first, then unknown ones.
    pub fn parse(mut f: Fields) -> Result<KeyEdit, AdminError> {
        if let Some(field) = f.first_present(IMMUTABLE_FIELDS) {
            return Err(AdminError::ImmutableField(field.to_owned()));
        }
        f.reject_unknown("", EDIT_FIELDS)?;
        Ok(KeyEdit {
            name: f.string("name")?.map(|n| label("name", n)).transpose()?,
            description: f
                .take("description")
                .map(|d| description(Some(d)))
                .transpose()?,
            scopes: f.take("scopes").map(scopes).transpose()?,
            rate_limit: f.take("rate_limit").map(rate_limit).transpose()?,
            metadata: f.take("metadata").map(metadata).transpose()?,
        })
    }

    /// Applies the edit; returns the names of the fields that really changed.
    pub fn apply(self, rec: &mut KeyRecord) -> Vec<&'static str> {
        let mut changed = Vec::new();
        set(&mut rec.name, self.name, "name", &mut changed);
        set(
            &mut rec.description,
            self.description,
            "description",
            &mut changed,
        );
        set(&mut rec.scopes, self.scopes, "scopes", &mut changed);
        set(
            &mut rec.rate_limit,
            self.rate_limit,
            "rate_limit",
            &mut changed,
        );
        set(&mut rec.metadata, self.metadata, "metadata", &mut changed);
        changed
    }
}

fn set<T: PartialEq>(
    slot: &mut T,
    new: Option<T>,
    name: &'static str,
    changed: &mut Vec<&'static str>,
) {
    if let Some(new) = new
        && *slot != new
    {
        *slot = new;
        changed.push(name);
    }
}

/// A name or owner: 1 to 200 characters, not blank, no control characters.
fn label(field: &str, s: String) -> Result<String, AdminError> {
    let n = s.chars().count();
    if s.trim().is_empty() || n > MAX_NAME_CHARS {
        return Err(AdminError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(AdminError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(s)
}

/// Description: up to 2000 characters; absent or `null` is empty.
fn description(v: Option<Value>) -> Result<String, AdminError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) if s.chars().count() <= MAX_DESCRIPTION_CHARS => Ok(s),
        Some(Value::String(_)) => Err(AdminError::invalid(
            "description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        )),
        Some(_) => Err(AdminError::invalid("description", "must be a string")),
    }
}

/// Scopes: up to 100 valid scope strings; duplicates are dropped.
fn scopes(v: Value) -> Result<Vec<Scope>, AdminError> {
    let Value::Array(items) = v else {
        return Err(AdminError::invalid("scopes", "must be an array of strings"));
    };
    if items.len() > MAX_SCOPES {
        return Err(AdminError::invalid(
            "scopes",
            format!("must hold at most {MAX_SCOPES} scopes"),
        ));
    }
    let mut out: Vec<Scope> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::String(s) = item else {
            return Err(AdminError::invalid(
                "scopes",
                format!("item {i} must be a string"),
            ));
        };
        let scope = Scope::parse(&s).map_err(|e| AdminError::invalid("scopes", e))?;
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

/// Access: required, `read_only` or `full`.
fn access(v: Option<Value>) -> Result<Access, AdminError> {
    match v.as_ref().and_then(Value::as_str) {
        Some("read_only") => Ok(Access::ReadOnly),
        Some("full") => Ok(Access::Full),
        _ if v.is_none() => Err(AdminError::invalid(
            "access",
            "is required: read_only or full",
        )),
        _ => Err(AdminError::invalid(
            "access",
            "must be \"read_only\" or \"full\"",
        )),
    }
}

/// A key's own rate limit: `{per_second, burst}`, both at least 1, or `null`.
fn rate_limit(v: Value) -> Result<Option<RateLimitSpec>, AdminError> {
    let map = match v {
        Value::Null => return Ok(None),
        Value::Object(map) => map,
        _ => {
            return Err(AdminError::invalid(
                "rate_limit",
                "must be {\"per_second\", \"burst\"} or null",
            ));
        }
    };
    let mut f = Fields::from_map(map);
    f.reject_unknown("rate_limit.", &["per_second", "burst"])?;
    Ok(Some(RateLimitSpec {
        per_second: positive("rate_limit.per_second", f.take("per_second"))?,
        burst: positive("rate_limit.burst", f.take("burst"))?,
    }))
}

fn positive(field: &str, v: Option<Value>) -> Result<u32, AdminError> {
    let Some(v) = v else {
        return Err(AdminError::invalid(field, "is required"));
    };
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            AdminError::invalid(field, format!("must be an integer from 1 to {}", u32::MAX))
        })
}

/// Metadata: a JSON object of at most 16 KiB serialized; `null` is empty.
fn metadata(v: Value) -> Result<Map<String, Value>, AdminError> {
    let map = match v {
        Value::Null => return Ok(Map::new()),
        Value::Object(map) => map,
        _ => return Err(AdminError::invalid("metadata", "must be a JSON object")),
    };
    let size = serde_json::to_vec(&map)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(AdminError::invalid(
            "metadata",
            format!("is {size} bytes serialized; the limit is {MAX_METADATA_BYTES}"),
        ));
    }
    Ok(map)
}

/// The expiry of a new key from `expires_at` or `expires_in` (not both), else
/// `keys.default_ttl`; never more than `keys.max_ttl` ahead. `expires_at: null`
/// asks for a key that never expires, allowed only without a `max_ttl`.
fn expiry(
    f: &mut Fields,
    policy: &KeysConfig,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, AdminError> {
    let at = f.take("expires_at");
    let within = f.take("expires_in");
    let (field, at) = match (at, within) {
        (Some(_), Some(_)) => {
            return Err(AdminError::invalid(
                "expires_in",
                "give expires_at or expires_in, not both",
            ));
        }
        (Some(Value::Null), None) => return never_expires(policy),
        (Some(Value::String(s)), None) => ("expires_at", rfc3339("expires_at", &s)?),
        (Some(_), None) => {
            return Err(AdminError::invalid(
                "expires_at",
                "must be an RFC 3339 date-time",
            ));
        }
        (None, Some(Value::String(s))) => {
            let d = duration("expires_in", &s)?;
            (
                "expires_in",
                add(now, d).ok_or_else(|| too_long("expires_in", policy))?,
            )
        }
        (None, Some(_)) => {
            return Err(AdminError::invalid(
                "expires_in",
                "must be a duration such as \"90d\"",
            ));
        }
        (None, None) => {
            let at =
                add(now, policy.default_ttl).ok_or_else(|| too_long("keys.default_ttl", policy))?;
            ("keys.default_ttl", at)
        }
    };
    if at <= now {
        return Err(AdminError::invalid(field, "must be in the future"));
    }
    if let Some(max) = policy.max_ttl
        && add(now, max).is_some_and(|limit| at > limit)
    {
        return Err(too_long(field, policy));
    }
    Ok(Some(at))
}

fn never_expires(policy: &KeysConfig) -> Result<Option<DateTime<Utc>>, AdminError> {
    match policy.max_ttl {
        None => Ok(None),
        Some(_) => Err(too_long("expires_at", policy)),
    }
}

fn too_long(field: &str, policy: &KeysConfig) -> AdminError {
    match policy.max_ttl {
        Some(max) => AdminError::ExpiryTooLong(format!(
            "{field}: keys must expire within keys.max_ttl ({}) of creation",
            format_duration(max)
        )),
        None => AdminError::invalid(field, "is too far in the future"),
    }
}

/// Parses an RFC 3339 date-time for `field`.
pub fn rfc3339(field: &str, s: &str) -> Result<DateTime<Utc>, AdminError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            AdminError::invalid(
                field,
                "must be an RFC 3339 date-time such as 2030-01-31T12:00:00Z",
            )
        })
}

/// Parses a duration string such as `"90d"` for `field`.
pub fn duration(field: &str, s: &str) -> Result<Duration, AdminError> {
    parse_duration(s).map_err(|e| AdminError::invalid(field, e))
}

/// `now + d`, or `None` past the representable range.
pub fn add(now: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    now.checked_add_signed(chrono::Duration::from_std(d).ok()?)
}

/// Writes a duration in the config's notation, in the largest unit that
/// divides it exactly: `365d`, `12h`, `5m`, `30s`, `500ms`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    const UNITS: [(u128, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    if ms == 0 {
        return "0s".into();
    }
    for (size, unit) in UNITS {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminRole;
    use serde_json::json;

    fn policy() -> KeysConfig {
        KeysConfig {
            prefix: "kg_".into(),
            headers: vec![],
            default_ttl: Duration::from_secs(365 * 86_400),
            max_ttl: Some(Duration::from_secs(730 * 86_400)),
            max_per_owner: 1000,
            expiry_notice: Duration::from_secs(30 * 86_400),
            purge_expired_after: Duration::from_secs(90 * 86_400),
        }
    }

    fn admin() -> Caller {
        Caller {
            name: "ops".into(),
            role: AdminRole::Admin,
        }
    }

    fn parse(body: Value) -> Result<NewKey, AdminError> {
        parse_as(body, &admin())
    }

    fn parse_as(body: Value, caller: &Caller) -> Result<NewKey, AdminError> {
        let Value::Object(m) = body else {
            panic!("not an object")
        };
        NewKey::parse(Fields::from_map(m), caller, &policy(), Utc::now())
    }

    fn field_of(e: AdminError) -> String {
        match e {
            AdminError::InvalidField { field, .. } => field,
            other => panic!("expected invalid_field, got {other:?}"),
        }
    }

    #[test]
    fn minimal_create_gets_defaults() {
        let k = parse(json!({"name": "ci", "access": "full"})).unwrap();
        assert_eq!(k.owner, "ops");
        assert!(k.scopes.is_empty());
        let ttl = k.expires_at.unwrap() - Utc::now();
        assert!((ttl - chrono::Duration::days(365)).num_seconds().abs() < 5);
    }

    #[test]
    fn create_errors_name_their_field() {
        let cases = [
            (json!({"access": "full"}), "name"),
            (json!({"name": "", "access": "full"}), "name"),
            (json!({"name": "x".repeat(201), "access": "full"}), "name"),
            (json!({"name": 5, "access": "full"}), "name"),
            (json!({"name": "a"}), "access"),
            (json!({"name": "a", "access": "write"}), "access"),
            (json!({"name": "a", "access": "full", "bogus": 1}), "bogus"),
            (
                json!({"name": "a", "access": "full", "description": "d".repeat(2001)}),
                "description",
            ),
            (
                json!({"name": "a", "access": "full", "scopes": ["ok", "not ok"]}),
                "scopes",
            ),
            (
                json!({"name": "a", "access": "full", "scopes": "x"}),
                "scopes",
            ),
            (
                json!({"name": "a", "access": "full", "rate_limit": {"per_second": 0, "burst": 1}}),
                "rate_limit.per_second",
            ),
            (
                json!({"name": "a", "access": "full", "rate_limit": {"per_second": 1}}),
                "rate_limit.burst",
            ),
            (
                json!({"name": "a", "access": "full", "rate_limit": {"per_second": 1, "burst": 1, "x": 1}}),
                "rate_limit.x",
            ),
            (
                json!({"name": "a", "access": "full", "metadata": [1]}),
                "metadata",
            ),
            (
                json!({"name": "a", "access": "full", "metadata": {"big": "x".repeat(16 * 1024)}}),
                "metadata",
            ),
            (
                json!({"name": "a", "access": "full", "expires_at": "2001-01-01T00:00:00Z"}),
                "expires_at",
            ),
            (
                json!({"name": "a", "access": "full", "expires_at": "tomorrow"}),
                "expires_at",
            ),
            (
                json!({"name": "a", "access": "full", "expires_at": "2030-01-01T00:00:00Z", "expires_in": "1d"}),
                "expires_in",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(parse(body.clone()).unwrap_err()), field, "{body}");
        }
        let scopes: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
        assert_eq!(
            field_of(parse(json!({"name": "a", "access": "full", "scopes": scopes})).unwrap_err()),
            "scopes"
        );
    }

    #[test]
    fn expiry_beyond_max_ttl_is_refused() {
        let far = (Utc::now() + chrono::Duration::days(800)).to_rfc3339();
        let e = parse(json!({"name": "a", "access": "full", "expires_at": far})).unwrap_err();
        assert_eq!(e.code(), "expiry_too_long");
        let e = parse(json!({"name": "a", "access": "full", "expires_at": null})).unwrap_err();
        assert_eq!(e.code(), "expiry_too_long");
        let ok = (Utc::now() + chrono::Duration::days(700)).to_rfc3339();
        assert!(parse(json!({"name": "a", "access": "full", "expires_at": ok})).is_ok());
    }

    #[test]
    fn developers_own_what_they_create() {
        let dev = Caller {
            name: "dev".into(),
            role: AdminRole::Developer,
        };
        let k = parse_as(
            json!({"name": "a", "access": "read_only", "owner": "dev"}),
            &dev,
        )
        .unwrap();
        assert_eq!(k.owner, "dev");
        let e = parse_as(
            json!({"name": "a", "access": "full", "owner": "other"}),
            &dev,
        )
        .unwrap_err();
        assert_eq!(e.code(), "forbidden_role");
        assert_eq!(
            parse(json!({"name": "a", "access": "full", "owner": "team-a"}))
                .unwrap()
                .owner,
            "team-a"
        );
    }

    #[test]
    fn edits_refuse_immutable_and_unknown_fields() {
        let edit = |v: Value| {
            let Value::Object(m) = v else { unreachable!() };
            KeyEdit::parse(Fields::from_map(m))
        };
        assert_eq!(
            edit(json!({"access": "full"})).unwrap_err(),
            AdminError::ImmutableField("access".into())
        );
        assert_eq!(
            edit(json!({"expires_at": null})).unwrap_err().code(),
            "immutable_field"
        );
        assert_eq!(field_of(edit(json!({"owner": "x"})).unwrap_err()), "owner");
        let e = edit(json!({"name": "new", "rate_limit": null, "scopes": ["a", "a"]})).unwrap();
        assert_eq!(e.rate_limit, Some(None));
        assert_eq!(e.scopes.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn edits_report_only_real_changes() {
        let now = Utc::now();
        let token = Token::generate("kg_");
        let mut rec = parse(json!({"name": "a", "access": "full"}))
            .unwrap()
            .into_record(&token, "kg_", "ops", now);
        let edit = KeyEdit {
            name: Some("a".into()),
            description: Some("new".into()),
            ..Default::default()
        };
        assert_eq!(edit.apply(&mut rec), vec!["description"]);
        assert_eq!(rec.description, "new");
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(365 * 86_400)), "365d");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
