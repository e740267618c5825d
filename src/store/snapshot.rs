//! Snapshots of one export: create (freeze the head layer, start a new one), delete (forget
//! it, then remove what nothing reads any more), garbage collection, and read-only views.
//!
//! Creating a snapshot copies no block: it stores every dirty block, then makes one
//! conditional manifest write; changes wait meanwhile (the store's barrier), so the snapshot
//! holds exactly the changes replied to before it started. Deleting one is a manifest write
//! followed by deletes of objects no reader finds any more; a crash between the two only
//! leaves objects that the next delete or `gc` removes. Each step that a crash could split
//! has a named crash point (`crash_point`) for the tests.

use super::clients::ClientGate;
use super::layers::Layers;
use super::manifest::{self, LayerRecord, SnapshotRecord};
use super::objects::BlockObjects;
use super::{crash_point, BlockStore, BlockStoreConfig, StoreError};
use crate::backend::DELETE_BATCH;
use futures_util::stream::{self, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Multi-object deletes (of up to 1,000 keys each) in flight while collecting garbage.
const BATCHES_IN_FLIGHT: usize = 4;

/// A snapshot as the admin commands show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    /// RFC 3339.
    pub created: String,
    /// The export's size when it was taken (the view's size).
    pub size: u64,
    /// Bytes stored for this snapshot alone: what deleting it frees.
    pub bytes_held_only: u64,
}

pub use crate::config::check_snapshot_name;

/// The store's snapshots and the views opened on them.
#[derive(Debug)]
pub(super) struct Snapshots {
    records: parking_lot::Mutex<Vec<SnapshotRecord>>,
    views: parking_lot::Mutex<BTreeMap<String, Arc<BlockStore>>>,
    /// The clients of each snapshot's view (outlives a reopened view).
    view_clients: parking_lot::Mutex<BTreeMap<String, Arc<ClientGate>>>,
    /// One admin change at a time per export.
    pub admin: tokio::sync::Mutex<()>,
    /// The last count of objects held only by snapshots (metrics).
    held: parking_lot::Mutex<HeldMemo>,
}

/// What the snapshots of an export hold (metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    pub snapshots: u64,
    /// Objects stored only because snapshots read them, in block-size bytes (before
    /// compression and encryption): what deleting every snapshot would free.
    pub bytes_held: u64,
}

/// The last count of objects held only by snapshots, with what it was counted from.
#[derive(Debug, Default)]
struct HeldMemo {
    /// Layer generation, head and snapshot layers the count was made for.
    key: Option<(u64, u64, Vec<u64>)>,
    objects: u64,
    at: Option<std::time::Instant>,
    took: std::time::Duration,
}

/// A count is made again at most once per this many times what the last one took, however
/// often metrics are scraped while the export changes: at most about 1% of a core.
const HELD_RECOUNT_FACTOR: u32 = 100;

impl Snapshots {
    /// Drops the views opened so far (what they read through changed: flatten).
    pub fn forget_views(&self) {
        self.views.lock().clear();
    }

    pub fn new(records: Vec<SnapshotRecord>) -> Self {
        Self {
            records: parking_lot::Mutex::new(records),
            views: parking_lot::Mutex::new(BTreeMap::new()),
            view_clients: parking_lot::Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            held: Default::default(),
        }
    }

    /// Takes the records of a manifest read again (another daemon may have changed them);
    /// views opened on the old ones are forgotten.
    pub fn reset(&self, records: Vec<SnapshotRecord>) {
        *self.records.lock() = records;
        self.views.lock().clear();
        *self.held.lock() = HeldMemo::default();
    }

    /// The gate counting the clients of snapshot `name`'s view.
    fn view_gate(&self, name: &str) -> Arc<ClientGate> {
        Arc::clone(self.view_clients.lock().entry(name.to_owned()).or_default())
    }
}

