//! Exports and the live registry the server looks them up in. The registry is an `ArcSwap`
//! snapshot: a reload builds a whole new map and swaps it in, so a handshake never sees half a
//! reload. Connections hold an `Attachment` (an `Arc<Export>`), so a removed export lives —
//! and keeps serving its attached clients — until its last client goes; then it is flushed and
//! released.

use crate::backend::{BackendError, DynObjectStore};
use crate::config::{ExportConfig, LeaseMode};
use crate::lease::fence::FencedStore;
use crate::lease::{Lease, LeaseError, LeaseManager};
use crate::store::{BlockStore, BlockStoreConfig, CacheBudget, StoreError};
use arc_swap::ArcSwap;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tracing::{error, info, warn};

/// Hands out the object store of a bucket. The daemon's `StoreFactory` (one S3 client shared by
/// every export) implements it; unit tests use in-memory stores.
pub trait BucketSource: Send + Sync {
    /// The object store bound to `bucket`.
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError>;
}

impl BucketSource for crate::backend::StoreFactory {
    fn bucket(&self, bucket: &str) -> Result<DynObjectStore, BackendError> {
        Ok(crate::backend::StoreFactory::bucket(self, bucket))
    }
}

/// State shared by every version of one export (a reload that only changes its description or
/// grows it makes a new `Export` around the same store): who is attached, whether it was
/// removed from the configuration.
#[derive(Debug, Default)]
struct Shared {
    attached: AtomicUsize,
    removed: AtomicBool,
}

/// Whether a refused export is worth opening again without a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Served, or refused for a reason only an admin can fix (block-size mismatch, a store
    /// without conditional writes): retrying would only spin.
    Never,
    /// S3 was unreachable: retry soon, backing off (1 s doubling to 60 s).
    Backoff,
    /// Waiting on something slow (another daemon's lease, a missing bucket): retry this often.
    Every(Duration),
}

impl Retry {
    /// For an export whose lease another daemon holds: asked about every third of the lease
    /// time, so its expiry is noticed (and taken over) about as fast as a renewal would be.
    pub fn lease_held(ttl: Duration) -> Retry {
        Retry::Every((ttl / 3).max(Duration::from_secs(1)))
    }

    /// After a failed object-store call: soon with backoff when the error may pass by itself,
    /// slowly when only an admin can fix it (missing bucket, credentials).
    fn after_backend(e: &BackendError) -> Retry {
        if e.is_retryable() {
            Retry::Backoff
        } else {
            Retry::Every(SLOW_RETRY)
        }
    }
}

/// One served export: its definition and its block store, or why it cannot be served.
#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    /// `Err(message)` when the export is refused (e.g. block-size mismatch); clients asking for
    /// it get ERR_UNKNOWN with this message.
    pub store: Result<Arc<BlockStore>, String>,
    /// The export lease this daemon holds (writable exports with `lease` on).
    pub lease: Option<Arc<Lease>>,
    /// For a refused export: whether the daemon reopens it by itself.
    pub retry: Retry,
    shared: Arc<Shared>,
}

