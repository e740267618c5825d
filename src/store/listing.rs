//! Listing an export's objects (at open, and again when another daemon may have changed
//! them), and rebuilding the store's view of them from that listing.

use super::{layers, manifest, objects, BlockStore, Buckets, StoreError};
use crate::backend::{BackendError, DynObjectStore, ListPage};

/// Pages listed at once.
const PAGES_AT_ONCE: usize = 16;
/// Most key ranges a large export's plain block keys are first cut into.
const RANGES: u64 = 16;
/// Blocks per first range at least: a range costs one request even when it holds nothing,
/// so a small export starts with one.
const BLOCKS_PER_RANGE: u64 = 8192;

/// A slice of the key space: the keys after `.0` (from the first when `None`) up to and
/// including `.1` (to the last when `None`).
type Range = (Option<String>, Option<String>);

/// Every key under `prefix` of an export of `blocks` blocks whose layers are `layer_ids`
/// (bounded retries, as everything done while opening an export), in no particular order.
///
/// The key space is cut into ranges that together hold every key: the plain block keys of a
/// large export at block bounds (16 hex digits, so key order is block order), then one range
/// per layer ending after that layer's keys, the last one open (the manifest, the lease,
/// anything foreign). Ranges are listed a page at a time, up to [`PAGES_AT_ONCE`] pages at
/// once. A page with more to follow leaves the rest of its range to list; while fewer pages
/// are in flight than allowed, that rest is cut again at block bounds into ranges spanning
/// as many blocks as that page did (about a page each, if the keys go on as densely), so
/// objects packed in one part of the key space (a disk filled from its start, a layer
/// holding every write since the last snapshot) are listed in parallel too, not one page
/// after another.
pub(crate) async fn keys(
    objects: &DynObjectStore,
    prefix: &str,
    blocks: u64,
    layer_ids: impl IntoIterator<Item = u64>,
) -> Result<Vec<String>, BackendError> {
    let mut todo = first_ranges(prefix, blocks, layer_ids);
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut keys = Vec::new();
    loop {
        while running.len() < PAGES_AT_ONCE {
            let Some(range) = todo.pop() else { break };
            running.push(page(objects, prefix, range));
        }
        let Some(done) = futures_util::StreamExt::next(&mut running).await else {
            break;
        };
        let ((_, upto), page) = done?;
        if page.more {
            let Some(last) = page.keys.last().cloned() else {
                return Err(BackendError::Permanent(format!(
                    "LIST {prefix}*: a page said more keys follow but held none"
                )));
            };
            let idle = PAGES_AT_ONCE.saturating_sub(running.len() + todo.len());
            let cuts = match idle {
                0 | 1 => Vec::new(),
                n => {
                    let step = page_blocks(prefix, &page.keys);
                    layers::cuts(prefix, &last, upto.as_deref(), blocks, n as u64, step)
                }
            };
            let mut from = Some(last);
            for cut in cuts {
                todo.push((from, Some(cut.clone())));
                from = Some(cut);
            }
            todo.push((from, upto));
        }
        keys.extend(page.keys);
    }
    Ok(keys)
}

/// How many blocks a page of keys spans, when its first and last keys are blocks of one
/// layer: about how many a range one page long spans further on.
fn page_blocks(prefix: &str, keys: &[String]) -> Option<u64> {
    let first = layers::parse_key(prefix, keys.first()?)?;
    let last = layers::parse_key(prefix, keys.last()?)?;
    (first.layer == last.layer).then(|| last.block.saturating_sub(first.block).saturating_add(1))
}

/// The first ranges: see [`keys`].
fn first_ranges(prefix: &str, blocks: u64, layer_ids: impl IntoIterator<Item = u64>) -> Vec<Range> {
    let ranges = (blocks / BLOCKS_PER_RANGE).clamp(1, RANGES);
    let mut bounds: Vec<String> = (1..ranges)
        .map(|k| {
            let block = u128::from(blocks) * u128::from(k) / u128::from(ranges);
            objects::block_key(prefix, u64::try_from(block).unwrap_or(u64::MAX))
        })
        .collect();
    let mut ids: Vec<u64> = layer_ids.into_iter().filter(|&l| l != 0).collect();
    ids.sort_unstable();
    ids.dedup();
    // Each layer's range ends where the next one's begins; the last one stays open.
    if let Some((_, before_last)) = ids.split_last() {
        bounds.push(layers::layer_end(prefix, 0));
        bounds.extend(before_last.iter().map(|&l| layers::layer_end(prefix, l)));
    }
    let mut out = Vec::with_capacity(bounds.len() + 1);
    let mut from = None;
    for bound in bounds {
        out.push((from, Some(bound.clone())));
        from = Some(bound);
    }
    out.push((from, None));
    out
}

