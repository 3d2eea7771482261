//! The route table: host (if given), then exact path, then longest prefix.
//!
//! Host-specific routes win over host-less ones; within a group an exact
//! `path` match wins over prefixes, and the longest prefix wins. A prefix
//! matches at segment boundaries: `/api` matches `/api` and `/api/x`, never
//! `/apix`; a prefix ending in `/` matches everything below it.
//!
//! Paths are normalized (dot segments resolved, plain or percent-encoded)
//! before matching, so a path can never leave its route's prefix.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{PathMatch, RouteConfig};

/// A compiled route: the config plus what the hot path needs precomputed.
#[derive(Debug)]
pub struct Route {
    pub config: RouteConfig,
    /// Upstream `scheme://authority` as a header-ready string.
    pub upstream_scheme: http::uri::Scheme,
    pub upstream_authority: http::uri::Authority,
    /// Upstream base path without trailing `/` (empty for none).
    pub upstream_base: String,
    /// `Host` header value sent upstream.
    pub upstream_host: http::HeaderValue,
    /// `host:port` to connect to (the scheme's default port filled in).
    pub upstream_addr: Arc<str>,
    /// Index of this route's upstream (`scheme://authority`) among the
    /// table's distinct upstreams: routes to one upstream share a pool slot.
    pub upstream_slot: usize,
    /// `RateLimit-Policy` fragment for this route's own limit, if any.
    pub name: Arc<str>,
}

#[derive(Debug, Default)]
struct Group {
    exact: HashMap<String, usize>,
    /// (prefix, route index), longest prefix first.
    prefixes: Vec<(String, usize)>,
}

impl Group {
    fn find(&self, path: &str) -> Option<usize> {
        if let Some(&i) = self.exact.get(path) {
            return Some(i);
        }
        self.prefixes
            .iter()
            .find(|(p, _)| prefix_matches(p, path))
            .map(|&(_, i)| i)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// All routes, indexed for matching.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Distinct upstreams (`scheme://authority`), indexed by `upstream_slot`.
    upstreams: Vec<String>,
    /// Unique per table, so pools keyed by slot notice a reload.
    generation: u64,
    by_host: HashMap<String, Group>,
    any_host: Group,
}

impl RouteTable {
    /// Builds the table. The config layer has already validated the routes.
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        let mut table = RouteTable {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            ..RouteTable::default()
        };
        for (i, rc) in configs.iter().enumerate() {
            let mut route = compile(rc);
            let upstream = format!("{}://{}", route.upstream_scheme, route.upstream_addr);
            route.upstream_slot = match table.upstreams.iter().position(|u| *u == upstream) {
                Some(slot) => slot,
                None => {
                    table.upstreams.push(upstream);
                    table.upstreams.len() - 1
                }
            };
            table.routes.push(Arc::new(route));
            let group = match &rc.host {
                Some(h) => table.by_host.entry(h.clone()).or_default(),
                None => &mut table.any_host,
            };
            match &rc.path {
                PathMatch::Exact(p) => {
                    group.exact.insert(p.clone(), i);
                }
                PathMatch::Prefix(p) => group.prefixes.push((p.clone(), i)),
            }
        }
        for g in table
            .by_host
            .values_mut()
            .chain(std::iter::once(&mut table.any_host))
        {
            g.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        }
        table
    }

    /// Finds the route for `host` (as sent: any case, without port) and a
    /// normalized path. The host is only looked at when host routes exist.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let by_host = match host {
            Some(h) if !self.by_host.is_empty() => {
                let group = match self.by_host.get(h) {
                    Some(g) => Some(g),
                    None if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                        self.by_host.get(&h.to_ascii_lowercase())
                    }
                    None => None,
                };
                group.and_then(|g| g.find(path))
            }
            _ => None,
        };
        by_host
            .or_else(|| self.any_host.find(path))
            .map(|i| &self.routes[i])
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// How many distinct upstreams the routes name.
    pub fn upstream_count(&self) -> usize {
        self.upstreams.len()
    }

    /// Identifies this table among every table built by this process.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

fn compile(rc: &RouteConfig) -> Route {
    let parts = rc.upstream.clone().into_parts();
    let scheme = parts.scheme.unwrap_or(http::uri::Scheme::HTTP);
    // Validated config guarantees an authority; fall back to localhost defensively.
    let authority = parts
        .authority
        .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
    let base = parts
        .path_and_query
        .map(|pq| pq.path().trim_end_matches('/').to_owned())
        .unwrap_or_default();
    let host = http::HeaderValue::from_str(authority.as_str())
        .unwrap_or_else(|_| http::HeaderValue::from_static("localhost"));
    let port = authority.port_u16().unwrap_or(match scheme.as_str() {
        "https" => 443,
        _ => 80,
    });
    let addr = format!("{}:{port}", authority.host());
    Route {
        config: rc.clone(),
        upstream_scheme: scheme,
        upstream_authority: authority,
        upstream_base: base,
        upstream_host: host,
        upstream_addr: addr.into(),
        upstream_slot: 0,
        name: rc.name.as_str().into(),
    }
}

/// Why a path was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `..` above the root, an encoded slash or backslash, a NUL, or not
    /// starting with `/`.
    Refused,
}

