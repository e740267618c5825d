//! Object-store counters for operators (the metrics endpoint): S3 requests by operation and outcome,
//! their latency, bytes moved and retries. Plain atomics, so the hot path pays a few relaxed
//! increments and the metrics endpoint reads a snapshot whenever it likes.

use super::BackendError;
use crate::histogram::{Histogram, Snapshot};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The kinds of object-store request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
    List,
    /// `put_if_absent` / `put_if_match` (leases).
    ConditionalPut,
    /// Server-side `CopyObject` (flatten): no object bytes pass through the daemon.
    Copy,
    /// Multi-object delete (`DeleteObjects`, up to 1,000 keys).
    DeleteMany,
}

impl Op {
    /// Every operation, in a fixed order (for rendering).
    pub const ALL: [Op; 7] = [
        Op::Get,
        Op::Put,
        Op::Delete,
        Op::List,
        Op::ConditionalPut,
        Op::Copy,
        Op::DeleteMany,
    ];

    /// Label value for metrics and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::List => "list",
            Op::ConditionalPut => "conditional_put",
            Op::Copy => "copy",
            Op::DeleteMany => "delete_objects",
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Transient,
    Permanent,
    Corrupt,
    Unsupported,
}

impl Outcome {
    /// Every outcome, in a fixed order (for rendering).
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Transient,
        Outcome::Permanent,
        Outcome::Corrupt,
        Outcome::Unsupported,
    ];

    /// Label value for metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Transient => "transient",
            Outcome::Permanent => "permanent",
            Outcome::Corrupt => "corrupt",
            Outcome::Unsupported => "unsupported",
        }
    }

    /// The outcome of a finished request.
    pub fn of<T>(result: &Result<T, BackendError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            // Counted with the other transient failures, and on their own in `throttled`.
            Err(BackendError::Transient(_) | BackendError::Throttled(_)) => Outcome::Transient,
            Err(BackendError::Permanent(_)) => Outcome::Permanent,
            Err(BackendError::Corrupt { .. } | BackendError::Undecodable { .. }) => {
                Outcome::Corrupt
            }
            Err(BackendError::Unsupported(_)) => Outcome::Unsupported,
        }
    }
}

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied. An object-store
/// call takes at least a network round trip, so the buckets start at 1 ms.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Counters shared by every store a factory hands out.
#[derive(Debug)]
pub struct BackendStats {
    retries: AtomicU64,
    exhausted: AtomicU64,
    /// Answers that asked us to slow down (also counted as transient in `requests`).
    throttled: AtomicU64,
    /// Requests (attempts) by `[op][outcome]`.
    requests: [[AtomicU64; Outcome::ALL.len()]; Op::ALL.len()],
    latency: [Histogram; Op::ALL.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Also counted into these (a bucket's stats feed the factory's totals).
    parent: Option<Arc<BackendStats>>,
}

impl Default for BackendStats {
    fn default() -> Self {
        Self {
            retries: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            requests: Default::default(),
            latency: std::array::from_fn(|_| Histogram::with_bounds(&LATENCY_BUCKETS)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            parent: None,
        }
    }
}

impl BackendStats {
    /// Stats of one bucket that also count into `parent`, so metrics can show each bucket
    /// while the factory's totals keep their meaning.
    pub fn with_parent(parent: Arc<BackendStats>) -> Self {
        Self {
            parent: Some(parent),
            ..Self::default()
        }
    }
    /// Records one request (one attempt) and how long it took.
    pub fn record(&self, op: Op, outcome: Outcome, took: Duration) {
        self.requests[op as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.latency[op as usize].observe(took);
        if let Some(p) = &self.parent {
            p.record(op, outcome, took);
        }
    }
    /// Records a retry about to happen.
    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.record_retry();
        }
    }
    /// Records a call that failed after all its retries.
    pub fn record_exhausted(&self) {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.record_exhausted();
        }
    }
    /// Records an answer asking us to slow down.
    pub fn record_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.record_throttled();
        }
    }
    /// Records object bytes received (GET bodies).
    pub fn add_read(&self, bytes: usize) {
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.add_read(bytes);
        }
    }
    /// Records object bytes sent (PUT bodies).
    pub fn add_written(&self, bytes: usize) {
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(p) = &self.parent {
            p.add_written(bytes);
        }
    }

    /// Transient failures that were retried.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
    /// Calls that still failed after retrying (the error went to the caller).
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }
    /// Answers that asked us to slow down (503 SlowDown, 429).
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
    /// Requests of `op` that ended with `outcome`.
    pub fn requests(&self, op: Op, outcome: Outcome) -> u64 {
        self.requests[op as usize][outcome as usize].load(Ordering::Relaxed)
    }
    /// Latency histogram of `op`'s requests.
    pub fn latency(&self, op: Op) -> Snapshot {
        self.latency[op as usize].snapshot()
    }
    /// Object bytes received.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
    /// Object bytes sent.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_latency_histogram() {
        let s = BackendStats::default();
        s.record(Op::Get, Outcome::Ok, Duration::from_micros(500));
        s.record(Op::Get, Outcome::Ok, Duration::from_millis(20));
        s.record(Op::Get, Outcome::Transient, Duration::from_secs(60));
        s.record(Op::Put, Outcome::Permanent, Duration::from_millis(3));
        assert_eq!(s.requests(Op::Get, Outcome::Ok), 2);
        assert_eq!(s.requests(Op::Get, Outcome::Transient), 1);
        assert_eq!(s.requests(Op::Put, Outcome::Permanent), 1);
        assert_eq!(s.requests(Op::Put, Outcome::Ok), 0);
        let h = s.latency(Op::Get);
        assert_eq!(h.count, 3);
        assert_eq!(h.buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(h.buckets[0], (0.001, 1));
        assert_eq!(h.buckets[4], (0.025, 1));
        // 60 s lands only in +Inf.
        assert_eq!(h.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((h.sum_seconds - 60.0205).abs() < 1e-6, "{}", h.sum_seconds);
    }

    #[test]
    fn bucket_stats_count_into_the_totals() {
        let total = Arc::new(BackendStats::default());
        let bucket = BackendStats::with_parent(Arc::clone(&total));
        bucket.record(Op::Put, Outcome::Ok, Duration::from_millis(1));
        bucket.record_retry();
        bucket.record_exhausted();
        bucket.record_throttled();
        bucket.add_read(3);
        bucket.add_written(5);
        for s in [&bucket, &*total] {
            assert_eq!(s.requests(Op::Put, Outcome::Ok), 1);
            assert_eq!(s.latency(Op::Put).count, 1);
            assert_eq!((s.retries(), s.exhausted(), s.throttled()), (1, 1, 1));
            assert_eq!((s.bytes_read(), s.bytes_written()), (3, 5));
        }
    }

    #[test]
    fn outcome_follows_error_kind() {
        let e: Result<(), _> = Err(BackendError::Corrupt {
            key: "k".into(),
            reason: "r".into(),
        });
        assert_eq!(Outcome::of(&e), Outcome::Corrupt);
        assert_eq!(Outcome::of(&Ok::<_, BackendError>(1)), Outcome::Ok);
        assert_eq!(Op::ConditionalPut.name(), "conditional_put");
        assert_eq!(Op::Copy.name(), "copy");
    }
}
