//! Micro benchmarks of the rate-limit stage.
//!
//! Run: `cargo bench --bench ratelimit`. Target (issue 5): a local limiter
//! check <= 200 ns. With `redis-server` on PATH the shared limiter is measured
//! too, both as built (local leases refilled in the background) and as the
//! naive scheme it replaces (one GCRA script round trip per request), which
//! is the cost the leases avoid.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::HeaderMap;
use keygate::config::IpNet;
use keygate::keys::{KeyId, RateLimitSpec};
use keygate::ratelimit::{LocalLimiter, RateLimits, Scope, SharedLimiter, client_ip};

// The allocator keygate runs with (src/allocator.rs): a `RateLimit` value outside
// the table is one small allocation.
#[path = "../src/allocator.rs"]
mod allocator;

/// A typical key limit. With 10 000 keys checked in turn each key comes back
/// every few milliseconds and has earned a cell by then: the allowed path is
/// what is measured.
const TYPICAL: RateLimitSpec = RateLimitSpec {
    per_second: 1000,
    burst: 100,
};
/// Never refuses at bench speed, even on one key; its `RateLimit` value
/// (`r` in the hundreds of thousands) is formatted rather than tabled.
const HUGE: RateLimitSpec = RateLimitSpec {
    per_second: 100_000_000,
    burst: 1_000_000,
};
/// Refuses everything after its first cell.
const SHUT: RateLimitSpec = RateLimitSpec {
    per_second: 1,
    burst: 1,
};

fn local(c: &mut Criterion) {
    let cfg = keygate::config::parse("", "bench", &[]).expect("default config");
    let limits = RateLimits::local(&cfg);
    // 10 000 live keys, so the maps are not trivially small.
    let keys: Vec<KeyId> = (0..10_000).map(|_| KeyId::generate()).collect();
    let route: Arc<str> = "api".into();
    let check = |key: &KeyId, spec, route| {
        limits
            .check(key, spec, route)
            .now_or_never()
            .expect("the local backend never waits")
    };
    for k in &keys {
        check(k, TYPICAL, Some((&route, TYPICAL)));
    }

    let mut i = 0;
    c.bench_function("local check: key limit, allowed (+ headers)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            check(std::hint::black_box(&keys[i]), TYPICAL, None)
        })
    });
    c.bench_function("local check: key + route limits (+ headers)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let route = Some((&route, TYPICAL));
            check(std::hint::black_box(&keys[i]), TYPICAL, route)
        })
    });
    c.bench_function("local check: burst 1M, formatted RateLimit value", |b| {
        b.iter(|| check(std::hint::black_box(&keys[0]), HUGE, None))
    });
    let shut = KeyId::generate();
    check(&shut, SHUT, None);
    c.bench_function("local check: key limit, refused (+ headers)", |b| {
        b.iter(|| check(std::hint::black_box(&shut), SHUT, None))
    });
    let bare = LocalLimiter::new();
    c.bench_function("GCRA alone: LocalLimiter::check, no headers", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            bare.check(Scope::Key, std::hint::black_box(&keys[i]), TYPICAL)
        })
    });

    let peer = "127.0.0.1".parse().expect("ip");
    c.bench_function("failed-auth check of a clean IP", |b| {
        b.iter(|| limits.check_failures(std::hint::black_box(peer), 60))
    });
    let trusted = [IpNet {
        addr: peer,
        prefix_len: 32,
    }];
    let mut h = HeaderMap::new();
    h.insert(
        "x-forwarded-for",
        "203.0.113.9, 127.0.0.1".parse().expect("header"),
    );
    c.bench_function("client IP behind a trusted proxy", |b| {
        b.iter(|| client_ip(peer, std::hint::black_box(&h), &trusted))
    });
}

/// A throwaway `redis-server` on a free port, killed on drop.
struct Redis(Child, u16);

impl Redis {
    fn start() -> Option<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let redis = Redis(child, port);
        for _ in 0..250 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill() {
            eprintln!("redis-server: kill failed: {e}");
        }
        if let Err(e) = self.0.wait() {
            eprintln!("redis-server: wait failed: {e}");
        }
    }
}

fn shared(c: &mut Criterion) {
    let Some(redis) = Redis::start() else {
        eprintln!("redis-server not available: skipping the shared limiter benches");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let url = format!("redis://127.0.0.1:{}/", redis.1);
    let shared =
        rt.block_on(async { Arc::new(SharedLimiter::new(&url, "bench:").expect("redis client")) });
    let key = KeyId::generate();

    c.bench_function(
        "shared check: leased cell (refilled in the background)",
        |b| {
            b.to_async(&rt)
                .iter(|| async { shared.check(Scope::Key, &key, HUGE).await })
        },
    );
    c.bench_function("shared check: one script round trip per request", |b| {
        b.to_async(&rt).iter(|| async {
            shared
                .check_round_trip(Scope::Key, &key, HUGE)
                .await
                .expect("redis answers")
        })
    });
    assert!(!shared.is_degraded(), "redis failed during the bench");
}

criterion_group!(benches, local, shared);
criterion_main!(benches);
