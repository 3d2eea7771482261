//! The record stage (DESIGN.md section 8, last): once a request has its
//! answer, count it and write its access line.
//!
//! Cheap by construction: [`RequestTelemetry`] is built with each compiled
//! config, so the request path finds its route's counter and histogram
//! handles by one hash of the route name, and the `(status, code)` counters
//! are created on first use and then read with one atomic load. Label values
//! are `&'static str` or the route's own name, so nothing is formatted per
//! request. With `metrics.enabled: false` and `logging.access_log: false` the
//! stage is two flag checks: no clock reads, no counters, no line.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode, Uri};
use metrics::Counter;

use super::access;
use super::histogram::{Family, Latency};
use super::redact::Redactor;
use crate::auth::Principal;
use crate::config::{Config, CredentialHeader};
use crate::error::GatewayError;

/// `keygate_requests_total{route, status, code}`.
pub const REQUESTS: &str = "keygate_requests_total";
/// `keygate_request_duration_seconds{route}`.
pub const REQUEST_DURATION: &str = "keygate_request_duration_seconds";
/// `keygate_upstream_duration_seconds{route}`.
pub const UPSTREAM_DURATION: &str = "keygate_upstream_duration_seconds";
/// The two latency histograms, per route (see [`super::histogram`]).
pub static REQUEST_DURATIONS: Family = Family::new(
    REQUEST_DURATION,
    "Time from request head to response head, by route",
    "route",
);
pub static UPSTREAM_DURATIONS: Family = Family::new(
    UPSTREAM_DURATION,
    "Time the upstream took to send its response head, by route",
    "route",
);
/// `keygate_auth_failures_total{code}`.
pub const AUTH_FAILURES: &str = "keygate_auth_failures_total";
/// `keygate_upstream_errors_total{kind}`.
pub const UPSTREAM_ERRORS: &str = "keygate_upstream_errors_total";
/// `keygate_key_requests_total{key_id, code}` (opt-in).
pub const KEY_REQUESTS: &str = "keygate_key_requests_total";

/// The `code` of an answer that came from the upstream.
pub const UPSTREAM_CODE: &str = "upstream";

/// Every `code` keygate answers with, in [`code_slot`] order.
const CODES: [&str; 19] = [
    "no_route",
    "missing_key",
    "invalid_key",
    "key_expired",
    "key_revoked",
    "key_suspended",
    "api_keys_disabled",
    "insufficient_scope",
    "read_only_key",
    "rate_limited",
    "too_many_failures",
    "payload_too_large",
    "store_unavailable",
    "upstream_unavailable",
    "upstream_timeout",
    "bad_path",
    "uri_too_long",
    "bad_request",
    "headers_too_large",
];

/// The index of `e`'s code in [`CODES`]; exhaustive, so a new error variant
/// cannot ship without a metric slot.
fn code_slot(e: &GatewayError) -> usize {
    match e {
        GatewayError::NoRoute => 0,
        GatewayError::MissingKey => 1,
        GatewayError::InvalidKey => 2,
        GatewayError::KeyExpired => 3,
        GatewayError::KeyRevoked | GatewayError::KeyRotated => 4,
        GatewayError::KeySuspended => 5,
        GatewayError::ApiKeysDisabled => 6,
        GatewayError::InsufficientScope { .. } => 7,
        GatewayError::ReadOnlyKey => 8,
        GatewayError::RateLimited { .. } => 9,
        GatewayError::TooManyFailures { .. } => 10,
        GatewayError::PayloadTooLarge { .. } => 11,
        GatewayError::StoreUnavailable => 12,
        GatewayError::UpstreamUnavailable => 13,
        GatewayError::UpstreamTimeout => 14,
        GatewayError::BadPath => 15,
        GatewayError::UriTooLong => 16,
        GatewayError::BadRequest(_) => 17,
        GatewayError::HeadersTooLarge { .. } => 18,
    }
}

/// Status codes keygate can see: 100 to 599 (hyper refuses others).
const STATUS_MIN: u16 = 100;
const STATUS_COUNT: usize = 500;

/// `"100" "101" ... "599"` back to back, so a status label is a `&'static str`.
static STATUS_DIGITS: [u8; STATUS_COUNT * 3] = {
    let mut out = [0u8; STATUS_COUNT * 3];
    let mut i = 0;
    while i < STATUS_COUNT {
        let n = STATUS_MIN as usize + i;
        out[i * 3] = b'0' + (n / 100) as u8;
        out[i * 3 + 1] = b'0' + (n / 10 % 10) as u8;
        out[i * 3 + 2] = b'0' + (n % 10) as u8;
        i += 1;
    }
    out
};

/// The status as a static label, e.g. `"200"`.
pub fn status_label(status: StatusCode) -> &'static str {
    let Some(i) = status_index(status) else {
        return "other";
    };
    std::str::from_utf8(&STATUS_DIGITS[i * 3..i * 3 + 3]).unwrap_or("other")
}

