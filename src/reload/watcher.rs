//! Notices edits of the configuration file. The watch is on the file's *directory*: editors
//! save by writing a new file and renaming it over the old one (a watch on the file itself
//! would follow the old inode into oblivion), some write in place, `touch` changes only
//! metadata. Every such event for the file's name — or for Kubernetes' `..data` symlink swap —
//! starts a quiet period; one "reload now" is delivered when the directory has been quiet for
//! `DEBOUNCE`, so a burst of saves produces one reload of the final contents.

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Quiet time after the last change before reloading: long enough for an editor's
/// write-fsync-rename sequence, short enough that an added export appears "at once".
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the file cannot be watched (SIGHUP still reloads).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The path has no file name (`/`, `..`).
    #[error("{0} does not name a file")]
    NotAFile(PathBuf),
    /// inotify refused (limit reached, directory missing or unreadable).
    #[error("cannot watch {dir}: {source}")]
    Notify {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// A debounced stream of "the configuration file changed" notifications.
#[derive(Debug)]
pub struct ConfigWatcher {
    /// Kept alive: dropping it stops the watch.
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    /// When a change was seen: the end of its quiet period (survives a cancelled `changed`).
    quiet_at: Option<Instant>,
}

/// Whether an event may have changed the file's contents (reads and opens cannot).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl ConfigWatcher {
    /// Starts watching the directory holding `path`.
    pub fn new(path: &Path) -> Result<Self, WatchError> {
        let name: OsString = path
            .file_name()
            .ok_or_else(|| WatchError::NotAFile(path.to_path_buf()))?
            .to_os_string();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (tx, events) = mpsc::unbounded_channel();
        let handler = move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else {
                // An overflowed or failed watch may have missed our file: reload to be safe.
                let _ = tx.send(());
                return;
            };
            let ours = event.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| n == name.as_os_str() || n == "..data")
            });
            if ours && is_change(&event.kind) {
                let _ = tx.send(());
            }
        };
        let notify_err = |source| WatchError::Notify {
            dir: dir.clone(),
            source,
        };
        let mut watcher = notify::recommended_watcher(handler).map_err(notify_err)?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(notify_err)?;
        Ok(Self {
            _watcher: watcher,
            events,
            quiet_at: None,
        })
    }

    /// Waits for the next change, then for `DEBOUNCE` of quiet; `None` if the watch ended.
    /// Cancel-safe (it is used in `select!`): a change already seen is remembered in `self`,
    /// so dropping the future mid-debounce loses nothing.
    pub async fn changed(&mut self) -> Option<()> {
        if self.quiet_at.is_none() {
            self.events.recv().await?;
            self.quiet_at = Some(Instant::now() + DEBOUNCE);
        }
        while let Some(deadline) = self.quiet_at {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(())) => self.quiet_at = Some(Instant::now() + DEBOUNCE),
                Ok(None) | Err(_) => self.quiet_at = None,
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn expect_change(w: &mut ConfigWatcher) {
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .expect("no change noticed within 10 s")
            .expect("watch ended");
    }

    /// No further change arrives within `quiet` (the debounce merged the burst).
    async fn expect_quiet(w: &mut ConfigWatcher, quiet: Duration) {
        let r = tokio::time::timeout(quiet, w.changed()).await;
        assert!(r.is_err(), "unexpected extra change notification");
    }

    #[tokio::test]
    async fn rename_over_in_place_and_touch_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exports.toml");
        std::fs::write(&path, "a").unwrap();
        let mut w = ConfigWatcher::new(&path).unwrap();
        let tmp = dir.path().join(".exports.toml.swp");
        std::fs::write(&tmp, "b").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        expect_change(&mut w).await;
        std::fs::write(&path, "c").unwrap();
        expect_change(&mut w).await;
        let f = std::fs::File::options().append(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now()).unwrap();
        expect_change(&mut w).await;
    }

    #[tokio::test]
    async fn a_cancelled_wait_keeps_the_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exports.toml");
        let mut w = ConfigWatcher::new(&path).unwrap();
        std::fs::write(&path, "a").unwrap();
        // Give up during the debounce, as `select!` does when another branch wins, until the
        // change has been seen; the next call must still report it without a new event.
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.quiet_at.is_none() {
            assert!(Instant::now() < deadline, "change not seen within 10 s");
            let cut = tokio::time::timeout(Duration::from_millis(10), w.changed()).await;
            assert!(cut.is_err(), "debounce ended within 10 ms");
        }
        expect_change(&mut w).await;
    }

    #[tokio::test]
    async fn other_files_are_ignored_and_bursts_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exports.toml");
        std::fs::write(&path, "a").unwrap();
        let mut w = ConfigWatcher::new(&path).unwrap();
        std::fs::write(dir.path().join("other.toml"), "x").unwrap();
        expect_quiet(&mut w, DEBOUNCE * 3).await;
        for i in 0..20 {
            std::fs::write(&path, format!("{i}")).unwrap();
        }
        expect_change(&mut w).await;
        expect_quiet(&mut w, DEBOUNCE * 3).await;
    }
}
