//! The raw YAML layer and its validation into [`Config`].
//!
//! The `Raw*` types mirror the file one to one, with `deny_unknown_fields`
//! everywhere. Every value that validation may reject is read as a [`Val`],
//! which goes through [`serde_saphyr::Spanned`] to remember its line and column
//! (or, after an override, the `KEYGATE_*` variable it came from), so that every
//! error names the exact place: `file:line:col: field.path: problem`.
//!
//! Errors from serde-saphyr itself (unknown field, wrong type, bad YAML) carry a
//! location but no field path; [`parse_error`] recovers the path by walking the
//! YAML events up to that location and rewrites the library's message into one
//! plain sentence.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::granit_parser::{Event, Parser};
use sha2::{Digest, Sha256};

use super::units::{parse_duration, parse_size};
use super::{
    AdminConfig, AdminRole, AdminToken, CacheConfig, Config, ConfigError, CredentialHeader,
    ForwardConfig, IpNet, KeysConfig, LimitsConfig, LogFormat, LoggingConfig, MetricsConfig,
    NotificationsConfig, PathMatch, RateLimitBackend, RateLimitConfig, RouteAuth, RouteConfig,
    StoreBackend, StoreConfig, TlsConfig, WebhookConfig,
};
use crate::keys::{MAX_PREFIX_LEN, RateLimitSpec, Scope};

/// The event types a webhook may subscribe to (DESIGN.md section 5). Kept here
/// rather than borrowed from `store::EventType` because `config` is a leaf
/// module; a unit test checks that both lists agree.
pub(super) const EVENT_TYPES: [&str; 11] = [
    "key.created",
    "key.updated",
    "key.revoked",
    "key.suspended",
    "key.reinstated",
    "key.rotated",
    "key.deleted",
    "key.expiring",
    "key.expired",
    "key.purged",
    "settings.updated",
];

/// Name of the admin token added by `KEYGATE_ADMIN_TOKEN`.
pub(super) const ENV_TOKEN_NAME: &str = "env";

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
const DEFAULT_STORE_PATH: &str = "data/keygate.redb";
const DEFAULT_REDIS_PREFIX: &str = "keygate:";
const DEFAULT_KEY_PREFIX: &str = "kg_";
const DEFAULT_LOG_LEVEL: &str = "info";
const MAX_PER_OWNER: u32 = 1000;
/// hyper refuses a read buffer smaller than this (`http1::Builder::max_buf_size`).
const MIN_HEADER_BYTES: u64 = 8 * 1024;

