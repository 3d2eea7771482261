//! Micro benchmarks of the key path: token format check, SHA-256, and a whole
//! `verify` on a cache hit (format + checksum + hash + cache lookup + status).
//!
//! Run: `cargo bench --bench verify`. Target (issue 4): verify on cache hit
//! <= 1 us per call on the 2-core reference machine.

use std::sync::Arc;

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use keygate::auth::Authenticator;
use keygate::cache::KeyCache;
use keygate::config::CacheConfig;
use keygate::keys::{self, KeyRecord, SystemClock, Token, TokenHash};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::{Event, EventType, SharedStore};

fn record(token: &Token) -> KeyRecord {
    let now = Utc::now();
    let mut rec = KeyRecord::issue(token, "kg_", "bench", "bench", "bench", now);
    rec.scopes = vec![keys::Scope::parse("bench").expect("valid scope")];
    rec.expires_at = Some(now + chrono::Duration::days(1));
    rec
}

fn bench(c: &mut Criterion) {
    let token = Token::generate("kg_");
    let secret = token.expose().to_owned();

    c.bench_function("check_format (parse + CRC32 checksum)", |b| {
        b.iter(|| keys::check_format("kg_", std::hint::black_box(&secret)))
    });
    c.bench_function("sha256 of a token", |b| {
        b.iter(|| TokenHash::of(std::hint::black_box(&secret)))
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).expect("open store"));
    let rec = record(&token);
    let event = Event::new(
        EventType::KeyCreated,
        Some(rec.id),
        "bench",
        Utc::now(),
        serde_json::json!({}),
    );
    rt.block_on(store.create_key(&rec, 1000, &event))
        .expect("create key");
    let cache = Arc::new(KeyCache::new(
        store,
        &CacheConfig {
            max_keys: 100_000,
            ttl: std::time::Duration::from_secs(300),
            negative_ttl: std::time::Duration::from_secs(5),
            stale_if_error: std::time::Duration::from_secs(300),
        },
    ));
    let auth = Authenticator {
        cache,
        clock: Arc::new(SystemClock),
    };
    rt.block_on(auth.verify("kg_", &secret))
        .expect("warm the cache");

    c.bench_function("verify on cache hit", |b| {
        b.to_async(&rt).iter(|| async {
            auth.verify("kg_", std::hint::black_box(&secret))
                .await
                .expect("valid key")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
