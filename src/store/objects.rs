//! The block objects of one export: how a block index names its object, and the GET, PUT and
//! DELETE of one block. Everything the store sends to or reads from S3 about blocks passes
//! here, so a layer that transforms block contents (compression, encryption: `codec`) or
//! redirects them (snapshots) has one place to sit. Retrying is the callers' business: reads
//! and write-back retry by different rules.

use super::codec::{Codec, DecodeError};
use super::layers::{data_key, tomb_key, Found, LayerKey, Layers, BASE};
use crate::backend::{BackendError, DynObjectStore};
use bytes::Bytes;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The block objects under one prefix, in the layers of `layers` (only layer 0, the plain
/// keys, until the export has a snapshot): exactly `block_size` raw bytes each for a plain
/// export, encoded by `codec` otherwise.
#[derive(Debug)]
pub(crate) struct BlockObjects {
    store: DynObjectStore,
    prefix: String,
    block_size: usize,
    layers: RwLock<Layers>,
    /// `None`: raw objects.
    codec: Option<Arc<Codec>>,
    /// The export's identity, bound into every encrypted block.
    id: Arc<str>,
    counters: ObjectCounters,
    /// A clone's base export: where the layers marked [`BASE`] live (read only).
    base: RwLock<Option<BaseObjects>>,
}

/// Where a clone's base blocks are: the base's bucket, prefix and identity (its encrypted
/// blocks are bound to it).
#[derive(Debug, Clone)]
pub(crate) struct BaseObjects {
    pub store: DynObjectStore,
    pub prefix: String,
    pub id: Arc<str>,
}

/// What the codec did, for metrics (compression ratio, decryption failures).
#[derive(Debug, Default)]
pub(crate) struct ObjectCounters {
    /// Block bytes handed to successful PUTs (block_size each).
    pub logical_bytes: AtomicU64,
    /// Object bytes those PUTs stored.
    pub stored_bytes: AtomicU64,
    /// PUTs whose block was stored compressed (the rest did not shrink, or were not tried).
    pub compressed_blocks: AtomicU64,
    /// Objects that did not authenticate under the export's key.
    pub decrypt_errors: AtomicU64,
    /// Objects that were not well-formed block objects (header, lengths, compressed stream).
    pub decode_errors: AtomicU64,
}

/// A block's index with its object key, built once per GET or write-back attempt and printed
/// in logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockKey {
    block: u64,
    layer: u64,
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
    pub fn new(store: DynObjectStore, prefix: String, block_size: usize, layers: Layers) -> Self {
        Self {
            store,
            prefix,
            block_size,
            layers: RwLock::new(layers),
            codec: None,
            id: Arc::from(""),
            counters: ObjectCounters::default(),
            base: RwLock::new(None),
        }
    }

    /// The same objects encoded by `codec` (none: raw) for the export `id`.
    pub fn with_codec(mut self, codec: Option<Codec>, id: String) -> Self {
        self.codec = codec.map(Arc::new);
        self.id = id.into();
        self
    }

    /// The same objects encoded like `other`'s (a snapshot view reads its export's blocks).
    pub fn with_codec_of(mut self, other: &BlockObjects) -> Self {
        self.codec = other.codec.clone();
        self.id = Arc::clone(&other.id);
        self
    }

    /// The codec's counters.
    pub fn counters(&self) -> &ObjectCounters {
        &self.counters
    }

    /// Where the base export's layers live (a clone).
    pub fn set_base(&self, base: Option<BaseObjects>) {
        *self.base.write() = base;
    }

    /// The store, key and identity of a block in `layer` (the base's, for a base layer).
    fn locate(&self, layer: u64, block: u64) -> (DynObjectStore, String, Arc<str>) {
        if layer & BASE != 0 {
            if let Some(b) = &*self.base.read() {
                let key = data_key(&b.prefix, layer & !BASE, block);
                return (Arc::clone(&b.store), key, Arc::clone(&b.id));
            }
        }
        let key = data_key(&self.prefix, layer, block);
        (Arc::clone(&self.store), key, Arc::clone(&self.id))
    }

    /// The base export's objects (a clone), for flatten and snapshot views.
    pub fn base(&self) -> Option<BaseObjects> {
        self.base.read().clone()
    }

    /// The export's key prefix (logs).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The object store the blocks live in.
    pub fn store(&self) -> &DynObjectStore {
        &self.store
    }

    /// The layers, to read.
    pub fn layers(&self) -> RwLockReadGuard<'_, Layers> {
        self.layers.read()
    }

    /// The layers, to change (snapshot create; never held across an await).
    pub fn layers_mut(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers.write()
    }

    /// The key block `block` is written to (the head layer).
    pub fn key(&self, block: u64) -> BlockKey {
        let layer = self.layers.read().head();
        BlockKey {
            block,
            layer,
            name: data_key(&self.prefix, layer, block),
        }
    }

    /// The object a read of `block` finds, `None` when the block reads as zeros.
    pub fn read_key(&self, block: u64) -> Option<BlockKey> {
        match self.layers.read().resolve(block) {
            Found::Data(layer) => Some(BlockKey {
                block,
                layer,
                name: self.locate(layer, block).1,
            }),
            Found::Tomb(_) | Found::Nothing => None,
        }
    }

    /// The block's bytes, `None` when it has no object (reads as zeros). An object of the wrong
    /// size is corrupt (cut short on the way, or written by something else): never data.
    pub async fn get(&self, key: &BlockKey) -> Result<Option<Bytes>, BackendError> {
        let (store, _, id) = self.locate(key.layer, key.block);
        let object = store.get(&key.name).await?;
        match (object, &self.codec) {
            (None, _) => Ok(None),
            (Some(d), None) if d.len() != self.block_size => Err(BackendError::Corrupt {
                key: key.name.clone(),
                reason: format!("{} bytes, expected {}", d.len(), self.block_size),
            }),
            (Some(d), None) => Ok(Some(d)),
            (Some(d), Some(codec)) => {
                let (codec, block) = (Arc::clone(codec), key.block);
                let decoded = off_runtime(move || codec.decode(&id, block, &d)).await;
                match decoded {
                    Ok(Ok(plain)) => Ok(Some(Bytes::from(plain))),
                    Ok(Err(e)) => Err(self.undecodable(key, e)),
                    Err(reason) => Err(BackendError::Transient(reason)),
                }
            }
        }
    }

    /// Counts and logs an object that does not decode; the error the reader gets.
    fn undecodable(&self, key: &BlockKey, e: DecodeError) -> BackendError {
        match &e {
            DecodeError::Decrypt { key_file } => {
                self.counters.decrypt_errors.fetch_add(1, Relaxed);
                tracing::error!(key = %key, key_file = %key_file.display(),
                    "block does not decrypt with the export's key file (wrong key, or the object was altered, truncated or moved); returning EIO");
            }
            DecodeError::Malformed(reason) => {
                self.counters.decode_errors.fetch_add(1, Relaxed);
                let key_file = self.codec.as_ref().and_then(|c| c.key_file());
                let key_file = key_file
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                tracing::error!(key = %key, reason = %reason, key_file = %key_file,
                    "block object is not a valid block of this export (truncated or altered?); returning EIO");
            }
        }
        BackendError::Undecodable {
            key: key.name.clone(),
            reason: e.to_string(),
        }
    }

    /// The object for `data` (one whole block) at `key`, and whether it is compressed.
    async fn encode(&self, key: &BlockKey, data: Bytes) -> Result<(Bytes, bool), BackendError> {
        let Some(codec) = &self.codec else {
            return Ok((data, false));
        };
        let (codec, id, block) = (Arc::clone(codec), Arc::clone(&self.id), key.block);
        let encoded = off_runtime(move || codec.encode(&id, block, &data))
            .await
            .and_then(|r| r)
            .map_err(|reason| BackendError::Transient(format!("encoding block {key}: {reason}")))?;
        Ok((Bytes::from(encoded.object), encoded.compressed))
    }

    /// Stores the block's bytes (exactly one block) at `key` (from [`BlockObjects::key`]).
    /// A tombstone of the block in that layer goes after the data is stored: a crash in
    /// between leaves both, and the tombstone (the older state) wins.
    pub async fn put(&self, key: &BlockKey, data: Bytes) -> Result<(), BackendError> {
        let logical = data.len() as u64;
        let (object, compressed) = self.encode(key, data).await?;
        let stored = object.len() as u64;
        self.store.put(&key.name, object).await?;
        let c = &self.counters;
        c.logical_bytes.fetch_add(logical, Relaxed);
        c.stored_bytes.fetch_add(stored, Relaxed);
        if compressed {
            c.compressed_blocks.fetch_add(1, Relaxed);
        }
        let tomb = {
            let layers = self.layers.read();
            let tomb = layers.has(key.layer, key.block).1;
            layers.set(key.layer, key.block, true, tomb);
            tomb
        };
        if tomb {
            let tomb_key = tomb_key(&self.prefix, key.layer, key.block);
            self.store.delete(&tomb_key).await?;
            self.layers.read().set(key.layer, key.block, true, false);
        }
        Ok(())
    }

    /// Makes the block read as zeros: its object in the head layer goes, and a tombstone hides
    /// what a lower layer (a snapshot) still holds. The tombstone is stored before the data
    /// object goes, so a crash in between reads as zeros already.
    pub async fn clear(&self, block: u64) -> Result<(), BackendError> {
        let (layer, below, (data, tomb)) = {
            let l = self.layers.read();
            (l.head(), l.resolve_below(block), l.has(l.head(), block))
        };
        let data_key = data_key(&self.prefix, layer, block);
        let tomb_key = tomb_key(&self.prefix, layer, block);
        if matches!(below, Found::Data(_)) {
            if !tomb {
                self.store.put(&tomb_key, Bytes::new()).await?;
                self.layers.read().set(layer, block, data, true);
            }
            if data {
                self.store.delete(&data_key).await?;
            }
            self.layers.read().set(layer, block, false, true);
            return Ok(());
        }
        if data {
            self.store.delete(&data_key).await?;
            self.layers.read().set(layer, block, false, tomb);
        }
        if tomb {
            self.store.delete(&tomb_key).await?;
            self.layers.read().set(layer, block, false, false);
        }
        Ok(())
    }

    /// [`BlockObjects::clear`] for many blocks: the plain ones (an object in the head layer,
    /// no tombstone, nothing below to hide) go in multi-object deletes of up to 1,000 keys;
    /// any other is cleared on its own. On error some may be gone already; clearing again
    /// is harmless.
    pub async fn clear_many(&self, blocks: &[u64]) -> Result<(), BackendError> {
        // Plain: no tombstone here and nothing below to hide, so clearing is at most the
        // deletion of this layer's object (none at all when it holds none).
        let (layer, held, other) = {
            let l = self.layers.read();
            let layer = l.head();
            let (mut held, mut other) = (Vec::new(), Vec::new());
            for &block in blocks {
                match (l.has(layer, block), l.resolve_below(block)) {
                    (_, Found::Data(_)) | ((_, true), _) => other.push(block),
                    ((true, false), _) => held.push(block),
                    ((false, false), _) => {}
                }
            }
            (layer, held, other)
        };
        let keys: Vec<String> = held
            .iter()
            .map(|&b| data_key(&self.prefix, layer, b))
            .collect();
        if !keys.is_empty() {
            delete_all(&self.store, &keys).await?;
            let l = self.layers.read();
            for &b in &held {
                l.set(layer, b, false, false);
            }
        }
        for block in other {
            self.clear(block).await?;
        }
        Ok(())
    }

    /// Removes objects of frozen layers that nothing reads any more: multi-object deletes
    /// of up to 1,000 keys. On error some may be gone already (and are still recorded as
    /// present: a later collection finds them absent, which is harmless).
    pub async fn remove_many(&self, keys: &[LayerKey]) -> Result<(), BackendError> {
        let names: Vec<String> = keys
            .iter()
            .map(|key| match key.tomb {
                true => tomb_key(&self.prefix, key.layer, key.block),
                false => data_key(&self.prefix, key.layer, key.block),
            })
            .collect();
        delete_all(&self.store, &names).await?;
        let l = self.layers.read();
        for &key in keys {
            l.forget(key);
        }
        Ok(())
    }
}

/// Deletes `keys` with multi-object deletes, or one by one where the store has none (the
/// retrying wrapper already falls back by itself; a bare store in a unit test does not).
pub(crate) async fn delete_all(
    store: &DynObjectStore,
    keys: &[String],
) -> Result<(), BackendError> {
    match store.delete_many(keys).await {
        Err(BackendError::Unsupported(_)) => {
            for key in keys {
                store.delete(key).await?;
            }
            Ok(())
        }
        done => done,
    }
}

/// Runs codec work (about a millisecond per 128 KiB block at most) on the blocking pool, so a
/// burst of PUTs or GETs cannot hold the async threads that serve every connection.
async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("codec task failed: {e}"))
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
        let objects = BlockObjects::new(
            Arc::clone(&mem) as DynObjectStore,
            "p/".into(),
            4,
            Layers::plain(),
        );
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
        objects.clear(3).await.expect("clear");
        assert!(mem.peek("p/0000000000000003").is_none());
    }
}
