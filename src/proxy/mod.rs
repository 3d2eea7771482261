//! The data plane: one request, start to finish.
//!
//! [`Gateway::handle`] runs the stages of DESIGN.md section 8 in order, each a
//! small function returning `Result<_, GatewayError>`; the first error becomes
//! the answer through [`GatewayError::to_problem`], the only place that picks a
//! status code. Listening, TLS and connection handling live in [`listener`].

pub mod body;
pub mod client;
pub mod forward;
pub mod framing;
pub mod h1;
pub mod headers;
pub mod listener;
pub mod route;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use tokio::time::Sleep;

use crate::auth::{self, Authenticator, Principal};
use crate::config::{Config, RouteAuth};
use crate::error::GatewayError;
use crate::lifecycle::usage::{Outcome, UsageRecorder};
use crate::ratelimit::{self, RateHeaders, RateLimits};
use crate::telemetry::request::{Done, Exchange, RequestTelemetry};
use body::{ClientBody, LimitedBody, ProxyBody};
use headers::{Added, X_REQUEST_ID};
use route::{Route, RouteTable};

/// The config as the data plane uses it: validated and compiled.
pub struct Compiled {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    /// The record stage's switches and per-route metric handles.
    pub telemetry: RequestTelemetry,
}

impl Compiled {
    pub fn new(config: Arc<Config>) -> Compiled {
        let routes = RouteTable::new(&config.routes);
        let telemetry = RequestTelemetry::new(&config);
        Compiled {
            config,
            routes,
            telemetry,
        }
    }
}

/// What keygate knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as a header value (`X-Forwarded-For`), formatted once.
    pub peer_ip: HeaderValue,
    pub https: bool,
    /// Framing verdicts for this connection's HTTP/1 requests, in order.
    pub verdicts: framing::Verdicts,
}

/// State every worker shares: the live config and the authenticator.
struct Shared {
    compiled: ArcSwap<Compiled>,
    auth: Authenticator,
    ids: RequestIds,
    /// Usage counters (in memory; flushed to the store by `lifecycle`).
    usage: Arc<UsageRecorder>,
    /// Key, route and failed-authentication limits.
    limits: Arc<RateLimits>,
}

