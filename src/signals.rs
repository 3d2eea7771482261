//! Process signals: SIGTERM and SIGINT start a graceful shutdown, SIGHUP
//! reloads the config.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Listens for signals until `shutdown` fires. `reload` runs on each SIGHUP.
///
/// The handlers are installed before this returns, so a signal that arrives
/// right after keygate announces itself is handled rather than fatal.
pub fn spawn(shutdown: CancellationToken, reload: impl Fn() + Send + 'static) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; only kill -9 will stop keygate");
        return;
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = term.recv() => { tracing::info!("SIGTERM received"); shutdown.cancel(); }
                _ = int.recv() => { tracing::info!("SIGINT received"); shutdown.cancel(); }
                _ = hup.recv() => { tracing::info!("SIGHUP received: reloading the config"); reload(); }
            }
        }
    });
}
