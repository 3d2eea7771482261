//! Shared limits (`rate_limit.backend: redis`): one GCRA bucket per limit and
//! key in Redis, spent through local leases so that a request almost never
//! waits for Redis.
//!
//! # Why leases
//!
//! Asking Redis on every request (one `EVALSHA` of a GCRA script) puts a
//! round trip on the request path plus the client and server work around it:
//! `cargo bench --bench ratelimit` measures 89 µs per check that way (one
//! sequential round trip, Redis on localhost, 2-core VM) against 0.2 µs for a
//! leased cell. That latency would land on every request, and the client and
//! Redis work behind it on the same cores as the proxy. So each instance
//! holds, per (limit, key), a small **lease** of cells taken from the shared
//! bucket, and spends them locally.
//!
//! # The scheme
//!
//! - The bucket lives at `<prefix>{kg}:rl:k:<key id>` (key limits) or
//!   `<prefix>{kg}:rl:r:<route>:<key id>` (route limits): the store's hash tag,
//!   so every name is in the store's Redis Cluster slot. It holds the GCRA
//!   theoretical arrival time in microseconds of Redis server time (`TIME`, so
//!   instance clocks do not matter) and expires once the bucket is full again.
//! - [`GRANT_LUA`] atomically grants up to `n` cells (fewer when the bucket
//!   holds fewer), and reports what is left, how long until the next cell and
//!   how long until the bucket is full.
//! - The lease size follows the key's rate: the cells earned in
//!   [`LEASE_WINDOW`] (20 ms), at least 1 and at most 1/8 of the burst. When a
//!   lease falls to half its size a refill is requested in the background, so
//!   a steady client never waits. A request that finds the lease empty waits
//!   for the refill (one round trip) unless Redis said the bucket is empty
//!   until some time, in which case it is refused at once with that time as
//!   `Retry-After`: refused requests cost no round trip. The wait is bounded
//!   by the refill's own deadline ([`OP_TIMEOUT`]); deciding locally sooner
//!   would hand out a fresh per-instance bucket whenever Redis is merely slow,
//!   which is exactly the over-admission sharing is meant to prevent.
//! - Leased cells are good for [`LEASE_TTL`] (1 s); unused ones are dropped.
//!   They are not handed back: by then the bucket may have refilled past
//!   them, and subtracting them from its arrival time would refund cells that
//!   other instances were granted since (this over-admitted by ~1% in the
//!   three-instance test before it was removed).
//!
//! # Accuracy
//!
//! Redis is the single source of truth: no instance admits a request without
//! a cell granted by the script, so the total admitted over any period never
//! exceeds the bucket's allowance (`burst + rate x period`) by more than the
//! cells leased before the period began (at most one lease per instance,
//! which the 1 s lease expiry bounds in time). The error is the other way:
//! cells leased but not yet spent when the period ends or when a key goes
//! idle for a second, at most one lease (plus one refill in flight) per
//! instance. With 100/s and a burst of 100 a lease is 2 cells, so 3 instances
//! driven at 3x the limit for 5 s admit the allowance of 600 minus at most
//! ~12, within -2%; the integration test measures and prints it.
//!
//! `RateLimit` header values are approximate in this mode: `r` is the cells
//! in this instance's lease plus what the bucket held at the last refill.
//!
//! # When Redis is unreachable
//!
//! A failed or timed-out refill switches the limiter to the local (per
//! instance) limits of [`LocalLimiter`], logged once as a warning; a request
//! never fails because of the limiter. The maintenance task pings Redis every
//! [`PROBE_EVERY`]; once it answers, leases are dropped and limits are shared
//! again, logged once. While degraded, N instances admit up to N times a
//! limit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::Script;
use tokio::sync::Notify;

use super::hash::FastHash;
use super::local::LocalLimiter;
use super::{Scope, Verdict};
use crate::keys::{KeyId, RateLimitSpec};
use crate::store::redis_conn::{HASH_TAG, OP_TIMEOUT, RedisConn, RedisEndpoint};

