//! The `/v1/keys` routes (DESIGN.md section 5): create, list, show, edit,
//! revoke, suspend, reinstate, rotate, delete, usage.
//!
//! Each handler parses its input strictly, calls one operation from
//! [`super::ops`], and answers the key's public view. Developers see and manage
//! only keys they own; any other key answers 404 (see [`super::auth`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Caller;
use super::extract::{Fields, JsonBody, KeyPath, QueryParams, decode_cursor, encode_cursor};
use super::input::{self, KeyEdit, NewKey};
use super::openapi::{
    CreateKeyRequest, EmptyRequest, ListKeysQuery, Problem, RevokeRequest, RotateRequest,
    UpdateKeyRequest,
};
use super::ops::{self, MAX_GRACE, store_err};
use crate::error::AdminError;
use crate::keys::{KeyId, KeyStatus, KeyView, Scope, Token};
use crate::store::{EventType, ListFilter, MAX_PAGE, UsageHour};

/// Default page size of listings.
pub const DEFAULT_LIMIT: usize = 50;
/// Longest `reason` of a revocation, in characters.
pub const MAX_REASON_CHARS: usize = 1000;
/// How far back `usage` reports.
const USAGE_DAYS: i64 = 7;

/// A key with its secret: the answer to create and rotate, the only times the
/// secret is shown. Not `Debug`, so it cannot end up in a log by accident.
#[derive(Serialize, ToSchema)]
pub struct KeyWithSecret {
    pub key: KeyView,
    /// The API key itself: store it now, it is never shown again.
    pub secret: String,
}

/// One page of keys.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPage {
    pub items: Vec<KeyView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Recent usage of a key.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageReport {
    pub last_used_at: Option<DateTime<Utc>>,
    /// Hours of the last 7 days that saw traffic, oldest first.
    pub hourly: Vec<UsageHour>,
}

/// `POST /v1/keys`.
#[utoipa::path(
    post,
    path = "/v1/keys",
    operation_id = "createKey",
    tag = "keys",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, description = "Created; `secret` is shown only this once", body = KeyWithSecret),
        (status = 403, description = "forbidden_role: a developer named another owner", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "owner_key_limit: the owner holds keys.max_per_owner keys", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "unsupported_media_type: the body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field or expiry_too_long (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, AdminError> {
    let config = state.config.load();
    let now = state.clock.now();
    let new = NewKey::parse(body, &caller, &config.keys, now)?;
    let token = Token::generate(&config.keys.prefix);
    let rec = new.into_record(&token, &config.keys.prefix, &caller.name, now);
    let event = ops::key_event(
        EventType::KeyCreated,
        &rec,
        &caller.name,
        now,
        serde_json::json!({}),
    );
    state
        .store
        .create_key(&rec, config.keys.max_per_owner, &event)
        .await
        .map_err(|e| store_err(e, Some(&rec.id)))?;
    tracing::info!(actor = %caller.name, key_id = %rec.id, owner = %rec.owner, "admin change: key created");
    Ok(with_secret(StatusCode::CREATED, rec.view(now), &token))
}

