//! `GET /v1/events`: the audit log, oldest first, filtered by `key_id`, `type`
//! and `after` (an event id, or an RFC 3339 time), paged with `cursor`.
//!
//! Admins and auditors see every event. A developer sees only events about keys
//! it owns: the owner is read from the event's `details.owner` (set on every key
//! event the admin API writes), else from the key's current record; events
//! without a key (`settings.updated`) and events of keys it cannot see are left
//! out. Because that filter runs after the store's, a developer's page may hold
//! fewer than `limit` events while `next_cursor` is still set; following the
//! cursor until it is `null` sees everything.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::AdminState;
use super::auth::Caller;
use super::extract::{QueryParams, decode_cursor, encode_cursor};
use super::input::rfc3339;
use super::keys::DEFAULT_LIMIT;
use super::openapi::{ListEventsQuery, Problem};
use super::ops::store_err;
use crate::error::AdminError;
use crate::keys::KeyId;
use crate::store::{Event, EventFilter, EventType, MAX_PAGE, Page};

/// Store pages a developer's listing reads at most before answering with a
/// short page and a cursor (bounds the work of one call).
const MAX_SCANNED_PAGES: usize = 10;

/// One page of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<Event>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/events`.
#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "listEvents",
    tag = "events",
    params(ListEventsQuery),
    responses(
        (status = 200, description = "One page of events, oldest first; developers see only their keys' events", body = EventPage),
        (status = 422, description = "invalid_field (the parameter is named in `detail`)", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<Arc<AdminState>>,
    caller: Caller,
    mut query: QueryParams,
) -> Result<Json<EventPage>, AdminError> {
    let filter = event_filter(&mut query)?;
    query.finish()?;
    let page = match caller.owner_scope() {
        None => state
            .store
            .list_events(&filter)
            .await
            .map_err(|e| store_err(e, None))?,
        Some(owner) => owned_events(&state, owner, filter).await?,
    };
    Ok(Json(EventPage {
        items: page.items,
        next_cursor: page.next.as_deref().map(encode_cursor),
    }))
}

/// Reads the filters of `GET /v1/events` (the caller then checks that
/// nothing is left over with [`QueryParams::finish`]).
pub fn event_filter(q: &mut QueryParams) -> Result<EventFilter, AdminError> {
    let key_id = q
        .take("key_id")?
        .map(|s| {
            KeyId::parse(&s)
                .ok_or_else(|| AdminError::invalid("key_id", "is not a key id (key_<ULID>)"))
        })
        .transpose()?;
    let kind = q
        .take("type")?
        .map(|s| {
            EventType::parse(&s).ok_or_else(|| {
                AdminError::invalid("type", "is not an event type such as key.created")
            })
        })
        .transpose()?;
    let after = q.take("after")?.map(|s| after_bound(&s)).transpose()?;
    let cursor = q
        .take("cursor")?
        .map(|c| decode_cursor(&c, is_event_id))
        .transpose()?;
    Ok(EventFilter {
        key_id,
        kind,
        // Event ids sort by time, so the later of the two bounds wins.
        after: after.into_iter().chain(cursor).max(),
        limit: q.limit(DEFAULT_LIMIT, MAX_PAGE)?,
    })
}

/// `after`: an event id, or a time (events strictly after its millisecond).
fn after_bound(s: &str) -> Result<String, AdminError> {
    if is_event_id(s) {
        return Ok(s.to_owned());
    }
    // A `+` in an unencoded query string arrives as a space: put it back.
    let at = rfc3339("after", &s.replace(' ', "+")).map_err(|_| {
        AdminError::invalid("after", "must be an event id or an RFC 3339 date-time")
    })?;
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    // The largest id of that millisecond: every later event sorts after it.
    Ok(format!("evt_{}", ulid::Ulid::from_parts(ms, u128::MAX)))
}

fn is_event_id(s: &str) -> bool {
    s.strip_prefix("evt_")
        .is_some_and(|u| ulid::Ulid::from_string(u).is_ok())
}

/// Events of keys `owner` owns, reading store pages until `limit` are found.
async fn owned_events(
    state: &AdminState,
    owner: &str,
    filter: EventFilter,
) -> Result<Page<Event>, AdminError> {
    let limit = filter.limit;
    let mut scan = EventFilter {
        limit: MAX_PAGE,
        ..filter
    };
    let mut owners: HashMap<KeyId, Option<String>> = HashMap::new();
    let mut items = Vec::new();
    for _ in 0..MAX_SCANNED_PAGES {
        let page = state
            .store
            .list_events(&scan)
            .await
            .map_err(|e| store_err(e, None))?;
        for ev in page.items {
            let id = ev.id.clone();
            if event_owner(state, &ev, &mut owners).await?.as_deref() == Some(owner) {
                items.push(ev);
            }
            if items.len() == limit {
                return Ok(Page {
                    items,
                    next: Some(id),
                });
            }
        }
        match page.next {
            Some(next) => scan.after = Some(next),
            None => return Ok(Page { items, next: None }),
        }
    }
    Ok(Page {
        items,
        next: scan.after,
    })
}

/// The owner of the key an event is about, if it can be told.
async fn event_owner(
    state: &AdminState,
    ev: &Event,
    cache: &mut HashMap<KeyId, Option<String>>,
) -> Result<Option<String>, AdminError> {
    if let Some(owner) = ev.details.get("owner").and_then(|o| o.as_str()) {
        return Ok(Some(owner.to_owned()));
    }
    let Some(id) = &ev.key_id else {
        return Ok(None);
    };
    if let Some(known) = cache.get(id) {
        return Ok(known.clone());
    }
    let rec = state
        .store
        .get_by_id(id)
        .await
        .map_err(|e| store_err(e, Some(id)))?;
    let owner = rec.map(|r| r.owner);
    cache.insert(*id, owner.clone());
    Ok(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_accepts_ids_and_times() {
        let id = format!("evt_{}", ulid::Ulid::new());
        assert_eq!(after_bound(&id).unwrap(), id);
        let t = after_bound("2030-01-01T00:00:00Z").unwrap();
        assert!(is_event_id(&t));
        let same_ms = format!("evt_{}", ulid::Ulid::from_parts(1_893_456_000_000, 5));
        let next_ms = format!("evt_{}", ulid::Ulid::from_parts(1_893_456_000_001, 0));
        assert!(same_ms < t && t < next_ms);
        assert!(after_bound("yesterday").is_err());
    }
}
