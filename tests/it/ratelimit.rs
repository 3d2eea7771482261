//! Rate limits from a client's side (DESIGN.md sections 2, 4 and 7): the 429
//! answer and the `RateLimit-Policy` / `RateLimit` fields, key and route
//! limits together, accuracy of the local limiter and of the limiter shared
//! by three instances through Redis, a Redis outage, failed authentications
//! per client IP, and a config reload.
//!
//! Every test runs its own `keygate` binaries and upstreams; the 5-second load
//! drives run in parallel with each other. Measured figures are printed (run
//! with `--nocapture` to see them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::common::client::Req;
use crate::common::keygate::{Keygate, KeygateBuilder};
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

/// A keyed route on `prefix` with `extra` flow-mapping fields.
fn keyed_route(name: &str, prefix: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "{{name: {name}, match: {{path_prefix: '{prefix}'}}, upstream: '{}'{extra}}}",
        up.url()
    )
}

fn get(path: &str, secret: &str) -> Req {
    Req::get(path).header("x-api-key", secret)
}

/// A keygate whose store and rate limiter are both on `redis`.
fn on_redis(redis: &RedisServer) -> KeygateBuilder {
    Keygate::builder()
        .env("KEYGATE_STORE_URL", &redis.url())
        .section("rate_limit:\n  backend: redis")
}

/// Creates a key, retrying while the store is still reconnecting (a write
/// right after a Redis restart may fail once with 503).
async fn create_key_retrying(kg: &Keygate, body: serde_json::Value) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req =
            Req::post("/v1/keys", body.to_string()).header("content-type", "application/json");
        let resp = kg.admin(req).await;
        if resp.status == 201 {
            let json = resp.json();
            return (
                json["key"]["id"].as_str().expect("key.id").to_owned(),
                json["secret"].as_str().expect("secret").to_owned(),
            );
        }
        assert!(
            resp.status == 503 && Instant::now() < deadline,
            "creating a key failed\n{resp}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `kg` has logged `needle`.
async fn wait_for_log(kg: &Keygate, needle: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    while !kg.output().contains(needle) {
        assert!(
            start.elapsed() < timeout,
            "keygate did not log {needle:?} within {timeout:?}\n{}",
            kg.explain()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

// --- load driver -------------------------------------------------------------------

/// What a drive saw.
#[derive(Debug)]
struct Tally {
    sent: u64,
    ok: u64,
    limited: u64,
    /// Anything but 200 and 429, with its body.
    other: Vec<(StatusCode, String)>,
    first_sent: Instant,
    last_sent: Instant,
    first_done: Instant,
    last_ok_done: Instant,
}

impl Tally {
    fn new(start: Instant) -> Tally {
        Tally {
            sent: 0,
            ok: 0,
            limited: 0,
            other: Vec::new(),
            first_sent: start,
            last_sent: start,
            first_done: start,
            last_ok_done: start,
        }
    }

    fn add(&mut self, other: Tally) {
        if self.sent == 0 {
            *self = other;
            return;
        }
        self.sent += other.sent;
        self.ok += other.ok;
        self.limited += other.limited;
        self.other.extend(other.other);
        self.first_sent = self.first_sent.min(other.first_sent);
        self.last_sent = self.last_sent.max(other.last_sent);
        self.first_done = self.first_done.min(other.first_done);
        self.last_ok_done = self.last_ok_done.max(other.last_ok_done);
    }

    /// The time over which keygate made its decisions lies between these:
    /// at least from the first answer to the last send, at most from the
    /// first send to the last admitted answer. Without lag both are the
    /// drive's length; a loaded machine may make keygate decide later than
    /// the client sent, and the limiter counts keygate's time.
    fn windows(&self) -> (Duration, Duration) {
        (
            self.last_sent.saturating_duration_since(self.first_done),
            self.last_ok_done.saturating_duration_since(self.first_sent),
        )
    }
}

/// Sends `GET path` with `secret` to `addr` at `per_second` for `duration`,
/// over pooled keep-alive connections, each request on its own task so a slow
/// answer does not delay the next send.
async fn drive(
    addr: SocketAddr,
    path: &str,
    secret: &str,
    per_second: u32,
    duration: Duration,
) -> Tally {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let n = (u128::from(per_second) * duration.as_millis() / 1000) as u64;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    let start = Instant::now();
    let mut last_sent = start;
    for _ in 0..n {
        ticks.tick().await;
        last_sent = Instant::now();
        let req = Request::get(format!("http://{addr}{path}"))
            .header("x-api-key", secret)
            .body(Empty::new())
            .expect("request");
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("answer within 10 s")
                .expect("request sent");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, body, Instant::now())
        }));
    }
    let mut tally = Tally::new(start);
    tally.sent = n;
    tally.last_sent = last_sent;
    tally.first_done = last_sent;
    for t in tasks {
        let (status, body, done) = t.await.expect("request task");
        tally.first_done = tally.first_done.min(done);
        match status.as_u16() {
            200 => {
                tally.ok += 1;
                tally.last_ok_done = tally.last_ok_done.max(done);
            }
            429 => {
                let problem: serde_json::Value = serde_json::from_slice(&body).expect("JSON 429");
                assert_eq!(problem["code"], "rate_limited", "{problem}");
                tally.limited += 1;
            }
            _ => tally
                .other
                .push((status, String::from_utf8_lossy(&body).into_owned())),
        }
    }
    tally
}

