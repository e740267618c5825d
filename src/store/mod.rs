//! The per-export block store: turns byte ranges into block objects through a cache shared by
//! every connection of the export, with write-back, single-flight reads and a global budget.
//!
//! Layout (design.md §1): block *i* is `<prefix>{i:016x}`, exactly `block_size` bytes; blocks
//! that read as zeros have no object. Module map:
//! - `block`: range → per-block pieces (checked arithmetic), all-zero test
//! - `manifest`: `<prefix>nbd-s3.json`, block-size pinning
//! - `presence`: which blocks hold data (one LIST at open; answers BLOCK_STATUS)
//! - `budget`: process-wide memory and dirty limits, eviction across exports
//! - `cache`: sharded block states and LRU
//! - `read`: single-flight GETs, read-ahead; `write`: in-memory writes, read-modify-write
//! - `writeback`: background PUT/DELETE with retries, FLUSH/FUA by sequence numbers

mod backoff;
mod block;
mod budget;
mod cache;
mod dirty;
mod manifest;
pub(crate) mod pool;
mod presence;
mod read;
mod stats;
mod write;
mod writeback;

#[cfg(test)]
mod tests;

pub use budget::CacheBudget;
pub use stats::StoreStats;

use crate::backend::{BackendError, DynObjectStore};
use block::Geometry;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

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
    /// The server should have refused this request; a bug upstream, not a client problem.
    #[error("range {offset}+{len} is outside the export (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write to a read-only export.
    #[error("export is read-only")]
    ReadOnly,
    /// The export lease is not (or no longer) held: this daemon must not change the objects.
    #[error("export lease not held: {0}")]
    Fenced(String),
    /// Shutdown could not store everything: these blocks' latest data is not in S3.
    #[error("{count} dirty blocks could not be stored: {blocks}")]
    Unflushed { count: usize, blocks: String },
}

impl StoreError {
    /// The errno sent on the wire (EIO for data problems, ESHUTDOWN when stopping).
    pub fn errno(&self) -> u32 {
        match self {
            StoreError::ShuttingDown => 108,
            StoreError::OutOfRange { .. } => 22,
            StoreError::ReadOnly => 1,
            _ => 5,
        }
    }
}

/// The state shared by the handle, the write-back dispatcher and the load/store tasks.
#[derive(Debug)]
pub(crate) struct Inner {
    objects: DynObjectStore,
    prefix: String,
    geo: Geometry,
    pages: dirty::Pages,
    read_only: bool,
    flush_timeout: Duration,
    size: AtomicU64,
    budget: Arc<CacheBudget>,
    cache: cache::Cache,
    presence: presence::Presence,
    wb: parking_lot::Mutex<writeback::Queue>,
    /// Sequence number of the next change (FLUSH waits for changes below its start value).
    next_seq: AtomicU64,
    /// Write-back stores everything below this at once (raised by FLUSH and shutdown).
    flush_target: AtomicU64,
    /// Wakes the write-back dispatcher (new dirty block, flush, a PUT slot freed).
    kick: Notify,
    /// The pressure level writers last woke the dispatcher for (see `kick_on_pressure`).
    signalled: std::sync::atomic::AtomicU8,
    /// A block finished write-back: FLUSH/FUA waiters re-check.
    stored: Notify,
    /// Cuts write-back retry backoffs short: a FLUSH arrived, or a block that had been
    /// failing was stored (S3 is back), so blocks waiting out a backoff of up to 10 s retry now.
    retry_now: Notify,
    put_slots: Arc<Semaphore>,
    get_slots: Arc<Semaphore>,
    dirty: AtomicU64,
    /// Write-back tasks nobody asked for (due blocks below half the dirty limit, cold blocks
    /// above it), bounded by the dispatcher; FLUSH, FUA and hard pressure are not counted.
    background_puts: std::sync::atomic::AtomicUsize,
    closed: AtomicBool,
    /// How long a partly written block may stay dirty unasked (ms; tests stretch it).
    age_ms: AtomicU64,
    readahead: parking_lot::Mutex<read::ReadAhead>,
    counters: stats::Counters,
}

