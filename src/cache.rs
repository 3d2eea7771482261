//! The cache of verified keys, in front of the store.
//!
//! A bounded map keyed by token hash holds positive entries (a [`CachedKey`]:
//! what the request path reads of a key record) and negative entries
//! (unknown hashes). A positive entry is fresh for `cache.ttl`; after that it
//! is reloaded, but if the store fails it may still be served up to
//! `cache.stale_if_error` longer. Negative entries live `cache.negative_ttl`.
//! An entry's lifetime is fixed when it is stored; past it the entry counts
//! as absent (it is replaced by the next load, or evicted).
//!
//! Loads are single-flight: the first lookup of a missing or stale hash puts
//! a placeholder in its place and reads the store; lookups of the same hash
//! meanwhile wait for it and then take what it stored, so a thousand
//! concurrent requests for one uncached key make one read.
//!
//! Invalidations from the store (local writes at once, other instances' over
//! pub/sub) are applied before every keyed request ([`KeyCache::sync`]) and by
//! a background task. A generation counter closes the race between a load in
//! flight and an invalidation: a load that saw the generation move re-reads.
//!
//! Memory (issue 9; BENCHMARKS.md, `cargo bench --bench memory`): a cached
//! key costs about 220 bytes all told (it cost 2,100 with moka and the whole
//! record), so a million fit in 260 MB with the embedded store. The map is
//! [`quick_cache`] (CLOCK-PRO eviction over a slab: about 80 bytes of
//! bookkeeping per entry, where moka's deques, timer wheel and per-entry
//! `Arc`s cost about 300), and a cached key holds only what a request reads:
//! the status as two flags and two timestamps, the standing of the one secret
//! it was loaded by, the scopes (one shared copy per distinct list), and the
//! identity header texts in one string. The identity headers are made from
//! those texts per request (a copy each) rather than kept as five
//! `HeaderValue`s per key.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::HeaderValue;
use quick_cache::UnitWeighter;
use quick_cache::sync::{DefaultLifecycle, EntryAction, EntryResult, PlaceholderGuard};
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::config::CacheConfig;
use crate::keys::{Access, KeyId, KeyRecord, RateLimitSpec, Refusal, Scope, TokenHash, unix_nanos};
use crate::store::{Invalidation, SharedStore, StoreError};

/// A verified key as the data plane uses it: what a request reads of the key
/// record, for the one secret (token hash) it was loaded by.
#[derive(Debug)]
pub struct CachedKey {
    id: KeyId,
    /// The header texts of the name and of the owner, back to back, then the
    /// owner itself when its header text differs (percent-encoded).
    text: Box<str>,
    /// Where the owner's header text starts and ends in `text`.
    owner_at: u32,
    owner_end: u32,
    scopes: Arc<ScopeSet>,
    access: Access,
    revoked: bool,
    suspended: bool,
    rate_limit: Option<RateLimitSpec>,
    /// `expires_at` in [`nanos`]; [`NEVER`] when the key has none.
    expires: i64,
    /// Until when the secret this entry was loaded by may be used, in
    /// [`nanos`]: [`NEVER`] for the key's current secret, the end of the
    /// grace for a secret retired by a rotation, [`i64::MIN`] for a hash the
    /// record no longer lists.
    secret_until: i64,
    /// When the record was read, in nanoseconds since the cache's epoch.
    fetched: u64,
}

/// "No end" for [`CachedKey`]'s timestamps.
const NEVER: i64 = i64::MAX;

