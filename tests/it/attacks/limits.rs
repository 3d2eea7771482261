//! Limits and slow clients: 414, slowloris and idle connections, slow TLS
//! handshakes, the connection cap, and a client that never reads.
//!
//! 431 for more than 100 fields or 64 KiB of HTTP/1.1 head is
//! `proxy.rs::oversized_request_heads_are_431`; over HTTP/2 it is
//! `h2::huge_header_lists_are_refused`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Site, WAIT, probe, public_route, time_to_close};
use crate::common::client::{self, Req, TestCerts};
use crate::common::upstream::Upstream;

/// The header timeout the slow-client tests configure.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// A close must come after the timeout, and at most this much later.
const CLOSE_SLACK: Duration = Duration::from_millis(1500);

#[track_caller]
fn assert_closed_in_time(what: &str, closed: Option<Duration>, timeout: Duration) {
    let Some(after) = closed else {
        panic!(
            "{what}: still open {:?} after the {timeout:?} timeout",
            timeout + CLOSE_SLACK
        );
    };
    println!("{what}: closed after {after:?} (timeout {timeout:?})");
    // The clock starts a little after keygate's (at the client's connect,
    // on a busy test runtime): allow that much early.
    assert!(
        after + Duration::from_millis(300) >= timeout,
        "{what}: closed after {after:?}, before the {timeout:?} timeout"
    );
}

/// DESIGN.md section 4: a URI over 8 KiB is 414 `uri_too_long`, on HTTP/1.1
/// and HTTP/2; at 8 KiB it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uris_over_8_kib_are_414() {
    let site = Site::start().await;
    let path_of = |len: usize| format!("/public/{}", "u".repeat(len - "/public/".len()));

    let at_limit = path_of(8 * 1024);
    let echo = site.kg.send(Req::get(&at_limit)).await.echo();
    assert_eq!(echo.path(), at_limit, "{echo}");
    site.kg
        .send(Req::get(&path_of(8 * 1024 + 1)))
        .await
        .assert_problem(414, "uri_too_long");
    // The query counts.
    let with_query = format!("/public/q?{}", "q".repeat(8 * 1024));
    site.kg
        .send(Req::get(&with_query))
        .await
        .assert_problem(414, "uri_too_long");
    client::h2c(site.kg.proxy, Req::get(&path_of(9 * 1024)))
        .await
        .assert_problem(414, "uri_too_long");
    // Far beyond: 414, or 431 since the head is then over 64 KiB too.
    let huge = format!(
        "GET {} HTTP/1.1\r\nHost: gw.test\r\n\r\n",
        path_of(100 * 1024)
    );
    let reply = client::raw(site.kg.proxy, huge.as_bytes(), WAIT).await;
    let resp = reply.resp();
    assert!(matches!(resp.status.as_u16(), 414 | 431), "{resp}");
    assert_eq!(
        site.public.hits(),
        1,
        "only the URI at the limit is forwarded"
    );
}

