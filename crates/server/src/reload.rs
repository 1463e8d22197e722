//! Reloading files that change under a running server (certificates
//! rotated by cert-manager or certbot, an edited htpasswd file).
//!
//! The directories holding the files are watched (inotify through
//! `notify`), so that renames and symlink swaps, which is how those tools
//! and Kubernetes secret volumes replace files, are seen too. Events are
//! debounced, and a slow poll backs the watcher up on file systems that
//! send no events. The callback decides whether the content changed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher as _;

/// Quiet time after the last event before reloading: a tool writing a
/// certificate and then its key causes one reload, not two.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// The safety-net poll.
const POLL_EVERY: Duration = Duration::from_secs(30);

/// Keeps the watch alive; dropping it stops it.
pub struct FileWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    /// Keeps the channel open when there is no watcher (poll only).
    _events: tokio::sync::mpsc::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Calls `on_change` after any of `paths` may have changed.
pub fn watch(
    paths: &[PathBuf],
    what: &'static str,
    mut on_change: impl FnMut() + Send + 'static,
) -> FileWatch {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = {
        let tx = tx.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                let _ = tx.try_send(());
            }
        })
    };
    let watcher = match watcher {
        Ok(mut w) => {
            let mut dirs: Vec<PathBuf> = paths.iter().map(|p| parent(p)).collect();
            dirs.sort();
            dirs.dedup();
            for dir in &dirs {
                if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch {what} files; polling every {}s", POLL_EVERY.as_secs());
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no file watcher for {what}; polling every {}s", POLL_EVERY.as_secs());
            None
        }
    };
    let task = tokio::spawn(async move {
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.tick().await;
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // Let the writer finish.
                    loop {
                        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                            Ok(Some(())) => continue,
                            Ok(None) => return,
                            Err(_) => break,
                        }
                    }
                }
                _ = poll.tick() => {}
            }
            on_change();
        }
    });
    FileWatch {
        _watcher: watcher,
        _events: tx,
        task,
    }
}

/// A cheap identity of files' contents, to tell a real change from noise.
pub fn fingerprint(paths: &[&Path]) -> std::io::Result<[u8; 32]> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in paths {
        let bytes = std::fs::read(p)?;
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().into())
}