/// Cells a lease holds: what the key earns in this time.
pub const LEASE_WINDOW: Duration = Duration::from_millis(20);
/// How long leased cells may be spent; unused ones are dropped after it.
pub const LEASE_TTL: Duration = Duration::from_secs(1);
/// How often Redis is pinged while the limiter is degraded.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Leases unused this long are dropped by the sweep.
const LEASE_IDLE: Duration = Duration::from_secs(30);
/// Upper bound on one lease.
const LEASE_MAX: u32 = 1000;
/// Slack on top of a refill's own deadline before a waiting request gives up.
const WAIT_SLACK: Duration = Duration::from_millis(100);

/// Grants cells of one GCRA bucket.
///
/// `KEYS[1]`: the bucket (theoretical arrival time, integer microseconds of
/// Redis `TIME`). ARGV: emission interval in µs, tolerance in µs (interval x
/// (burst - 1)), cells wanted.
/// Returns {granted, left in the bucket, µs until the next cell when none is
/// left (else 0), µs until the bucket is full}.
pub const GRANT_LUA: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local avail = math.floor((now + tau + t - tat) / t + 1e-6)
if avail < 0 then avail = 0 end
local grant = math.min(want, avail)
tat = tat + grant * t
local left = math.floor((now + tau + t - tat) / t + 1e-6)
if left < 0 then left = 0 end
local wait = 0
if left == 0 then wait = math.max(0, tat - tau - now) end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
return {grant, left, math.ceil(wait), math.ceil(tat - now)}
";

/// What one script call answered.
#[derive(Debug, Clone, Copy)]
struct Grant {
    granted: u32,
    left: u32,
    next_cell: Duration,
    full: Duration,
}

/// Cells of one bucket held by this instance.
struct Lease {
    state: Mutex<LeaseState>,
    /// Woken when a refill lands.
    refilled: Notify,
    redis_key: String,
}

struct LeaseState {
    tokens: u32,
    /// Leased cells are spendable until then.
    expires: Instant,
    /// Redis said the bucket is empty until then.
    empty_until: Option<Instant>,
    refill_in_flight: bool,
    /// What the bucket held at the last refill, and when it will be full.
    bucket_left: u32,
    full_at: Instant,
    last_used: Instant,
}

enum Take {
    Done { verdict: Verdict, refill: bool },
    Wait { refill: bool },
}

impl LeaseState {
    fn new(now: Instant) -> LeaseState {
        LeaseState {
            tokens: 0,
            expires: now,
            empty_until: None,
            refill_in_flight: false,
            bucket_left: 0,
            full_at: now,
            last_used: now,
        }
    }

    fn take(&mut self, now: Instant, spec: RateLimitSpec) -> Take {
        self.last_used = now;
        if self.tokens > 0 && now >= self.expires {
            self.tokens = 0;
        }
        let empty_until = self.empty_until.filter(|&until| until > now);
        if self.tokens > 0 {
            self.tokens -= 1;
            let refill = !self.refill_in_flight
                && empty_until.is_none()
                && self.tokens <= lease_size(spec) / 2;
            self.refill_in_flight |= refill;
            let verdict = Verdict::Allowed {
                remaining: self.tokens.saturating_add(self.bucket_left).min(spec.burst),
                reset: self.full_at.saturating_duration_since(now),
            };
            return Take::Done { verdict, refill };
        }
        if let Some(until) = empty_until {
            let wait = until - now;
            let verdict = Verdict::Refused {
                wait,
                reset: self.full_at.saturating_duration_since(now).max(wait),
            };
            return Take::Done {
                verdict,
                refill: false,
            };
        }
        let refill = !self.refill_in_flight;
        self.refill_in_flight = true;
        Take::Wait { refill }
    }

    fn apply(&mut self, now: Instant, g: Grant) {
        if g.granted > 0 {
            self.tokens += g.granted;
            self.expires = now + LEASE_TTL;
        }
        self.bucket_left = g.left;
        self.full_at = now + g.full;
        self.empty_until = (g.left == 0).then(|| now + g.next_cell);
    }

