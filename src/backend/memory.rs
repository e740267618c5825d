//! An in-process object store for unit tests of the block store and server. It counts calls
//! and can be told to fail or to hold requests, so tests can assert "one GET for many
//! readers" or "a transient error is retried" without a network or any sleeps.

use super::{BackendError, ETag, ListPage, ObjectStore};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::watch;

/// Most keys a page of [`ObjectStore::list_page`] holds (as S3).
pub const PAGE_KEYS: usize = 1000;

/// How many calls of each kind a [`MemoryStore`] has served (failed injected calls included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    pub gets: u64,
    pub puts: u64,
    pub deletes: u64,
    pub lists: u64,
}

/// One stored object with the version that stands in for an S3 ETag.
#[derive(Debug, Clone)]
struct Entry {
    data: Bytes,
    version: u64,
}

/// Test-only object store: a map behind a mutex, with call counters and fault injection.
#[derive(Debug)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Entry>>,
    next_version: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    deletes: AtomicU64,
    lists: AtomicU64,
    /// Number of upcoming calls (of any kind) that fail with `Transient`.
    fail_next: AtomicU64,
    /// Number of upcoming calls (of any kind) that fail with `Permanent`.
    fail_next_permanent: AtomicU64,
    /// Number of upcoming calls (of any kind) that fail with `Corrupt`.
    fail_next_corrupt: AtomicU64,
    fail_next_throttled: AtomicU64,
    /// `true` while calls are held at the gate (see [`MemoryStore::pause`]).
    gate: watch::Sender<bool>,
    /// Calls currently waiting at the gate.
    waiting: AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store; wrap it in `Arc` to use it as a `DynObjectStore`.
    pub fn new() -> Self {
        Self {
            objects: Mutex::new(BTreeMap::new()),
            next_version: AtomicU64::new(1),
            gets: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            lists: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            fail_next_permanent: AtomicU64::new(0),
            fail_next_corrupt: AtomicU64::new(0),
            fail_next_throttled: AtomicU64::new(0),
            gate: watch::channel(false).0,
            waiting: AtomicU64::new(0),
        }
    }

    /// Makes the next `n` calls (get, put, delete, list, conditional ones) fail with
    /// `BackendError::Transient`, to exercise retry paths.
    pub fn fail_next(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` calls fail with `BackendError::Permanent`.
    pub fn fail_next_permanent(&self, n: u64) {
        self.fail_next_permanent.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` calls fail with `BackendError::Corrupt` (a checksum mismatch).
    pub fn fail_next_corrupt(&self, n: u64) {
        self.fail_next_corrupt.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` calls fail with `BackendError::Throttled` (503 SlowDown).
    pub fn fail_next_throttled(&self, n: u64) {
        self.fail_next_throttled.store(n, Ordering::SeqCst);
    }

    /// Holds every call at its start until [`MemoryStore::resume`], so a test can pile up
    /// concurrent requests deterministically (check [`MemoryStore::waiting`]).
    pub fn pause(&self) {
        self.gate.send_replace(true);
    }

    /// Releases calls held by [`MemoryStore::pause`].
    pub fn resume(&self) {
        self.gate.send_replace(false);
    }

    /// How many calls are currently held at the pause gate.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Call counters so far.
    pub fn counts(&self) -> OpCounts {
        OpCounts {
            gets: self.gets.load(Ordering::SeqCst),
            puts: self.puts.load(Ordering::SeqCst),
            deletes: self.deletes.load(Ordering::SeqCst),
            lists: self.lists.load(Ordering::SeqCst),
        }
    }

    /// GET calls so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    /// PUT calls so far (conditional puts included).
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }

    /// DELETE calls so far.
    pub fn deletes(&self) -> u64 {
        self.deletes.load(Ordering::SeqCst)
    }

    /// LIST calls so far.
    pub fn lists(&self) -> u64 {
        self.lists.load(Ordering::SeqCst)
    }

    /// Sets all counters back to zero (e.g. after a test's setup phase).
    pub fn reset_counts(&self) {
        for c in [&self.gets, &self.puts, &self.deletes, &self.lists] {
            c.store(0, Ordering::SeqCst);
        }
    }

    /// Reads an object without counting or fault injection (for test assertions).
    pub fn peek(&self, key: &str) -> Option<Bytes> {
        self.lock().get(key).map(|e| e.data.clone())
    }

    /// Stores an object without counting or fault injection (for test setup).
    pub fn insert(&self, key: &str, data: Bytes) {
        let version = self.bump();
        self.lock().insert(key.to_string(), Entry { data, version });
    }

    /// All keys, sorted (for test assertions).
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Number of stored objects.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no object.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A panicking test thread must not hide the map from the others.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::SeqCst)
    }

    /// Common prologue of every call: count it, wait at the gate, apply injected faults.
    async fn enter(&self, counter: &AtomicU64, what: &str, key: &str) -> Result<(), BackendError> {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut rx = self.gate.subscribe();
        if *rx.borrow() {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            // The sender lives in `self`, so `wait_for` only ends when the gate opens.
            let _ = rx.wait_for(|paused| !*paused).await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        if take_one(&self.fail_next) {
            return Err(BackendError::Transient(format!(
                "injected failure: {what} {key}"
            )));
        }
        if take_one(&self.fail_next_throttled) {
            return Err(BackendError::Throttled(format!(
                "injected slow down: {what} {key}"
            )));
        }
        if take_one(&self.fail_next_corrupt) {
            return Err(BackendError::Corrupt {
                key: key.to_string(),
                reason: format!("injected failure: {what}"),
            });
        }
        if take_one(&self.fail_next_permanent) {
            return Err(BackendError::Permanent(format!(
                "injected failure: {what} {key}"
            )));
        }
        Ok(())
    }
}

/// Decrements `n` if positive; true when it did (this call should fail).
fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        self.enter(&self.gets, "GET", key).await?;
        Ok(self.peek(key))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.enter(&self.puts, "PUT", key).await?;
        self.insert(key, data);
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.enter(&self.deletes, "DELETE", key).await?;
        self.lock().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.enter(&self.lists, "LIST", prefix).await?;
        let map = self.lock();
        Ok(map
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// Pages of [`PAGE_KEYS`], as S3 answers, so listings that page are tested as such.
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<ListPage, BackendError> {
        self.enter(&self.lists, "LIST", prefix).await?;
        let map = self.lock();
        let from = match after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut keys: Vec<String> = map
            .range((from, Bound::Unbounded))
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .take(PAGE_KEYS + 1)
            .take_while(|k| upto.map_or(true, |u| k.as_str() <= u))
            .cloned()
            .collect();
        let more = keys.len() > PAGE_KEYS;
        keys.truncate(PAGE_KEYS);
        Ok(ListPage { keys, more })
    }

    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        self.enter(&self.gets, "GET", key).await?;
        Ok(self
            .lock()
            .get(key)
            .map(|e| (e.data.clone(), etag_of(e.version))))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.enter(&self.puts, "PUT", key).await?;
        let version = self.bump();
        let mut map = self.lock();
        if map.contains_key(key) {
            return Ok(None);
        }
        map.insert(key.to_string(), Entry { data, version });
        Ok(Some(etag_of(version)))
    }

    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        self.enter(&self.puts, "PUT", key).await?;
        let version = self.bump();
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(e) if etag_of(e.version) == etag => {
                *e = Entry { data, version };
                Ok(Some(etag_of(version)))
            }
            _ => Ok(None),
        }
    }
}

/// Formats a version like an S3 ETag (quoted), so callers never rely on its shape.
fn etag_of(version: u64) -> ETag {
    format!("\"{version:016x}\"")
}

/// A store that accepts conditional writes but ignores the conditions, as some S3-compatible
/// servers do: what the conditional-write probe and export leases must refuse to trust.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct CarelessStore(pub MemoryStore);

#[cfg(test)]
#[async_trait]
impl ObjectStore for CarelessStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.0.put(key, data).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.0.list(prefix).await
    }
    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        self.0.get_with_etag(key).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.0.put(key, data).await.map(|()| Some("\"x\"".into()))
    }
    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        _etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        self.0.put(key, data).await.map(|()| Some("\"x\"".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn put_get_delete_list_round_trip() {
        let s = MemoryStore::new();
        assert_eq!(s.get("a/1").await.unwrap(), None);
        s.put("a/1", Bytes::from_static(b"one")).await.unwrap();
        s.put("a/2", Bytes::from_static(b"two")).await.unwrap();
        s.put("ab/1", Bytes::from_static(b"x")).await.unwrap();
        s.put("b/1", Bytes::from_static(b"y")).await.unwrap();
        assert_eq!(s.get("a/1").await.unwrap().unwrap(), &b"one"[..]);
        assert_eq!(s.list("a/").await.unwrap(), vec!["a/1", "a/2"]);
        assert_eq!(s.list("a").await.unwrap(), vec!["a/1", "a/2", "ab/1"]);
        s.delete("a/1").await.unwrap();
        s.delete("a/1").await.unwrap();
        assert_eq!(s.get("a/1").await.unwrap(), None);
        assert_eq!(
            s.counts(),
            OpCounts {
                gets: 3,
                puts: 4,
                deletes: 2,
                lists: 2
            }
        );
    }

    #[tokio::test]
    async fn fail_next_fails_exactly_n_calls() {
        let s = MemoryStore::new();
        s.fail_next(2);
        assert!(matches!(
            s.put("k", Bytes::new()).await,
            Err(BackendError::Transient(_))
        ));
        assert!(matches!(s.get("k").await, Err(BackendError::Transient(_))));
        s.put("k", Bytes::from_static(b"v")).await.unwrap();
        assert_eq!(s.get("k").await.unwrap().unwrap(), &b"v"[..]);
        s.fail_next_permanent(1);
        assert!(matches!(s.list("").await, Err(BackendError::Permanent(_))));
        assert_eq!(s.list("").await.unwrap(), vec!["k"]);
        s.fail_next_corrupt(1);
        assert!(matches!(
            s.get("k").await,
            Err(BackendError::Corrupt { .. })
        ));
        assert!(s.get("k").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn pause_holds_calls_until_resume() {
        let s = Arc::new(MemoryStore::new());
        s.insert("k", Bytes::from_static(b"v"));
        s.pause();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.get("k").await })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.waiting() < 4 {
            assert!(tokio::time::Instant::now() < deadline, "calls never queued");
            tokio::task::yield_now().await;
        }
        assert!(tasks.iter().all(|t| !t.is_finished()));
        s.resume();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().unwrap(), &b"v"[..]);
        }
        assert_eq!(s.waiting(), 0);
        assert_eq!(s.gets(), 4);
    }

    #[tokio::test]
    async fn conditional_writes_compare_and_swap() {
        let s = MemoryStore::new();
        let e1 = s
            .put_if_absent("l", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let e1 = e1.expect("first create wins");
        assert_eq!(
            s.put_if_absent("l", Bytes::from_static(b"b"))
                .await
                .unwrap(),
            None
        );
        let (data, tag) = s.get_with_etag("l").await.unwrap().unwrap();
        assert_eq!((data.as_ref(), &tag), (&b"a"[..], &e1));
        let e2 = s
            .put_if_match("l", Bytes::from_static(b"c"), &e1)
            .await
            .unwrap();
        let e2 = e2.expect("matching tag replaces");
        assert_ne!(e1, e2);
        assert_eq!(
            s.put_if_match("l", Bytes::from_static(b"d"), &e1)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            s.put_if_match("x", Bytes::from_static(b"d"), &e1)
                .await
                .unwrap(),
            None
        );
        assert_eq!(s.peek("l").unwrap(), &b"c"[..]);
    }
}
