//! Reads: cache hits are a hash lookup and a memcpy; misses become one GET per block however
//! many requests want it (single-flight through a `Loading` state); sequential readers get
//! read-ahead; absent blocks cost nothing.
//!
//! - `load`: the GET slots and the single GET of a block that every waiter shares
//! - `ahead`: the sequential-read detector, read-ahead and prefetch
//! - `extents`: a read's result pieces, and block status from the presence map

mod ahead;
mod extents;
mod load;

pub(crate) use ahead::ReadAhead;

use super::block::Chunk;
use super::cache::{Content, LoadResult, Shard};
use super::stats::Counters;
use super::{Extent, Inner, StoreError};
use extents::Extents;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use tokio::sync::{watch, Semaphore};

/// The read path's own state: how many GETs may be in flight, and where sequential readers
/// are heading.
#[derive(Debug)]
pub(crate) struct ReadPath {
    get_slots: Arc<Semaphore>,
    readahead: parking_lot::Mutex<ReadAhead>,
}

impl ReadPath {
    pub fn new(get_slots: usize) -> Self {
        Self {
            get_slots: Arc::new(Semaphore::new(get_slots)),
            readahead: parking_lot::Mutex::new(ReadAhead::default()),
        }
    }
}

/// What one attempt to read a block piece found.
enum Found {
    Done,
    Wait(watch::Receiver<LoadResult>),
}

impl Inner {
    /// Reads `len` bytes at `offset` as data/zero extents covering the range in order.
    pub(crate) async fn read(
        self: &Arc<Self>,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>, StoreError> {
        let chunks = self
            .geo
            .chunks(offset, u64::from(len), self.size.load(SeqCst))?;
        if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
            if chunks.len() > 1 {
                // All GETs of a multi-block read go out together.
                for c in &chunks {
                    self.ensure_loading(c.block);
                }
            }
            self.note_read(first.block, last.block);
        }
        let mut out = Extents::new(len as usize);
        for c in &chunks {
            self.read_chunk(c, &mut out).await?;
        }
        Ok(out.finish())
    }

    async fn read_chunk(self: &Arc<Self>, c: &Chunk, out: &mut Extents) -> Result<(), StoreError> {
        loop {
            let found = {
                let mut shard = self.cache.lock(c.block);
                self.copy_out(&mut shard, c, out)
            };
            match found {
                Found::Done => return Ok(()),
                Found::Wait(rx) => self.wait_load(c.block, rx).await?,
            }
        }
    }

    /// Under the shard lock: copies the piece if known, else returns what to wait for.
    fn copy_out(self: &Arc<Self>, shard: &mut Shard, c: &Chunk, out: &mut Extents) -> Found {
        let Some(slot) = shard.slots.get(&c.block) else {
            if !self.presence.get(c.block) {
                Counters::bump(&self.counters.hits);
                out.zero(c.len);
                return Found::Done;
            }
            Counters::bump(&self.counters.misses);
            return Found::Wait(self.start_load(shard, c.block));
        };
        match &slot.content {
            Content::Loading(rx) => Found::Wait(rx.clone()),
            Content::Ready(None) => {
                out.zero(c.len);
                Found::Done
            }
            Content::Ready(Some(buf)) => {
                Counters::bump(&self.counters.hits);
                out.data(buf, c.start..c.start + c.len);
                if slot.tick != 0 {
                    shard.relink(c.block, self.budget.next_tick());
                }
                Found::Done
            }
        }
    }
}