    /// How long until this lease (or the bucket behind it) has a cell, as far
    /// as this instance knows.
    fn peek(&self, now: Instant) -> Duration {
        if self.tokens > 0 && now < self.expires {
            return Duration::ZERO;
        }
        self.empty_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}

impl Lease {
    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        // The state is plain numbers, consistent after every statement: a
        // panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Cells per lease for `spec`: what it earns in [`LEASE_WINDOW`], at least 1,
/// at most 1/8 of the burst (so a few instances cannot hold the whole burst).
pub fn lease_size(spec: RateLimitSpec) -> u32 {
    let by_rate = (u64::from(spec.per_second) * LEASE_WINDOW.as_millis() as u64).div_ceil(1000);
    let by_burst = u64::from(spec.burst).div_ceil(8);
    by_rate.min(by_burst).clamp(1, u64::from(LEASE_MAX)) as u32
}

type LeaseKey = (Option<Arc<str>>, KeyId);

/// Limits shared by every instance on one Redis.
pub struct SharedLimiter {
    conn: RedisConn,
    script: Script,
    /// `<prefix>{kg}:rl:`
    base: String,
    leases: DashMap<LeaseKey, Arc<Lease>, FastHash>,
    fallback: LocalLimiter,
    degraded: AtomicBool,
}

impl SharedLimiter {
    /// A limiter on the single Redis at `url`, naming its buckets under
    /// `prefix`. Connects lazily: an unreachable Redis makes the first refill
    /// fail and the limiter start degraded, it does not stop keygate from
    /// starting.
    pub fn new(url: &str, prefix: &str) -> Result<SharedLimiter, String> {
        SharedLimiter::on(&RedisEndpoint::new(url, false)?, prefix)
    }

    /// Like [`SharedLimiter::new`] on any endpoint (a single Redis or a Redis
    /// Cluster: buckets carry the store's hash tag, so they live in its slot).
    pub fn on(endpoint: &RedisEndpoint, prefix: &str) -> Result<SharedLimiter, String> {
        let conn = endpoint
            .connect_lazy()
            .map_err(|e| format!("cannot set up the redis connection: {}", e.category()))?;
        Ok(SharedLimiter {
            conn,
            script: Script::new(GRANT_LUA),
            base: format!("{prefix}{HASH_TAG}:rl:"),
            leases: DashMap::default(),
            fallback: LocalLimiter::new(),
            degraded: AtomicBool::new(false),
        })
    }

    /// The Redis name of a bucket.
    pub fn bucket_name(&self, scope: Scope<'_>, key: &KeyId) -> String {
        match scope {
            Scope::Key => format!("{}k:{}", self.base, key.text().as_str()),
            Scope::Route(route) => format!("{}r:{route}:{}", self.base, key.text().as_str()),
        }
    }

    /// Whether limits are per instance because Redis is unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    fn lease(&self, scope: Scope<'_>, key: &KeyId) -> Arc<Lease> {
        let route = match scope {
            Scope::Key => None,
            Scope::Route(r) => Some(r.clone()),
        };
        let k = (route, *key);
        if let Some(l) = self.leases.get(&k) {
            return l.clone();
        }
        self.leases
            .entry(k)
            .or_insert_with(|| {
                Arc::new(Lease {
                    state: Mutex::new(LeaseState::new(Instant::now())),
                    refilled: Notify::new(),
                    redis_key: self.bucket_name(scope, key),
                })
            })
            .clone()
    }

    /// Spends one cell of `spec` for `key` in `scope`.
    pub async fn check(
        self: &Arc<Self>,
        scope: Scope<'_>,
        key: &KeyId,
        spec: RateLimitSpec,
    ) -> Verdict {
        if self.is_degraded() {
            return self.fallback.check(scope, key, spec);
        }
        let lease = self.lease(scope, key);
        // A refill ends within OP_TIMEOUT, degrading the limiter if Redis
        // failed; the slack only guards against a lost wake-up.
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT + WAIT_SLACK;
        loop {
            // Registered before the state is read: a refill that lands
            // between the read and the wait still wakes us.
            let refilled = lease.refilled.notified();
            let take = lease.lock().take(Instant::now(), spec);
            match take {
                Take::Done { verdict, refill } => {
                    if refill {
                        self.spawn_refill(lease.clone(), spec);
                    }
                    return verdict;
                }
                Take::Wait { refill } => {
                    if refill {
                        self.spawn_refill(lease.clone(), spec);
                    }
                }
            }
            // Woken by the refill; the cells may have gone to other waiters,
            // in which case the next round asks again.
            if tokio::time::timeout_at(deadline, refilled).await.is_err() || self.is_degraded() {
                break;
            }
        }
        self.fallback.check(scope, key, spec)
    }

