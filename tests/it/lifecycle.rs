//! Lifecycle tests (DESIGN.md section 6, issue 6): expiry notices exactly once
//! (also after a restart and with two instances on one Redis), the expired
//! marker, purge after the window, signed webhooks with retries, the event
//! tail that delivers admin events, leader failover, and usage counting
//! through a real `keygate` binary.
//!
//! The jobs run in process over a real store (embedded in a temp dir, or a
//! real `redis-server`) with a `ManualClock`, so days pass in an instant;
//! webhooks go to a real HTTP receiver on `127.0.0.1:0` that checks the
//! signature itself.

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keygate::config::Config;
use keygate::keys::{Clock, KeyId, KeyRecord, ManualClock, Token};
use keygate::lifecycle::{Lifecycle, LifecycleOptions, Notice, WebhookOptions, Webhooks};
use keygate::store::embedded::EmbeddedStore;
use keygate::store::redis::RedisStore;
use keygate::store::{Event, EventFilter, EventType, SharedStore};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::common::client::Req;
use crate::common::keygate::Keygate;
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

const SECRET_ENV: &str = "KG_LIFECYCLE_TEST_SECRET";
const SECRET: &str = "whsec-lifecycle-test-0123456789";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- receiver

/// One webhook request as the receiver saw it.
#[derive(Clone, Debug)]
struct Hit {
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {self:#?}"))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is not JSON ({e}): {self:#?}"))
    }

    /// Checks `X-Keygate-Signature` against our own HMAC-SHA256 of the body.
    #[track_caller]
    fn assert_signed(&self, secret: &str) {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&self.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(self.header("x-keygate-signature"), expected, "{self:#?}");
        assert_eq!(self.header("content-type"), "application/json");
        let ts: i64 = self
            .header("x-keygate-timestamp")
            .parse()
            .unwrap_or_else(|e| panic!("timestamp is not Unix seconds ({e}): {self:#?}"));
        assert!(
            (Utc::now().timestamp() - ts).abs() < 60,
            "timestamp {ts} is not now: {self:#?}"
        );
        assert!(self.header("x-keygate-delivery").starts_with("dlv_"));
    }
}

/// A webhook receiver: answers with the scripted statuses in order, then 200.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(script: &[u16]) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let task = tokio::spawn({
            let hits = hits.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let hits = hits.clone();
                    let script = script.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let hits = hits.clone();
                            let script = script.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes());
                                let body = body.unwrap_or_default();
                                hits.lock().unwrap().push(Hit {
                                    headers: parts.headers,
                                    body,
                                });
                                let status = script.lock().unwrap().pop_front().unwrap_or(200);
                                let resp = Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            eprintln!("receiver connection: {e}");
                        }
                    });
                }
            }
        });
        Receiver { addr, hits, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/keygate?token=t", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits for at least `n` hits, then returns them all.
    async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + WAIT;
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} webhooks, expected {n} within {WAIT:?}: {hits:#?}",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts that no more than `n` hits arrive over a short while.
    async fn assert_stays_at(&self, n: usize) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let hits = self.hits();
        assert_eq!(hits.len(), n, "unexpected extra webhooks: {hits:#?}");
    }
}

// ---------------------------------------------------------------- harness

fn config(webhook_url: &str, events: &[&str]) -> Config {
    let yaml = format!(
        "keys:\n  expiry_notice: 30d\n  purge_expired_after: 90d\n\
         notifications:\n  webhooks:\n\
         \x20   - url: '{webhook_url}'\n\
         \x20     secret_env: {SECRET_ENV}\n\
         \x20     events: [{}]\n",
        events.join(", ")
    );
    keygate::config::parse(&yaml, "lifecycle-test.yaml", &[])
        .unwrap_or_else(|e| panic!("test config does not parse: {e}\n{yaml}"))
}

fn fast_webhooks() -> WebhookOptions {
    WebhookOptions {
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        retry_for: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(2),
        secrets: Arc::new(|name| (name == SECRET_ENV).then(|| SECRET.to_owned())),
        ..WebhookOptions::default()
    }
}

fn options(instance: &str) -> LifecycleOptions {
    LifecycleOptions {
        instance_id: instance.to_owned(),
        tick: Duration::from_millis(50),
        renew_every: Duration::from_millis(200),
        lead_ttl: Duration::from_secs(1),
        pass_every: Duration::from_secs(3600),
        pass_budget: Duration::from_secs(10),
        webhooks: fast_webhooks(),
    }
}