impl Export {
    /// An export around an opened store (or the reason it is refused, not retried).
    pub fn new(config: ExportConfig, store: Result<Arc<BlockStore>, String>) -> Arc<Self> {
        Arc::new(Self {
            config,
            store,
            lease: None,
            retry: Retry::Never,
            shared: Arc::default(),
        })
    }
    /// The same store and attachment state under a new definition (reload: description,
    /// read_only or a larger size). Connections already attached keep the old definition.
    pub fn with_config(&self, config: ExportConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            store: self.store.clone(),
            lease: self.lease.clone(),
            retry: self.retry,
            shared: Arc::clone(&self.shared),
        })
    }
    /// The export's name as clients ask for it.
    pub fn name(&self) -> &str {
        &self.config.name
    }
    /// Size advertised to new connections.
    pub fn size(&self) -> u64 {
        self.config.size
    }
    /// Optional human description (NBD_INFO_DESCRIPTION).
    pub fn description(&self) -> Option<&str> {
        self.config.description.as_deref()
    }
    /// Whether writes are refused with EPERM.
    pub fn read_only(&self) -> bool {
        self.config.read_only
    }
    /// Preferred I/O size advertised in NBD_INFO_BLOCK_SIZE.
    pub fn block_size(&self) -> u32 {
        self.config.block_size
    }
    /// Marks a client as attached; the export is released (flushed) after the last guard of a
    /// removed export drops.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        self.shared.attached.fetch_add(1, Ordering::SeqCst);
        Attachment {
            export: Arc::clone(self),
        }
    }
    /// Clients attached to this export (every version of it).
    pub fn attached(&self) -> usize {
        self.shared.attached.load(Ordering::SeqCst)
    }
    /// Whether a reload removed the export (attached clients may still be using it).
    pub fn is_removed(&self) -> bool {
        self.shared.removed.load(Ordering::SeqCst)
    }
    /// Whether `other` is a version of this export (same store and attachment state).
    pub fn same_instance(&self, other: &Export) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

/// Held by a connection for as long as it uses an export.
#[derive(Debug)]
pub struct Attachment {
    export: Arc<Export>,
}

impl Attachment {
    /// The attached export.
    pub fn export(&self) -> &Arc<Export> {
        &self.export
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let before = self.export.shared.attached.fetch_sub(1, Ordering::SeqCst);
        if before == 1 && self.export.is_removed() {
            spawn_flush(
                Arc::clone(&self.export),
                "last client detached from removed export",
            );
        }
    }
}

/// Longest pause between flush attempts of a removed export while S3 refuses its data.
const RETIRED_FLUSH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Flushes an export in the background and logs the outcome. The task keeps the export (and so
/// its dirty data) alive until the flush succeeds: a removed export whose data S3 refuses is
/// retried with backoff, never dropped; it stops early only if the export is served again.
pub fn spawn_flush(export: Arc<Export>, why: &'static str) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        warn!(export = export.name(), "{why}: no runtime to flush on");
        return;
    };
    handle.spawn(async move {
        let Ok(store) = &export.store else { return };
        let mut backoff = Duration::from_millis(500);
        loop {
            match store.flush().await {
                Ok(()) => {
                    info!(export = export.name(), "{why}: flushed");
                    break;
                }
                Err(e) => error!(
                    export = export.name(),
                    "{why}: flush failed ({e}); {} dirty bytes stay queued, retrying in {backoff:?}",
                    store.dirty_bytes()
                ),
            }
            if !export.is_removed() {
                return; // served again: its normal life cycle flushes it
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RETIRED_FLUSH_BACKOFF_MAX);
        }
        if export.is_removed() && export.attached() == 0 {
            info!(export = export.name(), "removed export released");
        }
    });
}

/// Why an export could not be opened, and whether to try again by itself.
struct Refusal {
    message: String,
    retry: Retry,
}

/// Longest wait between retries of a refused export whose store refused for good (a missing
/// bucket or credentials): an admin fixing it sees the export come up within this.
const SLOW_RETRY: Duration = Duration::from_secs(60);