/// One page of `range`, handed back with it.
async fn page(
    objects: &DynObjectStore,
    prefix: &str,
    range: Range,
) -> Result<(Range, ListPage), BackendError> {
    let (after, upto) = (range.0.as_deref(), range.1.as_deref());
    let page = manifest::retry(|| objects.list_page(prefix, after, upto)).await?;
    Ok((range, page))
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
    let listed = keys(objects, prefix, blocks, m.parents().into_keys()).await?;
    let mut layers =
        layers::Layers::new(m.all_parents(), m.head()).map_err(StoreError::BadManifest)?;
    layers.load(prefix, listed.iter().map(String::as_str));
    drop(listed);
    let mut base = None;
    if let Some(b) = m.base.as_ref() {
        let store = buckets.bucket(&b.bucket)?;
        let listed = keys(&store, &b.prefix, blocks, b.layers.iter().map(|l| l.id)).await?;
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
    use crate::backend::ObjectStore;
    use async_trait::async_trait;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    async fn store(keys: &[String]) -> Arc<MemoryStore> {
        let memory = Arc::new(MemoryStore::new());
        for key in keys {
            memory.put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        // Another export's keys share the bucket, not the prefix.
        memory
            .put("vm2/0000000000000000", Bytes::new())
            .await
            .unwrap();
        memory
    }

    /// However the key space is cut, the listing holds every key once: plain blocks at both
    /// ends and around each first bound, layer objects, tombstones, the manifest; with
    /// fewer than a page in each range, one request per first range.
    #[tokio::test]
    async fn a_listing_split_into_ranges_holds_every_key_once() {
        let blocks = 200_000u64;
        let mut want = vec!["vm/nbd-s3.json".to_string(), "vm/nbd-s3.lock".to_string()];
        for b in [0, 1, blocks - 1] {
            want.push(objects::block_key("vm/", b));
        }
        for k in 1..RANGES {
            let bound = blocks * k / RANGES;
            for b in [bound - 1, bound, bound + 1] {
                want.push(objects::block_key("vm/", b));
            }
        }
        want.push(layers::data_key("vm/", 3, 7));
        want.push(layers::tomb_key("vm/", 3, 8));
        want.push(layers::data_key("vm/", 5, blocks - 1));
        want.sort();
        want.dedup();
        let memory = store(&want).await;
        let objects: DynObjectStore = memory.clone();
        for n in [1, BLOCKS_PER_RANGE * 2, blocks, u64::MAX / 4] {
            for layer_ids in [vec![], vec![0], vec![3], vec![5, 3, 0], vec![4, 6]] {
                let lists = memory.lists();
                let mut got = keys(&objects, "vm/", n, layer_ids.clone()).await.unwrap();
                let requests = memory.lists() - lists;
                let first = first_ranges("vm/", n, layer_ids.clone()).len() as u64;
                assert_eq!(requests, first, "{n} blocks, layers {layer_ids:?}");
                got.sort();
                assert_eq!(got, want, "{n} blocks, layers {layer_ids:?}");
            }
        }
    }

    /// Answers each page a little late and notes the most pages in flight at once.
    #[derive(Debug)]
    struct Slow {
        inner: Arc<MemoryStore>,
        in_flight: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait]
    impl ObjectStore for Slow {
        async fn get(&self, key: &str) -> Result<Option<Bytes>, BackendError> {
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
            self.inner.put(key, data).await
        }
        async fn delete(&self, key: &str) -> Result<(), BackendError> {
            self.inner.delete(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
            self.inner.list(prefix).await
        }
        async fn list_page(
            &self,
            prefix: &str,
            after: Option<&str>,
            upto: Option<&str>,
        ) -> Result<ListPage, BackendError> {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            let page = self.inner.list_page(prefix, after, upto).await;
            self.in_flight.fetch_sub(1, SeqCst);
            page
        }
    }

    /// Keys packed in one part of the key space (a disk filled from its start, a layer
    /// holding every write since a snapshot) are still listed many pages at once, each key
    /// once, with few requests beyond one per page.
    #[tokio::test]
    async fn packed_keys_are_listed_many_pages_at_once() {
        let blocks = 1u64 << 24;
        let mut want = vec!["vm/nbd-s3.json".to_string()];
        want.extend((0..20_000).map(|b| objects::block_key("vm/", b)));
        want.extend((0..5_000).map(|b| layers::data_key("vm/", 3, b * 7)));
        want.extend((0..3_000).map(|b| layers::tomb_key("vm/", 3, b * 7 + 1)));
        want.sort();
        let memory = store(&want).await;
        let slow = Arc::new(Slow {
            inner: Arc::clone(&memory),
            in_flight: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let objects: DynObjectStore = slow.clone();
        let mut got = keys(&objects, "vm/", blocks, [0, 3]).await.unwrap();
        got.sort();
        assert_eq!(got, want);
        let pages = want.len().div_ceil(crate::backend::memory::PAGE_KEYS) as u64;
        let requests = memory.lists();
        assert!(
            (pages..=pages + 3 * PAGES_AT_ONCE as u64).contains(&requests),
            "{requests} requests for {pages} pages"
        );
        let most = slow.most.load(SeqCst);
        assert!(
            (PAGES_AT_ONCE / 2..=PAGES_AT_ONCE).contains(&most),
            "{most} pages at once"
        );
    }
}