/// Headers that cannot carry a credential: the proxy reads or rewrites them
/// itself, so a key there would be forwarded, misread or dropped.
const RESERVED_HEADERS: [&str; 14] = [
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-type",
    "cookie",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

// ---------------------------------------------------------------------------
// Located values
// ---------------------------------------------------------------------------

/// Where a value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// A place in the file (1-based line and column).
    File { line: u64, column: u64 },
    /// A `KEYGATE_*` environment variable.
    Env(&'static str),
    /// Not given: a default (or a place serde-saphyr could not report).
    Default,
}

/// A value and where it came from; read through [`serde_saphyr::Spanned`].
#[derive(Debug, Clone)]
struct Val<T> {
    value: T,
    at: At,
}

impl<T> Val<T> {
    fn env(value: T, var: &'static str) -> Val<T> {
        Val {
            value,
            at: At::Env(var),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Val<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(d)?;
        // `referenced` is the use site, which differs from `defined` for aliases:
        // the use site is what the field path names.
        let loc = spanned.referenced;
        let at = if loc.line() == 0 {
            At::Default
        } else {
            At::File {
                line: loc.line(),
                column: loc.column(),
            }
        };
        Ok(Val {
            value: spanned.value,
            at,
        })
    }
}

/// `Option<Option<T>>` that tells a missing field (`None`) from an explicit
/// `null` (`Some(None)`); use with `#[serde(default)]`.
fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------
// The raw layer: mirrors the YAML. A section or list written with no value
// (`routes:` with everything below commented out) reads as null and means
// "defaults", hence the `Option`s.
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Val<String>>,
    tls: Option<RawTls>,
    admin: Option<RawAdmin>,
    store: Option<RawStore>,
    cache: Option<RawCache>,
    keys: Option<RawKeys>,
    rate_limit: Option<RawRateLimit>,
    forward: Option<RawForward>,
    notifications: Option<RawNotifications>,
    routes: Option<Vec<RawRoute>>,
    limits: Option<RawLimits>,
    logging: Option<RawLogging>,
    metrics: Option<RawMetrics>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Val<String>,
    key: Val<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Val<String>>,
    tokens: Option<Vec<RawAdminToken>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminToken {
    name: Val<String>,
    role: RawRole,
    sha256: Val<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRole {
    Admin,
    Developer,
    Auditor,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    backend: Option<Val<RawStoreBackend>>,
    path: Option<Val<String>>,
    redis: Option<RawRedis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawStoreBackend {
    Embedded,
    Redis,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<Val<String>>,
    prefix: Option<Val<String>>,
    cluster: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    max_keys: Option<Val<u64>>,
    ttl: Option<Val<String>>,
    negative_ttl: Option<Val<String>>,
    stale_if_error: Option<Val<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    prefix: Option<Val<String>>,
    headers: Option<Val<Vec<Val<String>>>>,
    default_ttl: Option<Val<String>>,
    /// Missing: the default; `null`: no maximum.
    #[serde(default, deserialize_with = "explicit_null")]
    max_ttl: Option<Option<Val<String>>>,
    max_per_owner: Option<Val<u32>>,
    expiry_notice: Option<Val<String>>,
    purge_expired_after: Option<Val<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    backend: Option<Val<RawRateLimitBackend>>,
    default: Option<RawRate>,
    failed_auth_per_ip: Option<RawFailedAuth>,
    trusted_proxies: Option<Vec<Val<String>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRateLimitBackend {
    Local,
    Redis,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: Val<u32>,
    burst: Val<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailedAuth {
    per_minute: Val<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    identity_headers: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    webhooks: Option<Vec<RawWebhook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Val<String>,
    secret_env: Val<String>,
    events: Val<Vec<Val<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Val<String>,
    #[serde(rename = "match")]
    matcher: Val<RawMatch>,
    upstream: Val<String>,
    scopes: Option<Val<Option<Vec<Val<String>>>>>,
    rate_limit: Option<Val<RawRate>>,
    timeout: Option<Val<String>>,
    max_body: Option<Val<String>>,
    auth: Option<RawRouteAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path_prefix: Option<Val<String>>,
    path: Option<Val<String>>,
    host: Option<Val<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRouteAuth {
    Key,
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Val<u64>>,
    header_read_timeout: Option<Val<String>>,
    tls_handshake_timeout: Option<Val<String>>,
    max_headers: Option<Val<u64>>,
    max_header_bytes: Option<Val<String>>,
    max_uri_bytes: Option<Val<String>>,
    h2_max_concurrent_streams: Option<Val<u32>>,
    shutdown_grace: Option<Val<String>>,
    upstream_connect_timeout: Option<Val<String>>,
    upstream_pool_idle_timeout: Option<Val<String>>,
    upstream_pool_max_idle_per_host: Option<Val<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    level: Option<Val<String>>,
    format: Option<RawLogFormat>,
    access_log: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawLogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    key_id_labels: Option<bool>,
}

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

pub(super) fn parse_and_validate(
    text: &str,
    origin: &str,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let raw = serde_saphyr::from_str::<Option<RawConfig>>(text)
        .map_err(|e| parse_error(&e, text, origin))?;
    // An empty file (or one with only comments) is valid: all defaults.
    let mut raw = raw.unwrap_or_default();
    let v = Validator { origin };
    let env_token = v.apply_env(&mut raw, env)?;
    v.config(raw, env_token)
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

struct Validator<'a> {
    origin: &'a str,
}

/// A parsed duration with where it came from and how it was written.
#[derive(Clone)]
struct Dur {
    value: Duration,
    at: At,
    text: String,
}

impl Validator<'_> {
    /// The one place that shapes an error: `file:line:col: path: problem`, or
    /// `VARIABLE: problem` for a value from the environment.
    fn err(&self, at: At, path: &str, problem: impl Display) -> ConfigError {
        match at {
            At::File { line, column } => ConfigError {
                location: format!("{}:{line}:{column}: ", self.origin),
                message: format!("{path}: {problem}"),
            },
            At::Env(var) => ConfigError {
                location: String::new(),
                message: format!("{var}: {problem}"),
            },
            At::Default => ConfigError {
                location: format!("{}: ", self.origin),
                message: format!("{path}: {problem}"),
            },
        }
    }

    /// Applies the `KEYGATE_*` overrides to the raw values; returns the SHA-256 of
    /// `KEYGATE_ADMIN_TOKEN` if set (the raw token is dropped right here).
    fn apply_env(
        &self,
        raw: &mut RawConfig,
        env: &[(String, String)],
    ) -> Result<Option<[u8; 32]>, ConfigError> {
        let mut token = None;
        for (name, value) in env {
            match name.as_str() {
                "KEYGATE_LISTEN" => raw.listen = Some(Val::env(value.clone(), "KEYGATE_LISTEN")),
                "KEYGATE_ADMIN_LISTEN" => {
                    raw.admin.get_or_insert_default().listen =
                        Some(Val::env(value.clone(), "KEYGATE_ADMIN_LISTEN"));
                }
                "KEYGATE_STORE_URL" => {
                    self.apply_store_url(raw.store.get_or_insert_default(), value)?
                }
                "KEYGATE_ADMIN_TOKEN" => {
                    if value.is_empty() {
                        return Err(self.err(
                            At::Env("KEYGATE_ADMIN_TOKEN"),
                            "",
                            "must not be empty",
                        ));
                    }
                    token = Some(Sha256::digest(value.as_bytes()).into());
                }
                // Other KEYGATE_* variables belong to the CLI (KEYGATE_ADMIN_URL).
                _ => {}
            }
        }
        Ok(token)
    }

    /// `KEYGATE_STORE_URL`: a `redis://`/`rediss://` URL selects Redis, a plain
    /// path or `file://` URL the embedded store at that path.
    fn apply_store_url(&self, store: &mut RawStore, value: &str) -> Result<(), ConfigError> {
        const VAR: &str = "KEYGATE_STORE_URL";
        let at = At::Env(VAR);
        let value = value.trim();
        let scheme = value.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("redis" | "rediss") => {
                store.backend = Some(Val::env(RawStoreBackend::Redis, VAR));
                store.redis.get_or_insert_default().url = Some(Val::env(value.to_owned(), VAR));
            }
            Some("file") => {
                let path = url::Url::parse(value)
                    .ok()
                    .and_then(|u| u.to_file_path().ok())
                    .ok_or_else(|| {
                        let hint = "use file:///absolute/path or a plain path";
                        self.err(at, "", format!("invalid file URL {value:?} ({hint})"))
                    })?;
                store.backend = Some(Val::env(RawStoreBackend::Embedded, VAR));
                store.path = Some(Val::env(path.to_string_lossy().into_owned(), VAR));
            }
            Some(other) => {
                let hint = "use redis://, rediss://, file:// or a plain path";
                return Err(self.err(at, "", format!("unsupported scheme {other:?} ({hint})")));
            }
            None => {
                store.backend = Some(Val::env(RawStoreBackend::Embedded, VAR));
                store.path = Some(Val::env(value.to_owned(), VAR));
            }
        }
        Ok(())
    }

    fn config(&self, raw: RawConfig, env_token: Option<[u8; 32]>) -> Result<Config, ConfigError> {
        let (listen, listen_at) =
            self.socket_addr(raw.listen.as_ref(), "listen", DEFAULT_LISTEN)?;
        let tls = raw.tls.as_ref().map(|t| self.tls(t)).transpose()?;
        let admin = self.admin(
            raw.admin.unwrap_or_default(),
            (listen, listen_at),
            env_token,
        )?;
        let store = self.store(raw.store.unwrap_or_default())?;
        let cache = self.cache(raw.cache.unwrap_or_default())?;
        let keys = self.keys(raw.keys.unwrap_or_default())?;
        let rate_limit = self.rate_limit(raw.rate_limit.unwrap_or_default(), &store)?;
        let forward = ForwardConfig {
            identity_headers: raw.forward.and_then(|f| f.identity_headers).unwrap_or(true),
        };
        let notifications = self.notifications(raw.notifications.unwrap_or_default())?;
        let routes = self.routes(raw.routes.unwrap_or_default())?;
        let limits = self.limits(raw.limits.unwrap_or_default())?;
        let logging = self.logging(raw.logging.unwrap_or_default())?;
        let metrics = raw.metrics.unwrap_or_default();
        let metrics = MetricsConfig {
            enabled: metrics.enabled.unwrap_or(true),
            key_id_labels: metrics.key_id_labels.unwrap_or(false),
        };
        Ok(Config {
            source: None,
            listen,
            tls,
            admin,
            store,
            cache,
            keys,
            rate_limit,
            forward,
            notifications,
            routes,
            limits,
            logging,
            metrics,
        })
    }

    fn logging(&self, raw: RawLogging) -> Result<LoggingConfig, ConfigError> {
        let level = match &raw.level {
            None => DEFAULT_LOG_LEVEL.to_owned(),
            Some(v) => {
                let text = v.value.trim();
                if text.is_empty() {
                    return Err(self.err(v.at, "logging.level", "must not be empty"));
                }
                if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(text) {
                    let hint = "e.g. info, warn or info,keygate=debug";
                    return Err(self.err(
                        v.at,
                        "logging.level",
                        format!("invalid filter {text:?}: {e} ({hint})"),
                    ));
                }
                text.to_owned()
            }
        };
        Ok(LoggingConfig {
            level,
            format: match raw.format {
                None | Some(RawLogFormat::Pretty) => LogFormat::Pretty,
                Some(RawLogFormat::Json) => LogFormat::Json,
            },
            access_log: raw.access_log.unwrap_or(true),
        })
    }

    // --- scalar helpers -----------------------------------------------------

    fn socket_addr(
        &self,
        v: Option<&Val<String>>,
        path: &str,
        default: &str,
    ) -> Result<(SocketAddr, At), ConfigError> {
        let (text, at) = match v {
            Some(v) => (v.value.trim(), v.at),
            None => (default, At::Default),
        };
        let addr = text.parse().map_err(|_| {
            self.err(
                at,
                path,
                format!("invalid socket address {text:?} (use IP:PORT, e.g. {default})"),
            )
        })?;
        Ok((addr, at))
    }

    fn duration(
        &self,
        v: Option<&Val<String>>,
        path: &str,
        default: &str,
    ) -> Result<Dur, ConfigError> {
        let (text, at) = match v {
            Some(v) => (v.value.trim(), v.at),
            None => (default, At::Default),
        };
        let value = parse_duration(text).map_err(|e| self.err(at, path, e))?;
        Ok(Dur {
            value,
            at,
            text: text.to_owned(),
        })
    }

    /// A duration that must not be zero.
    fn positive_duration(
        &self,
        v: Option<&Val<String>>,
        path: &str,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(v, path, default)?;
        if d.value.is_zero() {
            return Err(self.err(d.at, path, "must be more than 0"));
        }
        Ok(d.value)
    }

    fn size(
        &self,
        v: Option<&Val<String>>,
        path: &str,
        default: u64,
    ) -> Result<(u64, At), ConfigError> {
        match v {
            Some(v) => parse_size(v.value.trim())
                .map(|n| (n, v.at))
                .map_err(|e| self.err(v.at, path, e)),
            None => Ok((default, At::Default)),
        }
    }

    /// A number at least `min`, or `default` when not given.
    fn at_least<T: Copy + PartialOrd + Display>(
        &self,
        v: Option<&Val<T>>,
        path: &str,
        min: T,
        default: T,
    ) -> Result<T, ConfigError> {
        match v {
            Some(v) if v.value < min => Err(self.err(
                v.at,
                path,
                format!("must be at least {min}, not {}", v.value),
            )),
            Some(v) => Ok(v.value),
            None => Ok(default),
        }
    }

    fn rate(&self, r: &RawRate, path: &str) -> Result<RateLimitSpec, ConfigError> {
        let per_second = self.at_least(Some(&r.per_second), &format!("{path}.per_second"), 1, 1)?;
        let burst = self.at_least(Some(&r.burst), &format!("{path}.burst"), 1, 1)?;
        Ok(RateLimitSpec { per_second, burst })
    }

    /// A string that must not be blank; returned trimmed.
    fn non_empty<'v>(&self, v: &'v Val<String>, path: &str) -> Result<&'v str, ConfigError> {
        let s = v.value.trim();
        if s.is_empty() {
            return Err(self.err(v.at, path, "must not be empty"));
        }
        if s.chars().any(char::is_control) {
            return Err(self.err(v.at, path, "must not contain control characters"));
        }
        Ok(s)
    }

    // --- sections -----------------------------------------------------------

    fn tls(&self, raw: &RawTls) -> Result<TlsConfig, ConfigError> {
        Ok(TlsConfig {
            cert: self.readable_file(&raw.cert, "tls.cert")?,
            key: self.readable_file(&raw.key, "tls.key")?,
        })
    }

    /// A path to a regular file that this process can open (relative paths are
    /// relative to the working directory).
    fn readable_file(&self, v: &Val<String>, path: &str) -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(self.non_empty(v, path)?);
        let file = std::fs::File::open(&p).map_err(|e| {
            self.err(
                v.at,
                path,
                format!("cannot read {:?}: {e}", p.display().to_string()),
            )
        })?;
        match file.metadata() {
            Ok(m) if m.is_file() => Ok(p),
            Ok(_) => Err(self.err(
                v.at,
                path,
                format!("{:?} is not a file", p.display().to_string()),
            )),
            Err(e) => Err(self.err(
                v.at,
                path,
                format!("cannot read {:?}: {e}", p.display().to_string()),
            )),
        }
    }

    fn admin(
        &self,
        raw: RawAdmin,
        (listen, listen_at): (SocketAddr, At),
        env_token: Option<[u8; 32]>,
    ) -> Result<AdminConfig, ConfigError> {
        let (admin_listen, admin_at) =
            self.socket_addr(raw.listen.as_ref(), "admin.listen", DEFAULT_ADMIN_LISTEN)?;
        if addresses_clash(listen, admin_listen) {
            // Point at whichever of the two was written down (admin.listen first).
            let why = "the admin API must never share the proxy listener";
            return Err(if admin_at != At::Default {
                self.err(
                    admin_at,
                    "admin.listen",
                    format!("{admin_listen} uses the same port as listen ({listen}); {why}"),
                )
            } else {
                self.err(
                    listen_at,
                    "listen",
                    format!("{listen} uses the same port as admin.listen ({admin_listen}); {why}"),
                )
            });
        }
        let mut tokens = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, t) in raw.tokens.unwrap_or_default().iter().enumerate() {
            let base = format!("admin.tokens[{i}]");
            let name = self.non_empty(&t.name, &format!("{base}.name"))?;
            if let Some(first) = names.insert(name.to_owned(), i) {
                return Err(self.err(
                    t.name.at,
                    &format!("{base}.name"),
                    format!("duplicate name {name:?} (also admin.tokens[{first}])"),
                ));
            }
            let mut sha256 = [0u8; 32];
            // The value is not echoed: it might be a token pasted by mistake.
            hex::decode_to_slice(t.sha256.value.trim(), &mut sha256).map_err(|_| {
                self.err(
                    t.sha256.at,
                    &format!("{base}.sha256"),
                    "must be 64 hex digits: the SHA-256 of the token (make one with `keygate hash-token`)",
                )
            })?;
            let role = match t.role {
                RawRole::Admin => AdminRole::Admin,
                RawRole::Developer => AdminRole::Developer,
                RawRole::Auditor => AdminRole::Auditor,
            };
            tokens.push(AdminToken {
                name: name.to_owned(),
                role,
                sha256,
            });
        }
        if let Some(sha256) = env_token {
            if let Some(i) = names.get(ENV_TOKEN_NAME) {
                return Err(self.err(
                    At::Env("KEYGATE_ADMIN_TOKEN"),
                    "",
                    format!(
                        "adds an admin token named {ENV_TOKEN_NAME:?}, but admin.tokens[{i}] already has that name"
                    ),
                ));
            }
            tokens.push(AdminToken {
                name: ENV_TOKEN_NAME.to_owned(),
                role: AdminRole::Admin,
                sha256,
            });
        }
        Ok(AdminConfig {
            listen: admin_listen,
            tokens,
        })
    }

    fn store(&self, raw: RawStore) -> Result<StoreConfig, ConfigError> {
        let redis = raw.redis.unwrap_or_default();
        let backend = match &raw.backend {
            None
            | Some(Val {
                value: RawStoreBackend::Embedded,
                ..
            }) => {
                let path = match &raw.path {
                    Some(v) => PathBuf::from(self.non_empty(v, "store.path")?),
                    None => PathBuf::from(DEFAULT_STORE_PATH),
                };
                StoreBackend::Embedded { path }
            }
            Some(Val {
                value: RawStoreBackend::Redis,
                at,
            }) => {
                let url = redis.url.as_ref().ok_or_else(|| {
                    self.err(
                        *at,
                        "store.backend",
                        "redis needs store.redis.url (e.g. redis://127.0.0.1:6379)",
                    )
                })?;
                let cluster = redis.cluster.unwrap_or(false);
                let url = self.redis_url(url, "store.redis.url", cluster)?;
                let prefix = match &redis.prefix {
                    Some(p) => self.redis_prefix(p)?,
                    None => DEFAULT_REDIS_PREFIX.to_owned(),
                };
                StoreBackend::Redis {
                    url,
                    prefix,
                    cluster,
                }
            }
        };
        Ok(StoreConfig { backend })
    }

    /// The URL is never echoed in errors: it may hold a password. A cluster
    /// seed node's URL may not name a database other than 0 (a cluster has no
    /// other).
    fn redis_url(&self, v: &Val<String>, path: &str, cluster: bool) -> Result<String, ConfigError> {
        let text = v.value.trim();
        let url = url::Url::parse(text)
            .map_err(|e| self.err(v.at, path, format!("invalid URL ({e})")))?;
        if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none_or(str::is_empty) {
            return Err(self.err(
                v.at,
                path,
                "must be a redis:// or rediss:// URL with a host, e.g. redis://127.0.0.1:6379",
            ));
        }
        let db = url.path().trim_matches('/');
        if cluster && !db.is_empty() && db != "0" {
            return Err(self.err(
                v.at,
                path,
                "a Redis Cluster has only database 0: drop the /<db> from the URL (store.redis.cluster is true)",
            ));
        }
        Ok(text.to_owned())
    }

    /// The prefix of every Redis key; braces are refused because the store uses
    /// them for Redis Cluster hash tags.
    fn redis_prefix(&self, v: &Val<String>) -> Result<String, ConfigError> {
        let path = "store.redis.prefix";
        let p = &v.value;
        if p.is_empty() || p.len() > 64 {
            return Err(self.err(v.at, path, "must be 1 to 64 characters"));
        }
        if !p
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '{' && c != '}')
        {
            return Err(self.err(
                v.at,
                path,
                format!("invalid prefix {p:?}: use printable ASCII without spaces or braces"),
            ));
        }
        Ok(p.clone())
    }

    fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
        Ok(CacheConfig {
            max_keys: self.at_least(raw.max_keys.as_ref(), "cache.max_keys", 1, 100_000)?,
            ttl: self.positive_duration(raw.ttl.as_ref(), "cache.ttl", "30s")?,
            negative_ttl: self
                .duration(raw.negative_ttl.as_ref(), "cache.negative_ttl", "5s")?
                .value,
            stale_if_error: self
                .duration(raw.stale_if_error.as_ref(), "cache.stale_if_error", "5m")?
                .value,
        })
    }

    fn keys(&self, raw: RawKeys) -> Result<KeysConfig, ConfigError> {
        let prefix = match &raw.prefix {
            Some(v) => self.key_prefix(v)?,
            None => DEFAULT_KEY_PREFIX.to_owned(),
        };
        let headers = match &raw.headers {
            Some(v) => self.credential_headers(v)?,
            None => vec![
                CredentialHeader::Authorization,
                CredentialHeader::Raw(http::HeaderName::from_static("x-api-key")),
            ],
        };
        let default_ttl = self.duration(raw.default_ttl.as_ref(), "keys.default_ttl", "365d")?;
        if default_ttl.value.is_zero() {
            return Err(self.err(default_ttl.at, "keys.default_ttl", "must be more than 0"));
        }
        let max_ttl = match &raw.max_ttl {
            None => Some(self.duration(None, "keys.max_ttl", "730d")?),
            Some(None) => None,
            Some(Some(v)) => Some(self.duration(Some(v), "keys.max_ttl", "730d")?),
        };
        if let Some(max) = &max_ttl
            && default_ttl.value > max.value
        {
            let (d, m) = (&default_ttl.text, &max.text);
            return Err(if default_ttl.at != At::Default {
                self.err(
                    default_ttl.at,
                    "keys.default_ttl",
                    format!("{d} is longer than keys.max_ttl ({m})"),
                )
            } else {
                self.err(
                    max.at,
                    "keys.max_ttl",
                    format!("{m} is shorter than keys.default_ttl ({d})"),
                )
            });
        }
        let max_per_owner = match &raw.max_per_owner {
            Some(v) if !(1..=MAX_PER_OWNER).contains(&v.value) => {
                return Err(self.err(
                    v.at,
                    "keys.max_per_owner",
                    format!("must be from 1 to {MAX_PER_OWNER}, not {}", v.value),
                ));
            }
            Some(v) => v.value,
            None => MAX_PER_OWNER,
        };
        Ok(KeysConfig {
            prefix,
            headers,
            default_ttl: default_ttl.value,
            max_ttl: max_ttl.map(|d| d.value),
            max_per_owner,
            expiry_notice: self
                .duration(raw.expiry_notice.as_ref(), "keys.expiry_notice", "30d")?
                .value,
            purge_expired_after: self
                .duration(
                    raw.purge_expired_after.as_ref(),
                    "keys.purge_expired_after",
                    "90d",
                )?
                .value,
        })
    }

    fn key_prefix(&self, v: &Val<String>) -> Result<String, ConfigError> {
        let p = &v.value;
        let ok = (1..=MAX_PREFIX_LEN).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && p.ends_with('_');
        if !ok {
            return Err(self.err(
                v.at,
                "keys.prefix",
                format!(
                    "invalid prefix {p:?}: use 1 to {MAX_PREFIX_LEN} letters, digits or _ ending in _ (e.g. kg_)"
                ),
            ));
        }
        Ok(p.clone())
    }

    fn credential_headers(
        &self,
        v: &Val<Vec<Val<String>>>,
    ) -> Result<Vec<CredentialHeader>, ConfigError> {
        if v.value.is_empty() {
            return Err(self.err(v.at, "keys.headers", "must name at least one header"));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (i, h) in v.value.iter().enumerate() {
            let path = format!("keys.headers[{i}]");
            let name = h.value.trim().to_ascii_lowercase();
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                return Err(self.err(h.at, &path, format!("invalid header name {:?}", h.value)));
            };
            if RESERVED_HEADERS.contains(&name.as_str()) || name.starts_with("x-keygate-") {
                return Err(self.err(
                    h.at,
                    &path,
                    format!("{name:?} cannot carry an API key: the gateway reads or rewrites that header itself"),
                ));
            }
            if let Some(first) = seen.insert(name.clone(), i) {
                return Err(self.err(
                    h.at,
                    &path,
                    format!("duplicate header {name:?} (also keys.headers[{first}])"),
                ));
            }
            out.push(if header == http::header::AUTHORIZATION {
                CredentialHeader::Authorization
            } else {
                CredentialHeader::Raw(header)
            });
        }
        Ok(out)
    }

    fn rate_limit(
        &self,
        raw: RawRateLimit,
        store: &StoreConfig,
    ) -> Result<RateLimitConfig, ConfigError> {
        let backend = match &raw.backend {
            None
            | Some(Val {
                value: RawRateLimitBackend::Local,
                ..
            }) => RateLimitBackend::Local,
            Some(Val {
                value: RawRateLimitBackend::Redis,
                at,
            }) => {
                if !matches!(store.backend, StoreBackend::Redis { .. }) {
                    return Err(self.err(
                        *at,
                        "rate_limit.backend",
                        "redis needs store.backend: redis (the shared limiter uses the store's Redis)",
                    ));
                }
                RateLimitBackend::Redis
            }
        };
        let default = match &raw.default {
            Some(r) => self.rate(r, "rate_limit.default")?,
            None => RateLimitSpec {
                per_second: 50,
                burst: 100,
            },
        };
        let failed_auth_per_ip_per_minute = match &raw.failed_auth_per_ip {
            Some(f) => self.at_least(
                Some(&f.per_minute),
                "rate_limit.failed_auth_per_ip.per_minute",
                1,
                60,
            )?,
            None => 60,
        };
        let trusted_proxies = raw
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, v)| {
                parse_cidr(v.value.trim()).ok_or_else(|| {
                    self.err(
                        v.at,
                        &format!("rate_limit.trusted_proxies[{i}]"),
                        format!(
                            "invalid IP address or CIDR {:?} (e.g. 10.0.0.1, 10.0.0.0/8 or fd00::/8)",
                            v.value
                        ),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RateLimitConfig {
            backend,
            default,
            failed_auth_per_ip_per_minute,
            trusted_proxies,
        })
    }

    fn notifications(&self, raw: RawNotifications) -> Result<NotificationsConfig, ConfigError> {
        let mut webhooks = Vec::new();
        for (i, w) in raw.webhooks.unwrap_or_default().iter().enumerate() {
            let base = format!("notifications.webhooks[{i}]");
            let url = self.http_url(&w.url, &format!("{base}.url"))?;
            let secret_env = w.secret_env.value.trim();
            if secret_env.is_empty()
                || !secret_env
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(self.err(
                    w.secret_env.at,
                    &format!("{base}.secret_env"),
                    format!(
                        "invalid variable name {secret_env:?}: use upper-case letters, digits and _ (e.g. KEYGATE_WEBHOOK_SECRET)"
                    ),
                ));
            }
            if w.events.value.is_empty() {
                return Err(self.err(
                    w.events.at,
                    &format!("{base}.events"),
                    "must list at least one event type",
                ));
            }
            let mut events: Vec<String> = Vec::new();
            for (j, e) in w.events.value.iter().enumerate() {
                let path = format!("{base}.events[{j}]");
                let name = e.value.trim();
                if !EVENT_TYPES.contains(&name) {
                    return Err(self.err(
                        e.at,
                        &path,
                        format!(
                            "unknown event type {name:?} (known: {})",
                            EVENT_TYPES.join(", ")
                        ),
                    ));
                }
                if events.iter().any(|x| x == name) {
                    return Err(self.err(e.at, &path, format!("{name:?} is listed twice")));
                }
                events.push(name.to_owned());
            }
            webhooks.push(WebhookConfig {
                url,
                secret_env: secret_env.to_owned(),
                events,
            });
        }
        Ok(NotificationsConfig { webhooks })
    }

    /// An absolute `http`/`https` URL with a host.
    fn http_url(&self, v: &Val<String>, path: &str) -> Result<url::Url, ConfigError> {
        let text = v.value.trim();
        let url = url::Url::parse(text)
            .map_err(|e| self.err(v.at, path, format!("invalid URL {text:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.err(
                v.at,
                path,
                format!("invalid URL {text:?}: the scheme must be http or https"),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(self.err(v.at, path, format!("invalid URL {text:?}: it has no host")));
        }
        Ok(url)
    }

    fn routes(&self, raw: Vec<RawRoute>) -> Result<Vec<RouteConfig>, ConfigError> {
        let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.len());
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, r) in raw.iter().enumerate() {
            let base = format!("routes[{i}]");
            let name = self.non_empty(&r.name, &format!("{base}.name"))?;
            if let Some(first) = names.insert(name.to_owned(), i) {
                return Err(self.err(
                    r.name.at,
                    &format!("{base}.name"),
                    format!("duplicate route name {name:?} (also routes[{first}])"),
                ));
            }
            let (host, path) = self.route_match(&r.matcher, &base)?;
            if let Some(j) = routes.iter().position(|o| o.host == host && o.path == path) {
                return Err(self.err(
                    r.matcher.at,
                    &format!("{base}.match"),
                    format!(
                        "same host and path as routes[{j}] ({:?}); one of them would never be used",
                        routes[j].name
                    ),
                ));
            }
            let upstream = self.upstream(&r.upstream, &format!("{base}.upstream"))?;
            let auth = match r.auth {
                None | Some(RawRouteAuth::Key) => RouteAuth::Key,
                Some(RawRouteAuth::None) => RouteAuth::None,
            };
            let scopes = match &r.scopes {
                Some(Val {
                    value: Some(list),
                    at,
                }) if !list.is_empty() && auth == RouteAuth::None => {
                    return Err(self.err(
                        *at,
                        &format!("{base}.scopes"),
                        "a route with auth: none checks no key, so its scopes would never be checked; remove them or the auth: none",
                    ));
                }
                Some(Val {
                    value: Some(list), ..
                }) => list
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        Scope::parse(&s.value)
                            .map_err(|e| self.err(s.at, &format!("{base}.scopes[{j}]"), e))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            let rate_limit = match &r.rate_limit {
                Some(rl) if auth == RouteAuth::None => {
                    return Err(self.err(
                        rl.at,
                        &format!("{base}.rate_limit"),
                        "a route's rate_limit caps each key, and a route with auth: none has no key; remove it or the auth: none",
                    ));
                }
                Some(rl) => Some(self.rate(&rl.value, &format!("{base}.rate_limit"))?),
                None => None,
            };
            let timeout =
                self.positive_duration(r.timeout.as_ref(), &format!("{base}.timeout"), "30s")?;
            let (max_body, _) = self.size(
                r.max_body.as_ref(),
                &format!("{base}.max_body"),
                10 * 1024 * 1024,
            )?;
            routes.push(RouteConfig {
                name: name.to_owned(),
                host,
                path,
                upstream,
                scopes,
                rate_limit,
                timeout,
                max_body,
                auth,
            });
        }
        Ok(routes)
    }

    fn route_match(
        &self,
        m: &Val<RawMatch>,
        base: &str,
    ) -> Result<(Option<String>, PathMatch), ConfigError> {
        let path = match (&m.value.path_prefix, &m.value.path) {
            (Some(p), None) => {
                PathMatch::Prefix(self.route_path(p, &format!("{base}.match.path_prefix"))?)
            }
            (None, Some(p)) => PathMatch::Exact(self.route_path(p, &format!("{base}.match.path"))?),
            (Some(_), Some(p)) => {
                return Err(self.err(
                    p.at,
                    &format!("{base}.match"),
                    "give path_prefix or path, not both",
                ));
            }
            (None, None) => {
                return Err(self.err(m.at, &format!("{base}.match"), "needs path_prefix or path"));
            }
        };
        let host = m
            .value
            .host
            .as_ref()
            .map(|h| self.route_host(h, &format!("{base}.match.host")))
            .transpose()?;
        Ok((host, path))
    }

    /// Request paths are normalised (dot segments resolved) before routing, so
    /// a route path must already be in that form to ever match.
    fn route_path(&self, v: &Val<String>, path: &str) -> Result<String, ConfigError> {
        let p = &v.value;
        if !p.starts_with('/') {
            return Err(self.err(v.at, path, format!("{p:?} must start with /")));
        }
        let bad_char = p
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#'));
        if let Some(c) = bad_char {
            return Err(self.err(v.at, path, format!("{p:?} must not contain {c:?}")));
        }
        if p.split('/').any(|seg| seg == "." || seg == "..") {
            return Err(self.err(
                v.at,
                path,
                format!("{p:?} must not contain . or .. segments"),
            ));
        }
        Ok(p.clone())
    }

    fn route_host(&self, v: &Val<String>, path: &str) -> Result<String, ConfigError> {
        let host = v.value.trim().to_ascii_lowercase();
        let bad = |why: &str| {
            self.err(
                v.at,
                path,
                format!("invalid host {:?}: {why} (e.g. api.example.com)", v.value),
            )
        };
        if host.contains("://") {
            return Err(bad("give the host name only, without a scheme"));
        }
        if host.contains('/') {
            return Err(bad("give the host name only, without a path"));
        }
        let ipv6 = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if let Some(inner) = ipv6 {
            return match inner.parse::<std::net::Ipv6Addr>() {
                Ok(_) => Ok(host),
                Err(_) => Err(bad("not an IPv6 address")),
            };
        }
        if host.contains(':') {
            return Err(bad("give the host name only, without a port"));
        }
        let ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return Err(bad("use letters, digits, - and . only"));
        }
        Ok(host)
    }

    /// An absolute `http`/`https` URL with a host and no query, fragment or user
    /// info; the trailing `/` of its path is dropped, so that the path can be
    /// prepended to request paths.
    fn upstream(&self, v: &Val<String>, path: &str) -> Result<http::Uri, ConfigError> {
        let url = self.http_url(v, path)?;
        let text = v.value.trim();
        let bad = |why: &str| self.err(v.at, path, format!("invalid URL {text:?}: {why}"));
        if url.query().is_some() {
            return Err(bad("an upstream URL cannot have a query (?...)"));
        }
        if url.fragment().is_some() {
            return Err(bad("an upstream URL cannot have a fragment (#...)"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("an upstream URL cannot hold credentials"));
        }
        let s = &url[..url::Position::AfterPath];
        let s = s.trim_end_matches('/');
        http::Uri::try_from(s).map_err(|e| bad(&e.to_string()))
    }

    fn limits(&self, raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
        let d = LimitsConfig::default();
        let ms = |x: Duration| format!("{}ms", x.as_millis());
        let to_usize = |(n, at): (u64, At), path: &str| {
            usize::try_from(n).map_err(|_| self.err(at, path, format!("{n} is too large")))
        };
        let count = |v: Option<&Val<u64>>,
                     path: &str,
                     min: u64,
                     default: usize|
         -> Result<usize, ConfigError> {
            let n = self.at_least(v, path, min, default as u64)?;
            to_usize((n, v.map_or(At::Default, |v| v.at)), path)
        };
        let (max_header_bytes, header_at) = self.size(
            raw.max_header_bytes.as_ref(),
            "limits.max_header_bytes",
            d.max_header_bytes as u64,
        )?;
        if max_header_bytes < MIN_HEADER_BYTES {
            return Err(self.err(
                header_at,
                "limits.max_header_bytes",
                "must be at least 8KiB",
            ));
        }
        let (max_uri_bytes, uri_at) = self.size(
            raw.max_uri_bytes.as_ref(),
            "limits.max_uri_bytes",
            d.max_uri_bytes as u64,
        )?;
        if max_uri_bytes == 0 {
            return Err(self.err(uri_at, "limits.max_uri_bytes", "must be more than 0"));
        }
        Ok(LimitsConfig {
            max_connections: count(
                raw.max_connections.as_ref(),
                "limits.max_connections",
                1,
                d.max_connections,
            )?,
            header_read_timeout: self.positive_duration(
                raw.header_read_timeout.as_ref(),
                "limits.header_read_timeout",
                &ms(d.header_read_timeout),
            )?,
            tls_handshake_timeout: self.positive_duration(
                raw.tls_handshake_timeout.as_ref(),
                "limits.tls_handshake_timeout",
                &ms(d.tls_handshake_timeout),
            )?,
            max_headers: count(
                raw.max_headers.as_ref(),
                "limits.max_headers",
                1,
                d.max_headers,
            )?,
            max_header_bytes: to_usize((max_header_bytes, header_at), "limits.max_header_bytes")?,
            max_uri_bytes: to_usize((max_uri_bytes, uri_at), "limits.max_uri_bytes")?,
            h2_max_concurrent_streams: self.at_least(
                raw.h2_max_concurrent_streams.as_ref(),
                "limits.h2_max_concurrent_streams",
                1,
                d.h2_max_concurrent_streams,
            )?,
            shutdown_grace: self
                .duration(
                    raw.shutdown_grace.as_ref(),
                    "limits.shutdown_grace",
                    &ms(d.shutdown_grace),
                )?
                .value,
            upstream_connect_timeout: self.positive_duration(
                raw.upstream_connect_timeout.as_ref(),
                "limits.upstream_connect_timeout",
                &ms(d.upstream_connect_timeout),
            )?,
            upstream_pool_idle_timeout: self
                .duration(
                    raw.upstream_pool_idle_timeout.as_ref(),
                    "limits.upstream_pool_idle_timeout",
                    &ms(d.upstream_pool_idle_timeout),
                )?
                .value,
            upstream_pool_max_idle_per_host: count(
                raw.upstream_pool_max_idle_per_host.as_ref(),
                "limits.upstream_pool_max_idle_per_host",
                0,
                d.upstream_pool_max_idle_per_host,
            )?,
        })
    }
}

/// Whether two listeners would fight over a port: the same port, and either the
/// same IP or one of them on the unspecified address. Port 0 (pick any free
/// port) never clashes.
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `10.0.0.0/8`, `fd00::/8`, or a bare IP (a single-address network).
fn parse_cidr(s: &str) -> Option<IpNet> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<u8>().ok()?
        }
        Some(_) => return None,
        None => max,
    };
    (prefix_len <= max).then_some(IpNet { addr, prefix_len })
}

