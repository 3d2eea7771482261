//! Store contract tests: one suite, written against `Arc<dyn KeyStore>`, run
//! unchanged against the embedded (redb) and the Redis backend, on a single
//! Redis (a real `redis-server` per test) and on a Redis Cluster (three
//! cluster-mode `redis-server`s shared by the tests running at the same time,
//! each test under its own prefix). Backend-specific behaviour (reopening a
//! file, two instances on one Redis, outages) follows at the end.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use keygate::keys::{KeyId, KeyRecord, KeyStatus, RetiredSecret, Scope, Token, TokenHash};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::redis::RedisStore;
use keygate::store::{
    Event, EventFilter, EventType, Invalidation, KeyStore, ListFilter, Settings, StoreError,
    UsageCounts, UsageDelta,
};
use serde_json::json;
use tokio::sync::broadcast;

use crate::common::redis::{RedisCluster, RedisServer};

/// A store under test and whatever must outlive it (dropped after the store).
struct Harness {
    store: Arc<dyn KeyStore>,
    _keep: Keep,
}

enum Keep {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Redis(#[allow(dead_code)] RedisServer),
    Cluster(#[allow(dead_code)] Arc<RedisCluster>),
}

async fn open_embedded() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("data/keygate.redb")).expect("open store");
    Harness {
        store: Arc::new(store),
        _keep: Keep::Dir(dir),
    }
}

async fn open_redis() -> Harness {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "keygate:")
        .await
        .expect("connect");
    Harness {
        store: Arc::new(store),
        _keep: Keep::Redis(server),
    }
}

/// A store on the shared cluster under a prefix no other test uses, seeded
/// with each node in turn (so most tests must discover the `{kg}` slot's node).
async fn open_cluster() -> Harness {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let cluster = RedisCluster::shared();
    let prefix = format!("contract{n}:");
    let store = RedisStore::connect_cluster(&cluster.url(n), &prefix)
        .await
        .expect("connect to the cluster");
    Harness {
        store: Arc::new(store),
        _keep: Keep::Cluster(cluster),
    }
}

/// Instantiates every contract test once per backend.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::open_embedded().await).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::open_redis().await).await;
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::open_cluster().await).await;
                }
            )*
        }
    };
}

contract!(
    create_and_read_back,
    duplicates_are_refused,
    owner_cap_is_atomic,
    pagination_has_no_duplicates_or_gaps,
    list_filters_agree_with_matches,
    stale_version_conflicts,
    rotation_reindexes_hashes,
    delete_removes_record_and_indexes,
    events_filter_page_and_prune,
    settings_default_and_round_trip,
    usage_adds_up_and_last_used_never_goes_back,
    leader_lock_is_exclusive_renewable_and_expires,
    writes_deliver_invalidations,
);

// ---------------------------------------------------------------------------
// Helpers

fn new_key(owner: &str, name: &str) -> KeyRecord {
    let now = Utc::now();
    let mut rec = KeyRecord::issue(&Token::generate("kg_"), "kg_", name, owner, "test", now);
    rec.expires_at = Some(now + TimeDelta::days(365));
    rec
}

fn created(rec: &KeyRecord) -> Event {
    Event::new(
        EventType::KeyCreated,
        Some(rec.id),
        "test",
        Utc::now(),
        json!({}),
    )
}

fn event(kind: EventType, key: Option<&KeyRecord>) -> Event {
    Event::new(kind, key.map(|r| r.id), "test", Utc::now(), json!({}))
}

/// Now, to the millisecond: the precision stores keep `last_used_at` in.
fn now_ms() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).expect("now is representable")
}

fn scope(s: &str) -> Scope {
    Scope::parse(s).expect("valid scope")
}

async fn create(store: &dyn KeyStore, rec: &KeyRecord) {
    store
        .create_key(rec, 1000, &created(rec))
        .await
        .expect("create_key");
}

/// Lists every page of `filter`, checking page sizes and cursors; returns ids.
async fn list_all(store: &dyn KeyStore, filter: &ListFilter, now: DateTime<Utc>) -> Vec<KeyId> {
    let mut filter = filter.clone();
    filter.after = None;
    let mut ids = Vec::new();
    for _ in 0..10_000 {
        let page = store.list_keys(&filter, now).await.expect("list_keys");
        assert!(
            page.items.len() <= filter.limit,
            "page over limit {}",
            filter.limit
        );
        ids.extend(page.items.iter().map(|r| r.id));
        match page.next {
            Some(next) => {
                assert_eq!(
                    Some(next.clone()),
                    page.items.last().map(|r| r.id.to_string()),
                    "next must be the last returned id"
                );
                filter.after = Some(KeyId::parse(&next).expect("next is a key id"));
            }
            None => return ids,
        }
    }
    panic!("listing never ended");
}

