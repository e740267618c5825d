//! The fence: what stops this daemon from changing an export's objects once its lease is in
//! doubt — from a sixth of the ttl before the lease would run out, until it is renewed (or for
//! good once another daemon took it). Both layers read the lease's validity clock on every
//! call rather than waiting for a timer, so a stalled renewal task cannot delay fencing:
//! - the block store's write gate (`store::WriteGate`): WRITE, TRIM, WRITE_ZEROES and FLUSH
//!   fail with EIO at once, so clients learn immediately instead of filling the cache with
//!   writes that may never be stored;
//! - [`FencedStore`], the object store the block store writes through: write-back PUTs and
//!   DELETEs fail (transiently, so dirty data stays dirty and is retried once the lease is
//!   renewed), and a PUT still in flight when the lease would run out is abandoned. This is
//!   what keeps two daemons from ever writing one export.
//!
//! An S3 outage shorter than two thirds of the ttl (40 s with the default lease) never fences
//! an export, wherever it falls between renewals; exports that must ride out longer outages
//! take a longer `lease` (or `lease = "off"` on a single daemon).

use super::slot::LeaseSlot;
use super::Lease;
use crate::backend::{BackendError, DynObjectStore, ETag, ListPage, ObjectStore};
use async_trait::async_trait;
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;

/// An object store that writes only while the export lease is held.
#[derive(Debug)]
pub struct FencedStore {
    inner: DynObjectStore,
    slot: Arc<LeaseSlot>,
}

impl FencedStore {
    /// Wraps `inner`: writes go through only while `slot` holds a valid lease.
    pub fn new(inner: DynObjectStore, slot: Arc<LeaseSlot>) -> Self {
        Self { inner, slot }
    }

    /// Runs a mutating call only while the lease is valid, and gives up on it if the lease
    /// would run out before the store answers (renewals in the meantime extend the wait).
    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let mut call = std::pin::pin!(call);
        loop {
            // Writes accepted while the lease could not be taken: take it before storing them.
            if self.slot.is_pending() {
                self.slot.resume().await?;
            }
            let deadline = self.slot.write_deadline().map_err(|reason| {
                BackendError::Transient(format!("export lease not held: {reason}"))
            })?;
            if let Ok(done) = tokio::time::timeout_at(deadline, &mut call).await {
                return done;
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FencedStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        self.inner.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.guarded(self.inner.put(key, data)).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.guarded(self.inner.delete(key)).await
    }
    async fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        self.guarded(self.inner.delete_many(keys)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.inner.list(prefix).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<ListPage, BackendError> {
        self.inner.list_page(prefix, after, upto).await
    }
    async fn copy_from(
        &self,
        src: &dyn ObjectStore,
        src_bucket: &str,
        src_key: &str,
        key: &str,
    ) -> Result<(), BackendError> {
        self.guarded(self.inner.copy_from(src, src_bucket, src_key, key))
            .await
    }
    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        self.inner.get_with_etag(key).await
    }
    /// Not fenced: a create-only write cannot overwrite anything another daemon wrote, and
    /// an export must be able to write its manifest at open, before any client holds the lease.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        self.inner.put_if_absent(key, data).await
    }
    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        self.guarded(self.inner.put_if_match(key, data, etag)).await
    }
}

impl crate::store::WriteGate for Lease {
    fn check(&self) -> Result<(), String> {
        self.writable()
    }
}
