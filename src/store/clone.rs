//! Clones: an export whose content starts as a snapshot of another export, without copying
//! a block. The clone's manifest records the base's bucket, prefix and the layers the
//! snapshot reads through; reads of blocks the clone never wrote go to the base's objects
//! (one GET, the base's layers are listed at open like the clone's own). The base's
//! manifest lists the clone, so the snapshot is kept while the clone needs it.
//!
//! Creating a clone is two conditional writes: the clone is registered in the base's
//! manifest first, then the clone's manifest is created. A crash in between leaves a
//! registration whose clone does not exist yet: the next open registers it again (no
//! duplicate), and a snapshot delete drops registrations whose clone manifest is missing.

use super::layers::{chain_of, data_key};
use super::manifest::{self, BaseRecord, CloneRecord, LayerRecord, Manifest};
use super::objects::BaseObjects;
use super::{crash_point, BlockStore, BlockStoreConfig, Buckets, StoreError};
use crate::backend::{BackendError, DynObjectStore};
use futures_util::stream::{self, StreamExt};
use std::sync::Arc;

/// Attempts at registering a clone while other writers change the base's manifest.
const REGISTER_ATTEMPTS: usize = 5;

/// A clone to create: its base snapshot and who the clone is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseSpec {
    /// The base export's name and snapshot.
    pub export: String,
    pub snapshot: String,
    /// Where the base's objects are (bucket, prefix); `None` when the base export is not
    /// configured (then the clone cannot be created).
    pub location: Option<(String, String)>,
    /// The clone's own name and bucket, recorded in the base's manifest.
    pub name: String,
    pub bucket: String,
}

/// Creates the manifest of a clone that does not exist yet.
pub(super) async fn create(
    objects: &DynObjectStore,
    cfg: &BlockStoreConfig,
    buckets: &dyn Buckets,
) -> Result<Manifest, StoreError> {
    let Some(spec) = &cfg.base else {
        return Err(StoreError::Refused("not a clone".into()));
    };
    let Some((bucket, prefix)) = &spec.location else {
        return Err(StoreError::Refused(format!(
            "base export {:?} is not configured: a clone is created from an export of the same file",
            spec.export
        )));
    };
    let base_store = buckets.bucket(bucket)?;
    let record = {
        // Clones of one base opening together take turns: each is one read-modify-write of
        // the base's manifest. Conditional anyway, but some S3-compatible servers check the
        // condition and write in two steps, so concurrent writers could still lose one.
        let _turn = match buckets.manifest_turn() {
            Some(turn) => Some(turn.lock().await),
            None => None,
        };
        register(&base_store, bucket, prefix, spec, cfg).await?
    };
    crash_point("clone-registered");
    let mut m = Manifest::new(cfg);
    m.make_layered();
    m.inherit_identity(record.id.clone());
    m.base = Some(record);
    let key = manifest::key(&cfg.prefix);
    let body = manifest::encode(&m)?;
    match manifest::retry(|| objects.put_if_absent(&key, body.clone())).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            // Created meanwhile (by our own retried write, or another opener): use that one.
            let (existing, _) = manifest::read(objects, &cfg.prefix).await?;
            return Ok(existing);
        }
        Err(BackendError::Unsupported(_)) => {
            manifest::retry(|| objects.put(&key, body.clone())).await?;
        }
        Err(e) => return Err(e.into()),
    }
    crash_point("clone-written");
    tracing::info!(
        prefix = %cfg.prefix,
        base = %format!("{}@{}", spec.export, spec.snapshot),
        "clone created"
    );
    Ok(m)
}