/// A lifecycle over `store` whose webhook dispatcher runs until `stop`.
fn lifecycle(
    store: &SharedStore,
    cfg: &Config,
    clock: &Arc<ManualClock>,
    instance: &str,
    stop: &CancellationToken,
) -> Arc<Lifecycle> {
    let lc = Lifecycle::new(
        store.clone(),
        Arc::new(ArcSwap::from_pointee(cfg.clone())),
        clock.clone(),
        options(instance),
    );
    lc.webhooks().spawn(stop.clone());
    lc
}

fn record(now: DateTime<Utc>, expires_in: Option<TimeDelta>) -> KeyRecord {
    let mut rec = KeyRecord::issue(
        &Token::generate("kg_"),
        "kg_",
        "lifecycle",
        "ops",
        "ops",
        now,
    );
    rec.expires_at = expires_in.map(|d| now + d);
    rec
}

async fn create(store: &SharedStore, now: DateTime<Utc>, expires_in: Option<TimeDelta>) -> KeyId {
    let rec = record(now, expires_in);
    let ev = Event::new(EventType::KeyCreated, Some(rec.id), "ops", now, json!({}));
    store.create_key(&rec, 1000, &ev).await.expect("create key");
    rec.id
}

async fn events_of(store: &SharedStore, kind: EventType) -> Vec<Event> {
    let filter = EventFilter {
        kind: Some(kind),
        limit: 1000,
        ..EventFilter::default()
    };
    store.list_events(&filter).await.expect("list events").items
}

fn open_embedded(path: &std::path::Path) -> SharedStore {
    Arc::new(EmbeddedStore::open(path).expect("open the embedded store"))
}

