//! Write-back: dirty blocks go to S3 in the background with many PUTs in flight; FLUSH and FUA
//! wait for exactly the changes they must cover, using sequence numbers.
//!
//! Every change gets a sequence number. A block's "oldest unstored change" is kept in
//! `Queue::unstored`; a FLUSH started when the counter read S returns once no entry below S
//! remains. Later writes get numbers ≥ S and never delay it. A failing PUT is retried forever
//! (with backoff) by the task that owns the block; the block stays dirty meanwhile.

use super::backoff::Backoff;
use super::budget::Pressure;
use super::cache::{BufOwner, Content};
use super::stats::Counters;
use super::{Inner, StoreError};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// How long a partly written block may stay dirty before write-back stores it unasked.
pub(crate) const AGE_BEFORE_WRITE_BACK: Duration = Duration::from_secs(30);
/// PUTs in flight for background write-back (dirty data above half the limit).
const BACKGROUND_PUTS: usize = 4;
/// PUTs in flight for blocks that are merely due (a sequential writer finished them, or a
/// partial block aged) while dirty data is below half the dirty limit. Write-back goes on
/// during a client's burst without taking most of the CPU and store bandwidth from it (on a
/// 2-core machine, 64 parallel PUTs to a local S3 server halved a 1 MiB writer); above half
/// the limit, or when FLUSH or FUA asks, every PUT slot is used.
const QUIET_PUTS: usize = 8;
/// Background write-back only takes blocks nobody wrote for this long: a block that is still
/// being written would be dirty again right after its PUT.
const COLD: Duration = Duration::from_secs(1);

/// Dirty blocks waiting for a write-back task, and every block not yet stored.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// Waiting blocks by the sequence number of their first change: seq → (block, due).
    by_seq: BTreeMap<u64, (u64, Instant)>,
    /// The same blocks by due time: (due, seq) → block.
    by_due: BTreeMap<(Instant, u64), u64>,
    /// Oldest unstored change of every dirty or in-flight block: seq → block.
    unstored: BTreeMap<u64, u64>,
}

/// What the dispatcher should do next.
enum Pick {
    /// Store this block; `true` when FLUSH, FUA or memory pressure asked for it.
    Block(u64, bool),
    At(Instant),
    Idle,
}

impl Queue {
    /// A block just became dirty with change `seq`.
    pub fn add(&mut self, seq: u64, block: u64, due: Instant) {
        self.unstored.insert(seq, block);
        self.requeue(seq, block, due);
    }
    /// A dirty block (already in `unstored`) waits for write-back again.
    fn requeue(&mut self, seq: u64, block: u64, due: Instant) {
        self.by_seq.insert(seq, (block, due));
        self.by_due.insert((due, seq), block);
    }
    /// Moves a queued block to the front of the due order (it became fully written);
    /// true if it moved.
    pub fn make_due(&mut self, seq: u64, now: Instant) -> bool {
        match self.by_seq.get_mut(&seq) {
            Some((block, due)) if *due > now => {
                let block = *block;
                self.by_due.remove(&(*due, seq));
                *due = now;
                self.by_due.insert((now, seq), block);
                true
            }
            _ => false,
        }
    }
    /// Takes the block queued under `seq` (a write-back task now owns it).
    fn take(&mut self, seq: u64) -> Option<u64> {
        let (block, due) = self.by_seq.remove(&seq)?;
        self.by_due.remove(&(due, seq));
        Some(block)
    }
    /// The next block to store: anything below `urgent_below` (FLUSH, pressure), then
    /// blocks whose time has come if `due_ok` (else `Idle`: the end of a PUT kicks the
    /// dispatcher).
    fn pick(&mut self, urgent_below: u64, now: Instant, due_ok: bool) -> Pick {
        let Some((&oldest, _)) = self.by_seq.first_key_value() else {
            return Pick::Idle;
        };
        if oldest < urgent_below {
            return self
                .take(oldest)
                .map_or(Pick::Idle, |b| Pick::Block(b, true));
        }
        match self.by_due.first_key_value() {
            Some((&(due, _), _)) if due <= now && !due_ok => Pick::Idle,
            Some((&(due, seq), _)) if due <= now => {
                self.take(seq).map_or(Pick::Idle, |b| Pick::Block(b, false))
            }
            Some((&(due, _), _)) => Pick::At(due),
            None => Pick::Idle,
        }
    }
    /// The oldest queued changes (background write-back looks for a cold one among them).
    fn oldest(&self, n: usize) -> Vec<(u64, u64)> {
        self.by_seq
            .iter()
            .take(n)
            .map(|(s, (b, _))| (*s, *b))
            .collect()
    }
    /// Whether any change below `seq` is still unstored.
    fn pending_below(&self, seq: u64) -> bool {
        self.unstored
            .first_key_value()
            .is_some_and(|(s, _)| *s < seq)
    }
}

