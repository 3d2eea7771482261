//! Failed authentications per client IP (`rate_limit.failed_auth_per_ip`).
//!
//! Every answer that is an authentication failure (an invalid, expired,
//! revoked, rotated or suspended key; a missing key is not a guess and does
//! not count) spends one cell of the client IP's GCRA bucket of
//! `per_minute` cells refilled at `per_minute` per minute. Before a keyed
//! request's credential is even looked at, the IP's bucket is peeked: when it
//! is empty the request is refused with 429 `too_many_failures` and a
//! `Retry-After` until the next cell, without touching the cache or the store.
//! So with the default of 60, the 61st bad attempt within a minute is refused,
//! and a guesser is then held to one attempt per second.
//!
//! The refusal carries `Retry-After` and no `RateLimit-Policy` / `RateLimit`
//! fields (DESIGN.md section 4 names only `Retry-After` for it): those fields
//! describe the quotas of the presented key, which is not even looked at
//! here, and advertising how many failures an address has left would only
//! help a guesser pace itself below the limit.
//!
//! The count is per instance. Memory is bounded like the key limits: states
//! of IPs whose bucket is full again are dropped by the periodic sweep.
//!
//! The client IP is the socket peer, unless the peer is one of
//! `rate_limit.trusted_proxies`: then it is the right-most address of
//! `X-Forwarded-For` that is not itself a trusted proxy ([`client_ip`]).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use http::HeaderMap;

use super::Verdict;
use super::local::KeyedGcra;
use crate::config::IpNet;

/// The bucket of every IP, for one `per_minute` setting.
struct IpLimits<C: Clock> {
    per_minute: u32,
    gcra: KeyedGcra<IpAddr, C>,
}

impl<C: Clock + Clone> IpLimits<C> {
    fn new(per_minute: u32, clock: C) -> IpLimits<C> {
        let n = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        IpLimits {
            per_minute,
            gcra: KeyedGcra::new(Quota::per_minute(n), clock),
        }
    }
}

/// Counts authentication failures per client IP.
pub struct FailedAuth<C: Clock = DefaultClock> {
    clock: C,
    /// Replaced (and so reset) when a reload changes `per_minute`.
    current: ArcSwap<IpLimits<C>>,
    /// Failures recorded so far, counted after their state is stored.
    recorded: AtomicU64,
    /// `recorded` as read before the last sweep that left no state. While
    /// the two are equal no IP has a state, and [`FailedAuth::blocked`]
    /// answers without hashing the address and locking a shard (~370
    /// instructions per keyed request). A failure stored while a sweep
    /// scans is either seen by the scan or counted after it began, so the
    /// two are never equal while a state exists.
    clear_at: AtomicU64,
}

impl FailedAuth<DefaultClock> {
    pub fn new(per_minute: u32) -> FailedAuth<DefaultClock> {
        FailedAuth::with_clock(per_minute, DefaultClock::default())
    }
}

impl<C: Clock + Clone> FailedAuth<C> {
    pub fn with_clock(per_minute: u32, clock: C) -> FailedAuth<C> {
        FailedAuth {
            current: ArcSwap::from_pointee(IpLimits::new(per_minute, clock.clone())),
            clock,
            recorded: AtomicU64::new(0),
            clear_at: AtomicU64::new(0),
        }
    }

    fn with_limits<T>(&self, per_minute: u32, f: impl FnOnce(&KeyedGcra<IpAddr, C>) -> T) -> T {
        let cur = self.current.load();
        if cur.per_minute == per_minute {
            return f(&cur.gcra);
        }
        let fresh = Arc::new(IpLimits::new(per_minute, self.clock.clone()));
        self.current.store(fresh.clone());
        f(&fresh.gcra)
    }

    /// How long `ip` must wait before its credentials are checked again;
    /// `None` when it may try now.
    pub fn blocked(&self, ip: IpAddr, per_minute: u32) -> Option<Duration> {
        if self.recorded.load(Ordering::SeqCst) == self.clear_at.load(Ordering::SeqCst) {
            return None;
        }
        let wait = self.with_limits(per_minute, |g| g.peek(&ip));
        (!wait.is_zero()).then_some(wait)
    }

