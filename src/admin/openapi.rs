//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of the admin API,
//! generated with utoipa from the handlers' `#[utoipa::path]` annotations and
//! the request and response types, so it cannot drift silently.
//!
//! Types owned by other modules (`KeyView`, `Event`, `UsageHour` and their
//! enums) get their schemas from mirror structs here; the unit tests below
//! check that each mirror has exactly the fields the real type serializes, and
//! that each documented request body lists exactly the fields its parser
//! accepts. Errors common to every authenticated route (401, 403 for auditors'
//! writes, 503) and the bearer security requirement are added by [`Common`]
//! rather than repeated on every handler.

use std::borrow::Cow;

use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Doc, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

use super::{bulk, events, health, keys, settings};
use crate::keys::KeyView;
use crate::store::{Event, UsageHour};

/// Name of the bearer security scheme.
pub const SECURITY_SCHEME: &str = "admin_token";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate admin API",
        description = "Key lifecycle, audit events and settings of a keygate gateway. \
            Authenticate with `Authorization: Bearer <admin token>`. Every error is \
            `application/problem+json` with `status`, `title`, `code`, `detail` and `request_id`."
    ),
    paths(
        keys::create,
        keys::list,
        keys::show,
        keys::update,
        keys::delete,
        keys::revoke,
        keys::suspend,
        keys::reinstate,
        keys::rotate,
        keys::usage,
        bulk::run,
        events::list,
        settings::show,
        settings::update,
        document,
        health::healthz,
        health::readyz,
    ),
    components(schemas(Problem)),
    modifiers(&Common),
    tags(
        (name = "keys", description = "API keys and their lifecycle"),
        (name = "events", description = "The audit log"),
        (name = "settings", description = "Gateway-wide settings and the key policy"),
        (name = "meta", description = "Health, readiness and this document"),
    )
)]
pub struct ApiDoc;

/// The document, built once per call (it is small and rarely fetched).
pub fn document_value() -> Doc {
    ApiDoc::openapi()
}

/// `GET /v1/openapi.json` (no token needed: it describes, it reveals nothing).
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "getOpenApi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub async fn document() -> Json<Doc> {
    Json(document_value())
}

/// Adds the bearer scheme and, on every authenticated (`/v1/`) operation, the
/// security requirement and the errors any of them can give.
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut Doc) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") || path == "/v1/openapi.json" {
                continue;
            }
            let ops = [
                (false, item.get.as_mut()),
                (true, item.post.as_mut()),
                (true, item.patch.as_mut()),
                (true, item.delete.as_mut()),
                (true, item.put.as_mut()),
            ];
            for (write, op) in ops {
                let Some(op) = op else { continue };
                let has_body = op.request_body.is_some();
                if let Some(body) = op.request_body.as_mut() {
                    not_null(body);
                }
                op.security = Some(vec![SecurityRequirement::new::<_, [&str; 0], &str>(
                    SECURITY_SCHEME,
                    [],
                )]);
                let mut add = |status: &str, why: &str| {
                    op.responses
                        .responses
                        .entry(status.into())
                        .or_insert_with(|| problem(why));
                };
                add("401", "invalid_admin_token: missing or unknown admin token");
                if write {
                    add("403", "forbidden_role: the auditor role may only read");
                }
                if has_body {
                    add("413", "payload_too_large: the body is over 1 MiB");
                    add(
                        "415",
                        "unsupported_media_type: a non-empty body must be JSON",
                    );
                }
                add("503", "store_unavailable: the key store cannot be reached");
            }
        }
    }
}

/// An optional body (`request_body = Option<T>`) is documented by utoipa as
/// "`T` or JSON `null`"; keygate takes no body (or `{}`) for "nothing", and
/// refuses a JSON `null` like any body that is not an object. So the schema
/// is `T`, and `required: false` says the body may be left out.
fn not_null(body: &mut utoipa::openapi::request_body::RequestBody) {
    for content in body.content.values_mut() {
        let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema else {
            continue;
        };
        let is_null = |s: &RefOr<Schema>| {
            matches!(s, RefOr::T(Schema::Object(o))
                if o.schema_type == SchemaType::Type(Type::Null))
        };
        let mut rest = one_of.items.iter().filter(|s| !is_null(s));
        if let (Some(only), None) = (rest.next(), rest.next())
            && one_of.items.iter().any(is_null)
        {
            content.schema = Some(only.clone());
        }
    }
}

/// A problem+json response described by `why`.
fn problem(why: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(why)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Problem::schema_ref()))
                    .build(),
            )
            .build(),
    )
}