/// The per-export dispatcher: holds a PUT slot, then hands it to the next block due. Ends
/// once the store handle is dropped and everything is stored.
pub(crate) async fn dispatcher(inner: Arc<Inner>) {
    loop {
        let Ok(permit) = Arc::clone(&inner.put_slots).acquire_owned().await else {
            return;
        };
        let (block, bg) = loop {
            let kick = inner.kick.notified();
            let pressure = inner.budget.pressure().notified();
            tokio::pin!(kick, pressure);
            pressure.as_mut().enable();
            let now = Instant::now();
            let level = inner.budget.pressure_level();
            let urgent_below = if level == Pressure::Hard {
                u64::MAX
            } else {
                inner.flush_target.load(SeqCst)
            };
            // Below half the dirty limit, blocks that are merely due share a few PUTs.
            let quiet = level == Pressure::None;
            let due_ok = !quiet || inner.background_puts.load(SeqCst) < QUIET_PUTS;
            let pick = inner.wb.lock().pick(urgent_below, now, due_ok);
            let mut wake = match pick {
                Pick::Block(b, urgent) => break (b, quiet && !urgent),
                Pick::At(t) => Some(t),
                Pick::Idle => None,
            };
            if level == Pressure::Background && inner.background_puts.load(SeqCst) < BACKGROUND_PUTS
            {
                if let Some(b) = inner.pick_cold(now) {
                    break (b, true);
                }
                let recheck = now + COLD / 4;
                wake = Some(wake.map_or(recheck, |t| t.min(recheck)));
            }
            if wake.is_none() && inner.closed.load(SeqCst) && inner.wb.lock().unstored.is_empty() {
                return;
            }
            let timer = async {
                match wake {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut kick => {}
                _ = &mut pressure => {}
                _ = timer => {}
            }
        };
        let inner2 = Arc::clone(&inner);
        if bg {
            inner.background_puts.fetch_add(1, SeqCst);
        }
        tokio::spawn(async move {
            store_block(Arc::clone(&inner2), block, permit).await;
            if bg {
                inner2.background_puts.fetch_sub(1, SeqCst);
                inner2.kick.notify_one();
            }
        });
    }
}

/// Stores one block, retrying until the object store takes it. Each attempt sends the
/// block's latest content, so changes made during an outage are folded in.
async fn store_block(inner: Arc<Inner>, block: u64, _permit: OwnedSemaphorePermit) {
    let key = inner.key(block);
    let mut backoff = Backoff::write_back();
    let mut failing = false;
    loop {
        let Some((content, stored)) = inner.snapshot(block) else {
            return;
        };
        let has_data = content.is_some();
        let result = match content {
            Some(buf) => {
                inner
                    .objects
                    .put(&key, Bytes::from_owner(BufOwner(buf)))
                    .await
            }
            None if stored => inner.objects.delete(&key).await,
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                let c = &inner.counters;
                match (has_data, stored) {
                    (true, _) => Counters::bump(&c.puts),
                    (false, true) => Counters::bump(&c.deletes),
                    (false, false) => {}
                }
                inner.finish_store(block, has_data);
                if failing {
                    tracing::info!(key = %key, "write-back succeeded after failures");
                    inner.retry_now.notify_waiters();
                }
                return;
            }
            Err(e) => {
                Counters::bump(&inner.counters.write_back_failures);
                if !failing {
                    tracing::warn!(key = %key, error = %e,
                        "write-back failed; block stays dirty and is retried");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = inner.retry_now.notified() => {}
                }
            }
        }
    }
}

impl Inner {
    /// A queued block among the oldest that nobody wrote to for [`COLD`], taken from the
    /// queue; `None` when all are still being written.
    fn pick_cold(&self, now: Instant) -> Option<u64> {
        let candidates = self.wb.lock().oldest(16);
        for (seq, block) in candidates {
            let cold = {
                let shard = self.cache.lock(block);
                shard.slots.get(&block).is_some_and(|s| {
                    s.dirty_seq == Some(seq)
                        && s.last_write
                            .map_or(true, |t| now.saturating_duration_since(t) >= COLD)
                })
            };
            if cold {
                if let Some(b) = self.wb.lock().take(seq) {
                    return Some(b);
                }
            }
        }
        None
    }

    /// Under the shard lock: the content to store now. Changes queued so far become part of
    /// this attempt (`inflight_seq` keeps the oldest of them for FLUSH).
    fn snapshot(&self, block: u64) -> Option<(Option<super::cache::Buf>, bool)> {
        let mut shard = self.cache.lock(block);
        let Some(slot) = shard.slots.get_mut(&block) else {
            tracing::error!(block, "write-back of a block that is not cached (bug)");
            return None;
        };
        if let Some(d) = slot.dirty_seq.take() {
            slot.inflight_seq.get_or_insert(d);
        }
        slot.inflight_pages += slot.pages.take();
        match &slot.content {
            Content::Ready(c) => Some((c.clone(), slot.stored)),
            Content::Loading(_) => {
                tracing::error!(block, "write-back of a block that is loading (bug)");
                None
            }
        }
    }

