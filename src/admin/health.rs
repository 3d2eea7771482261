//! `GET /healthz` (the process answers) and `GET /readyz` (the store answers).
//! Neither needs a token, so load balancers and orchestrators can probe them.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use crate::store::StoreError;

/// Answer of `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// Answer of `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    /// Why the store is not usable (`unavailable`, `corrupt`, `error`); only when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub store: Option<&'static str>,
}

/// `GET /healthz`: always `{"status": "ok"}`.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "meta",
    responses((status = 200, description = "The process is alive", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// `GET /readyz`: 200 `{"ready": true}`, or 503 `{"ready": false, "store": why}`.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "meta",
    responses(
        (status = 200, description = "The store answers", body = Readiness),
        (status = 503, description = "The store does not answer", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<Arc<AdminState>>) -> (StatusCode, Json<Readiness>) {
    match state.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(Readiness {
                ready: true,
                store: None,
            }),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Readiness {
                    ready: false,
                    store: Some(short_reason(&e)),
                }),
            )
        }
    }
}

/// A short reason that reveals nothing about the store's address or contents.
fn short_reason(e: &StoreError) -> &'static str {
    match e {
        StoreError::Unavailable(_) => "unavailable",
        StoreError::Corrupt(_) => "corrupt",
        StoreError::Conflict
        | StoreError::OwnerLimit { .. }
        | StoreError::Duplicate
        | StoreError::NotFound => "error",
    }
}