// ---------------------------------------------------------------------------
// Parse errors
// ---------------------------------------------------------------------------

/// Rewrites a serde-saphyr error into `file:line:col: field.path: problem`.
fn parse_error(e: &serde_saphyr::Error, text: &str, origin: &str) -> ConfigError {
    use serde_saphyr::Error as E;

    let loc = e.location().filter(|l| l.line() > 0);
    let location = match loc {
        Some(l) => format!("{origin}:{}:{}: ", l.line(), l.column()),
        None => format!("{origin}: "),
    };
    let nodes = match loc {
        Some(l) => yaml_nodes(text, l.line(), l.column()),
        None => Vec::new(),
    };
    let value = nodes.iter().find(|n| !n.is_key);
    let key = nodes.iter().find(|n| n.is_key);
    let value_path = value.map(|n| n.path.as_str());
    let got = value.map(Node::describe);

    let inner = innermost(e);
    let (path, problem): (Option<&str>, String) = match inner {
        E::SerdeUnknownField {
            field, expected, ..
        } => {
            let allowed = if expected.is_empty() {
                "this section takes no fields".to_owned()
            } else {
                format!("allowed here: {}", expected.join(", "))
            };
            match key {
                Some(k) => (Some(k.path.as_str()), format!("unknown field ({allowed})")),
                None => (None, format!("unknown field {field:?} ({allowed})")),
            }
        }
        E::SerdeMissingField { field, .. } => {
            // Reported at a key of the incomplete mapping (or at the mapping).
            let path = key.map(|k| k.parent.as_str()).or(value_path);
            (path, format!("missing required field {field:?}"))
        }
        E::DuplicateMappingKey { .. } => (
            key.map(|k| k.path.as_str()),
            "this key appears twice in the same mapping".to_owned(),
        ),
        E::SerdeUnknownVariant {
            variant, expected, ..
        } => (
            value_path,
            format!(
                "unknown value {variant:?} (allowed: {})",
                expected.join(", ")
            ),
        ),
        E::InvalidScalar { ty, .. } => (
            value_path,
            expected_got(&expected_scalar(ty), got.as_deref()),
        ),
        E::Unexpected { expected, .. } => (
            value_path,
            expected_got(&expected_node(expected), got.as_deref()),
        ),
        E::NullIntoString { .. } => (value_path, "is empty; a value is required here".to_owned()),
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        }
        | E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => (value_path, format!("expected {expected}, got {unexpected}")),
        E::Message { msg, .. } => (value_path, msg.clone()),
        E::UnknownAnchor { .. } => (
            None,
            "invalid YAML: this alias (*name) refers to no anchor (&name) before it".to_owned(),
        ),
        E::MultipleDocuments { .. } => (
            None,
            "only one YAML document is allowed (remove the second ---)".to_owned(),
        ),
        E::ExternalMessage { .. } => (None, format!("invalid YAML: {}", library_message(inner))),
        other => (value_path, library_message(other)),
    };
    let message = match path {
        Some(p) if !p.is_empty() => format!("{p}: {problem}"),
        _ => problem,
    };
    ConfigError {
        location,
        message: one_line(&message),
    }
}