/// `GET /v1/keys`.
#[utoipa::path(
    get,
    path = "/v1/keys",
    operation_id = "listKeys",
    tag = "keys",
    params(ListKeysQuery),
    responses(
        (status = 200, description = "One page of keys, in creation order", body = KeyPage),
        (status = 422, description = "invalid_field (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    mut query: QueryParams,
) -> Result<Json<KeyPage>, AdminError> {
    let mut filter = list_filter(&mut query)?;
    query.finish()?;
    if let Some(own) = caller.owner_scope() {
        // A developer asking for another owner's keys sees none.
        if filter.owner.as_deref().is_some_and(|o| o != own) {
            return Ok(Json(KeyPage {
                items: Vec::new(),
                next_cursor: None,
            }));
        }
        filter.owner = Some(own.to_owned());
    }
    let now = state.clock.now();
    let page = state
        .store
        .list_keys(&filter, now)
        .await
        .map_err(|e| store_err(e, None))?;
    Ok(Json(KeyPage {
        items: page.items.iter().map(|r| r.view(now)).collect(),
        next_cursor: page.next.as_deref().map(encode_cursor),
    }))
}

/// Reads the filters of `GET /v1/keys` (the caller then checks that nothing
/// is left over with [`QueryParams::finish`]).
pub fn list_filter(q: &mut QueryParams) -> Result<ListFilter, AdminError> {
    let status = q
        .take("status")?
        .map(|s| {
            KeyStatus::parse(&s).ok_or_else(|| {
                AdminError::invalid("status", "must be active, suspended, expired or revoked")
            })
        })
        .transpose()?;
    let scope = q
        .take("scope")?
        .map(|s| Scope::parse(&s).map_err(|e| AdminError::invalid("scope", e)))
        .transpose()?;
    let expiring_within = q
        .take("expiring_within")?
        .map(|s| input::duration("expiring_within", &s))
        .transpose()?;
    let after = q
        .take("cursor")?
        .map(|c| decode_cursor(&c, |s| KeyId::parse(s).is_some()))
        .transpose()?
        .and_then(|s| KeyId::parse(&s));
    Ok(ListFilter {
        q: q.take("q")?,
        status,
        owner: q.take("owner")?,
        scope,
        expiring_within,
        limit: q.limit(DEFAULT_LIMIT, MAX_PAGE)?,
        after,
    })
}

/// `GET /v1/keys/{id}`.
#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    operation_id = "getKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    responses((status = 200, description = "The key", body = KeyView), (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"))
)]
pub async fn show(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
) -> Result<Json<KeyView>, AdminError> {
    let rec = ops::load_visible(&state, &caller, &id).await?;
    Ok(Json(rec.view(state.clock.now())))
}

