//! One pass of the lifecycle jobs (DESIGN.md section 6): expiry notices,
//! expired markers, purges and event pruning.
//!
//! A pass scans the keys in id order, one page at a time, and decides for each
//! key with [`due`] what (if anything) is due at `now`:
//!
//! 1. expired more than `keys.purge_expired_after` ago: delete it with a
//!    `key.purged` event (whatever its status: an expired key can never be used
//!    again);
//! 2. expired and not yet marked: set `expired_recorded_at` with a `key.expired`
//!    event (not for revoked keys, whose status stays `revoked`);
//! 3. expiring within `keys.expiry_notice` and not yet notified: set
//!    `expiry_notified_at` with a `key.expiring` event (not for revoked keys).
//!
//! The marker and its event are written by one [`KeyStore::update_key`] call,
//! which checks the record's version: when two instances (or a pass and an
//! admin change) race, exactly one write succeeds, and only the caller whose
//! write succeeded gets the event back to deliver as a webhook. A loser re-reads
//! the key and finds nothing left to do. That makes each notice exactly-once,
//! across restarts and instances, because the marker is durable. A purge is a
//! `delete_key`, which records its event only when it found the key.
//!
//! One scan serves all three checks (the backends scan every record for any
//! filter, so separate filtered scans would cost more). The work per pass is
//! bounded by [`MAX_ACTIONS`] writes and a time budget; a pass that stops early
//! leaves a cursor and the next pass resumes there.
//!
//! [`KeyStore::update_key`]: crate::store::KeyStore::update_key

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::keys::{KeyId, KeyRecord, KeyView};
use crate::store::{Event, EventType, ListFilter, SharedStore, StoreError};

/// The `actor` of events the lifecycle jobs record.
pub const ACTOR: &str = "keygate";
/// How long events are kept (DESIGN.md section 5: at least 90 days).
pub const EVENT_RETENTION: Duration = Duration::from_secs(90 * 86_400);
/// Writes (notices, markers, purges) per pass at most.
pub const MAX_ACTIONS: usize = 500;
/// Keys read per page.
const PAGE: usize = 500;
/// Attempts per key when concurrent writes keep moving its version.
const ATTEMPTS: usize = 5;

/// What is due for a key at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    Notice,
    Expired,
    Purge,
}

/// The policy knobs a pass applies (read from the live config each pass).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub expiry_notice: Duration,
    pub purge_expired_after: Duration,
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub notified: usize,
    pub expired: usize,
    pub purged: usize,
    pub pruned_events: u64,
    /// Keys read.
    pub scanned: usize,
    /// False when the pass stopped at its budget; the next one resumes.
    pub complete: bool,
}

