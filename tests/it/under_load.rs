//! Operations under load (issue 10) and revocation propagation (issue 9),
//! driven by the paced open-loop driver in [`crate::common::load`]:
//!
//! - SIGTERM in the middle of a paced load: every request keygate accepted
//!   before it (forwarded to the upstream, or sent well before the signal)
//!   is answered 200, nothing gets another status, keygate exits 0.
//! - Ten config reloads (SIGHUP and the file watch) during a paced load:
//!   every request is answered 200, and each reload is seen to take effect.
//! - Three instances on one Redis, keys revoked one at a time during a paced
//!   load: the instance that answered the revoke refuses the key at once, the
//!   others within the limit, measured from the revoke's answer to each
//!   instance's first refusal (polled every ~1 ms on a keep-alive connection),
//!   and no load request sent after that is admitted.
//!
//! Each has a short version in the normal suite and a 30 s, 1,000 req/s
//! version behind `--ignored` (commands in README.md and BENCHMARKS.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::client::Req;
use crate::common::keygate::{Keygate, KeygateBuilder};
use crate::common::load::{self, Answer, Load, Report, ms, quantile};
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

/// Rate limits far above anything these tests send.
const NO_RATE_LIMITS: &str = "rate_limit:
  default: {per_second: 1000000, burst: 1000000}
  failed_auth_per_ip: {per_minute: 1000000}";

fn api_route(up: &Upstream) -> String {
    format!(
        "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}'}}",
        up.url()
    )
}

fn with_key(target: &str, secret: &str) -> Req {
    Req::get(target).header("x-api-key", secret)
}

/// Creates `n` keys through `kg`'s admin API; returns (id, secret) pairs.
async fn create_keys(kg: &Keygate, n: usize, name: &str) -> Vec<(String, String)> {
    let mut keys = Vec::with_capacity(n);
    for k in 0..n {
        let owner = format!("owner-{}", k / 500);
        keys.push(
            kg.create_key(json!({"name": format!("{name}-{k}"), "owner": owner, "access": "full"}))
                .await,
        );
    }
    keys
}

/// The request index `i=N` in an upstream target, if there is one.
fn index_of(target: &str) -> Option<u64> {
    target
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("i="))
        .and_then(|v| v.parse().ok())
}

// --- SIGTERM ------------------------------------------------------------------------

/// How long the upstream holds each request, so that some are in flight
/// when SIGTERM arrives.
const HOLD_MS: u64 = 50;

/// A request sent this long before SIGTERM has certainly been read by
/// keygate (it takes well under a millisecond on an idle machine): it must
/// be answered 200. Closer to the signal, keygate may close an idle
/// keep-alive connection before reading what the client just wrote; that
/// request was not accepted, and the client sees the connection close (the
/// HTTP/1.1 keep-alive race every client retries).
const ACCEPTED_MARGIN: Duration = Duration::from_millis(250);

