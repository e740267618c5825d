//! Reload outcomes, counted by the daemon that reloads. A refused configuration file changes
//! nothing but the log, so without these counters an operator would not notice that the edit
//! they made never took effect.

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
}
