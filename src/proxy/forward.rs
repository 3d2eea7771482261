//! The forwarding stage and the upstream connections.
//!
//! Plain-HTTP upstreams (the common case: a sidecar or a service on the same
//! network) go through [`Pool`]: hyper's HTTP/1.1 client connections, kept
//! per runtime in a small LIFO list per upstream, checked out without hashing
//! or allocation and handed back when the response body has been streamed to
//! the end. HTTPS upstreams go through hyper-util's pooled client (rustls with
//! the webpki roots, h2 by ALPN).
//!
//! A pooled connection the upstream closed while it sat idle is noticed on
//! checkout (`is_closed`) or, in the race where it closes just then, by hyper
//! handing the request back unsent: it is then sent once on a new connection.
//! A request that may have reached the upstream is never sent twice.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{LimitedBody, UpstreamBody};
use super::route::{Route, RouteTable};
use crate::config::LimitsConfig;
use crate::error::GatewayError;

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, LimitedBody>;

/// TCP keep-alive probes on upstream connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How one runtime reaches the upstreams.
pub struct Upstreams {
    pool: Arc<Pool>,
    https: HttpsClient,
    connect_timeout: Duration,
}

impl Upstreams {
    pub fn new(limits: &LimitsConfig) -> Upstreams {
        Upstreams {
            pool: Arc::new(Pool::new(
                limits.upstream_pool_max_idle_per_host,
                limits.upstream_pool_idle_timeout,
            )),
            https: build_https_client(limits),
            connect_timeout: limits.upstream_connect_timeout,
        }
    }

    /// Sends `req` (origin-form URI) to `route`'s upstream and waits up to the
    /// route's timeout for the response head.
    pub async fn forward(
        &self,
        req: Request<LimitedBody>,
        route: &Route,
        table: &RouteTable,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let sent = async {
            if route.upstream_scheme == http::uri::Scheme::HTTP {
                self.send_pooled(req, route, table).await
            } else {
                self.send_https(req, route).await
            }
        };
        match tokio::time::timeout(route.config.timeout, sent).await {
            Err(_) => Err(GatewayError::UpstreamTimeout),
            Ok(answer) => answer,
        }
    }

    async fn send_pooled(
        &self,
        mut req: Request<LimitedBody>,
        route: &Route,
        table: &RouteTable,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let key = PoolKey {
            generation: table.generation(),
            slot: route.upstream_slot,
            slots: table.upstream_count(),
        };
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
            sender,
        };
        resp.map(|body| UpstreamBody::new(body, Some(lease)))
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<LimitedBody>, GatewayError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, upstream = addr, "upstream connect failed");
                    return Err(GatewayError::UpstreamUnavailable);
                }
                Err(_) => {
                    tracing::debug!(upstream = addr, "upstream connect timed out");
                    return Err(GatewayError::UpstreamUnavailable);
                }
            };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
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
            Ok(resp) => Ok(resp.map(|body| UpstreamBody::new(body, None))),
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
    http.set_keepalive(Some(TCP_KEEPALIVE));
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

/// Idle HTTP/1.1 connections per upstream, most recently used last.
pub struct Pool {
    state: Mutex<PoolState>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct PoolState {
    generation: u64,
    idle: Vec<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<LimitedBody>,
    since: Instant,
}

impl Pool {
    fn new(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool {
            state: Mutex::new(PoolState::default()),
            max_idle,
            idle_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // The lists hold no invariant a panic could break.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used live, ready connection to `key`'s upstream.
    fn checkout(&self, key: PoolKey) -> Option<SendRequest<LimitedBody>> {
        let mut state = self.lock();
        if state.generation != key.generation {
            return None;
        }
        let list = state.idle.get_mut(key.slot)?;
        while let Some(idle) = list.pop() {
            if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                return Some(idle.sender);
            }
            // Closed, expired, or (rarely) not yet done with its last
            // exchange: drop it rather than wait.
        }
        None
    }

    /// Takes a connection back after its response was read to the end.
    fn checkin(&self, key: PoolKey, sender: SendRequest<LimitedBody>) {
        if sender.is_closed() || self.max_idle == 0 {
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
            sender,
            since: Instant::now(),
        });
    }
}

/// A connection lent to one response; back to the pool when its body ends.
pub struct Lease {
    pool: Arc<Pool>,
    key: PoolKey,
    sender: SendRequest<LimitedBody>,
}

impl Lease {
    pub fn release(self) {
        self.pool.checkin(self.key, self.sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PathMatch, RouteAuth, RouteConfig};
    use crate::proxy::body::ClientBody;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A raw HTTP/1.1 upstream answering `ok` to every request; counts the
    /// connections it accepted and, with `close_after_answer`, hangs up after
    /// each answer (as an upstream whose keep-alive timeout passed would).
    async fn upstream(close_after_answer: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
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
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() || close_after_answer {
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
        RouteTable::new(&[RouteConfig {
            name: "r".into(),
            host: None,
            path: PathMatch::Prefix("/".into()),
            upstream: format!("http://{addr}").parse().unwrap(),
            scopes: vec![],
            rate_limit: None,
            timeout: Duration::from_secs(5),
            max_body: 1024,
            auth: RouteAuth::None,
        }])
    }

    /// A bodiless GET, as keygate's own HTTP/1 path hands it over.
    async fn get(up: &Upstreams, table: &RouteTable) -> Result<String, GatewayError> {
        let (body, _) = LimitedBody::new(ClientBody::Empty, 1024);
        let mut req = Request::get("/x").body(body).unwrap();
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("up"));
        let route = table.find(None, "/x").unwrap();
        let resp = up.forward(req, route, table).await?;
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8(bytes.to_vec()).unwrap())
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
}
