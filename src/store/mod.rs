//! Durable storage of key records, events, settings and usage.
//!
//! [`KeyStore`] is the one interface the rest of keygate uses; two backends
//! implement it: [`embedded`] (a redb file, the default) and [`redis`] (shared by
//! several instances). Every write is committed before the call returns, and every
//! write that changes what the data plane must answer publishes an
//! [`Invalidation`] so caches on every instance drop what they hold.
//!
//! Updates are optimistic: a record carries a `version`; [`KeyStore::update_key`]
//! fails with [`StoreError::Conflict`] when the stored version moved, and the
//! caller re-reads and retries.

pub mod embedded;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::keys::{KeyId, KeyRecord, KeyStatus, Scope, TokenHash};

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed; the data plane fails closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The record changed since it was read (optimistic concurrency).
    #[error("the record was changed concurrently")]
    Conflict,
    /// The owner already holds `limit` keys.
    #[error("owner {owner:?} already has {limit} keys")]
    OwnerLimit { owner: String, limit: u32 },
    /// A record with this id or token hash already exists.
    #[error("a key with this id or secret already exists")]
    Duplicate,
    #[error("key not found")]
    NotFound,
    /// Stored data could not be decoded; never expected, reported loudly.
    #[error("corrupt record in store: {0}")]
    Corrupt(String),
}

/// What caches must drop after a write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Invalidation {
    /// These token hashes map to changed (or deleted) records.
    Keys(Vec<TokenHash>),
    /// Settings (for example the kill switch) changed.
    Settings,
    /// Anything may have changed (for example after a pub/sub reconnect).
    All,
}

/// Types of audit events (DESIGN.md section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
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

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::KeyCreated => "key.created",
            EventType::KeyUpdated => "key.updated",
            EventType::KeyRevoked => "key.revoked",
            EventType::KeySuspended => "key.suspended",
            EventType::KeyReinstated => "key.reinstated",
            EventType::KeyRotated => "key.rotated",
            EventType::KeyDeleted => "key.deleted",
            EventType::KeyExpiring => "key.expiring",
            EventType::KeyExpired => "key.expired",
            EventType::KeyPurged => "key.purged",
            EventType::SettingsUpdated => "settings.updated",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// An audit event: `{id, at, type, key_id, actor, details}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `evt_` + ULID; ULIDs sort by time, so ids order events.
    pub id: String,
    pub at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub key_id: Option<KeyId>,
    pub actor: String,
    pub details: serde_json::Value,
}

impl Event {
    pub fn new(
        kind: EventType,
        key_id: Option<KeyId>,
        actor: &str,
        at: DateTime<Utc>,
        details: serde_json::Value,
    ) -> Event {
        let ulid = ulid::Ulid::from_datetime(at.into());
        Event {
            id: format!("evt_{ulid}"),
            at,
            kind,
            key_id,
            actor: actor.to_owned(),
            details,
        }
    }
}

/// Settings shared by every instance (kept in the store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub api_keys_enabled: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            api_keys_enabled: true,
        }
    }
}

/// Filters for listing keys. All given filters must match.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Case-insensitive substring of name, id or owner.
    pub q: Option<String>,
    pub status: Option<KeyStatus>,
    pub owner: Option<String>,
    pub scope: Option<Scope>,
    /// Keys (not yet expired) whose `expires_at` falls within this much of now.
    pub expiring_within: Option<Duration>,
    /// Page size, 1..=1000.
    pub limit: usize,
    /// Resume after this key id (keys are listed in id, i.e. creation, order).
    pub after: Option<KeyId>,
}

impl ListFilter {
    /// Whether `rec` passes every filter at `now`. Backends may pre-filter with
    /// indexes but must agree with this.
    pub fn matches(&self, rec: &KeyRecord, now: DateTime<Utc>) -> bool {
        if let Some(owner) = &self.owner
            && &rec.owner != owner
        {
            return false;
        }
        if let Some(status) = self.status
            && rec.status(now) != status
        {
            return false;
        }
        if let Some(scope) = &self.scope
            && !rec.has_scope(scope)
        {
            return false;
        }
        if let Some(within) = self.expiring_within {
            let horizon =
                now + chrono::Duration::from_std(within).unwrap_or(chrono::TimeDelta::MAX);
            match rec.expires_at {
                Some(e) if e > now && e <= horizon => {}
                _ => return false,
            }
        }
        if let Some(q) = &self.q {
            let q = q.to_lowercase();
            let hit = rec.name.to_lowercase().contains(&q)
                || rec.id.as_str().to_lowercase().contains(&q)
                || rec.owner.to_lowercase().contains(&q);
            if !hit {
                return false;
            }
        }
        true
    }
}

/// Filters for listing events, newest last (in id order).
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub key_id: Option<KeyId>,
    pub kind: Option<EventType>,
    /// Only events strictly after this event id.
    pub after: Option<String>,
    pub limit: usize,
}

