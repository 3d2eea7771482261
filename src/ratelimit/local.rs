//! In-process limits: governor's keyed GCRA limiters.
//!
//! One governor limiter exists per distinct [`RateLimitSpec`] (a quota is
//! fixed for a limiter's life), keyed by key id; route limits have one such
//! set of limiters per route name. A key whose spec is changed (PATCH)
//! therefore moves to another limiter and starts with a full bucket; its old
//! state is dropped by the next sweep.
//!
//! Memory is bounded by [`LocalLimiter::sweep`], called on a timer: governor's
//! `retain_recent` drops every state that is indistinguishable from a full
//! bucket, so only keys seen within about one refill time plus one sweep
//! interval are held, however many distinct keys pass through. Limiters left
//! without states are dropped too.
//!
//! Governor offers no way to look at a state without spending a cell, but
//! "would this pass?" is needed twice: to choose the longest `Retry-After`
//! when several limits refuse, and to refuse an IP that has failed too often
//! *before* its next attempt is checked. [`KeyedGcra`] therefore keeps a
//! second handle on the limiter's state map (governor's `StateStore` is
//! implemented for a shared map) and reads the theoretical arrival time from
//! it ([`KeyedGcra::peek`]).

use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::HeaderValue;

use super::hash::FastHash;
use super::{Scope, Verdict};
use crate::keys::{KeyId, RateLimitSpec};

/// The governor quota of a spec. Specs are validated to be at least 1; a zero
/// that slipped through is treated as 1 rather than panicking.
pub fn quota(spec: RateLimitSpec) -> Quota {
    let per_second = NonZeroU32::new(spec.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// A governor state store shared between the limiter and its owner.
struct SharedStates<K: Hash + Eq, S>(Arc<DashMap<K, InMemoryState, S>>);

impl<K: Hash + Eq + Clone, S: BuildHasher + Clone> StateStore for SharedStates<K, S> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        StateStore::measure_and_replace(&*self.0, key, f)
    }
}

