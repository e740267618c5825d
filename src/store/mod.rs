//! The per-export block store: turns byte ranges into block objects through a cache shared by
//! every connection of the export, with write-back, single-flight reads and a global budget.
//!
//! Layout: block *i* is `<prefix>{i:016x}`, exactly `block_size` bytes; blocks
//! that read as zeros have no object. Once the export has a snapshot, blocks written later
//! live in further layers (`layers`). Module map:
//! - `block`: range → per-block pieces (checked arithmetic), all-zero test
//! - `objects`: block keys and the GET/PUT/DELETE of block objects
//! - `layers`: copy-on-write layers, tombstones, garbage; `snapshot`: create, delete, gc,
//!   read-only views; `crash`: the test hook that aborts at a named step
//! - `manifest`: `<prefix>nbd-s3.json`, block-size pinning
//! - `listing`: listing the export's objects, and rebuilding the view from a new listing
//! - `presence`: which blocks hold data (one LIST at open; answers block status)
//! - `budget`: process-wide memory and dirty limits, eviction across exports
//! - `cache`: sharded block states and LRU; `dirty`: which pages of a block are dirty
//! - `read`: single-flight GETs, read-ahead, extents; `write`: in-memory writes,
//!   read-modify-write
//! - `writeback`: background PUT/DELETE with retries, FLUSH/FUA by sequence numbers
//! - `error`: the store's own error kinds (the server maps them to what clients see)
//!
//! Every change enters through [`BlockStore::change`], which checks the read-only setting and
//! the lease gate once for all kinds of change.

mod block;
mod budget;
mod cache;
mod clients;
mod clone;
mod codec;
mod crash;
mod dirty;
mod error;
mod journaled;
mod layers;
mod listing;
mod manifest;
mod objects;
pub(crate) mod pool;
mod presence;
mod read;
mod snapshot;
mod stats;
mod write;
mod writeback;

#[cfg(test)]
mod tests;

pub use budget::CacheBudget;
pub use clients::StoreClient;
pub use clone::BaseSpec;

pub use crash::crash_point;
pub use error::{ErrorKind, StoreError};
pub use snapshot::{check_snapshot_name, Snapshot, SnapshotStats};
pub use stats::StoreStats;

use crate::backend::DynObjectStore;
use block::Geometry;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
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
    /// How long a flush waits for S3 before failing.
    pub flush_timeout: Duration,
    /// Compression and encryption of the block objects.
    pub codec: crate::config::CodecConfig,
    /// A clone's base snapshot (used when the clone is first created).
    pub base: Option<BaseSpec>,
    /// `durability = "local"`: the export's journal directory and the shared journal space.
    pub journal: Option<JournalSpec>,
}

/// Where a journaled export keeps its journal.
#[derive(Debug, Clone)]
pub struct JournalSpec {
    pub dir: std::path::PathBuf,
    pub space: Arc<crate::journal::Space>,
    /// Whether a journal left by a previous process is replayed. False when another daemon
    /// may have written the export since (its records would undo newer data): the old
    /// segments are then set aside, never applied.
    pub replay: bool,
}

/// Hands out the object store of another bucket of the same object store (a clone's base).
pub trait Buckets: Send + Sync + std::fmt::Debug {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, crate::backend::BackendError>;
    /// Taken around a read-modify-write of another export's manifest (a clone registering
    /// with its base), so the daemon's own writers take turns.
    fn manifest_turn(&self) -> Option<&tokio::sync::Mutex<()>> {
        None
    }
}

/// For stores that are never clones (tests, tools): no other bucket is reachable.
#[derive(Debug)]
pub struct NoBuckets;

impl Buckets for NoBuckets {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, crate::backend::BackendError> {
        Err(crate::backend::BackendError::Permanent(format!(
            "bucket {bucket:?} is not reachable from here"
        )))
    }
}

/// A piece of a read result, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Bytes as stored.
    Data(Bytes),
    /// This many bytes read as zeros (no object, or trimmed).
    Zero(u32),
}

