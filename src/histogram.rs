//! A lock-free latency histogram for the hot paths: NBD requests, flushes and object-store
//! calls are observed on every core at once, so an observation is two relaxed atomic adds and
//! no lock (prometheus-client's own `Histogram` locks on every observation). Readers take a
//! `Snapshot` whenever they like. A leaf module: whoever measures owns its histograms, and
//! whoever reports (metrics) only reads snapshots, so measuring never depends on reporting.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the default buckets; `+Inf` is implied. From 100 µs (a cached
/// read) to 60 s (a flush waiting on a slow S3), so p50 and p99 land in useful places at both
/// ends.
pub const BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Durations counted into fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of every bucket but the last (`+Inf`), ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); one more slot than `bounds`, for `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    /// A histogram over `BUCKETS`.
    fn default() -> Self {
        Self::with_bounds(&BUCKETS)
    }
}

/// A histogram as read at one moment, ready for the text encoder.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `(upper bound in seconds, observations in this bucket only)`, `+Inf` last; the
    /// encoder makes them cumulative.
    pub buckets: Vec<(f64, u64)>,
    /// All observations.
    pub count: u64,
    /// Sum of the observed durations in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// A histogram over `bounds` (ascending upper bounds in seconds; `+Inf` is added), for
    /// measurements whose useful range differs from the default one.
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// Starts timing; the duration is observed when the guard drops, on every exit path
    /// (early returns, errors, a cancelled future).
    pub fn start(&self) -> Timer<'_> {
        Timer {
            histogram: self,
            started: Instant::now(),
        }
    }

    /// The current counts. `count` is the bucket total, so the `+Inf` bucket and `_count`
    /// always agree even while other threads observe.
    pub fn snapshot(&self) -> Snapshot {
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(self.buckets.iter())
            .map(|(le, n)| (le, n.load(Relaxed)))
            .collect();
        Snapshot {
            count: buckets.iter().map(|b| b.1).sum(),
            buckets,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// Observes the time since `Histogram::start` when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    histogram: &'a Histogram,
    started: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed());
    }
}

impl Snapshot {
    /// The bucket bound under which `q` (0..1) of the observations fall; a rough quantile
    /// for tests (Prometheus computes its own with `histogram_quantile`).
    #[cfg(test)]
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let want = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for &(le, n) in &self.buckets {
            seen += n;
            if seen >= want.max(1) {
                return Some(le);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_inf_catches_the_rest() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100)); // on the bound: `le` is inclusive
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(120));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.0001, 2));
        assert_eq!(s.buckets[5], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert!(
            (s.sum_seconds - 120.00315).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
        assert_eq!(s.quantile_bound(0.5), Some(0.0001));
        assert_eq!(s.quantile_bound(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn timer_observes_on_drop() {
        let h = Histogram::default();
        {
            let _t = h.start();
        }
        drop(h.start());
        assert_eq!(h.snapshot().count, 2);
    }

    #[test]
    fn own_bounds_and_an_empty_histogram() {
        static BOUNDS: [f64; 2] = [0.001, 0.01];
        let h = Histogram::with_bounds(&BOUNDS);
        assert_eq!(h.snapshot().quantile_bound(0.5), None);
        h.observe(Duration::from_micros(1500));
        h.observe(Duration::from_secs(1));
        h.observe(Duration::from_secs(2));
        let s = h.snapshot();
        assert_eq!(s.buckets, vec![(0.001, 0), (0.01, 1), (f64::INFINITY, 2)]);
        assert_eq!(s.count, 3);
        assert!((s.sum_seconds - 3.0015).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