/// Asserts the admitted count is within 5% of the allowance
/// `burst + rate x window` of a GCRA bucket that starts full, for the window
/// keygate decided in ([`Tally::windows`]).
fn assert_accuracy(what: &str, tally: &Tally, per_second: u32, burst: u32) {
    let allowance = |w: Duration| f64::from(burst) + f64::from(per_second) * w.as_secs_f64();
    let (least, most) = tally.windows();
    let (low, high) = (allowance(least), allowance(most));
    let sent_span = tally.last_sent - tally.first_sent;
    let nominal = allowance(sent_span);
    let error = (tally.ok as f64 - nominal) / nominal * 100.0;
    println!(
        "{what}: sent {} over {:.3} s, admitted {}, refused {}; allowance {nominal:.0} \
         ({error:+.1}%), {low:.0}..{high:.0} for the window keygate decided in",
        tally.sent,
        sent_span.as_secs_f64(),
        tally.ok,
        tally.limited,
    );
    assert!(
        tally.other.is_empty(),
        "{what}: unexpected answers {:?}",
        tally.other
    );
    assert_eq!(tally.ok + tally.limited, tally.sent, "{what}: {tally:?}");
    let ok = tally.ok as f64;
    assert!(
        ok >= low * 0.95 && ok <= high * 1.05,
        "{what}: admitted {} outside {low:.0}..{high:.0} +-5%",
        tally.ok
    );
}