/// Whether a range of the export holds data or reads as zeros without holding any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Some block of the range holds data (an object, or dirty data not yet stored).
    Data,
    /// No block of the range holds data: it reads as zeros and costs no storage.
    Hole,
}

/// One run of equal allocation, in order from the start of the asked range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub len: u32,
    pub allocation: Allocation,
}

/// A change to an export's blocks. Every change goes through [`BlockStore::change`], which
/// refuses it on a read-only export or while the lease gate is closed, so no kind of change
/// can reach the cache without both checks.
#[derive(Debug)]
pub enum Change {
    /// Writes `data` at `offset`; with `fua`, returns only once the blocks are in S3.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Writes whole blocks at a block-aligned `offset` from buffers handed over (a large
    /// aligned WRITE read straight into them): they become the cached blocks without a copy.
    /// Anything not aligned is written like [`Change::Write`].
    WriteBlocks {
        offset: u64,
        blocks: Vec<Box<[u8]>>,
        fua: bool,
    },
    /// Discards the range; here it reads back as zeros afterwards, like [`Change::Zero`].
    Trim { offset: u64, len: u32, fua: bool },
    /// Makes the range read as zeros (whole blocks become deletes).
    Zero { offset: u64, len: u32, fua: bool },
    /// Returns once every change completed before it is in the object store. Succeeds on a
    /// read-only export (nothing to store), but not while the lease gate is closed.
    Flush,
}

/// The state shared by the handle, the write-back dispatcher and the load/store tasks: the
/// cache and presence map every path shares, and one component per path.
#[derive(Debug)]
pub(crate) struct Inner {
    objects: objects::BlockObjects,
    geo: Geometry,
    pages: dirty::Pages,
    read_only: bool,
    size: AtomicU64,
    budget: Arc<CacheBudget>,
    cache: cache::Cache,
    presence: presence::Presence,
    wb: writeback::WriteBack,
    rd: read::ReadPath,
    counters: stats::Counters,
    /// `durability = "local"`: the export's journal (write-back is then ordered by epochs).
    journal: Option<crate::journal::Journal>,
    /// Changes are journaled (false while the old journal is replayed).
    journal_live: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn bs(&self) -> usize {
        self.geo.block_size as usize
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
    /// Every change holds it shared; taking a snapshot holds it exclusively, so the snapshot
    /// has every change replied to before it started and none that started after.
    barrier: tokio::sync::RwLock<()>,
    /// Snapshots and their read-only views.
    snaps: snapshot::Snapshots,
    /// Other buckets of the object store (a clone's base, clones of this export).
    buckets: Arc<dyn Buckets>,
    /// Changes applied so far (automatic snapshots skip an export that did not change).
    changes: AtomicU64,
    /// The clients attached (a view's: its snapshot's), closed during a rollback or delete.
    clients: Arc<clients::ClientGate>,
}

/// Whether this daemon may change an export's objects now. The export lease closes it when
/// renewals fail, before the lease runs out, so a daemon taking over never races our writes.
pub trait WriteGate: Send + Sync + std::fmt::Debug {
    /// `Err(reason)` when writes, trims and flushes must fail.
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
        Self::open_with(objects, cfg, budget, Arc::new(NoBuckets)).await
    }

