//! Usage counting: cheap in-memory counters on the request path, flushed to the
//! store in batches by a background task.
//!
//! The request path never writes to the store (DESIGN.md section 7). It calls
//! [`UsageRecorder::record`], which finds the key's slot in a sharded map
//! (`DashMap`, a read lock on one shard) and bumps atomics: no allocation and no
//! lock held beyond the shard's read lock for a key seen before. A slot holds
//! the counts of the current UTC hour; when the hour turns, the first request of
//! the new hour moves the old counts aside under the slot's small mutex (once
//! per key per hour). A request racing with that move may be counted in the
//! neighbouring hour: an error of microseconds at an hour boundary, accepted to
//! keep the common case lock-free.
//!
//! [`UsageFlusher::flush`] drains every slot into a pending batch, merged by
//! (hour, key), and writes it with [`KeyStore::flush_usage`] in chunks. When the
//! store is down the batch is kept and retried on the next tick; it is capped at
//! [`MAX_PENDING`] entries, dropping the oldest hours first with a warning.
//! `last_used_at` therefore has the precision of the flush interval.
//!
//! [`KeyStore::flush_usage`]: crate::store::KeyStore::flush_usage

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::keys::{Clock, KeyId};
use crate::ratelimit::FastHash;
use crate::store::{SharedStore, StoreError, UsageCounts, UsageDelta};

/// How often usage is flushed to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Largest pending batch kept while the store is unreachable, in (key, hour)
/// entries (about 100 bytes each).
pub const MAX_PENDING: usize = 100_000;
/// Deltas per `flush_usage` call. Matches the Redis backend's script batch, so
/// each call is one atomic script and a failed call can be retried whole
/// without counting anything twice.
const FLUSH_CHUNK: usize = 200;
/// A slot idle for this many flushes in a row is dropped (its key may be gone).
const IDLE_FLUSHES: u32 = 12;

/// What happened to a request made with a verified key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to the upstream.
    Allowed,
    /// A verified key refused by authorization (403 `insufficient_scope`,
    /// `read_only_key`). Refusals for the key's status (401 revoked,
    /// suspended, expired) are not counted: verification does not return the
    /// key it refused.
    Denied,
    /// Refused with 429 `rate_limited`.
    RateLimited,
}

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Allowed => 0,
            Outcome::Denied => 1,
            Outcome::RateLimited => 2,
        }
    }
}

/// Counts of one key for the hour in `hour`.
struct Slot {
    /// Start of the hour the counters belong to, Unix seconds.
    hour: AtomicI64,
    counts: [AtomicU64; 3],
    /// Latest use since the last drain, Unix milliseconds; 0 when none.
    last_used_ms: AtomicI64,
    /// Counts of earlier hours moved aside when the hour turned; also
    /// serializes hour turns with drains.
    spill: Mutex<Vec<(i64, [u64; 3])>>,
    /// Drains in a row that found nothing.
    idle: AtomicU32,
}

impl Slot {
    fn new(hour: i64) -> Slot {
        Slot {
            hour: AtomicI64::new(hour),
            counts: Default::default(),
            last_used_ms: AtomicI64::new(0),
            spill: Mutex::new(Vec::new()),
            idle: AtomicU32::new(0),
        }
    }

