//! The kill switch (DESIGN.md sections 4, 5 and 7): `PATCH /v1/settings
//! {"api_keys_enabled": false}` refuses every keyed request with 403
//! `api_keys_disabled` on every instance, public routes keep working, and
//! switching it back on restores the same keys.
//!
//! Two real `keygate` binaries share one real `redis-server`; the switch is
//! flipped through instance A's admin API and instance B is polled until it
//! answers the other way. Each instance refreshes settings by itself only
//! every `cache.ttl` (30 s here), so only the invalidation channel can make
//! B follow within the 1 s the test allows: with propagation broken, B keeps
//! its answer for 30 s and the test fails.

use std::time::{Duration, Instant};

use http::Method;
use serde_json::{Value, json};

use crate::common::client::{Req, Resp};
use crate::common::keygate::{Keygate, KeygateBuilder};
use crate::common::load::ms;
use crate::common::redis::RedisServer;
use crate::common::upstream::Upstream;

/// How long instance B may take to follow a flip on instance A.
const LIMIT: Duration = Duration::from_secs(1);
/// Flips each way.
const ROUNDS: usize = 5;

fn gateway(up: &Upstream, redis: &RedisServer) -> KeygateBuilder {
    Keygate::builder()
        .store(&format!(
            "backend: redis\nredis:\n  url: {}\n  prefix: \"kgkill:\"",
            redis.url()
        ))
        // Long enough that only pub/sub can bring a flip to B within LIMIT.
        .section("cache:\n  ttl: 30s")
        .section(
            "rate_limit:\n  default: {per_second: 1000000, burst: 1000000}\n  \
             failed_auth_per_ip: {per_minute: 1000000}",
        )
        .route(&format!(
            "{{name: api, match: {{path_prefix: /api/}}, upstream: '{}'}}",
            up.url()
        ))
        .route(&format!(
            "{{name: health, match: {{path: /healthz}}, upstream: '{}', auth: none}}",
            up.url()
        ))
}

fn with_key(secret: &str) -> Req {
    Req::get("/api/orders").header("x-api-key", secret)
}

async fn set_enabled(kg: &Keygate, enabled: bool) {
    let req = Req::new(Method::PATCH, "/v1/settings")
        .header("content-type", "application/json")
        .body(json!({"api_keys_enabled": enabled}).to_string());
    let resp = kg.admin(req).await;
    resp.assert_status(200);
    assert_eq!(resp.json()["api_keys_enabled"], enabled, "{resp}");
}

/// The exact refusal of DESIGN.md section 4: 403 problem+json, code
/// `api_keys_disabled`, and no challenge (the key is not what is wrong).
#[track_caller]
fn assert_disabled(resp: &Resp) {
    let problem = resp.assert_problem(403, "api_keys_disabled");
    assert_eq!(problem["title"], "API keys disabled", "{resp}");
    assert_eq!(
        problem["detail"], "API keys are switched off on this gateway",
        "{resp}"
    );
    assert_eq!(resp.header("www-authenticate"), None, "{resp}");
    assert_eq!(resp.header("ratelimit"), None, "{resp}");
}

/// Polls `kg` with `secret` until it answers `want` (200 or 403); returns
/// the time from `since` and the number of polls. Panics past [`LIMIT`].
/// The time includes the answering round trip, so a first-poll answer only
/// says "within this time".
async fn until(
    kg: &Keygate,
    secret: &str,
    want: u16,
    since: Instant,
    what: &str,
) -> (Duration, u32) {
    let mut polls = 0;
    loop {
        let resp = kg.send(with_key(secret)).await;
        polls += 1;
        if resp.status == want {
            let took = since.elapsed();
            match want {
                403 => assert_disabled(&resp),
                _ => {
                    resp.echo();
                }
            }
            return (took, polls);
        }
        assert!(
            since.elapsed() < LIMIT,
            "{what}: still {} {:?} after A answered ({polls} polls)\n{resp}",
            resp.status,
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_flipped_on_one_instance_reaches_the_other_within_a_second() {
    let redis = RedisServer::start();
    let up = Upstream::start().await;
    let (a, b) = tokio::join!(gateway(&up, &redis).start(), gateway(&up, &redis).start());
    let (_, secret) = a
        .create_key(json!({"name": "kill-switch", "access": "full"}))
        .await;
    // Both instances accept the key (and B has it cached) before any flip.
    a.send(with_key(&secret)).await.echo();
    b.send(with_key(&secret)).await.echo();

    let mut off = Vec::new();
    let mut on = Vec::new();
    for round in 0..ROUNDS {
        set_enabled(&a, false).await;
        let acked = Instant::now();
        let (on_a, polls_a) = until(&a, &secret, 403, acked, "switched off on A, A").await;
        // The instance that answered the PATCH applies it before its next request.
        assert_eq!(
            polls_a, 1,
            "A let a keyed request through after acknowledging the switch"
        );
        let (took, polls) = until(&b, &secret, 403, acked, "switched off on A, B").await;
        println!(
            "kill switch: round {round}: off on A -> A refuses after {:.2} ms (poll {polls_a}), \
             B after {:.2} ms (poll {polls})",
            ms(on_a),
            ms(took)
        );
        off.push(took);

        // While off: no keyed request reaches the upstream, a request with
        // no key is refused the same way, public routes keep working.
        let hits = up.hits();
        assert_disabled(&b.send(Req::get("/api/orders")).await);
        assert_disabled(&a.send(with_key(&secret)).await);
        assert_eq!(up.hits(), hits, "nothing keyed was forwarded while off");
        b.send(Req::get("/healthz")).await.assert_status(200);
        let settings = b.admin(Req::get("/v1/settings")).await.json();
        assert_eq!(settings["api_keys_enabled"], false, "{settings}");

        set_enabled(&a, true).await;
        let acked = Instant::now();
        let (on_a, polls_a) = until(&a, &secret, 200, acked, "switched on on A, A").await;
        assert_eq!(
            polls_a, 1,
            "A refused a key after acknowledging the switch back on"
        );
        let (took, polls) = until(&b, &secret, 200, acked, "switched on on A, B").await;
        println!(
            "kill switch: round {round}: on on A -> A accepts after {:.2} ms (poll {polls_a}), \
             B after {:.2} ms (poll {polls})",
            ms(on_a),
            ms(took)
        );
        on.push(took);
    }

    for (what, mut samples) in [("off", off), ("back on", on)] {
        samples.sort();
        println!(
            "kill switch: switched {what} on A, followed by B over {ROUNDS} rounds: \
             p50 {:.2} ms, max {:.2} ms (limit {} ms)",
            ms(samples[samples.len() / 2]),
            ms(samples[samples.len() - 1]),
            LIMIT.as_millis()
        );
    }
    // Both instances recorded the flips as events by A's admin token.
    let events = b
        .admin(Req::get("/v1/events?type=settings.updated&limit=1000"))
        .await
        .json();
    let items = events["items"].as_array().expect("items");
    assert_eq!(items.len(), 2 * ROUNDS, "{events:#}");
    assert!(items.iter().all(|e| e["actor"] == "ops"), "{events:#}");
    assert_eq!(items[0]["details"], json!({"api_keys_enabled": false}));
    let last: &Value = &items[items.len() - 1];
    assert_eq!(last["details"], json!({"api_keys_enabled": true}));
}
