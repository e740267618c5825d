//! The process-wide memory budget (`[cache] memory`) and dirty limit (`[cache] dirty`),
//! shared by every export. Every block buffer carries a [`Charge`] that returns its bytes on
//! drop, so "memory in use" is exact whoever holds the buffer (cache, in-flight PUT, ...).
//! Reserving waits, after evicting clean blocks of any export, until memory is free: that is
//! what keeps the daemon inside its budget whatever clients do.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

use super::pool::BufferPool;

/// See [`CacheBudget::pressure_level`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pressure {
    None,
    Background,
    Hard,
}

/// A store whose clean blocks can be dropped to make room for another export's blocks.
pub(crate) trait Evictor: Send + Sync {
    /// Tick of the least recently used clean block, if any.
    fn oldest_clean(&self) -> Option<u64>;
    /// Drops the least recently used clean block; false when there was none.
    fn evict_oldest(&self) -> bool;
}

/// The process-wide cache budget shared by all exports (`[cache] memory` and `dirty`).
pub struct CacheBudget {
    memory: u64,
    dirty: u64,
    used: AtomicU64,
    dirty_used: AtomicU64,
    /// Tasks waiting for memory or dirty room: write-back treats this as "hurry".
    waiters: AtomicUsize,
    /// Memory was freed or dirty bytes drained.
    changed: Notify,
    /// Someone started waiting: write-back should run now, not after its delay.
    pressure: Notify,
    tick: AtomicU64,
    evictors: Mutex<Vec<Weak<dyn Evictor>>>,
    /// Freed block buffers kept for reuse (part of the memory this budget allows).
    buffers: Arc<BufferPool>,
}

impl std::fmt::Debug for CacheBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBudget")
            .field("memory", &self.memory)
            .field("dirty", &self.dirty)
            .field("used", &self.used.load(SeqCst))
            .field("dirty_used", &self.dirty_used.load(SeqCst))
            .finish()
    }
}

/// Bytes of a block buffer counted against the memory budget until dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<CacheBudget>,
    bytes: u64,
}

impl Charge {
    /// The pool of the budget this charge counts against.
    pub(crate) fn buffers(&self) -> &Arc<BufferPool> {
        &self.budget.buffers
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, SeqCst);
        self.budget.wake();
    }
}

/// Room for one more dirty block, reserved before the cache lock is taken. Dropped unused,
/// it gives the room back; [`DirtyToken::commit`] hands it to the block it made dirty.
#[derive(Debug)]
pub(crate) struct DirtyToken {
    budget: Arc<CacheBudget>,
    bytes: u64,
}

impl DirtyToken {
    /// `bytes` of the reservation became dirty data: they stay counted until write-back
    /// calls `release_dirty`; the rest is returned when the token drops.
    pub fn commit(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

impl Drop for DirtyToken {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release_dirty(self.bytes);
        }
    }
}

