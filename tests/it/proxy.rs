//! The data plane from a client's side (DESIGN.md section 4): routing,
//! streaming, header rewriting, upstream failures, body and head limits,
//! malformed framing, HTTP/2 and TLS, graceful shutdown, and refusals on
//! keyed routes.
//!
//! Every test runs its own `keygate` binary and its own upstreams on
//! `127.0.0.1:0`, so they run in parallel.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::BodyExt;
use serde_json::json;

use crate::common::client::{self, RepeatBody, Req, Resp, TestCerts};
use crate::common::keygate::Keygate;
use crate::common::upstream::Upstream;

/// A public (`auth: none`) route on `prefix`, plus `extra` flow-mapping fields.
fn public_route(name: &str, prefix: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "{{name: {name}, match: {{path_prefix: '{prefix}'}}, upstream: '{}', auth: none{extra}}}",
        up.url()
    )
}

/// A keyed route (the default `auth: key`) on `prefix`.
fn keyed_route(name: &str, prefix: &str, upstream_url: &str, extra: &str) -> String {
    format!(
        "{{name: {name}, match: {{path_prefix: '{prefix}'}}, upstream: '{upstream_url}'{extra}}}"
    )
}

const WAIT: Duration = Duration::from_secs(5);

// --- routing -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_exact_path_then_longest_prefix() {
    let host_api = Upstream::named("host-api").await;
    let api = Upstream::named("api").await;
    let v2 = Upstream::named("api-v2").await;
    let health = Upstream::named("health").await;
    let kg = Keygate::builder()
        .route(&format!(
            "{{name: host-api, match: {{host: api.example.test, path_prefix: /api/}}, upstream: '{}', auth: none}}",
            host_api.url()
        ))
        .route(&public_route("api", "/api/", &api, ""))
        .route(&public_route("api-v2", "/api/v2", &v2, ""))
        .route(&format!("{{name: health, match: {{path: /healthz}}, upstream: '{}', auth: none}}", health.url()))
        .start()
        .await;

    let cases: [(Option<&str>, &str, &str); 10] = [
        (Some("api.example.test"), "/api/orders", "host-api"),
        // Host matching ignores case and the port.
        (Some("API.Example.TEST:8443"), "/api/orders", "host-api"),
        // The host's own routes come first, even over a longer host-less prefix.
        (Some("api.example.test"), "/api/v2/orders", "host-api"),
        // Another host falls back to the host-less routes.
        (Some("other.example.test"), "/api/orders", "api"),
        (None, "/api/orders", "api"),
        (None, "/api/v2", "api-v2"),
        (None, "/api/v2/orders/7", "api-v2"),
        // Prefixes match at segment boundaries: /api/v20 is not under /api/v2.
        (None, "/api/v20", "api"),
        (None, "/healthz", "health"),
        (Some("api.example.test"), "/healthz", "health"),
    ];
    for (host, target, expected) in cases {
        let mut req = Req::get(target);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let echo = kg.send(req).await.echo();
        assert_eq!(
            echo.upstream(),
            expected,
            "host {host:?} {target}: wrong route\n{echo}"
        );
        assert_eq!(echo.path(), target, "{echo}");
    }

    // The upstream receives the path and query exactly as sent.
    let target = "/api/v2/orders/caf%C3%A9?b=2&a=1&x=%20y+z&empty=&flag";
    let echo = kg.send(Req::get(target)).await.echo();
    assert_eq!(echo.upstream(), "api-v2", "{echo}");
    assert_eq!(echo.path(), "/api/v2/orders/caf%C3%A9", "{echo}");
    assert_eq!(echo.query(), Some("b=2&a=1&x=%20y+z&empty=&flag"), "{echo}");

    let hits_before = host_api.hits() + api.hits() + v2.hits() + health.hits();
    // An exact path does not cover what is below it; nothing else matches these.
    for target in ["/healthz/x", "/nothing", "/apix", "/"] {
        let resp = kg.send(Req::get(target)).await;
        let problem = resp.assert_problem(404, "no_route");
        assert_eq!(problem["status"], 404, "{resp}");
    }
    let hits_after = host_api.hits() + api.hits() + v2.hits() + health.hits();
    assert_eq!(hits_before, hits_after, "a 404 must not reach any upstream");
}