impl CachedKey {
    /// The data-plane form of `rec`, loaded by the secret with `hash`.
    fn new(rec: KeyRecord, hash: &TokenHash, scopes: Arc<ScopeSet>, fetched: u64) -> CachedKey {
        let name = header_text(&rec.name);
        let owner = header_text(&rec.owner);
        let raw_owner = match owner {
            Cow::Borrowed(_) => "",
            Cow::Owned(_) => rec.owner.as_str(),
        };
        let mut text = String::with_capacity(name.len() + owner.len() + raw_owner.len());
        text.push_str(&name);
        let owner_at = text.len();
        text.push_str(&owner);
        let owner_end = text.len();
        text.push_str(raw_owner);
        // Names and owners are bounded far below 4 GiB by the admin API.
        let offset = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let secret_until = if rec.token_hash.ct_eq(hash) {
            NEVER
        } else {
            match rec.retired.iter().find(|r| r.hash.ct_eq(hash)) {
                Some(r) => unix_nanos(r.valid_until),
                None => i64::MIN,
            }
        };
        CachedKey {
            id: rec.id,
            text: text.into_boxed_str(),
            owner_at: offset(owner_at),
            owner_end: offset(owner_end),
            scopes,
            access: rec.access,
            revoked: rec.revoked_at.is_some(),
            suspended: rec.suspended_at.is_some(),
            rate_limit: rec.rate_limit,
            expires: rec.expires_at.map_or(NEVER, unix_nanos),
            secret_until,
            fetched,
        }
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// The owner, as stored.
    pub fn owner(&self) -> &str {
        // Every offset was taken at a boundary of pushed `&str`s.
        let (at, end) = (self.owner_at as usize, self.owner_end as usize);
        match self.text.get(end..) {
            Some(raw) if !raw.is_empty() => raw,
            _ => self.text.get(at..end).unwrap_or_default(),
        }
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// The key's own rate limit, if it has one.
    pub fn rate_limit(&self) -> Option<RateLimitSpec> {
        self.rate_limit
    }

    pub fn has_scope(&self, scope: &Scope) -> bool {
        self.scopes.scopes.iter().any(|s| s == scope)
    }

    /// Whether the secret this entry was loaded by may be used at `now`
    /// (nanoseconds since the epoch, [`crate::keys::Clock::now_nanos`]): the
    /// status rule of [`KeyRecord::check`], first that applies: revoked,
    /// suspended, expired, then a retired secret whose grace has ended.
    pub fn check(&self, now: i64) -> Result<(), Refusal> {
        if self.revoked {
            Err(Refusal::Revoked)
        } else if self.suspended {
            Err(Refusal::Suspended)
        } else if self.expires != NEVER && self.expires <= now {
            Err(Refusal::Expired)
        } else if self.secret_until != NEVER && self.secret_until <= now {
            Err(Refusal::Rotated)
        } else {
            Ok(())
        }
    }

    /// `X-Keygate-Key-Id`.
    pub fn key_id_header(&self) -> HeaderValue {
        header_value(self.id.text().as_str())
    }

    /// `X-Keygate-Key-Name` (see [`text_header`]).
    pub fn name_header(&self) -> HeaderValue {
        header_value(self.text.get(..self.owner_at as usize).unwrap_or_default())
    }

    /// `X-Keygate-Owner` (see [`text_header`]).
    pub fn owner_header(&self) -> HeaderValue {
        let (at, end) = (self.owner_at as usize, self.owner_end as usize);
        header_value(self.text.get(at..end).unwrap_or_default())
    }

    /// `X-Keygate-Scopes`: the scopes separated by spaces.
    pub fn scopes_header(&self) -> HeaderValue {
        self.scopes.header.clone()
    }

    /// `X-Keygate-Access`.
    pub fn access_header(&self) -> HeaderValue {
        HeaderValue::from_static(self.access.as_str())
    }
}

/// A header value from text that [`header_text`] made (or a key id, or
/// scopes): visible ASCII and spaces only, so it is always valid.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Makes a header value from user-controlled text (key names, owners):
/// visible ASCII passes as is; anything else, and `%` itself, is percent-encoded
/// (so the value always decodes back to the original).
pub fn text_header(s: &str) -> HeaderValue {
    header_value(&header_text(s))
}

/// The text of [`text_header`]: only visible ASCII and spaces remain.
fn header_text(s: &str) -> Cow<'_, str> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// A list of scopes and its header value, shared by every cached key that
/// holds the same list (a deployment has a handful of lists for its keys):
/// a request clones the value (a reference count) instead of building it.
#[derive(Debug)]
struct ScopeSet {
    scopes: Box<[Scope]>,
    header: HeaderValue,
}

/// The scope lists of the cached keys, each held once.
#[derive(Default)]
struct ScopeSets(Mutex<ScopeSetMap>);

#[derive(Default)]
struct ScopeSetMap {
    sets: HashMap<Box<[Scope]>, Weak<ScopeSet>>,
    /// At this many lists the ones no key holds any more are dropped.
    sweep_at: usize,
}

impl ScopeSets {
    /// The shared copy of `scopes`.
    fn get(&self, scopes: &[Scope]) -> Arc<ScopeSet> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = map.sets.get(scopes).and_then(Weak::upgrade) {
            return set;
        }
        if map.sets.len() >= map.sweep_at {
            map.sets.retain(|_, set| set.strong_count() > 0);
            map.sweep_at = (map.sets.len() * 2).max(64);
        }
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let set = Arc::new(ScopeSet {
            scopes: scopes.into(),
            header: header_value(&names.join(" ")),
        });
        map.sets.insert(scopes.into(), Arc::downgrade(&set));
        set
    }
}

#[derive(Clone, Debug)]
enum Entry {
    /// A key, served until `until` (nanoseconds since the cache's epoch).
    Found { key: Arc<CachedKey>, until: u64 },
    /// No key has this hash, until `until`.
    Missing { until: u64 },
}

impl Entry {
    /// The entry, unless its lifetime ended before `now`.
    fn live(self, now: u64) -> Option<Entry> {
        self.is_live(now).then_some(self)
    }

    fn is_live(&self, now: u64) -> bool {
        let until = match self {
            Entry::Found { until, .. } | Entry::Missing { until } => *until,
        };
        now < until
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Found(Arc<CachedKey>),
    NotFound,
}

/// Counters that tests and metrics read.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub negative_hits: AtomicU64,
    pub misses: AtomicU64,
    pub store_reads: AtomicU64,
    pub store_errors: AtomicU64,
    pub stale_served: AtomicU64,
}

/// The cache's durations, changeable while it runs (a config reload): an
/// entry's lifetime is fixed when it is stored, freshness is checked against
/// the current `ttl` on every lookup.
#[derive(Debug)]
struct Times {
    ttl: AtomicU64,
    negative_ttl: AtomicU64,
    stale_if_error: AtomicU64,
}

impl Times {
    fn new(cfg: &CacheConfig) -> Times {
        let t = Times {
            ttl: AtomicU64::new(0),
            negative_ttl: AtomicU64::new(0),
            stale_if_error: AtomicU64::new(0),
        };
        t.set(cfg);
        t
    }

