//! Rate limits: which limits apply to a request, whether it may pass, and the
//! `RateLimit-Policy` / `RateLimit` fields that tell the client.
//!
//! Two limits can apply to a keyed request (DESIGN.md section 2): the key's
//! own `rate_limit` (or `rate_limit.default` when it has none), which caps the
//! key across all routes, and the route's `rate_limit`, which caps each key
//! separately on that route. A request must pass both; when several refuse, the
//! answer carries the longest `Retry-After`. The specs are read from the live
//! config and the cached key on every request, so a reload or a PATCH applies
//! at once.
//!
//! The stage runs after authorization and before the request is rewritten
//! (DESIGN.md section 8). Order within it: when a route limit applies, the
//! key's bucket is peeked first (a request the key limit refuses spends no
//! route cell), then the route's cell is spent, then the key's.
//!
//! Backends: [`local`] (governor's keyed GCRA, per instance) and [`redis`]
//! (one bucket per key in Redis, spent through local leases; falls back to
//! `local` while Redis is unreachable). [`failures`] counts failed
//! authentications per client IP (`rate_limit.failed_auth_per_ip`), and
//! [`headers`] builds the response fields.
//!
//! Memory: every per-key and per-IP state is dropped by a sweep on a timer
//! ([`RateLimits::spawn_maintenance`]) once its bucket is full again, so
//! millions of distinct keys or addresses cannot grow memory without bound.

pub mod failures;
mod hash;
pub mod headers;
pub mod local;
pub mod redis;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RateLimitBackend, StoreBackend};
use crate::error::GatewayError;
use crate::keys::{KeyId, RateLimitSpec};
use crate::store::redis_conn::RedisEndpoint;
pub use failures::{FailedAuth, client_ip};
pub use hash::FastHash;
use headers::{CurrentTable, PolicyCache, ceil_secs};
pub use headers::{Policy, RateHeaders};
use http::HeaderValue;
pub use local::LocalLimiter;
pub use redis::SharedLimiter;

/// How often idle states are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Which bucket family a check is about.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// The key's own limit, across all routes.
    Key,
    /// The limit of the named route, for this key.
    Route(&'a Arc<str>),
}

/// What one limit said about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Passed, leaving `remaining` cells; the bucket is full again after `reset`.
    Allowed { remaining: u32, reset: Duration },
    /// Refused: the next cell comes after `wait`, a full bucket after `reset`.
    Refused { wait: Duration, reset: Duration },
}

/// The answer of the rate-limit stage.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Sent on the response, allowed or refused.
    pub headers: RateHeaders,
    /// `Some` when refused: how long until every limit has a cell again.
    pub retry_after: Option<Duration>,
}

impl Decision {
    /// The answer when `item` is the policy to report and `verdict` its state.
    fn new(
        currents: &CurrentTable,
        policy: HeaderValue,
        item: Policy,
        verdict: Verdict,
    ) -> Decision {
        match verdict {
            Verdict::Allowed { remaining, reset } => Decision {
                headers: RateHeaders {
                    policy,
                    current: currents.get(item, remaining, reset),
                },
                retry_after: None,
            },
            Verdict::Refused { wait, reset } => {
                metrics::counter!("keygate_rate_limited_total", "limit" => item.name())
                    .increment(1);
                Decision {
                    headers: RateHeaders {
                        policy,
                        current: currents.get(item, 0, reset),
                    },
                    retry_after: Some(wait),
                }
            }
        }
    }

    /// Hands the headers to the response and turns a refusal into the error.
    pub fn finish(self, headers: &mut Option<RateHeaders>) -> Result<(), GatewayError> {
        *headers = Some(self.headers);
        match self.retry_after {
            None => Ok(()),
            Some(wait) => Err(GatewayError::RateLimited {
                retry_after_secs: ceil_secs(wait).max(1),
            }),
        }
    }
}

enum Backend {
    Local(LocalLimiter),
    Shared(Arc<SharedLimiter>),
}

