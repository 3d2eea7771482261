//! Durable storage of key records, events, settings and usage.
//!
//! [`KeyStore`] is the one interface the rest of keygate uses; two backends
//! implement it: [`embedded`] (a redb file, the default) and [`redis`] (shared by
//! several instances, on one Redis server or a Redis Cluster: [`redis_conn`]).
//! Every write is committed before the call returns, and every write that
//! changes what the data plane must answer publishes an [`Invalidation`] so
//! caches on every instance drop what they hold.
//!
//! Updates are optimistic: a record carries a `version`; [`KeyStore::update_key`]
//! fails with [`StoreError::Conflict`] when the stored version moved, and the
//! caller re-reads and retries.

pub mod embedded;
pub mod metered;
pub mod redis;
pub mod redis_conn;

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::IgnoredAny;
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
        let ulid = crate::keys::EVENT_IDS.at(Some(at.into()));
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
        self.matches_fields(
            &Listed {
                id: rec.id.text().as_str(),
                name: &rec.name,
                owner: &rec.owner,
                has_scope: &|s| rec.scopes.iter().any(|x| x.as_str() == s),
                expires_at: rec.expires_at,
                revoked: rec.revoked_at.is_some(),
                suspended: rec.suspended_at.is_some(),
            },
            now,
        )
    }

    /// [`ListFilter::matches`] on a record's [`ListProbe`]: the same answer
    /// without decoding the whole record.
    pub(crate) fn matches_probe(&self, p: &ListProbe<'_>, now: DateTime<Utc>) -> bool {
        self.matches_fields(
            &Listed {
                id: &p.id,
                name: &p.name,
                owner: &p.owner,
                has_scope: &|s| p.scopes.iter().any(|x| x == s),
                expires_at: p.expires_at,
                revoked: p.revoked_at.is_some(),
                suspended: p.suspended_at.is_some(),
            },
            now,
        )
    }

    fn matches_fields(&self, rec: &Listed<'_>, now: DateTime<Utc>) -> bool {
        if let Some(owner) = &self.owner
            && rec.owner != owner
        {
            return false;
        }
        if let Some(status) = self.status
            && KeyStatus::at(rec.revoked, rec.suspended, rec.expires_at, now) != status
        {
            return false;
        }
        if let Some(scope) = &self.scope
            && !(rec.has_scope)(scope.as_str())
        {
            return false;
        }
        if let Some(within) = self.expiring_within {
            let horizon = chrono::Duration::from_std(within)
                .ok()
                .and_then(|d| now.checked_add_signed(d));
            match rec.expires_at {
                Some(e) if e > now && horizon.is_none_or(|h| e <= h) => {}
                _ => return false,
            }
        }
        if let Some(q) = &self.q {
            let hit = [rec.name, rec.id, rec.owner]
                .iter()
                .any(|field| contains_ignoring_case(field, q));
            if !hit {
                return false;
            }
        }
        true
    }
}

/// What a [`ListFilter`] looks at in a record.
struct Listed<'a> {
    id: &'a str,
    name: &'a str,
    owner: &'a str,
    has_scope: &'a dyn Fn(&str) -> bool,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    suspended: bool,
}

/// Whether `hay` contains `q` ignoring case, as comparing their
/// `to_lowercase` forms would say, without allocating when both are ASCII
/// (where that is exactly ASCII case folding).
fn contains_ignoring_case(hay: &str, q: &str) -> bool {
    if hay.is_ascii() && q.is_ascii() {
        let (hay, q) = (hay.as_bytes(), q.as_bytes());
        q.is_empty() || hay.windows(q.len()).any(|w| w.eq_ignore_ascii_case(q))
    } else {
        hay.to_lowercase().contains(&q.to_lowercase())
    }
}

/// The fields of a stored [`KeyRecord`]'s JSON that a [`ListFilter`] reads,
/// decoded without building the record: strings are borrowed from the JSON
/// (unless escaped) and every other field is skipped. Most records a filtered
/// scan reads do not match, and decoding each whole costs several times more.
#[derive(Deserialize)]
pub(crate) struct ListProbe<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    owner: Cow<'a, str>,
    #[serde(borrow, default)]
    scopes: Vec<Cow<'a, str>>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    revoked_at: Option<IgnoredAny>,
    #[serde(default)]
    suspended_at: Option<IgnoredAny>,
}

