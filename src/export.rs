//! Exports: an export's definition and its state, [`ExportState`] — served by a block store
//! (with the lease that fences it) or refused with a typed [`Refusal`] that says when to try
//! again. Connections hold an [`Attachment`] (an `Arc<Export>`), so a removed export lives —
//! and keeps serving its attached clients — until its last client goes; then it is flushed and
//! released.
//!
//! - [`refusal`]: why an export is refused, and each reason's retry rule;
//! - [`open`]: opening an export (bucket, lease, block store);
//! - [`registry`]: the live map of exports that handshakes look up;
//! - [`schedule`]: when a refused export is opened again by itself;
//! - `retire`: the final flush of a removed export.

mod idle;
pub mod open;
pub mod refusal;
pub mod registry;
pub mod requests;
mod retire;
pub mod schedule;

pub use open::{open_all, open_export, try_open, BucketSource, OpenContext};
pub use refusal::{Refusal, Retry, Step};
pub use registry::Registry;
pub use requests::ExportRequests;
pub use retire::spawn_flush;
pub use schedule::Schedule;

use crate::config::{ExportConfig, LeaseMode};
use crate::lease::slot::LeaseSlot;
use crate::lease::Lease;
use crate::store::BlockStore;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// State shared by every version of one export (a reload that only changes its description or
/// grows it makes a new `Export` around the same store): who is attached, whether it was
/// removed from the configuration.
#[derive(Debug, Default)]
struct Shared {
    attached: AtomicUsize,
    /// Admin commands under way that hold the export lease (not clients: a rollback, which
    /// needs no client attached, still needs the lease).
    admin: AtomicUsize,
    removed: AtomicBool,
    requests: Arc<ExportRequests>,
}

/// Where an export is in its life.
#[derive(Debug, Clone)]
pub enum ExportState {
    /// Served by `store`; `lease` is the slot of the export lease (writable exports with
    /// `lease` on), which fences the store: the lease is held while clients are attached or
    /// data is dirty, and given up when the export is idle.
    Serving {
        store: Arc<BlockStore>,
        lease: Option<Arc<LeaseSlot>>,
    },
    /// Not served; clients asking for it get ERR_UNKNOWN with the reason.
    Refused { reason: Refusal },
}

/// One export: its definition and its state.
#[derive(Debug)]
pub struct Export {
    pub config: ExportConfig,
    state: ExportState,
    shared: Arc<Shared>,
}