/// The data plane. Each runtime that serves requests gets its own `Gateway`
/// from [`Gateway::worker`]: shared config and cache, its own upstream pool
/// (pooled connections belong to the runtime that opened them).
pub struct Gateway {
    shared: Arc<Shared>,
    upstreams: forward::Upstreams,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        usage: Arc<UsageRecorder>,
        limits: Arc<RateLimits>,
    ) -> Gateway {
        let upstreams = forward::Upstreams::new(&config.limits);
        let shared = Shared {
            compiled: ArcSwap::from_pointee(Compiled::new(config)),
            auth,
            ids: RequestIds::new(),
            usage,
            limits,
        };
        Gateway {
            shared: Arc::new(shared),
            upstreams,
        }
    }

    /// A gateway for another runtime: same shared state, its own upstream pool.
    pub fn worker(&self) -> Gateway {
        Gateway {
            shared: self.shared.clone(),
            upstreams: forward::Upstreams::new(&self.config().limits),
        }
    }

    /// Swaps in a new config atomically for every worker; requests in flight
    /// finish on the old one.
    pub fn reload(&self, config: Arc<Config>) {
        self.shared.compiled.store(Arc::new(Compiled::new(config)));
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.compiled.load().config.clone()
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.shared.auth
    }

    /// The usage counters every worker records into.
    pub fn usage(&self) -> &Arc<UsageRecorder> {
        &self.shared.usage
    }

    /// The rate limits every worker applies.
    pub fn rate_limits(&self) -> &Arc<RateLimits> {
        &self.shared.limits
    }

    /// Handles one request; never fails (errors become problem+json answers).
    ///
    /// The route's timeout runs on `timer`. keygate's HTTP/1 path passes one
    /// timer per connection, which each request moves on with one atomic
    /// operation; a timer made per request costs two locked operations on
    /// the runtime's timer wheel (registration and removal) and a handle to
    /// the runtime (BENCHMARKS.md, ninth session).
    pub async fn handle(
        &self,
        req: Request<ClientBody>,
        conn: &ConnInfo,
        timer: Pin<&mut Sleep>,
    ) -> Response<ProxyBody> {
        let compiled = self.shared.compiled.load_full();
        let started = compiled.telemetry.start(&req);
        let request_id = self.shared.ids.for_request(req.headers());
        let mut learned = Learned {
            exchange: Exchange {
                timed: started.is_some(),
                ..Exchange::default()
            },
            rate: None,
        };
        let proxied = self
            .proxy(&compiled, req, conn, &request_id, &mut learned, timer)
            .await;
        let Learned { exchange, rate } = learned;
        let (mut resp, error) = match proxied {
            Ok(mut resp) => {
                resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
                (resp, None)
            }
            Err(e) => (problem(&e, &request_id), Some(e)),
        };
        // Once the rate-limit stage ran, every answer carries its fields.
        if let Some(h) = rate {
            h.apply(resp.headers_mut());
        }
        // Record stage: metrics and the access line (see `telemetry`).
        if let Some(started) = started {
            let done = Done {
                exchange: &exchange,
                status: resp.status(),
                error: error.as_ref(),
                request_id: resp.headers().get(&X_REQUEST_ID),
                client: conn.peer.ip(),
                bytes_out: resp.body().size_hint().exact(),
            };
            compiled.telemetry.finish(started, done);
        }
        resp
    }

    /// Answers bytes keygate refuses before they are a request (a malformed
    /// or oversized head): problem+json with a new request id, counted in the
    /// metrics like any answer. On HTTP/1 the caller then closes the
    /// connection; on HTTP/2 only the stream ends.
    pub fn refuse(&self, e: &GatewayError, conn: &ConnInfo) -> Response<ProxyBody> {
        let compiled = self.shared.compiled.load();
        let request_id = self.shared.ids.for_request(&http::HeaderMap::new());
        let resp = problem(e, &request_id);
        tracing::debug!(client = %conn.peer, code = e.code(), "request head refused");
        if let Some(started) = compiled.telemetry.start_unparsed() {
            let done = Done {
                exchange: &Exchange::default(),
                status: resp.status(),
                error: Some(e),
                request_id: Some(&request_id),
                client: conn.peer.ip(),
                bytes_out: resp.body().size_hint().exact(),
            };
            compiled.telemetry.finish(started, done);
        }
        resp
    }

    async fn proxy<'c>(
        &self,
        compiled: &'c Compiled,
        req: Request<ClientBody>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        learned: &mut Learned<'c>,
        timer: Pin<&mut Sleep>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        let Learned { exchange, rate } = learned;
        check_framing(&req, conn)?;
        let config = &compiled.config;
        let (route, normalized) = find_route(compiled, &req)?;
        exchange.route = Some(&route.name);
        check_declared_length(&req, route)?;
        let principal = self.authenticate(config, route, &req, conn).await?;
        exchange.key = principal;
        let principal = &exchange.key;
        if let Some(key) = principal {
            auth::authorize(key, &route.config, req.method())
                .inspect_err(|_| self.shared.usage.record(key.id(), Outcome::Denied))?;
            self.rate_limit(config, route, key, rate)
                .await
                .inspect_err(|_| self.shared.usage.record(key.id(), Outcome::RateLimited))?;
        }
        let (upstream_req, added, body_fault) = rewrite_request(
            req,
            route,
            RewriteContext {
                principal: principal
                    .as_deref()
                    .filter(|_| config.forward.identity_headers),
                credentials: principal.as_ref().map(|_| &config.keys.headers[..]),
                conn,
                request_id,
                normalized_path: normalized.as_deref(),
            },
        )?;
        if let Some(key) = principal {
            self.shared.usage.record(key.id(), Outcome::Allowed);
        }
        let sent = exchange.timed.then(std::time::Instant::now);
        let resp = self
            .upstreams
            .forward(upstream_req, added, route, &compiled.routes, timer)
            .await;
        exchange.upstream_elapsed = sent.map(|t| t.elapsed());
        exchange.upstream_status = resp.as_ref().ok().map(|r| r.status());
        let resp = resp.map_err(|e| body_fault.error(route.config.max_body).unwrap_or(e))?;
        Ok(rewrite_response(resp))
    }

    /// The verify stage: `None` on public routes, otherwise the verified key.
    async fn authenticate(
        &self,
        config: &Config,
        route: &Route,
        req: &Request<ClientBody>,
        conn: &ConnInfo,
    ) -> Result<Option<Principal>, GatewayError> {
        if route.config.auth == RouteAuth::None {
            return Ok(None);
        }
        let auth = &self.shared.auth;
        // Apply pending invalidations first: a kill switch flipped through this
        // instance's admin API is final as soon as the PATCH is answered.
        auth.cache.sync().await;
        if !auth.cache.api_keys_enabled() {
            return Err(GatewayError::ApiKeysDisabled);
        }
        // An address that keeps failing is refused before its key is looked at.
        let limits = &self.shared.limits;
        let rl = &config.rate_limit;
        let ip = ratelimit::client_ip(conn.peer.ip(), req.headers(), &rl.trusted_proxies);
        limits.check_failures(ip, rl.failed_auth_per_ip_per_minute)?;
        let verified: Result<_, GatewayError> = async {
            let credential = auth::extract(req.headers(), &config.keys.headers)?;
            let key = auth.verify(&config.keys.prefix, credential.token).await?;
            Ok(Some(key))
        }
        .await;
        verified.inspect_err(|e| limits.record_failure(ip, rl.failed_auth_per_ip_per_minute, e))
    }

    /// Rate-limit stage: the key's own limit (or the default) and the route's,
    /// from the live config and the cached key.
    async fn rate_limit(
        &self,
        config: &Config,
        route: &Route,
        key: &Principal,
        headers: &mut Option<RateHeaders>,
    ) -> Result<(), GatewayError> {
        let spec = key.rate_limit().unwrap_or(config.rate_limit.default);
        let route_limit = route.config.rate_limit.map(|s| (&route.name, s));
        let decision = self.shared.limits.check(key.id(), spec, route_limit);
        decision.await.finish(headers)
    }
}