/// The lifecycle step due for `rec` at `now`, if any.
pub fn due(rec: &KeyRecord, now: DateTime<Utc>, policy: &Policy) -> Option<Due> {
    let expires = rec.expires_at?;
    let purge_at = expires + to_chrono(policy.purge_expired_after);
    if purge_at <= now {
        return Some(Due::Purge);
    }
    if rec.revoked_at.is_some() {
        return None;
    }
    if expires <= now {
        return rec.expired_recorded_at.is_none().then_some(Due::Expired);
    }
    let notice_from = expires - to_chrono(policy.expiry_notice);
    (notice_from <= now && rec.expiry_notified_at.is_none()).then_some(Due::Notice)
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// An event about `rec` recorded by the lifecycle jobs.
fn key_event(kind: EventType, rec: &KeyRecord, now: DateTime<Utc>, extra: Value) -> Event {
    let mut details = match extra {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    details.insert("owner".into(), Value::String(rec.owner.clone()));
    details.insert("expires_at".into(), json!(rec.expires_at));
    Event::new(kind, Some(rec.id), ACTOR, now, Value::Object(details))
}

/// Scans keys from `resume` on and applies what is due, handing each recorded
/// event (with the key it is about) to `recorded` at once, so a store failure
/// later in the pass cannot lose the webhook of an event already written.
/// Returns the report and where to resume when it stopped early.
pub async fn run(
    store: &SharedStore,
    policy: Policy,
    now: DateTime<Utc>,
    resume: Option<KeyId>,
    time_budget: Duration,
    recorded: &mut (dyn FnMut(Event, KeyView) + Send),
) -> Result<(PassReport, Option<KeyId>), StoreError> {
    let started = tokio::time::Instant::now();
    let mut report = PassReport::default();
    let mut after = resume;
    let mut actions = 0usize;
    loop {
        let filter = ListFilter {
            limit: PAGE,
            after,
            ..ListFilter::default()
        };
        let page = store.list_keys(&filter, now).await?;
        for rec in page.items {
            report.scanned += 1;
            if due(&rec, now, &policy).is_some() {
                if actions >= MAX_ACTIONS || started.elapsed() >= time_budget {
                    return Ok((report, after));
                }
                actions += 1;
                if let Some((kind, event, view)) = settle(store, rec.clone(), now, &policy).await? {
                    match kind {
                        Due::Notice => report.notified += 1,
                        Due::Expired => report.expired += 1,
                        Due::Purge => report.purged += 1,
                    }
                    metrics::counter!("keygate_lifecycle_events_total", "type" => event.kind.as_str())
                        .increment(1);
                    tracing::info!(key_id = %event.key_id.as_ref().map(KeyId::text).as_deref().unwrap_or(""),
                        event = event.kind.as_str(), "lifecycle event recorded");
                    recorded(event, view);
                }
            }
            after = Some(rec.id);
        }
        match page.next {
            Some(_) => continue,
            None => break,
        }
    }
    let before = now - to_chrono(EVENT_RETENTION);
    report.pruned_events = store.prune_events(before).await?;
    report.complete = true;
    Ok((report, None))
}

/// Applies what is due for one key, re-reading it when a concurrent write
/// moved its version. Returns the step taken and its event, or `None` when
/// nothing was (left) to do.
async fn settle(
    store: &SharedStore,
    mut rec: KeyRecord,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Result<Option<(Due, Event, KeyView)>, StoreError> {
    for _ in 0..ATTEMPTS {
        let Some(step) = due(&rec, now, policy) else {
            return Ok(None);
        };
        let mut next = rec.clone();
        let event = match step {
            Due::Purge => {
                let extra =
                    json!({ "purge_expired_after_secs": policy.purge_expired_after.as_secs() });
                let event = key_event(EventType::KeyPurged, &rec, now, extra);
                return Ok(store
                    .delete_key(&rec.id, &event)
                    .await?
                    .map(|gone| (step, event, gone.view(now))));
            }
            Due::Expired => {
                next.expired_recorded_at = Some(now);
                key_event(EventType::KeyExpired, &rec, now, json!({}))
            }
            Due::Notice => {
                next.expiry_notified_at = Some(now);
                let extra = json!({ "expiry_notice_secs": policy.expiry_notice.as_secs() });
                key_event(EventType::KeyExpiring, &rec, now, extra)
            }
        };
        match store.update_key(&next, Some(&event)).await {
            Ok(stored) => return Ok(Some((step, event, stored.view(now)))),
            Err(StoreError::Conflict) => match store.get_by_id(&rec.id).await? {
                Some(fresh) => rec = fresh,
                None => return Ok(None),
            },
            Err(StoreError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    tracing::warn!(key_id = %rec.id, "lifecycle step skipped: the key kept changing; retrying next pass");
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Token;

    fn rec(now: DateTime<Utc>, expires_in: chrono::Duration) -> KeyRecord {
        let mut r = KeyRecord::issue(&Token::generate("kg_"), "kg_", "k", "ops", "ops", now);
        r.expires_at = Some(now + expires_in);
        r
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn policy() -> Policy {
        Policy {
            expiry_notice: 30 * DAY,
            purge_expired_after: 90 * DAY,
        }
    }

    #[test]
    fn what_is_due_when() {
        let now = Utc::now();
        let d = chrono::Duration::days;
        let p = policy();
        assert_eq!(due(&rec(now, d(31)), now, &p), None);
        assert_eq!(due(&rec(now, d(30)), now, &p), Some(Due::Notice));
        assert_eq!(due(&rec(now, d(1)), now, &p), Some(Due::Notice));
        assert_eq!(due(&rec(now, d(0)), now, &p), Some(Due::Expired));
        assert_eq!(due(&rec(now, -d(89)), now, &p), Some(Due::Expired));
        assert_eq!(due(&rec(now, -d(90)), now, &p), Some(Due::Purge));

        let mut r = rec(now, d(1));
        r.expiry_notified_at = Some(now);
        assert_eq!(due(&r, now, &p), None);
        let mut r = rec(now, -d(1));
        r.expired_recorded_at = Some(now);
        assert_eq!(due(&r, now, &p), None);
        let mut r = rec(now, -d(1));
        r.expires_at = None;
        assert_eq!(due(&r, now, &p), None);
    }

    #[test]
    fn revoked_keys_get_no_notice_but_are_purged() {
        let now = Utc::now();
        let d = chrono::Duration::days;
        let p = policy();
        for offset in [d(1), -d(1)] {
            let mut r = rec(now, offset);
            r.revoked_at = Some(now);
            assert_eq!(due(&r, now, &p), None);
        }
        let mut r = rec(now, -d(91));
        r.revoked_at = Some(now);
        assert_eq!(due(&r, now, &p), Some(Due::Purge));
    }
}
