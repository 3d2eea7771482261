//! Configuration: the YAML file operators edit, validated once at load.
//!
//! Two layers, as in rust-rpxy: [`raw`] mirrors the YAML with serde
//! (`deny_unknown_fields`, every value wrapped in a span so errors can name
//! file:line:column), and [`Config`] here is the validated form the rest of the
//! code uses, so nothing downstream re-checks input. [`load`] reads a file,
//! applies `KEYGATE_*` environment overrides and validates.

mod raw;
mod units;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use units::{parse_duration, parse_size};

use crate::keys::{RateLimitSpec, Scope};

/// A config error that a person reads: `file:line:column: field.path: problem`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}{message}")]
pub struct ConfigError {
    /// `"path:line:col: "`, `"path: "`, or empty; always ends in `": "` when set.
    pub location: String,
    /// `field.path: what is wrong`, or a whole sentence for I/O problems.
    pub message: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from (for reload and messages).
    pub source: Option<PathBuf>,
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub keys: KeysConfig,
    pub rate_limit: RateLimitConfig,
    pub forward: ForwardConfig,
    pub notifications: NotificationsConfig,
    pub routes: Vec<RouteConfig>,
    pub limits: LimitsConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRole {
    Admin,
    Developer,
    Auditor,
}

impl AdminRole {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Admin => "admin",
            AdminRole::Developer => "developer",
            AdminRole::Auditor => "auditor",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub role: AdminRole,
    /// SHA-256 of the token.
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub tokens: Vec<AdminToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    Embedded {
        path: PathBuf,
    },
    Redis {
        url: String,
        prefix: String,
        /// `url` is a seed node of a Redis Cluster (`store.redis.cluster`).
        cluster: bool,
    },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: StoreBackend,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_keys: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub stale_if_error: Duration,
}

/// Where a credential may be presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer <token>`.
    Authorization,
    /// Any other header carrying the raw token (lower-case name).
    Raw(http::HeaderName),
}

#[derive(Debug, Clone)]
pub struct KeysConfig {
    pub prefix: String,
    pub headers: Vec<CredentialHeader>,
    pub default_ttl: Duration,
    /// `None`: no maximum.
    pub max_ttl: Option<Duration>,
    pub max_per_owner: u32,
    pub expiry_notice: Duration,
    pub purge_expired_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitBackend {
    Local,
    Redis,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub backend: RateLimitBackend,
    pub default: RateLimitSpec,
    pub failed_auth_per_ip_per_minute: u32,
    /// Trust `X-Forwarded-For` from these peers when finding the client IP
    /// (`rate_limit.trusted_proxies`, CIDRs); empty: use the socket address.
    pub trusted_proxies: Vec<IpNet>,
}

/// An IP network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = if bits == 0 {
                    0
                } else {
                    u32::MAX << (32 - bits)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 {
                    0
                } else {
                    u128::MAX << (128 - bits)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub identity_headers: bool,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: url::Url,
    /// Name of the environment variable holding the HMAC secret.
    pub secret_env: String,
    /// Event types to deliver (strings as in DESIGN.md, e.g. `key.expiring`).
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct NotificationsConfig {
    pub webhooks: Vec<WebhookConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// Matches this prefix (a path that starts with it).
    Prefix(String),
    /// Matches exactly this path.
    Exact(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    /// A valid API key is required (the default).
    Key,
    /// Public route: forwarded without a key.
    None,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// Lower-case host without port, if the route is host-specific.
    pub host: Option<String>,
    pub path: PathMatch,
    /// `http` or `https` URL; its path (if any) is prepended to the request path.
    pub upstream: http::Uri,
    pub scopes: Vec<Scope>,
    pub rate_limit: Option<RateLimitSpec>,
    pub timeout: Duration,
    pub max_body: u64,
    pub auth: RouteAuth,
}

/// Protection limits of the listeners (`limits:` in YAML; all optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_pool_idle_timeout: Duration,
    pub upstream_pool_max_idle_per_host: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8 * 1024,
            h2_max_concurrent_streams: 100,
            shutdown_grace: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_pool_idle_timeout: Duration::from_secs(90),
            upstream_pool_max_idle_per_host: 1024,
        }
    }
}