    /// `open`, reaching other buckets through `buckets` (a clone's base).
    pub async fn open_with(
        objects: DynObjectStore,
        cfg: BlockStoreConfig,
        budget: Arc<CacheBudget>,
        buckets: Arc<dyn Buckets>,
    ) -> Result<Arc<Self>, StoreError> {
        if !cfg.block_size.is_power_of_two() {
            return Err(StoreError::BadManifest(format!(
                "block size {} is not a power of two",
                cfg.block_size
            )));
        }
        let mut cfg = cfg;
        let manifest = manifest::check_or_create(&objects, &cfg, &*buckets).await?;
        if let Some(m) = &manifest {
            // Checked by the manifest: a power of two up to 8 MiB.
            cfg.block_size = u32::try_from(m.block_size).unwrap_or(cfg.block_size);
        }
        let (layers, base, snapshots) = match &manifest {
            Some(m) => {
                let (layers, base) = listing::layers(&objects, &cfg.prefix, m, &*buckets).await?;
                (layers, base, m.snapshots.clone())
            }
            None => {
                let mut layers = layers::Layers::plain();
                let blocks = cfg.size.div_ceil(u64::from(cfg.block_size));
                let keys = listing::keys(&objects, &cfg.prefix, blocks, []).await?;
                layers.load(&cfg.prefix, keys.iter().map(String::as_str));
                (layers, None, Vec::new())
            }
        };
        let bs = cfg.block_size as usize;
        let id = manifest.and_then(|m| m.data_id()).unwrap_or_default();
        let objects = objects::BlockObjects::new(objects, cfg.prefix.clone(), bs, layers)
            .with_codec(codec::Codec::new(&cfg.codec, bs), id);
        objects.set_base(base);
        let clients = Arc::default();
        let Some(spec) = cfg.journal.clone().filter(|_| !cfg.read_only) else {
            return Ok(Self::build(
                objects, &cfg, budget, snapshots, buckets, clients, None,
            ));
        };
        let (journal, scanned) = open_journal(&spec).await?;
        let journal = Some(journal);
        let store = Self::build(objects, &cfg, budget, snapshots, buckets, clients, journal);
        store.replay_journal(&spec, scanned).await?;
        Ok(store)
    }

    /// Replays what the previous process journaled (see `journaled`), deletes its segments
    /// once S3 has everything, then journals new changes.
    async fn replay_journal(
        &self,
        spec: &JournalSpec,
        scanned: crate::journal::Scanned,
    ) -> Result<(), StoreError> {
        let dir = spec.dir.display().to_string();
        if let Some(why) = &scanned.torn {
            tracing::warn!(journal = %dir, reason = %why,
                "journal ends in a torn or damaged record: replaying up to the last whole record");
        }
        let files = scanned.files.clone();
        let records = scanned.records.len();
        if records > 0 {
            let started = std::time::Instant::now();
            let r = self.inner.replay(scanned).await?;
            tracing::info!(journal = %dir, records, writes = r.writes, zeroes = r.zeroes,
                flushes = r.flushes, bytes = r.bytes, ms = started.elapsed().as_millis() as u64,
                "journal replayed and stored in S3");
        }
        let removed = tokio::task::spawn_blocking(move || remove_durably(&files))
            .await
            .map_err(|e| StoreError::Journal(e.to_string()))?;
        removed.map_err(|e| StoreError::Journal(format!("{dir}: {e}")))?;
        self.inner.journal_live.store(true, SeqCst);
        Ok(())
    }