    /// After a successful PUT/DELETE: the block is clean unless it changed meanwhile, in
    /// which case it is queued again.
    fn finish_store(&self, block: u64, has_data: bool) {
        let stored_bytes = {
            let mut shard = self.cache.lock(block);
            let Some(slot) = shard.slots.get_mut(&block) else {
                return;
            };
            slot.stored = has_data;
            let done = slot.inflight_seq.take();
            let stored_bytes = self.pages.bytes(std::mem::take(&mut slot.inflight_pages));
            let again = slot.dirty_seq;
            let due = if slot.pages.is_full(self.pages) {
                Instant::now()
            } else {
                Instant::now() + self.write_back_age()
            };
            let empty = matches!(slot.content, Content::Ready(None));
            let mut wb = self.wb.lock();
            if let Some(s) = done {
                wb.unstored.remove(&s);
            }
            if let Some(d) = again {
                wb.unstored.insert(d, block);
                wb.requeue(d, block, due);
                drop(wb);
                self.kick.notify_one();
            } else {
                drop(wb);
                if empty {
                    shard.slots.remove(&block); // absent and zero: the presence map says so
                } else {
                    shard.relink(block, self.budget.next_tick());
                }
                self.budget.block_cleaned();
            }
            stored_bytes
        };
        self.dirty.fetch_sub(stored_bytes, SeqCst);
        self.budget.release_dirty(stored_bytes);
        self.stored.notify_waiters();
        if self.closed.load(SeqCst) {
            self.kick.notify_one(); // a dropped store's dispatcher exits once all is stored
        }
    }

    /// Waits until no change numbered below `target` is unstored, or `limit` passes.
    async fn wait_stored_below(&self, target: u64, limit: Duration) -> Result<(), StoreError> {
        let wait = async {
            loop {
                let notified = self.stored.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.wb.lock().pending_below(target) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| StoreError::FlushTimeout(limit))
    }

    /// FLUSH: everything changed before this call is stored when it returns.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let target = self.next_seq.load(SeqCst);
        if !self.wb.lock().pending_below(target) {
            return Ok(());
        }
        self.flush_target.fetch_max(target, SeqCst);
        self.kick.notify_one();
        self.retry_now.notify_waiters();
        self.wait_stored_below(target, self.flush_timeout).await
    }

    /// FUA: stores these blocks' changes numbered below `target` now, ahead of the queue.
    pub(crate) async fn write_through(
        self: &Arc<Self>,
        blocks: impl Iterator<Item = u64>,
        target: u64,
    ) -> Result<(), StoreError> {
        let blocks: Vec<u64> = blocks.collect();
        let wait = async {
            for block in blocks {
                self.store_now(block, target).await;
            }
        };
        tokio::time::timeout(self.flush_timeout, wait)
            .await
            .map_err(|_| StoreError::FlushTimeout(self.flush_timeout))
    }

    async fn store_now(self: &Arc<Self>, block: u64, target: u64) {
        loop {
            let notified = self.stored.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let shard = self.cache.lock(block);
                let Some(slot) = shard.slots.get(&block) else {
                    return;
                };
                match slot.oldest_unstored() {
                    None => return,
                    Some(s) if s >= target => return,
                    Some(_) => {}
                }
                if let (None, Some(seq)) = (slot.inflight_seq, slot.dirty_seq) {
                    // Still queued: take it from the queue and store it in our own task.
                    if self.wb.lock().take(seq).is_some() {
                        let inner = Arc::clone(self);
                        tokio::spawn(async move {
                            if let Ok(p) = Arc::clone(&inner.put_slots).acquire_owned().await {
                                store_block(inner, block, p).await;
                            }
                        });
                    }
                }
            }
            notified.await;
        }
    }

    /// Stores every dirty block; see [`super::BlockStore::shutdown_flush`].
    pub(crate) async fn shutdown_flush(
        &self,
        deadline: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.flush_target.store(u64::MAX, SeqCst);
        self.kick.notify_one();
        let started = std::time::Instant::now();
        loop {
            let left = self.wb.lock().unstored.len();
            if left == 0 {
                return Ok(());
            }
            let remaining = match deadline {
                Some(d) => match d.checked_sub(started.elapsed()) {
                    Some(r) if !r.is_zero() => r,
                    _ => return Err(self.unflushed()),
                },
                None => Duration::MAX,
            };
            tracing::info!(prefix = %self.prefix, dirty_blocks = left, "flushing dirty blocks");
            let step = remaining.min(Duration::from_secs(5));
            if self.wait_stored_below(u64::MAX, step).await.is_ok() {
                return Ok(());
            }
        }
    }

    fn unflushed(&self) -> StoreError {
        let blocks: Vec<u64> = self.wb.lock().unstored.values().copied().collect();
        let mut names: Vec<String> = blocks.iter().take(20).map(|b| self.key(*b)).collect();
        if blocks.len() > 20 {
            names.push(format!("… and {} more", blocks.len() - 20));
        }
        StoreError::Unflushed {
            count: blocks.len(),
            blocks: names.join(", "),
        }
    }
}