/// What the composition of limits needs from a backend.
trait Cells {
    /// Spends one cell of `spec` for `key` in `scope`.
    async fn spend(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Verdict;
    /// Spends one cell of the key's own limit and returns the policy value
    /// for a request that has no route limit.
    async fn spend_key(
        &self,
        key: &KeyId,
        spec: RateLimitSpec,
        policies: &PolicyCache,
    ) -> (Verdict, HeaderValue) {
        (
            self.spend(Scope::Key, key, spec).await,
            policies.get(spec, None),
        )
    }
    /// How long until a cell is there, spending nothing.
    fn peek(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Duration;
    /// Undoes a spent cell where the backend can (leases can, governor
    /// cannot: the cell is lost, which the peek before the route check makes
    /// rare).
    fn give_back(&self, scope: Scope<'_>, key: &KeyId);
}

impl Cells for LocalLimiter {
    async fn spend(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Verdict {
        self.check(scope, key, spec)
    }

    fn peek(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Duration {
        LocalLimiter::peek(self, scope, key, spec)
    }

    fn give_back(&self, _: Scope<'_>, _: &KeyId) {}
}

impl Cells for Arc<SharedLimiter> {
    async fn spend(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Verdict {
        self.check(scope, key, spec).await
    }

    fn peek(&self, scope: Scope<'_>, key: &KeyId, spec: RateLimitSpec) -> Duration {
        SharedLimiter::peek(self, scope, key, spec)
    }

    fn give_back(&self, scope: Scope<'_>, key: &KeyId) {
        SharedLimiter::give_back(self, scope, key);
    }
}

/// Every rate limit of the data plane.
pub struct RateLimits {
    backend: Backend,
    failures: FailedAuth,
    policies: PolicyCache,
    currents: CurrentTable,
}

impl RateLimits {
    /// Per-instance limits only.
    pub fn local(cfg: &Config) -> RateLimits {
        RateLimits::with_backend(Backend::Local(LocalLimiter::new()), cfg)
    }

    /// The backend the config names: shared through Redis when
    /// `rate_limit.backend: redis` (which needs the Redis store), else local.
    /// Must run inside a Tokio runtime (the Redis connection is made there).
    pub fn from_config(cfg: &Config) -> RateLimits {
        let StoreBackend::Redis {
            url,
            prefix,
            cluster,
        } = &cfg.store.backend
        else {
            if cfg.rate_limit.backend == RateLimitBackend::Redis {
                tracing::warn!(
                    "rate_limit.backend is redis but the store is not; limits are per instance"
                );
            }
            return RateLimits::local(cfg);
        };
        if cfg.rate_limit.backend != RateLimitBackend::Redis {
            return RateLimits::local(cfg);
        }
        let shared = RedisEndpoint::new(url, *cluster).and_then(|e| SharedLimiter::on(&e, prefix));
        match shared {
            Ok(shared) => RateLimits::with_backend(Backend::Shared(Arc::new(shared)), cfg),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "rate limiter: cannot use redis; limits are per instance"
                );
                RateLimits::local(cfg)
            }
        }
    }

    fn with_backend(backend: Backend, cfg: &Config) -> RateLimits {
        RateLimits {
            backend,
            failures: FailedAuth::new(cfg.rate_limit.failed_auth_per_ip_per_minute),
            policies: PolicyCache::default(),
            currents: CurrentTable::default(),
        }
    }

    /// The shared limiter, when limits are shared.
    pub fn shared(&self) -> Option<&Arc<SharedLimiter>> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Shared(s) => Some(s),
        }
    }

    /// Checks and spends every limit that applies to `key` (under `key_spec`)
    /// on a route with `route`'s limit, if it has one.
    pub async fn check(
        &self,
        key: &KeyId,
        key_spec: RateLimitSpec,
        route: Option<(&Arc<str>, RateLimitSpec)>,
    ) -> Decision {
        match (&self.backend, route) {
            // The common case, decided without another state machine.
            (Backend::Local(l), None) => {
                let (verdict, policy) =
                    l.check_key_with_policy(key, key_spec, || self.policies.get(key_spec, None));
                Decision::new(&self.currents, policy, Policy::Key, verdict)
            }
            (Backend::Local(l), Some(_)) => self.compose(l, key, key_spec, route).await,
            // Boxed so that the local path's future stays small: the shared
            // one holds a refill wait and is several times larger.
            (Backend::Shared(s), _) => Box::pin(self.compose(s, key, key_spec, route)).await,
        }
    }

    async fn compose(
        &self,
        cells: &impl Cells,
        key: &KeyId,
        key_spec: RateLimitSpec,
        route: Option<(&Arc<str>, RateLimitSpec)>,
    ) -> Decision {
        let Some((name, route_spec)) = route else {
            // The common case: the key's own limit only.
            let (verdict, policy) = cells.spend_key(key, key_spec, &self.policies).await;
            return Decision::new(&self.currents, policy, Policy::Key, verdict);
        };
        let policy = self.policies.get(key_spec, Some(route_spec));
        let route_scope = Scope::Route(name);
        let key_wait = cells.peek(Scope::Key, key, key_spec);
        if !key_wait.is_zero() {
            let route_wait = cells.peek(route_scope, key, route_spec);
            let (item, wait, spec) = if route_wait > key_wait {
                (Policy::Route, route_wait, route_spec)
            } else {
                (Policy::Key, key_wait, key_spec)
            };
            let reset = full_after(spec, wait);
            return Decision::new(
                &self.currents,
                policy,
                item,
                Verdict::Refused { wait, reset },
            );
        }
        let (route_left, route_reset) = match cells.spend(route_scope, key, route_spec).await {
            refused @ Verdict::Refused { .. } => {
                return Decision::new(&self.currents, policy, Policy::Route, refused);
            }
            Verdict::Allowed { remaining, reset } => (remaining, reset),
        };
        match cells.spend(Scope::Key, key, key_spec).await {
            refused @ Verdict::Refused { .. } => {
                cells.give_back(route_scope, key);
                Decision::new(&self.currents, policy, Policy::Key, refused)
            }
            Verdict::Allowed { remaining, .. } if route_left < remaining => {
                let route = Verdict::Allowed {
                    remaining: route_left,
                    reset: route_reset,
                };
                Decision::new(&self.currents, policy, Policy::Route, route)
            }
            allowed @ Verdict::Allowed { .. } => {
                Decision::new(&self.currents, policy, Policy::Key, allowed)
            }
        }
    }

    /// Refuses `ip` with `too_many_failures` while it has failed to
    /// authenticate more than `per_minute` times a minute.
    pub fn check_failures(&self, ip: IpAddr, per_minute: u32) -> Result<(), GatewayError> {
        match self.failures.blocked(ip, per_minute) {
            None => Ok(()),
            Some(wait) => {
                metrics::counter!("keygate_failed_auth_blocked_total").increment(1);
                Err(GatewayError::TooManyFailures {
                    retry_after_secs: ceil_secs(wait).max(1),
                })
            }
        }
    }

    /// Counts `error` against `ip` if it is an authentication failure.
    pub fn record_failure(&self, ip: IpAddr, per_minute: u32, error: &GatewayError) {
        if error.is_auth_failure() {
            self.failures.record(ip, per_minute);
        }
    }

    /// Drops idle state; returns how many states remain.
    pub fn sweep(&self) -> usize {
        self.policies.sweep();
        let limits = match &self.backend {
            Backend::Local(l) => l.sweep(),
            Backend::Shared(s) => s.sweep(),
        };
        limits + self.failures.sweep()
    }

    /// Sweeps every [`SWEEP_EVERY`] and, with the Redis backend, probes
    /// Redis while it is unreachable, until `shutdown` fires.
    pub fn spawn_maintenance(self: &Arc<Self>, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP_EVERY);
            let mut probe = tokio::time::interval(redis::PROBE_EVERY);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = sweep.tick() => {
                        let live = this.sweep();
                        tracing::trace!(live, "rate limiter swept");
                    }
                    _ = probe.tick() => {
                        if let Some(shared) = this.shared() {
                            shared.probe().await;
                        }
                    }
                }
            }
        })
    }
}

