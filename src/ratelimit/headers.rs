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
//! (key spec, route spec) pair and cached; the `RateLimit` value is written
//! into a stack buffer, costing one small copy into the `HeaderValue`.

use std::time::Duration;

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

/// Policy values by (key spec, route spec), built on first use.
#[derive(Default)]
pub struct PolicyCache {
    values: DashMap<(RateLimitSpec, Option<RateLimitSpec>), HeaderValue, FastHash>,
}

impl PolicyCache {
    pub fn get(&self, key: RateLimitSpec, route: Option<RateLimitSpec>) -> HeaderValue {
        if let Some(v) = self.values.get(&(key, route)) {
            return v.clone();
        }
        let v = policy_value(key, route);
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