/// DESIGN.md: "Dot segments (plain or percent-encoded) are resolved before
/// routing, or the request is refused: a path can never leave its route's
/// prefix." A public route must never carry a request out to another route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_never_leave_the_route_prefix() {
    let public = Upstream::named("public").await;
    let secret = Upstream::named("secret").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &public, ""))
        .route(&keyed_route("secret", "/secret/", &secret.url(), ""))
        .start()
        .await;

    // Resolved, these land on the keyed route: it must ask for a key (or the
    // request is refused outright), and nothing reaches either upstream.
    for target in [
        "/public/../secret/x",
        "/public/%2e%2e/secret/x",
        "/public/%2E%2E/secret/x",
        "/public/.%2e/secret/x",
        "/public/a/../../secret/x",
        "/public/./../secret/x",
    ] {
        let resp = kg.send(Req::get(target)).await;
        assert_resolved_to_keyed_route_or_refused(&resp);
    }
    // Above the root or through encoded separators: refused.
    for target in [
        "/public/../../secret/x",
        "/public/%2e%2e/%2e%2e/secret/x",
        "/public/..%2fsecret/x",
        "/public/%2f..%2fsecret/x",
        "/public/..%5csecret/x",
    ] {
        let resp = kg.send(Req::get(target)).await;
        resp.assert_status(400);
        resp.assert_header("content-type", "application/problem+json");
    }
    assert_eq!(
        public.hits(),
        0,
        "a dot-segment path reached the public upstream: {:?}",
        public.seen()
    );
    assert_eq!(
        secret.hits(),
        0,
        "a dot-segment path reached the keyed upstream: {:?}",
        secret.seen()
    );

    // Dot segments that stay inside the prefix are resolved before forwarding.
    let echo = kg.send(Req::get("/public/a/./b/../c?q=1")).await.echo();
    assert_eq!(echo.path(), "/public/a/c", "{echo}");
    assert_eq!(echo.query(), Some("q=1"), "{echo}");
}

#[track_caller]
fn assert_resolved_to_keyed_route_or_refused(resp: &Resp) {
    match resp.status.as_u16() {
        401 => {
            resp.assert_problem(401, "missing_key");
        }
        400 => {
            resp.assert_header("content-type", "application/problem+json");
        }
        _ => panic!(
            "expected 401 missing_key (resolved to the keyed route) or 400 (refused)\n{resp}"
        ),
    }
}

// --- streaming ------------------------------------------------------------------------