impl BlockStore {
    /// Names of the snapshots, oldest first (no S3 call).
    pub fn snapshot_names(&self) -> Vec<String> {
        self.snaps
            .records
            .lock()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// The snapshots with what each alone holds (from the in-memory maps, no S3 call).
    /// Counted on a copy of the layer maps on the blocking pool: the count walks every
    /// block of every snapshot's layers, and neither writes (which update the maps) nor the
    /// runtime's workers wait for it.
    pub async fn snapshots(&self) -> Vec<Snapshot> {
        let records = self.snaps.records.lock().clone();
        if records.is_empty() {
            return Vec::new();
        }
        let layers = self.inner.objects.layers().copy();
        let bs = self.inner.geo.block_size;
        let fallback = records.clone();
        tokio::task::spawn_blocking(move || held_only(&records, &layers, bs))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "counting what snapshots hold failed");
                fallback.iter().map(|r| listed(r, 0)).collect()
            })
    }

    /// How many snapshots the export has and what they alone hold (metrics). Counted from
    /// the in-memory maps on a copy taken under the lock (writes go on meanwhile); the count
    /// is remembered until the layers or snapshots change, and made again no more often
    /// than [`HELD_RECOUNT_FACTOR`] times its cost.
    pub fn snapshot_stats(&self) -> SnapshotStats {
        let records: Vec<u64> = self.snaps.records.lock().iter().map(|r| r.layer).collect();
        if records.is_empty() {
            return SnapshotStats::default();
        }
        let snapshots = records.len() as u64;
        let bs = self.inner.geo.block_size;
        let mut memo = self.snaps.held.lock();
        let (generation, head) = {
            let layers = self.inner.objects.layers();
            (layers.generation(), layers.head())
        };
        let key = (generation, head, records);
        let fresh = memo.key.as_ref() == Some(&key);
        let too_soon = memo
            .at
            .is_some_and(|at| at.elapsed() < memo.took * HELD_RECOUNT_FACTOR);
        if !fresh && !too_soon {
            let started = std::time::Instant::now();
            let copy = self.inner.objects.layers().copy();
            let readers: BTreeSet<u64> = key.2.iter().copied().collect();
            memo.objects = copy.held_by_snapshots(&readers);
            memo.key = Some(key);
            memo.at = Some(started);
            memo.took = started.elapsed();
        }
        SnapshotStats {
            snapshots,
            bytes_held: memo.objects * bs,
        }
    }

    /// Takes snapshot `name`: every change replied to before the call is in it, none that
    /// starts after. Costs a flush and two manifest requests, whatever the export's size.
    pub async fn create_snapshot(&self, name: &str) -> Result<Snapshot, StoreError> {
        check_snapshot_name(name).map_err(StoreError::Refused)?;
        if self.inner.read_only {
            return Err(StoreError::Refused(
                "the export is read-only (nothing can change, so a snapshot would add nothing)"
                    .into(),
            ));
        }
        let _one_at_a_time = self.snaps.admin.lock().await;
        self.gate()?;
        if self.snaps.records.lock().iter().any(|r| r.name == name) {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} already exists"
            )));
        }
        // Flushed once before the barrier, so the flush under it holds only what arrived
        // meanwhile: writes wait for that, not for everything that was dirty.
        self.inner.flush().await?;
        let _no_changes = self.barrier.write().await;
        self.inner.flush().await?;
        crash_point("snapshot-create-flushed");
        let store = self.inner.objects.store();
        let prefix = self.inner.objects.prefix();
        let (mut m, tag) = manifest::read(store, prefix).await?;
        if m.snapshot(name).is_some() {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} already exists"
            )));
        }
        self.check_served(&m)?;
        m.make_layered();
        let frozen = m.head();
        let head = m.take_layer();
        m.layers.push(LayerRecord {
            id: head,
            parent: Some(frozen),
        });
        m.head = Some(head);
        let record = SnapshotRecord {
            name: name.to_owned(),
            layer: frozen,
            created: manifest::now_rfc3339(),
            size: self.size(),
        };
        m.snapshots.push(record.clone());
        let gone = self.prune(&mut m);
        manifest::write(store, prefix, &m, tag.as_deref()).await?;
        crash_point("snapshot-create-written");
        self.inner.objects.layers_mut().push_head(head);
        self.spliced(&gone)?;
        *self.snaps.records.lock() = m.snapshots;
        tracing::info!(prefix = %prefix, snapshot = name, layer = frozen, "snapshot created");
        Ok(listed(&record, 0))
    }

    /// Deletes snapshot `name`, then the objects nothing reads any more; returns how many
    /// objects were deleted. Refused while clients read the snapshot; none can attach to it
    /// from the start of the delete.
    pub async fn delete_snapshot(&self, name: &str) -> Result<u64, StoreError> {
        // A read-only export holds no lease and has no write gate: refuse before the
        // manifest write, or it would change the snapshots of the daemon that does.
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        let _one_at_a_time = self.snaps.admin.lock().await;
        self.gate()?;
        // Closed before the check, so no client attaches to the view between the two.
        let no_clients = self
            .snaps
            .view_gate(name)
            .close(
                &format!("snapshot {name:?} is being deleted"),
                &format!("snapshot {name:?}"),
            )
            .map_err(StoreError::Refused)?;
        let store = self.inner.objects.store();
        let prefix = self.inner.objects.prefix();
        let (mut m, tag) = manifest::read(store, prefix).await?;
        let Some(at) = m.snapshots.iter().position(|s| s.name == name) else {
            return Err(StoreError::Refused(format!("no snapshot {name:?}")));
        };
        let clones = self.live_clones(&mut m, name).await?;
        if !clones.is_empty() {
            return Err(StoreError::Refused(format!(
                "snapshot {name:?} has clones based on it: {} (flatten them first)",
                clones.join(", ")
            )));
        }
        m.snapshots.remove(at);
        let gone = self.prune(&mut m);
        manifest::write(store, prefix, &m, tag.as_deref()).await?;
        crash_point("snapshot-delete-written");
        self.spliced(&gone)?;
        *self.snaps.records.lock() = m.snapshots.clone();
        self.snaps.views.lock().remove(name);
        // A view looked up before the delete stays closed; a later snapshot of the same
        // name gets a gate of its own.
        no_clients.forever(&format!("snapshot {name:?} was deleted"));
        self.snaps.view_clients.lock().remove(name);
        tracing::info!(prefix = %prefix, snapshot = name, "snapshot deleted");
        self.collect(&m).await
    }

    /// Makes the export read exactly as snapshot `name` did: a new, empty head layer on top
    /// of the snapshot's, then the old head's objects go. Refused while clients are attached
    /// (their cached view would change under them); none can attach while it runs. Returns
    /// how many objects were deleted.
    pub async fn rollback(&self, name: &str) -> Result<u64, StoreError> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        let _one_at_a_time = self.snaps.admin.lock().await;
        self.gate()?;
        // Closed before the check and until the old head's objects are gone, so no client
        // attaches (NBD_OPT_GO) to an export changing under it.
        let _no_clients = self
            .clients
            .close(
                &format!("the export is being rolled back to snapshot {name:?}"),
                "the export",
            )
            .map_err(StoreError::Refused)?;
        let m = {
            let _no_changes = self.barrier.write().await;
            self.inner.flush().await?;
            let store = self.inner.objects.store();
            let prefix = self.inner.objects.prefix();
            let (mut m, tag) = manifest::read(store, prefix).await?;
            let Some(target) = m.snapshot(name).map(|s| s.layer) else {
                return Err(StoreError::Refused(format!("no snapshot {name:?}")));
            };
            self.check_served(&m)?;
            let head = m.take_layer();
            m.layers.push(LayerRecord {
                id: head,
                parent: Some(target),
            });
            m.head = Some(head);
            let gone = self.prune(&mut m);
            manifest::write(store, prefix, &m, tag.as_deref()).await?;
            crash_point("rollback-written");
            let effective = {
                let mut layers = self.inner.objects.layers_mut();
                layers
                    .reroot(head, target)
                    .map_err(StoreError::BadManifest)?;
                layers.splice_out(&gone).map_err(StoreError::BadManifest)?;
                layers.effective()
            };
            self.inner.presence.replace(effective);
            self.inner.cache.drop_clean();
            tracing::info!(prefix = %prefix, snapshot = name, "rolled back");
            m
        };
        self.collect(&m).await
    }

    /// The clones registered on snapshot `name` that still depend on it. Registrations whose
    /// clone manifest is missing (a crash between the two writes of a clone's creation) or no
    /// longer names this base (flattened) are dropped from `m`.
    async fn live_clones(
        &self,
        m: &mut manifest::Manifest,
        name: &str,
    ) -> Result<Vec<String>, StoreError> {
        let prefix = self.inner.objects.prefix();
        let mut live = Vec::new();
        let mut keep = Vec::new();
        for c in std::mem::take(&mut m.clones) {
            if c.snapshot != name {
                keep.push(c);
                continue;
            }
            let store = self.buckets.bucket(&c.bucket)?;
            let depends = match manifest::read(&store, &c.prefix).await {
                Ok((cm, _)) => cm
                    .base
                    .is_some_and(|b| b.prefix == prefix && b.snapshot == name),
                Err(StoreError::BadManifest(_)) => false,
                Err(e) => return Err(e),
            };
            if depends {
                live.push(c.export.clone());
                keep.push(c);
            }
        }
        m.clones = keep;
        Ok(live)
    }

    /// Names of the clones registered on each snapshot (one manifest read).
    pub async fn clones(&self) -> Result<BTreeMap<String, Vec<String>>, StoreError> {
        let (m, _) =
            manifest::read(self.inner.objects.store(), self.inner.objects.prefix()).await?;
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in m.clones {
            out.entry(c.snapshot).or_default().push(c.export);
        }
        Ok(out)
    }

    /// Splices out of `m` the layers nothing needs any more: heads a rollback left (once
    /// their objects are gone) and layers deleted snapshots emptied, so chains stay as long
    /// as the snapshots make them, not as long as the export's history. Returns them, for
    /// the in-memory layers once the manifest write landed ([`BlockStore::spliced`]).
    fn prune(&self, m: &mut manifest::Manifest) -> BTreeSet<u64> {
        let snapshots: BTreeSet<u64> = m.snapshots.iter().map(|s| s.layer).collect();
        let mut gone = self.inner.objects.layers().prunable(&snapshots);
        // Only what S3's manifest lists and does not read from.
        gone.retain(|l| *l != m.head() && m.layers.iter().any(|r| r.id == *l));
        m.splice_out(&gone);
        gone
    }

    /// The in-memory side of [`BlockStore::prune`], after the manifest write.
    fn spliced(&self, gone: &BTreeSet<u64>) -> Result<(), StoreError> {
        (self.inner.objects.layers_mut())
            .splice_out(gone)
            .map_err(StoreError::BadManifest)
    }

    /// Refuses unless the manifest read from S3 is the state this store serves: the new
    /// head is stacked on the in-memory head, so building it on any other layer would put
    /// writes where no reader looks.
    fn check_served(&self, m: &manifest::Manifest) -> Result<(), StoreError> {
        let head = self.inner.objects.layers().head();
        if m.head() != head || *self.snaps.records.lock() != m.snapshots {
            return Err(StoreError::Conflict(format!(
                "the manifest in the bucket (head layer {}) is not what this daemon serves (head layer {head}); nothing was done",
                m.head()
            )));
        }
        Ok(())
    }

    /// Deletes the objects nothing needs (left by a crash, or by a delete that was cut
    /// short); returns how many.
    pub async fn gc(&self) -> Result<u64, StoreError> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        let _one_at_a_time = self.snaps.admin.lock().await;
        self.gate()?;
        let (m, _) =
            manifest::read(self.inner.objects.store(), self.inner.objects.prefix()).await?;
        self.collect(&m).await
    }

    /// Lists the prefix and deletes what no reader (the head, a snapshot) finds: objects of
    /// layers the manifest does not list, and objects every chain through their layer finds
    /// elsewhere first. The head layer is left alone: it changes while this runs.
    async fn collect(&self, m: &manifest::Manifest) -> Result<u64, StoreError> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        let objects = &self.inner.objects;
        let prefix = objects.prefix();
        let blocks = m.size.div_ceil(m.block_size.max(1));
        let keys =
            super::listing::keys(objects.store(), prefix, blocks, m.parents().into_keys()).await?;
        let mut listed = Layers::new(m.parents(), m.head()).map_err(StoreError::BadManifest)?;
        let parents = m.parents();
        let unknown: Vec<String> = keys
            .iter()
            .filter(|k| {
                super::layers::parse_key(prefix, k).is_some_and(|p| !parents.contains_key(&p.layer))
            })
            .cloned()
            .collect();
        listed.load(prefix, keys.iter().map(String::as_str));
        drop(keys);
        let mut readers: BTreeSet<u64> = m.snapshots.iter().map(|s| s.layer).collect();
        readers.insert(m.head());
        let garbage = listed.garbage(&readers, m.head());
        let total = (garbage.len() + unknown.len()) as u64;
        if total == 0 {
            return Ok(0);
        }
        let store = objects.store();
        let mut unknown_deletes = stream::iter(batches(&unknown))
            .map(|keys| delete_keys(store, keys))
            .buffer_unordered(BATCHES_IN_FLIGHT);
        while let Some(done) = unknown_deletes.next().await {
            done?;
        }
        let mut deletes = stream::iter(batches(&garbage))
            .map(|keys| remove_keys(objects, keys))
            .buffer_unordered(BATCHES_IN_FLIGHT);
        let mut first = true;
        while let Some(done) = deletes.next().await {
            done?;
            if std::mem::take(&mut first) {
                crash_point("collect-partial");
            }
        }
        tracing::info!(prefix = %prefix, objects = total, "deleted objects nothing needs");
        Ok(total)
    }

    /// A read-only store reading snapshot `name` (opened once, then shared; no S3 call).
    pub fn snapshot_view(&self, name: &str) -> Option<Arc<BlockStore>> {
        let record = self
            .snaps
            .records
            .lock()
            .iter()
            .find(|r| r.name == name)
            .cloned()?;
        if let Some(view) = self.snaps.views.lock().get(name) {
            return Some(Arc::clone(view));
        }
        let layers = match self.inner.objects.layers().view(record.layer) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(snapshot = name, error = %e, "snapshot view cannot be opened");
                return None;
            }
        };
        let objects = self.inner.objects.store();
        let prefix = self.inner.objects.prefix().to_owned();
        let cfg = BlockStoreConfig {
            prefix: prefix.clone(),
            size: record.size,
            block_size: self.block_size(),
            read_only: true,
            flush_timeout: self.inner.wb.flush_timeout,
            // Only a new export's manifest reads it; the view decodes through its export's
            // codec (`with_codec_of`).
            codec: Default::default(),
            base: None,
            journal: None,
        };
        let bs = self.block_size() as usize;
        let view_objects = BlockObjects::new(Arc::clone(objects), prefix, bs, layers)
            .with_codec_of(&self.inner.objects);
        view_objects.set_base(self.inner.objects.base());
        let budget = Arc::clone(&self.inner.budget);
        let buckets = Arc::clone(&self.buckets);
        let clients = self.snaps.view_gate(name);
        let view = Self::build(
            view_objects,
            &cfg,
            budget,
            Vec::new(),
            buckets,
            clients,
            None,
        );
        let mut views = self.snaps.views.lock();
        let view = views.entry(name.to_owned()).or_insert(view);
        Some(Arc::clone(view))
    }
}

