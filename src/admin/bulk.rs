//! `POST /v1/keys/bulk`: one action (revoke, suspend, reinstate, delete) on up
//! to 1000 keys chosen by `ids` or by `filter`.
//!
//! Each item is its own atomic change with its own event, exactly as if it had
//! been sent to the single-key route; the answer lists every item in order with
//! `ok` and, on failure, the error `code` the single-key route would have given.
//! A filter that matches more than 1000 keys is refused as a whole (422) rather
//! than half applied. Developers act only on their own keys: a filter is
//! narrowed to them, and another owner's id fails with `key_not_found`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Caller;
use super::extract::{Fields, JsonBody};
use super::keys::reason;
use super::openapi::{BulkRequest, Problem};
use super::ops::{self, store_err};
use crate::error::AdminError;
use crate::keys::{KeyId, KeyStatus, Scope};
use crate::store::{ListFilter, MAX_PAGE};

/// Most keys one bulk call may touch.
pub const MAX_BULK: usize = 1000;
/// Fields accepted in the body.
pub const BULK_FIELDS: &[&str] = &["action", "ids", "filter", "reason"];
/// Fields accepted in `filter`.
pub const FILTER_FIELDS: &[&str] = &["status", "owner", "scope", "q"];

/// What to do to every selected key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Revoke,
    Suspend,
    Reinstate,
    Delete,
}

impl Action {
    fn parse(s: &str) -> Option<Action> {
        match s {
            "revoke" => Some(Action::Revoke),
            "suspend" => Some(Action::Suspend),
            "reinstate" => Some(Action::Reinstate),
            "delete" => Some(Action::Delete),
            _ => None,
        }
    }
}

/// The outcome for one key.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResult {
    pub id: String,
    pub ok: bool,
    /// The error `code` the single-key route would have answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub error: Option<&'static str>,
}

/// The answer: one result per selected key, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkResults {
    pub results: Vec<ItemResult>,
}

/// Which keys a call selects.
#[derive(Debug)]
pub enum Selection {
    /// Key ids as given (not parsed yet: a malformed one fails on its own).
    Ids(Vec<String>),
    /// A filter, resolved against the store when the call runs.
    Filter(ListFilter),
}

/// A validated bulk body.
#[derive(Debug)]
pub struct BulkCall {
    pub action: Action,
    /// Only for [`Action::Revoke`].
    pub reason: Option<String>,
    pub selection: Selection,
}

/// `POST /v1/keys/bulk`.
#[utoipa::path(
    post,
    path = "/v1/keys/bulk",
    operation_id = "bulkKeys",
    tag = "keys",
    request_body = BulkRequest,
    responses(
        (status = 200, description = "One result per key, in order", body = BulkResults),
        (status = 422, description = "invalid_field: bad action, both or neither of ids and filter, more than 1000 keys", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn run(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<BulkResults>, AdminError> {
    let BulkCall {
        action,
        reason,
        selection,
    } = parse(body)?;
    let ids = match selection {
        Selection::Ids(ids) => ids,
        Selection::Filter(filter) => select(&state, &caller, filter).await?,
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        let outcome = apply(&state, &caller, action, &id, reason.as_deref()).await;
        results.push(ItemResult {
            ok: outcome.is_ok(),
            error: outcome.err().map(|e| e.code()),
            id,
        });
    }
    Ok(Json(BulkResults { results }))
}

/// Validates a bulk body; touches no store (a filter is resolved by [`run`]).
pub fn parse(mut body: Fields) -> Result<BulkCall, AdminError> {
    body.reject_unknown("", BULK_FIELDS)?;
    let action = body
        .take("action")
        .and_then(|v| v.as_str().and_then(Action::parse))
        .ok_or_else(|| {
            AdminError::invalid("action", "must be revoke, suspend, reinstate or delete")
        })?;
    let reason = reason(body.nullable_string("reason")?)?;
    if reason.is_some() && action != Action::Revoke {
        return Err(AdminError::invalid(
            "reason",
            "is only for the revoke action",
        ));
    }
    Ok(BulkCall {
        action,
        reason,
        selection: selection(&mut body)?,
    })
}

/// Reads `ids` xor `filter`.
fn selection(body: &mut Fields) -> Result<Selection, AdminError> {
    match (body.take("ids"), body.take("filter")) {
        (Some(_), Some(_)) => Err(AdminError::invalid("ids", "give ids or filter, not both")),
        (None, None) => Err(AdminError::invalid(
            "ids",
            "give ids (an array of key ids) or filter",
        )),
        (Some(ids), None) => ids_list(ids).map(Selection::Ids),
        (None, Some(Value::Object(m))) => filter(Fields::from_map(m)).map(Selection::Filter),
        (None, Some(_)) => Err(AdminError::invalid("filter", "must be an object")),
    }
}

fn ids_list(v: Value) -> Result<Vec<String>, AdminError> {
    let Value::Array(items) = v else {
        return Err(AdminError::invalid("ids", "must be an array of key ids"));
    };
    if items.len() > MAX_BULK {
        return Err(AdminError::invalid(
            "ids",
            format!("must hold at most {MAX_BULK} ids"),
        ));
    }
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) => Ok(s),
            _ => Err(AdminError::invalid("ids", "must be an array of strings")),
        })
        .collect()
}

