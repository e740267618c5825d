//! Reload outcomes. A refused configuration file changes nothing but the log, so without this
//! counter an operator would not notice that the edit they made never took effect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// Reloads by outcome.
#[derive(Debug, Default)]
pub struct Reloads {
    ok: AtomicU64,
    failed: AtomicU64,
    last_failed: AtomicBool,
}

/// Reload counters as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadSnapshot {
    /// Reloads applied.
    pub ok: u64,
    /// Reloads refused (invalid file, ad-hoc mode).
    pub failed: u64,
    /// Whether the latest reload was refused.
    pub last_failed: bool,
}

impl Reloads {
    /// Counts one finished reload.
    pub fn record(&self, ok: bool) {
        let counter = if ok { &self.ok } else { &self.failed };
        counter.fetch_add(1, Relaxed);
        self.last_failed.store(!ok, Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> ReloadSnapshot {
        ReloadSnapshot {
            ok: self.ok.load(Relaxed),
            failed: self.failed.load(Relaxed),
            last_failed: self.last_failed.load(Relaxed),
        }
    }
}

static RELOADS: Reloads = Reloads {
    ok: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    last_failed: AtomicBool::new(false),
};

/// Counts a reload's outcome and hands the result on unchanged, so the caller's hook is one
/// wrapper call: `match count(daemon.reload().await) { … }`.
pub fn count<T, E>(result: Result<T, E>) -> Result<T, E> {
    RELOADS.record(result.is_ok());
    result
}

/// The process's reload counters.
pub fn snapshot() -> ReloadSnapshot {
    RELOADS.snapshot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_counted_and_the_last_one_remembered() {
        let r = Reloads::default();
        r.record(true);
        r.record(false);
        assert_eq!(
            r.snapshot(),
            ReloadSnapshot {
                ok: 1,
                failed: 1,
                last_failed: true
            }
        );
        r.record(true);
        assert!(!r.snapshot().last_failed);
        assert_eq!(r.snapshot().ok, 2);
    }

    #[test]
    fn count_passes_the_result_through() {
        let before = snapshot();
        assert_eq!(count::<u8, ()>(Ok(3)), Ok(3));
        assert_eq!(count::<(), &str>(Err("bad")), Err("bad"));
        let after = snapshot();
        // Other tests may reload concurrently: only lower bounds hold.
        assert!(after.ok > before.ok && after.failed > before.failed);
    }
}
