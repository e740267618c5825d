//! The per-export dispatcher: holds a PUT slot, then hands it to the block [`choose`] picks.

use super::choice::{choose, Choice, Moment};
use super::put::{store_block, store_zeroed};
use super::COLD;
use crate::store::cache::Content;
use crate::store::Inner;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use tokio::time::Instant;

/// Runs until the store handle is dropped and everything is stored.
pub(crate) async fn dispatcher(inner: Arc<Inner>) {
    let wb = &inner.wb;
    loop {
        let Ok(permit) = Arc::clone(&wb.put_slots).acquire_owned().await else {
            return;
        };
        let (block, bg) = loop {
            let kick = wb.kick.notified();
            let pressure = inner.budget.pressure().notified();
            tokio::pin!(kick, pressure);
            pressure.as_mut().enable();
            let choice = {
                let mut queue = wb.queue.lock();
                let moment = Moment {
                    now: Instant::now(),
                    pressure: inner.budget.pressure_level(),
                    flush_target: wb.flush_target.load(SeqCst),
                    background_puts: wb.background_puts.load(SeqCst),
                    limit: wb.upload_limit(&mut queue),
                };
                let choice = choose(&queue, &moment);
                if let Choice::Store { seq, .. } = choice {
                    queue.take(seq);
                }
                choice
            };
            let wake = match choice {
                Choice::Store {
                    block, background, ..
                } => break (block, background),
                Choice::Wait { until, cold } => {
                    if cold {
                        if let Some(b) = inner.pick_cold(Instant::now()) {
                            break (b, true);
                        }
                    }
                    until
                }
            };
            if wake.is_none() && wb.closed.load(SeqCst) && wb.queue.lock().unstored_count() == 0 {
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
        // A block that reads as zeros is deleted with the others a large TRIM or
        // WRITE_ZEROES made: one multi-object delete instead of a request per block. One task
        // gathers them; while it does, the others go to it (and this slot is free again).
        // (Not for a journaled export: its versions go to S3 epoch by epoch, which a
        // gathering across the queue would not respect.)
        let zeroed = !wb.ordered && inner.is_zeroed(block);
        if zeroed {
            let mut gathering = wb.zeroed.lock();
            if let Some(blocks) = gathering.as_mut() {
                blocks.push(block);
                continue;
            }
            *gathering = Some(Vec::new());
        }
        let inner2 = Arc::clone(&inner);
        if bg {
            wb.background_puts.fetch_add(1, SeqCst);
        }
        tokio::spawn(async move {
            if zeroed {
                store_zeroed(Arc::clone(&inner2), block, permit).await;
            } else {
                store_block(Arc::clone(&inner2), block, permit).await;
            }
            if bg {
                inner2.wb.background_puts.fetch_sub(1, SeqCst);
                inner2.wb.kick.notify_one();
            }
        });
    }
}

/// How deep into the queue a batch of zeroed blocks is looked for, per block wanted: other
/// changes between them (a TRIM amid writes) are skipped, within bounds.
const ZEROED_SCAN: usize = 4;

impl Inner {
    /// Whether `block` reads as zeros in the cache (so storing it deletes, or does nothing).
    pub(super) fn is_zeroed(&self, block: u64) -> bool {
        let shard = self.cache.lock(block);
        shard
            .slots
            .get(&block)
            .is_some_and(|s| matches!(s.content, Content::Ready(None)))
    }

    /// Up to `n` more queued blocks that read as zeros, oldest first, taken from the queue.
    pub(super) fn take_zeroed(&self, n: usize) -> Vec<u64> {
        let candidates = self.wb.queue.lock().oldest(n.saturating_mul(ZEROED_SCAN));
        let mut taken = Vec::new();
        for (seq, block) in candidates {
            if taken.len() >= n {
                break;
            }
            if self.is_zeroed(block) {
                if let Some(b) = self.wb.queue.lock().take(seq) {
                    taken.push(b);
                }
            }
        }
        taken
    }

    /// A queued block among the oldest that nobody wrote to for [`COLD`], taken from the
    /// queue; `None` when all are still being written.
    fn pick_cold(&self, now: Instant) -> Option<u64> {
        let candidates = self.wb.queue.lock().oldest(16);
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
                let mut queue = self.wb.queue.lock();
                // An ordered export may have closed an epoch since: never a later version.
                if seq < self.wb.upload_limit(&mut queue) {
                    if let Some(b) = queue.take(seq) {
                        return Some(b);
                    }
                }
            }
        }
        None
    }
}
