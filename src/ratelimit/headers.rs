//! The `RateLimit-Policy` and `RateLimit` response fields.
//!
//! Syntax per draft-ietf-httpapi-ratelimit-headers-10 (September 2025; the
//! two fields are unchanged in -11): each field is a Structured Field List
//! (RFC 9651) of Items, one per quota policy, the item being the policy's name
//! as a String.
//!
//! ```text
//! RateLimit-Policy: "key";q=100;w=2, "route";q=40;w=2
//! RateLimit: "route";r=12;t=1
//! ```
//!
//! keygate names its two policies `"key"` (the key's own limit, across all
//! routes) and `"route"` (the route's limit for this key). A GCRA limit of
//! `per_second` with room for `burst` is advertised as `q` = `burst` quota
//! units per `w` = `ceil(burst / per_second)` seconds: the bucket holds
//! `burst` and refills completely in `w`. `RateLimit` reports only the most
//! restrictive policy (fewest remaining units, or on a refusal the one that
//! refused): `r` is what it has left and `t` the whole seconds until it is full
//! again.
//!
//! The policy field depends only on the specs, so its value is built once per
//! (key spec, route spec) pair and cached, the first [`INTERN_MAX`] of them as
//! static values whose clones cost no reference count. `RateLimit` values
//! with small numbers (`r` < 256, `t` < 4: every value of a limit with a
//! burst up to 256 that refills within 4 s, the default included) come from a
//! table filled on first use ([`CurrentTable`]); others are written into a
//! stack buffer and copied into the `HeaderValue`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::hash::FastHash;
use crate::keys::RateLimitSpec;

/// `RateLimit-Policy`: the quota policies that apply.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: the state of the most restrictive policy.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Past this many cached policy values the cache is emptied on the next sweep
/// (keys may carry any spec, so the number of pairs is unbounded in principle).
const POLICY_CACHE_MAX: usize = 10_000;
/// At most this many policy strings are leaked to make static values (about
/// 60 bytes each); later ones are ordinary reference-counted values.
pub const INTERN_MAX: usize = 1024;

/// Which quota policy an item describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The key's own limit (or `rate_limit.default`), across all routes.
    Key,
    /// The route's limit, for this key on this route.
    Route,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Key => "key",
            Policy::Route => "route",
        }
    }
}

/// The two fields of one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateHeaders {
    pub policy: HeaderValue,
    pub current: HeaderValue,
}

impl RateHeaders {
    /// Sets both fields on a response, replacing any the upstream sent.
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy);
        headers.insert(RATELIMIT, self.current);
    }
}