impl Inner {
    fn bs(&self) -> usize {
        self.geo.block_size as usize
    }
    fn write_back_age(&self) -> Duration {
        Duration::from_millis(self.age_ms.load(SeqCst))
    }
    fn key(&self, block: u64) -> String {
        presence::block_key(&self.prefix, block)
    }
}

impl budget::Evictor for Inner {
    fn oldest_clean(&self) -> Option<u64> {
        self.cache.oldest_clean()
    }
    fn evict_oldest(&self) -> bool {
        self.cache.evict_oldest()
    }
}

/// How many S3 requests of one kind an export keeps in flight: many for small objects (the
/// request rate is the limit), fewer for big ones (bandwidth and memory are).
fn parallelism(block_size: u64) -> usize {
    ((64u64 << 20) / block_size.max(1)).clamp(4, 64) as usize
}

/// One export's blocks. All methods take byte ranges the server has already bounds-checked
/// against `size()`; they may still be unaligned.
#[derive(Debug)]
pub struct BlockStore {
    inner: Arc<Inner>,
    /// The export lease's fence (src/lease), set once after open; none = always writable.
    gate: std::sync::OnceLock<Arc<dyn WriteGate>>,
}

/// Whether this daemon may change an export's objects now. The export lease closes it when
/// renewals fail, before the lease runs out, so a daemon taking over never races our writes.
pub trait WriteGate: Send + Sync + std::fmt::Debug {
    /// `Err(reason)` when writes, trims and flushes must fail (EIO).
    fn check(&self) -> Result<(), String>;
}

