//! The per-export block store: turns byte ranges into block objects through a cache shared by
//! every connection of the export, with write-back, single-flight reads and a global budget.
//!
//! STUB: the interface below is fixed for the server; the bodies are being written (issue 4).

use crate::backend::{BackendError, DynObjectStore};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// What the server needs to know to build a block store for an export.
#[derive(Debug, Clone)]
pub struct BlockStoreConfig {
    /// Key prefix of the export's objects, e.g. `vm1/`.
    pub prefix: String,
    /// Export size in bytes.
    pub size: u64,
    /// Object size in bytes (power of two).
    pub block_size: u32,
    /// Writes are refused (and no manifest is written) when set.
    pub read_only: bool,
    /// How long FLUSH waits for S3 before failing with EIO.
    pub flush_timeout: Duration,
}

/// The process-wide cache budget shared by all exports (`[cache] memory` and `dirty`).
#[derive(Debug)]
pub struct CacheBudget {
    memory: u64,
    dirty: u64,
}

impl CacheBudget {
    /// One budget per process; every export's store draws from it.
    pub fn new(memory: u64, dirty: u64) -> Arc<Self> {
        Arc::new(Self { memory, dirty })
    }
    /// Bytes of clean + dirty data allowed in memory.
    pub fn memory_limit(&self) -> u64 {
        self.memory
    }
    /// Dirty bytes allowed before writers wait.
    pub fn dirty_limit(&self) -> u64 {
        self.dirty
    }
}

/// A piece of a read result, in order: the server turns `Zero` into OFFSET_HOLE chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Bytes as stored.
    Data(Bytes),
    /// This many bytes read as zeros (no object, or trimmed).
    Zero(u32),
}

/// One `base:allocation` descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u32,
    /// NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2), or 0 for stored data.
    pub flags: u32,
}

/// Why a block-store operation failed, with the NBD errno the client should see.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store: {0}")]
    Backend(#[from] BackendError),
    #[error("export's stored block size {stored} differs from configured block size {configured}")]
    BlockSizeMismatch { stored: u32, configured: u32 },
    #[error("flush did not complete within {0:?}; data stays dirty and is retried")]
    FlushTimeout(Duration),
    #[error("export metadata is invalid: {0}")]
    BadManifest(String),
    #[error("store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// The errno sent on the wire (EIO for data problems, ESHUTDOWN when stopping).
    pub fn errno(&self) -> u32 {
        match self {
            StoreError::ShuttingDown => 108,
            _ => 5,
        }
    }
}

/// One export's blocks. All methods take byte ranges the server has already bounds-checked
/// against `size()`; they may still be unaligned.
#[derive(Debug)]
pub struct BlockStore {
    cfg: BlockStoreConfig,
}

impl BlockStore {
    /// Opens (or initialises) the export: checks/writes `<prefix>nbd-s3.json`, lists the prefix
    /// to build the presence map.
    pub async fn open(
        _objects: DynObjectStore,
        cfg: BlockStoreConfig,
        _budget: Arc<CacheBudget>,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Self { cfg }))
    }
    /// Current export size in bytes.
    pub fn size(&self) -> u64 {
        self.cfg.size
    }
    /// Object size in bytes.
    pub fn block_size(&self) -> u32 {
        self.cfg.block_size
    }
    /// Grows the export (reload); shrinking is refused by the reload logic before this.
    pub fn resize(&self, _new_size: u64) {}
    /// Reads `len` bytes at `offset` as data/zero extents covering the range in order.
    pub async fn read(&self, _offset: u64, len: u32) -> Result<Vec<Extent>, StoreError> {
        Ok(vec![Extent::Zero(len)])
    }
    /// Writes `data` at `offset`; with `fua`, returns only once the blocks are in S3.
    pub async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// Makes the range read as zeros (whole blocks become deletes).
    pub async fn write_zeroes(&self, _offset: u64, _len: u32, _fua: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// Discards the range; here it reads back as zeros afterwards, like `write_zeroes`.
    pub async fn trim(&self, _offset: u64, _len: u32, _fua: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// Returns once every write/trim/zero completed before this call is in the object store.
    pub async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Starts fetching the range into the cache (NBD_CMD_CACHE).
    pub async fn prefetch(&self, _offset: u64, _len: u32) -> Result<(), StoreError> {
        Ok(())
    }
    /// Allocation status from the in-memory presence map (no S3 call); at least one extent.
    pub fn block_status(&self, _offset: u64, len: u32) -> Vec<StatusExtent> {
        vec![StatusExtent { length: len, flags: 3 }]
    }
    /// Dirty bytes not yet in the object store (status line, metrics).
    pub fn dirty_bytes(&self) -> u64 {
        0
    }
}