impl<'a> ListProbe<'a> {
    /// Reads the probe from a stored record's JSON.
    pub(crate) fn of(json: &'a [u8]) -> Result<ListProbe<'a>, StoreError> {
        serde_json::from_slice(json).map_err(|e| StoreError::Corrupt(format!("key record: {e}")))
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

    /// The count of invalidations [`KeyStore::subscribe`] has carried, when the
    /// backend keeps one ([`InvalidationBus`]): a cache compares it with what
    /// it applied instead of locking its receiver on every request.
    fn invalidations_sent(&self) -> Option<Arc<AtomicU64>> {
        None
    }
}

/// The channel that carries [`Invalidation`]s to this process's caches, with
/// a count of the messages sent.
#[derive(Clone)]
pub struct InvalidationBus {
    tx: broadcast::Sender<Invalidation>,
    sent: Arc<AtomicU64>,
}

impl Default for InvalidationBus {
    fn default() -> InvalidationBus {
        let (tx, _) = broadcast::channel(INVALIDATION_CAPACITY);
        InvalidationBus {
            tx,
            sent: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl InvalidationBus {
    /// Delivers `inv` to every subscriber. The count goes up after the send,
    /// so whoever sees the new count finds the message in its receiver.
    pub fn send(&self, inv: Invalidation) {
        // An error only means nobody is subscribed, so nothing is cached to drop.
        if self.tx.send(inv).is_err() {
            tracing::trace!("invalidation sent with no subscribers");
        }
        self.sent.fetch_add(1, Ordering::Release);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.tx.subscribe()
    }

    pub fn sent(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }
}

/// A shared handle to whichever backend the config chose.
pub type SharedStore = Arc<dyn KeyStore>;

/// Largest page a backend returns, whatever `limit` asks for.
pub const MAX_PAGE: usize = 1000;

/// Most records one [`KeyStore::list_keys`] call examines. Paging without
/// filters or by owner reads through an index and never gets near it; a
/// filter that few keys match (a search, a rare status) would otherwise read
/// every record to fill one page. Past the budget the call answers the
/// matches found so far (maybe none) with `next` set to the last record it
/// examined, so each call costs a bounded time and the caller follows `next`
/// as for any page. Examining 2,000 records takes about 8 ms on the embedded
/// store and 13 ms on Redis (release build, 2 vCPU; BENCHMARKS.md, "Admin
/// API: listing 100,000 keys"), so one call stays well under 50 ms.
pub const SCAN_BUDGET: usize = 2_000;

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
///
/// A scan that calls [`Collector::examine`] for every record it reads stops
/// after `budget` records ([`SCAN_BUDGET`]); `next` is then the last record
/// examined, whether it matched or not.
pub(crate) struct Collector<T> {
    items: Vec<T>,
    limit: usize,
    more: bool,
    budget: usize,
    examined: usize,
    /// The record that spent the budget, while it is not known whether
    /// another one follows.
    spent_at: Option<String>,
    /// Where the next page starts when the budget ended this one.
    resume: Option<String>,
}

impl<T> Collector<T> {
    pub(crate) fn new(limit: usize) -> Self {
        Collector::with_budget(limit, SCAN_BUDGET)
    }

    pub(crate) fn with_budget(limit: usize, budget: usize) -> Self {
        Collector {
            items: Vec::new(),
            limit: limit.clamp(1, MAX_PAGE),
            more: false,
            budget: budget.max(1),
            examined: 0,
            spent_at: None,
            resume: None,
        }
    }

    /// Counts the record `id` as read; returns false (and the scan must
    /// stop before looking at it) when the budget is already spent, so the
    /// page ends after the previous record.
    pub(crate) fn examine(&mut self, id: &str) -> bool {
        if let Some(last) = self.spent_at.take() {
            self.resume = Some(last);
            return false;
        }
        self.examined += 1;
        if self.examined == self.budget {
            self.spent_at = Some(id.to_owned());
        }
        true
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

    /// The page, with `next` set to `key` of the last item when more match,
    /// or to the last record examined when the budget ended the scan.
    pub(crate) fn page(self, key: impl Fn(&T) -> String) -> Page<T> {
        let next = if self.more {
            self.items.last().map(&key)
        } else {
            self.resume
        };
        Page {
            items: self.items,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One call of a scan over `ids` (sorted) after `after`.
    fn scan(
        ids: &[String],
        after: Option<&str>,
        matches: impl Fn(&str) -> bool,
        limit: usize,
        budget: usize,
    ) -> Page<String> {
        let mut out = Collector::with_budget(limit, budget);
        for id in ids
            .iter()
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
        {
            if !out.examine(id) || (matches(id) && !out.offer(id.clone())) {
                break;
            }
        }
        out.page(|s| s.clone())
    }

    #[test]
    fn the_probe_agrees_with_the_record() {
        let now = Utc::now();
        let day = chrono::Duration::days(1);
        let mut recs = Vec::new();
        for (i, name) in ["Alpha", "beta ÄÖ", "Kelvin \u{212A}ey", "tab\tname"]
            .into_iter()
            .enumerate()
        {
            let t = crate::keys::Token::generate("kg_");
            let owner = ["ops", "Team-B"][i % 2];
            let mut rec = KeyRecord::issue(&t, "kg_", name, owner, "ops", now);
            rec.scopes = vec![Scope::parse("orders:read").unwrap()];
            rec.expires_at = [None, Some(now + day), Some(now - day), Some(now + day * 40)][i];
            recs.push(rec);
        }
        recs[1].revoked_at = Some(now);
        recs[2].suspended_at = Some(now);
        recs[3].scopes.clear();
        let filters = [
            ListFilter::default(),
            ListFilter {
                q: Some("alph".into()),
                ..Default::default()
            },
            ListFilter {
                q: Some("TEAM-b".into()),
                ..Default::default()
            },
            ListFilter {
                q: Some("äö".into()),
                ..Default::default()
            },
            ListFilter {
                q: Some("key".into()),
                ..Default::default()
            },
            ListFilter {
                q: Some("KEY_".into()),
                ..Default::default()
            },
            ListFilter {
                q: Some("\t".into()),
                ..Default::default()
            },
            ListFilter {
                owner: Some("ops".into()),
                ..Default::default()
            },
            ListFilter {
                scope: Some(Scope::parse("orders:read").unwrap()),
                ..Default::default()
            },
            ListFilter {
                expiring_within: Some(Duration::from_secs(7 * 86_400)),
                ..Default::default()
            },
            ListFilter {
                expiring_within: Some(Duration::MAX),
                ..Default::default()
            },
        ];
        let statuses = [
            KeyStatus::Active,
            KeyStatus::Revoked,
            KeyStatus::Suspended,
            KeyStatus::Expired,
        ]
        .map(|s| ListFilter {
            status: Some(s),
            ..Default::default()
        });
        let mut hits = 0;
        for f in filters.iter().chain(&statuses) {
            for rec in &recs {
                let json = serde_json::to_vec(rec).unwrap();
                let probe = ListProbe::of(&json).unwrap();
                let want = f.matches(rec, now);
                assert_eq!(f.matches_probe(&probe, now), want, "{f:?} on {}", rec.name);
                hits += usize::from(want);
            }
        }
        assert!(hits > 10, "the filters match something: {hits}");
        // The Kelvin sign lowercases to an ASCII k: the slow path finds it.
        let kelvin = ListFilter {
            q: Some("key".into()),
            ..Default::default()
        };
        assert!(kelvin.matches(&recs[2], now));
    }

    #[test]
    fn the_scan_budget_ends_a_page_at_the_last_record_examined() {
        let ids: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        let none = scan(&ids, None, |_| false, 5, 3);
        assert!(none.items.is_empty());
        assert_eq!(none.next.as_deref(), Some("k2"));
        // The budget spent exactly on the last record: nothing follows.
        let last = scan(&ids, Some("k6"), |_| false, 5, 3);
        assert_eq!(last.next, None);
        let some = scan(&ids, None, |id| id == "k1", 5, 4);
        assert_eq!(some.items, ["k1"]);
        assert_eq!(some.next.as_deref(), Some("k3"));
        // A full page ends before the budget does.
        let full = scan(&ids, None, |_| true, 2, 4);
        assert_eq!(full.items, ["k0", "k1"]);
        assert_eq!(full.next.as_deref(), Some("k1"));
    }

    #[test]
    fn following_budget_cut_pages_finds_every_match_once() {
        let ids: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
        let matches = |id: &str| id.ends_with('7');
        for (limit, budget) in [(1, 1), (3, 7), (5, 50), (1000, 10)] {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            let mut calls = 0;
            loop {
                let page = scan(&ids, after.as_deref(), matches, limit, budget);
                calls += 1;
                assert!(page.items.len() <= limit);
                seen.extend(page.items);
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
                assert!(calls <= ids.len(), "the cursor does not advance");
            }
            let want: Vec<String> = ids.iter().filter(|i| matches(i)).cloned().collect();
            assert_eq!(seen, want, "limit {limit}, budget {budget}");
        }
    }
}
