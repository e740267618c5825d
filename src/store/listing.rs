//! Listing an export's objects (at open, and again when another daemon may have changed
//! them), and rebuilding the store's view of them from that listing.

use super::{layers, manifest, objects, BlockStore, Buckets, StoreError};
use crate::backend::{BackendError, DynObjectStore};

/// Every key under `prefix` (bounded retries, as everything done while opening an export).
pub(crate) async fn keys(
    objects: &DynObjectStore,
    prefix: &str,
) -> Result<Vec<String>, BackendError> {
    manifest::retry(|| objects.list(prefix)).await
}

/// The layers `m` describes, loaded from a listing of the export (and of a clone's base, whose
/// objects it reads through).
pub(crate) async fn layers(
    objects: &DynObjectStore,
    prefix: &str,
    m: &manifest::Manifest,
    buckets: &dyn Buckets,
) -> Result<(layers::Layers, Option<objects::BaseObjects>), StoreError> {
    let listed = keys(objects, prefix).await?;
    let mut layers =
        layers::Layers::new(m.all_parents(), m.head()).map_err(StoreError::BadManifest)?;
    layers.load(prefix, listed.iter().map(String::as_str));
    drop(listed);
    let mut base = None;
    if let Some(b) = m.base.as_ref() {
        let store = buckets.bucket(&b.bucket)?;
        let listed = keys(&store, &b.prefix).await?;
        layers.load_base(&b.prefix, listed.iter().map(String::as_str));
        base = Some(objects::BaseObjects {
            store,
            prefix: b.prefix.clone(),
            id: std::sync::Arc::from(b.id.clone().unwrap_or_default()),
        });
    }
    Ok((layers, base))
}

impl BlockStore {
    /// Forgets what another daemon may have changed while this one did not hold the export:
    /// re-reads the manifest (layers, snapshots, a clone's base), lists the export again, rebuilds the
    /// presence map and drops every clean cached block. Refused while anything is dirty (that
    /// data would be stored over the other daemon's).
    pub async fn reload_from_store(&self) -> Result<(), StoreError> {
        let _no_changes = self.barrier.write().await;
        let dirty = self.dirty_bytes();
        if dirty > 0 {
            return Err(StoreError::Refused(format!(
                "{dirty} dirty bytes written before another daemon held the export are still in memory"
            )));
        }
        let store = self.inner.objects.store();
        let prefix = self.inner.objects.prefix().to_string();
        let (m, _) = manifest::read(store, &prefix).await?;
        if m.block_size != u64::from(self.block_size()) {
            return Err(StoreError::BlockSizeMismatch {
                stored: u32::try_from(m.block_size).unwrap_or(u32::MAX),
                configured: self.block_size(),
            });
        }
        let (fresh, base) = layers(store, &prefix, &m, &*self.buckets).await?;
        let effective = fresh.effective();
        *self.inner.objects.layers_mut() = fresh;
        self.inner.objects.set_base(base);
        self.inner.presence.replace(effective);
        self.inner.cache.drop_clean();
        self.snaps.reset(m.snapshots);
        Ok(())
    }
}
