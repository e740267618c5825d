//! Opening an export: bind the bucket, set up its lease slot (writable exports; the lease is
//! taken when a client attaches), open the block store behind the slot's fence. Never fails: what cannot be opened becomes a refused export that
//! carries a typed [`Refusal`].

use super::{Export, Refusal, Step};
use crate::backend::{BackendError, DynObjectStore};
use crate::config::{ExportConfig, LeaseMode};
use crate::lease::fence::FencedStore;
use crate::lease::slot::LeaseSlot;
use crate::lease::LeaseManager;
use crate::store::{BaseSpec, BlockStore, BlockStoreConfig, Buckets, CacheBudget, NoBuckets};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::error;

/// Hands out the object store of a bucket. The daemon's `StoreFactory` (one S3 client shared by
/// every export) implements it; unit tests use in-memory stores.
pub trait BucketSource: Send + Sync {
    /// The object store bound to `bucket`.
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError>;
    /// Every bucket, for as long as a store lives (a clone reads its base's bucket).
    fn buckets(&self) -> Arc<dyn Buckets> {
        Arc::new(NoBuckets)
    }
    /// The object store `export` uses in `bucket`; its requests may be counted per export.
    fn export_bucket(&self, bucket: &str, export: &str) -> Result<DynObjectStore, BackendError> {
        let _ = export;
        self.bucket(bucket)
    }
}

impl BucketSource for crate::backend::StoreFactory {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(crate::backend::StoreFactory::bucket(self, bucket))
    }
    fn export_bucket(&self, bucket: &str, export: &str) -> Result<DynObjectStore, BackendError> {
        Ok(crate::backend::StoreFactory::export_bucket(
            self, bucket, export,
        ))
    }
    fn buckets(&self) -> Arc<dyn Buckets> {
        Arc::new(FactoryBuckets(self.clone()))
    }
}

/// Every bucket, and the daemon's turn for writing another export's manifest.
#[derive(Debug)]
struct DaemonBuckets {
    buckets: Arc<dyn Buckets>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Buckets for DaemonBuckets {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError> {
        self.buckets.bucket(bucket)
    }
    fn manifest_turn(&self) -> Option<&tokio::sync::Mutex<()>> {
        Some(&self.turn)
    }
}

/// The daemon's buckets, held by the stores that need other buckets.
#[derive(Debug)]
struct FactoryBuckets(crate::backend::StoreFactory);

impl Buckets for FactoryBuckets {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(self.0.bucket(bucket))
    }
}

/// What opening an export needs besides its definition; one per daemon.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// Memory budget shared by every export's cache.
    pub budget: Arc<CacheBudget>,
    /// How long a FLUSH waits for S3.
    pub flush_timeout: Duration,
    /// This daemon's export leases.
    pub leases: Arc<LeaseManager>,
    /// Taken by stores writing another export's manifest (clones registering).
    pub manifest_turn: Arc<tokio::sync::Mutex<()>>,
    /// `[cache] journal`: the root directory (each journaled export gets its own directory
    /// under it) and the journal space all exports share.
    pub journal: Option<crate::store::JournalSpec>,
}

/// Opens an export's store. Never fails: a store that cannot be opened (block-size mismatch,
/// unreachable bucket, lease held elsewhere) yields a refused export that carries the reason,
/// logged once here.
pub async fn open_export<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    factory: &F,
    ctx: &OpenContext,
) -> Arc<Export> {
    let export = try_open(cfg, factory, ctx).await;
    if let Some(reason) = export.refusal() {
        error!(export = cfg.name.as_str(), "export refused: {reason}");
    }
    export
}

/// `open_export` without the log line (the background reopener logs its own way).
pub async fn try_open<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    factory: &F,
    ctx: &OpenContext,
) -> Arc<Export> {
    match open_store(cfg, factory, ctx).await {
        Ok((store, lease)) => Export::serving(cfg.clone(), store, lease),
        Err(reason) => Export::refused(cfg.clone(), reason),
    }
}