/// Every error the admin API answers (RFC 9457 problem details).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// Machine-readable reason, e.g. `invalid_field`, `key_not_found`.
    pub code: String,
    /// One sentence; for validation errors it starts with the field's name.
    pub detail: String,
    /// The `X-Request-Id` of the call.
    pub request_id: String,
}

impl Problem {
    fn schema_ref() -> RefOr<Schema> {
        RefOr::Ref(Ref::from_schema_name(Problem::name()))
    }
}

// ----- Request bodies (documentation of what the parsers in `input`, `keys`,
// `bulk` and `settings` accept; the tests keep the two in step). -----

/// Body of `POST /v1/keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// 1 to 200 characters, not blank, no control characters (the pattern:
    /// one character that is not white space, none in Unicode category Cc,
    /// which is what `char::is_control` finds).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub name: String,
    /// Defaults to the caller's token name; developers may only name themselves.
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub owner: Option<String>,
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    /// Up to 100 scopes of `A-Za-z0-9_.:/-`; defaults to none.
    #[schema(nullable = false, max_items = 100)]
    pub scopes: Option<Vec<ScopeDoc>>,
    pub access: AccessDoc,
    /// RFC 3339, in the future, within `keys.max_ttl`; `null` never expires
    /// (only without `keys.max_ttl`). Not with `expires_in`.
    pub expires_at: Option<DateTime<Utc>>,
    /// A duration such as `90d`. Not with `expires_at`. Neither: `keys.default_ttl`.
    #[schema(nullable = false, pattern = r"^[0-9]+(ms|s|m|h|d)$")]
    pub expires_in: Option<String>,
    /// The key's own limit; `null` or absent: `rate_limit.default`.
    pub rate_limit: Option<RateLimitDoc>,
    /// Free-form JSON object, at most 16 KiB serialized.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// Body of `PATCH /v1/keys/{id}`: only the fields to change. `access` and
/// `expires_at` are immutable (422 `immutable_field`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\s\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub name: Option<String>,
    /// `null` empties it.
    #[schema(max_length = 2000)]
    pub description: Option<String>,
    #[schema(nullable = false, max_items = 100)]
    pub scopes: Option<Vec<ScopeDoc>>,
    /// `null` removes the key's own limit.
    pub rate_limit: Option<RateLimitDoc>,
    /// `null` empties it.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// Body of `POST /v1/keys/{id}/revoke` (optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    #[schema(max_length = 1000)]
    pub reason: Option<String>,
}

/// Body of `POST /v1/keys/{id}/rotate` (optional).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the old secret keeps working, e.g. `1h`; default `0s`, at most `30d`.
    #[schema(nullable = false, pattern = r"^[0-9]+(ms|s|m|h|d)$")]
    pub grace: Option<String>,
}

/// Body of `POST /v1/keys/{id}/suspend` and `.../reinstate`: empty or `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// Body of `POST /v1/keys/bulk`: `ids` or `filter`, not both; at most 1000 keys.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub action: BulkActionDoc,
    #[schema(nullable = false, max_items = 1000)]
    pub ids: Option<Vec<String>>,
    #[schema(nullable = false)]
    pub filter: Option<BulkFilterDoc>,
    /// Revocation reason (action `revoke` only).
    pub reason: Option<String>,
}

/// Selects keys for a bulk action; all given filters must match.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BulkFilter)]
pub struct BulkFilterDoc {
    #[schema(nullable = false)]
    pub status: Option<KeyStatusDoc>,
    #[schema(nullable = false)]
    pub owner: Option<String>,
    #[schema(nullable = false)]
    pub scope: Option<ScopeDoc>,
    /// Case-insensitive substring of name, id or owner.
    #[schema(nullable = false)]
    pub q: Option<String>,
}

/// A bulk action.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = BulkAction)]
pub enum BulkActionDoc {
    Revoke,
    Suspend,
    Reinstate,
    Delete,
}

/// Body of `PATCH /v1/settings` (admin only).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsUpdateRequest {
    /// `false` switches every API key off (403 `api_keys_disabled`).
    #[schema(nullable = false)]
    pub api_keys_enabled: Option<bool>,
}

