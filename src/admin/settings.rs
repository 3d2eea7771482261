//! `GET` and `PATCH /v1/settings`: the kill switch for API keys (shared by
//! every instance through the store) and the effective key policy (from the
//! config file, read-only here).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Caller;
use super::extract::{Fields, JsonBody};
use super::input::format_duration;
use super::openapi::{Problem, SettingsUpdateRequest};
use super::ops::store_err;
use crate::config::KeysConfig;
use crate::error::AdminError;
use crate::store::{Event, EventType, Settings};

/// Fields accepted by `PATCH /v1/settings`.
pub const SETTINGS_FIELDS: &[&str] = &["api_keys_enabled"];

/// The answer of both routes.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingsView {
    /// `false`: every key-protected route answers 403 `api_keys_disabled`.
    pub api_keys_enabled: bool,
    pub key_policy: KeyPolicy,
}

/// The `keys:` section of the config, durations written as in the file.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyPolicy {
    pub prefix: String,
    pub default_ttl: String,
    /// `null`: no maximum.
    pub max_ttl: Option<String>,
    pub max_per_owner: u32,
    pub expiry_notice: String,
    pub purge_expired_after: String,
}

impl KeyPolicy {
    fn of(keys: &KeysConfig) -> KeyPolicy {
        KeyPolicy {
            prefix: keys.prefix.clone(),
            default_ttl: format_duration(keys.default_ttl),
            max_ttl: keys.max_ttl.map(format_duration),
            max_per_owner: keys.max_per_owner,
            expiry_notice: format_duration(keys.expiry_notice),
            purge_expired_after: format_duration(keys.purge_expired_after),
        }
    }
}

fn view(state: &AdminState, settings: &Settings) -> SettingsView {
    SettingsView {
        api_keys_enabled: settings.api_keys_enabled,
        key_policy: KeyPolicy::of(&state.config.load().keys),
    }
}

/// `GET /v1/settings`.
#[utoipa::path(
    get,
    path = "/v1/settings",
    operation_id = "getSettings",
    tag = "settings",
    responses((status = 200, description = "The kill switch and the key policy", body = SettingsView))
)]
pub async fn show(
    State(state): State<Arc<AdminState>>,
    _caller: Caller,
) -> Result<Json<SettingsView>, AdminError> {
    let settings = state
        .store
        .get_settings()
        .await
        .map_err(|e| store_err(e, None))?;
    Ok(Json(view(&state, &settings)))
}

#[utoipa::path(
    patch,
    path = "/v1/settings",
    operation_id = "updateSettings",
    tag = "settings",
    request_body = Option<SettingsUpdateRequest>,
    responses(
        (status = 200, description = "The settings after the change; every instance applies it", body = SettingsView),
        (status = 403, description = "forbidden_role: only the admin role changes settings", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "invalid_field", body = Problem, content_type = "application/problem+json"),
    )
)]
/// `PATCH /v1/settings` (admin only). Setting the value it already has
/// changes nothing and records no event.
pub async fn update(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<SettingsView>, AdminError> {
    caller.require_admin("changing settings")?;
    let enabled = parse_update(body)?;
    let mut settings = state
        .store
        .get_settings()
        .await
        .map_err(|e| store_err(e, None))?;
    if let Some(enabled) = enabled
        && enabled != settings.api_keys_enabled
    {
        settings.api_keys_enabled = enabled;
        let details = serde_json::json!({"api_keys_enabled": enabled});
        let event = Event::new(
            EventType::SettingsUpdated,
            None,
            &caller.name,
            state.clock.now(),
            details,
        );
        state
            .store
            .put_settings(&settings, &event)
            .await
            .map_err(|e| store_err(e, None))?;
        tracing::info!(actor = %caller.name, api_keys_enabled = enabled, "admin change: settings updated");
    }
    Ok(Json(view(&state, &settings)))
}

/// Validates a `PATCH /v1/settings` body: the kill switch's new value, `None`
/// to leave it as it is.
pub fn parse_update(mut body: Fields) -> Result<Option<bool>, AdminError> {
    body.reject_unknown("", SETTINGS_FIELDS)?;
    body.boolean("api_keys_enabled")
}