    fn set(&self, cfg: &CacheConfig) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.ttl.store(nanos(cfg.ttl), Ordering::Relaxed);
        self.negative_ttl
            .store(nanos(cfg.negative_ttl), Ordering::Relaxed);
        self.stale_if_error
            .store(nanos(cfg.stale_if_error), Ordering::Relaxed);
    }

    fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl.load(Ordering::Relaxed))
    }

    fn negative_ttl(&self) -> Duration {
        Duration::from_nanos(self.negative_ttl.load(Ordering::Relaxed))
    }

    /// How long a positive entry may be served at all: `ttl` fresh, then up
    /// to `stale_if_error` while the store fails.
    fn stale_limit(&self) -> Duration {
        self.ttl() + Duration::from_nanos(self.stale_if_error.load(Ordering::Relaxed))
    }
}

/// Hashing for maps keyed by [`TokenHash`]: the key already is a SHA-256
/// digest, uniformly distributed and not choosable by a client, so its first
/// eight bytes are as good a hash as SipHash of all 32, at a fraction of the
/// cost on the hot path.
#[derive(Clone, Copy, Debug, Default)]
pub struct DigestHasher;

impl std::hash::BuildHasher for DigestHasher {
    type Hasher = DigestState;
    fn build_hasher(&self) -> DigestState {
        DigestState(0)
    }
}

/// See [`DigestHasher`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DigestState(u64);

impl std::hash::Hasher for DigestState {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
    }
}

type Map = quick_cache::sync::Cache<
    TokenHash,
    Entry,
    UnitWeighter,
    DigestHasher,
    DefaultLifecycle<TokenHash, Entry>,
>;

/// The map's hold on a hash being loaded.
type Placeholder<'a> = PlaceholderGuard<
    'a,
    TokenHash,
    Entry,
    UnitWeighter,
    DigestHasher,
    DefaultLifecycle<TokenHash, Entry>,
>;

/// A load in progress: the placeholder that makes other lookups of the hash
/// wait, and the live entry it replaced. Whatever way the load ends without
/// storing a new entry (an error, a cancelled request), the old one goes back.
struct Reload<'a> {
    guard: Option<Placeholder<'a>>,
    old: Option<Entry>,
}

impl Reload<'_> {
    /// Stores `entry` for the waiting lookups and later ones.
    fn store(mut self, entry: Entry) {
        self.old = None;
        if let Some(guard) = self.guard.take() {
            // Err: an invalidation removed the placeholder meanwhile; the entry
            // is not kept, which is what the invalidation asked for.
            drop(guard.insert(entry));
        }
    }

    /// The key of the replaced entry, if it may still be served at `age`
    /// under `stale_limit` while the store fails.
    fn stale(&self, now: u64, stale_limit: Duration) -> Option<Arc<CachedKey>> {
        match &self.old {
            Some(Entry::Found { key, .. }) if age(now, key) < stale_limit => Some(key.clone()),
            _ => None,
        }
    }
}

impl Drop for Reload<'_> {
    fn drop(&mut self) {
        if let (Some(guard), Some(old)) = (self.guard.take(), self.old.take()) {
            // Err: removed by an invalidation meanwhile, as in `store`.
            drop(guard.insert(old));
        }
    }
}

/// How long ago (at `now`) `key` was read from the store.
fn age(now: u64, key: &CachedKey) -> Duration {
    Duration::from_nanos(now.saturating_sub(key.fetched))
}

/// Converts a duration to the nanoseconds the entries count in.
fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The map for `max_keys` keys. It is sharded (a lock each) and every shard
/// holds an equal part of the capacity, so with exactly `max_keys` keys the
/// shards that got more than their share would evict while others have room
/// (0.9% of a million keys were, in the memory bench). Each shard therefore
/// gets room for four standard deviations more than its share: `max_keys`
/// keys fit, and a little more may be held (1.1% at a million, 3.6% at the
/// default 100,000, at most 6.25%; nothing when the cache is too small to
/// shard).
fn map(max_keys: u64) -> Map {
    /// Fewer keys than this per shard are not worth a lock of their own.
    const MIN_PER_SHARD: u64 = 4096;
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let shards = (parallel * 4).min(max_keys / MIN_PER_SHARD).max(1);
    // A power of two (quick_cache rounds up; round down instead).
    let shards = 1 << shards.ilog2();
    let share = max_keys.div_ceil(shards);
    let margin = match shards {
        1 => 0,
        _ => 4 * share.isqrt(),
    };
    let options = quick_cache::OptionsBuilder::new()
        .shards(shards as usize)
        .estimated_items_capacity(usize::try_from(max_keys).unwrap_or(usize::MAX))
        .weight_capacity((share + margin).saturating_mul(shards))
        .build()
        .expect("cache options within quick_cache's bounds");
    Map::with_options(
        options,
        UnitWeighter,
        DigestHasher,
        DefaultLifecycle::default(),
    )
}

