//! Memory of a keygate process holding 1,000,000 keys in its cache, and of the
//! local rate limiter's state for 1,000,000 keys (issue 9).
//!
//! Run: `cargo bench --bench memory`. Target: RSS with 1M keys cached
//! <= 300 MB. Not a criterion bench: it reads resident memory (`VmRSS` and
//! `VmHWM` in `/proc/self/status`) at each stage, with the allocator the
//! `keygate` binary runs with (mimalloc and its settings, src/allocator.rs). Each measurement runs
//! in a process of its own (this binary, started with a phase argument), so
//! that memory one phase freed (and the allocator kept) cannot hide what the
//! next one takes:
//!
//! 1. `--load`: writes the keys into an embedded store (redb) through
//!    `KeyStore::create_key`, one durable commit and one audit event each, as
//!    the admin API does. The file goes on tmpfs when there is one, only so
//!    that a million commits take minutes rather than an hour.
//!    `KEYGATE_MEMORY_STORE=PATH` keeps the file at PATH and reuses it on the
//!    next run (the secrets are derived from the key's number, so nothing
//!    else needs keeping).
//! 2. `--phase store`: opens the store as `keygate serve` does (metered) and
//!    reads every record once by its hash, keeping nothing: the store's own
//!    memory (redb's page cache) and the garbage of a million reads.
//! 3. `--phase cache`: the same, but every secret is verified through
//!    `Authenticator::verify` with a `KeyCache` of `cache.max_keys` = the
//!    number of keys, as the proxy does on a request (one miss and one store
//!    read per key); a second pass checks that every key is now a hit. The
//!    cache's share is this process's RSS less the `store` process's, which
//!    made the very same reads.
//! 4. `--phase limiter`: one local rate-limit check per key (the default
//!    limit, keyed by key id, as the proxy's rate-limit stage) after the key
//!    ids exist: the limiter state at its peak; then, once the buckets have
//!    refilled, a sweep (what the maintenance task runs every 10 s) and the
//!    RSS again.
//!
//! `KEYGATE_MEMORY_KEYS=N` changes the number of keys (default 1,000,000).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use keygate::auth::Authenticator;
use keygate::cache::{CachedKey, KeyCache};
use keygate::config::CacheConfig;
use keygate::keys::{Access, KeyId, KeyRecord, RateLimitSpec, Scope, SystemClock, Token};
use keygate::ratelimit::RateLimits;
use keygate::store::embedded::EmbeddedStore;
use keygate::store::metered::MeteredStore;
use keygate::store::{Event, EventType, SharedStore};
use sha2::{Digest, Sha256};

// The allocator the keygate binary runs with (src/allocator.rs): allocators differ
// in how much of what they hold stays resident.
#[path = "../src/allocator.rs"]
mod allocator;

const PREFIX: &str = "kg_";
const DEFAULT_KEYS: usize = 1_000_000;
/// Store calls in flight while loading and warming.
const IN_FLIGHT: usize = 16;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SCOPES: [&str; 5] = [
    "orders:read",
    "orders:write",
    "reports",
    "billing:read",
    "public_api",
];
const SERVICES: [&str; 8] = [
    "checkout", "billing", "search", "mobile", "partner", "etl", "web", "support",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--phase") {
        let n: usize = args[i + 3].parse().expect("key count");
        phase(&args[i + 1], Path::new(&args[i + 2]), n);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--load") {
        let path = PathBuf::from(&args[i + 1]);
        let n: usize = args[i + 2].parse().expect("key count");
        load(&path, n);
        return;
    }
    let n = std::env::var("KEYGATE_MEMORY_KEYS")
        .ok()
        .map(|v| v.parse().expect("KEYGATE_MEMORY_KEYS is a number"))
        .unwrap_or(DEFAULT_KEYS);
    measure(n);
}