/// Query of `GET /v1/keys`. A parameter given must have a value: an empty
/// one (`?status=`) is 422 `invalid_field`, like a repeated one.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    /// Case-insensitive substring of name, id or owner.
    #[param(min_length = 1)]
    pub q: Option<String>,
    pub status: Option<KeyStatusDoc>,
    #[param(min_length = 1)]
    pub owner: Option<String>,
    /// Keys holding this scope.
    pub scope: Option<ScopeDoc>,
    /// Keys not yet expired that expire within this duration, e.g. `30d`.
    #[param(pattern = r"^[0-9]+(ms|s|m|h|d)$")]
    pub expiring_within: Option<String>,
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page. A filtered listing examines a
    /// bounded number of keys per call, so a page may hold fewer than `limit`
    /// keys (even none) while `next_cursor` is set: follow it until it is `null`.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// Query of `GET /v1/events`. A parameter given must have a value.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListEventsQuery {
    /// `key_` + ULID.
    #[param(pattern = "^key_[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$")]
    pub key_id: Option<String>,
    /// Event type, e.g. `key.revoked`.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub kind: Option<EventTypeDoc>,
    /// Only events after this event id or RFC 3339 time.
    #[param(min_length = 1)]
    pub after: Option<String>,
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// A scope: 1 to 128 characters of `A-Za-z0-9_.:/-`.
#[derive(Debug, Deserialize)]
pub struct ScopeDoc(pub String);

impl PartialSchema for ScopeDoc {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(128))
            .pattern(Some(r"^[A-Za-z0-9_.:/-]+$"))
            .into()
    }
}

impl ToSchema for ScopeDoc {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Scope")
    }
}

// ----- Mirrors of types owned by other modules. -----

/// A key's public view; never the secret or its hash.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = KeyView)]
pub struct KeyViewDoc {
    /// `key_` + ULID.
    pub id: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    /// The prefix and the last four characters of the secret.
    pub hint: String,
    pub scopes: Vec<String>,
    pub access: AccessDoc,
    pub rate_limit: Option<RateLimitDoc>,
    pub status: KeyStatusDoc,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub updated_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
    pub revocation_reason: Option<String>,
    pub suspended_at: Option<DateTime<Utc>>,
    pub suspended_by: Option<String>,
    pub last_used_at: Option<DateTime<Utc>>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// What a key may do: `read_only` keys may use GET, HEAD and OPTIONS only.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Access)]
pub enum AccessDoc {
    ReadOnly,
    Full,
}

/// A key's status, first that applies: revoked, suspended, expired, active.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = KeyStatus)]
pub enum KeyStatusDoc {
    Revoked,
    Suspended,
    Expired,
    Active,
}

/// A token bucket: sustained `per_second` with room for `burst`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RateLimit)]
pub struct RateLimitDoc {
    // utoipa would say `format: int32` for a u32, and refuse half its range.
    #[schema(value_type = i64, minimum = 1, maximum = 4_294_967_295_i64)]
    pub per_second: u32,
    #[schema(value_type = i64, minimum = 1, maximum = 4_294_967_295_i64)]
    pub burst: u32,
}

/// An audit event.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Event)]
pub struct EventDoc {
    /// `evt_` + ULID; ids sort by time.
    pub id: String,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: EventTypeDoc,
    pub key_id: Option<String>,
    /// The admin token name (or `system` for background jobs) that caused it.
    pub actor: String,
    /// Type-specific: `reason` (revoked), `grace_until` (rotated), `changed`
    /// (updated), `owner` (every key event), ...
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// Event types.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(as = EventType)]
pub enum EventTypeDoc {
    #[serde(rename = "key.created")]
    KeyCreated,
    #[serde(rename = "key.updated")]
    KeyUpdated,
    #[serde(rename = "key.revoked")]
    KeyRevoked,
    #[serde(rename = "key.suspended")]
    KeySuspended,
    #[serde(rename = "key.reinstated")]
    KeyReinstated,
    #[serde(rename = "key.rotated")]
    KeyRotated,
    #[serde(rename = "key.deleted")]
    KeyDeleted,
    #[serde(rename = "key.expiring")]
    KeyExpiring,
    #[serde(rename = "key.expired")]
    KeyExpired,
    #[serde(rename = "key.purged")]
    KeyPurged,
    #[serde(rename = "settings.updated")]
    SettingsUpdated,
}

/// Usage of a key in one hour.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = UsageHour)]
pub struct UsageHourDoc {
    /// Start of the hour (UTC).
    pub hour: DateTime<Utc>,
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// Implements `ToSchema` for a type owned elsewhere through its mirror.
macro_rules! schema_via {
    ($real:ty, $doc:ty) => {
        impl PartialSchema for $real {
            fn schema() -> RefOr<Schema> {
                <$doc as PartialSchema>::schema()
            }
        }
        impl ToSchema for $real {
            fn name() -> Cow<'static, str> {
                <$doc as ToSchema>::name()
            }
            fn schemas(out: &mut Vec<(String, RefOr<Schema>)>) {
                <$doc as ToSchema>::schemas(out)
            }
        }
    };
}

schema_via!(KeyView, KeyViewDoc);
schema_via!(Event, EventDoc);
schema_via!(UsageHour, UsageHourDoc);

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use super::*;
    use crate::admin::{bulk, input, settings};
    use crate::keys::{Access, KeyStatus};
    use crate::store::EventType;

