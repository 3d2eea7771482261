//! `GET /healthz` (the process answers) and `GET /readyz` (it can serve
//! traffic). Neither needs a token, so load balancers and orchestrators can
//! probe them.
//!
//! Readiness checks the store (a ping, bounded by [`STORE_PING_TIMEOUT`]) and,
//! when the server provides its [`ReadyFlags`] as a request extension, that the
//! config is loaded, the listeners are bound and shutdown has not begun (a
//! draining instance reports not ready so traffic moves elsewhere first).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use http::StatusCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::AdminState;
use crate::store::StoreError;

/// A store that takes longer than this to answer a ping is not ready.
pub const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What the server knows about its own readiness, shared with `/readyz`.
pub struct ReadyFlags {
    /// A valid config is in use (set once at start; reloads keep the old one
    /// when the new one is invalid, so it stays set).
    pub config_loaded: AtomicBool,
    /// Both listeners are bound and accepting.
    pub listeners_bound: AtomicBool,
    /// Fires when shutdown begins.
    pub shutdown: CancellationToken,
}

impl ReadyFlags {
    pub fn new(shutdown: CancellationToken) -> ReadyFlags {
        ReadyFlags {
            config_loaded: AtomicBool::new(false),
            listeners_bound: AtomicBool::new(false),
            shutdown,
        }
    }
}

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
    pub checks: ReadyChecks,
    /// The names of the checks that failed; only when not ready.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub not_ready: Vec<&'static str>,
}

/// Each check: `ok`, or a short reason that reveals nothing about addresses
/// or contents.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyChecks {
    /// `ok`, `unavailable`, `timeout`, `corrupt` or `error`.
    #[schema(value_type = String)]
    pub store: &'static str,
    /// `ok` or `not_loaded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub config: Option<&'static str>,
    /// `ok`, `not_bound` or `shutting_down`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub listeners: Option<&'static str>,
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

/// `GET /readyz`: 200 when every check is `ok`, else 503 naming the failed
/// ones in `not_ready`.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "meta",
    responses(
        (status = 200, description = "Ready to serve traffic", body = Readiness),
        (status = 503, description = "Not ready; `not_ready` says why", body = Readiness),
    )
)]
pub async fn readyz(
    State(state): State<Arc<AdminState>>,
    flags: Option<Extension<Arc<ReadyFlags>>>,
) -> (StatusCode, Json<Readiness>) {
    let store = match tokio::time::timeout(STORE_PING_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness check: the store failed");
            short_reason(&e)
        }
        Err(_) => {
            tracing::warn!(timeout = ?STORE_PING_TIMEOUT, "readiness check: the store did not answer");
            "timeout"
        }
    };
    let (config, listeners) = match flags {
        None => (None, None),
        Some(Extension(f)) => (
            Some(match f.config_loaded.load(Ordering::Acquire) {
                true => "ok",
                false => "not_loaded",
            }),
            Some(
                match (
                    f.shutdown.is_cancelled(),
                    f.listeners_bound.load(Ordering::Acquire),
                ) {
                    (true, _) => "shutting_down",
                    (false, false) => "not_bound",
                    (false, true) => "ok",
                },
            ),
        ),
    };
    let checks = ReadyChecks {
        store,
        config,
        listeners,
    };
    let not_ready: Vec<&'static str> = [
        ("store", Some(store)),
        ("config", config),
        ("listeners", listeners),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_some_and(|v| v != "ok"))
    .map(|(name, _)| name)
    .collect();
    let ready = not_ready.is_empty();
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        status,
        Json(Readiness {
            ready,
            checks,
            not_ready,
        }),
    )
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