const GIB: u64 = 1 << 30;
/// Peak resident memory allowed to keygate while streaming 1 GiB each way:
/// bodies are streamed, so this holds for debug and release builds alike.
const STREAM_PEAK_RSS_KB: u64 = 100 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streams_up_and_down_in_bounded_memory() {
    let up = Upstream::named("bulk").await;
    let kg = Keygate::builder()
        .route(&public_route(
            "bulk",
            "/bulk/",
            &up,
            ", max_body: 2GiB, timeout: 10m",
        ))
        .start()
        .await;
    // Warm up the connection pool and the allocator before the baseline.
    kg.send(Req::get("/bulk/warmup")).await.echo();
    let baseline = kg.rss_kb();

    // Upload: 1 GiB chunked, generated on the fly in 1 MiB chunks.
    let started = Instant::now();
    let req = Request::builder()
        .method(Method::POST)
        .uri("/bulk/upload")
        .header("host", kg.proxy.to_string())
        .body(RepeatBody::new(1 << 20, GIB, false).boxed())
        .expect("upload request");
    let resp = client::h1_stream(kg.proxy, req, Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| panic!("1 GiB upload failed: {e}"));
    let status = resp.status();
    let body = client::deadline("upload response body", resp.into_body().collect())
        .await
        .expect("upload response body")
        .to_bytes();
    let upload_time = started.elapsed();
    assert_eq!(status, 200, "upload: {}", String::from_utf8_lossy(&body));
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("upload echo is JSON");
    assert_eq!(
        echo["body_bytes"], GIB,
        "the upstream must receive the whole body: {echo}"
    );
    assert_eq!(echo["body_error"], serde_json::Value::Null, "{echo}");
    let after_upload = kg.peak_rss_kb();

    // Download: 1 GiB from the upstream in 64 KiB chunks, counted as it streams.
    let started = Instant::now();
    let req = Request::builder()
        .uri(format!("/bulk/download/{GIB}"))
        .header("host", kg.proxy.to_string())
        .body(client::full(Bytes::new()))
        .expect("download request");
    let resp = client::h1_stream(kg.proxy, req, Duration::ZERO)
        .await
        .unwrap_or_else(|e| panic!("1 GiB download failed: {e}"));
    assert_eq!(resp.status(), 200, "download: {:?}", resp.headers());
    assert_eq!(
        resp.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok()),
        Some(GIB.to_string().as_str()),
        "the upstream's Content-Length is passed on: {:?}",
        resp.headers()
    );
    let mut body = resp.into_body();
    let mut received = 0u64;
    let counted = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.unwrap_or_else(|e| panic!("download broke after {received} bytes: {e}"));
            received += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
    })
    .await;
    assert!(counted.is_ok(), "download timed out after {received} bytes");
    let download_time = started.elapsed();
    assert_eq!(received, GIB, "downloaded bytes");

    let peak = kg.peak_rss_kb();
    eprintln!(
        "1 GiB streaming: upload {upload_time:.2?} ({:.0} MiB/s), download {download_time:.2?} ({:.0} MiB/s); \
         keygate RSS baseline {baseline} KiB, peak after upload {after_upload} KiB, peak after download {peak} KiB",
        1024.0 / upload_time.as_secs_f64(),
        1024.0 / download_time.as_secs_f64(),
    );
    assert!(
        peak < STREAM_PEAK_RSS_KB,
        "keygate's peak RSS {peak} KiB (baseline {baseline} KiB) is over {STREAM_PEAK_RSS_KB} KiB: bodies are being buffered"
    );
}

// --- header rewriting ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = Upstream::named("echo").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;

    let request = "GET /public/echo HTTP/1.1\r\n\
        Host: gw.example.test\r\n\
        Connection: keep-alive, X-Drop-Me, x-drop-too\r\n\
        X-Drop-Me: 1\r\n\
        X-Drop-Too: 2\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Upgrade: websocket\r\n\
        Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
        Proxy-Connection: keep-alive\r\n\
        X-Keygate-Key-Id: key_forged\r\n\
        X-Keygate-Owner: mallory\r\n\
        X-KEYGATE-Anything: forged\r\n\
        X-Kept: yes\r\n\r\n";
    let reply = client::raw(kg.proxy, request.as_bytes(), WAIT).await;
    let echo = reply.resp().echo();
    for name in [
        "connection",
        "x-drop-me",
        "x-drop-too",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        echo.assert_no_header(name);
    }
    let forged: Vec<String> = echo.json["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p[0].as_str())
        .filter(|k| k.to_ascii_lowercase().starts_with("x-keygate-"))
        .map(str::to_owned)
        .collect();
    assert!(
        forged.is_empty(),
        "client X-Keygate-* headers reached the upstream: {forged:?}\n{echo}"
    );
    echo.assert_header("x-kept", "yes");

    // The upstream's hop-by-hop headers do not reach the client.
    let resp = kg.send(Req::get("/public/hop")).await;
    resp.assert_status(200);
    for name in [
        "connection",
        "x-up-secret",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
    ] {
        assert!(
            resp.header(name).is_none(),
            "response header {name} must be removed\n{resp}"
        );
    }
    resp.assert_header("x-up-kept", "yes");
}

