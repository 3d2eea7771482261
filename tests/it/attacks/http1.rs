//! HTTP/1.1 parsing and smuggling, from raw TCP clients that write exact bytes.
//!
//! Already covered elsewhere: CL+TE in both orders, differing Content-Lengths,
//! `Transfer-Encoding` not ending in chunked and obs-fold (`proxy.rs`,
//! `malformed_framing_is_400_closed_and_never_forwarded` and
//! `content_length_with_transfer_encoding_is_400_and_never_forwarded`); dot
//! segments on origin-form paths (`dot_segments_never_leave_the_route_prefix`);
//! `Connection: close, X-Keygate-Key-Id, ...` naming keygate's own headers
//! (`connection_header_cannot_strip_or_forge_keygate_headers`). Here: the
//! obfuscated variants of those, chunk sizes, pipelining behind an early 401,
//! upgrades and CONNECT, and absolute-form targets.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{FOLLOW_UP, SMUGGLED, Site, WAIT, assert_refused_and_closed};
use crate::common::client::{self, Req, Resp};

/// Obfuscated framing headers that smuggling tools try, each with a body that
/// holds a whole request: 400 or a close, and nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obfuscated_framing_is_refused_and_never_forwarded() {
    let site = Site::start().await;
    let chunked_smuggle = format!("0\r\n\r\n{SMUGGLED}");
    let cases: Vec<(&str, String)> = vec![
        // TE.CL / CL.TE with a Transfer-Encoding a lenient parser might not see.
        (
            "TE with a tab before chunked, plus CL",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {}\r\nTransfer-Encoding:\tchunked\r\n\r\n{chunked_smuggle}",
                chunked_smuggle.len()
            ),
        ),
        (
            "TE with a space before the colon, plus CL",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding : chunked\r\nContent-Length: {}\r\n\r\n{chunked_smuggle}",
                chunked_smuggle.len()
            ),
        ),
        (
            "TE xchunked, plus CL",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: xchunked\r\nContent-Length: {}\r\n\r\n{chunked_smuggle}",
                chunked_smuggle.len()
            ),
        ),
        (
            "TE chunked, then a second TE header with identity",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{chunked_smuggle}"
            ),
        ),
        (
            "TE chunked with a vertical tab",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\x0b\r\nContent-Length: 3\r\n\r\n{chunked_smuggle}"
            ),
        ),
        (
            "TE identity alone",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: identity\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "TE on an HTTP/1.0 request",
            format!(
                "POST /public/a HTTP/1.0\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_smuggle}"
            ),
        ),
        (
            "a header line folded onto the request line",
            format!(
                "POST /public/a HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: gw.test\r\nContent-Length: {}\r\n\r\n{chunked_smuggle}",
                chunked_smuggle.len()
            ),
        ),
        // Content-Length a lenient parser might read differently.
        (
            "CL with a plus sign",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: +{}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "CL negative",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: -1\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "CL in hex",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 0x10\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "CL with two numbers",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 0 {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "CL list with differing values",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 0, {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "CL overflowing 64 bits",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 184467440737095516160\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "CL empty",
            format!(
                "POST /public/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length:\r\n\r\n{SMUGGLED}"
            ),
        ),
        (
            "a NUL in a header value",
            format!("GET /public/a HTTP/1.1\r\nHost: gw.test\r\nX-Nul: a\0b\r\n\r\n{SMUGGLED}"),
        ),
    ];
    for (what, request) in &cases {
        assert_refused_and_closed(site.kg.proxy, what, request.as_bytes()).await;
    }
    // Also on the keyed route with a body that smuggles a keyed request.
    let private_smuggle = "0\r\n\r\nGET /private/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n";
    let request = format!(
        "POST /private/a HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {}\r\nTransfer-Encoding:\tchunked\r\n\r\n{private_smuggle}",
        private_smuggle.len()
    );
    assert_refused_and_closed(site.kg.proxy, "keyed route, TE+CL", request.as_bytes()).await;

    assert_eq!(
        site.public.hits(),
        0,
        "refused requests reached the public upstream: {:?}",
        site.public_targets()
    );
    site.assert_private_untouched("obfuscated framing");
}