    /// A store over `objects` (whose layers are loaded), its write-back running; with a
    /// journal when the export has one (not yet live: replay comes first).
    fn build(
        objects: objects::BlockObjects,
        cfg: &BlockStoreConfig,
        budget: Arc<CacheBudget>,
        snapshots: Vec<manifest::SnapshotRecord>,
        buckets: Arc<dyn Buckets>,
        clients: Arc<clients::ClientGate>,
        journal: Option<crate::journal::Journal>,
    ) -> Arc<Self> {
        let presence = objects.layers().effective();
        let bs = u64::from(cfg.block_size);
        let inner = Arc::new(Inner {
            objects,
            geo: Geometry { block_size: bs },
            pages: dirty::Pages::new(bs as usize),
            read_only: cfg.read_only,
            size: AtomicU64::new(cfg.size),
            budget: Arc::clone(&budget),
            cache: cache::Cache::new(),
            presence,
            wb: writeback::WriteBack::new(parallelism(bs), cfg.flush_timeout, journal.is_some()),
            rd: read::ReadPath::new(parallelism(bs)),
            counters: stats::Counters::default(),
            journal,
            journal_live: std::sync::atomic::AtomicBool::new(false),
        });
        let weak: std::sync::Weak<dyn budget::Evictor> = Arc::downgrade(&inner) as _;
        budget.register(weak);
        tokio::spawn(writeback::dispatcher(Arc::clone(&inner)));
        tracing::debug!(
            prefix = %inner.objects.prefix(),
            blocks = inner.presence.count(),
            "block store open"
        );
        Arc::new(Self {
            inner,
            gate: std::sync::OnceLock::new(),
            barrier: tokio::sync::RwLock::new(()),
            snaps: snapshot::Snapshots::new(snapshots),
            buckets,
            changes: AtomicU64::new(0),
            clients,
        })
    }
    /// Counts a client attaching (NBD_OPT_GO), or says why it may not now: the export is
    /// being rolled back, or this snapshot deleted.
    pub fn attach_client(&self) -> Result<StoreClient, String> {
        self.clients.enter()
    }
    /// Counts a client that is already attached (taken over from the previous process).
    pub fn adopt_client(&self) -> StoreClient {
        self.clients.adopt()
    }
    /// Clients attached to this store (for a snapshot's view: to the snapshot).
    pub fn clients(&self) -> usize {
        self.clients.clients()
    }
    /// Refuses new clients with `why` while the guard lives (`Closed::forever`: for good),
    /// unless clients are attached or an admin change holds the gate: the error says which.
    pub(crate) fn close_to_clients(
        &self,
        why: &str,
        what: &str,
    ) -> Result<clients::Closed, String> {
        self.clients.close_if_open(why, what)
    }
    /// Whether new clients may attach (no admin change runs, the store was not replaced).
    pub fn admits_clients(&self) -> bool {
        self.clients.is_open()
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
    /// Where large buffers for this store come from (WRITE payloads read straight into
    /// blocks).
    pub(crate) fn buffers(&self) -> &Arc<pool::BufferPool> {
        self.inner.budget.buffers()
    }
    /// Object size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.geo.block_size as u32
    }
    /// Grows the export (reload); shrinking is refused by the reload logic before this.
    pub fn resize(&self, new_size: u64) {
        let old = self.inner.size.fetch_max(new_size, SeqCst);
        if new_size < old {
            let prefix = self.inner.objects.prefix();
            tracing::warn!(old, new_size, prefix = %prefix, "refusing to shrink export");
        }
    }
    /// Reads `len` bytes at `offset` as data/zero extents covering the range in order.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<Extent>, StoreError> {
        self.inner.read(offset, len).await
    }
    /// Applies one change. The only way into the cache for changes: the lease gate and the
    /// read-only setting are checked here, once, for every kind.
    pub async fn change(&self, change: Change) -> Result<(), StoreError> {
        self.gate()?;
        let _not_during_a_snapshot = self.barrier.read().await;
        if !matches!(change, Change::Flush) {
            self.changes.fetch_add(1, SeqCst);
        }
        let inner = &self.inner;
        if inner.read_only && !matches!(change, Change::Flush) {
            return Err(StoreError::ReadOnly);
        }
        match change {
            Change::Write { offset, data, fua } => {
                inner
                    .write(offset, Some(&data), data.len() as u64, fua)
                    .await
            }
            Change::WriteBlocks {
                offset,
                blocks,
                fua,
            } => inner.write_blocks(offset, blocks, fua).await,
            Change::Trim { offset, len, fua } | Change::Zero { offset, len, fua } => {
                inner.write(offset, None, u64::from(len), fua).await
            }
            Change::Flush => {
                let _timer = inner.counters.flushes.start(); // metrics: flush durations
                match inner.live_journal() {
                    Some(j) => inner.flush_local(j).await,
                    None => inner.flush().await,
                }
            }
        }
    }
    /// [`Change::Write`].
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), StoreError> {
        self.change(Change::Write { offset, data, fua }).await
    }
    /// [`Change::WriteBlocks`].
    pub async fn write_blocks(
        &self,
        offset: u64,
        blocks: Vec<Box<[u8]>>,
        fua: bool,
    ) -> Result<(), StoreError> {
        let change = Change::WriteBlocks {
            offset,
            blocks,
            fua,
        };
        self.change(change).await
    }
    /// [`Change::Zero`].
    pub async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), StoreError> {
        self.change(Change::Zero { offset, len, fua }).await
    }
    /// [`Change::Trim`].
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), StoreError> {
        self.change(Change::Trim { offset, len, fua }).await
    }
    /// [`Change::Flush`].
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.change(Change::Flush).await
    }
    /// Stores what is dirty (reloads and removals, not clients): with nothing dirty, done at
    /// once, without asking the lease gate — an idle export holds no lease, and needs none
    /// to have nothing to store.
    pub async fn flush_dirty(&self) -> Result<(), StoreError> {
        if self.dirty_bytes() == 0 {
            return Ok(());
        }
        self.flush().await
    }
    /// Starts fetching the range into the cache (a client's hint that it will read it).
    pub async fn prefetch(&self, offset: u64, len: u32) -> Result<(), StoreError> {
        self.inner.prefetch(offset, len).await
    }
    /// Allocation of the range from the in-memory presence map (no S3 call); at least one
    /// extent.
    pub fn block_status(&self, offset: u64, len: u32) -> Vec<StatusExtent> {
        self.inner.block_status(offset, len)
    }
    /// How many changes (writes, trims, zeroes) were applied since the store opened.
    pub fn changes(&self) -> u64 {
        self.changes.load(SeqCst)
    }
    /// Dirty bytes not yet in the object store (status line, metrics).
    pub fn dirty_bytes(&self) -> u64 {
        self.inner.wb.dirty.load(SeqCst)
    }
    /// Bytes held in the local journal (`durability = "local"`), `None` without one.
    pub fn journal_bytes(&self) -> Option<u64> {
        self.inner.journal.as_ref().map(|j| j.stats().bytes)
    }
    /// Counters and gauges for metrics and the status line.
    pub fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    /// How long FLUSHes (and removal flushes) took: the cost of durability, for metrics.
    pub fn flush_durations(&self) -> crate::histogram::Snapshot {
        self.inner.counters.flushes.snapshot()
    }
    /// Stores every dirty block (SIGTERM, export removal). Waits as long as it takes, or until
    /// `deadline`; then fails with [`StoreError::Unflushed`] naming the blocks still dirty.
    /// Progress is logged every few seconds.
    pub async fn shutdown_flush(&self, deadline: Option<Duration>) -> Result<(), StoreError> {
        self.inner.shutdown_flush(deadline).await?;
        self.inner.settle_journal().await;
        Ok(())
    }
}