/// Resolves `.` and `..` segments (also as `%2e`/`%2E`) and refuses encoded
/// separators (`%2f`, `%5c`), backslashes and NUL, which upstreams may decode
/// into a different path than the one routed. Returns `None` when the path is
/// already normal (the common case, no allocation).
pub fn normalize_path(path: &str) -> Result<Option<String>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::Refused);
    }
    let bytes = path.as_bytes();
    let mut needs_work = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' | 0 => return Err(PathError::Refused),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).map(|h| h.to_ascii_lowercase());
                match hex.as_deref() {
                    Some(b"2f") | Some(b"5c") | Some(b"00") => return Err(PathError::Refused),
                    Some(b"2e") => needs_work = true,
                    _ => {}
                }
            }
            b'.' if bytes[i - 1] == b'/' => needs_work = true,
            b'/' if i > 0 && bytes[i - 1] == b'/' => needs_work = true,
            _ => {}
        }
    }
    if !needs_work {
        return Ok(None);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let is_last = i == last;
        let decoded = seg.replace("%2e", ".").replace("%2E", ".");
        match decoded.as_str() {
            "." | "" => trailing_slash |= is_last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::Refused);
                }
                trailing_slash |= is_last;
            }
            _ => out.push(seg),
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteAuth;
    use std::time::Duration;

    fn route(name: &str, host: Option<&str>, path: PathMatch) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: host.map(Into::into),
            path,
            upstream: "http://127.0.0.1:9000/base/".parse().unwrap(),
            scopes: vec![],
            rate_limit: None,
            timeout: Duration::from_secs(30),
            max_body: 1024,
            auth: RouteAuth::Key,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route("api", None, PathMatch::Prefix("/api/".into())),
            route("api-v2", None, PathMatch::Prefix("/api/v2".into())),
            route("health", None, PathMatch::Exact("/healthz".into())),
            route(
                "host-api",
                Some("example.com"),
                PathMatch::Prefix("/api/".into()),
            ),
            route("root", None, PathMatch::Prefix("/".into())),
        ])
    }

    fn name(t: &RouteTable, host: Option<&str>, path: &str) -> Option<String> {
        t.find(host, path).map(|r| r.config.name.clone())
    }

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let t = table();
        assert_eq!(name(&t, None, "/api/x").as_deref(), Some("api"));
        assert_eq!(name(&t, None, "/api/v2").as_deref(), Some("api-v2"));
        assert_eq!(name(&t, None, "/api/v2/orders").as_deref(), Some("api-v2"));
        assert_eq!(name(&t, None, "/api/v20").as_deref(), Some("api"));
        assert_eq!(name(&t, None, "/healthz").as_deref(), Some("health"));
        assert_eq!(name(&t, None, "/healthz/x").as_deref(), Some("root"));
    }

    #[test]
    fn host_routes_win_and_fall_back() {
        let t = table();
        assert_eq!(
            name(&t, Some("example.com"), "/api/x").as_deref(),
            Some("host-api")
        );
        assert_eq!(
            name(&t, Some("example.com"), "/other").as_deref(),
            Some("root")
        );
        assert_eq!(
            name(&t, Some("other.com"), "/api/x").as_deref(),
            Some("api")
        );
    }

    #[test]
    fn no_match_without_catch_all() {
        let t = RouteTable::new(&[route("api", None, PathMatch::Prefix("/api".into()))]);
        assert!(t.find(None, "/apix").is_none());
        assert!(t.find(None, "/").is_none());
        assert!(t.find(None, "/api").is_some());
    }

    #[test]
    fn upstream_base_is_precomputed() {
        let t = table();
        let r = t.find(None, "/api/x").unwrap();
        assert_eq!(r.upstream_base, "/base");
        assert_eq!(r.upstream_authority.as_str(), "127.0.0.1:9000");
    }

    #[test]
    fn normal_paths_are_untouched() {
        assert_eq!(normalize_path("/api/v1/orders"), Ok(None));
        assert_eq!(normalize_path("/"), Ok(None));
        let odd = normalize_path("/a.b/c..d/.e").unwrap();
        assert_eq!(odd.as_deref().unwrap_or("/a.b/c..d/.e"), "/a.b/c..d/.e");
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(
            normalize_path("/api/../admin").unwrap().as_deref(),
            Some("/admin")
        );
        assert_eq!(
            normalize_path("/api/./x").unwrap().as_deref(),
            Some("/api/x")
        );
        assert_eq!(
            normalize_path("/api/%2e%2e/admin").unwrap().as_deref(),
            Some("/admin")
        );
        assert_eq!(
            normalize_path("/api/%2E./admin").unwrap().as_deref(),
            Some("/admin")
        );
        assert_eq!(
            normalize_path("/api/x/..").unwrap().as_deref(),
            Some("/api/")
        );
        assert_eq!(
            normalize_path("/api//x").unwrap().as_deref(),
            Some("/api/x")
        );
        assert_eq!(
            normalize_path("/api/x/.").unwrap().as_deref(),
            Some("/api/x/")
        );
    }

    #[test]
    fn escapes_are_refused() {
        assert_eq!(normalize_path("/.."), Err(PathError::Refused));
        assert_eq!(normalize_path("/api/../../etc"), Err(PathError::Refused));
        assert_eq!(
            normalize_path("/api/%2f..%2fadmin"),
            Err(PathError::Refused)
        );
        assert_eq!(normalize_path("/api/%2F"), Err(PathError::Refused));
        assert_eq!(normalize_path("/api\\..\\admin"), Err(PathError::Refused));
        assert_eq!(normalize_path("api"), Err(PathError::Refused));
        assert_eq!(normalize_path("*"), Err(PathError::Refused));
    }
}