impl<K: Hash + Eq + Clone, S: BuildHasher + Clone> ShrinkableKeyedStateStore<K>
    for SharedStates<K, S>
{
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One keyed GCRA limiter with a fixed quota, plus a way to peek at a key.
/// `S` hashes the keys: a fast hash for server-issued ones, `RandomState`
/// for client-controlled ones.
pub struct KeyedGcra<K: Hash + Eq + Clone, C: Clock, S: BuildHasher + Clone = RandomState> {
    limiter: RateLimiter<K, SharedStates<K, S>, C, StateInformationMiddleware>,
    states: Arc<DashMap<K, InMemoryState, S>>,
    clock: C,
    /// When the limiter started, read just before governor reads its own
    /// start, so peeks see the future at most a few nanoseconds too early.
    start: C::Instant,
    /// Time to earn one cell.
    interval: Duration,
    burst: u32,
}

impl<K, C, S> KeyedGcra<K, C, S>
where
    K: Hash + Eq + Clone,
    C: Clock + Clone,
    S: BuildHasher + Clone + Default,
{
    pub fn new(quota: Quota, clock: C) -> KeyedGcra<K, C, S> {
        let states = Arc::new(DashMap::with_hasher(S::default()));
        let start = clock.now();
        let limiter: RateLimiter<K, SharedStates<K, S>, C, StateInformationMiddleware> =
            RateLimiter::new(quota, SharedStates(states.clone()), clock.clone());
        KeyedGcra {
            limiter,
            states,
            clock,
            start,
            interval: quota.replenish_interval(),
            burst: quota.burst_size().get(),
        }
    }

    /// Spends one cell for `key` if it has one.
    pub fn check(&self, key: &K) -> Verdict {
        match self.limiter.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Verdict::Allowed {
                    remaining,
                    reset: self.interval * self.burst.saturating_sub(remaining),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Verdict::Refused {
                    wait,
                    reset: wait + self.tolerance(),
                }
            }
        }
    }

    /// How long until `key` has a cell, without spending one (zero: now).
    pub fn peek(&self, key: &K) -> Duration {
        let Some(state) = self.states.get(key) else {
            return Duration::ZERO;
        };
        // The closure refuses to replace anything; it only hands the
        // theoretical arrival time (nanoseconds since `start`) out.
        let tat = match state.measure_and_replace(&NotKeyed::NonKey, |tat| {
            Err::<((), Nanos), Option<Nanos>>(tat)
        }) {
            Err(Some(tat)) => tat,
            Err(None) | Ok(()) => return Duration::ZERO,
        };
        let now = self.clock.now().duration_since(self.start);
        let earliest = tat.saturating_sub(Nanos::from(self.tolerance()));
        earliest.saturating_sub(now).into()
    }

    /// The time a full bucket holds beyond one cell.
    fn tolerance(&self) -> Duration {
        self.interval * self.burst.saturating_sub(1)
    }

    /// Drops the states of keys whose bucket is full again; returns how many
    /// states are left.
    pub fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        let len = self.states.len();
        if len.saturating_mul(4) < self.states.capacity() {
            self.states.shrink_to_fit();
        }
        len
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// The limiter of one spec, keyed by key id, and the `RateLimit-Policy`
/// value of a key limit with that spec (set on first use; route limiters
/// leave it empty).
pub struct SpecLimiter<C: Clock> {
    gcra: KeyedGcra<KeyId, C, FastHash>,
    key_policy: OnceLock<HeaderValue>,
}

/// Limiters by spec.
type BySpec<C> = DashMap<RateLimitSpec, SpecLimiter<C>, FastHash>;

/// Key and route limits of one instance.
pub struct LocalLimiter<C: Clock = DefaultClock> {
    clock: C,
    keys: BySpec<C>,
    /// By route name (looked up as `&str`, so a check clones nothing).
    routes: DashMap<Arc<str>, BySpec<C>, FastHash>,
}

impl LocalLimiter<DefaultClock> {
    pub fn new() -> LocalLimiter<DefaultClock> {
        LocalLimiter::with_clock(DefaultClock::default())
    }
}

impl Default for LocalLimiter<DefaultClock> {
    fn default() -> Self {
        LocalLimiter::new()
    }
}

impl<C: Clock + Clone> LocalLimiter<C> {
    pub fn with_clock(clock: C) -> LocalLimiter<C> {
        LocalLimiter {
            clock,
            keys: DashMap::default(),
            routes: DashMap::default(),
        }
    }

    /// Spends one cell of `spec` for `key` in `scope`.
    pub fn check(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Verdict {
        match scope {
            Scope::Key => with_limiter(&self.keys, spec, &self.clock, |l| l.gcra.check(key)),
            Scope::Route(route) => {
                if let Some(by_spec) = self.routes.get::<str>(route) {
                    return with_limiter(&by_spec, spec, &self.clock, |l| l.gcra.check(key));
                }
                let by_spec = self.routes.entry(route.clone()).or_default().downgrade();
                with_limiter(&by_spec, spec, &self.clock, |l| l.gcra.check(key))
            }
        }
    }

    /// [`LocalLimiter::check`] of a key limit, also returning the limit's
    /// policy value (made by `policy` the first time a spec is seen).
    pub fn check_key_with_policy(
        &self,
        key: &KeyId,
        spec: RateLimitSpec,
        policy: impl FnOnce() -> HeaderValue,
    ) -> (Verdict, HeaderValue) {
        with_limiter(&self.keys, spec, &self.clock, |l| {
            (l.gcra.check(key), l.key_policy.get_or_init(policy).clone())
        })
    }

    /// How long until `key` has a cell of `spec` in `scope`, spending nothing.
    pub fn peek(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Duration {
        match scope {
            Scope::Key => self
                .keys
                .get(&spec)
                .map_or(Duration::ZERO, |l| l.gcra.peek(key)),
            Scope::Route(route) => self
                .routes
                .get::<str>(route)
                .and_then(|by_spec| by_spec.get(&spec).map(|l| l.gcra.peek(key)))
                .unwrap_or(Duration::ZERO),
        }
    }

    /// Drops idle states and empty limiters; returns how many states remain.
    pub fn sweep(&self) -> usize {
        let mut live = sweep_specs(&self.keys);
        self.routes.retain(|_, by_spec| {
            live += sweep_specs(by_spec);
            !by_spec.is_empty()
        });
        live
    }

    /// Number of key and route states held.
    pub fn len(&self) -> usize {
        let count = |m: &BySpec<C>| m.iter().map(|l| l.gcra.len()).sum::<usize>();
        count(&self.keys) + self.routes.iter().map(|m| count(&m)).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sweeps every limiter of a map, dropping the empty ones; returns the
/// number of states left.
fn sweep_specs<C: Clock + Clone>(map: &BySpec<C>) -> usize {
    let mut live = 0;
    map.retain(|_, l| {
        let n = l.gcra.sweep();
        live += n;
        n > 0
    });
    live
}

/// Runs `f` on the limiter for `spec`, creating it on first use. The check
/// runs under the map's shard read lock, which saves an `Arc` round trip per
/// request; only the creation of a new spec's limiter and the sweep write.
fn with_limiter<C: Clock + Clone, T>(
    map: &BySpec<C>,
    spec: RateLimitSpec,
    clock: &C,
    f: impl FnOnce(&SpecLimiter<C>) -> T,
) -> T {
    if let Some(l) = map.get(&spec) {
        return f(&l);
    }
    let l = map
        .entry(spec)
        .or_insert_with(|| SpecLimiter {
            gcra: KeyedGcra::new(quota(spec), clock.clone()),
            key_policy: OnceLock::new(),
        })
        .downgrade();
    f(&l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(per_second: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec { per_second, burst }
    }

    fn key(n: u32) -> KeyId {
        KeyId::parse(&format!("key_01ARZ3NDEKTSV4RRFFQ69G5{n:03}")).unwrap()
    }

    fn allowed(v: Verdict) -> bool {
        matches!(v, Verdict::Allowed { .. })
    }

    /// 100/s with a burst of 100, driven at 400/s for 5 s on a fake clock,
    /// admits the burst plus 5 s of refill: 100 + 5 x 100, less the one cell
    /// that would have been earned at exactly 5.000 s (the last request
    /// arrives at 4.9975 s).
    #[test]
    fn local_accuracy_at_four_times_the_limit() {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let k = key(1);
        let mut admitted = 0;
        for _ in 0..2000 {
            if allowed(limiter.check(Scope::Key, &k, spec(100, 100))) {
                admitted += 1;
            }
            clock.advance(Duration::from_micros(2500));
        }
        println!("local accuracy (fake clock): admitted {admitted} of 2000, allowance 600");
        assert_eq!(admitted, 599);
    }

    #[test]
    fn remaining_and_reset_follow_the_bucket() {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let k = key(2);
        let s = spec(2, 4);
        assert_eq!(
            limiter.check(Scope::Key, &k, s),
            Verdict::Allowed {
                remaining: 3,
                reset: Duration::from_millis(500)
            }
        );
        for remaining in [2, 1, 0] {
            assert!(matches!(
                limiter.check(Scope::Key, &k, s),
                Verdict::Allowed { remaining: r, .. } if r == remaining
            ));
        }
        assert_eq!(
            limiter.check(Scope::Key, &k, s),
            Verdict::Refused {
                wait: Duration::from_millis(500),
                reset: Duration::from_millis(2000)
            }
        );
        assert_eq!(limiter.peek(Scope::Key, &k, s), Duration::from_millis(500));
        clock.advance(Duration::from_millis(200));
        assert_eq!(limiter.peek(Scope::Key, &k, s), Duration::from_millis(300));
        clock.advance(Duration::from_millis(300));
        assert_eq!(limiter.peek(Scope::Key, &k, s), Duration::ZERO);
        assert!(allowed(limiter.check(Scope::Key, &k, s)));
        // Peeking never spends: the bucket is empty again, not overdrawn.
        assert_eq!(limiter.peek(Scope::Key, &k, s), Duration::from_millis(500));
        assert_eq!(limiter.peek(Scope::Key, &key(3), s), Duration::ZERO);
    }

    #[test]
    fn scopes_and_specs_are_separate_buckets() {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock);
        let k = key(4);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let s = spec(1, 1);
        assert!(allowed(limiter.check(Scope::Key, &k, s)));
        assert!(!allowed(limiter.check(Scope::Key, &k, s)));
        assert!(allowed(limiter.check(Scope::Route(&a), &k, s)));
        assert!(!allowed(limiter.check(Scope::Route(&a), &k, s)));
        assert!(allowed(limiter.check(Scope::Route(&b), &k, s)));
        assert!(allowed(limiter.check(Scope::Key, &key(5), s)));
        // A changed spec (PATCH) is a fresh bucket.
        assert!(allowed(limiter.check(Scope::Key, &k, spec(1, 2))));
    }

    /// A million distinct keys, each seen once: once their buckets have
    /// refilled the sweep leaves nothing behind.
    #[test]
    fn sweep_bounds_memory() {
        let clock = FakeRelativeClock::default();
        let limiter = LocalLimiter::with_clock(clock.clone());
        let s = spec(50, 100);
        let route: Arc<str> = "r".into();
        let keys: Vec<KeyId> = (0..1_000_000u32)
            .map(|i| KeyId::parse(&format!("key_01ARZ3NDEKTSV4RRFF{i:08}")).unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            limiter.check(Scope::Key, k, s);
            if i % 10 == 0 {
                limiter.check(Scope::Route(&route), k, spec(1, 1));
            }
        }
        assert_eq!(limiter.len(), 1_100_000);
        // Nothing has refilled yet: everything stays.
        assert_eq!(limiter.sweep(), 1_100_000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(limiter.sweep(), 0);
        assert!(limiter.is_empty());
        assert!(limiter.keys.is_empty() && limiter.routes.is_empty());
    }
}
