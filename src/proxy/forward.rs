//! The forwarding stage and the upstream connections.
//!
//! Plain-HTTP upstreams (the common case: a sidecar or a service on the same
//! network) go through a [`Pool`] of HTTP/1.1 connections, kept per runtime
//! in a small LIFO list per upstream, checked out without hashing or
//! allocation and handed back when the response body has been streamed to
//! the end. Requests without a body, as keygate's own HTTP/1 path reads them,
//! use keygate's own client connections ([`super::client`]); requests with a
//! body use hyper's. HTTPS upstreams go through hyper-util's pooled client
//! (rustls with the webpki roots, h2 by ALPN).
//!
//! A pooled connection the upstream closed while it sat idle is noticed on
//! checkout or, in the race where it closes just then, when the request's
//! first write fails (or hyper hands the request back unsent): it is then
//! sent once on a new connection. A request that may have reached the
//! upstream is never sent twice.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Sleep;

use super::body::{LimitedBody, UpstreamBody};
use super::client::{self, Conn};
use super::headers::Added;
use super::route::{Route, RouteTable};
use crate::config::LimitsConfig;
use crate::error::GatewayError;

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, LimitedBody>;

/// How one runtime reaches the upstreams.
pub struct Upstreams {
    /// hyper's connections, for requests with a body.
    pool: Arc<Pool<SendRequest<LimitedBody>>>,
    /// keygate's own, for requests without one.
    own: Option<Arc<Pool<Conn>>>,
    https: HttpsClient,
    connect_timeout: Duration,
}

impl Upstreams {
    pub fn new(limits: &LimitsConfig) -> Upstreams {
        let (max_idle, idle_timeout) = (
            limits.upstream_pool_max_idle_per_host,
            limits.upstream_pool_idle_timeout,
        );
        // `KEYGATE_H1_CLIENT=0` sends every request through hyper's client,
        // to compare the two.
        let off = std::env::var("KEYGATE_H1_CLIENT").is_ok_and(|v| v == "0" || v == "off");
        Upstreams {
            pool: Arc::new(Pool::new(max_idle, idle_timeout)),
            own: (!off).then(|| Arc::new(Pool::new(max_idle, idle_timeout))),
            https: build_https_client(limits),
            connect_timeout: limits.upstream_connect_timeout,
        }
    }

    /// Sends `req` (origin-form URI) with the fields keygate sets on it
    /// (`added`) to `route`'s upstream and waits up to the route's timeout for
    /// the response head, on `timer` (see [`super::Gateway::handle`]).
    pub async fn forward(
        &self,
        mut req: Request<LimitedBody>,
        added: Added,
        route: &Route,
        table: &RouteTable,
        mut timer: Pin<&mut Sleep>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let sent = async {
            if let Some(own) = &self.own
                && route.upstream_scheme == http::uri::Scheme::HTTP
                && req.body().is_from_own_path()
            {
                return self.send_own(own, req, &added, route, table).await;
            }
            added.apply(req.headers_mut());
            if route.upstream_scheme != http::uri::Scheme::HTTP {
                return self.send_https(req, route).await;
            }
            self.send_pooled(req, route, table).await
        };
        // Moving a registered timer later is one atomic operation; the
        // timer wheel is locked only when the timer is new, has fired, or
        // moves earlier (a route with a shorter timeout).
        timer
            .as_mut()
            .reset(tokio::time::Instant::now() + route.config.timeout);
        tokio::select! {
            biased;
            answer = sent => answer,
            () = timer => Err(GatewayError::UpstreamTimeout),
        }
    }

    /// A bodiless request on keygate's own client connection.
    async fn send_own(
        &self,
        pool: &Arc<Pool<Conn>>,
        req: Request<LimitedBody>,
        added: &Added,
        route: &Route,
        table: &RouteTable,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let key = pool_key(route, table);
        let (parts, _) = req.into_parts();
        let written = |e: std::io::Error| {
            tracing::debug!(error = %e, "upstream write failed");
            GatewayError::UpstreamUnavailable
        };
        let pooled = match pool.checkout(key) {
            Some(mut conn) => conn
                .write_request(&parts, added)
                .await
                .map_err(written)?
                .then_some(conn),
            None => None,
        };
        let mut conn = match pooled {
            Some(conn) => conn,
            // None pooled, or it broke before a byte was written.
            None => {
                let mut conn = Conn::connect(&route.upstream_addr, self.connect_timeout).await?;
                if !conn.write_request(&parts, added).await.map_err(written)? {
                    return Err(GatewayError::UpstreamUnavailable);
                }
                conn
            }
        };
        let head = conn.read_head(&parts.method).await?;
        let lease = Lease {
            pool: pool.clone(),
            key,
            conn,
        };
        Ok(head.into_response(lease).map(UpstreamBody::Own))
    }