/// When a bucket of `spec` whose next cell comes after `wait` is full again.
fn full_after(spec: RateLimitSpec, wait: Duration) -> Duration {
    let interval = Duration::from_secs(1) / spec.per_second.max(1);
    wait + interval * spec.burst.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn spec(per_second: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec { per_second, burst }
    }

    fn limits() -> RateLimits {
        RateLimits {
            backend: Backend::Local(LocalLimiter::new()),
            failures: FailedAuth::new(60),
            policies: PolicyCache::default(),
            currents: CurrentTable::default(),
        }
    }

    fn check(
        l: &RateLimits,
        key: &KeyId,
        key_spec: RateLimitSpec,
        route: Option<(&Arc<str>, RateLimitSpec)>,
    ) -> Decision {
        l.check(key, key_spec, route)
            .now_or_never()
            .expect("the local backend never waits")
    }

    #[test]
    fn headers_on_allowed_and_refused_answers() {
        let l = limits();
        let k = KeyId::generate();
        let d = check(&l, &k, spec(1, 3), None);
        assert_eq!(d.retry_after, None);
        assert_eq!(d.headers.policy, "\"key\";q=3;w=3");
        assert_eq!(d.headers.current, "\"key\";r=2;t=1");
        check(&l, &k, spec(1, 3), None);
        let d = check(&l, &k, spec(1, 3), None);
        assert_eq!(d.headers.current, "\"key\";r=0;t=3");
        let d = check(&l, &k, spec(1, 3), None);
        let wait = d.retry_after.expect("refused");
        assert!(
            wait <= Duration::from_secs(1) && !wait.is_zero(),
            "{wait:?}"
        );
        assert_eq!(d.headers.current, "\"key\";r=0;t=3");
        let mut slot = None;
        assert_eq!(
            d.finish(&mut slot),
            Err(GatewayError::RateLimited {
                retry_after_secs: 1
            })
        );
        assert!(slot.is_some());
    }

    #[test]
    fn the_stricter_limit_wins_and_routes_are_separate() {
        let l = limits();
        let k = KeyId::generate();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let key_spec = spec(1, 5);
        let route_spec = spec(1, 2);
        let d = check(&l, &k, key_spec, Some((&a, route_spec)));
        assert_eq!(d.headers.policy, "\"key\";q=5;w=5, \"route\";q=2;w=2");
        assert_eq!(d.headers.current, "\"route\";r=1;t=1");
        assert!(
            check(&l, &k, key_spec, Some((&a, route_spec)))
                .retry_after
                .is_none()
        );
        let d = check(&l, &k, key_spec, Some((&a, route_spec)));
        assert!(d.retry_after.is_some());
        assert!(
            d.headers
                .current
                .to_str()
                .unwrap()
                .starts_with("\"route\";r=0")
        );
        // Route b has its own bucket; the key has 3 cells left, then none.
        assert!(
            check(&l, &k, key_spec, Some((&b, route_spec)))
                .retry_after
                .is_none()
        );
        let d = check(&l, &k, key_spec, None);
        assert_eq!(d.headers.current, "\"key\";r=1;t=4");
        check(&l, &k, key_spec, None);
        // Both refuse now: the key's wait (next cell in ~1 s, full in 5 s)
        // is reported, and route b's cell is not spent.
        let d = check(&l, &k, key_spec, Some((&b, route_spec)));
        assert!(
            d.headers
                .current
                .to_str()
                .unwrap()
                .starts_with("\"key\";r=0")
        );
        let Backend::Local(local) = &l.backend else {
            unreachable!("a local backend")
        };
        assert_eq!(local.peek(Scope::Route(&b), &k, route_spec), Duration::ZERO);
    }

    #[test]
    fn longest_retry_after_when_both_refuse() {
        let l = limits();
        let k = KeyId::generate();
        let r: Arc<str> = "r".into();
        // The route refills far slower than the key.
        let key_spec = spec(10, 1);
        let route_spec = spec(1, 1);
        assert!(
            check(&l, &k, key_spec, Some((&r, route_spec)))
                .retry_after
                .is_none()
        );
        let d = check(&l, &k, key_spec, Some((&r, route_spec)));
        let wait = d.retry_after.expect("refused");
        assert!(
            wait > Duration::from_millis(500),
            "route wait expected, got {wait:?}"
        );
        assert!(
            d.headers
                .current
                .to_str()
                .unwrap()
                .starts_with("\"route\";r=0")
        );
    }

    #[test]
    fn failures_block_only_auth_failures() {
        let l = limits();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..100 {
            l.record_failure(ip, 3, &GatewayError::MissingKey);
        }
        assert_eq!(l.check_failures(ip, 3), Ok(()));
        for _ in 0..3 {
            l.record_failure(ip, 3, &GatewayError::InvalidKey);
        }
        assert!(matches!(
            l.check_failures(ip, 3),
            Err(GatewayError::TooManyFailures { retry_after_secs }) if retry_after_secs >= 1
        ));
    }
}
