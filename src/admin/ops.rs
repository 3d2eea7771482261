//! Key operations shared by the single-key routes and bulk calls: loading a key
//! the caller may see, the optimistic read-modify-write loop, and the lifecycle
//! transitions (revoke, suspend, reinstate, rotate) as pure functions.
//!
//! Every change is written together with its audit event in one store call.
//! Each key event's `details` carries the key's `owner`, so a developer's view
//! of the event log still finds its keys' events after a key is deleted.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::AdminState;
use super::auth::Caller;
use crate::error::AdminError;
use crate::keys::{KeyId, KeyRecord, RetiredSecret, Token};
use crate::store::{Event, EventType, StoreError};

/// Attempts of a read-modify-write before answering 409 `conflict`.
const MAX_ATTEMPTS: usize = 5;
/// Retired secrets kept per key; older ones are dropped (their token is then
/// simply unknown instead of answering "rotated").
pub const MAX_RETIRED: usize = 16;
/// Longest rotation grace.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 86_400);

/// A change to record: the event type and its details (`None`: nothing changed).
pub type Transition = Option<(EventType, Value)>;

/// Maps a store failure to the admin error a caller sees.
pub fn store_err(e: StoreError, id: Option<&KeyId>) -> AdminError {
    match e {
        StoreError::Unavailable(why) => {
            tracing::warn!(error = %why, "admin call failed: store unavailable");
            AdminError::StoreUnavailable
        }
        StoreError::Conflict | StoreError::Duplicate => AdminError::Conflict,
        StoreError::OwnerLimit { owner, limit } => AdminError::OwnerKeyLimit { owner, limit },
        StoreError::NotFound => {
            AdminError::KeyNotFound(id.map(|i| i.to_string()).unwrap_or_default())
        }
        StoreError::Corrupt(why) => {
            tracing::error!(error = %why, "admin call failed: corrupt store record");
            AdminError::Internal
        }
    }
}