/// `Connection` may name headers to drop, but only the client's: keygate's
/// own forwarded and identity headers are added after the hop-by-hop pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_strip_or_forge_keygate_headers() {
    let up = Upstream::named("orders").await;
    let kg = Keygate::builder()
        .route(&keyed_route(
            "orders",
            "/orders/",
            &up.url(),
            ", scopes: ['orders:read']",
        ))
        .start()
        .await;
    let (id, secret) = kg
        .create_key(json!({
            "name": "harness key",
            "scopes": ["orders:read", "orders:write"],
            "access": "full",
        }))
        .await;

    let resp = kg
        .send(
            Req::get("/orders/1")
                .header("authorization", &format!("Bearer {secret}"))
                .header(
                    "connection",
                    "close, X-Keygate-Key-Id, X-Keygate-Owner, X-Forwarded-For, X-Request-Id, X-Forwarded-Proto",
                )
                .header("x-keygate-key-id", "key_forged")
                .header("x-keygate-owner", "mallory")
                .header("x-keygate-scopes", "admin"),
        )
        .await;
    let echo = resp.echo();
    echo.assert_header("x-keygate-key-id", &id);
    echo.assert_header("x-keygate-key-name", "harness key");
    echo.assert_header("x-keygate-owner", "ops");
    echo.assert_header("x-keygate-access", "full");
    let scopes: BTreeSet<String> = echo
        .header("x-keygate-scopes")
        .unwrap_or_default()
        .split(' ')
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = ["orders:read", "orders:write"].map(str::to_owned).into();
    assert_eq!(scopes, expected, "X-Keygate-Scopes\n{echo}");
    echo.assert_header("x-forwarded-for", "127.0.0.1");
    echo.assert_header("x-forwarded-proto", "http");
    let request_id = resp
        .header("x-request-id")
        .expect("X-Request-Id on the response");
    echo.assert_header("x-request-id", request_id);
    // The credential header is not forwarded.
    echo.assert_no_header("authorization");
    echo.assert_no_header("connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_ids() {
    let up = Upstream::named("echo").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;

    let resp = kg
        .send(
            Req::get("/public/fwd")
                .header("host", "api.example.test:8443")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-forwarded-for", "198.51.100.4, 192.0.2.1")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "forged.example.test")
                .header("x-request-id", "trace-abc-123"),
        )
        .await;
    let echo = resp.echo();
    echo.assert_header(
        "x-forwarded-for",
        "203.0.113.9, 198.51.100.4, 192.0.2.1, 127.0.0.1",
    );
    echo.assert_header("x-forwarded-proto", "http");
    echo.assert_header("x-forwarded-host", "api.example.test:8443");
    echo.assert_header("host", &up.addr().to_string());
    echo.assert_header("x-request-id", "trace-abc-123");
    resp.assert_header("x-request-id", "trace-abc-123");

    // Without one, keygate makes an id: 32 hex digits, the same on both sides,
    // different for every request.
    let mut ids = BTreeSet::new();
    for _ in 0..3 {
        let resp = kg.send(Req::get("/public/fwd")).await;
        let echo = resp.echo();
        echo.assert_header("x-forwarded-for", "127.0.0.1");
        echo.assert_header("x-forwarded-host", &kg.proxy.to_string());
        let id = resp
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no X-Request-Id\n{resp}"));
        assert_eq!(id.len(), 32, "generated X-Request-Id {id:?}\n{resp}");
        assert!(
            id.bytes().all(|b| b.is_ascii_hexdigit()),
            "generated X-Request-Id {id:?}\n{resp}"
        );
        echo.assert_header("x-request-id", id);
        ids.insert(id.to_owned());
    }
    assert_eq!(ids.len(), 3, "request ids must differ: {ids:?}");
}

