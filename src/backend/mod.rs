//! Object stores: the only place that talks to S3 or the disk. Everything above sees whole
//! objects addressed by key, so the block cache never depends on which store is behind it.
//!
//! - [`StoreFactory`] turns `[s3]` into per-bucket stores: one shared S3 client ([`s3`]) or
//!   the `file://` directory store ([`dir`]), each wrapped in [`retry::Retrying`] (blip
//!   retries, [`stats::BackendStats`] counters).
//! - [`integrity`]: every object carries a CRC32C, checked on every read (`Corrupt`, never
//!   wrong data).
//! - [`conditional`]: conditional writes for export leases, and a probe for stores that
//!   silently ignore them.
//! - [`memory`]: an in-process store with fault injection, for unit tests only.

pub mod conditional;
pub mod dir;
mod factory;
pub mod integrity;
pub mod limit;
pub mod memory;
pub mod retry;
pub mod s3;
pub mod stats;

pub use factory::StoreFactory;

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// The largest object a read accepts (8 MiB is the largest block size; leave headroom). A
/// bucket is outside input: a huge object at a block key must not exhaust memory.
pub const MAX_OBJECT_SIZE: u64 = 64 * 1024 * 1024;

/// Why an object-store call failed, phrased as what the caller should do about it. `Clone`, so
/// a failure shared by several waiters (one GET serving many reads) keeps its kind.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Network trouble, 5xx, throttling: worth retrying with backoff.
    #[error("transient object-store error: {0}")]
    Transient(String),
    /// The store asks for fewer requests (503 SlowDown, 429, a throttling code): retried
    /// like `Transient`, and it also cuts the export's concurrency limit (`limit`).
    #[error("object store is throttling: {0}")]
    Throttled(String),
    /// Credentials, missing bucket, malformed request: retrying will not help until an admin acts.
    #[error("object store refused the request: {0}")]
    Permanent(String),
    /// The object exists but its bytes are not what was written (checksum or length mismatch).
    #[error("object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The object arrived intact but does not decode as a block of this export (wrong key,
    /// altered before it was checksummed, moved from another block): fetching it again gives
    /// the same bytes, so it is not retried.
    #[error("object {key} cannot be read: {reason}")]
    Undecodable { key: String, reason: String },
    /// The store cannot do this operation at all (e.g. conditional writes): the caller must
    /// fall back or ask the admin to opt out (`lease = "off"`).
    #[error("object store does not support {0}")]
    Unsupported(String),
}

impl BackendError {
    /// Whether a retry with backoff may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Transient(_) | BackendError::Throttled(_)
        )
    }
}

impl crate::retry::Classify for BackendError {
    fn kind(&self) -> crate::retry::Kind {
        use crate::retry::Kind;
        match self {
            BackendError::Transient(_) | BackendError::Throttled(_) => Kind::Transient,
            BackendError::Corrupt { .. } | BackendError::Undecodable { .. } => Kind::Corrupt,
            BackendError::Permanent(_) | BackendError::Unsupported(_) => Kind::Permanent,
        }
    }
}

/// Whether `key` lies in the range `(after, upto]` of [`ObjectStore::list_page`].
pub fn in_range(key: &str, after: Option<&str>, upto: Option<&str>) -> bool {
    after.map_or(true, |a| key > a) && upto.map_or(true, |u| key <= u)
}

/// Most keys one multi-object delete may name (the S3 limit).
pub const DELETE_BATCH: usize = 1000;

/// One page of a listing ([`ObjectStore::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// In key order.
    pub keys: Vec<String>,
    /// More keys may follow the last one: list again after it.
    pub more: bool,
}

/// A bucket-bound key/value object store. Implementations must be safe to call from many
/// tasks at once; the block store keeps many requests in flight.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads a whole object; `Ok(None)` when it does not exist (a sparse block).
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError>;
    /// Stores a whole object, replacing any previous one.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError>;
    /// Removes an object; removing an absent object is success.
    async fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Every key that starts with `prefix` (full keys, any order).
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;

    /// The first keys under `prefix` after `after` (from the first when `None`) up to and
    /// including `upto` (to the last when `None`), in key order, with whether more follow:
    /// one request on S3 (`ListObjectsV2` from `StartAfter`, up to 1,000 keys), so a caller
    /// can list several key ranges at once and count every request. The default lists
    /// everything in one go.
    async fn list_page(
        &self,
        prefix: &str,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<ListPage, BackendError> {
        let mut keys = self.list(prefix).await?;
        keys.retain(|k| in_range(k, after, upto));
        keys.sort_unstable();
        Ok(ListPage { keys, more: false })
    }

    /// Removes up to [`DELETE_BATCH`] objects in one request (S3 `DeleteObjects`); absent
    /// objects are success. `Unsupported` when the store has no such request, so the caller
    /// deletes them one by one (`Retrying::delete_many` does).
    async fn delete_many(&self, keys: &[String]) -> Result<(), BackendError> {
        let _ = keys;
        Err(BackendError::Unsupported("multi-object delete".into()))
    }

    /// Copies object `src_key` of bucket `src_bucket` (whose store is `src`, on the same
    /// object store) to `key` in this bucket. S3 copies server-side (`CopyObject`: no bytes
    /// pass through this host, metadata such as the checksum goes along); the default reads
    /// and writes.
    async fn copy_from(
        &self,
        src: &dyn ObjectStore,
        src_bucket: &str,
        src_key: &str,
        key: &str,
    ) -> Result<(), BackendError> {
        let _ = src_bucket;
        match src.get(src_key).await? {
            Some(data) => self.put(key, data).await,
            None => Err(BackendError::Permanent(format!(
                "copy source {src_key} does not exist"
            ))),
        }
    }

    /// Reads an object with its version tag (S3 ETag), for read-modify-write of small control
    /// objects such as leases. `Ok(None)` when absent.
    async fn get_with_etag(&self, key: &str) -> Result<Option<(Bytes, ETag)>, BackendError> {
        let _ = key;
        Err(BackendError::Unsupported("conditional reads".into()))
    }
    /// Creates an object only if no object has that key (`If-None-Match: *`): `Some(etag)` when
    /// created, `None` when another writer got there first.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<Option<ETag>, BackendError> {
        let _ = (key, data);
        Err(BackendError::Unsupported("conditional writes".into()))
    }
    /// Replaces an object only if its current tag is `etag` (`If-Match`): `Some(new etag)` when
    /// replaced, `None` when the object changed or vanished since it was read.
    async fn put_if_match(
        &self,
        key: &str,
        data: Bytes,
        etag: &str,
    ) -> Result<Option<ETag>, BackendError> {
        let _ = (key, data, etag);
        Err(BackendError::Unsupported("conditional writes".into()))
    }
}

/// An object's version tag as the store reports it (S3 ETag, quotes included); only ever
/// compared for equality.
pub type ETag = String;

/// Shared handle type for object stores.
pub type DynObjectStore = Arc<dyn ObjectStore>;
