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
