//! The cache of verified keys, in front of the store.
//!
//! A moka cache keyed by token hash holds positive entries (the record, with
//! its identity headers prebuilt) and negative entries (unknown hashes). A
//! positive entry is fresh for `cache.ttl`; after that it is reloaded, but if
//! the store fails it may still be served up to `cache.stale_if_error` longer.
//! Negative entries live `cache.negative_ttl`.
//!
//! Loads are single-flight: moka serializes compute calls per key, and a call
//! that finds a fresh entry left by the one before it does not read the store,
//! so a thousand concurrent requests for one uncached key make one read.
//!
//! Invalidations from the store (local writes at once, other instances' over
//! pub/sub) are applied before every keyed request ([`KeyCache::sync`]) and by
//! a background task. A generation counter closes the race between a load in
//! flight and an invalidation: a load that saw the generation move re-reads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::Expiry;
use moka::ops::compute::{CompResult, Op};
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio_util::sync::CancellationToken;

use crate::config::CacheConfig;
use crate::keys::{KeyRecord, TokenHash};
use crate::store::{Invalidation, SharedStore, StoreError};

/// A verified key as the data plane uses it.
#[derive(Debug)]
pub struct CachedKey {
    pub record: KeyRecord,
    pub fetched: Instant,
    /// Identity headers, built once per load instead of once per request.
    pub key_id_header: HeaderValue,
    pub name_header: HeaderValue,
    pub owner_header: HeaderValue,
    pub scopes_header: HeaderValue,
    pub access_header: HeaderValue,
}

impl CachedKey {
    fn new(record: KeyRecord) -> CachedKey {
        let scopes: Vec<&str> = record.scopes.iter().map(|s| s.as_str()).collect();
        CachedKey {
            key_id_header: text_header(record.id.as_str()),
            name_header: text_header(&record.name),
            owner_header: text_header(&record.owner),
            scopes_header: text_header(&scopes.join(" ")),
            access_header: HeaderValue::from_static(record.access.as_str()),
            fetched: Instant::now(),
            record,
        }
    }
}

/// Makes a header value from user-controlled text (key names, owners):
/// visible ASCII passes as is; anything else, and `%` itself, is percent-encoded
/// (so the value always decodes back to the original).
pub fn text_header(s: &str) -> HeaderValue {
    if let Ok(v) = HeaderValue::from_str(s)
        && s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%')
    {
        return v;
    }
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // Only visible ASCII and spaces remain.
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Clone, Debug)]
enum Entry {
    Found(Arc<CachedKey>),
    Missing,
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

struct EntryExpiry {
    times: Arc<Times>,
}

impl Expiry<TokenHash, Entry> for EntryExpiry {
    fn expire_after_create(&self, _: &TokenHash, value: &Entry, _: Instant) -> Option<Duration> {
        Some(match value {
            Entry::Found(_) => self.times.stale_limit(),
            Entry::Missing => self.times.negative_ttl(),
        })
    }

    fn expire_after_update(
        &self,
        key: &TokenHash,
        value: &Entry,
        at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, at)
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

/// The key cache plus the cached settings (the kill switch).
pub struct KeyCache {
    cache: moka::future::Cache<TokenHash, Entry, DigestHasher>,
    store: SharedStore,
    times: Arc<Times>,
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
    epoch: Instant,
    pub stats: CacheStats,
}

/// How long a failed store read stands for the next lookups.
const OUTAGE_BACKOFF: Duration = Duration::from_millis(500);

impl KeyCache {
    pub fn new(store: SharedStore, cfg: &CacheConfig) -> KeyCache {
        let times = Arc::new(Times::new(cfg));
        let cache = moka::future::Cache::builder()
            .max_capacity(cfg.max_keys)
            .expire_after(EntryExpiry {
                times: times.clone(),
            })
            .build_with_hasher(DigestHasher);
        KeyCache {
            cache,
            invalidations: Mutex::new(store.subscribe()),
            sent: store.invalidations_sent(),
            applied: AtomicU64::new(0),
            store,
            times,
            drain_lock: tokio::sync::Mutex::new(()),
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            api_keys_enabled: AtomicBool::new(true),
            store_down_until: AtomicU64::new(0),
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
        if let Some(entry) = self.cache.get(hash).await {
            match entry {
                Entry::Found(k) if k.fetched.elapsed() < self.times.ttl() => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lookup::Found(k));
                }
                Entry::Missing => {
                    self.stats.negative_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Lookup::NotFound);
                }
                Entry::Found(_) => {} // stale: reload below
            }
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
            self.cache.invalidate(hash).await;
        }
        // Invalidations keep arriving: answer from the store without caching.
        self.count_read();
        match self.store.get_by_hash(hash).await? {
            Some(rec) => Ok(Lookup::Found(Arc::new(CachedKey::new(rec)))),
            None => Ok(Lookup::NotFound),
        }
    }