    /// Counts one authentication failure from `ip`.
    pub fn record(&self, ip: IpAddr, per_minute: u32) {
        let verdict = self.with_limits(per_minute, |g| g.check(&ip));
        self.recorded.fetch_add(1, Ordering::SeqCst);
        if let Verdict::Refused { .. } = verdict {
            // Only when failures race past the peek: the IP is blocked anyway.
            tracing::debug!(%ip, "authentication failure from an IP already over its limit");
        }
    }

    /// Drops the state of IPs whose bucket is full again; returns how many remain.
    pub fn sweep(&self) -> usize {
        let recorded = self.recorded.load(Ordering::SeqCst);
        let left = self.current.load().gcra.sweep();
        if left == 0 {
            self.clear_at.fetch_max(recorded, Ordering::SeqCst);
        }
        left
    }
}

/// The client's address: `peer`, or when `peer` is a trusted proxy, the
/// right-most untrusted address of `X-Forwarded-For` (all its field lines,
/// in order). A malformed entry ends the walk at the last address trusted so
/// far, since nothing left of it can be believed.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                return client;
            };
            if !is_trusted(ip) {
                return ip;
            }
            client = ip;
        }
    }
    client
}

/// An `X-Forwarded-For` entry: an address, possibly with a port.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let ip = match s.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => s.parse::<SocketAddr>().ok()?.ip(),
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str, prefix_len: u8) -> IpNet {
        IpNet {
            addr: ip(s),
            prefix_len,
        }
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_61st_failure_in_a_minute_is_blocked() {
        let clock = FakeRelativeClock::default();
        let f = FailedAuth::with_clock(60, clock.clone());
        let a = ip("10.0.0.1");
        for _ in 0..60 {
            assert_eq!(f.blocked(a, 60), None);
            f.record(a, 60);
            clock.advance(Duration::from_millis(10));
        }
        let wait = f.blocked(a, 60).expect("blocked after 60 failures");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(f.blocked(ip("10.0.0.2"), 60), None);
        // One more attempt a second later, then blocked again.
        clock.advance(wait);
        assert_eq!(f.blocked(a, 60), None);
        f.record(a, 60);
        assert!(f.blocked(a, 60).is_some());
        // A changed setting starts over.
        assert_eq!(f.blocked(a, 61), None);
    }

    #[test]
    fn sweep_forgets_ips_that_stopped_failing() {
        let clock = FakeRelativeClock::default();
        let f = FailedAuth::with_clock(60, clock.clone());
        for i in 0..1000u32 {
            f.record(IpAddr::from(i.to_be_bytes()), 60);
        }
        assert_eq!(f.sweep(), 1000);
        clock.advance(Duration::from_secs(2));
        assert_eq!(f.sweep(), 0);
        // With no state left, failures after the sweep still count.
        let a = ip("10.0.0.1");
        assert_eq!(f.blocked(a, 60), None);
        for _ in 0..60 {
            f.record(a, 60);
        }
        assert!(f.blocked(a, 60).is_some());
        assert_eq!(f.sweep(), 1);
        assert!(f.blocked(a, 60).is_some(), "a sweep keeps a blocked IP");
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted = [net("127.0.0.1", 32), net("10.0.0.0", 8)];
        let h = xff(&["203.0.113.9, 198.51.100.7", "10.1.1.1"]);
        // Untrusted peer: the header is ignored.
        assert_eq!(client_ip(ip("192.0.2.1"), &h, &trusted), ip("192.0.2.1"));
        // No trusted proxies at all: ignored too.
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &[]), ip("127.0.0.1"));
        // Right-most untrusted entry, skipping trusted hops, across lines.
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("198.51.100.7"));
        // Everything trusted: the left-most hop.
        let h = xff(&["10.0.0.5, 10.0.0.6"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("10.0.0.5"));
        // Garbage stops the walk at the last trusted address.
        let h = xff(&["203.0.113.9, nonsense, 10.0.0.6"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("10.0.0.6"));
        // Ports and IPv4-mapped peers.
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &h, &trusted),
            ip("2001:db8::1")
        );
        let h = xff(&["198.51.100.7:8080"]);
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("198.51.100.7"));
        // No header: the peer.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
    }
}
