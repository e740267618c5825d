//! Single-flight GETs: the first reader of a missing block marks it `Loading` and spawns the
//! one GET for it; everyone else waits on the same result. GET slots bound how many run.

use crate::backend::BackendError;
use crate::retry::Policy;
use crate::store::cache::{BlockBuf, Content, LoadResult, Shard, Slot};
use crate::store::stats::Counters;
use crate::store::{Inner, StoreError};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::watch;

impl Inner {
    /// Waits for a GET started by anyone; `Ok` means "look again".
    pub(crate) async fn wait_load(
        &self,
        block: u64,
        mut rx: watch::Receiver<LoadResult>,
    ) -> Result<(), StoreError> {
        let outcome = rx.wait_for(|r| r.is_some()).await.map(|r| r.clone());
        match outcome {
            Ok(Some(Ok(()))) | Ok(None) => Ok(()),
            Ok(Some(Err(e))) => Err(StoreError::Backend(clone_error(&e))),
            Err(_) => {
                // The loading task vanished (runtime shutting down): forget its slot so the
                // next reader starts a fresh GET instead of waiting forever.
                let mut shard = self.cache.lock(block);
                let stale = matches!(shard.slots.get(&block),
                    Some(Slot { content: Content::Loading(r), .. }) if r.same_channel(&rx));
                if stale {
                    shard.slots.remove(&block);
                }
                Err(StoreError::ShuttingDown)
            }
        }
    }

    /// Starts a GET unless the block is cached, loading or absent (read-ahead, prefetch,
    /// read-modify-write).
    pub(crate) fn ensure_loading(
        self: &Arc<Self>,
        block: u64,
    ) -> Option<watch::Receiver<LoadResult>> {
        let mut shard = self.cache.lock(block);
        match shard.slots.get(&block) {
            Some(Slot {
                content: Content::Loading(rx),
                ..
            }) => Some(rx.clone()),
            Some(_) => None,
            None if self.presence.get(block) => Some(self.start_load(&mut shard, block)),
            None => None,
        }
    }

    /// Under the shard lock: marks the block `Loading` and spawns the one GET for it. The GET
    /// runs in its own task so a reader that goes away cannot strand the others.
    pub(crate) fn start_load(
        self: &Arc<Self>,
        shard: &mut Shard,
        block: u64,
    ) -> watch::Receiver<LoadResult> {
        let (tx, rx) = watch::channel(None);
        shard.slots.insert(block, Slot::loading(rx.clone()));
        let inner = Arc::clone(self);
        let own = rx.clone();
        tokio::spawn(async move { inner.load(block, tx, own).await });
        rx
    }

    /// `own` is the receiver of the slot this load was started for.
    async fn load(
        self: Arc<Self>,
        block: u64,
        tx: watch::Sender<LoadResult>,
        own: watch::Receiver<LoadResult>,
    ) {
        let permit = Arc::clone(&self.rd.get_slots).acquire_owned().await;
        let charge = self.budget.reserve_memory(self.geo.block_size).await;
        let fetched = self.get_block(block).await;
        drop(permit);
        let outcome = {
            let mut shard = self.cache.lock(block);
            let ours = matches!(shard.slots.get(&block),
                Some(Slot { content: Content::Loading(r), .. }) if r.same_channel(&own));
            if !ours {
                // The slot was dropped meanwhile (a rollback reset the cache): what this GET
                // found belongs to the old state and must neither fill a newer slot nor
                // change presence. Waiters look again and see the new state.
                drop(shard);
                tx.send_replace(Some(Ok(())));
                return;
            }
            match fetched {
                Ok(Some(data)) => {
                    let buf = BlockBuf {
                        data: Vec::from(data).into_boxed_slice(),
                        _charge: charge,
                    };
                    if let Some(slot) = shard.slots.get_mut(&block) {
                        slot.content = Content::Ready(Some(Arc::new(buf)));
                        slot.stored = true;
                    }
                    shard.relink(block, self.budget.next_tick());
                    Ok(())
                }
                Ok(None) => {
                    // Listed at open but gone now (deleted behind our back): reads as zeros.
                    shard.slots.remove(&block);
                    self.presence.set(block, false);
                    Ok(())
                }
                Err(e) => {
                    shard.slots.remove(&block);
                    Err(Arc::new(e))
                }
            }
        };
        tx.send_replace(Some(outcome));
    }

    /// GET with a few retries; a wrong-sized object is corrupt (never served as data).
    async fn get_block(&self, block: u64) -> Result<Option<Bytes>, BackendError> {
        let Some(key) = self.objects.read_key(block) else {
            return Ok(None);
        };
        let mut backoff = Policy::BLOCK_READ.backoff();
        loop {
            Counters::bump(&self.counters.gets);
            match self.objects.get(&key).await {
                // The layer map says this layer holds the block: an object gone under a
                // snapshot or its export is lost data (EIO), never zeros.
                Ok(None) if self.objects.layers().is_layered() => {
                    tracing::error!(key = %key, "block object missing though the layer map lists it; returning EIO");
                    return Err(BackendError::Corrupt {
                        key: key.to_string(),
                        reason: "missing, though the layer map says its layer holds it".into(),
                    });
                }
                Ok(v) => return Ok(v),
                Err(e) => {
                    let delay = match e {
                        BackendError::Permanent(_) | BackendError::Undecodable { .. } => None,
                        _ => backoff.next_delay(),
                    };
                    let Some(delay) = delay else {
                        tracing::error!(key = %key, error = %e, "reading block failed; returning EIO");
                        return Err(e);
                    };
                    Counters::bump(&self.counters.get_retries);
                    tracing::debug!(key = %key, error = %e, "GET failed; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Waiters of one GET each need their own error value (same kind, same message).
fn clone_error(e: &BackendError) -> BackendError {
    match e {
        BackendError::Corrupt { key, reason } => BackendError::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
        BackendError::Undecodable { key, reason } => BackendError::Undecodable {
            key: key.clone(),
            reason: reason.clone(),
        },
        other if other.is_retryable() => BackendError::Transient(other.to_string()),
        other => BackendError::Permanent(other.to_string()),
    }
}
