//! Hot reload of the config file: SIGHUP and file changes take one path.
//!
//! [`Reloader::reload`] reads and validates the file; a valid one is handed to
//! [`Server::reload`], which swaps it in atomically (requests in flight finish
//! on the config they started with) and keeps the running values of the
//! settings that need a restart. An invalid file is refused with one log line
//! naming file:line:column, and the running config stays. A file event whose
//! content is the same as the last one seen does nothing (editors and
//! Kubernetes touch files without changing them); SIGHUP always reloads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{self, watch};
use crate::server::Server;
use crate::telemetry::{CONFIG_LAST_RELOAD_OK, CONFIG_RELOADS};

/// How long the config file's directory must be quiet before a reload.
pub const FILE_DEBOUNCE: Duration = Duration::from_millis(250);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Sighup,
    File,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Sighup => "sighup",
            Trigger::File => "file",
        }
    }
}

/// Reloads `path` into `server`; one reload at a time.
pub struct Reloader {
    path: PathBuf,
    server: Arc<Server>,
    /// SHA-256 of the content last read, valid or not.
    last_seen: Mutex<Option<[u8; 32]>>,
}

impl Reloader {
    pub fn new(path: PathBuf, server: Arc<Server>) -> Arc<Reloader> {
        Arc::new(Reloader {
            path,
            server,
            last_seen: Mutex::new(None),
        })
    }

    /// Reads, validates and applies the file.
    pub fn reload(&self, trigger: Trigger) {
        let mut last_seen = match self.last_seen.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let outcome = config::read(&self.path).and_then(|text| {
            let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            if trigger == Trigger::File && *last_seen == Some(hash) {
                return Ok(None);
            }
            *last_seen = Some(hash);
            config::from_file_text(&self.path, &text).map(Some)
        });
        let result = match outcome {
            Ok(None) => return,
            Ok(Some(cfg)) => {
                self.server.reload(cfg);
                "ok"
            }
            Err(e) => {
                tracing::error!(
                    trigger = trigger.as_str(),
                    "config reload rejected, keeping the running config: {e}"
                );
                "failed"
            }
        };
        metrics::counter!(CONFIG_RELOADS, "trigger" => trigger.as_str(), "result" => result)
            .increment(1);
        metrics::gauge!(CONFIG_LAST_RELOAD_OK).set(if result == "ok" { 1.0 } else { 0.0 });
    }

    /// Reloads on SIGHUP (and stops on SIGTERM/SIGINT) and on changes to the
    /// file, until `shutdown`. A file that cannot be watched is logged and
    /// SIGHUP still works.
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        crate::signals::spawn(shutdown.clone(), {
            let this = self.clone();
            move || this.reload(Trigger::Sighup)
        });
        let this = self.clone();
        match watch::spawn(&self.path, FILE_DEBOUNCE, shutdown, move || {
            this.reload(Trigger::File)
        }) {
            Ok(_task) => tracing::info!(
                path = %self.path.display(),
                "watching the config file; changes are applied when it is saved"
            ),
            Err(e) => tracing::warn!("{e}; reload with SIGHUP instead"),
        }
    }
}