    fn add(&self, hour: i64, ms: i64, outcome: Outcome) {
        if self.hour.load(Ordering::Acquire) < hour {
            self.turn_hour(hour);
        }
        self.counts[outcome.index()].fetch_add(1, Ordering::Relaxed);
        // A plain load first: under load most requests share a millisecond, and
        // skipping the read-modify-write keeps a hot key's cache line quieter.
        if self.last_used_ms.load(Ordering::Relaxed) < ms {
            self.last_used_ms.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// Moves the counts of the old hour aside and starts `hour`.
    fn turn_hour(&self, hour: i64) {
        let mut spill = lock(&self.spill);
        let old = self.hour.load(Ordering::Acquire);
        if old >= hour {
            // Another request turned it first.
            return;
        }
        let taken = self.take_counts();
        if taken.iter().any(|&n| n > 0) {
            spill.push((old, taken));
        }
        self.hour.store(hour, Ordering::Release);
    }

    fn take_counts(&self) -> [u64; 3] {
        [
            self.counts[0].swap(0, Ordering::AcqRel),
            self.counts[1].swap(0, Ordering::AcqRel),
            self.counts[2].swap(0, Ordering::AcqRel),
        ]
    }

    /// Takes everything counted since the last drain.
    fn drain(&self, id: &KeyId, out: &mut Vec<UsageDelta>) {
        let mut spill = lock(&self.spill);
        let hour = self.hour.load(Ordering::Acquire);
        let counts = self.take_counts();
        let last_ms = self.last_used_ms.swap(0, Ordering::AcqRel);
        let spilled = std::mem::take(&mut *spill);
        drop(spill);
        let active = !spilled.is_empty() || last_ms != 0 || counts.iter().any(|&n| n > 0);
        if active {
            self.idle.store(0, Ordering::Relaxed);
        } else {
            self.idle.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for (h, c) in spilled {
            out.push(delta(id, h, c, None));
        }
        let last_used = (last_ms != 0)
            .then(|| DateTime::<Utc>::from_timestamp_millis(last_ms))
            .flatten();
        out.push(delta(id, hour, counts, last_used));
    }

    fn is_empty(&self) -> bool {
        self.counts.iter().all(|c| c.load(Ordering::Acquire) == 0)
            && self.last_used_ms.load(Ordering::Acquire) == 0
            && lock(&self.spill).is_empty()
    }
}

fn delta(id: &KeyId, hour: i64, c: [u64; 3], last_used_at: Option<DateTime<Utc>>) -> UsageDelta {
    UsageDelta {
        key_id: *id,
        hour: DateTime::<Utc>::from_timestamp(hour, 0).unwrap_or_default(),
        counts: UsageCounts {
            allowed: c[0],
            denied: c[1],
            rate_limited: c[2],
        },
        last_used_at,
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// counters; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// In-memory usage counters, shared by every proxy worker.
pub struct UsageRecorder {
    /// Keyed by the verified keys' ids, which keygate issues: a fast hash.
    slots: DashMap<KeyId, Slot, FastHash>,
    clock: Arc<dyn Clock>,
}

impl UsageRecorder {
    pub fn new(clock: Arc<dyn Clock>) -> UsageRecorder {
        UsageRecorder {
            slots: DashMap::with_hasher(FastHash),
            clock,
        }
    }

    /// Counts one request of `key`. Never touches the store; allocates only the
    /// first time a key is seen (and again after it was idle for a minute).
    pub fn record(&self, key: &KeyId, outcome: Outcome) {
        let ms = self.clock.now_nanos().div_euclid(1_000_000);
        let hour = ms.div_euclid(3_600_000) * 3600;
        if let Some(slot) = self.slots.get(key) {
            slot.add(hour, ms, outcome);
            return;
        }
        self.slots
            .entry(*key)
            .or_insert_with(|| Slot::new(hour))
            .add(hour, ms, outcome);
    }

    /// Takes everything counted since the last drain, one delta per key and
    /// hour, and forgets keys idle for a while.
    pub fn drain(&self) -> Vec<UsageDelta> {
        let mut out = Vec::new();
        let mut idle = false;
        for entry in self.slots.iter() {
            entry.value().drain(entry.key(), &mut out);
            idle |= entry.value().idle.load(Ordering::Relaxed) >= IDLE_FLUSHES;
        }
        if idle {
            // `retain` holds each shard's write lock, so no request adds to a
            // slot while it is checked and dropped.
            self.slots
                .retain(|_, s| s.idle.load(Ordering::Relaxed) < IDLE_FLUSHES || !s.is_empty());
        }
        out
    }

    /// Number of keys with a slot (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.slots.len()
    }
}

/// Counts and last use of one (hour, key) waiting to be written.
#[derive(Default)]
struct Pending {
    counts: UsageCounts,
    last_used_at: Option<DateTime<Utc>>,
}

/// Writes drained usage to the store, keeping what could not be written.
pub struct UsageFlusher {
    recorder: Arc<UsageRecorder>,
    store: SharedStore,
    /// Ordered by hour first, so the oldest entries are dropped first.
    pending: tokio::sync::Mutex<BTreeMap<(i64, KeyId), Pending>>,
}

impl UsageFlusher {
    pub fn new(recorder: Arc<UsageRecorder>, store: SharedStore) -> UsageFlusher {
        UsageFlusher {
            recorder,
            store,
            pending: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn recorder(&self) -> &Arc<UsageRecorder> {
        &self.recorder
    }

    /// Drains the recorder and writes everything pending. On a store error the
    /// unwritten part stays pending for the next call.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut pending = self.pending.lock().await;
        for d in self.recorder.drain() {
            let p = pending.entry((d.hour.timestamp(), d.key_id)).or_default();
            p.counts.allowed = p.counts.allowed.saturating_add(d.counts.allowed);
            p.counts.denied = p.counts.denied.saturating_add(d.counts.denied);
            p.counts.rate_limited = p.counts.rate_limited.saturating_add(d.counts.rate_limited);
            p.last_used_at = p.last_used_at.max(d.last_used_at);
        }
        let mut dropped = 0u64;
        while pending.len() > MAX_PENDING {
            pending.pop_first();
            dropped += 1;
        }
        if dropped > 0 {
            metrics::counter!("keygate_usage_dropped_total").increment(dropped);
            tracing::warn!(
                dropped,
                kept = MAX_PENDING,
                "usage batch over its cap while the store is unreachable; dropped the oldest counts"
            );
        }
        while !pending.is_empty() {
            let chunk: Vec<UsageDelta> = pending
                .iter()
                .take(FLUSH_CHUNK)
                .map(|((hour, id), p)| UsageDelta {
                    key_id: *id,
                    hour: DateTime::<Utc>::from_timestamp(*hour, 0).unwrap_or_default(),
                    counts: p.counts.clone(),
                    last_used_at: p.last_used_at,
                })
                .collect();
            if let Err(e) = self.store.flush_usage(&chunk).await {
                metrics::counter!("keygate_usage_flushes_total", "result" => "error").increment(1);
                return Err(e);
            }
            for d in chunk {
                pending.remove(&(d.hour.timestamp(), d.key_id));
            }
        }
        metrics::counter!("keygate_usage_flushes_total", "result" => "ok").increment(1);
        Ok(())
    }

    /// Number of (hour, key) entries waiting for the store.
    pub async fn pending_len(&self) -> usize {
        self.pending.lock().await.len()
    }

    /// Flushes every `every` until `shutdown` fires. The last flush at shutdown
    /// is the caller's, after the listeners have drained (see `server.rs`).
    pub fn spawn(self: Arc<Self>, every: Duration, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticker.tick() => self.flush_logged().await,
                }
            }
        })
    }

    /// [`UsageFlusher::flush`], logging a failure instead of returning it.
    pub async fn flush_logged(&self) {
        if let Err(e) = self.flush().await {
            let pending = self.pending_len().await;
            tracing::warn!(error = %e, pending, "usage flush failed; keeping the counts for the next try");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ManualClock;
    use chrono::TimeZone;

    fn recorder(at: DateTime<Utc>) -> (Arc<ManualClock>, UsageRecorder) {
        let clock = Arc::new(ManualClock::new(at));
        (clock.clone(), UsageRecorder::new(clock))
    }

    #[test]
    fn counts_per_outcome_and_latest_use() {
        let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 10, 15, 0).unwrap();
        let (clock, rec) = recorder(t0);
        let a = KeyId::generate();
        rec.record(&a, Outcome::Allowed);
        rec.record(&a, Outcome::Allowed);
        clock.advance(Duration::from_secs(5));
        rec.record(&a, Outcome::Denied);
        rec.record(&a, Outcome::RateLimited);
        let out = rec.drain();
        assert_eq!(out.len(), 1);
        let d = &out[0];
        assert_eq!(d.key_id, a);
        assert_eq!(d.hour, Utc.with_ymd_and_hms(2030, 1, 1, 10, 0, 0).unwrap());
        assert_eq!(
            d.counts,
            UsageCounts {
                allowed: 2,
                denied: 1,
                rate_limited: 1
            }
        );
        assert_eq!(d.last_used_at, Some(t0 + chrono::Duration::seconds(5)));
        assert!(rec.drain().is_empty(), "a drain takes everything");
    }

    #[test]
    fn an_hour_turn_keeps_both_hours_apart() {
        let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 10, 59, 59).unwrap();
        let (clock, rec) = recorder(t0);
        let a = KeyId::generate();
        rec.record(&a, Outcome::Allowed);
        clock.advance(Duration::from_secs(2));
        rec.record(&a, Outcome::Allowed);
        rec.record(&a, Outcome::Allowed);
        let mut out = rec.drain();
        out.sort_by_key(|d| d.hour);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].hour.timestamp() % 3600, 0);
        assert_eq!(out[0].counts.allowed, 1);
        assert_eq!(out[0].last_used_at, None);
        assert_eq!(out[1].hour - out[0].hour, chrono::Duration::hours(1));
        assert_eq!(out[1].counts.allowed, 2);
        assert!(out[1].last_used_at.is_some());
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let (_clock, rec) = recorder(Utc::now());
        let a = KeyId::generate();
        rec.record(&a, Outcome::Allowed);
        assert_eq!(rec.drain().len(), 1);
        for _ in 0..IDLE_FLUSHES {
            assert!(rec.drain().is_empty());
        }
        assert_eq!(rec.tracked_keys(), 0);
    }

    /// Cost of `record` for a known key: `cargo test --release --lib
    /// record_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn record_cost() {
        let rec = Arc::new(UsageRecorder::new(Arc::new(crate::keys::SystemClock)));
        let keys: Vec<KeyId> = (0..1000).map(|_| KeyId::generate()).collect();
        for k in &keys {
            rec.record(k, Outcome::Allowed);
        }
        const N: usize = 2_000_000;
        for threads in [1usize, 2] {
            let started = std::time::Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let rec = rec.clone();
                    let keys = keys.clone();
                    std::thread::spawn(move || {
                        for i in 0..N {
                            // Half the requests hit one hot key.
                            let k = if i % 2 == 0 {
                                &keys[0]
                            } else {
                                &keys[(i + t) % keys.len()]
                            };
                            rec.record(k, Outcome::Allowed);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let per = started.elapsed() / (N * threads) as u32;
            eprintln!(
                "record: {threads} thread(s), {per:?} per call (wall / calls per thread: {:?})",
                started.elapsed() / N as u32
            );
        }
        let drained: u64 = rec.drain().iter().map(|d| d.counts.allowed).sum();
        assert_eq!(drained, 1000 + 3 * N as u64);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let (_clock, rec) = recorder(Utc::now());
        let rec = Arc::new(rec);
        let keys: Vec<KeyId> = (0..4).map(|_| KeyId::generate()).collect();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let rec = rec.clone();
                let keys = keys.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000 {
                        rec.record(&keys[(i + t) % keys.len()], Outcome::Allowed);
                    }
                })
            })
            .collect();
        let mut total = 0;
        for t in threads {
            t.join().unwrap();
        }
        for d in rec.drain() {
            total += d.counts.allowed;
        }
        assert_eq!(total, 40_000);
    }
}
