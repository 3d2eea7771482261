//! Configuration: the YAML file operators edit, validated once at load.
//!
//! Two layers, as in rust-rpxy: [`raw`] mirrors the YAML with serde
//! (`deny_unknown_fields`, every value wrapped in a span so errors can name
//! file:line:column), and [`Config`] here is the validated form the rest of the
//! code uses, so nothing downstream re-checks input. [`load`] reads a file,
//! applies `KEYGATE_*` environment overrides and validates.

mod raw;
mod units;

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
}

#[derive(Debug, Clone)]
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
    Embedded { path: PathBuf },
    Redis { url: String, prefix: String },
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
                let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
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
#[derive(Debug, Clone)]
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

/// Reads, overrides from the environment and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        location: format!("{}: ", path.display()),
        message: format!("cannot read the config file: {e}"),
    })?;
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("KEYGATE_")).collect();
    let mut cfg = parse(&text, &path.display().to_string(), &env)?;
    cfg.source = Some(path.to_owned());
    Ok(cfg)
}

/// Parses and validates YAML `text`; `origin` names it in errors; `env` holds the
/// `KEYGATE_*` variables to apply.
pub fn parse(text: &str, origin: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    raw::parse_and_validate(text, origin, env)
}