/// The secret of key `i`: a well-formed token (prefix, 32 base62 characters,
/// CRC32 checksum) derived from `i`, so the store can be reused and this
/// process never holds a list of secrets.
fn token(i: usize) -> Token {
    let digest = Sha256::digest(format!("keygate memory bench {i}").as_bytes());
    let mut s = String::with_capacity(PREFIX.len() + 38);
    s.push_str(PREFIX);
    s.extend(digest.iter().map(|b| BASE62[*b as usize % 62] as char));
    // The checksum as DESIGN.md states it: CRC32 of prefix + random part,
    // 6 base62 digits, most significant first.
    let mut crc = crc32fast::hash(s.as_bytes());
    let mut digits = [b'0'; 6];
    for d in digits.iter_mut().rev() {
        *d = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    s.extend(digits.iter().map(|&b| b as char));
    Token::from_presented(&s)
}

/// Key `i` as a deployment would hold it: 5,000 owners of 200 keys, one or
/// two of five scopes, a quarter read-only, 80% expiring in a year, 10% with
/// their own rate limit, 30% with a description, two metadata fields each.
fn record(i: usize, now: DateTime<Utc>) -> KeyRecord {
    let service = SERVICES[i % SERVICES.len()];
    let name = format!("{service} prod {i}");
    let owner = format!("team-{:04}", i % 5000);
    let mut rec = KeyRecord::issue(&token(i), PREFIX, &name, &owner, "admin", now);
    if i % 10 < 3 {
        rec.description = format!("issued to the {service} service");
    }
    rec.scopes = vec![Scope::parse(SCOPES[i % 5]).expect("valid scope")];
    if i % 3 == 0 {
        rec.scopes
            .push(Scope::parse(SCOPES[(i / 5 + 1) % 5]).expect("valid scope"));
        rec.scopes.dedup();
    }
    if i % 4 == 0 {
        rec.access = Access::ReadOnly;
    }
    if i % 5 != 0 {
        rec.expires_at = Some(now + chrono::Duration::days(365));
    }
    if i % 10 == 0 {
        rec.rate_limit = Some(RateLimitSpec {
            per_second: 100,
            burst: 200,
        });
    }
    rec.metadata = serde_json::json!({"env": "prod", "cost_center": format!("cc-{:03}", i % 300)})
        .as_object()
        .expect("an object")
        .clone();
    rec
}

/// The child: writes keys `0..n` into the store at `path`.
fn load(path: &Path, n: usize) {
    let rt = runtime();
    rt.block_on(async {
        let store: SharedStore = Arc::new(EmbeddedStore::open(path).expect("open the store"));
        let now = Utc::now();
        let started = Instant::now();
        let done = std::sync::atomic::AtomicUsize::new(0);
        futures_util::stream::iter(0..n)
            .map(|i| {
                let store = store.clone();
                let done = &done;
                async move {
                    let rec = record(i, now);
                    let event = Event::new(
                        EventType::KeyCreated,
                        Some(rec.id),
                        "admin",
                        now,
                        serde_json::json!({"name": rec.name, "owner": rec.owner}),
                    );
                    store
                        .create_key(&rec, 1000, &event)
                        .await
                        .expect("create key");
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d % 50_000 == 0 {
                        eprintln!(
                            "loaded {d} keys in {:.0} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect::<()>()
            .await;
        eprintln!(
            "loaded {n} keys in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// Prints a stage's RSS for the parent (stdout) and the reader (stderr).
fn stage(what: &str) -> u64 {
    let (rss, hwm) = rss();
    eprintln!("  {what}: RSS {} MB, HWM {} MB", mb(rss), mb(hwm));
    println!("stage\t{what}\t{rss}\t{hwm}");
    rss
}

/// One stage as a child reported it.
struct Stage {
    what: String,
    rss: u64,
    hwm: u64,
}

/// Runs this binary with `args`; returns the stages it reported.
fn child(args: &[&str]) -> Vec<Stage> {
    let exe = std::env::current_exe().expect("own path");
    eprintln!("{}:", args.join(" "));
    let out = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("start a phase");
    assert!(
        out.status.success(),
        "phase {args:?} failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            (f.next()? == "stage").then_some(())?;
            Some(Stage {
                what: f.next()?.to_owned(),
                rss: f.next()?.parse().ok()?,
                hwm: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn rss_at(stages: &[Stage], what: &str) -> u64 {
    stages
        .iter()
        .find(|s| s.what == what)
        .unwrap_or_else(|| panic!("no stage {what:?}"))
        .rss
}

fn measure(n: usize) {
    let kept = std::env::var_os("KEYGATE_MEMORY_STORE").map(PathBuf::from);
    let shm = Path::new("/dev/shm");
    let tmp = match shm.is_dir() {
        true => tempfile::tempdir_in(shm),
        false => tempfile::tempdir(),
    }
    .expect("temp dir");
    let path = kept.unwrap_or_else(|| tmp.path().join("keys.redb"));
    let marker = path.with_extension(format!("loaded-{n}"));
    if !marker.exists() {
        if path.exists() {
            std::fs::remove_file(&path).expect("remove a partly loaded store");
        }
        child(&["--load", &path.to_string_lossy(), &n.to_string()]);
        std::fs::write(&marker, b"").expect("write the marker");
    }
    let file_size = std::fs::metadata(&path).expect("store file").len();
    let p = path.to_string_lossy();
    let count = n.to_string();
    let store = child(&["--phase", "store", &p, &count]);
    let cache = child(&["--phase", "cache", &p, &count]);
    let limiter = child(&["--phase", "limiter", "-", &count]);

    let per_key = |bytes: u64| format!("{:.0}", bytes as f64 / n as f64);
    println!();
    println!("keys: {n}; store file: {} MB", mb(file_size));
    println!(
        "size_of: CachedKey {} B (was 648 with the whole record and five HeaderValues), KeyRecord {} B",
        std::mem::size_of::<CachedKey>(),
        std::mem::size_of::<KeyRecord>()
    );
    for (name, stages) in [("store", &store), ("cache", &cache), ("limiter", &limiter)] {
        println!();
        println!("| `--phase {name}` | RSS MB | HWM MB |");
        println!("|---|---|---|");
        for s in stages.iter() {
            println!("| {} | {} | {} |", s.what, mb(s.rss), mb(s.hwm));
        }
    }
    let base = rss_at(&cache, "runtime started");
    let store_all = rss_at(&store, "every record read");
    let cached = rss_at(&cache, "every key verified");
    let key_cache = cached.saturating_sub(store_all);
    let ids = rss_at(&limiter, "key ids made");
    println!();
    println!("| share | MB | bytes per key |");
    println!("|---|---|---|");
    let row = |what: &str, bytes: u64| println!("| {what} | {} | {} |", mb(bytes), per_key(bytes));
    row("process before the store (runtime)", base);
    row(
        "store: redb opened, page cache and garbage of reading every record",
        store_all.saturating_sub(base),
    );
    row("key cache (cache process less store process)", key_cache);
    row(
        "process with the keys cached, without the store's share",
        base + key_cache,
    );
    row("process with the keys cached, all of it", cached);
    row(
        "limiter state at its peak",
        rss_at(&limiter, "one check per key").saturating_sub(ids),
    );
    row(
        "limiter after the sweep (RSS above the key ids alone)",
        rss_at(&limiter, "swept").saturating_sub(ids),
    );
    drop(tmp);
}

/// A child: one measurement.
fn phase(name: &str, path: &Path, n: usize) {
    stage("start");
    let rt = runtime();
    stage("runtime started");
    if name == "limiter" {
        return limiter_phase(&rt, n);
    }
    let store: SharedStore = Arc::new(MeteredStore::new(Arc::new(
        EmbeddedStore::open(path).expect("open the store"),
    )));
    stage("store opened");
    let started = Instant::now();
    if name == "store" {
        let found = rt.block_on(each_key(n, |i| {
            let store = store.clone();
            async move {
                let rec = store
                    .get_by_hash(&token(i).hash())
                    .await
                    .expect("store read");
                rec.is_some()
            }
        }));
        assert_eq!(found, n, "every key is in the store");
        eprintln!(
            "  read every record in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        stage("every record read");
        return;
    }
    let cache = Arc::new(KeyCache::new(
        store.clone(),
        &CacheConfig {
            max_keys: n as u64,
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(300),
        },
    ));
    let auth = Arc::new(Authenticator {
        cache: cache.clone(),
        clock: Arc::new(SystemClock),
    });
    let verify_all = || {
        rt.block_on(each_key(n, |i| {
            let auth = auth.clone();
            async move { auth.verify(PREFIX, token(i).expose()).await.is_ok() }
        }))
    };
    assert_eq!(verify_all(), n, "every key verifies");
    eprintln!(
        "  verified every key (misses) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stage("every key verified");
    let reads = cache.stats.store_reads.load(Ordering::Relaxed);
    let hits = cache.stats.hits.load(Ordering::Relaxed);
    assert_eq!(verify_all(), n);
    assert_eq!(
        cache.stats.store_reads.load(Ordering::Relaxed),
        reads,
        "the second pass read nothing from the store"
    );
    let hits = cache.stats.hits.load(Ordering::Relaxed) - hits;
    assert_eq!(hits as usize, n, "the second pass is all hits");
    assert_eq!(cache.entry_count() as usize, n, "every key is cached");
    stage("second pass, all hits");
}

fn limiter_phase(rt: &tokio::runtime::Runtime, n: usize) {
    // Key ids as the cache holds them (`key_` + ULID); the limiter keeps a
    // clone (a reference count) of each.
    let ids: Vec<KeyId> = (0..n).map(|_| KeyId::generate()).collect();
    stage("key ids made");
    let cfg = keygate::config::parse("", "bench", &[]).expect("default config");
    let spec = cfg.rate_limit.default;
    let limits = RateLimits::local(&cfg);
    let allowed = rt.block_on(async {
        let mut allowed = 0;
        for id in &ids {
            let spec = if id.text().ends_with('0') {
                RateLimitSpec {
                    per_second: 100,
                    burst: 200,
                }
            } else {
                spec
            };
            if limits.check(id, spec, None).await.retry_after.is_none() {
                allowed += 1;
            }
        }
        allowed
    });
    assert_eq!(allowed, n, "every first check is allowed");
    stage("one check per key");
    // A bucket that spent one cell is full again after one cell's time (20 ms
    // at the default 50/s); wait well past it, then sweep as maintenance does.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(limits.sweep(), 0, "the sweep drops every refilled state");
    std::thread::sleep(Duration::from_millis(200));
    stage("swept");
    drop(ids);
}

/// Runs `f` for every key number `0..n`, [`IN_FLIGHT`] at a time; counts the
/// `true` answers.
async fn each_key<F, Fut>(n: usize, f: F) -> usize
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = bool>,
{
    futures_util::stream::iter(0..n)
        .map(f)
        .buffer_unordered(IN_FLIGHT)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}