impl CacheBudget {
    /// One budget per process; every export's store draws from it.
    pub fn new(memory: u64, dirty: u64) -> Arc<Self> {
        Arc::new(Self {
            buffers: Arc::new(BufferPool::new(pool_limit(memory))),
            memory,
            dirty,
            used: AtomicU64::new(0),
            dirty_used: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            changed: Notify::new(),
            pressure: Notify::new(),
            tick: AtomicU64::new(1),
            evictors: Mutex::new(Vec::new()),
        })
    }
    /// The recycled buffers every block and large payload is taken from.
    pub(crate) fn buffers(&self) -> &Arc<BufferPool> {
        &self.buffers
    }
    /// Bytes of clean + dirty data allowed in memory.
    pub fn memory_limit(&self) -> u64 {
        self.memory
    }
    /// Dirty bytes allowed before writers wait.
    pub fn dirty_limit(&self) -> u64 {
        self.dirty
    }
    /// Bytes of block buffers alive now (metrics; never above the limit by more than one
    /// block when the limit is smaller than a block).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(SeqCst)
    }
    /// Dirty bytes of all exports (metrics).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_used.load(SeqCst)
    }

    /// How hard write-back should push. Background write-back (a few PUTs, oldest first)
    /// starts at half the dirty limit: random small writes keep dirtying the same blocks, and
    /// every PUT saved there is CPU and request cost saved. Near the limit, or when anyone
    /// waits for room, everything goes out at full parallelism.
    pub(crate) fn pressure_level(&self) -> Pressure {
        let dirty = self.dirty_used.load(SeqCst);
        if self.waiters.load(SeqCst) > 0 || dirty >= self.dirty - self.dirty / 8 {
            Pressure::Hard
        } else if dirty >= self.dirty / 2 {
            Pressure::Background
        } else {
            Pressure::None
        }
    }

    /// Resolves when some task starts waiting for room (write-back dispatchers listen).
    pub(crate) fn pressure(&self) -> &Notify {
        &self.pressure
    }

    /// A fresh LRU tick, comparable across exports.
    pub(crate) fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, SeqCst)
    }

    /// Registers a store whose clean blocks may be evicted for anyone's benefit.
    pub(crate) fn register(&self, e: Weak<dyn Evictor>) {
        let mut list = self.evictors.lock();
        list.retain(|w| w.strong_count() > 0);
        list.push(e);
    }

    fn wake(&self) {
        if self.waiters.load(SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Counts a dirty block as written back: wakes writers waiting for dirty room.
    pub(crate) fn release_dirty(&self, bytes: u64) {
        self.dirty_used.fetch_sub(bytes, SeqCst);
        self.wake();
    }

    /// Wakes memory waiters after a block became clean (and so evictable).
    pub(crate) fn block_cleaned(&self) {
        self.wake();
    }

    fn try_take(counter: &AtomicU64, limit: u64, bytes: u64) -> bool {
        counter
            .fetch_update(SeqCst, SeqCst, |u| {
                // An empty budget always admits one block, so a limit below the block size
                // slows things down instead of deadlocking.
                (u == 0 || u.saturating_add(bytes) <= limit).then_some(u + bytes)
            })
            .is_ok()
    }

    /// Evicts the globally least recently used clean block; false when none exists.
    fn evict_one(&self) -> bool {
        let stores: Vec<Arc<dyn Evictor>> = self
            .evictors
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let victim = stores
            .iter()
            .filter_map(|s| s.oldest_clean().map(|t| (t, s)))
            .min_by_key(|(t, _)| *t);
        match victim {
            Some((_, s)) => s.evict_oldest(),
            None => false,
        }
    }

    /// Memory for one block buffer; evicts clean blocks, then waits for write-back.
    pub(crate) async fn reserve_memory(self: &Arc<Self>, bytes: u64) -> Charge {
        loop {
            if Self::try_take(&self.used, self.memory, bytes) {
                return Charge {
                    budget: Arc::clone(self),
                    bytes,
                };
            }
            if self.evict_one() {
                continue;
            }
            self.wait(|| {
                let u = self.used.load(SeqCst);
                u == 0 || u.saturating_add(bytes) <= self.memory || self.has_clean()
            })
            .await;
        }
    }

    /// Memory for one block buffer if available now without waiting.
    #[cfg(test)]
    pub(crate) fn try_reserve_memory(self: &Arc<Self>, bytes: u64) -> Option<Charge> {
        Self::try_take(&self.used, self.memory, bytes).then(|| Charge {
            budget: Arc::clone(self),
            bytes,
        })
    }

    fn has_clean(&self) -> bool {
        self.evictors
            .lock()
            .iter()
            .filter_map(Weak::upgrade)
            .any(|s| s.oldest_clean().is_some())
    }

    /// Room for one more dirty block; waits while the dirty limit is reached.
    pub(crate) async fn reserve_dirty(self: &Arc<Self>, bytes: u64) -> DirtyToken {
        loop {
            if Self::try_take(&self.dirty_used, self.dirty, bytes) {
                return DirtyToken {
                    budget: Arc::clone(self),
                    bytes,
                };
            }
            self.wait(|| {
                let u = self.dirty_used.load(SeqCst);
                u == 0 || u.saturating_add(bytes) <= self.dirty
            })
            .await;
        }
    }

    /// Sleeps until `ready()` may have become true. Registers before re-checking, so a
    /// wake-up between the check and the sleep is never lost.
    async fn wait(&self, ready: impl Fn() -> bool) {
        self.waiters.fetch_add(1, SeqCst);
        let guard = WaiterGuard(self);
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !ready() {
            self.pressure.notify_waiters();
            notified.await;
        }
        drop(guard);
    }
}

/// Free buffers the pool may keep beyond the budget: 1/16 of it, 4..64 MiB (enough for a
/// few clients' in-flight 1 MiB writes and the blocks they replace).
fn pool_limit(memory: u64) -> usize {
    usize::try_from((memory / 16).clamp(4 << 20, 64 << 20)).unwrap_or(4 << 20)
}

struct WaiterGuard<'a>(&'a CacheBudget);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn memory_waits_until_a_charge_is_dropped() {
        let b = CacheBudget::new(100, 50);
        let c1 = b.reserve_memory(60).await;
        assert_eq!(b.used_bytes(), 60);
        let b2 = Arc::clone(&b);
        let t = tokio::spawn(async move { b2.reserve_memory(60).await });
        while b.waiters.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!t.is_finished());
        drop(c1);
        let c2 = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.used_bytes(), 60);
        drop(c2);
        assert_eq!(b.used_bytes(), 0);
    }

    #[tokio::test]
    async fn dirty_tokens_wait_and_commit_keeps_the_count() {
        let b = CacheBudget::new(1000, 20);
        let t1 = b.reserve_dirty(10).await;
        let t2 = b.reserve_dirty(10).await;
        assert_eq!(b.pressure_level(), Pressure::Hard);
        let mut t1 = t1;
        t1.commit(10);
        assert_eq!(b.dirty_bytes(), 20);
        let b2 = Arc::clone(&b);
        let waiter = tokio::spawn(async move { b2.reserve_dirty(10).await });
        while b.waiters.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(t2);
        let t3 = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.dirty_bytes(), 20);
        drop(t3);
        b.release_dirty(10);
        assert_eq!(b.dirty_bytes(), 0);
    }

    #[tokio::test]
    async fn a_limit_below_one_block_still_admits_one() {
        let b = CacheBudget::new(10, 10);
        let c = b.reserve_memory(100).await;
        assert!(b.try_reserve_memory(1).is_none());
        drop(c);
        assert!(b.try_reserve_memory(1).is_some());
    }
}