// --- upstream failures ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_is_504_after_the_route_timeout() {
    let up = Upstream::named("stall").await;
    let kg = Keygate::builder()
        .route(&public_route("slow", "/slow/", &up, ", timeout: 1s"))
        .start()
        .await;
    let started = Instant::now();
    let resp = kg.send(Req::get("/slow/stall")).await;
    let elapsed = started.elapsed();
    eprintln!("504 after {elapsed:?} (route timeout 1s)");
    resp.assert_problem(504, "upstream_timeout");
    assert_eq!(up.hits(), 1, "the request reached the upstream");
    assert!(
        elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(2000),
        "504 must come after the 1s timeout and within 1s of it, came after {elapsed:?}\n{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_reset_upstreams_are_502() {
    let up = Upstream::named("resets").await;
    let refused = Upstream::refused_url();
    let kg = Keygate::builder()
        .route(&format!(
            "{{name: gone, match: {{path_prefix: /gone/}}, upstream: '{refused}', auth: none}}"
        ))
        .route(&public_route("flaky", "/flaky/", &up, ""))
        .start()
        .await;
    kg.send(Req::get("/gone/x"))
        .await
        .assert_problem(502, "upstream_unavailable");
    kg.send(Req::get("/flaky/reset"))
        .await
        .assert_problem(502, "upstream_unavailable");
    assert_eq!(
        up.hits(),
        1,
        "the reset request reached the upstream once (not retried)"
    );
    // The gateway still works after both.
    kg.send(Req::get("/flaky/ok")).await.echo();
}

// --- limits ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_body_are_413() {
    let up = Upstream::named("limited").await;
    let kg = Keygate::builder()
        .route(&public_route("small", "/small/", &up, ", max_body: 1KiB"))
        .route(&public_route(
            "medium",
            "/medium/",
            &up,
            ", max_body: 64KiB",
        ))
        .start()
        .await;

    // Exactly at the limit: forwarded.
    let echo = kg
        .send(Req::post("/small/at-limit", vec![b'a'; 1024]))
        .await
        .echo();
    assert_eq!(echo.body_bytes(), 1024, "{echo}");
    assert_eq!(up.hits(), 1);

    // A declared length over the limit: refused before anything is forwarded
    // (the body is never sent: keygate must not wait for it).
    let head = "POST /small/declared HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1025\r\n\r\n";
    let reply = client::raw(kg.proxy, head.as_bytes(), WAIT).await;
    reply.resp().assert_problem(413, "payload_too_large");
    assert_eq!(
        up.hits(),
        1,
        "a declared oversize body must not reach the upstream"
    );

    // A chunked body that grows past 64 KiB while streaming: 413, and the
    // upstream never receives the whole body.
    let mut chunks = vec![Bytes::from_static(
        b"POST /medium/stream HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n",
    )];
    let chunk = Bytes::from([b"4000\r\n".as_slice(), &[b'b'; 0x4000], b"\r\n"].concat());
    chunks.extend(std::iter::repeat_n(chunk, 64)); // 1 MiB in 16 KiB chunks
    chunks.push(Bytes::from_static(b"0\r\n\r\n"));
    let reply = client::raw_chunks(kg.proxy, chunks, WAIT).await;
    reply.resp().assert_problem(413, "payload_too_large");
    let hits = up.hits();
    if hits > 1 {
        let seen = up.wait_seen(hits as usize, WAIT).await;
        for s in &seen[1..] {
            assert!(
                s.body_error.is_some() && s.body_bytes <= 64 * 1024,
                "the upstream must see an aborted body of at most 64 KiB, saw {s:?}"
            );
        }
    }
}

/// Request heads of more than 100 fields or 64 KiB are 431
/// `headers_too_large` as problem+json (raw TCP: no client library sends
/// such heads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_are_431() {
    let up = Upstream::named("heads").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;
    let head = |fields: usize, filler: usize| {
        let mut s = String::from("GET /public/head HTTP/1.1\r\nHost: gw.test\r\n");
        for i in 1..fields {
            s.push_str(&format!("X-Field-{i}: v\r\n"));
        }
        if filler > 0 {
            s.push_str(&format!("X-Filler: {}\r\n", "f".repeat(filler)));
        }
        s.push_str("\r\n");
        s
    };

    // 100 fields (Host included): allowed.
    let echo = client::raw(kg.proxy, head(100, 0).as_bytes(), WAIT)
        .await
        .resp()
        .echo();
    echo.assert_header("x-field-99", "v");
    // 101 fields: 431.
    let reply = client::raw(kg.proxy, head(101, 0).as_bytes(), WAIT).await;
    reply.resp().assert_problem(431, "headers_too_large");
    // A head just under 64 KiB: allowed.
    let under = head(1, 60 * 1024);
    assert!(under.len() < 64 * 1024);
    client::raw(kg.proxy, under.as_bytes(), WAIT)
        .await
        .resp()
        .echo();
    // Over 64 KiB: 431.
    let reply = client::raw(kg.proxy, head(1, 70 * 1024).as_bytes(), WAIT).await;
    reply.resp().assert_problem(431, "headers_too_large");

    assert_eq!(
        up.hits(),
        2,
        "only the two acceptable heads reach the upstream"
    );
}