    async fn send_pooled(
        &self,
        mut req: Request<LimitedBody>,
        route: &Route,
        table: &RouteTable,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let key = pool_key(route, table);
        if let Some(mut sender) = self.pool.checkout(key) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lease(resp, sender, key)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed under us; use a new one.
                    Some(unsent) => req = unsent,
                    None => return Err(upstream_failed(e.error())),
                },
            }
        }
        let mut sender = self.connect(&route.upstream_addr).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| upstream_failed(&e))?;
        Ok(self.lease(resp, sender, key))
    }

    fn lease(
        &self,
        resp: Response<Incoming>,
        sender: SendRequest<LimitedBody>,
        key: PoolKey,
    ) -> Response<UpstreamBody> {
        let lease = Lease {
            pool: self.pool.clone(),
            key,
            conn: sender,
        };
        resp.map(|body| UpstreamBody::hyper(body, Some(lease)))
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<LimitedBody>, GatewayError> {
        let stream = client::connect_tcp(addr, self.connect_timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| upstream_failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn send_https(
        &self,
        mut req: Request<LimitedBody>,
        route: &Route,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        // hyper-util's client wants the absolute form.
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(route.upstream_scheme.clone());
        parts.authority = Some(route.upstream_authority.clone());
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| GatewayError::BadPath)?;
        match self.https.request(req).await {
            Ok(resp) => Ok(resp.map(|body| UpstreamBody::hyper(body, None))),
            Err(e) => {
                tracing::debug!(error = %e, connect = e.is_connect(), "upstream request failed");
                Err(GatewayError::UpstreamUnavailable)
            }
        }
    }
}

fn upstream_failed(e: &hyper::Error) -> GatewayError {
    tracing::debug!(error = %e, "upstream request failed");
    GatewayError::UpstreamUnavailable
}

fn build_https_client(limits: &LimitsConfig) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(limits.upstream_connect_timeout));
    http.set_keepalive(Some(client::TCP_KEEPALIVE));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(limits.upstream_pool_idle_timeout)
        .pool_max_idle_per_host(limits.upstream_pool_max_idle_per_host)
        .build(https)
}

/// Which list a connection belongs to: the route table it was opened under
/// (a reload renumbers the slots) and its upstream's slot in that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolKey {
    generation: u64,
    slot: usize,
    slots: usize,
}

fn pool_key(route: &Route, table: &RouteTable) -> PoolKey {
    PoolKey {
        generation: table.generation(),
        slot: route.upstream_slot,
        slots: table.upstream_count(),
    }
}

/// A connection a [`Pool`] can keep.
pub trait Pooled {
    /// Whether it can carry a request now (checked at checkout).
    fn ready(&self) -> bool;
    /// Whether it is known to be closed (checked at checkin).
    fn closed(&self) -> bool;
}

impl Pooled for SendRequest<LimitedBody> {
    fn ready(&self) -> bool {
        self.is_ready()
    }

    fn closed(&self) -> bool {
        self.is_closed()
    }
}

impl Pooled for Conn {
    fn ready(&self) -> bool {
        self.usable()
    }

    fn closed(&self) -> bool {
        false // found out at checkout, without a system call here
    }
}