/// `limits.header_read_timeout` bounds the time from the connection (or the
/// end of the previous request) to a complete request head, however the
/// bytes trickle in: a slowloris head at 5 bytes/s, a silent connection, an
/// HTTP/2 preface sent a byte at a time, an h2c connection that never opens
/// a stream, and an idle keep-alive connection are all closed, and the
/// trickled request never reaches the upstream. A slow head that completes
/// in time is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_after_the_header_timeout() {
    let site = Site::with(|b| b.section("limits:\n  header_read_timeout: 1s")).await;
    let addr = site.kg.proxy;
    let limit = HEAD_TIMEOUT + CLOSE_SLACK;

    // Writes `bytes` one at a time, every `gap`, and measures the close.
    async fn trickle(
        addr: std::net::SocketAddr,
        bytes: Vec<u8>,
        gap: Duration,
        limit: Duration,
    ) -> Option<Duration> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let since = Instant::now();
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            for b in bytes {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            // Keep the write half open.
            std::future::pending::<()>().await;
        });
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(limit, async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        writer.abort();
        closed.ok().map(|()| since.elapsed())
    }

    let slowloris = {
        let mut head = b"GET /public/slowloris HTTP/1.1\r\nHost: gw.test\r\nX-Slow: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 200));
        trickle(addr, head, Duration::from_millis(200), limit)
    };
    let silent = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        time_to_close(&mut s, Instant::now(), limit).await
    };
    let preface = trickle(
        addr,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        Duration::from_millis(200),
        limit,
    );
    let h2_no_stream = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let since = Instant::now();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
        s.write_all(&hello).await.expect("write preface");
        time_to_close(&mut s, since, limit).await
    };
    let idle_keep_alive = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /public/first HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200 "),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        time_to_close(&mut s, Instant::now(), limit).await
    };
    let in_time = async {
        // The whole head over ~600 ms: under the timeout, so it is served.
        let head = b"GET /public/in-time HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n";
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        for chunk in head.chunks(8) {
            wr.write_all(chunk).await.expect("write");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, rd.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        answer
    };
    let (slowloris, silent, preface, h2_no_stream, idle, in_time) = tokio::join!(
        slowloris,
        silent,
        preface,
        h2_no_stream,
        idle_keep_alive,
        in_time
    );
    assert_closed_in_time("slowloris head at 5 bytes/s", slowloris, HEAD_TIMEOUT);
    assert_closed_in_time("silent connection", silent, HEAD_TIMEOUT);
    assert_closed_in_time("HTTP/2 preface at 5 bytes/s", preface, HEAD_TIMEOUT);
    assert_closed_in_time(
        "h2c connection without a stream",
        h2_no_stream,
        HEAD_TIMEOUT,
    );
    assert_closed_in_time("idle keep-alive connection", idle, HEAD_TIMEOUT);
    assert!(
        in_time.starts_with(b"HTTP/1.1 200 "),
        "a head completed within the timeout must be served: {:?}",
        String::from_utf8_lossy(&in_time)
    );
    let targets = site.public_targets();
    assert!(
        !targets.iter().any(|t| t.contains("slowloris")),
        "the slowloris request reached the upstream: {targets:?}"
    );
}