    fn doc() -> Value {
        serde_json::to_value(ApiDoc::openapi()).unwrap()
    }

    fn properties(doc: &Value, schema: &str) -> BTreeSet<String> {
        let props = &doc["components"]["schemas"][schema]["properties"];
        assert!(
            props.is_object(),
            "schema {schema} has no properties in {doc:#}"
        );
        props.as_object().unwrap().keys().cloned().collect()
    }

    fn set(fields: &[&str]) -> BTreeSet<String> {
        fields.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn document_is_openapi_3_1() {
        let d = doc();
        assert!(d["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            d["components"]["securitySchemes"][SECURITY_SCHEME]["scheme"],
            "bearer"
        );
        let op = &d["paths"]["/v1/keys"]["post"];
        assert_eq!(op["security"][0][SECURITY_SCHEME], serde_json::json!([]));
        assert!(op["responses"]["401"].is_object());
        assert!(d["paths"]["/healthz"]["get"]["security"].is_null());
        let mut ids = BTreeSet::new();
        for item in d["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_owned()), "operationId {id} is not unique");
            }
        }
    }

    #[test]
    fn request_schemas_list_exactly_the_accepted_fields() {
        let d = doc();
        assert_eq!(
            properties(&d, "CreateKeyRequest"),
            set(input::CREATE_FIELDS)
        );
        assert_eq!(properties(&d, "UpdateKeyRequest"), set(input::EDIT_FIELDS));
        assert_eq!(properties(&d, "BulkRequest"), set(bulk::BULK_FIELDS));
        assert_eq!(properties(&d, "BulkFilter"), set(bulk::FILTER_FIELDS));
        assert_eq!(
            properties(&d, "SettingsUpdateRequest"),
            set(settings::SETTINGS_FIELDS)
        );
    }

    #[test]
    fn mirrors_match_what_the_real_types_serialize() {
        let d = doc();
        let now = Utc::now();
        let t = crate::keys::Token::generate("kg_");
        let body = serde_json::json!({"name": "n", "access": "full"});
        let Value::Object(m) = body else {
            unreachable!()
        };
        let caller = crate::admin::auth::Caller {
            name: "ops".into(),
            role: crate::config::AdminRole::Admin,
        };
        let policy = crate::config::KeysConfig {
            prefix: "kg_".into(),
            headers: vec![],
            default_ttl: std::time::Duration::from_secs(86_400),
            max_ttl: None,
            max_per_owner: 1,
            expiry_notice: std::time::Duration::from_secs(1),
            purge_expired_after: std::time::Duration::from_secs(1),
        };
        let rec = input::NewKey::parse(
            crate::admin::extract::Fields::from_map(m),
            &caller,
            &policy,
            now,
        )
        .unwrap()
        .into_record(&t, "kg_", "ops", now);
        let view = serde_json::to_value(rec.view(now)).unwrap();
        assert_eq!(
            properties(&d, "KeyView"),
            view.as_object().unwrap().keys().cloned().collect()
        );
        let ev = Event::new(
            EventType::KeyCreated,
            Some(rec.id),
            "ops",
            now,
            serde_json::json!({}),
        );
        let ev = serde_json::to_value(ev).unwrap();
        assert_eq!(
            properties(&d, "Event"),
            ev.as_object().unwrap().keys().cloned().collect()
        );
        let hour = UsageHour {
            hour: now,
            counts: Default::default(),
        };
        let hour = serde_json::to_value(hour).unwrap();
        assert_eq!(
            properties(&d, "UsageHour"),
            hour.as_object().unwrap().keys().cloned().collect()
        );
    }

    #[test]
    fn mirrored_enums_hold_every_value() {
        let d = doc();
        let values = |schema: &str| -> BTreeSet<String> {
            d["components"]["schemas"][schema]["enum"]
                .as_array()
                .unwrap_or_else(|| panic!("{schema}: {:#}", d["components"]["schemas"][schema]))
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        let statuses = [
            KeyStatus::Revoked,
            KeyStatus::Suspended,
            KeyStatus::Expired,
            KeyStatus::Active,
        ];
        assert_eq!(
            values("KeyStatus"),
            statuses.iter().map(|s| s.as_str().to_owned()).collect()
        );
        let access = [Access::ReadOnly, Access::Full];
        assert_eq!(
            values("Access"),
            access.iter().map(|a| a.as_str().to_owned()).collect()
        );
        let types = values("EventType");
        assert_eq!(types.len(), 11);
        assert!(types.iter().all(|t| EventType::parse(t).is_some()));
    }
}