fn status_index(status: StatusCode) -> Option<usize> {
    let i = usize::from(status.as_u16().checked_sub(STATUS_MIN)?);
    (i < STATUS_COUNT).then_some(i)
}

/// Handles created on first use, then shared: `OnceLock` makes the common case
/// one atomic load.
struct LazyCounters {
    slots: Box<[OnceLock<Counter>]>,
}

impl LazyCounters {
    fn new(n: usize) -> LazyCounters {
        LazyCounters {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get(&self, i: usize, make: impl FnOnce() -> Counter) -> Option<&Counter> {
        self.slots.get(i).map(|slot| slot.get_or_init(make))
    }
}

/// One route's handles.
struct RouteMeters {
    name: Arc<str>,
    /// Upstream answers by status.
    by_status: LazyCounters,
    /// keygate's own answers by code.
    by_code: LazyCounters,
    duration: Arc<Latency>,
    upstream: Arc<Latency>,
}

impl RouteMeters {
    fn new(name: &str) -> RouteMeters {
        let name: Arc<str> = name.into();
        RouteMeters {
            duration: REQUEST_DURATIONS.series(&name),
            upstream: UPSTREAM_DURATIONS.series(&name),
            by_status: LazyCounters::new(STATUS_COUNT),
            by_code: LazyCounters::new(CODES.len()),
            name,
        }
    }

    fn answer(&self, status: StatusCode, error: Option<&GatewayError>) -> Option<&Counter> {
        let route = &self.name;
        match error {
            Some(e) => {
                let code = CODES[code_slot(e)];
                self.by_code
                    .get(code_slot(e), || requests(route, status, code))
            }
            None => self.by_status.get(status_index(status)?, || {
                requests(route, status, UPSTREAM_CODE)
            }),
        }
    }
}

fn requests(route: &str, status: StatusCode, code: &'static str) -> Counter {
    metrics::counter!(
        REQUESTS,
        "route" => route.to_owned(),
        "status" => status_label(status),
        "code" => code,
    )
}

/// A fast hasher for route names: they come from the operator's config, not
/// from clients, so no flooding defence is needed (FNV-1a).
#[derive(Default)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type NameMap<V> = HashMap<Arc<str>, V, BuildHasherDefault<NameHasher>>;

/// The record stage's view of one compiled config.
pub struct RequestTelemetry {
    metrics: bool,
    key_id_labels: bool,
    access_log: bool,
    routes: NameMap<RouteMeters>,
    /// Answers given before a route was found (`no_route`, bad requests).
    unrouted: LazyCounters,
    auth_failures: LazyCounters,
    upstream_timeout: Counter,
    upstream_unavailable: Counter,
    redactor: Redactor,
}

impl RequestTelemetry {
    pub fn new(cfg: &Config) -> RequestTelemetry {
        let metrics = cfg.metrics.enabled;
        if metrics {
            // Handles made before the recorder exists would be no-ops.
            super::metrics_handle();
        }
        let routes = match metrics {
            true => cfg
                .routes
                .iter()
                .map(|r| (Arc::<str>::from(r.name.as_str()), RouteMeters::new(&r.name)))
                .collect(),
            false => NameMap::default(),
        };
        let param_names = cfg.keys.headers.iter().filter_map(|h| match h {
            CredentialHeader::Authorization => None,
            CredentialHeader::Raw(name) => Some(name.as_str()),
        });
        RequestTelemetry {
            metrics,
            key_id_labels: metrics && cfg.metrics.key_id_labels,
            access_log: cfg.logging.access_log,
            routes,
            unrouted: LazyCounters::new(CODES.len()),
            auth_failures: LazyCounters::new(CODES.len()),
            upstream_timeout: metrics::counter!(UPSTREAM_ERRORS, "kind" => "timeout"),
            upstream_unavailable: metrics::counter!(UPSTREAM_ERRORS, "kind" => "unavailable"),
            redactor: Redactor::new(&cfg.keys.prefix, param_names),
        }
    }

    /// Whether this request is timed and recorded at all.
    pub fn enabled(&self) -> bool {
        self.metrics || self.access_log
    }

    /// Whether the access line is written (the head is kept for it).
    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// Starts the record of a request: the clock and, for the access line,
    /// the method, target and declared body size. `None` when nothing is
    /// recorded.
    pub fn start<B: http_body::Body>(&self, req: &http::Request<B>) -> Option<Started> {
        if !self.enabled() {
            return None;
        }
        let head = self.access_log.then(|| Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            bytes_in: req.body().size_hint().exact(),
        });
        Some(Started {
            at: Instant::now(),
            head,
        })
    }

    /// The record of an answer to bytes that were not a request (a head
    /// keygate refuses before it has a method and a path): counted in the
    /// metrics, with no access line, which would have nothing to show.
    pub fn start_unparsed(&self) -> Option<Started> {
        self.metrics.then(|| Started {
            at: Instant::now(),
            head: None,
        })
    }

    /// Records the answer: counters, histograms and the access line.
    pub fn finish(&self, started: Started, done: Done<'_>) {
        let elapsed = started.at.elapsed();
        if self.metrics {
            self.count(&done, elapsed);
        }
        if let Some(head) = &started.head {
            access::write(&self.redactor, head, &done, elapsed);
        }
    }

    fn count(&self, done: &Done<'_>, elapsed: Duration) {
        let route = done.exchange.route.and_then(|name| self.routes.get(name));
        let counter = match route {
            Some(r) => r.answer(done.status, done.error),
            // Only keygate itself answers a request without a route.
            None => done.error.and_then(|e| {
                let slot = code_slot(e);
                self.unrouted
                    .get(slot, || requests("", done.status, CODES[slot]))
            }),
        };
        if let Some(c) = counter {
            c.increment(1);
        }
        if let Some(r) = route {
            r.duration.record(elapsed);
            if let Some(up) = done.exchange.upstream_elapsed {
                r.upstream.record(up);
            }
        }
        if let Some(e) = done.error {
            let slot = code_slot(e);
            if matches!(e, GatewayError::MissingKey) || e.is_auth_failure() {
                let code = CODES[slot];
                if let Some(c) = self
                    .auth_failures
                    .get(slot, || metrics::counter!(AUTH_FAILURES, "code" => code))
                {
                    c.increment(1);
                }
            }
            match e {
                GatewayError::UpstreamTimeout => self.upstream_timeout.increment(1),
                GatewayError::UpstreamUnavailable => self.upstream_unavailable.increment(1),
                _ => {}
            }
        }
        if self.key_id_labels
            && let Some(key) = &done.exchange.key
        {
            let code = done.error.map_or(UPSTREAM_CODE, |e| CODES[code_slot(e)]);
            metrics::counter!(
                KEY_REQUESTS,
                "key_id" => key.id().text().as_str().to_owned(),
                "code" => code,
            )
            .increment(1);
        }
    }
}

/// What the stages learned about a request, for the record stage. Filled as
/// the request goes; whatever a refusal cut short stays empty.
#[derive(Default)]
pub struct Exchange<'a> {
    /// The matched route's name.
    pub route: Option<&'a Arc<str>>,
    /// The verified key.
    pub key: Option<Principal>,
    /// How long the upstream took to answer (or fail), when it was called.
    pub upstream_elapsed: Option<Duration>,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<StatusCode>,
    /// Whether the stages take the time of the upstream call.
    pub timed: bool,
}

