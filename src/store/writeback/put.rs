//! One block's write-back: its latest content is PUT (or the object DELETEd when it reads as
//! zeros), retried until the object store takes it; then the block is clean unless it changed
//! meanwhile.

use crate::retry::Policy;
use crate::store::cache::{Buf, BufOwner, Content};
use crate::store::stats::Counters;
use crate::store::Inner;
use bytes::Bytes;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

/// Stores one block, retrying until the object store takes it. Each attempt sends the
/// block's latest content, so changes made during an outage are folded in.
pub(super) async fn store_block(inner: Arc<Inner>, block: u64, _permit: OwnedSemaphorePermit) {
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