    async fn load(&self, hash: &TokenHash) -> Result<Lookup, StoreError> {
        let ttl = self.times.ttl();
        let stale_limit = self.times.stale_limit();
        let result = self
            .cache
            .entry(*hash)
            .and_try_compute_with(|current| async move {
                let current = current.map(|e| e.into_value());
                match &current {
                    // Someone loaded it while we waited for the key lock.
                    Some(Entry::Found(k)) if k.fetched.elapsed() < ttl => return Ok(Op::Nop),
                    Some(Entry::Missing) => return Ok(Op::Nop),
                    _ => {}
                }
                if self.store_down() {
                    // A read failed moments ago (perhaps for the request queued
                    // ahead of this one on this key): answer as it did.
                    return match current {
                        Some(Entry::Found(k)) if k.fetched.elapsed() < stale_limit => {
                            self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                            Ok(Op::Nop)
                        }
                        _ => Err(StoreError::Unavailable(
                            "the key store failed moments ago".into(),
                        )),
                    };
                }
                self.count_read();
                let read = self.store.get_by_hash(hash).await;
                self.set_store_down(read.is_err());
                match read {
                    Ok(Some(rec)) => Ok(Op::Put(Entry::Found(Arc::new(CachedKey::new(rec))))),
                    Ok(None) => Ok(Op::Put(Entry::Missing)),
                    Err(e) => {
                        self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("keygate_store_errors_total").increment(1);
                        match current {
                            Some(Entry::Found(k)) if k.fetched.elapsed() < stale_limit => {
                                self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                                Ok(Op::Nop)
                            }
                            _ => Err(e),
                        }
                    }
                }
            })
            .await?;
        let entry = match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                e.into_value()
            }
            // Op::Remove is never returned above; treat as unknown defensively.
            CompResult::StillNone(_) | CompResult::Removed(_) => Entry::Missing,
        };
        Ok(match entry {
            Entry::Found(k) => Lookup::Found(k),
            Entry::Missing => Lookup::NotFound,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn store_down(&self) -> bool {
        self.now_ms() < self.store_down_until.load(Ordering::Acquire)
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
                    self.cache.invalidate(h).await;
                }
            }
            Invalidation::Settings => self.refresh_settings().await,
            Invalidation::All => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.cache.invalidate_all();
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

    /// Background upkeep: applies invalidations as they arrive (for instances
    /// with no traffic) and refreshes settings every `ttl` in case pub/sub
    /// messages were lost.
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
                    _ = tick.tick() => self.refresh_settings().await,
                }
            }
        })
    }

    /// Number of entries (approximate; for metrics and tests).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
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

    /// A config reload changes `ttl` for entries already cached: a shorter one
    /// makes the next lookup read the store again.
    #[tokio::test]
    async fn reconfigured_ttl_applies_to_cached_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(
            crate::store::embedded::EmbeddedStore::open(&dir.path().join("k.redb")).unwrap(),
        );
        let token = crate::keys::Token::generate("kg_");
        let rec = KeyRecord::issue(&token, "kg_", "k", "o", "test", chrono::Utc::now());
        let event = crate::store::Event::new(
            crate::store::EventType::KeyCreated,
            Some(rec.id.clone()),
            "test",
            chrono::Utc::now(),
            serde_json::Value::Null,
        );
        store.create_key(&rec, 10, &event).await.unwrap();
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