/// The error under any alias or snippet wrappers.
fn innermost(mut e: &serde_saphyr::Error) -> &serde_saphyr::Error {
    loop {
        match e {
            serde_saphyr::Error::WithSnippet { error, .. }
            | serde_saphyr::Error::AliasError { error, .. } => e = error,
            other => return other,
        }
    }
}

/// The library's own user-facing wording, without location or snippet.
fn library_message(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::MessageFormatter;
    serde_saphyr::UserMessageFormatter
        .format_message(e)
        .into_owned()
}

fn expected_scalar(ty: &str) -> String {
    let max = match ty {
        "u8" => Some(u64::from(u8::MAX)),
        "u16" => Some(u64::from(u16::MAX)),
        "u32" => Some(u64::from(u32::MAX)),
        "u64" | "usize" => Some(u64::MAX),
        _ => None,
    };
    match (ty, max) {
        (_, Some(max)) => format!("a whole number from 0 to {max}"),
        ("boolean" | "bool", _) => "true or false".to_owned(),
        ("f32" | "f64", _) => "a number".to_owned(),
        (t, _) if t.starts_with('i') => "a whole number".to_owned(),
        (t, _) => format!("a {t}"),
    }
}

fn expected_node(expected: &str) -> String {
    match expected {
        "sequence start" => "a list".to_owned(),
        "mapping start" => "a mapping (key: value pairs)".to_owned(),
        "string scalar" | "scalar" => "a single value".to_owned(),
        other => other.to_owned(),
    }
}

