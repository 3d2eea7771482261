//! Logging setup. Log lines never contain a presented key or admin token:
//! the types that hold secrets redact themselves in `Debug` and `Display`.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber: `KEYGATE_LOG` (or `RUST_LOG`)
/// filters, default `info`; `KEYGATE_LOG_FORMAT=json` for JSON lines. Logs go
/// to stderr so stdout stays for command output.
pub fn init() {
    let filter = std::env::var("KEYGATE_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = std::env::var("KEYGATE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = if json {
        builder.json().try_init()
    } else {
        builder.compact().try_init()
    };
    if installed.is_err() {
        eprintln!("keygate: a logger was already installed; keeping it");
    }
}

/// The process-wide Prometheus recorder, installed on first use. (The
/// `metrics` facade has one global recorder per process; tests start several
/// servers in one process, so this hands out the same handle to each.)
pub fn metrics_handle() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// `GET /metrics` on the admin listener: Prometheus text format, no token.
pub fn metrics_routes() -> axum::Router {
    use axum::routing::get;
    let handle = metrics_handle();
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                let body = handle.map(|h| h.render()).unwrap_or_default();
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