/// `logging:`: the process log (level and format are read at start) and the
/// access log (one line per proxied request; switched live on reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// An `EnvFilter` directive such as `info` or `info,keygate=debug`;
    /// `KEYGATE_LOG` overrides it.
    pub level: String,
    /// `KEYGATE_LOG_FORMAT` overrides it.
    pub format: LogFormat,
    /// One event per request on the target `keygate::access`.
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_owned(),
            format: LogFormat::Pretty,
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per event.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `metrics:`: what the data plane records for `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Per-request counters and histograms; off leaves the request path
    /// without any metrics work (background metrics are still served).
    pub enabled: bool,
    /// Also count requests per key id (`keygate_key_requests_total`); one
    /// series per key and outcome, so off by default.
    pub key_id_labels: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            key_id_labels: false,
        }
    }
}

/// Reads, overrides from the environment and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    from_file_text(path, &read(path)?)
}

/// Reads the config file at `path` (to hash or parse it).
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        location: format!("{}: ", path.display()),
        message: format!("cannot read the config file: {e}"),
    })
}

/// Validates `text`, read from `path`, with the `KEYGATE_*` overrides of the
/// process environment.
pub fn from_file_text(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KEYGATE_"))
        .collect();
    let mut cfg = parse(text, &path.display().to_string(), &env)?;
    cfg.source = Some(path.to_owned());
    Ok(cfg)
}

impl Config {
    /// For a reload: puts back the settings of `running` that only take
    /// effect at start (listeners, TLS, the store, the rate-limit backend,
    /// `limits`, the cache's size, the log level and format), so the config
    /// that is swapped in describes what really runs. Returns the names of
    /// those that differed, for the log.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        let mut keep = |name: &'static str, differs: bool| {
            if differs {
                kept.push(name);
            }
        };
        keep("listen", self.listen != running.listen);
        self.listen = running.listen;
        keep("admin.listen", self.admin.listen != running.admin.listen);
        self.admin.listen = running.admin.listen;
        keep("tls", self.tls != running.tls);
        self.tls = running.tls.clone();
        keep("store", self.store.backend != running.store.backend);
        self.store = running.store.clone();
        keep(
            "rate_limit.backend",
            self.rate_limit.backend != running.rate_limit.backend,
        );
        self.rate_limit.backend = running.rate_limit.backend;
        keep("limits", self.limits != running.limits);
        self.limits = running.limits.clone();
        keep(
            "cache.max_keys",
            self.cache.max_keys != running.cache.max_keys,
        );
        self.cache.max_keys = running.cache.max_keys;
        keep("logging.level", self.logging.level != running.logging.level);
        self.logging.level = running.logging.level.clone();
        keep(
            "logging.format",
            self.logging.format != running.logging.format,
        );
        self.logging.format = running.logging.format;
        kept
    }
}

/// Parses and validates YAML `text`; `origin` names it in errors; `env` holds the
/// `KEYGATE_*` variables to apply.
pub fn parse(text: &str, origin: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    raw::parse_and_validate(text, origin, env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const F: &str = "k.yaml";

    fn ok(yaml: &str) -> Config {
        ok_env(yaml, &[])
    }

    fn ok_env(yaml: &str, env: &[(&str, &str)]) -> Config {
        parse(yaml, F, &env_vec(env)).unwrap_or_else(|e| panic!("{yaml}\n=> {e}"))
    }

    fn env_vec(env: &[(&str, &str)]) -> Vec<(String, String)> {
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err_env(yaml: &str, env: &[(&str, &str)]) -> ConfigError {
        let e = match parse(yaml, F, &env_vec(env)) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert!(!shown.contains('\n'), "not one line: {shown:?}");
        e
    }

    /// The error starts with `prefix` (location and field path) and contains `phrase`.
    #[track_caller]
    fn rejects(yaml: &str, prefix: &str, phrase: &str) {
        rejects_env(yaml, &[], prefix, phrase);
    }

    #[track_caller]
    fn rejects_env(yaml: &str, env: &[(&str, &str)], prefix: &str, phrase: &str) {
        let shown = err_env(yaml, env).to_string();
        assert!(
            shown.starts_with(prefix),
            "expected prefix {prefix:?}\n     got {shown:?}\nfor:\n{yaml}"
        );
        assert!(shown.contains(phrase), "expected {phrase:?} in {shown:?}");
    }

    /// One route with `extra` lines (indented 4) from line 5 on.
    fn route(extra: &str) -> String {
        format!(
            "routes:\n  - name: r\n    match: {{ path_prefix: /r/ }}\n    upstream: http://127.0.0.1:9000\n{extra}"
        )
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const DAY: u64 = 86_400;

    // --- the example and the defaults ---------------------------------------

    #[test]
    fn the_example_file_is_valid_and_means_what_it_says() {
        let c = ok(include_str!("../../config/keygate.yaml"));
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert!(c.tls.is_none());
        assert_eq!(c.admin.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(c.admin.tokens.len(), 1);
        let t = &c.admin.tokens[0];
        assert_eq!((t.name.as_str(), t.role), ("ops", AdminRole::Admin));
        let change_me: [u8; 32] = Sha256::digest(b"change-me").into();
        assert_eq!(t.sha256, change_me);
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "data/keygate.redb".into()
            }
        );
        assert_eq!(c.cache.max_keys, 100_000);
        assert_eq!(c.keys.max_ttl, Some(secs(730 * DAY)));
        assert_eq!(
            c.rate_limit.default,
            RateLimitSpec {
                per_second: 50,
                burst: 100
            }
        );
        assert!(c.rate_limit.trusted_proxies.is_empty());
        assert_eq!(c.notifications.webhooks.len(), 1);
        assert_eq!(
            c.notifications.webhooks[0].events,
            ["key.expiring", "key.revoked"]
        );
        assert_eq!(c.routes.len(), 2);
        let api = &c.routes[0];
        assert_eq!(api.name, "public-api");
        assert_eq!(api.path, PathMatch::Prefix("/api/".into()));
        assert_eq!(api.host, None);
        assert_eq!(
            api.upstream.authority().map(|a| a.as_str()),
            Some("127.0.0.1:9000")
        );
        assert_eq!(api.scopes, [Scope::parse("public_api").unwrap()]);
        assert_eq!(
            api.rate_limit,
            Some(RateLimitSpec {
                per_second: 20,
                burst: 40
            })
        );
        assert_eq!(
            (api.timeout, api.max_body, api.auth),
            (secs(30), 10 << 20, RouteAuth::Key)
        );
        let health = &c.routes[1];
        assert_eq!(health.path, PathMatch::Exact("/healthz".into()));
        assert_eq!(health.auth, RouteAuth::None);
        assert!(health.scopes.is_empty());
        // The limits section spells out the defaults.
        assert_eq!(
            format!("{:?}", c.limits),
            format!("{:?}", LimitsConfig::default())
        );
    }

    fn assert_defaults(c: &Config) {
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert!(c.tls.is_none());
        assert_eq!(c.admin.listen, "127.0.0.1:8081".parse().unwrap());
        assert!(c.admin.tokens.is_empty());
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "data/keygate.redb".into()
            }
        );
        assert_eq!(c.cache.max_keys, 100_000);
        assert_eq!(
            (c.cache.ttl, c.cache.negative_ttl, c.cache.stale_if_error),
            (secs(30), secs(5), secs(300))
        );
        assert_eq!(c.keys.prefix, "kg_");
        assert_eq!(
            c.keys.headers,
            [
                CredentialHeader::Authorization,
                CredentialHeader::Raw(http::HeaderName::from_static("x-api-key"))
            ]
        );
        assert_eq!(
            (c.keys.default_ttl, c.keys.max_ttl),
            (secs(365 * DAY), Some(secs(730 * DAY)))
        );
        assert_eq!(c.keys.max_per_owner, 1000);
        assert_eq!(
            (c.keys.expiry_notice, c.keys.purge_expired_after),
            (secs(30 * DAY), secs(90 * DAY))
        );
        assert_eq!(c.rate_limit.backend, RateLimitBackend::Local);
        assert_eq!(
            c.rate_limit.default,
            RateLimitSpec {
                per_second: 50,
                burst: 100
            }
        );
        assert_eq!(c.rate_limit.failed_auth_per_ip_per_minute, 60);
        assert!(c.rate_limit.trusted_proxies.is_empty());
        assert!(c.forward.identity_headers);
        assert!(c.notifications.webhooks.is_empty());
        assert!(c.routes.is_empty());
        assert_eq!(
            format!("{:?}", c.limits),
            format!("{:?}", LimitsConfig::default())
        );
        assert!(c.source.is_none());
    }

    #[test]
    fn an_empty_file_means_all_defaults() {
        assert_defaults(&ok(""));
        assert_defaults(&ok("# nothing but a comment\n\n"));
        assert_defaults(&ok("---\n"));
    }

    #[test]
    fn empty_sections_mean_defaults() {
        let yaml = "tls:\nadmin:\n  tokens:\nstore:\ncache:\nkeys:\nrate_limit:\n  trusted_proxies:\nforward:\nnotifications:\nroutes:\nlimits:\n";
        assert_defaults(&ok(yaml));
        assert_defaults(&ok("admin: {}\nroutes: []\nlimits: {}\n"));
    }

    // --- parse errors --------------------------------------------------------

    #[test]
    fn unknown_fields_are_named_with_what_is_allowed() {
        let e = err_env("listen: 0.0.0.0:8080\nlisten_addr: x\n", &[]).to_string();
        assert!(
            e.starts_with(
                "k.yaml:2:1: listen_addr: unknown field (allowed here: listen, tls, admin, store,"
            ),
            "{e}"
        );
        let e = err_env(&route("    timeuot: 5s\n"), &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:5:5: routes[0].timeuot: unknown field (allowed here: name, match, upstream, \
             scopes, rate_limit, timeout, max_body, auth)"
        );
        rejects(
            "routes:\n  - name: r\n    match: { path: /x, hots: a }\n",
            "k.yaml:3:24: routes[0].match.hots: unknown field ",
            "allowed here: path_prefix, path, host",
        );
        rejects(
            "limits:\n  max_conections: 5\n",
            "k.yaml:2:3: limits.max_conections: unknown field",
            "max_connections",
        );
        rejects(
            "rate_limit:\n  default: {per_second: 1, burst: 1, per_minute: 5}\n",
            "k.yaml:2:38: rate_limit.default.per_minute: unknown field",
            "allowed here: per_second, burst",
        );
    }

    #[test]
    fn wrong_types_name_the_field_and_the_value() {
        let e = err_env("cache:\n  max_keys: lots\n", &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:2:13: cache.max_keys: expected a whole number from 0 to 18446744073709551615, got \"lots\""
        );
        rejects(
            "forward:\n  identity_headers: maybe\n",
            "k.yaml:2:21: forward.identity_headers: ",
            "expected true or false, got \"maybe\"",
        );
        rejects(
            "keys:\n  max_per_owner: -1\n",
            "k.yaml:2:18: keys.max_per_owner: ",
            "whole number from 0 to 4294967295, got \"-1\"",
        );
        rejects(
            "routes: 5\n",
            "k.yaml:1:9: routes: ",
            "expected a list, got \"5\"",
        );
        rejects(
            "admin: [1]\n",
            "k.yaml:1:8: admin: ",
            "expected a mapping (key: value pairs), got a list",
        );
        rejects(
            "listen: [a]\n",
            "k.yaml:1:9: listen: ",
            "expected a single value, got a list",
        );
        rejects("- listen\n", "k.yaml:1:1: ", "expected a mapping");
        rejects(
            "admin:\n  tokens:\n    - {name: a, role: boss, sha256: x}\n",
            "k.yaml:3:23: admin.tokens[0].role: ",
            "unknown value \"boss\" (allowed: admin, developer, auditor)",
        );
        rejects(
            "store:\n  backend: postgres\n",
            "k.yaml:2:12: store.backend: ",
            "unknown value \"postgres\" (allowed: embedded, redis)",
        );
        rejects(
            &route("    auth: maybe\n"),
            "k.yaml:5:11: routes[0].auth: ",
            "(allowed: key, none)",
        );
    }

    #[test]
    fn missing_and_empty_required_fields() {
        rejects(
            "tls:\n  cert: c.pem\n",
            "k.yaml:2:3: tls: ",
            "missing required field \"key\"",
        );
        rejects(
            "routes:\n  - name: r\n    match: {path: /x}\n",
            "k.yaml:3:5: routes[0]: ",
            "missing required field \"upstream\"",
        );
        rejects(
            "routes:\n  - {}\n",
            "k.yaml:2:5: routes[0]: ",
            "missing required field \"name\"",
        );
        rejects(
            "routes:\n  - name:\n    match: {path: /x}\n    upstream: http://u\n",
            "k.yaml:2:9: routes[0].name: ",
            "is empty",
        );
    }

    #[test]
    fn yaml_syntax_errors_have_a_location() {
        let e = err_env("listen: a\nlisten: b\n", &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:2:1: listen: this key appears twice in the same mapping"
        );
        rejects("admin:\n  listen: 'x\n", "k.yaml:2:11: ", "invalid YAML");
        rejects(
            "admin:\n  listen: x\n bad: y\n",
            "k.yaml:3:",
            "invalid YAML",
        );
        rejects(
            "listen: a\n---\nlisten: b\n",
            "k.yaml:3:1: ",
            "only one YAML document",
        );
        let e = err_env("listen: *nowhere\n", &[]);
        assert_eq!(e.location, "k.yaml:1:9: ");
    }

    // --- validation ------------------------------------------------------------

    #[test]
    fn listen_addresses() {
        let e = err_env("listen: x\n", &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:1:9: listen: invalid socket address \"x\" (use IP:PORT, e.g. 0.0.0.0:8080)"
        );
        rejects(
            "admin:\n  listen: localhost:8081\n",
            "k.yaml:2:11: admin.listen: ",
            "invalid socket address",
        );
        rejects(
            "listen: 0.0.0.0:9000\nadmin:\n  listen: 127.0.0.1:9000\n",
            "k.yaml:3:11: admin.listen: ",
            "must never share the proxy listener",
        );
        // Only listen was written: the clash is reported there.
        rejects(
            "listen: 127.0.0.1:8081\n",
            "k.yaml:1:9: listen: ",
            "same port",
        );
        rejects(
            "listen: \"[::]:8081\"\n",
            "k.yaml:1:9: listen: ",
            "same port",
        );
        let c = ok("listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n");
        assert_eq!(c.listen.port(), 0);
        let c = ok("listen: 127.0.0.1:8081\nadmin:\n  listen: 127.0.0.2:8081\n");
        assert_eq!(c.admin.listen, "127.0.0.2:8081".parse().unwrap());
    }

    #[test]
    fn tls_files_must_be_readable() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "x").unwrap();
        let missing = dir.path().join("nope.key");
        let yaml = |c: &std::path::Path, k: &std::path::Path| {
            format!("tls:\n  cert: {}\n  key: {}\n", c.display(), k.display())
        };
        rejects(
            &yaml(&missing, &cert),
            "k.yaml:2:9: tls.cert: ",
            "cannot read",
        );
        rejects(
            &yaml(&cert, &missing),
            "k.yaml:3:8: tls.key: ",
            "No such file",
        );
        rejects(
            &yaml(&cert, dir.path()),
            "k.yaml:3:8: tls.key: ",
            "is not a file",
        );
        rejects(
            "tls:\n  cert: ''\n  key: k\n",
            "k.yaml:2:9: tls.cert: ",
            "must not be empty",
        );
        let c = ok(&yaml(&cert, &cert));
        let tls = c.tls.unwrap();
        assert_eq!((tls.cert, tls.key), (cert.clone(), cert));
    }

    #[test]
    fn admin_tokens() {
        let hash = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f";
        let tokens = |list: &str| format!("admin:\n  tokens:\n{list}");
        let c = ok(&tokens(&format!(
            "    - {{name: a, role: developer, sha256: {hash}}}\n    - {{name: b, role: auditor, sha256: \"{}\"}}\n",
            hash.to_uppercase()
        )));
        let roles: Vec<_> = c
            .admin
            .tokens
            .iter()
            .map(|t| (t.name.as_str(), t.role))
            .collect();
        assert_eq!(
            roles,
            [("a", AdminRole::Developer), ("b", AdminRole::Auditor)]
        );
        assert_eq!(c.admin.tokens[0].sha256, c.admin.tokens[1].sha256);
        rejects(
            &tokens(&format!(
                "    - {{name: a, role: admin, sha256: {hash}}}\n    - {{name: a, role: admin, sha256: {hash}}}\n"
            )),
            "k.yaml:4:14: admin.tokens[1].name: ",
            "duplicate name \"a\" (also admin.tokens[0])",
        );
        rejects(
            &tokens(&format!(
                "    - {{name: ' ', role: admin, sha256: {hash}}}\n"
            )),
            "k.yaml:3:14: admin.tokens[0].name: ",
            "must not be empty",
        );
        // A raw token pasted in place of its hash is not echoed back.
        let e = err_env(
            &tokens("    - {name: a, role: admin, sha256: my-secret-token}\n"),
            &[],
        )
        .to_string();
        assert!(
            e.starts_with("k.yaml:3:38: admin.tokens[0].sha256: must be 64 hex digits"),
            "{e}"
        );
        assert!(e.contains("keygate hash-token"), "{e}");
        assert!(!e.contains("my-secret-token"), "{e}");
        rejects(
            &tokens(&format!(
                "    - {{name: a, role: admin, sha256: {}}}\n",
                &hash[..62]
            )),
            "k.yaml:3:38: admin.tokens[0].sha256: ",
            "64 hex",
        );
        rejects(
            &tokens("    - {name: a, sha256: x}\n"),
            "k.yaml:3:",
            "missing required field \"role\"",
        );
    }

    #[test]
    fn store_backends() {
        let c =
            ok("store:\n  backend: redis\n  redis:\n    url: rediss://u:p@cache.internal:6380/2\n");
        assert_eq!(
            c.store.backend,
            StoreBackend::Redis {
                url: "rediss://u:p@cache.internal:6380/2".into(),
                prefix: "keygate:".into(),
                cluster: false,
            }
        );
        let c =
            ok("store:\n  backend: redis\n  redis: {url: 'redis://n1:7000/0', cluster: true}\n");
        assert_eq!(
            c.store.backend,
            StoreBackend::Redis {
                url: "redis://n1:7000/0".into(),
                prefix: "keygate:".into(),
                cluster: true,
            }
        );
        let e = err_env(
            "store:\n  backend: redis\n  redis:\n    url: redis://u:hunter2@n1:7000/2\n    cluster: true\n",
            &[],
        )
        .to_string();
        assert!(
            e.starts_with("k.yaml:4:10: store.redis.url: a Redis Cluster has only database 0"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "the URL may hold a password: {e}");
        rejects(
            "store:\n  backend: redis\n  redis: {url: 'redis://h', cluster: sometimes}\n",
            "k.yaml:3:",
            "true or false",
        );
        let c = ok("store:\n  path: /var/lib/kg.redb\n  redis: {url: redis://h, prefix: 'x:'}\n");
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "/var/lib/kg.redb".into()
            }
        );
        rejects(
            "store:\n  backend: redis\n",
            "k.yaml:2:12: store.backend: ",
            "needs store.redis.url",
        );
        let e = err_env(
            "store:\n  backend: redis\n  redis:\n    url: http://user:hunter2@h\n",
            &[],
        )
        .to_string();
        assert!(
            e.starts_with("k.yaml:4:10: store.redis.url: must be a redis:// or rediss:// URL"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "the URL may hold a password: {e}");
        rejects(
            "store:\n  backend: redis\n  redis:\n    url: 'redis://'\n",
            "k.yaml:4:10: store.redis.url: ",
            "with a host",
        );
        rejects(
            "store:\n  backend: redis\n  redis:\n    url: redis://h\n    prefix: '{kg}:'\n",
            "k.yaml:5:13: store.redis.prefix: ",
            "braces",
        );
        rejects(
            "store:\n  backend: redis\n  redis:\n    url: redis://h\n    prefix: ''\n",
            "k.yaml:5:13: store.redis.prefix: ",
            "1 to 64",
        );
        rejects(
            "store:\n  path: ''\n",
            "k.yaml:2:9: store.path: ",
            "must not be empty",
        );
    }

    #[test]
    fn cache_settings() {
        let c =
            ok("cache:\n  max_keys: 1\n  ttl: 500ms\n  negative_ttl: 0s\n  stale_if_error: 1h\n");
        assert_eq!(c.cache.max_keys, 1);
        assert_eq!(
            (c.cache.ttl, c.cache.negative_ttl, c.cache.stale_if_error),
            (Duration::from_millis(500), secs(0), secs(3600))
        );
        rejects(
            "cache:\n  max_keys: 0\n",
            "k.yaml:2:13: cache.max_keys: ",
            "at least 1",
        );
        rejects(
            "cache:\n  ttl: 0s\n",
            "k.yaml:2:8: cache.ttl: ",
            "more than 0",
        );
        let e = err_env("cache:\n  ttl: 5 parsecs\n", &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:2:8: cache.ttl: invalid duration \"5 parsecs\": unknown unit \"parsecs\" (use ms, s, m, h or d)"
        );
        rejects(
            "cache:\n  stale_if_error: 30\n",
            "k.yaml:2:19: cache.stale_if_error: ",
            "missing unit",
        );
        rejects(
            "cache:\n  negative_ttl: -5s\n",
            "k.yaml:2:17: cache.negative_ttl: ",
            "negative",
        );
    }

    #[test]
    fn key_policy() {
        let c = ok(
            "keys:\n  prefix: acme_live_\n  headers: [Authorization, X-Token]\n  max_ttl: null\n  max_per_owner: 1\n  default_ttl: 1d\n  expiry_notice: 0s\n  purge_expired_after: 1h\n",
        );
        assert_eq!(c.keys.prefix, "acme_live_");
        assert_eq!(
            c.keys.headers,
            [
                CredentialHeader::Authorization,
                CredentialHeader::Raw(http::HeaderName::from_static("x-token"))
            ]
        );
        assert_eq!(
            (c.keys.max_ttl, c.keys.max_per_owner, c.keys.default_ttl),
            (None, 1, secs(DAY))
        );
        assert_eq!(
            (c.keys.expiry_notice, c.keys.purge_expired_after),
            (secs(0), secs(3600))
        );
        assert_eq!(
            ok("keys:\n  max_ttl: ~\n  default_ttl: 10000d\n")
                .keys
                .max_ttl,
            None
        );
        assert_eq!(ok("keys:\n  max_ttl:\n").keys.max_ttl, None);
        assert_eq!(
            ok("keys:\n  default_ttl: 730d\n").keys.default_ttl,
            secs(730 * DAY)
        );

        for bad in ["kg", "k-g_", "", "toolong_prefix_x_", "ké_"] {
            rejects(
                &format!("keys:\n  prefix: \"{bad}\"\n"),
                "k.yaml:2:11: keys.prefix: ",
                "ending in _",
            );
        }
        assert_eq!(
            ok("keys:\n  prefix: a234567890123_x_\n").keys.prefix.len(),
            16
        );
        rejects(
            "keys:\n  headers: []\n",
            "k.yaml:2:12: keys.headers: ",
            "at least one",
        );
        rejects(
            "keys:\n  headers: [X-Api-Key, x-api-key]\n",
            "k.yaml:2:24: keys.headers[1]: ",
            "duplicate header \"x-api-key\" (also keys.headers[0])",
        );
        rejects(
            "keys:\n  headers: [authorization, 'bad header']\n",
            "k.yaml:2:28: keys.headers[1]: ",
            "invalid header name \"bad header\"",
        );
        rejects(
            "keys:\n  headers: [host]\n",
            "k.yaml:2:13: keys.headers[0]: ",
            "cannot carry an API key",
        );
        rejects(
            "keys:\n  headers: [x-keygate-key]\n",
            "k.yaml:2:13: keys.headers[0]: ",
            "cannot carry an API key",
        );
        rejects(
            "keys:\n  default_ttl: 800d\n",
            "k.yaml:2:16: keys.default_ttl: ",
            "800d is longer than keys.max_ttl (730d)",
        );
        rejects(
            "keys:\n  max_ttl: 30d\n",
            "k.yaml:2:12: keys.max_ttl: ",
            "30d is shorter than keys.default_ttl (365d)",
        );
        rejects(
            "keys:\n  default_ttl: 0s\n",
            "k.yaml:2:16: keys.default_ttl: ",
            "more than 0",
        );
        rejects(
            "keys:\n  max_per_owner: 0\n",
            "k.yaml:2:18: keys.max_per_owner: ",
            "from 1 to 1000, not 0",
        );
        rejects(
            "keys:\n  max_per_owner: 1001\n",
            "k.yaml:2:18: keys.max_per_owner: ",
            "from 1 to 1000, not 1001",
        );
        rejects(
            "keys:\n  purge_expired_after: 1.5d\n",
            "k.yaml:2:24: keys.purge_expired_after: ",
            "whole number",
        );
    }

    #[test]
    fn rate_limits_and_trusted_proxies() {
        let c = ok(
            "rate_limit:\n  default: {per_second: 1, burst: 2}\n  failed_auth_per_ip: {per_minute: 3}\n  trusted_proxies: [10.0.0.0/8, 192.168.1.10, '::1', 'fd00::/8']\n",
        );
        assert_eq!(
            c.rate_limit.default,
            RateLimitSpec {
                per_second: 1,
                burst: 2
            }
        );
        assert_eq!(c.rate_limit.failed_auth_per_ip_per_minute, 3);
        let nets = &c.rate_limit.trusted_proxies;
        assert_eq!(
            nets.iter().map(|n| n.prefix_len).collect::<Vec<_>>(),
            [8, 32, 128, 8]
        );
        assert!(nets[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!nets[1].contains("192.168.1.11".parse().unwrap()));
        rejects(
            "rate_limit:\n  trusted_proxies: [10.0.0.0/8, 10.0.0.0/40]\n",
            "k.yaml:2:33: rate_limit.trusted_proxies[1]: ",
            "invalid IP address or CIDR \"10.0.0.0/40\"",
        );
        rejects(
            "rate_limit:\n  default: {per_second: 0, burst: 2}\n",
            "k.yaml:2:25: rate_limit.default.per_second: ",
            "at least 1, not 0",
        );
        rejects(
            "rate_limit:\n  default: {per_second: 1, burst: 0}\n",
            "k.yaml:2:35: rate_limit.default.burst: ",
            "at least 1",
        );
        rejects(
            "rate_limit:\n  default: {per_second: 1}\n",
            "k.yaml:2:",
            "missing required field \"burst\"",
        );
        rejects(
            "rate_limit:\n  failed_auth_per_ip: {per_minute: 0}\n",
            "k.yaml:2:36: rate_limit.failed_auth_per_ip.per_minute: ",
            "at least 1",
        );
        rejects(
            "rate_limit:\n  backend: redis\n",
            "k.yaml:2:12: rate_limit.backend: ",
            "needs store.backend: redis",
        );
        let c = ok(
            "store:\n  backend: redis\n  redis: {url: 'redis://127.0.0.1:6379'}\nrate_limit:\n  backend: redis\n",
        );
        assert_eq!(c.rate_limit.backend, RateLimitBackend::Redis);
    }

    #[test]
    fn webhooks() {
        let hook =
            |fields: &str| format!("notifications:\n  webhooks:\n    - url: https://h/x\n{fields}");
        let c = ok(&hook(
            "      secret_env: WH_SECRET_2\n      events: [key.created, settings.updated]\n",
        ));
        let w = &c.notifications.webhooks[0];
        assert_eq!(
            (w.url.as_str(), w.secret_env.as_str()),
            ("https://h/x", "WH_SECRET_2")
        );
        assert_eq!(w.events, ["key.created", "settings.updated"]);
        rejects(
            "notifications:\n  webhooks:\n    - {url: 'ftp://h', secret_env: S, events: [key.created]}\n",
            "k.yaml:3:13: notifications.webhooks[0].url: ",
            "invalid URL \"ftp://h\": the scheme must be http or https",
        );
        rejects(
            &hook("      secret_env: wh_secret\n      events: [key.created]\n"),
            "k.yaml:4:19: notifications.webhooks[0].secret_env: ",
            "upper-case",
        );
        rejects(
            &hook("      secret_env: ''\n      events: [key.created]\n"),
            "k.yaml:4:19: notifications.webhooks[0].secret_env: ",
            "invalid variable name",
        );
        rejects(
            &hook("      secret_env: S\n      events: []\n"),
            "k.yaml:5:15: notifications.webhooks[0].events: ",
            "at least one",
        );
        rejects(
            &hook("      secret_env: S\n      events: [key.created, key.exploded]\n"),
            "k.yaml:5:29: notifications.webhooks[0].events[1]: ",
            "unknown event type \"key.exploded\" (known: key.created,",
        );
        rejects(
            &hook("      secret_env: S\n      events: [key.created, key.created]\n"),
            "k.yaml:5:29: notifications.webhooks[0].events[1]: ",
            "listed twice",
        );
        rejects(
            &hook("      secret_env: S\n"),
            "k.yaml:",
            "missing required field \"events\"",
        );
    }

    #[test]
    fn routes_are_checked_one_by_one() {
        let c = ok(&route(
            "    scopes: []\n    timeout: 500ms\n    max_body: 1KiB\n",
        ));
        let r = &c.routes[0];
        assert!(r.scopes.is_empty());
        assert_eq!(
            (r.timeout, r.max_body, r.auth, r.rate_limit),
            (Duration::from_millis(500), 1024, RouteAuth::Key, None)
        );
        rejects(
            "routes:\n  - name: ''\n    match: {path: /x}\n    upstream: http://u\n",
            "k.yaml:2:11: routes[0].name: ",
            "must not be empty",
        );
        rejects(
            &route("    timeout: 0s\n"),
            "k.yaml:5:14: routes[0].timeout: ",
            "more than 0",
        );
        rejects(
            &route("    max_body: ten\n"),
            "k.yaml:5:15: routes[0].max_body: ",
            "invalid size \"ten\"",
        );
        rejects(
            &route("    scopes: [a, '']\n"),
            "k.yaml:5:17: routes[0].scopes[1]: ",
            "invalid scope \"\"",
        );
        rejects(
            &route("    scopes: [a, 'b c']\n"),
            "k.yaml:5:17: routes[0].scopes[1]: ",
            "invalid scope \"b c\"",
        );
        rejects(
            &route("    rate_limit: {per_second: 0, burst: 1}\n"),
            "k.yaml:5:30: routes[0].rate_limit.per_second: ",
            "at least 1",
        );
        let c = ok(&route(
            "    scopes: [orders:read, a.b/c-d]\n    rate_limit: {per_second: 2, burst: 3}\n",
        ));
        assert_eq!(
            c.routes[0]
                .scopes
                .iter()
                .map(Scope::as_str)
                .collect::<Vec<_>>(),
            ["orders:read", "a.b/c-d"]
        );
        assert_eq!(
            c.routes[0].rate_limit,
            Some(RateLimitSpec {
                per_second: 2,
                burst: 3
            })
        );
    }

    #[test]
    fn public_routes_cannot_have_scopes_or_key_limits() {
        rejects(
            &route("    auth: none\n    scopes: [a]\n"),
            "k.yaml:6:13: routes[0].scopes: ",
            "would never be checked",
        );
        rejects(
            &route("    auth: none\n    rate_limit: {per_second: 1, burst: 1}\n"),
            "k.yaml:6:17: routes[0].rate_limit: ",
            "has no key",
        );
        let c = ok(&route("    auth: none\n    scopes: []\n"));
        assert_eq!(c.routes[0].auth, RouteAuth::None);
    }

    #[test]
    fn route_matches() {
        let m = |matcher: &str| {
            format!("routes:\n  - name: r\n    match: {matcher}\n    upstream: http://u\n")
        };
        let c = ok(&m("{path_prefix: /a/, host: API.Example.com}"));
        assert_eq!(
            (c.routes[0].host.as_deref(), &c.routes[0].path),
            (Some("api.example.com"), &PathMatch::Prefix("/a/".into()))
        );
        assert_eq!(
            ok(&m("{path: /a, host: '[::1]'}")).routes[0]
                .host
                .as_deref(),
            Some("[::1]")
        );
        rejects(
            &m("{host: a}"),
            "k.yaml:3:12: routes[0].match: ",
            "needs path_prefix or path",
        );
        rejects(
            &m("{path_prefix: /a, path: /a}"),
            "k.yaml:3:36: routes[0].match: ",
            "not both",
        );
        rejects(
            &m("{path: a}"),
            "k.yaml:3:19: routes[0].match.path: ",
            "must start with /",
        );
        rejects(
            &m("{path_prefix: /a/../b}"),
            "k.yaml:3:26: routes[0].match.path_prefix: ",
            ". or .. segments",
        );
        rejects(
            &m("{path_prefix: '/a?x=1'}"),
            "k.yaml:3:26: routes[0].match.path_prefix: ",
            "must not contain '?'",
        );
        rejects(
            &m("{path: /a, host: 'api.example.com:443'}"),
            "k.yaml:3:29: routes[0].match.host: ",
            "without a port",
        );
        rejects(
            &m("{path: /a, host: 'https://api.example.com'}"),
            "k.yaml:3:29: routes[0].match.host: ",
            "without a scheme",
        );
        rejects(
            &m("{path: /a, host: 'a..b'}"),
            "k.yaml:3:29: routes[0].match.host: ",
            "invalid host",
        );
    }

    #[test]
    fn routes_must_differ() {
        let two = |a: &str, b: &str| {
            format!(
                "routes:\n  - name: one\n    match: {a}\n    upstream: http://u\n  - name: two\n    match: {b}\n    upstream: http://u\n"
            )
        };
        rejects(
            &two("{path: /a}", "{path: /a}"),
            "k.yaml:6:12: routes[1].match: ",
            "same host and path as routes[0] (\"one\")",
        );
        rejects(
            &two("{path: /a, host: x.io}", "{path: /a, host: X.io}"),
            "k.yaml:6:12: routes[1].match: ",
            "routes[0]",
        );
        assert_eq!(ok(&two("{path: /a}", "{path_prefix: /a}")).routes.len(), 2);
        assert_eq!(
            ok(&two("{path: /a}", "{path: /a, host: x.io}"))
                .routes
                .len(),
            2
        );
        let dup = "routes:\n  - name: one\n    match: {path: /a}\n    upstream: http://u\n  - name: one\n    match: {path: /b}\n    upstream: http://u\n";
        rejects(
            dup,
            "k.yaml:5:11: routes[1].name: ",
            "duplicate route name \"one\" (also routes[0])",
        );
    }

    #[test]
    fn upstream_urls() {
        let up =
            |u: &str| format!("routes:\n  - name: r\n    match: {{path: /a}}\n    upstream: {u}\n");
        let e = err_env(&up("htp://x"), &[]).to_string();
        assert_eq!(
            e,
            "k.yaml:4:15: routes[0].upstream: invalid URL \"htp://x\": the scheme must be http or https"
        );
        rejects(
            &up("/just/a/path"),
            "k.yaml:4:15: routes[0].upstream: ",
            "invalid URL \"/just/a/path\"",
        );
        rejects(
            &up("http://h/x?y=1"),
            "k.yaml:4:15: routes[0].upstream: ",
            "query",
        );
        rejects(
            &up("http://h/x#y"),
            "k.yaml:4:15: routes[0].upstream: ",
            "fragment",
        );
        rejects(
            &up("http://u:p@h/x"),
            "k.yaml:4:15: routes[0].upstream: ",
            "credentials",
        );
        rejects(
            &up("'http://'"),
            "k.yaml:4:15: routes[0].upstream: ",
            "invalid URL",
        );
        let uri = |u: &str| ok(&up(u)).routes[0].upstream.clone();
        let u = uri("https://Svc.internal:8443/base/");
        assert_eq!(
            (u.scheme_str(), u.host(), u.port_u16(), u.path()),
            (Some("https"), Some("svc.internal"), Some(8443), "/base")
        );
        assert_eq!(
            uri("http://127.0.0.1:9000").to_string(),
            "http://127.0.0.1:9000/"
        );
        assert_eq!(uri("http://127.0.0.1:9000/").path(), "/");
        assert_eq!(uri("http://[::1]:9000/v1").host(), Some("[::1]"));
    }

    #[test]
    fn limits_section() {
        let c = ok(
            "limits:\n  max_connections: 5\n  header_read_timeout: 2s\n  max_header_bytes: 16KiB\n  max_uri_bytes: 4096\n  h2_max_concurrent_streams: 7\n  shutdown_grace: 0s\n  upstream_pool_max_idle_per_host: 0\n",
        );
        let l = &c.limits;
        assert_eq!(
            (
                l.max_connections,
                l.header_read_timeout,
                l.max_header_bytes,
                l.max_uri_bytes
            ),
            (5, secs(2), 16 * 1024, 4096)
        );
        assert_eq!(
            (
                l.h2_max_concurrent_streams,
                l.shutdown_grace,
                l.upstream_pool_max_idle_per_host
            ),
            (7, secs(0), 0)
        );
        assert_eq!(l.max_headers, LimitsConfig::default().max_headers);
        rejects(
            "limits:\n  max_header_bytes: 1KiB\n",
            "k.yaml:2:21: limits.max_header_bytes: ",
            "at least 8KiB",
        );
        rejects(
            "limits:\n  max_connections: 0\n",
            "k.yaml:2:20: limits.max_connections: ",
            "at least 1",
        );
        rejects(
            "limits:\n  upstream_connect_timeout: 0ms\n",
            "k.yaml:2:29: limits.upstream_connect_timeout: ",
            "more than 0",
        );
        rejects(
            "limits:\n  max_uri_bytes: 0\n",
            "k.yaml:2:18: limits.max_uri_bytes: ",
            "more than 0",
        );
    }

    // --- environment overrides --------------------------------------------------

    #[test]
    fn env_overrides_listen_addresses() {
        let env = [
            ("KEYGATE_LISTEN", "127.0.0.1:7000"),
            ("KEYGATE_ADMIN_LISTEN", "127.0.0.1:7001"),
        ];
        let c = ok_env("listen: 0.0.0.0:8080\n", &env);
        assert_eq!((c.listen.port(), c.admin.listen.port()), (7000, 7001));
        let e = err_env("", &[("KEYGATE_LISTEN", "x")]);
        assert_eq!(e.location, "");
        assert_eq!(
            e.to_string(),
            "KEYGATE_LISTEN: invalid socket address \"x\" (use IP:PORT, e.g. 0.0.0.0:8080)"
        );
        rejects_env(
            "",
            &[("KEYGATE_ADMIN_LISTEN", "0.0.0.0:8080")],
            "KEYGATE_ADMIN_LISTEN: ",
            "same port",
        );
        // Variables the config does not know are left to others (KEYGATE_ADMIN_URL is the CLI's).
        assert_defaults(&ok_env(
            "",
            &[("KEYGATE_ADMIN_URL", "http://x"), ("KEYGATE_WHATEVER", "1")],
        ));
    }

    #[test]
    fn env_overrides_the_store() {
        let file = "store:\n  backend: embedded\n  redis: {prefix: 'p:'}\n";
        let c = ok_env(file, &[("KEYGATE_STORE_URL", "redis://r:6379/1")]);
        assert_eq!(
            c.store.backend,
            StoreBackend::Redis {
                url: "redis://r:6379/1".into(),
                prefix: "p:".into(),
                cluster: false,
            }
        );
        let c = ok_env(
            "rate_limit: {backend: redis}\n",
            &[("KEYGATE_STORE_URL", "rediss://r")],
        );
        assert_eq!(c.rate_limit.backend, RateLimitBackend::Redis);
        let redis_file = "store:\n  backend: redis\n  redis: {url: 'redis://h'}\n";
        let c = ok_env(redis_file, &[("KEYGATE_STORE_URL", "/var/lib/kg.redb")]);
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "/var/lib/kg.redb".into()
            }
        );
        let c = ok_env("", &[("KEYGATE_STORE_URL", "file:///srv/kg.redb")]);
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "/srv/kg.redb".into()
            }
        );
        let c = ok_env("", &[("KEYGATE_STORE_URL", "data/other.redb")]);
        assert_eq!(
            c.store.backend,
            StoreBackend::Embedded {
                path: "data/other.redb".into()
            }
        );
        rejects_env(
            "",
            &[("KEYGATE_STORE_URL", "http://x")],
            "KEYGATE_STORE_URL: unsupported scheme \"http\"",
            "redis://",
        );
        rejects_env(
            "",
            &[("KEYGATE_STORE_URL", "redis://")],
            "KEYGATE_STORE_URL: must be a redis://",
            "host",
        );
        rejects_env(
            "",
            &[("KEYGATE_STORE_URL", "file://host/x")],
            "KEYGATE_STORE_URL: invalid file URL",
            "",
        );
        rejects_env(
            "",
            &[("KEYGATE_STORE_URL", "")],
            "KEYGATE_STORE_URL: ",
            "must not be empty",
        );
    }

    #[test]
    fn env_admin_token_is_hashed_and_never_kept() {
        let c = ok_env(
            "admin:\n  tokens:\n    - {name: ops, role: auditor, sha256: e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f}\n",
            &[("KEYGATE_ADMIN_TOKEN", "s3cret-admin-token")],
        );
        let t = &c.admin.tokens[1];
        assert_eq!((t.name.as_str(), t.role), ("env", AdminRole::Admin));
        let want: [u8; 32] = Sha256::digest(b"s3cret-admin-token").into();
        assert_eq!(t.sha256, want);
        assert!(!format!("{c:?}").contains("s3cret"));
        rejects_env(
            "admin:\n  tokens:\n    - {name: env, role: auditor, sha256: e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f}\n",
            &[("KEYGATE_ADMIN_TOKEN", "x")],
            "KEYGATE_ADMIN_TOKEN: ",
            "admin.tokens[0] already has that name",
        );
        rejects_env(
            "",
            &[("KEYGATE_ADMIN_TOKEN", "")],
            "KEYGATE_ADMIN_TOKEN: ",
            "must not be empty",
        );
    }

    // --- load ---------------------------------------------------------------------

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.yaml");
        std::fs::write(
            &path,
            "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n",
        )
        .unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.source.as_deref(), Some(path.as_path()));
        std::fs::write(&path, "listen: 127.0.0.1:0\ncache:\n  ttl: soon\n").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{}:3:8: cache.ttl: invalid duration",
                path.display()
            )),
            "{e}"
        );
        let missing = dir.path().join("nope.yaml");
        let e = load(&missing).unwrap_err();
        assert_eq!(e.location, format!("{}: ", missing.display()));
        assert!(e.message.starts_with("cannot read the config file"), "{e}");
    }

    // --- logging, metrics and reload -------------------------------------------

    #[test]
    fn logging_and_metrics_default_on_and_can_be_switched() {
        let c = ok("");
        assert_eq!(c.logging, LoggingConfig::default());
        assert_eq!(
            (
                c.logging.level.as_str(),
                c.logging.format,
                c.logging.access_log
            ),
            ("info", LogFormat::Pretty, true)
        );
        assert_eq!(c.metrics, MetricsConfig::default());
        assert!(c.metrics.enabled && !c.metrics.key_id_labels);
        let c = ok(
            "logging:\n  level: warn,keygate=debug\n  format: json\n  access_log: false\nmetrics:\n  enabled: false\n  key_id_labels: true\n",
        );
        assert_eq!(c.logging.level, "warn,keygate=debug");
        assert_eq!(c.logging.format, LogFormat::Json);
        assert!(!c.logging.access_log);
        assert!(!c.metrics.enabled && c.metrics.key_id_labels);
    }

    #[test]
    fn bad_logging_and_metrics_values_are_located() {
        rejects(
            "logging:\n  level: \"info,[\"\n",
            "k.yaml:2:10: logging.level: invalid filter",
            "e.g. info",
        );
        rejects(
            "logging:\n  format: xml\n",
            "k.yaml:2:11: logging.format: ",
            "xml",
        );
        rejects(
            "logging:\n  acces_log: true\n",
            "k.yaml:2:3: logging.acces_log: unknown field",
            "access_log",
        );
        rejects(
            "metrics:\n  enabled: sometimes\n",
            "k.yaml:2:12: metrics.enabled: ",
            "expected true or false",
        );
    }

    #[test]
    fn a_reload_keeps_what_needs_a_restart_and_says_so() {
        let running = ok("listen: 127.0.0.1:7000\ncache:\n  max_keys: 10\n  ttl: 30s\n");
        let mut same = running.clone();
        assert!(same.keep_restart_only(&running).is_empty());
        let mut new = ok(&format!(
            "listen: 127.0.0.1:7001\nadmin:\n  listen: 127.0.0.1:7002\nstore:\n  path: other.redb\nlimits:\n  max_connections: 5\ncache:\n  max_keys: 20\n  ttl: 1s\nlogging:\n  format: json\n  access_log: false\n{}",
            route("")
        ));
        let kept = new.keep_restart_only(&running);
        assert_eq!(
            kept,
            [
                "listen",
                "admin.listen",
                "store",
                "limits",
                "cache.max_keys",
                "logging.format"
            ]
        );
        assert_eq!(new.listen, running.listen);
        assert_eq!(new.admin.listen, running.admin.listen);
        assert_eq!(new.store.backend, running.store.backend);
        assert_eq!(new.limits, running.limits);
        assert_eq!(new.cache.max_keys, 10);
        assert_eq!(new.logging.format, LogFormat::Pretty);
        // The rest is applied.
        assert_eq!(new.cache.ttl, secs(1));
        assert!(!new.logging.access_log);
        assert_eq!(new.routes.len(), 1);
    }
}