/// A request pipelined behind a malformed one: it must get no answer,
/// because the connection is closed after the 400.
const FOLLOW_UP: &str = "GET /public/after HTTP/1.1\r\nHost: gw.test\r\n\r\n";

/// Sends `request` + [`FOLLOW_UP`] and checks DESIGN.md section 4: one 400,
/// then the connection closes.
async fn assert_400_and_closed(kg: &Keygate, what: &str, request: &str) {
    let bytes = format!("{request}{FOLLOW_UP}");
    let reply = client::raw_to_close(kg.proxy, bytes.as_bytes(), WAIT).await;
    let responses = reply.responses();
    assert!(!responses.is_empty(), "{what}: no response\n{reply}");
    let problem = responses[0].assert_problem(400, "bad_request");
    println!("{what}: {}", problem["detail"]);
    assert_eq!(
        responses.len(),
        1,
        "{what}: the pipelined request was answered\n{reply}"
    );
    assert_eq!(
        reply.ended, "closed",
        "{what}: the connection must be closed\n{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_framing_is_400_closed_and_never_forwarded() {
    let up = Upstream::named("framing").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;
    let cases = [
        (
            "differing Content-Lengths",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
        ),
        (
            "Transfer-Encoding without chunked",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        (
            "obs-fold",
            "GET /public/a HTTP/1.1\r\nHost: gw.test\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "a space in a field name",
            "GET /public/a HTTP/1.1\r\nHost: gw.test\r\nX Bad: a\r\n\r\n",
        ),
        (
            "two spaces in the request line",
            "GET  /public/a HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        ),
        (
            "an invalid Content-Length",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5x\r\n\r\nhello",
        ),
    ];
    for (what, request) in cases {
        assert_400_and_closed(&kg, what, request).await;
    }
    assert_eq!(
        up.hits(),
        0,
        "malformed requests reached the upstream: {:?}",
        up.seen()
    );
}

/// Content-Length together with Transfer-Encoding, the classic request
/// smuggling vector, is 400 and never forwarded, whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_400_and_never_forwarded() {
    let up = Upstream::named("framing").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;
    let cases = [
        (
            "Content-Length, then Transfer-Encoding",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding, then Content-Length",
            "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        assert_400_and_closed(&kg, what, request).await;
    }
    assert_eq!(
        up.hits(),
        0,
        "CL+TE requests reached the upstream: {:?}",
        up.seen()
    );
}

/// keygate reads plain HTTP/1.1 requests itself and hands the connection to
/// hyper at the first one that is not plain (here a body): pipelined
/// requests on either side of the hand-over are all answered, in order, with
/// the right bodies, and the connection closes after the one that asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_plain_and_body_requests_are_answered_in_order() {
    let up = Upstream::named("pipe").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;
    let requests = concat!(
        "GET /public/one HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        "GET /public/chunked/2500 HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        "POST /public/three HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\n\r\nhello",
        "GET /public/four HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
        "GET /public/never HTTP/1.1\r\nHost: gw.test\r\n\r\n",
    );
    let reply = client::raw_to_close(kg.proxy, requests.as_bytes(), WAIT).await;
    let responses = reply.responses();
    assert_eq!(responses.len(), 4, "{reply}");
    assert_eq!(reply.ended, "closed", "{reply}");
    for r in &responses {
        r.assert_status(200);
        assert!(r.headers.contains_key("date"), "{r}");
    }
    assert_eq!(responses[0].echo().path(), "/public/one");
    assert_eq!(responses[1].body.len(), 2500, "{}", responses[1]);
    assert_eq!(responses[1].headers["transfer-encoding"], "chunked");
    assert_eq!(responses[2].echo().path(), "/public/three");
    assert_eq!(responses[2].echo().body_bytes(), 5);
    assert_eq!(responses[3].echo().path(), "/public/four");
    assert_eq!(responses[3].headers["connection"], "close");
    let seen: Vec<_> = up.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(
        seen,
        ["/public/one", "/public/three", "/public/four"],
        "what reached the upstream, in order"
    );
}

/// An idle keep-alive connection is closed once `header_read_timeout` passes
/// without a new request, as hyper does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::named("idle").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .section("limits:\n  header_read_timeout: 500ms")
        .start()
        .await;
    let mut s = tokio::net::TcpStream::connect(kg.proxy).await.unwrap();
    s.write_all(b"GET /public/a HTTP/1.1\r\nHost: gw.test\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "still open after {WAIT:?}");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

// --- HTTP/2 and TLS ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge() {
    let up = Upstream::named("h2c").await;
    let kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;

    let resp = client::h2c(kg.proxy, Req::get("/public/h2?q=1").header("x-custom", "v")).await;
    assert_eq!(resp.version, http::Version::HTTP_2, "{resp}");
    let echo = resp.echo();
    assert_eq!(
        (echo.method(), echo.path(), echo.query()),
        ("GET", "/public/h2", Some("q=1")),
        "{echo}"
    );
    echo.assert_header("x-custom", "v");
    echo.assert_header("x-forwarded-proto", "http");
    echo.assert_header("x-forwarded-host", &kg.proxy.to_string());
    assert_eq!(
        echo.version(),
        "HTTP/1.1",
        "keygate speaks HTTP/1.1 to plain-http upstreams\n{echo}"
    );

    let resp = client::h2c(kg.proxy, Req::post("/public/upload", vec![b'x'; 100_000])).await;
    let echo = resp.echo();
    assert_eq!(
        (echo.method(), echo.body_bytes()),
        ("POST", 100_000),
        "{echo}"
    );

    client::h2c(kg.proxy, Req::get("/nowhere"))
        .await
        .assert_problem(404, "no_route");
}

type AlpnCase = (
    &'static [&'static [u8]],
    Option<&'static [u8]>,
    http::Version,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_and_h2_by_alpn() {
    let certs = TestCerts::new();
    let up = Upstream::named("tls").await;
    let kg = Keygate::builder()
        .tls(&certs)
        .route(&public_route("public", "/public/", &up, ""))
        .start()
        .await;
    assert!(
        kg.https,
        "the announce line must say https:// when TLS is on\n{}",
        kg.output()
    );

    // (ALPN offered, ALPN expected, HTTP version expected)
    let cases: [AlpnCase; 3] = [
        (&[b"http/1.1"], Some(b"http/1.1"), http::Version::HTTP_11),
        (&[b"h2"], Some(b"h2"), http::Version::HTTP_2),
        (&[b"h2", b"http/1.1"], Some(b"h2"), http::Version::HTTP_2),
    ];
    for (offered, expected_alpn, expected_version) in cases {
        let (resp, alpn) =
            client::tls(kg.proxy, &certs, offered, Req::get("/public/secure?x=1")).await;
        assert_eq!(alpn.as_deref(), expected_alpn, "negotiated ALPN\n{resp}");
        assert_eq!(resp.version, expected_version, "{resp}");
        let echo = resp.echo();
        assert_eq!(
            (echo.path(), echo.query()),
            ("/public/secure", Some("x=1")),
            "{echo}"
        );
        echo.assert_header("x-forwarded-proto", "https");
    }
    let (resp, _) = client::tls(kg.proxy, &certs, &[b"h2"], Req::get("/nowhere")).await;
    resp.assert_problem(404, "no_route");
}

// --- shutdown -----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up = Upstream::named("slow").await;
    let mut kg = Keygate::builder()
        .route(&public_route("public", "/public/", &up, ""))
        .section("limits:\n  shutdown_grace: 5s")
        .start()
        .await;
    let proxy = kg.proxy;

    let started = Instant::now();
    let in_flight = tokio::spawn(client::h1(proxy, Req::get("/public/slow/1500")));
    // The request is in flight once the upstream has it.
    up.wait_hits(1, WAIT).await;
    kg.sigterm();

    // New connections are refused while the request is still running. (Until
    // the listener closes, a connect may land in its backlog and be reset.)
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::net::TcpStream::connect(proxy).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) if e.kind() != std::io::ErrorKind::ConnectionReset => {
                panic!(
                    "unexpected connect error after SIGTERM: {e}\n{}",
                    kg.output()
                )
            }
            _ if Instant::now() < deadline => tokio::task::yield_now().await,
            _ => panic!(
                "keygate still accepts connections 1s after SIGTERM\n{}",
                kg.output()
            ),
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the listener must close before the in-flight request ends ({:?})",
        started.elapsed()
    );

    let resp = client::deadline("in-flight request", in_flight)
        .await
        .expect("request task");
    let echo = resp.echo();
    assert_eq!(echo.path(), "/public/slow/1500", "{echo}");
    assert!(started.elapsed() >= Duration::from_millis(1500));

    let status = kg.wait_exit(Duration::from_secs(5)).await;
    assert!(
        status.success(),
        "keygate must exit 0 after a graceful shutdown, got {status}\n{}",
        kg.output()
    );
}

