//! Retries for short blips (a dropped connection, a 503 SlowDown): exponential backoff with
//! full jitter, bounded in attempts and in time, so one hiccup never reaches an NBD client.
//! Longer outages are the block store's business: its write-back keeps dirty data and retries
//! on top of this, and a FLUSH gives up after its own timeout.

use super::stats::{BackendStats, Op, Outcome};
use super::{BackendError, DynObjectStore, ETag, ObjectStore};
use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How hard to retry a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included (1 = no retries).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles after each failure.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first one.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// About 6 s of retrying in the worst case: covers blips and throttling, while a real
    /// outage surfaces quickly to the write-back loop that owns longer waits.
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniformly random wait up to the exponential ceiling for `retry` (0-based),
    /// so many writers failing together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::thread_rng().gen_range(0..=nanos))
    }
}

/// An `ObjectStore` that retries the transient failures of the store it wraps.
///
/// Conditional writes are retried too; if a first attempt succeeded but its reply was lost,
/// the retry sees the precondition fail (`Ok(None)`), so lease code must re-read the object
/// to tell "someone else won" from "we won already".
#[derive(Debug)]
pub struct Retrying {
    inner: DynObjectStore,
    policy: RetryPolicy,
    stats: Arc<BackendStats>,
}

impl Retrying {
    /// Wraps `inner`; `stats` may be shared among many wrappers.
    pub fn new(inner: DynObjectStore, policy: RetryPolicy, stats: Arc<BackendStats>) -> Self {
        Self {
            inner,
            policy,
            stats,
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Runs `call` until it succeeds, fails for good, or the policy runs out; every attempt
    /// is counted in the stats.
    async fn run<T, F, Fut>(&self, op: Op, key: &str, mut call: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let start = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            let began = Instant::now();
            let result = call().await;
            self.stats.record(op, Outcome::of(&result), began.elapsed());
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e @ BackendError::Corrupt { .. }) => {
                    // Issue 7: a checksum or length mismatch always leaves a log line naming
                    // the key, whatever the caller does with the error.
                    tracing::error!("{} {key}: {e}", op.name());
                    return Err(e);
                }
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            attempt += 1;
            let delay = self.policy.backoff(attempt - 1);
            if attempt >= self.policy.max_attempts
                || start.elapsed() + delay > self.policy.max_elapsed
            {
                self.stats.record_exhausted();
                return Err(err);
            }
            self.stats.record_retry();
            tracing::debug!(
                "{} {key}: attempt {attempt} failed ({err}); retrying in {delay:?}",
                op.name()
            );
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl ObjectStore for Retrying {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        let got = self.run(Op::Get, key, || self.inner.get(key)).await?;
        self.stats.add_read(got.as_ref().map_or(0, Bytes::len));
        Ok(got)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let len = data.len();
        self.run(Op::Put, key, || self.inner.put(key, data.clone()))
            .await?;
        self.stats.add_written(len);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.run(Op::Delete, key, || self.inner.delete(key)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.run(Op::List, prefix, || self.inner.list(prefix)).await
    }

    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        let got = self
            .run(Op::Get, key, || self.inner.get_with_etag(key))
            .await?;
        self.stats
            .add_read(got.as_ref().map_or(0, |(b, _)| b.len()));
        Ok(got)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.run(Op::ConditionalPut, key, || {
            self.inner.put_if_absent(key, data.clone())
        })
        .await
    }

    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        self.run(Op::ConditionalPut, key, || {
            self.inner.put_if_match(key, data.clone(), etag)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStore;

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            max_elapsed: Duration::from_secs(30),
        }
    }

    fn wrap(policy: RetryPolicy) -> (Arc<MemoryStore>, Retrying) {
        let mem = Arc::new(MemoryStore::new());
        let r = Retrying::new(mem.clone(), policy, Arc::new(BackendStats::default()));
        (mem, r)
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let (mem, r) = wrap(fast(6));
        mem.fail_next(3);
        r.put("k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(mem.puts(), 4);
        assert_eq!(r.stats().retries(), 3);
        mem.fail_next(5);
        assert_eq!(r.get("k").await.unwrap().unwrap(), &b"v"[..]);
        assert_eq!(mem.gets(), 6);
        assert_eq!(r.stats().retries(), 8);
        assert_eq!(r.stats().exhausted(), 0);
        assert_eq!(r.stats().requests(Op::Put, Outcome::Transient), 3);
        assert_eq!(r.stats().requests(Op::Put, Outcome::Ok), 1);
        assert_eq!(r.stats().requests(Op::Get, Outcome::Ok), 1);
        assert_eq!(r.stats().latency(Op::Get).count, 6);
        assert_eq!((r.stats().bytes_read(), r.stats().bytes_written()), (1, 1));
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let (mem, r) = wrap(fast(6));
        mem.fail_next(100);
        let err = r.list("").await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(mem.lists(), 6);
        assert_eq!(r.stats().retries(), 5);
        assert_eq!(r.stats().exhausted(), 1);
    }

    #[tokio::test]
    async fn elapsed_time_is_bounded() {
        let policy = RetryPolicy {
            max_attempts: u32::MAX,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            max_elapsed: Duration::from_millis(200),
        };
        let (mem, r) = wrap(policy);
        mem.fail_next(u64::MAX);
        let start = Instant::now();
        assert!(r.delete("k").await.is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(mem.deletes() > 1);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let (mem, r) = wrap(fast(6));
        mem.fail_next_permanent(1);
        let err = r.get("k").await.unwrap_err();
        assert!(matches!(err, BackendError::Permanent(_)));
        assert_eq!(mem.gets(), 1);
        assert_eq!(r.stats().retries(), 0);
    }

    #[tokio::test]
    async fn conditional_writes_pass_through() {
        let (mem, r) = wrap(fast(6));
        mem.fail_next(1);
        let e = r
            .put_if_absent("l", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let e = e.unwrap();
        assert_eq!(r.put_if_absent("l", Bytes::new()).await.unwrap(), None);
        let (_, tag) = r.get_with_etag("l").await.unwrap().unwrap();
        assert_eq!(tag, e);
        assert!(r
            .put_if_match("l", Bytes::new(), &e)
            .await
            .unwrap()
            .is_some());
    }

    #[test]
    fn backoff_stays_under_the_exponential_ceiling() {
        let p = RetryPolicy::default();
        for retry in 0..40 {
            let ceiling = (p.base_delay * 2u32.saturating_pow(retry.min(20))).min(p.max_delay);
            for _ in 0..20 {
                assert!(p.backoff(retry) <= ceiling, "retry {retry}");
            }
        }
        // Jitter: not always the same value.
        let samples: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(3)).collect();
        assert!(samples.len() > 1);
    }
}