impl EventFilter {
    pub fn matches(&self, ev: &Event) -> bool {
        self.key_id
            .as_ref()
            .is_none_or(|k| ev.key_id.as_ref() == Some(k))
            && self.kind.is_none_or(|t| ev.kind == t)
    }
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Usage counted on the request path and flushed in batches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// A batch entry: counts for one key in one hour, and the latest use seen.
#[derive(Clone, Debug)]
pub struct UsageDelta {
    pub key_id: KeyId,
    /// Start of the hour (UTC) the counts belong to.
    pub hour: DateTime<Utc>,
    pub counts: UsageCounts,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Stored hourly usage of one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageHour {
    pub hour: DateTime<Utc>,
    #[serde(flatten)]
    pub counts: UsageCounts,
}

/// The storage interface. Implementations must be safe to share between tasks.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new record and its `key.created` event atomically, refusing when
    /// the owner already holds `max_per_owner` keys (checked atomically).
    async fn create_key(
        &self,
        rec: &KeyRecord,
        max_per_owner: u32,
        event: &Event,
    ) -> Result<(), StoreError>;

    /// Finds the record indexed by `hash` (current or retired secret).
    async fn get_by_hash(&self, hash: &TokenHash) -> Result<Option<KeyRecord>, StoreError>;

    async fn get_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Lists records in id order that match `filter`, at most `filter.limit`.
    async fn list_keys(
        &self,
        filter: &ListFilter,
        now: DateTime<Utc>,
    ) -> Result<Page<KeyRecord>, StoreError>;

    /// Replaces the record whose stored version equals `rec.version`, storing it
    /// with version + 1, re-indexing its hashes, and appending `event` (if any)
    /// atomically. Returns the stored record.
    async fn update_key(
        &self,
        rec: &KeyRecord,
        event: Option<&Event>,
    ) -> Result<KeyRecord, StoreError>;

    /// Deletes the record, its indexes and usage; appends `event` atomically.
    /// Returns the deleted record, or `None` if there was none.
    async fn delete_key(&self, id: &KeyId, event: &Event) -> Result<Option<KeyRecord>, StoreError>;

    /// Number of keys `owner` holds.
    async fn count_owner(&self, owner: &str) -> Result<u64, StoreError>;

    async fn append_event(&self, event: &Event) -> Result<(), StoreError>;

    async fn list_events(&self, filter: &EventFilter) -> Result<Page<Event>, StoreError>;

    /// Drops events older than `before`; returns how many were dropped.
    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    async fn get_settings(&self) -> Result<Settings, StoreError>;

    /// Stores settings and the `settings.updated` event, and publishes
    /// [`Invalidation::Settings`].
    async fn put_settings(&self, settings: &Settings, event: &Event) -> Result<(), StoreError>;

    /// Adds a batch of usage counts and advances `last_used_at` (never backwards).
    /// Does not publish invalidations: usage never changes an auth decision.
    async fn flush_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError>;

    /// Hourly usage of a key from `since` on, oldest first.
    async fn usage(&self, id: &KeyId, since: DateTime<Utc>) -> Result<Vec<UsageHour>, StoreError>;

    /// Takes or renews the leader lock for `holder` for `ttl`; true if held.
    async fn try_lead(&self, holder: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Invalidations caused by writes from this and (for shared backends) every
    /// other instance.
    fn subscribe(&self) -> broadcast::Receiver<Invalidation>;
}

/// A shared handle to whichever backend the config chose.
pub type SharedStore = Arc<dyn KeyStore>;

/// Largest page a backend returns, whatever `limit` asks for.
pub const MAX_PAGE: usize = 1000;

/// Capacity of each backend's local invalidation channel. A subscriber that falls
/// further behind gets `RecvError::Lagged` and must flush its whole cache.
pub const INVALIDATION_CAPACITY: usize = 1024;

/// Start of the UTC hour containing `t`, as Unix seconds (the usage bucket key).
pub(crate) fn hour_start(t: DateTime<Utc>) -> i64 {
    let s = t.timestamp();
    s - s.rem_euclid(3600)
}

/// Event-id bounds for pruning events older than `before`: ids below the first
/// bound are from earlier milliseconds (all go); ids in `[first, second)` share
/// `before`'s millisecond and need their exact `at` compared. `None` when
/// `before` is before 1970 (nothing to prune).
pub(crate) fn event_prune_bounds(before: DateTime<Utc>) -> Option<(String, String)> {
    let ms = u64::try_from(before.timestamp_millis()).ok()?;
    let bound = |ms: u64| format!("evt_{}", ulid::Ulid::from_parts(ms, 0));
    Some((bound(ms), bound(ms.saturating_add(1))))
}

/// Collects one page of a listing: up to `limit` (clamped to 1..=[`MAX_PAGE`])
/// matching items, noting whether one more match exists, so that `next` is
/// `None` exactly when nothing further matches (no duplicates or gaps).
pub(crate) struct Collector<T> {
    items: Vec<T>,
    limit: usize,
    more: bool,
}

impl<T> Collector<T> {
    pub(crate) fn new(limit: usize) -> Self {
        Collector {
            items: Vec::new(),
            limit: limit.clamp(1, MAX_PAGE),
            more: false,
        }
    }

    /// Offers a matching item; returns false once the page is full and one more
    /// match was seen, so the scan can stop.
    pub(crate) fn offer(&mut self, item: T) -> bool {
        if self.items.len() == self.limit {
            self.more = true;
            false
        } else {
            self.items.push(item);
            true
        }
    }

    /// The page, with `next` set to `key` of the last item when more match.
    pub(crate) fn page(self, key: impl Fn(&T) -> String) -> Page<T> {
        let next = if self.more {
            self.items.last().map(&key)
        } else {
            None
        };
        Page {
            items: self.items,
            next,
        }
    }
}