// --- answers and headers ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_answer_and_headers_are_exact() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .section("rate_limit:\n  default: {per_second: 1, burst: 2}")
        .route(&keyed_route("api", "/api/", &up, ""))
        .start()
        .await;
    let (_, secret) = kg
        .create_key(
            json!({"name": "k", "access": "full", "rate_limit": {"per_second": 1, "burst": 3}}),
        )
        .await;

    // Allowed answers carry both fields; `r` counts down, `t` grows.
    for (r, t) in [(2, 1), (1, 2), (0, 3)] {
        let resp = kg.send(get("/api/x", &secret)).await;
        resp.assert_status(200);
        resp.assert_header("ratelimit-policy", "\"key\";q=3;w=3");
        resp.assert_header("ratelimit", &format!("\"key\";r={r};t={t}"));
    }
    let hits = up.hits();
    let resp = kg.send(get("/api/x", &secret)).await;
    let problem = resp.assert_problem(429, "rate_limited");
    assert_eq!(
        problem,
        json!({
            "type": "about:blank",
            "title": "Rate limit exceeded",
            "status": 429,
            "code": "rate_limited",
            "detail": "the rate limit for this key is exceeded",
            "request_id": resp.header("x-request-id").unwrap(),
        }),
        "{resp}"
    );
    resp.assert_header("retry-after", "1");
    resp.assert_header("cache-control", "no-store");
    resp.assert_header("ratelimit-policy", "\"key\";q=3;w=3");
    resp.assert_header("ratelimit", "\"key\";r=0;t=3");
    assert_eq!(
        up.hits(),
        hits,
        "a limited request must not reach the upstream"
    );

    // A key without a limit of its own gets `rate_limit.default`.
    let (_, plain) = kg
        .create_key(json!({"name": "plain", "access": "full"}))
        .await;
    let resp = kg.send(get("/api/x", &plain)).await;
    resp.assert_status(200);
    resp.assert_header("ratelimit-policy", "\"key\";q=2;w=2");
    resp.assert_header("ratelimit", "\"key\";r=1;t=1");

    // Refusals before the rate-limit stage carry no rate-limit fields.
    let resp = kg.send(Req::get("/api/x")).await;
    resp.assert_problem(401, "missing_key");
    assert_eq!(resp.header("ratelimit"), None, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_key_limits_both_apply() {
    let up = Upstream::start().await;
    let route_limit = ", rate_limit: {per_second: 1, burst: 2}";
    let kg = Keygate::builder()
        .route(&keyed_route("a", "/a/", &up, route_limit))
        .route(&keyed_route("b", "/b/", &up, route_limit))
        .route(&keyed_route("c", "/c/", &up, ""))
        .start()
        .await;
    let (_, secret) = kg
        .create_key(
            json!({"name": "k", "access": "full", "rate_limit": {"per_second": 1, "burst": 6}}),
        )
        .await;
    let both = "\"key\";q=6;w=6, \"route\";q=2;w=2";

    // The route is stricter: it is the one reported, and it refuses first.
    for (path, route_r) in [("/a/1", 1), ("/a/2", 0), ("/b/1", 1), ("/b/2", 0)] {
        let resp = kg.send(get(path, &secret)).await;
        resp.assert_status(200);
        resp.assert_header("ratelimit-policy", both);
        let current = resp.header("ratelimit").unwrap();
        assert!(
            current.starts_with(&format!("\"route\";r={route_r};")),
            "{path}: {current}\n{resp}"
        );
    }
    for path in ["/a/3", "/b/3"] {
        let resp = kg.send(get(path, &secret)).await;
        resp.assert_problem(429, "rate_limited");
        resp.assert_header("ratelimit-policy", both);
        assert!(
            resp.header("ratelimit")
                .unwrap()
                .starts_with("\"route\";r=0;"),
            "{resp}"
        );
        assert!(
            resp.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1,
            "{resp}"
        );
    }
    // Refused requests spent no key cells: 6 - 4 are left for route c, which
    // has no limit of its own.
    for r in [1, 0] {
        let resp = kg.send(get("/c/1", &secret)).await;
        resp.assert_status(200);
        resp.assert_header("ratelimit-policy", "\"key\";q=6;w=6");
        assert!(
            resp.header("ratelimit")
                .unwrap()
                .starts_with(&format!("\"key\";r={r};")),
            "{resp}"
        );
    }
    // Now the key limit refuses everywhere, and says so.
    for path in ["/c/2", "/a/4"] {
        let resp = kg.send(get(path, &secret)).await;
        resp.assert_problem(429, "rate_limited");
        assert!(
            resp.header("ratelimit")
                .unwrap()
                .starts_with("\"key\";r=0;"),
            "{resp}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_at_once() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .section("rate_limit:\n  default: {per_second: 5, burst: 5}")
        .route(&keyed_route("api", "/api/", &up, ""))
        .start()
        .await;
    let (_, secret) = kg.create_key(json!({"name": "k", "access": "full"})).await;
    kg.send(get("/api/x", &secret))
        .await
        .assert_header("ratelimit-policy", "\"key\";q=5;w=1");

    let config = kg.config().replace("burst: 5}", "burst: 9}");
    assert_ne!(config, kg.config());
    std::fs::write(kg.config_path(), config).expect("rewrite the config");
    kg.sighup();
    let start = Instant::now();
    loop {
        let resp = kg.send(get("/api/x", &secret)).await;
        resp.assert_status(200);
        if resp.header("ratelimit-policy") == Some("\"key\";q=9;w=2") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "reload not applied\n{resp}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- accuracy ------------------------------------------------------------------------

/// 100/s with a burst of 100, driven at 400/s for 5 s through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_accuracy_at_four_times_the_limit() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .route(&keyed_route("api", "/api/", &up, ""))
        .start()
        .await;
    let (_, secret) = kg
        .create_key(
            json!({"name": "k", "access": "full", "rate_limit": {"per_second": 100, "burst": 100}}),
        )
        .await;
    let tally = drive(kg.proxy, "/api/x", &secret, 400, Duration::from_secs(5)).await;
    assert_accuracy(
        "local accuracy (real time, 400/s for 5 s)",
        &tally,
        100,
        100,
    );
}

/// Three instances on one Redis, one key driven evenly through all three at
/// 3x its limit for 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_accuracy_across_three_instances() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let route = keyed_route("api", "/api/", &up, "");
    let (a, b, c) = tokio::join!(
        on_redis(&redis).route(&route).start(),
        on_redis(&redis).route(&route).start(),
        on_redis(&redis).route(&route).start(),
    );
    let (_, secret) = a
        .create_key(
            json!({"name": "k", "access": "full", "rate_limit": {"per_second": 100, "burst": 100}}),
        )
        .await;
    // Load the key into every instance's cache, then let the bucket refill
    // and the warm-up leases expire (1 s), so the drive starts from a full one.
    for kg in [&a, &b, &c] {
        kg.send(get("/api/warm", &secret)).await.assert_status(200);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let five = Duration::from_secs(5);
    let (ta, tb, tc) = tokio::join!(
        drive(a.proxy, "/api/x", &secret, 100, five),
        drive(b.proxy, "/api/x", &secret, 100, five),
        drive(c.proxy, "/api/x", &secret, 100, five),
    );
    println!(
        "shared per instance: admitted {} / {} / {}",
        ta.ok, tb.ok, tc.ok
    );
    let mut total = Tally::new(Instant::now());
    for t in [ta, tb, tc] {
        total.add(t);
    }
    assert_accuracy(
        "shared accuracy (3 instances, 300/s for 5 s)",
        &total,
        100,
        100,
    );
}

/// Redis dies: requests go on under per-instance limits (never a 5xx);
/// Redis returns: limits are shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_local_limits_and_recovers() {
    let mut redis = RedisServer::start();
    let up = Upstream::start().await;
    let route = keyed_route("api", "/api/", &up, "");
    let (a, b) = tokio::join!(
        on_redis(&redis).route(&route).start(),
        on_redis(&redis).route(&route).start(),
    );
    let slow = json!({"name": "k", "access": "full", "rate_limit": {"per_second": 1, "burst": 10}});

    /// Sends `n` requests to each instance, alternating; returns (admitted on
    /// a, admitted on b), asserting every answer is 200 or 429.
    async fn alternate(a: &Keygate, b: &Keygate, secret: &str, n: usize) -> (u32, u32) {
        let mut admitted = (0, 0);
        for _ in 0..n {
            for (kg, count) in [(a, &mut admitted.0), (b, &mut admitted.1)] {
                let resp = kg.send(get("/api/x", secret)).await;
                match resp.status.as_u16() {
                    200 => *count += 1,
                    429 => {
                        resp.assert_problem(429, "rate_limited");
                    }
                    _ => panic!("only 200 or 429 may come back\n{resp}"),
                }
            }
        }
        admitted
    }

    // Shared: ten cells between the two instances.
    let (_, first) = a.create_key(slow.clone()).await;
    let (sa, sb) = alternate(&a, &b, &first, 8).await;
    println!("before the outage: admitted {sa} + {sb} of 16 (shared bucket of 10)");
    assert!((9..=12).contains(&(sa + sb)), "shared: {sa} + {sb}");

    // Outage: each instance falls back to its own bucket of 10. Until the
    // next shared cell is due (within 1 s) the instances still know the
    // bucket is empty and refuse without asking Redis; the first request
    // after that finds Redis gone.
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (la, lb) = alternate(&a, &b, &first, 14).await;
    println!("during the outage: admitted {la} + {lb} of 28 (local buckets of 10 each)");
    for (name, n) in [("a", la), ("b", lb)] {
        assert!(
            (9..=14).contains(&n),
            "instance {name} admitted {n} under local limits"
        );
    }
    for kg in [&a, &b] {
        let log = kg.output();
        assert_eq!(
            log.matches("limits are enforced per instance").count(),
            1,
            "the fallback is logged once\n{log}"
        );
    }

    // Back: limits are shared again (the restarted Redis is empty, so a new key).
    redis.restart();
    for kg in [&a, &b] {
        let waited = wait_for_log(
            kg,
            "limits are shared across instances again",
            Duration::from_secs(10),
        )
        .await;
        println!("shared limiting resumed {waited:?} after the restart");
    }
    let (_, second) = create_key_retrying(&a, slow).await;
    let (ra, rb) = alternate(&a, &b, &second, 8).await;
    println!("after the restart: admitted {ra} + {rb} of 16 (shared bucket of 10)");
    assert!((9..=12).contains(&(ra + rb)), "shared again: {ra} + {rb}");
}

// --- failed authentications ---------------------------------------------------------

/// Sends `n` requests at once from `ip` (by `X-Forwarded-For`) with `secret`
/// (or no key) and returns their statuses and codes.
async fn burst_from(kg: &Keygate, ip: &str, secret: Option<&str>, n: usize) -> Vec<(u16, String)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut req = Req::get("/api/x").header("x-forwarded-for", ip);
        if let Some(s) = secret {
            req = req.header("x-api-key", s);
        }
        let addr = kg.proxy;
        tasks.push(tokio::spawn(async move {
            let resp = crate::common::client::h1(addr, req).await;
            let code = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|p| p["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            (resp.status.as_u16(), code)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// A well-formed key that does not exist (right prefix, length and checksum).
fn unknown_key() -> String {
    keygate::keys::Token::generate("kg_").expose().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_per_ip_blocks_the_61st_attempt() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .section("rate_limit:\n  trusted_proxies: [127.0.0.1/32]")
        .route(&keyed_route("api", "/api/", &up, ""))
        .start()
        .await;
    let (_, good) = kg.create_key(json!({"name": "k", "access": "full"})).await;
    let bad = unknown_key();

    // A missing key is not a guess: it never counts.
    let missing = burst_from(&kg, "198.51.100.3", None, 80).await;
    assert!(
        missing.iter().all(|(s, c)| *s == 401 && c == "missing_key"),
        "{missing:?}"
    );
    let resp = kg
        .send(get("/api/x", &bad).header("x-forwarded-for", "198.51.100.3"))
        .await;
    resp.assert_problem(401, "invalid_key");

    let start = Instant::now();
    let failures = burst_from(&kg, "198.51.100.1", Some(&bad), 60).await;
    assert!(
        failures
            .iter()
            .all(|(s, c)| *s == 401 && c == "invalid_key"),
        "{failures:?}"
    );
    let hits = up.hits();
    let resp = kg
        .send(get("/api/x", &bad).header("x-forwarded-for", "198.51.100.1"))
        .await;
    let elapsed = start.elapsed();
    let problem = resp.assert_problem(429, "too_many_failures");
    assert_eq!(problem["title"], "Too many failed attempts", "{resp}");
    let retry: u64 = resp
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert_eq!(retry, 1, "one attempt per second is earned back\n{resp}");
    // Retry-After only (DESIGN.md section 4): the RateLimit fields describe
    // the key's quotas, and this answer comes before any key is looked at;
    // a count of failures left would only help a guesser pace itself.
    for field in ["ratelimit", "ratelimit-policy"] {
        assert_eq!(resp.header(field), None, "no {field} field\n{resp}");
    }
    println!("61st failed attempt refused {elapsed:?} after the first");
    // Refused before the key is looked at: even the right key is refused.
    let resp = kg
        .send(get("/api/x", &good).header("x-forwarded-for", "198.51.100.1"))
        .await;
    resp.assert_problem(429, "too_many_failures");
    assert_eq!(
        up.hits(),
        hits,
        "nothing reaches the upstream from a blocked IP"
    );

    // Another address is unaffected.
    let resp = kg
        .send(get("/api/x", &good).header("x-forwarded-for", "198.51.100.2"))
        .await;
    resp.assert_status(200);
    let resp = kg
        .send(get("/api/x", &bad).header("x-forwarded-for", "198.51.100.2"))
        .await;
    resp.assert_problem(401, "invalid_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_ignored_without_trusted_proxies() {
    let up = Upstream::start().await;
    let kg = Keygate::builder()
        .route(&keyed_route("api", "/api/", &up, ""))
        .start()
        .await;
    let bad = unknown_key();
    let failures = burst_from(&kg, "198.51.100.1", Some(&bad), 60).await;
    assert!(failures.iter().all(|(s, _)| *s == 401), "{failures:?}");
    // Every request came from 127.0.0.1, whatever the header says.
    let resp = kg
        .send(get("/api/x", &bad).header("x-forwarded-for", "198.51.100.2"))
        .await;
    resp.assert_problem(429, "too_many_failures");
    let resp = kg.send(get("/api/x", &bad)).await;
    resp.assert_problem(429, "too_many_failures");
}
