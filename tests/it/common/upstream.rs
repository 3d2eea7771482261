//! A real upstream for keygate to proxy to: a hyper server (HTTP/1.1 and h2c)
//! on `127.0.0.1:0`, spawned on the test's runtime.
//!
//! By default it echoes what it received as JSON ([`Echo`]): its name, the
//! method, path, query, version, every header in order, and the body length,
//! which it counts while streaming (it never holds a body). The last path
//! segments pick other behaviours, so any route prefix may come first:
//!
//! | path ends in | behaviour |
//! |---|---|
//! | `/stall` | accepts the request and never answers |
//! | `/slow/<ms>` | echoes after `<ms>` milliseconds |
//! | `/reset` | resets the TCP connection (RST) without answering |
//! | `/download/<bytes>` | streams `<bytes>` bytes in 64 KiB chunks (Content-Length set) |
//! | `/chunked/<bytes>` | the same in 1000-byte chunks without a length (sent chunked) |
//! | `/hop` | echoes, with hop-by-hop headers on the response |
//!
//! It counts requests as they arrive ([`Upstream::hits`]) and records each
//! echoed request once its body has ended ([`Upstream::seen`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::client::{RepeatBody, ReqBody, full};

/// One request the echo handler finished reading.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query exactly as received.
    pub target: String,
    pub body_bytes: u64,
    /// Set when the body ended with an error (the client aborted it).
    pub body_error: Option<String>,
}

struct State {
    name: String,
    hits: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    changed: Notify,
}

/// A running upstream; stops accepting when dropped.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Upstream {
    /// Starts an upstream called `upstream`.
    pub async fn start() -> Upstream {
        Upstream::named("upstream").await
    }

    /// Starts an upstream whose echoes carry `name` (to tell routes apart).
    pub async fn named(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test upstream");
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(State {
            name: name.to_owned(),
            hits: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            changed: Notify::new(),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Upstream {
            addr,
            state,
            accept,
        }
    }

    /// An address where nothing listens, so a connection to it is refused.
    ///
    /// The port stays bound (without `listen`, and without `SO_REUSEADDR`)
    /// until the test process ends: a port that was bound and closed again
    /// can be handed to the next listener on `127.0.0.1:0`, such as another
    /// test's gateway, which then answers in the dead upstream's place.
    pub fn refused() -> SocketAddr {
        static HELD: Mutex<Vec<socket2::Socket>> = Mutex::new(Vec::new());
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("create a probe socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
        socket.bind(&any.into()).expect("bind a probe port");
        let addr = socket
            .local_addr()
            .expect("probe address")
            .as_socket()
            .expect("an IP address");
        HELD.lock().expect("held ports lock").push(socket);
        addr
    }

    /// `http://` and a [`Upstream::refused`] address, for a route's
    /// `upstream:` that nothing answers.
    pub fn refused_url() -> String {
        format!("http://{}", Upstream::refused())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for a route's `upstream:`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests that arrived (counted before their body is read).
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Requests echoed so far, with their body outcome.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen lock").clone()
    }

    /// Waits until `hits() >= n` or panics after `timeout`.
    pub async fn wait_hits(&self, n: u64, timeout: Duration) {
        self.wait_until(timeout, || self.hits() >= n, &format!("{n} hits"))
            .await;
    }

    /// Waits until `seen().len() >= n` and returns them, or panics after `timeout`.
    pub async fn wait_seen(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        self.wait_until(
            timeout,
            || self.seen().len() >= n,
            &format!("{n} finished requests"),
        )
        .await;
        self.seen()
    }

    async fn wait_until(&self, timeout: Duration, cond: impl Fn() -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a change in between is not missed.
            let changed = self.state.changed.notified();
            if cond() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "upstream {:?}: waited {timeout:?} for {what}; hits {}, seen {:?}",
                    self.state.name,
                    self.hits(),
                    self.seen()
                );
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("test upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, state.clone()));
    }
}

/// Serves one connection; `/reset` makes it end with an RST instead.
async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>) {
    // A second handle on the socket, to set SO_LINGER=0 (RST on close) from
    // outside hyper, which owns the stream.
    let std_stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => return eprintln!("test upstream: into_std: {e}"),
    };
    let handle = match std_stream.try_clone() {
        Ok(h) => h,
        Err(e) => return eprintln!("test upstream: dup socket: {e}"),
    };
    let stream = match tokio::net::TcpStream::from_std(std_stream) {
        Ok(s) => s,
        Err(e) => return eprintln!("test upstream: from_std: {e}"),
    };
    let reset = Arc::new(Notify::new());
    let service = {
        let reset = reset.clone();
        service_fn(move |req| handle_request(req, state.clone(), reset.clone()))
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Roomier than keygate's limits, so keygate's own limits are what tests see.
    builder.http1().max_headers(1000).max_buf_size(1 << 20);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        served = conn => {
            if let Err(e) = served {
                eprintln!("test upstream: connection ended: {e}");
            }
        }
        _ = reset.notified() => {
            if let Err(e) = socket2::SockRef::from(&handle).set_linger(Some(Duration::ZERO)) {
                eprintln!("test upstream: set_linger: {e}");
            }
            // Dropping the connection and the handle closes the socket: RST.
        }
    }
}