#[cfg(test)]
impl BlockStore {
    /// Lets a test keep partly written blocks dirty until it flushes.
    pub(crate) fn set_write_back_age(&self, age: Duration) {
        self.inner.wb.age_ms.store(age.as_millis() as u64, SeqCst);
    }
}

/// Reads the journal a previous process left in `spec.dir` and starts a new one after it
/// (file system work on the blocking pool).
async fn open_journal(
    spec: &JournalSpec,
) -> Result<(crate::journal::Journal, crate::journal::Scanned), StoreError> {
    let dir = spec.dir.clone();
    let space = Arc::clone(&spec.space);
    let replay = spec.replay;
    let opened = tokio::task::spawn_blocking(move || {
        if !replay && crate::journal::has_segments(&dir) {
            let aside = crate::journal::set_aside(&dir)?;
            tracing::warn!(journal = %dir.display(), moved_to = %aside.display(),
                "journal not replayed: another daemon may have written the export since it was written");
        }
        let scanned = crate::journal::scan(&dir)?;
        let journal = crate::journal::Journal::create(&dir, scanned.first_free, space)?;
        Ok::<_, std::io::Error>((journal, scanned))
    })
    .await
    .map_err(|e| StoreError::Journal(e.to_string()))?;
    opened.map_err(|e| StoreError::Journal(format!("{}: {e}", spec.dir.display())))
}

/// Deletes replayed segment files and makes the deletions durable: a segment that came back
/// after a crash would stop the next replay before the new journal's records.
fn remove_durably(files: &[std::path::PathBuf]) -> std::io::Result<()> {
    for f in files {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    if let Some(dir) = files.first().and_then(|f| f.parent()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Drop for BlockStore {
    /// Dirty data must survive the handle: the dispatcher keeps the store alive, writes
    /// everything back, then exits.
    fn drop(&mut self) {
        self.inner.wb.close();
    }
}