fn filter(mut f: Fields) -> Result<ListFilter, AdminError> {
    f.reject_unknown("filter.", FILTER_FIELDS)?;
    let status = f
        .string("status")
        .map_err(|_| AdminError::invalid("filter.status", "must be a string"))?
        .map(|s| {
            KeyStatus::parse(&s).ok_or_else(|| {
                AdminError::invalid(
                    "filter.status",
                    "must be active, suspended, expired or revoked",
                )
            })
        })
        .transpose()?;
    let scope = f
        .string("scope")
        .map_err(|_| AdminError::invalid("filter.scope", "must be a string"))?
        .map(|s| Scope::parse(&s).map_err(|e| AdminError::invalid("filter.scope", e)))
        .transpose()?;
    let owner = f
        .string("owner")
        .map_err(|_| AdminError::invalid("filter.owner", "must be a string"))?;
    let q = f
        .string("q")
        .map_err(|_| AdminError::invalid("filter.q", "must be a string"))?;
    Ok(ListFilter {
        q,
        status,
        owner,
        scope,
        expiring_within: None,
        limit: MAX_BULK.min(MAX_PAGE),
        after: None,
    })
}

/// The ids a filter selects, refusing more than [`MAX_BULK`]. Follows the
/// store's pages to the end: a filtered page can end early (the store's scan
/// budget) with more matches after it, and acting on some of the keys a
/// filter selects would be worse than refusing the call.
async fn select(
    state: &AdminState,
    caller: &Caller,
    mut filter: ListFilter,
) -> Result<Vec<String>, AdminError> {
    if let Some(own) = caller.owner_scope() {
        if filter.owner.as_deref().is_some_and(|o| o != own) {
            return Ok(Vec::new());
        }
        filter.owner = Some(own.to_owned());
    }
    let now = state.clock.now();
    let mut ids = Vec::new();
    loop {
        let page = state
            .store
            .list_keys(&filter, now)
            .await
            .map_err(|e| store_err(e, None))?;
        ids.extend(page.items.into_iter().map(|r| r.id.to_string()));
        if ids.len() > MAX_BULK {
            return Err(AdminError::invalid(
                "filter",
                format!("matches more than {MAX_BULK} keys; narrow it or repeat the call"),
            ));
        }
        match page.next.as_deref().and_then(KeyId::parse) {
            Some(next) => filter.after = Some(next),
            None => return Ok(ids),
        }
    }
}

/// Applies `action` to one key, as its single-key route would.
async fn apply(
    state: &AdminState,
    caller: &Caller,
    action: Action,
    id: &str,
    reason: Option<&str>,
) -> Result<(), AdminError> {
    let id = KeyId::parse(id).ok_or_else(|| AdminError::KeyNotFound(id.to_owned()))?;
    let who = caller.name.as_str();
    match action {
        Action::Revoke => {
            ops::modify(state, caller, &id, |r, now| {
                ops::revoke(r, who, reason, now)
            })
            .await?
        }
        Action::Suspend => {
            ops::modify(state, caller, &id, |r, now| ops::suspend(r, who, now)).await?
        }
        Action::Reinstate => ops::modify(state, caller, &id, |r, _| ops::reinstate(r)).await?,
        Action::Delete => ops::delete(state, caller, &id).await?,
    };
    Ok(())
}