/// What the stages learn about a request besides its answer.
struct Learned<'c> {
    /// For the record stage (see `telemetry`).
    exchange: Exchange<'c>,
    /// The rate-limit fields, once that stage ran: every answer carries them.
    rate: Option<RateHeaders>,
}

/// Accept stage: a request whose head had both Content-Length and
/// Transfer-Encoding is refused (see [`framing`]); hyper closes the connection.
/// keygate's own HTTP/1 path ([`h1`]) takes neither header, and its requests
/// have no verdict.
fn check_framing(req: &Request<ClientBody>, conn: &ConnInfo) -> Result<(), GatewayError> {
    let http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    let from_hyper = matches!(req.body(), ClientBody::Hyper(_));
    if http1 && from_hyper && conn.verdicts.next_conflicted() {
        return Err(GatewayError::BadRequest(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    Ok(())
}

/// Route stage: normalizes the path and finds the route for host + path.
fn find_route<'a>(
    compiled: &'a Compiled,
    req: &Request<ClientBody>,
) -> Result<(&'a Route, Option<String>), GatewayError> {
    if uri_len(req.uri()) > compiled.config.limits.max_uri_bytes {
        return Err(GatewayError::UriTooLong);
    }
    check_host_header(req)?;
    let normalized = route::normalize_path(req.uri().path()).map_err(|_| GatewayError::BadPath)?;
    let path = normalized.as_deref().unwrap_or(req.uri().path());
    let host = request_host(req);
    let route = compiled
        .routes
        .find(host, path)
        .ok_or(GatewayError::NoRoute)?;
    Ok((route, normalized))
}

fn uri_len(uri: &Uri) -> usize {
    let pq = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    pq + uri.authority().map_or(0, |a| a.as_str().len())
}

/// The host the client addressed, without port: the URI's authority (HTTP/2,
/// absolute-form) or else the `Host` header.
fn request_host(req: &Request<ClientBody>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.host()),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            // Strip a port, keeping IPv6 literals intact.
            Some(match h.rfind(':') {
                Some(i) if !h[i..].contains(']') => &h[..i],
                _ => h,
            })
        }
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request needs exactly one `Host`; no
/// request may carry two (they could route differently here and upstream).
fn check_host_header(req: &Request<ClientBody>) -> Result<(), GatewayError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest("more than one Host header"));
    }
    if first.is_none() && req.version() == Version::HTTP_11 && req.uri().authority().is_none() {
        return Err(GatewayError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        ));
    }
    Ok(())
}