async fn handle_request(
    req: Request<Incoming>,
    state: Arc<State>,
    reset: Arc<Notify>,
) -> Result<Response<ReqBody>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    state.changed.notify_waiters();
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.rsplit('/').take(2).collect();
    let (last, before) = (
        segments.first().copied().unwrap_or(""),
        segments.get(1).copied(),
    );
    match (before, last.parse::<u64>().ok()) {
        (Some("slow"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return Ok(echo(req, &state, false).await);
        }
        (Some(how @ ("download" | "chunked")), Some(n)) => {
            let body = match how {
                "download" => RepeatBody::new(64 * 1024, n, true),
                _ => RepeatBody::new(1000, n, false),
            };
            let mut resp = Response::new(body.boxed());
            resp.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/octet-stream"),
            );
            return Ok(resp);
        }
        _ => {}
    }
    match last {
        "stall" => std::future::pending().await,
        "reset" => {
            reset.notify_one();
            std::future::pending().await
        }
        "hop" => Ok(echo(req, &state, true).await),
        _ => Ok(echo(req, &state, false).await),
    }
}

/// Reads the body to its end (counting, not keeping it) and answers with the
/// request as JSON. With `hop`, adds hop-by-hop headers to the response.
async fn echo(req: Request<Incoming>, state: &State, hop: bool) -> Response<ReqBody> {
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_owned(), |pq| pq.as_str().to_owned());
    state.seen.lock().expect("seen lock").push(Seen {
        method: parts.method.to_string(),
        target,
        body_bytes,
        body_error: body_error.clone(),
    });
    state.changed.notify_waiters();
    let headers: Vec<serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| serde_json::json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let json = serde_json::json!({
        "upstream": state.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
        "body_error": body_error,
    });
    let mut resp = Response::new(full(json.to_string()));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    if hop {
        for (k, v) in [
            ("connection", "x-up-secret"),
            ("x-up-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"up\""),
            ("proxy-connection", "keep-alive"),
            ("x-up-kept", "yes"),
        ] {
            h.insert(k, http::HeaderValue::from_static(v));
        }
    }
    resp
}

/// The echo of a request as the upstream received it.
pub struct Echo {
    pub json: serde_json::Value,
    /// The whole exchange, for failure messages.
    context: String,
}

impl Echo {
    pub fn new(json: serde_json::Value, context: String) -> Echo {
        Echo { json, context }
    }

    /// The upstream that answered (its [`Upstream::named`] name).
    pub fn upstream(&self) -> &str {
        self.json["upstream"].as_str().unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.json["method"].as_str().unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.json["path"].as_str().unwrap_or_default()
    }

    pub fn query(&self) -> Option<&str> {
        self.json["query"].as_str()
    }

    pub fn version(&self) -> &str {
        self.json["version"].as_str().unwrap_or_default()
    }

    pub fn body_bytes(&self) -> u64 {
        self.json["body_bytes"].as_u64().unwrap_or(u64::MAX)
    }

    pub fn body_error(&self) -> Option<&str> {
        self.json["body_error"].as_str()
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.json["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pair| {
                pair[0]
                    .as_str()
                    .is_some_and(|k| k.eq_ignore_ascii_case(name))
            })
            .map(|pair| pair[1].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The single value of header `name`; panics if it was sent more than once.
    #[track_caller]
    pub fn header(&self, name: &str) -> Option<String> {
        let mut values = self.header_values(name);
        assert!(
            values.len() <= 1,
            "upstream got {name} {} times\n{self}",
            values.len()
        );
        values.pop()
    }

    /// Asserts the upstream received `name` with exactly `value`.
    #[track_caller]
    pub fn assert_header(&self, name: &str, value: &str) {
        assert_eq!(
            self.header(name).as_deref(),
            Some(value),
            "upstream header {name}\n{self}"
        );
    }

    /// Asserts the upstream did not receive `name`.
    #[track_caller]
    pub fn assert_no_header(&self, name: &str) {
        let got = self.header_values(name);
        assert!(
            got.is_empty(),
            "upstream must not receive {name}, got {got:?}\n{self}"
        );
    }
}

impl std::fmt::Display for Echo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context)
    }
}