/// The clock and request head taken when a request arrives.
pub struct Started {
    at: Instant,
    head: Option<Head>,
}

/// What the access line needs from the request head (it is moved upstream).
pub(super) struct Head {
    pub method: Method,
    pub uri: Uri,
    /// The declared body size, when the client declared one.
    pub bytes_in: Option<u64>,
}

/// The answer, as the record stage sees it.
pub struct Done<'a> {
    pub exchange: &'a Exchange<'a>,
    pub status: StatusCode,
    /// keygate's refusal or failure; `None` when the upstream answered.
    pub error: Option<&'a GatewayError>,
    /// The `X-Request-Id` the answer carries.
    pub request_id: Option<&'a HeaderValue>,
    pub client: std::net::IpAddr,
    /// The response body size, when known before it is streamed.
    pub bytes_out: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_their_digits() {
        for (code, text) in [(100, "100"), (200, "200"), (404, "404"), (599, "599")] {
            assert_eq!(status_label(StatusCode::from_u16(code).unwrap()), text);
        }
        assert_eq!(status_index(StatusCode::from_u16(600).unwrap()), None);
        assert_eq!(status_label(StatusCode::from_u16(999).unwrap()), "other");
    }

    #[test]
    fn every_error_code_has_its_slot() {
        let all = [
            GatewayError::NoRoute,
            GatewayError::MissingKey,
            GatewayError::InvalidKey,
            GatewayError::KeyExpired,
            GatewayError::KeyRevoked,
            GatewayError::KeyRotated,
            GatewayError::KeySuspended,
            GatewayError::ApiKeysDisabled,
            GatewayError::InsufficientScope {
                missing: "x".into(),
            },
            GatewayError::ReadOnlyKey,
            GatewayError::RateLimited {
                retry_after_secs: 1,
            },
            GatewayError::TooManyFailures {
                retry_after_secs: 1,
            },
            GatewayError::PayloadTooLarge { limit: 1 },
            GatewayError::StoreUnavailable,
            GatewayError::UpstreamUnavailable,
            GatewayError::UpstreamTimeout,
            GatewayError::BadPath,
            GatewayError::UriTooLong,
            GatewayError::BadRequest("x"),
            GatewayError::HeadersTooLarge {
                max_fields: 1,
                max_bytes: 1,
            },
        ];
        for e in &all {
            assert_eq!(CODES[code_slot(e)], e.code(), "{e:?}");
        }
    }
}