/// Adds the clone to the base's manifest (once) and returns what the clone records of it.
async fn register(
    base_store: &DynObjectStore,
    bucket: &str,
    prefix: &str,
    spec: &BaseSpec,
    cfg: &BlockStoreConfig,
) -> Result<BaseRecord, StoreError> {
    let refused = |m: String| {
        StoreError::Refused(format!(
            "cannot clone {}@{}: {m}",
            spec.export, spec.snapshot
        ))
    };
    for _ in 0..REGISTER_ATTEMPTS {
        let (mut bm, tag) = manifest::read(base_store, prefix).await?;
        let Some(snap) = bm.snapshot(&spec.snapshot).cloned() else {
            return Err(refused(format!(
                "export {:?} has no snapshot {:?}",
                spec.export, spec.snapshot
            )));
        };
        if bm.base.is_some() {
            return Err(refused(format!(
                "{:?} is itself a clone; flatten it first",
                spec.export
            )));
        }
        if bm.block_size != u64::from(cfg.block_size) {
            return Err(refused(format!(
                "block size {} differs from the base's {}",
                cfg.block_size, bm.block_size
            )));
        }
        if cfg.size < snap.size {
            return Err(refused(format!(
                "size {} is smaller than the snapshot's {}",
                cfg.size, snap.size
            )));
        }
        let parents = bm.parents();
        let chain = chain_of(&parents, snap.layer).map_err(StoreError::BadManifest)?;
        let layers = chain
            .iter()
            .map(|l| LayerRecord {
                id: *l,
                parent: parents.get(l).copied().flatten(),
            })
            .collect();
        let me = CloneRecord {
            export: spec.name.clone(),
            snapshot: spec.snapshot.clone(),
            bucket: spec.bucket.clone(),
            prefix: cfg.prefix.clone(),
        };
        // The clone reads the base's blocks with its own codec: they must agree.
        bm.check_codec(&cfg.codec)
            .map_err(|e| refused(e.to_string()))?;
        let record = BaseRecord {
            id: bm.data_id(),
            export: spec.export.clone(),
            snapshot: spec.snapshot.clone(),
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            layers,
        };
        if bm.clones.contains(&me) {
            return Ok(record);
        }
        bm.clones.push(me);
        match manifest::write(base_store, prefix, &bm, tag.as_deref()).await {
            Ok(()) => return Ok(record),
            Err(StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict(format!(
        "the manifest of {:?} kept changing while the clone was registered; try again",
        spec.export
    )))
}

/// Server-side copies in flight while flattening.
const COPIES_IN_FLIGHT: usize = 32;

impl BlockStore {
    /// Copies every block the clone still reads from its base into a layer of its own
    /// (server-side), then drops the base: the base's snapshot may be deleted afterwards.
    /// Returns how many blocks were copied. The copies go to a new layer below the clone's
    /// own, never one clients write, so a block written meanwhile is never overwritten; a
    /// crash before the manifest names that layer leaves objects `gc` removes.
    pub async fn flatten(&self) -> Result<u64, StoreError> {
        if self.inner.read_only {
            return Err(StoreError::ReadOnly);
        }
        let _one_at_a_time = self.snaps.admin.lock().await;
        self.gate()?;
        let objects = &self.inner.objects;
        let (store, prefix) = (objects.store(), objects.prefix());
        let Some(BaseObjects {
            store: base_store,
            prefix: base_prefix,
            ..
        }) = objects.base()
        else {
            return Err(StoreError::Refused(
                "not a clone, or flattened already: it depends on no base".into(),
            ));
        };
        let (mut m, tag) = manifest::read(store, prefix).await?;
        let Some(base) = m.base.clone() else {
            return Err(StoreError::Refused(
                "not a clone: it depends on no base".into(),
            ));
        };
        let flat = m.take_layer();
        let blocks = objects.layers().base_blocks();
        let copies: Vec<Copy> = blocks
            .iter()
            .map(|(block, layer)| Copy {
                from: Arc::clone(&base_store),
                to: Arc::clone(store),
                bucket: base.bucket.clone(),
                src: data_key(&base_prefix, *layer, *block),
                dst: data_key(prefix, flat, *block),
            })
            .collect();
        let mut copying = stream::iter(copies)
            .map(Copy::run)
            .buffer_unordered(COPIES_IN_FLIGHT);
        let mut first = true;
        while let Some(done) = copying.next().await {
            done?;
            if std::mem::take(&mut first) {
                crash_point("flatten-partial");
            }
        }
        drop(copying);
        for layer in &mut m.layers {
            if layer.parent.is_none() {
                layer.parent = Some(flat);
            }
        }
        m.layers.push(LayerRecord {
            id: flat,
            parent: None,
        });
        m.base = None;
        manifest::write(store, prefix, &m, tag.as_deref()).await?;
        crash_point("flatten-written");
        let copied: Vec<u64> = blocks.iter().map(|(block, _)| *block).collect();
        objects
            .layers_mut()
            .replace_base(flat, &copied)
            .map_err(StoreError::BadManifest)?;
        objects.set_base(None);
        self.snaps.forget_views();
        if let Err(e) = unregister(&base_store, &base, prefix).await {
            // Harmless: the base drops a registration whose clone no longer names it.
            tracing::warn!(prefix = %prefix, error = %e, "clone flattened, but its base still lists it");
        }
        tracing::info!(prefix = %prefix, blocks = copied.len(), "clone flattened");
        Ok(copied.len() as u64)
    }
}

/// One server-side copy of a base block into the clone.
struct Copy {
    from: DynObjectStore,
    to: DynObjectStore,
    bucket: String,
    src: String,
    dst: String,
}

impl Copy {
    async fn run(self) -> Result<(), StoreError> {
        let c = &self;
        manifest::retry(|| c.to.copy_from(&*c.from, &c.bucket, &c.src, &c.dst)).await?;
        Ok(())
    }
}

/// Takes the clone at `prefix` off the base's list of clones.
async fn unregister(
    base_store: &DynObjectStore,
    base: &BaseRecord,
    prefix: &str,
) -> Result<(), StoreError> {
    for _ in 0..REGISTER_ATTEMPTS {
        let (mut bm, tag) = manifest::read(base_store, &base.prefix).await?;
        let before = bm.clones.len();
        bm.clones
            .retain(|c| !(c.prefix == prefix && c.snapshot == base.snapshot));
        if bm.clones.len() == before {
            return Ok(());
        }
        match manifest::write(base_store, &base.prefix, &bm, tag.as_deref()).await {
            Err(StoreError::Conflict(_)) => continue,
            other => return other,
        }
    }
    Err(StoreError::Conflict(
        "the base's manifest kept changing".into(),
    ))
}