/// The window `w` of a spec: seconds for an empty bucket to refill, at least 1.
pub fn window_secs(spec: RateLimitSpec) -> u64 {
    u64::from(spec.burst)
        .div_ceil(u64::from(spec.per_second.max(1)))
        .max(1)
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Builds the `RateLimit-Policy` value for a key limit and an optional route limit.
pub fn policy_value(key: RateLimitSpec, route: Option<RateLimitSpec>) -> HeaderValue {
    let mut s = String::with_capacity(64);
    push_policy(&mut s, Policy::Key, key);
    if let Some(route) = route {
        s.push_str(", ");
        push_policy(&mut s, Policy::Route, route);
    }
    // Only ASCII letters, digits and `";=, ` were written.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn push_policy(s: &mut String, policy: Policy, spec: RateLimitSpec) {
    use std::fmt::Write;
    // Writing into a String cannot fail.
    if write!(
        s,
        "\"{}\";q={};w={}",
        policy.name(),
        spec.burst,
        window_secs(spec)
    )
    .is_err()
    {
        s.clear();
    }
}

/// Builds the `RateLimit` value `"<policy>";r=<remaining>;t=<reset>` without
/// going through `fmt`.
pub fn current_value(policy: Policy, remaining: u32, reset: Duration) -> HeaderValue {
    let mut buf = [0u8; 64];
    let mut n = 0;
    for part in [b"\"".as_slice(), policy.name().as_bytes(), b"\";r="] {
        buf[n..n + part.len()].copy_from_slice(part);
        n += part.len();
    }
    n += write_u64(&mut buf[n..], u64::from(remaining));
    buf[n..n + 3].copy_from_slice(b";t=");
    n += 3;
    n += write_u64(&mut buf[n..], ceil_secs(reset));
    // Only ASCII letters, digits and `";=` were written.
    HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Writes `v` in decimal at the start of `out` (which holds at least 20
/// bytes); returns the number of bytes written.
fn write_u64(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    len
}

/// Leaks `v`'s bytes to make a value whose clones copy a pointer. Callers
/// bound how often this happens.
fn make_static(v: HeaderValue) -> HeaderValue {
    let text: &'static [u8] = Box::leak(v.as_bytes().to_vec().into_boxed_slice());
    HeaderValue::from_maybe_shared(Bytes::from_static(text)).unwrap_or(v)
}

const TABLE_REMAINING: u32 = 256;
const TABLE_RESET: u64 = 4;

/// `RateLimit` values for small `r` and `t`, each made once (and leaked, at
/// most 2 x 256 x 4 values of about 20 bytes) the first time it is needed.
pub struct CurrentTable {
    slots: Box<[OnceLock<HeaderValue>]>,
}

impl Default for CurrentTable {
    fn default() -> Self {
        let n = 2 * TABLE_REMAINING as usize * TABLE_RESET as usize;
        CurrentTable {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl CurrentTable {
    /// The `RateLimit` value for `policy` with `remaining` units left and a
    /// full quota again after `reset`.
    pub fn get(&self, policy: Policy, remaining: u32, reset: Duration) -> HeaderValue {
        let t = ceil_secs(reset);
        if remaining >= TABLE_REMAINING || t >= TABLE_RESET {
            return current_value(policy, remaining, reset);
        }
        let p = match policy {
            Policy::Key => 0,
            Policy::Route => 1,
        };
        let i =
            (p * TABLE_REMAINING as usize + remaining as usize) * TABLE_RESET as usize + t as usize;
        match self.slots.get(i) {
            Some(slot) => slot
                .get_or_init(|| make_static(current_value(policy, remaining, reset)))
                .clone(),
            None => current_value(policy, remaining, reset),
        }
    }
}

/// Policy values by (key spec, route spec), built on first use.
#[derive(Default)]
pub struct PolicyCache {
    values: DashMap<(RateLimitSpec, Option<RateLimitSpec>), HeaderValue, FastHash>,
    interned: AtomicUsize,
}

impl PolicyCache {
    pub fn get(&self, key: RateLimitSpec, route: Option<RateLimitSpec>) -> HeaderValue {
        if let Some(v) = self.values.get(&(key, route)) {
            return v.clone();
        }
        let mut v = policy_value(key, route);
        if self.interned.fetch_add(1, Ordering::Relaxed) < INTERN_MAX {
            // A static value is cloned by copying a pointer: no shared
            // reference count for every worker to bounce between cores.
            v = make_static(v);
        }
        self.values.insert((key, route), v.clone());
        v
    }

    /// Bounds memory: drops every value once there are too many.
    pub fn sweep(&self) {
        if self.values.len() > POLICY_CACHE_MAX {
            self.values.clear();
            self.values.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(per_second: u32, burst: u32) -> RateLimitSpec {
        RateLimitSpec { per_second, burst }
    }

    #[test]
    fn policy_lists_the_key_then_the_route() {
        assert_eq!(policy_value(spec(100, 100), None), "\"key\";q=100;w=1");
        assert_eq!(
            policy_value(spec(50, 100), Some(spec(20, 40))),
            "\"key\";q=100;w=2, \"route\";q=40;w=2"
        );
        // A bucket that refills in 3.3 s advertises a 4 s window.
        assert_eq!(policy_value(spec(3, 10), None), "\"key\";q=10;w=4");
        // Faster than one bucket per second: the window is still 1 s.
        assert_eq!(policy_value(spec(1000, 10), None), "\"key\";q=10;w=1");
    }

    #[test]
    fn current_rounds_the_reset_up() {
        assert_eq!(
            current_value(Policy::Key, 42, Duration::from_millis(1)),
            "\"key\";r=42;t=1"
        );
        assert_eq!(
            current_value(Policy::Route, 0, Duration::from_secs(2)),
            "\"route\";r=0;t=2"
        );
        assert_eq!(
            current_value(Policy::Key, u32::MAX, Duration::ZERO),
            "\"key\";r=4294967295;t=0"
        );
        assert_eq!(
            current_value(Policy::Route, 7, Duration::from_secs(u64::MAX)),
            "\"route\";r=7;t=18446744073709551615"
        );
    }

    #[test]
    fn table_values_equal_formatted_ones() {
        let table = CurrentTable::default();
        for policy in [Policy::Key, Policy::Route] {
            for r in [0, 1, 99, 255, 256, 100_000] {
                for ms in [0, 1, 999, 1000, 1001, 3999, 4000, 60_000] {
                    let reset = Duration::from_millis(ms);
                    let want = current_value(policy, r, reset);
                    assert_eq!(table.get(policy, r, reset), want);
                    // Twice: the second comes from the table.
                    assert_eq!(table.get(policy, r, reset), want);
                }
            }
        }
    }

    #[test]
    fn cache_returns_the_same_value_and_stays_bounded() {
        let cache = PolicyCache::default();
        let a = cache.get(spec(1, 2), None);
        assert_eq!(a, cache.get(spec(1, 2), None));
        for i in 0..=POLICY_CACHE_MAX as u32 {
            cache.get(spec(1, i + 1), None);
        }
        cache.sweep();
        assert_eq!(cache.values.len(), 0);
    }
}