/// Idle HTTP/1.1 connections per upstream, most recently used last.
pub struct Pool<C> {
    state: Mutex<PoolState<C>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct PoolState<C> {
    generation: u64,
    idle: Vec<Vec<Idle<C>>>,
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C: Pooled> Pool<C> {
    fn new(max_idle: usize, idle_timeout: Duration) -> Pool<C> {
        Pool {
            state: Mutex::new(PoolState {
                generation: 0,
                idle: Vec::new(),
            }),
            max_idle,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState<C>> {
        // The lists hold no invariant a panic could break.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used live, ready connection to `key`'s upstream.
    fn checkout(&self, key: PoolKey) -> Option<C> {
        let mut state = self.lock();
        if state.generation != key.generation {
            return None;
        }
        let list = state.idle.get_mut(key.slot)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < self.idle_timeout && idle.conn.ready() {
                return Some(idle.conn);
            }
            // Closed, expired, or (rarely) not yet done with its last
            // exchange: drop it rather than wait.
        }
        None
    }

    /// Takes a connection back after its response was read to the end.
    fn checkin(&self, key: PoolKey, conn: C) {
        if conn.closed() || self.max_idle == 0 {
            return;
        }
        let mut state = self.lock();
        if state.generation != key.generation {
            if state.generation > key.generation {
                return; // opened under an older route table
            }
            state.generation = key.generation;
            state.idle.clear();
        }
        if state.idle.len() < key.slots {
            state.idle.resize_with(key.slots, Vec::new);
        }
        let list = &mut state.idle[key.slot];
        if list.len() >= self.max_idle {
            // Full: the least recently used connection goes.
            list.remove(0);
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// A connection lent to one response; back to the pool when its body ends.
pub struct Lease<C> {
    pool: Arc<Pool<C>>,
    key: PoolKey,
    conn: C,
}

impl<C: Pooled> Lease<C> {
    pub fn release(self) {
        self.pool.checkin(self.key, self.conn);
    }

    pub fn conn(&self) -> &C {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut C {
        &mut self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PathMatch, RouteAuth, RouteConfig};
    use crate::proxy::body::ClientBody;
    use http::Method;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// A request's own timer, as `Gateway::handle`'s callers pass it.
    macro_rules! timer {
        () => {
            std::pin::pin!(tokio::time::sleep(Duration::ZERO))
        };
    }

    /// A raw HTTP/1.1 upstream answering `ok` to every request; counts the
    /// connections it accepted and, with `close_after_answer`, hangs up after
    /// each answer (as an upstream whose keep-alive timeout passed would).
    async fn upstream(close_after_answer: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        scripted(vec![(OK, close_after_answer)]).await
    }

    /// A raw upstream that answers the n-th request head it reads (over all
    /// connections) with `answers[n % len]` as given, and hangs up after it
    /// when its flag says so.
    async fn scripted(
        answers: Vec<(&'static [u8], bool)>,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let answered = Arc::new(AtomicUsize::new(0));
        let answers = Arc::new(answers);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let (answers, answered) = (answers.clone(), answered.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let i = answered.fetch_add(1, Ordering::SeqCst);
                            let (answer, close) = answers[i % answers.len()];
                            if s.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn table(addr: std::net::SocketAddr) -> RouteTable {
        routes(addr, &[("/", Duration::from_secs(5))])
    }

    /// Routes by path prefix, with their timeouts, all to `addr`.
    fn routes(addr: std::net::SocketAddr, prefixes: &[(&str, Duration)]) -> RouteTable {
        let routes: Vec<RouteConfig> = prefixes
            .iter()
            .map(|&(prefix, timeout)| RouteConfig {
                name: format!("r{prefix}"),
                host: None,
                path: PathMatch::Prefix(prefix.into()),
                upstream: format!("http://{addr}").parse().unwrap(),
                scopes: vec![],
                rate_limit: None,
                timeout,
                max_body: 1024,
                auth: RouteAuth::None,
            })
            .collect();
        RouteTable::new(&routes)
    }

    /// A bodiless GET, as keygate's own HTTP/1 path hands it over.
    async fn get(up: &Upstreams, table: &RouteTable) -> Result<String, GatewayError> {
        let (_, body) = send(up, table, Method::GET).await?;
        Ok(body.unwrap())
    }

    /// `method /x` without a body, as keygate's own HTTP/1 path hands it over.
    fn bodiless(method: Method) -> Request<LimitedBody> {
        let (body, _) = LimitedBody::new(ClientBody::Empty, 1024);
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = Uri::from_static("/x");
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        req
    }

    /// A bodiless GET of `/x` on `timer`, as keygate's own HTTP/1 path
    /// hands it over.
    async fn forward_get(
        up: &Upstreams,
        table: &RouteTable,
        timer: Pin<&mut Sleep>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        forward_get_on(up, table, "/x", timer).await
    }

    /// The same on the route for `path`.
    async fn forward_get_on(
        up: &Upstreams,
        table: &RouteTable,
        path: &str,
        timer: Pin<&mut Sleep>,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let route = table.find(None, path).unwrap();
        up.forward(bodiless(Method::GET), Added::default(), route, table, timer)
            .await
    }

    /// A bodiless request: the answer's status and its body, or how the
    /// body broke.
    async fn send(
        up: &Upstreams,
        table: &RouteTable,
        method: Method,
    ) -> Result<(http::StatusCode, Result<String, String>), GatewayError> {
        let route = table.find(None, "/x").unwrap();
        let resp = up
            .forward(bodiless(method), Added::default(), route, table, timer!())
            .await?;
        let status = resp.status();
        let body = match resp.into_body().collect().await {
            Ok(b) => Ok(String::from_utf8(b.to_bytes().to_vec()).unwrap()),
            Err(e) => Err(e.to_string()),
        };
        Ok((status, body))
    }

    fn upstreams() -> Upstreams {
        Upstreams::new(&LimitsConfig::default())
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = upstream(false).await;
        let (up, table) = (upstreams(), table(addr));
        for _ in 0..10 {
            assert_eq!(get(&up, &table).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A reload renumbers the slots: connections from the old table are
        // not mixed into the new one's lists.
        let reloaded = self::table(addr);
        assert_eq!(get(&up, &reloaded).await.unwrap(), "ok");
        assert_eq!(get(&up, &reloaded).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        let (addr, accepted) = upstream(true).await;
        let (up, table) = (upstreams(), table(addr));
        for i in 1..=5 {
            assert_eq!(get(&up, &table).await.unwrap(), "ok");
            // Let the connection task see the hang-up before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
    }

    #[tokio::test]
    async fn one_timer_times_each_request_in_turn() {
        // The third answer never comes: that request times out, on the same
        // timer the others ran on and without delaying them.
        let mut answers = vec![(OK, false); 6];
        answers[2] = (b"", false);
        let (addr, accepted) = scripted(answers).await;
        let up = upstreams();
        let short = Duration::from_millis(300);
        let table = routes(addr, &[("/", short), ("/long", Duration::from_secs(5))]);
        let mut timer = timer!();
        let send = async |path: &str, timer: Pin<&mut Sleep>| {
            let started = Instant::now();
            let sent = forward_get_on(&up, &table, path, timer).await;
            let body = match sent {
                Ok(resp) => Ok(resp.into_body().collect().await.unwrap().to_bytes()),
                Err(e) => Err(e),
            };
            (body, started.elapsed())
        };
        let (first, took) = send("/x", timer.as_mut()).await;
        assert_eq!(first.unwrap(), "ok");
        assert!(took < short, "{took:?}");
        // Longer apart than the timeout: the timer fires for an exchange
        // that already ended, and must not count against the next one.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let (second, took) = send("/long", timer.as_mut()).await;
        assert_eq!(second.unwrap(), "ok");
        assert!(took < short, "{took:?}");
        // Moved to an earlier deadline than the long route's last one.
        let (third, took) = send("/x", timer.as_mut()).await;
        assert!(
            matches!(third, Err(GatewayError::UpstreamTimeout)),
            "{third:?}"
        );
        assert!(
            took >= short - Duration::from_millis(10) && took < Duration::from_millis(1300),
            "timed out after {took:?}"
        );
        for _ in 0..3 {
            let (next, took) = send("/x", timer.as_mut()).await;
            assert_eq!(next.unwrap(), "ok");
            assert!(took < short, "{took:?}");
        }
        // The connection that timed out was not reused.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_upstream_is_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (up, table) = (upstreams(), table(addr));
        assert!(matches!(
            get(&up, &table).await,
            Err(GatewayError::UpstreamUnavailable)
        ));
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_chunked_bodies_decoded() {
        let chunked: &[u8] =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            3;x=y\r\nabc\r\n2\r\nde\r\n0\r\ntrailer: 1\r\n\r\n";
        let (addr, accepted) = scripted(vec![(chunked, false), (OK, false)]).await;
        let (up, table) = (upstreams(), table(addr));
        let (status, body) = send(&up, &table, Method::GET).await.unwrap();
        assert_eq!((status.as_u16(), body.unwrap().as_str()), (200, "abcde"));
        // Read to its end, the connection carries the next request.
        assert_eq!(get(&up, &table).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bodiless_answers_keep_the_connection() {
        let no_content: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
        let head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        let (addr, accepted) =
            scripted(vec![(no_content, false), (head, false), (OK, false)]).await;
        let (up, table) = (upstreams(), table(addr));
        let (status, body) = send(&up, &table, Method::GET).await.unwrap();
        assert_eq!((status.as_u16(), body.unwrap().as_str()), (204, ""));
        let (status, body) = send(&up, &table, Method::HEAD).await.unwrap();
        assert_eq!((status.as_u16(), body.unwrap().as_str()), (200, ""));
        assert_eq!(get(&up, &table).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn answers_that_end_their_connection_are_not_reused() {
        let close: &[u8] = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na";
        let old: &[u8] = b"HTTP/1.0 200 OK\r\n\r\nuntil close";
        // More bytes than the length says: nothing after it can be trusted.
        let extra: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n";
        let (addr, accepted) = scripted(vec![
            (close, false),
            (old, true),
            (extra, false),
            (OK, false),
        ])
        .await;
        let (up, table) = (upstreams(), table(addr));
        assert_eq!(get(&up, &table).await.unwrap(), "a");
        assert_eq!(get(&up, &table).await.unwrap(), "until close");
        assert_eq!(get(&up, &table).await.unwrap(), "ok");
        assert_eq!(get(&up, &table).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn malformed_answers_are_unavailable_and_cut_bodies_broken() {
        for bad in [
            &b"HTTP/1.1 2000 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"garbage\r\n\r\n",
            b"",
        ] {
            let (addr, _) = scripted(vec![(bad, true)]).await;
            let (up, table) = (upstreams(), table(addr));
            let sent = send(&up, &table, Method::GET).await;
            assert!(
                matches!(sent, Err(GatewayError::UpstreamUnavailable)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for cut in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let (addr, _) = scripted(vec![(cut, true)]).await;
            let (up, table) = (upstreams(), table(addr));
            let (_, body) = send(&up, &table, Method::GET).await.unwrap();
            assert!(body.is_err(), "{:?}", String::from_utf8_lossy(cut));
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let big: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nstart";
        let (addr, accepted) = scripted(vec![(big, false), (OK, false)]).await;
        let (up, table) = (upstreams(), table(addr));
        let resp = forward_get(&up, &table, timer!()).await;
        drop(resp.unwrap());
        assert_eq!(get(&up, &table).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_field_naming_others_puts_the_fields_in_the_map() {
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: x-up\r\nX-Up: 1\r\nX-Kept: 2\r\n\
            Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (addr, _) = scripted(vec![(answer, false)]).await;
        let (up, table) = (upstreams(), table(addr));
        let resp = forward_get(&up, &table, timer!()).await.unwrap();
        let (parts, mut body) = resp.into_parts();
        assert!(body.take_raw_fields().is_none());
        let names: Vec<&str> = parts.headers.keys().map(|k| k.as_str()).collect();
        // strip_hop_by_hop removes `connection` and `x-up` on the way out;
        // the length is overridden by the chunked coding, which is this hop's.
        assert_eq!(names, ["connection", "x-up", "x-kept"]);
    }

    #[tokio::test]
    async fn each_answer_on_a_connection_has_its_own_fields() {
        let a: &[u8] = b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 0\r\n\r\n";
        let b: &[u8] = b"HTTP/1.1 200 OK\r\nX-B: 2\r\nContent-Length: 0\r\nx-c: 3\r\n\r\n";
        let (addr, accepted) = scripted(vec![(a, false), (b, false)]).await;
        let (up, table) = (upstreams(), table(addr));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let resp = forward_get(&up, &table, timer!()).await;
            let (mut parts, mut body) = resp.unwrap().into_parts();
            if let Some(raw) = body.take_raw_fields() {
                raw.into_map(&mut parts.headers);
            }
            let mut fields: Vec<String> = parts
                .headers
                .iter()
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                .collect();
            fields.sort();
            seen.push(fields.join(" "));
        }
        // The length is framing: the writer of the answer states it from
        // the body.
        let expected = ["x-a=1", "x-b=2 x-c=3"];
        assert_eq!(seen, [expected[0], expected[1], expected[0], expected[1]]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
