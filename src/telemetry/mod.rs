//! Logs, metrics and the record stage of a request.
//!
//! - Logging ([`init`]): one `tracing` subscriber for the process, writing to
//!   stderr through a non-blocking writer (a dedicated thread does the I/O, so
//!   a slow terminal or pipe never stalls a request; when its buffer is full,
//!   lines are dropped and counted in `keygate_log_lines_dropped_total`).
//!   Access lines are events on the target [`access::TARGET`].
//! - Metrics: the `metrics` facade with the Prometheus recorder, served as
//!   `GET /metrics` on the admin listener ([`metrics_routes`]). Counters that
//!   other parts keep as plain atomics (the key cache, open connections) are
//!   copied into the recorder when `/metrics` is scraped, so the request path
//!   pays nothing for them.
//! - The record stage ([`request`]): per-request counters, latency histograms
//!   ([`histogram`], kept outside the recorder and rendered after it) and the
//!   access-log line, with per-route handles prepared at config load.
//!
//! Log lines never contain a presented key or admin token: the types that hold
//! secrets redact themselves in `Debug` and `Display`, access lines carry the
//! key's id and owner only, and their paths go through [`redact`].

pub mod access;
pub mod histogram;
pub mod redact;
pub mod request;

use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::cache::KeyCache;
use crate::config::{LogFormat, LoggingConfig};

/// Keeps the log writer's thread alive; dropping it flushes the lines still
/// queued. Hold it until the process exits.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Where access lines are written directly (see [`access`]), once a logger
/// is installed.
static ACCESS_SINK: OnceLock<&'static access::Sink> = OnceLock::new();

fn access_sink() -> Option<&'static access::Sink> {
    ACCESS_SINK.get().copied()
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Queue the last access lines before the writer's guard flushes.
        if let Some(sink) = access_sink() {
            sink.flush();
        }
    }
}

/// Lines the non-blocking writer dropped because its queue was full.
static DROPPED_LINES: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

/// Most messages (log lines, or chunks of up to [`access::LOCAL_CHUNK`] or
/// [`access::MAX_BATCH`] bytes of access lines) queued for the log writer;
/// more are dropped and counted, so a stalled stderr holds memory in bounds.
pub const QUEUED_MESSAGES: usize = 1024;

/// Installs the global tracing subscriber from `logging:`: `KEYGATE_LOG` (or
/// `RUST_LOG`) overrides `logging.level`, `KEYGATE_LOG_FORMAT` (`json` or
/// `pretty`) overrides `logging.format`. Logs go to stderr so stdout stays for
/// command output. Access lines (target `keygate::access`) pass the filter
/// unless the filter names that target itself; `logging.access_log` decides
/// whether they are written.
pub fn init(cfg: &LoggingConfig) -> LogGuard {
    let directives = std::env::var("KEYGATE_LOG")
        .ok()
        .filter(|f| EnvFilter::builder().parse(f).is_ok())
        .or_else(|| {
            std::env::var("RUST_LOG")
                .ok()
                .filter(|f| EnvFilter::builder().parse(f).is_ok())
        })
        .unwrap_or_else(|| cfg.level.clone());
    let mut filter = EnvFilter::builder()
        .parse(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if !directives.contains(access::TARGET)
        && let Ok(d) = format!("{}=info", access::TARGET).parse()
    {
        filter = filter.add_directive(d);
    }
    let format = match std::env::var("KEYGATE_LOG_FORMAT") {
        Ok(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        Ok(f) if f.eq_ignore_ascii_case("pretty") || f.eq_ignore_ascii_case("text") => {
            LogFormat::Pretty
        }
        _ => cfg.format,
    };
    let (writer, worker) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .thread_name("keygate-log")
        .buffered_lines_limit(QUEUED_MESSAGES)
        // Buffered: the writer thread flushes once per batch of queued lines,
        // so a busy proxy costs one write(2) per batch, not one per request.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let dropped = writer.error_counter();
    let access_writer = writer.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    if installed.is_err() {
        eprintln!("keygate: a logger was already installed; keeping it");
        return LogGuard { _worker: None };
    }
    // Only the installed writer's counter means anything.
    let _first = DROPPED_LINES.set(dropped).is_ok();
    let _first = ACCESS_SINK
        .set(access::Sink::start(
            access_writer,
            format == LogFormat::Json,
        ))
        .is_ok();
    LogGuard {
        _worker: Some(worker),
    }
}

/// The process-wide Prometheus recorder, installed on first use. (The
/// `metrics` facade has one global recorder per process; tests start several
/// servers in one process, so this hands out the same handle to each.)
///
/// Until it is installed every `metrics::` call is a no-op; the proxy installs
/// it when it compiles a config with `metrics.enabled` (see
/// [`request::RequestTelemetry`]), and `/metrics` when it is first served.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &histogram::BOUNDS);
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    describe_metrics();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// HELP lines for the metrics keygate records (README lists them too).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        request::REQUESTS,
        "Proxied requests by route, status and code (`upstream` when the upstream answered)"
    );
    describe_counter!(
        request::AUTH_FAILURES,
        "Requests refused for a missing or unusable key, by code"
    );
    describe_counter!(
        request::UPSTREAM_ERRORS,
        "Upstream failures by kind (timeout, unavailable)"
    );
    describe_counter!(
        request::KEY_REQUESTS,
        "Requests per key id and code (only with metrics.key_id_labels)"
    );
    describe_counter!(
        "keygate_rate_limited_total",
        "Requests refused by a rate limit, by limit (key or route)"
    );
    describe_counter!(
        "keygate_failed_auth_blocked_total",
        "Requests refused because their address failed authentication too often"
    );
    describe_counter!(CACHE_HITS, "Key lookups answered by a fresh cache entry");
    describe_counter!(
        CACHE_NEGATIVE_HITS,
        "Key lookups answered by a cached 'unknown key' entry"
    );
    describe_counter!(CACHE_MISSES, "Key lookups that went to the store");
    describe_counter!(
        CACHE_STALE,
        "Lookups answered by a stale entry while the store failed"
    );
    describe_gauge!(CACHE_ENTRIES, "Entries in the key cache (approximate)");
    describe_counter!(
        "keygate_store_reads_total",
        "Key reads the cache made from the store"
    );
    describe_counter!(
        "keygate_store_errors_total",
        "Key reads from the store that failed"
    );
    describe_histogram!(
        crate::store::metered::CALL_DURATION,
        Unit::Seconds,
        "Store call latency by operation"
    );
    describe_counter!(
        crate::store::metered::CALL_ERRORS,
        "Store calls that failed, by operation and kind"
    );
    describe_gauge!(OPEN_CONNECTIONS, "Client connections open on the proxy");
    describe_counter!(
        CONFIG_RELOADS,
        "Config reloads by trigger (sighup, file) and result (ok, failed)"
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_OK,
        "1 if the last config reload succeeded, 0 if it was rejected"
    );
    describe_counter!(
        "keygate_webhook_deliveries_total",
        "Webhook delivery attempts by result"
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because the log writer fell behind"
    );
}

