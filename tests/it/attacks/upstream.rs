//! Upstream faults, with raw TCP upstreams that misbehave on purpose.
//!
//! Already covered in `proxy.rs`: an upstream that takes the request and never
//! answers is 504 after the route timeout
//! (`stalled_upstream_is_504_after_the_route_timeout`), refused and reset
//! before answering are 502 (`refused_and_reset_upstreams_are_502`), and its
//! hop-by-hop response headers are stripped
//! (`hop_by_hop_headers_are_removed_both_ways`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::WAIT;
use crate::common::client::{self, Req};
use crate::common::keygate::Keygate;
use crate::common::upstream::Upstream;

/// A raw upstream: every accepted connection is handed to `script`.
async fn raw_upstream<F, Fut>(script: F) -> (SocketAddr, JoinHandle<()>)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(script(s));
        }
    });
    (addr, task)
}

/// Reads a request head (up to the blank line).
async fn read_head(s: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `answer`, lets it reach keygate, then ends the connection with
/// `end` (a FIN by dropping, or [`reset`]).
async fn write_then(mut s: TcpStream, answer: &[u8], end: fn(TcpStream)) {
    if let Err(e) = s.write_all(answer).await {
        eprintln!("raw upstream: write failed: {e}");
        return;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    end(s);
}

/// Closes `s` with an RST (SO_LINGER 0) instead of a FIN.
fn reset(s: TcpStream) {
    if let Err(e) = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)) {
        eprintln!("set_linger: {e}");
    }
    drop(s);
}

fn route(name: &str, prefix: &str, addr: SocketAddr, extra: &str) -> String {
    format!(
        "{{name: {name}, match: {{path_prefix: '{prefix}'}}, upstream: 'http://{addr}', auth: none{extra}}}"
    )
}

/// Upstreams that accept the connection and then say nothing (never reading,
/// or never even accepting: the kernel completes the handshake) are 504
/// `upstream_timeout` once the route timeout has passed, not later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_upstreams_are_504_in_time() {
    let (hole, _task) = raw_upstream(|s| async move {
        // Hold the socket without reading or writing.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    // Listening with a backlog, never accepting.
    let backlog = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let kg = Keygate::builder()
        .route(&route("hole", "/hole/", hole, ", timeout: 1s"))
        .route(&route(
            "backlog",
            "/backlog/",
            backlog.local_addr().expect("addr"),
            ", timeout: 1s",
        ))
        .start()
        .await;
    for target in ["/hole/x", "/backlog/x"] {
        let started = Instant::now();
        let resp = kg.send(Req::get(target)).await;
        let took = started.elapsed();
        println!("{target}: 504 after {took:?} (route timeout 1s)");
        resp.assert_problem(504, "upstream_timeout");
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
            "{target}: 504 must come 1s after the request, came after {took:?}"
        );
    }
    drop(backlog);
}