/// The key cache plus the cached settings (the kill switch).
pub struct KeyCache {
    cache: Map,
    scope_sets: ScopeSets,
    store: SharedStore,
    times: Times,
    invalidations: Mutex<broadcast::Receiver<Invalidation>>,
    /// The store's count of invalidations sent, and how many of them this
    /// cache has applied: equal means nothing is pending (one atomic load
    /// per request instead of a lock). `None` for stores that do not count.
    sent: Option<Arc<AtomicU64>>,
    applied: AtomicU64,
    /// Held while a batch of invalidations is taken and applied, so a request
    /// never slips between the two and sees an entry about to be dropped.
    drain_lock: tokio::sync::Mutex<()>,
    draining: AtomicBool,
    generation: AtomicU64,
    api_keys_enabled: AtomicBool,
    /// Until when (ms since `epoch`) the store counts as down after a failed
    /// read; 0 when it answered last. While it is down, lookups answer as the
    /// failed read did (stale entry or error) instead of each trying again.
    store_down_until: AtomicU64,
    /// When (ns since `epoch`) the latest successful store read completed. A
    /// read that began before it and then failed (a request stuck in a frozen
    /// server, timing out after the server came back) is old news: it does
    /// not mark the store down again.
    last_ok_ns: AtomicU64,
    epoch: Instant,
    pub stats: CacheStats,
}

/// How long a failed store read stands for the next lookups.
const OUTAGE_BACKOFF: Duration = Duration::from_millis(500);

impl KeyCache {
    pub fn new(store: SharedStore, cfg: &CacheConfig) -> KeyCache {
        KeyCache {
            cache: map(cfg.max_keys),
            scope_sets: ScopeSets::default(),
            invalidations: Mutex::new(store.subscribe()),
            sent: store.invalidations_sent(),
            applied: AtomicU64::new(0),
            store,
            times: Times::new(cfg),
            drain_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            api_keys_enabled: AtomicBool::new(true),
            store_down_until: AtomicU64::new(0),
            last_ok_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            stats: CacheStats::default(),
        }
    }

    /// Applies a reloaded `cache:` section: `ttl`, `negative_ttl` and
    /// `stale_if_error` take effect at once (entries already stored keep the
    /// lifetime they got, but a fresh-enough check uses the new `ttl`);
    /// `max_keys` is fixed when the cache is built.
    pub fn reconfigure(&self, cfg: &CacheConfig) {
        self.times.set(cfg);
    }

    /// Whether API keys are switched on (the kill switch in settings).
    pub fn api_keys_enabled(&self) -> bool {
        self.api_keys_enabled.load(Ordering::Acquire)
    }

