//! Cached block states, sharded by block index. A shard's lock is held only for map updates
//! and memcpy, never across an await, so S3 latency never blocks another connection.

use super::budget::Charge;
use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::watch;

/// Shards of the block map: enough that 2-64 cores rarely meet on one lock.
pub(crate) const SHARDS: usize = 32;

/// One block's bytes plus the budget charge that is returned when the last holder drops it.
#[derive(Debug)]
pub(crate) struct BlockBuf {
    pub data: Box<[u8]>,
    pub _charge: Charge,
}

impl Drop for BlockBuf {
    /// The memory goes back to the buffer pool for the next block (no fresh mapping).
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        self._charge.buffers().give(data);
    }
}

/// Shared, copy-on-write block buffer (shared only with an in-flight PUT).
pub(crate) type Buf = Arc<BlockBuf>;

/// Lets a PUT send the buffer without copying it.
pub(crate) struct BufOwner(pub Buf);

impl AsRef<[u8]> for BufOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

/// Outcome of a GET that others are waiting on: `None` while in flight.
pub(crate) type LoadResult = Option<Result<(), Arc<crate::backend::BackendError>>>;

/// What the cache knows of a block's content.
#[derive(Debug)]
pub(crate) enum Content {
    /// A GET is in flight; wait on the receiver, then look again.
    Loading(watch::Receiver<LoadResult>),
    /// Known content; `None` means all zeros (no buffer held).
    Ready(Option<Buf>),
}

/// A cached block. Clean = `dirty_seq` and `inflight_seq` both `None`.
#[derive(Debug)]
pub(crate) struct Slot {
    pub content: Content,
    /// Sequence number of the first change not yet handed to write-back.
    pub dirty_seq: Option<u64>,
    /// While a write-back task owns the block: the oldest change it is storing.
    pub inflight_seq: Option<u64>,
    /// Whether the object store holds an object for this block (skips useless DELETEs).
    pub stored: bool,
    /// LRU position while the block is clean and has a buffer (0 = not in the LRU).
    pub tick: u64,
    /// Pages changed since write-back last took the block (counted as dirty bytes).
    pub pages: super::dirty::PageMap,
    /// Dirty pages the in-flight write-back covers (released when it succeeds).
    pub inflight_pages: u32,
    /// When a client last changed the block (background write-back skips hot blocks).
    pub last_write: Option<tokio::time::Instant>,
    /// Journaled exports: earlier versions still to be uploaded, oldest first, each the
    /// content as a FLUSH closed its epoch (see `writeback`). Empty otherwise.
    pub frozen: Vec<Frozen>,
}

/// A block's content as of the end of an epoch, kept for upload in flush order while later
/// writes change the cached copy (copy-on-write: the buffer is shared until they do).
#[derive(Debug)]
pub(crate) struct Frozen {
    /// The version's oldest change number (its entry in the unstored set).
    pub seq: u64,
    pub content: Option<Buf>,
    /// Dirty pages this version covers (released when it is stored).
    pub pages: u32,
}

impl Slot {
    /// A slot whose GET is in flight.
    pub fn loading(rx: watch::Receiver<LoadResult>) -> Self {
        Self::new(Content::Loading(rx), true)
    }

    /// A clean slot.
    pub fn new(content: Content, stored: bool) -> Self {
        Self {
            content,
            dirty_seq: None,
            inflight_seq: None,
            stored,
            tick: 0,
            pages: Default::default(),
            inflight_pages: 0,
            last_write: None,
            frozen: Vec::new(),
        }
    }

    /// Whether the object store has everything this slot holds.
    pub fn is_clean(&self) -> bool {
        self.dirty_seq.is_none() && self.inflight_seq.is_none() && self.frozen.is_empty()
    }

    /// The oldest change not yet in the object store (what FLUSH waits on).
    pub fn oldest_unstored(&self) -> Option<u64> {
        self.inflight_seq
            .or(self.frozen.first().map(|f| f.seq))
            .or(self.dirty_seq)
    }
}

/// One shard: its blocks and the LRU order of its clean, buffered blocks.
#[derive(Debug, Default)]
pub(crate) struct Shard {
    pub slots: HashMap<u64, Slot>,
    pub lru: BTreeMap<u64, u64>,
}

impl Shard {
    /// Takes the slot out of the LRU (it is about to change state).
    pub fn unlink(&mut self, block: u64) {
        if let Some(slot) = self.slots.get_mut(&block) {
            if slot.tick != 0 {
                self.lru.remove(&slot.tick);
                slot.tick = 0;
            }
        }
    }

    /// Puts a clean buffered slot at the young end of the LRU; other states stay out.
    pub fn relink(&mut self, block: u64, tick: u64) {
        self.unlink(block);
        if let Some(slot) = self.slots.get_mut(&block) {
            if slot.is_clean() && matches!(slot.content, Content::Ready(Some(_))) {
                slot.tick = tick;
                self.lru.insert(tick, block);
            }
        }
    }

    /// Removes the least recently used clean block; the buffer is returned so the caller
    /// drops it (and its charge) after releasing the lock.
    pub fn evict_oldest(&mut self) -> Option<Slot> {
        let (_, block) = self.lru.pop_first()?;
        self.slots.remove(&block)
    }
}

/// The sharded block map of one export.
#[derive(Debug)]
pub(crate) struct Cache {
    shards: Vec<Mutex<Shard>>,
}

impl Cache {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    /// The locked shard holding `block`.
    pub fn lock(&self, block: u64) -> MutexGuard<'_, Shard> {
        self.shards[(block % SHARDS as u64) as usize].lock()
    }

    /// Every shard in turn (eviction, statistics).
    pub fn shards(&self) -> impl Iterator<Item = &Mutex<Shard>> {
        self.shards.iter()
    }

    /// Tick of the least recently used clean block of the whole export.
    pub fn oldest_clean(&self) -> Option<u64> {
        self.shards
            .iter()
            .filter_map(|s| s.lock().lru.first_key_value().map(|(t, _)| *t))
            .min()
    }

    /// Drops every clean block (and forgets GETs in flight: their waiters look again), for
    /// when what the blocks read as changed under the cache (a rollback). Dirty blocks stay.
    pub fn drop_clean(&self) {
        for shard in &self.shards {
            let mut shard = shard.lock();
            let clean: Vec<u64> = shard
                .slots
                .iter()
                .filter(|(_, slot)| slot.is_clean())
                .map(|(block, _)| *block)
                .collect();
            let mut dropped = Vec::with_capacity(clean.len());
            for block in clean {
                shard.unlink(block);
                dropped.extend(shard.slots.remove(&block));
            }
            drop(shard);
            // The buffers (and their charges) go outside the lock.
            drop(dropped);
        }
    }

    /// Evicts the least recently used clean block of the export; false if none.
    pub fn evict_oldest(&self) -> bool {
        let mut best: Option<(u64, usize)> = None;
        for (i, s) in self.shards.iter().enumerate() {
            if let Some((t, _)) = s.lock().lru.first_key_value() {
                if best.map_or(true, |(bt, _)| *t < bt) {
                    best = Some((*t, i));
                }
            }
        }
        let Some((_, i)) = best else { return false };
        let victim = self.shards[i].lock().evict_oldest();
        // Dropped here, outside the lock: returns the charge and wakes waiters.
        victim.is_some()
    }
}