    /// How long until `key` has a cell in `scope`, spending nothing.
    pub fn peek(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Duration {
        if self.is_degraded() {
            return self.fallback.peek(scope, key, spec);
        }
        self.lease(scope, key).lock().peek(Instant::now())
    }

    /// Returns a cell spent by a request that another limit then refused.
    pub fn give_back(&self, scope: Scope<'_>, key: &KeyId) {
        if self.is_degraded() {
            return;
        }
        self.lease(scope, key).lock().tokens += 1;
    }

    fn spawn_refill(self: &Arc<Self>, lease: Arc<Lease>, spec: RateLimitSpec) {
        let this = self.clone();
        tokio::spawn(async move { this.refill(&lease, spec).await });
    }

    async fn refill(&self, lease: &Lease, spec: RateLimitSpec) {
        let answer = self.grant(&lease.redis_key, spec, lease_size(spec)).await;
        let now = Instant::now();
        {
            let mut st = lease.lock();
            st.refill_in_flight = false;
            if let Ok(g) = answer {
                st.apply(now, g);
            }
        }
        if let Err(e) = answer {
            self.degrade(&e);
        }
        lease.refilled.notify_waiters();
    }

    /// One script call: up to `want` cells of `spec` from bucket `key`.
    async fn grant(&self, key: &str, spec: RateLimitSpec, want: u32) -> Result<Grant, String> {
        let interval_us = 1e6 / f64::from(spec.per_second.max(1));
        let tolerance_us = interval_us * f64::from(spec.burst.max(1) - 1);
        let mut conn = self.conn.clone();
        let mut call = self.script.key(key);
        call.arg(interval_us).arg(tolerance_us).arg(want);
        let reply: (i64, i64, i64, i64) =
            match tokio::time::timeout(OP_TIMEOUT, call.invoke_async(&mut conn)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(describe(&e)),
                Err(_) => {
                    return Err(format!(
                        "redis did not answer within {} ms",
                        OP_TIMEOUT.as_millis()
                    ));
                }
            };
        let (granted, left, next_us, full_us) = reply;
        let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(Grant {
            granted: u32::try_from(granted).unwrap_or(0),
            left: u32::try_from(left).unwrap_or(0),
            next_cell: micros(next_us),
            full: micros(full_us),
        })
    }

    /// One round trip per request, no lease: the scheme leases replace. Kept
    /// for the bench that measures what they save.
    #[doc(hidden)]
    pub async fn check_round_trip(
        &self,
        scope: Scope<'_>,
        key: &KeyId,
        spec: RateLimitSpec,
    ) -> Result<bool, String> {
        let g = self.grant(&self.bucket_name(scope, key), spec, 1).await?;
        Ok(g.granted == 1)
    }

    fn degrade(&self, error: &str) {
        if !self.degraded.swap(true, Ordering::AcqRel) {
            metrics::gauge!("keygate_ratelimit_degraded").set(1.0);
            tracing::warn!(
                error,
                "rate limiter: redis is unreachable; limits are enforced per instance until it is back"
            );
        }
    }

    /// While degraded, checks whether Redis answers again and if so shares
    /// limits again.
    pub async fn probe(&self) {
        if !self.is_degraded() {
            return;
        }
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        match tokio::time::timeout(OP_TIMEOUT, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => {
                // Cells leased from before the outage may be from a Redis
                // that has since lost them: start over.
                self.leases.clear();
                if self.degraded.swap(false, Ordering::AcqRel) {
                    metrics::gauge!("keygate_ratelimit_degraded").set(0.0);
                    tracing::info!(
                        "rate limiter: redis is reachable again; limits are shared across instances again"
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %describe(&e), "rate limiter: redis still unreachable")
            }
            Err(_) => tracing::debug!("rate limiter: redis still not answering"),
        }
    }

    /// Drops idle leases and idle local states; returns how many remain.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        self.leases
            .retain(|_, l| now.saturating_duration_since(l.lock().last_used) < LEASE_IDLE);
        self.leases.len() + self.fallback.sweep()
    }
}

/// A short, secret-free description of a Redis failure.
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "redis timed out".to_owned()
    } else if e.is_connection_refusal() {
        "redis refused the connection".to_owned()
    } else if e.is_connection_dropped() || e.is_io_error() {
        "redis connection lost".to_owned()
    } else {
        // Scripts carry only key ids and numbers; cap the length anyway.
        let mut s = format!("redis: {e}");
        if s.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| s.is_char_boundary(i))
                .unwrap_or(0);
            s.truncate(cut);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(per_second: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec { per_second, burst }
    }

