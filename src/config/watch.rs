//! Watching the config file for changes (the file half of hot reload; SIGHUP
//! is the other, see `crate::signals`).
//!
//! The file's *directory* is watched, not the file: editors and deploy tools
//! replace a file by writing a new one and renaming it over the old, which
//! ends a watch on the file itself. Kubernetes mounts a ConfigMap as a symlink
//! into a `..data` directory that is swapped atomically, so changes to names
//! starting with `..` count too, and when the path is a symlink the
//! directory of its target is watched as well.
//!
//! Events are debounced: the callback runs once the directory has been quiet
//! for the debounce interval (an editor's save is several events), or at the
//! latest [`MAX_DEBOUNCE`] after the first. The callback decides whether the
//! content really changed; this module only says "look again".

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a burst of events can delay the callback.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Why the file cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path} for changes: {source}")]
pub struct WatchError {
    path: String,
    source: notify::Error,
}

/// A directory and the names in it that matter.
struct Target {
    dir: PathBuf,
    name: OsString,
}

/// Watches `path` until `shutdown`, calling `on_change` (on a blocking
/// thread) after each debounced burst of changes.
pub fn spawn(
    path: &Path,
    debounce: Duration,
    shutdown: CancellationToken,
    on_change: impl Fn() + Send + Sync + 'static,
) -> Result<JoinHandle<()>, WatchError> {
    let targets = targets(path);
    let wake = Arc::new(Notify::new());
    let handler = {
        let wake = wake.clone();
        let targets: Vec<(PathBuf, OsString)> = targets
            .iter()
            .map(|t| (t.dir.clone(), t.name.clone()))
            .collect();
        move |event: notify::Result<notify::Event>| match event {
            Ok(event) if relevant(&event, &targets) => wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "config file watch reported an error"),
        }
    };
    let error = |source| WatchError {
        path: path.display().to_string(),
        source,
    };
    let mut watcher = notify::recommended_watcher(handler).map_err(error)?;
    for t in &targets {
        watcher
            .watch(&t.dir, RecursiveMode::NonRecursive)
            .map_err(error)?;
    }
    let on_change = Arc::new(on_change);
    Ok(tokio::spawn(async move {
        // Dropping the watcher stops it: keep it for the task's life.
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
            }
            let burst_end = tokio::time::Instant::now() + MAX_DEBOUNCE;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(debounce) => break,
                    _ = tokio::time::sleep_until(burst_end) => break,
                    _ = wake.notified() => {}
                }
            }
            let on_change = on_change.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || on_change()).await {
                tracing::error!(error = %e, "config reload after a file change failed");
            }
        }
    }))
}

/// The directory of `path` and, when `path` is a symlink, of its target.
fn targets(path: &Path) -> Vec<Target> {
    let split = |p: &Path| -> Option<Target> {
        let name = p.file_name()?.to_owned();
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        Some(Target { dir, name })
    };
    let mut out: Vec<Target> = split(path).into_iter().collect();
    if let Ok(real) = std::fs::canonicalize(path)
        && let Some(t) = split(&real)
    {
        let same_dir = out
            .iter()
            .any(|o| std::fs::canonicalize(&o.dir).is_ok_and(|d| d == t.dir) && o.name == t.name);
        if !same_dir {
            out.push(t);
        }
    }
    out
}

/// Whether `event` may have changed the file: a write, create, rename or
/// delete of its name (or of a `..`-name, Kubernetes' swapped directory). Reads
/// (including keygate's own) are not.
fn relevant(event: &notify::Event, targets: &[(PathBuf, OsString)]) -> bool {
    let kind_matters = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        // Overflows and unknown events: look again to be safe.
        EventKind::Any | EventKind::Other => return true,
    };
    kind_matters
        && event.paths.iter().any(|p| {
            let Some(name) = p.file_name() else {
                return false;
            };
            targets.iter().any(|(_, n)| n == name) || name.to_string_lossy().starts_with("..")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn writes_and_renames_of_the_file_count_reads_do_not() {
        let t = vec![(PathBuf::from("/etc/kg"), OsString::from("keygate.yaml"))];
        let yes = [
            event(EventKind::Modify(ModifyKind::Any), "/etc/kg/keygate.yaml"),
            event(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                "/etc/kg/keygate.yaml",
            ),
            event(EventKind::Create(CreateKind::File), "/etc/kg/keygate.yaml"),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/etc/kg/keygate.yaml",
            ),
            event(EventKind::Create(CreateKind::Folder), "/etc/kg/..data_tmp"),
        ];
        for e in &yes {
            assert!(relevant(e, &t), "{e:?}");
        }
        let no = [
            event(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/etc/kg/keygate.yaml",
            ),
            event(
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/etc/kg/keygate.yaml",
            ),
            event(EventKind::Modify(ModifyKind::Any), "/etc/kg/other.yaml"),
        ];
        for e in &no {
            assert!(!relevant(e, &t), "{e:?}");
        }
    }

    #[test]
    fn a_bare_file_name_is_watched_in_the_current_directory() {
        let t = targets(Path::new("keygate-does-not-exist.yaml"));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].dir, PathBuf::from("."));
    }
}
