//! Retries for short blips (a dropped connection, a 503 SlowDown): exponential backoff with
//! full jitter, bounded in attempts and in time, so one hiccup never reaches an NBD client.
//! Longer outages are the block store's business: its write-back keeps dirty data and retries
//! on top of this, and a FLUSH gives up after its own timeout.
//!
//! An export's store also passes every attempt through the export's [`AdaptiveLimit`]: a
//! throttling answer is retried like any blip, and it also lowers how many calls go out at
//! once, so the retries do not keep hammering a store that asked for fewer.

use super::limit::{AdaptiveLimit, Answer};
use super::stats::{BackendStats, Op, Outcome};
use super::{BackendError, DynObjectStore, ETag, ListPage, ObjectStore, DELETE_BATCH};
use crate::retry::{Classify, Policy};
use async_trait::async_trait;
use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// An `ObjectStore` that retries the transient failures of the store it wraps.
///
/// Conditional writes are retried too; if a first attempt succeeded but its reply was lost,
/// the retry sees the precondition fail (`Ok(None)`), so lease code must re-read the object
/// to tell "someone else won" from "we won already".
#[derive(Debug)]
pub struct Retrying {
    inner: DynObjectStore,
    policy: Policy,
    stats: Arc<BackendStats>,
    /// Calls in flight at once, adapted to throttling; none for stores outside any export.
    limit: Option<Arc<AdaptiveLimit>>,
    /// The store answered a multi-object delete with "not implemented": one by one from then on.
    no_batch_delete: AtomicBool,
}

/// Single deletes in flight at once when a store has no multi-object delete.
const SINGLE_DELETES_AT_ONCE: usize = 32;

impl Retrying {
    /// Wraps `inner`; `stats` may be shared among many wrappers.
    pub fn new(inner: DynObjectStore, policy: Policy, stats: Arc<BackendStats>) -> Self {
        Self {
            inner,
            policy,
            stats,
            limit: None,
            no_batch_delete: AtomicBool::new(false),
        }
    }

    /// Every attempt waits for room under `limit` first (lease calls excepted).
    pub fn with_limit(mut self, limit: Arc<AdaptiveLimit>) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<BackendStats> {
        &self.stats
    }

    /// Runs `call` until it succeeds, fails for good, or the policy runs out; every attempt
    /// is counted in the stats and waits for room under the limit.
    async fn run<T, F, Fut>(&self, op: Op, key: &str, call: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        self.run_limited(op, key, self.limit.as_deref(), call).await
    }

    /// [`Retrying::run`] past the limit: lease calls, which must not queue behind block
    /// transfers (a renewal held back too long would let the lease run out).
    async fn run_unlimited<T, F, Fut>(&self, op: Op, key: &str, call: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        self.run_limited(op, key, None, call).await
    }

    async fn run_limited<T, F, Fut>(
        &self,
        op: Op,
        key: &str,
        limit: Option<&AdaptiveLimit>,
        mut call: F,
    ) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let attempt = || {
            let pending = call();
            async move {
                let permit = match limit {
                    Some(l) => Some(l.acquire().await),
                    None => None,
                };
                let began = Instant::now();
                let result = pending.await;
                self.stats.record(op, Outcome::of(&result), began.elapsed());
                let answer = match &result {
                    Err(BackendError::Throttled(_)) => {
                        self.stats.record_throttled();
                        Some(Answer::Throttled)
                    }
                    Ok(_) | Err(BackendError::Permanent(_) | BackendError::Unsupported(_)) => {
                        Some(Answer::Served)
                    }
                    // A lost connection or a corrupt body says nothing about load: the
                    // slot is freed without moving the limit.
                    Err(_) => None,
                };
                if let (Some(p), Some(a)) = (permit, answer) {
                    p.finish(a);
                }
                result
            }
        };
        let on_retry = |err: &BackendError, retry: u32, delay| {
            self.stats.record_retry();
            tracing::debug!(
                "{} {key}: attempt {retry} failed ({err}); retrying in {delay:?}",
                op.name()
            );
        };
        let result = self.policy.run_observed(attempt, on_retry).await;
        match &result {
            // A checksum or length mismatch always leaves a log line naming the key, whatever
            // the caller does with the error.
            Err(e @ BackendError::Corrupt { .. }) => tracing::error!("{} {key}: {e}", op.name()),
            Err(e) if self.policy.retries(e.kind()) => self.stats.record_exhausted(),
            _ => {}
        }
        result
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

    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<ListPage, BackendError> {
        let what = after.unwrap_or(prefix);
        self.run(Op::List, what, || self.inner.list_page(prefix, after, upto))
            .await
    }