/// An upstream that dies in the middle of the body: the client must see an
/// aborted response (closed before the declared length, or before the chunked
/// terminator), never one that looks complete. Over HTTP/2 the stream is
/// reset, and the body read fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_body_aborts_the_response() {
    // Content-Length 1 MiB, 64 KiB sent, then RST.
    let (length, _t1) = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n";
        let mut answer = head.as_bytes().to_vec();
        answer.extend(std::iter::repeat_n(b'l', 64 * 1024));
        write_then(s, &answer, reset).await;
    })
    .await;
    // Chunked, two chunks, then a plain close (FIN) without the terminator.
    let (chunked, _t2) = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let head =
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n";
        write_then(s, head.as_bytes(), drop).await;
    })
    .await;
    // Close-delimited (no length, no chunking), then RST.
    let (delimited, _t3) = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial body";
        write_then(s, head.as_bytes(), reset).await;
    })
    .await;
    let kg = Keygate::builder()
        .route(&route("length", "/length/", length, ""))
        .route(&route("chunked", "/chunked/", chunked, ""))
        .route(&route("delimited", "/delimited/", delimited, ""))
        .start()
        .await;

    for target in ["/length/x", "/chunked/x", "/delimited/x"] {
        // HTTP/1.1: read everything until keygate closes.
        let request = format!("GET {target} HTTP/1.1\r\nHost: gw.test\r\n\r\n");
        let reply = client::raw_to_close(kg.proxy, request.as_bytes(), WAIT).await;
        assert!(
            reply.ended == "closed" || reply.ended.starts_with("read error"),
            "{target}: keygate must close the connection, not leave it hanging\n{reply}"
        );
        assert!(
            reply.responses().is_empty(),
            "{target}: the client got a response that looks complete\n{reply}"
        );
        if !reply.bytes.is_empty() {
            assert!(
                reply.bytes.starts_with(b"HTTP/1.1 200 "),
                "{target}\n{reply}"
            );
        }

        // HTTP/2: the body read must fail.
        let body = h2c_body(kg.proxy, target).await;
        assert!(
            body.is_err(),
            "{target}: over HTTP/2 the truncated body read as complete: {:?}",
            body.map(|b| b.len())
        );
    }
}

/// Sends `GET target` over h2c and reads the whole body.
async fn h2c_body(addr: SocketAddr, target: &str) -> Result<Bytes, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://gw.test{target}"))
            .body(client::full(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no end within {WAIT:?}")))
}

/// An upstream that goes away and comes back on the same address: 502 while
/// it is down, served again as soon as it is back, with no restart of
/// keygate and no stale pooled connection answering 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_then_up_recovers_at_once() {
    let up = Upstream::named("flapping").await;
    // The route points at a port the test opens and closes: a relay to `up`.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("probe port")
        .local_addr()
        .expect("addr");
    let kg = Keygate::builder()
        .route(&route("flap", "/flap/", port, ""))
        .start()
        .await;

    for cycle in 0..2 {
        // Down.
        for _ in 0..3 {
            kg.send(Req::get("/flap/down"))
                .await
                .assert_problem(502, "upstream_unavailable");
        }
        // Up: a relay on the route's address.
        let relay = Relay::start(port, up.addr()).await;
        let started = Instant::now();
        for i in 0..20 {
            let resp = kg.send(Req::get(&format!("/flap/up/{i}"))).await;
            assert_eq!(
                resp.status, 200,
                "cycle {cycle}: request {i} after the upstream came back\n{resp}"
            );
        }
        println!(
            "cycle {cycle}: 20/20 served within {:?} of the upstream coming back",
            started.elapsed()
        );
        // Down again: the relay and its connections go away.
        relay.stop().await;
    }
    kg.send(Req::get("/flap/gone"))
        .await
        .assert_problem(502, "upstream_unavailable");
}

/// A TCP relay from `listen` to `to`, standing in for an upstream process
/// that starts and stops on a fixed address.
struct Relay {
    accept: JoinHandle<()>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    async fn start(listen: SocketAddr, to: SocketAddr) -> Relay {
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(listen).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("relay bind {listen}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("relay bind {listen}: {e}"),
            }
        };
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let list = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    match TcpStream::connect(to).await {
                        Ok(mut outbound) => {
                            // Ends when either side closes; resets are expected.
                            if let Err(e) =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await
                            {
                                eprintln!("relay: {e}");
                            }
                        }
                        Err(e) => eprintln!("relay: connect {to}: {e}"),
                    }
                });
                list.lock().expect("relay list").push(task);
            }
        });
        Relay { accept, conns }
    }

    /// Stops listening and closes every relayed connection.
    async fn stop(self) {
        self.accept.abort();
        if let Err(e) = self.accept.await
            && !e.is_cancelled()
        {
            panic!("relay accept loop failed: {e}");
        }
        for t in self.conns.lock().expect("relay list").drain(..) {
            t.abort();
        }
    }
}