async fn sigterm_under_load(rate: u32, duration: Duration, connections: usize) {
    let up = Upstream::start().await;
    let mut kg = Keygate::builder()
        .section(NO_RATE_LIMITS)
        .section("limits:\n  shutdown_grace: 10s")
        .route(&api_route(&up))
        .start()
        .await;
    let keys = create_keys(&kg, 20, "term").await;
    let secrets: Vec<String> = keys.into_iter().map(|(_, s)| s).collect();
    let run = Load::new(rate, duration + Duration::from_secs(2))
        .connections(connections)
        .start(kg.proxy, move |i| {
            let target = format!("/api/slow/{HOLD_MS}?i={i}");
            (0, with_key(&target, &secrets[i as usize % secrets.len()]))
        });
    tokio::time::sleep(duration).await;
    let term = Instant::now();
    kg.sigterm();
    let status = kg.wait_exit(Duration::from_secs(15)).await;
    let exited = Instant::now();
    // Keep sending a moment after the exit: those requests find nobody.
    tokio::time::sleep(Duration::from_millis(200)).await;
    run.stop();
    let epoch = run.epoch();
    let report = run.finish().await;
    let term_at = term.saturating_duration_since(epoch);

    let forwarded: BTreeSet<u64> = up
        .seen()
        .iter()
        .filter_map(|s| index_of(&s.target))
        .collect();
    let mut bad = Vec::new();
    let (mut before, mut drained, mut refused_after) = (0, 0, 0);
    for s in &report.shots {
        let sent_before = s.sent + ACCEPTED_MARGIN < term_at;
        if s.sent < term_at {
            before += 1;
        }
        match &s.answer {
            Answer::Status(200, _) => {
                if s.sent < term_at && s.done > term_at {
                    drained += 1;
                }
            }
            Answer::Status(..) => bad.push(format!("an answer other than 200: {s}")),
            _ if forwarded.contains(&s.i) => bad.push(format!(
                "forwarded to the upstream, so accepted, but not answered: {s}"
            )),
            _ if sent_before => bad.push(format!(
                "sent {:.0} ms before SIGTERM and not answered: {s}",
                ms(term_at.saturating_sub(s.sent))
            )),
            _ => refused_after += 1,
        }
    }
    let answered_200 = report.count(|_, a| a.is_ok());
    println!(
        "under load: SIGTERM {:.2} s into {rate} req/s over {connections} connections (upstream \
         holds each {HOLD_MS} ms); keygate exited {status} {:.0} ms after the signal; {before} \
         requests sent before it, {drained} of them in flight at the signal and answered 200 \
         while draining; {refused_after} sent around or after it found the connection closed or \
         refused; {} forwarded, {answered_200} answered 200\n  {}",
        term_at.as_secs_f64(),
        ms(exited - term),
        forwarded.len(),
        report.summary(|_| "keyed".into())
    );
    assert!(
        status.success(),
        "keygate must exit 0 after SIGTERM: {status}"
    );
    assert!(
        drained >= 5,
        "too few requests were in flight at SIGTERM ({drained}) for the test to mean anything"
    );
    if forwarded.len() as u64 != answered_200 {
        bad.push(format!(
            "{} requests reached the upstream but {answered_200} were answered 200",
            forwarded.len()
        ));
    }
    load::fail_with(&bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_request_accepted_before_it() {
    sigterm_under_load(400, Duration::from_millis(2500), 32).await;
}

/// Issue 10's full case: 1,000 req/s, SIGTERM after 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 s at 1,000 req/s; run with --ignored (README: Security and failure behaviour)"]
async fn sigterm_under_load_30s_at_1000_rps() {
    sigterm_under_load(1000, Duration::from_secs(30), 96).await;
}

// --- reloads ------------------------------------------------------------------------

/// Writes `text` to `path` the way deploy tools do: a new file renamed over
/// the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).expect("write the new config");
    std::fs::rename(&tmp, path).expect("rename the new config into place");
}

async fn reloads_under_load(rate: u32, duration: Duration, reloads: usize) {
    let up = Upstream::start().await;
    let api = api_route(&up);
    let kg = Keygate::builder()
        .section(NO_RATE_LIMITS)
        .route(&api)
        .start()
        .await;
    let keys = create_keys(&kg, 20, "reload").await;
    let secrets: Vec<String> = keys.into_iter().map(|(_, s)| s).collect();
    // Two valid configs: B also has a public route `/extra/`, so each reload
    // can be seen to take effect, and a different timeout on `api`.
    let config_a = kg.config().to_owned();
    let extra = format!(
        "{{name: extra, match: {{path_prefix: /extra/}}, upstream: '{}', auth: none}}",
        up.url()
    );
    let api_b = format!(
        "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}', timeout: 29s}}",
        up.url()
    );
    let config_b = config_a.replace(
        &format!("  - {api}\n"),
        &format!("  - {api_b}\n  - {extra}\n"),
    );
    assert_ne!(config_a, config_b, "the second config differs");

    let run = Load::new(rate, duration)
        .connections(16)
        .start(kg.proxy, move |i| {
            let target = format!("/api/orders?i={i}");
            (0, with_key(&target, &secrets[i as usize % secrets.len()]))
        });
    let mut probe = load::Conn::new(kg.proxy, Duration::from_secs(5));
    let mut took = Vec::new();
    let mut probe_hits = 0;
    let every = duration / (reloads as u32 + 1);
    for k in 1..=reloads {
        tokio::time::sleep_until((run.epoch() + every * k as u32).into()).await;
        let to_b = k % 2 == 1;
        replace_file(kg.config_path(), if to_b { &config_b } else { &config_a });
        let asked = Instant::now();
        kg.sighup();
        let want = if to_b { Some(200) } else { Some(404) };
        loop {
            let a = probe.send(&Req::get("/extra/x")).await;
            if a.is_ok() {
                probe_hits += 1;
            }
            if a.status() == want {
                break;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(3),
                "reload {k} not applied 3 s after SIGHUP: /extra/x answers {a}\n{}",
                kg.explain()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        took.push(asked.elapsed());
    }
    let report = run.finish().await;
    took.sort();
    println!(
        "under load: {reloads} reloads (SIGHUP after replacing the file) during {rate} req/s for \
         {:.1} s, each applied within {:.1} ms (max); {}",
        duration.as_secs_f64(),
        ms(quantile(&took, 1.0)),
        report.summary(|_| "keyed".into())
    );
    let bad: Vec<String> = report
        .shots
        .iter()
        .filter(|s| !s.answer.is_ok())
        .map(|s| format!("a request during the reloads: {s}"))
        .collect();
    assert_eq!(
        report.shots.len() as u64,
        report.planned,
        "every request was sent"
    );
    assert_eq!(
        up.hits(),
        report.planned + probe_hits,
        "every request (and every probe that got 200) reached the upstream"
    );
    load::fail_with(&bad);
    let text = {
        let resp = crate::common::client::h1(kg.admin, Req::get("/metrics")).await;
        String::from_utf8_lossy(&resp.body).into_owned()
    };
    let ok_sighup = text
        .lines()
        .find(|l| {
            l.starts_with("keygate_config_reloads_total")
                && l.contains("trigger=\"sighup\"")
                && l.contains("result=\"ok\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(ok_sighup, reloads as f64, "every SIGHUP reloaded\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_fail_no_request() {
    reloads_under_load(400, Duration::from_secs(3), 10).await;
}

/// Issue 10's full case: 1,000 req/s for 30 s, 10 reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 s at 1,000 req/s; run with --ignored (README: Security and failure behaviour)"]
async fn ten_reloads_under_load_30s_at_1000_rps() {
    reloads_under_load(1000, Duration::from_secs(30), 10).await;
}

// --- revocation across three instances ----------------------------------------------------

struct Propagation {
    /// Requests per second in all, spread over the three instances.
    rate: u32,
    duration: Duration,
    revocations: usize,
    /// No instance may admit a revoked key longer than this after the
    /// revoke was answered.
    limit: Duration,
    /// The p99 of the other instances' times to refusal must be within this.
    p99_limit: Duration,
}

/// Polls `conn` with `secret` until it refuses the key (see
/// [`load::until_refused`]); gives up past `10 * limit`.
async fn until_refused(
    conn: &mut load::Conn,
    secret: &str,
    since: Instant,
    limit: Duration,
) -> (Duration, u32) {
    load::until_refused(conn, &with_key("/api/poll", secret), since, limit * 10).await
}

async fn revocation_under_load(p: Propagation) {
    const INSTANCES: usize = 3;
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let gateway = || -> KeygateBuilder {
        Keygate::builder()
            .store(&format!(
                "backend: redis\nredis:\n  url: {}\n  prefix: \"kgprop:\"",
                redis.url()
            ))
            .section(NO_RATE_LIMITS)
            // Long enough that only pub/sub can bring a revoke to the others in time.
            .section("cache:\n  ttl: 5m")
            .route(&api_route(&up))
    };
    let (a, b, c) = tokio::join!(gateway().start(), gateway().start(), gateway().start());
    let kgs = [a, b, c];
    // Keys 0..revocations are revoked in order; 20 more never are.
    let keys = create_keys(&kgs[0], p.revocations + 20, "prop").await;
    let secrets: Arc<Vec<String>> = Arc::new(keys.iter().map(|(_, s)| s.clone()).collect());
    let per_instance = (p.rate / INSTANCES as u32).max(1);
    let runs: Vec<load::Running> = kgs
        .iter()
        .map(|kg| {
            let secrets = secrets.clone();
            Load::new(per_instance, p.duration + Duration::from_secs(5))
                .connections(16)
                .start(kg.proxy, move |i| {
                    let k = i as usize % secrets.len();
                    (
                        k as u32,
                        with_key(&format!("/api/orders?i={i}"), &secrets[k]),
                    )
                })
        })
        .collect();
    let mut pollers: Vec<load::Conn> = kgs
        .iter()
        .map(|kg| load::Conn::new(kg.proxy, Duration::from_secs(5)))
        .collect();
    let mut admins: Vec<load::Conn> = kgs
        .iter()
        .map(|kg| load::Conn::new(kg.admin, Duration::from_secs(5)))
        .collect();
    let bearers: Vec<String> = kgs
        .iter()
        .map(|kg| format!("Bearer {}", kg.admin_token()))
        .collect();

    // Let the load warm every instance's cache, then revoke at an even pace.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let every = p.duration.saturating_sub(Duration::from_millis(500)) / p.revocations as u32;
    // (answered by, asked, answered) per revoked key; times to refusal per instance.
    let mut acks: BTreeMap<u32, (usize, Instant, Instant)> = BTreeMap::new();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); INSTANCES];
    let mut first_poll: Vec<usize> = vec![0; INSTANCES];
    for (r, (id, secret)) in keys.iter().enumerate().take(p.revocations) {
        tokio::time::sleep_until((started + every * r as u32).into()).await;
        // Each instance has the key cached (a 200 now), so a refusal can only
        // come from an invalidation.
        for (j, poller) in pollers.iter_mut().enumerate() {
            let a = poller.send(&with_key("/api/warm", secret)).await;
            assert!(a.is_ok(), "key {r} before its revoke on instance {j}: {a}");
        }
        let by = r % INSTANCES;
        let revoke = Req::post(&format!("/v1/keys/{id}/revoke"), "{}")
            .header("content-type", "application/json")
            .header("authorization", &bearers[by]);
        let asked = Instant::now();
        let answer = admins[by].send(&revoke).await;
        let acked = Instant::now();
        assert!(answer.is_ok(), "revoke {r} on instance {by}: {answer}");
        acks.insert(r as u32, (by, asked, acked));
        let [p0, p1, p2] = &mut pollers[..] else {
            unreachable!("three pollers")
        };
        let (r0, r1, r2) = tokio::join!(
            until_refused(p0, secret, acked, p.limit),
            until_refused(p1, secret, acked, p.limit),
            until_refused(p2, secret, acked, p.limit),
        );
        for (j, (took, polls)) in [r0, r1, r2].into_iter().enumerate() {
            if j == by {
                assert_eq!(
                    polls, 1,
                    "instance {j} admitted key {r} after answering its revoke ({took:?})"
                );
                continue;
            }
            if polls == 1 {
                first_poll[j] += 1;
            }
            times[j].push(took);
        }
    }
    for run in &runs {
        run.stop();
    }
    let epochs: Vec<Instant> = runs.iter().map(|r| r.epoch()).collect();
    let mut reports: Vec<Report> = Vec::new();
    for run in runs {
        reports.push(run.finish().await);
    }

    // The load's view: no request sent after a revoke's answer (plus the
    // limit, on the other instances) was admitted.
    let mut bad = Vec::new();
    let mut late_admits: Vec<Duration> = Vec::new();
    for (j, report) in reports.iter().enumerate() {
        for s in &report.shots {
            if s.answer == Answer::Dropped {
                continue; // queued when the run was stopped: never sent
            }
            let Some((by, asked, acked)) = acks.get(&s.tag) else {
                match &s.answer {
                    Answer::Status(200, _) => {}
                    _ => bad.push(format!("instance {j}: a never-revoked key: {s}")),
                }
                continue;
            };
            let ack = acked.saturating_duration_since(epochs[j]);
            let ask = asked.saturating_duration_since(epochs[j]);
            let allowed = if *by == j { Duration::ZERO } else { p.limit };
            match &s.answer {
                Answer::Status(200, _) if s.sent > ack => {
                    late_admits.push(s.sent - ack);
                    if s.sent > ack + allowed {
                        bad.push(format!(
                            "instance {j} admitted key {} {:.1} ms after instance {by} answered its revoke: {s}",
                            s.tag,
                            ms(s.sent - ack)
                        ));
                    }
                }
                Answer::Status(200, _) => {}
                // Refused once the revoke was under way (other instances may
                // hear of it before its answer reaches the admin client).
                Answer::Status(401, Some(code)) if code == "key_revoked" && s.done > ask => {}
                other => bad.push(format!("instance {j}: key {}: {other}: {s}", s.tag)),
            }
        }
    }
    let mut all: Vec<Duration> = times.iter().flatten().copied().collect();
    all.sort();
    for (j, t) in times.iter_mut().enumerate() {
        t.sort();
        if t.is_empty() {
            continue;
        }
        println!(
            "revocation propagation to instance {j} (revoked on the others, {} samples): \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; refused on the first poll {} times",
            t.len(),
            ms(quantile(t, 0.5)),
            ms(quantile(t, 0.99)),
            ms(quantile(t, 1.0)),
            first_poll[j]
        );
    }
    late_admits.sort();
    println!(
        "revocation propagation across {INSTANCES} instances on one Redis, {} revocations under \
         {} req/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 100 ms); the \
         answering instance refused on its first poll every time; load requests sent after a \
         revoke's answer and still admitted: {} (latest {:.2} ms after)",
        p.revocations,
        per_instance * INSTANCES as u32,
        ms(quantile(&all, 0.5)),
        ms(quantile(&all, 0.99)),
        ms(quantile(&all, 1.0)),
        late_admits.len(),
        ms(quantile(&late_admits, 1.0)),
    );
    for (j, report) in reports.iter().enumerate() {
        let kind = |k: u32| match acks.contains_key(&k) {
            true => "revoked keys".to_owned(),
            false => "other keys".to_owned(),
        };
        println!("  instance {j} load: {}", report.summary(kind));
    }
    for (j, t) in times.iter().enumerate() {
        if let Some(max) = t.last()
            && *max > p.limit
        {
            bad.push(format!(
                "instance {j} admitted a revoked key for {:.1} ms after the revoke was answered",
                ms(*max)
            ));
        }
    }
    let p99 = quantile(&all, 0.99);
    if p99 > p.p99_limit {
        bad.push(format!(
            "propagation p99 {:.1} ms over the {:.0} ms limit",
            ms(p99),
            ms(p.p99_limit)
        ));
    }
    load::fail_with(&bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revokes_under_load_reach_three_instances_in_time() {
    // DESIGN.md promises 100 ms; the margin is for a loaded, nice'd 2-core
    // machine (measured: p99 under 5 ms there).
    revocation_under_load(Propagation {
        rate: 450,
        duration: Duration::from_secs(3),
        revocations: 15,
        limit: Duration::from_millis(250),
        p99_limit: Duration::from_millis(250),
    })
    .await;
}

/// Issue 9's bench and issue 10's full case: 3 instances, 1,000 req/s for
/// 30 s, 100 revocations; p99 and every admission within 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 s at 1,000 req/s; run with --ignored --nocapture (BENCHMARKS.md)"]
async fn revocation_propagation_bench_3_instances_100_revocations() {
    revocation_under_load(Propagation {
        rate: 1000,
        duration: Duration::from_secs(30),
        revocations: 100,
        limit: Duration::from_millis(100),
        p99_limit: Duration::from_millis(100),
    })
    .await;
}