impl Refusal {
    fn lease(e: LeaseError, ttl: Duration) -> Self {
        let retry = match &e {
            LeaseError::Unsupported { .. } => Retry::Never,
            LeaseError::Held { .. } => Retry::lease_held(ttl),
            LeaseError::Backend(b) => Retry::after_backend(b),
        };
        Self {
            message: e.to_string(),
            retry,
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        let retry = match &e {
            StoreError::Backend(b) => Retry::after_backend(b),
            _ => Retry::Never,
        };
        Self {
            message: e.to_string(),
            retry,
        }
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
    if let Err(message) = &export.store {
        error!(export = cfg.name.as_str(), "export refused: {message}");
    }
    export
}

/// `open_export` without the log line (the background reopener logs its own way).
pub async fn try_open<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    factory: &F,
    ctx: &OpenContext,
) -> Arc<Export> {
    let (store, lease, retry) = match open_store(cfg, factory, ctx).await {
        Ok((store, lease)) => (Ok(store), lease, Retry::Never),
        Err(r) => (Err(r.message), None, r.retry),
    };
    Arc::new(Export {
        config: cfg.clone(),
        store,
        lease,
        retry,
        shared: Arc::default(),
    })
}

/// Takes the lease (writable exports), then opens the block store behind the lease's fence,
/// so not even the manifest is written without it.
async fn open_store<F: BucketSource + ?Sized>(
    cfg: &ExportConfig,
    factory: &F,
    ctx: &OpenContext,
) -> Result<(Arc<BlockStore>, Option<Arc<Lease>>), Refusal> {
    let objects = factory.bucket(&cfg.bucket).map_err(|e| Refusal {
        message: e.to_string(),
        retry: Retry::Every(SLOW_RETRY),
    })?;
    let (objects, lease) = match cfg.lease {
        LeaseMode::On { ttl } if !cfg.read_only => {
            let lease = ctx
                .leases
                .acquire(&objects, &cfg.bucket, &cfg.prefix, ttl)
                .await
                .map_err(|e| Refusal::lease(e, ttl))?;
            let fenced = FencedStore::new(objects, Arc::clone(&lease));
            (Arc::new(fenced) as DynObjectStore, Some(lease))
        }
        _ => (objects, None),
    };
    let store_cfg = BlockStoreConfig {
        prefix: cfg.prefix.clone(),
        size: cfg.size,
        block_size: cfg.block_size,
        read_only: cfg.read_only,
        flush_timeout: ctx.flush_timeout,
    };
    let store = BlockStore::open(objects, store_cfg, Arc::clone(&ctx.budget)).await?;
    if let Some(lease) = &lease {
        store.set_write_gate(Arc::clone(lease) as Arc<dyn crate::store::WriteGate>);
    }
    Ok((store, lease))
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

/// The set of exports new connections can see, replaced atomically on reload, plus the removed
/// exports still draining (attached clients, or a final flush running).
#[derive(Debug, Default)]
pub struct Registry {
    exports: ArcSwap<BTreeMap<String, Arc<Export>>>,
    draining: Mutex<Vec<Weak<Export>>>,
}

impl Registry {
    /// An empty registry; fill it with `replace`.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    /// The export named `name` in the current snapshot.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.load().get(name).cloned()
    }
    /// Every export of the current snapshot, sorted by name (NBD_OPT_LIST).
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.exports.load().values().cloned().collect()
    }
    /// The current snapshot as one consistent map.
    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Export>>> {
        self.exports.load_full()
    }
    /// Swaps in a new snapshot in one step.
    pub fn replace(&self, exports: BTreeMap<String, Arc<Export>>) {
        self.exports.store(Arc::new(exports));
    }
    /// Takes an export out of service (call after `replace` dropped it): marks it removed, so
    /// new connections cannot find it and its last detaching client releases it, and flushes
    /// its dirty data now.
    pub fn retire(&self, export: Arc<Export>) {
        export.shared.removed.store(true, Ordering::SeqCst);
        if let Ok(mut draining) = self.draining.lock() {
            draining.retain(|w| w.strong_count() > 0);
            draining.push(Arc::downgrade(&export));
        }
        let clients = export.attached();
        info!(
            export = export.name(),
            clients, "export removed; new connections are refused"
        );
        spawn_flush(export, "export removed");
    }
    /// Removed exports still alive (clients attached or a final flush running). A re-added
    /// export reuses such a store instead of opening a second cache on the same objects.
    pub fn draining(&self) -> Vec<Arc<Export>> {
        match self.draining.lock() {
            Ok(mut d) => {
                d.retain(|w| w.strong_count() > 0);
                d.iter()
                    .filter_map(Weak::upgrade)
                    .filter(|e| e.is_removed())
                    .collect()
            }
            Err(_) => Vec::new(),
        }
    }
    /// Brings a draining export back (re-added with the same bucket, prefix and block size).
    pub fn revive(&self, export: &Export) {
        export.shared.removed.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests;