/// Duplicate, identical Content-Lengths are one length (RFC 9112 section
/// 6.3): the body is that long and the next request is parsed where it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_duplicate_content_lengths_frame_the_body_exactly() {
    let site = Site::start().await;
    let body = "hello";
    let request = format!(
        "POST /public/dup HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n{body}{FOLLOW_UP}"
    );
    let reply =
        client::raw_to_close(site.kg.proxy, request.as_bytes(), Duration::from_secs(2)).await;
    let responses = reply.responses();
    match responses.len() {
        // Refusing the duplicate outright is allowed too.
        1 => {
            responses[0].assert_status(400);
            assert_eq!(site.public.hits(), 0, "{reply}");
        }
        2 => {
            let first = responses[0].echo();
            assert_eq!(first.path(), "/public/dup", "{first}");
            assert_eq!(first.body_bytes(), 5, "{first}");
            assert_eq!(responses[1].echo().path(), "/public/after", "{reply}");
        }
        n => panic!("{n} answers\n{reply}"),
    }
}

/// Malformed and oversized chunk sizes: the request never completes upstream
/// (the upstream sees no request, or one whose body was aborted), the client
/// gets a 400 or a close (never a 200, nor a 502 blaming the upstream), and
/// nothing after the bad chunk is read as a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_sizes_never_complete_a_request() {
    let site = Site::start().await;
    let huge_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(100 * 1024));
    let cases: Vec<(&str, String)> = vec![
        (
            "chunk size overflowing 64 bits",
            "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("chunk size not hex", "zz\r\nhello\r\n0\r\n\r\n".into()),
        ("chunk size negative", "-5\r\nhello\r\n0\r\n\r\n".into()),
        ("chunk size with 0x", "0x5\r\nhello\r\n0\r\n\r\n".into()),
        ("chunk size empty", "\r\nhello\r\n0\r\n\r\n".into()),
        (
            "chunk size with an inner space",
            "5 5\r\nhello\r\n0\r\n\r\n".into(),
        ),
        (
            "chunk data longer than its size",
            "3\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("chunk without its CRLF", "5\r\nhelloXX0\r\n\r\n".into()),
        ("chunk extension of 100 KiB", huge_ext),
    ];
    for (what, body) in &cases {
        let request = format!(
            "POST /public/chunks HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n{body}{SMUGGLED}"
        );
        let reply = client::raw_to_close(site.kg.proxy, request.as_bytes(), WAIT).await;
        assert!(
            reply.ended == "closed" || reply.ended.starts_with("read error"),
            "{what}: the connection must be closed\n{reply}"
        );
        let responses = reply.responses();
        println!(
            "{what}: {:?}, then {}",
            responses
                .iter()
                .map(|r| r.status.as_u16())
                .collect::<Vec<_>>(),
            reply.ended
        );
        assert!(
            responses.len() <= 1,
            "{what}: more than one answer\n{reply}"
        );
        // The client broke the body: 400, not a 502 that blames the upstream.
        if let Some(resp) = responses.first() {
            resp.assert_problem(400, "bad_request");
        }
    }
    // Whatever the upstream saw of these, no body completed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for seen in site.public.seen() {
        assert!(
            seen.target == "/public/chunks" && seen.body_error.is_some(),
            "the upstream received a complete request: {seen:?}"
        );
    }
    assert!(
        !site.public_targets().iter().any(|t| t.contains("smuggled")),
        "a smuggled request was parsed: {:?}",
        site.public_targets()
    );
}

/// A POST on a keyed route without a key, whose body is itself a request:
/// keygate answers 401 before reading the body, and then must either close
/// the connection or skip the body exactly. The body is never parsed as a
/// request and the keyed upstream sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_left_unread_by_an_early_401_is_never_parsed_as_a_request() {
    let site = Site::start().await;
    let chunked = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let big = "x".repeat(512 * 1024) + SMUGGLED;
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length body",
            format!(
                "POST /private/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "chunked body",
            format!(
                "POST /private/x HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
            ),
        ),
        (
            "Expect: 100-continue, body sent anyway",
            format!(
                "POST /private/x HTTP/1.1\r\nHost: gw.test\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
        ),
        (
            "512 KiB body ending in a request",
            format!(
                "POST /private/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {}\r\n\r\n{big}",
                big.len()
            ),
        ),
    ];
    for (what, request) in &cases {
        let bytes = format!("{request}{FOLLOW_UP}");
        let reply = client::raw_to_close(site.kg.proxy, bytes.as_bytes(), WAIT).await;
        check_after_early_401(what, &reply.responses(), &reply.ended, &reply.to_string());
    }

    // The body arrives only after the client has read the 401.
    let head = format!(
        "POST /private/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {}\r\n\r\n",
        SMUGGLED.len()
    );
    let mut conn = TcpStream::connect(site.kg.proxy).await.expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write head");
    let first = read_some(&mut conn).await;
    assert!(
        first.starts_with(b"HTTP/1.1 401 "),
        "late body: expected an early 401, got {:?}",
        String::from_utf8_lossy(&first)
    );
    // The server may have closed already; writing then fails, which is fine.
    let late = format!("{SMUGGLED}{FOLLOW_UP}");
    let wrote = conn.write_all(late.as_bytes()).await;
    let mut rest = Vec::new();
    let ended = match tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => "closed".to_owned(),
        Ok(Err(e)) => format!("read error: {e}"),
        Err(_) => "timeout".to_owned(),
    };
    let mut all = first.clone();
    all.extend_from_slice(&rest);
    let reply = client::RawReply {
        request: format!("{head}[after the 401:] {late} (write: {wrote:?})"),
        bytes: all,
        ended,
    };
    check_after_early_401(
        "late body",
        &reply.responses(),
        &reply.ended,
        &reply.to_string(),
    );

    assert!(
        !site.public_targets().iter().any(|t| t.contains("smuggled")),
        "a request body was parsed as a request: {:?}",
        site.public_targets()
    );
    site.assert_private_untouched("early 401");
}

