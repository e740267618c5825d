//! One block's write-back: its latest content is PUT (or the object DELETEd when it reads as
//! zeros), retried until the object store takes it; then the block is clean unless it changed
//! meanwhile.

use crate::backend::DELETE_BATCH;
use crate::retry::Policy;
use crate::store::cache::{Buf, BufOwner, Content};
use crate::store::stats::Counters;
use crate::store::Inner;
use bytes::Bytes;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// Stores one block, retrying until the object store takes it. Each attempt sends the
/// block's latest content, so changes made during an outage are folded in.
pub(super) async fn store_block(inner: Arc<Inner>, block: u64, _permit: OwnedSemaphorePermit) {
    store_one(&inner, block).await;
}

/// [`store_block`], within a PUT slot the caller holds.
async fn store_one(inner: &Arc<Inner>, block: u64) {
    let mut backoff = Policy::WRITE_BACK.backoff();
    let mut failing = false;
    let mut taken: Option<(Option<Buf>, bool)> = None;
    loop {
        // Per attempt: the layer written to is the head when the attempt starts.
        let key = inner.objects.key(block);
        // An ordered export retries the version it took: folding in later changes could
        // put a later epoch's data into S3 before an earlier epoch is complete.
        let (content, stored) = match taken.clone() {
            Some(t) if inner.wb.ordered => t,
            _ => {
                let Some(t) = inner.snapshot(block) else {
                    return;
                };
                taken = Some(t.clone());
                t
            }
        };
        let has_data = content.is_some();
        let result = match content {
            Some(buf) => {
                inner
                    .objects
                    .put(&key, Bytes::from_owner(BufOwner(buf)))
                    .await
            }
            // The objects know whether anything must go (an object, or a tombstone over a
            // snapshot's data): an all-zero block never stored costs nothing.
            None => inner.objects.clear(block).await,
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
                    inner.wb.retry_now.notify_waiters();
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
                    _ = tokio::time::sleep(backoff.next_delay().unwrap_or(Policy::WRITE_BACK.cap)) => {}
                    _ = inner.wb.retry_now.notified() => {}
                }
            }
        }
    }
}

/// How long gathering zeroed blocks pauses between rounds: a TRIM of many blocks queues
/// them within a few milliseconds.
const GATHER_PAUSE: Duration = Duration::from_millis(2);
/// Rounds at most (a stream of zeroing writes must not hold its blocks dirty for long).
const GATHER_ROUNDS: usize = 50;
/// Blocks gathered at most (four multi-object deletes).
const GATHER_MAX: usize = 4 * DELETE_BATCH;

/// Stores blocks that read as zeros (a large TRIM or WRITE_ZEROES) in one PUT slot, starting
/// with `first`: gathers the others queued or handed over by the dispatcher until a round
/// brings no more, then deletes their objects in multi-object deletes, retried until the
/// object store takes them. A block written with data since it was gathered is stored on
/// its own afterwards.
pub(super) async fn store_zeroed(inner: Arc<Inner>, first: u64, _permit: OwnedSemaphorePermit) {
    let mut blocks = vec![first];
    for _ in 0..GATHER_ROUNDS {
        tokio::time::sleep(GATHER_PAUSE).await;
        let before = blocks.len();
        blocks.extend(
            inner
                .wb
                .zeroed
                .lock()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default(),
        );
        blocks.extend(inner.take_zeroed(GATHER_MAX.saturating_sub(blocks.len())));
        if blocks.len() == before || blocks.len() >= GATHER_MAX {
            break;
        }
    }
    // Closed: blocks handed over until now are ours; later ones start a new gathering.
    blocks.extend(inner.wb.zeroed.lock().take().unwrap_or_default());
    let mut zeroed = Vec::with_capacity(blocks.len());
    let mut written = Vec::new();
    for block in blocks {
        match inner.snapshot(block) {
            Some((None, stored)) => zeroed.push((block, stored)),
            Some((Some(_), _)) => written.push(block),
            None => {}
        }
    }
    let mut backoff = Policy::WRITE_BACK.backoff();
    let mut failing = false;
    let keys: Vec<u64> = zeroed.iter().map(|(b, _)| *b).collect();
    loop {
        match inner.objects.clear_many(&keys).await {
            Ok(()) => break,
            Err(e) => {
                Counters::bump(&inner.counters.write_back_failures);
                if !failing {
                    tracing::warn!(blocks = keys.len(), error = %e,
                        "write-back of zeroed blocks failed; they stay dirty and are retried");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay().unwrap_or(Policy::WRITE_BACK.cap)) => {}
                    _ = inner.wb.retry_now.notified() => {}
                }
            }
        }
    }
    if failing {
        tracing::info!(
            blocks = keys.len(),
            "write-back of zeroed blocks succeeded after failures"
        );
        inner.wb.retry_now.notify_waiters();
    }
    for (block, stored) in zeroed {
        if stored {
            Counters::bump(&inner.counters.deletes);
        }
        // Written again meanwhile (zeros or data): `finish_store` queues it again.
        inner.finish_store(block, false);
    }
    for block in written {
        store_one(&inner, block).await;
    }
}

impl Inner {
    /// Under the shard lock: the content to store now. Changes queued so far become part of
    /// this attempt (`inflight_seq` keeps the oldest of them for FLUSH).
    fn snapshot(&self, block: u64) -> Option<(Option<Buf>, bool)> {
        let mut shard = self.cache.lock(block);
        let Some(slot) = shard.slots.get_mut(&block) else {
            tracing::error!(block, "write-back of a block that is not cached (bug)");
            return None;
        };
        if !slot.frozen.is_empty() {
            // The oldest version first (ordered exports); later ones wait for it.
            let f = slot.frozen.remove(0);
            slot.inflight_seq.get_or_insert(f.seq);
            slot.inflight_pages += f.pages;
            return Some((f.content, slot.stored));
        }
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
        let wb = &self.wb;
        let stored_bytes = {
            let mut shard = self.cache.lock(block);
            let Some(slot) = shard.slots.get_mut(&block) else {
                return;
            };
            slot.stored = has_data;
            let done = slot.inflight_seq.take();
            let stored_bytes = self.pages.bytes(std::mem::take(&mut slot.inflight_pages));
            let again = slot.frozen.first().map(|f| f.seq).or(slot.dirty_seq);
            let due = if !slot.frozen.is_empty() || slot.pages.is_full(self.pages) {
                Instant::now()
            } else {
                Instant::now() + wb.age()
            };
            let empty = matches!(slot.content, Content::Ready(None));
            let mut queue = wb.queue.lock();
            if let Some(s) = done {
                queue.stored(s);
            }
            if let Some(d) = again {
                queue.add(d, block, due);
                drop(queue);
                wb.kick.notify_one();
            } else {
                drop(queue);
                if empty {
                    shard.slots.remove(&block); // absent and zero: the presence map says so
                } else {
                    shard.relink(block, self.budget.next_tick());
                }
                self.budget.block_cleaned();
            }
            stored_bytes
        };
        wb.dirty.fetch_sub(stored_bytes, SeqCst);
        self.budget.release_dirty(stored_bytes);
        wb.stored.notify_waiters();
        if wb.ordered {
            // Finishing an epoch lets the next one go; stored changes free journal space.
            wb.kick.notify_one();
            self.release_journal(false);
        } else if wb.closed.load(SeqCst) {
            wb.kick.notify_one(); // a dropped store's dispatcher exits once all is stored
        }
    }
}
