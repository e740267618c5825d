//! Listing an export's objects (at open, and again when another daemon may have changed
//! them), and rebuilding the store's view of them from that listing.

use super::{layers, manifest, objects, BlockStore, Buckets, StoreError};
use crate::backend::{BackendError, DynObjectStore};

/// Most key ranges listed at once.
const RANGES: u64 = 16;
/// Blocks per range at least: a range costs one request even when it holds nothing, so a
/// small export is listed in one go.
const BLOCKS_PER_RANGE: u64 = 8192;

/// Every key under `prefix` of an export of `blocks` blocks (bounded retries, as everything
/// done while opening an export). A large export is listed in up to [`RANGES`] key ranges at
/// once, split at block keys (16 hex digits, so key order is block order): what one LIST
/// page after another would take is divided by the number of ranges. Layer objects,
/// tombstones and the manifest sort after every plain block key and fall in the last range.
pub(crate) async fn keys(
    objects: &DynObjectStore,
    prefix: &str,
    blocks: u64,
) -> Result<Vec<String>, BackendError> {
    let ranges = (blocks / BLOCKS_PER_RANGE).clamp(1, RANGES);
    if ranges == 1 {
        return manifest::retry(|| objects.list(prefix)).await;
    }
    let bound = |k: u64| {
        let block = u128::from(blocks) * u128::from(k) / u128::from(ranges);
        objects::block_key(prefix, u64::try_from(block).unwrap_or(u64::MAX))
    };
    let bounds: Vec<String> = (1..ranges).map(bound).collect();
    let slices = (0..bounds.len() + 1).map(|i| {
        let after = i
            .checked_sub(1)
            .and_then(|j| bounds.get(j))
            .map(String::as_str);
        let upto = bounds.get(i).map(String::as_str);
        manifest::retry(move || objects.list_range(prefix, after, upto))
    });
    let parts = futures_util::future::try_join_all(slices).await?;
    Ok(parts.concat())
}

/// The layers `m` describes, loaded from a listing of the export (and of a clone's base, whose
/// objects it reads through).
pub(crate) async fn layers(
    objects: &DynObjectStore,
    prefix: &str,
    m: &manifest::Manifest,
    buckets: &dyn Buckets,
) -> Result<(layers::Layers, Option<objects::BaseObjects>), StoreError> {
    let blocks = m.size.div_ceil(m.block_size.max(1));
    let listed = keys(objects, prefix, blocks).await?;
    let mut layers =
        layers::Layers::new(m.all_parents(), m.head()).map_err(StoreError::BadManifest)?;
    layers.load(prefix, listed.iter().map(String::as_str));
    drop(listed);
    let mut base = None;
    if let Some(b) = m.base.as_ref() {
        let store = buckets.bucket(&b.bucket)?;
        let listed = keys(&store, &b.prefix, blocks).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryStore;
    use bytes::Bytes;
    use std::sync::Arc;

    /// Split into ranges or not, the listing holds every key once: plain blocks at both
    /// ends and around each range bound, layer objects, tombstones, the manifest.
    #[tokio::test]
    async fn a_listing_split_into_ranges_holds_every_key_once() {
        let memory = Arc::new(MemoryStore::new());
        let objects: DynObjectStore = memory.clone();
        let blocks = 200_000u64;
        let mut want = vec!["vm/nbd-s3.json".to_string(), "vm/nbd-s3.lock".to_string()];
        let mut put = |key: String| want.push(key);
        for b in [0, 1, blocks - 1] {
            put(objects::block_key("vm/", b));
        }
        for k in 1..RANGES {
            let bound = blocks * k / RANGES;
            for b in [bound - 1, bound, bound + 1] {
                put(objects::block_key("vm/", b));
            }
        }
        put(layers::data_key("vm/", 3, 7));
        put(layers::tomb_key("vm/", 3, 8));
        want.sort();
        want.dedup();
        for key in &want {
            objects.put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        // Another export's keys share the bucket, not the prefix.
        objects
            .put("vm2/0000000000000000", Bytes::new())
            .await
            .unwrap();
        for n in [1, BLOCKS_PER_RANGE * 2, blocks, u64::MAX / 4] {
            let lists = memory.lists();
            let mut got = keys(&objects, "vm/", n).await.unwrap();
            let ranges = memory.lists() - lists;
            assert_eq!(
                ranges,
                (n / BLOCKS_PER_RANGE).clamp(1, RANGES),
                "{n} blocks"
            );
            got.sort();
            assert_eq!(got, want, "{n} blocks");
        }
    }
}