fn expected_got(expected: &str, got: Option<&str>) -> String {
    match got {
        Some(got) => format!("expected {expected}, got {got}"),
        None => format!("expected {expected}"),
    }
}

/// Errors are printed on one line; YAML text may hold anything.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A YAML node at the error location, with its field path.
#[derive(Debug)]
struct Node {
    /// `routes[0].upstream`; empty for the document root.
    path: String,
    /// The path of the enclosing mapping or list.
    parent: String,
    /// Whether this node is a mapping key (its path then names the key itself).
    is_key: bool,
    kind: NodeKind,
}

#[derive(Debug)]
enum NodeKind {
    Scalar(String),
    Alias,
    Mapping,
    List,
}

impl Node {
    fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Scalar(s) if s.chars().count() > 60 => {
                format!(
                    "{:?}",
                    format!("{}…", s.chars().take(60).collect::<String>())
                )
            }
            NodeKind::Scalar(s) => format!("{s:?}"),
            NodeKind::Alias => "an alias".to_owned(),
            NodeKind::Mapping => "a mapping".to_owned(),
            NodeKind::List => "a list".to_owned(),
        }
    }
}

enum Frame {
    Map {
        path: String,
        key: String,
        expect_key: bool,
    },
    List {
        path: String,
        next: usize,
    },
}