async fn open_redis(server: &RedisServer) -> SharedStore {
    Arc::new(
        RedisStore::connect(&server.url(), "kg:")
            .await
            .expect("connect to redis"),
    )
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

// ---------------------------------------------------------------- jobs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_notice_is_sent_once_even_after_a_restart() {
    let receiver = Receiver::start(&[]).await;
    let cfg = config(&receiver.url(), &["key.expiring", "key.expired"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.redb");
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let stop = CancellationToken::new();

    let store = open_embedded(&path);
    let now = clock.now();
    let soon = create(&store, now, Some(TimeDelta::days(10))).await;
    let later = create(&store, now, Some(TimeDelta::days(60))).await;
    let never = create(&store, now, None).await;

    let lc = lifecycle(&store, &cfg, &clock, "a", &stop);
    let report = lc.run_pass().await.unwrap();
    assert_eq!(
        (
            report.notified,
            report.expired,
            report.purged,
            report.scanned
        ),
        (1, 0, 0, 3),
        "{report:?}"
    );
    let hits = receiver.wait_hits(1).await;
    let hit = &hits[0];
    hit.assert_signed(SECRET);
    assert_eq!(hit.header("x-keygate-event"), "key.expiring");
    let body = hit.json();
    assert_eq!(body["type"], "key.expiring", "{body:#}");
    assert_eq!(body["key_id"], soon.text().as_str(), "{body:#}");
    assert_eq!(body["actor"], "keygate", "{body:#}");
    assert!(body["id"].as_str().unwrap().starts_with("evt_"), "{body:#}");
    assert_eq!(body["key"]["id"], soon.text().as_str(), "{body:#}");
    assert_eq!(body["key"]["status"], "active", "{body:#}");
    assert!(body["key"].get("token_hash").is_none(), "{body:#}");
    let notices = events_of(&store, EventType::KeyExpiring).await;
    assert_eq!(notices.len(), 1, "{notices:#?}");
    assert_eq!(notices[0].key_id.as_ref(), Some(&soon));
    assert_eq!(body["id"], notices[0].id.as_str());
    let rec = store.get_by_id(&soon).await.unwrap().unwrap();
    assert_eq!(rec.expiry_notified_at, Some(now));

    // A second pass, a day later, has nothing to send.
    clock.advance(Duration::from_secs(86_400));
    let report = lc.run_pass().await.unwrap();
    assert_eq!(report.notified, 0, "{report:?}");

    // A restart: a new lifecycle over the reopened file.
    stop.cancel();
    drop(lc);
    drop(store);
    let stop = CancellationToken::new();
    let store = open_embedded(&path);
    let lc = lifecycle(&store, &cfg, &clock, "b", &stop);
    let report = lc.run_pass().await.unwrap();
    assert_eq!(report.notified, 0, "{report:?}");
    assert_eq!(events_of(&store, EventType::KeyExpiring).await.len(), 1);
    receiver.assert_stays_at(1).await;

    // Day 30: the 60-day key gets its notice (30 days out) and the first key
    // has expired; the key without expiry never gets anything.
    clock.advance(Duration::from_secs(29 * 86_400));
    let report = lc.run_pass().await.unwrap();
    assert_eq!((report.notified, report.expired), (1, 1), "{report:?}");
    let hits = receiver.wait_hits(3).await;
    let mut got: Vec<(String, String)> = hits[1..]
        .iter()
        .map(|h| {
            let b = h.json();
            (
                b["type"].as_str().unwrap().to_owned(),
                b["key_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("key.expired".to_owned(), soon.to_string()),
            ("key.expiring".to_owned(), later.to_string()),
        ]
    );
    let never_rec = store.get_by_id(&never).await.unwrap().unwrap();
    assert_eq!(never_rec.expiry_notified_at, None);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_marked_then_purged_after_the_window() {
    let receiver = Receiver::start(&[]).await;
    let cfg = config(&receiver.url(), &["key.expired", "key.purged"]);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let stop = CancellationToken::new();
    let store = open_embedded(&dir.path().join("keygate.redb"));
    let t0 = clock.now();
    let id = create(&store, t0, Some(TimeDelta::days(1))).await;
    let keep = create(&store, t0, Some(TimeDelta::days(365))).await;
    let lc = lifecycle(&store, &cfg, &clock, "a", &stop);

    // Day 0: only a notice (not subscribed by this webhook).
    assert_eq!(lc.run_pass().await.unwrap().notified, 1);

    // Day 2: expired, marked once.
    clock.advance(Duration::from_secs(2 * 86_400));
    let report = lc.run_pass().await.unwrap();
    assert_eq!((report.expired, report.purged), (1, 0), "{report:?}");
    let rec = store.get_by_id(&id).await.unwrap().unwrap();
    assert_eq!(rec.expired_recorded_at, Some(clock.now()));
    assert_eq!(rec.view(clock.now()).status.as_str(), "expired");
    let hits = receiver.wait_hits(1).await;
    hits[0].assert_signed(SECRET);
    assert_eq!(hits[0].header("x-keygate-event"), "key.expired");
    assert_eq!(hits[0].json()["key"]["status"], "expired");
    assert_eq!(lc.run_pass().await.unwrap().expired, 0);
    assert_eq!(events_of(&store, EventType::KeyExpired).await.len(), 1);

    // Day 90 after expiry minus a second: still there.
    clock.set(t0 + TimeDelta::days(91) - TimeDelta::seconds(1));
    let report = lc.run_pass().await.unwrap();
    assert_eq!(report.purged, 0, "{report:?}");
    let mut pruned = report.pruned_events;
    assert!(store.get_by_id(&id).await.unwrap().is_some());

    // Day 90 after expiry: purged, with a key.purged event; events older than
    // 90 days (the creations and the notice on day 0) are pruned.
    clock.set(t0 + TimeDelta::days(91));
    let report = lc.run_pass().await.unwrap();
    assert_eq!(report.purged, 1, "{report:?}");
    pruned += report.pruned_events;
    assert_eq!(pruned, 3, "two creations and the notice");
    assert!(store.get_by_id(&id).await.unwrap().is_none());
    assert!(store.get_by_id(&keep).await.unwrap().is_some());
    let purged = events_of(&store, EventType::KeyPurged).await;
    assert_eq!(purged.len(), 1, "{purged:#?}");
    assert_eq!(purged[0].key_id.as_ref(), Some(&id));
    assert!(events_of(&store, EventType::KeyCreated).await.is_empty());
    let hits = receiver.wait_hits(2).await;
    assert_eq!(hits[1].header("x-keygate-event"), "key.purged");
    assert_eq!(hits[1].json()["key_id"], id.text().as_str());
    assert_eq!(lc.run_pass().await.unwrap().purged, 0);
    receiver.assert_stays_at(2).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_send_each_notice_once() {
    let server = RedisServer::start();
    let receiver = Receiver::start(&[]).await;
    let cfg = config(&receiver.url(), &["key.expiring"]);
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let stop = CancellationToken::new();
    let store_a = open_redis(&server).await;
    let store_b = open_redis(&server).await;
    let mut ids = BTreeSet::new();
    for _ in 0..30 {
        ids.insert(create(&store_a, clock.now(), Some(TimeDelta::days(5))).await);
    }
    let a = lifecycle(&store_a, &cfg, &clock, "a", &stop);
    let b = lifecycle(&store_b, &cfg, &clock, "b", &stop);

    // Both run their passes at the same time, three times over.
    let mut notified = 0;
    for _ in 0..3 {
        let (ra, rb) = tokio::join!(a.run_pass(), b.run_pass());
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        eprintln!("notices sent: a {}, b {}", ra.notified, rb.notified);
        notified += ra.notified + rb.notified;
    }
    assert_eq!(notified, 30);
    assert_eq!(events_of(&store_a, EventType::KeyExpiring).await.len(), 30);
    let hits = receiver.wait_hits(30).await;
    receiver.assert_stays_at(30).await;
    let seen: BTreeSet<String> = hits
        .iter()
        .map(|h| h.json()["key_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = ids.iter().map(|i| i.to_string()).collect();
    assert_eq!(seen, expected);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_fails_over_within_the_lock_ttl() {
    let server = RedisServer::start();
    let receiver = Receiver::start(&[]).await;
    let cfg = config(&receiver.url(), &["key.expiring"]);
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let store_a = open_redis(&server).await;
    let store_b = open_redis(&server).await;
    let cfg_live = |c: &Config| Arc::new(ArcSwap::from_pointee(c.clone()));
    let a = Lifecycle::new(store_a, cfg_live(&cfg), clock.clone(), options("a"));
    let b = Lifecycle::new(store_b, cfg_live(&cfg), clock.clone(), options("b"));
    let stop_a = CancellationToken::new();
    let stop_b = CancellationToken::new();
    let task_a = a.spawn(stop_a.clone());
    wait_until("a leads", WAIT, || a.is_leader()).await;
    let task_b = b.spawn(stop_b.clone());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(a.is_leader() && !b.is_leader(), "exactly one leader");

    // A dies without releasing the lock: B must lead within the TTL (1 s)
    // plus one of its ticks (50 ms).
    stop_a.cancel();
    task_a.await.unwrap();
    let took = wait_until("b takes over", WAIT, || b.is_leader()).await;
    eprintln!("failover took {took:?}");
    assert!(
        took <= Duration::from_millis(1000 + 50 + 300),
        "failover took {took:?}"
    );
    assert!(!a.is_leader());
    stop_b.cancel();
    task_b.await.unwrap();
}

// ---------------------------------------------------------------- webhooks

fn notice(kind: EventType) -> Notice {
    Notice {
        event: Event::new(
            kind,
            Some(KeyId::generate()),
            "ops",
            Utc::now(),
            json!({"reason": "test"}),
        ),
        key: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_and_retried_after_server_errors() {
    let receiver = Receiver::start(&[500, 500, 200]).await;
    let cfg = config(&receiver.url(), &["key.revoked"]);
    let hooks = Webhooks::new(Arc::new(ArcSwap::from_pointee(cfg)), fast_webhooks());
    let stop = CancellationToken::new();
    let task = hooks.spawn(stop.clone());
    let sent = notice(EventType::KeyRevoked);
    hooks.enqueue(sent.clone());
    // Not subscribed: never sent.
    hooks.enqueue(notice(EventType::KeyCreated));

    let hits = receiver.wait_hits(3).await;
    receiver.assert_stays_at(3).await;
    let delivery = hits[0].header("x-keygate-delivery").to_owned();
    for hit in &hits {
        hit.assert_signed(SECRET);
        assert_eq!(hit.header("x-keygate-event"), "key.revoked");
        assert_eq!(
            hit.header("x-keygate-delivery"),
            delivery,
            "same delivery id"
        );
        assert_eq!(hit.body, hits[0].body, "same body on every retry");
    }
    let body = hits[0].json();
    assert_eq!(body["id"], sent.event.id.as_str());
    assert_eq!(body["type"], "key.revoked");
    assert_eq!(body["actor"], "ops");
    assert_eq!(body["details"]["reason"], "test");
    assert_eq!(
        body["key_id"],
        sent.event.key_id.as_ref().unwrap().text().as_str()
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_give_up_on_client_errors_and_never_go_unsigned() {
    let refusing = Receiver::start(&[404]).await;
    let unsigned = Receiver::start(&[]).await;
    let yaml = format!(
        "notifications:\n  webhooks:\n\
         \x20   - {{url: '{}', secret_env: {SECRET_ENV}, events: [key.revoked]}}\n\
         \x20   - {{url: '{}', secret_env: KG_LIFECYCLE_MISSING, events: [key.revoked]}}\n",
        refusing.url(),
        unsigned.url()
    );
    let cfg = keygate::config::parse(&yaml, "test.yaml", &[]).unwrap();
    let hooks = Webhooks::new(Arc::new(ArcSwap::from_pointee(cfg)), fast_webhooks());
    let stop = CancellationToken::new();
    let task = hooks.spawn(stop.clone());
    hooks.enqueue(notice(EventType::KeyRevoked));
    refusing.wait_hits(1).await;
    refusing.assert_stays_at(1).await;
    unsigned.assert_stays_at(0).await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_events_are_tailed_to_webhooks_once() {
    let receiver = Receiver::start(&[]).await;
    let cfg = config(&receiver.url(), &["key.revoked", "key.expiring"]);
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let stop = CancellationToken::new();
    let store = open_embedded(&dir.path().join("keygate.redb"));
    let append = |kind: EventType| {
        let store = store.clone();
        let clock = clock.clone();
        async move {
            clock.advance(Duration::from_millis(5));
            let ev = Event::new(kind, Some(KeyId::generate()), "ops", clock.now(), json!({}));
            store.append_event(&ev).await.unwrap();
            ev
        }
    };
    let lc = lifecycle(&store, &cfg, &clock, "a", &stop);

    // Events from before the tail starts are not delivered.
    append(EventType::KeyRevoked).await;
    assert_eq!(lc.poll_events().await.unwrap(), 0);

    let revoked = append(EventType::KeyRevoked).await;
    append(EventType::KeyCreated).await;
    // Lifecycle types are delivered by the jobs, not by the tail.
    append(EventType::KeyExpiring).await;
    assert_eq!(lc.poll_events().await.unwrap(), 2);
    assert_eq!(lc.poll_events().await.unwrap(), 0);
    let hits = receiver.wait_hits(1).await;
    receiver.assert_stays_at(1).await;
    hits[0].assert_signed(SECRET);
    assert_eq!(hits[0].json()["id"], revoked.id.as_str());
    stop.cancel();
}

// ---------------------------------------------------------------- through the binary

/// Hourly usage of `id` summed over the hours, and `last_used_at`.
async fn usage(kg: &Keygate, id: &str) -> ((u64, u64, u64), Value) {
    let resp = kg.admin(Req::get(&format!("/v1/keys/{id}/usage"))).await;
    resp.assert_status(200);
    let json = resp.json();
    let mut sum = (0, 0, 0);
    for h in json["hourly"].as_array().expect("hourly") {
        sum.0 += h["allowed"].as_u64().unwrap();
        sum.1 += h["denied"].as_u64().unwrap();
        sum.2 += h["rate_limited"].as_u64().unwrap();
    }
    (sum, json["last_used_at"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_counted_in_memory_and_flushed_in_batches() {
    let up = Upstream::start().await;
    let started = Instant::now();
    let kg = Keygate::builder()
        .route(&format!(
            "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}'}}",
            up.url()
        ))
        .start()
        .await;
    let (full, full_secret) = kg
        .create_key(json!({"name": "full", "scopes": [], "access": "full"}))
        .await;
    let (ro, ro_secret) = kg
        .create_key(json!({"name": "ro", "scopes": [], "access": "read_only"}))
        .await;
    let bearer = |s: &str| format!("Bearer {s}");
    for _ in 0..3 {
        kg.send(Req::get("/api/x").header("authorization", &bearer(&full_secret)))
            .await
            .assert_status(200);
    }
    kg.send(Req::get("/api/x").header("authorization", &bearer(&ro_secret)))
        .await
        .assert_status(200);
    for _ in 0..2 {
        kg.send(Req::post("/api/x", "{}").header("authorization", &bearer(&ro_secret)))
            .await
            .assert_problem(403, "read_only_key");
    }

    // The request path wrote nothing: usage shows up only after a flush
    // (every 5 s). Only checkable while the first flush cannot have run.
    let before = usage(&kg, &full).await;
    if started.elapsed() < Duration::from_millis(4500) {
        assert_eq!(before, ((0, 0, 0), Value::Null), "usage before any flush");
    } else {
        eprintln!(
            "slow start ({:?}): skipped the before-flush check",
            started.elapsed()
        );
    }

    let deadline = Instant::now() + Duration::from_secs(15);
    let (counts, last_used) = loop {
        let (counts, last) = usage(&kg, &full).await;
        if counts.0 >= 3 || Instant::now() > deadline {
            break (counts, last);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(counts, (3, 0, 0), "{}", kg.explain());
    let last_used: DateTime<Utc> = serde_json::from_value(last_used).expect("last_used_at set");
    assert!(
        (Utc::now() - last_used).num_seconds().abs() < 30,
        "{last_used}"
    );
    let shown = kg.admin(Req::get(&format!("/v1/keys/{full}"))).await.json();
    assert!(shown["last_used_at"].is_string(), "{shown:#}");
    assert_eq!(usage(&kg, &ro).await.0, (1, 2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_flushed_once_more_on_shutdown() {
    let up = Upstream::start().await;
    let mut kg = Keygate::builder()
        .route(&format!(
            "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}'}}",
            up.url()
        ))
        .start()
        .await;
    let (id, secret) = kg
        .create_key(json!({"name": "k", "scopes": [], "access": "full"}))
        .await;
    for _ in 0..4 {
        kg.send(Req::get("/api/x").header("x-api-key", &secret))
            .await
            .assert_status(200);
    }
    kg.sigterm();
    let status = kg.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}\n{}", kg.explain());

    let store = open_embedded(&kg.dir().join("data").join("keygate.redb"));
    let id = KeyId::parse(&id).unwrap();
    let hours = store
        .usage(&id, Utc::now() - TimeDelta::days(1))
        .await
        .unwrap();
    let allowed: u64 = hours.iter().map(|h| h.counts.allowed).sum();
    assert_eq!(allowed, 4, "{hours:?}\n{}", kg.explain());
    let rec = store.get_by_id(&id).await.unwrap().unwrap();
    assert!(rec.last_used_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_reach_webhooks_signed_with_the_env_secret() {
    let receiver = Receiver::start(&[]).await;
    let unsigned = Receiver::start(&[]).await;
    let kg = Keygate::builder()
        .section(&format!(
            "notifications:\n  webhooks:\n\
             \x20   - {{url: '{}', secret_env: {SECRET_ENV}, events: [key.revoked]}}\n\
             \x20   - {{url: '{}', secret_env: KG_LIFECYCLE_MISSING, events: [key.revoked]}}",
            receiver.url(),
            unsigned.url()
        ))
        .env(SECRET_ENV, SECRET)
        .start()
        .await;
    // The tail starts at the newest event when the instance becomes leader.
    wait_until("keygate leads the jobs", WAIT, || {
        kg.output().contains("lifecycle: this instance leads")
    })
    .await;
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let (id, _) = kg
            .create_key(json!({"name": name, "scopes": [], "access": "full"}))
            .await;
        let resp = kg
            .admin(
                Req::post(&format!("/v1/keys/{id}/revoke"), r#"{"reason":"leaked"}"#)
                    .header("content-type", "application/json"),
            )
            .await;
        resp.assert_status(200);
        ids.push(id);
    }
    let hits = receiver.wait_hits(2).await;
    receiver.assert_stays_at(2).await;
    let mut seen = Vec::new();
    for hit in &hits {
        hit.assert_signed(SECRET);
        let body = hit.json();
        assert_eq!(body["type"], "key.revoked", "{body:#}");
        assert_eq!(body["actor"], "ops", "{body:#}");
        seen.push(body["key_id"].as_str().unwrap().to_owned());
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    unsigned.assert_stays_at(0).await;
    let out = kg.output();
    assert_eq!(
        out.matches("webhook secret env var is not set").count(),
        1,
        "logged once: {out}"
    );
    assert!(!out.contains(SECRET), "the secret is never logged");
}