const CACHE_HITS: &str = "keygate_cache_hits_total";
const CACHE_NEGATIVE_HITS: &str = "keygate_cache_negative_hits_total";
const CACHE_MISSES: &str = "keygate_cache_misses_total";
const CACHE_STALE: &str = "keygate_cache_stale_served_total";
const CACHE_ENTRIES: &str = "keygate_cache_entries";
const OPEN_CONNECTIONS: &str = "keygate_open_connections";
const LOG_LINES_DROPPED: &str = "keygate_log_lines_dropped_total";
/// `keygate_config_reloads_total{trigger, result}`.
pub const CONFIG_RELOADS: &str = "keygate_config_reloads_total";
/// `keygate_config_last_reload_success`.
pub const CONFIG_LAST_RELOAD_OK: &str = "keygate_config_last_reload_success";

/// What `/metrics` reads at scrape time, besides the recorder.
#[derive(Clone)]
pub struct ScrapeSources {
    pub cache: Arc<KeyCache>,
    /// The proxy's connection slots and their total: open = total - available.
    pub connection_slots: Arc<tokio::sync::Semaphore>,
    pub max_connections: usize,
}

impl ScrapeSources {
    /// Copies the counters kept outside the recorder into it.
    fn publish(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = &self.cache.stats;
        metrics::counter!(CACHE_HITS).absolute(stats.hits.load(Relaxed));
        metrics::counter!(CACHE_NEGATIVE_HITS).absolute(stats.negative_hits.load(Relaxed));
        metrics::counter!(CACHE_MISSES).absolute(stats.misses.load(Relaxed));
        metrics::counter!(CACHE_STALE).absolute(stats.stale_served.load(Relaxed));
        metrics::gauge!(CACHE_ENTRIES).set(self.cache.entry_count() as f64);
        let free = self.connection_slots.available_permits();
        let open = self.max_connections.saturating_sub(free);
        metrics::gauge!(OPEN_CONNECTIONS).set(open as f64);
        if let Some(dropped) = DROPPED_LINES.get() {
            let access = access_sink().map_or(0, |s| s.dropped());
            metrics::counter!(LOG_LINES_DROPPED).absolute(dropped.dropped_lines() as u64 + access);
        }
    }
}

/// `GET /metrics` on the admin listener: Prometheus text format, no token.
pub fn metrics_routes(sources: ScrapeSources) -> axum::Router {
    use axum::routing::get;
    let handle = metrics_handle();
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            let sources = sources.clone();
            async move {
                sources.publish();
                let mut body = handle.map(|h| h.render()).unwrap_or_default();
                // The request path's histograms are kept outside the recorder.
                request::REQUEST_DURATIONS.render(&mut body);
                request::UPSTREAM_DURATIONS.render(&mut body);
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    )
}

/// Runs the recorder's upkeep (histogram buckets) until `shutdown`.
pub fn spawn_metrics_upkeep(
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(handle) = metrics_handle() else {
            return;
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => handle.run_upkeep(),
            }
        }
    })
}