    /// One request per [`DELETE_BATCH`] keys; single deletes (several at once) when the store
    /// answers that it has no multi-object delete, remembered for the store's life.
    async fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        use futures_util::{StreamExt, TryStreamExt};
        for chunk in keys.chunks(DELETE_BATCH) {
            if !self.no_batch_delete.load(Relaxed) {
                let first = chunk.first().map_or("", String::as_str);
                match self
                    .run(Op::DeleteMany, first, || self.inner.delete_many(chunk))
                    .await
                {
                    Ok(()) => continue,
                    Err(BackendError::Unsupported(why)) => {
                        tracing::info!("multi-object delete not available ({why}): deleting objects one by one");
                        self.no_batch_delete.store(true, Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            // Collected first: a stream holding the mapping closure is not `Send` here.
            let deletes: Vec<_> = chunk.iter().map(|key| self.delete(key)).collect();
            futures_util::stream::iter(deletes)
                .buffer_unordered(SINGLE_DELETES_AT_ONCE)
                .try_collect::<()>()
                .await?;
        }
        Ok(())
    }

    async fn copy_from(
        &self,
        src: &dyn ObjectStore,
        src_bucket: &str,
        src_key: &str,
        key: &str,
    ) -> Result<(), BackendError> {
        // Counted with the PUTs: a copy writes one object.
        self.run(Op::Copy, key, || {
            self.inner.copy_from(src, src_bucket, src_key, key)
        })
        .await
    }

    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        let got = self
            .run_unlimited(Op::Get, key, || self.inner.get_with_etag(key))
            .await?;
        self.stats
            .add_read(got.as_ref().map_or(0, |(b, _)| b.len()));
        Ok(got)
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.run_unlimited(Op::ConditionalPut, key, || {
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
        self.run_unlimited(Op::ConditionalPut, key, || {
            self.inner.put_if_match(key, data.clone(), etag)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStore;

    use std::time::Duration;

    fn fast(max_attempts: u32) -> Policy {
        Policy {
            max_attempts,
            first: Duration::from_millis(1),
            cap: Duration::from_millis(4),
            ..Policy::OBJECT_CALL
        }
    }

    fn wrap(policy: Policy) -> (Arc<MemoryStore>, Retrying) {
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
        let policy = Policy {
            max_attempts: u32::MAX,
            first: Duration::from_millis(20),
            cap: Duration::from_millis(20),
            max_elapsed: Duration::from_millis(200),
            ..Policy::OBJECT_CALL
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
    async fn throttling_lowers_the_limit_once_per_burst_and_is_counted() {
        use crate::backend::limit::AdaptiveLimit;
        let mem = Arc::new(MemoryStore::new());
        let limit = Arc::new(AdaptiveLimit::with_bounds("vm1", true, 2, 16));
        let r = Arc::new(
            Retrying::new(mem.clone(), fast(6), Arc::new(BackendStats::default()))
                .with_limit(Arc::clone(&limit)),
        );
        // 12 PUTs in flight together, all answered "slow down" once: one congestion event.
        mem.pause();
        let puts: Vec<_> = (0..12)
            .map(|i| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { r.put(&format!("k{i}"), Bytes::from_static(b"v")).await })
            })
            .collect();
        for _ in 0..1000 {
            if mem.waiting() == 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(mem.waiting(), 12);
        assert_eq!(limit.in_flight(), 12);
        mem.fail_next_throttled(12);
        mem.resume();
        for p in puts {
            p.await.unwrap().unwrap();
        }
        assert_eq!(r.stats().throttled(), 12);
        assert_eq!(r.stats().requests(Op::Put, Outcome::Transient), 12);
        // Half of the 12 in flight, cut once (the retries may have grown it by one since).
        assert!((6..=7).contains(&limit.limit()), "{}", limit.limit());
        assert_eq!(limit.in_flight(), 0);
    }

    #[tokio::test]
    async fn lease_calls_skip_the_limit() {
        use crate::backend::limit::AdaptiveLimit;
        let mem = Arc::new(MemoryStore::new());
        let limit = Arc::new(AdaptiveLimit::with_bounds("vm1", true, 1, 1));
        let r = Retrying::new(mem.clone(), fast(6), Arc::new(BackendStats::default()))
            .with_limit(Arc::clone(&limit));
        let _held = limit.acquire().await;
        // The one slot is taken, yet the lease's conditional write goes through.
        let put = r.put_if_absent("lease", Bytes::from_static(b"l"));
        let created = tokio::time::timeout(Duration::from_secs(5), put).await;
        assert!(created.unwrap().unwrap().is_some());
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
}