/// `limits.tls_handshake_timeout` closes connections that do not finish the
/// TLS handshake in time (silent, a record header and nothing more, or a
/// ClientHello trickled a byte at a time), and a finished handshake followed
/// by silence is closed by the header timeout. Real clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_handshakes_are_closed_after_the_handshake_timeout() {
    let certs = TestCerts::new();
    let site = Site::with(|b| {
        b.tls(&certs)
            .section("limits:\n  tls_handshake_timeout: 1s\n  header_read_timeout: 1s")
    })
    .await;
    let addr = site.kg.proxy;
    let limit = HEAD_TIMEOUT + CLOSE_SLACK;

    let silent = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        time_to_close(&mut s, Instant::now(), limit).await
    };
    let record_header = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let since = Instant::now();
        // A handshake record announcing 512 bytes that never come.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .expect("write");
        time_to_close(&mut s, since, limit).await
    };
    let trickled = async {
        let s = TcpStream::connect(addr).await.expect("connect");
        let since = Instant::now();
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut hello = vec![
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            hello.extend(std::iter::repeat_n(0x42, 500));
            for b in hello {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(limit, async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        writer.abort();
        closed.ok().map(|()| since.elapsed())
    };
    let silent_after_handshake = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(certs.client_config(&[b"http/1.1"]))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let since = Instant::now();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(limit, async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        closed.ok().map(|()| since.elapsed())
    };
    let (silent, record_header, trickled, after) =
        tokio::join!(silent, record_header, trickled, silent_after_handshake);
    assert_closed_in_time("silent TLS connection", silent, HEAD_TIMEOUT);
    assert_closed_in_time("TLS record header only", record_header, HEAD_TIMEOUT);
    assert_closed_in_time("ClientHello at 10 bytes/s", trickled, HEAD_TIMEOUT);
    assert_closed_in_time("silence after the TLS handshake", after, HEAD_TIMEOUT);

    let (resp, _) = client::tls(
        addr,
        &certs,
        &[b"h2", b"http/1.1"],
        Req::get("/public/real"),
    )
    .await;
    resp.echo();
}

/// `limits.max_connections`: past the cap, new connections wait instead of
/// being served, and are served as soon as a slot frees; with several
/// workers the cap is the whole process's and every slot is usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_slot() {
    const CAP: usize = 3;
    let stall = Upstream::named("stall").await;
    let route = public_route("stall", "/stall/", &stall, ", timeout: 30s");
    // Two workers (SO_REUSEPORT sockets sharing the cap), whatever the CPUs.
    let site = Site::with(|b| {
        b.route(&route)
            .section("limits:\n  max_connections: 3")
            .env("KEYGATE_WORKERS", "2")
    })
    .await;
    let addr = site.kg.proxy;

    // Fill every slot with a request that the upstream never answers.
    let mut held = Vec::new();
    for i in 0..CAP {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET /stall/{i}/stall HTTP/1.1\r\nHost: gw.test\r\n\r\n").as_bytes())
            .await
            .expect("write");
        held.push(s);
    }
    stall.wait_hits(CAP as u64, WAIT).await;

    // One more: connected (the kernel queues it) but not served.
    let mut extra = TcpStream::connect(addr)
        .await
        .expect("connect past the cap");
    extra
        .write_all(b"GET /public/waiting HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_millis(800), extra.read_to_end(&mut answer)).await;
    assert!(
        early.is_err() && answer.is_empty(),
        "a connection past the cap of {CAP} was served: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        site.public.hits(),
        0,
        "the queued request reached the upstream early"
    );

    // Free one slot: the queued connection is served.
    let freed = Instant::now();
    drop(held.pop());
    tokio::time::timeout(WAIT, extra.read_to_end(&mut answer))
        .await
        .expect("served once a slot freed")
        .expect("read");
    println!(
        "queued connection served {:?} after a slot freed",
        freed.elapsed()
    );
    assert!(
        answer.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// A client that asks for a large download and never reads: backpressure
/// holds the body in socket buffers, so keygate's memory stays flat, and
/// other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_do_not_grow_memory() {
    const CLIENTS: usize = 4;
    const GROWTH_LIMIT_KB: u64 = 64 * 1024;
    let site = Site::start().await;
    // Warm up the pool and the allocator before the baseline.
    for _ in 0..5 {
        site.kg.send(Req::get("/public/warm")).await.echo();
    }
    let before = site.kg.rss_kb();
    let mut stuck = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(site.kg.proxy).await.expect("connect");
        s.write_all(b"GET /public/download/1073741824 HTTP/1.1\r\nHost: gw.test\r\n\r\n")
            .await
            .expect("write");
        // Read the head, so the download has started, then stop reading.
        let mut head = vec![0u8; 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut head))
            .await
            .expect("a response head")
            .expect("read");
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200 "),
            "{:?}",
            String::from_utf8_lossy(&head[..n])
        );
        stuck.push(s);
    }
    // Long enough for unbounded buffering to show (GB/s on loopback).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mid = site.kg.rss_kb();
    probe(site.kg.proxy, "/public/meanwhile")
        .await
        .unwrap_or_else(|e| panic!("a normal request failed while downloads were stuck: {e}"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = site.kg.rss_kb();
    println!(
        "{CLIENTS} stuck 1 GiB downloads: keygate RSS {before} KiB -> {mid} KiB -> {after} KiB"
    );
    assert!(
        after.saturating_sub(before) < GROWTH_LIMIT_KB,
        "RSS grew from {before} KiB to {after} KiB with {CLIENTS} clients not reading"
    );
    assert!(
        after.saturating_sub(mid) < 8 * 1024,
        "RSS still growing: {mid} KiB -> {after} KiB"
    );
    drop(stuck);
}