/// Refuses a declared body over the route's limit before anything is forwarded.
fn check_declared_length(req: &Request<ClientBody>, route: &Route) -> Result<(), GatewayError> {
    let limit = route.config.max_body;
    if req.body().size_hint().lower() > limit {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    Ok(())
}

struct RewriteContext<'a> {
    principal: Option<&'a crate::cache::CachedKey>,
    /// The credential headers to strip (a key was verified).
    credentials: Option<&'a [crate::config::CredentialHeader]>,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
    normalized_path: Option<&'a str>,
}

/// Rewrite stage: the upstream request (see [`headers`] for the order), and
/// the fields keygate sets on it.
fn rewrite_request(
    req: Request<ClientBody>,
    route: &Route,
    ctx: RewriteContext<'_>,
) -> Result<(Request<LimitedBody>, Added, Arc<body::BodyFault>), GatewayError> {
    let (mut parts, body) = req.into_parts();
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    let mut added = Added::with_capacity(10);
    headers::rewrite_for_upstream(
        &mut parts.headers,
        &mut added,
        ctx.credentials,
        &ctx.conn.peer_ip,
        ctx.conn.https,
        original_host.as_ref(),
    );
    added.push(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if let Some(key) = ctx.principal {
        added.push(headers::X_KEYGATE_KEY_ID.clone(), key.key_id_header());
        added.push(headers::X_KEYGATE_KEY_NAME.clone(), key.name_header());
        added.push(headers::X_KEYGATE_OWNER.clone(), key.owner_header());
        added.push(headers::X_KEYGATE_SCOPES.clone(), key.scopes_header());
        added.push(headers::X_KEYGATE_ACCESS.clone(), key.access_header());
    }
    added.push(header::HOST, route.upstream_host.clone());
    parts.uri = upstream_uri(&parts.uri, route, ctx.normalized_path)?;
    parts.version = Version::HTTP_11;
    let (body, fault) = LimitedBody::new(body, route.config.max_body);
    Ok((Request::from_parts(parts, body), added, fault))
}

/// The upstream request's target in origin form: the upstream's base path +
/// the request path and query.
fn upstream_uri(uri: &Uri, route: &Route, normalized: Option<&str>) -> Result<Uri, GatewayError> {
    if route.upstream_base.is_empty() && normalized.is_none() {
        let pq = match uri.path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        };
        return Ok(Uri::from(pq));
    }
    let path = normalized.unwrap_or(uri.path());
    let mut s = String::with_capacity(route.upstream_base.len() + uri_len(uri) + 1);
    s.push_str(&route.upstream_base);
    s.push_str(path);
    if let Some(q) = uri.query() {
        s.push('?');
        s.push_str(q);
    }
    s.parse().map_err(|_| GatewayError::BadPath)
}

/// Stream-back stage: the upstream's answer minus its hop-by-hop headers.
fn rewrite_response(resp: Response<body::UpstreamBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::Stream(body))
}

fn problem(e: &GatewayError, request_id: &HeaderValue) -> Response<ProxyBody> {
    let id = request_id.to_str().unwrap_or("");
    let mut resp = e.to_problem(id).map(ProxyBody::full);
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    resp
}

/// Request ids: the client's `X-Request-Id` when it is sane, else a new one.
pub struct RequestIds {
    boot: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        RequestIds {
            boot: rand::random(),
            counter: AtomicU64::new(0),
        }
    }

    fn for_request(&self, headers: &http::HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID)
            && !v.is_empty()
            && v.len() <= 128
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        {
            return v.clone();
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        hex_u64(self.boot, &mut buf[..16]);
        hex_u64(n, &mut buf[16..]);
        // 32 lowercase hex digits are a valid header value.
        HeaderValue::from_maybe_shared(Bytes::copy_from_slice(&buf))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    }
}

fn hex_u64(mut n: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_when_sane_and_unique_otherwise() {
        let ids = RequestIds::new();
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(ids.for_request(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        let a = ids.for_request(&h);
        let b = ids.for_request(&http::HeaderMap::new());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&"x".repeat(129)).unwrap(),
        );
        assert_eq!(ids.for_request(&h).len(), 32);
    }
}