impl Export {
    /// An export served by `store` (and fenced by the lease of `lease`, if it has one).
    pub fn serving(
        config: ExportConfig,
        store: Arc<BlockStore>,
        lease: Option<Arc<LeaseSlot>>,
    ) -> Arc<Self> {
        Self::with_state(config, ExportState::Serving { store, lease })
    }
    /// An export refused for `reason`.
    pub fn refused(config: ExportConfig, reason: Refusal) -> Arc<Self> {
        Self::with_state(config, ExportState::Refused { reason })
    }
    fn with_state(config: ExportConfig, state: ExportState) -> Arc<Self> {
        Arc::new(Self {
            config,
            state,
            shared: Arc::default(),
        })
    }
    /// The same state and attachment state under a new definition (reload: description,
    /// read_only or a larger size). Connections already attached keep the old definition.
    pub fn with_config(&self, config: ExportConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: self.state.clone(),
            shared: Arc::clone(&self.shared),
        })
    }
    /// This freshly opened export, counting its clients' requests on `previous`'s counters:
    /// a reload or reopen that replaces an export of the same name keeps its request counts
    /// monotonic (Prometheus counters never go back). An export already shared keeps its own.
    pub fn counting_on(self: Arc<Self>, previous: &Export) -> Arc<Self> {
        if Arc::ptr_eq(&self.shared.requests, &previous.shared.requests) {
            return self;
        }
        match Arc::try_unwrap(self) {
            Ok(mut export) => {
                export.shared = Arc::new(Shared {
                    requests: Arc::clone(&previous.shared.requests),
                    ..Shared::default()
                });
                Arc::new(export)
            }
            Err(shared) => shared,
        }
    }
    /// Served or refused, with what goes with each.
    pub fn state(&self) -> &ExportState {
        &self.state
    }
    /// The block store, if the export is served.
    pub fn store(&self) -> Option<&Arc<BlockStore>> {
        match &self.state {
            ExportState::Serving { store, .. } => Some(store),
            ExportState::Refused { .. } => None,
        }
    }
    /// The export lease this daemon holds now, if the export is served with one and it is
    /// not idle.
    pub fn lease(&self) -> Option<Arc<Lease>> {
        self.lease_slot().and_then(|s| s.current())
    }
    /// The slot of the export lease, if the export is served with one.
    pub fn lease_slot(&self) -> Option<&Arc<LeaseSlot>> {
        match &self.state {
            ExportState::Serving { lease, .. } => lease.as_ref(),
            ExportState::Refused { .. } => None,
        }
    }
    /// Gives the export lease up now if nothing needs it (no client, nothing dirty): idle
    /// exports and shutdown. Returns whether it is no longer held.
    pub async fn release_lease(&self) -> bool {
        let Some(slot) = self.lease_slot() else {
            return true;
        };
        let dirty = || self.store().map_or(0, |s| s.dirty_bytes());
        slot.release_if(|| self.unused() && dirty() == 0).await
    }
    /// Why the export is refused, if it is.
    pub fn refusal(&self) -> Option<&Refusal> {
        match &self.state {
            ExportState::Refused { reason } => Some(reason),
            ExportState::Serving { .. } => None,
        }
    }
    /// Whether new clients are served.
    pub fn is_serving(&self) -> bool {
        matches!(self.state, ExportState::Serving { .. })
    }
    /// Whether (and when) the daemon should open this export again by itself: a refused
    /// export by its reason's rule; a served one whose lease another daemon took, once no
    /// client uses it, as if the lease were held elsewhere (new clients then get "in use by
    /// …" instead of EIO on every write). `None`: leave it alone.
    pub fn reopen_rule(&self) -> Option<Retry> {
        match &self.state {
            ExportState::Refused { reason } => Some(reason.retry()).filter(|r| *r != Retry::Never),
            ExportState::Serving { lease, .. } => {
                let LeaseMode::On { ttl } = self.config.lease else {
                    return None; // no lease, nothing to lose
                };
                let lost = lease.as_ref().is_some_and(|s| s.lost_reason().is_some());
                (lost && self.attached() == 0).then(|| Retry::lease_held(ttl))
            }
        }
    }
    /// The NBD requests its clients sent, by command (every version of the export shares them).
    pub fn requests(&self) -> &Arc<ExportRequests> {
        &self.shared.requests
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
    /// Attaches a client for transmission: takes the export lease (writable exports with a
    /// lease) unless this daemon holds it already; refused, naming the holder, when another
    /// daemon does.
    pub async fn attach_client(self: &Arc<Self>) -> Result<Attachment, Refusal> {
        let attachment = self.attach();
        self.take_lease().await?;
        Ok(attachment)
    }
    /// Holds the export lease for an admin command (snapshots, gc) until the guard drops,
    /// without counting as an attached client.
    pub async fn hold_lease(self: &Arc<Self>) -> Result<LeaseHold, Refusal> {
        self.shared.admin.fetch_add(1, Ordering::SeqCst);
        let hold = LeaseHold {
            export: Arc::clone(self),
        };
        self.take_lease().await?;
        Ok(hold)
    }
    /// Takes the lease if the export has one. When it was taken after another daemon may
    /// have held it, the store's view (manifest, presence map, cached blocks) is rebuilt from
    /// S3 first.
    pub async fn take_lease(&self) -> Result<(), Refusal> {
        let ExportState::Serving {
            store,
            lease: Some(slot),
        } = &self.state
        else {
            return Ok(());
        };
        let refresh = || async {
            store.reload_from_store().await.map_err(|e| match e {
                crate::store::StoreError::Backend(b) => b,
                other => crate::backend::BackendError::Permanent(other.to_string()),
            })
        };
        crate::retry::Policy::LEASE_ATTACH
            .run(|| slot.take(refresh))
            .await
            .map_err(|e| Refusal::lease(e, slot.ttl()))
    }
    /// Whether nothing but dirty data may need the lease: no client, no admin command.
    fn unused(&self) -> bool {
        self.attached() == 0 && self.shared.admin.load(Ordering::SeqCst) == 0
    }
    /// Counts a client as attached (without taking the lease: [`Export::attach_client`] does);
    /// when the last one goes, the lease is given up once nothing is dirty, and a removed
    /// export is flushed.
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
        if before == 1 {
            idle::spawn_release(Arc::clone(&self.export));
        }
    }
}

/// Held by an admin command for as long as it needs the export lease.
#[derive(Debug)]
pub struct LeaseHold {
    export: Arc<Export>,
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        let before = self.export.shared.admin.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            idle::spawn_release(Arc::clone(&self.export));
        }
    }
}

#[cfg(test)]
mod tests;
