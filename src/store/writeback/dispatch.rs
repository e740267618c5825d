//! The per-export dispatcher: holds a PUT slot, then hands it to the block [`choose`] picks.

use super::choice::{choose, Choice, Moment};
use super::put::store_block;
use super::COLD;
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
        let inner2 = Arc::clone(&inner);
        if bg {
            wb.background_puts.fetch_add(1, SeqCst);
        }
        tokio::spawn(async move {
            store_block(Arc::clone(&inner2), block, permit).await;
            if bg {
                inner2.wb.background_puts.fetch_sub(1, SeqCst);
                inner2.wb.kick.notify_one();
            }
        });
    }
}

impl Inner {
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