    #[test]
    fn lease_size_follows_the_rate_within_the_burst() {
        assert_eq!(lease_size(spec(100, 100)), 2);
        assert_eq!(lease_size(spec(1, 10)), 1);
        assert_eq!(lease_size(spec(10_000, 10_000)), 200);
        assert_eq!(lease_size(spec(10_000, 16)), 2);
        assert_eq!(lease_size(spec(u32::MAX, u32::MAX)), LEASE_MAX);
    }

    #[test]
    fn lease_spends_refills_and_refuses_without_a_round_trip() {
        let s = spec(100, 100);
        let t0 = Instant::now();
        let mut st = LeaseState::new(t0);
        // Cold: the first request waits for a refill, the next joins it.
        assert!(matches!(st.take(t0, s), Take::Wait { refill: true }));
        assert!(matches!(st.take(t0, s), Take::Wait { refill: false }));
        st.refill_in_flight = false;
        st.apply(
            t0,
            Grant {
                granted: 2,
                left: 98,
                next_cell: Duration::ZERO,
                full: Duration::from_millis(20),
            },
        );
        // The first cell of two brings the lease to half: refill early, once.
        assert!(matches!(
            st.take(t0, s),
            Take::Done {
                verdict: Verdict::Allowed { remaining: 99, .. },
                refill: true
            }
        ));
        assert!(matches!(
            st.take(t0, s),
            Take::Done {
                verdict: Verdict::Allowed { remaining: 98, .. },
                refill: false
            }
        ));
        st.refill_in_flight = false;
        // Redis: nothing left, next cell in 10 ms.
        st.apply(
            t0,
            Grant {
                granted: 0,
                left: 0,
                next_cell: Duration::from_millis(10),
                full: Duration::from_secs(1),
            },
        );
        assert_eq!(st.peek(t0), Duration::from_millis(10));
        match st.take(t0, s) {
            Take::Done {
                verdict: Verdict::Refused { wait, reset },
                refill: false,
            } => {
                assert_eq!(wait, Duration::from_millis(10));
                assert_eq!(reset, Duration::from_secs(1));
            }
            _ => panic!("an empty bucket must refuse at once"),
        }
        // Once the next cell is due, ask again.
        let later = t0 + Duration::from_millis(10);
        assert!(matches!(st.take(later, s), Take::Wait { refill: true }));
    }

    #[test]
    fn expired_cells_are_dropped() {
        let s = spec(1000, 1000);
        let t0 = Instant::now();
        let mut st = LeaseState::new(t0);
        st.apply(
            t0,
            Grant {
                granted: 5,
                left: 10,
                next_cell: Duration::ZERO,
                full: Duration::ZERO,
            },
        );
        // 4 of a 20-cell lease left: a refill is asked for.
        assert!(matches!(st.take(t0, s), Take::Done { refill: true, .. }));
        st.refill_in_flight = false;
        let later = t0 + LEASE_TTL;
        assert!(matches!(st.take(later, s), Take::Wait { refill: true }));
        assert_eq!(st.tokens, 0);
    }
}