/// Reads what the server has sent so far (at least one read, up to `WAIT`).
async fn read_some(conn: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 16 * 1024];
    match tokio::time::timeout(WAIT, conn.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].to_vec(),
        Ok(Err(e)) => panic!("read failed: {e}"),
        Err(_) => panic!("no answer within {WAIT:?}"),
    }
}

/// After an early 401: either the connection closed, or the next answer is
/// the pipelined [`FOLLOW_UP`] served normally (the body was skipped exactly).
#[track_caller]
fn check_after_early_401(what: &str, responses: &[Resp], ended: &str, shown: &str) {
    assert!(!responses.is_empty(), "{what}: no answer\n{shown}");
    responses[0].assert_problem(401, "missing_key");
    match responses.len() {
        1 => assert!(
            ended == "closed" || ended.starts_with("read error"),
            "{what}: after the 401 the connection must close or go on correctly\n{shown}"
        ),
        2 => {
            let echo = responses[1].echo();
            assert_eq!(echo.path(), "/public/after", "{what}: desync\n{shown}");
        }
        n => panic!("{what}: {n} answers: the body was parsed as a request\n{shown}"),
    }
}

/// DESIGN.md lets no route allow tunnels, so `Upgrade` is never honoured:
/// the upstream gets a plain request without `Upgrade`/`Connection`, the
/// client never sees a 101, and the connection stays HTTP (a pipelined
/// request after it is answered as HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_never_honoured() {
    let site = Site::start().await;
    let cases = [
        (
            "websocket",
            "GET /public/ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
        (
            "h2c upgrade",
            "GET /public/h2c HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let bytes = format!("{request}{FOLLOW_UP}");
        let reply =
            client::raw_to_close(site.kg.proxy, bytes.as_bytes(), Duration::from_secs(2)).await;
        assert!(
            !reply.bytes.starts_with(b"HTTP/1.1 101"),
            "{what}: switched protocols\n{reply}"
        );
        let responses = reply.responses();
        assert_eq!(
            responses.len(),
            2,
            "{what}: the connection must stay HTTP\n{reply}"
        );
        let echo = responses[0].echo();
        for name in ["upgrade", "connection", "http2-settings"] {
            echo.assert_no_header(name);
        }
        assert_eq!(responses[1].echo().path(), "/public/after", "{reply}");
    }
    // On a keyed route, an upgrade without a key is refused like any request.
    let request = "GET /private/ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let reply = client::raw(site.kg.proxy, request.as_bytes(), WAIT).await;
    reply.resp().assert_problem(401, "missing_key");
    site.assert_private_untouched("upgrade");
}

/// CONNECT (authority-form) never opens a tunnel: 400 `bad_path` (no route
/// has a path for it), and nothing reaches an upstream. After a refused
/// CONNECT the connection stays HTTP (RFC 9110 section 9.3.6), so bytes sent
/// behind it are ordinary requests, routed and authenticated as such (the
/// admin API's path is `no_route` here) or not read at all; never relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_never_opens_a_tunnel() {
    let site = Site::with(|b| b.section("limits:\n  header_read_timeout: 1s")).await;
    let public = site.public.addr();
    let admin = site.kg.admin;
    for target in [
        public.to_string(),
        admin.to_string(),
        "gw.test:443".to_owned(),
    ] {
        let request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\nGET /v1/keys HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {}\r\n\r\n{FOLLOW_UP}",
            site.kg.admin_token()
        );
        let reply = client::raw_to_close(site.kg.proxy, request.as_bytes(), WAIT).await;
        let responses = reply.responses();
        println!(
            "CONNECT {target}: {:?}, then {}",
            responses
                .iter()
                .map(|r| r.status.as_u16())
                .collect::<Vec<_>>(),
            reply.ended
        );
        assert!(
            !responses.is_empty(),
            "CONNECT {target}: no answer\n{reply}"
        );
        responses[0].assert_problem(400, "bad_path");
        match responses.len() {
            1 => {}
            3 => {
                responses[1].assert_problem(404, "no_route");
                assert_eq!(responses[2].echo().path(), "/public/after", "{reply}");
            }
            n => panic!("CONNECT {target}: {n} answers\n{reply}"),
        }
        assert!(
            reply.ended == "closed" || reply.ended.starts_with("read error"),
            "CONNECT {target}: the connection must be closed by the header timeout\n{reply}"
        );
    }
    // Over HTTP/2 too (h2c): CONNECT has only :method and :authority.
    let resp = super::h2::connect_over_h2c(site.kg.proxy, &public.to_string()).await;
    println!("h2 CONNECT: {resp:?}");
    assert_eq!(resp, Some(400), "h2 CONNECT must be refused");
    let targets = site.public_targets();
    assert!(
        targets.iter().all(|t| t == "/public/after"),
        "CONNECT reached the upstream: {targets:?}"
    );
    site.assert_private_untouched("CONNECT");
}

