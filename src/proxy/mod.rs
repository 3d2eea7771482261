//! The data plane: one request, start to finish.
//!
//! [`Gateway::handle`] runs the stages of DESIGN.md section 8 in order, each a
//! small function returning `Result<_, GatewayError>`; the first error becomes
//! the answer through [`GatewayError::to_problem`], the only place that picks a
//! status code. Listening, TLS and connection handling live in [`listener`].

pub mod body;
pub mod forward;
pub mod framing;
pub mod headers;
pub mod listener;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::auth::{self, Authenticator, Principal};
use crate::config::{Config, RouteAuth};
use crate::error::GatewayError;
use crate::lifecycle::usage::{Outcome, UsageRecorder};
use crate::ratelimit::{self, RateHeaders, RateLimits};
use body::{LimitedBody, ProxyBody};
use headers::X_REQUEST_ID;
use route::{Route, RouteTable};

/// The config as the data plane uses it: validated and compiled.
pub struct Compiled {
    pub config: Arc<Config>,
    pub routes: RouteTable,
}

impl Compiled {
    pub fn new(config: Arc<Config>) -> Compiled {
        let routes = RouteTable::new(&config.routes);
        Compiled { config, routes }
    }
}

/// What keygate knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
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
    client: forward::HttpClient,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        usage: Arc<UsageRecorder>,
        limits: Arc<RateLimits>,
    ) -> Gateway {
        let client = forward::build_client(&config.limits);
        let shared = Shared {
            compiled: ArcSwap::from_pointee(Compiled::new(config)),
            auth,
            ids: RequestIds::new(),
            usage,
            limits,
        };
        Gateway {
            shared: Arc::new(shared),
            client,
        }
    }

    /// A gateway for another runtime: same shared state, its own upstream pool.
    pub fn worker(&self) -> Gateway {
        let client = forward::build_client(&self.config().limits);
        Gateway {
            shared: self.shared.clone(),
            client,
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
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let request_id = self.shared.ids.for_request(req.headers());
        let mut rate = None;
        let mut resp = match self.proxy(req, conn, &request_id, &mut rate).await {
            Ok(mut resp) => {
                resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
                resp
            }
            Err(e) => problem(&e, &request_id),
        };
        // Once the rate-limit stage ran, every answer carries its fields.
        if let Some(h) = rate {
            h.apply(resp.headers_mut());
        }
        resp
    }

    async fn proxy(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        rate: &mut Option<RateHeaders>,
    ) -> Result<Response<ProxyBody>, GatewayError> {
        check_framing(&req, conn)?;
        let compiled = self.shared.compiled.load_full();
        let config = &compiled.config;
        let (route, normalized) = find_route(&compiled, &req)?;
        check_declared_length(&req, route)?;
        let (principal, credential_header) = self.authenticate(config, route, &req, conn).await?;
        if let Some(key) = &principal {
            auth::authorize(key, &route.config, req.method())
                .inspect_err(|_| self.shared.usage.record(&key.record.id, Outcome::Denied))?;
            self.rate_limit(config, route, key, rate)
                .await
                .inspect_err(|_| {
                    self.shared
                        .usage
                        .record(&key.record.id, Outcome::RateLimited)
                })?;
        }
        let (upstream_req, tripped) = rewrite_request(
            req,
            route,
            RewriteContext {
                principal: principal
                    .as_deref()
                    .filter(|_| config.forward.identity_headers),
                credential_header,
                conn,
                request_id,
                normalized_path: normalized.as_deref(),
            },
        )?;
        if let Some(key) = &principal {
            self.shared.usage.record(&key.record.id, Outcome::Allowed);
        }
        let resp = forward::forward(&self.client, upstream_req, route.config.timeout).await;
        let resp = resp.map_err(|e| match tripped.load(Ordering::Acquire) {
            true => GatewayError::PayloadTooLarge {
                limit: route.config.max_body,
            },
            false => e,
        })?;
        Ok(rewrite_response(resp))
    }

    /// The verify stage: `None` on public routes, otherwise a verified key and
    /// the header that carried it (stripped before forwarding).
    async fn authenticate(
        &self,
        config: &Config,
        route: &Route,
        req: &Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<(Option<Principal>, Option<HeaderName>), GatewayError> {
        if route.config.auth == RouteAuth::None {
            return Ok((None, None));
        }
        let auth = &self.shared.auth;
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
            Ok((Some(key), Some(credential.header.clone())))
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
        let spec = key.record.rate_limit.unwrap_or(config.rate_limit.default);
        let route_limit = route.config.rate_limit.map(|s| (&route.name, s));
        let decision = self.shared.limits.check(&key.record.id, spec, route_limit);
        decision.await.finish(headers)
    }
}

/// Accept stage: a request whose head had both Content-Length and
/// Transfer-Encoding is refused (see [`framing`]); hyper closes the connection.
fn check_framing(req: &Request<Incoming>, conn: &ConnInfo) -> Result<(), GatewayError> {
    let http1 = matches!(req.version(), Version::HTTP_10 | Version::HTTP_11);
    if http1 && conn.verdicts.next_conflicted() {
        return Err(GatewayError::BadRequest(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    Ok(())
}

/// Route stage: normalizes the path and finds the route for host + path.
fn find_route<'a>(
    compiled: &'a Compiled,
    req: &Request<Incoming>,
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
fn request_host(req: &Request<Incoming>) -> Option<&str> {
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
fn check_host_header(req: &Request<Incoming>) -> Result<(), GatewayError> {
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
fn check_declared_length(req: &Request<Incoming>, route: &Route) -> Result<(), GatewayError> {
    let limit = route.config.max_body;
    if req.body().size_hint().lower() > limit {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    Ok(())
}

struct RewriteContext<'a> {
    principal: Option<&'a crate::cache::CachedKey>,
    credential_header: Option<HeaderName>,
    conn: &'a ConnInfo,
    request_id: &'a HeaderValue,
    normalized_path: Option<&'a str>,
}

/// Rewrite stage: the upstream request (see [`headers`] for the order).
fn rewrite_request(
    req: Request<Incoming>,
    route: &Route,
    ctx: RewriteContext<'_>,
) -> Result<(Request<LimitedBody>, Arc<std::sync::atomic::AtomicBool>), GatewayError> {
    let (mut parts, body) = req.into_parts();
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    };
    let h = &mut parts.headers;
    headers::strip_hop_by_hop(h);
    headers::strip_keygate_headers(h);
    if let Some(name) = ctx.credential_header {
        h.remove(name);
    }
    headers::add_forwarded(
        h,
        ctx.conn.peer.ip(),
        ctx.conn.https,
        original_host.as_ref(),
    );
    h.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    if let Some(key) = ctx.principal {
        h.insert(headers::X_KEYGATE_KEY_ID.clone(), key.key_id_header.clone());
        h.insert(headers::X_KEYGATE_KEY_NAME.clone(), key.name_header.clone());
        h.insert(headers::X_KEYGATE_OWNER.clone(), key.owner_header.clone());
        h.insert(headers::X_KEYGATE_SCOPES.clone(), key.scopes_header.clone());
        h.insert(headers::X_KEYGATE_ACCESS.clone(), key.access_header.clone());
    }
    h.insert(header::HOST, route.upstream_host.clone());
    parts.uri = upstream_uri(&parts.uri, route, ctx.normalized_path)?;
    parts.version = Version::HTTP_11;
    let (body, tripped) = LimitedBody::new(body, route.config.max_body);
    Ok((Request::from_parts(parts, body), tripped))
}

/// `scheme://authority` of the upstream + its base path + the request path and query.
fn upstream_uri(uri: &Uri, route: &Route, normalized: Option<&str>) -> Result<Uri, GatewayError> {
    let path_and_query = if route.upstream_base.is_empty() && normalized.is_none() {
        match uri.path_and_query() {
            Some(pq) => pq.clone(),
            None => http::uri::PathAndQuery::from_static("/"),
        }
    } else {
        let path = normalized.unwrap_or(uri.path());
        let mut s = String::with_capacity(route.upstream_base.len() + uri_len(uri) + 1);
        s.push_str(&route.upstream_base);
        s.push_str(path);
        if let Some(q) = uri.query() {
            s.push('?');
            s.push_str(q);
        }
        s.parse().map_err(|_| GatewayError::BadPath)?
    };
    Uri::builder()
        .scheme(route.upstream_scheme.clone())
        .authority(route.upstream_authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| GatewayError::BadPath)
}

/// Stream-back stage: the upstream's answer minus its hop-by-hop headers.
fn rewrite_response(resp: Response<Incoming>) -> Response<ProxyBody> {
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
