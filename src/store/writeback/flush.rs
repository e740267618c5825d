//! Waiting for durability: FLUSH waits for every change numbered below its start, FUA stores
//! its own blocks ahead of the queue, shutdown stores everything.

use super::put::store_block;
use crate::store::{Inner, StoreError};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

impl Inner {
    /// Waits until no change numbered below `target` is unstored, or `limit` passes.
    async fn wait_stored_below(&self, target: u64, limit: Duration) -> Result<(), StoreError> {
        let wait = async {
            loop {
                let notified = self.wb.stored.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.wb.queue.lock().pending_below(target) {
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
        let wb = &self.wb;
        let target = wb.next_seq.load(SeqCst);
        if !wb.queue.lock().pending_below(target) {
            return Ok(());
        }
        wb.flush_target.fetch_max(target, SeqCst);
        wb.kick.notify_one();
        wb.retry_now.notify_waiters();
        self.wait_stored_below(target, wb.flush_timeout).await
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
        let limit = self.wb.flush_timeout;
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| StoreError::FlushTimeout(limit))
    }

    async fn store_now(self: &Arc<Self>, block: u64, target: u64) {
        loop {
            let notified = self.wb.stored.notified();
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
                    if self.wb.queue.lock().take(seq).is_some() {
                        let inner = Arc::clone(self);
                        tokio::spawn(async move {
                            if let Ok(p) = Arc::clone(&inner.wb.put_slots).acquire_owned().await {
                                store_block(inner, block, p).await;
                            }
                        });
                    }
                }
            }
            notified.await;
        }
    }

    /// Stores every dirty block; see [`crate::store::BlockStore::shutdown_flush`].
    pub(crate) async fn shutdown_flush(
        &self,
        deadline: Option<Duration>,
    ) -> Result<(), StoreError> {
        self.wb.flush_target.store(u64::MAX, SeqCst);
        self.wb.kick.notify_one();
        let started = std::time::Instant::now();
        loop {
            let left = self.wb.queue.lock().unstored_count();
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
            let prefix = self.objects.prefix();
            tracing::info!(prefix = %prefix, dirty_blocks = left, "flushing dirty blocks");
            let step = remaining.min(Duration::from_secs(5));
            if self.wait_stored_below(u64::MAX, step).await.is_ok() {
                return Ok(());
            }
        }
    }

    fn unflushed(&self) -> StoreError {
        let blocks: Vec<u64> = self.wb.queue.lock().unstored_blocks().collect();
        let mut names: Vec<String> = blocks
            .iter()
            .take(20)
            .map(|b| self.objects.key(*b).to_string())
            .collect();
        if blocks.len() > 20 {
            names.push(format!("… and {} more", blocks.len() - 20));
        }
        StoreError::Unflushed {
            count: blocks.len(),
            blocks: names.join(", "),
        }
    }
}