/// Opens the block store of an export behind the fence of its lease slot (writable exports
/// with a lease). The lease itself is taken when a client attaches, not here: an export
/// without clients holds no lease and makes no request.
async fn open_store<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    factory: &F,
    ctx: &OpenContext,
) -> Result<(Arc<BlockStore>, Option<Arc<LeaseSlot>>), Refusal> {
    let objects = factory
        .export_bucket(&cfg.bucket, &cfg.name)
        .map_err(|e| Refusal::backend(Step::Bucket, e))?;
    let (objects, slot) = match cfg.lease {
        LeaseMode::On { ttl } if !cfg.read_only => {
            let slot = Arc::new(LeaseSlot::new(
                Arc::clone(&ctx.leases),
                Arc::clone(&objects),
                &cfg.bucket,
                &cfg.prefix,
                ttl,
            ));
            slot.observe().await.map_err(|e| Refusal::lease(e, ttl))?;
            let fenced = FencedStore::new(objects, Arc::clone(&slot));
            (Arc::new(fenced) as DynObjectStore, Some(slot))
        }
        _ => (objects, None),
    };
    let store_cfg = BlockStoreConfig {
        prefix: cfg.prefix.clone(),
        size: cfg.size,
        block_size: cfg.block_size,
        read_only: cfg.read_only,
        flush_timeout: ctx.flush_timeout,
        codec: cfg.codec.clone(),
        base: cfg.base.as_ref().map(|b| BaseSpec {
            export: b.export.clone(),
            snapshot: b.snapshot.clone(),
            location: b.location.clone(),
            name: cfg.name.clone(),
            bucket: cfg.bucket.clone(),
        }),
        journal: None,
    };
    let mut replayed_under_lease = false;
    let mut store_cfg = store_cfg;
    if let (Some(root), crate::config::Durability::Local) = (&ctx.journal, cfg.durability) {
        let dir = crate::journal::export_dir(&root.dir, &cfg.bucket, &cfg.prefix);
        let replay = if crate::journal::has_segments(&dir) {
            let left = journal_left_by_us(factory, cfg).await?;
            if let (true, Some(slot), LeaseMode::On { ttl }) = (left, &slot, cfg.lease) {
                // Replay stores in S3 before the export serves: it needs the lease.
                slot.take(|| async { Ok(()) })
                    .await
                    .map_err(|e| Refusal::lease(e, ttl))?;
                replayed_under_lease = true;
            }
            left
        } else {
            true
        };
        store_cfg.journal = Some(crate::store::JournalSpec {
            dir,
            space: Arc::clone(&root.space),
            replay,
        });
    }
    let buckets = Arc::new(DaemonBuckets {
        buckets: factory.buckets(),
        turn: Arc::clone(&ctx.manifest_turn),
    });
    let store = BlockStore::open_with(objects, store_cfg, Arc::clone(&ctx.budget), buckets).await?;
    if let Some(slot) = &slot {
        store.set_write_gate(Arc::clone(slot) as Arc<dyn crate::store::WriteGate>);
        if replayed_under_lease {
            slot.release_if(|| store.dirty_bytes() == 0).await;
        }
    }
    Ok((store, slot))
}

/// Whether the journal this host holds for `cfg` may be replayed: the lease object says the
/// export was last held by a daemon on this host that never released it (a crash or power
/// loss), or there is none (no lease). A released lease means everything was stored before
/// it was given up; a holder on another host means another daemon took the export over, and
/// replaying older records would undo its writes.
async fn journal_left_by_us<F: BucketSource + ?Sized>(
    factory: &F,
    cfg: &ExportConfig,
) -> Result<bool, Refusal> {
    if !matches!(cfg.lease, LeaseMode::On { .. }) {
        return Ok(true);
    }
    let objects = factory
        .export_bucket(&cfg.bucket, &cfg.name)
        .map_err(|e| Refusal::backend(Step::Bucket, e))?;
    let key = format!("{}{}", cfg.prefix, crate::lease::LEASE_NAME);
    let raw = crate::retry::Policy::LEASE
        .run(|| objects.get(&key))
        .await
        .map_err(|e| Refusal::backend(Step::Lease, e))?;
    let host = crate::lease::record::Identity::current().host;
    Ok(journal_applies(raw.as_deref(), &host))
}

/// The pure decision of [`journal_left_by_us`] on the lease object's bytes.
pub(super) fn journal_applies(lease: Option<&[u8]>, host: &str) -> bool {
    match lease.map(crate::lease::record::LeaseRecord::parse) {
        None => true,
        Some(Some(r)) => !r.released && r.host == host,
        // Not a lease record we understand: applying keeps flushed data; never refuse it.
        Some(None) => true,
    }
}

/// Opens every export of a configuration (concurrently: each open lists a prefix in S3).
pub async fn open_all<F: BucketSource + ?Sized>(
    exports: &[ExportConfig],
    factory: &F,
    ctx: &OpenContext,
) -> BTreeMap<String, Arc<Export>> {
    let opens = exports.iter().map(|cfg| open_export(cfg, factory, ctx));
    let opened = futures_util::future::join_all(opens).await;
    opened
        .into_iter()
        .map(|e| (e.name().to_string(), e))
        .collect()
}
