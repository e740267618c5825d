//! Exponential backoff with jitter for S3 retries: spreads retries of many blocks over time so
//! a recovering object store is not hit by a synchronized burst.

use rand::Rng;
use std::time::Duration;

/// Delay sequence for one retried operation.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt, never exceeds `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            attempt: 0,
            base,
            cap,
        }
    }

    /// The write-back policy: 50 ms doubling up to 10 s.
    pub fn write_back() -> Self {
        Self::new(Duration::from_millis(50), Duration::from_secs(10))
    }

    /// The next delay: uniformly random in [half, full] of the exponential step ("equal jitter").
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        let step = exp.min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jitter = rand::thread_rng().gen_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    /// How many delays were handed out (attempts that failed so far).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_stays_under_cap() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
        for _ in 0..40 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(100), "{d:?}");
            assert!(d >= Duration::from_millis(5), "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(50), "{late:?}");
        assert_eq!(b.attempts(), 42);
    }
}
