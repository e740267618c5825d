//! Unit tests of the block store against the in-memory object store (call counters, fault
//! injection, a pause gate). Integration tests against a real S3 server live in tests/it.

mod basics;
mod blocks;
mod budget;
mod change;
mod codec;
mod durability;
mod journaled;
mod model;
mod readahead;
mod snapshots;
mod sparse;

use super::*;
use crate::backend::memory::MemoryStore;
use crate::backend::BackendError;
use std::time::Duration;

pub(super) const BS: u32 = 4096;

pub(super) fn config(bs: u32, size: u64) -> BlockStoreConfig {
    BlockStoreConfig {
        prefix: "t/".into(),
        size,
        block_size: bs,
        read_only: false,
        flush_timeout: Duration::from_secs(20),
        codec: Default::default(),
        base: None,
        journal: None,
    }
}

pub(super) fn big_budget() -> Arc<CacheBudget> {
    CacheBudget::new(1 << 30, 256 << 20)
}

/// `MemoryStore` keeps the `Bytes` it is given, which would keep our charged block buffers
/// alive forever; a real store only reads them. This wrapper stores a copy instead.
#[derive(Debug)]
pub(super) struct Copying(pub Arc<MemoryStore>);

#[async_trait::async_trait]
impl crate::backend::ObjectStore for Copying {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        self.0.put(key, Bytes::copy_from_slice(&data)).await
    }
    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        self.0.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        self.0.list(prefix).await
    }
}

pub(super) fn objects(mem: &Arc<MemoryStore>) -> DynObjectStore {
    Arc::new(Copying(Arc::clone(mem)))
}

pub(super) async fn open_with(
    mem: &Arc<MemoryStore>,
    cfg: BlockStoreConfig,
    budget: Arc<CacheBudget>,
) -> Arc<BlockStore> {
    let store = BlockStore::open(objects(mem), cfg, budget)
        .await
        .expect("open");
    mem.reset_counts();
    store
}

pub(super) async fn open(mem: &Arc<MemoryStore>, blocks: u64) -> Arc<BlockStore> {
    open_with(mem, config(BS, blocks * u64::from(BS)), big_budget()).await
}

/// The bytes of a read, zeros expanded.
pub(super) fn flatten(extents: &[Extent]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in extents {
        match e {
            Extent::Data(d) => v.extend_from_slice(d),
            Extent::Zero(n) => v.resize(v.len() + *n as usize, 0),
        }
    }
    v
}

pub(super) async fn read_bytes(store: &BlockStore, offset: u64, len: u32) -> Vec<u8> {
    let extents = store.read(offset, len).await.expect("read");
    let v = flatten(&extents);
    assert_eq!(v.len(), len as usize, "read returned the wrong length");
    v
}

/// Deterministic non-zero test data.
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub(super) fn key(block: u64) -> String {
    format!("t/{block:016x}")
}

pub(super) use crate::test_support::wait_until as eventually;