/// `PATCH /v1/keys/{id}`: edits name, description, scopes, rate_limit, metadata.
#[utoipa::path(
    patch,
    path = "/v1/keys/{id}",
    operation_id = "updateKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    request_body = Option<UpdateKeyRequest>,
    responses(
        (status = 200, description = "The edited key", body = KeyView),
        (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "conflict: changed concurrently too often; retry", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "immutable_field (access, expires_at) or invalid_field", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
    JsonBody(body): JsonBody,
) -> Result<Json<KeyView>, AdminError> {
    let edit = KeyEdit::parse(body)?;
    let rec = ops::modify(&state, &caller, &id, |rec, _now| {
        let changed = edit.clone().apply(rec);
        Ok((!changed.is_empty()).then(|| {
            (
                EventType::KeyUpdated,
                serde_json::json!({"changed": changed}),
            )
        }))
    })
    .await?;
    Ok(Json(rec.view(state.clock.now())))
}

/// `POST /v1/keys/{id}/revoke` with an optional `reason`.
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/revoke",
    operation_id = "revokeKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    request_body = Option<RevokeRequest>,
    responses(
        (status = 200, description = "The revoked key", body = KeyView),
        (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "already_revoked", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn revoke(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
    JsonBody(body): JsonBody,
) -> Result<Json<KeyView>, AdminError> {
    let reason = parse_revoke(body)?;
    let rec = ops::modify(&state, &caller, &id, |rec, now| {
        ops::revoke(rec, &caller.name, reason.as_deref(), now)
    })
    .await?;
    Ok(Json(rec.view(state.clock.now())))
}

/// Validates a revoke body: the optional `reason`.
pub fn parse_revoke(mut body: Fields) -> Result<Option<String>, AdminError> {
    body.reject_unknown("", &["reason"])?;
    reason(body.nullable_string("reason")?)
}

/// Checks a revocation reason's length.
pub fn reason(reason: Option<String>) -> Result<Option<String>, AdminError> {
    match reason {
        Some(r) if r.chars().count() > MAX_REASON_CHARS => Err(AdminError::invalid(
            "reason",
            format!("must be at most {MAX_REASON_CHARS} characters"),
        )),
        other => Ok(other),
    }
}

/// `POST /v1/keys/{id}/suspend`.
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/suspend",
    operation_id = "suspendKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    request_body = Option<EmptyRequest>,
    responses(
        (status = 200, description = "The suspended key (already suspended: unchanged)", body = KeyView),
        (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "key_revoked: revocation is permanent", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn suspend(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
    JsonBody(body): JsonBody,
) -> Result<Json<KeyView>, AdminError> {
    body.reject_unknown("", &[])?;
    let rec = ops::modify(&state, &caller, &id, |rec, now| {
        ops::suspend(rec, &caller.name, now)
    })
    .await?;
    Ok(Json(rec.view(state.clock.now())))
}

/// `POST /v1/keys/{id}/reinstate`.
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/reinstate",
    operation_id = "reinstateKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    request_body = Option<EmptyRequest>,
    responses(
        (status = 200, description = "The reinstated key (not suspended: unchanged)", body = KeyView),
        (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "key_revoked: revocation is permanent", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn reinstate(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
    JsonBody(body): JsonBody,
) -> Result<Json<KeyView>, AdminError> {
    body.reject_unknown("", &[])?;
    let rec = ops::modify(&state, &caller, &id, |rec, _now| ops::reinstate(rec)).await?;
    Ok(Json(rec.view(state.clock.now())))
}

/// `POST /v1/keys/{id}/rotate` with an optional `grace` (default `0s`, at most
/// 30 days).
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/rotate",
    operation_id = "rotateKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    request_body = Option<RotateRequest>,
    responses(
        (status = 200, description = "Same key, new `secret` (shown only this once); the old secret works until the grace ends", body = KeyWithSecret),
        (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "key_revoked", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field (the field is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn rotate(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
    JsonBody(body): JsonBody,
) -> Result<Response, AdminError> {
    let grace = parse_rotate(body)?;
    let prefix = state.config.load().keys.prefix.clone();
    let mut secret = None;
    let rec = ops::modify(&state, &caller, &id, |rec, now| {
        let token = Token::generate(&prefix);
        let change = ops::rotate(rec, &token, &prefix, grace, now)?;
        secret = Some(token);
        Ok(change)
    })
    .await?;
    // `ops::rotate` either fails or reports a change, and `modify` only returns
    // a record after writing the change, so the token is always set here.
    let token = secret.ok_or(AdminError::Internal)?;
    Ok(with_secret(
        StatusCode::OK,
        rec.view(state.clock.now()),
        &token,
    ))
}

/// Validates a rotate body: the optional `grace` (default `0s`, at most 30 days).
pub fn parse_rotate(mut body: Fields) -> Result<std::time::Duration, AdminError> {
    body.reject_unknown("", &["grace"])?;
    let grace = match body.string("grace")? {
        None => std::time::Duration::ZERO,
        Some(g) => input::duration("grace", &g)?,
    };
    if grace > MAX_GRACE {
        return Err(AdminError::invalid("grace", "must be at most 30d"));
    }
    Ok(grace)
}

/// `DELETE /v1/keys/{id}`.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    operation_id = "deleteKey",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    responses((status = 204, description = "Deleted; its secrets are now unknown"), (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"))
)]
pub async fn delete(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
) -> Result<StatusCode, AdminError> {
    ops::delete(&state, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/keys/{id}/usage`: hourly counts of the last 7 days.
#[utoipa::path(
    get,
    path = "/v1/keys/{id}/usage",
    operation_id = "getKeyUsage",
    tag = "keys",
    params(("id" = String, Path, description = "Key id (`key_` + ULID)")),
    responses((status = 200, description = "Last use and hourly counts", body = UsageReport), (status = 404, description = "key_not_found: no such key, or (developers) not theirs", body = Problem, content_type = "application/problem+json"))
)]
pub async fn usage(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    KeyPath(id): KeyPath,
) -> Result<Json<UsageReport>, AdminError> {
    let rec = ops::load_visible(&state, &caller, &id).await?;
    let since = state.clock.now() - chrono::Duration::days(USAGE_DAYS);
    let hourly = state
        .store
        .usage(&id, since)
        .await
        .map_err(|e| store_err(e, Some(&id)))?;
    Ok(Json(UsageReport {
        last_used_at: rec.last_used_at,
        hourly,
    }))
}

/// A key and its secret, marked not to be cached anywhere.
fn with_secret(status: StatusCode, key: KeyView, token: &Token) -> Response {
    let body = KeyWithSecret {
        key,
        secret: token.expose().to_owned(),
    };
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
