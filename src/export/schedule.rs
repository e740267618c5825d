//! When a refused export is opened again by itself. One schedule for every reason: the
//! reason's [`Retry`] rule says whether to wait a fixed time (a lease held elsewhere, a store
//! that refused for good) or back off (`Policy::REOPEN`: an unreachable store).

use super::Retry;
use crate::retry::{Backoff, Policy};
use std::time::Duration;

/// The retry bookkeeping of one refused export.
#[derive(Debug, Clone)]
pub struct Schedule {
    backoff: Backoff,
    attempts: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Self::new()
    }
}

impl Schedule {
    /// A schedule for an export just found refused.
    pub fn new() -> Self {
        Self {
            backoff: Policy::REOPEN.backoff(),
            attempts: 0,
        }
    }

    /// The wait before the first attempt, or before the next one after another refusal; `rule`
    /// is the retry rule of the refusal now in force.
    pub fn next(&mut self, rule: Retry) -> Duration {
        match rule {
            Retry::Every(every) => every,
            // `REOPEN` never runs out; `Never` is not scheduled, but waiting is harmless.
            Retry::Backoff | Retry::Never => {
                self.backoff.next_delay().unwrap_or(Policy::REOPEN.cap)
            }
        }
    }

    /// Records an attempt that left the export refused.
    pub fn failed(&mut self) {
        self.attempts = self.attempts.saturating_add(1);
    }

    /// Attempts made so far that left the export refused.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_stores_are_retried_with_doubling_waits_up_to_a_minute() {
        let mut s = Schedule::new();
        let waits: Vec<u64> = (0..9).map(|_| s.next(Retry::Backoff).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn fixed_rules_wait_their_interval_and_keep_the_backoff_where_it_was() {
        let mut s = Schedule::new();
        let lease = Retry::lease_held(Duration::from_secs(30));
        assert_eq!(s.next(lease), Duration::from_secs(10));
        assert_eq!(s.next(lease), Duration::from_secs(10));
        assert_eq!(s.next(Retry::Backoff), Duration::from_secs(1));
        assert_eq!(s.next(Retry::Backoff), Duration::from_secs(2));
        assert_eq!(
            s.next(Retry::lease_held(Duration::from_secs(1))),
            Duration::from_secs(1),
            "never more often than once a second"
        );
        s.failed();
        assert_eq!(s.attempts(), 1);
    }
}