    /// Finds the key with `hash`, from the cache or (single-flight) the store.
    pub async fn get(&self, hash: &TokenHash) -> Result<Lookup, StoreError> {
        let now = self.now_ns();
        match self.cache.get(hash).and_then(|e| e.live(now)) {
            Some(Entry::Found { key, .. }) if age(now, &key) < self.times.ttl() => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::Found(key));
            }
            Some(Entry::Missing { .. }) => {
                self.stats.negative_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Lookup::NotFound);
            }
            Some(Entry::Found { .. }) | None => {} // stale or absent: load below
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        for _ in 0..3 {
            let generation = self.generation.load(Ordering::Acquire);
            let entry = self.load(hash).await?;
            if self.generation.load(Ordering::Acquire) == generation {
                return Ok(entry);
            }
            // An invalidation arrived while we loaded: what we inserted may
            // predate the write it announces. Drop it and read again.
            self.cache.remove(hash);
        }
        // Invalidations keep arriving: answer from the store without caching.
        self.read_uncached(hash).await
    }

    /// Reads `hash` from the store, caching nothing.
    async fn read_uncached(&self, hash: &TokenHash) -> Result<Lookup, StoreError> {
        self.count_read();
        match self.store.get_by_hash(hash).await? {
            Some(rec) => Ok(Lookup::Found(Arc::new(self.cached_key(rec, hash)))),
            None => Ok(Lookup::NotFound),
        }
    }

    fn cached_key(&self, rec: KeyRecord, hash: &TokenHash) -> CachedKey {
        let scopes = self.scope_sets.get(&rec.scopes);
        CachedKey::new(rec, hash, scopes, self.now_ns())
    }

    async fn load(&self, hash: &TokenHash) -> Result<Lookup, StoreError> {
        let ttl = self.times.ttl();
        let stale_limit = self.times.stale_limit();
        // Under the hash's lock: keep an entry that is good (someone loaded it
        // while we waited for their placeholder), else take its place.
        let found = self
            .cache
            .entry_async(hash, |_, entry| match entry.clone().live(self.now_ns()) {
                Some(Entry::Found { key, .. }) if age(self.now_ns(), &key) < ttl => {
                    EntryAction::Retain(Lookup::Found(key))
                }
                Some(Entry::Missing { .. }) => EntryAction::Retain(Lookup::NotFound),
                Some(Entry::Found { .. }) | None => EntryAction::ReplaceWithGuard,
            })
            .await;
        let reload = match found {
            EntryResult::Retained(lookup) => return Ok(lookup),
            EntryResult::Replaced(guard, old) => Reload {
                guard: Some(guard),
                old: old.live(self.now_ns()),
            },
            EntryResult::Vacant(guard) => Reload {
                guard: Some(guard),
                old: None,
            },
            // Neither is asked for above (no `Remove`, no timeout).
            EntryResult::Removed(..) | EntryResult::Timeout => {
                return self.read_uncached(hash).await;
            }
        };
        if self.store_down() {
            // A read failed moments ago (perhaps for the request queued ahead
            // of this one on this key): answer as it did.
            return match reload.stale(self.now_ns(), stale_limit) {
                Some(key) => {
                    self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                    Ok(Lookup::Found(key))
                }
                None => Err(StoreError::Unavailable(
                    "the key store failed moments ago".into(),
                )),
            };
        }
        self.count_read();
        let started = self.now_ns();
        let read = self.store.get_by_hash(hash).await;
        self.read_done(started, read.is_ok());
        match read {
            Ok(Some(rec)) => {
                let key = Arc::new(self.cached_key(rec, hash));
                let until = self.now_ns().saturating_add(ns(stale_limit));
                reload.store(Entry::Found {
                    key: key.clone(),
                    until,
                });
                Ok(Lookup::Found(key))
            }
            Ok(None) => {
                let until = self.now_ns().saturating_add(ns(self.times.negative_ttl()));
                reload.store(Entry::Missing { until });
                Ok(Lookup::NotFound)
            }
            Err(e) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("keygate_store_errors_total").increment(1);
                match reload.stale(self.now_ns(), stale_limit) {
                    Some(key) => {
                        self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                        Ok(Lookup::Found(key))
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// Nanoseconds since `epoch`: the clock of entry lifetimes and ages.
    fn now_ns(&self) -> u64 {
        ns(self.epoch.elapsed())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn store_down(&self) -> bool {
        self.now_ms() < self.store_down_until.load(Ordering::Acquire)
    }

    /// Records how a store read that began at `started` (ns) ended.
    fn read_done(&self, started: u64, ok: bool) {
        if ok {
            self.last_ok_ns.fetch_max(self.now_ns(), Ordering::AcqRel);
            self.set_store_down(false);
        } else if self.last_ok_ns.load(Ordering::Acquire) <= started {
            self.set_store_down(true);
        }
    }

    fn set_store_down(&self, down: bool) {
        let until = match down {
            true => self
                .now_ms()
                .saturating_add(OUTAGE_BACKOFF.as_millis() as u64),
            false => 0,
        };
        self.store_down_until.store(until, Ordering::Release);
    }

    fn count_read(&self) {
        self.stats.store_reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keygate_store_reads_total").increment(1);
    }

    /// Applies pending invalidations. Cheap when there are none; called before
    /// every keyed request so a local revoke is final as soon as it is answered.
    pub async fn sync(&self) {
        let pending = match &self.sent {
            Some(sent) => sent.load(Ordering::Acquire) != self.applied.load(Ordering::Acquire),
            None => match self.invalidations.lock() {
                Ok(rx) => !rx.is_empty(),
                Err(_) => true,
            },
        };
        if pending || self.draining.load(Ordering::Acquire) {
            self.drain().await;
        }
    }

    async fn drain(&self) {
        let _guard = self.drain_lock.lock().await;
        self.draining.store(true, Ordering::Release);
        // Everything counted by now is in the receiver (counted after sending).
        let sent = self.sent.as_ref().map(|s| s.load(Ordering::Acquire));
        let mut batch = Vec::new();
        {
            let mut rx = match self.invalidations.lock() {
                Ok(rx) => rx,
                Err(poisoned) => poisoned.into_inner(),
            };
            loop {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(TryRecvError::Lagged(_)) => batch.push(Invalidation::All),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                }
            }
        }
        for msg in batch {
            self.apply(msg).await;
        }
        if let Some(sent) = sent {
            self.applied.fetch_max(sent, Ordering::AcqRel);
        }
        self.draining.store(false, Ordering::Release);
    }

    async fn apply(&self, msg: Invalidation) {
        match msg {
            Invalidation::Keys(hashes) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                for h in &hashes {
                    self.cache.remove(h);
                }
            }
            Invalidation::Settings => self.refresh_settings().await,
            Invalidation::All => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                // Sent when the store answers again after an outage (a pub/sub
                // reconnect): forget the last failed read, or for up to
                // OUTAGE_BACKOFF every key flushed here would be refused with
                // 503 without the store being asked.
                self.set_store_down(false);
                self.cache.clear();
                self.refresh_settings().await;
            }
        }
    }

    /// Reloads settings from the store; keeps the last known value on error.
    pub async fn refresh_settings(&self) {
        match self.store.get_settings().await {
            Ok(s) => self
                .api_keys_enabled
                .store(s.api_keys_enabled, Ordering::Release),
            Err(e) => {
                tracing::warn!(error = %e, "could not refresh settings; keeping the last known ones")
            }
        }
    }

    /// Drops every entry whose lifetime has ended. Such an entry already
    /// counts as absent, but it would hold its slot until evicted: a stream of
    /// unknown keys (each a negative entry) would fill the map to `max_keys`
    /// instead of keeping about `negative_ttl` worth of them. Locks one shard
    /// at a time.
    pub fn sweep(&self) {
        let now = self.now_ns();
        self.cache.retain(|_, e| e.is_live(now));
    }

    /// Background upkeep: applies invalidations as they arrive (for instances
    /// with no traffic), and every `ttl` refreshes settings in case pub/sub
    /// messages were lost and sweeps out entries whose lifetime has ended.
    pub fn spawn_maintenance(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut wake = self.store.subscribe();
        tokio::spawn(async move {
            self.refresh_settings().await;
            let mut tick = tokio::time::interval(self.times.ttl().max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    msg = wake.recv() => match msg {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.drain().await,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tick.tick() => {
                        self.refresh_settings().await;
                        self.sweep();
                    }
                }
            }
        })
    }

    /// Number of entries (approximate; for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_headers_are_safe() {
        assert_eq!(text_header("billing svc"), "billing svc");
        assert_eq!(text_header("naïve\r\nx: y"), "na%C3%AFve%0D%0Ax: y");
        assert_eq!(text_header("100%"), "100%25");
    }

    /// An embedded store in `dir` holding one fresh key.
    async fn store_with_one_key(
        dir: &std::path::Path,
    ) -> (SharedStore, crate::keys::Token, KeyRecord) {
        let store: SharedStore =
            Arc::new(crate::store::embedded::EmbeddedStore::open(&dir.join("k.redb")).unwrap());
        let token = crate::keys::Token::generate("kg_");
        let rec = KeyRecord::issue(&token, "kg_", "k", "o", "test", chrono::Utc::now());
        let event = crate::store::Event::new(
            crate::store::EventType::KeyCreated,
            Some(rec.id),
            "test",
            chrono::Utc::now(),
            serde_json::Value::Null,
        );
        store.create_key(&rec, 10, &event).await.unwrap();
        (store, token, rec)
    }

    fn scope(s: &str) -> Scope {
        Scope::parse(s).unwrap()
    }

    /// The compact form answers every status question as the record does,
    /// for the current secret, a retired one and one the record no longer
    /// lists, before, at and after each boundary.
    #[test]
    fn cached_keys_check_as_their_record_does() {
        use crate::keys::{RetiredSecret, Token};
        let now = chrono::Utc::now();
        let d = chrono::Duration::seconds;
        let sets = ScopeSets::default();
        let mut records = Vec::new();
        for variant in 0..6 {
            let token = Token::generate("kg_");
            let mut r = KeyRecord::issue(&token, "kg_", "k", "o", "t", now);
            match variant {
                0 => {}
                1 => r.expires_at = Some(now + d(10)),
                2 => r.revoked_at = Some(now),
                3 => r.suspended_at = Some(now),
                4 => {
                    r.revoked_at = Some(now);
                    r.suspended_at = Some(now);
                    r.expires_at = Some(now - d(1));
                }
                _ => r.expires_at = Some(now - d(1)),
            }
            let old = TokenHash::of("old");
            r.retired.push(RetiredSecret {
                hash: old,
                valid_until: now + d(5),
            });
            records.push((r, [token.hash(), old, TokenHash::of("unlisted")]));
        }
        for (rec, hashes) in &records {
            for hash in hashes {
                let key = CachedKey::new(rec.clone(), hash, sets.get(&rec.scopes), 0);
                for at in [-20, -1, 0, 4, 5, 6, 9, 10, 11, 3600] {
                    let t = now + d(at);
                    let cached = key.check(unix_nanos(t));
                    assert_eq!(cached, rec.check(hash, t), "{rec:?} {hash:?} at {at}");
                }
            }
        }
    }

    #[test]
    fn identity_headers_and_owner_survive_the_compact_form() {
        let now = chrono::Utc::now();
        let token = crate::keys::Token::generate("kg_");
        let mut rec = KeyRecord::issue(&token, "kg_", "naïve 100%", "équipe\r\n", "t", now);
        rec.scopes = vec![scope("orders:read"), scope("reports")];
        rec.access = Access::ReadOnly;
        rec.rate_limit = Some(RateLimitSpec {
            per_second: 5,
            burst: 10,
        });
        let sets = ScopeSets::default();
        let key = CachedKey::new(rec.clone(), &token.hash(), sets.get(&rec.scopes), 0);
        assert_eq!(key.id(), &rec.id);
        assert_eq!(key.owner(), "équipe\r\n");
        assert_eq!(key.key_id_header(), rec.id.text().as_str());
        assert_eq!(key.name_header(), text_header(&rec.name));
        assert_eq!(key.name_header(), "na%C3%AFve 100%25");
        assert_eq!(key.owner_header(), text_header(&rec.owner));
        assert_eq!(key.scopes_header(), "orders:read reports");
        assert_eq!(key.access_header(), "read_only");
        assert_eq!(key.access(), Access::ReadOnly);
        assert_eq!(key.rate_limit(), rec.rate_limit);
        assert!(key.has_scope(&scope("reports")));
        assert!(!key.has_scope(&scope("orders:write")));
        // A plain owner is kept once, as its own header text.
        rec.owner = "team-7".into();
        rec.scopes.clear();
        let key = CachedKey::new(rec.clone(), &token.hash(), sets.get(&rec.scopes), 0);
        assert_eq!(key.owner(), "team-7");
        assert_eq!(key.owner_header(), "team-7");
        assert_eq!(key.scopes_header(), "");
        assert_eq!(&*key.text, "na%C3%AFve 100%25team-7");
    }

    /// Keys with the same scope list share one copy; lists no key holds any
    /// more are dropped once the map has doubled.
    #[test]
    fn scope_lists_are_held_once() {
        let sets = ScopeSets::default();
        let a = sets.get(&[scope("a"), scope("b")]);
        let b = sets.get(&[scope("a"), scope("b")]);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &sets.get(&[scope("b"), scope("a")])));
        for i in 0..200 {
            drop(sets.get(&[scope(&format!("s{i}"))]));
        }
        let held = sets.0.lock().unwrap().sets.len();
        assert!(held <= 130, "{held} lists held");
        assert!(Arc::ptr_eq(&a, &sets.get(&[scope("a"), scope("b")])));
    }

    /// An embedded store whose `get_by_hash` can be made to hang or fail.
    struct Switched {
        inner: SharedStore,
        /// 0: answers; 1: never answers; 2: fails; 3: fails after 100 ms.
        mode: std::sync::atomic::AtomicU8,
    }

    mod switched {
        use async_trait::async_trait;
        use chrono::{DateTime, Utc};
        use tokio::sync::broadcast;

        use super::Switched;
        use crate::keys::{KeyId, KeyRecord, TokenHash};
        use crate::store::*;

        #[async_trait]
        impl KeyStore for Switched {
            async fn create_key(&self, r: &KeyRecord, m: u32, e: &Event) -> Result<(), StoreError> {
                self.inner.create_key(r, m, e).await
            }
            async fn get_by_hash(&self, h: &TokenHash) -> Result<Option<KeyRecord>, StoreError> {
                match self.mode.load(std::sync::atomic::Ordering::SeqCst) {
                    0 => self.inner.get_by_hash(h).await,
                    1 => std::future::pending().await,
                    2 => Err(StoreError::Unavailable("switched off".into())),
                    _ => {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        Err(StoreError::Unavailable("timed out".into()))
                    }
                }
            }
            async fn get_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
                self.inner.get_by_id(id).await
            }
            async fn list_keys(
                &self,
                f: &ListFilter,
                now: DateTime<Utc>,
            ) -> Result<Page<KeyRecord>, StoreError> {
                self.inner.list_keys(f, now).await
            }
            async fn update_key(
                &self,
                r: &KeyRecord,
                e: Option<&Event>,
            ) -> Result<KeyRecord, StoreError> {
                self.inner.update_key(r, e).await
            }
            async fn delete_key(
                &self,
                id: &KeyId,
                e: &Event,
            ) -> Result<Option<KeyRecord>, StoreError> {
                self.inner.delete_key(id, e).await
            }
            async fn count_owner(&self, owner: &str) -> Result<u64, StoreError> {
                self.inner.count_owner(owner).await
            }
            async fn append_event(&self, e: &Event) -> Result<(), StoreError> {
                self.inner.append_event(e).await
            }
            async fn list_events(&self, f: &EventFilter) -> Result<Page<Event>, StoreError> {
                self.inner.list_events(f).await
            }
            async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
                self.inner.prune_events(before).await
            }
            async fn get_settings(&self) -> Result<Settings, StoreError> {
                self.inner.get_settings().await
            }
            async fn put_settings(&self, s: &Settings, e: &Event) -> Result<(), StoreError> {
                self.inner.put_settings(s, e).await
            }
            async fn flush_usage(&self, b: &[UsageDelta]) -> Result<(), StoreError> {
                self.inner.flush_usage(b).await
            }
            async fn usage(
                &self,
                id: &KeyId,
                since: DateTime<Utc>,
            ) -> Result<Vec<UsageHour>, StoreError> {
                self.inner.usage(id, since).await
            }
            async fn try_lead(
                &self,
                h: &str,
                ttl: std::time::Duration,
            ) -> Result<bool, StoreError> {
                self.inner.try_lead(h, ttl).await
            }
            async fn ping(&self) -> Result<(), StoreError> {
                self.inner.ping().await
            }
            fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
                self.inner.subscribe()
            }
            fn invalidations_sent(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU64>> {
                self.inner.invalidations_sent()
            }
        }
    }

    /// A stale entry being reloaded is out of the map while the read is in
    /// flight; a reload that ends without a new entry (here: the request is
    /// dropped mid-read) puts it back, so it can still be served while the
    /// store fails, as it could before the reload began. An uncached key
    /// fails closed.
    #[tokio::test]
    async fn an_abandoned_reload_keeps_the_stale_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (inner, token, rec) = store_with_one_key(dir.path()).await;
        let store = Arc::new(Switched {
            inner,
            mode: 0.into(),
        });
        let cfg = CacheConfig {
            max_keys: 10,
            ttl: Duration::from_millis(1),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(3600),
        };
        let cache = KeyCache::new(store.clone(), &cfg);
        let hash = token.hash();
        assert!(matches!(cache.get(&hash).await.unwrap(), Lookup::Found(_)));
        tokio::time::sleep(Duration::from_millis(5)).await;

        store.mode.store(1, Ordering::SeqCst);
        let hung = tokio::time::timeout(Duration::from_millis(50), cache.get(&hash)).await;
        assert!(hung.is_err(), "the read never answers");
        assert_eq!(cache.entry_count(), 1, "the stale entry is back");

        store.mode.store(2, Ordering::SeqCst);
        match cache.get(&hash).await {
            Ok(Lookup::Found(k)) => assert_eq!(k.id(), &rec.id),
            other => panic!("expected the stale key, got {other:?}"),
        }
        assert_eq!(cache.stats.stale_served.load(Ordering::Relaxed), 1);
        assert_eq!(cache.stats.store_errors.load(Ordering::Relaxed), 1);
        // Within the outage backoff the store is not asked again.
        assert!(matches!(cache.get(&hash).await, Ok(Lookup::Found(_))));
        assert_eq!(cache.stats.stale_served.load(Ordering::Relaxed), 2);
        let unknown = TokenHash::of("kg_unknown");
        assert!(matches!(
            cache.get(&unknown).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// A read that began before the store came back and failed after a
    /// later read succeeded (a command stuck in a frozen server, timing out
    /// once it was thawed) does not mark the store down: the next lookups
    /// still ask it instead of answering 503 for the outage backoff.
    #[tokio::test]
    async fn a_late_failure_of_an_older_read_does_not_mark_the_store_down() {
        let dir = tempfile::tempdir().unwrap();
        let (inner, token, _) = store_with_one_key(dir.path()).await;
        let store = Arc::new(Switched {
            inner,
            mode: 3.into(),
        });
        let cfg = CacheConfig {
            max_keys: 10,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(0),
        };
        let cache = KeyCache::new(store.clone(), &cfg);
        let stuck = TokenHash::of("kg_stuck");
        let (old, fresh) = tokio::join!(cache.get(&stuck), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            store.mode.store(0, Ordering::SeqCst);
            cache.get(&token.hash()).await
        });
        assert!(matches!(fresh, Ok(Lookup::Found(_))), "{fresh:?}");
        assert!(matches!(old, Err(StoreError::Unavailable(_))), "{old:?}");
        let unknown = TokenHash::of("kg_unknown");
        assert!(
            matches!(cache.get(&unknown).await, Ok(Lookup::NotFound)),
            "the store is asked again"
        );

        // A failure of a read that began after the last success does count.
        store.mode.store(2, Ordering::SeqCst);
        assert!(cache.get(&TokenHash::of("kg_a")).await.is_err());
        store.mode.store(0, Ordering::SeqCst);
        match cache.get(&TokenHash::of("kg_b")).await {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("moments ago"), "{why}"),
            other => panic!("expected the outage backoff, got {other:?}"),
        }
    }

    /// The sweep drops entries past their lifetime (here negative ones for
    /// unknown keys) and keeps live ones, so a stream of unknown keys does
    /// not fill the map.
    #[tokio::test]
    async fn sweep_drops_ended_entries_and_keeps_live_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, token, rec) = store_with_one_key(dir.path()).await;
        let cfg = CacheConfig {
            max_keys: 1000,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_millis(1),
            stale_if_error: Duration::from_secs(0),
        };
        let cache = KeyCache::new(store, &cfg);
        assert!(matches!(
            cache.get(&token.hash()).await,
            Ok(Lookup::Found(_))
        ));
        for i in 0..100 {
            let unknown = TokenHash::of(&format!("kg_unknown_{i}"));
            assert!(matches!(cache.get(&unknown).await, Ok(Lookup::NotFound)));
        }
        assert_eq!(cache.entry_count(), 101);
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache.sweep();
        assert_eq!(cache.entry_count(), 1, "only the live key is left");
        match cache.get(&token.hash()).await {
            Ok(Lookup::Found(k)) => assert_eq!(k.id(), &rec.id),
            other => panic!("expected the cached key, got {other:?}"),
        }
        assert_eq!(cache.stats.hits.load(Ordering::Relaxed), 1, "still cached");
    }

    /// A config reload changes `ttl` for entries already cached: a shorter one
    /// makes the next lookup read the store again.
    #[tokio::test]
    async fn reconfigured_ttl_applies_to_cached_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, token, _) = store_with_one_key(dir.path()).await;
        let mut cfg = CacheConfig {
            max_keys: 10,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(0),
        };
        let cache = KeyCache::new(store, &cfg);
        let hash = token.hash();
        let reads = || cache.stats.store_reads.load(Ordering::Relaxed);
        assert!(matches!(cache.get(&hash).await.unwrap(), Lookup::Found(_)));
        assert!(matches!(cache.get(&hash).await.unwrap(), Lookup::Found(_)));
        assert_eq!(reads(), 1, "the second lookup is a hit");
        cfg.ttl = Duration::from_millis(1);
        cache.reconfigure(&cfg);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(cache.get(&hash).await.unwrap(), Lookup::Found(_)));
        assert_eq!(reads(), 2, "stale under the new ttl: read again");
    }
}