/// An event about `rec`, with the owner added to `details`.
pub fn key_event(
    kind: EventType,
    rec: &KeyRecord,
    actor: &str,
    now: DateTime<Utc>,
    details: Value,
) -> Event {
    let mut details = match details {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    details.insert("owner".into(), Value::String(rec.owner.clone()));
    Event::new(kind, Some(rec.id), actor, now, Value::Object(details))
}

/// The key `id` if it exists and the caller may see it; otherwise 404.
pub async fn load_visible(
    state: &AdminState,
    caller: &Caller,
    id: &KeyId,
) -> Result<KeyRecord, AdminError> {
    match state
        .store
        .get_by_id(id)
        .await
        .map_err(|e| store_err(e, Some(id)))?
    {
        Some(rec) if caller.sees(&rec) => Ok(rec),
        Some(_) | None => Err(AdminError::KeyNotFound(id.to_string())),
    }
}

/// Reads the key, lets `apply` change it, and writes it back with the event
/// `apply` returns, retrying on concurrent changes. When `apply` reports no
/// change, the current record is returned and nothing is written.
pub async fn modify<F>(
    state: &AdminState,
    caller: &Caller,
    id: &KeyId,
    mut apply: F,
) -> Result<KeyRecord, AdminError>
where
    F: FnMut(&mut KeyRecord, DateTime<Utc>) -> Result<Transition, AdminError> + Send,
{
    for _ in 0..MAX_ATTEMPTS {
        let current = load_visible(state, caller, id).await?;
        let now = state.clock.now();
        let mut next = current.clone();
        let Some((kind, details)) = apply(&mut next, now)? else {
            return Ok(current);
        };
        next.updated_at = now;
        let event = key_event(kind, &next, &caller.name, now, details);
        match state.store.update_key(&next, Some(&event)).await {
            Ok(stored) => {
                tracing::info!(actor = %caller.name, key_id = %id, event = kind.as_str(), "admin change");
                return Ok(stored);
            }
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(store_err(e, Some(id))),
        }
    }
    Err(AdminError::Conflict)
}

/// Deletes the key if the caller may see it; returns the deleted record.
pub async fn delete(
    state: &AdminState,
    caller: &Caller,
    id: &KeyId,
) -> Result<KeyRecord, AdminError> {
    let rec = load_visible(state, caller, id).await?;
    let now = state.clock.now();
    let event = key_event(
        EventType::KeyDeleted,
        &rec,
        &caller.name,
        now,
        json!({"name": rec.name}),
    );
    let deleted = state
        .store
        .delete_key(id, &event)
        .await
        .map_err(|e| store_err(e, Some(id)))?;
    tracing::info!(actor = %caller.name, key_id = %id, "admin change: key deleted");
    deleted.ok_or_else(|| AdminError::KeyNotFound(id.to_string()))
}

/// Revokes for good; a second revoke is 409 `already_revoked`.
pub fn revoke(
    rec: &mut KeyRecord,
    actor: &str,
    reason: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Transition, AdminError> {
    if rec.revoked_at.is_some() {
        return Err(AdminError::AlreadyRevoked);
    }
    rec.revoked_at = Some(now);
    rec.revoked_by = Some(actor.to_owned());
    rec.revocation_reason = reason.map(str::to_owned);
    Ok(Some((EventType::KeyRevoked, json!({"reason": reason}))))
}

/// Suspends; suspending a suspended key changes nothing.
pub fn suspend(
    rec: &mut KeyRecord,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<Transition, AdminError> {
    if rec.revoked_at.is_some() {
        return Err(AdminError::KeyRevoked);
    }
    if rec.suspended_at.is_some() {
        return Ok(None);
    }
    rec.suspended_at = Some(now);
    rec.suspended_by = Some(actor.to_owned());
    Ok(Some((EventType::KeySuspended, json!({}))))
}

/// Lifts a suspension; reinstating a key that is not suspended changes nothing.
pub fn reinstate(rec: &mut KeyRecord) -> Result<Transition, AdminError> {
    if rec.revoked_at.is_some() {
        return Err(AdminError::KeyRevoked);
    }
    if rec.suspended_at.is_none() {
        return Ok(None);
    }
    rec.suspended_at = None;
    rec.suspended_by = None;
    Ok(Some((EventType::KeyReinstated, json!({}))))
}

/// Replaces the secret with `new`; the old one keeps working for `grace`.
pub fn rotate(
    rec: &mut KeyRecord,
    new: &Token,
    prefix: &str,
    grace: Duration,
    now: DateTime<Utc>,
) -> Result<Transition, AdminError> {
    if rec.revoked_at.is_some() {
        return Err(AdminError::KeyRevoked);
    }
    let grace_until =
        super::input::add(now, grace).ok_or_else(|| AdminError::invalid("grace", "is too long"))?;
    rec.retired.push(RetiredSecret {
        hash: rec.token_hash,
        valid_until: grace_until,
    });
    if rec.retired.len() > MAX_RETIRED {
        rec.retired
            .sort_by_key(|r| std::cmp::Reverse(r.valid_until));
        rec.retired.truncate(MAX_RETIRED);
    }
    rec.token_hash = new.hash();
    rec.hint = new.hint(prefix);
    Ok(Some((
        EventType::KeyRotated,
        json!({"grace_until": grace_until}),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Refusal;

    fn record(now: DateTime<Utc>) -> KeyRecord {
        KeyRecord::issue(&Token::generate("kg_"), "kg_", "k", "ops", "ops", now)
    }

    #[test]
    fn revoke_is_final() {
        let now = Utc::now();
        let mut r = record(now);
        let (kind, details) = revoke(&mut r, "ops", Some("leaked"), now).unwrap().unwrap();
        assert_eq!(kind, EventType::KeyRevoked);
        assert_eq!(details["reason"], "leaked");
        assert_eq!(r.revocation_reason.as_deref(), Some("leaked"));
        assert_eq!(
            revoke(&mut r, "ops", None, now),
            Err(AdminError::AlreadyRevoked)
        );
        assert_eq!(suspend(&mut r, "ops", now), Err(AdminError::KeyRevoked));
        assert_eq!(reinstate(&mut r), Err(AdminError::KeyRevoked));
        let t = Token::generate("kg_");
        assert_eq!(
            rotate(&mut r, &t, "kg_", Duration::ZERO, now),
            Err(AdminError::KeyRevoked)
        );
    }

    #[test]
    fn suspend_and_reinstate_are_idempotent() {
        let now = Utc::now();
        let mut r = record(now);
        assert_eq!(reinstate(&mut r), Ok(None));
        assert!(suspend(&mut r, "ops", now).unwrap().is_some());
        assert_eq!(r.suspended_by.as_deref(), Some("ops"));
        assert_eq!(suspend(&mut r, "ops", now), Ok(None));
        assert!(reinstate(&mut r).unwrap().is_some());
        assert!(r.suspended_at.is_none());
    }

    #[test]
    fn rotation_retires_the_old_secret_for_the_grace() {
        let now = Utc::now();
        let mut r = record(now);
        let old = r.token_hash;
        let new = Token::generate("kg_");
        rotate(&mut r, &new, "kg_", Duration::from_secs(3600), now).unwrap();
        assert_eq!(r.token_hash, new.hash());
        assert_eq!(r.check(&old, now), Ok(()));
        assert_eq!(
            r.check(&old, now + chrono::Duration::hours(1)),
            Err(Refusal::Rotated)
        );
        let newer = Token::generate("kg_");
        rotate(&mut r, &newer, "kg_", Duration::ZERO, now).unwrap();
        assert_eq!(r.check(&new.hash(), now), Err(Refusal::Rotated));
        for _ in 0..20 {
            rotate(&mut r, &Token::generate("kg_"), "kg_", Duration::ZERO, now).unwrap();
        }
        assert_eq!(r.retired.len(), MAX_RETIRED);
    }
}