/// Absolute-form targets route by their own authority and path (RFC 9112
/// section 3.2.2), with the same dot-segment rules as origin-form: they can
/// neither reach the keyed route without a key nor turn keygate into a forward
/// proxy to another host (the admin listener included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_and_encoded_paths_cannot_escape_a_route() {
    let site = Site::start().await;
    let admin = site.kg.admin;
    let escaping = [
        "http://gw.test/private/x".to_owned(),
        "https://gw.test/private/x".to_owned(),
        "http://gw.test/public/../private/x".to_owned(),
        "http://gw.test/public/%2e%2e/private/x".to_owned(),
        "http://gw.test/public/%2E%2e/private/x".to_owned(),
        "http://gw.test/public/..%2fprivate/x".to_owned(),
        "http://gw.test/public/%2f..%2fprivate/x".to_owned(),
        "http://gw.test/public/..%5cprivate/x".to_owned(),
        format!("http://{admin}/private/x"),
        "/public/..%2Fprivate/x".to_owned(),
        "/public/%2e%2e%2fprivate/x".to_owned(),
        "//private/x".to_owned(),
        "/public//../private/x".to_owned(),
        "/public/.%2E/private/x".to_owned(),
        "/public/%2e%2e/%2e%2e/private/x".to_owned(),
        "/public/..;/private/x".to_owned(),
        "/public/x/..%00/private".to_owned(),
    ];
    for target in &escaping {
        let request = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n");
        let reply = client::raw(site.kg.proxy, request.as_bytes(), WAIT).await;
        let resp = reply.resp();
        match resp.status.as_u16() {
            401 => {
                resp.assert_problem(401, "missing_key");
            }
            400 | 404 => {
                resp.assert_header("content-type", "application/problem+json");
            }
            // `..;` is an ordinary segment to keygate: it stays on /public/.
            200 => assert_eq!(
                resp.echo().upstream(),
                "public",
                "{target}: served by the wrong upstream\n{resp}"
            ),
            _ => panic!("{target}: unexpected answer\n{resp}"),
        }
    }
    site.assert_private_untouched("escaping targets");
    // Whatever the public upstream got stayed below /public/.
    for t in site.public_targets() {
        assert!(t.starts_with("/public/"), "the public upstream got {t:?}");
    }

    // Absolute-form to the admin listener's address is routed like any
    // request (here: to the public route's upstream), never to the admin API.
    let request = format!(
        "GET http://{admin}/public/v1/keys HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {}\r\n\r\n",
        site.kg.admin_token()
    );
    let reply = client::raw(site.kg.proxy, request.as_bytes(), WAIT).await;
    let echo = reply.resp().echo();
    assert_eq!(echo.upstream(), "public", "{echo}");
    assert_eq!(echo.path(), "/public/v1/keys", "{echo}");

    // HTTP/2 paths follow the same rules.
    for target in [
        "/public/../private/x",
        "/public/%2e%2e/private/x",
        "/public/..%2fprivate/x",
    ] {
        let resp = client::h2c(site.kg.proxy, Req::get(target)).await;
        assert!(
            matches!(resp.status.as_u16(), 400 | 401),
            "h2 {target}\n{resp}"
        );
    }
    site.assert_private_untouched("h2 escaping paths");
}
