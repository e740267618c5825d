//! The block objects of one export: how a block index names its object, and the GET, PUT and
//! DELETE of one block. Everything the store sends to or reads from S3 about blocks passes
//! here, so a layer that transforms block contents (compression, encryption) or redirects
//! them (snapshots) has one place to sit. Retrying is the callers' business: reads and
//! write-back retry by different rules.

use crate::backend::{BackendError, DynObjectStore};
use bytes::Bytes;
use std::fmt;

/// The block objects under one prefix, each exactly `block_size` bytes.
#[derive(Debug)]
pub(crate) struct BlockObjects {
    store: DynObjectStore,
    prefix: String,
    block_size: usize,
}

/// A block's index with its object key, built once per GET or write-back task (retries reuse
/// it) and printed in logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockKey {
    block: u64,
    name: String,
}

impl BlockKey {
    /// The block this key names.
    #[allow(dead_code)] // the seam for layers that bind data to its position
    pub fn block(&self) -> u64 {
        self.block
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl BlockObjects {
    pub fn new(store: DynObjectStore, prefix: String, block_size: usize) -> Self {
        Self {
            store,
            prefix,
            block_size,
        }
    }

    /// The export's key prefix (logs).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of block `block`.
    pub fn key(&self, block: u64) -> BlockKey {
        BlockKey {
            block,
            name: block_key(&self.prefix, block),
        }
    }

    /// The block's bytes, `None` when it has no object (reads as zeros). An object of the wrong
    /// size is corrupt (cut short on the way, or written by something else): never data.
    pub async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, BackendError> {
        match self.store.get(&key.name).await? {
            Some(d) if d.len() != self.block_size => Err(BackendError::Corrupt {
                key: key.name.clone(),
                reason: format!("{} bytes, expected {}", d.len(), self.block_size),
            }),
            other => Ok(other),
        }
    }

    /// Stores the block's bytes (exactly one block).
    pub async fn put(&self, key: &BlockKey, data: Bytes) -> Result<(), BackendError> {
        self.store.put(&key.name, data).await
    }

    /// Removes the block's object: it reads as zeros from now on.
    pub async fn delete(&self, key: &BlockKey) -> Result<(), BackendError> {
        self.store.delete(&key.name).await
    }
}

/// The object key of a block: prefix + 16 lowercase hex digits.
pub(crate) fn block_key(prefix: &str, block: u64) -> String {
    format!("{prefix}{block:016x}")
}

/// The block index named by `key`, if it is a block object of this prefix.
pub(crate) fn parse_block_key(prefix: &str, key: &str) -> Option<u64> {
    let suffix = key.strip_prefix(prefix)?;
    if suffix.len() != 16
        || !suffix
            .bytes()
            .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(suffix, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStore;
    use std::sync::Arc;

    #[test]
    fn keys_round_trip_and_foreign_keys_are_ignored() {
        assert_eq!(block_key("vm1/", 42), "vm1/000000000000002a");
        assert_eq!(parse_block_key("vm1/", "vm1/000000000000002a"), Some(42));
        for bad in [
            "vm1/nbd-s3.json",
            "vm1/000000000000002A",
            "vm1/00000000000002a",
            "vm2/000000000000002a",
            "vm1/000000000000002a.tmp",
        ] {
            assert_eq!(parse_block_key("vm1/", bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn objects_are_named_by_block_and_checked_for_size() {
        let mem = Arc::new(MemoryStore::new());
        let objects = BlockObjects::new(Arc::clone(&mem) as DynObjectStore, "p/".into(), 4);
        let key = objects.key(3);
        assert_eq!(
            (key.block(), key.to_string()),
            (3, "p/0000000000000003".into())
        );
        assert_eq!(objects.get(&key).await.ok(), Some(None));
        objects
            .put(&key, Bytes::from_static(b"abcd"))
            .await
            .expect("put");
        assert_eq!(
            mem.peek("p/0000000000000003").as_deref(),
            Some(&b"abcd"[..])
        );
        assert_eq!(
            objects.get(&key).await.ok(),
            Some(Some(Bytes::from_static(b"abcd")))
        );
        mem.insert("p/0000000000000003", Bytes::from_static(b"abc"));
        let err = objects
            .get(&key)
            .await
            .expect_err("a short object is corrupt");
        assert!(matches!(err, BackendError::Corrupt { .. }), "{err}");
        objects.delete(&key).await.expect("delete");
        assert!(mem.peek("p/0000000000000003").is_none());
    }
}