fn assert_unique_in_order(ids: &[KeyId]) {
    for w in ids.windows(2) {
        assert!(
            w[0] < w[1],
            "ids out of order or duplicated: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
}

fn hash_set(hashes: &[TokenHash]) -> BTreeSet<TokenHash> {
    hashes.iter().copied().collect()
}

/// Everything already queued on `rx` (the local send happens before a write returns).
fn drain(rx: &mut broadcast::Receiver<Invalidation>) -> Vec<Invalidation> {
    let mut out = Vec::new();
    while let Ok(inv) = rx.try_recv() {
        out.push(inv);
    }
    out
}

/// Waits up to `within` for an invalidation satisfying `want`.
async fn wait_for(
    rx: &mut broadcast::Receiver<Invalidation>,
    within: Duration,
    want: impl Fn(&Invalidation) -> bool,
) -> Option<Invalidation> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(inv)) if want(&inv) => return Some(inv),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
        }
    }
}

fn is_keys(expected: &[TokenHash]) -> impl Fn(&Invalidation) -> bool + '_ {
    move |inv| matches!(inv, Invalidation::Keys(h) if hash_set(h) == hash_set(expected))
}

// ---------------------------------------------------------------------------
// The contract

async fn create_and_read_back(h: Harness) {
    let store = &*h.store;
    let mut rec = new_key("alice", "reporting");
    rec.scopes = vec![scope("orders:read"), scope("public_api")];
    rec.metadata.insert("team".into(), json!("data"));
    store
        .create_key(&rec, 10, &created(&rec))
        .await
        .expect("create");

    assert_eq!(store.get_by_id(&rec.id).await.unwrap(), Some(rec.clone()));
    assert_eq!(
        store.get_by_hash(&rec.token_hash).await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(store.get_by_id(&KeyId::generate()).await.unwrap(), None);
    assert_eq!(
        store
            .get_by_hash(&TokenHash::of("kg_unknown"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.count_owner("alice").await.unwrap(), 1);
    assert_eq!(store.count_owner("bob").await.unwrap(), 0);

    let evs = store
        .list_events(&EventFilter {
            key_id: Some(rec.id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 1);
    assert_eq!(evs.items[0].kind, EventType::KeyCreated);
    store.ping().await.expect("ping");
}

async fn duplicates_are_refused(h: Harness) {
    let store = &*h.store;
    let rec = new_key("alice", "one");
    create(store, &rec).await;

    let again = store.create_key(&rec, 1000, &created(&rec)).await;
    assert!(
        matches!(again, Err(StoreError::Duplicate)),
        "same id: {again:?}"
    );

    let mut same_secret = new_key("alice", "two");
    same_secret.token_hash = rec.token_hash;
    let r = store
        .create_key(&same_secret, 1000, &created(&same_secret))
        .await;
    assert!(matches!(r, Err(StoreError::Duplicate)), "same hash: {r:?}");
    assert_eq!(store.get_by_id(&same_secret.id).await.unwrap(), None);

    let mut retired_clash = new_key("alice", "three");
    retired_clash.retired = vec![RetiredSecret {
        hash: rec.token_hash,
        valid_until: Utc::now() + TimeDelta::hours(1),
    }];
    let r = store
        .create_key(&retired_clash, 1000, &created(&retired_clash))
        .await;
    assert!(
        matches!(r, Err(StoreError::Duplicate)),
        "retired hash clash: {r:?}"
    );

    assert_eq!(store.count_owner("alice").await.unwrap(), 1);
    assert_eq!(
        store
            .get_by_hash(&rec.token_hash)
            .await
            .unwrap()
            .map(|r| r.id),
        Some(rec.id)
    );
}

async fn owner_cap_is_atomic(h: Harness) {
    const LIMIT: u32 = 10;
    for i in 0..5 {
        let rec = new_key("capped", &format!("pre-{i}"));
        h.store
            .create_key(&rec, LIMIT, &created(&rec))
            .await
            .expect("under the cap");
    }
    let racers: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                let rec = new_key("capped", &format!("race-{i}"));
                store.create_key(&rec, LIMIT, &created(&rec)).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for r in racers {
        match r.await.expect("task") {
            Ok(()) => ok += 1,
            Err(StoreError::OwnerLimit { owner, limit }) => {
                assert_eq!((owner.as_str(), limit), ("capped", LIMIT));
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(
        (ok, refused),
        (5, 15),
        "exactly the 5 remaining slots are admitted"
    );
    assert_eq!(
        h.store.count_owner("capped").await.unwrap(),
        u64::from(LIMIT)
    );
    // Other owners are not affected by this owner's cap.
    let other = new_key("other", "free");
    h.store
        .create_key(&other, LIMIT, &created(&other))
        .await
        .expect("other owner");
}

async fn pagination_has_no_duplicates_or_gaps(h: Harness) {
    const N: usize = 2500;
    let owners = ["a", "b", "c"];
    let mut recs = Vec::with_capacity(N);
    for i in 0..N {
        recs.push(new_key(owners[i % 3], &format!("key-{i}")));
    }
    // Create from a few tasks at once: faster, and it exercises concurrency.
    let chunks: Vec<Vec<KeyRecord>> = recs.chunks(N / 4 + 1).map(<[_]>::to_vec).collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let store = Arc::clone(&h.store);
            tokio::spawn(async move {
                for rec in &chunk {
                    create(&*store, rec).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("create task");
    }
    let mut expected: Vec<KeyId> = recs.iter().map(|r| r.id).collect();
    expected.sort();
    let now = Utc::now();

    for limit in [100, 1000] {
        let started = Instant::now();
        let ids = list_all(
            &*h.store,
            &ListFilter {
                limit,
                ..Default::default()
            },
            now,
        )
        .await;
        assert_unique_in_order(&ids);
        assert_eq!(ids.len(), N, "limit {limit}: every key exactly once");
        assert_eq!(ids, expected, "limit {limit}");
        eprintln!(
            "listed {N} keys with limit {limit} in {:?}",
            started.elapsed()
        );
    }
    // Paging through the owner index.
    let b_expected: Vec<KeyId> = expected
        .iter()
        .filter(|id| recs.iter().any(|r| &r.id == *id && r.owner == "b"))
        .cloned()
        .collect();
    let filter = ListFilter {
        owner: Some("b".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(list_all(&*h.store, &filter, now).await, b_expected);
    assert_eq!(
        h.store.count_owner("b").await.unwrap(),
        b_expected.len() as u64
    );
}

async fn list_filters_agree_with_matches(h: Harness) {
    let store = &*h.store;
    let now = Utc::now();
    let mut all = Vec::new();
    for i in 0..40 {
        let owner = ["alice", "bob", "carol-team"][i % 3];
        let mut rec = new_key(
            owner,
            &format!("{} Service {i}", ["Billing", "search", "Ops"][i % 3]),
        );
        rec.scopes = match i % 4 {
            0 => vec![scope("public_api")],
            1 => vec![scope("orders:read"), scope("public_api")],
            2 => vec![scope("orders:read")],
            _ => vec![],
        };
        match i % 5 {
            0 => rec.revoked_at = Some(now - TimeDelta::hours(1)),
            1 => rec.suspended_at = Some(now - TimeDelta::hours(1)),
            2 => rec.expires_at = Some(now - TimeDelta::days(1)),
            3 => rec.expires_at = Some(now + TimeDelta::days(3 + i as i64)),
            _ => rec.expires_at = None,
        }
        create(store, &rec).await;
        all.push(rec);
    }
    all.sort_by_key(|a| a.id);
    let some_id = all[7].id.text()[10..16].to_lowercase();
    let f = |build: fn(&mut ListFilter)| {
        let mut filter = ListFilter {
            limit: 3,
            ..Default::default()
        };
        build(&mut filter);
        filter
    };
    let mut filters = vec![
        f(|_| {}),
        f(|f| f.q = Some("SERVICE 1".into())),
        f(|f| f.q = Some("team".into())),
        f(|f| f.owner = Some("bob".into())),
        f(|f| f.owner = Some("nobody".into())),
        f(|f| f.scope = Some(scope("orders:read"))),
        f(|f| f.expiring_within = Some(Duration::from_secs(30 * 86400))),
        f(|f| f.expiring_within = Some(Duration::from_secs(10 * 86400))),
        f(|f| {
            f.owner = Some("alice".into());
            f.scope = Some(scope("public_api"));
            f.status = Some(KeyStatus::Active);
        }),
    ];
    for status in [
        KeyStatus::Active,
        KeyStatus::Revoked,
        KeyStatus::Suspended,
        KeyStatus::Expired,
    ] {
        let mut filter = f(|_| {});
        filter.status = Some(status);
        filters.push(filter);
    }
    let mut by_id = f(|_| {});
    by_id.q = Some(some_id);
    filters.push(by_id);

    for filter in &filters {
        let expected: Vec<KeyId> = all
            .iter()
            .filter(|r| filter.matches(r, now))
            .map(|r| r.id)
            .collect();
        // Every filter but the unknown owner selects something (and not everything).
        if filter.owner.as_deref() != Some("nobody") {
            assert!(!expected.is_empty(), "filter selects nothing: {filter:?}");
        }
        let got = list_all(store, filter, now).await;
        assert_eq!(got, expected, "filter {filter:?}");
    }
}

async fn stale_version_conflicts(h: Harness) {
    let store = &*h.store;
    let rec = new_key("alice", "v");
    create(store, &rec).await;

    let mut edit = rec.clone();
    edit.name = "renamed".into();
    let stored = store
        .update_key(&edit, Some(&event(EventType::KeyUpdated, Some(&rec))))
        .await;
    let stored = stored.expect("update at the current version");
    assert_eq!(stored.version, rec.version + 1);
    assert_eq!(stored.name, "renamed");
    assert_eq!(
        store.get_by_id(&rec.id).await.unwrap(),
        Some(stored.clone())
    );

    let mut stale = rec.clone();
    stale.name = "lost update".into();
    let r = store.update_key(&stale, None).await;
    assert!(
        matches!(r, Err(StoreError::Conflict)),
        "stale version: {r:?}"
    );
    assert_eq!(
        store.get_by_id(&rec.id).await.unwrap().unwrap().name,
        "renamed"
    );

    let ghost = new_key("alice", "ghost");
    let r = store.update_key(&ghost, None).await;
    assert!(
        matches!(r, Err(StoreError::NotFound)),
        "missing record: {r:?}"
    );

    let evs = store
        .list_events(&EventFilter {
            key_id: Some(rec.id),
            kind: Some(EventType::KeyUpdated),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 1, "one key.updated event");
}

async fn rotation_reindexes_hashes(h: Harness) {
    let store = &*h.store;
    let rec = new_key("alice", "rotating");
    create(store, &rec).await;
    let old = rec.token_hash;
    let new = Token::generate("kg_").hash();

    let mut rotated = rec.clone();
    rotated.token_hash = new;
    rotated.retired = vec![RetiredSecret {
        hash: old,
        valid_until: Utc::now() + TimeDelta::hours(1),
    }];
    let rotated = store
        .update_key(&rotated, Some(&event(EventType::KeyRotated, Some(&rec))))
        .await
        .expect("rotate");
    for hash in [old, new] {
        let found = store.get_by_hash(&hash).await.unwrap();
        assert_eq!(
            found.as_ref().map(|r| &r.id),
            Some(&rec.id),
            "{hash:?} finds the record"
        );
    }

    // The grace has been cut short: the retired hash is dropped from the record.
    let mut dropped = rotated.clone();
    dropped.retired.clear();
    store
        .update_key(&dropped, None)
        .await
        .expect("drop retired");
    assert_eq!(
        store.get_by_hash(&old).await.unwrap(),
        None,
        "dropped hash no longer indexes"
    );
    assert_eq!(
        store.get_by_hash(&new).await.unwrap().map(|r| r.id),
        Some(rec.id)
    );

    // A hash held by another key cannot be taken over by an update.
    let other = new_key("alice", "other");
    create(store, &other).await;
    let mut thief = store.get_by_id(&rec.id).await.unwrap().unwrap();
    thief.token_hash = other.token_hash;
    let r = store.update_key(&thief, None).await;
    assert!(
        matches!(r, Err(StoreError::Duplicate)),
        "stealing a hash: {r:?}"
    );
    assert_eq!(
        store
            .get_by_hash(&other.token_hash)
            .await
            .unwrap()
            .map(|r| r.id),
        Some(other.id)
    );
}

async fn delete_removes_record_and_indexes(h: Harness) {
    let store = &*h.store;
    let mut rec = new_key("alice", "doomed");
    let retired = Token::generate("kg_").hash();
    rec.retired = vec![RetiredSecret {
        hash: retired,
        valid_until: Utc::now() + TimeDelta::hours(1),
    }];
    store
        .create_key(&rec, 1, &created(&rec))
        .await
        .expect("create");
    let used = now_ms();
    store
        .flush_usage(&[UsageDelta {
            key_id: rec.id,
            hour: used,
            counts: UsageCounts {
                allowed: 3,
                denied: 0,
                rate_limited: 0,
            },
            last_used_at: Some(used),
        }])
        .await
        .unwrap();

    let deleted = store
        .delete_key(&rec.id, &event(EventType::KeyDeleted, Some(&rec)))
        .await;
    let deleted = deleted.expect("delete").expect("there was a record");
    assert_eq!(deleted.id, rec.id);
    assert_eq!(deleted.last_used_at, Some(used));

    assert_eq!(store.get_by_id(&rec.id).await.unwrap(), None);
    assert_eq!(store.get_by_hash(&rec.token_hash).await.unwrap(), None);
    assert_eq!(store.get_by_hash(&retired).await.unwrap(), None);
    assert_eq!(store.count_owner("alice").await.unwrap(), 0);
    let all = list_all(
        store,
        &ListFilter {
            limit: 10,
            ..Default::default()
        },
        Utc::now(),
    )
    .await;
    assert!(all.is_empty(), "listed after delete: {all:?}");
    let owned = ListFilter {
        owner: Some("alice".into()),
        limit: 10,
        ..Default::default()
    };
    assert!(list_all(store, &owned, Utc::now()).await.is_empty());
    assert!(
        store
            .usage(&rec.id, used - TimeDelta::days(1))
            .await
            .unwrap()
            .is_empty()
    );

    let again = store
        .delete_key(&rec.id, &event(EventType::KeyDeleted, Some(&rec)))
        .await;
    assert!(matches!(again, Ok(None)), "second delete: {again:?}");
    let evs = store
        .list_events(&EventFilter {
            key_id: Some(rec.id),
            kind: Some(EventType::KeyDeleted),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 1, "exactly one key.deleted event");

    // The owner's slot is free again (cap 1), and the old hashes may be reused.
    let mut next = new_key("alice", "next");
    next.token_hash = rec.token_hash;
    store
        .create_key(&next, 1, &created(&next))
        .await
        .expect("slot and hash are free");
}

async fn events_filter_page_and_prune(h: Harness) {
    let store = &*h.store;
    let a = new_key("alice", "a");
    let b = new_key("alice", "b");
    let base = Utc::now() - TimeDelta::days(10);
    let kinds = [
        EventType::KeyUpdated,
        EventType::KeySuspended,
        EventType::KeyReinstated,
    ];
    let mut all = Vec::new();
    for i in 0..30i64 {
        let key = if i % 2 == 0 { &a } else { &b };
        let at = base + TimeDelta::minutes(i);
        let ev = Event::new(
            kinds[i as usize % 3],
            Some(key.id),
            "ops",
            at,
            json!({"i": i}),
        );
        store.append_event(&ev).await.unwrap();
        all.push(ev);
    }
    let global = Event::new(
        EventType::SettingsUpdated,
        None,
        "ops",
        base + TimeDelta::hours(2),
        json!({}),
    );
    store.append_event(&global).await.unwrap();
    all.push(global);
    all.sort_by(|x, y| x.id.cmp(&y.id));

    let list_every = |filter: EventFilter| async move {
        let mut filter = filter;
        let mut out: Vec<Event> = Vec::new();
        loop {
            let page = store.list_events(&filter).await.unwrap();
            assert!(page.items.len() <= filter.limit);
            out.extend(page.items.iter().cloned());
            match page.next {
                Some(next) => filter.after = Some(next),
                None => return out,
            }
        }
    };
    let expect = |f: &EventFilter| -> Vec<Event> {
        all.iter()
            .filter(|e| f.matches(e) && f.after.as_ref().is_none_or(|a| &e.id > a))
            .cloned()
            .collect()
    };
    let filters = [
        EventFilter {
            limit: 7,
            ..Default::default()
        },
        EventFilter {
            key_id: Some(a.id),
            limit: 4,
            ..Default::default()
        },
        EventFilter {
            kind: Some(EventType::KeySuspended),
            limit: 3,
            ..Default::default()
        },
        EventFilter {
            key_id: Some(b.id),
            kind: Some(EventType::KeyReinstated),
            limit: 2,
            ..Default::default()
        },
        EventFilter {
            after: Some(all[12].id.clone()),
            limit: 5,
            ..Default::default()
        },
        EventFilter {
            kind: Some(EventType::KeyExpired),
            limit: 5,
            ..Default::default()
        },
    ];
    for f in filters {
        let want = expect(&f);
        assert_eq!(list_every(f.clone()).await, want, "filter {f:?}");
    }
    assert_eq!(
        expect(&EventFilter {
            limit: 7,
            ..Default::default()
        })
        .len(),
        31
    );

    // Prune: everything before minute 20 goes, including an event in the very
    // same millisecond as the cutoff but earlier, and nothing at or after it.
    let cutoff = base + TimeDelta::minutes(20) + TimeDelta::microseconds(700);
    let same_ms_before = Event::new(
        EventType::KeyUpdated,
        None,
        "ops",
        cutoff - TimeDelta::microseconds(300),
        json!({}),
    );
    let same_ms_after = Event::new(
        EventType::KeyUpdated,
        None,
        "ops",
        cutoff + TimeDelta::microseconds(200),
        json!({}),
    );
    store.append_event(&same_ms_before).await.unwrap();
    store.append_event(&same_ms_after).await.unwrap();
    all.push(same_ms_before);
    all.push(same_ms_after);
    all.sort_by(|x, y| x.id.cmp(&y.id));
    let older = all.iter().filter(|e| e.at < cutoff).count() as u64;
    assert_eq!(
        older, 22,
        "21 events from minutes 0..=20, plus the same-millisecond one"
    );
    assert_eq!(store.prune_events(cutoff).await.unwrap(), older);
    let left = list_every(EventFilter {
        limit: 100,
        ..Default::default()
    })
    .await;
    let want: Vec<Event> = all.into_iter().filter(|e| e.at >= cutoff).collect();
    assert_eq!(left, want);
    assert_eq!(
        store.prune_events(cutoff).await.unwrap(),
        0,
        "pruning is idempotent"
    );
}

async fn settings_default_and_round_trip(h: Harness) {
    let store = &*h.store;
    assert_eq!(
        store.get_settings().await.unwrap(),
        Settings {
            api_keys_enabled: true
        }
    );
    let off = Settings {
        api_keys_enabled: false,
    };
    store
        .put_settings(&off, &event(EventType::SettingsUpdated, None))
        .await
        .unwrap();
    assert_eq!(store.get_settings().await.unwrap(), off);
    let on = Settings {
        api_keys_enabled: true,
    };
    store
        .put_settings(&on, &event(EventType::SettingsUpdated, None))
        .await
        .unwrap();
    assert_eq!(store.get_settings().await.unwrap(), on);
    let evs = store
        .list_events(&EventFilter {
            kind: Some(EventType::SettingsUpdated),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 2);
}

async fn usage_adds_up_and_last_used_never_goes_back(h: Harness) {
    let store = &*h.store;
    let rec = new_key("alice", "busy");
    create(store, &rec).await;
    let hour0 = DateTime::from_timestamp(1_750_000_000 - 1_750_000_000 % 3600, 0).unwrap();
    let hour1 = hour0 + TimeDelta::hours(1);
    let later = now_ms();
    let earlier = later - TimeDelta::minutes(5);
    let delta = |hour, allowed, denied, rate_limited, last| UsageDelta {
        key_id: rec.id,
        hour,
        counts: UsageCounts {
            allowed,
            denied,
            rate_limited,
        },
        last_used_at: last,
    };
    store
        .flush_usage(&[delta(hour0, 5, 1, 0, Some(later))])
        .await
        .unwrap();
    store
        .flush_usage(&[
            delta(hour0, 2, 0, 3, Some(earlier)),
            delta(hour1, 1, 0, 0, None),
        ])
        .await
        .unwrap();
    // A key deleted (or never created) meanwhile is skipped, not an error.
    let ghost = new_key("alice", "ghost");
    store
        .flush_usage(&[UsageDelta {
            key_id: ghost.id,
            ..delta(hour0, 1, 1, 1, Some(later))
        }])
        .await
        .unwrap();
    assert!(store.usage(&ghost.id, hour0).await.unwrap().is_empty());

    let hours = store.usage(&rec.id, hour0).await.unwrap();
    let got: Vec<_> = hours.iter().map(|u| (u.hour, u.counts.clone())).collect();
    assert_eq!(
        got,
        vec![
            (
                hour0,
                UsageCounts {
                    allowed: 7,
                    denied: 1,
                    rate_limited: 3
                }
            ),
            (
                hour1,
                UsageCounts {
                    allowed: 1,
                    denied: 0,
                    rate_limited: 0
                }
            ),
        ]
    );
    let only_last = store.usage(&rec.id, hour1).await.unwrap();
    assert_eq!(
        only_last.iter().map(|u| u.hour).collect::<Vec<_>>(),
        vec![hour1]
    );

    let read = store.get_by_id(&rec.id).await.unwrap().unwrap();
    assert_eq!(
        read.last_used_at,
        Some(later),
        "last_used_at never goes backwards"
    );
    assert_eq!(read.version, rec.version, "usage does not bump the version");
    let by_hash = store.get_by_hash(&rec.token_hash).await.unwrap().unwrap();
    assert_eq!(by_hash.last_used_at, Some(later));
    let listed = store
        .list_keys(
            &ListFilter {
                limit: 10,
                ..Default::default()
            },
            later,
        )
        .await;
    assert_eq!(listed.unwrap().items[0].last_used_at, Some(later));
    // An admin edit based on a read from before the flush still applies.
    let mut edit = rec.clone();
    edit.name = "renamed".into();
    let stored = store
        .update_key(&edit, None)
        .await
        .expect("no conflict with usage");
    assert_eq!(stored.last_used_at, Some(later));
}

async fn leader_lock_is_exclusive_renewable_and_expires(h: Harness) {
    let store = &*h.store;
    // Margins of 500 ms either side of every expiry, so a slow fsync on a
    // loaded machine cannot flip an assertion.
    let ttl = Duration::from_millis(1500);
    assert!(
        store.try_lead("a", ttl).await.unwrap(),
        "free lock is taken"
    );
    assert!(!store.try_lead("b", ttl).await.unwrap(), "held by a");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(store.try_lead("a", ttl).await.unwrap(), "holder renews");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !store.try_lead("b", ttl).await.unwrap(),
        "renewal extended the lease"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        store.try_lead("b", ttl).await.unwrap(),
        "expired lease is taken over"
    );
    assert!(
        !store.try_lead("a", ttl).await.unwrap(),
        "old holder lost it"
    );
}

async fn writes_deliver_invalidations(h: Harness) {
    let store = &*h.store;
    let rec = new_key("alice", "watched");
    create(store, &rec).await;
    let new_hash = Token::generate("kg_").hash();

    let mut rx = store.subscribe();
    let mut rotated = rec.clone();
    rotated.token_hash = new_hash;
    let stored = store.update_key(&rotated, None).await.unwrap();
    // Final on this instance as soon as the call returns: already queued.
    let queued = drain(&mut rx);
    assert!(
        queued.iter().any(is_keys(&[rec.token_hash, new_hash])),
        "update: old and new hash, got {queued:?}"
    );

    let mut rx = store.subscribe();
    store
        .delete_key(&stored.id, &event(EventType::KeyDeleted, Some(&rec)))
        .await
        .unwrap();
    let queued = drain(&mut rx);
    assert!(
        queued.iter().any(is_keys(&[new_hash])),
        "delete: got {queued:?}"
    );

    let mut rx = store.subscribe();
    store
        .put_settings(
            &Settings {
                api_keys_enabled: false,
            },
            &event(EventType::SettingsUpdated, None),
        )
        .await
        .unwrap();
    let queued = drain(&mut rx);
    assert!(
        queued.contains(&Invalidation::Settings),
        "settings: got {queued:?}"
    );
}

// ---------------------------------------------------------------------------
// Embedded only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dirs/keygate.redb");
    let rec = new_key("alice", "durable");
    let used = now_ms();
    {
        let store = EmbeddedStore::open(&path).expect("open creates parent dirs");
        create(&store, &rec).await;
        store
            .put_settings(
                &Settings {
                    api_keys_enabled: false,
                },
                &event(EventType::SettingsUpdated, None),
            )
            .await
            .unwrap();
        store
            .flush_usage(&[UsageDelta {
                key_id: rec.id,
                hour: used,
                counts: UsageCounts {
                    allowed: 1,
                    denied: 2,
                    rate_limited: 3,
                },
                last_used_at: Some(used),
            }])
            .await
            .unwrap();
    }
    let store = EmbeddedStore::open(&path).expect("reopen after drop");
    let read = store
        .get_by_hash(&rec.token_hash)
        .await
        .unwrap()
        .expect("record survived");
    assert_eq!(read.last_used_at, Some(used));
    assert_eq!(
        KeyRecord {
            last_used_at: None,
            ..read
        },
        rec
    );
    assert_eq!(
        store.get_settings().await.unwrap(),
        Settings {
            api_keys_enabled: false
        }
    );
    assert_eq!(store.count_owner("alice").await.unwrap(), 1);
    assert_eq!(
        store
            .usage(&rec.id, used - TimeDelta::hours(2))
            .await
            .unwrap()
            .len(),
        1
    );
    let evs = store
        .list_events(&EventFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(evs.items.len(), 2);
}

#[tokio::test]
async fn embedded_second_open_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.redb");
    let first = EmbeddedStore::open(&path).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StoreError::Unavailable(msg)) => {
            assert_eq!(
                msg,
                format!("{} is in use by another keygate process", path.display())
            );
        }
        other => panic!("second open must fail with Unavailable, got {other:?}"),
    }
    drop(first);
    EmbeddedStore::open(&path).expect("open again once the first handle is gone");
}

/// Env var naming the database for [`embedded_writer_child`].
const WRITER_DB_ENV: &str = "KEYGATE_TEST_WRITER_DB";

/// Not a test on its own: the child process of
/// `embedded_kill_9_loses_nothing_acknowledged`. Creates keys forever, printing
/// `ACK <id>` after each create returns.
#[tokio::test]
#[ignore = "helper process, started by embedded_kill_9_loses_nothing_acknowledged"]
async fn embedded_writer_child() {
    let Ok(path) = std::env::var(WRITER_DB_ENV) else {
        return;
    };
    let store = EmbeddedStore::open(std::path::Path::new(&path)).expect("child opens the store");
    let mut out = std::io::stdout();
    for i in 0.. {
        let rec = new_key(&format!("owner-{}", i % 7), &format!("k{i}"));
        store
            .create_key(&rec, u32::MAX, &created(&rec))
            .await
            .expect("child create");
        std::io::Write::write_all(&mut out, format!("ACK {}\n", rec.id).as_bytes())
            .expect("stdout");
        std::io::Write::flush(&mut out).expect("stdout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.redb");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "store::embedded_writer_child",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(WRITER_DB_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the writer child");
    let stdout = child.stdout.take().unwrap();
    let acked = tokio::task::spawn_blocking(move || {
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.expect("read child stdout");
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.push(KeyId::parse(id).expect("child prints key ids"));
                if acked.len() == 300 {
                    break;
                }
            }
        }
        acked
    })
    .await
    .unwrap();
    child.kill().expect("kill -9 the writer");
    child.wait().unwrap();
    assert_eq!(acked.len(), 300, "the child stopped early");

    let store = EmbeddedStore::open(&path).expect("reopen after kill -9");
    for id in &acked {
        assert!(
            store.get_by_id(id).await.unwrap().is_some(),
            "acknowledged {id} was lost"
        );
    }
    // Indexes and counters stayed consistent with the records.
    let all = list_all(
        &store,
        &ListFilter {
            limit: 1000,
            ..Default::default()
        },
        Utc::now(),
    )
    .await;
    assert!(all.len() >= acked.len());
    let mut counted = 0;
    for o in 0..7 {
        counted += store.count_owner(&format!("owner-{o}")).await.unwrap();
    }
    assert_eq!(counted, all.len() as u64, "owner counts match the records");
}

// ---------------------------------------------------------------------------
// Redis only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_invalidations_reach_other_instances_fast() {
    let server = RedisServer::start();
    let a = RedisStore::connect(&server.url(), "kg:").await.unwrap();
    let b = RedisStore::connect(&server.url(), "kg:").await.unwrap();
    let mut rx = b.subscribe();
    let mut latencies = Vec::new();
    for i in 0..20 {
        let rec = new_key("alice", &format!("k{i}"));
        create(&a, &rec).await;
        assert_eq!(
            b.get_by_hash(&rec.token_hash).await.unwrap().map(|r| r.id),
            Some(rec.id)
        );
        let started = Instant::now();
        a.delete_key(&rec.id, &event(EventType::KeyDeleted, Some(&rec)))
            .await
            .unwrap();
        let got = wait_for(&mut rx, Duration::from_secs(2), is_keys(&[rec.token_hash])).await;
        assert!(got.is_some(), "B never heard of the delete on A");
        latencies.push(started.elapsed());
        assert_eq!(b.get_by_hash(&rec.token_hash).await.unwrap(), None);
    }
    latencies.sort();
    let (median, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    eprintln!("pub/sub propagation A delete -> B subscriber: median {median:?}, max {max:?}");
    assert!(
        median < Duration::from_millis(100),
        "DESIGN promises 100 ms; median {median:?}"
    );

    // Settings changes reach B too.
    a.put_settings(
        &Settings {
            api_keys_enabled: false,
        },
        &event(EventType::SettingsUpdated, None),
    )
    .await
    .unwrap();
    let got = wait_for(&mut rx, Duration::from_secs(2), |i| {
        *i == Invalidation::Settings
    })
    .await;
    assert!(got.is_some(), "B never heard of the settings change");
    assert!(!b.get_settings().await.unwrap().api_keys_enabled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers_by_itself() {
    let mut server = RedisServer::start();
    let a = RedisStore::connect(&server.url(), "kg:").await.unwrap();
    let b = RedisStore::connect(&server.url(), "kg:").await.unwrap();
    let mut rx = b.subscribe();
    let rec = new_key("alice", "before");
    create(&a, &rec).await;

    server.stop();
    for attempt in 0..3 {
        let started = Instant::now();
        let r = a.get_by_id(&rec.id).await;
        let took = started.elapsed();
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "attempt {attempt}: {r:?}"
        );
        assert!(
            took < Duration::from_millis(2500),
            "attempt {attempt} took {took:?}"
        );
        eprintln!("store down: attempt {attempt} failed in {took:?}: {r:?}");
    }
    let r = a
        .create_key(&new_key("alice", "x"), 10, &created(&rec))
        .await;
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "create while down: {r:?}"
    );
    assert!(matches!(a.ping().await, Err(StoreError::Unavailable(_))));

    server.restart();
    let started = Instant::now();
    loop {
        match a.ping().await {
            Ok(()) => break,
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                panic!("store did not recover after restart: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    eprintln!(
        "store answered again {:?} after the restart",
        started.elapsed()
    );
    // The restarted server is empty (no persistence): writes work again.
    let after = new_key("alice", "after");
    create(&a, &after).await;
    assert_eq!(
        b.get_by_id(&after.id).await.unwrap().map(|r| r.id),
        Some(after.id)
    );

    let got = wait_for(&mut rx, Duration::from_secs(10), |i| {
        *i == Invalidation::All
    })
    .await;
    assert!(
        got.is_some(),
        "B's subscriber must flush (Invalidation::All) after reconnecting"
    );
    eprintln!("B flushed {:?} after the restart", started.elapsed());
    // And it is subscribed again.
    a.delete_key(&after.id, &event(EventType::KeyDeleted, Some(&after)))
        .await
        .unwrap();
    let got = wait_for(
        &mut rx,
        Duration::from_secs(2),
        is_keys(&[after.token_hash]),
    )
    .await;
    assert!(
        got.is_some(),
        "B hears invalidations again after the reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_server_fails_fast_then_recovers() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "kg:").await.unwrap();
    let rec = new_key("alice", "frozen");
    create(&store, &rec).await;

    server.pause();
    let started = Instant::now();
    let r = store.get_by_hash(&rec.token_hash).await;
    let took = started.elapsed();
    server.resume();
    eprintln!("frozen server: call failed after {took:?}: {r:?}");
    assert!(
        matches!(r, Err(StoreError::Unavailable(_))),
        "while frozen: {r:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "a frozen server must not hang callers: {took:?}"
    );

    let started = Instant::now();
    loop {
        match store.get_by_hash(&rec.token_hash).await {
            Ok(found) => {
                assert_eq!(found.map(|r| r.id), Some(rec.id));
                break;
            }
            Err(e) if started.elapsed() > Duration::from_secs(10) => panic!("no recovery: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_prefixes_keep_stores_apart() {
    let server = RedisServer::start();
    let one = RedisStore::connect(&server.url(), "one:").await.unwrap();
    let two = RedisStore::connect(&server.url(), "two:").await.unwrap();
    let rec = new_key("alice", "mine");
    create(&one, &rec).await;
    assert_eq!(two.get_by_hash(&rec.token_hash).await.unwrap(), None);
    assert_eq!(two.count_owner("alice").await.unwrap(), 0);
    let mut rx = two.subscribe();
    one.delete_key(&rec.id, &event(EventType::KeyDeleted, Some(&rec)))
        .await
        .unwrap();
    let heard = wait_for(&mut rx, Duration::from_millis(300), |_| true).await;
    assert_eq!(heard, None, "another prefix's invalidations are not ours");
}

#[tokio::test]
async fn redis_connect_refuses_a_prefix_that_breaks_the_hash_tag() {
    let server = RedisServer::start();
    match RedisStore::connect(&server.url(), "kg{x}:").await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("must not contain"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn redis_connect_to_nothing_fails_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let r = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), "kg:").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
    let r = RedisStore::connect("not a url", "kg:").await;
    match r {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("invalid redis URL"), "{msg}"),
        other => panic!("{other:?}"),
    }
}