/// What each snapshot alone holds, in block-size bytes.
fn held_only(records: &[SnapshotRecord], layers: &Layers, block_size: u64) -> Vec<Snapshot> {
    let mut readers: BTreeSet<u64> = records.iter().map(|r| r.layer).collect();
    readers.insert(layers.head());
    records
        .iter()
        .map(|r| {
            // Two snapshots of one layer (nothing written between them) share it all.
            let twins = records.iter().filter(|o| o.layer == r.layer).count();
            let only = if twins > 1 {
                0
            } else {
                layers.held_only_by(r.layer, &readers)
            };
            listed(r, only * block_size)
        })
        .collect()
}

fn listed(r: &SnapshotRecord, bytes_held_only: u64) -> Snapshot {
    Snapshot {
        name: r.name.clone(),
        created: r.created.clone(),
        size: r.size,
        bytes_held_only,
    }
}

/// `keys` in owned batches of one multi-object delete each (owned: a stream of borrowed
/// slices makes the admin task's future not `Send`).
fn batches<T: Clone>(keys: &[T]) -> Vec<Vec<T>> {
    keys.chunks(DELETE_BATCH).map(<[T]>::to_vec).collect()
}

async fn delete_keys(
    store: &crate::backend::DynObjectStore,
    keys: Vec<String>,
) -> Result<(), StoreError> {
    manifest::retry(|| super::objects::delete_all(store, &keys)).await?;
    Ok(())
}

async fn remove_keys(
    objects: &BlockObjects,
    keys: Vec<super::layers::LayerKey>,
) -> Result<(), StoreError> {
    manifest::retry(|| objects.remove_many(&keys)).await?;
    Ok(())
}