/// Walks the YAML events and returns the nodes that start at `line`:`column`
/// (1-based), outermost first, with their field paths. Stops at a syntax error:
/// only the nodes before it are known.
fn yaml_nodes(text: &str, line: u64, column: u64) -> Vec<Node> {
    fn join(path: &str, key: &str) -> String {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    }
    /// Where a node that starts now sits: its path, its parent's path, and
    /// whether it is a key.
    fn place(stack: &mut [Frame], key_text: Option<&str>) -> (String, String, bool) {
        match stack.last_mut() {
            None => (String::new(), String::new(), false),
            Some(Frame::List { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                (p, path.clone(), false)
            }
            Some(Frame::Map {
                path,
                key,
                expect_key: true,
            }) => {
                *key = key_text.unwrap_or("?").to_owned();
                (join(path, key), path.clone(), true)
            }
            Some(Frame::Map {
                path,
                key,
                expect_key: false,
            }) => (join(path, key), path.clone(), false),
        }
    }
    /// A node is complete: a mapping then alternates between key and value.
    fn finish(stack: &mut [Frame]) {
        if let Some(Frame::Map { expect_key, .. }) = stack.last_mut() {
            *expect_key = !*expect_key;
        }
    }

    let mut stack: Vec<Frame> = Vec::new();
    let mut found = Vec::new();
    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else { break };
        let here = span.start.line() as u64 == line && span.start.col() as u64 + 1 == column;
        let (kind, opens) = match event {
            Event::Scalar(s, ..) => (NodeKind::Scalar(s.into_owned()), false),
            Event::Alias(_) => (NodeKind::Alias, false),
            Event::MappingStart(..) => (NodeKind::Mapping, true),
            Event::SequenceStart(..) => (NodeKind::List, true),
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                finish(&mut stack);
                continue;
            }
            _ => continue,
        };
        let key_text = match &kind {
            NodeKind::Scalar(s) => Some(s.as_str()),
            _ => None,
        };
        let (path, parent, is_key) = place(&mut stack, key_text);
        if opens {
            let frame = match kind {
                NodeKind::Mapping => Frame::Map {
                    path: path.clone(),
                    key: String::new(),
                    expect_key: true,
                },
                _ => Frame::List {
                    path: path.clone(),
                    next: 0,
                },
            };
            stack.push(frame);
        } else {
            finish(&mut stack);
        }
        if here {
            found.push(Node {
                path,
                parent,
                is_key,
                kind,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn event_types_match_the_store() {
        for t in EVENT_TYPES {
            let parsed = crate::store::EventType::parse(t).map(|e| e.as_str());
            assert_eq!(parsed, Some(t), "{t}");
        }
        let unique: HashSet<_> = EVENT_TYPES.iter().collect();
        assert_eq!(unique.len(), EVENT_TYPES.len());
    }

    #[test]
    fn listeners_clash_on_the_same_port_unless_port_zero() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(addresses_clash(a("0.0.0.0:8080"), a("127.0.0.1:8080")));
        assert!(addresses_clash(a("127.0.0.1:8080"), a("0.0.0.0:8080")));
        assert!(addresses_clash(a("[::]:8080"), a("127.0.0.1:8080")));
        assert!(addresses_clash(a("127.0.0.1:8080"), a("127.0.0.1:8080")));
        assert!(!addresses_clash(a("127.0.0.1:8080"), a("127.0.0.2:8080")));
        assert!(!addresses_clash(a("0.0.0.0:8080"), a("0.0.0.0:8081")));
        assert!(!addresses_clash(a("0.0.0.0:0"), a("0.0.0.0:0")));
    }

    #[test]
    fn cidrs_and_bare_ips() {
        let v4: IpAddr = "10.0.0.0".parse().unwrap();
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Some(IpNet {
                addr: v4,
                prefix_len: 8
            })
        );
        assert_eq!(parse_cidr("10.0.0.0").map(|n| n.prefix_len), Some(32));
        assert_eq!(parse_cidr("::1").map(|n| n.prefix_len), Some(128));
        assert_eq!(parse_cidr("fd00::/8").map(|n| n.prefix_len), Some(8));
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "x",
            "",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
    }

    #[test]
    fn yaml_nodes_know_their_paths() {
        let text = "a:\n  b: [x, {c: 1}]\nl:\n  - k: v\n    m: n\n";
        let at = |line, col| {
            yaml_nodes(text, line, col)
                .into_iter()
                .map(|n| (n.path, n.is_key))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            at(2, 3),
            vec![("a".to_owned(), false), ("a.b".to_owned(), true)]
        );
        assert_eq!(at(2, 6), vec![("a.b".to_owned(), false)]);
        assert_eq!(at(2, 7), vec![("a.b[0]".to_owned(), false)]);
        assert_eq!(at(2, 14), vec![("a.b[1].c".to_owned(), false)]);
        assert_eq!(
            at(4, 5),
            vec![("l[0]".to_owned(), false), ("l[0].k".to_owned(), true)]
        );
        assert_eq!(at(5, 8), vec![("l[0].m".to_owned(), false)]);
    }
}
