//! The admin API (DESIGN.md section 5): key lifecycle, audit events, settings,
//! health and the OpenAPI document, served on the admin listener only.
//!
//! Every `/v1` route authenticates an admin token ([`auth`]) and answers JSON;
//! every error, including axum's own 404 and 405, is problem+json carrying the
//! request's id ([`respond`]). Request bodies and query strings are parsed
//! strictly: an unknown field or parameter is 422 `invalid_field` naming it
//! ([`extract`], [`input`]).
//!
//! Composition: [`router`] is the whole admin API. A server that adds routes of
//! its own (metrics, the web console) merges them into [`api_routes`] and wraps
//! the result with [`layered`], so they get request ids and problem+json errors
//! too:
//!
//! ```ignore
//! let app = admin::layered(admin::api_routes(state).merge(metrics).merge(ui));
//! ```

pub mod auth;
pub mod bulk;
pub mod events;
pub mod extract;
pub mod health;
pub mod input;
pub mod keys;
pub mod openapi;
pub mod ops;
pub mod respond;
pub mod settings;
pub mod ui;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Router;
use axum::routing::{get, post};

use crate::config::Config;
use crate::keys::Clock;
use crate::store::SharedStore;

/// What the admin handlers share.
pub struct AdminState {
    pub store: SharedStore,
    /// The live config; read once per request so reloads apply at once.
    pub config: Arc<ArcSwap<Config>>,
    pub clock: Arc<dyn Clock>,
}

/// The whole admin API: [`api_routes`] wrapped by [`layered`].
pub fn router(state: Arc<AdminState>) -> Router {
    layered(api_routes(state))
}

/// The admin routes without the request-id and error layer (see [`layered`]).
pub fn api_routes(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/bulk", post(bulk::run))
        .route(
            "/v1/keys/{id}",
            get(keys::show).patch(keys::update).delete(keys::delete),
        )
        .route("/v1/keys/{id}/revoke", post(keys::revoke))
        .route("/v1/keys/{id}/suspend", post(keys::suspend))
        .route("/v1/keys/{id}/reinstate", post(keys::reinstate))
        .route("/v1/keys/{id}/rotate", post(keys::rotate))
        .route("/v1/keys/{id}/usage", get(keys::usage))
        .route("/v1/events", get(events::list))
        .route("/v1/settings", get(settings::show).patch(settings::update))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state)
}

/// Adds request ids and problem+json errors to every route of `router`,
/// including its fallback (axum's 404) and 405 answers.
pub fn layered(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(respond::request_context))
}