impl BlockStore {
    /// Opens (or initialises) the export: checks/writes `<prefix>nbd-s3.json`, lists the prefix
    /// to build the presence map.
    pub async fn open(
        objects: DynObjectStore,
        cfg: BlockStoreConfig,
        budget: Arc<CacheBudget>,
    ) -> Result<Arc<Self>, StoreError> {
        if !cfg.block_size.is_power_of_two() {
            return Err(StoreError::BadManifest(format!(
                "block size {} is not a power of two",
                cfg.block_size
            )));
        }
        manifest::check_or_create(&objects, &cfg).await?;
        let keys = manifest::retry(|| objects.list(&cfg.prefix)).await?;
        let presence = presence::Presence::from_keys(&cfg.prefix, keys.iter().map(String::as_str));
        drop(keys);
        let bs = u64::from(cfg.block_size);
        let inner = Arc::new(Inner {
            objects,
            prefix: cfg.prefix,
            geo: Geometry { block_size: bs },
            pages: dirty::Pages::new(bs as usize),
            read_only: cfg.read_only,
            flush_timeout: cfg.flush_timeout,
            size: AtomicU64::new(cfg.size),
            budget: Arc::clone(&budget),
            cache: cache::Cache::new(),
            presence,
            wb: parking_lot::Mutex::new(writeback::Queue::default()),
            next_seq: AtomicU64::new(1),
            flush_target: AtomicU64::new(0),
            kick: Notify::new(),
            signalled: Default::default(),
            stored: Notify::new(),
            retry_now: Notify::new(),
            put_slots: Arc::new(Semaphore::new(parallelism(bs))),
            get_slots: Arc::new(Semaphore::new(parallelism(bs))),
            dirty: AtomicU64::new(0),
            background_puts: Default::default(),
            closed: AtomicBool::new(false),
            age_ms: AtomicU64::new(writeback::AGE_BEFORE_WRITE_BACK.as_millis() as u64),
            readahead: parking_lot::Mutex::new(read::ReadAhead::default()),
            counters: stats::Counters::default(),
        });
        let weak: std::sync::Weak<dyn budget::Evictor> = Arc::downgrade(&inner) as _;
        budget.register(weak);
        tokio::spawn(writeback::dispatcher(Arc::clone(&inner)));
        tracing::debug!(
            prefix = %inner.prefix,
            blocks = inner.presence.count(),
            "block store open"
        );
        Ok(Arc::new(Self {
            inner,
            gate: std::sync::OnceLock::new(),
        }))
    }
    /// Installs the lease fence (once; later calls are ignored).
    pub fn set_write_gate(&self, gate: Arc<dyn WriteGate>) {
        let _ = self.gate.set(gate);
    }
    fn gate(&self) -> Result<(), StoreError> {
        match self.gate.get() {
            Some(g) => g.check().map_err(StoreError::Fenced),
            None => Ok(()),
        }
    }
    /// Current export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(SeqCst)
    }
    /// Object size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.geo.block_size as u32
    }
    /// Grows the export (reload); shrinking is refused by the reload logic before this.
    pub fn resize(&self, new_size: u64) {
        let old = self.inner.size.fetch_max(new_size, SeqCst);
        if new_size < old {
            tracing::warn!(old, new_size, prefix = %self.inner.prefix, "refusing to shrink export");
        }
    }
    /// Reads `len` bytes at `offset` as data/zero extents covering the range in order.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<Extent>, StoreError> {
        self.inner.read(offset, len).await
    }
    /// Writes `data` at `offset`; with `fua`, returns only once the blocks are in S3.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        self.gate()?;
        self.inner
            .write(offset, Some(&data), data.len() as u64, fua)
            .await
    }
    /// Writes whole blocks at a block-aligned `offset` from buffers handed over (a large
    /// aligned WRITE read straight into them): they become the cached blocks without a copy.
    /// Anything not aligned is written through [`BlockStore::write`]'s path.
    pub async fn write_blocks(
        &self,
        offset: u64,
        blocks: Vec<Box<[u8]>>,
        fua: bool,
    ) -> Result<(), StoreError> {
        self.gate()?;
        self.inner.write_blocks(offset, blocks, fua).await
    }
    /// Makes the range read as zeros (whole blocks become deletes).
    pub async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), StoreError> {
        self.gate()?;
        self.inner.write(offset, None, u64::from(len), fua).await
    }
    /// Discards the range; here it reads back as zeros afterwards, like `write_zeroes`.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), StoreError> {
        self.gate()?;
        self.inner.write(offset, None, u64::from(len), fua).await
    }
    /// Returns once every write/trim/zero completed before this call is in the object store.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.gate()?;
        let _timer = self.inner.counters.flushes.start(); // metrics: flush durations
        self.inner.flush().await
    }
    /// Starts fetching the range into the cache (NBD_CMD_CACHE).
    pub async fn prefetch(&self, offset: u64, len: u32) -> Result<(), StoreError> {
        self.inner.prefetch(offset, len).await
    }
    /// Allocation status from the in-memory presence map (no S3 call); at least one extent.
    pub fn block_status(&self, offset: u64, len: u32) -> Vec<StatusExtent> {
        self.inner.block_status(offset, len)
    }
    /// Dirty bytes not yet in the object store (status line, metrics).
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.dirty.load(SeqCst)
    }
    /// Counters and gauges for metrics and the status line.
    pub fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    /// How long FLUSHes (and removal flushes) took: the cost of durability, for metrics.
    pub fn flush_durations(&self) -> crate::metrics::histogram::Snapshot {
        self.inner.counters.flushes.snapshot()
    }
    /// Stores every dirty block (SIGTERM, export removal). Waits as long as it takes, or until
    /// `deadline`; then fails with [`StoreError::Unflushed`] naming the blocks still dirty.
    /// Progress is logged every few seconds.
    pub async fn shutdown_flush(&self, deadline: Option<Duration>) -> Result<(), StoreError> {
        self.inner.shutdown_flush(deadline).await
    }
}

#[cfg(test)]
impl BlockStore {
    /// Lets a test keep partly written blocks dirty until it flushes.
    pub(crate) fn set_write_back_age(&self, age: Duration) {
        self.inner.age_ms.store(age.as_millis() as u64, SeqCst);
    }
}

impl Drop for BlockStore {
    /// Dirty data must survive the handle: the dispatcher keeps the store alive, writes
    /// everything back, then exits.
    fn drop(&mut self) {
        self.inner.closed.store(true, SeqCst);
        self.inner.flush_target.store(u64::MAX, SeqCst);
        self.inner.kick.notify_one();
    }
}