/// The `keygate listening:` line tells scripts and supervisors that keygate
/// is ready; from then on SIGTERM must mean a graceful shutdown (exit 0), not
/// death by the signal's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_announce_line_is_graceful() {
    for attempt in 1..=5 {
        let mut kg = Keygate::builder().start().await;
        kg.sigterm();
        let status = kg.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "attempt {attempt}: SIGTERM sent right after the announce line; keygate ended with {status}\n{}",
            kg.output()
        );
    }
}

// --- keyed routes -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_route_refuses_missing_malformed_and_unknown_keys() {
    let up = Upstream::named("keyed").await;
    let kg = Keygate::builder()
        .route(&keyed_route("api", "/api/", &up.url(), ""))
        .start()
        .await;

    let resp = kg.send(Req::get("/api/orders")).await;
    resp.assert_problem(401, "missing_key");
    resp.assert_header("www-authenticate", "Bearer realm=\"keygate\"");
    // A key in the query string is not a credential.
    let unknown = keygate::keys::Token::generate("kg_").expose().to_owned();
    let resp = kg
        .send(Req::get(&format!("/api/orders?api_key={unknown}")))
        .await;
    resp.assert_problem(401, "missing_key");

    // A valid-looking key with a bad checksum: flip its last character.
    let mut bad_checksum = unknown.clone();
    let last = bad_checksum.pop().expect("non-empty key");
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    assert!(keygate::keys::check_format("kg_", &unknown).is_ok());
    let presented = [
        ("authorization", "Bearer garbage".to_owned()),
        ("x-api-key", "garbage".to_owned()),
        ("x-api-key", bad_checksum),
        // Well-formed with a valid checksum, but never issued.
        ("authorization", format!("Bearer {unknown}")),
        ("x-api-key", unknown.clone()),
    ];
    for (header, value) in &presented {
        let resp = kg.send(Req::get("/api/orders").header(header, value)).await;
        resp.assert_problem(401, "invalid_key");
        resp.assert_header("www-authenticate", "Bearer error=\"invalid_token\"");
        assert!(
            !String::from_utf8_lossy(&resp.body).contains(value.as_str()),
            "the key is echoed back\n{resp}"
        );
    }
    assert_eq!(up.hits(), 0, "refused requests must not reach the upstream");

    // The control: a real key gets through, so the refusals above are real.
    let (_, secret) = kg
        .create_key(json!({"name": "control", "scopes": [], "access": "full"}))
        .await;
    let echo = kg
        .send(Req::get("/api/orders").header("x-api-key", &secret))
        .await
        .echo();
    echo.assert_no_header("x-api-key");
    assert_eq!(up.hits(), 1);
    let output = kg.output();
    for secret in [unknown.as_str(), secret.as_str()] {
        assert!(
            !output.contains(secret),
            "a presented key appears in keygate's output:\n{output}"
        );
    }
}
